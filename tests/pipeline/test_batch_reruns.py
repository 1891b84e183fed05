"""Patient names in reruns' reports, outputs sharing a sidecar, a kill while redoing an
output, and Ctrl-C with a local Dask cluster."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medfuse import provenance as prov
from medfuse.batch import Subject, read_manifest, run_batch, write_phantom_subjects
from medfuse.errors import InvalidInputError, OutputExistsError

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_volumes"
NAME = "DOE^JOHN"




# ----------------------------------------------------------------------------- 1. names in the report
@pytest.fixture(scope="module")
def named_dataset(tmp_path_factory, patients):
    """P001 holds a PET folder named after its patient; a second subject's own folder is its patient's name."""
    root = tmp_path_factory.mktemp("named") / "study"
    (root / "P001").mkdir(parents=True)
    shutil.copy(SAMPLES / "mr_t1.nii.gz", root / "P001" / "mr_t1.nii.gz")
    patients.named_pet(root / "P001" / NAME, NAME, "PID12345")
    (root / "DOE^JANE").mkdir()
    shutil.copy(SAMPLES / "mr_t1.nii.gz", root / "DOE^JANE" / "mr_t1.nii.gz")
    patients.named_pet(root / "DOE^JANE" / "pet", "DOE^JANE", "PID999")
    return root


def test_rerun_report_and_summary_never_show_the_patient_name(named_dataset, patients):
    """The second run skips both subjects: their rows quoted DOE^JOHN in ``inputs`` (the blanking ran only for
    subjects that were fused), and a subject folder named DOE^JANE showed that name as subject and output."""
    summaries = [run_batch(named_dataset, scheduler="synchronous", register=None, method="max") for _ in range(2)]
    assert [r.status for r in summaries[0].results] == ["done", "done"]
    assert [r.status for r in summaries[1].results] == ["skipped", "skipped"]
    report = summaries[1].report_path.read_text(encoding="utf-8")
    for s in summaries:
        assert not patients.leaks(s.table()), s.table()
    assert not patients.leaks(report), report
    rows = list(csv.DictReader(report.splitlines()))
    assert len(rows) == 2 and len({r["subject"] for r in rows}) == 2
    blanked = [r for r in rows if "[removed]" in r["subject"]]
    # The blanked subject is named by its position among the subjects (stable between runs).
    assert len(blanked) == 1 and blanked[0]["subject"].endswith("#1") and blanked[0]["status"] == "skipped"
    assert all("[removed]" in r["inputs"] for r in rows)


# ----------------------------------------------------------------------------- 2. a sidecar taken over
def test_second_output_sharing_the_sidecar_is_refused(tmp_path):
    """fuse -o s.nii.gz, then fuse -o s.mha: the second replaced s.json, and s.nii.gz lost its provenance."""
    import medfuse

    out = tmp_path / "s.nii.gz"
    medfuse.fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", out, method="max")
    before = (tmp_path / "s.json").read_text()
    for other, overwrite in ((tmp_path / "s.mha", False), (tmp_path / "s.mha", True), (tmp_path / "s", True)):
        with pytest.raises(OutputExistsError, match="belongs to s.nii.gz") as e:
            medfuse.fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", other, method="mean",
                               overwrite=overwrite)
        assert "another output name" in e.value.fix
        assert not other.exists()
    assert (tmp_path / "s.json").read_text() == before
    # Once that output is gone its sidecar is stale, and the new output may take the name.
    out.unlink()
    medfuse.fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", tmp_path / "s.mha", method="mean")
    assert json.loads((tmp_path / "s.json").read_text())["output"]["path"].endswith("s.mha")


@pytest.mark.parametrize("a, b, words", [
    ("out/x.nii.gz", "out/../out/x.nii.gz", "are one file"),
    ("out/x.nii.gz", "out/X.nii.gz", "letter case"),
    ("out/s.nii.gz", "out/s.mha", "share one provenance sidecar"),
    ("out/s.nii.gz", "out/s", "share one provenance sidecar"),
    ("out/a.nii.gz", "in/mr.nii.gz", "output .* is the other row's input"),
    ("out/a.nii.gz", "in/pet/x.nii.gz", "output .* is the other row's input"),
    ("in/notes.nii.gz", "out/b.nii.gz", "the sidecar of output .* is the other row's input"),
])
def test_manifest_rows_that_would_collide_are_refused_before_any_work(tmp_path, a, b, words, patients):
    """Outputs compared as strings let out/x.nii.gz and out/../out/x.nii.gz, or s.nii.gz and s.mha (one
    sidecar), both run and both be called done; an output (or its sidecar) that is another row's input
    replaced it. Refused when the manifest is read, naming both rows, the patient's name blanked."""
    (tmp_path / "in" / "pet").mkdir(parents=True)
    for f in ("mr.nii.gz", "mr.mha", "ct.nii.gz", "notes.json"):
        (tmp_path / "in" / f).write_bytes(b"x")
    patients.named_pet(tmp_path / "in" / "pet2", NAME, "PID12345")
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,fixed,moving,output\n"
                        f"s1,in/mr.nii.gz,in/pet,{a}\n"
                        f"DOE^JOHN,in/mr.mha,in/ct.nii.gz;in/notes.json;in/pet2,{b}\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=words) as e:
        read_manifest(manifest)
    assert "row 2" in str(e.value) and "row 3" in str(e.value) and not patients.leaks(str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()


def test_list_outputs_sharing_a_sidecar_fail_before_any_work(tmp_path):
    """In a batch, out/s.nii.gz and out/s.mha were both 'done' and the next run failed."""
    subjects = [Subject("a", str(SAMPLES / "mr_t1.nii.gz"), [str(SAMPLES / "spect.nii.gz")], str(tmp_path / "s.nii.gz")),
                Subject("b", str(SAMPLES / "mr_t2.nii.gz"), [str(SAMPLES / "spect.nii.gz")], str(tmp_path / "s.mha"))]
    with pytest.raises(InvalidInputError, match="subject 1 .* and subject 2 .*share one provenance sidecar"):
        run_batch(subjects, scheduler="synchronous", method="max", report=tmp_path / "r.csv")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 3. a kill while redoing
_KILLER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import medfuse.io, medfuse.provenance as prov
    from medfuse.batch import run_batch
    manifest, method, point = sys.argv[1], sys.argv[2], sys.argv[3]
    out = str(Path(manifest).parent / "out" / "sub-01_fused.nii.gz")
    side = str(prov.sidecar_path(out))
    real_replace, real_sidecar, real_save = os.replace, prov.write_sidecar, medfuse.io.save
    calls = []
    def replace(src, dst, *a, **k):
        if os.fspath(dst) == out and point == "before_replace":
            os._exit(9)
        real_replace(src, dst, *a, **k)
        if os.fspath(dst) == out and point == "after_replace":
            os._exit(9)
    def sidecar(*a, **k):
        calls.append(1)
        if point == "sidecar%d" % len(calls):
            os._exit(9)
        return real_sidecar(*a, **k)
    def save(vol, path, *a, **k):
        if point == "during_save":
            Path(path).write_bytes(b"half")
            os._exit(9)
        return real_save(vol, path, *a, **k)
    os.replace, prov.write_sidecar, medfuse.io.save = replace, sidecar, save
    s = run_batch(manifest, scheduler="synchronous", method=method, register=None, report=sys.argv[4])
    print([r.status for r in s.results])
""")


@pytest.fixture(scope="module")
def one_subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    manifest = write_phantom_subjects(root, 1, first_seed=5, register=None, downsample=4)
    return manifest


@pytest.mark.parametrize("point", ["sidecar1", "during_save", "sidecar2", "before_replace", "after_replace",
                                   "sidecar3"])  # a save writes 3 sidecars: the claim, before and after the rename
def test_a_kill_anywhere_while_redoing_is_recovered_by_a_plain_rerun(one_subject, tmp_path, point):
    """A kill -9 between the new sidecar and the rename left the old output with the new sidecar, and the rerun
    failed "not verified by its provenance sidecar ... rerun with --overwrite". Every point of the save work:
    the rerun (no overwrite) ends with a matching pair, and no temporary file is left."""
    root = tmp_path / "study"
    shutil.copytree(one_subject.parent, root)
    manifest = root / one_subject.name
    out = root / "out" / "sub-01_fused.nii.gz"
    report = root / "r.csv"
    assert run_batch(manifest, scheduler="synchronous", method="max", register=None, report=report).n_done == 1
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    # A changed method makes the output stale: the run redoes it, and is killed at `point`.
    killed = subprocess.run([sys.executable, str(script), str(manifest), "mean", point, str(report)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    summary = run_batch(manifest, scheduler="synchronous", method="mean", register=None, report=report)
    r = summary.results[0]
    assert r.status in ("done", "skipped") and r.error is None, (r.status, r.error)
    rec = prov.read_sidecar(out)
    assert rec["output"]["sha256"] == prov.hash_path(out)
    assert rec["parameters"]["fuse"]["method"] == "mean" and rec["method_used"] == "mean"
    assert prov.is_up_to_date(out, input_paths=[*summary.results[0].inputs.split(";")])
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".medfuse-")]


_KILL_MHD = textwrap.dedent("""
    import os, sys
    import medfuse.provenance as prov
    from medfuse.batch import Subject, run_batch
    real, before = prov.write_sidecar, prov.hash_path(sys.argv[3])
    def sidecar(*a, **k):
        if prov.hash_path(sys.argv[3]) != before:  # the new header + data pair is in place, its sidecar not yet
            os._exit(9)
        return real(*a, **k)
    prov.write_sidecar = sidecar
    s = Subject("a", sys.argv[1], [sys.argv[2]], sys.argv[3])
    run_batch([s], scheduler="synchronous", method=sys.argv[4], report=sys.argv[5])
""")


def test_a_kill_after_a_metaimage_pair_is_written_is_recovered(tmp_path):
    """A .mhd/.raw pair is placed by its writer before the sidecar is written: a kill between the two left a
    new output that no sidecar verified, and the rerun refused it."""
    out = tmp_path / "f.mhd"
    subject = [Subject("a", str(SAMPLES / "mr_t1.nii.gz"), [str(SAMPLES / "spect.nii.gz")], str(out))]
    run_batch(subject, scheduler="synchronous", method="max", report=tmp_path / "r.csv")
    script = tmp_path / "k.py"
    script.write_text(_KILL_MHD)
    killed = subprocess.run([sys.executable, str(script), subject[0].fixed, subject[0].moving[0], str(out), "mean",
                             str(tmp_path / "r.csv")], capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    r = run_batch(subject, scheduler="synchronous", method="mean", report=tmp_path / "r.csv").results[0]
    assert r.status == "done" and "interrupted" in (r.note or ""), (r.status, r.error)
    assert prov.read_sidecar(out)["output"]["sha256"] == prov.hash_path(out)


def test_a_failed_redo_leaves_the_earlier_output_with_its_own_sidecar(tmp_path, monkeypatch):
    """A save that fails (an error, not a kill) keeps the earlier output, and now its own sidecar too (the new
    run's sidecar was left describing an output that was never put in place)."""
    import medfuse
    import medfuse.io

    out = tmp_path / "f.nii.gz"
    medfuse.fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", out, method="max")
    before, data = (tmp_path / "f.json").read_text(), out.read_bytes()

    real = os.replace

    def broken(src, dst, *a, **k):  # the last step, once the new output and its sidecar are written
        if os.fspath(dst) == os.fspath(out):
            raise OSError(5, "Input/output error")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(Exception):
        medfuse.fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", out, method="mean", overwrite=True)
    assert out.read_bytes() == data and (tmp_path / "f.json").read_text() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".medfuse-")]


# ----------------------------------------------------------------------------- 4. Ctrl-C
_CLUSTER = textwrap.dedent("""
    import signal, sys
    def mine(signum, frame):
        pass
    if __name__ == "__main__":
        from medfuse.batch import _client
        signal.signal(signal.SIGINT, mine)
        client, cluster = _client("local", 2, 1)
        try:
            seen = client.run(lambda: signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
            print(len(seen), all(seen.values()), signal.getsignal(signal.SIGINT) is mine)
        finally:
            client.close(); cluster.close()
""")


@pytest.mark.skipif(os.name != "posix", reason="process groups and SIGINT are POSIX")
def test_local_workers_ignore_sigint_and_the_caller_keeps_its_handler(tmp_path):
    """The workers start with SIGINT ignored (the batch process handles a cancel); the caller's handler is
    back once the cluster is up."""
    pytest.importorskip("distributed")
    script = tmp_path / "cluster.py"
    script.write_text(_CLUSTER)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert run.stdout.split() == ["2", "True", "True"], run.stderr[-3000:]


@pytest.mark.skipif(os.name != "posix", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_to_the_process_group_prints_no_worker_tracebacks(tmp_path):
    """Ctrl-C in a terminal signals the whole process group: Dask's worker and nanny processes printed their own
    KeyboardInterrupt/CancelledError tracebacks (~33 lines) under medfuse's message."""
    pytest.importorskip("distributed")
    manifest = write_phantom_subjects(tmp_path, 2, first_seed=1, register="rigid", downsample=2)
    medfuse_cli = [sys.executable, "-c", "import sys; from medfuse.cli import main; sys.exit(main(sys.argv[1:]))"]
    proc = subprocess.Popen([*medfuse_cli, "batch", str(manifest), "--workers", "2", "--no-progress",
                             "--method", "laplacian"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        # Until both worker processes (children of the CLI's process) have started and imported medfuse.
        while time.monotonic() < deadline and proc.poll() is None:
            kids = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "multiprocessing"], capture_output=True,
                                  text=True).stdout.split()
            if len(kids) >= 2:
                break
            time.sleep(0.1)
        time.sleep(2.0)  # into the subjects' work
        assert proc.poll() is None, "the batch ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in err and "Dask Worker process" not in err, err[-3000:]


def test_links_to_folders_above_a_subject_are_not_followed(tmp_path, samples_dir):
    """sub-01/up -> ../.. made a subject see its siblings' images; sub-02/root -> / walked the whole disk."""
    from medfuse.batch import discover_subject

    ds = tmp_path / "ds"
    for sub in ("sub-01", "sub-02"):
        (ds / sub).mkdir(parents=True)
        shutil.copy(samples_dir / "mr_t1.nii.gz", ds / sub / "mr_t1.nii.gz")
        shutil.copytree(samples_dir / "pet", ds / sub / "pet")
    want = discover_subject(ds / "sub-01")
    os.symlink("../..", ds / "sub-01" / "up")
    os.symlink(os.path.abspath(os.sep), ds / "sub-01" / "root")
    os.symlink(".", ds / "sub-01" / "here")
    assert discover_subject(ds / "sub-01") == want


# ----------------------------------------------------------------------------- 5. an output that is its own input
def test_a_row_whose_output_is_its_own_input_is_refused_up_front(tmp_path):
    """`a,t1.nii,pet.nii,pet.nii` failed with "not verified by its provenance sidecar... rerun with --overwrite", and
    --overwrite then failed with "refusing to write onto the volume's own source"."""
    import hashlib

    shutil.copy(SAMPLES / "mr_t1.nii.gz", tmp_path / "t1.nii.gz")
    shutil.copy(SAMPLES / "spect.nii.gz", tmp_path / "pet.nii.gz")
    sha = hashlib.sha256((tmp_path / "pet.nii.gz").read_bytes()).hexdigest()
    manifest = tmp_path / "self.csv"
    manifest.write_text("subject,fixed,moving,output\na,t1.nii.gz,pet.nii.gz,pet.nii.gz\n")
    with pytest.raises(InvalidInputError) as e:
        read_manifest(manifest)
    text = e.value.one_line()
    assert "row 2 ('a'): output" in text and "is its own input" in text and "overwrite" not in text, text
    # A list gets the same refusal before any work; run_subject alone fails the row with the right words.
    subject = Subject(subject="a", fixed=os.fspath(tmp_path / "t1.nii.gz"), moving=[os.fspath(tmp_path / "pet.nii.gz")],
                      output=os.fspath(tmp_path / "pet.nii.gz"))
    with pytest.raises(InvalidInputError, match="its own input"):
        run_batch([subject], scheduler="synchronous", report=tmp_path / "r.csv")
    from medfuse.batch import run_subject

    for overwrite in (False, True):
        row = run_subject(subject, {"method": "max", "overwrite": overwrite}, cancel=None)
        assert row["status"] == "failed" and "own input" in row["error"] and "--overwrite" not in row["error"]
    assert hashlib.sha256((tmp_path / "pet.nii.gz").read_bytes()).hexdigest() == sha


# ----------------------------------------------------------------------------- 6. a stale output not redone
def test_a_stale_output_whose_redo_fails_or_is_cancelled_says_it_is_still_there(tmp_path):
    """The row said "redone: inputs changed" while the old output, made from the old inputs, stayed in place with a
    sidecar that still verifies it."""
    import hashlib

    import nibabel as nib

    from medfuse.batch import run_subject
    from medfuse.progress import CancelToken

    shutil.copy(SAMPLES / "mr_t1.nii.gz", tmp_path / "t1.nii.gz")
    shutil.copy(SAMPLES / "spect.nii.gz", tmp_path / "spect.nii.gz")
    subject = Subject(subject="a", fixed=os.fspath(tmp_path / "t1.nii.gz"),
                      moving=[os.fspath(tmp_path / "spect.nii.gz")], output=os.fspath(tmp_path / "out" / "a.nii.gz"))
    options = {"method": "max", "cap_process_threads": False}
    assert run_subject(subject, options)["status"] == "done"
    out = tmp_path / "out" / "a.nii.gz"
    old = out.read_bytes()
    # New inputs: the SPECT doubled (its stale output is then redone)...
    img = nib.load(tmp_path / "spect.nii.gz")
    nib.save(nib.Nifti1Image(img.get_fdata() * 2, img.affine, img.header), tmp_path / "spect.nii.gz")
    token = CancelToken()
    token.cancel()  # ... and the redo cancelled
    row = run_subject(subject, options, cancel=token)
    assert row["status"] == "cancelled"
    assert row["note"] == "not redone (inputs changed): the old output is still there and stale", row
    # ... or failing: the SPECT damaged.
    (tmp_path / "spect.nii.gz").write_bytes((tmp_path / "spect.nii.gz").read_bytes()[:400])
    row = run_subject(subject, options)
    assert row["status"] == "failed" and row["note"].startswith("not redone (inputs changed): the old output is"), row
    # What the note says, checked on disk: the old output, which its sidecar still verifies.
    assert out.read_bytes() == old
    assert prov.read_sidecar(out)["output"]["sha256"] == hashlib.sha256(old).hexdigest()
    # A redo that succeeds keeps its note.
    shutil.copy(SAMPLES / "spect.nii.gz", tmp_path / "spect.nii.gz")
    nib.save(nib.Nifti1Image(img.get_fdata() * 3, img.affine, img.header), tmp_path / "spect.nii.gz")
    row = run_subject(subject, options)
    assert (row["status"], row["note"]) == ("done", "redone: inputs changed"), row
