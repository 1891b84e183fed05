"""Gated and dynamic PET and gated/dual-isotope SPECT: the order of their volumes, what each volume is
(``provenance["volume"]``), and combining them (``medfuse.load(..., combine=)``).

Each test writes its own synthetic DICOM with pydicom; every volume's voxels encode its gate or frame, so the order
and the combined values are checked against values known by construction.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError, MedfuseWarning, MultipleSeriesError, UnsupportedDataError

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

PET_SOP = "1.2.840.10008.5.1.4.1.1.128"
NM_SOP = "1.2.840.10008.5.1.4.1.1.20"
NX, NZ = 8, 4


def _base(sop: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", NX, NX
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def pet_series(folder, *, kind="GATED", n=4, instance="gate_major", image_index=True, durations=None,
               trigger=True, rr_windows=None, time_slots=True, slices=NZ):
    """A classic single-frame PET series of ``n`` gates or frames x NZ slices, in Bq/mL: volume (gate or frame) g
    holds 20000 + 1000 g. ``instance``: "gate_major" or "reversed" (InstanceNumber numbers the gates backwards).
    ``durations``: a dynamic series' ActualFrameDuration per frame (ms), None for none. ``image_index``: True
    (the standard's), False (none) or "restart" (1..NZ in every gate, as some exports). ``rr_windows``: a gated
    series' NumberOfRRIntervals (its ``n`` volumes then n / rr_windows time slots in each), ``time_slots`` False
    for no NumberOfTimeSlots, ``slices`` the NumberOfSlices written."""
    folder.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    starts = np.concatenate([[0], np.cumsum(durations or [10000] * n)[:-1]]) / 1000.0
    for g in range(n):
        for k in range(NZ):
            ds = _base(PET_SOP)
            ds.Modality, ds.PatientName, ds.PatientID, ds.PatientWeight = "PT", "Doe^Jane", "ID4321", 70.0
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SeriesNumber, ds.StudyDate, ds.SeriesDate, ds.AcquisitionDate = 5, "20261201", "20261201", "20261201"
            ds.SeriesTime = "100000"
            secs = 36000 + starts[g] if kind == "DYNAMIC" else 36000
            ds.AcquisitionTime = f"{int(secs // 3600):02d}{int(secs % 3600 // 60):02d}{secs % 60:02.0f}"
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.SeriesType = [kind, "IMAGE"]
            ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["ATTN", "DECY"]
            ds.NumberOfSlices = slices
            if kind == "GATED":
                if time_slots:
                    ds.NumberOfTimeSlots = n // (rr_windows or 1)
                if rr_windows:
                    ds.NumberOfRRIntervals = rr_windows
                if trigger:
                    ds.TriggerTime = g * 100.0
            else:
                ds.NumberOfTimeSlices = n
                ds.FrameReferenceTime = starts[g] * 1000.0
                if durations is not None:
                    ds.ActualFrameDuration = durations[g]
            if image_index:
                ds.ImageIndex = (0 if image_index == "restart" else g * NZ) + k + 1
            ds.InstanceNumber = {"gate_major": g * NZ + k + 1, "reversed": (n - 1 - g) * NZ + k + 1}[instance]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-20.0, -20.0, -8.0 + 4.0 * k]
            ds.PixelSpacing, ds.SliceThickness = [5.0, 5.0], 4.0
            ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
            ds.PixelData = np.full((NX, NX), 20000 + 1000 * g, np.uint16).tobytes()
            ds.save_as(folder / f"IM{g:02d}{k:02d}.dcm", enforce_file_format=True)
    return folder


def nm_file(path, *, gates=4, itype="RECON GATED TOMO", windows=None):
    """An NM multi-frame file: ``gates`` gates x NZ slices (TimeSlotVector, SliceVector), gate g holding
    100 + 10 g; or with ``windows`` (names) one volume per energy window (EnergyWindowVector, SliceVector),
    window w holding 100 x (w + 1)."""
    ds = _base(NM_SOP)
    ds.Modality, ds.PatientName, ds.PatientID = "NM", "Doe^Jane", "ID4321"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 3, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", itype, "EMISSION"]
    ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [6.0, 6.0], 6.0, 6.0
    det = Dataset()
    det.ImageOrientationPatient, det.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [-24.0, -24.0, -12.0]
    ds.DetectorInformationSequence = Sequence([det])
    ds.NumberOfSlices = NZ
    frames, values = [], []
    if windows:
        for w in range(len(windows)):
            for k in range(NZ):
                frames.append((w + 1, k + 1))
                values.append(100 * (w + 1))
        ds.FrameIncrementPointer = [0x00540010, 0x00540080]
        ds.EnergyWindowVector = [f[0] for f in frames]
        ds.NumberOfEnergyWindows = len(windows)
        infos = []
        for name in windows:
            e = Dataset()
            e.EnergyWindowName = name
            infos.append(e)
        ds.EnergyWindowInformationSequence = Sequence(infos)
    else:
        for g in range(gates):
            for k in range(NZ):
                frames.append((g + 1, k + 1))
                values.append(100 + 10 * g)
        ds.FrameIncrementPointer = [0x00540060, 0x00540070, 0x00540080]
        ds.RRIntervalVector, ds.TimeSlotVector = [1] * len(frames), [f[0] for f in frames]
        ds.NumberOfRRIntervals, ds.NumberOfTimeSlots = 1, gates
    ds.SliceVector = [f[1] for f in frames]
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.stack([np.full((NX, NX), v, np.uint16) for v in values]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*a, **kw)
    return out, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------ order
def test_gated_pet_numbered_backwards_is_ordered_by_image_index_and_warned(tmp_path):
    folder = pet_series(tmp_path / "gated", instance="reversed")
    vols, said = _quiet(medfuse.load_volumes, folder, suv="none")
    # Volume g holds 20000 + 1000 g: by InstanceNumber alone volume 0 was the last gate.
    assert [float(np.median(v.array)) for v in vols] == [20000.0, 21000.0, 22000.0, 23000.0]
    assert [v.provenance["volume"]["gate"] for v in vols] == [1, 2, 3, 4]
    assert [v.provenance["volume"]["trigger_time_ms"] for v in vols] == [0.0, 100.0, 200.0, 300.0]
    assert vols[0].provenance["volume"]["label"] == "gate 1/4 (trigger 0 ms)"
    # kept through the Volume's own copies (it was dropped: "volume" was not a provenance key a Volume keeps)
    assert vols[0].with_array(vols[0].array * 2).provenance["volume"] == vols[0].provenance["volume"]
    assert any("ImageIndex" in w and "InstanceNumber contradicts" in w for w in said), said
    assert not any("Doe^Jane" in w or "ID4321" in w for w in said)


def test_gated_pet_in_order_says_nothing_about_instance_numbers(tmp_path):
    vols, said = _quiet(medfuse.load_volumes, pet_series(tmp_path / "gated"), suv="none")
    assert [float(np.median(v.array)) for v in vols] == [20000.0, 21000.0, 22000.0, 23000.0]
    assert not any("InstanceNumber" in w for w in said), said


def test_gated_pet_without_image_index_falls_back_to_trigger_time(tmp_path):
    folder = pet_series(tmp_path / "gated", instance="reversed", image_index=False)
    vols, _ = _quiet(medfuse.load_volumes, folder, suv="none")
    assert [float(np.median(v.array)) for v in vols] == [20000.0, 21000.0, 22000.0, 23000.0]


def test_dynamic_pet_frames_named_by_start_and_duration(tmp_path):
    folder = pet_series(tmp_path / "dyn", kind="DYNAMIC", n=3, durations=[10000, 20000, 30000])
    vols, _ = _quiet(medfuse.load_volumes, folder, suv="none")
    facts = [v.provenance["volume"] for v in vols]
    assert [f["frame_start_s"] for f in facts] == [0.0, 10.0, 30.0]
    assert [f["frame_duration_s"] for f in facts] == [10.0, 20.0, 30.0]
    assert facts[1]["label"] == "frame from 10 s, 20 s long"
    # The reference time and duration differ too, but only qualify the start (docs/io.md, "axis").
    assert facts[1]["axis"] == ["frame_start_s"]


@pytest.mark.parametrize("how", [dict(image_index="restart"), dict(slices=1)],
                         ids=["image-index-restarts-per-gate", "number-of-slices-too-small"])
def test_gated_pet_image_index_that_does_not_separate_gates_gives_way_to_trigger_time(tmp_path, how):
    # restart: ImageIndex 1..NZ in every gate puts every image at place 0; slices=1: a place per image, not per
    # gate. Either way the gates come from TriggerTime, and no gate number is made up.
    folder = pet_series(tmp_path / "gated", instance="reversed", **how)
    vols, said = _quiet(medfuse.load_volumes, folder, suv="none")
    assert [float(np.median(v.array)) for v in vols] == [20000.0, 21000.0, 22000.0, 23000.0]
    facts = [v.provenance["volume"] for v in vols]
    assert not any("gate" in f or "rr_window" in f for f in facts), facts
    assert [f["label"] for f in facts] == ["trigger 0 ms", "trigger 100 ms", "trigger 200 ms", "trigger 300 ms"]
    assert all(f["axis"] == ["trigger_time_ms"] for f in facts)
    assert any("ordered by TriggerTime" in w and "InstanceNumber contradicts" in w for w in said), said


@pytest.mark.parametrize("how", [dict(image_index=False), dict(time_slots=False)],
                         ids=["no-image-index", "no-number-of-time-slots"])
def test_gated_pet_without_gate_numbers_is_labelled_by_trigger_time(tmp_path, how):
    folder = pet_series(tmp_path / "gated", **how)
    vols, _ = _quiet(medfuse.load_volumes, folder, suv="none")
    facts = [v.provenance["volume"] for v in vols]
    assert [f["trigger_time_ms"] for f in facts] == [0.0, 100.0, 200.0, 300.0]
    assert [f["label"] for f in facts] == ["trigger 0 ms", "trigger 100 ms", "trigger 200 ms", "trigger 300 ms"]
    assert all(f["axis"] == ["trigger_time_ms"] for f in facts)
    with pytest.raises(MultipleSeriesError) as e:  # the refusal says which index is which
        _quiet(medfuse.load, folder, suv="none")
    assert "0 trigger 0 ms, 1 trigger 100 ms" in e.value.problem


def test_gated_pet_with_two_rr_windows_names_each_volumes_window(tmp_path):
    # 2 R-R windows x 2 time slots: ImageIndex counts slices, then slots, then windows.
    folder = pet_series(tmp_path / "gated", rr_windows=2)
    vols, _ = _quiet(medfuse.load_volumes, folder, suv="none")
    facts = [v.provenance["volume"] for v in vols]
    assert [(f["rr_window"], f["gate"], f["n_gates"]) for f in facts] == [(1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
    assert facts[0]["label"] == "R-R window 1, gate 1/2 (trigger 0 ms)"
    assert facts[3]["label"] == "R-R window 2, gate 2/2 (trigger 300 ms)"
    assert facts[0]["axis"] == ["rr_window", "gate"]


def test_4d_refusal_suggests_only_a_combine_the_unit_takes(tmp_path):
    # A gated PET in Bq/mL: 'mean' alone (its 'sum' is refused); the advice followed works.
    folder = pet_series(tmp_path / "gated")
    with pytest.raises(MultipleSeriesError) as e:
        _quiet(medfuse.load, folder, suv="none")
    assert e.value.fix.startswith("pass volume_index=0..3 for one, combine='mean' (a gated PET's ungated image")
    assert "combine='sum'" not in e.value.fix
    vol, _ = _quiet(medfuse.load, folder, suv="none", combine="mean")
    assert np.allclose(vol.array, (20000 + 21000 + 22000 + 23000) / 4)
    # A gated SPECT in counts: 'sum' too, the ungated image.
    path = nm_file(tmp_path / "gated.dcm")
    with pytest.raises(MultipleSeriesError) as e:
        _quiet(medfuse.load, path)
    assert e.value.fix.startswith("pass volume_index=0..3 for one, combine='sum' (a gated series' counts")
    assert "combine='mean'" in e.value.fix


# ------------------------------------------------------------------------------------------------ combine
def test_dynamic_pet_mean_is_weighted_by_frame_durations(tmp_path):
    folder = pet_series(tmp_path / "dyn", kind="DYNAMIC", n=3, durations=[10000, 20000, 30000])
    vol, _ = _quiet(medfuse.load, folder, suv="none", combine="mean")
    expected = (10 * 20000 + 20 * 21000 + 30 * 22000) / 60  # 21333.3, a plain mean would be 21000
    assert np.allclose(vol.array, expected, rtol=1e-6)
    step = vol.provenance["history"][-1]
    assert step["step"] == "combine" and step["how"] == "mean" and step["n_volumes"] == 3
    assert step["weighting"].startswith("frame durations")
    assert vol.provenance["volume_index"] is None
    assert vol.shape == (NX, NX, NZ) and np.allclose(vol.spacing, (5.0, 5.0, 4.0))


def test_mean_without_frame_durations_is_plain_and_says_so(tmp_path):
    folder = pet_series(tmp_path / "dyn", kind="DYNAMIC", n=3)
    vol, _ = _quiet(medfuse.load, folder, suv="none", combine="mean")
    assert np.allclose(vol.array, 21000.0)
    assert vol.provenance["history"][-1]["weighting"] == "equal (frame durations unknown)"


def test_sum_of_a_concentration_is_refused(tmp_path):
    folder = pet_series(tmp_path / "gated")
    with pytest.raises(InvalidInputError) as e:
        _quiet(medfuse.load, folder, suv="none", combine="sum")
    assert "Bq/mL" in e.value.problem and "combine='mean'" in e.value.fix


def test_gated_spect_sum_is_the_ungated_image(tmp_path):
    path = nm_file(tmp_path / "gated.dcm")
    vols, _ = _quiet(medfuse.load_volumes, path)
    assert [v.provenance["volume"]["label"] for v in vols] == ["gate 1/4", "gate 2/4", "gate 3/4", "gate 4/4"]
    vol, _ = _quiet(medfuse.load, path, combine="sum")
    assert np.allclose(vol.array, 100 + 110 + 120 + 130)
    assert np.allclose(vol.affine, vols[0].affine)
    assert vol.provenance["history"][-1]["volumes"] == ["gate 1/4", "gate 2/4", "gate 3/4", "gate 4/4"]


def test_dual_isotope_windows_are_named_and_never_combined(tmp_path):
    path = nm_file(tmp_path / "dual.dcm", itype="RECON TOMO", windows=["Tl201", "Tc99m"])
    vols, _ = _quiet(medfuse.load_volumes, path)
    assert [v.provenance["volume"]["energy_window_name"] for v in vols] == ["Tl201", "Tc99m"]
    assert [float(v.array.max()) for v in vols] == [100.0, 200.0]
    assert vols[1].provenance["volume"]["axis"] == ["energy_window"]
    with pytest.raises(MultipleSeriesError) as e:  # no choice: the refusal says what the volumes are
        _quiet(medfuse.load, path)
    assert "energy window 1 (Tl201)" in e.value.problem and "time point" not in e.value.problem
    assert "combine" not in e.value.fix, e.value.fix  # it would be refused: two isotopes are no one image
    for how in ("sum", "mean"):
        with pytest.raises(InvalidInputError) as e:
            _quiet(medfuse.load, path, combine=how)
        assert "energy windows" in e.value.problem and "Tl201" in e.value.problem and "Tc99m" in e.value.problem
        assert e.value.fix.startswith("pass volume_index=0..1")


def test_combine_arguments_are_checked(tmp_path):
    path = nm_file(tmp_path / "gated.dcm")
    with pytest.raises(InvalidInputError, match="both given"):
        medfuse.load(path, combine="sum", volume_index=0)
    with pytest.raises(InvalidInputError, match="combine must be"):
        medfuse.load(path, combine="median")


def test_combine_leaves_a_3d_input_as_it_is(tmp_path):
    vol = medfuse.Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.diag([2.0, 2.0, 2.0, 1.0]),
                         modality="NM", unit="counts")
    medfuse.save(vol, tmp_path / "v.nii.gz")
    back = medfuse.load(tmp_path / "v.nii.gz", combine="sum")
    assert np.array_equal(back.array, vol.array) and "history" not in back.provenance or not any(
        h.get("step") == "combine" for h in back.provenance.get("history", []))


def test_4d_nifti_mean(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.stack([np.full((3, 3, 2), v, np.float32) for v in (1.0, 2.0, 6.0)], axis=-1)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "four.nii.gz")
    vol, _ = _quiet(medfuse.load, tmp_path / "four.nii.gz", combine="mean")
    assert vol.shape == (3, 3, 2) and np.allclose(vol.array, 3.0)
    assert np.allclose(vol.spacing, (2.0, 2.0, 3.0))


# ------------------------------------------------------------------------------------------------ projections
def test_projection_file_is_listed_as_projections_and_its_refusal_names_the_reconstructions(tmp_path):
    folder = tmp_path / "nm"
    folder.mkdir()
    nm_file(folder / "proj.dcm", itype="GATED TOMO")
    (info,) = medfuse.scan(folder)
    assert info.n_volumes == 0 and "projections" in info.not_volume and "not reconstructed" in info.not_volume
    with pytest.raises(UnsupportedDataError) as e:
        _quiet(medfuse.load, folder / "proj.dcm")
    assert "RECON GATED TOMO" in e.value.fix and "RECON TOMO" in e.value.fix


def test_reconstructed_series_has_no_projection_note(tmp_path):
    folder = tmp_path / "nm"
    folder.mkdir()
    nm_file(folder / "gated.dcm")
    (info,) = medfuse.scan(folder)
    assert info.n_volumes == 4 and info.not_volume == ""


def test_warnings_are_medfuse_warnings(tmp_path):
    folder = pet_series(tmp_path / "gated", instance="reversed")
    with pytest.warns(MedfuseWarning, match="InstanceNumber"):
        medfuse.load_volumes(folder, suv="none")
