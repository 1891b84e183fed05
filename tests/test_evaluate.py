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
        E.evaluate(src, methods=["mean"], out_dir=tmp_path / "o" / "deep", cancel=token)
    assert not (tmp_path / "o").exists()  # the folders the cancelled run had made are gone
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("a user's file")
    with pytest.raises(CancelledError):
        E.evaluate(src, methods=["mean"], out_dir=tmp_path / "kept", cancel=token)
    assert (tmp_path / "kept" / "mine.txt").read_text() == "a user's file"


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
                              "--pair", str(tmp_path / "mr.nii.gz"), str(tmp_path / "broken.nii.gz"),
                              "--methods", "max", "--mode", "native", "--out", str(tmp_path / "o"), "--no-progress"])
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")  # a missing file is refused before any work
    assert E.run(args) == 1  # the second pair's file is damaged: reported, skipped
    out, err = capsys.readouterr()
    assert "| max | volumes | 1 |" in out and "broken.nii.gz" in err
    assert (tmp_path / "o" / "max" / "mr_t2.nii.gz").exists()
    with pytest.raises(InvalidInputError, match="nothing to evaluate: give a folder"):
        E.run(parser.parse_args(["--out", str(tmp_path / "x")]))


# ---------------------------------------------------------------------- the network's split
def _write_three_types(root, cases=(2, 3, 5, 8, 13, 21, 34), slices=(1, 2)):
    """Tiny grey pairs under all three pair types (the layout ``medfuse train`` reads)."""
    rng = np.random.default_rng(3)
    for ptype, other in (("CT-MRI", "CT"), ("PET-MRI", "PET"), ("SPECT-MRI", "SPECT")):
        for sub in ("MRI", other):
            (root / ptype / sub).mkdir(parents=True)
        for case in cases:
            for sl in slices:
                for sub in ("MRI", other):
                    img = rng.integers(0, 255, (16, 16), dtype=np.uint8)
                    Image.fromarray(img).save(root / ptype / sub / f"{case}{sl:03d}.png")
    return root


def _cases_by_type(csv_path):
    out = {}
    for r in csv.DictReader(open(csv_path)):
        if r["kind"] == "image":
            out.setdefault(r["pair_type"], set()).add(r["name"].split("/")[-1][:-3])
    return out


def test_split_val_is_the_split_training_uses_and_needs_no_torch(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from medfuse.fusion.train import harvard_pairs, split_cases

    root = _write_three_types(tmp_path / "h")
    parser = E.add_arguments(argparse.ArgumentParser())
    for split, seed in (("val", 0), ("train", 0), ("val", 4)):
        out = tmp_path / f"{split}{seed}"
        assert E.run(parser.parse_args([str(root), "--split", split, "--seed", str(seed), "--methods", "mean",
                                        "--metrics", "EN", "--no-save", "--no-progress", "--out", str(out)])) == 0
        tr, va = split_cases(harvard_pairs(root), seed=seed)
        want = {t: {Path(a).name[:-7] for a, _ in v} for t, v in (va if split == "val" else tr).items()}
        assert _cases_by_type(out / "metrics.csv") == want, (split, seed)
    # The split is pure Python: `medfuse evaluate --split val` does not load torch.
    code = ("import sys, medfuse.evaluate as E, argparse; p = E.add_arguments(argparse.ArgumentParser()); "
            f"E.run(p.parse_args([{str(root)!r}, '--split', 'val', '--methods', 'mean', '--metrics', 'EN', "
            f"'--no-save', '-q', '--out', {str(tmp_path / 'nt')!r}])); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_split_val_gives_the_shipped_weights_validation_cases(shared, tmp_path):
    from pathlib import Path

    root = shared("data", "harvard-pairs")
    meta = json.loads((Path(E.__file__).parent / "fusion" / "weights" / "medfuse_fusion.json").read_text())
    parser = E.add_arguments(argparse.ArgumentParser())
    assert E.run(parser.parse_args([str(root), "--split", "val", "--methods", "mean", "--metrics", "EN",
                                    "--no-save", "--no-progress", "--out", str(tmp_path / "o")])) == 0
    # Exactly the cases the shipped network was validated on (and so never trained on), every pair type.
    assert _cases_by_type(tmp_path / "o" / "metrics.csv") == {t: set(c) for t, c in meta["val_cases"].items()}


# ---------------------------------------------------------------------- names, outputs, device, means
def _two_subjects(tmp_path):
    """s1/ and s2/ with the same file names, different contents."""
    from medfuse.io import save

    for i, s in enumerate(("s1", "s2")):
        base = np.zeros((12, 12, 10))
        base[2 + i:10, 2:10 - i, 2:8] = 1.0
        (tmp_path / s).mkdir()
        save(_vol(base * (500 + 200 * i) + 10, modality="MR"), tmp_path / s / "mr.nii.gz")
        save(_vol(base[::-1] * (300 - 100 * i) + 5, modality="MR"), tmp_path / s / "pet.nii.gz")
    return [(tmp_path / s / "mr.nii.gz", tmp_path / s / "pet.nii.gz") for s in ("s1", "s2")]


def test_pairs_with_the_same_file_names_get_their_own_rows_and_outputs(tmp_path, capsys):
    pairs = _two_subjects(tmp_path)
    parser = E.add_arguments(argparse.ArgumentParser())
    argv = [a for p in pairs for a in ("--pair", str(p[0]), str(p[1]))] + ["--methods", "max", "--mode", "native",
                                                                           "--no-progress"]
    assert E.run(parser.parse_args(argv + ["--out", str(tmp_path / "o")])) == 0
    rows = [r for r in csv.DictReader((tmp_path / "o" / "metrics.csv").open()) if r["kind"] == "image"]
    assert [r["name"] for r in rows] == ["001_mr_pet", "002_mr_pet"]
    assert [r["output"] for r in rows] == ["max/001_mr_pet.nii.gz", "max/002_mr_pet.nii.gz"]
    assert all((tmp_path / "o" / r["output"]).exists() for r in rows)
    # Each row holds its own pair's scores.
    for p, r in zip(pairs, rows):
        alone = E.evaluate([p], methods=["max"], mode="native", out_dir=tmp_path / f"alone{r['name']}",
                           save_outputs=False)
        assert float(r["SSIM"]) == pytest.approx(alone.rows[0]["SSIM"]) and alone.rows[0]["name"] == "mr_pet"
    assert rows[0]["SSIM"] != rows[1]["SSIM"]
    no_save = E.evaluate(pairs, methods=["max"], mode="native", out_dir=tmp_path / "ns", save_outputs=False)
    assert [r["SSIM"] for r in no_save.rows] == [float(r["SSIM"]) for r in rows]
    # Explicit names are numbered the same way when they collide; a name must stay inside the output folder.
    named = E.evaluate([{"name": "a", "inputs": pairs[0]}, {"name": "a", "inputs": pairs[1]}], methods=["max"],
                       mode="native", out_dir=tmp_path / "named", save_outputs=False)
    assert [r["name"] for r in named.rows] == ["001_a", "002_a"]
    with pytest.raises(InvalidInputError, match="relative file name"):
        E.evaluate([{"name": "../escape", "inputs": pairs[0]}], methods=["max"], out_dir=tmp_path / "esc")


def test_an_existing_fused_output_is_refused_before_anything_is_written(tmp_path):
    src = _write_folder(tmp_path / "pairs", corrupt=False)
    out = tmp_path / "out"
    (out / "mean" / "PET-MRI").mkdir(parents=True)
    (out / "mean" / "PET-MRI" / "6002.png").write_bytes(b"an earlier run's output")
    with pytest.raises(OutputExistsError, match="6002.png"):
        E.evaluate(src, methods=["mean"], out_dir=out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["mean/PET-MRI/6002.png"]
    assert E.evaluate(src, methods=["mean"], out_dir=out, overwrite=True).ok


def test_a_gpu_this_machine_lacks_is_bad_input_before_anything_is_written(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    src = _write_folder(tmp_path / "pairs", corrupt=False)
    with pytest.raises(InvalidInputError, match="device 'cuda'"):
        E.evaluate(src, methods=["mean", "network"], device="cuda", out_dir=tmp_path / "o")
    parser = E.add_arguments(argparse.ArgumentParser())
    with pytest.raises(InvalidInputError, match="device 'cuda'"):  # the CLI prints it and exits 2
        E.run(parser.parse_args([str(src), "--methods", "network", "--device", "cuda", "--no-progress",
                                 "--out", str(tmp_path / "o")]))
    with pytest.raises(InvalidInputError, match="device 'cuda:1'"):  # the CLI takes the same names as `fuse`
        E.run(parser.parse_args([str(src), "--methods", "network", "--device", "cuda:1", "--no-progress",
                                 "--out", str(tmp_path / "o")]))
    with pytest.raises(InvalidInputError, match="unknown device 'gpu'"):
        E.run(parser.parse_args([str(src), "--methods", "network", "--device", "gpu", "--no-progress",
                                 "--out", str(tmp_path / "o")]))
    assert not (tmp_path / "o").exists()
    auto = E.run(parser.parse_args([str(src), "--pair-types", "PET-MRI", "--methods", "network", "--device", "auto",
                                    "--no-save", "--no-progress", "--out", str(tmp_path / "a")]))
    assert auto == 0 and (tmp_path / "a" / "metrics.csv").exists()  # auto: the CPU here


def test_means_say_how_many_images_they_are_over(tmp_path, capsys):
    src = _write_folder(tmp_path / "pairs", corrupt=False)
    same = np.asarray(Image.open(src / "CT-MRI" / "MRI" / "5001.png"))
    Image.fromarray(same).save(src / "CT-MRI" / "CT" / "5001.png")  # max(A, A) == A: PSNR is +inf
    parser = E.add_arguments(argparse.ArgumentParser())
    assert E.run(parser.parse_args([str(src), "--pair-types", "CT-MRI", "--methods", "max", "--metrics", "PSNR,CC",
                                    "--no-save", "--no-progress", "--out", str(tmp_path / "o")])) == 0
    table = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "o" / "metrics.csv").open()))
    images = [r for r in rows if r["kind"] == "image"]
    assert [r["PSNR"] for r in images][0] == "inf" and np.isfinite(float(images[1]["PSNR"]))
    mean = next(r for r in rows if r["kind"] == "mean")
    count = next(r for r in rows if r["kind"] == "count")
    assert mean["name"] == "n=2" and float(mean["PSNR"]) == pytest.approx(float(images[1]["PSNR"]))
    assert count["PSNR"] == "1" and count["CC"] == "2"  # the PSNR mean is over 1 image, not 2
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["means"]["max"]["CT-MRI"]["counts"] == {"PSNR": 1, "CC": 2}
    assert doc["means"]["max"]["CT-MRI"]["n"] == 2
    assert f"{float(mean['PSNR']):.3f} (n=1)" in table and f"{float(mean['CC']):.3f} |" in table


def test_nothing_scored_writes_no_table_and_quiet_prints_only_errors(tmp_path, capsys):
    """Header-only tables used to be written, which then blocked a re-run ("the evaluation tables exist")."""
    src = _write_folder(tmp_path / "pairs")  # CT-MRI 6002 is corrupt
    (src / "CT-MRI" / "CT" / "5001.png").write_bytes(b"not a png either")
    parser = E.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(src), "--pair-types", "CT-MRI", "--methods", "mean", "--metrics", "SSIM,Qabf",
                              "--out", str(tmp_path / "o")])
    assert E.run(args, quiet=True) == 1
    out, err = capsys.readouterr()
    assert out == "" and "CT-MRI/5001" in err and "CT-MRI/6002" in err
    assert not (tmp_path / "o").exists()
    args = parser.parse_args([str(src), "--pair-types", "PET-MRI", "--methods", "mean", "-q",
                              "--out", str(tmp_path / "o2")])
    assert E.run(args) == 0 and capsys.readouterr() == ("", "")


# ---------------------------------------------------------------------- review fixes (2026-12-04)
def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path):
    """``--overwrite`` replaces earlier outputs, never the data: a pair named like its own input (or an input
    kept under <out>/<method>/) used to have that input replaced by the fused volume, silently."""
    from medfuse.io import save

    base = np.zeros((12, 12, 10))
    base[2:10, 2:10, 2:8] = 1.0
    out = tmp_path / "out"
    (out / "max").mkdir(parents=True)
    save(_vol(base * 500 + 10, modality="MR"), out / "max" / "mr.nii.gz")
    save(_vol(base[::-1] * 300 + 5, modality="MR"), tmp_path / "t2.nii.gz")
    before = (out / "max" / "mr.nii.gz").read_bytes()
    for spelled in (out / "max" / "mr.nii.gz", tmp_path / "out" / "max" / ".." / "max" / "mr.nii.gz"):
        with pytest.raises(InvalidInputError, match="write over the input") as ei:
            E.evaluate([{"name": "mr", "inputs": (str(spelled), str(tmp_path / "t2.nii.gz"))}], methods=["max"],
                       out_dir=out, mode="native", overwrite=True)
        assert "Fix:" in str(ei.value)
    assert (out / "max" / "mr.nii.gz").read_bytes() == before
    assert sorted(p.name for p in out.rglob("*")) == ["max", "mr.nii.gz"]  # nothing else written
    # Without the collision the same call runs.
    assert E.evaluate([{"name": "fused", "inputs": (str(out / "max" / "mr.nii.gz"), str(tmp_path / "t2.nii.gz"))}],
                      methods=["max"], out_dir=out, mode="native", overwrite=True).ok


def test_an_out_that_is_a_file_is_bad_input_not_a_raw_oserror(tmp_path):
    src = _write_folder(tmp_path / "pairs", corrupt=False)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(InvalidInputError, match="output folder is a file"):
        E.evaluate(src, methods=["mean"], out_dir=tmp_path / "afile")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mean").write_text("a file where the method's folder goes")
    with pytest.raises(InvalidInputError, match="folder is a file"):
        E.evaluate(src, methods=["mean"], out_dir=tmp_path / "o", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["mean"]


def test_metrics_the_volume_mode_lacks_or_none_at_all_are_bad_input_up_front(tmp_path):
    """``--mode native --metrics Qabf`` failed every volume one by one (exit 1, empty tables) and
    ``--metrics ''`` wrote tables without a metric (exit 0); both are bad arguments (exit 2), refused first."""
    from medfuse.io import save

    base = np.zeros((12, 12, 10))
    base[2:10, 2:10, 2:8] = 1.0
    save(_vol(base * 500 + 10, modality="MR"), tmp_path / "mr.nii.gz")
    save(_vol(base[::-1] * 300 + 5, modality="MR"), tmp_path / "t2.nii.gz")
    parser = E.add_arguments(argparse.ArgumentParser())
    pair = ["--pair", str(tmp_path / "mr.nii.gz"), str(tmp_path / "t2.nii.gz"), "--methods", "max", "--no-progress"]
    with pytest.raises(InvalidInputError, match="Qabf is not defined for this mode"):
        E.run(parser.parse_args(pair + ["--mode", "native", "--metrics", "SSIM,Qabf", "--out", str(tmp_path / "o")]))
    with pytest.raises(InvalidInputError, match="no metric was named"):
        E.run(parser.parse_args(pair + ["--metrics", "", "--out", str(tmp_path / "o")]))
    assert not (tmp_path / "o").exists()
    # The same metric in slice-wise mode is fine.
    assert E.run(parser.parse_args(pair + ["--metrics", "SSIM,Qabf", "--out", str(tmp_path / "o"), "-q"])) == 0


def test_images_too_small_for_vif_count_as_missing_not_perfect(tmp_path, capsys):
    """A 12x12 pair scored VIF 2.0 (the maximum of two perfect sources) whatever the fusion; now NaN, left out
    of the means and counted, like Qabf on an image without edges."""
    rng = np.random.default_rng(0)
    for ptype, other in (("CT-MRI", "CT"),):
        for sub in ("MRI", other):
            (tmp_path / "p" / ptype / sub).mkdir(parents=True)
        for name, n in (("1001.png", 32), ("2001.png", 12)):
            for sub in ("MRI", other):
                Image.fromarray(rng.integers(0, 255, (n, n), dtype=np.uint8)).save(tmp_path / "p" / ptype / sub / name)
    res = E.evaluate(tmp_path / "p", methods=["mean"], metrics=["VIF", "SSIM"], out_dir=tmp_path / "o")
    assert res.ok
    vifs = {r["name"]: r["VIF"] for r in res.rows}
    assert np.isfinite(vifs["CT-MRI/1001"]) and np.isnan(vifs["CT-MRI/2001"])
    mean = res.means["mean"]["CT-MRI"]
    assert mean["counts"] == {"VIF": 1, "SSIM": 2} and mean["VIF"] == pytest.approx(vifs["CT-MRI/1001"])
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert [i["VIF"] for i in doc["images"] if i["name"] == "CT-MRI/2001"] == [None]
    assert "(n=1)" in res.table()


def test_volumes_without_content_are_reported_not_scored_nan(tmp_path):
    flat = _vol(np.full((12, 12, 10), 5.0), modality="MR")
    res = E.evaluate([(flat, flat)], methods=["mean"], out_dir=tmp_path / "o", save_outputs=False)
    assert not res.ok and not res.rows and "no slice carries content" in res.failures[0]["error"]


def test_a_non_finite_option_is_recorded_not_a_crash_after_the_csv(tmp_path, monkeypatch):
    """An option such as eps1=nan went into metrics.json as a bare NaN: json.dumps(allow_nan=False) raised a
    ValueError after every pair was scored, with metrics.csv written and metrics.json missing."""
    import medfuse.fusion as fusion

    real = fusion.fuse
    monkeypatch.setattr(fusion, "fuse", lambda *s, method, device="cpu", **opts: real(*s, method="mean"))
    src = _write_folder(tmp_path / "pairs", corrupt=False)
    res = E.evaluate(src, methods=["gff"], pair_types=["CT-MRI"], out_dir=tmp_path / "o", eps1=float("nan"),
                     sigma=np.float64(5.0), r1=np.int64(45))
    assert res.ok
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["options"] == {"eps1": "nan", "sigma": 5.0, "r1": "45"}


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(shared, tmp_path):
    # Pillow's convert("RGB") clips a 16-bit grey PNG at 255: a real MRI slice stored at 16 bits (x257, how tools
    # widen 8-bit data) read as a nearly white image, and scored EN 0.14.
    from medfuse.harvard import load_png

    src = sorted(shared("data", "harvard-pairs", "CT-MRI", "MRI").glob("*.png"))[0]
    eight = load_png(src)
    assert eight.dtype == np.uint8 and eight.ndim == 2 and eight.max() > 100
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")  # really stored at 16 bits
    np.testing.assert_array_equal(load_png(tmp_path / "wide.png"), eight)


def test_a_full_disk_mid_run_removes_the_images_it_wrote_so_the_rerun_starts_clean(tmp_path, monkeypatch):
    """Stopped by a full disk at the third image, the run left its first two (and no tables): the disk stayed
    full, and the rerun was refused as 'a fused output of an earlier evaluation exists'."""
    import errno

    from medfuse.errors import OutputWriteError

    src = _write_folder(tmp_path / "pairs", corrupt=False)
    out = tmp_path / "out"
    (out / "mean" / "CT-MRI").mkdir(parents=True)
    mine = out / "mean" / "CT-MRI" / "notes.txt"  # the user's own file in a method folder: kept
    mine.write_text("x")
    real, calls = E._save_png, []

    def fills_up(img, target, overwrite, inputs=()):
        calls.append(target)
        if len(calls) == 3:
            raise OutputWriteError("the disk is full; nothing was written", errno=errno.ENOSPC, path=target)
        real(img, target, overwrite, inputs=inputs)

    monkeypatch.setattr(E, "_save_png", fills_up)
    with pytest.raises(OutputWriteError, match="the 2 fused image") as info:
        E.evaluate(src, methods=["mean", "max"], out_dir=out)
    assert info.value.errno == errno.ENOSPC
    assert not any(p.exists() for p in calls) and mine.exists()
    assert not (out / "metrics.csv").exists() and not (out / "mean" / "PET-MRI").exists()
    monkeypatch.setattr(E, "_save_png", real)
    assert E.evaluate(src, methods=["mean", "max"], out_dir=out).ok  # no --overwrite needed


def test_quiet_keeps_the_warnings_and_says_each_once(tmp_path, capsys):
    """-q dropped every warning (a scale mismatch that makes the scores incomparable among them), although its
    help says "only warnings and errors"; a warning each method repeated was said once per method."""
    src = _write_folder(tmp_path / "pairs", corrupt=False)
    ct = src / "CT-MRI" / "CT" / "5001.png"
    dim = (np.asarray(Image.open(ct), np.uint16) * 16).astype(np.uint16)  # 16-bit, 0..3680: 0..14 once read
    Image.fromarray(dim).save(ct)
    parser = E.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--pair", str(src / "CT-MRI" / "MRI" / "5001.png"), str(ct), "--methods", "mean,max",
                              "--metrics", "EN", "--out", str(tmp_path / "o"), "-q", "--no-progress"])
    assert E.run(args) == 0
    out, err = capsys.readouterr()
    assert out == "" and "very different intensity scale" in err, err
    # A constant source: the same warning under each method, said once.
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(ct)
    args.out = str(tmp_path / "o2")
    assert E.run(args) == 0
    err = capsys.readouterr().err
    assert err.count("is constant") == 1, err
