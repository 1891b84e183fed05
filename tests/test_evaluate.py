"""medfuse evaluate: folders of 2-D pairs, lists of volume pairs, bad files, tables, exit status."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
from PIL import Image

from medfuse import Volume
from medfuse import evaluate as E
from medfuse.errors import CancelledError, InvalidInputError, MedfuseWarning, OutputExistsError
from medfuse.harvard import case_id, list_pairs, split_by_case
from medfuse.progress import CancelToken


def _write_folder(root, *, corrupt=True):
    """A tiny Harvard-layout folder: 2 CT-MRI pairs (one CT corrupt) and 2 colour PET-MRI pairs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    for ptype, other in (("CT-MRI", "CT"), ("PET-MRI", "PET")):
        (root / ptype / "MRI").mkdir(parents=True)
        (root / ptype / other).mkdir()
        for name in ("5001.png", "6002.png"):
            mri = np.clip(100 + 60 * np.sin(xx / 3.0) + rng.normal(0, 8, (32, 32)), 0, 255).astype(np.uint8)
            Image.fromarray(mri).save(root / ptype / "MRI" / name)
            disc = ((xx - 16) ** 2 + (yy - 16) ** 2 < 64).astype(np.uint8)
            if other == "CT":
                Image.fromarray(disc * 230).save(root / ptype / other / name)
            else:
                Image.fromarray(np.dstack([disc * 220, disc * 90, 30 + 0 * disc]).astype(np.uint8)).save(
                    root / ptype / other / name)
    if corrupt:
        (root / "CT-MRI" / "CT" / "6002.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return root


def test_folder_with_a_corrupt_png_is_reported_skipped_and_fails(tmp_path):
    src = _write_folder(tmp_path / "pairs")
    seen = []
    res = E.evaluate(src, methods=["mean", "gff"], out_dir=tmp_path / "out", progress=lambda f, m: seen.append(f))
    assert not res.ok and res.exit_code == 1
    assert len(res.failures) == 2  # the corrupt pair, once per method
    assert {f["item"] for f in res.failures} == {"CT-MRI/6002"}
    assert all("6002.png" in f["error"] and "cannot read" in f["error"] for f in res.failures)
    assert len(res.rows) == 6  # 3 good pairs x 2 methods: the run went on
    assert seen[-1] == 1.0 and seen == sorted(seen)
    # Fused outputs: grey PNG for CT-MRI, RGB for PET-MRI.
    assert np.asarray(Image.open(tmp_path / "out" / "gff" / "CT-MRI" / "5001.png")).shape == (32, 32)
    assert np.asarray(Image.open(tmp_path / "out" / "mean" / "PET-MRI" / "6002.png")).shape == (32, 32, 3)
    # Tables: every metric per image, means per method and pair type, the failure listed.
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("image") == 6 and kinds.count("failed") == 2
    assert {(r["method"], r["pair_type"]) for r in rows if r["kind"] == "mean"} >= {("mean", "CT-MRI"), ("gff", "all")}
    assert float(rows[0]["SSIM"]) > 0 and "MS-SSIM" in rows[0]
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert doc["ok"] is False and len(doc["images"]) == 6 and doc["failures"][0]["item"] == "CT-MRI/6002"
    assert doc["means"]["mean"]["CT-MRI"]["n"] == 1
    assert doc["means"]["gff"]["PET-MRI"]["Qabf"] == pytest.approx(np.mean(
        [r["Qabf"] for r in res.rows if r["method"] == "gff" and r["pair_type"] == "PET-MRI"]))


def test_scores_match_metrics_score_on_the_saved_image(tmp_path):
    from medfuse import metrics as M
    from medfuse.harvard import load_gray

    src = _write_folder(tmp_path / "pairs", corrupt=False)
    res = E.evaluate(src, methods=["max"], out_dir=tmp_path / "out", pair_types=["CT-MRI"])
    assert res.ok and len(res.rows) == 2
    row = res.rows[0]
    f = load_gray(tmp_path / "out" / row["output"])
    a = load_gray(src / "CT-MRI" / "MRI" / "5001.png")
    b = load_gray(src / "CT-MRI" / "CT" / "5001.png")
    np.testing.assert_array_equal(f, np.maximum(a, b))
    want = M.score(f, a, b)
    for k, v in want.items():
        assert row[k] == pytest.approx(v), k


def test_cli_run_exit_codes_and_summary(tmp_path, capsys):
    parser = E.add_arguments(argparse.ArgumentParser())
    src = _write_folder(tmp_path / "pairs")
    rc = E.run(parser.parse_args([str(src), "--methods", "mean,max", "--out", str(tmp_path / "o1"), "--no-progress"]))
    out, err = capsys.readouterr()
    assert rc == 1
    assert "| mean | CT-MRI |" in out and "| max | PET-MRI |" in out
    assert "CT-MRI/6002" in err and "skipped" in err
    (src / "CT-MRI" / "CT" / "6002.png").unlink()
    with pytest.warns(MedfuseWarning, match="without a partner"):  # the MRI 6002.png is left alone
        rc = E.run(parser.parse_args([str(src), "--methods", "mean", "--out", str(tmp_path / "o2"), "--no-progress",
                                      "--metrics", "SSIM,Qabf"]))
    assert rc == 0
    header = (tmp_path / "o2" / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",")[5:] == ["Qabf", "SSIM"]  # the metrics asked for, in the table order
    with pytest.raises(OutputExistsError), pytest.warns(MedfuseWarning):
        E.run(parser.parse_args([str(src), "--methods", "mean", "--out", str(tmp_path / "o2"), "--no-progress"]))


def _vol(arr, origin=(0.0, 0.0, 0.0), **kw):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    aff[:3, 3] = origin
    return Volume(arr, aff, **kw)


def test_volume_pairs_write_nifti_and_skip_a_pair_on_another_grid(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(1)
    base = np.zeros((12, 12, 10))
    base[2:10, 2:10, 2:8] = 1.0
    mr = _vol(base * 600 + rng.random(base.shape) * 50, modality="MR")
    ct = _vol(base * 80 + rng.random(base.shape) * 20, modality="CT", unit="HU")
    other = _vol(ct.array, origin=(5.0, 0.0, 0.0), modality="CT", unit="HU")
    res = E.evaluate([{"name": "good", "inputs": (mr, ct)}, (mr, other)], methods=["mean"], out_dir=tmp_path / "v")
    assert not res.ok and len(res.rows) == 1 and res.mode == "slicewise"
    assert "different grid" in res.failures[0]["error"] and "medfuse.register" in res.failures[0]["error"]
    img = nib.load(tmp_path / "v" / "mean" / "good.nii.gz")
    assert img.shape == (12, 12, 10)
    assert 0 < res.rows[0]["SSIM"] <= 2 and res.rows[0]["EN"] > 0
    native = E.evaluate([(mr, ct)], methods=["max"], out_dir=tmp_path / "n", mode="native", save_outputs=False)
    assert native.ok and set(native.rows[0]) >= {"EN", "SD", "MI", "SSIM"} and "Qabf" not in native.rows[0]


def test_bad_arguments_and_cancel(tmp_path):
    src = _write_folder(tmp_path / "pairs", corrupt=False)
    with pytest.raises(InvalidInputError, match="unknown fusion method"):
        E.evaluate(src, methods=["magic"], out_dir=tmp_path / "o")
    with pytest.raises(InvalidInputError, match="unknown metric"):
        E.evaluate(src, methods=["mean"], metrics=["XYZ"], out_dir=tmp_path / "o")
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        E.evaluate(src, methods=["mean"], out_dir=tmp_path / "o", cancel=token)


def test_harvard_case_ids_and_split_by_case(tmp_path):
    assert case_id("28010.png") == 28 and case_id("2013.png") == 2 and case_id("x/41022.png") == 41
    with pytest.raises(InvalidInputError):
        case_id("MRI.png")
    root = tmp_path / "h"
    for ptype, other in (("CT-MRI", "CT"), ("SPECT-MRI", "SPECT")):
        for sub in ("MRI", other):
            (root / ptype / sub).mkdir(parents=True)
            for case in (3, 7, 11, 12, 20):
                for sl in (1, 2, 3):
                    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / ptype / sub / f"{case}{sl:03d}.png")
    pairs = list_pairs(root)
    assert len(pairs) == 30
    (root / "CT-MRI" / "MRI" / "99001.png").write_bytes(b"")  # no CT partner
    with pytest.warns(MedfuseWarning, match="without a partner"):
        assert len(list_pairs(root)) == 30
    train, val = split_by_case(pairs, val_fraction=0.3, seed=0)
    assert len(train) + len(val) == 30 and val and train
    assert not ({p.case for p in train} & {p.case for p in val})  # one case never on both sides
    assert {p.pair_type for p in val} == {"CT-MRI", "SPECT-MRI"}
    assert split_by_case(pairs, val_fraction=0.3, seed=0) == (train, val)


def test_cli_run_with_volume_pair_files(tmp_path, capsys):
    from medfuse.io import save

    base = np.zeros((12, 12, 10))
    base[2:10, 2:10, 2:8] = 1.0
    save(_vol(base * 500 + 10, modality="MR"), tmp_path / "mr.nii.gz")
    save(_vol(base[::-1] * 300 + 5, modality="MR"), tmp_path / "t2.nii.gz")
    parser = E.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--pair", str(tmp_path / "mr.nii.gz"), str(tmp_path / "t2.nii.gz"),
                              "--pair", str(tmp_path / "mr.nii.gz"), str(tmp_path / "missing.nii.gz"),
                              "--methods", "max", "--mode", "native", "--out", str(tmp_path / "o"), "--no-progress"])
    assert E.run(args) == 1  # the second pair's file is missing: reported, skipped
    out, err = capsys.readouterr()
    assert "| max | volumes | 1 |" in out and "missing.nii.gz" in err
    assert (tmp_path / "o" / "max" / "mr_t2.nii.gz").exists()
    with pytest.raises(InvalidInputError, match="either a folder"):
        E.run(parser.parse_args(["--out", str(tmp_path / "x")]))
