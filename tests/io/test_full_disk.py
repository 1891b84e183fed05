"""A full disk while writing: a typed error naming the output, nothing left behind, and the earlier output kept
with its own provenance sidecar. The real case needs a small tmpfs (root); a simulated one runs everywhere."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.errors import MedfuseError

SAMPLES = Path(__file__).resolve().parents[2] / "sample_volumes"


def _medfuse(*args):
    code = "import sys; from medfuse.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_a_failed_overwrite_on_a_full_disk_keeps_the_output_and_its_sidecar(small_disk):
    """The failed run's in-progress record replaced the kept output's sidecar: the writer's open file on the
    deleted temporary (alive in the traceback) still held the disk's last bytes when the sidecar went back."""
    out = small_disk / "old.nii.gz"
    first = _medfuse("fuse", SAMPLES / "pet", SAMPLES / "pet", "-o", out, "--method", "max", "-q")
    assert first.returncode == 0, first.stderr
    output, sidecar = out.read_bytes(), out.with_suffix("").with_suffix(".json").read_bytes()
    again = _medfuse("fuse", SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz", "-o", out, "--method", "max",
                     "--overwrite")
    assert again.returncode == 2, again.stderr
    assert "disk is full" in again.stderr and f"{out}:" in again.stderr and ".medfuse-tmp" not in again.stderr
    assert out.read_bytes() == output
    assert out.with_suffix("").with_suffix(".json").read_bytes() == sidecar
    assert sorted(p.name for p in small_disk.iterdir()) == ["old.json", "old.nii.gz"]


def test_a_full_disk_inside_the_writer_names_the_output_not_its_temporary(tmp_path, monkeypatch):
    import nibabel as nib

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    vol = medfuse.Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(MedfuseError, match="disk is full") as e:
        medfuse.save(vol, tmp_path / "f.nii.gz")
    assert e.value.path == os.fspath(tmp_path / "f.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["f.mha", "f.nrrd", "f.mhd"])
def test_a_full_disk_under_itk_is_the_typed_error_naming_the_output(tmp_path, monkeypatch, name):
    """SimpleITK reports a failed write as RuntimeError ("File cannot be written ... Reason: No space left on
    device"): it reached the user as an internal error naming the temporary file."""
    import SimpleITK as sitk

    def full(image, path, *a, **k):
        raise RuntimeError(f"Exception thrown in SimpleITK ImageFileWriter_Execute: File cannot be written: {path}"
                           "\nReason: No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", full)
    vol = medfuse.Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(MedfuseError, match="disk is full") as e:
        medfuse.save(vol, tmp_path / name)
    assert e.value.path == os.fspath(tmp_path / name) and ".medfuse-tmp" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="names that are not UTF-8 exist on POSIX file systems")
def test_a_pair_named_in_bytes_that_are_not_utf8_is_refused_naming_the_output(tmp_path):
    vol = medfuse.Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    target = os.path.join(os.fsdecode(os.fsencode(str(tmp_path))), os.fsdecode(b"caf\xe9.mhd"))
    with pytest.raises(MedfuseError) as e:
        medfuse.save(vol, target)
    assert ".medfuse-tmp" not in str(e.value) and "caf\\xe9.mhd" in str(e.value)
    assert os.listdir(tmp_path) == []
