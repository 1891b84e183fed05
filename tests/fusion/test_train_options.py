"""``medfuse train`` option checks: every numeric option is range-checked (a usage error, never a NaN export or an
internal error), a diverged run exports nothing, and the ``--epochs 0`` fix texts say how to re-export unchanged.
Runs on the tiny synthetic Harvard folder of conftest.py, so it needs no shared data."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("monai")

import medfuse.fusion.train as tr  # noqa: E402
from medfuse.errors import WeightsError  # noqa: E402

TINY = ["--steps-per-epoch", "1", "--batch-size", "1", "--crop", "64", "--val-limit", "1", "--extra-fraction", "0",
        "--threads", "1"]


@pytest.fixture
def data(tmp_path, no_volumes, harvard_folder):
    return harvard_folder(tmp_path / "data")


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("option,bad,says", [
    ("--vif-weight", "nan", "--vif-weight must be a finite value >= 0"),
    ("--vif-weight", "-5", "--vif-weight must be a finite value >= 0"),
    ("--plane-weight", "inf", "--plane-weight must be a finite value >= 0"),
    ("--hot-spot-weight", "nan", "--hot-spot-weight must be a finite value >= 0"),
    ("--ssim-weight", "inf", "--ssim-weight must be"),
    ("--qabf-weight", "-1", "--qabf-weight must be"),
    ("--ct-vif-weight", "nan", "--ct-vif-weight must be"),
    ("--ct-ssim-weight", "-1", "--ct-ssim-weight must be"),
    ("--ct-qabf-weight", "inf", "--ct-qabf-weight must be"),
    ("--ct-gff-weight", "-1", "--ct-gff-weight must be"),
    ("--logit-cap", "-1", "--logit-cap must be a finite value >= 0"),
    ("--logit-penalty", "nan", "--logit-penalty must be"),
    ("--ct-target-iters", "-1", "--ct-target-iters must be 1 or more"),
    ("--ct-target-smooth", "-3", "--ct-target-smooth must be 0 or more"),
    ("--select-ct-qabf", "nan", "--select-ct-qabf must be"),
    ("--select-ct-ssim", "inf", "--select-ct-ssim must be"),
    ("--select-min-ct-mi", "nan", "--select-min-ct-mi must be a finite value"),
    ("--select-min-parts", "inf", "--select-min-parts must be a finite value"),
    ("--select-max-plane-gap", "nan", "--select-max-plane-gap must be"),
    ("--qabf-grad-softness", "inf", "--qabf-grad-softness must be"),
])
def test_loss_weights_and_numeric_options_must_be_finite_and_in_range(tmp_path, capsys, option, bad, says):
    """NaN/inf weights trained to a NaN loss and exported NaN weights ("weights written"); negative ones quietly
    changed the exported weights. Now each is exit 2 with the fix, before the data is read or a folder made."""
    rc = tr.main([option, bad, "--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Fix:" in err and not (tmp_path / "r").exists(), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_ct_target_weight_is_checked_too(tmp_path, capsys):
    for bad in ("nan", "-1"):
        rc = tr.main(["--ct-target-weight", bad, "--ct-target-kind", "pixels", "--data", str(tmp_path / "none"),
                      "--run-dir", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert rc == 2 and "--ct-target-weight must be a finite value >= 0" in err, err


@pytest.mark.parametrize("option,bad,says", [
    ("--seed", "-1", "--seed must be 0..2**32-1"),
    ("--seed", str(2 ** 32), "--seed must be 0..2**32-1"),
    ("--threads", "0", "--threads must be 1..1024"),
    ("--threads", "-3", "--threads must be 1..1024"),
    ("--threads", "1025", "--threads must be 1..1024"),
])
def test_seed_and_threads_out_of_range_are_usage_errors(tmp_path, capsys, option, bad, says):
    """--seed -1 ended as "internal error: ValueError: Seed must be between 0 and 2**32 - 1" (a bare traceback
    under python -m); --threads 0 or -3 was quietly run with 1 thread."""
    rc = tr.main([option, bad, "--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Fix:" in err and not (tmp_path / "r").exists(), err


def test_in_range_edge_values_still_pass_the_checks(tmp_path, capsys):
    """The bounds are inclusive where they should be: 0 weights, seed 2**32-1, 1024 threads get past the checks
    (to the missing --data folder)."""
    rc = tr.main(["--seed", str(2 ** 32 - 1), "--threads", "1024", "--vif-weight", "0", "--plane-weight", "0",
                  "--logit-cap", "0", "--select-min-parts", "-0.5", "--data", str(tmp_path / "none"),
                  "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "harvard" in err.lower() and "must be" not in err, err


# ------------------------------------------------------------------------------------------- NaN guard
def test_export_refuses_non_finite_tensors_and_leaves_an_existing_export_alone(tmp_path):
    import copy

    from medfuse.fusion import infer

    model = copy.deepcopy(infer.load_model())  # the process-wide cached model must stay as shipped
    good = tr.export_weights(model, tmp_path, {"note": "good"})
    before = (good.read_bytes(), good.with_suffix(".json").read_bytes())
    with torch.no_grad():
        model.agg.logits.fill_(float("nan"))
    with pytest.raises(WeightsError, match="agg.logits") as exc:
        tr.export_weights(model, tmp_path, {"note": "bad"}, overwrite=True)
    assert "--lr" in exc.value.one_line() and "weight" in exc.value.one_line()
    assert (good.read_bytes(), good.with_suffix(".json").read_bytes()) == before


def test_a_run_whose_3d_stage_diverges_exports_nothing(data, tmp_path, capsys, monkeypatch):
    """The 3-D stage logged 'loss nan' and the run still printed 'weights written' with a NaN agg.logits."""
    def diverged(model, vols, **kw):
        with torch.no_grad():
            model.agg.logits.fill_(float("inf"))

    monkeypatch.setattr(tr, "_train_3d", diverged)
    rc = tr.main(["--data", str(data), "--run-dir", str(tmp_path / "r"), "--epochs", "1", "--steps-3d", "0", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "agg.logits" in err and "--lr" in err, err
    assert not (tmp_path / "r" / "export").exists()


def test_a_diverged_epoch_is_never_validated_or_saved_as_best(data, tmp_path, capsys, monkeypatch):
    """A NaN loss (a diverged step) left NaN weights, and validate() then failed as an internal error
    (sklearn: "Input contains NaN"); now the run stops naming the tensor, with no best.ckpt or export."""
    real = tr.MetricLoss.__call__

    def nan_loss(self, *a, **k):
        loss, parts = real(self, *a, **k)
        return loss * float("nan"), parts

    monkeypatch.setattr(tr.MetricLoss, "__call__", nan_loss)
    rc = tr.main(["--data", str(data), "--run-dir", str(tmp_path / "r"), "--epochs", "1", "--steps-3d", "0", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "epoch 1" in err and "NaN" in err, err
    assert not (tmp_path / "r" / "best.ckpt").exists() and not (tmp_path / "r" / "export").exists()


# ------------------------------------------------------------------------------------------- --epochs 0
def test_epochs_0_fix_texts_say_steps_3d_0(tmp_path, capsys):
    """The fix texts said "--epochs 0 with --init to re-export weights", and that still ran the 3-D stage's
    default 60 steps (agg.logits changed); the recipe that re-exports unchanged is --epochs 0 --steps-3d 0."""
    assert tr.main(["--epochs", "-1", "--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "--steps-3d 0" in capsys.readouterr().err
    assert tr.main(["--epochs", "0", "--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--epochs 0 trains nothing" in err and "--steps-3d 0" in err, err


def test_epochs_0_steps_3d_0_re_exports_init_unchanged_and_epochs_0_alone_says_it_runs_the_3d_stage(
        tmp_path, capsys, monkeypatch, harvard_folder):
    from medfuse.fusion import infer

    data = harvard_folder(tmp_path / "data")
    rng = np.random.default_rng(0)
    vol = np.clip(0.3 + 0.5 * rng.random((2, 64, 64, 64)), 0, 1).astype(np.float32)
    monkeypatch.setattr(tr, "volumes_in", lambda folder: [vol])
    w = infer.default_weights_path()
    start = _tensors(w)
    common = ["--data", str(data), "--init", str(w), "--epochs", "0", *TINY]
    assert tr.main(common + ["--steps-3d", "0", "--run-dir", str(tmp_path / "a")]) == 0
    out = _tensors(tmp_path / "a" / "export" / "medfuse_fusion.safetensors")
    assert out.keys() == start.keys() and all(torch.equal(out[k], start[k]) for k in out)
    assert "note: --epochs 0" not in (tmp_path / "a" / "train.log").read_text()
    assert tr.main(common + ["--steps-3d", "1", "--run-dir", str(tmp_path / "b")]) == 0
    assert "pass --steps-3d 0" in (tmp_path / "b" / "train.log").read_text()


def test_an_installed_medfuse_asks_for_data_instead_of_a_path_inside_site_packages(monkeypatch, tmp_path, capsys):
    """Outside a checkout --data defaulted to <venv>/lib/python3.x/shared/data, and the error named that folder
    and "../shared/data", neither of which the user ever made."""
    from medfuse.cli import EXIT_USAGE, main

    monkeypatch.setattr(tr, "DEFAULT_DATA", None)
    assert main(["train", "--help"]) == 0
    assert "required: an installed medfuse has no default" in " ".join(capsys.readouterr().out.split())
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--epochs", "1"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "medfuse train needs the training data: pass --data DATA" in err and "shared" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, says", [
    ("--width", "2000", "--width must be 1..1024"), ("--scan", "2000", "--scan must be 0..1024"),
    ("--refine-head", "2000", "--refine-head must be 0..1024"),
    ("--empty-guard", "65", "--empty-guard must be 0 or an odd neighbourhood size up to 63")])
def test_architecture_options_are_held_to_the_bounds_a_weights_file_is_held_to(tmp_path, capsys, option, value,
                                                                                says):
    """Past FusionNet's bounds they passed the command line's checks and failed as an internal error once the
    data had been read."""
    rc = tr.main([option, value, "--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "internal error" not in err, err
    assert not (tmp_path / "run").exists()


def test_an_export_folder_that_cannot_be_written_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """A root-owned install's weights folder (the --out help's own example) was refused only after the training
    and the 3-D stage (13 minutes here). Root writes anywhere, so the write is made to fail as it does for a user."""
    import errno

    from medfuse.io import writers

    out = tmp_path / "weights"
    out.mkdir()

    def denied(p, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(p))

    monkeypatch.setattr(writers, "_make_temp_file", denied)
    rc = tr.main(["--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "weights" in err and "permission" in err.lower() and "Fix:" in err, err
    assert not (tmp_path / "r").exists()
