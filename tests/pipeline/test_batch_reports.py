"""medfuse batch as a long research run: reports of manifests side by side, unwritable outputs and reports."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import medfuse.batch as batch
from medfuse.batch import Subject, run_batch, write_phantom_subjects
from medfuse.errors import OutputExistsError, OutputWriteError


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One 2 mm phantom subject folder (MR T1 + PET NIfTI); tests copy it (making phantoms takes seconds)."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_subjects(root, 1, first_seed=5, register=None)
    return root / "sub-01"


def _rows(report: Path):
    return list(csv.DictReader(report.read_text(encoding="utf-8").splitlines()))


def test_manifests_differing_only_in_extension_keep_their_own_reports(tmp_path, phantom):
    """study.csv and study.yaml in one folder both reported to study-report.csv: the second run merged its rows
    into the first's, and its row of a subject both list replaced the first's. Each now has its own report, and a
    rerun of the CSV manifest still finds (and updates) the report it wrote before."""
    shutil.copytree(phantom, tmp_path / "sub-01")
    (tmp_path / "study.csv").write_text("subject,fixed,moving,output,method\n"
                                        "sub-01,sub-01/mr_t1.nii.gz,sub-01/pet.nii.gz,csv/sub-01.nii.gz,mean\n")
    (tmp_path / "study.yaml").write_text("- {subject: sub-01, fixed: sub-01/mr_t1.nii.gz, moving: sub-01/pet.nii.gz, "
                                         "output: yaml/sub-01.nii.gz, method: max}\n")
    first = run_batch(tmp_path / "study.csv", scheduler="synchronous")
    csv_report = first.report_path.read_text()
    second = run_batch(tmp_path / "study.yaml", scheduler="synchronous")
    assert first.report_path == tmp_path / "study-report.csv"  # the name earlier runs used, kept
    assert second.report_path == tmp_path / "study.yaml-report.csv"
    assert first.report_path.read_text() == csv_report  # untouched by the other manifest's run
    (yaml_row,) = _rows(second.report_path)
    assert (yaml_row["status"], yaml_row["method_used"]) == ("done", "max")
    assert yaml_row["output"] == os.fspath(tmp_path / "yaml" / "sub-01.nii.gz")
    again = run_batch(tmp_path / "study.csv", scheduler="synchronous")
    assert again.report_path == first.report_path
    (row,) = _rows(again.report_path)
    assert (row["status"], row["output"]) == ("skipped", os.fspath(tmp_path / "csv" / "sub-01.nii.gz"))


def _one(phantom: Path, folder: Path, output: Path) -> Subject:
    shutil.copytree(phantom, folder / "sub-01")
    return Subject(subject="sub-01", fixed=os.fspath(folder / "sub-01" / "mr_t1.nii.gz"),
                   moving=[os.fspath(folder / "sub-01" / "pet.nii.gz")], output=os.fspath(output), method="mean")


def test_an_output_folder_that_cannot_be_made_is_a_clear_error(tmp_path, phantom, monkeypatch):
    """A file where the outputs' folder should be, or a folder without write permission, was reported for every
    subject as "internal error FileExistsError/PermissionError" (the words medfuse uses for its own bugs)."""
    (tmp_path / "out").write_text("someone's notes")
    s = _one(phantom, tmp_path, tmp_path / "out" / "sub-01.nii.gz")
    (res,) = run_batch([s], scheduler="synchronous", report=tmp_path / "r.csv").results
    assert res.status == "failed" and "internal error" not in res.error
    assert "a file of that name is in the way" in res.error and os.fspath(tmp_path / "out") in res.error
    assert "Fix:" in res.error and (tmp_path / "out").read_text() == "someone's notes"

    # A folder the user may not write in (simulated: the tests may run as root, whom permissions do not stop).
    real_mkdir = Path.mkdir

    def denied(self, *a, **kw):
        if self.name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", denied)
    s.output = os.fspath(tmp_path / "locked" / "sub-01.nii.gz")
    (res,) = run_batch([s], scheduler="synchronous", report=tmp_path / "r.csv").results
    assert res.status == "failed" and "internal error" not in res.error
    assert "permission denied" in res.error and "Fix:" in res.error


def test_a_report_that_cannot_be_written_is_refused_before_any_work(tmp_path, phantom):
    """The report was only warned about when the run ended (days later for a big dataset), no report having been
    written meanwhile; now the run is refused at once, and nothing is run."""
    s = _one(phantom, tmp_path, tmp_path / "out" / "sub-01.nii.gz")
    (tmp_path / "notes").write_text("x")
    with pytest.raises(OutputWriteError, match=r"cannot write the batch report .*nothing was run.*--report"):
        run_batch([s], scheduler="synchronous", report=tmp_path / "notes" / "r.csv")
    assert not Path(s.output).exists() and (tmp_path / "notes").read_text() == "x"


def test_the_report_is_written_before_the_first_subject_ends(tmp_path, phantom, monkeypatch):
    """A run killed during its first subject (hours, for a deformable registration) left no report at all; now the
    report is there from the start: this run's subjects pending, an earlier report's other rows kept."""
    s = _one(phantom, tmp_path, tmp_path / "out" / "sub-01.nii.gz")
    report = tmp_path / "r.json"
    report.write_text(json.dumps([{"subject": "old", "status": "done", "output": "/elsewhere/old.nii.gz"}]))
    seen = []
    real = batch.run_subject

    def spy(subject, options, cancel=None):
        seen.append(json.loads(report.read_text()))
        return real(subject, options, cancel=cancel)

    monkeypatch.setattr(batch, "run_subject", spy)
    run_batch([s], scheduler="synchronous", report=report)
    assert [(r["subject"], r["status"]) for r in seen[0]] == [("sub-01", "pending"), ("old", "done")]
    assert [(r["subject"], r["status"]) for r in json.loads(report.read_text())] == [("sub-01", "done"),
                                                                                      ("old", "done")]


_HOLDER = """
import sys, time
from pathlib import Path
import medfuse.batch as batch
with batch._report_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_one_report_is_refused_while_the_first_goes_on(tmp_path, phantom):
    """Two runs of one manifest at once (started twice) ran every subject twice, and each reported the outputs the
    other wrote first as 'failed: the output exists'. Now the second is refused before any work; a run killed
    with SIGKILL holds nothing, so its rerun goes ahead."""
    import signal
    import subprocess
    import sys

    s = _one(phantom, tmp_path, tmp_path / "out" / "sub-01.nii.gz")
    report = tmp_path / "r.csv"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, os.fspath(report)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputExistsError, match=r"another medfuse batch run is writing this report \(pid "):
            run_batch([s], scheduler="synchronous", report=report)
        assert not Path(s.output).exists() and not report.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    (res,) = run_batch([s], scheduler="synchronous", report=report).results
    assert res.status == "done" and _rows(report)[0]["status"] == "done"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".lock")]  # a finished run leaves no lock file


def test_no_more_local_workers_than_subjects(tmp_path, phantom, monkeypatch):
    """--workers 6 for one subject started six worker processes (13 s against 4.5 s with one, on 2 cores) and
    warned about cores it then did not use."""
    s = _one(phantom, tmp_path, tmp_path / "out" / "sub-01.nii.gz")
    asked = []

    def fake_dask(subjects, options, scheduler, workers, finished, cancel):
        asked.append(workers)
        for sub in subjects:
            finished(batch.run_subject(sub, {**options, "cap_process_threads": False}))
        return workers, False

    monkeypatch.setattr(batch, "_run_on_dask", fake_dask)
    summary = run_batch([s], workers=6, report=tmp_path / "r.csv")
    assert asked == [1] and summary.workers == 1 and summary.results[0].status == "done"


def test_a_report_saved_again_by_a_spreadsheet_is_still_ours(tmp_path, phantom):
    """Excel's "CSV UTF-8" puts a byte-order mark first (and CRLF line ends): the next run refused the report as
    "not a medfuse batch report" (or, read, lost every earlier row). Its rows are kept and updated now."""
    s = _one(phantom, tmp_path, tmp_path / "out" / "sub-01.nii.gz")
    report = tmp_path / "r.csv"
    run_batch([s], scheduler="synchronous", report=report)
    rows = report.read_text(encoding="utf-8").splitlines()
    rows.append("old,done,1.0,/elsewhere/old.nii.gz" + "," * (len(rows[0].split(",")) - 4))
    report.write_bytes("\r\n".join(rows).encode("utf-8-sig") + b"\r\n")
    again = run_batch([s], scheduler="synchronous", report=report)
    assert again.results[0].status == "skipped"
    assert [(r["subject"], r["status"]) for r in _rows(report)] == [("sub-01", "skipped"), ("old", "done")]


def test_a_report_saved_again_with_semicolons_is_still_ours(tmp_path, phantom):
    """A spreadsheet in a ';' locale saves the report again with ';' between cells: the next run refused to start
    ("a file that is not a medfuse batch report"). Its rows are read and kept now."""
    import csv
    import io

    s = _one(phantom, tmp_path, tmp_path / "out" / "sub-01.nii.gz")
    report = tmp_path / "r.csv"
    run_batch([s], scheduler="synchronous", report=report)
    rows = list(csv.reader(report.read_text(encoding="utf-8").splitlines()))
    rows.append(["old", "done", "1.0", "/elsewhere/old.nii.gz"] + [""] * (len(rows[0]) - 4))
    buf = io.StringIO()
    csv.writer(buf, delimiter=";", lineterminator="\r\n").writerows(rows)
    report.write_bytes(buf.getvalue().encode("utf-8-sig"))
    again = run_batch([s], scheduler="synchronous", report=report)
    assert again.results[0].status == "skipped"
    assert [(r["subject"], r["status"]) for r in _rows(report)] == [("sub-01", "skipped"), ("old", "done")]


def test_tab_and_semicolon_separated_manifests_are_read(tmp_path):
    """A BIDS-style study.tsv, or a CSV saved with ';' by a spreadsheet, was refused as "the CSV header lacks
    subject, fixed, output, moving" although its header held them all."""
    (tmp_path / "study.tsv").write_text("subject\tfixed\tmoving\toutput\n"
                                        "a\ta/mr.nii.gz\ta/pet.nii.gz;a/spect.nii.gz\tout/a.nii.gz\n")
    (tmp_path / "excel.csv").write_text('subject;fixed;moving;output\r\n'
                                        'a;a/mr.nii.gz;"a/pet.nii.gz;a/spect.nii.gz";out/a.nii.gz\r\n')
    for name in ("study.tsv", "excel.csv"):
        (a,) = batch.read_manifest(tmp_path / name)
        assert (a.subject, a.fixed, a.output) == ("a", os.fspath(tmp_path / "a/mr.nii.gz"),
                                                  os.fspath(tmp_path / "out/a.nii.gz"))
        assert a.moving == [os.fspath(tmp_path / "a/pet.nii.gz"), os.fspath(tmp_path / "a/spect.nii.gz")]
    # a .tsv beside a .csv of the same stem keeps a report of its own
    assert batch._manifest_report(tmp_path / "study.tsv") == tmp_path / "study.tsv-report.csv"


def test_wrong_arguments_to_the_batch_helpers_are_typed_errors_that_name_them(tmp_path):
    from medfuse.errors import InvalidInputError

    # cap_threads: int("2") and int(2.7) passed silently, int(None) was a bare TypeError.
    for bad in ("2", 2.7, None, 0, True):
        with pytest.raises(InvalidInputError, match="threads must be a whole number from 1 to 1024"):
            batch.cap_threads(bad)
    # write_phantom_subjects: n=0 failed after making the folder with a bare IndexError (rows[0]).
    for kwargs, words in (({"n": 0}, "n must be a whole number of 1 or more"),
                          ({"n": 2, "lesion": [True]}, "lesion gives 1 values for 2 subjects"),
                          ({"n": 1, "downsample": 1.5}, "downsample must be a whole number")):
        with pytest.raises(InvalidInputError, match=words):
            write_phantom_subjects(tmp_path / "ds", **kwargs)
        assert not (tmp_path / "ds").exists()  # refused before anything was written
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputWriteError):
        write_phantom_subjects(tmp_path / "file", 1)
    # run_subject: a dict with a wrong or missing key was the dataclass's bare TypeError.
    row = {"subject": "s", "fixed": "a.nii", "moving": ["b.nii"], "output": "o.nii.gz"}
    for bad, words in (({**row, "fixd": "x"}, r"unknown keys \['fixd'\]"),
                       ({k: v for k, v in row.items() if k != "output"}, r"without \['output'\]"),
                       (["a.nii", "b.nii"], "got a list")):
        with pytest.raises(InvalidInputError, match=words):
            batch.run_subject(bad, {})
