"""``medfuse train`` as a researcher who fine-tunes it: own pairs, kills and resumes, foreign ``--init`` files,
logs read from a file and a CSV. Runs on a tiny synthetic Harvard folder (64² PNGs), so it needs no shared data."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("monai")

import medfuse.fusion.train as tr  # noqa: E402
from medfuse.errors import UnreadableFileError  # noqa: E402

TINY = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "64", "--val-limit", "1",
        "--steps-3d", "0", "--extra-fraction", "0", "--threads", "1"]  # 2 threads: 10x slower on a busy machine


@pytest.fixture
def data(tmp_path, no_volumes, harvard_folder):
    """The tiny Harvard folder (grey pairs); the 3-D sets left out."""
    return harvard_folder(tmp_path / "data")


def _train(data, run, *extra):
    return tr.main(["--data", str(data), "--run-dir", str(run), *TINY, *extra])


def _exported(run):
    return (run / "export" / "medfuse_fusion.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------- own data
def test_own_pairs_of_one_pair_type_train_and_a_wrong_folder_says_the_layout(tmp_path, capsys, monkeypatch,
                                                                             harvard_folder):
    """Your own CT-MRI pairs alone were refused ("PET-MRI: no MRI sub-folder. Fix: pass --data pointing at
    ../shared/data"); a --data naming harvard-pairs/ itself or a folder of volumes did not say what goes where."""
    monkeypatch.setattr(tr, "volumes_in", lambda folder: [])
    own = harvard_folder(tmp_path / "own", types=("CT-MRI",))
    assert _train(own, tmp_path / "run") == 0, capsys.readouterr().err
    log = (tmp_path / "run" / "train.log").read_text()
    assert "PET-MRI, SPECT-MRI absent" in log and '"CT-MRI": [' in log
    assert (tmp_path / "run" / "export" / "medfuse_fusion.safetensors").exists()

    assert _train(own / "harvard-pairs", tmp_path / "r2") == 2
    assert f"pass the folder that holds it ({own})" in capsys.readouterr().err
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    (volumes / "ct.nii.gz").write_bytes(b"")
    assert _train(volumes, tmp_path / "r2") == 2
    err = capsys.readouterr().err
    assert "CT-MRI/{MRI,CT}/" in err and "28010.png" in err and not (tmp_path / "r2").exists(), err
    (own / "harvard-pairs" / "PET-MRI" / "MRI").mkdir(parents=True)  # half-copied: no PET/ beside MRI/
    assert _train(own, tmp_path / "r2") == 2
    assert "PET-MRI folder has no PET/ sub-folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- kills
def test_a_kill_between_the_checkpoint_writes_never_loses_the_best_epoch(data, tmp_path, monkeypatch, capsys):
    """An epoch ends with two writes. last.ckpt went first: a kill before best.ckpt left a run whose --resume
    failed (best.ckpt missing) or, later on, exported an older epoch. Whatever write is killed, recovering as the
    error says gives the uninterrupted run's export, byte for byte."""
    assert _train(data, tmp_path / "straight") == 0
    real_save = tr.save_checkpoint
    for kill_at in (1, 2):
        run, calls = tmp_path / f"killed{kill_at}", []

        def killed(*a, **k):
            calls.append(1)
            if len(calls) == kill_at:
                raise KeyboardInterrupt  # what a kill -9 leaves: this write and everything after it never happen
            return real_save(*a, **k)

        monkeypatch.setattr(tr, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            _train(data, run)
        monkeypatch.setattr(tr, "save_checkpoint", real_save)
        if (run / "last.ckpt").exists():
            assert _train(data, run, "--resume") == 0, capsys.readouterr().err
        else:
            if (run / "best.ckpt").exists():
                assert _train(data, run, "--resume") == 2
                assert "start the run again with --overwrite" in capsys.readouterr().err
            assert _train(data, run, "--overwrite") == 0, capsys.readouterr().err
        assert _exported(run) == _exported(tmp_path / "straight"), f"kill at write {kill_at}"


# ---------------------------------------------------------------------------------------------- logs
def test_logs_piped_to_a_file_carry_no_progress_bar_and_metrics_csv_survives_a_resume(data, tmp_path, monkeypatch,
                                                                                      capsys):
    """stderr piped to a file got the tqdm bar's carriage-return updates (about 500 bytes a step); the only
    machine-readable record of the epochs was the checkpoint. Now metrics.csv holds the per-epoch table, written
    from the checkpoint's history, so a run killed mid-epoch and resumed lists each epoch once."""
    two = ["--epochs", "2", "--steps-per-epoch", "2"]
    with warnings.catch_warnings():
        # The CPU path must not touch deprecated AMP APIs (torch.cuda.amp.GradScaler/autocast warn on 2.x).
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        assert _train(data, tmp_path / "straight", *two) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "epoch 1/2" not in err and "it/s" not in err, err[:300]
    assert "epoch 2: train loss" in out

    def rows(run):
        with open(run / "metrics.csv", newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    straight = rows(tmp_path / "straight")
    assert list(straight[0]) == list(tr.METRICS_COLUMNS)
    ck = torch.load(tmp_path / "straight" / "last.ckpt", map_location="cpu", weights_only=True)
    history = ck["state"]["history"]
    want = [(h["epoch"], p, m, v) for h in history for p, r in h["table"].items() for m, v in r.items()]
    assert len(straight) == len(want) == 2 * 3 * 2  # epochs x pair types x (network, max)
    for row, (epoch, ptype, meth, values) in zip(straight, want):
        assert (int(row["epoch"]), row["pair"], row["method"]) == (epoch, ptype, meth)
        for k in ("Qabf", "VIF", "SSIM", "SSIM_r2", "MI"):
            assert float(row[k]) == pytest.approx(values[k], abs=1e-6)
        assert float(row["train_loss"]) == pytest.approx(history[epoch - 1]["train_loss"], abs=1e-6)
        # The rate the epoch's last step used (steps 1 and 3 of 0..3 on the cosine schedule); the rate after it
        # read 0 for the last epoch, the schedule's end.
        assert int(row["steps"]) == 2
        assert float(row["lr"]) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * (2 * epoch - 1) / 4)), abs=1e-9)

    real_validate, calls = tr.validate, []

    def killed_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_validate(*a, **k)

    monkeypatch.setattr(tr, "validate", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "resumed", *two)
    monkeypatch.setattr(tr, "validate", real_validate)
    assert _train(data, tmp_path / "resumed", *two, "--resume") == 0
    drop = ("elapsed_min",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "resumed")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in straight]


# ---------------------------------------------------------------------------------------------- --init files
def test_init_files_of_another_architecture_or_format_name_the_file_and_what_to_pass(data, tmp_path, capsys):
    """--init of a width-8 export failed without naming the file or the option, after the run folder was made;
    a bare state dict (torch.save(model.state_dict())) was 'unreadable (KeyError)'; a checkpoint of a newer
    format was loaded as if it were this one's."""
    from medfuse.fusion.network import FusionNet

    small = FusionNet(width=8)
    tr.export_weights(small, tmp_path / "w8", {"note": "test"})
    init = tmp_path / "w8" / "medfuse_fusion.safetensors"
    run = tmp_path / "run"
    assert _train(data, run, "--init", str(init)) == 2
    err = capsys.readouterr().err
    assert str(init) in err and "--width 8 (this run: 16)" in err and not run.exists(), err

    # A bare state dict of the right architecture starts a run: the model holds exactly its tensors.
    bare = tmp_path / "w8.pt"
    torch.save(small.state_dict(), bare)
    model = FusionNet(width=8)
    tr._load_init(model, bare)
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in model.state_dict().items())

    # A checkpoint of a newer layout: refused by name, for --resume and for --init alike.
    opt = torch.optim.Adam(small.parameters())
    newer = tmp_path / "newer.ckpt"
    torch.save({"format": tr.CHECKPOINT_FORMAT + 1, "model": small.state_dict(), "opt": opt.state_dict(),
                "state": {"epoch": 1}}, newer)
    for load in (lambda: tr.load_checkpoint(newer, FusionNet(width=8), None), lambda: tr._init_state(newer)):
        with pytest.raises(UnreadableFileError, match="newer medfuse") as info:
            load()
        assert str(newer) in str(info.value)
    # This medfuse's own checkpoints record their format and load.
    tr.save_checkpoint(tmp_path / "own.ckpt", small, opt, {"epoch": 1})
    assert torch.load(tmp_path / "own.ckpt", weights_only=True)["format"] == tr.CHECKPOINT_FORMAT
    assert tr.load_checkpoint(tmp_path / "own.ckpt", FusionNet(width=8), None)["epoch"] == 1
    assert json.loads((tmp_path / "w8" / "medfuse_fusion.json").read_text())["config"]["width"] == 8


def test_val_fraction_sets_the_split_and_evaluate_finds_the_same_cases(tmp_path, capsys, monkeypatch, harvard_folder):
    """The validation share was fixed at 20 % (one case of five), while ``medfuse evaluate --val-fraction``
    offered any: a researcher could not hold out more, nor score the split a model was trained on."""
    from medfuse.harvard import list_pairs, training_split

    monkeypatch.setattr(tr, "volumes_in", lambda folder: [])
    own = harvard_folder(tmp_path / "own", types=("CT-MRI",), cases=(1, 2, 3, 4, 5), slices=1)
    assert _train(own, tmp_path / "run", "--val-fraction", "0.4") == 0, capsys.readouterr().err
    card = json.loads((tmp_path / "run" / "export" / "medfuse_fusion.json").read_text())
    held = card["val_cases"]["CT-MRI"]
    assert len(held) == 2 and card["val_fraction"] == 0.4
    _, val = training_split(list_pairs(own / "harvard-pairs"), val_fraction=0.4, seed=0)
    assert sorted({p.case for p in val}) == sorted(int(c) for c in held)

    assert _train(own, tmp_path / "bad", "--val-fraction", "1") == 2
    assert "--val-fraction must be between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
