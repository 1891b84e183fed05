"""medfuse batch: manifests, a 2-worker local Dask cluster, failures, kill + resume, reproducibility."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse import provenance as prov
from medfuse.batch import Subject, read_manifest, run_batch, write_phantom_subjects
from medfuse.errors import InvalidInputError, UnreadableFileError

pytest.importorskip("distributed")

CORRUPT = "sub-04"


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """Six 2 mm phantom subjects, the fourth one's MR file deliberately corrupt; method fixed to laplacian."""
    root = tmp_path_factory.mktemp("batch")
    manifest = write_phantom_subjects(root, 6, first_seed=1, method="laplacian")
    mr = root / CORRUPT / "mr_t1.nii.gz"
    mr.write_bytes(mr.read_bytes()[:300])  # truncated gzip: unreadable
    return manifest


def _outputs(root: Path):
    return sorted(p for p in (root / "out").glob("*.nii.gz") if not p.name.startswith("."))


@pytest.mark.slow
def test_kill_mid_run_then_resume_on_two_workers(six):
    root = six.parent
    cmd = [sys.executable, "-c", "import sys; from medfuse.cli import main; sys.exit(main(sys.argv[1:]))",
           "batch", str(six), "--workers", "2", "--no-progress"]
    # 1. start a run and kill it (SIGKILL, scheduler and workers alike) as soon as the first subject is out
    # Its own temporary folder: a SIGKILL leaves the run's stop-file folder behind, and each CI run left one in /tmp.
    (root / "tmp").mkdir(exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(root / "tmp")})
    try:
        deadline = time.time() + 240
        while not _outputs(root) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the batch finished before it could be killed: " + proc.stderr.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    first = {p: p.stat().st_mtime_ns for p in _outputs(root)}
    assert 1 <= len(first) < 5
    subjects = {s.subject: s for s in read_manifest(six)}
    # whatever was finished is complete and verified by its sidecar (atomic writes: no half-written output)
    for p in first:
        s = next(s for s in subjects.values() if Path(s.output) == p)
        assert prov.is_up_to_date(p, input_paths=[s.fixed, *s.moving])

    # 2. re-run through the CLI: completes the rest, skips the finished ones, reports the corrupt one, exit 1
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    outs = _outputs(root)
    assert len(outs) == 5 and not any(CORRUPT in p.name for p in outs)
    for p, mtime in first.items():
        assert p.stat().st_mtime_ns == mtime, f"{p.name} was redone"
    report = list(csv.DictReader(open(root / "manifest-report.csv")))
    status = {r["subject"]: r["status"] for r in report}
    assert status[CORRUPT] == "failed"
    assert sum(v == "skipped" for v in status.values()) == len(first)
    assert sum(v == "done" for v in status.values()) == 5 - len(first)
    err = next(r["error"] for r in report if r["subject"] == CORRUPT)
    assert "mr_t1.nii.gz" in err and "Fix:" in err and "Traceback" not in err
    assert "FAILED" in done.stdout and CORRUPT in done.stdout  # summary table
    assert "Traceback" not in done.stderr

    # 3. a subject's output equals running that subject alone (same thread count)
    s = subjects["sub-02"]
    alone = medfuse.fuse_files(s.fixed, s.moving, root / "alone.nii.gz", register="rigid", method="laplacian",
                               threads=1)
    assert np.array_equal(medfuse.load(s.output).array, medfuse.load(alone.output).array)
    assert json.loads(prov.sidecar_path(s.output).read_text())["parameters"] == alone.provenance["parameters"]


def test_run_batch_synchronous_isolates_failures_and_is_idempotent(tmp_path):
    manifest = write_phantom_subjects(tmp_path, 1, first_seed=7, method="mean", register=None)
    bad = Subject(subject="bad", fixed=str(tmp_path / "nope.nii.gz"), moving=[str(tmp_path / "nope2.nii.gz")],
                  output=str(tmp_path / "out" / "bad.nii.gz"), method="mean")
    subjects = read_manifest(manifest) + [bad]
    s1 = run_batch(subjects, scheduler="synchronous", report=tmp_path / "r.json")
    assert [r.status for r in s1.results] == ["done", "failed"]
    assert "nope.nii.gz" in s1.results[1].error
    assert json.loads((tmp_path / "r.json").read_text())[1]["status"] == "failed"
    out = Path(subjects[0].output)
    mtime = out.stat().st_mtime_ns
    s2 = run_batch(subjects, scheduler="synchronous", report=tmp_path / "r.json")
    assert [r.status for r in s2.results] == ["skipped", "failed"] and out.stat().st_mtime_ns == mtime
    s3 = run_batch(subjects[:1], scheduler="synchronous", method="max", report=tmp_path / "r.csv")
    assert s3.results[0].status == "skipped"  # the row's own method (mean) wins over the default
    # different parameters: medfuse's own output, verified by its sidecar, is stale and redone
    subjects[0].method = "max"
    s4 = run_batch(subjects[:1], scheduler="synchronous", report=tmp_path / "r.csv")
    assert s4.results[0].status == "done" and "parameters changed (fuse)" in s4.results[0].note
    assert json.loads(prov.sidecar_path(out).read_text())["parameters"]["fuse"]["method"] == "max"
    assert "1 done" in s4.table() and "(redone: parameters changed (fuse))" in s4.table()
    # an output no sidecar verifies (edited, or someone's own file) is redone only with overwrite
    out.write_bytes(b"my own file")
    s5 = run_batch(subjects[:1], scheduler="synchronous", report=tmp_path / "r.csv")
    assert s5.results[0].status == "failed" and "--overwrite" in s5.results[0].error
    assert out.read_bytes() == b"my own file"
    s6 = run_batch(subjects[:1], scheduler="synchronous", overwrite=True, report=tmp_path / "r.csv")
    assert s6.results[0].status == "done"


def test_manifest_csv_and_yaml(tmp_path):
    (tmp_path / "m.csv").write_text(
        "subject,fixed,moving,output,register\n"
        "a,a/mr.nii.gz,a/pet;a/spect.nii.gz,out/a.nii.gz,rigid\n"
        "b,/abs/mr.nii.gz,b/pet,out/b.nii.gz,\n")
    a, b = read_manifest(tmp_path / "m.csv")
    assert a.moving == [str(tmp_path / "a/pet"), str(tmp_path / "a/spect.nii.gz")] and a.register == "rigid"
    assert b.fixed == "/abs/mr.nii.gz" and b.register is None
    (tmp_path / "m.yaml").write_text(
        "defaults: {register: affine, method: mean}\n"
        "subjects:\n"
        "  - {subject: a, fixed: a/mr.nii.gz, moving: [a/pet, a/spect.nii.gz], output: out/a.nii.gz}\n"
        "  - {subject: b, fixed: b/mr.nii.gz, moving: b/pet, output: out/b.nii.gz, register: none}\n")
    a, b = read_manifest(tmp_path / "m.yaml")
    assert len(a.moving) == 2 and a.register == "affine" and a.method == "mean" and b.register == "none"
    (tmp_path / "dup.csv").write_text("subject,fixed,moving,output\na,x,y,o.nii.gz\nb,x,y,o.nii.gz\n")
    with pytest.raises(InvalidInputError, match="appears twice"):
        read_manifest(tmp_path / "dup.csv")
    (tmp_path / "bad.csv").write_text("name,fixed,moving\na,x,y\n")
    with pytest.raises(InvalidInputError, match="subject, output"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "row.csv").write_text("subject,fixed,moving,output\na,x,,o.nii.gz\nb,,y,p.nii.gz\n,x,y,q.nii.gz\n")
    with pytest.raises(InvalidInputError, match="row 4"):  # a row without a subject is no subject at all
        read_manifest(tmp_path / "row.csv")
    (tmp_path / "bad.yaml").write_text("subjects: [a, b\n")
    with pytest.raises(UnreadableFileError, match="YAML"):
        read_manifest(tmp_path / "bad.yaml")
    with pytest.raises(UnreadableFileError):
        read_manifest(tmp_path / "missing.csv")


def test_existing_scheduler_address(tmp_path):
    """--scheduler tcp://... uses a running cluster (here a one-process local one) and leaves it running."""
    from dask.distributed import LocalCluster

    manifest = write_phantom_subjects(tmp_path, 1, first_seed=8, method="mean", register=None)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        summary = run_batch(manifest, scheduler=cluster.scheduler_address)
        assert [r.status for r in summary.results] == ["done"] and summary.workers == 1
        assert len(cluster.scheduler_info["workers"]) == 1  # still up: not ours to close
    with pytest.raises(InvalidInputError, match="unknown scheduler"):
        run_batch(manifest, scheduler="bogus")


def test_outputs_made_with_other_weights_are_not_skipped(tmp_path, monkeypatch):
    """A re-run after the weights changed must not report the old network output as up to date."""
    pytest.importorskip("torch")
    import medfuse.pipeline as pl

    subjects = read_manifest(write_phantom_subjects(tmp_path, 1, first_seed=3, method="network", register=None))
    report = tmp_path / "r.csv"
    assert run_batch(subjects, scheduler="synchronous", report=report).results[0].status == "done"
    assert run_batch(subjects, scheduler="synchronous", report=report).results[0].status == "skipped"
    monkeypatch.setattr(pl, "_weights_sha256", lambda *a: "0" * 64)  # as after a retrain
    again = run_batch(subjects, scheduler="synchronous", report=report).results[0]
    assert again.status == "done" and again.note == "redone: network weights changed"


def test_batch_errors_do_not_quote_patient_identifiers(tmp_path):
    """A missing input next to a DICOM folder named after the patient: the error names neither."""
    pydicom = pytest.importorskip("pydicom")
    src = tmp_path / "DOE_JOHN_PID778899" / "pet"
    shutil.copytree(Path(medfuse.__file__).resolve().parents[1] / "sample_volumes" / "pet", src)
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = "DOE^JOHN", "PID778899"
        ds.save_as(f)
    gone = tmp_path / "DOE_JOHN_PID778899" / "mr_missing.nii.gz"
    bad = Subject(subject="s1", fixed=str(src), moving=[str(gone)], output=str(tmp_path / "out" / "s1.nii.gz"),
                  method="mean")
    res = run_batch([bad], scheduler="synchronous", report=tmp_path / "r.csv").results[0]
    assert res.status == "failed" and "mr_missing" in res.error
    for ident in ("DOE", "JOHN", "PID778899"):
        assert ident not in res.error and ident not in (tmp_path / "r.csv").read_text()


def test_list_report_defaults_to_the_outputs_folder_never_the_cwd(tmp_path, monkeypatch):
    """run_batch(list) without report= writes beside the outputs, not into the working folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data = tmp_path / "data"
    good = read_manifest(write_phantom_subjects(data, 1, first_seed=5, method="mean", register=None))[0]
    (data / "manifest.csv").unlink()  # only the list is used; keep the folder to what the run writes
    bad = Subject(subject="bad", fixed=str(data / "nope.nii.gz"), moving=[str(data / "nope2.nii.gz")],
                  output=str(data / "other" / "bad.nii.gz"), method="mean")
    summary = run_batch([good, bad], scheduler="synchronous")
    assert [r.status for r in summary.results] == ["done", "failed"]
    # the common parent of data/out/ and data/other/
    assert summary.report_path == data / "batch-report.csv"
    rows = list(csv.DictReader(open(data / "batch-report.csv")))
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert list(cwd.iterdir()) == []

    # outputs with no common folder but the filesystem root: refused before any work, nothing written
    elsewhere = Subject(subject="far", fixed=good.fixed, moving=good.moving, output="/medfuse-no-such-root/far.nii.gz",
                        method="mean")
    fresh = Subject(subject="new", fixed=good.fixed, moving=good.moving, output=str(data / "new" / "new.nii.gz"),
                    method="mean")
    with pytest.raises(InvalidInputError, match="share no folder") as e:
        run_batch([fresh, elsewhere], scheduler="synchronous")
    assert "report=" in str(e.value.fix)
    assert not (data / "new").exists() and not Path("/medfuse-no-such-root").exists()
    with pytest.raises(InvalidInputError, match="report="):
        run_batch([], scheduler="synchronous")
    # an explicit report= still goes where it is told
    assert run_batch([fresh, elsewhere][:1], scheduler="synchronous", report=tmp_path / "r.json").report_path == \
        tmp_path / "r.json"
    assert list(cwd.iterdir()) == []


def test_report_path_holding_someone_elses_file_is_refused_before_work(tmp_path):
    """A re-run replaces its own report; a user's file at that path is never overwritten."""
    from medfuse.errors import OutputExistsError

    data = tmp_path / "data"
    subject = read_manifest(write_phantom_subjects(data, 1, first_seed=6, method="mean", register=None))[0]
    mine = tmp_path / "notes.csv"
    mine.write_text("patient,comment\n1,keep me\n")
    with pytest.raises(OutputExistsError, match="not a medfuse batch report") as e:
        run_batch([subject], scheduler="synchronous", report=mine)
    assert "another path" in str(e.value.fix)
    assert mine.read_text() == "patient,comment\n1,keep me\n" and not Path(subject.output).exists()
    with pytest.raises(InvalidInputError, match="is a folder"):
        run_batch([subject], scheduler="synchronous", report=tmp_path)
    # its own report, from an earlier run, is replaced (CSV and JSON)
    for name in ("r.csv", "r.json"):
        first = run_batch([subject], scheduler="synchronous", report=tmp_path / name)
        again = run_batch([subject], scheduler="synchronous", report=tmp_path / name)
        assert first.report_path == again.report_path == tmp_path / name
    assert '"status": "skipped"' in (tmp_path / "r.json").read_text()


def _die_after_marking(subject, options):
    """A subject whose worker process dies under it (as the kernel's out-of-memory killer would do)."""
    with open(options["mark"], "a") as f:
        f.write("x")
    os._exit(137)


def test_a_subject_whose_worker_dies_fails_once_and_says_what_to_do(tmp_path):
    """Dask retried a task that killed its worker on 3 more workers: a subject that runs a machine out of memory
    did so four times, each as long as the first. It now fails at its first death, with a fix."""
    import cloudpickle

    from medfuse.batch import _run_on_dask

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the spawned workers cannot import tests/
    mark = tmp_path / "attempts"
    subject = Subject(subject="big", fixed="f.nii.gz", moving=["m.nii.gz"], output=os.fspath(tmp_path / "o.nii.gz"))
    results = []
    _run_on_dask([subject], {"threads": 1, "mark": os.fspath(mark)}, "local", 1, results.append, None,
                 task=_die_after_marking)
    assert mark.read_text() == "x"
    (row,) = results
    assert row["status"] == "failed" and "died" in row["error"] and "--workers 1" in row["error"]


def test_a_manifest_path_with_spaces_around_it_names_that_file_when_it_exists(tmp_path):
    """Cells were stripped always: "pet.nii.gz " (sub-01's PET) was read as "pet.nii.gz" (sub-02's), silently."""
    from medfuse.batch import read_manifest

    (tmp_path / "pet.nii.gz ").write_bytes(b"1")
    (tmp_path / "mr.nii.gz").write_bytes(b"2")
    man = tmp_path / "m.csv"
    man.write_text('subject,fixed,moving,output\ns1,mr.nii.gz ,pet.nii.gz ,o1.nii.gz\n', encoding="utf-8")
    (sub,) = read_manifest(man)
    assert sub.moving == [str(tmp_path / "pet.nii.gz ")]  # the file with the space
    assert sub.fixed == str(tmp_path / "mr.nii.gz")  # a spreadsheet's space, no such file: stripped
    (tmp_path / "pet.nii.gz").write_bytes(b"3")  # both exist: which one was meant is not guessed
    with pytest.raises(InvalidInputError, match="row 2: .pet.nii.gz . names two files"):
        read_manifest(man)
    yaml_man = tmp_path / "m.yaml"
    yaml_man.write_text('- {subject: s1, fixed: mr.nii.gz, moving: ["pet.nii.gz "], output: o1.nii.gz}\n',
                        encoding="utf-8")
    with pytest.raises(InvalidInputError, match="names two files"):
        read_manifest(yaml_man)
