"""medfuse evaluate --mask: the foreground ('auto') or a mask file, recorded in metrics.json; bad masks."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image
from scipy.stats import entropy

from medfuse import Volume
from medfuse import evaluate as E
from medfuse.errors import InvalidInputError, UnreadableFileError
from medfuse.io import load, save


def _vol(arr, origin=(0.0, 0.0, 0.0), **kw):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    aff[:3, 3] = origin
    return Volume(arr, aff, **kw)


def _pair(tmp_path):
    """Two MR volumes with textured content in a box and exact zeros around it; the box as a uint8 mask file."""
    rng = np.random.default_rng(5)
    box = np.zeros((24, 22, 14), dtype=bool)
    box[4:20, 3:19, 2:12] = True
    a = (200 + 400 * rng.random(box.shape)) * box
    b = (100 + 300 * np.sin(np.arange(22) / 3.0)[None, :, None] ** 2 + 50 * rng.random(box.shape)) * box
    save(_vol(a, modality="MR"), tmp_path / "t1.nii.gz")
    save(_vol(b, modality="MR"), tmp_path / "t2.nii.gz")
    save(_vol(box.astype(np.uint8)), tmp_path / "box.nii.gz")
    return box


def _run(tmp_path, out, *extra):
    parser = E.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--pair", str(tmp_path / "t1.nii.gz"), str(tmp_path / "t2.nii.gz"), "--methods",
                              "mean", "--mode", "native", "--out", str(tmp_path / out), "--no-progress", "-q",
                              *extra])
    assert E.run(args) == 0
    return json.loads((tmp_path / out / "metrics.json").read_text())


def test_cli_mask_auto_scores_the_foreground_and_records_it(tmp_path):
    box = _pair(tmp_path)
    before = (tmp_path / "box.nii.gz").read_bytes()
    auto = _run(tmp_path, "auto", "--mask", "auto")
    assert auto["mask"] == {"kind": "auto", "definition": E.AUTO_MASK}
    row = auto["images"][0]
    assert row["mask"] == auto["mask"] and row["mask_fraction"] == pytest.approx(box.mean())
    # EN of the fused output's voxels inside the box, computed here from the saved file (scored as 0..255).
    fused = load(tmp_path / "auto" / "mean" / "t1_t2.nii.gz").array
    q = np.round(np.clip(fused, 0, 1) * 255).astype(np.uint8)
    assert row["EN"] == pytest.approx(entropy(np.bincount(q[box], minlength=256), base=2), rel=1e-12)
    # The box as a mask file gives the same scores (the foreground is the box); without a mask they differ.
    filed = _run(tmp_path, "file", "--mask", str(tmp_path / "box.nii.gz"))
    assert filed["mask"] == {"kind": "file", "path": str(tmp_path / "box.nii.gz")}
    whole = _run(tmp_path, "whole")
    assert whole["mask"] is None and "mask_fraction" not in whole["images"][0]
    for name in ("EN", "SD", "MI", "SSIM", "CC", "PSNR"):
        assert filed["images"][0][name] == pytest.approx(row[name], rel=1e-12), name
    assert abs(whole["images"][0]["EN"] - row["EN"]) > 0.3  # the zeros were 57 % of the volume
    assert (tmp_path / "box.nii.gz").read_bytes() == before  # an input, never written


def test_a_mask_off_the_grid_or_not_0_1_fails_its_pair_and_the_others_go_on(tmp_path):
    box = _pair(tmp_path)
    shifted = tmp_path / "shifted.nii.gz"
    save(_vol(box.astype(np.uint8), origin=(3.0, 0.0, 0.0)), shifted)
    labels = tmp_path / "labels.nii.gz"
    save(_vol(box * 2.0), labels)  # a label image, not a 0/1 mask
    pair = (tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz")
    res = E.evaluate([{"name": "off", "inputs": pair, "mask": shifted},
                      {"name": "labels", "inputs": pair, "mask": labels},
                      {"name": "ok", "inputs": pair, "mask": tmp_path / "box.nii.gz"}],
                     methods=["max"], out_dir=tmp_path / "o", mode="native", save_outputs=False)
    assert res.exit_code == 1 and [r["name"] for r in res.rows] == ["ok"]
    errors = {f["item"]: f["error"] for f in res.failures}
    assert "mask is on another grid" in errors["off"] and "origin 3 mm away" in errors["off"]
    assert "medfuse.resample(mask, image, interpolation='nearest')" in errors["off"]
    assert "values other than 0 and 1" in errors["labels"] and "labels.nii.gz" in errors["labels"]
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["images"][0]["mask"] == {"kind": "file", "path": str(tmp_path / "box.nii.gz")}
    # Sources of two shapes with mask 'auto': the fusion's grid error, not a NumPy broadcast error.
    small = _vol(np.ones((10, 10, 10)), modality="MR")
    res = E.evaluate([(load(pair[0]), small)], methods=["mean"], out_dir=tmp_path / "o2", mask="auto")
    assert res.exit_code == 1 and "different grid" in res.failures[0]["error"]


def _disc_folder(root):
    """A Harvard-layout CT-MRI pair: a textured head (disc) in a zero background; the CT a smaller disc."""
    yy, xx = np.mgrid[:40, :40]
    head = (yy - 20) ** 2 + (xx - 19) ** 2 < 15 ** 2
    mri = np.where(head, 60 + (xx * 5 + yy * 3) % 150, 0).astype(np.uint8)
    ct = np.where((yy - 20) ** 2 + (xx - 19) ** 2 < 8 ** 2, 240, 0).astype(np.uint8)
    for sub, img in (("MRI", mri), ("CT", ct)):
        (root / "CT-MRI" / sub).mkdir(parents=True)
        Image.fromarray(img).save(root / "CT-MRI" / sub / "7001.png")
    return head


def test_2d_pairs_take_mask_auto_and_refuse_a_mask_file(tmp_path):
    head = _disc_folder(tmp_path / "pairs")
    res = E.evaluate(tmp_path / "pairs", methods=["mean"], out_dir=tmp_path / "o", mask="auto")
    row = res.rows[0]
    assert res.ok and row["mask_fraction"] == pytest.approx(head.mean())
    saved = np.asarray(Image.open(tmp_path / "o" / "mean" / "CT-MRI" / "7001.png"), dtype=np.float64)
    assert row["SD"] == pytest.approx(np.std(saved[head]), rel=1e-12)  # the head's pixels, not the zeros
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["mask"]["kind"] == "auto"
    # A mask file is for volume pairs; a missing one is unreadable. Both before anything is written.
    with pytest.raises(InvalidInputError, match="2-D pairs take mask 'auto'"):
        E.evaluate(tmp_path / "pairs", methods=["mean"], out_dir=tmp_path / "o2", mask=tmp_path / "box.nii.gz")
    _pair(tmp_path)
    with pytest.raises(UnreadableFileError):
        E.evaluate([(tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz")], methods=["mean"], out_dir=tmp_path / "o3",
                   mask=tmp_path / "missing.nii.gz")
    with pytest.raises(InvalidInputError, match="with_array"):  # an array has no grid to check
        E.evaluate([(tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz")], methods=["mean"], out_dir=tmp_path / "o4",
                   mask=np.ones((24, 22, 14), bool))
    assert not any((tmp_path / o).exists() for o in ("o2", "o3", "o4"))
