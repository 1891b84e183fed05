"""What a lecturer preparing a class with the Python API met: typos without a near name in the fusion and
normalisation modules called directly, ``device="gpu"``, ``medfuse.load`` on a Harvard PNG, an anisotropy
warning that did not name its fix, result reprs that flooded a notebook cell, and the evaluate command's bar
that ignored the progress switches and redrew on every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
import warnings

import numpy as np
import pytest
from PIL import Image

import medfuse
from medfuse import Volume
from medfuse import cli
from medfuse import evaluate as E
from medfuse.errors import InvalidInputError, MedfuseError, UnreadableFileError
from medfuse.fusion.classical import fuse_arrays
from medfuse.fusion.device import check_device_name
from medfuse.fusion.normalise import normalise

RNG = np.random.default_rng(7)
A, B = RNG.random((32, 32)), RNG.random((32, 32))


def _raised(call) -> MedfuseError:
    with pytest.raises(InvalidInputError) as err:
        call()
    return err.value


# ----------------------------------------------------------------------------- near names
def test_normalise_called_directly_names_the_near_method():
    e = _raised(lambda: normalise(A, method="percentil"))
    assert e.problem == "unknown normalisation method 'percentil'; did you mean 'percentile'?"
    assert e.fix == "use one of auto, window, suv, dose, percentile, minmax, range, none"
    # The wording medfuse.fuse gives for the same typo.
    assert _raised(lambda: medfuse.fuse(A, B, normalise="percentil", method="mean")).problem == e.problem
    # A path given as the method is never echoed.
    assert "DOE" not in str(_raised(lambda: normalise(A, method="/data/DOE^JOHN/minmax")))


def test_classical_method_typo_names_the_near_rule():
    e = _raised(lambda: fuse_arrays([A, B], method="lapacian"))
    assert e.problem == "unknown classical fusion method 'lapacian'; did you mean 'laplacian'?"
    assert "DOE" not in str(_raised(lambda: fuse_arrays([A, B], method="/data/DOE^JOHN/x")))


@pytest.mark.parametrize("method,options,expected", [
    ("laplacian", {"level": 3}, "option level not understood by method 'laplacian'; did you mean 'levels'?"),
    ("gff", {"radius": 3}, "option radius not understood by method 'gff'; did you mean 'base_radius'?"),
    ("wavelet", {"wavlet": "db2"}, "option wavlet not understood by method 'wavelet'; did you mean 'wavelet'?"),
    ("mean", {"levels": 3}, "option levels not understood by method 'mean' (levels is an option of laplacian, "
                            "wavelet)"),
    ("laplacian", {"level": 3, "wieghts": [1, 1]}, "options level, wieghts not understood by method 'laplacian' "
     "(level: did you mean 'levels'?; wieghts: did you mean 'weights'?)"),
])
def test_an_option_typo_names_the_option_meant(method, options, expected):
    e = _raised(lambda: fuse_arrays([A, B], method=method, **options))
    assert e.problem == expected
    # medfuse.fuse passes the options to the rule: the same message.
    assert _raised(lambda: medfuse.fuse(A, B, method=method, **options)).problem == expected
    # The suggestion is right: with it, the rule runs.
    fixed = {re.search(r"did you mean '(\w+)'", expected).group(1) if "did you mean" in expected else k: v
             for k, v in options.items()}
    if method != "mean" and len(options) == 1:
        assert fuse_arrays([A, B], method=method, **fixed).shape == A.shape


def test_a_misspelt_wavelet_names_the_near_one():
    e = _raised(lambda: fuse_arrays([A, B], method="wavelet", wavelet="dbb2"))
    assert e.problem == "unknown wavelet 'dbb2': it names no PyWavelets wavelet; did you mean 'db2'?"


@pytest.mark.parametrize("device,near", [("gpu", "cuda"), ("GPU", "cuda"), ("gpu:1", "cuda:1"), ("cdua", "cuda"),
                                         ("nvidia", "cuda"), ("metal", "mps"), ("cpuu", "cpu")])
def test_a_device_for_a_gpu_by_another_name_suggests_the_one_torch_takes(device, near):
    e = _raised(lambda: check_device_name(device))
    assert e.problem.startswith("unknown device") and e.problem.endswith(f"; did you mean '{near}'?")
    # Spelling alone offered 'cpu' for 'gpu': the opposite of what was meant.
    assert "'cpu'" not in e.problem or near == "cpu"
    assert _raised(lambda: medfuse.fuse(A, B, method="mean", device=device)).problem == e.problem


def test_a_device_that_is_no_word_gets_no_guess():
    e = _raised(lambda: check_device_name("/dev/DOE^JOHN"))
    assert "did you mean" not in e.problem and "DOE" not in str(e)


# ----------------------------------------------------------------------------- a PNG given to load
def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def test_load_of_a_png_points_to_the_harvard_readers(tmp_path):
    pixels = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    png = _png(tmp_path / "28010.png", pixels)
    before = png.read_bytes()
    for call in (medfuse.load, medfuse.load_volumes):
        with pytest.raises(UnreadableFileError) as err:
            call(png)
        assert err.value.problem.startswith("not a medical image but a 2-D picture (.png)")
        assert err.value.filename == str(png)
        assert "medfuse.harvard.load_gray(path)" in err.value.fix and "medfuse.harvard.list_pairs" in err.value.fix
    assert png.read_bytes() == before  # the input is never touched
    # The reader it names reads the file: the pixels written.
    from medfuse.harvard import load_gray

    assert np.array_equal(load_gray(png), pixels.astype(np.float64))
    # A folder of them (a pair type's MRI/ folder) says the same.
    with pytest.raises(UnreadableFileError) as err:
        medfuse.load(tmp_path)
    assert "2-D pictures, not DICOM" in err.value.fix and "medfuse.harvard" in err.value.fix


# ----------------------------------------------------------------------------- the anisotropy warning
def test_the_anisotropy_warning_names_the_resampling_that_removes_it():
    from medfuse.fusion import _ANISOTROPY_NOTE, _anisotropy_notes

    vol = Volume(RNG.random((24, 24, 8)).astype(np.float32), np.diag([1.0, 1.0, 4.0, 1.0]), modality="MR")
    with pytest.warns(medfuse.errors.MedfuseWarning) as caught:
        notes = _anisotropy_notes(vol, "network", None)
    text = str(caught[0].message)
    assert text.startswith(_ANISOTROPY_NOTE) and notes == [text]
    assert "medfuse.resample_to_common_grid([a, b])" in text
    # The function it names is public, and its result draws no warning: an isotropic grid.
    iso = medfuse.resample_to_common_grid([vol, vol])
    assert all(v.spacing == (1.0, 1.0, 1.0) for v in iso)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _anisotropy_notes(iso[0], "network", None) == []


# ----------------------------------------------------------------------------- short reprs
def _default_repr(obj) -> str:
    """What the dataclass repr printed: every field's own repr."""
    return f"{type(obj).__name__}(" + ", ".join(f"{f.name}={getattr(obj, f.name)!r}"
                                                for f in dataclasses.fields(obj)) + ")"


def test_a_pipeline_result_shows_as_one_short_line(tmp_path):
    from medfuse.pipeline import PipelineState, fuse_files

    rng = np.random.default_rng(1)
    a = Volume(rng.random((24, 24, 12)).astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0]), modality="MR")
    b = a.with_array(rng.random((24, 24, 12)).astype(np.float32))
    out = tmp_path / "DOE^JOHN" / "fused.nii.gz"
    out.parent.mkdir()
    res = fuse_files(a, b, out, method="mean")
    text = repr(res)
    assert len(text) <= 400 < len(_default_repr(res))
    assert text.startswith("PipelineResult(fused=Volume(shape=(24, 24, 12), spacing=1x1x3 mm")
    assert "method='mean'" in text and "device='cpu'" in text and "output='fused.nii.gz'" in text
    assert [s["name"] for s in res.steps] == re.findall(r"(\w+) [\d.e-]+ s", text.split("steps: ")[1])
    assert "DOE" not in text  # the output's folders are left out
    assert res.provenance["method_used"] == "mean" and res.output == out  # the fields as they were
    state = repr(PipelineState(inputs=[a, b], volumes=[a, b]))
    assert state == ("PipelineState(2 inputs, volumes: (24, 24, 12), (24, 24, 12), fused=None, output=None, "
                     "steps: none)")


def _pairs(root, names=("5001.png", "6002.png")):
    yy, xx = np.mgrid[0:32, 0:32]
    (root / "CT-MRI" / "MRI").mkdir(parents=True)
    (root / "CT-MRI" / "CT").mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        _png(root / "CT-MRI" / "MRI" / name,
             np.clip(100 + 60 * np.sin(xx / 3.0) + rng.normal(0, 8, (32, 32)), 0, 255).astype(np.uint8))
        _png(root / "CT-MRI" / "CT" / name, (((xx - 16) ** 2 + (yy - 16) ** 2 < 64) * 230).astype(np.uint8))
    return root


def test_an_evaluation_result_shows_as_one_short_line(tmp_path):
    res = E.evaluate(_pairs(tmp_path / "pairs"), methods=["mean", "max"], out_dir=tmp_path / "ev",
                     metrics=["SSIM", "Qabf", "MI", "EN"])
    text = repr(res)
    assert len(text) <= 400 < len(_default_repr(res))
    assert text.startswith("EvaluationResult(mode='2d', 4 images scored, 0 failed, out_dir='ev', means: ")
    for method in ("mean", "max"):
        vals = res.means[method]["CT-MRI"]
        # The first three columns the table shows, as its cells round them; the fourth is left to table().
        assert (f"{method} (n=2): SSIM {vals['SSIM']:.3f}, Qabf {vals['Qabf']:.3f}, MI {vals['MI']:.3f}"
                in text)
        assert f"{vals['SSIM']:.3f}" in res.table()
    assert "EN " not in text and "EN" in res.table()
    res.means = {"mean": 3}  # edited by hand into another shape: the repr still answers
    assert "means: none" in repr(res)


# ----------------------------------------------------------------------------- the evaluate command's bar
class _Terminal(io.StringIO):
    """A stderr that says it is a UTF-8 terminal (tqdm's ``disable=None`` then draws)."""

    encoding = "utf-8"

    def isatty(self):
        return True


@pytest.fixture
def evaluate_run(tmp_path, monkeypatch):
    """``run()`` runs ``medfuse evaluate`` on two pairs with a terminal as stderr and a stopped clock for the bar;
    it returns what was drawn and how many progress callbacks evaluate made."""
    for name in ("MEDFUSE_NO_PROGRESS", "TQDM_DISABLE", "TQDM_ASCII", "TERM", "LC_ALL", "LC_CTYPE", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    monkeypatch.setattr(cli._Bar, "_now", staticmethod(lambda: 1000.0))  # no redraw is due by the clock
    src = _pairs(tmp_path / "pairs", names=("5001.png", "6002.png", "7003.png", "8004.png", "9005.png"))
    parser = E.add_arguments(argparse.ArgumentParser())
    calls = []
    real = E.evaluate

    def counted(*args, progress=None, **kwargs):
        def relay(fraction, message=""):
            calls.append(fraction)
            progress(fraction, message)
        return real(*args, progress=relay if progress else None, **kwargs)

    monkeypatch.setattr(E, "evaluate", counted)

    def run(out):
        stream = _Terminal()
        monkeypatch.setattr(cli.sys, "stderr", stream)
        calls.clear()
        assert E.run(parser.parse_args([str(src), "--methods", "mean,max", "--out", str(tmp_path / out)])) == 0
        bars = [x for x in stream.getvalue().split("\r") if "evaluate" in x and "%" in x]
        return bars, len(calls)

    return run, monkeypatch


@pytest.mark.parametrize("name,value", [("MEDFUSE_NO_PROGRESS", "1"), ("TQDM_DISABLE", "1"), ("TERM", "dumb")])
def test_the_evaluate_bar_honours_the_progress_switches(evaluate_run, name, value):
    run, monkeypatch = evaluate_run
    bars, calls = run("on")
    assert bars and calls > 0  # a terminal and no switch: a bar
    monkeypatch.setenv(name, value)
    bars, calls = run("off")
    assert bars == [] and calls > 0  # the work reported progress; nothing was drawn


def test_the_evaluate_bar_is_not_redrawn_on_every_step(evaluate_run):
    run, _ = evaluate_run
    bars, calls = run("throttled")
    # With the clock stopped: tqdm's first drawing, the first step's and the last (at 100 %) only; each step was
    # a redraw (as many as the callbacks, one per pair and method).
    assert calls >= 10 and 1 <= len(bars) <= 3, (calls, bars)
    assert bars[-1].startswith("evaluate: 100%")
