"""Siemens mosaic slice direction: the sign of the CSA SliceNormalVector, as dcm2niix and nibabel take it.

The tiles of a mosaic run along the CSA image header's SliceNormalVector (0029,xx10), which points against
row x column when det([row, col, normal]) < 0 (Siemens sagittal). Stacking them along the cross product put every
slice but the first on the wrong side of it.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medfuse.io.dicom import load_dicom

ROW, COL = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])  # sagittal: row x column = (-1, 0, 0)
TILE_R, TILE_C, M = 3, 4, 2  # tiles of 3 rows x 4 columns, 2 x 2 in the mosaic
IPP = np.array([10.0, -20.0, 30.0])
PS = (0.5, 0.75)  # PixelSpacing: between rows, between columns
DZ = 2.5


def _csa2(tags: dict) -> bytes:
    """A CSA2 ("SV10") header holding ``tags`` ({name: (vr, [value strings])}), as Siemens writes (0029,1010)."""
    out = b"SV10" + b"\4\3\2\1" + struct.pack("<2I", len(tags), 77)
    for name, (vr, vals) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(vals), vr.encode(), 0, len(vals), 77)
        for v in vals:
            b = v.encode() + b"\0"
            out += struct.pack("<4i", len(b), len(b), 77, len(b)) + b + b"\0" * (-len(b) % 4)
    return out


def _write_mosaic(path: Path, csa_normal) -> None:
    """A 4-tile mosaic (tile t filled with 10 * (t + 1) plus a small in-plane ramp); no CSA header when
    ``csa_normal`` is None."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Manufacturer, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", "SIEMENS", generate_uid(), "1.2.3"
    ds.InstanceNumber, ds.ImageType = 1, ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.ImagePositionPatient = [float(x) for x in IPP]
    ds.ImageOrientationPatient = [float(x) for x in np.concatenate([ROW, COL])]
    ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = list(PS), DZ, DZ
    ds.Rows, ds.Columns = TILE_R * M, TILE_C * M
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, "US", 4)
    if csa_normal is not None:
        ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(
            0x10, "OB", _csa2({"NumberOfImagesInMosaic": ("US", ["4"]),
                               "SliceNormalVector": ("FD", [f"{x:.8f}" for x in csa_normal])}))
    mosaic = np.zeros((TILE_R * M, TILE_C * M), np.uint16)
    ramp = np.arange(TILE_R * TILE_C, dtype=np.uint16).reshape(TILE_R, TILE_C) % 5
    for t in range(4):
        r0, c0 = (t // M) * TILE_R, (t % M) * TILE_C
        mosaic[r0:r0 + TILE_R, c0:c0 + TILE_C] = 10 * (t + 1) + ramp
    ds.PixelData = mosaic.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _tile_corners(normal) -> list:
    """World position (LPS mm) of voxel (0, 0) of each tile: the mosaic's ImagePositionPatient moved to the first
    tile (half the mosaic-minus-tile size, dcm2niix and nibabel), then a step of DZ along ``normal`` per tile."""
    first = IPP + ROW * PS[1] * (TILE_C * M - TILE_C) / 2 + COL * PS[0] * (TILE_R * M - TILE_R) / 2
    return [first + t * DZ * np.asarray(normal, float) for t in range(4)]


def _tile_positions(vol) -> dict:
    """{tile number: world position of voxel (0, 0) of the slice holding it} in a loaded synthetic mosaic."""
    out = {}
    for k in range(vol.shape[2]):
        t = int(vol.array[0, 0, k]) // 10 - 1
        out[t] = vol.index_to_world(np.array([0.0, 0.0, float(k)]))
    return out


CROSS = np.cross(ROW, COL)


@pytest.mark.parametrize("csa,expected", [
    (-CROSS, -CROSS),                       # det([row, col, normal]) < 0: the tiles run against row x column
    (CROSS, CROSS),                         # det > 0 (transversal): as before
    (None, CROSS),                          # no CSA header (anonymised): row x column, as before
    (np.array([0.0, 1.0, 0.0]), CROSS),     # CSA vector not normal to the plane (damaged): ignored
], ids=["against-cross", "along-cross", "no-csa", "csa-not-normal"])
def test_synthetic_mosaic_tiles_placed_along_csa_normal(tmp_path, csa, expected):
    f = tmp_path / "mosaic.dcm"
    _write_mosaic(f, csa)
    vol = load_dicom(f)
    assert vol.shape == (TILE_C, TILE_R, 4)
    got = _tile_positions(vol)
    assert sorted(got) == [0, 1, 2, 3]
    for t, want in enumerate(_tile_corners(expected)):
        np.testing.assert_allclose(got[t], want, atol=1e-6, err_msg=f"tile {t}")
    # the voxels of each tile are its own, in DICOM order (i = columns, j = rows)
    ramp = (np.arange(TILE_R * TILE_C).reshape(TILE_R, TILE_C) % 5).T
    for k in range(4):
        t = int(vol.array[0, 0, k]) // 10 - 1
        np.testing.assert_array_equal(vol.array[:, :, k], 10 * (t + 1) + ramp)
    # medfuse's convention is kept: k runs along row x column (the affine's third column), right-handed
    assert np.linalg.det(vol.affine[:3, :3]) > 0


def test_csa_reader_import_warning_not_shown(tmp_path):
    """nibabel's 'DICOM readers are experimental' import warning is not the user's business (only its CSA
    parser is used): a fresh process with UserWarnings as errors loads a mosaic."""
    f = tmp_path / "mosaic.dcm"
    _write_mosaic(f, -CROSS)
    code = ("import sys, medfuse; v = medfuse.load(sys.argv[1]); "
            "assert 'nibabel.nicom' in sys.modules; print(v.shape)")
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code, str(f)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "experimental" not in r.stderr


# ---------------------------------------------------------------------------- the real mosaic, against nibabel
def _nibabel_wrapper(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers

        w = dicomwrappers.wrapper_from_file(str(path))
        return w, w.affine, np.asarray(w.get_data(), float)


def _assert_same_as_nibabel(vol, path: Path) -> None:
    """Every voxel of ``vol`` lies where nibabel's MosaicWrapper puts the same voxel value (both affines LPS)."""
    w, aff_n, data_n = _nibabel_wrapper(path)
    assert type(w).__name__ == "MosaicWrapper"
    t = np.linalg.inv(aff_n) @ vol.affine  # medfuse index -> nibabel index
    perm = np.round(t[:3, :3])
    np.testing.assert_allclose(t[:3, :3], perm, atol=1e-4)
    np.testing.assert_allclose(t[:3, 3], np.round(t[:3, 3]), atol=1e-3)
    assert sorted(np.abs(perm).sum(axis=0)) == [1, 1, 1] and sorted(np.abs(perm).sum(axis=1)) == [1, 1, 1]
    idx = np.indices(vol.shape).reshape(3, -1)
    n_idx = (perm @ idx + np.round(t[:3, 3])[:, None]).astype(int)
    assert all((n_idx[a] >= 0).all() and (n_idx[a] < data_n.shape[a]).all() for a in range(3))
    np.testing.assert_array_equal(vol.array[tuple(idx)].astype(float), data_n[tuple(n_idx)])


@pytest.fixture
def real_mosaic(shared):
    return shared("data", "dicom", "qa-transfer-syntaxes", "In", "1.dcm")


def test_real_mosaic_matches_nibabel(real_mosaic):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vol = load_dicom(real_mosaic)
    _assert_same_as_nibabel(vol, real_mosaic)


def test_real_mosaic_column_flipped_matches_nibabel(real_mosaic, tmp_path):
    """The real mosaic with its column cosine negated (det([row, col, CSA normal]) < 0, as a Siemens sagittal
    acquisition): slices were stacked the wrong way (the last slice 122 mm from where nibabel puts it)."""
    ds = pydicom.dcmread(str(real_mosaic))
    iop = np.array(ds.ImageOrientationPatient, float)
    iop[3:] *= -1
    ds.ImageOrientationPatient = [f"{x:.8g}" for x in iop]
    f = tmp_path / "flipped.dcm"
    ds.save_as(str(f))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vol = load_dicom(f)
    w, aff_n, _ = _nibabel_wrapper(f)
    assert float(np.asarray(w.slice_normal) @ np.cross(iop[:3], iop[3:])) < 0  # the case this is about
    _assert_same_as_nibabel(vol, f)
    # and the world position of the last slice's centre is nibabel's, not 122 mm away
    ci = [(vol.shape[0] - 1) / 2, (vol.shape[1] - 1) / 2]
    ends_m = sorted(tuple(np.round(vol.index_to_world(np.array([*ci, k])), 3)) for k in (0, vol.shape[2] - 1))
    d = _nibabel_wrapper(f)[2]
    ends_n = sorted(tuple(np.round((aff_n @ [(d.shape[0] - 1) / 2, (d.shape[1] - 1) / 2, k, 1])[:3], 3))
                    for k in (0, d.shape[2] - 1))
    np.testing.assert_allclose(ends_m, ends_n, atol=1e-3)
