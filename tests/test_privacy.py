"""Privacy audit: no patient identifiers in logs, warnings, errors, sidecars, reports, saved files or napari.

A tiny CT and PET series are written whose headers are full of identifying values (name, ID, birth date,
accession number, institution, physicians, study description, study ID, address, other IDs, a private tag
and distinctive Study/Series/FrameOfReference UIDs). Every face a user or a log sees is driven with them and
its text searched for each value and its common spellings.

What may show them: the user's own listing commands (``medfuse.scan()``, ``medfuse info``) show series
descriptions and UIDs, because choosing a series needs them and the user asked; and ``Volume.provenance`` (in
memory, for programs) keeps the UIDs and the series description. Neither may flow into a log line, warning,
error message, ``repr``, sidecar, report, saved file header, MONAI meta or napari layer name/notification.
File and folder paths are the user's own and may be shown.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import medfuse

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

STUDY_UID = "1.2.999.4242.77777.1"
FOR_UID = "1.2.999.4242.77777.9"
CT_UID = "1.2.999.4242.77777.2"
PT_UID = "1.2.999.4242.77777.3"
PHI = dict(PatientName="Doe^Jane", PatientID="MRN123456", PatientBirthDate="19620314",
           AccessionNumber="ACC778899", InstitutionName="Zorbington General Hospital",
           ReferringPhysicianName="Quackenbush^Walter", OperatorsName="Fenwick^Olga",
           StudyDescription="Jane Doe brain", StudyID="STU4242", PatientAddress="12 Elmwood Lane Springfield",
           OtherPatientIDs="OPID-55512")
PRIVATE = "Zorbo-private note MRN123456"
#: Identifying values and their usual spellings. Short ones match as whole words only ("Doe", not "does").
NEEDLES = ("Doe", "Jane", "MRN123456", "123456", "19620314", "1962-03-14", "14.03.1962", "03/14/1962",
           "14/03/1962", "ACC778899", "778899", "Zorbington", "Quackenbush", "Walter", "Fenwick", "Olga",
           "STU4242", "Elmwood", "OPID-55512", "55512", "Zorbo-private", "77777",
           STUDY_UID, FOR_UID, CT_UID, PT_UID)


#: For the bytes of DICOM files medfuse writes: its own ContentTime/SeriesTime (TM) may be "123456" (12:34:56).
FILE_NEEDLES = tuple(n for n in NEEDLES if n != "123456")


def leaks(text: str, needles=NEEDLES) -> list:
    """The identifying values found in ``text`` (case-insensitive, whole words for the short ones)."""
    return [n for n in needles
            if re.search(r"(?<![0-9A-Za-z])" + re.escape(n) + r"(?![0-9A-Za-z])", text, re.I)
            or (len(n) > 6 and n.lower() in text.lower())]


def _write_slice(path: Path, arr, z: float, *, series_uid: str, modality: str, description: str, number: int,
                 extra=None) -> None:
    sop = {"CT": "1.2.840.10008.5.1.4.1.1.2", "PT": "1.2.840.10008.5.1.4.1.1.128"}[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.PatientSex, ds.PatientWeight, ds.PatientSize = "F", 70.0, 1.7
    ds.Modality, ds.SeriesInstanceUID = modality, series_uid
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = STUDY_UID, FOR_UID
    ds.SeriesDescription, ds.InstanceNumber, ds.Manufacturer = description, number, "ACME"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20250101"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = "110000"
    ds.ImagePositionPatient = [-10.0, -12.0, float(z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [2.0, 2.0]
    ds.SliceThickness = 2.0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, (-1024.0 if modality == "CT" else 0.0)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.private_block(0x0011, "ZORBO", create=True).add_new(0x01, "LO", PRIVATE)
    if modality == "PT":
        ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["ATTN", "DECY"]
        item = pydicom.Dataset()
        item.RadiopharmaceuticalStartTime = "100000"
        item.RadionuclideTotalDose = "250000000"
        item.RadionuclideHalfLife = "6586.2"
        item.Radiopharmaceutical = "Fluorodeoxyglucose"
        ds.RadiopharmaceuticalInformationSequence = [item]
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(arr, dtype=np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def phi_series(folder: Path, *, modality: str = "CT", uid=None, description=None, z=None, prefix="IM",
               extra=None) -> Path:
    """A 12x12xN series (2 mm voxels) with identifying headers; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or (CT_UID if modality == "CT" else PT_UID)
    description = description or ("Doe CT" if modality == "CT" else "Doe PET")
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Invalid value for VR", UserWarning)  # malformed test UIDs, on writing
        for k, zz in enumerate([2.0 * k for k in range(8)] if z is None else z):
            a = (rng.random((12, 12)) * 1000 + 500).astype(np.uint16)
            a[3:8, 4:9] += 1500
            _write_slice(folder / f"{prefix}{k + 1:04d}.dcm", a, zz, series_uid=uid, modality=modality,
                         description=description, number=k + 1, extra=extra)
    return folder


def _bytes_text(path: Path) -> str:
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return b"".join(f.read_bytes() for f in files).decode("latin-1")


@contextlib.contextmanager
def captured():
    """Everything a user or a log would see: warnings (all categories), every logger at DEBUG, stdout/stderr."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    out, err = io.StringIO(), io.StringIO()
    seen: dict = {}
    try:
        with warnings.catch_warnings(record=True) as w, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            seen["w"] = w
            yield lambda: ("\n".join(f"{x.category.__name__}: {x.message}" for x in seen["w"])
                           + "\n" + buf.getvalue() + "\n" + out.getvalue() + "\n" + err.getvalue())
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _cli(argv) -> tuple:
    from medfuse.cli import main

    with captured() as seen:
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
        return rc, seen()


@pytest.fixture
def study(tmp_path):
    """ct/ and pt/ folders of one identifying study; out/ for outputs."""
    (tmp_path / "out").mkdir()
    return phi_series(tmp_path / "ct", modality="CT"), phi_series(tmp_path / "pt", modality="PT"), tmp_path / "out"


def _two_series_folder(root: Path, *, ct_description=None, pt_description=None) -> Path:
    """One folder holding a CT and a PET series (an export that mixes series)."""
    folder = root / "mixed"
    phi_series(folder, modality="CT", description=ct_description)
    phi_series(folder, modality="PT", prefix="PT", description=pt_description)
    return folder


# ----------------------------------------------------------------------------- the fixture itself
def test_the_search_finds_what_the_headers_hold(study):
    """Guard of the audit: the needles are in the files (else every other test would pass vacuously)."""
    ct, _, _ = study
    text = _bytes_text(ct)
    for value in ("Doe^Jane", "MRN123456", "19620314", "ACC778899", "Zorbington", "Quackenbush", "Fenwick",
                  "Jane Doe brain", "STU4242", "Elmwood", "OPID-55512", PRIVATE, STUDY_UID, FOR_UID, CT_UID):
        assert value in text
    assert leaks("patient Jane Doe, 1962-03-14") and not leaks("it does not")


# ----------------------------------------------------------------------------- load / repr / errors
def test_load_warnings_repr_and_saved_headers_hold_no_identifiers(study):
    ct, pt, out = study
    with captured() as seen:
        vols = [medfuse.load(ct), medfuse.load(pt), *medfuse.load_volumes(pt)]
        for v in vols:
            print(repr(v), str(v))
        # Every file format medfuse writes, byte for byte (NIfTI descrip/aux_file/extensions, ITK header text).
        for name in ("pt.nii.gz", "pt.nii", "pt.mha", "pt_meta.mhd", "pt.nrrd", "pt_nrrd.nhdr"):
            medfuse.save(vols[1], out / name)
        medfuse.save(vols[1], out / "pt2.nii", format="nifti2")
        text = seen()
    assert vols[1].unit == "SUVbw"
    assert leaks(text) == []
    for f in sorted(out.iterdir()):
        assert leaks(_bytes_text(f)) == [], f.name
    import nibabel as nib

    hdr = nib.load(str(out / "pt.nii")).header
    assert leaks(hdr["descrip"].item().decode("latin-1") + hdr["aux_file"].item().decode("latin-1")) == []
    assert len(hdr.extensions) == 0


def test_provenance_keeps_uids_for_programs_and_nothing_patient(study):
    """In-memory provenance is for programs: UIDs (which study/space) yes; patient values never."""
    ct, _, _ = study
    prov = medfuse.load(ct).provenance
    assert prov["series_uid"] == CT_UID and prov["study_uid"] == STUDY_UID and prov["frame_of_reference_uid"] == FOR_UID
    text = json.dumps(prov, default=str)
    assert leaks(text, ("MRN123456", "19620314", "ACC778899", "Zorbington", "Quackenbush", "Fenwick", "STU4242",
                        "Elmwood", "OPID-55512", "Zorbo-private", "Jane Doe brain", "Doe^Jane")) == []


def _error_text(fn) -> str:
    with captured() as seen:
        try:
            fn()
            outcome = "no error"
        except medfuse.MedfuseError as e:
            outcome = f"{type(e).__name__}: {e} | {e.one_line()} | {e!r}"
        return outcome + "\n" + seen()


def test_error_and_warning_paths_hold_no_identifiers(tmp_path):
    texts = {}
    broken = phi_series(tmp_path / "broken", modality="CT")
    (broken / "IM0003.dcm").write_bytes((broken / "IM0003.dcm").read_bytes()[:300])
    texts["damaged slice, gap"] = _error_text(lambda: medfuse.load(broken))
    texts["damaged file alone"] = _error_text(lambda: medfuse.load(broken / "IM0003.dcm"))
    beside = phi_series(tmp_path / "beside", modality="CT")
    (beside / "zz.dcm").write_bytes((beside / "IM0001.dcm").read_bytes()[:300])
    texts["damaged file beside"] = _error_text(lambda: medfuse.load(beside))
    missing = phi_series(tmp_path / "missing", modality="CT", z=[0, 2, 4, 14, 16])
    texts["missing slices"] = _error_text(lambda: medfuse.load(missing))
    one_gap = phi_series(tmp_path / "onegap", modality="CT", z=[0, 2, 4, 8, 10])
    texts["one missing slice"] = _error_text(lambda: medfuse.load(one_gap))
    mixed = phi_series(tmp_path / "sizes", modality="CT", z=[0, 2, 4])
    _write_slice(mixed / "odd.dcm", np.zeros((10, 12)), 6.0, series_uid=CT_UID, modality="CT",
                 description="Doe CT", number=9)
    texts["mixed sizes"] = _error_text(lambda: medfuse.load(mixed))
    loc = phi_series(tmp_path / "loc", modality="CT", z=[0, 2, 4])
    _write_slice(loc / "loc.dcm", np.zeros((12, 12)), 0.0, series_uid=CT_UID, modality="CT",
                 description="Doe CT", number=9, extra={"ImageOrientationPatient": [0, 1.0, 0, 0, 0, -1.0]})
    texts["localizer"] = _error_text(lambda: medfuse.load(loc))
    no_weight = phi_series(tmp_path / "noweight", modality="PT", extra={"PatientWeight": None})
    texts["SUV without weight"] = _error_text(lambda: medfuse.load(no_weight))
    texts["SUV lbm without sex"] = _error_text(
        lambda: medfuse.load(phi_series(tmp_path / "nosex", modality="PT", extra={"PatientSex": "O"}), suv="lbm"))
    texts["whole_series, other uid"] = _error_text(
        lambda: medfuse.load(no_weight / "IM0001.dcm", whole_series=True, series_uid="1.2.3"))
    dup = phi_series(tmp_path / "dup", modality="CT")
    shutil.copy(dup / "IM0001.dcm", dup / "copy.dcm")
    texts["duplicate"] = _error_text(lambda: medfuse.load(dup))
    texts["4-D"] = _error_text(lambda: medfuse.load(phi_series(tmp_path / "4d", modality="CT", z=[0, 0, 2, 2, 4, 4])))
    two = _two_series_folder(tmp_path)
    texts["wrong series_uid"] = _error_text(lambda: medfuse.load(two, series_uid="1.2.3"))
    assert "no error" not in texts["damaged slice, gap"] and "MedfuseWarning" in texts["SUV without weight"]
    found = {k: leaks(t) for k, t in texts.items() if leaks(t)}
    assert found == {}


def test_damaged_input_errors_and_warnings_hold_no_identifiers(tmp_path):
    """The errors and warnings for damaged input (tests/io/test_damaged_input.py), driven with identifying headers."""
    texts = {}
    loc = phi_series(tmp_path / "loc", modality="CT", z=[0, 2, 4])
    _write_slice(loc / "scout.dcm", np.zeros((12, 12)), 0.0, series_uid=CT_UID, modality="CT", description="Doe CT",
                 number=9, extra={"ImageOrientationPatient": [0, 1.0, 0, 0, 0, -1.0],
                                  "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    texts["typed localizer left out"] = _error_text(lambda: medfuse.load(loc))
    resent = phi_series(tmp_path / "resent", modality="CT", z=[0, 2, 4, 6])
    ds = pydicom.dcmread(resent / "IM0002.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(resent / "again.dcm")
    texts["slice re-sent under a new uid"] = _error_text(lambda: medfuse.load(resent))
    cut = phi_series(tmp_path / "cut", modality="CT", z=[0, 2, 4])
    (cut / "IM0002.dcm").write_bytes((cut / "IM0002.dcm").read_bytes()[:-100])
    texts["pixel data cut short"] = _error_text(lambda: medfuse.load(cut))
    odd = phi_series(tmp_path / "odd", modality="CT", z=[0])
    raw = (odd / "IM0001.dcm").read_bytes()
    i = raw.index(b"\x02\x00\x10\x00UI", 132)  # TransferSyntaxUID -> a private one of the same length
    n = int.from_bytes(raw[i + 6:i + 8], "little")
    (odd / "IM0001.dcm").write_bytes(raw[:i + 8] + (b"1.2.99" + b"9" * n)[:n] + raw[i + 8 + n:])
    texts["no decoder for the transfer syntax"] = _error_text(lambda: medfuse.load(odd))
    no_units = phi_series(tmp_path / "nounits", modality="PT", extra={"Units": None})
    texts["PET without Units"] = _error_text(lambda: medfuse.load(no_units))
    assert "UnreadableFileError" in texts["no decoder for the transfer syntax"]
    assert "GeometryError" in texts["slice re-sent under a new uid"]
    assert "localizer" in texts["typed localizer left out"]
    found = {k: leaks(t) for k, t in texts.items() if leaks(t)}
    assert found == {}


def test_several_series_error_does_not_quote_descriptions(tmp_path):
    two = _two_series_folder(tmp_path)
    with pytest.raises(medfuse.MultipleSeriesError) as info:
        medfuse.load(two)
    assert info.value.choices == [CT_UID, PT_UID] or sorted(info.value.choices) == sorted([CT_UID, PT_UID])
    assert "CT" in str(info.value) and "PT" in str(info.value)  # still says what the series are
    assert leaks(str(info.value)) == []


def test_cli_several_series_error_does_not_quote_descriptions(tmp_path, study):
    _, pt, out = study
    two = _two_series_folder(tmp_path)
    for debug in ([], ["--debug"]):
        rc, text = _cli([*debug, "fuse", two, pt, "-o", out / "f.nii.gz", "--method", "max"])
        assert rc == 2 and "2 series" in text
        assert leaks(text) == []


# ----------------------------------------------------------------------------- scan / info (the user's listing)
def test_scan_and_info_list_uids_and_descriptions_but_no_patient_values(tmp_path, study):
    """``scan``/``medfuse info`` are the user's own listings: they show UIDs and descriptions (needed to pick
    a series with series_uid= / --series), never the patient's name, ID, birth date or the other header values."""
    ct, _, _ = study
    two = _two_series_folder(tmp_path)
    infos = medfuse.scan(two)
    assert {i.series_uid for i in infos} == {CT_UID, PT_UID}
    assert {i.description for i in infos} == {"Doe CT", "Doe PET"}
    patient = ("Doe^Jane", "Jane", "MRN123456", "123456", "19620314", "1962-03-14", "ACC778899", "Zorbington",
               "Quackenbush", "Fenwick", "STU4242", "Elmwood", "OPID-55512", "Zorbo-private", "brain", STUDY_UID,
               FOR_UID)
    for argv in (["info", two], ["info", two, "--json"], ["info", ct], ["info", ct, "--json"],
                 ["info", two, "--series", PT_UID]):
        rc, text = _cli(argv)
        assert rc == 0, text
        assert leaks(text, patient) == [], argv
    assert CT_UID in _cli(["info", two])[1]  # the listing does show the series UIDs


# ----------------------------------------------------------------------------- pipeline, sidecars, CLI
def test_fuse_register_save_outputs_sidecars_and_cli_hold_no_identifiers(study):
    ct, pt, out = study
    texts = {}
    from medfuse.pipeline import fuse_files

    with captured() as seen:
        for name in ("f.nii.gz", "f2.mha", "f3.nrrd", "f4.mhd", "fdicom"):  # one name each: f.mha would share f.json
            res = fuse_files(ct, pt, out / name, method="max")
            texts[f"fuse_files {name} result"] = (json.dumps(res.provenance, default=str) + repr(res.fused)
                                                  + json.dumps(res.fused.provenance, default=str))
        fixed, moving = medfuse.load(ct), medfuse.load(pt)
        reg = medfuse.register(fixed, moving, kind="rigid")
        texts["register report"] = json.dumps(reg.report.to_dict(), default=str) + repr(reg.resampled)
        medfuse.save(reg.resampled, out / "reg.nii.gz")
        fused = medfuse.fuse(fixed, reg.resampled, method="max")
        texts["fuse provenance"] = json.dumps(fused.provenance, default=str) + repr(fused)
        medfuse.save(fused, out / "fused_dicom", template=ct)  # de-identified by default
        medfuse.save(moving, out / "pet_dicom", template=pt)
        texts["library"] = seen()
    for argv in (["fuse", ct, pt, "-o", out / "cli.nii.gz", "--method", "max"],
                 ["fuse", ct, pt, "-o", out / "cli_dicom", "--method", "max"],
                 ["--debug", "register", ct, pt, "-o", out / "cli_reg.nii.gz"],
                 ["register", ct, pt, "-o", out / "cli_reg_dicom"]):
        rc, texts[" ".join(map(str, argv[:2]))] = _cli(argv)
        assert rc == 0, texts[" ".join(map(str, argv[:2]))]
    assert (out / "cli.json").is_file() and (out / "fdicom.json").is_file()
    found = {k: leaks(t) for k, t in texts.items() if leaks(t)}
    for f in sorted(out.rglob("*")):
        if f.is_file() and leaks(_bytes_text(f), FILE_NEEDLES):
            found[f"file {f.relative_to(out)}"] = leaks(_bytes_text(f), FILE_NEEDLES)
    assert found == {}
    # The de-identified DICOM says so; the study/frame UIDs are pseudonyms, not the template's.
    ds = pydicom.dcmread(next((out / "fused_dicom").iterdir()))
    assert ds.PatientIdentityRemoved == "YES" and ds.StudyInstanceUID != STUDY_UID


def test_dicom_output_without_deidentify_keeps_the_patient(study):
    """Positive control of the byte search: deidentify=False is the caller's explicit choice to keep them."""
    ct, _, out = study
    medfuse.save(medfuse.load(ct), out / "kept", template=ct, deidentify=False)
    assert "MRN123456" in _bytes_text(out / "kept")


def test_evaluate_outputs_hold_no_identifiers(study):
    ct, pt, out = study
    rc, text = _cli(["evaluate", "--pair", ct, pt, "--methods", "max", "--mode", "native", "--out", out / "ev",
                     "--no-progress"])
    assert rc == 0, text
    files = sorted(f for f in (out / "ev").rglob("*") if f.is_file())
    assert {f.name for f in files} >= {"metrics.csv", "metrics.json"}
    assert leaks(text) == []
    assert {f.name: leaks(_bytes_text(f), FILE_NEEDLES) for f in files} == {f.name: [] for f in files}


# ----------------------------------------------------------------------------- batch
def _run_batch(tmp_path, rows, report: Path):
    man = tmp_path / "manifest.csv"
    man.write_text("subject,fixed,moving,output\n" + "".join(f"{s},{f},{m},{o}\n" for s, f, m, o in rows))
    from medfuse.batch import run_batch

    with captured() as seen:
        summary = run_batch(man, scheduler="synchronous", method="max", report=report)
        return summary, seen()


def test_batch_report_holds_no_identifiers(tmp_path, study):
    ct, pt, out = study
    broken = phi_series(tmp_path / "broken", modality="CT")
    (broken / "IM0003.dcm").write_bytes((broken / "IM0003.dcm").read_bytes()[:300])
    for report in (out / "report.csv", out / "report.json"):
        rows = [("s1", ct, pt, out / f"s1_{report.suffix[1:]}.nii.gz"), ("s2", broken, pt, out / "s2.nii.gz")]
        summary, text = _run_batch(tmp_path, rows, report)
        assert [r.status for r in summary.results] == ["done", "failed"]
        assert leaks(text + report.read_text() + summary.table()) == []


def test_batch_report_does_not_quote_series_descriptions(tmp_path, study):
    _, pt, out = study
    two = _two_series_folder(tmp_path, ct_description="CT for Quackenbush", pt_description="PET Quackenbush")
    summary, text = _run_batch(tmp_path, [("s1", two, pt, out / "s1.nii.gz")], out / "report.csv")
    assert [r.status for r in summary.results] == ["failed"]
    assert "2 series" in summary.results[0].error
    assert leaks(text + (out / "report.csv").read_text() + summary.table()) == []


# ----------------------------------------------------------------------------- MONAI
def test_monai_meta_holds_no_identifiers(study):
    pytest.importorskip("monai")
    ct, pt, _ = study
    from medfuse.transforms import FuseModalitiesd, LoadVolumed

    with captured() as seen:
        d = LoadVolumed(["ct", "pt"], as_tensor=True)({"ct": str(ct), "pt": str(pt)})
        d = FuseModalitiesd(["ct", "pt"], method="max")(d)
        text = seen()
    for key in ("ct", "pt", "fused"):
        text += repr(dict(d[key].meta)) + repr(d[key].meta.keys())
    assert d["ct"].meta["filename_or_obj"] == str(ct)  # the path is the user's own
    assert leaks(text) == []


# ----------------------------------------------------------------------------- napari reader
def _napari_reader():
    pytest.importorskip("napari")
    from medfuse_napari import _reader

    return _reader


def test_napari_layer_of_one_series_is_named_after_its_folder(study):
    _reader = _napari_reader()
    ct, _, _ = study
    for path in (ct, ct / "IM0003.dcm"):
        layers, problems = _reader._layers_for(str(path))
        assert [kw["name"] for _, kw, _ in layers] == ["ct"] and problems == []
        md = layers[0][1]["metadata"]["medfuse"]
        patient = ("MRN123456", "19620314", "ACC778899", "Zorbington", "Quackenbush", "Fenwick", "STU4242",
                   "Elmwood", "Zorbo-private", "Doe^Jane", "Jane Doe brain")
        assert leaks(json.dumps(md, default=str), patient) == []


def test_napari_layer_names_and_notifications_hold_no_descriptions(tmp_path, monkeypatch):
    _reader = _napari_reader()
    import napari.utils.notifications as notifications

    folder = tmp_path / "study"
    phi_series(folder / "a", modality="CT")
    phi_series(folder / "b", modality="PT", z=[0, 2, 4, 20, 22])  # a gap: this one cannot be read
    shown = []
    monkeypatch.setattr(notifications, "show_warning", shown.append)
    monkeypatch.setattr(notifications, "show_error", shown.append)
    layers = _reader._read(str(folder))
    names = [kw["name"] for _, kw, _ in layers]
    assert len(names) == 1 and len(shown) == 1
    assert leaks(" | ".join(names + shown)) == []


# ----------------------------------------------------------------------------- pydicom's own warnings
def test_malformed_uids_are_not_echoed_in_warnings_or_logs(tmp_path):
    # Leading zeros in a UID component are invalid but common in older exports.
    bad = {"StudyInstanceUID": "1.2.999.4242.077777.1", "FrameOfReferenceUID": "1.2.999.4242.077777.9"}
    ct = phi_series(tmp_path / "ct", modality="CT", uid="1.2.999.4242.077777.2", extra=bad)
    pt = phi_series(tmp_path / "pt", modality="PT")
    (tmp_path / "out").mkdir()
    from medfuse.pipeline import fuse_files

    with captured() as seen:
        vol = medfuse.load(ct)
        medfuse.scan(tmp_path)
        medfuse.save(vol, tmp_path / "out" / "d", template=ct)
        fuse_files(ct, pt, tmp_path / "out" / "f.nii.gz", method="max")
        text = seen()
    assert vol.provenance["series_uid"] == "1.2.999.4242.077777.2"
    assert leaks(text, ("077777", "1.2.999.4242.077777.1", "1.2.999.4242.077777.2", "1.2.999.4242.077777.9")) == []


def test_a_folder_that_cannot_be_entered_gives_no_identifiers_and_no_error(tmp_path, monkeypatch):
    """In a subject folder this user may list but not enter, Path.is_file raised PermissionError from the
    identifier search: one such folder stopped a whole batch before any subject ran. (Simulated: root may
    enter any folder.)"""
    import pathlib

    from medfuse.provenance import patient_identifiers

    locked = tmp_path / "sub-03"
    locked.mkdir()
    (locked / "pet.nii.gz").write_bytes(b"x")
    real = pathlib.Path.is_file

    def is_file(self):
        if locked in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "is_file", is_file)
    assert patient_identifiers([tmp_path, locked / "pet.nii.gz"]) == []


# ----------------------------------------------------------------------------- folders named after the patient
def _named_study(tmp_path):
    """The study in folders named after the patient, a damaged file beside the PET (so that a warning quotes it)."""
    root = tmp_path / "Doe_Jane_MRN123456"
    ct, pt = phi_series(root / "ct", modality="CT"), phi_series(root / "pt", modality="PT")
    (pt / "zz.dcm").write_bytes((pt / "IM0001.dcm").read_bytes()[:300])
    (tmp_path / "out").mkdir()
    return ct, pt, tmp_path / "out"


def test_command_line_warnings_and_lines_are_blanked_like_its_errors(tmp_path):
    """fuse blanked the patient's folder name in its errors but printed it in its warnings ("1 DICOM file beside
    the series could not be read")."""
    ct, pt, out = _named_study(tmp_path)
    rc, text = _cli(["fuse", ct, pt, "-o", out / "f.nii.gz", "--method", "max", "--no-progress"])
    assert rc == 0 and "warning" in text, text
    assert leaks(text) == []


def test_evaluate_blanks_names_paths_and_failures(tmp_path):
    """evaluate named its rows and fused files after the pair's folders (the patient's name, in metrics.csv,
    metrics.json and on disk), and its failure list quoted their paths."""
    ct, pt, out = _named_study(tmp_path)
    broken = phi_series(tmp_path / "Doe_Jane_MRN123456" / "broken", modality="CT")
    for f in sorted(broken.iterdir())[2:]:
        f.write_bytes(f.read_bytes()[:300])
    rc, text = _cli(["evaluate", "--pair", ct, pt, "--pair", broken, pt, "--methods", "max", "--mode", "native",
                     "--out", out / "ev", "--no-progress"])
    assert rc == 1, text  # one pair scored, one failed
    files = sorted(f for f in (out / "ev").rglob("*") if f.is_file())
    assert leaks(text) == [] and [f for f in files if leaks(f.name)] == []
    assert {f.name: leaks(_bytes_text(f), FILE_NEEDLES) for f in files} == {f.name: [] for f in files}


def test_batch_keeps_warnings_in_the_row_blanked(tmp_path):
    """On a Dask worker a subject's warnings were printed raw (naming the patient's folder), even with -q; they
    are the row's ``warnings`` now, blanked, and printed by the command without -q."""
    ct, pt, out = _named_study(tmp_path)
    summary, text = _run_batch(tmp_path, [("s1", ct, pt, out / "s1.nii.gz")], out / "r.csv")
    assert summary.results[0].status == "done" and summary.results[0].warnings
    assert "could not be read" in summary.results[0].warnings
    assert leaks(summary.results[0].warnings) == [] and leaks(text) == []
    assert leaks((out / "r.csv").read_text()) == []


def test_identifiers_are_found_in_a_damaged_file_and_in_a_folder_of_two_patients(tmp_path):
    from medfuse.provenance import patient_identifiers

    cut = phi_series(tmp_path / "cut", modality="CT")
    whole = (cut / "IM0001.dcm").read_bytes()
    (cut / "IM0001.dcm").write_bytes(whole[:whole.find(b"MRN123456") + 60])  # cut inside the header
    assert "MRN123456" in patient_identifiers([cut / "IM0001.dcm"])
    both = tmp_path / "both"
    phi_series(both, modality="CT")
    other = both / "ZZ0001.dcm"  # sorts after the first patient's files
    ds = pydicom.dcmread(both / "IM0001.dcm")
    ds.PatientName, ds.PatientID = "Roe^Richard", "MRN998877"
    ds.save_as(other)
    found = patient_identifiers([both])
    assert "MRN123456" in found and "MRN998877" in found


def test_a_file_cut_before_its_patient_module_is_blanked_by_its_series(tmp_path):
    """One damaged file opened on its own (dragged into napari, given to medfuse info) gave no identifiers, so the
    error about it quoted the patient-named folder in full; the files of its series beside it carry them."""
    from medfuse.provenance import patient_identifiers

    series = phi_series(tmp_path / "Doe_Jane" / "ct", modality="CT")
    (series / "IM0001.dcm").write_bytes((series / "IM0001.dcm").read_bytes()[:200])
    assert "MRN123456" in patient_identifiers([series / "IM0001.dcm"])
    rc, text = _cli(["info", series / "IM0001.dcm"])
    assert rc == 2 and "[removed]" in text and leaks(text) == [], text


def test_files_named_after_the_patient_are_blanked_in_the_apis_warnings_errors_and_provenance(tmp_path):
    """PACS exports name files after the patient (SMITH_JOHN_IM0002.dcm): medfuse.load named them in its warnings,
    the Volume's provenance and its errors, where only the command line blanked them."""
    texts, volumes = {}, []
    beside = phi_series(tmp_path / "beside", modality="CT", prefix="Doe_Jane_MRN123456_")
    (beside / "Doe_Jane_zz.dcm").write_bytes((beside / "Doe_Jane_MRN123456_0001.dcm").read_bytes()[:300])
    texts["damaged file beside"] = _error_text(lambda: volumes.append(medfuse.load(beside)))
    resent = phi_series(tmp_path / "resent", modality="CT", z=[0, 2, 4, 6], prefix="Doe_Jane_")
    ds = pydicom.dcmread(resent / "Doe_Jane_0002.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(resent / "Doe_Jane_again.dcm")
    texts["slice re-sent under a new uid"] = _error_text(lambda: medfuse.load(resent))
    all_cut = phi_series(tmp_path / "all_cut", modality="CT", prefix="Doe_Jane_MRN123456_")
    for f in all_cut.iterdir():  # no header left to blank the names by
        f.write_bytes(f.read_bytes()[:300])
    texts["every file damaged"] = _error_text(lambda: medfuse.load(all_cut))
    assert "[removed]_zz.dcm" in texts["damaged file beside"]  # the file is still named, its identifiers blanked
    assert "GeometryError" in texts["slice re-sent under a new uid"] and "[removed]" in texts[
        "slice re-sent under a new uid"]
    assert {k: leaks(t) for k, t in texts.items() if leaks(t)} == {}
    assert volumes and leaks(json.dumps(volumes[0].provenance["warnings"])) == []


def test_header_text_with_terminal_escapes_is_shown_escaped(tmp_path, capsys):
    """A tampered export's SeriesDescription of ESC[2J ESC[31m cleared the terminal and recoloured it through
    `medfuse info`; escapes are shown as text now, on stdout and in error lines."""
    import shutil
    from pathlib import Path

    import pydicom

    from medfuse.cli import main

    src = Path(__file__).resolve().parents[1] / "sample_volumes" / "ct"
    folder = tmp_path / "ct"
    shutil.copytree(src, folder)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = "\x1b[2J\x1b[31mOWNED"
        ds.save_as(f)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J\\x1b[31mOWNED" in out
