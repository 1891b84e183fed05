"""medfuse.load dispatch: a DICOM file, a DICOM folder and a NIfTI file reach the right reader."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio
from pydicom.uid import generate_uid

import medfuse
from medfuse.errors import InvalidInputError, MultipleSeriesError, UnreadableFileError

import importlib.util
from pathlib import Path

# pytest runs with --import-mode=importlib: load the sibling module's DICOM writer by path.
_spec = importlib.util.spec_from_file_location("_medfuse_test_dicom", Path(__file__).with_name("test_dicom.py"))
_td = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_td)
_write_slice = _td._write_slice


def _series(folder, n=4):
    folder.mkdir()
    uid = generate_uid()
    data = (np.arange(n * 6 * 5).reshape(n, 6, 5) * 7) % 3000
    for k in range(n):
        _write_slice(folder / f"im{k}.dcm", arr=data[k], pos=(-20.0, 30.0, 4.0 * k), series_uid=uid, number=k + 1,
                     spacing=(0.8, 0.7))
    return data


def test_dicom_folder_file_and_nifti(tmp_path):
    data = _series(tmp_path / "ct")
    folder_vol = medfuse.load(tmp_path / "ct")
    assert folder_vol.provenance["reader"] == "medfuse.dicom" and folder_vol.unit == "HU"
    assert folder_vol.shape == (5, 6, 4)
    one = medfuse.load(tmp_path / "ct" / "im2.dcm")
    assert one.shape == (5, 6, 1)
    np.testing.assert_array_equal(one.array[:, :, 0], folder_vol.array[:, :, 2])
    np.testing.assert_allclose(one.affine[:3, 3], folder_vol.affine[:3, :] @ [0, 0, 2, 1])
    np.testing.assert_allclose(one.affine[:3, :2], folder_vol.affine[:3, :2])
    np.testing.assert_allclose(one.affine[:3, 2], [0, 0, 1.0])  # SliceThickness of a lone slice

    nii = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(folder_vol.array.astype(np.int16), folder_vol.affine_ras), str(nii))
    from_nii = medfuse.load(nii, modality="CT", unit="HU")
    assert from_nii.provenance.get("reader") != "medfuse.dicom"
    np.testing.assert_array_equal(from_nii.array, folder_vol.array)
    np.testing.assert_allclose(from_nii.affine, folder_vol.affine, atol=1e-4)
    assert np.array_equal(folder_vol.array, np.transpose(data, (2, 1, 0)) - 1024)


def test_dicom_file_vs_reference_nifti(shared):
    base = shared("data", "dicom", "qa-transfer-syntaxes")
    d = medfuse.load(base / "In" / "1.dcm")
    n = medfuse.load(base / "Ref" / "1.nii")
    t = nio.ornt_transform(nio.io_orientation(d.affine), nio.io_orientation(n.affine))
    np.testing.assert_array_equal(nio.apply_orientation(d.array, t), n.array)
    np.testing.assert_allclose(d.affine @ nio.inv_ornt_aff(t, d.shape), n.affine, atol=1e-3)


def test_load_volumes_and_scan_dispatch(shared):
    folder = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0005")
    with pytest.raises(MultipleSeriesError, match="volume_index"):
        medfuse.load(folder)
    vols = medfuse.load_volumes(folder)
    assert len(vols) == 10
    np.testing.assert_array_equal(medfuse.load(folder, volume_index=9).array, vols[9].array)
    [info] = medfuse.scan(folder)
    assert info.n_volumes == 10 and info.shape == (64, 64, 15)


def test_missing_path(tmp_path):
    with pytest.raises(UnreadableFileError, match="no such"):
        medfuse.load(tmp_path / "nope")


def test_relative_source_is_recorded_absolute(tmp_path, monkeypatch):
    """``save`` refuses to write onto a volume's source; a relative source named another file after a chdir,
    and the input was overwritten."""
    from medfuse.errors import OutputExistsError

    (tmp_path / "a").mkdir()
    src = medfuse.save(medfuse.Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4)),
                       tmp_path / "a" / "in.nii.gz")
    monkeypatch.chdir(tmp_path / "a")
    vol = medfuse.load("in.nii.gz")
    [vol4] = medfuse.load_volumes("in.nii.gz")
    assert vol.provenance["source"] == str(src) == vol4.provenance["source"]
    monkeypatch.chdir(tmp_path)
    mtime = src.stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="source"):
        medfuse.save(vol.with_array(vol.array + 1), src, overwrite=True)
    assert src.stat().st_mtime_ns == mtime and np.array_equal(medfuse.load(src).array, vol.array)



# ------------------------------------------------------------------------------------------------ whole series
def _two_series(folder):
    """Series A (5 slices, names not in slice order) and series B (3 slices) in one folder, a text file, and two
    more slices of A in a sub-folder. Returns (uid A, uid B, A's stored slices in z order)."""
    folder.mkdir()
    a, b = generate_uid(), generate_uid()
    data = (np.arange(5 * 6 * 5).reshape(5, 6, 5) * 7) % 3000
    for n, k in enumerate((3, 0, 4, 1, 2)):
        _write_slice(folder / f"a{n}.dcm", arr=data[k], pos=(-20.0, 30.0, 4.0 * k), series_uid=a, number=k + 1,
                     spacing=(0.8, 0.7))
    for k in range(3):
        _write_slice(folder / f"b{k}.dcm", arr=data[k] + 1, pos=(-20.0, 30.0, 4.0 * k), series_uid=b, number=k + 1,
                     spacing=(0.8, 0.7))
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "sub").mkdir()
    for k in (5, 6):  # same series UID, other positions: a file of the sub-folder would make 7 slices
        _write_slice(folder / "sub" / f"a{k}.dcm", arr=data[0], pos=(-20.0, 30.0, 4.0 * k), series_uid=a,
                     number=k + 1, spacing=(0.8, 0.7))
    return a, b, data


def test_one_slice_file_loads_its_whole_series_on_request(tmp_path):
    """A slice of a classic series gave a one-slice volume, whatever the caller wanted. ``whole_series=True``
    loads the series the file belongs to from its folder: same SeriesInstanceUID only (another series, a text
    file and a sub-folder beside it are left alone); the one-file meaning stays the default."""
    folder = tmp_path / "study"
    a, b, data = _two_series(folder)
    assert medfuse.load(folder / "a0.dcm").shape == (5, 6, 1)  # the default: the file alone
    whole = medfuse.load(folder / "a0.dcm", whole_series=True)
    assert whole.shape == (5, 6, 5)
    assert np.array_equal(whole.array, np.transpose(data, (2, 1, 0)) - 1024)
    assert whole.provenance["series_uid"] == a and whole.provenance["source"] == str(folder)
    np.testing.assert_allclose(whole.affine[:3, 3], [-20.0, 30.0, 0.0])
    vols = medfuse.load_volumes(folder / "b2.dcm", whole_series=True)
    assert len(vols) == 1 and vols[0].shape == (5, 6, 3) and vols[0].provenance["series_uid"] == b
    with pytest.raises(InvalidInputError, match="another series"):
        medfuse.load(folder / "a0.dcm", whole_series=True, series_uid=b)
    with pytest.raises(TypeError):  # keyword-only
        medfuse.load(folder / "a0.dcm", None, None, None, None, "auto", True)


def test_one_file_of_a_real_series_loads_the_series(shared):
    """One file of the GE 4-D EPI opens as the whole 10 x 15-slice series, equal to loading its folder; a
    multi-frame file is already whole and loads as itself."""
    folder = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0004")
    f = sorted(folder.glob("*.dcm"))[37]
    assert medfuse.load(f).shape[2] == 1
    from_file = medfuse.load_volumes(f, whole_series=True)
    from_folder = medfuse.load_volumes(folder)
    assert len(from_file) == len(from_folder) == 10
    for x, y in zip(from_file, from_folder):
        assert x.shape == (64, 64, 15) and np.array_equal(x.array, y.array)
        np.testing.assert_allclose(x.affine, y.affine)
    enhanced = shared("data", "dicom", "qa-enhanced-multiframe", "In", "Philips", "IM_0027_fMAP.dcm")
    alone, whole = medfuse.load_volumes(enhanced), medfuse.load_volumes(enhanced, whole_series=True)
    assert len(whole) == len(alone) == 2
    for x, y in zip(whole, alone):
        assert x.shape[2] > 1 and np.array_equal(x.array, y.array) and x.provenance["source"] == str(enhanced)


def test_a_file_or_folder_this_user_may_not_read_is_named_as_such(tmp_path, monkeypatch):
    """The readers said "not a valid NIfTI file (or truncated)" (advising a re-export) or "no images found";
    medfuse.load, load_volumes and therefore batch subjects now say what is wrong. (Tests run as root, who may
    read anything: the permission is simulated.)"""
    import os

    nii = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(nii))
    _series(tmp_path / "dcm")
    locked = {nii, tmp_path / "dcm"}
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) not in locked and real(p, mode, **k))
    for path, what in ((nii, "file"), (tmp_path / "dcm", "folder")):
        for load in (medfuse.load, medfuse.load_volumes):
            with pytest.raises(UnreadableFileError, match=f"permission denied: this user may not read the {what}"):
                load(path)
    locked.clear()
    assert medfuse.load(nii).shape == (4, 4, 4) and medfuse.load(tmp_path / "dcm").shape == (5, 6, 4)


def test_volume_index_picks_one_volume_of_a_4d_image_file(tmp_path):
    """medfuse.load documents volume_index; for NIfTI it was ignored and the 4-D file refused."""
    data = np.random.default_rng(0).random((4, 5, 6, 3)).astype(np.float32)
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    with pytest.raises(MultipleSeriesError, match="3 volumes"):
        medfuse.load(path)
    np.testing.assert_array_equal(medfuse.load(path, volume_index=1).array, data[..., 1])
    np.testing.assert_array_equal(medfuse.load(path, volume_index=-1).array, data[..., 2])
