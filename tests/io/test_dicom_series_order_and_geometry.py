"""Series order, series listings, pixel padding, variable slice spacing, gantry tilt and image types of DICOM series.

Each test edits copies of the bundled sample CT (40 slices 4 mm apart, 192 x 160 pixels of 1 mm) with pydicom:
- Series were numbered in the order of their first file's name: the same study exported with SOPInstanceUID file
  names listed its series in another order, so `--series 1` was another series.
- Two series of one modality were listed as identical lines ("1: MR 160x192x160, 160 files in .").
- PixelPaddingValue was ignored: a CT padded with -2000 loaded with 21 % of its voxels at -2000 "HU".
- A complete CT with 1 mm slices through the target and 5 mm outside was refused as "slices are missing".
- Gantry-tilt correction kept the first slice's grid and cut 10 % of the measured pixels off the far slices.
- Philips mDIXON (in-phase, opposed-phase, water, fat in one series) loaded as a 4-D series without a word.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import medfuse
from medfuse.errors import GeometryError, InvalidInputError, MedfuseWarning
from medfuse.io.dicom import load_dicom, load_dicom_volumes, scan


def _ct_files(samples_dir: Path):
    return sorted((samples_dir / "ct").iterdir())


def _copy_series(samples_dir: Path, folder: Path, *, prefix: str = "IM", keep=None, edit=None, uid=None) -> str:
    """The sample CT copied into ``folder`` (files ``prefix``NNNN, slice order), a new SeriesInstanceUID unless
    ``uid``; ``keep`` filters slice indices, ``edit(ds, k)`` edits each header."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    for k, f in enumerate(_ct_files(samples_dir)):
        if keep is not None and not keep(k):
            continue
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if edit is not None:
            edit(ds, k)
        ds.save_as(folder / f"{prefix}{k:04d}")
    return uid


def _reference(samples_dir: Path) -> medfuse.Volume:
    return load_dicom(samples_dir / "ct")


# ---------------------------------------------------------------------------- series order
def _numbered(number: int, description: str):
    def edit(ds, k):
        ds.SeriesNumber = number
        ds.SeriesDescription = description
    return edit


def test_series_are_listed_by_series_number_whatever_their_file_names(samples_dir, tmp_path):
    """The same three series under two naming schemes list in one order, by SeriesNumber (a series added later
    with number 1 first), and a number picks the same series in both."""
    orders = []
    for scheme, names in (("pacs", ("IM_A", "IM_B", "IM_C")), ("uid", ("z", "a", "m"))):
        folder = tmp_path / scheme
        uids = [_copy_series(samples_dir, folder, prefix=names[0], edit=_numbered(3, "t1")),
                _copy_series(samples_dir, folder, prefix=names[1], edit=_numbered(7, "dixon_w")),
                _copy_series(samples_dir, folder, prefix=names[2], edit=_numbered(1, "scout"))]
        infos = scan(folder)
        assert [i.series_number for i in infos] == ["1", "3", "7"], scheme
        assert [i.series_uid for i in infos] == [uids[2], uids[0], uids[1]]
        assert [i.description for i in infos] == ["scout", "t1", "dixon_w"]
        picked = load_dicom(folder, series_uid="2")
        assert picked.provenance["series_uid"] == uids[0] and picked.provenance["series_number"] == "3"
        orders.append([i.description for i in infos])
    assert orders[0] == orders[1]


def test_info_lists_the_series_number_beside_the_list_number(samples_dir, tmp_path, capsys):
    """``medfuse info FOLDER`` shows each series' DICOM SeriesNumber (what viewers show) beside the number
    ``--series`` takes, in text and in ``--json``; a choice that matches nothing lists them too."""
    from medfuse.cli import main

    folder = tmp_path / "study"
    _copy_series(samples_dir, folder, prefix="B", edit=_numbered(12, "t1"))
    _copy_series(samples_dir, folder, prefix="A", edit=_numbered(4, "t2"))
    assert main(["info", str(folder)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " vol " in ln]
    assert len(lines) == 2 and " 1: CT   #4 " in lines[0] and " 2: CT   #12 " in lines[1]
    assert main(["info", str(folder), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["series"]
    assert [r["series_number"] for r in rows] == ["4", "12"] and [r["description"] for r in rows] == ["t2", "t1"]
    with pytest.raises(InvalidInputError, match="1: CT 160x192x40, 40 files, SeriesNumber 4; 2: CT .*SeriesNumber 12"):
        medfuse.io.select_series(folder, "9")


def test_series_without_a_number_come_last_and_one_number_is_ordered_by_acquisition(samples_dir, tmp_path):
    """Numbers compare as numbers (10 after 9), series without one come last, and two series of one number (two
    studies in one folder) are in the order they were acquired, whatever their files' names."""
    def edit_for(number, time):
        def edit(ds, k):
            ds.SeriesNumber, ds.AcquisitionTime, ds.SeriesDescription = number, time, f"{number}@{time}"
        return edit

    _copy_series(samples_dir, tmp_path, prefix="a", edit=edit_for(10, "090000"))
    _copy_series(samples_dir, tmp_path, prefix="b", edit=edit_for("", "080000"))
    _copy_series(samples_dir, tmp_path, prefix="c", edit=edit_for(2, "110000"))
    _copy_series(samples_dir, tmp_path, prefix="d", edit=edit_for(2, "100000"))
    _copy_series(samples_dir, tmp_path, prefix="e", edit=edit_for(9, "120000"))
    assert [i.description for i in scan(tmp_path)] == ["2@100000", "2@110000", "9@120000", "10@090000", "@080000"]


# ---------------------------------------------------------------------------- listings in messages
def test_series_of_one_modality_are_told_apart_in_the_message(samples_dir, tmp_path):
    """Two CT series of one size: each line names its SeriesNumber and ImageType (they differ), never the
    description (free text: a physician's or the patient's name); the fix names `medfuse info FOLDER`."""
    name = str(pydicom.dcmread(_ct_files(samples_dir)[0], stop_before_pixels=True).PatientName)
    family = name.split("^")[0]

    def second(ds, k):
        ds.SeriesNumber, ds.SeriesDescription = 7, f"recon for {family}"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", "MPR"]

    _copy_series(samples_dir, tmp_path, prefix="a", edit=_numbered(3, "head soft tissue"))
    _copy_series(samples_dir, tmp_path, prefix="b", edit=second)
    with pytest.raises(InvalidInputError) as e:
        load_dicom(tmp_path, series_uid="CT")
    msg = str(e.value)
    one, two = msg.split("(", 1)[1].split("; 2: ")
    assert one != two
    assert one.endswith("SeriesNumber 3, ImageType DERIVED\\SECONDARY\\AXIAL"), one
    assert two.startswith("CT 160x192x40, 40 files in ., SeriesNumber 7, ImageType DERIVED\\SECONDARY\\AXIAL\\MPR")
    assert family not in msg and "soft tissue" not in msg
    assert "medfuse info FOLDER" in e.value.fix and "by its number" in e.value.fix
    with pytest.raises(medfuse.errors.MultipleSeriesError) as e:
        load_dicom(tmp_path)
    assert "SeriesNumber 3" in str(e.value) and "SeriesNumber 7" in str(e.value) and family not in str(e.value)


# ---------------------------------------------------------------------------- pixel padding
@pytest.mark.parametrize("limit", [None, -1500])
def test_pixel_padding_is_not_loaded_as_measured_values(samples_dir, tmp_path, limit):
    """Stored values equal to PixelPaddingValue (or up to PixelPaddingRangeLimit) are padding, compared before
    rescaling (the intercept here is 100): set to air, every other voxel as measured."""
    ref = _reference(samples_dir).array.astype(np.int32)
    corner = np.zeros((192, 160), bool)  # (rows, columns)
    corner[:30, :20] = True
    stored = {-2000: corner.copy()}
    if limit is not None:
        band = np.zeros_like(corner)
        band[-10:, :] = True
        stored[-1700] = band  # inside the range: padding too

    def edit(ds, k):
        a = ds.pixel_array.astype(np.int16) - 100
        for value, m in stored.items():
            a[m] = value
        ds.PixelData = a.tobytes()
        ds.RescaleIntercept = 100
        ds.add_new(0x00280120, "SS", -2000)
        if limit is not None:
            ds.add_new(0x00280121, "SS", limit)

    _copy_series(samples_dir, tmp_path / "s", edit=edit)
    with pytest.warns(MedfuseWarning, match="pixel padding") as rec:
        vol = load_dicom(tmp_path / "s")
    pad = np.zeros((192, 160), bool)
    for m in stored.values():
        pad |= m
    pad3 = np.repeat(pad.T[:, :, None], 40, axis=2)
    assert vol.unit == "HU"
    np.testing.assert_array_equal(vol.array[~pad3], ref[~pad3])
    assert (vol.array[pad3] == -1000).all()  # the sample's air is -1000 HU: its lowest value, and air
    said = [str(w.message) for w in rec if "pixel padding" in str(w.message)]
    assert f"{int(pad3.sum())} voxels" in said[0] and "-1000 HU" in said[0]
    assert any("pixel padding" in w for w in vol.provenance["warnings"])


def test_pixel_padding_in_implicit_vr_files_is_read_by_its_pixel_representation(samples_dir, tmp_path):
    """Implicit VR leaves (0028,0120) US-or-SS: a signed padding value must still match signed pixels."""
    def edit(ds, k):
        a = ds.pixel_array.astype(np.int16)
        a[:5, :] = -3000
        ds.PixelData = a.tobytes()
        ds.add_new(0x00280120, "SS", -3000)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian

    _copy_series(samples_dir, tmp_path / "s", edit=edit)
    with pytest.warns(MedfuseWarning, match="pixel padding"):
        vol = load_dicom(tmp_path / "s")
    assert vol.array.min() == -1000 and (vol.array[:, :5, :] == -1000).all()


# ---------------------------------------------------------------------------- variable spacing
def test_variable_slice_spacing_loads_with_measured_slices_kept(samples_dir, tmp_path):
    """Every slice in the middle (4 mm), every 4th outside (16 mm): a complete series of two spacings, loaded on
    the 4 mm grid, measured slices as measured and the others interpolated linearly between them."""
    keep = set(range(0, 13, 4)) | set(range(12, 29)) | set(range(28, 40, 4))
    _copy_series(samples_dir, tmp_path / "s", keep=lambda k: k in keep)
    ref = _reference(samples_dir)
    with pytest.warns(MedfuseWarning, match="uneven slice spacing") as rec:
        vol = load_dicom(tmp_path / "s")
    assert vol.shape == (160, 192, 37)  # slices 0..36 of the original: 36 is the last kept (28 + 2 * 4)
    np.testing.assert_allclose(vol.affine, ref.affine)
    kept = sorted(keep)
    want = ref.array.astype(np.float64)
    for k in range(37):
        hi = next(x for x in kept if x >= k)
        lo = max(x for x in kept if x <= k)
        t = 0.0 if hi == lo else (k - lo) / (hi - lo)
        np.testing.assert_allclose(vol.array[:, :, k], (1 - t) * want[:, :, lo] + t * want[:, :, hi], atol=1e-3)
    msg = next(str(w.message) for w in rec if "uneven" in str(w.message))
    assert "in runs with no gap" in msg and "slices 1-4 16.00 mm apart, slices 4-20 4.00 mm apart" in msg, msg
    assert "(some of them interpolated, not measured: 15 of 37, their HU interpolated" in msg, msg
    assert "missing slices?" not in msg and vol.provenance["resampled"] is True


def test_a_wide_gap_in_regular_slices_is_still_refused_as_missing_slices(samples_dir, tmp_path):
    _copy_series(samples_dir, tmp_path / "s", keep=lambda k: not 15 <= k < 20)
    with pytest.raises(GeometryError, match="slices are missing"):
        load_dicom(tmp_path / "s")


# ---------------------------------------------------------------------------- gantry tilt
def test_gantry_tilt_correction_keeps_every_measured_pixel(samples_dir, tmp_path):
    """Slice k starts 1 mm (one pixel) further along x per 4 mm slice (14 degrees): the corrected grid is 39
    columns wider and holds every slice whole, each pixel at its own world position."""
    ref = _reference(samples_dir)

    def edit(ds, k):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + k * 1.0, y, z]

    _copy_series(samples_dir, tmp_path / "s", edit=edit)
    with pytest.warns(MedfuseWarning, match="widened by 39 columns and 0 rows") as rec:
        vol = load_dicom(tmp_path / "s")
    assert "every measured pixel is kept" in str(rec[0].message)
    assert vol.shape == (160 + 39, 192, 40) and vol.provenance["gantry_tilt_deg"] == pytest.approx(14.036, abs=0.01)
    for k in range(40):
        np.testing.assert_array_equal(vol.array[k:k + 160, :, k], ref.array[:, :, k])
    # voxel (k, 0, k) is the first pixel of slice k: at that slice's ImagePositionPatient
    first = pydicom.dcmread(sorted((tmp_path / "s").iterdir())[39], stop_before_pixels=True)
    # positions come in LPS; the affine maps voxel indices to LPS
    np.testing.assert_allclose(vol.affine @ [39, 0, 39, 1], [*map(float, first.ImagePositionPatient), 1], atol=1e-6)


# ---------------------------------------------------------------------------- image types
@pytest.mark.parametrize("tied_instances", [False, True])
def test_volumes_of_different_image_types_are_named_by_index(samples_dir, tmp_path, tied_instances):
    """One series holding in-phase, opposed-phase, water and fat images (one acquisition time; files named
    position-major): four volumes, each of one kind, and the warning names each index's kind."""
    uid = generate_uid()
    kinds = ["IP", "OP", "W", "F"]
    for t, kind in enumerate(kinds):
        def edit(ds, k, t=t, kind=kind):
            ds.ImageType = ["ORIGINAL", "PRIMARY", kind, "DIXON"]
            ds.RescaleIntercept = 10000 * (t + 1)
            ds.AcquisitionTime = "101500"
            ds.InstanceNumber = k + 1 if tied_instances else t * 40 + k + 1
        _copy_series(samples_dir, tmp_path / "s", prefix=f"P{3 - t}_", edit=edit, uid=uid)
    with pytest.warns(MedfuseWarning, match="differ in image type") as rec:
        vols = load_dicom_volumes(tmp_path / "s")
    ref = _reference(samples_dir).array.astype(np.int64)
    order = [3, 0, 1, 2] if tied_instances else [0, 1, 2, 3]  # tied: by kind name (F, IP, OP, W)
    for vol, t in zip(vols, order):
        np.testing.assert_array_equal(vol.array, ref + 10000 * (t + 1))
    msg = next(str(w.message) for w in rec if "image type" in str(w.message))
    shown = ", ".join(f"{i} {kinds[t]}\\DIXON" for i, t in enumerate(order))
    assert shown in msg and "not time points" in msg, msg
    assert not any("no time order" in str(w.message) for w in rec)
    with pytest.raises(medfuse.errors.MultipleSeriesError, match="differ in image type"):
        load_dicom(tmp_path / "s")


# ---------------------------------------------------------------------------- sidecar
def test_sidecar_records_which_series_was_fused(samples_dir, tmp_path):
    """`"series": ["1", "2"]` names positions in a listing: each input also records its SeriesNumber and the
    SHA-256 of its SeriesInstanceUID (never the UID, nor the description)."""
    import hashlib

    from medfuse.pipeline import fuse_files

    folder = tmp_path / "study"
    u1 = _copy_series(samples_dir, folder, prefix="b", edit=_numbered(4, "head soft"))
    u2 = _copy_series(samples_dir, folder, prefix="a", edit=_numbered(9, "head bone"))
    out = tmp_path / "fused.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuse_files(folder, folder, out, method="max", series=["1", "2"], register=None)
    text = (tmp_path / "fused.json").read_text()
    inputs = json.loads(text)["inputs"]
    assert [i["series_number"] for i in inputs] == ["4", "9"]
    assert [i["series_uid_sha256"] for i in inputs] == [hashlib.sha256(u.encode()).hexdigest() for u in (u1, u2)]
    assert u1 not in text and u2 not in text and "head soft" not in text
    shutil.rmtree(folder)


def test_info_shows_the_patient_position_and_image_type(samples_dir, tmp_path, capsys):
    """A radiotherapy physicist checks how the patient lay (HFS, FFP ...) and what kind of image a series is; they
    were shown nowhere (ImageType only inside warnings). The geometry does not depend on the position."""
    from medfuse.cli import main

    def feet_first(ds, k):
        ds.PatientPosition = "FFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]

    folder = tmp_path / "ct"
    _copy_series(samples_dir, folder, edit=feet_first)
    v = medfuse.load(folder)
    assert v.provenance["patient_position"] == "FFS"
    assert v.provenance["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
    np.testing.assert_array_equal(v.affine, medfuse.load(samples_dir / "ct").affine)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "position     FFS (feet first, supine)" in out and "image type   ORIGINAL\\PRIMARY\\AXIAL" in out
    assert main(["info", str(folder), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["patient_position"] == "FFS" and rec["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
