"""Geometry audit of the NIfTI/MetaImage/NRRD reader and writer against nibabel and SimpleITK.

Every expected affine is computed here by nibabel (``get_best_affine``, RAS -> LPS) or SimpleITK (origin, spacing,
direction), never written down by hand. Odd headers are made by patching the 348 header bytes of a file nibabel
wrote (nibabel itself refuses to write, or repairs, most of them).
"""

from __future__ import annotations

import io
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import medfuse
from medfuse.errors import GeometryError, InvalidInputError, MedfuseWarning, UnreadableFileError
from medfuse.io.nifti import load_image
from medfuse.volume import LPS_TO_RAS, Volume

DATA = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)


def _oblique(spacing=(1.5, 2.0, 3.0), origin=(10.0, -20.0, 30.0), seed=0, flip=False):
    """A RAS affine with a rotation that is not a multiple of 90 degrees (and a mirrored k axis if ``flip``)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q if np.linalg.det(q) > 0 else -q
    aff = np.eye(4)
    aff[:3, :3] = q @ np.diag(np.asarray(spacing) * [1, 1, -1 if flip else 1])
    aff[:3, 3] = origin
    return aff


def _nib_lps(path):
    return LPS_TO_RAS @ nib.load(str(path)).header.get_best_affine()


def _sitk_lps(path):
    img = sitk.ReadImage(str(path))
    n = img.GetDimension()
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(img.GetDirection()).reshape(n, n)[:3, :3] * np.asarray(img.GetSpacing()[:3])
    aff[:3, 3] = img.GetOrigin()[:3]
    return aff


def _write(tmp_path, name, *, sform=None, scode=0, qform=None, qcode=0, data=DATA, edit=None):
    """A NIfTI-1 file with the given forms; ``edit(header)`` then changes raw header fields as they are stored."""
    img = nib.Nifti1Image(data, None)
    img.set_qform(qform, code=qcode)
    img.set_sform(sform, code=scode)
    p = tmp_path / name
    img.to_filename(str(p))
    if edit is not None:
        raw = bytearray(p.read_bytes())
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)), check=False)
        edit(hdr)
        raw[: hdr.sizeof_hdr] = hdr.binaryblock
        p.write_bytes(bytes(raw))
    return p


def _load_quiet(path, **kw):
    """Load, failing on any MedfuseWarning (a header every tool reads alike must load silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        return load_image(path, **kw)


def _corner_gap(a, b, shape):
    c = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return float(np.linalg.norm(((a - b) @ c.T)[:3], axis=0).max())


# ------------------------------------------------------------------ 1, 2: which transform; SimpleITK agrees
@pytest.mark.parametrize("case", ["qform_only", "sform_only", "both_agree", "qfac_minus_1"])
def test_transform_rules_match_nibabel_and_simpleitk(tmp_path, case):
    aff = _oblique(flip=case == "qfac_minus_1")
    kw = {"qform_only": dict(qform=aff, qcode=1), "qfac_minus_1": dict(qform=aff, qcode=1),
          "sform_only": dict(sform=aff, scode=2, edit=lambda h: h.set_zooms((1.5, 2.0, 3.0))),
          "both_agree": dict(sform=aff, scode=1, qform=aff, qcode=1)}[case]
    p = _write(tmp_path, f"{case}.nii", **kw)
    if case == "qfac_minus_1":
        assert nib.load(str(p)).header["pixdim"][0] == -1  # the left-handed qform is stored with qfac -1
    v = _load_quiet(p)
    np.testing.assert_allclose(v.affine, _nib_lps(p), atol=1e-9)
    np.testing.assert_allclose(v.affine, _sitk_lps(p), atol=1e-5)  # float32 quaternion vs. float32 sform


# ------------------------------------------------------------------ 1: disagreeing forms are not silent
@pytest.mark.parametrize("scode", [1, 2, 4])
def test_disagreeing_sform_and_qform_warn(tmp_path, scode):
    qform, sform = _oblique(), _oblique(spacing=(1.5, 2.0, 3.0), origin=(12.0, -20.0, 30.0), seed=1)
    p = _write(tmp_path, "dis.nii", sform=sform, scode=scode, qform=qform, qcode=1)
    with pytest.warns(MedfuseWarning, match=r"sform \(code %d\) and qform \(code 1\)" % scode) as rec:
        v = load_image(p)
    np.testing.assert_allclose(v.affine, _nib_lps(p), atol=1e-9)  # the sform wins, as nibabel's rule says
    msg = str(rec[0].message)
    assert f"{_corner_gap(sform, qform, DATA.shape):.3g} mm apart" in msg
    # SimpleITK's reading is measured: named when it differs from medfuse's (ITK may use the qform), not otherwise
    assert ("SimpleITK" in msg) == (_corner_gap(_sitk_lps(p), v.affine, DATA.shape) > 0.01)
    assert str(p) in msg and "medfuse uses the sform" in msg


def test_sform_whose_scales_differ_from_pixdim_warns(tmp_path):
    """nibabel takes voxel sizes from the sform, ITK from pixdim: medfuse follows nibabel and says so."""
    aff = _oblique()
    p = _write(tmp_path, "scales.nii", sform=aff, scode=2, edit=lambda h: h.set_zooms((1.0, 1.0, 1.0)))
    with pytest.warns(MedfuseWarning, match="SimpleITK") as rec:
        v = load_image(p)
    np.testing.assert_allclose(v.affine, _nib_lps(p), atol=1e-9)
    gap = _corner_gap(_sitk_lps(p), v.affine, DATA.shape)
    assert gap > 1 and f"up to {gap:.3g} mm away" in str(rec[0].message)


# ------------------------------------------------------------------ 4: bad pixdim, NaN
@pytest.mark.parametrize("bad", [-1.5, 0.0])
def test_non_positive_pixdim_under_a_qform_warns(tmp_path, bad):
    def edit(h):
        h["pixdim"][1] = bad

    p = _write(tmp_path, "pix.nii", qform=np.diag([1.5, 2.0, 3.0, 1.0]), qcode=1, edit=edit)
    with pytest.warns(MedfuseWarning, match=r"pixdim %g, 2, 3\) are not all positive" % bad):
        v = load_image(p)
    np.testing.assert_allclose(v.affine, _nib_lps(p), atol=1e-9)  # nibabel's repair (|pixdim|, 1 for 0)


@pytest.mark.parametrize("field, words", [("srow_x", "sform"), ("qoffset_y", "qform"), ("quatern_b", "qform")])
def test_nan_in_the_header_names_the_transform(tmp_path, field, words):
    aff = _oblique()
    scode = 1 if field == "srow_x" else 0

    def edit(h):
        h[field] = np.nan if np.ndim(h[field]) == 0 else [np.nan, 0, 0, 0]

    p = _write(tmp_path, "nan.nii", sform=aff, scode=scode, qform=aff, qcode=1, edit=edit)
    assert not np.all(np.isfinite(nib.load(str(p)).header.get_best_affine()))
    with pytest.raises(GeometryError, match=f"header's {words} .*NaN or infinite") as e:
        load_image(p)
    assert str(p) in str(e.value)


# ------------------------------------------------------------------ 3: shear is never orthogonalised
@pytest.mark.parametrize("shear, with_qform", [(0.3, True), (0.3, False), (1e-3, True)])
def test_sheared_sform_is_refused_or_replaced_by_the_qform_as_itk_does(tmp_path, shear, with_qform):
    """A sheared sform is never orthogonalised. With a valid qform (code > 0) the qform is used, with a warning,
    as ITK reads the file (tests/io/test_nifti_limits.py compares more cases); without one it is refused."""
    aff = _oblique()
    sheared = aff.copy()
    sheared[0, 1] += shear
    p = _write(tmp_path, "shear.nii", sform=sheared, scode=1, qform=aff if with_qform else None,
               qcode=1 if with_qform else 0)
    if not with_qform:
        with pytest.raises(GeometryError, match="sheared") as e:
            load_image(p)
        assert str(p) in str(e.value)
        return
    with pytest.warns(MedfuseWarning, match="sheared.*uses the qform"):
        v = load_image(p)
    np.testing.assert_allclose(v.affine, _sitk_lps(p), atol=1e-4)


# ------------------------------------------------------------------ Analyze 7.5
def test_analyze_pair_without_orientation_warns(tmp_path):
    aff = np.diag([2.0, 2.0, 2.5, 1.0])
    aff[:3, 3] = [-10, -12, -5]
    nib.AnalyzeImage(DATA, aff).to_filename(str(tmp_path / "old.img"))
    assert "sform_code" not in nib.load(str(tmp_path / "old.img")).header
    with pytest.warns(MedfuseWarning, match="Analyze 7.5 .* no orientation"):
        v = load_image(tmp_path / "old.img")
    np.testing.assert_allclose(v.affine, _nib_lps(tmp_path / "old.img"), atol=1e-9)


# ------------------------------------------------------------------ 5: scaling and voxel types
@pytest.mark.parametrize("slope, inter", [(2.0, -1.0), (0.5, 0.0), (1.0, 3.0), (0.0, 5.0), (1.0, 0.0)])
def test_scaling_follows_nibabel(tmp_path, slope, inter):
    def edit(h):
        h["scl_slope"], h["scl_inter"] = slope, inter

    p = _write(tmp_path, "scl.nii", qform=np.eye(4), qcode=1, edit=edit)
    ref = np.asanyarray(nib.load(str(p)).dataobj)  # slope 0 means "no scaling": the intercept is ignored too
    v = _load_quiet(p)
    assert v.dtype == ref.dtype and np.array_equal(v.array, ref)  # unscaled int16 stays int16 (exact voxels)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float64, np.complex64])
def test_voxel_types_round_trip(tmp_path, dtype):
    arr = (np.arange(120).reshape(4, 5, 6) * (1 + 1j if np.dtype(dtype).kind == "c" else 1)).astype(dtype)
    p = tmp_path / "t.nii.gz"
    nib.Nifti1Image(arr, _oblique()).to_filename(str(p))
    v = _load_quiet(p)
    assert v.dtype == np.dtype(dtype) and np.array_equal(v.array, arr)
    out = medfuse.save(v, tmp_path / "t_out.nii.gz")
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.dtype(dtype) and np.array_equal(np.asanyarray(back.dataobj), arr)


def test_rgb24_is_refused_as_colour(tmp_path):
    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    p = tmp_path / "rgb.nii"
    nib.Nifti1Image(rgb, np.eye(4)).to_filename(str(p))
    with pytest.raises(InvalidInputError, match="colour") as e:
        load_image(p)
    assert str(p) in str(e.value) and "grey" in str(e.value)


# ------------------------------------------------------------------ 6: dimensions
def test_2d_nifti_keeps_its_slice_position(tmp_path):
    """ITK reads a 2-D NIfTI as a 2-D image and drops the slice's position; nibabel and medfuse keep it."""
    aff = _oblique(spacing=(0.7, 0.8, 5.0))
    p = tmp_path / "slice.nii"
    nib.Nifti1Image(np.arange(20, dtype=np.float32).reshape(4, 5), aff).to_filename(str(p))
    v = _load_quiet(p)
    assert v.shape == (4, 5, 1)
    np.testing.assert_allclose(v.affine, _nib_lps(p), atol=1e-9)
    out = medfuse.save(v, tmp_path / "slice.mha")
    np.testing.assert_allclose(_sitk_lps(out), v.affine, atol=1e-9)


@pytest.mark.parametrize("shape, n", [((4, 5, 6, 3), 3), ((4, 5, 6, 2, 1), 2), ((4, 5, 6, 1, 1), 1),
                                      ((4, 5, 6, 1), 1)])
def test_4d_and_5d_volumes(tmp_path, shape, n):
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    p = tmp_path / "multi.nii.gz"
    nib.Nifti1Image(data, _oblique()).to_filename(str(p))
    vols = medfuse.load_volumes(p)
    assert len(vols) == n
    flat = data.reshape(shape[:3] + (n,))
    for t, v in enumerate(vols):
        assert np.array_equal(v.array, flat[..., t])
        np.testing.assert_allclose(v.affine, _nib_lps(p), atol=1e-9)


def test_5d_vector_nifti_is_refused(tmp_path):
    p = tmp_path / "vec.nii"
    nib.Nifti1Image(np.zeros((4, 5, 6, 1, 3), np.float32), np.eye(4)).to_filename(str(p))
    with pytest.raises(InvalidInputError, match="5 dimensions"):
        load_image(p)


def test_volume_index_picks_one_volume_of_a_4d_file(tmp_path):
    data = np.random.default_rng(2).random((4, 5, 6, 3)).astype(np.float32)
    p = tmp_path / "four.nii.gz"
    nib.Nifti1Image(data, _oblique()).to_filename(str(p))
    v = load_image(p, volume_index=1)
    assert np.array_equal(v.array, data[..., 1])
    assert v.provenance["volume_index"] == 1 and v.provenance["n_volumes"] == 3
    assert np.array_equal(load_image(p, volume_index=-1).array, data[..., 2])
    with pytest.raises(InvalidInputError, match="out of range") as e:
        load_image(p, volume_index=3)
    assert str(p) in str(e.value)


# ------------------------------------------------------------------ 7: NRRD
def _nrrd(path, fields, payload):
    text = "NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in fields.items()) + "encoding: raw\nendian: little\n"
    if path.suffix == ".nhdr":
        path.with_suffix(".raw").write_bytes(payload)
        path.write_bytes((text + f"data file: {path.stem}.raw\n").encode())
    else:
        path.write_bytes((text + "\n").encode() + payload)
    return path


_DIRS = "(1.5,0,0) (0,0.2,2) (0,-3,0.3)"


@pytest.mark.parametrize("space, suffix", [("right-anterior-superior", ".nrrd"), ("left-posterior-superior", ".nrrd"),
                                           ("left-anterior-superior", ".nrrd"), ("right-anterior-superior", ".nhdr")])
def test_nrrd_spaces_match_simpleitk(tmp_path, space, suffix):
    p = _nrrd(tmp_path / f"a{suffix}", {"type": "short", "dimension": 3, "sizes": "4 5 6", "space": space,
                                        "space directions": _DIRS, "space origin": "(10,-20,30)"},
              DATA.T.tobytes())
    v = _load_quiet(p)
    np.testing.assert_allclose(v.affine, _sitk_lps(p), atol=1e-12)
    # RAS-space files are mirrored into LPS: the first world axis changes sign against an LPS file
    flip = {"right-anterior-superior": [-1, -1, 1], "left-anterior-superior": [1, -1, 1]}.get(space, [1, 1, 1])
    np.testing.assert_allclose(v.origin, np.multiply([10, -20, 30], flip))
    assert np.array_equal(v.array, DATA)


@pytest.mark.parametrize("space", ["scanner-xyz", "3D-right-handed", None])
def test_nrrd_without_patient_orientation_warns(tmp_path, space):
    fields = {"type": "short", "dimension": 3, "sizes": "4 5 6"}
    fields.update({"space": space, "space directions": _DIRS, "space origin": "(1,2,3)"} if space else
                  {"spacings": "1.5 2 3"})
    p = _nrrd(tmp_path / "s.nrrd", fields, DATA.T.tobytes())
    with pytest.warns(MedfuseWarning, match="names no patient orientation"):
        v = load_image(p)
    np.testing.assert_allclose(v.affine, _sitk_lps(p), atol=1e-12)  # as ITK reads it


def test_nrrd_vector_with_none_direction_is_refused(tmp_path):
    p = _nrrd(tmp_path / "vec.nrrd", {"type": "float", "dimension": 4, "sizes": "3 4 5 6",
                                      "kinds": "vector domain domain domain", "space": "left-posterior-superior",
                                      "space directions": "none (1.5,0,0) (0,2,0) (0,0,3)",
                                      "space origin": "(10,-20,30)"}, np.zeros(360, np.float32).tobytes())
    with pytest.raises(InvalidInputError, match="3 components"):
        load_image(p)


def test_itk_refusal_says_why(tmp_path):
    """A 2-D NRRD oriented in 3-D space, or a zero spacing: ITK's reason, not "corrupt or truncated" alone."""
    p = _nrrd(tmp_path / "flat.nrrd", {"type": "short", "dimension": 2, "sizes": "4 5",
                                       "space": "right-anterior-superior", "space directions": "(1.5,0,0) (0,2,0)",
                                       "space origin": "(10,-20,30)"}, DATA.ravel()[:20].tobytes())
    with pytest.raises(UnreadableFileError, match="domain axes") as e:
        load_image(p)
    assert "0x" not in str(e.value)  # no ITK object addresses
    m = tmp_path / "zero.mha"
    m.write_bytes(b"ObjectType = Image\nNDims = 3\nBinaryData = True\nElementSpacing = 1.5 0 3\nDimSize = 4 5 6\n"
                  b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n" + DATA.tobytes())
    with pytest.raises(UnreadableFileError, match="spacing"):
        load_image(m)


# ------------------------------------------------------------------ 8: MetaImage
def _mha(path, header, payload, ndims=3, sizes="4 5 6"):
    path.write_bytes((f"ObjectType = Image\nNDims = {ndims}\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                      f"{header}\nDimSize = {sizes}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n").encode()
                     + payload)
    return path


@pytest.mark.parametrize("orientation", ["RAI", "LPS", "RAS", None])
def test_metaimage_transform_matrix_and_offset_match_simpleitk(tmp_path, orientation):
    """ITK takes the geometry from TransformMatrix and Offset; AnatomicalOrientation is only a label to it."""
    d = _oblique(spacing=(1, 1, 1))[:3, :3]
    header = (f"Offset = 10 -20 30\nElementSpacing = 1.5 2 3\nTransformMatrix = "
              f"{' '.join(repr(float(x)) for x in d.T.ravel())}")
    if orientation:
        header += f"\nAnatomicalOrientation = {orientation}"
    p = _mha(tmp_path / "o.mha", header, DATA.T.tobytes())
    v = _load_quiet(p)
    np.testing.assert_allclose(v.affine, _sitk_lps(p), atol=1e-12)
    np.testing.assert_allclose(v.direction, d, atol=1e-12)


def test_2d_metaimage(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    p = _mha(tmp_path / "flat.mha", f"Offset = 10 -20\nElementSpacing = 1.5 2\nTransformMatrix = {c} {s} {-s} {c}",
             np.arange(20, dtype=np.int16).tobytes(), ndims=2, sizes="4 5")
    v = _load_quiet(p)
    img = sitk.ReadImage(str(p))
    assert v.shape == (4, 5, 1)
    np.testing.assert_allclose(v.affine[:2, :2], np.reshape(img.GetDirection(), (2, 2)) * img.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(v.origin[:2], img.GetOrigin(), atol=1e-12)


# ------------------------------------------------------------------ 9: round trip through medfuse.save
@pytest.mark.parametrize("suffix, fmt", [(".nii.gz", None), (".nii", "nifti2"), (".mha", None), (".mhd", None),
                                         (".nrrd", None), (".nhdr", None)])
@pytest.mark.parametrize("flip", [False, True])
def test_saved_geometry_reads_the_same_in_nibabel_and_simpleitk(tmp_path, suffix, fmt, flip):
    aff = LPS_TO_RAS @ _oblique(spacing=(0.7123456789, 0.91, 2.5), origin=(-123.456789, 98.7654321, -150.1234),
                                flip=flip)
    v = Volume(np.arange(60, dtype=np.float32).reshape(3, 4, 5), aff, provenance={"nifti_space": "mni"})
    out = medfuse.save(v, tmp_path / f"out{suffix}", format=fmt)
    # NIfTI-1 stores float32: the bound is float32 rounding of the largest coordinate; the others store doubles
    tol = 2 * np.finfo(np.float32).eps * np.abs(aff).max() if fmt is None and suffix.startswith(".nii") else 1e-9
    np.testing.assert_allclose(_load_quiet(out).affine, aff, atol=tol)
    if suffix.startswith(".nii"):
        hdr = nib.load(str(out)).header
        assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (4, 4)
        np.testing.assert_allclose(LPS_TO_RAS @ hdr.get_sform(), aff, atol=tol)
        np.testing.assert_allclose(LPS_TO_RAS @ hdr.get_qform(), aff, atol=tol)
        assert hdr.get_xyzt_units()[0] == "mm"
    if fmt != "nifti2":  # this SimpleITK (ITK 5.4) does not read NIfTI-2
        np.testing.assert_allclose(_sitk_lps(out), aff, atol=tol)


def test_nrrd_series_along_a_list_axis_is_named_as_such(tmp_path):
    """A 4-D NRRD whose first axis is a 'list' reads as vector components; the error said only colour/vector."""
    from medfuse.errors import InvalidInputError

    data = np.arange(3 * 4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4, 3)  # NumPy order: z, y, x, list
    img = sitk.GetImageFromArray(data, isVector=True)
    path = tmp_path / "series.nrrd"
    sitk.WriteImage(img, str(path))
    with pytest.raises(InvalidInputError, match=r"3 components per voxel .*'list' axis.*its own scalar 3-D file"):
        medfuse.load(path)
