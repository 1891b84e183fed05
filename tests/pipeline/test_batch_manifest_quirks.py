"""medfuse batch: what spreadsheets leave in a manifest (blank and empty rows, a nameless column, blank lines
above the header) and the row numbers errors give; reruns after a thread-count change; a --report in a missing
folder."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.batch import read_manifest, run_batch
from medfuse.errors import InvalidInputError, OutputWriteError
from medfuse.volume import Volume

HEADER = "subject,fixed,moving,output"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A tiny MR + PET pair (16^3 voxels): a subject fuses in well under a second with method mean."""
    root = tmp_path_factory.mktemp("tiny")
    a = np.zeros((16, 16, 16), np.float32)
    a[4:12, 4:12, 4:12] = 1.0
    a += np.random.default_rng(0).random(a.shape).astype(np.float32) * 0.1
    medfuse.save(Volume(a, np.eye(4), modality="MR"), root / "t1.nii.gz")
    medfuse.save(Volume(a[::-1].copy(), np.eye(4), modality="PT"), root / "pet.nii.gz")
    return root


def _write(folder: Path, text: str, name: str = "m.csv") -> Path:
    m = folder / name
    m.write_text(text, encoding="utf-8")
    return m


def _row(subject: str, images: Path, output: str, sep: str = ",") -> str:
    return sep.join([subject, os.fspath(images / "t1.nii.gz"), os.fspath(images / "pet.nii.gz"), output])


# ----------------------------------------------------------------------------- 1. row numbers
def test_errors_name_the_row_a_spreadsheet_shows_blank_lines_counted(tmp_path):
    """Rows were counted in the list of rows the reader gave (blank lines skipped): the bad row on line 6 was
    called "manifest row 3"."""
    m = _write(tmp_path, "subject,fixed,moving,output,method\n\n\na,T1.nii,PET.nii,o/a.nii.gz,mean\n\n"
                         "b,T1.nii,PET.nii,o/b.nii.gz,meen\n")
    with pytest.raises(InvalidInputError, match="manifest row 6: unknown method 'meen'"):
        read_manifest(m)
    m = _write(tmp_path, f"{HEADER}\n\na,x,y,o/a.nii.gz\n\n\nb,x,,o/b.nii.gz\n")
    assert read_manifest(m)[1].problem.startswith("manifest row 6: unpaired")


def test_rows_named_twice_are_named_by_their_lines(tmp_path):
    m = _write(tmp_path, f"{HEADER}\n\na,x,y,o/a.nii.gz\n\nb,x,y,o/b.nii.gz\n\na,x,y,o/c.nii.gz\n")
    with pytest.raises(InvalidInputError, match=r"row 3 \('a'\) and row 7 \('a'\): subject 'a' appears twice"):
        read_manifest(m)
    m = _write(tmp_path, f"{HEADER}\n\na,x,y,o/a.nii.gz\n\nb,x,y,o/a.nii.gz\n")
    with pytest.raises(InvalidInputError, match=r"row 3 \('a'\) and row 5 \('b'\): output .* appears twice"):
        read_manifest(m)


# ----------------------------------------------------------------------------- 2. Excel's empty rows and columns
@pytest.mark.parametrize("sep", [",", ";"])
def test_empty_rows_and_rows_of_spaces_are_skipped_like_blank_lines(tmp_path, sep):
    """Excel saves an empty row as ``,,,`` (``;;;;`` in a ';' locale): it was refused as "'subject' is missing"."""
    header = HEADER.replace(",", sep)
    m = _write(tmp_path, f"{header}\n{sep * 4}\na{sep}x{sep}y{sep}o/a.nii.gz\n   \n{sep * 3}\n"
                         f"b{sep}x{sep}y{sep}o/b.nii.gz\n \t \n")
    assert [s.subject for s in read_manifest(m)] == ["a", "b"]
    m = _write(tmp_path, f"{header}\n{sep * 3}\na{sep}x{sep}y{sep}o/a.nii.gz\n  {sep}  {sep}\nb{sep}x{sep}y{sep}\n")
    with pytest.raises(InvalidInputError, match="manifest row 5: 'output' is missing"):
        read_manifest(m)


def test_a_header_column_without_a_name_is_ignored_when_empty_else_named(tmp_path):
    """``subject,fixed,moving,output,`` (a trailing comma on every line) was refused as "unknown column(s) ''"."""
    m = _write(tmp_path, f"{HEADER},\na,x,y,o/a.nii.gz,\nb,x,y,o/b.nii.gz,\n")
    assert [s.subject for s in read_manifest(m)] == ["a", "b"]
    m = _write(tmp_path, f"{HEADER},,method\na,x,y,o/a.nii.gz,,mean\nb,x,y,o/b.nii.gz,,\n")
    assert [s.method for s in read_manifest(m)] == ["mean", None]
    m = _write(tmp_path, f"{HEADER},,\na,x,y,o/a.nii.gz,,\n\nb,x,y,o/b.nii.gz,,s01/ct.nii.gz\n")
    with pytest.raises(InvalidInputError, match="column 6 of the header has no name, but row 4 has a value") as e:
        read_manifest(m)
    assert "ct.nii.gz" not in str(e.value) and "name the column" in e.value.fix


# ----------------------------------------------------------------------------- 3. blank lines above the header
def test_blank_lines_above_the_header_are_skipped(tmp_path):
    """They were read as an empty header: "line 2 has more cells than the header"."""
    m = _write(tmp_path, f"\n\n{HEADER}\na,x,y,o/a.nii.gz\n")
    assert [s.subject for s in read_manifest(m)] == ["a"]
    m = _write(tmp_path, f"  \n;;;;\n{HEADER.replace(',', ';')}\na;x;y;o/a.nii.gz\n", name="semi.csv")
    assert [Path(s.output).name for s in read_manifest(m)] == ["a.nii.gz"]
    m = _write(tmp_path, f"\n\n{HEADER},method\na,x,y,o/a.nii.gz,meen\n")
    with pytest.raises(InvalidInputError, match="manifest row 4: unknown method"):
        read_manifest(m)
    m = _write(tmp_path, "\nsubject,fixed,moving\na,x,y\n")
    with pytest.raises(InvalidInputError, match="the CSV header lacks output"):
        read_manifest(m)


# ----------------------------------------------------------------------------- 4. threads and reruns
def test_a_thread_count_change_redoes_only_registered_subjects(tmp_path, images):
    """Without registration the ITK thread count changes nothing, yet --threads-per-worker 2 redid every subject
    ("parameters changed (register)") into byte-identical outputs."""
    m = _write(tmp_path, f"{HEADER},register\n{_row('a', images, 'o/a.nii.gz')},none\n"
                         f"{_row('b', images, 'o/b.nii.gz')},rigid\n")
    first = run_batch(m, scheduler="synchronous", method="mean", threads_per_worker=1)
    assert [r.status for r in first.results] == ["done", "done"]
    made = (tmp_path / "o" / "a.nii.gz").stat().st_mtime_ns
    again = run_batch(m, scheduler="synchronous", method="mean", threads_per_worker=2)
    a, b = again.results
    assert (a.status, a.note) == ("skipped", None)
    assert (tmp_path / "o" / "a.nii.gz").stat().st_mtime_ns == made
    # With a registration the threads still count: more than one makes the result vary.
    assert (b.status, b.note) == ("done", "redone: parameters changed (register)")
    # And the sidecar keeps recording what the run used (sidecars written before stay valid: nothing to redo).
    assert medfuse.provenance.read_sidecar(tmp_path / "o" / "a.nii.gz")["parameters"]["register"] == \
        {"kind": None, "threads": 1}


# ----------------------------------------------------------------------------- 5. --report in a missing folder
def test_a_report_in_a_missing_folder_is_refused_before_any_work(tmp_path, images):
    """``--report /nonexistent/dir/r.csv`` created the folders, where ``fuse -o missing/x.nii.gz`` refuses."""
    m = _write(tmp_path, f"{HEADER}\n{_row('a', images, 'o/a.nii.gz')}\n")
    with pytest.raises(OutputWriteError, match="the report's folder does not exist") as e:
        run_batch(m, scheduler="synchronous", method="mean", report=tmp_path / "typo" / "deeper" / "r.csv")
    assert e.value.errno == errno.ENOENT and "report=" in e.value.fix
    assert not (tmp_path / "typo").exists() and not (tmp_path / "o").exists()
    from medfuse.cli import main

    assert main(["batch", os.fspath(m), "--method", "mean", "--scheduler", "synchronous", "--no-progress",
                 "--report", os.fspath(tmp_path / "typo" / "r.csv")]) != 0
    assert not (tmp_path / "typo").exists() and not (tmp_path / "o").exists()


def test_a_report_in_the_outputs_folder_or_a_default_one_is_still_written(tmp_path, images):
    """The outputs' folder is made for the outputs anyway; default reports (beside the manifest, in a dataset's
    --out that batch creates) are written as before."""
    m = _write(tmp_path, f"{HEADER}\n{_row('a', images, 'o/sub/a.nii.gz')}\n")
    s = run_batch(m, scheduler="synchronous", method="mean", report=tmp_path / "o" / "r.csv")
    assert s.results[0].status == "done" and (tmp_path / "o" / "r.csv").is_file()
    assert run_batch(m, scheduler="synchronous", method="mean").report_path == tmp_path / "m-report.csv"
    study = tmp_path / "study"
    (study / "sub-01").mkdir(parents=True)
    for name in ("t1.nii.gz", "pet.nii.gz"):
        (study / "sub-01" / name).write_bytes((images / name).read_bytes())
    out = tmp_path / "new" / "out"  # made by batch
    s = run_batch(study, scheduler="synchronous", method="mean", out_dir=out)
    assert s.results[0].status == "done" and s.report_path == out / "batch-report.csv" and s.report_path.is_file()


def test_an_output_another_run_wrote_meanwhile_is_skipped_not_failed(tmp_path, images, monkeypatch):
    """Two batches of different manifests naming the same outputs each computed them; the later one failed every
    subject with "the output exists ... rerun with --overwrite", about valid, up-to-date outputs."""
    import medfuse.pipeline as P

    real = P.fuse_files

    def another_run_first(*args, **kwargs):  # the other batch finishes this output while this one computes it
        real(*args, **kwargs)
        return real(*args, **kwargs)

    m = _write(tmp_path, f"{HEADER}\n{_row('a', images, 'o/a.nii.gz')}\n")
    monkeypatch.setattr(P, "fuse_files", another_run_first)
    res = run_batch(m, scheduler="synchronous", method="mean").results[0]
    assert (res.status, res.error) == ("skipped", None)
    assert res.note == "written meanwhile by another run; its sidecar shows it up to date"
    # An output written meanwhile with other settings is still a failure (never replaced without --overwrite).
    (tmp_path / "o" / "a.nii.gz").unlink()

    def other_settings_first(*args, **kwargs):
        real(*args, **{**kwargs, "method": "max"})
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "fuse_files", other_settings_first)
    res = run_batch(m, scheduler="synchronous", method="mean").results[0]
    assert res.status == "failed" and "exists" in res.error


def test_a_column_named_twice_an_empty_yaml_entry_and_a_commas_row_in_a_semicolon_file(tmp_path):
    """'moving,moving' kept the second cell and dropped one image without a word; a bare '-' in a YAML list refused
    the whole manifest as "not a list of subjects"; a ',,,' row above a ';' header became the header."""
    m = _write(tmp_path, "subject,fixed,moving,Moving,output\na,f.nii,m1.nii,m2.nii,o/a.nii.gz\n")
    with pytest.raises(InvalidInputError, match=r"column 'moving' is named twice in the header \(columns 3 and 4\)"):
        read_manifest(m)
    y = _write(tmp_path, "- {subject: a, fixed: f.nii, moving: m.nii, output: a.nii.gz}\n-\n"
                         "- {subject: b, fixed: f.nii, moving: m.nii, output: b.nii.gz}\n", "m.yaml")
    assert [s.subject for s in read_manifest(y)] == ["a", "b"]
    y.write_text("- {subject: a, fixed: f.nii, moving: m.nii, output: a.nii.gz}\n- 3\n")
    with pytest.raises(InvalidInputError, match="entry 2 of the YAML manifest's list is not a subject"):
        read_manifest(y)
    s = _write(tmp_path, "\n,,,\nsubject;fixed;moving;output\na;f.nii;m.nii;o/a.nii.gz\n", "s.csv")
    assert [x.subject for x in read_manifest(s)] == ["a"]


def test_a_cell_naming_one_file_whose_name_holds_a_semicolon_is_that_file(images, tmp_path):
    """``"data/spect;1.nii.gz"`` (quoted or not) was split at the ``;`` and the error named ``data/spect``; a cell
    of two existing files stays two moving images."""
    import shutil

    odd = tmp_path / "pet;1.nii.gz"
    shutil.copy(images / "pet.nii.gz", odd)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'{HEADER}\ns1,{images / "t1.nii.gz"},"{odd}",out/s1.nii.gz\n'
                        f's2,{images / "t1.nii.gz"},{images / "pet.nii.gz"};{odd},out/s2.nii.gz\n')
    one, two = read_manifest(manifest)
    assert one.moving == [os.fspath(odd)]
    assert two.moving == [os.fspath(images / "pet.nii.gz"), os.fspath(odd)]
