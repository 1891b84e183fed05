"""``medfuse train`` as a researcher reproducing the recipe meets it: the shipped card's ``stages`` are the commands
that reproduce the weights (and keep the commands as they were run), a resumed checkpoint that does not record
``--qabf-zero-angle`` warns, one that records the other value is refused, and the epoch bar follows the command
line's switches. Runs on the tiny synthetic Harvard folder of conftest.py (and reads, never writes, the shipped
weights)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("monai")

import medfuse.fusion.train as tr  # noqa: E402
from medfuse.errors import MedfuseWarning  # noqa: E402
from medfuse.fusion import infer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = infer.default_weights_path()
CARD = WEIGHTS.with_name("medfuse_fusion.json")
TINY = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "64", "--val-limit", "1",
        "--steps-3d", "0", "--extra-fraction", "0", "--threads", "1"]
PROG = "-m medfuse.fusion.train"


def _argv(line: str) -> list:
    return shlex.split(line.split(PROG, 1)[1].split("#", 1)[0])


def _recipe(doc: Path) -> list:
    """The training commands of a document's recipe, in order, as argument lists."""
    return [_argv(ln) for ln in doc.read_text(encoding="utf-8").splitlines()
            if PROG in ln and ln.lstrip().startswith(("python", ".venv/bin/python"))]


# ------------------------------------------------------------------------------------- 1. the card's stages
def test_the_cards_stages_are_the_recipe_that_reproduces_the_shipped_weights():
    """The card's commands lacked --qabf-zero-angle legacy (and --merge conv, --qabf-grad-softness 0) and kept stage
    1's --max-minutes 27, which both READMEs leave out: followed as written they train other weights. Each stage's
    ``command`` is now the model card's recipe line, valid for the real parser; every stage that computes the loss
    passes legacy and no time limit. The card is still the shipped file's (same SHA-256)."""
    card = json.loads(CARD.read_text(encoding="utf-8"))
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert card["sha256"] == digest and digest.startswith("d9db34d3")
    parser = tr.add_arguments(argparse.ArgumentParser())
    commands = [_argv(st["command"]) for st in card["stages"]]
    assert len(commands) == 10
    # The same commands as the model card's recipe and the README's.
    assert commands == _recipe(WEIGHTS.with_name("README.md"))
    assert commands == _recipe(ROOT / "README.md")
    legacy = 0
    for i, argv in enumerate(commands, 1):
        a = parser.parse_args(argv)  # argparse exits on an option the parser lacks
        assert a.max_minutes is None, i  # a time limit makes the steps taken depend on the machine
        if a.qabf_zero_angle == "legacy":
            legacy += 1
        else:  # an export step (4, 9, 10): no epoch and no 3-D step, so no loss is computed at all
            assert a.epochs == 0 and a.steps_3d == 0 and i in (4, 9, 10), i
    assert legacy == 7


def test_the_card_keeps_each_command_as_it_was_run_and_the_two_differ_only_as_documented():
    """What was literally run stays on the card (``command_as_run``): rewriting it would lose the record that stage
    1 ran with --max-minutes 27 and stages 9-10 started from the installed file. The reproducing command differs
    from it by the options the READMEs give reasons for, and nothing else."""
    card = json.loads(CARD.read_text(encoding="utf-8"))
    parser = tr.add_arguments(argparse.ArgumentParser())
    documented = {"qabf_zero_angle", "merge", "qabf_grad_softness", "max_minutes", "overwrite", "init"}
    for i, st in enumerate(card["stages"], 1):
        now = vars(parser.parse_args(_argv(st["command"])))
        then = vars(parser.parse_args(_argv(st["command_as_run"])))
        changed = {k for k in now if now[k] != then[k]}
        assert changed and changed <= documented, (i, changed)
        assert ("max_minutes" in changed) == (i == 1) and then["max_minutes"] in (None, 27.0)
        if "init" in changed:  # the installed file then held what runs/stageN/export holds (the same file)
            assert i in (9, 10) and Path(then["init"]) == Path("medfuse/fusion/weights/medfuse_fusion.safetensors")
            assert Path(now["init"]) == Path(f"runs/stage{i - 1}/export/medfuse_fusion.safetensors")
        assert then["qabf_zero_angle"] == "reference"  # every stage predates the option
        assert st["note"] and st["wall_time_min"] > 0
    assert "command_as_run" in card["stages_note"]


# ------------------------------------------------------------------------------------- 2. --resume and the loss
def _train(data, run, *extra):
    return tr.main(["--data", str(data), "--run-dir", str(run), *TINY, *extra])


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _forget_zero_angle(path: Path) -> None:
    """Rewrite a checkpoint as one of a medfuse before --qabf-zero-angle was recorded, with the real writer."""
    ck = _ckpt(path)
    del ck["state"]["options"]["qabf_zero_angle"]
    model = types.SimpleNamespace(state_dict=lambda: ck["model"])
    opt = types.SimpleNamespace(state_dict=lambda: ck["opt"])
    tr.save_checkpoint(path, model, opt, ck["state"])


def test_a_checkpoint_without_the_zero_angle_warns_on_resume_and_one_with_the_other_is_refused(
        tmp_path, no_volumes, harvard_folder, capsys):
    """A checkpoint of a medfuse before the option records no --qabf-zero-angle, and the run took this command's
    silently: it may have been trained with either loss (before commit b5e1f16: legacy). The resume now warns
    that it is unknown and how to choose; the checkpoints it writes record the choice, and a later resume with
    the other value is refused with the value to pass."""
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2, 3, 4, 5), slices=1)
    run = tmp_path / "run"
    assert _train(data, run) == 0
    _forget_zero_angle(run / "last.ckpt")
    assert "qabf_zero_angle" not in _ckpt(run / "last.ckpt")["state"]["options"]
    assert _ckpt(run / "last.ckpt")["state"]["epoch"] == 1

    # Exporting the finished run trains nothing: no loss, so nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        assert _train(data, run, "--resume", "--epochs", "0", "--out", str(tmp_path / "o0")) == 0

    with pytest.warns(MedfuseWarning, match="does not record --qabf-zero-angle") as got:
        assert _train(data, run, "--resume", "--epochs", "2", "--qabf-zero-angle", "legacy",
                      "--out", str(tmp_path / "o1")) == 0
    text = " ".join(str(w.message) for w in got if "qabf-zero-angle" in str(w.message))
    assert "unknown" in text and "b5e1f16" in text
    assert "--qabf-zero-angle legacy" in text and "resume with --qabf-zero-angle reference" in text
    assert "does not record --qabf-zero-angle" in (run / "train.log").read_text()
    state = _ckpt(run / "last.ckpt")["state"]
    assert state["epoch"] == 2 and state["options"]["qabf_zero_angle"] == "legacy"  # recorded from now on

    # The checkpoint records legacy now: the default (reference) is refused, naming the value to pass.
    before = (run / "last.ckpt").read_bytes()
    capsys.readouterr()
    assert _train(data, run, "--resume", "--epochs", "3", "--out", str(tmp_path / "o2")) == 2
    err = capsys.readouterr().err
    assert "--qabf-zero-angle legacy (this command: reference)" in err and "Fix:" in err, err
    assert (run / "last.ckpt").read_bytes() == before and not (tmp_path / "o2").exists()
    assert "Fix: resume with the options of the run that wrote the checkpoint (--qabf-zero-angle legacy;" in err
    with warnings.catch_warnings(record=True) as seen:  # the fix's value: accepted, nothing unknown to warn about
        warnings.simplefilter("always")
        assert _train(data, run, "--resume", "--epochs", "3", "--qabf-zero-angle", "legacy",
                      "--out", str(tmp_path / "o3")) == 0
    assert not [w for w in seen if "qabf-zero-angle" in str(w.message)]
    assert _ckpt(run / "last.ckpt")["state"]["epoch"] == 3


# ------------------------------------------------------------------------------------- 3. the epoch bar
class _Terminal(io.StringIO):
    """A stream that says it is a terminal, so that tqdm's ``disable=None`` draws on it."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


@pytest.fixture
def bar_env(monkeypatch):
    for name in ("MEDFUSE_NO_PROGRESS", "TQDM_DISABLE", "TQDM_ASCII"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    return monkeypatch


def test_the_epoch_bar_follows_the_command_lines_switches_and_is_throttled(bar_env):
    """``python -m medfuse.fusion.train`` drew its bar with ``disable=None`` alone: MEDFUSE_NO_PROGRESS, TQDM_DISABLE
    (overridden by an explicit disable=) and TERM=dumb did not hide it, and it was redrawn every 0.1 s."""
    from medfuse.cli import _Bar

    out = _Terminal()
    bar = tr._epoch_bar(range(3), "epoch 1/2", file=out)
    assert list(bar) == [0, 1, 2] and "epoch 1/2" in out.getvalue()
    assert bar.mininterval == tr.BAR_MIN_INTERVAL == _Bar.MIN_INTERVAL
    for name, value in (("MEDFUSE_NO_PROGRESS", "1"), ("TQDM_DISABLE", "1"), ("TERM", "dumb")):
        with bar_env.context() as env:
            env.setenv(name, value)
            out = _Terminal()
            assert list(tr._epoch_bar(range(3), "epoch 1/2", file=out)) == [0, 1, 2]
            assert out.getvalue() == "", name
    for quiet, stream in ((True, _Terminal()), (False, io.StringIO())):  # medfuse -q train; a log file
        assert list(tr._epoch_bar(range(2), "epoch 1/2", quiet=quiet, file=stream)) == [0, 1]
        assert stream.getvalue() == ""


def test_a_training_run_draws_its_bar_only_where_the_environment_allows(tmp_path, no_volumes, harvard_folder,
                                                                        bar_env):
    """The run's own bar (on stderr) goes through the same rules."""
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2, 3), slices=1)
    for name, shown in (("on", True), ("MEDFUSE_NO_PROGRESS", False)):
        with bar_env.context() as env:
            if name != "on":
                env.setenv(name, "1")
            err = _Terminal()
            env.setattr(sys, "stderr", err)
            assert _train(data, tmp_path / name) == 0
        assert ("epoch 1/1" in err.getvalue()) is shown, name


def test_a_bad_tqdm_setting_leaves_the_bar_out_instead_of_failing_the_run(tmp_path):
    """``TQDM_NCOLS=abc`` makes tqdm's import itself raise a ValueError: training died on it before any step."""
    code = ("import medfuse.fusion.train as tr\n"
            "bar = tr._epoch_bar(range(3), 'epoch 1/1')\n"
            "bar.set_postfix(loss='0.1')\n"
            "print(list(bar))\n")
    env = {**os.environ, "TQDM_NCOLS": "abc", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[0, 1, 2]", done.stderr
    broken = subprocess.run([sys.executable, "-c", "import tqdm"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert broken.returncode != 0 and "ValueError" in broken.stderr  # what the run met before
