"""medfuse.evaluate with fusion rules of the caller's among its methods, and the sentences under its table.

Found teaching with the Python API: a student's rule could be fused (fuse_rgb's fuse_fn) but not scored beside the
built-in rules; the table left AG, FMI and MS-SSIM out without a word although --metrics says "default: all", and
its columns (EN, SD, SF, ..., Qabf) and their direction were explained nowhere.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from medfuse import Volume
from medfuse import evaluate as E
from medfuse.errors import InvalidInputError
from medfuse.metrics import METRICS, TITLES


def _volumes(seed=0):
    """A small volume pair on one grid (a smooth blob beside noise), fast to score slice-wise."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(n) for n in (24, 24, 10)), indexing="ij")
    blob = np.exp(-((i - 12) ** 2 + (j - 10) ** 2 + (k - 5) ** 2) / 40.0)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    return (Volume((900 * blob + 50 * rng.random(blob.shape)).astype(np.float32), aff, modality="MR"),
            Volume((8 * blob[::-1]).astype(np.float32), aff, modality="PT", unit="SUVbw"))


def brighter(a, b):
    return np.maximum(a, b)


def test_a_rule_of_ones_own_is_scored_beside_the_built_in_ones(tmp_path):
    mr, pet = _volumes()
    res = E.evaluate([(mr, pet)], methods=["max", brighter, lambda a, b: (a + b) / 2, "MEAN"], out_dir=tmp_path / "o",
                     metrics=["SSIM", "CC", "PSNR"])
    assert res.ok
    rows = {r["method"]: r for r in res.rows}
    assert list(rows) == ["max", "brighter", "lambda", "mean"]
    for m in ("SSIM", "CC", "PSNR"):  # the same fusion as the built-in rule: the same scores
        assert rows["brighter"][m] == rows["max"][m]
        assert rows["lambda"][m] == pytest.approx(rows["mean"][m], rel=1e-6)
    assert (tmp_path / "o" / "brighter" / f"{rows['brighter']['name']}.nii.gz").exists()
    record = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert record["methods"] == ["max", "brighter", "lambda", "mean"]
    assert record["custom_methods"] == {"brighter": f"{__name__}.brighter",
                                        "lambda": f"{__name__}.test_a_rule_of_ones_own_is_scored_beside_the_built_in_ones"
                                                  ".<locals>.<lambda>"}
    table = res.table(notes=False).splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["max", "brighter", "lambda", "mean"]


def test_one_function_alone_and_the_same_function_twice_are_scored_once(tmp_path):
    mr, pet = _volumes()
    res = E.evaluate([(mr, pet)], methods=brighter, out_dir=tmp_path / "a", metrics=["CC"], save_outputs=False)
    assert [r["method"] for r in res.rows] == ["brighter"]
    res = E.evaluate([(mr, pet)], methods=[brighter, brighter], out_dir=tmp_path / "b", metrics=["CC"],
                     save_outputs=False)
    assert [r["method"] for r in res.rows] == ["brighter"]


def _named(name):
    def rule(a, b):
        return a

    rule.__name__ = name
    return rule


@pytest.mark.parametrize("methods,message", [
    (["lapacian"], r"unknown fusion method 'lapacian'; did you mean 'laplacian'\?"),
    (["max", "gf"], r"unknown fusion method 'gf'; did you mean 'gff'\?"),
    (["lapacian", "max", "wavlet"], r"^unknown fusion methods 'lapacian', 'wavlet'\. Fix"),
    ([], r"no fusion method was given \(an empty list\)"),
    ([_named("max")], "is named 'max', as a built-in method is"),
    ([_named("mine"), _named("mine")], "is named 'mine', as another rule is"),
    ([_named("../up")], "has no name a table row and an output folder can take"),
    ([int], "unknown fusion method the class int"),
    (5, "methods must be method names or functions, got an int"),
])
def test_bad_methods_are_refused_before_anything_is_written(tmp_path, methods, message):
    mr, pet = _volumes()
    with pytest.raises(InvalidInputError, match=message):
        E.evaluate([(mr, pet)], methods=methods, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_misspelt_metric_names_the_near_one(tmp_path):
    mr, pet = _volumes()
    with pytest.raises(InvalidInputError, match=r"unknown metric 'Qab'; did you mean 'Qabf'\?"):
        E.evaluate([(mr, pet)], methods=["max"], metrics=["Qab"], out_dir=tmp_path / "o")


def _means(metrics, n=2):
    return {"max": {"images": {**{m: 1.0 for m in metrics}, "n": n, "counts": {m: n for m in metrics}}}}


def test_the_notes_name_the_columns_and_the_metrics_left_out():
    notes = E.table_notes(_means(METRICS)).splitlines()
    assert len(notes) == 2
    columns, left = notes
    for m in E.SUMMARY_METRICS:  # each column named in words
        assert f"{m}: {TITLES[m]}" in columns
    assert "AG:" not in columns and "Higher is better for every metric" in columns
    assert left.startswith("Not in this table: AG, FMI, MS-SSIM;") and "metrics.csv and metrics.json" in left
    # Asked-for columns: nothing scored is left out, so no second line.
    assert E.table_notes(_means(["AG", "FMI"]), metrics=["FMI", "AG"]).splitlines()[0].startswith(
        "Columns: n: images scored; FMI: feature mutual information; AG: average gradient")
    assert len(E.table_notes(_means(["AG", "FMI"]), metrics=["FMI", "AG"]).splitlines()) == 1
    # Two of them scored, one asked for: the other is said to be in the files.
    assert E.table_notes(_means(["SSIM", "VIF"]), metrics=["VIF"]).splitlines()[1].startswith(
        "Not in this table: SSIM;")


def test_every_metric_has_a_title_and_says_its_direction():
    import medfuse.metrics as M

    assert list(TITLES) == list(METRICS)
    functions = {"EN": M.en, "SD": M.sd, "SF": M.sf, "AG": M.ag, "MI": M.mi, "SCD": M.scd, "VIF": M.vif,
                 "Qabf": M.qabf, "SSIM": M.ssim, "PSNR": M.psnr, "CC": M.cc, "FMI": M.fmi, "MS-SSIM": M.ms_ssim,
                 "SSIM_r2": M.ssim_r2}
    assert set(functions) == set(METRICS)
    for name, f in functions.items():
        returns = f.__doc__.split("Returns:")[1].split("Raises:")[0]
        assert "Higher is better" in returns, name


def test_the_printed_table_of_the_command_carries_the_notes(tmp_path, capsys):
    rng = np.random.default_rng(1)
    root = tmp_path / "h"
    for sub in ("MRI", "CT"):
        (root / "CT-MRI" / sub).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / "CT-MRI" / sub / "5001.png")
    args = E.add_arguments(argparse.ArgumentParser()).parse_args(
        [str(root), "--methods", "max", "--out", str(tmp_path / "o"), "--no-progress"])
    assert E.run(args) == 0
    out = capsys.readouterr().out
    assert "| max | CT-MRI | 1 |" in out
    assert "Columns: n: images scored; EN: entropy (bits);" in out
    assert "Not in this table: AG, FMI, MS-SSIM; every metric scored is in metrics.csv and metrics.json" in out
