"""Every spelling of a NIfTI name gets the same checks, and NRRD ``space units`` are not ignored.

A damaged ``X.NII.GZ`` (or ``x.Nii.Gz``, or a gzipped ``.nii``) loaded as wrong voxels where ``x.nii.gz`` was
refused: such names are read from their bytes, and the checks on the file (gzip checksum, raw pixdim) looked for
a file name the image did not have. ITK's NIfTI library printed bare lines on stderr for them. An NRRD in metres
read as mm (1000 times too small) while a NIfTI in metres is converted.
"""

from __future__ import annotations

import gzip
import struct
import warnings

import nibabel as nib
import numpy as np
import pytest

import medfuse
from medfuse.errors import MedfuseWarning, UnreadableFileError

#: The spellings of a gzipped single-file NIfTI: the one nibabel opens by name, and those read from bytes.
GZ_NAMES = ["v.nii.gz", "V.NII.GZ", "v.Nii.Gz", "v_gz_named.nii"]


def _load_quietly(path):
    """medfuse.load, the warnings it gives returned beside the volume."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = medfuse.load(path)
    return vol, [str(w.message) for w in caught if issubclass(w.category, MedfuseWarning)]


def _voxels():
    return np.arange(40 * 50 * 60, dtype=np.float32).reshape(40, 50, 60)


@pytest.mark.parametrize("name", GZ_NAMES)
def test_a_damaged_gzip_nifti_is_refused_whatever_its_name(tmp_path, name):
    a = _voxels()
    packed = bytearray(gzip.compress(nib.Nifti1Image(a, np.eye(4)).to_bytes(), compresslevel=0))
    packed[len(packed) // 2] ^= 0xFF  # one byte inside the stored voxels: deflate decodes it, only the CRC differs
    path = tmp_path / name
    path.write_bytes(bytes(packed))
    with gzip.open(path) as fh:  # the damage changes the voxels: loading it would be silently wrong
        fh.seek(352)
        assert not np.array_equal(np.frombuffer(fh.read(a.nbytes), np.float32).reshape(a.shape, order="F"), a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)  # the gzipped .nii's own note on its name
        with pytest.raises(UnreadableFileError, match="damaged.*checksum") as e:
            medfuse.load(path)
    assert name in str(e.value) and "again" in e.value.fix


@pytest.mark.parametrize("name", GZ_NAMES)
def test_an_undamaged_gzip_nifti_loads_exactly_whatever_its_name(tmp_path, name):
    a = _voxels()
    (tmp_path / name).write_bytes(gzip.compress(nib.Nifti1Image(a, np.eye(4)).to_bytes()))
    vol, _ = _load_quietly(tmp_path / name)
    np.testing.assert_array_equal(vol.array, a)


def _zero_pixdim_bytes() -> bytes:
    """A NIfTI-1 under a qform (sform code 0) whose pixdim[2] is 0, which nibabel repairs to 1 while reading."""
    a = np.ones((6, 7, 8), np.float32)
    img = nib.Nifti1Image(a, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), 1)
    img.set_sform(None, 0)
    raw = bytearray(img.to_bytes())
    raw[80:84] = struct.pack("<f", 0.0)  # pixdim[1] is at byte 80 (pixdim starts at 76)
    return bytes(raw)


@pytest.mark.parametrize("name, gz", [("p.nii.gz", True), ("P.NII.GZ", True), ("p.Nii.Gz", True),
                                      ("p_gz_named.nii", True), ("P.NII", False), ("p.nii", False),
                                      ("p_plain_named.nii.gz", False)])
def test_zero_pixdim_under_a_qform_is_said_whatever_the_name(tmp_path, name, gz):
    raw = _zero_pixdim_bytes()
    (tmp_path / name).write_bytes(gzip.compress(raw) if gz else raw)
    _, said = _load_quietly(tmp_path / name)
    assert any("not all positive" in s and "pixdim 0" in s for s in said), said


def _pixdim_other_than_sform() -> bytes:
    """A NIfTI-1 whose sform says 2 mm voxels and whose pixdim says 3 mm: ITK (spacing from pixdim) puts the grid
    elsewhere, which medfuse measures by reading the header with SimpleITK."""
    a = np.zeros((10, 12, 14), np.float32)
    img = nib.Nifti1Image(a, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), 2)
    img.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), 1)
    img.header["pixdim"][1:4] = [3.0, 3.0, 3.0]
    return img.to_bytes()


@pytest.mark.parametrize("name, gz", [("g.nii.gz", True), ("G.NII.GZ", True), ("g.Nii.Gz", True),
                                      ("g_gz_named.nii", True), ("G.NII", False)])
def test_the_itk_cross_check_runs_without_library_lines_on_stderr(tmp_path, capfd, name, gz):
    """ITK's NIfTI library chooses gzip by the name and printed "** mixed case extension '.Nii.Gz' is not valid"
    and "** ERROR: nifti_convert_nhdr2nim: bad sizeof_hdr" (and then measured nothing) for such names."""
    raw = _pixdim_other_than_sform()
    (tmp_path / name).write_bytes(gzip.compress(raw) if gz else raw)
    capfd.readouterr()
    _, said = _load_quietly(tmp_path / name)
    err = capfd.readouterr().err
    assert "**" not in err and "nifti" not in err.lower(), err
    assert any("SimpleITK" in s and "places the grid" in s for s in said), said
    assert list(tmp_path.iterdir()) == [tmp_path / name]  # the link ITK read through is gone, and not beside it


@pytest.mark.parametrize("name", ["bomb.nii.gz", "BOMB.NII.GZ"])
def test_the_checksum_check_stops_far_past_the_described_image(tmp_path, name):
    """A small image followed by 40 MB of zeros: the check of the checksum used to decompress all of it for a
    lower-case name (a 1032:1 stream costs seconds per GB); it stops, and says the checksum was not reached."""
    a = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    with gzip.open(tmp_path / name, "wb", compresslevel=1) as fh:
        fh.write(nib.Nifti1Image(a, np.eye(4)).to_bytes())
        for _ in range(40):
            fh.write(b"\0" * (1 << 20))
    vol, said = _load_quietly(tmp_path / name)
    np.testing.assert_array_equal(vol.array, a)
    assert any("did not decompress the rest" in s for s in said), said


# ---- NRRD space units ------------------------------------------------------------------------------------------

def _write_nrrd(path, units=None, *, detached=False):
    """A 4x5x6 float32 NRRD (LPS, spacing 1.5/2/3, origin 11/-22/33) with ``space units`` as given, by hand."""
    a = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
    lines = ["NRRD0004", "type: float", "dimension: 3", "space: left-posterior-superior", "sizes: 4 5 6",
             "space directions: (1.5,0,0) (0,2,0) (0,0,3)", "kinds: domain domain domain", "endian: little",
             "encoding: raw", "space origin: (11,-22,33)"]
    if units is not None:
        lines.append("space units: " + " ".join(f'"{u}"' for u in units))
    data = a.tobytes(order="F")
    if detached:
        lines.append(f"data file: {path.stem}.raw")
        path.with_suffix(".raw").write_bytes(data)
        path.write_bytes(("\n".join(lines) + "\n").encode())
    else:
        path.write_bytes(("\n".join(lines) + "\n\n").encode() + data)
    return a


@pytest.mark.parametrize("units, to_mm, word", [(["m", "m", "m"], 1000.0, "metres"),
                                                (["microns"] * 3, 0.001, "microns"),
                                                (["um"] * 3, 0.001, "microns"),
                                                (["cm"] * 3, 10.0, "centimetres")])
@pytest.mark.parametrize("detached", [False, True])
def test_an_nrrd_in_metres_or_microns_is_converted_to_mm(tmp_path, units, to_mm, word, detached):
    path = tmp_path / ("u.nhdr" if detached else "u.nrrd")
    a = _write_nrrd(path, units, detached=detached)
    vol, said = _load_quietly(path)
    np.testing.assert_array_equal(vol.array, a)
    np.testing.assert_allclose(vol.spacing, np.array([1.5, 2.0, 3.0]) * to_mm)
    np.testing.assert_allclose(vol.affine[:3, 3], np.array([11.0, -22.0, 33.0]) * to_mm)
    assert any(word in s and "converts them to mm" in s and "ITK" in s for s in said), said


@pytest.mark.parametrize("units", [None, ["mm"] * 3, ["", "", ""], ["millimeters"] * 3])
def test_an_nrrd_in_mm_or_without_units_is_read_as_it_was(tmp_path, units):
    _write_nrrd(tmp_path / "u.nrrd", units)
    vol, said = _load_quietly(tmp_path / "u.nrrd")
    np.testing.assert_allclose(vol.spacing, [1.5, 2.0, 3.0])
    np.testing.assert_allclose(vol.affine[:3, 3], [11.0, -22.0, 33.0])
    assert not any("space units" in s or "converts them" in s for s in said), said


@pytest.mark.parametrize("units, words", [(["m", "mm", "m"], "differ between axes"),
                                          (["furlong"] * 3, "not a length unit")])
def test_an_nrrd_whose_units_cannot_be_converted_is_refused(tmp_path, units, words):
    _write_nrrd(tmp_path / "u.nrrd", units)
    with pytest.raises(UnreadableFileError, match=words) as e:
        medfuse.load(tmp_path / "u.nrrd")
    assert '"mm" "mm" "mm"' in e.value.fix


def test_an_nrrd_and_a_nifti_in_metres_load_to_the_same_geometry(tmp_path):
    nrrd = _write_nrrd(tmp_path / "u.nrrd", ["m", "m", "m"])
    aff = np.diag([-1.5, -2.0, 3.0, 1.0])
    aff[:3, 3] = [-11.0, 22.0, 33.0]  # LPS (11, -22, 33) in RAS
    img = nib.Nifti1Image(nrrd, aff)
    img.header.set_xyzt_units("meter", "sec")
    nib.save(img, tmp_path / "u.nii.gz")
    from_nrrd, _ = _load_quietly(tmp_path / "u.nrrd")
    from_nifti, _ = _load_quietly(tmp_path / "u.nii.gz")
    np.testing.assert_allclose(from_nrrd.affine, from_nifti.affine, rtol=1e-6)


def test_pynrrd_written_metres_are_converted(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    a = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    nrrd.write(str(tmp_path / "p.nrrd"), a, {"space": "right-anterior-superior",
                                             "space directions": np.diag([1.0, 2, 3]),
                                             "space origin": np.array([1.0, 2, 3]), "space units": ["m", "m", "m"]})
    vol, said = _load_quietly(tmp_path / "p.nrrd")
    np.testing.assert_allclose(vol.spacing, [1000.0, 2000.0, 3000.0])
    np.testing.assert_allclose(vol.affine[:3, 3], [-1000.0, -2000.0, 3000.0])  # RAS (1, 2, 3) m in LPS mm
    assert any("metres" in s for s in said), said


def test_itks_reason_survives_a_bare_file_name(tmp_path, monkeypatch):
    """Read by a bare name (the user in the file's own folder), ITK's reason was mangled: "." between every
    character, or only "." left."""
    (tmp_path / "header.nrrd").write_bytes(
        b"NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n\n" + bytes(32))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnreadableFileError) as info:
        medfuse.load("header.nrrd")
    said = str(info.value)
    assert "ITK says:" in said and "require endian" in said, said
    assert ". ." not in said and not said.rstrip().endswith("ITK says: ."), said
