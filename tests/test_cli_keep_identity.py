"""DICOM outputs that go back to the patient's study: ``--keep-identity`` (``deidentify=False``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medfuse.cli import EXIT_USAGE, main
from medfuse.errors import InvalidInputError
from medfuse.pipeline import Pipeline, fuse_files

SAMPLES = Path(__file__).resolve().parents[1] / "sample_volumes"
NAME, MRN, ACCESSION = "DOE^JANE", "MRN-4711", "ACC-0815"


def _named_ct(tmp_path: Path) -> Path:
    """The sample CT series with a patient's name, ID and accession number, as a scanner's export holds them."""
    import pydicom

    folder = tmp_path / "ct"
    shutil.copytree(SAMPLES / "ct", folder)
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.PatientName, ds.PatientID, ds.AccessionNumber, ds.PatientBirthDate = NAME, MRN, ACCESSION, "19600101"
        ds.save_as(str(f))
    return folder


def _first(folder: Path):
    import pydicom

    return pydicom.dcmread(str(sorted(folder.iterdir())[0]), stop_before_pixels=True)


def test_keep_identity_files_the_result_into_the_fixed_series_study(tmp_path, capsys):
    """Command-line DICOM outputs were always de-identified with per-process pseudonymous UIDs: a result could
    not go back into the patient's study in a PACS."""
    ct = _named_ct(tmp_path)
    src = _first(ct)
    fused, moved, anon = tmp_path / "fused", tmp_path / "moved", tmp_path / "anon"
    # A PET/CT (one frame of reference): fused unregistered into the CT's frame (another frame would be refused).
    petct = _named_pet(tmp_path / "petct", study=src.StudyInstanceUID, frame=src.FrameOfReferenceUID)
    assert main(["fuse", str(ct), str(petct), "-o", str(fused), "--method", "mean", "--keep-identity",
                 "-q"]) == 0
    assert main(["register", str(ct), str(SAMPLES / "pet"), "-o", str(moved), "--keep-identity", "-q"]) == 0
    assert main(["fuse", str(ct), str(SAMPLES / "pet"), "-o", str(anon), "--method", "mean", "-q"]) == 0
    for out in (fused, moved):
        ds = _first(out)
        assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == (NAME, MRN, ACCESSION)
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.get("PatientIdentityRemoved") != "YES"
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID  # a new series in that study
        # The sidecar records the choice, and never the identity itself.
        side = (out.parent / f"{out.name}.json").read_text()
        assert NAME.split("^")[0] not in side and MRN not in side and ACCESSION not in side
        steps = json.loads(side)["steps"]
        assert {"deidentify": False}.items() <= steps[-1]["params"].items(), steps[-1]
    # The default is unchanged: de-identified, pseudonymous study.
    ds = _first(anon)
    assert ds.PatientIdentityRemoved == "YES" and ds.StudyInstanceUID != src.StudyInstanceUID
    assert str(ds.get("PatientName", "")) != NAME and ds.get("PatientID", "") != MRN
    assert "deidentify" not in json.loads((tmp_path / "anon.json").read_text())["steps"][-1]["params"]
    assert NAME.split("^")[0] not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["fuse", "register"])
def test_keep_identity_without_a_place_for_it_is_refused_before_any_work(tmp_path, capsys, command):
    ct = _named_ct(tmp_path)
    extra = ["--method", "mean"] if command == "fuse" else []
    # A NIfTI output holds no patient.
    out = tmp_path / "out.nii.gz"
    assert main([command, str(ct), str(SAMPLES / "pet"), "-o", str(out), "--keep-identity", *extra]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--keep-identity keeps the patient and study in a DICOM output, but the output is a nii.gz file" in err
    assert "a name without a file ending" in err
    # A NIfTI fixed image has no patient to keep.
    out = tmp_path / "dicom_out"
    assert main([command, str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "-o", str(out), "--keep-identity",
                 *extra]) == EXIT_USAGE
    assert "--keep-identity takes the patient and study from the fixed image, which is not a DICOM series" in \
        capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # nothing written


def test_python_api_deidentify_option(tmp_path):
    with pytest.raises(InvalidInputError, match="deidentify must be True or False"):
        Pipeline(deidentify="no")
    with pytest.raises(InvalidInputError, match="deidentify=False keeps the patient and study in a DICOM output"):
        fuse_files(SAMPLES / "ct", SAMPLES / "pet", tmp_path / "x.nii.gz", method="mean", deidentify=False)
    assert not list(tmp_path.iterdir())
    # Without an output nothing is written, so there is nothing to refuse.
    res = fuse_files(SAMPLES / "ct", SAMPLES / "pet", None, method="mean", deidentify=False)
    assert res.output is None and res.sidecar is None and res.fused.shape == res.fused.array.shape
    assert Pipeline().parameters() == Pipeline(deidentify=False).parameters()  # save is not a result parameter


def _named_pet(folder: Path, *, name=NAME, mrn=MRN, study=None, frame=None) -> Path:
    import pydicom

    folder.mkdir(parents=True)
    for f in sorted((SAMPLES / "pet").iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.PatientName, ds.PatientID = name, mrn
        if study:
            ds.StudyInstanceUID, ds.FrameOfReferenceUID = study, frame
        ds.save_as(str(folder / f.name))
    return folder


def test_a_folder_of_several_series_gives_the_chosen_fixed_series_as_template(tmp_path):
    """``fuse study study --series CT PT``: the fused output took the folder's first file as its template, the
    PET's (its study, frame of reference and patient), although it lies on the CT's grid."""
    study = tmp_path / "study"
    ct = _named_ct(tmp_path)
    shutil.move(str(ct), str(study / "b_ct"))
    src = _first(study / "b_ct")
    # Sorted first: another study's PET, in the CT's frame of reference (unregistered across frames is refused).
    _named_pet(study / "a_pet", study="1.2.3.555", frame=src.FrameOfReferenceUID)
    out = tmp_path / "fused"
    assert main(["fuse", str(study), str(study), "--series", "CT", "PT", "-o", str(out), "--method", "mean",
                 "--keep-identity", "-q"]) == 0
    ds = _first(out)
    assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (src.StudyInstanceUID, src.FrameOfReferenceUID)
    assert ds.Modality != "PT" and ds.StudyDate == src.StudyDate


@pytest.mark.parametrize("command", ["fuse", "register"])
def test_keep_identity_refuses_another_patients_series(tmp_path, capsys, command):
    """A PET of another patient was fused (or registered) and filed under the fixed series' patient, with a
    warning only; de-identified, the result names no one and it stays a warning."""
    ct = _named_ct(tmp_path)
    pet = _named_pet(tmp_path / "pet_other", name="ROE^RICHARD", mrn="MRN-0002")
    extra = ["--method", "mean"] if command == "fuse" else []
    out = tmp_path / "out"
    assert main([command, str(ct), str(pet), "-o", str(out), "--keep-identity", *extra]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "input 2 is a DICOM series of another patient" in err and "de-identified (the default)" in err
    assert "ROE" not in err and "DOE" not in err
    assert not out.exists() and not (tmp_path / "out.json").exists()
    assert main([command, str(ct), str(pet), "-o", str(out), *extra, "-q"]) == 0  # de-identified: written


def test_keep_identity_compares_every_identifier_and_refuses_before_the_work(tmp_path, monkeypatch):
    """Two patients of one name (MRN1, MRN2) passed the warning's test (ID and name both differ), and the check ran
    after registration and fusion; a moving image without any patient identity went in without a word."""
    import medfuse
    import medfuse.pipeline as P

    ct = _named_ct(tmp_path)
    namesake = _named_pet(tmp_path / "pet_namesake", mrn="MRN-0002")  # same name, another ID
    calls = []
    monkeypatch.setattr(P, "_fuse", lambda *a, **k: calls.append(1))  # never reached
    with pytest.raises(InvalidInputError, match="input 2 is a DICOM series of another patient"):
        fuse_files(ct, namesake, tmp_path / "out", method="mean", deidentify=False)
    assert not calls and not (tmp_path / "out").exists()
    monkeypatch.undo()
    nifti = tmp_path / "pet.nii.gz"
    medfuse.save(medfuse.load(SAMPLES / "pet"), nifti)
    with pytest.warns(medfuse.MedfuseWarning, match="input 2 carries no patient identity"):
        fuse_files(ct, nifti, tmp_path / "out2", method="mean", deidentify=False)
    # A fixed Volume medfuse read from DICOM is a DICOM series too (its source is the template).
    src = _first(ct)
    petct = _named_pet(tmp_path / "petct", study=src.StudyInstanceUID, frame=src.FrameOfReferenceUID)
    res = fuse_files(medfuse.load(ct), petct, tmp_path / "out3", method="mean", deidentify=False)
    ds = _first(res.output)
    assert (str(ds.PatientName), ds.PatientID) == (NAME, MRN)
    # A fixed path that does not exist: the loader's own words, not "not a DICOM series".
    with pytest.raises(medfuse.UnreadableFileError, match="no such file or folder"):
        fuse_files(tmp_path / "typo", SAMPLES / "pet", tmp_path / "out4", method="mean", deidentify=False)


def test_a_fixed_volume_from_another_process_is_still_compared_and_a_fixed_without_identity_said(tmp_path):
    """A fixed Volume loaded in another process (pickled, a Dask worker's) carries a patient key salted there,
    which compares with nothing here: another patient's series went into its patient's study without a word. Its
    series' header is read again now. A de-identified fixed series kept no identity, silently."""
    import pydicom

    import medfuse

    ct = _named_ct(tmp_path)
    vol = medfuse.load(ct)
    vol.provenance["patient_key"] = "0badc0de:" + vol.provenance["patient_key"].split(":", 1)[1]  # another run's
    other = _named_pet(tmp_path / "pet_other", name="ROE^RICHARD", mrn="MRN-0002")
    with pytest.raises(InvalidInputError, match="input 2 is a DICOM series of another patient"):
        fuse_files(vol, other, tmp_path / "out", method="mean", deidentify=False)
    assert not (tmp_path / "out").exists()
    anon = tmp_path / "anon_ct"
    anon.mkdir()
    for f in sorted(ct.iterdir()):
        ds = pydicom.dcmread(str(f))
        for kw in ("PatientName", "PatientID", "PatientBirthDate"):
            ds.data_element(kw).value = ""
        ds.save_as(str(anon / f.name))
    src = _first(ct)
    petct = _named_pet(tmp_path / "petct", study=src.StudyInstanceUID, frame=src.FrameOfReferenceUID)
    with pytest.warns(medfuse.MedfuseWarning, match="the fixed image carries no patient identity"):
        fuse_files(anon, petct, tmp_path / "out2", method="mean", deidentify=False)
