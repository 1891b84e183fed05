"""The mean rule against the golden values, thin and single-slice volumes, per-metric
slice counts in the tables, stale outputs after --overwrite, the CLI's wording."""

from __future__ import annotations

import argparse
import csv
import json
import shutil

import numpy as np
import pytest

from medfuse import Volume
from medfuse import evaluate as E
from medfuse.errors import OutputExistsError
from medfuse.harvard import load_gray


def _golden_grey_mean_pairs(shared, root):
    """A Harvard-layout copy of the golden file's mean-rule pairs whose sources are both grey (the colour ones
    are fused through YCbCr, by design not the golden grey mean)."""
    entries = json.loads(shared("reference", "fusion-metrics-golden.json").read_text())
    kept = []
    for e in entries:
        if e["rule"] != "mean":
            continue
        srcs = [shared("data", e[k]) for k in ("A", "B")]
        from PIL import Image

        if any(Image.open(p).mode not in ("L", "I;16", "I") for p in srcs):
            continue
        for p in srcs:
            dest = root / p.parent.parent.name / p.parent.name / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        kept.append(e)
    assert kept
    return kept


@pytest.mark.shared
def test_evaluates_mean_rule_reproduces_the_golden_values(shared, tmp_path):
    """fuse(uint8, uint8, 'mean') goes through /255 and *255, so a .5 came back as 35.500000000000014 and
    evaluate's rounding broke the tie by that noise: 342-1671 pixels per pair off round((A + B) / 2) and MI off
    by up to 0.026. The golden test builds F itself; this one runs evaluate."""
    kept = _golden_grey_mean_pairs(shared, tmp_path / "pairs")
    res = E.evaluate(tmp_path / "pairs", methods=["mean"], out_dir=tmp_path / "out")
    assert res.ok and len(res.rows) == len(kept)
    for e in kept:
        a, b = (load_gray(shared("data", e[k])) for k in ("A", "B"))
        name = f"{e['A'].split('/')[1]}/{e['A'].rsplit('/', 1)[1][:-4]}"
        row = next(r for r in res.rows if r["name"] == name)
        saved = load_gray(tmp_path / "out" / row["output"])
        assert np.array_equal(saved, np.round((a + b) / 2))  # the golden definition, numpy half-to-even
        for metric, want in e["metrics"].items():
            assert abs(row[metric] - want) <= 1e-6, (name, metric, row[metric], want)


def _vol(arr):
    return Volume(arr, np.diag([1.0, 1.0, 2.0, 1.0]))


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    disc = ((xx - shape[1] / 2) ** 2 + (yy - shape[0] / 2) ** 2 < (shape[0] / 3) ** 2)[..., None]
    a = np.broadcast_to(disc * 400.0, shape) + rng.random(shape) * 60
    b = np.broadcast_to(np.sin(xx / 3.0)[..., None] * 100 + 150, shape) + rng.random(shape) * 30
    return _vol(a), _vol(b)


def test_a_thin_volume_is_scored_slice_wise_across_the_planes_that_fit(tmp_path):
    """48x48x5 failed its only item ('every side needs at least 7 pixels'); its 48x48 slices score."""
    a, b = _pair((48, 48, 5))
    res = E.evaluate([(a, b)], methods=["max"], out_dir=tmp_path / "o", save_outputs=False)
    assert res.ok, res.failures
    row = res.rows[0]
    assert row["axes"] == [2] and row["n_slices"] == 5 and np.isfinite(row["Qabf"])


def test_a_single_slice_volume_is_scored_as_a_2d_image_from_the_cli(tmp_path, capsys):
    """48x48x1 failed with an np.squeeze ... mode='2d' message the CLI has no option for."""
    from medfuse.io import save

    a, b = _pair((48, 48, 1))
    save(a, tmp_path / "a.nii.gz")
    save(b, tmp_path / "b.nii.gz")
    parser = E.add_arguments(argparse.ArgumentParser())
    for mode in ("slicewise", "native"):
        out = tmp_path / mode
        args = parser.parse_args(["--pair", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "--methods",
                                  "max", "--mode", mode, "--out", str(out), "--no-progress", "-q"])
        assert E.run(args) == 0, capsys.readouterr().err
        row = json.loads((out / "metrics.json").read_text())["images"][0]
        assert row["EN"] is not None and row["SSIM"] is not None
        assert ("Qabf" in row) == (mode == "slicewise")  # native keeps its own metrics
    # The 2-D score of the slice, as evaluate scores volumes (0..255 as the fusion saw them).
    _, scores, _ = E._score_volumes((a, b), "max", "cpu", {}, "slicewise", ["SSIM"])
    assert "mode" not in scores and np.isfinite(scores["SSIM"])


def test_slice_counts_per_metric_go_into_the_rows_and_at_the_end_of_the_csv(tmp_path):
    """A source blank from slice 10: VIF's mean is over fewer slices than SSIM's; the rows and the CSV say
    how many (new columns after the old ones)."""
    rng = np.random.default_rng(1)
    a = rng.integers(1, 256, (32, 32, 20)).astype(float)
    b = rng.integers(1, 256, (32, 32, 20)).astype(float)
    b[:, :, 10:] = 0
    res = E.evaluate([(_vol(a), _vol(b))], methods=["max"], out_dir=tmp_path / "o", metrics=["VIF", "SSIM"],
                     save_outputs=False)
    row = res.rows[0]
    assert row["n_slices_used"]["SSIM"] == row["n_slices"]
    assert 0 < row["n_slices_used"]["VIF"] < row["n_slices"]
    with open(tmp_path / "o" / "metrics.csv", newline="") as fh:
        table = list(csv.reader(fh))
    head = table[0]
    assert head[:7] == ["kind", "method", "pair_type", "name", "output", "VIF", "SSIM"]  # the old layout first
    assert head[7:] == ["n_slices", "n_slices_used:VIF", "n_slices_used:SSIM"]
    image = next(r for r in table if r[0] == "image")
    assert image[7:] == [str(row["n_slices"]), str(row["n_slices_used"]["VIF"]), str(row["n_slices_used"]["SSIM"])]
    assert all(len(r) == len(head) for r in table)
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())["images"][0]
    assert saved["n_slices_used"] == row["n_slices_used"]


def _tiny_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("5001.png", "6002.png"):
        for mod in ("MRI", "CT"):
            (root / "CT-MRI" / mod).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32)).astype(np.uint8)).save(root / "CT-MRI" / mod / name)
    return root


def test_overwrite_removes_only_the_earlier_runs_own_outputs(tmp_path):
    """A re-run with fewer methods left the earlier run's max/ images beside a table that no longer listed
    them. They go now; a file of the user's in that folder stays."""
    src = _tiny_folder(tmp_path / "pairs")
    out = tmp_path / "out"
    E.evaluate(src, methods=["mean", "max"], out_dir=out)
    mine = out / "max" / "notes.png"
    mine.write_bytes(b"the user's")
    E.evaluate(src, methods=["mean"], out_dir=out, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "max/notes.png", "mean/CT-MRI/5001.png", "mean/CT-MRI/6002.png"]
    assert mine.read_bytes() == b"the user's"
    # A listed output the user changed after that run is theirs now: it stays too.
    E.evaluate(src, methods=["max"], out_dir=out, overwrite=True)
    kept = out / "max" / "CT-MRI" / "5001.png"
    import os
    import time

    later = time.time() + 5
    os.utime(kept, (later, later))
    E.evaluate(src, methods=["mean"], out_dir=out, overwrite=True)
    assert kept.exists() and not (out / "max" / "CT-MRI" / "6002.png").exists()


def test_the_refusal_to_overwrite_says_overwrite_as_the_cli_spells_it(tmp_path, capsys):
    from medfuse.cli import main

    src = _tiny_folder(tmp_path / "pairs")
    E.evaluate(src, methods=["mean"], out_dir=tmp_path / "out")
    with pytest.raises(OutputExistsError) as e:
        E.evaluate(src, methods=["mean"], out_dir=tmp_path / "out")
    assert "overwrite=True" in e.value.fix
    code = main(["evaluate", str(src), "--methods", "mean", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
