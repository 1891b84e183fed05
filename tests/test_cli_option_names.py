"""Command-line fixes that named Python arguments the command line does not have."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfuse.cli import EXIT_USAGE, main


def _pair(folder: Path):
    import nibabel as nib

    base = np.zeros((16, 16, 16), np.float32)
    base[4:12, 4:12, 4:12] = 100.0
    paths = [folder / "a.nii.gz", folder / "b.nii.gz"]
    for p in paths:
        nib.save(nib.Nifti1Image(base, np.eye(4)), str(p))
    return paths


def test_an_unknown_output_ending_names_no_python_format_argument(tmp_path, capsys):
    a, b = _pair(tmp_path)
    assert main(["fuse", str(a), str(b), "-o", str(tmp_path / "x.png"), "--method", "max", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "format=" not in err and "without a dot ending" in err, err


def test_a_deformable_initial_transform_is_refused_with_a_fix_the_command_line_can_follow(tmp_path, capsys):
    import SimpleITK as sitk

    a, b = _pair(tmp_path)
    ref = sitk.ReadImage(str(a))
    warp = tmp_path / "warp.tfm"
    sitk.WriteTransform(sitk.BSplineTransformInitializer(ref, [2, 2, 2], 3), str(warp))
    code = main(["register", str(a), str(b), "-o", str(tmp_path / "r.nii.gz"), "--initial-transform", str(warp),
                 "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "linear_transform" not in err and "medfuse register --kind affine" in err, err


def _png_pairs(folder: Path, n: int = 3):
    from PIL import Image

    rng = np.random.default_rng(0)
    args = []
    for i in range(n):
        for side in ("a", "b"):
            p = folder / f"{side}{i}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(p)
            args.append(p)
    return [(args[2 * i], args[2 * i + 1]) for i in range(n)]


def test_a_cancelled_evaluation_removes_its_images_and_says_so(tmp_path, monkeypatch, capsys):
    """Ctrl-C during 'medfuse evaluate' printed only 'cancelled' and left the fused images without tables, which
    then blocked the rerun ("a fused output of an earlier evaluation exists")."""
    import os
    import signal

    import medfuse.evaluate as E
    from medfuse.cli import EXIT_CANCELLED

    pairs = _png_pairs(tmp_path)
    real, calls = E._save_png, []

    def save(img, path, overwrite, inputs=()):  # Ctrl-C once two images are saved
        real(img, path, overwrite, inputs=inputs)
        calls.append(path)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(E, "_save_png", save)
    # Python's own Ctrl-C handler, whatever this process inherited (a runner started in the background by a shell
    # without job control ignores SIGINT, and the signal never arrived).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = tmp_path / "eval"
        argv = ["evaluate", "-o", str(out), "--methods", "mean,max", "--no-progress"]
        for a, b in pairs:
            argv += ["--pair", str(a), str(b)]
        assert main(argv) == EXIT_CANCELLED
        err = capsys.readouterr().err
        assert "cancelled; no tables were written; the 2 fused image(s) this run had written were removed" in err, err
        assert not out.exists(), list(out.rglob("*"))  # not even the empty folder this run had made
        monkeypatch.setattr(E, "_save_png", real)
        assert main(argv) == 0  # the rerun starts clean
    finally:
        signal.signal(signal.SIGINT, previous)


def test_fuse_of_disjoint_fields_of_view_gives_advice_the_command_line_can_follow(tmp_path, capsys):
    """It said "register='rigid' with initialise='geometry', or --register rigid": fuse has no --initialise, and
    --register rigid refuses images that do not overlap."""
    import nibabel as nib

    a, _ = _pair(tmp_path)
    far = np.eye(4)
    far[0, 3] = 5000.0
    b = tmp_path / "far.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(str(a)).dataobj), far), str(b))
    assert main(["fuse", str(a), str(b), "-o", str(tmp_path / "f.nii.gz"), "--method", "max", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "medfuse register FIXED MOVING --initialise geometry" in err and "--register rigid" not in err, err
    assert "initialise='" not in err, err


@pytest.mark.parametrize("command", ["fuse", "register"])
def test_dash_as_the_output_is_refused_not_written_as_a_folder(tmp_path, monkeypatch, capsys, command):
    """'-o -' (standard output by the shell convention) became a DICOM series folder named '-'."""
    a, b = _pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    extra = ["--method", "max"] if command == "fuse" else []
    assert main([command, str(a), str(b), "-o", "-", "-q", *extra]) == EXIT_USAGE
    assert "standard output" in capsys.readouterr().err
    assert not (tmp_path / "-").exists() and not (tmp_path / "-.json").exists()
