"""medfuse evaluate's inputs and printed table: --pair paths that name nothing, unknown --pair-types, the
columns of the table with --metrics, and load_png's fix for a missing file."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
from PIL import Image

from medfuse import evaluate as E
from medfuse import harvard
from medfuse.cli import EXIT_USAGE, main
from medfuse.errors import InvalidInputError, UnreadableFileError


def _folder(root):
    """A tiny Harvard-layout folder: one CT-MRI and one PET-MRI pair of 32x32 grey images."""
    rng = np.random.default_rng(1)
    for ptype, other in (("CT-MRI", "CT"), ("PET-MRI", "PET")):
        for sub in ("MRI", other):
            (root / ptype / sub).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / ptype / sub / "5001.png")
    return root


def _pngs(tmp_path):
    rng = np.random.default_rng(2)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(p)
    return paths


def _cells(line: str):
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.parametrize("which", [0, 1])
def test_a_missing_pair_png_is_bad_input_before_any_work(tmp_path, capsys, which):
    """Before: exit 1, "5 item(s) failed and were skipped" with "Fix: replace the file with a valid PNG" per method."""
    pair = [str(p) for p in _pngs(tmp_path)]
    pair[which] = str(tmp_path / "nonexist.png")
    out = tmp_path / "e5"
    assert main(["evaluate", "--pair", *pair, "-o", str(out), "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "nonexist.png: no such file or folder. Fix: check the path." in err
    assert "valid PNG" not in err and "failed and were skipped" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(UnreadableFileError, match="no such file or folder") as e:
        E.evaluate([tuple(pair)], methods=["max"], out_dir=out)
    assert e.value.fix == "check the path" and not out.exists()


def test_a_folder_given_as_a_pair_png_is_refused(tmp_path, capsys):
    a, _ = _pngs(tmp_path)
    (tmp_path / "d.png").mkdir()
    assert main(["evaluate", "--pair", str(a), str(tmp_path / "d.png"), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == EXIT_USAGE
    assert "this is a folder, not a PNG image" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_missing_volume_of_a_pair_is_bad_input(tmp_path, capsys, samples_dir):
    out = tmp_path / "e7"
    assert main(["evaluate", "--pair", str(samples_dir / "mr_t1.nii.gz"), str(tmp_path / "nothere.nii.gz"),
                 "-o", str(out), "--methods", "max", "--no-progress"]) == EXIT_USAGE
    assert "nothere.nii.gz: no such file or folder. Fix: check the path." in capsys.readouterr().err
    assert not out.exists()


def test_load_png_tells_a_missing_file_from_a_damaged_one(tmp_path):
    with pytest.raises(UnreadableFileError) as e:
        harvard.load_png(tmp_path / "gone.png")
    assert e.value.problem == "no such file or folder" and e.value.fix == "check the path"
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(UnreadableFileError, match="a folder, not a PNG image"):
        harvard.load_png(tmp_path / "dir.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(UnreadableFileError, match="replace the file with a valid PNG"):
        harvard.load_png(tmp_path / "bad.png")


@pytest.mark.parametrize("asked", [["FOO"], ["CT-MRI", "foo"]])
def test_an_unknown_pair_type_is_named_with_the_folders_own(tmp_path, asked):
    """Before: --pair-types FOO answered "no image pairs found"; CT-MRI,FOO dropped FOO silently."""
    root = _folder(tmp_path / "h")
    with pytest.raises(InvalidInputError) as e:
        harvard.list_pairs(root, pair_types=asked)
    bad = asked[-1]
    assert f"unknown pair type(s) {bad!r}" in e.value.problem
    for known in ("CT-MRI", "PET-MRI", "CT", "PET"):
        assert known in e.value.fix
    assert "no image pairs found" not in str(e.value)
    # Known names, in any case, and modalities still select.
    assert {p.pair_type for p in harvard.list_pairs(root, pair_types=["ct-mri"])} == {"CT-MRI"}
    assert {p.pair_type for p in harvard.list_pairs(root, pair_types=["PET"])} == {"PET-MRI"}


def test_cli_unknown_pair_type_exits_2_before_writing(tmp_path, capsys):
    root = _folder(tmp_path / "h")
    out = tmp_path / "o"
    assert main(["evaluate", str(root), "--pair-types", "FOO", "-o", str(out), "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown pair type(s) 'FOO'" in err and "CT-MRI, PET-MRI" in err and not out.exists()


def test_the_printed_table_shows_the_metrics_asked_for(tmp_path, capsys):
    """Before: --metrics AG,FMI,MS-SSIM printed "| Method | Pair | n |  |" over "|---|---|---|" and no value."""
    root = _folder(tmp_path / "h")
    parser = E.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "o"
    args = parser.parse_args([str(root), "--pair-types", "CT-MRI", "--methods", "max", "--metrics", "AG,FMI,MS-SSIM",
                              "--out", str(out), "--no-progress"])
    assert E.run(args) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("|")]
    header, sep, *rows = lines
    assert _cells(header) == ["Method", "Pair", "n", "AG", "FMI", "MS-SSIM"]
    assert len(_cells(sep)) == len(_cells(header)) and all(len(_cells(r)) == len(_cells(header)) for r in rows)
    means = json.loads((out / "metrics.json").read_text())["means"]["max"]["CT-MRI"]
    assert _cells(rows[0])[3:] == [f"{means[m]:.3f}" for m in ("AG", "FMI", "MS-SSIM")]


def test_the_table_of_a_result_and_of_means_without_summary_metrics(tmp_path):
    root = _folder(tmp_path / "h")
    res = E.evaluate(root, methods=["mean"], metrics=["Qabf", "AG"], out_dir=tmp_path / "o", save_outputs=False)
    assert _cells(res.table().splitlines()[0])[3:] == ["Qabf", "AG"]  # as asked, in that order
    only = {"max": {"x": {"AG": 1.5, "FMI": 0.25, "n": 1, "counts": {"AG": 1, "FMI": 1}}}}
    head, sep, row = E.format_table(only).splitlines()
    assert _cells(head) == ["Method", "Pair", "n", "AG", "FMI"] and len(_cells(sep)) == 5
    assert _cells(row) == ["max", "x", "1", "1.500", "0.250"]
    # Columns named that no row has are left out; every line keeps as many cells as the header.
    lines = E.format_table(only, metrics=["SSIM"]).splitlines()
    assert all(len(_cells(x)) == 3 for x in lines)
    assert re.fullmatch(r"\|(---\|){3}", lines[1])


def test_the_summary_line_counts_one_image_in_the_singular(tmp_path, capsys):
    root = _folder(tmp_path / "h")
    parser = E.add_arguments(argparse.ArgumentParser())
    assert E.run(parser.parse_args([str(root), "--pair-types", "CT-MRI", "--methods", "max", "--metrics", "SD",
                                    "--out", str(tmp_path / "o"), "--no-progress"])) == 0
    assert "(1 image scored)" in capsys.readouterr().out


def test_mode_with_a_folder_of_2d_pairs_is_refused_not_ignored(tmp_path, capsys):
    """`--mode native` on a folder of PNG pairs exited 0 and scored them as images, where a volume run refuses
    Qabf in native mode: the user believed it applied."""
    folder = _folder(tmp_path / "pairs")
    assert main(["evaluate", str(folder), "--methods", "max", "--mode", "native", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == EXIT_USAGE
    assert "--mode is for volumes given with --pair" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_mistyped_method_or_metric_names_the_near_one(tmp_path):
    """The README says a mistyped choice gets a suggestion; evaluate's methods and metrics only listed them."""
    import medfuse.evaluate as E
    from medfuse.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"'lapacian'; did you mean 'laplacian'\? Fix: choose from"):
        E.evaluate([("a.png", "b.png")], methods=["lapacian"], out_dir=tmp_path / "o")
    with pytest.raises(InvalidInputError, match=r"'Qab'; did you mean 'Qabf'\?"):
        E.evaluate([("a.png", "b.png")], methods=["mean"], metrics=["Qab"], out_dir=tmp_path / "o")
    with pytest.raises(InvalidInputError) as ei:  # nothing near: no suggestion
        E.evaluate([("a.png", "b.png")], methods=["zzz"], out_dir=tmp_path / "o")
    assert "did you mean" not in str(ei.value)


@pytest.mark.parametrize("damage", ["truncated", "pickle", "nan"])
def test_weights_the_network_cannot_load_are_refused_before_any_work(tmp_path, capsys, damage):
    """A truncated, pickled or NaN --weights file was tried once per pair: the classical methods were scored, the
    same long error printed for every pair, exit 1. Now exit 2 before anything is written, in the option's words."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from medfuse.fusion.infer import default_weights_path

    shipped = default_weights_path()
    bad = tmp_path / "mine.safetensors"
    if damage == "truncated":
        bad.write_bytes(shipped.read_bytes()[:5000])
    elif damage == "pickle":
        torch.save({"w": torch.zeros(2)}, bad)
    else:
        with safe_open(str(shipped), "pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(shipped))
        name = next(iter(tensors))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
        save_file(tensors, str(bad), metadata=meta)
    a, b = _pngs(tmp_path)
    out = tmp_path / "eval"
    assert main(["evaluate", "--pair", str(a), str(b), "--methods", "network,max", "--weights", str(bad),
                 "--out", str(out), "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("medfuse evaluate: error:") == 1 and "weights=" not in err, err
    assert {"truncated": "not a whole safetensors file", "pickle": "not safetensors",
            "nan": "NaN or infinite values"}[damage] in err
    assert not out.exists()


def test_weights_without_the_network_among_the_methods_is_said_in_option_names(tmp_path, capsys):
    """--weights with the default methods (no network) said "weights names ... 'network' is not among the
    methods", in the Python API's words."""
    a, b = _pngs(tmp_path)
    assert main(["evaluate", "--pair", str(a), str(b), "--weights", str(tmp_path / "w.safetensors"),
                 "--out", str(tmp_path / "o")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--weights names the fusion network's weights, but --methods does not include network" in err
    assert "--methods network,max" in err and not (tmp_path / "o").exists()
