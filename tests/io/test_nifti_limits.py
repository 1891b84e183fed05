"""NIfTI limits and header fields: the NIfTI-1 axis size, scl_slope/scl_inter as written, mixed-case
``.img``/``.hdr`` pairs, and a sheared sform beside a valid qform (read through the qform, as ITK does).

Expected values come from nibabel (raw header fields) and SimpleITK (origin, spacing, direction), never from
medfuse's own reader.
"""

from __future__ import annotations

import gzip
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import medfuse
from medfuse.errors import GeometryError, InvalidInputError, MedfuseWarning, UnreadableFileError
from medfuse.io.nifti import load_image


# ------------------------------------------------------------------ NIfTI-1 stores each axis size as int16
def test_a_nifti1_save_of_an_axis_over_32767_is_refused_with_the_way_out(tmp_path):
    vol = medfuse.Volume(np.zeros((40000, 2, 1), np.uint8), np.eye(4))
    with pytest.raises(InvalidInputError, match="NIfTI-1") as e:
        medfuse.save(vol, tmp_path / "strip.nii")
    assert "format='nifti2'" in e.value.fix and ".nrrd" in e.value.fix
    assert "strip.nii" in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left
    # The way out the fix names works, and the largest NIfTI-1 size is still written as NIfTI-1.
    p = medfuse.save(vol, tmp_path / "strip2.nii", format="nifti2")
    assert nib.load(str(p)).shape[:1] == (40000,) and isinstance(nib.load(str(p)), nib.Nifti2Image)
    edge = medfuse.save(medfuse.Volume(np.zeros((32767, 2, 1), np.uint8), np.eye(4)), tmp_path / "edge.nii")
    assert isinstance(nib.load(str(edge)), nib.Nifti1Image) and nib.load(str(edge)).shape[0] == 32767


# ------------------------------------------------------------------ scl_slope / scl_inter as written
def _raw_header(path, nifti2=False):
    """The header as the file stores it (nibabel's loaded header resets scl_slope/scl_inter to NaN)."""
    cls = nib.Nifti2Header if nifti2 else nib.Nifti1Header
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return cls.from_fileobj(fh)


@pytest.mark.parametrize("fmt", ["nifti", "nifti2"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.float32,
                                   np.float64, np.complex64, np.float16, bool, np.int64])
def test_written_nifti_holds_slope_1_intercept_0_and_exact_voxels(tmp_path, fmt, dtype):
    """docs/io.md promises scl_slope 1 / scl_inter 0 in the file. nibabel writes them (its array writer's
    scaling); a header nibabel *loads* shows NaN/NaN (it resets them), which is why they were reported as NaN.
    Read raw here, for every dtype path of the writer."""
    rng = np.random.default_rng(0)
    arr = (rng.random((3, 4, 5)) * 100 - (0 if np.dtype(dtype).kind in "ub" else 50)).astype(dtype)
    p = medfuse.save(medfuse.Volume(arr, np.eye(4)), tmp_path / "x.nii.gz", format=fmt)
    hdr = _raw_header(p, nifti2=fmt == "nifti2")
    assert float(hdr["scl_slope"]) == 1.0 and float(hdr["scl_inter"]) == 0.0  # as docs/io.md says
    stored = np.asanyarray(nib.load(str(p)).dataobj)  # nibabel applies 1/0 without changing the type
    assert stored.dtype == hdr.get_data_dtype()
    np.testing.assert_array_equal(stored, arr.astype(stored.dtype))
    back = medfuse.load(p).array
    assert back.dtype == stored.dtype
    img = sitk.ReadImage(str(p)) if fmt == "nifti" and np.dtype(dtype).kind != "c" else None
    if img is not None:  # ITK reads the same values (ITK 5.4 cannot open NIfTI-2 or complex)
        np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)), stored)


# ------------------------------------------------------------------ .img/.hdr pairs with mixed-case endings
def _pair(tmp_path, image_name, header_name):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    aff[:3, 3] = [-5, 7, 11]
    nib.Nifti1Pair(data, aff).to_filename(str(tmp_path / "src.img"))
    shutil.copy(tmp_path / "src.img", tmp_path / image_name)
    shutil.copy(tmp_path / "src.hdr", tmp_path / header_name)
    return tmp_path / "src.img"


@pytest.mark.parametrize("image_name, header_name", [("scan.Img", "scan.Hdr"), ("scan.img", "scan.Hdr"),
                                                     ("scan.IMG", "scan.hdr"), ("scan.Img", "scan.HDR")])
def test_a_mixed_case_pair_loads_from_either_file(tmp_path, image_name, header_name, capfd):
    ref = _pair(tmp_path, image_name, header_name)
    expect = medfuse.load(ref)
    for given in (image_name, header_name):
        with warnings.catch_warnings():
            warnings.simplefilter("error", MedfuseWarning)  # a valid pair: nothing to warn about
            v = load_image(tmp_path / given)
        np.testing.assert_array_equal(v.array, np.asanyarray(nib.load(str(ref)).dataobj))
        np.testing.assert_allclose(v.affine, expect.affine, atol=1e-9)
        assert v.provenance["nifti_space"] == expect.provenance["nifti_space"]
    assert "mixed case" not in capfd.readouterr().err  # ITK's NIfTI library is not asked (it prints that)


@pytest.mark.parametrize("present", ["scan.Img", "scan.Hdr", "scan.img"])
def test_half_a_pair_says_its_partner_is_missing(tmp_path, present):
    _pair(tmp_path, present, "unused.hdr")
    with pytest.raises(UnreadableFileError, match="is missing") as e:
        load_image(tmp_path / present)
    want = "scan.hdr" if present.lower().endswith(".img") else "scan.img"
    assert want in str(e.value) and "re-export" not in str(e.value)


# ------------------------------------------------------------------ sheared sform, valid qform: ITK's reading
def _oblique(spacing=(1.5, 2.0, 2.5), origin=(-10.0, 20.0, 5.0), seed=3):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q if np.linalg.det(q) > 0 else -q
    aff = np.eye(4)
    aff[:3, :3] = q @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def _sitk_geometry(path):
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "unexpected scales in sform" note
    try:
        img = sitk.ReadImage(str(path))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    return np.asarray(img.GetOrigin()), np.asarray(img.GetSpacing()), np.asarray(img.GetDirection()).reshape(3, 3)


def _sheared(path, *, shear=0.3, scode=1, qcode=1):
    """A NIfTI whose sform is ``_oblique()`` sheared by ``shear`` and whose qform (code ``qcode``; 0: none) is it
    unsheared."""
    aff = _oblique()
    sheared = aff.copy()
    sheared[0, 1] += shear
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), None)
    img.set_qform(aff if qcode else None, code=qcode)
    img.set_sform(sheared, code=scode)
    img.to_filename(str(path))
    return path


@pytest.mark.parametrize("scode, qcode, space", [(1, 1, "scanner"), (2, 1, "scanner"), (4, 2, "aligned")])
@pytest.mark.parametrize("shear", [0.3, 1e-3])
def test_sheared_sform_with_a_valid_qform_is_read_as_itk_reads_it(tmp_path, scode, qcode, space, shear):
    p = _sheared(tmp_path / "shear.nii.gz", shear=shear, scode=scode, qcode=qcode)
    with pytest.warns(MedfuseWarning, match=r"sform \(code \d\) is sheared.*uses the qform.*as ITK does") as w:
        v = load_image(p)
    assert str(p) in str(w[0].message)
    origin, spacing, direction = _sitk_geometry(p)
    np.testing.assert_allclose(v.origin, origin, atol=1e-4)
    np.testing.assert_allclose(v.spacing, spacing, atol=1e-5)
    np.testing.assert_allclose(v.direction, direction, atol=1e-5)
    assert v.provenance["nifti_space"] == space  # the qform's code: the transform used


def test_the_qform_warning_points_at_the_callers_line(tmp_path):
    import medfuse

    p = _sheared(tmp_path / "shear.nii.gz")
    for load in (medfuse.load, load_image):
        with pytest.warns(MedfuseWarning, match="uses the qform") as w:
            load(p)
        assert w[0].filename == __file__, w[0].filename


def test_sheared_sform_without_a_qform_is_still_refused(tmp_path):
    """ITK refuses it too ("No orthonormal definition found"): there is no rigid reading to fall back to."""
    p = _sheared(tmp_path / "shear_only.nii", qcode=0)
    with pytest.raises(GeometryError, match="sheared") as e:
        load_image(p)
    assert str(p) in str(e.value)


def test_a_pair_partner_is_matched_by_its_stem_exactly_and_two_candidates_are_refused(tmp_path):
    ref = _pair(tmp_path, "Scan.Img", "Scan.hdr")
    shutil.copy(tmp_path / "src.img", tmp_path / "scan.img")  # another image's data file (other stem case)
    np.testing.assert_array_equal(load_image(tmp_path / "Scan.Img").array, np.asanyarray(nib.load(str(ref)).dataobj))
    shutil.copy(tmp_path / "src.hdr", tmp_path / "Scan.HDR")  # now two headers could go with Scan.Img
    with pytest.raises(UnreadableFileError, match="more than one file could be this pair's .hdr") as e:
        load_image(tmp_path / "Scan.Img")
    assert "Scan.HDR" in str(e.value) and "Scan.hdr" in str(e.value)


# ------------------------------------------------------------------ MetaImage data in several files
_SLICES = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)  # (z, y, x): one raw file per z


def _sliced_mhd(folder, data_file, names=(), slices=None):
    """A 4x5x6 MET_SHORT MetaImage whose ElementDataFile is ``data_file`` (LIST, LIST 2D or a %d pattern), the
    names listed after it, and slice files sl0.raw..sl5.raw (``slices``: which of them to write)."""
    for k in range(6) if slices is None else slices:
        _SLICES[k].astype("<i2").tofile(folder / f"sl{k}.raw")
    lines = ["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
             "CompressedData = False", "Offset = 10 20 30", "ElementSpacing = 1.5 2 3", "DimSize = 4 5 6",
             "ElementType = MET_SHORT", f"ElementDataFile = {data_file}", *names]
    (folder / "img.mhd").write_text("\n".join(lines) + "\n")
    return folder / "img.mhd"


_LISTED = [f"sl{k}.raw" for k in range(6)]


@pytest.mark.parametrize("data_file, names", [("LIST", _LISTED), ("LIST 2D", _LISTED), ("sl%d.raw 0 5 1", ())],
                         ids=["list", "list-2d", "pattern"])
def test_metaimage_slice_files_load_as_itk_reads_them(tmp_path, data_file, names):
    p = _sliced_mhd(tmp_path, data_file, names)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    np.testing.assert_array_equal(ref, _SLICES)
    np.testing.assert_array_equal(medfuse.load(p).array, ref.transpose(2, 1, 0))


@pytest.mark.parametrize("data_file, names, gone", [
    ("LIST", [n if n != "sl3.raw" else "moved3.raw" for n in _LISTED], "moved3.raw"),
    ("sl%d.raw 1 6 1", (), "sl6.raw"),  # the pattern counts from 1: sl0.raw is never read, sl6.raw is missing
], ids=["list", "pattern"])
def test_a_missing_metaimage_slice_file_is_named(tmp_path, capfd, data_file, names, gone):
    """Was: "ITK says: Reason: No such file or directory", no file named, and ITK's "MetaImage: Read: cannot open
    slice" on stderr."""
    p = _sliced_mhd(tmp_path, data_file, names)
    assert not (tmp_path / gone).exists()
    with pytest.raises(UnreadableFileError, match="missing") as e:
        medfuse.load(p)
    assert gone in str(e.value) and "beside it" in e.value.fix
    assert "MetaImage" not in capfd.readouterr().err  # refused before ITK read anything


def test_a_short_metaimage_slice_file_is_named(tmp_path, capfd):
    """Was: "cannot be read as MetaImage/NRRD (corrupt or truncated)", which file not said."""
    p = _sliced_mhd(tmp_path, "LIST", _LISTED)
    (tmp_path / "sl3.raw").write_bytes(_SLICES[3, :2].astype("<i2").tobytes())  # 16 of its 40 bytes
    with pytest.raises(UnreadableFileError, match="sl3.raw") as e:
        medfuse.load(p)
    assert "20 voxels" in str(e.value) and "copy or export" in e.value.fix
    assert "MetaImage" not in capfd.readouterr().err


def test_a_metaimage_list_shorter_than_its_slices_is_refused(tmp_path):
    """Was: loaded without a word, the slices the list lacks left as whatever ITK's buffer held."""
    p = _sliced_mhd(tmp_path, "LIST", _LISTED[:4])
    with pytest.raises(UnreadableFileError, match="lists 4 data files.*need 6") as e:
        medfuse.load(p)
    assert "DimSize" in e.value.fix


def test_a_lowercase_list_is_one_missing_data_file_as_itk_reads_it(tmp_path):
    """ITK compares LIST case and all, so ``list`` names one data file; was taken for a list, its absence not
    checked: "ITK says: Reason: No such file or directory", no file named."""
    p = _sliced_mhd(tmp_path, "list", slices=())
    with pytest.raises(RuntimeError, match="(?i)cannot open data file|no such file"):
        sitk.ReadImage(str(p))  # the reference: ITK looks for one file named "list"
    with pytest.raises(UnreadableFileError, match="'list'.* is missing") as e:
        medfuse.load(p)
    assert "beside it" in e.value.fix


def test_a_metaimage_pattern_whose_step_comes_out_0_is_refused_not_a_crash(tmp_path):
    """"sl%d.raw 0 5" over 6 slices: ITK's step is (5 - 0) // 6 = 0, and it divides by it; a floating-point
    exception killed the process (exit 136). Run in a child process so that a crash fails the test, not pytest."""
    import subprocess
    import sys

    p = _sliced_mhd(tmp_path, "sl%d.raw 0 5", ())
    code = ("import medfuse, sys\nfrom medfuse.errors import UnreadableFileError\n"
            f"try:\n    medfuse.load({str(p)!r})\nexcept UnreadableFileError as e:\n"
            "    print('REFUSED', e)\n    sys.exit(0)\nsys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-500:])
    assert "REFUSED" in done.stdout and "step of 0" in done.stdout and "name%d.raw 1 N 1" in done.stdout
