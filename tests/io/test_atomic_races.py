"""Atomic writes under races and crashes: a file that appears at the target while medfuse writes is never
replaced, and what an overwrite killed mid-swap left behind is put back (or cleaned up) by the next write."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import medfuse.io._atomic as atomic
import medfuse.io.writers as writers
from medfuse import Volume
from medfuse.errors import MedfuseWarning, OutputExistsError
from medfuse.io import save
from medfuse.io._atomic import atomic_dir, atomic_write_text
from medfuse.io.nifti import load_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def vol():
    return Volume(np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3), np.diag([1.0, 1.0, 2.0, 1.0]), modality="CT",
                  unit="HU")


def _appear_at_check(monkeypatch, n: int, make) -> None:
    """Run ``make()`` right after the n-th output check passes: a file another program writes just then."""
    real, calls = atomic.check_output, [0]

    def check(*a, **k):
        out = real(*a, **k)
        calls[0] += 1
        if calls[0] == n:
            make()
        return out

    monkeypatch.setattr(atomic, "check_output", check)
    monkeypatch.setattr(writers, "check_output", check)


def _medfuse_files(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".medfuse-"))


# ----------------------------------------------------------------------------- no-clobber
def test_a_file_appearing_after_the_last_check_is_kept(tmp_path, vol, monkeypatch):
    out = tmp_path / "a.nii.gz"
    _appear_at_check(monkeypatch, 2, lambda: out.write_bytes(b"another program's output"))
    with pytest.raises(OutputExistsError, match="appeared"):
        save(vol, out)
    assert out.read_bytes() == b"another program's output" and _medfuse_files(tmp_path) == []


def test_without_hard_links_the_name_is_still_taken_exclusively(tmp_path, monkeypatch):
    """FAT/exFAT refuse hard links (EPERM): the fallback must refuse an existing target as well, and still write."""
    def no_links(a, b, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = atomic_write_text(tmp_path / "a.txt", "new")
    assert out.read_text() == "new" and _medfuse_files(tmp_path) == []
    theirs = tmp_path / "b.txt"
    _appear_at_check(monkeypatch, 2, lambda: theirs.write_text("theirs"))
    with pytest.raises(OutputExistsError, match="appeared"):
        atomic_write_text(theirs, "ours")
    assert theirs.read_text() == "theirs" and _medfuse_files(tmp_path) == []


@pytest.mark.parametrize("content", [False, True], ids=["empty-folder", "folder-with-a-file"])
def test_a_folder_appearing_after_the_last_check_is_kept(tmp_path, monkeypatch, content):
    """POSIX rename replaces an empty folder silently, and fails untyped on a full one: both are refused."""
    out = tmp_path / "series"

    def appear():
        out.mkdir()
        if content:
            (out / "theirs.dcm").write_text("theirs")

    _appear_at_check(monkeypatch, 2, appear)
    with pytest.raises(OutputExistsError, match="appeared"):
        with atomic_dir(out) as tmp:
            (tmp / "IM00001.dcm").write_text("ours")
    assert sorted(p.name for p in out.iterdir()) == (["theirs.dcm"] if content else [])
    assert _medfuse_files(tmp_path) == []


def test_a_header_appearing_during_a_pair_write_is_kept(tmp_path, vol, monkeypatch):
    out = tmp_path / "h.mhd"
    # checks: the header, then its data file; the header appears after the data file's check
    _appear_at_check(monkeypatch, 2, lambda: out.write_text("ObjectType = Image\n"))
    with pytest.raises(OutputExistsError):
        save(vol, out)
    assert out.read_text() == "ObjectType = Image\n" and sorted(os.listdir(tmp_path)) == ["h.mhd"]


# ----------------------------------------------------------------------------- leftovers of a killed overwrite
def _aside(target: Path) -> Path:
    """A leftover folder as an overwrite of ``target`` killed mid-swap leaves it."""
    d = target.parent / f"{atomic._aside_prefix(target)}abc123"
    d.mkdir()
    return d


def _series(folder: Path, tag: str) -> Path:
    folder.mkdir()
    for i in range(3):
        (folder / f"IM{i:05d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + tag.encode())
    return folder


def _contents(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("reserved", [False, True], ids=["target-missing", "target-empty-reserved-folder"])
def test_killed_before_the_new_series_was_in_place_the_old_one_comes_back(tmp_path, reserved):
    target = tmp_path / "series"
    old = _contents(_series(_aside(target) / "series", "old"))
    if reserved:
        target.mkdir()
    with pytest.warns(MedfuseWarning, match="put back"):
        with pytest.raises(OutputExistsError, match="output exists"):  # restored, so it exists: not overwritten
            with atomic_dir(target) as tmp:
                (tmp / "IM00001.dcm").write_text("new")
    assert _contents(target) == old and _medfuse_files(tmp_path) == []


def test_killed_after_the_swap_the_stale_copy_is_cleaned_only_on_overwrite(tmp_path):
    target = _series(tmp_path / "series", "new")
    new = _contents(target)
    aside = _aside(target)
    _series(aside / "series", "old")
    with pytest.warns(MedfuseWarning, match="previous version"):
        with pytest.raises(OutputExistsError, match="output exists"):
            with atomic_dir(target):
                pass
    assert _contents(target) == new and (aside / "series").is_dir()  # without overwrite: told, not deleted
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "IM00001.dcm").write_bytes(b"\0" * 128 + b"DICMnewer")
    assert _contents(target) == {"IM00001.dcm": b"\0" * 128 + b"DICMnewer"} and _medfuse_files(tmp_path) == []


def test_killed_mid_pair_the_old_pair_comes_back(tmp_path, vol):
    """Killed after the new .raw was placed, before the header moved: old header + new data would mix."""
    header = save(vol, tmp_path / "h.mhd")
    aside = _aside(header)
    os.replace(tmp_path / "h.raw", aside / "h.raw")
    save(vol.with_array(vol.array + 7), tmp_path / "other.mhd")
    os.replace(tmp_path / "other.raw", tmp_path / "h.raw")  # the new data file, in place
    os.unlink(tmp_path / "other.mhd")
    with pytest.warns(MedfuseWarning, match="put back"):
        with pytest.raises(OutputExistsError, match="output exists"):
            save(vol.with_array(vol.array * 0), header)
    assert np.array_equal(load_image(header).array, vol.array) and _medfuse_files(tmp_path) == []


def test_killed_with_the_header_aside_the_pair_comes_back_and_is_then_replaced(tmp_path, vol):
    header = save(vol, tmp_path / "h.mhd")
    aside = _aside(header)
    for name in ("h.raw", "h.mhd"):
        os.replace(tmp_path / name, aside / name)
    with pytest.warns(MedfuseWarning, match="put back"):
        assert load_image(save(vol.with_array(vol.array + 1), header, overwrite=True)).array[0, 0, 0] == 1
    assert sorted(os.listdir(tmp_path)) == ["h.mhd", "h.raw"]


def test_a_leftover_of_another_output_is_left_alone(tmp_path, vol):
    other = _aside(tmp_path / "other.nii.gz")
    (other / "other.nii.gz").write_bytes(b"the only copy")
    save(vol, tmp_path / "mine.nii.gz")
    save(vol, tmp_path / "mine.nii.gz", overwrite=True)
    assert (other / "other.nii.gz").read_bytes() == b"the only copy"


_KILLED_WRITE = """
import os, sys
import numpy as np
from medfuse import Volume
from medfuse.io import save
vol = Volume(np.ones((4, 5, 3), np.int16), np.eye(4), modality="CT", unit="HU")
real, n = os.replace, [0]
def replace(a, b):
    n[0] += 1
    if n[0] == int(sys.argv[2]):
        os._exit(9)  # SIGKILL-like: no cleanup, no except, no finally
    return real(a, b)
os.replace = replace
save(vol, sys.argv[1], overwrite=True)
"""


@pytest.mark.parametrize("name,kill_at", [("series", 2), ("h.mhd", 2)])
def test_a_really_killed_overwrite_is_recovered_by_the_next_write(tmp_path, vol, name, kill_at):
    """A real process killed between moving the old output aside and placing the new one (no handler runs)."""
    target = save(vol, tmp_path / name)
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_WRITE), str(target), str(kill_at)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 9, run.stderr
    assert any(p.name.startswith(".medfuse-old-") for p in tmp_path.iterdir())  # the state this test is about
    with pytest.warns(MedfuseWarning, match="put back"):
        with pytest.raises(OutputExistsError):
            save(vol, target)
    after = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".medfuse-" not in str(p)}
    assert after == before
    assert not any(p.name.startswith(".medfuse-old-") for p in tmp_path.iterdir())


def test_an_overwrite_beaten_to_the_name_keeps_the_earlier_output_aside(tmp_path, monkeypatch):
    """Overwrite moved the old series aside, then another program took the name: neither copy may be lost."""
    target = _series(tmp_path / "series", "old")
    old = _contents(target)
    real = atomic._rename_dir_into_place

    def beaten(src, dst):
        _series(dst, "theirs")
        return real(src, dst)

    monkeypatch.setattr(atomic, "_rename_dir_into_place", beaten)
    with pytest.raises(OutputExistsError, match="appeared"):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "IM00001.dcm").write_text("new")
    kept = atomic.leftovers(target)
    assert len(kept) == 1 and _contents(kept[0] / "series") == old
    assert all(v.endswith(b"theirs") for v in _contents(target).values())


def _fsync_log(monkeypatch):
    """Record what each ``os.fsync`` flushed (the path behind the descriptor) and when the outputs took their
    names, in one ordered log."""
    import medfuse.io._atomic as atomic

    log = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        log.append(("place", os.fspath(dst)))
        return real_replace(src, dst, *a, **k)

    def link(src, dst, *a, **k):
        log.append(("place", os.fspath(dst)))
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(atomic.os, "link", link)
    return log


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a descriptor's file")
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_reaches_the_disk_before_its_name_and_the_folder_after(tmp_path, monkeypatch, overwrite):
    """Before, nothing was flushed: after a power cut, XFS (or ext4 without auto_da_alloc) can keep the new name
    with no data, so an output replaced with --overwrite could come back empty with the earlier one gone."""
    from medfuse.io._atomic import atomic_write_bytes

    out = tmp_path / "fused.json"
    if overwrite:
        out.write_bytes(b"earlier")
    log = _fsync_log(monkeypatch)
    atomic_write_bytes(out, b"new", overwrite=overwrite)
    assert out.read_bytes() == b"new"
    place = log.index(("place", os.fspath(out)))
    flushed_before = [p for kind, p in log[:place] if kind == "fsync"]
    assert len(flushed_before) == 1 and Path(flushed_before[0]).name.startswith(".medfuse-tmp-"), log
    assert ("fsync", os.fspath(tmp_path)) in log[place:], log

    monkeypatch.setenv("MEDFUSE_FSYNC", "0")  # the opt-out
    log.clear()
    atomic_write_bytes(tmp_path / "other.json", b"x")
    assert not [e for e in log if e[0] == "fsync"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a descriptor's file")
def test_a_folder_output_has_every_file_flushed_before_it_takes_its_name(tmp_path, monkeypatch):
    from medfuse.io._atomic import atomic_dir

    log = _fsync_log(monkeypatch)
    out = tmp_path / "series"
    with atomic_dir(out) as tmp:
        for i in range(3):
            (tmp / f"{i}.dcm").write_bytes(b"DICM" * 10)
    place = log.index(("place", os.fspath(out)))
    flushed = {Path(p).name for kind, p in log[:place] if kind == "fsync"}
    assert {"0.dcm", "1.dcm", "2.dcm"} <= flushed, log
    assert ("fsync", os.fspath(tmp_path)) in log[place:], log


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a descriptor's file")
@pytest.mark.parametrize("suffix,data", [(".mhd", ".raw"), (".nhdr", ".raw.gz")])
def test_a_detached_header_and_its_data_reach_the_disk_before_their_names(tmp_path, monkeypatch, suffix, data):
    """.mhd/.nhdr pairs are moved into place by the writer itself, not through atomic_path: they were not flushed."""
    log = _fsync_log(monkeypatch)
    vol = Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4))
    out = save(vol, tmp_path / f"v{suffix}")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert out.name in written and len(written) == 2, written
    for name in written:
        place = log.index(("place", os.fspath(tmp_path / name)))
        flushed = {Path(p).name for kind, p in log[:place] if kind == "fsync"}
        assert name in flushed, (name, log)  # flushed under its temporary folder, same name
    assert ("fsync", os.fspath(tmp_path)) in log
