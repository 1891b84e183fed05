"""``medfuse train`` reviewed as a researcher uses it: resume options, checkpoints, bad data and paths, the device,
and the validation table. Runs on a tiny synthetic Harvard folder (64² PNGs), so it needs no shared data."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("monai")

import medfuse.fusion.train as tr  # noqa: E402
from medfuse.errors import (InvalidInputError, MedfuseWarning, OutputExistsError,  # noqa: E402
                            UnreadableFileError)

TINY = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "64", "--val-limit", "1",
        "--steps-3d", "0", "--extra-fraction", "0", "--threads", "1"]  # 2 threads: 10x slower on a busy machine


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def data(tmp_path, no_volumes, harvard_folder):
    """The tiny Harvard folder, PET/SPECT in colour as in the atlas; the 3-D sets left out."""
    return harvard_folder(tmp_path / "data", colour=True)


def _train(data, run, *extra):
    return tr.main(["--data", str(data), "--run-dir", str(run), *TINY, *extra])


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_refuses_other_options_and_warns_about_a_stretched_schedule(data, tmp_path, capsys):
    """A resumed run silently ignored a new --lr (the optimiser state brought the old one back) and took a new
    --seed (another validation split, so validation cases became training cases). Each such option is now
    refused, naming the option and both values, before anything is written; --epochs may change (to extend
    a run or export it with --epochs 0), with a warning that the cosine schedule is stretched."""
    run = tmp_path / "run"
    assert _train(data, run) == 0
    before = (run / "last.ckpt").read_bytes()
    log = (run / "train.log").read_text()
    assert _ckpt(run / "last.ckpt")["state"]["options"]["lr"] == "0.001"
    for extra, says in ((["--lr", "0.5"], "--lr 0.001 (this command: 0.5)"),
                        (["--seed", "1"], "--seed 0 (this command: 1)"),
                        (["--empty-guard", "3"], "--empty-guard 0 (this command: 3)")):
        rc = _train(data, run, "--resume", "--epochs", "2", "--out", str(tmp_path / "o1"), *extra)
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "Fix:" in err and str(run / "last.ckpt") in err, err
    assert (run / "last.ckpt").read_bytes() == before and (run / "train.log").read_text() == log
    assert not (tmp_path / "o1").exists()

    with pytest.warns(MedfuseWarning, match="--epochs 2 differs from the run's 1"):
        assert _train(data, run, "--resume", "--epochs", "2", "--out", str(tmp_path / "o2")) == 0
    assert "WARNING: --epochs 2 differs" in (run / "train.log").read_text()
    assert _ckpt(run / "last.ckpt")["state"]["epoch"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)  # exporting a finished run changes no schedule
        assert _train(data, run, "--resume", "--epochs", "0", "--out", str(tmp_path / "o3")) == 0


def test_a_checkpoint_without_recorded_options_resumes_with_a_warning(data, tmp_path):
    """Checkpoints of earlier versions carry no options: they still resume, and the log says what was unchecked."""
    run = tmp_path / "run"
    assert _train(data, run) == 0
    ck = _ckpt(run / "last.ckpt")
    del ck["state"]["options"]
    torch.save(ck, run / "last.ckpt")
    with pytest.warns(MedfuseWarning, match="does not record its run's options"):
        assert _train(data, run, "--resume", "--epochs", "0", "--out", str(tmp_path / "o")) == 0


# ---------------------------------------------------------------------------------------------- checkpoints
def _model_and_opt():
    from medfuse.fusion.network import FusionNet

    model = FusionNet(width=4)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def test_a_checkpoint_write_killed_midway_leaves_the_last_good_one_and_no_temporary(tmp_path, monkeypatch):
    """Interrupted inside torch.save (a kill, a full disk), the previous checkpoint is still the whole, loadable
    file and nothing else is left in the run folder (the old code left a ``last.tmp`` behind)."""
    model, opt = _model_and_opt()
    path = tmp_path / "last.ckpt"
    tr.save_checkpoint(path, model, opt, {"epoch": 1})
    good = path.read_bytes()
    real_save = torch.save

    def killed(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # half written
            fh.truncate(len(good) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint(path, model, opt, {"epoch": 2})
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert tr.load_checkpoint(path, model, opt)["epoch"] == 1


def test_checkpoints_that_are_not_ours_are_typed_errors_naming_the_file_and_run_no_code(tmp_path):
    """A truncated file, a torch file of another kind (a bare state dict: a KeyError before) and a pickle that
    would run code on loading are each an UnreadableFileError naming the file; the code never runs."""
    model, opt = _model_and_opt()
    good = tmp_path / "good.ckpt"
    tr.save_checkpoint(good, model, opt, {"epoch": 1})
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    bare = tmp_path / "bare.ckpt"
    torch.save(model.state_dict(), bare)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    torch.save({"model": Evil(), "opt": {}, "state": {"epoch": 1}}, evil)
    for path in (truncated, bare, evil):
        with pytest.raises(UnreadableFileError) as info:
            tr.load_checkpoint(path, model, opt)
        assert str(path) in str(info.value) and "Fix:" in str(info.value)
    assert not marker.exists()


def test_a_checkpoint_of_another_architecture_is_a_typed_error_naming_the_file(tmp_path):
    from medfuse.fusion.network import FusionNet

    model, opt = _model_and_opt()
    path = tmp_path / "last.ckpt"
    tr.save_checkpoint(path, model, opt, {"epoch": 1})
    other = FusionNet(width=8)
    with pytest.raises(InvalidInputError, match="does not fit this model") as info:
        tr.load_checkpoint(path, other, torch.optim.Adam(other.parameters()))
    assert str(path) in str(info.value) and "--width" in str(info.value)
    assert ".)." not in str(info.value) and ".)" not in info.value.problem  # torch's full stop, then ours


def test_a_checkpoint_written_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """GPU training saves CUDA tensors; resuming or --init on a machine without CUDA must map them to the CPU.
    The file is made here by tagging the storages "cuda:0" as torch.save does on a GPU."""
    import torch.serialization as ser

    model, opt = _model_and_opt()
    path = tmp_path / "gpu.ckpt"
    monkeypatch.setattr(ser, "location_tag", lambda storage: "cuda:0")
    tr.save_checkpoint(path, model, opt, {"epoch": 3})
    monkeypatch.undo()
    if not torch.cuda.is_available():  # the file really is a CUDA one: a plain load fails here
        with pytest.raises(RuntimeError):
            torch.load(path, weights_only=True)
    assert tr.load_checkpoint(path, model, opt)["epoch"] == 3
    assert set(tr._init_state(path)) == set(model.state_dict())  # --init with a GPU run's checkpoint


# ---------------------------------------------------------------------------------------------- bad input
def test_a_missing_or_empty_data_folder_is_a_typed_error_and_leaves_no_run_folder(tmp_path, capsys, monkeypatch,
                                                                                  harvard_folder):
    """The data was read after the run folder and its train.log were made; now a bad --data leaves nothing."""
    monkeypatch.setattr(tr, "volumes_in", lambda folder: [])
    run = tmp_path / "run"
    assert _train(tmp_path / "nowhere", run) == 2
    assert "harvard-pairs" in capsys.readouterr().err and not run.exists()
    with pytest.raises(UnreadableFileError, match="missing"):
        tr.harvard_pairs(tmp_path / "nowhere")

    empty = tmp_path / "empty"
    for ptype, other in tr.PAIR_TYPES.items():
        (empty / "harvard-pairs" / ptype / "MRI").mkdir(parents=True)
        (empty / "harvard-pairs" / ptype / other).mkdir()
    assert _train(empty, run) == 2
    err = capsys.readouterr().err
    assert "0 training and 0 validation pairs" in err and "Fix:" in err and not run.exists(), err
    one_case = harvard_folder(tmp_path / "one", cases=(1,), colour=True)
    assert _train(one_case, run) == 2  # one case stays in training: nothing left to validate on
    assert "0 validation pairs" in capsys.readouterr().err and not run.exists()


def test_unpaired_pngs_are_left_out_with_a_warning(data):
    (data / "harvard-pairs" / "PET-MRI" / "MRI" / "9000.png").write_bytes(
        (data / "harvard-pairs" / "PET-MRI" / "MRI" / "1000.png").read_bytes())
    with pytest.warns(MedfuseWarning, match="1 image.*without a partner.*9000.png"):
        pairs = tr.harvard_pairs(data / "harvard-pairs")
    assert all(a.name != "9000.png" for a, _ in pairs["PET-MRI"]) and len(pairs["PET-MRI"]) == 4


@pytest.mark.parametrize("which", ["MRI", "PET"])
def test_an_unreadable_png_names_that_file_and_stops_before_anything_is_written(data, tmp_path, capsys, which):
    """The error named the pair's MRI even when its partner was the broken file, and a broken validation PNG
    stopped the run only at the end of epoch 1."""
    train, val = tr.split_cases(tr.harvard_pairs(data / "harvard-pairs"))
    mri, pet = val["PET-MRI"][0]
    broken = mri if which == "MRI" else pet
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UnreadableFileError) as info:
        tr.load_pair(mri, pet)
    assert info.value.path == str(broken)
    run = tmp_path / "run"
    assert _train(data, run) == 2
    assert str(broken) in capsys.readouterr().err and not run.exists()


def test_a_pair_of_two_sizes_is_a_typed_error(data):
    from PIL import Image

    mri, ct = tr.harvard_pairs(data / "harvard-pairs")["CT-MRI"][0]
    Image.open(ct).resize((32, 32)).save(ct)
    with pytest.raises(InvalidInputError, match="same size") as info:
        tr.load_pair(mri, ct)
    assert info.value.path == str(ct)


def test_palette_and_16_bit_pngs_read_as_their_grey_levels(tmp_path):
    """np.asarray(Image.open(...)) gave palette indices for a palette PNG and 0..65535 for a 16-bit one."""
    from PIL import Image

    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    _png(tmp_path / "ref.png", grey)
    Image.fromarray(grey).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(tmp_path / "pal.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "wide.png")
    ref = tr.load_pair(tmp_path / "ref.png", tmp_path / "ref.png")
    for name in ("pal.png", "wide.png"):
        np.testing.assert_array_equal(tr.load_pair(tmp_path / "ref.png", tmp_path / name), ref)


def test_output_paths_that_are_files_or_someone_elses_folder_are_refused_before_training(data, tmp_path, capsys):
    """--out naming a file failed at export, after the whole training, with a bare FileExistsError; --run-dir
    naming a file failed the same way at mkdir; a --run-dir holding other files got checkpoints mixed in."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for extra in (["--out", str(a_file)], ["--run-dir", str(a_file)]):
        rc = tr.main(["--data", str(data), "--run-dir", str(tmp_path / "r"), *TINY, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "names an existing file" in err and not (tmp_path / "r").exists(), err
    assert a_file.read_text() == "mine"

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("x")
    assert _train(data, theirs) == 2
    err = capsys.readouterr().err
    assert "other files than a training run's" in err and "thesis.tex" in err
    assert sorted(p.name for p in theirs.iterdir()) == ["thesis.tex"]
    assert _train(data, theirs, "--overwrite") == 0  # asked for: written beside, nothing deleted
    assert (theirs / "thesis.tex").read_text() == "x" and (theirs / "last.ckpt").exists()


def test_a_gpu_device_on_a_machine_without_one_is_a_usage_error(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1", "gpu"):
        assert _train(data, tmp_path / "r", "--device", device) == 2
        err = capsys.readouterr().err
        assert device in err and "Fix:" in err and not (tmp_path / "r").exists(), err


def test_mixed_precision_is_on_for_every_cuda_device_and_off_on_the_cpu():
    """``--device cuda:0`` ran in fp32 (the check compared with "cuda" alone). bf16 needs no loss scaling."""
    for device, on in (("cpu", False), ("cuda", True), ("cuda:0", True), ("cuda:1", True), ("mps", False)):
        amp, dtype, scale = tr.amp_settings(device)
        assert amp is on and dtype == torch.bfloat16 and scale is False


# ---------------------------------------------------------------------------------------------- validation
def test_the_validation_table_agrees_with_medfuse_metrics(shared):
    """Each epoch's table (the network and the max rule, one SPECT-MRI validation pair) against the reference
    metrics of ``medfuse.metrics`` on the same 8-bit fused image."""
    from medfuse import metrics
    from medfuse.fusion import infer

    _, val = tr.split_cases(tr.harvard_pairs(shared("data", "harvard-pairs")))
    pair = val["SPECT-MRI"][0]
    model = infer.load_model()
    table = tr.validate(model, {"SPECT-MRI": [pair]}, limit=1, rules=("max",))["SPECT-MRI"]
    x = tr.load_pair(*pair)
    with torch.inference_mode():
        net = model(torch.from_numpy(x)[None])[0].float().numpy()
    a, b = np.round(x[0] * 255), np.round(x[1] * 255)
    for method, fused in (("network", net), ("max", np.maximum(x[0], x[1]))):
        f8 = np.round(np.clip(fused, 0, 1) * 255)
        row = table[method]
        assert row["Qabf"] == pytest.approx(metrics.qabf(f8, a, b), abs=1e-3)
        assert row["VIF"] == pytest.approx(metrics.vif(f8, a, b), abs=1e-3)
        assert row["SSIM"] == pytest.approx(metrics.ssim(f8, a, b), abs=1e-3)
        assert row["SSIM_r2"] == pytest.approx(metrics.ssim_r2(f8, a, b), abs=1e-3)
        assert row["MI"] == pytest.approx(metrics.mi(f8, a, b), abs=1e-6)
    assert table["network"]["Qabf"] != table["max"]["Qabf"]


def test_the_split_is_by_case_and_is_the_shipped_weights_split(shared):
    """No case on both sides within a pair type; the validation cases are those the shipped weights record.
    (Across pair types SPECT-MRI validation case 21 shares 5 MRI slices with CT-MRI training: docs/network.md,
    "Nineteenth round".)"""
    from medfuse.fusion import infer

    train, val = tr.split_cases(tr.harvard_pairs(shared("data", "harvard-pairs")))
    for ptype in tr.PAIR_TYPES:
        t_cases = {tr.case_of(a.name) for a, _ in train[ptype]}
        v_cases = {tr.case_of(a.name) for a, _ in val[ptype]}
        assert t_cases and v_cases and not t_cases & v_cases
    card = json.loads(infer.default_weights_path().with_suffix(".json").read_text())
    assert {k: sorted({tr.case_of(a.name) for a, _ in v}) for k, v in val.items()} == card["val_cases"]


def test_resuming_after_a_max_minutes_stop_keeps_the_schedule_at_the_steps_taken(data, tmp_path):
    """--max-minutes ends an epoch early, but its checkpoint counted a full epoch, so a resume moved the cosine
    schedule ahead by steps never taken (here to its end: learning rate 0 for the whole second epoch)."""
    run = tmp_path / "run"
    opts = ["--epochs", "2", "--steps-per-epoch", "3"]
    assert _train(data, run, *opts, "--max-minutes", "1e-9") == 0  # stops after the first step
    ck = _ckpt(run / "last.ckpt")
    assert ck["state"]["epoch"] == 1 and ck["state"]["steps_done"] == 1
    assert _train(data, run, *opts, "--resume", "--out", str(tmp_path / "o")) == 0
    ck = _ckpt(run / "last.ckpt")
    steps = max(int(s["step"]) for s in ck["opt"]["state"].values())
    assert steps == 4 and ck["state"]["steps_done"] == 4
    expected = 1e-3 * 0.5 * (1 + np.cos(np.pi * 4 / 6))  # the cosine schedule after 4 of 6 steps
    assert ck["opt"]["param_groups"][0]["lr"] == pytest.approx(expected, rel=1e-9)
    assert "stopped 2 step(s) short of its epoch 1" in (run / "train.log").read_text()


_RUN_HOLDER = """
import sys, time
from pathlib import Path
from medfuse._runlock import run_lock
run = Path(sys.argv[1])
with run_lock(run.parent / f".{run.name}.train.lock", busy=RuntimeError):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_training_run_on_one_run_folder_is_refused_before_any_work(data, tmp_path, capsys, monkeypatch):
    """Two `medfuse train` runs on one --run-dir both trained: train.log held both runs' lines, metrics.csv and the
    checkpoints the second run's, and the export could be of the other run's best weights. Now the second is
    refused at once, and the folder is free again when the first ends (or is killed)."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _RUN_HOLDER, os.fspath(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (tmp_path / "link").symlink_to(tmp_path)
        # The same folder however it is spelt: as given, through a link, with a "..", and as "." from inside it.
        for spelling, cwd in ((run, None), (tmp_path / "link" / "run", None), (tmp_path / "x" / ".." / "run", None),
                              (".", run)):
            if cwd is not None:
                cwd.mkdir(exist_ok=True)
                monkeypatch.chdir(cwd)
            assert _train(data, spelling) == 2, spelling
            err = capsys.readouterr().err
            assert "another medfuse train run is using this run folder (pid " in err and "--run-dir" in err
        assert not any(run.iterdir())  # nothing written
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.chdir(tmp_path)
    assert _train(data, run) == 0  # a killed holder leaves nothing that blocks
    assert not (tmp_path / ".run.train.lock").exists()
    # A run refused at its first check leaves no folder behind (the lock's folder was made and left).
    assert tr.main(["--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "typo" / "deeper" / "run"),
                    "--resume"]) == 2
    assert not (tmp_path / "typo").exists()


def test_a_missing_or_broken_last_checkpoint_points_to_the_best_epoch(tmp_path, capsys):
    """With last.ckpt removed after two epochs, --resume said "the run stopped before its first epoch ended"; and
    for a truncated last.ckpt the only fix was to start over, though best.ckpt beside it was whole."""
    run = tmp_path / "run"
    run.mkdir()
    model, opt = _model_and_opt()
    tr.save_checkpoint(run / "best.ckpt", model, opt, {"epoch": 2, "history": []})
    rc = tr.main(["--data", str(tmp_path / "none"), "--run-dir", str(run), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "there is none, only best.ckpt" in err and "or last.ckpt was removed" in err, err
    assert f"--init {run / 'best.ckpt'} with another --run-dir" in err
    (run / "last.ckpt").write_bytes((run / "best.ckpt").read_bytes()[:100])  # truncated
    with pytest.raises(UnreadableFileError, match="cannot read the training checkpoint") as ei:
        tr.load_checkpoint(run / "last.ckpt", model, opt)
    assert f"--init {run / 'best.ckpt'}" in ei.value.fix
    (run / "best.ckpt").unlink()
    with pytest.raises(UnreadableFileError) as ei:
        tr.load_checkpoint(run / "last.ckpt", model, opt)
    assert ei.value.fix == "start a new run with --overwrite or another --run-dir"


def test_a_reader_that_leaves_does_not_stop_the_training(data, tmp_path):
    """``medfuse train ... | head -3``: the closed pipe ended the run after its third line, exit 0, no word, no
    checkpoint and no export. The command goes on now, its printing discarded."""
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "medfuse.cli", "train", "--data", str(data), "--run-dir", str(run),
                             *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()  # one line read, then the reader goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0, err
    assert "Traceback" not in err and "internal error" not in err
    assert (run / "last.ckpt").is_file() and (run / "export" / "medfuse_fusion.safetensors").is_file()
