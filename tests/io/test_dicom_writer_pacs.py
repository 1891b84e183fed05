"""What a PACS makes of medfuse's DICOM outputs: a PET written onto another PET keeps its own dose, weight and scan
times (the SUV a PACS computes from the output is the PET's own); de-identified outputs name a pseudonymous
patient (not one blank patient for all); --keep-identity keeps the patient's issuers; no attribute that dciodvfy
finds out of place (PatientPosition on PET, InversionTime without IR, TriggerTime without gating); a batch run's
workers share one pseudonym key."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import medfuse
from medfuse import Volume, save
from medfuse.errors import MedfuseWarning
from medfuse.io.dicom_writer import PseudonymKey, current_key, pseudonym_uid, using_key

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_volumes"
#: PET B: another patient weight, dose and day's times than the sample PET (A: 70 kg, 250 MBq at 10:00, scan 11:00).
B_WEIGHT, B_DOSE, B_INJECTED, B_SCAN = "90.0", "400000000.0", "093000.000000", "104500.000000"


def _series(src: Path, dst: Path, *, slices=range(28, 36), **edits) -> Path:
    """``slices`` of the sample series ``src`` as a new series in ``dst`` (new series and SOP UIDs), with ``edits``
    (keyword: value; ``dose``/``injected`` edit the radiopharmaceutical item)."""
    dst.mkdir()
    series = generate_uid()
    files = sorted(src.glob("IM*.dcm"))
    dose, injected = edits.pop("dose", None), edits.pop("injected", None)
    for k in slices:
        ds = pydicom.dcmread(files[k])
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for kw, value in edits.items():
            setattr(ds, kw, value)
        if "RadiopharmaceuticalInformationSequence" in ds:
            item = ds.RadiopharmaceuticalInformationSequence[0]
            if dose:
                item.RadionuclideTotalDose = dose
            if injected:
                item.RadiopharmaceuticalStartTime = injected
                item.RadiopharmaceuticalStartDateTime = str(ds.SeriesDate) + injected
        ds.save_as(dst / files[k].name, enforce_file_format=True)
    return dst


def _first(folder: Path) -> pydicom.Dataset:
    return pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)


def _load(path, **kw) -> Volume:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)
        return medfuse.load(path, **kw)


@pytest.fixture()
def pets(tmp_path):
    """(A, B): 8 slices of the sample PET, and the same voxels as another scan (weight, dose, times) in A's frame."""
    a = _series(SAMPLES / "pet", tmp_path / "A")
    b = _series(SAMPLES / "pet", tmp_path / "B", PatientWeight=B_WEIGHT, SeriesTime=B_SCAN, AcquisitionTime=B_SCAN,
                dose=B_DOSE, injected=B_INJECTED)
    return a, b


def _assert_b_tags(ds: pydicom.Dataset) -> None:
    item = ds.RadiopharmaceuticalInformationSequence[0]
    assert (float(ds.PatientWeight), float(item.RadionuclideTotalDose)) == (float(B_WEIGHT), float(B_DOSE))
    assert str(item.RadiopharmaceuticalStartDateTime).endswith(B_INJECTED)
    assert (ds.SeriesTime, ds.AcquisitionTime) == (B_SCAN, B_SCAN)


def _close(out: Volume, ref: Volume, tol: float = 0.005) -> None:
    assert out.unit == ref.unit == "SUVbw"
    assert abs(float(out.array.max()) / float(ref.array.max()) - 1) < tol
    np.testing.assert_allclose(out.array, ref.array, atol=tol * float(ref.array.max()))


def test_pet_written_onto_another_pet_keeps_its_own_dose_weight_and_times(pets, tmp_path):
    """B (Bq/mL) written on A's grid with A as template: the output held B's Bq/mL but A's dose, weight and times,
    so its SUV (a PACS's, or medfuse.load's) was the wrong one (here 0.74 x B's). Now B's own series gives them;
    A gives the study and frame of reference only."""
    a, b = pets
    a_ds = _first(a)
    bq = medfuse.resample(_load(b, suv="none"), _load(a, suv="none"))
    out = save(bq, tmp_path / "bq", template=a)
    ds = _first(out)
    _assert_b_tags(ds)
    assert ds.Units == "BQML" and ds.FrameOfReferenceUID == pseudonym_uid(a_ds.FrameOfReferenceUID)
    _close(_load(out, suv="bw"), _load(b, suv="bw"))

    # In SUV: the tags named A's dose and weight, and the series/acquisition times were the time of writing.
    suv = medfuse.resample(_load(b, suv="bw"), _load(a, suv="bw"))
    ds = _first(save(suv, tmp_path / "suv", template=a))
    _assert_b_tags(ds)
    assert ds.Units == "GML"


def test_suv_pet_saved_on_its_own_series_keeps_the_scan_times(pets, tmp_path):
    """save(suv_pet, template=its own folder) stamped the time of writing as SeriesTime/AcquisitionTime, while the
    same save without a template kept the scan's times."""
    _, b = pets
    suv = _load(b, suv="bw")
    with_tpl, without = _first(save(suv, tmp_path / "t", template=b)), _first(save(suv, tmp_path / "n"))
    for ds in (with_tpl, without):
        _assert_b_tags(ds)


def test_register_command_writes_the_moving_pets_own_values(pets, tmp_path):
    """The command line's path: `medfuse register A B -o out --suv none` (A, FIXED, as template)."""
    from medfuse.cli import main

    a, b = pets
    out = tmp_path / "reg"
    assert main(["register", str(a), str(b), "-o", str(out), "--suv", "none", "--initialise", "none", "-q"]) == 0
    _assert_b_tags(_first(out))
    _close(_load(out, suv="bw"), medfuse.resample(_load(b, suv="bw"), _load(a, suv="bw")), tol=0.02)


def test_pet_whose_own_series_is_gone_takes_no_other_pets_dose(pets, tmp_path):
    """Without its own series (moved away), a PET saved on another PET's series must not take that one's dose."""
    a, b = pets
    bq = _load(b, suv="none")
    bq.provenance["source"] = str(tmp_path / "gone")
    with pytest.warns(MedfuseWarning, match="carries no dose"):
        ds = _first(save(bq, tmp_path / "o", template=a))
    assert len(ds.RadiopharmaceuticalInformationSequence) == 0 and "PatientWeight" not in ds


# ------------------------------------------------------------------------------------------------ patients
def _patient(tmp_path: Path, name: str, **ids) -> Path:
    return _series(SAMPLES / "ct", tmp_path / name, slices=range(4), StudyInstanceUID=generate_uid(), **ids)


def test_deidentified_outputs_name_one_pseudonymous_patient_per_patient(tmp_path):
    """Every de-identified output had an empty PatientID and PatientName: a PACS filed all of them under one blank
    patient. Now a keyed hash of the patient's identity: equal for one patient (two studies), different for
    another, never the real value, and another key (another run) gives another."""
    jane1 = _patient(tmp_path, "j1", PatientID="PID111", PatientName="DOE^JANE", PatientBirthDate="19600101")
    jane2 = _patient(tmp_path, "j2", PatientID="PID111", PatientName="DOE^JANE", PatientBirthDate="19600101")
    john = _patient(tmp_path, "jo", PatientID="PID222", PatientName="ROE^JOHN", PatientBirthDate="19600101")
    vol = _load(jane1)
    ids = []
    for src in (jane1, jane2, john):
        ds = _first(save(vol, tmp_path / f"out_{src.name}", template=src))
        assert ds.PatientID and str(ds.PatientName) == ds.PatientID + "^PSEUDONYM" and ds.PatientIdentityRemoved == "YES"
        assert "PID" not in ds.PatientID and "DOE" not in str(ds.PatientName) and "PatientBirthDate" in ds
        ids.append(ds.PatientID)
    assert ids[0] == ids[1] != ids[2]
    # Without a template: the patient of the volume's own series.
    assert _first(save(vol, tmp_path / "notpl")).PatientID == ids[0]
    with using_key(PseudonymKey("another run's key")):
        assert _first(save(vol, tmp_path / "other", template=jane1)).PatientID != ids[0]
    assert "another" not in repr(PseudonymKey("another run's key")) and "<hidden>" in str(current_key())


def test_keep_identity_keeps_the_issuers_and_other_ids(tmp_path):
    """--keep-identity dropped IssuerOfPatientID, its qualifiers, the issuer of the accession number and the other
    patient IDs; de-identified, none of them is written."""
    q, acc, other = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    q.UniversalEntityID, q.UniversalEntityIDType = "1.2.3.4", "ISO"
    acc.LocalNamespaceEntityID = "RIS_A"
    other.PatientID, other.IssuerOfPatientID = "OTHER-9", "HOSP_B"
    src = _patient(tmp_path, "p", PatientID="PID333", IssuerOfPatientID="HOSP_A",
                   IssuerOfPatientIDQualifiersSequence=pydicom.Sequence([q]),
                   IssuerOfAccessionNumberSequence=pydicom.Sequence([acc]),
                   OtherPatientIDsSequence=pydicom.Sequence([other]))
    vol = _load(src)
    kept = _first(save(vol, tmp_path / "keep", template=src, deidentify=False))
    assert kept.PatientID == "PID333" and kept.IssuerOfPatientID == "HOSP_A"
    assert kept.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == "1.2.3.4"
    assert kept.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS_A"
    assert kept.OtherPatientIDsSequence[0].PatientID == "OTHER-9"
    deid = _first(save(vol, tmp_path / "deid", template=src))
    assert not {"IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "IssuerOfAccessionNumberSequence",
                "OtherPatientIDsSequence"} & set(deid.dir())


# ------------------------------------------------------------------------------------------------ dciodvfy
def test_no_attribute_the_iod_forbids(pets, tmp_path):
    """dciodvfy's errors: PatientPosition (from a CT template) beside the PET's PatientOrientationCodeSequence;
    a Philips enhanced template's InversionTime 0 beside ScanningSequence RM; TriggerTime without gating."""
    ct = _series(SAMPLES / "ct", tmp_path / "ct", slices=range(4), PatientPosition="HFS")
    pet = _first(save(_load(pets[0]), tmp_path / "pet", template=ct))
    assert pet.Modality == "PT" and "PatientPosition" not in pet and "PatientOrientationCodeSequence" in pet
    mr = pydicom.Dataset()
    mr.StudyInstanceUID, mr.Modality, mr.PatientPosition = generate_uid(), "MR", "HFS"
    mr.ScanningSequence, mr.SequenceVariant, mr.InversionTime, mr.TriggerTime = "RM", "NONE", "0", "0"
    vol = Volume(np.ones((4, 5, 3), np.float32), np.eye(4), modality="MR", unit="arbitrary")
    ds = _first(save(vol, tmp_path / "mr", template=mr))
    assert "InversionTime" not in ds and "TriggerTime" not in ds and ds.PatientPosition == "HFS"
    mr.ScanningSequence, mr.ScanOptions, mr.InversionTime, mr.TriggerTime = ["GR", "IR"], "CG", "900", "350"
    ds = _first(save(vol, tmp_path / "mr_ir", template=mr))
    assert (float(ds.InversionTime), float(ds.TriggerTime)) == (900.0, 350.0)


# ------------------------------------------------------------------------------------------------ batch
def test_batch_workers_share_one_pseudonym_key(tmp_path):
    """Each Dask worker is its own process with its own key: two subjects fused onto one DICOM fixed series got
    two pseudonymous studies, frames of reference (no longer overlaid, as docs promise) and patients."""
    from medfuse.batch import Subject, run_batch

    fixed = _series(SAMPLES / "pet", tmp_path / "fixed", PatientID="PID444", PatientName="DOE^JANE")
    moving = _series(SAMPLES / "pet", tmp_path / "pet", slices=range(28, 36))
    subjects = [Subject(subject=f"s{i}", fixed=str(fixed), moving=[str(moving)], output=str(tmp_path / f"out{i}"))
                for i in range(2)]
    summary = run_batch(subjects, workers=2, method="max", register=None, report=tmp_path / "report.csv")
    assert summary.n_done == 2, summary.table()
    a, b = (_first(tmp_path / f"out{i}") for i in range(2))
    keys = ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID")
    assert [a.get(k) for k in keys] == [b.get(k) for k in keys] and a.PatientID.startswith("MF")
    # The run's key is this process's: a worker's own key (the bug) fails this whichever worker ran which subject.
    assert a.FrameOfReferenceUID == pseudonym_uid(_first(fixed).FrameOfReferenceUID)


def test_a_pseudonymous_output_is_not_taken_for_another_patient(tmp_path):
    """Reloaded beside its source (fuse CT + the de-identified registered PET), the pseudonym must count as no
    identity, as the empty ID did: compared with the real ID it read as another patient (a warning, and a refusal
    with --keep-identity)."""
    from medfuse._patient import patient_key

    src = _patient(tmp_path, "p", PatientID="PID555", PatientName="DOE^JANE")
    assert patient_key(_first(src)) is not None
    assert patient_key(_first(save(_load(src), tmp_path / "o", template=src))) is None


def test_two_runs_keys_on_one_multi_threaded_worker_do_not_cross():
    """A module global swapped for the block: thread 1 leaving put the worker's own key back while thread 2 (another
    batch run on the same tcp:// worker) was still writing, and thread 2's outputs left its run's pseudonyms."""
    import threading

    from medfuse.io.dicom_writer import PseudonymKey, pseudonym_uid, using_key

    keys = [PseudonymKey("a" * 64), PseudonymKey("b" * 64)]
    want = []
    for k in keys:
        with using_key(k):
            want.append(pseudonym_uid("1.2.3.4"))
    assert want[0] != want[1]
    inside, left = threading.Barrier(2), threading.Event()
    got = [None, None]

    def run(i):
        with using_key(keys[i]):
            inside.wait()
            if i == 1:
                left.wait(5)  # thread 0 has left its block
            got[i] = pseudonym_uid("1.2.3.4")
        if i == 0:
            left.set()

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == want
