"""fuse_files / Pipeline / provenance on small phantom inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse import provenance as prov
from medfuse.errors import CancelledError, InvalidInputError, OutputExistsError, WeightsError
from medfuse.pipeline import Pipeline, fuse_files
from medfuse.progress import CancelToken

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_volumes"


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """One 2 mm phantom subject (MR T1 + misaligned PET NIfTI)."""
    from medfuse.batch import read_manifest, write_phantom_subjects

    folder = tmp_path_factory.mktemp("subject")
    s = read_manifest(write_phantom_subjects(folder, 1, first_seed=5))[0]
    return s


def test_fuse_files_writes_output_and_complete_sidecar(subject, tmp_path):
    out = tmp_path / "fused.nii.gz"
    seen = []
    res = fuse_files(subject.fixed, subject.moving[0], out, register="rigid", method="mean",
                     progress=lambda f, m: seen.append(f))
    assert res.output == out and out.is_file()
    assert res.sidecar == tmp_path / "fused.json" and res.sidecar.is_file()
    fixed = medfuse.load(subject.fixed)
    fused = medfuse.load(out)
    assert fused.same_grid(fixed)  # on the fixed image's grid
    assert 0.0 <= float(fused.array.min()) and float(fused.array.max()) <= 1.0
    rec = json.loads(res.sidecar.read_text())
    assert rec["output"]["sha256"] == prov.hash_path(out)
    assert [i["sha256"] for i in rec["inputs"]] == [prov.hash_path(subject.fixed), prov.hash_path(subject.moving[0])]
    assert [i["role"] for i in rec["inputs"]] == ["fixed", "moving"]
    assert rec["versions"]["medfuse"] == medfuse.__version__ and rec["versions"]["SimpleITK"]
    assert [s["name"] for s in rec["steps"]] == ["load", "register", "resample", "normalise", "fuse", "save"]
    assert all(isinstance(s["seconds"], float) for s in rec["steps"])
    assert rec["parameters"]["register"]["kind"] == "rigid" and rec["parameters"]["fuse"]["method"] == "mean"
    reg = rec["registration"][0]
    assert reg["metric_after"] < reg["metric_before"] and not reg["suspect"]
    # the registration found the phantom's misalignment (about 10 degrees, 14 mm)
    assert reg["rotation_deg"] > 5 and reg["translation_mm"] > 8
    assert seen and max(seen) == pytest.approx(1.0) and seen == sorted(seen)
    assert prov.is_up_to_date(out, input_paths=[subject.fixed, subject.moving[0]])


def test_registration_aligns_the_moving_image(subject, tmp_path):
    """Fused with registration, the PET lesion sits where the MR's lesion is; without, it does not."""
    from medfuse.phantom import make_phantom

    ph = make_phantom(seed=5)
    c = ph.lesion_center
    aligned = fuse_files(subject.fixed, subject.moving, None, register="rigid", method="max")
    raw = fuse_files(subject.fixed, subject.moving, None, register=None, method="max")
    ijk = tuple(np.rint(aligned.fused.world_to_index(c)).astype(int))
    assert aligned.fused.array[ijk] > raw.fused.array[ijk] + 0.1
    assert aligned.output is None and aligned.sidecar is None and aligned.provenance["output"] is None


def test_steps_are_replaceable_and_recorded(subject, tmp_path):
    calls = []

    def invert(state):
        calls.append(len(state.volumes))
        state.volumes = [v.with_array(1.0 - v.array) for v in state.volumes]
        return state

    invert.params = {"what": "1 - x"}
    pipe = Pipeline(register=None, method="mean").replace("normalise", invert)
    res = pipe.run([subject.fixed, subject.moving[0]], tmp_path / "inv.nii.gz")
    assert calls == [2]
    rec = json.loads(res.sidecar.read_text())
    assert rec["parameters"]["normalise"] == {"what": "1 - x"}
    assert dict(Pipeline().steps)["normalise"] is not invert  # replace() returned a copy
    with pytest.raises(InvalidInputError, match="unknown pipeline step"):
        Pipeline().replace("denoise", invert)
    # a plain function without params is recorded by name
    res2 = Pipeline(method="mean", steps={"normalise": lambda s: s}).run([subject.fixed, subject.moving[0]])
    assert "callable" in res2.provenance["parameters"]["normalise"]


def test_refuses_existing_output_and_inputs_before_working(subject, tmp_path):
    out = tmp_path / "exists.nii.gz"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        fuse_files(subject.fixed, subject.moving[0], out, method="mean")
    assert out.read_bytes() == b"keep me"
    with pytest.raises(OutputExistsError):
        fuse_files(subject.fixed, subject.moving[0], subject.fixed, method="mean", overwrite=True)
    with pytest.raises(InvalidInputError):
        fuse_files(subject.fixed, [], None, method="mean")


def test_cancel_stops_the_pipeline(subject, tmp_path):
    token = CancelToken()

    def cancel_on_register(f, msg):
        if msg.startswith("register"):
            token.cancel()

    with pytest.raises(CancelledError):
        fuse_files(subject.fixed, subject.moving[0], tmp_path / "c.nii.gz", register="rigid", method="mean",
                   progress=cancel_on_register, cancel=token)
    assert not (tmp_path / "c.nii.gz").exists()
    assert not any(p.name.startswith(".medfuse-tmp-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("spelt", ["network", "Network"])
def test_network_fallback_is_recorded(subject, tmp_path, network_fails, spelt):
    """Any spelling that runs the network falls back, and is recorded as the network (not as typed)."""
    network_fails(WeightsError("the fusion network's weights file is missing", fix="train it"))
    with pytest.raises(WeightsError):
        fuse_files(subject.fixed, subject.moving[0], None, method="network")
    with pytest.warns(medfuse.MedfuseWarning, match="fell back"):
        res = fuse_files(subject.fixed, subject.moving[0], tmp_path / "fb.nii.gz", method=spelt, fallback="Mean")
    rec = json.loads(res.sidecar.read_text())
    assert rec["method_used"] == "mean"
    assert rec["fallback"]["requested"] == "network" and "weights" in rec["fallback"]["reason"]
    assert rec["weights_sha256"] is None


@pytest.mark.parametrize("stray", [None, ".DS_Store", "0_notes.txt"])
def test_sidecar_never_holds_patient_identifiers(tmp_path, stray):
    """A DICOM input whose header (and folder name) carries the patient's name and ID, with or without a stray
    non-DICOM file that sorts before the slices."""
    pydicom = pytest.importorskip("pydicom")
    src = tmp_path / "Doe_Jane_PID778899"
    shutil.copytree(SAMPLES / "pet", src)
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "PID778899"
        ds.PatientBirthDate = "19610203"
        ds.save_as(f)
    if stray:
        (src / stray).write_bytes(b"\x00\x00\x00\x01Bud1 not a dicom file")
    out = tmp_path / "fused.nii.gz"
    res = fuse_files(SAMPLES / "mr_t1.nii.gz", src, out, method="mean")
    text = res.sidecar.read_text()
    for ident in ("Doe", "Jane", "PID778899", "19610203"):
        assert ident.lower() not in text.lower(), ident
    rec = json.loads(text)
    assert rec["inputs"][1]["sha256"] == prov.hash_path(src)  # still traceable by hash
    assert "[removed]" in rec["inputs"][1]["path"]


def test_a_file_at_the_sidecar_path_is_never_replaced_silently(tmp_path):
    """``fused.json`` may be the user's own file: refused before any work; a stale medfuse sidecar whose
    output is gone is replaced."""
    out = tmp_path / "fused.nii.gz"
    mine = tmp_path / "fused.json"
    mine.write_text('{"my": "notes"}')
    with pytest.raises(medfuse.OutputExistsError, match="sidecar") as ei:
        fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", out, method="mean")
    assert "fused.json" in str(ei.value) and "--overwrite" in str(ei.value)
    assert mine.read_text() == '{"my": "notes"}' and not out.exists()
    res = fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", out, method="mean", overwrite=True)
    assert json.loads(res.sidecar.read_text())["method_used"] == "mean"
    out.unlink()  # a stale sidecar of ours: redone without asking
    again = fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", out, method="mean")
    assert out.exists() and prov.is_up_to_date(out, input_paths=[SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz"],
                                              expect={"method_used": "mean"})
    assert not prov.is_up_to_date(out, input_paths=[SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz"],
                                  expect={"method_used": "network"})
    assert again.sidecar == mine


def test_sidecar_path_and_hashing(tmp_path):
    assert prov.sidecar_path("a/b/fused.nii.gz") == Path("a/b/fused.json")
    assert prov.sidecar_path("a/fused.mha") == Path("a/fused.json")
    assert prov.sidecar_path("a/dicom_out") == Path("a/dicom_out.json")
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_bytes(b"1")
    h1 = prov.hash_path(d)
    (d / "x").write_bytes(b"2")
    assert prov.hash_path(d) != h1
    with pytest.raises(medfuse.UnreadableFileError):
        prov.hash_path(tmp_path / "missing")


def test_in_memory_inputs_monai_tensors_and_the_modality_override(subject, tmp_path):
    """A MONAI MetaTensor is an input like a Volume; ``modalities`` applies to in-memory inputs as to files."""
    pytest.importorskip("monai")
    fixed, moving = medfuse.load(subject.fixed), medfuse.load(subject.moving[0])
    bare = [v.with_array(v.array, modality="unknown") for v in (fixed, moving)]
    res = fuse_files(bare[0].to_metatensor(), bare[1], tmp_path / "f.nii.gz", method="mean",
                     modalities=[fixed.modality, moving.modality])
    assert res.fused.same_grid(fixed) and res.output.is_file()
    assert [f["modality"] for f in res.provenance["inputs"]] == [fixed.modality, moving.modality]
    assert [f["path"] for f in res.provenance["inputs"]] == [None, None]
    # None keeps an input's own modality
    res = fuse_files(fixed, moving, None, method="mean", modalities=[None, "NM"])
    assert [f["modality"] for f in res.provenance["inputs"]] == [fixed.modality, "NM"]
    with pytest.raises(InvalidInputError, match="input 2 is an ndarray"):
        fuse_files(fixed, moving.array, None, method="mean")


def test_itk_thread_setting_is_restored_when_threads_overlap():
    """Two registrations in threads (MONAI's CacheDataset workers) that enter A, B and leave A, B must leave
    SimpleITK's process-wide thread count as the user had it."""
    import threading

    import SimpleITK as sitk

    from medfuse.pipeline import _itk_threads

    user = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(3)  # not 1, whatever this machine's default
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with _itk_threads(1):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with _itk_threads(1):
            b_in.set()
            a_out.wait(5)

    workers = [threading.Thread(target=f) for f in (first, second)]
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.join()
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 3
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(user)


def test_a_nifti_pet_is_not_warned_about_an_suv_no_one_asked_for(tmp_path):
    """batch and fuse printed "suv='bw' was not applied" for every NIfTI PET: the load step's own default, not a
    choice of the user's. A load step that is asked for SUV by name still says so."""
    import warnings

    import nibabel as nib

    from medfuse.errors import MedfuseWarning
    from medfuse.pipeline import LoadStep, Pipeline, PipelineState

    rng = np.random.default_rng(0)
    paths = []
    for name in ("t1", "pet"):
        p = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((12, 12, 12)).astype(np.float32), np.eye(4)), str(p))
        paths.append(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = Pipeline(modalities=["MR", "PT"], method="mean").run(paths, tmp_path / "out.nii.gz")
    assert res.output.exists()
    assert not [w for w in caught if "was not applied" in str(w.message)], [str(w.message) for w in caught]
    with pytest.warns(MedfuseWarning, match="suv='bw' was not applied"):
        LoadStep(modalities=["MR", "PT"], suv="bw")(PipelineState(inputs=list(paths)))
