"""The command line read through a screen reader or braille display, or driven by a script: the progress bar's
redraw rate, switches, width and characters; what fuse says about registering; ``info --json`` on errors;
options every command takes; plain help texts; the demo's error against the samples' truth."""

from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from medfuse import cli
from medfuse.cli import EXIT_USAGE, build_parser, main
from medfuse.progress import cut_at_word
from tests.test_cli_option_names import _pair  # two NIfTI files on one grid

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_volumes"
_SWITCHES = ("MEDFUSE_NO_PROGRESS", "TQDM_DISABLE", "TQDM_ASCII", "TERM", "LC_ALL", "LC_CTYPE", "LANG", "COLUMNS")


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (tqdm's ``disable=None`` then draws), of a given encoding."""

    def __init__(self, encoding: str = "utf-8"):
        super().__init__()
        self._encoding = encoding

    @property
    def encoding(self):  # StringIO's is None
        return self._encoding

    def isatty(self):
        return True


@pytest.fixture
def terminal(monkeypatch):
    """A UTF-8 terminal as stderr, no switch in the environment. Each test puts it in place itself (``use``):
    pytest sets its own sys.stderr again after the fixtures ran."""
    for name in _SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    stream = _Terminal()
    stream.use = lambda: monkeypatch.setattr(cli.sys, "stderr", stream)
    return stream


def _lines(stream: _Terminal):
    """The bar's drawings: what each carriage return began, without tqdm's cursor escapes."""
    import re

    return [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", x) for x in stream.getvalue().split("\r") if x.strip()]


# ----------------------------------------------------------------------------- the bar
def test_the_bar_is_redrawn_at_most_twice_a_second(terminal, monkeypatch):
    """Before, every callback redrew it: 15 to 38 redraws a second, each one read out by a screen reader."""
    terminal.use()
    clock = [1000.0]
    monkeypatch.setattr(cli._Bar, "_now", staticmethod(lambda: clock[0]))
    with cli._Bar("register (rigid)") as bar:
        assert bar.bar is not None and not bar.bar.disable
        drawn = len(_lines(terminal))
        for i in range(100):  # one simulated second, a callback every 10 ms
            clock[0] += 0.01
            bar(i / 200, f"rigid: level 1/3, iteration {i}")
        redraws = len(_lines(terminal)) - drawn
    assert 1 <= redraws <= 3, _lines(terminal)  # at the start, 0.5 s and 1 s of the simulated clock
    assert "iteration" in _lines(terminal)[-1]  # the latest message is what is shown


@pytest.mark.parametrize("name,value", [("MEDFUSE_NO_PROGRESS", "1"), ("TQDM_DISABLE", "1"), ("TERM", "dumb")])
def test_the_environment_turns_the_bar_off(terminal, monkeypatch, name, value):
    """TERM=dumb and TQDM_DISABLE=1 were ignored (disable=None was passed to tqdm); MEDFUSE_NO_PROGRESS is the one
    switch for every command."""
    terminal.use()
    monkeypatch.setenv(name, value)
    with cli._Bar("fuse") as bar:
        bar(0.5, "fusing")
    assert bar.bar is None and terminal.getvalue() == ""
    monkeypatch.setenv(name, "0" if name != "TERM" else "xterm")  # "0" is off, as is an empty value
    with cli._Bar("fuse") as bar:
        assert bar.bar is not None


def test_the_switch_reaches_batch_and_the_delegated_commands(monkeypatch, tmp_path):
    """batch and evaluate have bars of their own (batch.py, evaluate.py); the switch turns them off too, and
    train, which has no --no-progress of its own, takes it and sees a stderr that is no terminal."""
    import importlib
    import importlib.util

    from medfuse.errors import InvalidInputError

    seen = {}

    def run_batch(*args, **kwargs):
        seen["batch"] = kwargs["progress"]
        raise InvalidInputError("stop here")

    monkeypatch.setattr("medfuse.batch.run_batch", run_batch)
    for env, expected in (("1", False), ("", True)):
        monkeypatch.setenv("MEDFUSE_NO_PROGRESS", env)
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
        monkeypatch.setenv("TERM", "xterm")
        assert main(["batch", str(tmp_path / "subjects.csv"), "--method", "max"]) == EXIT_USAGE
        assert seen.pop("batch") is expected
    if importlib.util.find_spec("medfuse.fusion.train") is None:
        pytest.skip("medfuse.fusion.train is not part of this checkout")
    mod = importlib.import_module("medfuse.fusion.train")
    monkeypatch.setattr(mod, "run", lambda a: seen.setdefault("train", (a, cli.sys.stderr.isatty())) and 0)
    monkeypatch.setattr(cli.sys, "stderr", _Terminal())
    assert main(["train", "--epochs", "1", "--no-progress"]) == 0
    args, tty = seen["train"]
    assert tty is False and args.argv == ["--epochs", "1"]
    assert cli.sys.stderr.isatty()  # given back


def test_blocks_are_ascii_where_the_locale_cannot_show_them(terminal, monkeypatch):
    """Under LC_ALL=C Python's UTF-8 mode still encodes the block characters, which a C terminal shows as garbage."""
    terminal.use()
    with cli._Bar("fuse") as bar:
        bar(0.55, "fusing")
        assert "\u2588" in _lines(terminal)[-1]  # a UTF-8 locale: Unicode blocks
    for name, value in (("LC_ALL", "C"), ("TQDM_ASCII", "1")):
        monkeypatch.setenv(name, value)
        terminal.seek(0)
        terminal.truncate()
        with cli._Bar("fuse") as bar:  # TQDM_ASCII=1: a one-character alphabet to tqdm, a ZeroDivisionError
            bar(0.55, "fusing")
            last = _lines(terminal)[-1]
        assert "#" in last and not any(ord(c) > 127 for c in last), last
        monkeypatch.delenv(name)
    monkeypatch.setattr(cli.sys, "stderr", _Terminal(encoding="cp1252"))  # an encoding without the blocks
    with cli._Bar("fuse") as bar:
        assert bar.bar.ascii is True


def test_a_bar_that_cannot_be_made_or_drawn_is_left_out(terminal, monkeypatch):
    """The bar was built outside the "a broken bar never loses a result" guard: exit 3, "internal error"."""
    terminal.use()
    import tqdm

    def broken(*a, **k):
        raise ZeroDivisionError("integer division or modulo by zero")

    original = tqdm.tqdm
    monkeypatch.setattr(tqdm, "tqdm", broken)
    with cli._Bar("register (rigid)") as bar:
        bar(0.5, "rigid: level 2/3")
    assert bar.bar is None
    monkeypatch.setattr(tqdm, "tqdm", original)
    with cli._Bar("fuse") as bar:
        monkeypatch.setattr(bar.bar, "refresh", broken)
        bar(0.5, "fusing")  # the drawing fails: no bar from now on, and no error
        assert bar.bar is None
        bar(0.6, "fusing")


def test_a_narrow_terminal_gives_the_message_the_room(terminal, monkeypatch):
    """At 40 columns (a braille line) the bar read ``register (rigid):  48%|▍| 00:05, rigid:``."""
    terminal.use()
    monkeypatch.setenv("COLUMNS", "40")
    message = "rigid: level 2/3, iteration 21"
    with cli._Bar("register (rigid)") as bar:
        bar(0.48, message)
        last = _lines(terminal)[-1].rstrip()
    assert len(last) <= 39 and "|" not in last, last
    assert last == " 48% register, rigid: level 2/3...", last  # cut at a word, and says it was cut
    monkeypatch.setenv("COLUMNS", "80")
    long = "register: rigid: level 2/3, iteration 21, re-optimising from the unturned start"
    with cli._Bar("fuse") as bar:
        bar(0.48, long)
        last = _lines(terminal)[-1].rstrip()
    assert len(last) <= 79 and "|" in last, last  # room for a bar and the message
    shown = last.split(", ", 1)[1]
    assert shown.endswith("...") and long.startswith(shown[:-3]) and long[len(shown) - 3] in " ,", shown


def test_cut_at_word():
    assert cut_at_word("rigid: level 2/3", 40) == "rigid: level 2/3"
    assert cut_at_word("rigid: level 2/3, iteration 21", 24) == "rigid: level 2/3..."
    assert cut_at_word("resampling", 8) == "resam..."  # one long word: cut inside it, said so
    assert cut_at_word("anything", 3) == ""


# ----------------------------------------------------------------------------- options every command takes
def test_every_command_takes_no_progress_and_quiet():
    """info and resample refused --no-progress (exit 2): a wrapper could not pass it to every command."""
    parser = build_parser()
    for argv in (["info", "x"], ["resample", "a", "b", "-o", "o.nii.gz"], ["register", "a", "b", "-o", "o.nii.gz"],
                 ["fuse", "a", "b", "-o", "o.nii.gz"], ["batch", "m.csv"], ["demo"]):
        args = parser.parse_args([*argv, "--no-progress", "-q"])
        assert args.no_progress and args.quiet, argv
        assert not parser.parse_args(argv).no_progress


def test_info_takes_no_progress(capsys):
    assert main(["info", str(SAMPLES / "mr_t1.nii.gz"), "--no-progress"]) == 0
    assert "modality" in capsys.readouterr().out


def test_a_bare_medfuse_says_so_briefly_on_stderr(capsys):
    """It printed the whole help (47 lines) on stdout, exit 2."""
    assert main([]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) <= 3 and "medfuse --help" in err and "no command" in err, err
    for command in ("info", "register", "fuse", "demo"):
        assert command in err


def test_delegated_help_is_plain_ascii(capsys):
    """train's help opened with ``medfuse train`` (reStructuredText) and said K×K."""
    import importlib.util

    if importlib.util.find_spec("medfuse.fusion.train") is None:
        pytest.skip("medfuse.fusion.train is not part of this checkout")
    pytest.importorskip("torch")
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "medfuse train" in out and "``" not in out
    assert all(ord(c) < 128 for c in out), sorted({c for c in out if ord(c) >= 128})
    assert cli._plain_text("a ``K\u00d7K`` box, \u00b11 \u2192 2") == "a KxK box, +-1 -> 2"


# ----------------------------------------------------------------------------- info --json
def test_info_json_is_json_on_errors_and_says_them_on_stderr(capsys, tmp_path):
    """One missing path: stdout was empty; several: the error was in the JSON alone, stderr empty."""
    missing = tmp_path / "nothere.nii.gz"
    assert main(["info", str(missing), "--json"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    record = json.loads(out)
    assert record["path"] == str(missing) and "no such file" in record["error"]
    assert "no such file" in err and err.startswith("medfuse info: error:")
    assert main(["info", str(SAMPLES / "mr_t1.nii.gz"), str(missing), "--json"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert records[0]["modality"] == "MR" and "no such file" in records[1]["error"]
    assert "no such file" in err and str(missing) in err


# ----------------------------------------------------------------------------- what fuse says about registering
def test_fuse_without_registering_says_so(tmp_path, capsys):
    """The sample MR + PET (9.5 degrees, 14 mm apart) fused with no word that they were not registered."""
    a, b = _pair(tmp_path)
    assert main(["fuse", str(a), str(b), "-o", str(tmp_path / "f.nii.gz"), "--method", "max", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "not registered (--register none)" in out and "nothing checked" in out and "--register rigid" in out
    assert main(["fuse", str(a), str(b), "-o", str(tmp_path / "g.nii.gz"), "--method", "max", "-q"]) == 0
    assert capsys.readouterr().out == ""  # -q: only warnings and errors


def test_fuse_says_a_registration_as_register_does_and_a_suspect_one_once(tmp_path, capsys, monkeypatch):
    """fuse printed ``registration 1: metric -0.3963 -> -0.6810, ok`` (no rotation, translation, nor which way is
    better) and a suspect one twice: ``registration 1: ... SUSPECT`` on stdout, ``input 2 onto input 1`` on
    stderr."""
    from medfuse import pipeline
    from medfuse.errors import MedfuseWarning

    a, b = _pair(tmp_path)
    rep = {"kind": "rigid", "metric_before": -0.3963, "metric_after": -0.6810, "rotation_deg": 9.5,
           "translation_mm": 14.0, "suspect": True, "suspect_reasons": ["the images share almost no information"],
           "same_frame_of_reference": None}

    def fake(*args, **kwargs):
        warnings.warn("registration of input 2 onto input 1 looks suspect: the images share almost no "
                      "information; check the fused result", MedfuseWarning)
        return pipeline.PipelineResult(fused=None, output=tmp_path / "f.nii.gz", sidecar=tmp_path / "f.json",
                                       provenance={"method_used": "max"}, registrations=[rep],
                                       transforms=[None], steps=[{"seconds": 1.0}])

    monkeypatch.setattr(pipeline, "fuse_files", fake)
    argv = ["fuse", str(a), str(b), "-o", str(tmp_path / "f.nii.gz"), "--method", "max", "--register", "rigid",
            "--no-progress"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert ("registration of input 2 onto input 1 (rigid): metric -0.3963 -> -0.6810 (lower is better), rotation "
            "9.50 deg, translation 14.00 mm; looks suspect (see the warning)") in out, out
    assert "SUSPECT" not in out and "share almost no information" not in out  # the reasons: on stderr, once
    assert err.count("looks suspect") == 1 and "input 2 onto input 1" in err
    assert "not registered" not in out
    rep.update(suspect=False, same_frame_of_reference=True)
    assert main([*argv, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "share one frame of reference: already aligned by the scanner; --register none suffices" in out


def test_register_says_when_one_frame_of_reference_made_it_unneeded(capsys):
    ns = argparse.Namespace(command="register", quiet=False)
    cli._say_notes(ns, {"same_frame_of_reference": True}, "FIXED and MOVING")
    out = capsys.readouterr().out
    assert "FIXED and MOVING share one frame of reference: already aligned by the scanner" in out
    assert "--register none" in out
    for other in (False, None):
        cli._say_notes(ns, {"same_frame_of_reference": other}, "FIXED and MOVING")
    assert capsys.readouterr().out == ""
    # The report's own notes, each said once: the frame note with the advice, the body box as it is.
    notes = ["registered within the fixed image's body box (12 % of the field)",
             "one frame of reference: already aligned by the scanner; registering found no better alignment, so "
             "the scanner's placement is kept (identity)"]
    cli._say_notes(ns, {"same_frame_of_reference": True, "notes": notes}, "FIXED and MOVING")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"  note: {notes[0]}"
    assert lines[1].startswith("  note: FIXED and MOVING share one frame of reference: already aligned by the "
                               "scanner; registering found no better alignment")
    assert "--register none" in lines[1] and len(lines) == 2


def test_the_frames_warning_gives_command_line_advice():
    """It said "register them first (medfuse.register, or --register rigid on the command line)" to a fuse user."""
    from medfuse.registration.resample import _other_frame_note
    from medfuse.volume import Volume

    a = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), provenance={"frame_of_reference_uid": "1.2.3"})
    b = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), provenance={"frame_of_reference_uid": "1.2.4"})
    note = _other_frame_note(a, b)
    assert note and "medfuse.register" in note
    fuse = cli._cli_advice(note, "fuse")
    assert "medfuse.register" not in fuse and fuse.endswith("register them first: add --register rigid")
    assert "register column" in cli._cli_advice(note, "batch")


# ----------------------------------------------------------------------------- demo against the truth
def test_the_demo_error_is_measured_against_the_samples_truth():
    """The demo printed rotation and translation alone; the error is now measured against ground_truth.json:
    about 0 for the true transform, and the samples' own misalignment (computed here from the matrix) for none."""
    from medfuse import load
    from medfuse.phantom import load_ground_truth
    from medfuse.registration.transforms import Transform

    gt = load_ground_truth(SAMPLES)
    mr = load(SAMPLES / "mr_t1.nii.gz")
    truth = gt["mr_to_pet"]
    centre = np.asarray(gt["lesion"]["center_lps_mm"], dtype=float)

    def said(matrix):
        res = argparse.Namespace(transforms=[Transform.from_matrix(matrix)], fused=mr)
        (line,) = cli._demo_truth_error(res, gt, "mr")
        return [float(x) for x in __import__("re").findall(r"(\d+\.\d) mm", line)]

    at_lesion, mean, largest = said(truth)
    assert at_lesion < 0.05 and mean < 0.05 and largest < 0.05
    at_lesion, mean, largest = said(np.eye(4))  # not registered: the lesion is off by the truth's displacement
    expected = np.linalg.norm(truth[:3, :3] @ centre + truth[:3, 3] - centre)
    assert at_lesion == pytest.approx(expected, abs=0.06) and expected > 5
    assert mean <= largest and mean > 5
    assert cli._demo_truth_error(argparse.Namespace(transforms=[None], fused=mr), gt, "mr") == []
