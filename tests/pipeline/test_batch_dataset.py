"""medfuse batch over a dataset folder: discovery, isolation, the report kept across runs, cancelling."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

import medfuse.batch as batch
from medfuse import provenance as prov
from medfuse.batch import Subject, SubjectResult, discover_subject, run_batch, write_phantom_subjects
from medfuse.errors import InvalidInputError, MedfuseWarning, OutputExistsError
from medfuse.progress import CancelToken

SAMPLES = Path(__file__).resolve().parents[2] / "sample_volumes"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One 2 mm phantom subject folder (MR T1 + PET NIfTI); tests copy it (making phantoms takes seconds)."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_subjects(root, 1, first_seed=11)
    return root / "sub-01"


def _subjects(phantom: Path, folder: Path, n: int, **kw) -> list:
    """``n`` copies of the phantom subject under ``folder``, as Subjects writing to ``folder/out``."""
    out = []
    for i in range(1, n + 1):
        sid = f"sub-{i:02d}"
        shutil.copytree(phantom, folder / sid)
        out.append(Subject(subject=sid, fixed=os.fspath(folder / sid / "mr_t1.nii.gz"),
                           moving=[os.fspath(folder / sid / "pet.nii.gz")],
                           output=os.fspath(folder / "out" / f"{sid}_fused.nii.gz"), **kw))
    return out


@pytest.fixture
def dataset(tmp_path, phantom):
    """Five phantom subjects as a dataset folder (one folder per subject), each a different case."""
    root = tmp_path / "study"
    _subjects(phantom, root, 5)
    (root / ".DS_Store").write_bytes(b"\0\1junk")
    (root / ".cache").mkdir()
    (root / "sub-01" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "sub-01" / "notes.txt").write_text("scanned twice\n")
    # sub-02: a second PET (attenuation-corrected and not): ambiguous
    shutil.copy(root / "sub-02" / "pet.nii.gz", root / "sub-02" / "pet_nac.nii.gz")
    # sub-03: unpaired (no PET)
    (root / "sub-03" / "pet.nii.gz").unlink()
    # sub-04: corrupt MR
    mr = root / "sub-04" / "mr_t1.nii.gz"
    mr.write_bytes(mr.read_bytes()[:300])
    # sub-05: a symlinked subject folder, nested images, upper-case endings and BIDS-like names
    real = tmp_path / "elsewhere" / "P005"
    (real / "anat").mkdir(parents=True)
    (real / "pet").mkdir()
    shutil.move(root / "sub-05" / "mr_t1.nii.gz", real / "anat" / "sub-05_T1w.NII.GZ")
    shutil.move(root / "sub-05" / "pet.nii.gz", real / "pet" / "sub-05_ses-t1_trc-FDG_PET.nii.gz")
    shutil.rmtree(root / "sub-05")
    os.symlink(real, root / "sub-05")
    return root


def test_dataset_folder_runs_each_subject_and_isolates_failures(dataset):
    summary = run_batch(dataset, scheduler="synchronous", method="mean")
    status = {r.subject: r for r in summary.results}
    assert list(status) == ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05"]  # hidden folders are no subjects
    assert status["sub-01"].status == status["sub-05"].status == "done"
    assert status["sub-05"].inputs.endswith("sub-05_T1w.NII.GZ;" + os.fspath(dataset / "sub-05" / "pet" /
                                                                               "sub-05_ses-t1_trc-FDG_PET.nii.gz"))
    two = status["sub-02"]
    assert two.status == "failed" and "2 PET candidates (pet.nii.gz, pet_nac.nii.gz)" in two.error
    assert "manifest" in two.error and "Fix:" in two.error
    assert status["sub-03"].status == "failed"
    assert "unpaired: no PET or SPECT found (found: MR mr_t1.nii.gz)" in status["sub-03"].error
    assert status["sub-04"].status == "failed" and "mr_t1.nii.gz" in status["sub-04"].error
    assert "Traceback" not in status["sub-04"].error
    assert summary.n_failed == 3  # what makes the command's exit status 1
    out = dataset / "derivatives" / "medfuse"
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["sub-01_fused.nii.gz", "sub-05_fused.nii.gz"]
    rows = list(csv.DictReader(open(out / "batch-report.csv")))
    assert [r["status"] for r in rows] == ["done", "failed", "failed", "failed", "done"]
    # a re-run does not take the outputs' folder for a subject, and skips what is finished
    again = run_batch(dataset, scheduler="synchronous", method="mean")
    assert [r.status for r in again.results] == ["skipped", "failed", "failed", "failed", "skipped"]


def _discover_msg(folder: Path) -> str:
    with pytest.raises(InvalidInputError) as e:
        discover_subject(folder)
    return e.value.one_line()


def test_discover_subject_dicom_series_nested_and_mixed(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    sub = tmp_path / "P001"
    shutil.copytree(SAMPLES / "pet", sub / "visit1" / "PET_AC")
    shutil.copy(SAMPLES / "mr_t1.nii.gz", sub / "T1.nii.gz")
    (sub / "visit1" / "PET_AC" / ".DS_Store").write_bytes(b"\0junk")
    (sub / "visit1" / "PET_AC" / "DICOMDIR.txt").write_text("index\n")
    fixed, moving = discover_subject(sub)
    assert fixed == os.fspath(sub / "T1.nii.gz") and moving == [os.fspath(sub / "visit1" / "PET_AC")]
    # a second PET series in its own folder: ambiguous, both named
    shutil.copytree(SAMPLES / "pet", sub / "visit2" / "PET_NAC")
    uid = pydicom.uid.generate_uid()
    for f in sorted((sub / "visit2" / "PET_NAC").iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.save_as(f)
    msg = _discover_msg(sub)
    assert "2 PET candidates (visit1/PET_AC, visit2/PET_NAC)" in msg
    shutil.rmtree(sub / "visit2")
    # the CT of a PET/CT exported into the PET's folder: one folder, two series
    for f in sorted((SAMPLES / "ct").iterdir()):
        shutil.copy(f, sub / "visit1" / "PET_AC" / ("ct_" + f.name))
    msg = _discover_msg(sub)
    assert "visit1/PET_AC holds 2 DICOM series" in msg and "folder of its own" in msg
    # a name that tells no modality, when pairing needs it
    lone = tmp_path / "P002"
    lone.mkdir()
    shutil.copy(SAMPLES / "mr_t1.nii.gz", lone / "scan1.nii.gz")
    assert "unknown modality scan1.nii.gz" in _discover_msg(lone)


def test_unpaired_manifest_row_fails_alone(tmp_path, phantom):
    _subjects(phantom, tmp_path, 1)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject,fixed,moving,output,method\n"
                        "sub-01,sub-01/mr_t1.nii.gz,sub-01/pet.nii.gz,out/sub-01.nii.gz,mean\n"
                        "lonely,sub-01/mr_t1.nii.gz,,out/lonely.nii.gz,mean\n")
    summary = run_batch(manifest, scheduler="synchronous")
    assert [r.status for r in summary.results] == ["done", "failed"]
    assert "row 3: unpaired: 'moving' is empty" in summary.results[1].error


def test_report_keeps_other_subjects_rows_and_skipped_rows_keep_their_facts(tmp_path, phantom):
    subjects = _subjects(phantom, tmp_path, 2, method="mean")
    report = tmp_path / "r.csv"
    first = run_batch(subjects, scheduler="synchronous", report=report)
    assert [r.status for r in first.results] == ["done", "done"]
    run_batch(subjects[:1], scheduler="synchronous", report=report)  # a run over one subject only
    with open(report) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [f.name for f in batch.fields(SubjectResult)]  # stable column order
    assert [(r["subject"], r["status"]) for r in rows] == [("sub-01", "skipped"), ("sub-02", "done")]
    rec = json.loads(prov.sidecar_path(subjects[0].output).read_text())
    skipped = rows[0]
    assert skipped["method_used"] == "mean" and skipped["finished_utc"] == rec["created_utc"]
    assert skipped["medfuse_version"] == rec["versions"]["medfuse"]
    assert rows[1]["seconds"] == str(first.results[1].seconds)  # the earlier row, as it was


def test_report_is_written_after_every_subject(tmp_path, monkeypatch, phantom):
    """A driver killed overnight leaves a report of what finished (the rest 'pending')."""
    subjects = _subjects(phantom, tmp_path, 2, method="mean")
    report = tmp_path / "r.json"
    seen = []
    real = batch.run_subject

    def spy(s, options, cancel=None):
        if s.subject == "sub-02":
            seen.append(json.loads(report.read_text()))
        return real(s, options, cancel=cancel)

    monkeypatch.setattr(batch, "run_subject", spy)
    run_batch(subjects, scheduler="synchronous", report=report)
    assert [(r["subject"], r["status"]) for r in seen[0]] == [("sub-01", "done"), ("sub-02", "pending")]


def test_oversubscription_is_warned():
    with pytest.warns(MedfuseWarning, match="exceed this machine's"):
        batch._warn_oversubscribed("local", 64, 2)


@pytest.mark.slow
def test_cancel_is_answered_without_waiting_for_a_subject(tmp_path, phantom):
    """Ctrl-C (the token) stops a Dask run at once: nothing more is started, all reported cancelled."""
    pytest.importorskip("distributed")
    subjects = _subjects(phantom, tmp_path, 2, method="mean", register="rigid")
    token = CancelToken()
    token.cancel()
    summary = run_batch(subjects, workers=1, report=tmp_path / "r.csv", cancel=token)
    assert summary.cancelled
    # a subject a worker had already begun may still be finished while the cluster goes down: then it is
    # complete, verified, and reported as such; the others were not run
    for s, r in zip(subjects, summary.results):
        if Path(s.output).exists():
            assert prov.is_up_to_date(s.output, input_paths=[s.fixed, *s.moving])
            assert (r.status, r.note) == ("done", "finished while cancelling")
        else:
            assert r.status == "cancelled"


def test_a_subject_finished_while_cancelling_is_reported_done(tmp_path, phantom, monkeypatch):
    """Workers may finish a running subject as the cluster goes down; its result never comes back."""
    subjects = _subjects(phantom, tmp_path, 2, method="mean")

    def lost_result(subs, options, scheduler, workers, finished, cancel):
        batch.run_subject(subs[0], {**options, "cap_process_threads": False})  # written, never reported
        return 1, True

    monkeypatch.setattr(batch, "_run_on_dask", lost_result)
    summary = run_batch(subjects, workers=1, report=tmp_path / "r.csv")
    assert [(r.status, r.note) for r in summary.results] == [("done", "finished while cancelling"),
                                                             ("cancelled", None)]
    assert summary.results[0].method_used == "mean"


def test_write_manifest_lists_what_discovery_found_to_edit(dataset):
    from medfuse.batch import read_manifest, write_manifest

    path = write_manifest(dataset)
    assert path == dataset / "derivatives" / "medfuse" / "manifest.csv"
    rows = {s.subject: s for s in read_manifest(path)}
    assert list(rows) == ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05"]
    assert rows["sub-01"].fixed == os.fspath(dataset / "sub-01" / "mr_t1.nii.gz") and not rows["sub-01"].problem
    assert rows["sub-02"].problem and rows["sub-02"].fixed == ""  # ambiguous: left for the user to fill
    with pytest.raises(OutputExistsError, match="exists"):
        write_manifest(dataset)  # never replaces a file (an edited manifest)


def test_an_earlier_runs_outputs_are_neither_subjects_nor_inputs(tmp_path, phantom):
    """The README's order (a manifest run writing into DATASET/out, then the dataset folder itself): the out/
    folder of fused images became a failed subject "unpaired", and a fused image left in a subject's folder
    counted as a candidate input. Images with a medfuse sidecar are outputs, never inputs."""
    root = tmp_path / "study"
    subjects = _subjects(phantom, root, 2)
    first = run_batch(subjects, scheduler="synchronous", method="max", report=root / "manifest-report.csv")
    assert first.n_done == 2 and (root / "out" / "sub-01_fused.nii.gz").is_file()
    shutil.copy(root / "out" / "sub-01_fused.nii.gz", root / "sub-01" / "pet_fused.nii.gz")  # named like a PET
    shutil.copy(root / "out" / "sub-01_fused.json", root / "sub-01" / "pet_fused.json")
    assert batch.discover_subject(root / "sub-01")[1] == [os.fspath(root / "sub-01" / "pet.nii.gz")]
    again = run_batch(root, scheduler="synchronous", method="max")
    assert sorted(r.subject for r in again.results) == ["sub-01", "sub-02"] and again.n_done == 2
    # Without its sidecar a file is the user's own: a candidate like any other (here: a second PET, ambiguous).
    (root / "sub-01" / "pet_fused.json").unlink()
    with pytest.raises(InvalidInputError, match="PET"):
        batch.discover_subject(root / "sub-01")


def test_subject_with_ct_and_pet_side_by_side_in_one_folder_runs(tmp_path):
    """A PACS export leaves a PET/CT's series in one folder. Batch refused the subject ("put each series in a
    folder of its own"); it now picks each series by its modality, and the written manifest says so."""
    import numpy as np

    import medfuse
    from medfuse.pipeline import fuse_files

    root = tmp_path / "study"
    for kind in ("ct", "pet"):
        (root / "P001" / "export").mkdir(parents=True, exist_ok=True)
        for f in sorted((SAMPLES / kind).iterdir()):
            shutil.copy(f, root / "P001" / "export" / f"{kind}_{f.name}")
    assert discover_subject(root / "P001", with_series=True)[2] == ["CT", "PT"]
    with pytest.raises(InvalidInputError, match="medfuse batch"):
        discover_subject(root / "P001")  # a bare path pair cannot say which series is meant
    summary = run_batch(root, scheduler="synchronous", method="max")
    (row,) = summary.results
    assert row.status == "done", row.error
    want = fuse_files(SAMPLES / "ct", SAMPLES / "pet", None, method="max").fused  # each series in its own folder
    np.testing.assert_array_equal(medfuse.load(row.output).array, want.array)
    manifest = batch.write_manifest(root, tmp_path / "manifest.csv")
    (entry,) = list(csv.DictReader(open(manifest)))
    assert entry["series"] == "CT;PT" and entry["fixed"] == entry["moving"] == os.fspath(root / "P001" / "export")
    # the manifest runs the same subject with the same parameters: up to date
    again = run_batch(manifest, scheduler="synchronous", method="max")
    assert [r.status for r in again.results] == ["skipped"]
    # a manifest whose series choices do not match its images is refused, naming the row
    bad = tmp_path / "bad.csv"
    bad.write_text(manifest.read_text().replace("CT;PT", "CT"))
    with pytest.raises(InvalidInputError, match="row 2: 'series' gives 1 choices for 2 images"):
        batch.read_manifest(bad)


def test_a_bids_dataset_gets_a_derivatives_description_that_bids_tools_index(tmp_path, phantom):
    """Outputs went to DATASET/derivatives/medfuse with no dataset_description.json, so pybids (the BIDS
    reference library) found "no valid derivatives" and indexed none of them."""
    try:
        import bids
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("needs pybids (the 'dev' extra); CI must have it")
        pytest.skip("needs pybids (pip install the 'dev' extra)")
    root = tmp_path / "bids"
    for sid in ("sub-01", "sub-02"):
        (root / sid / "anat").mkdir(parents=True)
        (root / sid / "pet").mkdir()
        shutil.copy(phantom / "mr_t1.nii.gz", root / sid / "anat" / f"{sid}_T1w.nii.gz")
        shutil.copy(phantom / "pet.nii.gz", root / sid / "pet" / f"{sid}_trc-FDG_pet.nii.gz")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "study", "BIDSVersion": "1.9.0"}))
    summary = run_batch(root, scheduler="synchronous", method="mean")
    assert [r.status for r in summary.results] == ["done", "done"]

    description = json.loads((root / "derivatives" / "medfuse" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"] == "1.9.0"
    layout = bids.BIDSLayout(root, derivatives=True, validate=False)
    found = layout.get(scope="derivatives", extension=".nii.gz")
    assert sorted((f.entities["subject"], f.entities["suffix"]) for f in found) == [("01", "fused"), ("02", "fused")]

    # A description of the user's own is kept; a dataset that is not BIDS gets none.
    mine = root / "derivatives" / "medfuse" / "dataset_description.json"
    mine.write_text('{"Name": "mine"}')
    run_batch(root, scheduler="synchronous", method="mean", overwrite=True)
    assert mine.read_text() == '{"Name": "mine"}'
    (root / "dataset_description.json").unlink()
    run_batch(root, scheduler="synchronous", method="mean", out_dir=tmp_path / "plain")
    assert not (tmp_path / "plain" / "dataset_description.json").exists()


def test_the_review_edit_run_route_describes_the_derivatives_too(tmp_path, phantom):
    """--write-manifest, then a run of the manifest (never of the dataset folder): the outputs landed in
    derivatives/medfuse without the description BIDS tools need to index them."""
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "sub-01" / "pet").mkdir()
    shutil.copy(phantom / "mr_t1.nii.gz", root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    shutil.copy(phantom / "pet.nii.gz", root / "sub-01" / "pet" / "sub-01_trc-FDG_pet.nii.gz")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "study", "BIDSVersion": "1.9.0"}))
    manifest = batch.write_manifest(root)
    summary = run_batch(manifest, scheduler="synchronous", method="mean")
    assert [r.status for r in summary.results] == ["done"]
    description = json.loads((root / "derivatives" / "medfuse" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"] == "1.9.0"


def test_a_subject_folder_that_may_not_be_listed_says_so(tmp_path, monkeypatch):
    """A subject folder of mode 000 was reported as 'unpaired: no MR or CT found (found: no image files or DICOM
    series)': os.walk skips what it may not list without a word. (Simulated: root may list any folder.)"""
    sub = tmp_path / "sub-01"
    (sub / "pet").mkdir(parents=True)
    shutil.copy(SAMPLES / "mr_t1.nii.gz", sub / "mr_t1.nii.gz")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == os.fspath(sub / "pet"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    msg = _discover_msg(sub)
    assert "no PET or SPECT found" in msg and "1 folder(s) that may not be read (permission denied): pet" in msg
    assert "chmod" in msg


# ----------------------------------------------------------------------------- modalities of NIfTI inputs
def _plain_nifti(path: Path, array, spacing: float) -> Path:
    """A NIfTI written by nibabel alone: no medfuse tag, no BIDS sidecar, so it loads as modality 'unknown'."""
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.diag([spacing, spacing, spacing, 1.0])), path)
    return path


@pytest.fixture
def t1_pet_dataset(tmp_path):
    """One subject folder with t1.nii and pet.nii that state no modality (a hot spot in the PET)."""
    import numpy as np

    rng = np.random.default_rng(0)
    mr = rng.normal(100, 10, (40, 44, 36))
    mr[10:30, 10:34, 8:28] += 200
    pet = rng.gamma(2.0, 1.0, (20, 22, 18))
    pet[8:11, 9:12, 7:10] += 40
    sub = tmp_path / "study" / "s1"
    sub.mkdir(parents=True)
    _plain_nifti(sub / "t1.nii", mr, 2.0)
    _plain_nifti(sub / "pet.nii", pet, 4.0)
    return tmp_path / "study"


def _voxels(path: Path):
    import nibabel as nib

    return nib.load(path).get_fdata()


def test_a_dataset_pet_nifti_is_fused_as_the_pet_its_name_says(t1_pet_dataset, tmp_path):
    """Discovery paired t1.nii and pet.nii by their names, then fused both as 'unknown' (the network's PET rule never
    ran: up to 0.548 from `medfuse fuse --modalities MR PT` on the SPM12 PET). The names now give the modalities."""
    import numpy as np

    from medfuse.pipeline import fuse_files

    sub = t1_pet_dataset / "s1"
    import medfuse

    assert medfuse.load(sub / "pet.nii").modality == "unknown"  # the file itself states none
    summary = run_batch(t1_pet_dataset, scheduler="synchronous")
    assert summary.n_done == 1, summary.table()
    out = t1_pet_dataset / "derivatives" / "medfuse" / "s1_fused.nii.gz"
    rec = json.loads(out.with_name("s1_fused.json").read_text())
    assert [i["modality"] for i in rec["inputs"]] == ["MR", "PT"]
    assert rec["parameters"]["load"]["modalities"] == ["MR", "PT"]
    # The reference: fuse_files told the modalities (as `medfuse fuse --modalities MR PT`), read back by nibabel.
    told = fuse_files(sub / "t1.nii", sub / "pet.nii", tmp_path / "told.nii.gz", modalities=["MR", "PT"], threads=1)
    fuse_files(sub / "t1.nii", sub / "pet.nii", tmp_path / "unknown.nii.gz", threads=1)
    assert told.provenance["method_used"] == "network"
    np.testing.assert_array_equal(_voxels(out), _voxels(tmp_path / "told.nii.gz"))
    assert np.abs(_voxels(out) - _voxels(tmp_path / "unknown.nii.gz")).max() > 0.1  # what batch wrote before
    # A rerun records the same parameters: skipped, not redone.
    again = run_batch(t1_pet_dataset, scheduler="synchronous")
    assert [r.status for r in again.results] == ["skipped"]


def test_a_dataset_dicom_series_keeps_its_own_modality(tmp_path):
    """The DICOM Modality wins: only a file that states none gets its name's modality."""
    pytest.importorskip("pydicom")
    import nibabel as nib

    sub = tmp_path / "study" / "P001"
    shutil.copytree(SAMPLES / "pet", sub / "nm_spect_export")  # a folder name that says otherwise: not used
    _plain_nifti(sub / "t1.nii.gz", nib.load(SAMPLES / "mr_t1.nii.gz").get_fdata()[::2, ::2, ::2], 2.0)
    assert batch._name_modalities([os.fspath(sub / "t1.nii.gz"), os.fspath(sub / "nm_spect_export")]) == ["MR", "-"]
    summary = run_batch(tmp_path / "study", scheduler="synchronous", method="max")
    assert summary.n_done == 1, summary.table()
    rec = json.loads((tmp_path / "study" / "derivatives" / "medfuse" / "P001_fused.json").read_text())
    assert [(i["modality"], i["unit"]) for i in rec["inputs"]] == [("MR", "arbitrary"), ("PT", "SUVbw")]
    assert rec["parameters"]["load"]["modalities"] == ["MR", None]
    # A file that states its own modality (medfuse's tag) keeps it too: nothing is passed for it.
    assert batch._name_modalities([os.fspath(SAMPLES / "mr_t1.nii.gz"), os.fspath(sub / "nm_spect_export")]) is None


def test_a_manifest_states_modalities_and_write_manifest_writes_them(t1_pet_dataset, tmp_path):
    """A manifest had no way to state modalities (a 'modalities' column was refused as unknown)."""
    import numpy as np

    from medfuse.batch import read_manifest, write_manifest
    from medfuse.pipeline import fuse_files

    sub = t1_pet_dataset / "s1"
    path = write_manifest(t1_pet_dataset, tmp_path / "m.csv")
    with open(path, newline="") as f:
        assert [r["modalities"] for r in csv.DictReader(f)] == ["MR PT"]
    assert read_manifest(path)[0].modalities == ["MR", "PT"]
    # Spelt as --modalities takes them, in a manifest of one's own; the output equals fuse_files told them.
    own = tmp_path / "own.csv"
    own.write_text("subject,fixed,moving,output,modalities\n"
                   f"a,{sub / 't1.nii'},{sub / 'pet.nii'},out/a.nii.gz,mr PET\n")
    assert read_manifest(own)[0].modalities == ["MR", "PT"]
    assert run_batch(own, scheduler="synchronous").n_done == 1
    fuse_files(sub / "t1.nii", sub / "pet.nii", tmp_path / "told.nii.gz", modalities=["MR", "PT"], threads=1)
    np.testing.assert_array_equal(_voxels(tmp_path / "out" / "a.nii.gz"), _voxels(tmp_path / "told.nii.gz"))
    assert json.loads((tmp_path / "out" / "a.json").read_text())["parameters"]["load"]["modalities"] == ["MR", "PT"]
    # Checked as --modalities is, before any work.
    for cell, words in (("MR", "names 1 modalities for 2 images"), ("MR XX", "unknown modality 'XX' for image 2")):
        own.write_text(f"subject,fixed,moving,output,modalities\na,t1.nii,pet.nii,out/a.nii.gz,{cell}\n")
        with pytest.raises(InvalidInputError, match=words):
            read_manifest(own)


def test_a_subject_not_run_says_when_an_earlier_output_is_left_in_place(tmp_path, phantom):
    """Cancelled before a subject ran, its row said only "not run: the batch was cancelled", while an earlier
    output (of other options) stayed in place as if it were this run's."""
    subjects = _subjects(phantom, tmp_path, 2, method="mean")
    Path(subjects[0].output).parent.mkdir(parents=True)
    shutil.copy(subjects[0].fixed, subjects[0].output)  # an earlier run's output, say
    token = CancelToken()
    token.cancel()
    summary = run_batch(subjects, scheduler="synchronous", report=tmp_path / "r.csv", cancel=token, progress=False)
    assert [(r.status, r.error) for r in summary.results] == [("cancelled", "not run: the batch was cancelled")] * 2
    assert summary.results[0].note.startswith("an earlier output is still there, not checked against this run's")
    assert summary.results[1].note is None
    assert "an earlier output is still there" in (tmp_path / "r.csv").read_text()


def test_a_batch_stopped_on_an_error_says_when_an_earlier_output_is_left_in_place(tmp_path, phantom, monkeypatch):
    """The stopped-on-error path writes its own rows: a subject not run there keeps the same note as on a cancel."""
    subjects = _subjects(phantom, tmp_path, 2, method="mean")
    Path(subjects[0].output).parent.mkdir(parents=True)
    shutil.copy(subjects[0].fixed, subjects[0].output)  # an earlier run's output, say

    def scheduler_gone(*args, **kwargs):
        raise RuntimeError("the scheduler went away")

    monkeypatch.setattr(batch, "run_subject", scheduler_gone)
    with pytest.raises(RuntimeError, match="the scheduler went away"):
        run_batch(subjects, scheduler="synchronous", report=tmp_path / "r.csv", progress=False)
    with open(tmp_path / "r.csv", newline="") as f:
        rows = {r["subject"]: r for r in csv.DictReader(f)}
    assert {s: r["error"] for s, r in rows.items()} == {
        s.subject: "not run: the batch stopped on an error (RuntimeError)" for s in subjects}
    assert rows["sub-01"]["note"].startswith("an earlier output is still there, not checked against this run's")
    assert rows["sub-02"]["note"] == ""
