"""medfuse evaluate: the identity baselines (copy-a, copy-b) and the spread of each mean (median, 95 % interval over
cases, number of cases)."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest

from medfuse import Volume
from medfuse import evaluate as E
from medfuse import metrics as M
from medfuse.fusion.color import is_rgb, rgb_to_gray
from medfuse.harvard import case_of, list_pairs, load_png

from tests.conftest import shared_path


def _grey(path):
    img = load_png(path)
    return rgb_to_gray(img) if is_rgb(img) else img.astype(np.float64)


def _same(a, b):
    """Equal metric values (NaN equals NaN, inf equals inf)."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


def _harvard(pair_type, cases, per_case):
    """``per_case`` pairs of each of ``cases`` (the first slices) of one pair type of the shared Harvard data."""
    pairs = list_pairs(shared_path("data", "harvard-pairs"), pair_types=[pair_type])
    return [p for c in cases for p in [p for p in pairs if case_of(p.name) == c][:per_case]]


def test_copy_baselines_score_as_fusing_with_f_equal_to_a_source(tmp_path):
    # PET is pseudo-colour (RGB), so copy-b also goes through the luma the sources are scored on.
    pairs = _harvard("PET-MRI", ["41"], 1) + _harvard("CT-MRI", ["20"], 1)
    res = E.evaluate(pairs, methods=["copy-a", "copy-b"], out_dir=tmp_path / "o")
    assert res.ok and len(res.rows) == 4
    for pair in pairs:
        a, b = _grey(pair.mri), _grey(pair.other)
        for method, f in (("copy-a", a), ("copy-b", b)):
            row = next(r for r in res.rows if r["method"] == method and r["name"] == pair.key)
            direct = M.score(f, a, b)
            assert all(_same(row[m], direct[m]) for m in M.METRICS), method
            # The image written is the source's own pixels.
            assert np.array_equal(load_png(tmp_path / "o" / row["output"]), load_png(pair.other if method == "copy-b"
                                                                                    else pair.mri))
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["baselines"] == {"copy-a": "source 1 of each pair, unchanged (identity baseline)",
                                "copy-b": "source 2 of each pair, unchanged (identity baseline)"}
    # VIF sums over the sources: F = A scores 1 (VIF(A, A)) plus VIF(A, B), above 1, as docs/fusion.md says.
    assert all(r["VIF"] > 1.0 for r in res.rows)


def test_copy_baselines_of_volumes_and_a_missing_third_source(tmp_path):
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[0:12, 0:20, 0:20]
    a = np.clip((np.sin(x / 2.0) + 1) / 2 + rng.normal(0, 0.05, x.shape), 0, 1)
    b = ((x - 10) ** 2 + (y - 10) ** 2 < 30).astype(float) * 0.9
    mr, pet = Volume(a, np.eye(4), modality="MR"), Volume(b, np.eye(4), modality="PT")
    metrics = list(M.NATIVE_3D_METRICS)
    res = E.evaluate([(mr, pet)], methods=["copy-b", "copy-c"], mode="native", metrics=metrics, normalise="none",
                     out_dir=tmp_path / "o")
    srcs = [np.round(s * 255.0) for s in (a, b)]  # normalise="none": the sources as scored
    direct = M.score(srcs[1], *srcs, mode="native", metrics=metrics)
    (row,) = res.rows
    assert row["method"] == "copy-b" and all(_same(row[m], direct[m]) for m in metrics)
    (failed,) = res.failures  # a pair of two has no third source: that item fails, with why
    assert failed["method"] == "copy-c" and "copy-c copies source 3, but this pair has 2 sources" in failed["error"]


def test_means_carry_median_interval_over_cases_and_the_number_of_cases(tmp_path):
    pairs = _harvard("CT-MRI", ["20", "32"], 2) + _harvard("PET-MRI", ["41"], 2)
    metrics = ["Qabf", "VIF", "EN"]
    res = E.evaluate(pairs, methods=["max"], metrics=metrics, out_dir=tmp_path / "o", save_outputs=False)
    ct, pet = res.means["max"]["CT-MRI"], res.means["max"]["PET-MRI"]
    assert ct["n_cases"] == 2 and pet["n_cases"] == 1 and res.means["max"]["all"]["n_cases"] == 3
    for m in metrics:
        rows = [r for r in res.rows if r["pair_type"] == "CT-MRI"]
        values = [r[m] for r in rows]
        lo, hi = ct["ci95"][m]
        assert ct["medians"][m] == pytest.approx(np.median(values))
        assert min(values) <= ct["medians"][m] <= max(values)
        assert min(values) <= lo <= ct[m] <= hi <= max(values)
        # Two cases of two pairs each: the bootstrap draws (1, 1), (1, 2), (2, 2) with chances 1/4, 1/2, 1/4, so
        # its 2.5 and 97.5 percentiles are the two case means.
        case_means = sorted(np.mean([r[m] for r in rows if r["case"] == c]) for c in ("20", "32"))
        assert [lo, hi] == pytest.approx(case_means)
        assert pet["ci95"][m] is None  # one patient: no interval over patients
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["spread"]["unit"] == "case" and doc["means"]["max"]["PET-MRI"]["ci95"]["VIF"] is None
    assert doc["means"]["max"]["CT-MRI"]["ci95"]["VIF"] == pytest.approx(ct["ci95"]["VIF"])
    table = list(csv.DictReader((tmp_path / "o" / "metrics.csv").open()))
    low = next(r for r in table if r["kind"] == "ci95_low" and r["pair_type"] == "CT-MRI")
    assert float(low["Qabf"]) == pytest.approx(ct["ci95"]["Qabf"][0]) and low["name"] == "cases=2"
    notes = res.table()
    assert f"max CT-MRI (4 images, 2 cases): Qabf {ct['medians']['Qabf']:.3f} [{ct['ci95']['Qabf'][0]:.3f}, " in notes
    assert f"max PET-MRI (2 images, 1 case): Qabf {pet['medians']['Qabf']:.3f};" in notes
    assert "--methods copy-a,copy-b" in notes  # no baseline among the rows: the notes point to them


def test_the_command_line_takes_the_baselines_and_prints_mi_in_bits(tmp_path, capsys):
    (pair,) = _harvard("CT-MRI", ["20"], 1)
    parser = E.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--pair", str(pair.mri), str(pair.other), "--methods", "copy-a,max", "--metrics",
                              "MI,VIF", "--out", str(tmp_path / "o"), "--no-progress", "--no-save"])
    assert E.run(args) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    mi = doc["means"]["copy-a"]["images"]["MI"]
    assert f"copy-a images {mi / math.log(2):.3f}" in out and "MI is in nats" in out
    assert "copy-a images (1 image, 1 case): MI " in out
    assert "--methods copy-a,copy-b" not in out  # a baseline is among the rows: no pointer to them
