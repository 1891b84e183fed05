"""An --out inside a subject's folder, YAML subject ids, a symlinked manifest, what --overwrite
does to up-to-date subjects, advice a batch row can follow, empty output folders, normalised report paths and the
worker count in the summary."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import medfuse
from medfuse.batch import read_manifest, run_batch, write_phantom_subjects
from medfuse.errors import InvalidInputError, UnreadableFileError

ROOT = Path(__file__).resolve().parents[2]
MEDFUSE = [sys.executable, "-c", "import sys; from medfuse.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One 2 mm phantom subject folder (MR T1 + PET NIfTI); tests copy it (making phantoms takes seconds)."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_subjects(root, 1, first_seed=3, register=None)
    return root / "sub-01"


def _dataset(phantom: Path, root: Path, n: int = 2) -> Path:
    for i in range(1, n + 1):
        shutil.copytree(phantom, root / f"sub-{i:02d}")
    return root


def _rows(report: Path):
    return list(csv.DictReader(report.read_text(encoding="utf-8").splitlines()))


# ----------------------------------------------------------------------------- 1. --out in a subject's folder
def test_out_inside_a_subject_folder_is_refused_before_any_work(tmp_path, phantom):
    """--out study/sub-01/fused left sub-01 out of the run without a word: "1 subjects: 1 done", exit 0."""
    study = _dataset(phantom, tmp_path / "study")
    for out in (study / "sub-01" / "fused", study / "sub-01"):
        with pytest.raises(InvalidInputError) as e:
            run_batch(study, out_dir=out, scheduler="synchronous", method="mean")
        assert "sub-01" in str(e.value) and "--out" in (e.value.fix or "")
        assert not (study / "sub-01" / "fused").exists()  # nothing was run, nothing made
        assert not (study / "derivatives").exists()
    # The command line says it before any work too, with exit code 2 (bad input).
    done = subprocess.run([*MEDFUSE, "batch", str(study), "--out",
                           str(study / "sub-01" / "fused"), "--register", "none", "--method", "mean",
                           "--scheduler", "synchronous", "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "sub-01" in done.stderr and "Traceback" not in done.stderr
    assert not (study / "sub-01" / "fused").exists()

    # A folder that holds nothing but the outputs' folder is no subject, and every subject runs.
    (study / "results" / "medfuse").mkdir(parents=True)
    summary = run_batch(study, out_dir=study / "results" / "medfuse", scheduler="synchronous", method="mean")
    assert sorted(r.subject for r in summary.results) == ["sub-01", "sub-02"]
    assert [r.status for r in summary.results] == ["done", "done"]


# ----------------------------------------------------------------------------- 2. YAML subject ids
def test_yaml_manifest_keeps_subject_ids_as_written(tmp_path):
    """yaml.safe_load typed them: 007 -> '7', 010 -> '8' (octal), 0x1F -> '31', yes -> 'True', 1_000 -> '1000'."""
    ids = ["007", "010", "0x1F", "yes", "1_000", "12:30", "1e3", "2026-01-02"]
    rows = [{"subject": s, "fixed": f"s{i}/mr.nii.gz", "moving": f"s{i}/pet.nii.gz", "output": f"out/{i}.nii.gz"}
            for i, s in enumerate(ids)]
    (tmp_path / "m.yaml").write_text("subjects:\n" + "".join(
        "  - {" + ", ".join(f"{k}: {v}" for k, v in r.items()) + "}\n" for r in rows))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    from_yaml = [s.subject for s in read_manifest(tmp_path / "m.yaml")]
    assert from_yaml == ids == [s.subject for s in read_manifest(tmp_path / "m.csv")]
    # A path cell is text too: a folder named 010 stays 010.
    (tmp_path / "n.yaml").write_text("- {subject: a, fixed: 010/mr.nii.gz, moving: [0x1F], output: 012}\n")
    a, = read_manifest(tmp_path / "n.yaml")
    assert (Path(a.fixed).parent.name, Path(a.moving[0]).name, Path(a.output).name) == ("010", "0x1F", "012")
    # Unsafe tags stay refused; a list where one value goes is refused with its row.
    marker = tmp_path / "ran"
    (tmp_path / "bad.yaml").write_text(f"- {{subject: !!python/object/apply:os.system ['touch {marker}'], "
                                       "fixed: a, moving: b, output: c}\n")
    with pytest.raises(UnreadableFileError):
        read_manifest(tmp_path / "bad.yaml")
    assert not marker.exists()
    (tmp_path / "list.yaml").write_text("- {subject: [a, b], fixed: a, moving: b, output: c}\n")
    with pytest.raises(InvalidInputError, match="row 1: 'subject' holds a list"):
        read_manifest(tmp_path / "list.yaml")
    (tmp_path / "defaults.yaml").write_text("defaults: rigid\nsubjects:\n  - {subject: a, fixed: a, moving: b, "
                                            "output: c}\n")
    with pytest.raises(InvalidInputError, match="defaults must be a mapping"):  # was an AttributeError
        read_manifest(tmp_path / "defaults.yaml")


# ----------------------------------------------------------------------------- 3. symlinked manifest
def test_symlinked_manifest_counts_paths_from_the_links_folder_as_its_report(tmp_path, phantom):
    """Relative paths counted from the link target's folder, while the report went beside the link."""
    here = tmp_path / "here"
    shutil.copytree(phantom, here / "sub-01")
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "m.csv"
    target.write_text("subject,fixed,moving,output\ns1,sub-01/mr_t1.nii.gz,sub-01/pet.nii.gz,out/s1.nii.gz\n")
    link = here / "m.csv"
    link.symlink_to(target)
    s, = read_manifest(link)
    assert Path(s.fixed) == here / "sub-01" / "mr_t1.nii.gz" and Path(s.output) == here / "out" / "s1.nii.gz"
    summary = run_batch(link, scheduler="synchronous", method="mean")
    assert summary.results[0].status == "done", summary.results[0].error
    assert summary.report_path == here / "m-report.csv" and (here / "out" / "s1.nii.gz").is_file()
    assert not (tmp_path / "elsewhere" / "out").exists()


# ----------------------------------------------------------------------------- 4. --overwrite and up-to-date outputs
def test_overwrite_replaces_unverified_outputs_only_and_the_docs_say_so(tmp_path):
    """The docs said --overwrite redoes up-to-date outputs made by an older version; it never did. The design
    (CLI help: "redo subjects whose outputs exist but are not verified by their sidecar") keeps it so: the fix of an
    unverified output's error is "rerun with --overwrite", which must not redo every other subject."""
    manifest = write_phantom_subjects(tmp_path, 1, register=None, method="mean")
    out = Path(read_manifest(manifest)[0].output)
    assert run_batch(manifest, scheduler="synchronous").results[0].status == "done"
    mtime = out.stat().st_mtime_ns
    again = run_batch(manifest, scheduler="synchronous", overwrite=True)
    assert again.results[0].status == "skipped" and out.stat().st_mtime_ns == mtime
    out.unlink()  # what the docs now tell: delete the outputs to redo them with a new version
    assert run_batch(manifest, scheduler="synchronous").results[0].status == "done"
    docs = " ".join((ROOT / "docs" / "pipeline.md").read_text(encoding="utf-8").split())
    promises = "so pass `--overwrite`, or delete the outputs, to redo them" in docs
    says_so = "`--overwrite` does not do it" in docs
    assert not promises and says_so


# ----------------------------------------------------------------------------- 5. advice a batch row can follow
def test_disjoint_fields_of_view_get_advice_a_batch_can_follow(tmp_path, phantom):
    """register none said "register='rigid' with initialise='geometry'", --register rigid "pass initialise='geometry'
    ... or initial_transform=": no manifest or batch option has them."""
    from medfuse.volume import Volume

    shutil.copy(phantom / "mr_t1.nii.gz", tmp_path / "mr_t1.nii.gz")
    pet = medfuse.load(phantom / "pet.nii.gz")
    far = pet.affine.copy()
    far[:3, 3] += 3000.0  # 3 m away: the fields of view do not meet
    medfuse.save(Volume(pet.array, far, modality="PT", unit=pet.unit), tmp_path / "pet.nii.gz")
    (tmp_path / "m.csv").write_text("subject,fixed,moving,output,register\n"
                                    "s1,mr_t1.nii.gz,pet.nii.gz,out/s1/f.nii.gz,none\n"
                                    "s2,mr_t1.nii.gz,pet.nii.gz,out/s2/f.nii.gz,rigid\n")
    summary = run_batch(tmp_path / "m.csv", scheduler="synchronous", method="mean")
    assert [r.status for r in summary.results] == ["failed", "failed"]
    for r in summary.results:
        assert r.error.startswith(f"{tmp_path / 'pet.nii.gz'}: "), r.error  # the file first, as other errors
        assert "medfuse register FIXED MOVING --initialise geometry" in r.error and "register none" in r.error
        assert not re.search(r"initialise='|initial_transform=|register='", r.error), r.error
    # The advice works: the registered image, listed with register none, fuses.
    done = subprocess.run([*MEDFUSE, "register", str(tmp_path / "mr_t1.nii.gz"),
                           str(tmp_path / "pet.nii.gz"), "--initialise", "geometry", "-o",
                           str(tmp_path / "pet_on_mr.nii.gz"), "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (tmp_path / "m2.csv").write_text("subject,fixed,moving,output,register\n"
                                     "s1,mr_t1.nii.gz,pet_on_mr.nii.gz,out/s1/f.nii.gz,none\n")
    assert run_batch(tmp_path / "m2.csv", scheduler="synchronous", method="mean").results[0].status == "done"


# ----------------------------------------------------------------------------- smaller ones
def test_a_failed_subject_leaves_no_empty_output_folder(tmp_path, phantom):
    shutil.copytree(phantom, tmp_path / "sub-01")
    (tmp_path / "kept").mkdir()  # empty before the run: not the run's to remove
    (tmp_path / "m.csv").write_text("subject,fixed,moving,output\n"
                                    "bad,sub-01/mr_t1.nii.gz,sub-01/nope.nii.gz,out/bad/deep/f.nii.gz\n"
                                    "bad2,sub-01/mr_t1.nii.gz,sub-01/nope.nii.gz,kept/f.nii.gz\n"
                                    "bad3,sub-01/mr_t1.nii.gz,sub-01/nope.nii.gz,shared/b.nii.gz\n"
                                    "good,sub-01/mr_t1.nii.gz,sub-01/pet.nii.gz,shared/g.nii.gz\n")
    summary = run_batch(tmp_path / "m.csv", scheduler="synchronous", method="mean")
    assert [r.status for r in summary.results] == ["failed", "failed", "failed", "done"]
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "kept").is_dir() and (tmp_path / "shared" / "g.nii.gz").is_file()


def test_report_quotes_normalised_paths(tmp_path, phantom):
    """A manifest's ../out/s1.nii.gz was quoted as /d/ds/../out/s1.nii.gz in the report and the table."""
    shutil.copytree(phantom, tmp_path / "ds" / "sub-01")
    (tmp_path / "ds" / "m.csv").write_text("subject,fixed,moving,output\n"
                                           "s1,./sub-01/../sub-01/mr_t1.nii.gz,sub-01/pet.nii.gz,../out/s1.nii.gz\n")
    summary = run_batch(tmp_path / "ds" / "m.csv", scheduler="synchronous", method="mean")
    row, = _rows(summary.report_path)
    assert row["status"] == "done"
    assert row["output"] == os.fspath(tmp_path / "out" / "s1.nii.gz")
    assert row["inputs"].split(";") == [os.fspath(tmp_path / "ds" / "sub-01" / n) for n in ("mr_t1.nii.gz",
                                                                                          "pet.nii.gz")]
    assert "/../" not in summary.table() and "/./" not in summary.table()
    # A dataset folder given with a ".." too.
    study = _dataset(phantom, tmp_path / "study", 1)
    (tmp_path / "study" / "x").mkdir()
    summary = run_batch(os.fspath(study / "x" / ".." ), scheduler="synchronous", method="mean",
                        out_dir=os.fspath(study / "x" / ".." / "o"))
    assert summary.results[0].output == os.fspath(study / "o" / "sub-01_fused.nii.gz")


def test_the_summary_says_why_fewer_workers_ran_than_asked(tmp_path, phantom):
    """--workers 2 with one subject said "on 1 worker(s)", which read as a bug."""
    pytest.importorskip("distributed")
    shutil.copytree(phantom, tmp_path / "sub-01")
    (tmp_path / "m.csv").write_text("subject,fixed,moving,output\ns1,sub-01/mr_t1.nii.gz,sub-01/pet.nii.gz,o.nii.gz\n")
    summary = run_batch(tmp_path / "m.csv", workers=2, method="mean")
    assert summary.workers == 1 and summary.workers_asked == 2
    assert "on 1 worker(s) (2 asked; never more workers than subjects)" in summary.table()


# ----------------------------------------------------------------------------- outputs, reports and rows that collide
def _manifest(tmp_path: Path, phantom: Path, rows) -> Path:
    m = tmp_path / "m.csv"
    m.write_text("subject,fixed,moving,output,method\n" + "".join(
        f"{s},{phantom / 'mr_t1.nii.gz'},{phantom / 'pet.nii.gz'},{out},{method}\n" for s, out, method in rows))
    return m


def test_an_output_inside_another_rows_dicom_output_is_refused_before_any_work(tmp_path, phantom):
    """The run wrote both ("done", exit 0); the series folder then held a NIfTI and its row failed on every rerun,
    with --overwrite too."""
    m = _manifest(tmp_path, phantom, [("d1", "res/dcm", ""), ("d2", "res/dcm/x.nii.gz", "")])
    with pytest.raises(InvalidInputError, match="lies inside output"):
        run_batch(m, scheduler="synchronous", method="mean")
    assert not (tmp_path / "res").exists()


def test_a_report_path_that_is_an_outputs_sidecar_or_not_a_table_is_refused(tmp_path, phantom):
    """--report res/r1.json beside the output res/r1.nii.gz took the place of its provenance sidecar."""
    m = _manifest(tmp_path, phantom, [("r1", "res/r1.nii.gz", ""), ("r2", "res/dcm", "")])
    for report, match in (("res/r1.json", "provenance sidecar"), ("res/dcm/report.csv", "an output"),
                          ("report.xlsx", "'.xlsx'")):
        with pytest.raises(InvalidInputError, match=match):
            run_batch(m, scheduler="synchronous", method="mean", report=tmp_path / report)
    assert not (tmp_path / "res").exists() and not (tmp_path / "report.xlsx").exists()


def test_a_misspelt_method_in_a_row_is_refused_with_its_row(tmp_path, phantom):
    m = _manifest(tmp_path, phantom, [("a", "res/a.nii.gz", "mean"), ("b", "res/b.nii.gz", "lapacian")])
    with pytest.raises(InvalidInputError, match="row 3.*unknown method 'lapacian'"):
        read_manifest(m)


def test_a_sidecar_path_holding_a_json_list_is_a_typed_refusal(tmp_path, phantom):
    """A list of the user's notes at the sidecar path: "internal error AttributeError: 'list' object has no
    attribute 'get'"."""
    res = tmp_path / "res"
    res.mkdir()
    shutil.copy(phantom / "mr_t1.nii.gz", res / "r.nii.gz")
    (res / "r.json").write_text('["my notes"]')
    m = _manifest(tmp_path, phantom, [("r", "res/r.nii.gz", "")])
    summary = run_batch(m, scheduler="synchronous", method="mean")
    (row,) = summary.results
    assert row.status == "failed" and "internal error" not in row.error and "--overwrite" in row.error
    assert (res / "r.json").read_text() == '["my notes"]'


def test_a_subject_dicts_single_moving_path_is_one_input(tmp_path, phantom):
    """moving='pet.nii.gz' was split into characters: "." became the working folder, "/" the whole disk."""
    out = tmp_path / "o" / "x.nii.gz"
    summary = run_batch([dict(subject="x", fixed=str(phantom / "mr_t1.nii.gz"), moving=str(phantom / "pet.nii.gz"),
                              output=str(out))], scheduler="synchronous", method="mean")
    assert [r.status for r in summary.results] == ["done"] and out.exists()


def test_a_subject_stopped_mid_write_is_reported_as_such(tmp_path):
    """SIGTERM while a worker wrote sub-02: its row said "not run: the batch was cancelled", though it had run and
    was stopped mid-save (its sidecar marked in progress, temporaries left for the next run to clean up)."""
    import json
    import time

    from medfuse.batch import Subject, _stopped_while_writing

    out = tmp_path / "sub-02.nii.gz"
    s = Subject(subject="sub-02", fixed="", moving=[], output=str(out))
    since = time.time() - 5
    side = tmp_path / "sub-02.json"
    side.write_text(json.dumps({"medfuse": "x", "output": {"path": str(out), "sha256": None, "in_progress": True}}))
    row = _stopped_while_writing(s, since)
    assert row.status == "cancelled" and "stopped while its output was being written" in row.error
    assert _stopped_while_writing(s, time.time() + 60) is None  # marked before this run: not this run's doing
    side.write_text(json.dumps({"medfuse": "x", "output": {"path": str(out), "sha256": "ab"}}))
    assert _stopped_while_writing(s, since) is None
