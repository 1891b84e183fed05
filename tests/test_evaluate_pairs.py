"""``medfuse evaluate --pair A.png B.png``: 2-D pairs given file by file, scored as the folder mode scores them.

Before, ``--pair`` took volumes only: a PNG pair failed with "not a medical image" and no table was written.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from PIL import Image

from medfuse.cli import main
from medfuse.evaluate import evaluate
from medfuse.harvard import list_pairs
from medfuse.metrics import METRICS, UndefinedMetricWarning


def _rows(out):
    return json.loads((out / "metrics.json").read_text())["images"]


@pytest.mark.parametrize("pair_type", ["PET-MRI", "CT-MRI"])
def test_pair_of_pngs_gives_the_folder_modes_row(shared, tmp_path, capsys, pair_type):
    # PET is RGB pseudo-colour (scored through its YCbCr luma, as documented), CT grey.
    pair = list_pairs(shared("data", "harvard-pairs"), pair_types=[pair_type])[0]
    folder = evaluate([pair], methods=["mean", "max"], out_dir=tmp_path / "folder")
    code = main(["evaluate", "--pair", str(pair.mri), str(pair.other), "--methods", "mean,max",
                 "--out", str(tmp_path / "pair"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = _rows(tmp_path / "pair")
    assert [r["method"] for r in rows] == ["mean", "max"]
    for want, got in zip(folder.rows, rows):
        assert want["method"] == got["method"]
        for m in METRICS:
            assert got[m] == pytest.approx(want[m], rel=1e-12, abs=1e-12), (want["method"], m)
        # The fused image saved is the folder mode's too (RGB for PET).
        a = np.asarray(Image.open(tmp_path / "folder" / want["output"]))
        b = np.asarray(Image.open(tmp_path / "pair" / got["output"]))
        assert a.shape == b.shape and np.array_equal(a, b)


def test_pair_of_pngs_reproduces_the_golden_values(shared, tmp_path):
    golden = json.loads(shared("reference", "fusion-metrics-golden.json").read_text())
    case = next(c for c in golden if c["A"].startswith("harvard-pairs/CT-MRI") and c["rule"] == "mean")
    root = shared("data")
    res = evaluate([(root / case["A"], root / case["B"])], methods=["mean"], out_dir=tmp_path / "out")
    row = res.rows[0]
    for m, v in case["metrics"].items():
        assert row[m] == pytest.approx(v, abs=2e-5), m


def test_png_pair_mixed_with_a_volume_is_refused(tmp_path, capsys):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.nii.gz").write_bytes(b"")
    code = main(["evaluate", "--pair", str(tmp_path / "a.png"), str(tmp_path / "b.nii.gz"), "--out",
                 str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "mixes PNG images with other inputs" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_png_pair_of_different_sizes_fails_that_pair_clearly(tmp_path, capsys):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((40, 32), np.uint8)).save(tmp_path / "b.png")
    code = main(["evaluate", "--pair", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--methods", "mean",
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "same size" in err and "Traceback" not in err


def test_constant_source_is_marked_and_left_out_of_the_means(tmp_path, capsys):
    # A blank functional image: VIF has nothing to preserve (0/0). The row keeps NaN and says why; the mean
    # leaves it out and its count says so; the run says it once, in medfuse's words.
    rng = np.random.default_rng(3)
    mri = np.round(rng.uniform(0, 255, (64, 64))).astype(np.uint8)
    Image.fromarray(mri).save(tmp_path / "mri.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray(mri[::-1].copy()).save(tmp_path / "other.png")
    code = main(["evaluate", "--pair", str(tmp_path / "mri.png"), str(tmp_path / "blank.png"),
                 "--pair", str(tmp_path / "mri.png"), str(tmp_path / "other.png"),
                 "--methods", "mean", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("medfuse evaluate: warning:") == 1 and "VIF on 1 of 2 scored images" in err
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    blank, other = saved["images"]
    assert blank["VIF"] is None and "source 2 is constant" in blank["undefined"]["VIF"]
    assert "undefined" not in other and math.isfinite(other["VIF"])
    mean = saved["means"]["mean"]["images"]
    assert mean["VIF"] == pytest.approx(other["VIF"]) and mean["counts"]["VIF"] == 1 and mean["n"] == 2
    # Every other metric is a number on the blank pair.
    assert all(blank[m] is not None for m in METRICS if m != "VIF")


def test_evaluate_warns_once_with_the_counts(tmp_path):
    rng = np.random.default_rng(4)
    mri = np.round(rng.uniform(0, 255, (48, 48)))
    Image.fromarray(mri.astype(np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "z.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate([(tmp_path / "m.png", tmp_path / "z.png")] * 2, methods=["mean", "max"],
                       out_dir=tmp_path / "out")
    assert len(res.rows) == 4
    ours = [w for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert len(ours) == 1 and "VIF on 4 of 4 scored images" in str(ours[0].message)


def test_slicewise_volume_with_blank_slices_says_how_many_were_left_out(tmp_path):
    import medfuse

    rng = np.random.default_rng(5)
    a = rng.uniform(0, 1, (32, 32, 20)).astype(np.float32)
    b = rng.uniform(0, 1, (32, 32, 20)).astype(np.float32)
    b[:, :, 10:] = 0  # source 2 blank from slice 10: VIF has nothing to preserve there
    for name, arr in (("a", a), ("b", b)):
        medfuse.save(medfuse.Volume(arr, np.eye(4)), tmp_path / f"{name}.nii.gz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate([(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")], methods=["mean"], out_dir=tmp_path / "out",
                       metrics=["VIF", "SSIM"])
    row = res.rows[0]
    assert math.isfinite(row["VIF"]) and row["n_slices_used"]["VIF"] < row["n_slices"]
    assert "slices" in row["undefined"]["VIF"]
    ours = [str(w.message) for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert len(ours) == 1 and "VIF on some slices of 1 volume(s)" in ours[0]


def test_limit_spreads_over_the_cases_and_scores_the_pairs_training_validates_on(shared, tmp_path, capsys):
    """``--split val --limit 3`` scored the first three pairs of each type: neighbouring slices of one case
    (CT-MRI 20005-20007). It now spreads them over the split, and picks the pairs ``medfuse train --val-limit 3``
    validates on, so the two tables compare."""
    from medfuse.harvard import case_of, spread
    from medfuse.fusion.train import harvard_pairs, split_cases

    root = shared("data", "harvard-pairs")
    code = main(["evaluate", str(root), "--split", "val", "--limit", "3", "--methods", "mean", "--metrics", "EN",
                 "--no-save", "--no-progress", "-q", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    scored: dict = {}
    for r in _rows(tmp_path / "o"):
        scored.setdefault(r["pair_type"], []).append(r["name"])
    val = split_cases(harvard_pairs(root))[1]
    assert set(scored) == set(val)
    for ptype, names in scored.items():
        assert sorted(names) == sorted(f"{ptype}/{mri.stem}" for mri, _ in spread(val[ptype], 3)), ptype
        # Not one case's neighbouring slices: several cases where the split has several (PET-MRI's has one).
        cases = {case_of(mri.name) for mri, _ in val[ptype]}
        assert len({case_of(n) for n in names}) == min(3, len(cases)), (ptype, names)


def test_pairs_of_two_and_three_sources_are_averaged_apart(tmp_path):
    """MI, SCD, VIF and the SSIMs sum over the sources: a 2-source SSIM of 1.51 and a 3-source 1.87 were averaged
    into one mean of 1.69."""
    rng = np.random.default_rng(0)
    names = []
    for k in range(3):
        img = (np.clip(rng.normal(120, 40, (32, 32)), 0, 255)).astype(np.uint8)
        names.append(tmp_path / f"s{k}.png")
        Image.fromarray(img).save(names[-1])
    res = evaluate([(names[0], names[1]), (names[0], names[1], names[2])], methods=["mean"], metrics=["SSIM"],
                   out_dir=tmp_path / "o")
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert sorted(r["pair_type"] for r in res.rows) == ["images", "images (3 sources)"]
    means = doc["means"]["mean"]
    assert set(means) == {"images", "images (3 sources)"}
    assert means["images"]["n"] == means["images (3 sources)"]["n"] == 1


def test_split_val_with_the_network_scores_a_folder_train_would_refuse(tmp_path, capsys):
    """The held-out check behind ``--split val --methods network`` listed the folder as ``medfuse train`` does, so
    pair names that are not CASE + a 3-digit slice (``sub01_s1.png``) failed the whole run with train's message,
    where ``--methods max`` scored them. No weights were trained on such a folder: nothing to warn of."""
    rng = np.random.default_rng(0)
    for case in ("sub01", "sub02", "sub03"):
        for sl in ("s1", "s2"):
            for sub in ("MRI", "CT"):
                (tmp_path / "data" / "CT-MRI" / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
                    tmp_path / "data" / "CT-MRI" / sub / f"{case}_{sl}.png")
    code = main(["evaluate", str(tmp_path / "data"), "--split", "val", "--methods", "network,max", "--metrics",
                 "EN", "--no-save", "--no-progress", "-q", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "3-digit" not in err and "not held out" not in err
    assert {r["method"] for r in _rows(tmp_path / "o")} == {"network", "max"}
