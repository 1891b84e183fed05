"""Headers with one bad field: read as the reference libraries read them, or refused naming the field (not as a
truncated file); and output names whose data file a header format reads as a keyword."""

from __future__ import annotations

import re
import struct

import nibabel as nib
import numpy as np
import pytest

import medfuse
from medfuse.errors import GeometryError, InvalidInputError, UnreadableFileError

ARR = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
A = np.diag([1.5, 2.0, 3.0, 1.0])


def _rounded_quaternion(path, *, sform: bool):
    """A 90° turn about x whose quaternion was written rounded to 5 decimals (|b, c, d| a little above 1)."""
    img = nib.Nifti1Image(ARR, A)
    img.set_sform(A, code=2)
    img.set_qform(A, code=1)
    img.header["quatern_c"] = 0.70711
    img.header["quatern_d"] = 0.70711
    nib.save(img, path)
    if not sform:
        raw = bytearray(path.read_bytes())
        raw[254:256] = struct.pack("<h", 0)  # sform_code
        path.write_bytes(bytes(raw))


def test_a_valid_sform_beside_a_rounded_qform_loads_through_the_sform(tmp_path):
    """nibabel refuses such a quaternion: the ambiguity check's get_qform was an internal error (exit 3)."""
    p = tmp_path / "q.nii"
    _rounded_quaternion(p, sform=True)
    with pytest.warns(medfuse.MedfuseWarning, match="sform .code 2. and qform .code 1. place the grid"):
        vol = medfuse.load(p)
    np.testing.assert_allclose(vol.affine, np.diag([-1.5, -2.0, 3.0, 1.0]))  # the sform, in LPS
    assert np.array_equal(vol.array, ARR)


def test_a_rounded_qform_alone_and_a_nan_intercept_are_named_not_called_truncated(tmp_path):
    q = tmp_path / "q2.nii"
    _rounded_quaternion(q, sform=False)
    with pytest.raises(UnreadableFileError, match="quaternion") as e:
        medfuse.load(q)
    assert "truncated" not in str(e.value) and "SimpleITK.WriteImage" in e.value.fix
    i = tmp_path / "i.nii"
    nib.save(nib.Nifti1Image(ARR, A), i)
    raw = bytearray(i.read_bytes())
    raw[112:120] = struct.pack("<2f", 2.0, float("nan"))  # scl_slope 2, scl_inter NaN
    i.write_bytes(bytes(raw))
    with pytest.raises(UnreadableFileError, match="scl_slope / scl_inter") as e:
        medfuse.load(i)
    assert "truncated" not in str(e.value)


@pytest.mark.parametrize("name", ["LISTING.mhd", "LIST.mhd", "scan%03d.nhdr", "x%d.mhd"])
def test_names_whose_data_file_is_a_keyword_are_refused(tmp_path, name):
    """LISTING.mhd named its data file LISTING.raw, read as MetaIO's LIST keyword (SimpleITK returned
    uninitialised memory); '%' is a numbered-file pattern in both formats."""
    vol = medfuse.Volume(ARR.astype(np.float32), A)
    with pytest.raises(InvalidInputError, match="header format reads as"):
        medfuse.save(vol, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    back = medfuse.load(medfuse.save(vol, tmp_path / "listing.mhd"))  # lower case is a plain name
    assert np.array_equal(back.array, vol.array)
    # NRRD reads only a printf integer as a pattern: other '%' names are plain names there.
    back = medfuse.load(medfuse.save(vol, tmp_path / "dose 50%.nhdr"))
    assert np.array_equal(back.array, vol.array)


@pytest.mark.parametrize("offset", ["10 nan 30", "10 20", "10 abc 30"])
def test_a_metaimage_offset_that_is_not_three_numbers_is_refused(tmp_path, offset):
    """MetaIO stops at the value it cannot read and fills the rest with 0: the origin came out (10, 0, 0)."""
    good = medfuse.save(medfuse.Volume(ARR.astype(np.float32), A), tmp_path / "o.mhd")
    bad = tmp_path / "o_bad.mhd"
    bad.write_text(re.sub(r"Offset = .*", f"Offset = {offset}", good.read_text()))
    with pytest.raises(GeometryError, match="Offset"):
        medfuse.load(bad)
    assert medfuse.load(good).origin == (0.0, 0.0, 0.0)
