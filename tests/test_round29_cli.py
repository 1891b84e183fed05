"""Twenty-ninth round: command-line fixes that named Python arguments the command line does not have."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
