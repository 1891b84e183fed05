"""medfuse batch over a large cohort: the report's registration_suspect cell, per-subject warnings grouped, the
progress bar's switches and redraws, and the report's rewrites during a run."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

import medfuse.batch as batch
from medfuse.batch import BatchSummary, Subject, SubjectResult, read_manifest, run_batch, write_phantom_subjects
from medfuse.io import _atomic as atomic
from medfuse.provenance import read_sidecar


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One small (4 mm MR) phantom subject, its PET misaligned, run as two subjects: sub-01 registered (rigid),
    sub-02 not (register none); their report ``r.csv`` (one registration for the module: it takes seconds)."""
    root = tmp_path_factory.mktemp("cohort")
    (first,) = read_manifest(write_phantom_subjects(root, 1, downsample=4, register="rigid", method="mean"))
    second = Subject(**{**first.__dict__, "subject": "sub-02", "register": "none"})
    first.output, second.output = str(root / "out" / "sub-01.nii.gz"), str(root / "out" / "sub-02.nii.gz")
    summary = run_batch([first, second], scheduler="synchronous", report=root / "r.csv")
    return [first, second], summary, root / "r.csv"


def _rows(report: Path):
    return {r["subject"]: r for r in csv.DictReader(report.read_text(encoding="utf-8").splitlines())}


def test_registration_suspect_is_explicit_for_a_registered_subject(cohort, tmp_path):
    """A registration that looked fine reads False, not the empty cell that read as "not registered"; a subject
    with no registration keeps the empty cell; JSON says false and null; a rerun's skipped rows say the same."""
    subjects, summary, report = cohort
    assert [r.status for r in summary.results] == ["done", "done"], summary.table()
    ran = [r for r in read_sidecar(subjects[0].output)["registration"] if r]
    assert ran and not any(r["suspect"] for r in ran)  # the sidecar: registered, nothing suspect
    assert not any(read_sidecar(subjects[1].output).get("registration") or [])  # not registered
    assert [r.registration_suspect for r in summary.results] == [False, None]
    rows = _rows(report)
    assert rows["sub-01"]["registration_suspect"] == "False"
    assert rows["sub-02"]["registration_suspect"] == ""

    again = run_batch(subjects, scheduler="synchronous", report=tmp_path / "r.json")
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    cells = {r["subject"]: r["registration_suspect"] for r in json.loads((tmp_path / "r.json").read_text())}
    assert cells == {"sub-01": False, "sub-02": None}


def test_an_older_report_with_empty_cells_is_still_read_and_its_rows_kept(cohort, tmp_path):
    """A report written before the cell was explicit (empty for a fine registration) is still medfuse's: its other
    subjects' rows are kept as they were, and this run's rows get the explicit value."""
    subjects = cohort[0][:1]
    report = tmp_path / "r.csv"
    columns = [f.name for f in batch.fields(SubjectResult)]
    old = {c: "" for c in columns}
    with open(report, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerow({**old, "subject": "sub-01", "status": "done", "seconds": "3.0"})
        w.writerow({**old, "subject": "sub-99", "status": "done", "seconds": "4.0", "method_used": "mean"})
    (res,) = run_batch(subjects, scheduler="synchronous", report=report).results
    assert res.status == "skipped"
    rows = _rows(report)
    assert rows["sub-01"]["registration_suspect"] == "False" and rows["sub-01"]["status"] == "skipped"
    assert rows["sub-99"] == {**old, "subject": "sub-99", "status": "done", "seconds": "4.0", "method_used": "mean"}


@pytest.mark.parametrize("registration, expected", [
    (None, None), ([None], None), ([None, {"suspect": False}], False), ([{"suspect": False}, {"suspect": True}], True),
    ("garbled", None)])
def test_registration_suspect_from_the_sidecar(registration, expected):
    """True when any registration looked suspect, False when all that ran looked fine, None when none ran."""
    res = SubjectResult(subject="s", status="skipped")
    batch._from_sidecar(res, {"registration": registration})
    assert res.registration_suspect is expected


def _warned(subject: str, text: str) -> SubjectResult:
    return SubjectResult(subject=subject, status="done", warnings=text)


def test_repeated_warnings_make_one_line_with_a_count_and_the_first_subjects():
    """The same warning on 1,200 subjects (their names in its paths) is one line; a warning of one subject keeps its
    own text; a subject's name is taken out only as a whole (sub-01 never in sub-010)."""
    rows = [_warned(f"sub-{i:03d}", f"/data/sub-{i:03d}/pet.nii.gz: the PET has no units (assumed Bq/mL); out/"
                                    f"sub-{i:03d}_fused.nii.gz is float32") for i in range(1, 1201)]
    rows.insert(5, _warned("sub-01", "/data/sub-010/ct.nii.gz: the CT's slices are uneven (2.5 to 3 mm)"))
    rows.insert(7, SubjectResult(subject="sub-x", status="failed", error="unpaired"))
    summary = BatchSummary(results=rows, report_path=None, wall_seconds=1.0, workers=1)
    assert summary.warning_lines() == [
        "1200 subjects (sub-001, sub-002, sub-003, ...): the PET has no units; out/*_fused.nii.gz is float32",
        "sub-01: /data/sub-010/ct.nii.gz: the CT's slices are uneven (2.5 to 3 mm)"]
    (n, text, named), _ = summary.warning_groups(first=2)
    assert (n, named) == (1200, ["sub-001", "sub-002"])
    two = BatchSummary(results=rows[:2], report_path=None, wall_seconds=1.0, workers=1)
    assert two.warning_lines()[0].startswith("2 subjects (sub-001, sub-002): the PET")
    assert BatchSummary(results=[rows[7]], report_path=None, wall_seconds=1.0, workers=1).warning_lines() == []


def test_failure_reasons_are_grouped_as_before():
    """reasons() (shared with the warnings' grouping) still drops the file, the details and the fix."""
    rows = [SubjectResult(subject=f"s{i}", status="failed", error=f"/d/s{i}/pet.nii.gz: unpaired: no PET found "
                                                                 f"(files: a{i}.nii.gz). Fix: add it") for i in range(3)]
    rows.append(SubjectResult(subject="t", status="failed"))
    summary = BatchSummary(results=rows, report_path=None, wall_seconds=1.0, workers=1)
    assert summary.reasons() == [(3, "unpaired: no PET found"), (1, "no reason given")]


def test_reasons_group_relative_paths_and_nested_details():
    """A list manifest's relative paths (``data/sub-04/pet.nii: ...``) made a group of their own beside the same
    error on absolute paths, and "(most often out of memory (OOM))" left "(most often out of memory)" behind."""
    errors = ["/d/sub-01/pet.nii: the file cannot be read (truncated at byte 1)",
              "data/sub-04/pet.nii: the file cannot be read (truncated at byte 9)",
              "the worker process running it died (most often out of memory (OOM)). Fix: --workers 1",
              "the worker process running it died (most often out of memory (OOM)). Fix: --workers 1"]
    rows = [SubjectResult(subject=f"s{i}", status="failed", error=e) for i, e in enumerate(errors)]
    summary = BatchSummary(results=rows, report_path=None, wall_seconds=1.0, workers=1)
    assert sorted(summary.reasons()) == [(2, "the file cannot be read"), (2, "the worker process running it died")]


class _Terminal(io.StringIO):
    """stderr as a terminal (tqdm's disable=None draws the bar only on one)."""

    def isatty(self) -> bool:
        return True


def _failing(tmp_path: Path, n: int):
    """``n`` subjects whose inputs do not exist: each fails at once."""
    return [Subject(subject=f"s{i:02d}", fixed=str(tmp_path / "missing.nii.gz"), moving=[str(tmp_path / "m.nii.gz")],
                    output=str(tmp_path / "out" / f"s{i:02d}.nii.gz")) for i in range(n)]


@pytest.mark.parametrize("env", [{"MEDFUSE_NO_PROGRESS": "1"}, {"TQDM_DISABLE": "1"}, {"TERM": "dumb"}])
def test_the_batch_bar_honours_the_command_lines_switches(tmp_path, monkeypatch, env):
    """progress=True draws no bar under the switches that turn off the command line's bars."""
    for name in ("MEDFUSE_NO_PROGRESS", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    summary = run_batch(_failing(tmp_path, 3), scheduler="synchronous", report=tmp_path / "r.csv", progress=True)
    assert summary.n_failed == 3
    assert "batch" not in term.getvalue()


def test_the_batch_bar_is_redrawn_at_most_twice_a_second(tmp_path, monkeypatch):
    """40 subjects ending within the same instant redraw the bar once or twice (its start and end), not 40 times;
    with the clock standing still, every redraw after the first is one no interval allowed."""
    for name in ("MEDFUSE_NO_PROGRESS", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr("tqdm.std.time", lambda: 1000.0)  # read by each bar as its clock
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    run_batch(_failing(tmp_path, 40), scheduler="synchronous", report=tmp_path / "r.csv", progress=True)
    draws = [d for d in term.getvalue().split("\r") if "batch" in d]
    assert 1 <= len(draws) <= 3, draws
    assert "40/40" in draws[-1]  # closing draws the final count


def test_a_runs_report_rewrites_do_not_list_its_folder(tmp_path, monkeypatch):
    """The first report write removes what a killed earlier run left; the rewrites under the run's lock list the
    report's folder no more (the default report lies among thousands of outputs: two listings a rewrite)."""
    folder = tmp_path / "reports"
    folder.mkdir()
    report = folder / "r.csv"
    left = folder / (atomic._temp_prefix(report, pid=_dead_pid()) + "k1ll3d_a.csv")  # a killed earlier run's
    left.write_text("half a report")
    listed = []
    real_scandir, real_write = os.scandir, batch._write_report

    def scandir(path="."):
        listed.append(os.path.abspath(os.fspath(path)))
        return real_scandir(path)

    at_write = []

    def write_report(*args, **kwargs):
        at_write.append(listed.count(os.fspath(folder)))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(batch, "_write_report", write_report)
    summary = run_batch(_failing(tmp_path, 4), scheduler="synchronous", report=report)
    assert summary.n_failed == 4 and not left.exists()
    assert len(at_write) >= 3  # the first report, rewrites between subjects, the last
    # Every listing of the report's folder came before the second write: the first write's (its recovery).
    assert at_write[1] == listed.count(os.fspath(folder)) >= 1, (at_write, listed)
    assert _rows(report)["s00"]["status"] == "failed"


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_report_writes_keep_working_without_recovering(tmp_path):
    """recover=False still writes atomically and replaces the report; a stale temporary is left for the next
    recovering write, which removes it."""
    report = tmp_path / "r.csv"
    atomic.atomic_write_text(report, "a\n", overwrite=True)
    left = tmp_path / (atomic._temp_prefix(report, pid=_dead_pid()) + "k1ll3d_a.csv")
    left.write_text("half")
    atomic.atomic_write_text(report, "b\n", overwrite=True, recover=False)
    assert report.read_text() == "b\n" and left.exists()
    atomic.atomic_write_text(report, "c\n", overwrite=True)
    assert report.read_text() == "c\n" and not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


def _ran(seconds, **kwargs) -> BatchSummary:
    rows = [SubjectResult(subject=f"s{i}", status="done", seconds=s) for i, s in enumerate(seconds)]
    return BatchSummary(results=rows, report_path=None, **kwargs)


def test_a_local_run_slower_than_one_process_would_be_says_so():
    """Cheap subjects on a local cluster that took longer than their median time x their number (one process,
    roughly; a worker's first subject pays for the imports) get the hint; a run whose cluster paid off, one
    process's run, a remote cluster's and a cancelled one's do not."""
    slow = _ran([0.5, 4.0, 0.25, 0.75], wall_seconds=6.0, workers=2, scheduler="local")
    assert slow.one_process_seconds == 2.5
    assert ("one process would have taken about 2.5 s (the subjects' median time x their number): for subjects this "
            "quick, --scheduler synchronous (no cluster to start) is faster") in slow.table().splitlines()
    for summary in (_ran([4.0, 5.0, 3.0], wall_seconds=7.0, workers=2, scheduler="local"),
                    _ran([0.5, 0.5], wall_seconds=6.0, workers=1, scheduler="synchronous"),
                    _ran([0.5, 0.5], wall_seconds=6.0, workers=2, scheduler="tcp://node0:8786"),
                    _ran([0.5], wall_seconds=6.0, workers=2, scheduler="local"),
                    _ran([0.5, 0.5], wall_seconds=6.0, workers=2, scheduler="local", cancelled=True),
                    _ran([0.5, 0.5], wall_seconds=6.0, workers=2)):
        assert summary.one_process_seconds is None
        assert "--scheduler synchronous" not in summary.table()


def test_the_command_prints_a_warning_many_subjects_share_once(tmp_path, monkeypatch, capsys):
    """``medfuse batch`` printed one stderr line per subject's warnings: 3,000 lines for a cohort whose PETs all
    lacked one header. It prints the groups of :meth:`BatchSummary.warning_lines`."""
    from medfuse.cli import main

    text = "the PET holds no decay correction; loaded in Bq/mL"
    rows = [SubjectResult(subject=f"sub-{i:03d}", status="done", warnings=text) for i in range(40)]
    rows.append(SubjectResult(subject="sub-odd", status="done", warnings="a warning of its own"))
    summary = BatchSummary(results=rows, report_path=None, wall_seconds=1.0, workers=1)
    monkeypatch.setattr(batch, "run_batch", lambda *a, **k: summary)
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,fixed,moving,output\n", encoding="utf-8")
    main(["batch", str(manifest), "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("medfuse: warning:")]
    assert err == [f"medfuse: warning: 40 subjects (sub-000, sub-001, sub-002, ...): {text}",
                   "medfuse: warning: sub-odd: a warning of its own"]


def test_a_subject_not_run_after_a_cancel_has_the_row_of_any_cancelled_subject(tmp_path):
    """A task that starts after the run's cancel (its stop file exists) returned before the columns every
    cancelled row gets: no finished_utc, medfuse_version or inputs, though SubjectResult promises them."""
    from medfuse import __version__

    stop = tmp_path / "cancelled"
    stop.touch()
    s = Subject(subject="sub-01", fixed=str(tmp_path / "mr.nii.gz"), moving=[str(tmp_path / "pet.nii.gz")],
                output=str(tmp_path / "out.nii.gz"))
    row = batch.run_subject(s, {"stop_file": str(stop)})
    assert row["status"] == "cancelled" and row["error"] == "not run: the batch was cancelled"
    assert row["finished_utc"] and row["medfuse_version"] == __version__
    assert row["inputs"] == f"{s.fixed};{s.moving[0]}"
    assert not (tmp_path / "out.nii.gz").exists()
