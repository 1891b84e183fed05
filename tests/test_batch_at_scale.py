"""Batch runs of many subjects: the report's cost per subject, cancelling between results, the summary's counts
and the header-only modality check of --write-manifest (fast, no fusion run)."""

import csv
import io
import json
import os
import time
import warnings
from dataclasses import asdict

import nibabel as nib
import numpy as np
import pytest

import medfuse
from medfuse import batch
from medfuse.batch import BatchSummary, Subject, SubjectResult, run_batch
from medfuse.progress import CancelToken


def _unpaired(tmp_path, n):
    """``n`` subjects that fail at once (an unpaired row: no image is read)."""
    return [Subject(subject=f"s{i:03d}", fixed=str(tmp_path / f"s{i:03d}_mr.nii.gz"), moving=[],
                    output=str(tmp_path / "out" / f"s{i:03d}_fused.nii.gz"), problem="unpaired: no moving image")
            for i in range(n)]


def _tricky_rows():
    return [SubjectResult(subject="a,b", status="failed", seconds=0.125, output="/d/o/a.nii.gz",
                          error='say "x", then\nnewline; é', registration_suspect=True, worker="pid 7",
                          inputs="/d/a.nii.gz;/d/b.nii.gz", finished_utc="2026-12-07T09:39:52Z",
                          medfuse_version="0.1.0", note=None, warnings="w1; w2"),
            SubjectResult(subject="plain", status="pending", output="out/p.nii.gz")]


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_the_report_text_is_what_the_standard_writers_make(tmp_path, suffix):
    """Rows rendered one at a time (and cached) make byte for byte the report csv.DictWriter / json.dumps wrote
    from every row at once, earlier rows kept after this run's."""
    rows = _tricky_rows()
    earlier = [{"subject": "old", "status": "done", "seconds": "1.5", "extra": "dropped"},
               {"subject": "plain", "status": "done"}]  # this run's subject: its earlier row is not kept
    path = tmp_path / f"r{suffix}"
    batch._write_report(path, rows, earlier)
    kept = [asdict(r) for r in rows] + [{c: earlier[0].get(c) for c in batch._COLUMNS}]
    if suffix == ".json":  # where the CSV holds "a;b", the JSON holds a list
        kept = [{c: v.split(";") if c in batch._LIST_COLUMNS and isinstance(v, str) else v for c, v in k.items()}
                for k in kept]
        expected = json.dumps(kept, indent=2) + "\n"
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=batch._COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(kept)
        expected = buf.getvalue()
    assert path.read_bytes() == expected.encode("utf-8")
    batch._write_report(path, [], [])
    assert path.read_text() == ("[]\n" if suffix == ".json" else ",".join(batch._COLUMNS) + "\n")


def test_a_row_seen_before_is_not_rendered_again(tmp_path, monkeypatch):
    made = []
    real = batch._row_text
    monkeypatch.setattr(batch, "_row_text", lambda row, js: made.append(row) or real(row, js))
    rows, texts = _tricky_rows(), {}
    earlier = [{"subject": "old", "status": "done"}]
    for _ in range(3):
        batch._write_report(tmp_path / "r.csv", rows, earlier, texts)
    assert len(made) == 3  # each row once, however often the report is written
    rows[1] = SubjectResult(subject="plain", status="done", output="out/p.nii.gz")
    batch._write_report(tmp_path / "r.csv", rows, earlier, texts)
    assert made[3:] == [rows[1]]  # only the row that changed
    assert [r["status"] for r in csv.DictReader(open(tmp_path / "r.csv"))] == ["failed", "done", "done"]


def test_a_run_renders_each_row_a_bounded_number_of_times(tmp_path, monkeypatch):
    """The report was rewritten after every subject with every row rendered again (asdict, the CSV writer, path
    normalisation): 3,000 subjects that fail at once spent 15 min on it. Even where a rewrite is due after every
    subject, each subject's row is now made once as pending and once as finished."""
    n = 40
    counts = {"text": 0, "shown": 0, "writes": 0}
    text, shown, write = batch._row_text, batch._shown, batch._write_report

    def count(key, real):
        def wrapper(*a, **k):
            counts[key] += 1
            return real(*a, **k)
        return wrapper

    monkeypatch.setattr(batch, "_row_text", count("text", text))
    monkeypatch.setattr(batch, "_shown", count("shown", shown))
    monkeypatch.setattr(batch, "_write_report", count("writes", write))
    monkeypatch.setattr(batch, "_report_due", lambda since, cost, every: True)  # a rewrite after every subject
    summary = run_batch(_unpaired(tmp_path, n), scheduler="synchronous", report=tmp_path / "r.csv")
    assert summary.n_failed == n and counts["writes"] == n + 2  # the first, one per subject, the last
    assert counts["text"] <= 3 * n and counts["shown"] <= 3 * n + n  # was about n * n each
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["status"] for r in rows] == ["failed"] * n


def test_the_report_written_at_the_end_has_every_row_when_no_rewrite_was_due(tmp_path, monkeypatch):
    seen = []
    real = batch._write_report
    monkeypatch.setattr(batch, "_write_report", lambda path, results, *a: seen.append(
        [r.status for r in results]) or real(path, results, *a))
    monkeypatch.setattr(batch, "_report_due", lambda since, cost, every: False)
    run_batch(_unpaired(tmp_path, 5), scheduler="synchronous", report=tmp_path / "r.json")
    assert seen == [["pending"] * 5, ["failed"] * 5]  # before any work, and at the end
    assert [r["status"] for r in json.loads((tmp_path / "r.json").read_text())] == ["failed"] * 5


def test_a_rewrite_is_due_every_few_seconds_and_never_takes_over_a_twentieth_of_the_time():
    due = batch._report_due
    assert not due(1.0, 0.001, batch._REPORT_EVERY) and due(batch._REPORT_EVERY, 0.001, batch._REPORT_EVERY)
    assert not due(3.0, 0.2, batch._REPORT_EVERY) and due(4.0, 0.2, batch._REPORT_EVERY)
    assert due(0.05, 0.001, 0.0) and not due(0.01, 0.001, 0.0)  # synchronous: between subjects


def test_resume_needs_no_report_row_a_killed_run_left_pending(tmp_path):
    """The report is rewritten every few seconds, so a killed run's last subjects may still read 'pending': the
    rerun finds their outputs by their sidecars and skips them, as it does for every complete output."""
    rng = np.random.default_rng(3)
    subjects = []
    for sid in ("sub-01", "sub-02"):
        (tmp_path / sid).mkdir()
        mr, pet = (medfuse.save(medfuse.Volume(rng.random((12, 12, 12)).astype(np.float32), np.eye(4), modality=m),
                                tmp_path / sid / f"{m.lower()}.nii.gz") for m in ("MR", "PT"))
        subjects.append(Subject(subject=sid, fixed=os.fspath(mr), moving=[os.fspath(pet)],
                                output=os.fspath(tmp_path / "out" / f"{sid}_fused.nii.gz"), method="mean"))
    report = tmp_path / "r.csv"
    assert [r.status for r in run_batch(subjects, scheduler="synchronous", report=report).results] == ["done"] * 2
    batch._write_report(report, [SubjectResult(subject=s.subject, status="pending", output=s.output)
                                 for s in subjects])  # as a run killed before its next rewrite leaves it
    again = run_batch(subjects, scheduler="synchronous", report=report)
    assert [r.status for r in again.results] == ["skipped"] * 2
    assert [r["status"] for r in csv.DictReader(open(report))] == ["skipped"] * 2


# ----------------------------------------------------------------------------- Dask loop (fake cluster)
class _Future:
    def __init__(self, i, status, result=None, error=None):
        self.i, self.status, self._result, self._error = i, status, result, error

    def done(self):
        return self.status != "pending"

    def result(self):
        if self._error is not None:
            raise self._error
        return self._result


class _Client:
    def __init__(self, plan):
        self.plan, self.cancelled, self.closed = plan, [], False

    def scheduler_info(self):
        return {"workers": {"w1": {}}}

    def submit(self, task, subject, options, key, pure):
        self.stop_file = options["stop_file"]
        return self.plan.pop(0)

    def cancel(self, futs):
        self.cancelled.extend(futs)

    def close(self):
        self.closed = True


class _AsCompleted:
    """Every ended future in one batch, after one wait with nothing ready."""

    def __init__(self, futs, with_results, raise_errors):
        assert with_results and not raise_errors  # future.result() would wait for Dask's event loop
        self.futs, self.waited, self.given = futs, False, False

    def is_empty(self):
        return self.given

    def has_ready(self):
        if not self.waited:
            self.waited = True
            return False
        return True

    def next_batch(self, block=False):
        batch = [] if self.given else [(f, f.result() if f.status == "finished" else (KilledWorker, f._error, None))
                                       for f in self.futs if f.done()]
        self.given = True
        return batch


class KilledWorker(Exception):  # as distributed names it
    pass


def _fake_cluster(monkeypatch, plan):
    pytest.importorskip("distributed")
    import dask.distributed

    client = _Client(list(plan))
    monkeypatch.setattr(batch, "_client", lambda scheduler, workers, threads: (client, None))
    monkeypatch.setattr(dask.distributed, "as_completed", _AsCompleted)
    monkeypatch.setattr(batch.time, "sleep", lambda s: None)
    return client


def test_a_cancel_is_acted_on_between_results_that_came_in_together(tmp_path, monkeypatch):
    """3,000 subjects failing at once came back in batches of hundreds, and a SIGTERM waited for the whole batch
    (each row written): signal at 280 s, exit at 903 s, the nannies meanwhile giving subjects to new workers. Now
    the subjects still running are cancelled at once; the results already in are still recorded, each once."""
    subjects = _unpaired(tmp_path, 5)
    row = lambda i: asdict(SubjectResult(subject=subjects[i].subject, status="failed", error="x"))  # noqa: E731
    plan = [_Future(0, "finished", row(0)), _Future(1, "finished", row(1)), _Future(2, "pending"),
            _Future(3, "finished", row(3)), _Future(4, "pending")]
    client = _fake_cluster(monkeypatch, plan)
    token, got, idle = CancelToken(), [], []

    def finished(d):
        got.append((d["subject"], os.path.exists(client.stop_file)))
        token.cancel()  # the signal arrives while the first result is recorded

    finished.idle = lambda: idle.append(1)
    n, cancelled = batch._run_on_dask(subjects, {"threads": 1}, "local", 1, finished, token)
    assert cancelled and n == 1 and idle == [1]
    # each ended subject once; from the cancel on, the stop file tells a task that starts anyway to do nothing
    assert got == [("s000", False), ("s001", True), ("s003", True)]
    assert sorted(f.i for f in client.cancelled) == [2, 4] and client.closed
    assert not os.path.exists(os.path.dirname(client.stop_file))  # removed with the cluster


def test_a_subject_that_starts_after_the_cancel_does_nothing(tmp_path):
    """A worker a nanny started in place of one the SIGTERM killed took subjects before Dask dropped them."""
    s = Subject(subject="s1", fixed=str(tmp_path / "mr.nii.gz"), moving=[str(tmp_path / "pet.nii.gz")],
                output=str(tmp_path / "o.nii.gz"))
    stop = tmp_path / "cancelled"
    stop.touch()
    row = batch.run_subject(s, {"threads": 1, "cap_process_threads": False, "stop_file": os.fspath(stop)})
    assert (row["status"], row["error"]) == ("cancelled", "not run: the batch was cancelled")
    stop.unlink()
    row = batch.run_subject(s, {"threads": 1, "cap_process_threads": False, "stop_file": os.fspath(stop)})
    assert row["status"] == "failed" and "mr.nii.gz" in row["error"]  # run as ever: its input is missing


def test_a_worker_killed_by_the_cancel_is_a_cancelled_subject_not_an_out_of_memory_failure(tmp_path):
    s = _unpaired(tmp_path, 1)[0]
    died = (KilledWorker, KilledWorker("w1"), None)  # as distributed gives a task's error with its results
    token = CancelToken()
    row = batch._dask_result(died, s, token)
    assert row["status"] == "failed" and "out of memory" in row["error"]
    token.cancel()
    row = batch._dask_result(died, s, token)
    assert row["status"] == "cancelled" and "cancelled" in row["error"] and "memory" not in row["error"]


# ----------------------------------------------------------------------------- summary
def test_failures_are_counted_by_reason_and_the_table_is_capped(tmp_path):
    rows = [SubjectResult(subject=f"sub-{i:04d}", status="failed",
                          error=f"/data/sub-{i:04d}: unpaired: no PET or SPECT found (found: MR mr_{i}.nii.gz). "
                                "Fix: add the missing image, or leave the subject out.") for i in range(120)]
    rows += [SubjectResult(subject="sub-x", status="failed", error="the worker process running it died (most "
                           "often out of memory). Fix: run it again with fewer workers")]
    rows += [SubjectResult(subject=f"ok-{i}", status="done", output=f"/o/{i}.nii.gz") for i in range(30)]
    rows += [SubjectResult(subject=f"c-{i}", status="cancelled", error="not run") for i in range(4)]
    s = BatchSummary(results=rows, report_path=tmp_path / "r.csv", wall_seconds=3.0, workers=2)
    assert (s.n_failed, s.n_cancelled, s.n_done) == (121, 4, 30)  # n_failed counted cancelled ones too
    assert s.reasons() == [(120, "unpaired: no PET or SPECT found"), (1, "the worker process running it died")]
    lines = s.table(max_rows=10).splitlines()
    assert len(lines) == 1 + 10 + 3
    assert all("FAILED" in line for line in lines[1:11])  # failures first
    assert lines[11] == f"... {len(rows) - 10} more subjects not shown: every subject is in the report, " \
                        f"{tmp_path / 'r.csv'}"
    assert lines[12].startswith(f"{len(rows)} subjects: 30 done, 0 skipped (up to date), 121 failed, 4 cancelled")
    assert lines[13] == "121 failed: 120 x unpaired: no PET or SPECT found; 1 x the worker process running it died"
    assert len(s.table(max_rows=None).splitlines()) == 1 + len(rows) + 2


def test_a_failed_row_says_when_and_by_which_medfuse_and_what_it_was_given(tmp_path):
    s = Subject(subject="s1", fixed=str(tmp_path / "mr.nii.gz"), moving=[], output=str(tmp_path / "o.nii.gz"),
                problem="unpaired: no moving image")
    before = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    row = batch.run_subject(s, {"threads": 1, "cap_process_threads": False})
    after = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    assert row["status"] == "failed" and row["medfuse_version"] == medfuse.__version__
    assert before <= row["finished_utc"] <= after and row["inputs"] == str(tmp_path / "mr.nii.gz")


# ----------------------------------------------------------------------------- --write-manifest
def _image_files(d):
    """Files whose modality medfuse's reader finds in different places, or not at all."""
    arr = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    pet = medfuse.Volume(arr, np.eye(4), modality="PT", unit="Bq/mL")
    files = []
    for name in ("tagged.nii.gz", "tagged.mha", "tagged.nrrd"):
        files.append(medfuse.save(pet, d / name))
    files.append(medfuse.save(medfuse.Volume(arr, np.eye(4)), d / "tagged_unknown.nii.gz"))
    for name, descrip, data in (("plain.nii.gz", b"", arr), ("bids.nii.gz", b"", arr),
                                ("bad_tag.nii.gz", b"medfuse modality=XYZ unit=arbitrary", arr),
                                ("two_volumes.nii.gz", b"medfuse modality=PT unit=Bq/mL", np.stack([arr, arr], -1)),
                                ("one_volume_4d.nii.gz", b"medfuse modality=PT unit=Bq/mL", arr[..., None])):
        img = nib.Nifti1Image(data, np.eye(4))
        img.header["descrip"] = descrip
        nib.save(img, d / name)
        files.append(d / name)
    (d / "bids.json").write_text(json.dumps({"Modality": "CT"}))
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(arr), str(d / "plain.mha"))
    files.append(d / "plain.mha")
    nib.save(nib.AnalyzeImage(arr, np.eye(4)), d / "analyze.img")
    files.append(d / "analyze.hdr")
    (d / "garbage.nii.gz").write_bytes(b"not an image" * 10)
    (d / "empty.mha").write_bytes(b"")
    return files + [d / "garbage.nii.gz", d / "empty.mha"]


def test_the_header_only_modality_check_decides_as_a_full_load(tmp_path, samples_dir):
    """--write-manifest loaded every image's voxels to learn whether its header states a modality (31 s of 34 s
    for 1,000 small subjects); the header alone now gives the same answer as medfuse.load."""
    files = _image_files(tmp_path) + [samples_dir / "mr_t1.nii.gz", samples_dir / "spect.nii.gz"]
    decided = {}
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                loaded = medfuse.load(f).modality == "unknown"
            except medfuse.MedfuseError:
                loaded = True
        decided[f.name] = (batch._states_no_modality(os.fspath(f)), loaded)
    assert all(header == loaded for header, loaded in decided.values()), decided
    assert {name for name, (header, _) in decided.items() if not header} == {
        "tagged.nii.gz", "tagged.mha", "tagged.nrrd", "bids.nii.gz", "one_volume_4d.nii.gz", "mr_t1.nii.gz",
        "spect.nii.gz"}


def test_the_modality_check_reads_no_voxels(tmp_path, monkeypatch):
    files = _image_files(tmp_path)

    def refuse(*a, **k):
        raise AssertionError("voxels read")

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", refuse)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "get_unscaled", refuse)
    monkeypatch.setattr(medfuse.io, "load", refuse)
    import SimpleITK as sitk

    monkeypatch.setattr(sitk, "ReadImage", refuse)
    assert [batch._states_no_modality(os.fspath(f)) for f in files[:4]] == [False, False, False, True]
