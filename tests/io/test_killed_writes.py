"""Writes killed for real (``os._exit`` in a subprocess: no handler, no ``finally``) leave only hidden temporaries
named after their target, which the next write to that target removes; a live writer's temporaries are never
touched, nor anything else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import medfuse.io._atomic as atomic
from medfuse import Volume
from medfuse import provenance as prov
from medfuse.batch import read_manifest, run_batch, write_phantom_subjects
from medfuse.io import load, save

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_volumes"


def _medfuse_files(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".medfuse-"))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def vol():
    return Volume(np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3), np.diag([1.0, 1.0, 2.0, 1.0]), modality="CT",
                  unit="HU")


# ----------------------------------------------------------------------------- 1. a sidecar's own write
_KILL_IN_SIDECAR = """
    import os, sys
    from pathlib import Path
    import medfuse.provenance as prov
    from medfuse.batch import run_batch
    manifest, method, nth, report = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    side = os.fspath(prov.sidecar_path(Path(manifest).parent / "out" / "sub-01_fused.nii.gz"))
    real, n = os.replace, [0]
    def replace(src, dst, *a, **k):
        if os.fspath(dst) == side:
            n[0] += 1
            if n[0] == nth:  # the sidecar's temporary file is written and flushed, not yet in place
                os._exit(9)
        return real(src, dst, *a, **k)
    os.replace = replace
    run_batch(manifest, scheduler="synchronous", method=method, register=None, report=report)
"""


@pytest.fixture(scope="module")
def one_subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    return write_phantom_subjects(root, 1, first_seed=5, register=None, downsample=4)


@pytest.mark.parametrize("fresh", [True, False], ids=["first-run", "redo"])
@pytest.mark.parametrize("nth", [1, 2], ids=["in-progress-sidecar", "final-sidecar"])
def test_a_kill_inside_a_sidecar_write_is_cleaned_by_a_plain_rerun(one_subject, tmp_path, nth, fresh):
    """A kill between the sidecar's temporary file and its rename left ``.medfuse-tmp-*.json`` beside the output
    for good; the rerun (no overwrite) removes it and ends with a matching output and sidecar."""
    root = tmp_path / "study"
    shutil.copytree(one_subject.parent, root)
    manifest, report = root / one_subject.name, root / "r.csv"
    out = root / "out" / "sub-01_fused.nii.gz"
    if not fresh:  # a finished output, made stale by another method: the killed run redoes it
        assert run_batch(manifest, scheduler="synchronous", method="max", register=None, report=report).n_done == 1
    killed = _run(_KILL_IN_SIDECAR, str(manifest), "mean", str(nth), str(report))
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert any(n.endswith(".json") for n in _medfuse_files(out.parent))  # the state this test is about
    r = run_batch(manifest, scheduler="synchronous", method="mean", register=None, report=report).results[0]
    assert r.status == "done" and r.error is None, (r.status, r.error)
    rec = prov.read_sidecar(out)
    assert rec["output"]["sha256"] == prov.hash_path(out) and rec["method_used"] == "mean"
    assert _medfuse_files(out.parent) == []


_KILL_IN_WRITER = """
    import os, sys
    import nibabel, pydicom
    from medfuse.batch import read_manifest, run_batch
    manifest, output, report = sys.argv[1], sys.argv[2], sys.argv[3]
    real_nib, real_dcm, n = nibabel.save, pydicom.Dataset.save_as, [0]
    def nib_save(img, path, *a, **k):
        real_nib(img, path, *a, **k)
        os._exit(9)  # the whole image is in the writer's own temporary file, not yet moved
    def dcm_save(self, path, *a, **k):
        real_dcm(self, path, *a, **k)
        n[0] += 1
        if n[0] == 3:
            os._exit(9)  # three slices of the series are written in the writer's temporary folder
    nibabel.save, pydicom.Dataset.save_as = nib_save, dcm_save
    s = read_manifest(manifest)[0]
    s.output = output
    run_batch([s], scheduler="synchronous", method="mean", register=None, report=report)
"""


@pytest.mark.parametrize("name", ["fused.nii.gz", "fused_dicom"])
def test_a_kill_inside_the_writer_of_a_pipeline_save_is_cleaned_by_a_plain_rerun(one_subject, tmp_path, name):
    """The pipeline saves into atomic_path(out)'s temporary file, and save() makes its own temporary for that one,
    named after the first one's random name: a kill while writing left it (the whole image, or part of a DICOM
    series) beside the output for good."""
    root = tmp_path / "study"
    shutil.copytree(one_subject.parent, root)
    manifest, report, out = root / one_subject.name, root / "r.csv", root / "out" / name
    out.parent.mkdir()
    killed = _run(_KILL_IN_WRITER, str(manifest), str(out), str(report))
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert _medfuse_files(out.parent)  # what the killed writer left
    s = read_manifest(manifest)[0]
    s.output = str(out)
    r = run_batch([s], scheduler="synchronous", method="mean", register=None, report=report).results[0]
    assert r.status == "done" and r.error is None, (r.status, r.error)
    assert _medfuse_files(out.parent) == []


# ----------------------------------------------------------------------------- 2. the .mhd/.nhdr pair writer
_KILL_IN_PAIR = """
    import os, sys
    import numpy as np
    from medfuse import Volume
    from medfuse.io import save
    import medfuse.io._atomic as atomic, medfuse.io.writers as writers
    vol = Volume(np.full((4, 5, 3), int(sys.argv[3]), np.int16), np.eye(4), modality="CT", unit="HU")
    real, n = writers._link_into_place, [0]
    def link(src, dst, **k):
        n[0] += 1
        if n[0] == int(sys.argv[2]):
            os._exit(9)  # the pair is written in its temporary folder; file n is about to take its name
        return real(src, dst, **k)
    writers._link_into_place = link
    save(vol, sys.argv[1], overwrite=True)
"""


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("kill_at", [1, 2], ids=["before-data", "before-header"])
def test_a_killed_pair_write_leaves_a_folder_the_next_write_removes(tmp_path, vol, suffix, existing, kill_at):
    """The header + data pair is written in a temporary folder beside the target; a kill left that folder for
    good. The next write to the header (here the same command again) removes it and writes the pair."""
    target = tmp_path / f"h{suffix}"
    if existing:
        save(vol, target)
    killed = _run(_KILL_IN_PAIR, str(target), str(kill_at), "7")
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert any(n.startswith(".medfuse-tmp-") and (tmp_path / n).is_dir() for n in _medfuse_files(tmp_path))
    with warnings.catch_warnings(record=True):  # an earlier pair put back first (kill mid-swap), then replaced
        warnings.simplefilter("always")
        save(Volume(np.full((4, 5, 3), 7, np.int16), np.eye(4), modality="CT", unit="HU"), target, overwrite=True)
    assert _medfuse_files(tmp_path) == []
    assert (load(target).array == 7).all()


_KILL_BEFORE_MOVE = """
    import os, sys
    import numpy as np
    from medfuse import Volume
    from medfuse.io import save
    import medfuse.io._atomic as atomic
    vol = Volume(np.full((4, 5, 3), 3, np.int16), np.eye(4), modality="CT", unit="HU")
    real = atomic.check_output
    def check(*a, recover=True, **k):
        if not recover:  # the last check before the move: the temporary file or folder is complete
            os._exit(9)
        return real(*a, recover=recover, **k)
    atomic.check_output = check
    save(vol, sys.argv[1], overwrite=True)
"""


@pytest.mark.parametrize("name", ["v.nii.gz", "v.mha", "series"])
def test_a_write_killed_before_its_move_leaves_a_temporary_the_next_write_removes(tmp_path, vol, name):
    """The same for a single file (atomic_path) and a DICOM series folder (atomic_dir)."""
    target = tmp_path / name
    killed = _run(_KILL_BEFORE_MOVE, str(target))
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert _medfuse_files(tmp_path) and not target.exists()
    save(vol, target)
    assert _medfuse_files(tmp_path) == [] and (load(target).array == vol.array).all()


# ----------------------------------------------------------------------------- 3. the in-progress sidecar
def test_the_in_progress_sidecar_is_written_once_per_save(tmp_path, monkeypatch):
    """SaveStep wrote the in-progress sidecar twice (before the temporary file existed, then naming it)."""
    import medfuse

    written = []
    real = prov.write_sidecar

    def spy(output, record, **k):
        written.append(json.loads(json.dumps(record["output"])))
        return real(output, record, **k)

    monkeypatch.setattr(prov, "write_sidecar", spy)
    out = tmp_path / "f.nii.gz"
    medfuse.fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", out, method="max")
    medfuse.fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", out, method="mean", overwrite=True)
    claims = [w for w in written if w.get("in_progress")]
    assert len(claims) == 2, written  # one per save (there were two: before the temporary file, and naming it)
    assert claims[0]["replaces_sha256"] is None and written.index(claims[1]) > written.index(claims[0]) + 1
    assert all("writing" not in w for w in written), written
    assert claims[1]["replaces_sha256"] and written[-1]["sha256"] == prov.hash_path(out)
    assert _medfuse_files(tmp_path) == []


def test_a_sidecar_of_an_older_version_naming_its_temporary_still_gets_it_removed(tmp_path):
    """Sidecars written before this version name the temporary file (``output.writing``); it is still removed."""
    import medfuse

    out = tmp_path / "f.nii.gz"
    medfuse.fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", out, method="max")
    rec = prov.read_sidecar(out)
    left = tmp_path / ".medfuse-tmp-k3j9x_2a.nii.gz"  # an old-style name: nothing in it says which output
    left.write_bytes(b"half")
    rec["output"].update(in_progress=True, replaces_sha256=rec["output"]["sha256"], writing=left.name)
    prov.sidecar_path(out).write_text(json.dumps(rec))
    medfuse.fuse_files(SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", out, method="mean", overwrite=True)
    assert _medfuse_files(tmp_path) == []
    assert prov.read_sidecar(out)["output"]["sha256"] == prov.hash_path(out)


# ----------------------------------------------------------------------------- 4. only what is provably stale
_HOLD = """
    import sys
    from medfuse.io._atomic import atomic_path
    with atomic_path(sys.argv[1], overwrite=True) as tmp:
        tmp.write_bytes(b"theirs")
        print(tmp.name, flush=True)
        sys.stdin.readline()  # a live writer, mid-write, until told to go on
"""


@pytest.mark.skipif(os.name != "posix", reason="the test holds a writer with a pipe")
def test_a_live_writers_temporary_is_kept_and_removed_once_it_is_killed(tmp_path):
    """Two processes writing one target: the one that writes second must not take the first one's temporary file
    for a leftover. Once that process is killed, the next write removes it."""
    target = tmp_path / "t.txt"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HOLD), str(target)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        theirs = tmp_path / proc.stdout.readline().strip()
        assert theirs.name.startswith(".medfuse-tmp-") and theirs.is_file(), theirs
        atomic.atomic_write_text(target, "mine", overwrite=True)
        assert theirs.read_bytes() == b"theirs" and target.read_text() == "mine"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs in it
        proc.communicate(timeout=60)
    assert theirs.exists()  # the kill left it
    atomic.atomic_write_text(target, "again", overwrite=True)
    assert _medfuse_files(tmp_path) == [] and target.read_text() == "again"


def test_a_live_writer_in_this_process_keeps_its_temporary(tmp_path):
    """A second write to the same target from this process (another thread) never removes the first's file."""
    target = tmp_path / "t.txt"
    with atomic.atomic_path(target, overwrite=True) as first:
        first.write_text("first")
        atomic.atomic_write_text(target, "second", overwrite=True)
        assert first.read_text() == "first"
    assert target.read_text() == "first" and _medfuse_files(tmp_path) == []


def test_only_this_targets_own_temporaries_are_removed(tmp_path):
    """Another output's leftover, an older version's unnamed temporary, and files that merely look like
    medfuse's are kept; a dead process's temporary of this target goes."""
    target = tmp_path / "a.nii.gz"
    other = tmp_path / "b.nii.gz"
    dead = _dead_pid()
    mine = tmp_path / (atomic._temp_prefix(target, pid=dead) + "x1y2z3_a.nii.gz")
    mine_dir = tmp_path / (atomic._temp_prefix(target, pid=dead) + "q9w8e7r6")
    theirs = tmp_path / (atomic._temp_prefix(other, pid=dead) + "x1y2z3_a.nii.gz")
    kept = [theirs, tmp_path / ".medfuse-tmp-k3j9x_2a.nii.gz", tmp_path / ".medfuse-tmp-notes.txt",
            tmp_path / (mine.name + ".bak")]
    for p in [mine, *kept]:
        p.write_bytes(b"x")
    mine_dir.mkdir()
    (mine_dir / "IM00001.dcm").write_bytes(b"x")
    link = tmp_path / (atomic._temp_prefix(target, pid=dead) + "l1nk0000")
    link.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep").write_bytes(b"x")
    atomic.atomic_write_bytes(target, b"new")
    assert not mine.exists() and not mine_dir.exists()
    assert all(p.read_bytes() == b"x" for p in kept)
    assert link.is_symlink() and (tmp_path / "elsewhere" / "keep").exists()


def test_a_temporary_from_another_machine_goes_only_when_old(tmp_path):
    """Whether another machine's (or an earlier boot's) writer is alive cannot be told: its temporary is removed
    only once nothing has touched it for a day."""
    target = tmp_path / "a.txt"
    key = atomic._target_key(target)
    recent = tmp_path / f".medfuse-tmp-{key}-00000000-4242-abc12345.txt"
    old = tmp_path / f".medfuse-tmp-{key}-00000000-4243-abc12345.txt"
    for p in (recent, old):
        p.write_bytes(b"x")
    day_ago = time.time() - atomic._FOREIGN_STALE_S - 60
    os.utime(old, (day_ago, day_ago))
    assert atomic._owner_key() != "00000000"
    atomic.atomic_write_text(target, "new")
    assert recent.exists() and not old.exists()


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_temporaries_of_earlier_versions_go_once_a_day_old(tmp_path, vol):
    """Names of medfuse before 2026-12-05 (``.medfuse-tmp-<random>``) say no target or writer: the next write in
    their folder removes them once untouched for a day, and keeps a fresh one (a live older medfuse may write it)."""
    old_file, old_dir, fresh = (tmp_path / ".medfuse-tmp-_rnnmdi1.json", tmp_path / ".medfuse-tmp-4bc74qnl",
                                tmp_path / ".medfuse-tmp-k2j4h5g6.nii.gz")
    old_file.write_text("{}")
    old_dir.mkdir()
    (old_dir / "f.mhd").write_text("ObjectType = Image\n")
    fresh.write_bytes(b"partial")
    lookalike = tmp_path / ".medfuse-tmp-notes.txt.bak"  # not a name medfuse makes
    lookalike.write_text("mine")
    users = tmp_path / ".medfuse-tmp-backup01"  # the name's shape, but a user's own folder: what it holds says so
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    day_ago = time.time() - 2 * 24 * 3600
    for p in (old_file, old_dir / "f.mhd", old_dir, lookalike, users / "notes.txt", users):
        os.utime(p, (day_ago, day_ago))
    save(vol, tmp_path / "out.nii.gz")
    assert sorted(_medfuse_files(tmp_path)) == sorted([fresh.name, lookalike.name, users.name])
    assert (users / "notes.txt").read_text() == "mine"
