"""``medfuse train``: what reproducing and extending the training recipe needs. The loss the shipped weights were
trained with (``--qabf-zero-angle legacy``), the code and data versions in the export's card, ``--max-steps``,
pair names that would split a subject, the ``--init`` overlap check on other data, weights saved without their
config, ``--init shipped`` and the help's defaults. Runs on the tiny synthetic Harvard folder of conftest.py (and
reads, never writes, the shipped weights)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
monai = pytest.importorskip("monai")

import medfuse  # noqa: E402
import medfuse.fusion.train as tr  # noqa: E402
from medfuse.errors import InvalidInputError, MedfuseWarning, WeightsError  # noqa: E402
from medfuse.fusion import infer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "64", "--val-limit", "1",
        "--steps-3d", "0", "--extra-fraction", "0", "--threads", "1"]


def _train(data, run, *extra):
    return tr.main(["--data", str(data), "--run-dir", str(run), *TINY, *extra])


def _card(run):
    return json.loads((Path(run) / "export" / "medfuse_fusion.json").read_text())


# ------------------------------------------------------------------------------------- 1. the legacy zero angle
def _band_inputs():
    """Two 48x48 sources on 0..255 whose Sobel x-response is exactly 0 on many pixels, with the y-response
    positive, negative and 0 there: a horizontal band (gx = 0 everywhere inside), and a vertical band crossed by
    horizontal lines; fused by the max rule."""
    yy, xx = np.mgrid[:48, :48]
    a = np.where((yy >= 16) & (yy < 32), 200.0, 40.0)
    b = np.where((xx >= 12) & (xx < 30), 180.0, 60.0) + (yy % 7 == 0) * 30.0
    x = torch.from_numpy(np.stack([a, b])[None] / 255.0).float()
    return a, x, torch.from_numpy(np.maximum(a, b)[None] / 255.0).float()


def test_the_legacy_zero_angle_differs_from_the_reference_only_where_the_horizontal_gradient_is_0():
    """Commit b5e1f16 made the loss's Qabf orientation +pi/2 where gx = 0 (the reference's); every stage of the
    shipped weights was trained before it, with atan2's value there: -pi/2 where gy < 0, 0 on flat pixels.
    ``zero_angle="legacy"`` gives that value back there and agrees with the reference everywhere else."""
    import medfuse.metrics as M

    a, _, _ = _band_inputs()
    t = torch.from_numpy(a)[None, None].float()
    gx, gy = (v[0, 0].numpy() for v in tr._sobel(t))
    _, ref = tr._grad_angle(t, 0.0, zero_angle="reference")
    _, leg = tr._grad_angle(t, 0.0, zero_angle="legacy")
    ref, leg = ref[0, 0].numpy(), leg[0, 0].numpy()
    zero = gx == 0
    assert (zero & (gy < 0)).any() and (zero & (gy > 0)).any() and (zero & (gy == 0)).any()
    assert (~zero).any()
    # The reference, as medfuse.metrics defines it (float64 arctan(gy/gx), +pi/2 where gx = 0).
    np.testing.assert_allclose(ref, M._qabf_edges(a)[1], atol=1e-6)
    np.testing.assert_array_equal(leg[~zero], ref[~zero])
    np.testing.assert_allclose(leg[zero], np.sign(gy[zero]) * math.pi / 2, atol=1e-6)


def test_the_legacy_loss_is_the_loss_of_the_code_the_shipped_weights_were_trained_with():
    """The loss value on a fixed input. Expected: ``MetricLoss(vif_weight=0.8, ssim_weight=1.0,
    angle_grad_softness=0)`` of ``git show b5e1f16^:medfuse/fusion/train.py`` (the code every stage was trained
    with) on :func:`_band_inputs`, -0.31445401906967163 (Qabf 0.6506977081298828); today's reference loss is
    -0.31473588943481445 there. On the recipe's first batch (FusionNet(width=16, merge="conv"), seed 0) the two
    gave Qabf 0.5403534770 and 0.5402098298, and 3 steps of stage 1 already differed by 1.1e-3."""
    _, x, f = _band_inputs()
    kw = dict(vif_weight=0.8, ssim_weight=1.0, angle_grad_softness=0.0)
    legacy, parts = tr.MetricLoss(**kw, zero_angle="legacy")(f, x)
    reference, ref_parts = tr.MetricLoss(**kw)(f, x)
    assert float(legacy) == pytest.approx(-0.31445401906967163, abs=1e-6)
    assert parts["Qabf"] == pytest.approx(0.6506977081298828, abs=1e-6)
    assert abs(float(reference) - float(legacy)) > 1e-4  # the two definitions differ on this input
    # What the validation table logs is the reference Qabf, whatever the loss takes.
    logged = float(tr.torch_metrics(f, [x[:, 0], x[:, 1]])["Qabf"][0])
    assert logged == pytest.approx(ref_parts["Qabf"], abs=1e-7) and logged != pytest.approx(parts["Qabf"], abs=1e-5)
    with pytest.raises(InvalidInputError, match="zero_angle must be one of reference, legacy"):
        tr.MetricLoss(zero_angle="old")


def test_the_option_is_a_run_option_and_every_training_stage_of_the_recipe_names_it(capsys):
    """``--qabf-zero-angle`` is recorded with a run (a --resume with the other value is refused), a bad value is a
    usage error, and every documented stage that computes the loss (2-D epochs or 3-D steps) passes ``legacy``:
    without it the recipe trains other weights than the shipped ones."""
    parser = tr.add_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args([])
    assert args.qabf_zero_angle == "reference" and "qabf_zero_angle" in tr.run_options(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["--qabf-zero-angle", "old"])
    assert "invalid choice" in capsys.readouterr().err
    stages = 0
    for doc in ("README.md", "medfuse/fusion/weights/README.md"):
        for line in (ROOT / doc).read_text(encoding="utf-8").splitlines():
            if "-m medfuse.fusion.train" not in line:
                continue
            argv = shlex.split(line.split("-m medfuse.fusion.train", 1)[1])
            a = parser.parse_args(argv)
            if a.epochs or a.steps_3d:
                stages += 1
                assert a.qabf_zero_angle == "legacy", (doc, line)
                assert a.max_minutes is None, (doc, line)  # a time limit makes the result depend on the machine
    assert stages == 2 * 7  # stages 1, 2, 3, 5, 6, 7, 8 in each of the two documents


# ------------------------------------------------------------------------------------- 2./3. the card, --max-steps
def test_the_card_records_code_versions_steps_threads_and_the_data(tmp_path, no_volumes, harvard_folder):
    """The export's card recorded no code version, step count or data identity: two runs that differed in any of
    them had cards alike. --max-steps cuts the 2-D stage after a number of steps, reproducibly."""
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2, 3, 4, 5), slices=1)
    run = tmp_path / "run"
    assert _train(data, run, "--epochs", "2", "--steps-per-epoch", "3", "--max-steps", "4") == 0
    card = _card(run)
    code = card["code"]
    assert code["medfuse"] == medfuse.__version__ and code["numpy"] == np.__version__
    assert code["monai"] == monai.__version__ and code["torch"] == torch.__version__
    assert code["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", code["git_commit"])
    assert card["threads"] == 1
    assert card["steps_2d"] == 4 and card["cut_short"] is True and card["stopped_by_max_minutes"] is False
    assert card["epochs_done"] == 2 and "reproducible" not in card
    pairs = tr.harvard_pairs(data / "harvard-pairs")
    assert card["data_fingerprint"] == tr.data_fingerprint(pairs, data / "harvard-pairs")
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert sorted({r.split(",")[1] for r in rows}) == ["1", "3"]  # epoch 1: 3 steps, epoch 2: 1 step
    # A second run with the same options gives the same weights (a --max-minutes cut did not).
    assert _train(data, tmp_path / "again", "--epochs", "2", "--steps-per-epoch", "3", "--max-steps", "4") == 0
    assert _card(tmp_path / "again")["sha256"] == card["sha256"]


def test_a_max_minutes_cut_says_it_is_not_reproducible_and_a_resume_records_the_command_that_started_it(
        tmp_path, no_volumes, harvard_folder):
    """--max-minutes: the log and card say that the steps taken depend on the machine, and give the --max-steps
    that repeats the run. A resumed run's card recorded only the --resume command."""
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2, 3, 4, 5), slices=1)
    run = tmp_path / "run"
    first = ["--data", str(data), "--run-dir", str(run), *TINY, "--epochs", "2", "--steps-per-epoch", "3"]
    assert tr.main([*first, "--max-minutes", "1e-9"]) == 0  # stops after the first step
    card = _card(run)
    assert card["steps_2d"] == 1 and card["cut_short"] and card["stopped_by_max_minutes"] is True
    assert "--max-steps 1 repeats it" in card["reproducible"]
    log = (run / "train.log").read_text()
    assert "not reproducible across machines" in log and "pass --max-steps 1 instead" in log
    assert "started_by" not in card
    assert tr.main([*first, "--resume", "--epochs", "3", "--out", str(tmp_path / "o2")]) == 0
    card = json.loads((tmp_path / "o2" / "medfuse_fusion.json").read_text())
    assert "--resume" in card["trained_by"] and "--resume" not in card["started_by"]
    assert "--max-minutes 1e-9" in card["started_by"]
    assert card["steps_2d"] == 1 + 3 + 3 and card["stopped_by_max_minutes"] is True  # the run was cut once


# ------------------------------------------------------------------------------------- 4. pair names
def test_pair_names_without_a_3_digit_slice_are_refused_before_anything_is_written(tmp_path, harvard_folder,
                                                                                   capsys):
    """``sub01_s0.png`` .. ``sub01_s16.png`` were split into the cases sub01, sub01_ and sub01_s: one subject in
    training and validation alike, silently."""
    data = harvard_folder(tmp_path / "data", types=("PET-MRI",), cases=(1, 2), slices=1)
    folder = data / "harvard-pairs" / "PET-MRI"
    for i, old in enumerate(sorted((folder / "MRI").iterdir())):
        for sub in ("MRI", "PET"):
            (folder / sub / old.name).rename(folder / sub / f"sub01_s{4 * i}.png")
    with pytest.raises(InvalidInputError, match=r"2 of the 2 pair names do not end in a 3-digit slice") as info:
        tr.harvard_pairs(data / "harvard-pairs")
    assert "sub01000.png" in info.value.fix
    assert tr.main(["--data", str(data), "--run-dir", str(tmp_path / "run"), *TINY]) == 2
    assert "3-digit slice" in capsys.readouterr().err and not (tmp_path / "run").exists()
    for i in range(2):  # named CASE + 3-digit slice: one case, all training
        for sub in ("MRI", "PET"):
            (folder / sub / f"sub01_s{4 * i}.png").rename(folder / sub / f"sub01{4 * i:03d}.png")
    assert {tr.case_of(a.name) for a, _ in tr.harvard_pairs(data / "harvard-pairs")["PET-MRI"]} == {"sub01"}


# ------------------------------------------------------------------------------------- 5. --init on other data
def test_the_init_overlap_warning_compares_cases_only_on_the_data_the_init_weights_were_trained_on(
        tmp_path, no_volumes, harvard_folder, capsys):
    """The warning compared case names alone: any data named like the Harvard pairs (a user's own) was said to
    overlap the shipped weights' training cases, and the card recorded a false init_val_overlap. It now compares
    only when --data holds the files the --init weights were trained on (their card's data_fingerprint)."""
    cases = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=cases, slices=1)
    other = harvard_folder(tmp_path / "other", types=("CT-MRI",), cases=cases, slices=1, size=72)  # same names
    seeds = {s: set(tr.split_cases(tr.harvard_pairs(data / "harvard-pairs"), seed=s)[1]["CT-MRI"]) for s in range(9)}
    leaky = next(s for s in range(1, 9) if seeds[s] - seeds[0])
    assert _train(data, tmp_path / "init") == 0  # seed 0
    init = tmp_path / "init" / "export" / "medfuse_fusion.safetensors"

    def fine_tune(folder, name):
        return _train(folder, tmp_path / name, "--init", str(init), "--epochs", "0", "--seed", str(leaky))

    with pytest.warns(MedfuseWarning, match="were not held out from these validation cases"):
        assert fine_tune(data, "same") == 0
    assert _card(tmp_path / "same")["init_val_overlap"]["CT-MRI"]
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        assert fine_tune(other, "mine") == 0
    assert "init_val_overlap" not in _card(tmp_path / "mine")
    assert "cannot be told" in (tmp_path / "mine" / "train.log").read_text()


def test_cards_without_a_fingerprint_are_taken_as_trained_on_the_harvard_pairs(shared, tmp_path, harvard_folder):
    """The shipped weights' card records no data fingerprint: they were trained on the Harvard pairs in
    shared/data, whose fingerprint medfuse keeps (HARVARD_FINGERPRINT). With those pairs another seed overlaps
    their training cases; synthetic pairs named like them are not compared."""
    hv = shared("data", "harvard-pairs")
    pairs = tr.harvard_pairs(hv)
    fingerprint = tr.data_fingerprint(pairs, hv)
    assert fingerprint == tr.HARVARD_FINGERPRINT
    shipped = infer.default_weights_path()
    assert tr.init_same_data(shipped, fingerprint) == {t: True for t in tr.PAIR_TYPES}
    val = tr.split_of(*tr.split_cases(pairs, seed=1))["val"]
    assert tr.init_val_overlap(shipped, val, fingerprint=fingerprint)  # seed 1 validates on training cases
    assert tr.init_val_overlap(shipped, tr.split_of(*tr.split_cases(pairs, seed=0))["val"],
                               fingerprint=fingerprint) == {}
    synthetic = harvard_folder(tmp_path / "syn", types=("CT-MRI",), cases=(20, 21, 25, 28, 29), slices=1)
    fp = tr.data_fingerprint(tr.harvard_pairs(synthetic / "harvard-pairs"), synthetic / "harvard-pairs")
    assert tr.init_same_data(shipped, fp) == {"CT-MRI": False}
    assert tr.init_val_overlap(shipped, {"CT-MRI": ["20", "21", "25", "28", "29"]}, fingerprint=fp) == {}


# ------------------------------------------------------------------------------------- 6. weights of one's own
def test_weights_saved_without_their_config_say_so_and_export_weights_fixes_them(tmp_path):
    """save_file(FusionNet(width=8).state_dict(), ...) from a loop of one's own was 'corrupt or does not fit the
    model (KeyError)'; the missing config is named, and export_weights (public) writes a file fuse() reads."""
    from safetensors.torch import save_file

    from medfuse.fusion.network import FusionNet

    torch.manual_seed(0)
    model = FusionNet(width=8)
    bare = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    a, b = np.random.default_rng(0).random((64, 64)), np.random.default_rng(1).random((64, 64))
    with pytest.raises(WeightsError, match="records no architecture config") as info:
        medfuse.fuse(a, b, weights=bare)
    assert "medfuse.fusion.train.export_weights" in info.value.fix
    assert "export_weights" in tr.__all__
    path = tr.export_weights(model, tmp_path / "out", {"note": "my loop"}, overwrite=False)
    fused = np.asarray(medfuse.fuse(a, b, weights=path))
    assert fused.shape == (64, 64) and np.isfinite(fused).all()
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_init_shipped_names_the_shipped_weights_from_any_folder(tmp_path, no_volumes, harvard_folder, monkeypatch):
    """The README's --init medfuse/fusion/weights/medfuse_fusion.safetensors worked from the repository root only;
    --init shipped works anywhere. An export into the shipped weights' folder is recognised (the run warns before
    replacing them)."""
    from safetensors.torch import load_file

    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2, 3), slices=1)
    monkeypatch.chdir(tmp_path)
    assert _train(data, "run", "--init", "shipped", "--epochs", "0") == 0
    card = json.loads((tmp_path / "run" / "export" / "medfuse_fusion.json").read_text())
    assert "--init shipped" in card["trained_by"]
    got, want = load_file(str(tmp_path / "run" / "export" / "medfuse_fusion.safetensors")), \
        load_file(str(infer.default_weights_path()))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert tr._replaces_shipped(infer.default_weights_path().parent)
    assert not tr._replaces_shipped(tmp_path / "run" / "export")


# ------------------------------------------------------------------------------------- 7. help
def test_the_loss_weights_and_width_show_their_defaults_in_the_help():
    text = " ".join(tr.add_arguments(__import__("argparse").ArgumentParser()).format_help().split())
    for option, default in (("--vif-weight", "1.0"), ("--ssim-weight", "0.5"), ("--width", "16"),
                            ("--qabf-zero-angle", "reference")):
        at = text.index(option + " ", text.index("options:"))  # its help, not the usage line
        assert f"(default: {default}" in text[at:text.index(" --", at + len(option) + 1)], option
