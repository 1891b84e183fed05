"""Outputs and arguments a probe with bad input found handled wrongly.

A pipe or device node at the output path was replaced by ``--overwrite``; a GPU this machine lacks was accepted
(and recorded as used) for the classical rules; a folder that takes no new files was reported under an internal
temporary name; a null character in a path and a complex affine got raw library errors or were cast silently.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.cli import EXIT_USAGE, main
from medfuse.errors import GeometryError, InvalidInputError, OutputExistsError, OutputWriteError

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")


def _vol() -> medfuse.Volume:
    arr = np.zeros((8, 8, 8), np.float32)
    arr[2:6, 2:6, 2:6] = 1.0
    return medfuse.Volume(arr, np.eye(4))


def _pair(folder: Path):
    import nibabel as nib

    base = np.zeros((16, 16, 16), np.float32)
    base[4:12, 4:12, 4:12] = 100.0
    paths = [folder / "a.nii.gz", folder / "b.nii.gz"]
    for i, p in enumerate(paths):
        nib.save(nib.Nifti1Image(base + i, np.eye(4)), str(p))
    return paths


def _is_fifo(p: Path) -> bool:
    return stat.S_ISFIFO(os.lstat(p).st_mode)


# ----------------------------------------------------------------------------- 1. pipes and devices
@posix_only
@pytest.mark.parametrize("name", ["stream.nii.gz", "stream.mha", "series"])
def test_overwrite_never_replaces_a_named_pipe(tmp_path, name):
    out = tmp_path / name
    os.mkfifo(out)
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=r"a named pipe \(FIFO\) is at the output path.*Fix: choose "
                                                    r"another output name") as e:
            medfuse.save(_vol(), out, overwrite=overwrite)
        assert e.value.path == os.fspath(out)
        assert _is_fifo(out)  # still the pipe, not a regular file
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left either


@posix_only
def test_overwrite_never_replaces_a_device_node(tmp_path):
    out = tmp_path / "dev_full.nii.gz"
    try:
        os.mknod(out, 0o644 | stat.S_IFCHR, os.makedev(1, 7))  # /dev/full's numbers
    except (PermissionError, OSError):
        pytest.skip("making a device node needs root")
    with pytest.raises(OutputExistsError, match="a character device is at the output path"):
        medfuse.save(_vol(), out, overwrite=True)
    assert stat.S_ISCHR(os.lstat(out).st_mode)


@posix_only
def test_fuse_overwrite_onto_a_pipe_is_a_usage_error_and_keeps_the_pipe(tmp_path, capsys):
    a, b = _pair(tmp_path)
    out = tmp_path / "stream.nii.gz"
    os.mkfifo(out)
    code = main(["fuse", str(a), str(b), "-o", str(out), "--method", "mean", "--overwrite", "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "a named pipe (FIFO)" in err, err
    assert _is_fifo(out) and not (tmp_path / "stream.json").exists()


@posix_only
def test_a_symbolic_link_to_a_pipe_is_replaced_as_a_link_and_the_pipe_kept(tmp_path):
    """As before: overwrite replaces the link itself (os.replace never writes through it), never its target."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    link = tmp_path / "out.nii.gz"
    link.symlink_to(pipe.name)
    medfuse.save(_vol(), link, overwrite=True)
    assert not link.is_symlink() and link.is_file() and _is_fifo(pipe)
    assert medfuse.load(link).shape == (8, 8, 8)


# ----------------------------------------------------------------------------- 2. a device this machine lacks
@pytest.fixture
def no_gpu(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_a_classical_rule_refuses_a_gpu_this_machine_lacks(no_gpu, device):
    v = _vol()
    with pytest.raises(InvalidInputError, match=f"device '{device}' was asked for.*Fix: use device 'cpu'"):
        medfuse.fuse(v, v, method="mean", device=device)
    from medfuse.pipeline import FuseStep

    with pytest.raises(InvalidInputError, match="was asked for"):
        FuseStep("laplacian", device=device)


def test_fuse_with_a_missing_gpu_writes_nothing(no_gpu, tmp_path, capsys):
    a, b = _pair(tmp_path)
    out = tmp_path / "x.nii.gz"
    assert main(["fuse", str(a), str(b), "-o", str(out), "--method", "mean", "--device", "cuda", "-q"]) == EXIT_USAGE
    assert "'cuda' was asked for" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "x.json").exists()


def test_a_classical_rule_runs_on_the_cpu_with_an_available_gpu_and_the_sidecar_says_so(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    a, b = _pair(tmp_path)
    res = medfuse.fuse_files(a, b, tmp_path / "x.nii.gz", method="mean", device="cuda")
    rec = json.loads(res.sidecar.read_text())
    assert rec["device_used"] == "cpu"  # what ran; the request stays in the parameters
    assert rec["parameters"]["fuse"]["device"] == "cuda"


def test_without_torch_a_classical_rule_is_refused_a_gpu(monkeypatch):
    from medfuse.fusion.device import check_network_device

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(InvalidInputError, match="torch is not installed"):
        check_network_device("mean", "cuda")
    check_network_device("mean", "cpu")
    check_network_device("network", "cuda")  # the missing-dependency error (or a fallback) deals with it


# ----------------------------------------------------------------------------- 3. a folder that takes no files
def _no_new_files(monkeypatch):
    """Every temporary beside an output fails as in /proc: ENOENT although the folder exists."""
    import tempfile

    def refuse(*a, **k):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.path.join(k.get("dir", ""),
                                                                                        ".medfuse-tmp-x"))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)


@pytest.mark.parametrize("name", ["x.nii.gz", "x.mhd", "series"])
def test_a_folder_that_takes_no_new_files_is_named_as_the_output(tmp_path, monkeypatch, name):
    from medfuse.io.writers import check_save_target

    out = tmp_path / name
    _no_new_files(monkeypatch)
    for write in (lambda: medfuse.save(_vol(), out), lambda: check_save_target(out)):
        with pytest.raises(OutputWriteError, match="the output's folder cannot hold new files") as e:
            write()
        assert e.value.path == os.fspath(out) and ".medfuse-tmp" not in str(e.value)
        assert e.value.errno == errno.ENOENT


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"), reason="Linux /proc")
def test_an_output_in_proc_is_refused_naming_it(tmp_path, capsys):
    a, b = _pair(tmp_path)
    assert main(["fuse", str(a), str(b), "-o", "/proc/x.nii.gz", "--method", "mean", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "/proc/x.nii.gz: " in err and ".medfuse-tmp" not in err, err
    assert "no such file" not in err.lower(), err


# ----------------------------------------------------------------------------- 4. a null character in a path
@pytest.mark.parametrize("call", ["load", "load_volumes", "scan", "save", "save_dicom"])
def test_a_null_character_in_a_path_is_a_typed_error(tmp_path, call):
    bad = os.fspath(tmp_path / "a\0b.nii")
    run = {"load": lambda: medfuse.load(bad), "load_volumes": lambda: medfuse.load_volumes(bad),
           "scan": lambda: medfuse.scan(bad), "save": lambda: medfuse.save(_vol(), bad),
           "save_dicom": lambda: medfuse.save(_vol(), bad[:-4])}[call]
    with pytest.raises(InvalidInputError, match=r"holds a null character.*Fix: check how the path was built"):
        run()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 5. a complex affine
@pytest.mark.parametrize("affine", [np.eye(4) * (1 + 2j), np.eye(4).astype(complex), (np.eye(4) + 0j).tolist()])
def test_a_complex_affine_is_refused_not_cast(affine):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's ComplexWarning was the only sign before
        with pytest.raises(GeometryError, match="the affine holds complex numbers.*Fix: pass real numbers"):
            medfuse.Volume(np.zeros((4, 4, 4), np.float32), affine)


def test_complex_geometry_parts_are_refused():
    from medfuse.volume import affine_from_geometry

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(GeometryError, match="the spacing holds complex numbers"):
            affine_from_geometry([1, 1, 1 + 1j], [0, 0, 0], np.eye(3))
    assert np.array_equal(affine_from_geometry([1, 1, 2], [0, 0, 0], np.eye(3)), np.diag([1.0, 1, 2, 1]))


def test_evaluate_with_classical_rules_refuses_a_missing_gpu_before_writing(no_gpu, tmp_path, capsys):
    """`evaluate --help`: the device is checked before anything is written; only network runs were checked."""
    a, b = _pair(tmp_path)
    out = tmp_path / "ev"
    argv = ["evaluate", "--pair", str(a), str(b), "-o", str(out), "--methods", "mean", "--device", "cuda"]
    assert main(argv) == EXIT_USAGE
    assert "'cuda' was asked for" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_at_the_sidecar_path_is_refused_not_read(tmp_path):
    """`medfuse fuse ... -o x.nii.gz` with a pipe at x.json hung for ever: reading the sidecar waited for a writer."""
    import threading

    from medfuse.provenance import check_sidecar, read_sidecar

    os.mkfifo(tmp_path / "x.json")
    outcome = {}

    def run():
        try:
            outcome["read"] = read_sidecar(tmp_path / "x.nii.gz")
            check_sidecar(tmp_path / "x.nii.gz", overwrite=True)
        except OutputExistsError as e:
            outcome["error"] = str(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # let the blocked open go, then fail
        with open(tmp_path / "x.json", "w"):
            pass
        pytest.fail("reading the sidecar blocked on the named pipe")
    assert outcome.get("read") is None
    assert "named pipe" in outcome.get("error", ""), outcome
    assert _is_fifo(tmp_path / "x.json")


def test_null_characters_in_input_paths_folders_and_manifests_are_typed_errors(tmp_path, capsys):
    """The output path was checked; an input path, evaluate's folder and a manifest cell still raised a bare
    ValueError ("embedded null byte"); the manifest's even exited 0 (review probe)."""
    from medfuse import evaluate as E

    a, b = _pair(tmp_path)
    with pytest.raises(InvalidInputError, match="null"):
        medfuse.fuse_files(str(a) + "\0x", b, tmp_path / "o.nii.gz", method="mean")
    with pytest.raises(InvalidInputError, match="null"):
        E.evaluate([(str(a), str(b))], methods=["mean"], out_dir=str(tmp_path / "e\0v"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"subject,fixed,moving,output\ns1,{a},{b}\0,out.nii.gz\n", encoding="utf-8")
    assert main(["batch", str(manifest), "-q"]) == EXIT_USAGE
    assert "null character" in capsys.readouterr().err


# ----------------------------------------------------------------------------- upper-case suffixes share a sidecar
def test_upper_case_suffixes_do_not_take_over_another_outputs_sidecar(tmp_path, capsys):
    """``OUT.NRRD`` then ``OUT.MHA``: both name the sidecar ``OUT.json``. The second run used to replace the first
    one's provenance without a word (the sibling check built only lower-case names); lower case was refused."""
    a, b = _pair(tmp_path)
    first, second = tmp_path / "OUT.NRRD", tmp_path / "OUT.MHA"
    assert main(["fuse", str(a), str(b), "--method", "max", "-o", str(first), "-q"]) == 0
    before = (tmp_path / "OUT.json").read_bytes()
    assert json.loads(before)["output"]["path"].endswith("OUT.NRRD")
    capsys.readouterr()
    assert main(["fuse", str(a), str(b), "--method", "max", "-o", str(second), "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "OUT.json belongs to OUT.NRRD" in err and "another output name" in err
    assert (tmp_path / "OUT.json").read_bytes() == before and not second.exists()
