"""``medfuse train``: a resume on a changed data folder, a fine-tune validating on cases its starting
weights trained on, pairs of odd or too small size, ``--init`` from a checkpoint, corrupted ``--init`` weights and a
half-copied volume folder. Runs on the tiny synthetic Harvard folder of conftest.py (and reads, never writes, the
shipped weights)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("monai")

import medfuse.fusion.train as tr  # noqa: E402
from medfuse.errors import InvalidInputError, MedfuseWarning, UnreadableFileError  # noqa: E402
from medfuse.fusion import infer  # noqa: E402

TINY = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "64", "--val-limit", "1",
        "--steps-3d", "0", "--extra-fraction", "0", "--threads", "1"]


def _train(data, run, *extra):
    return tr.main(["--data", str(data), "--run-dir", str(run), *TINY, *extra])


def _val_cases(data, seed, ptype="CT-MRI"):
    train, val = tr.split_cases(tr.harvard_pairs(data / "harvard-pairs"), seed=seed, val_fraction=0.2)
    return sorted({tr.case_of(a.name) for a, _ in val[ptype]})


# ---------------------------------------------------------------------------------------------- 1. resume split
def test_a_resume_on_a_data_folder_whose_split_changed_is_refused_and_writes_nothing(
        tmp_path, no_volumes, harvard_folder, capsys):
    """Cases added to --data between a run and its resume redid the split from the folder as it is now: a
    validation case moved into training (and a trained-on case into validation, which then picked the best epoch
    and was recorded as held out). The checkpoint now records the split, and such a resume is exit 2 naming the
    changed cases, before anything is written; the unchanged folder still resumes."""
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2, 3, 4, 5), slices=1)
    run = tmp_path / "run"
    assert _train(data, run) == 0
    ck = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["state"]["cases"]["val"] == {"CT-MRI": _val_cases(data, 0)}
    before, log = (run / "last.ckpt").read_bytes(), (run / "train.log").read_text()

    harvard_folder(data, types=("CT-MRI",), cases=(6, 7), slices=1)  # two cases copied in later
    rc = _train(data, run, "--resume", "--epochs", "2", "--out", str(tmp_path / "o1"))
    err = capsys.readouterr().err
    assert rc == 2 and "split by case differs" in err and "CT-MRI training cases now also" in err, err
    assert "Fix:" in err and "--data folder as it was" in err
    assert (run / "last.ckpt").read_bytes() == before and (run / "train.log").read_text() == log
    assert not (tmp_path / "o1").exists()

    for n in (6, 7):  # the folder as it was: the run resumes
        for sub in ("MRI", "CT"):
            (data / "harvard-pairs" / "CT-MRI" / sub / f"{n}000.png").unlink()
    assert _train(data, run, "--resume", "--epochs", "0", "--out", str(tmp_path / "o2")) == 0


def test_check_resume_split_names_a_validation_case_that_moved(tmp_path):
    """The check itself: a validation case that became a training case (and the reverse) is named."""
    from medfuse.fusion.network import FusionNet

    model = FusionNet(width=4)
    ck = tmp_path / "last.ckpt"
    saved = {"train": {"CT-MRI": ["1", "2", "28"]}, "val": {"CT-MRI": ["20"]}}
    tr.save_checkpoint(ck, model, torch.optim.Adam(model.parameters()), {"epoch": 1, "cases": saved})
    assert tr.check_resume_split(ck, saved) == []
    now = {"train": {"CT-MRI": ["1", "2", "20"]}, "val": {"CT-MRI": ["28"]}}
    with pytest.raises(InvalidInputError, match="CT-MRI validation cases now also 28; no longer 20"):
        tr.check_resume_split(ck, now)
    tr.save_checkpoint(ck, model, torch.optim.Adam(model.parameters()), {"epoch": 1})  # an earlier medfuse's
    assert "does not record its run's split" in tr.check_resume_split(ck, now)[0]


# ---------------------------------------------------------------------------------------------- 2. --init overlap
def test_a_fine_tune_that_validates_on_cases_its_init_weights_trained_on_warns_and_records_them(
        tmp_path, no_volumes, harvard_folder, monkeypatch, capsys):
    """Fine-tuning with another --seed validated, silently, on cases the --init weights had trained on (their
    card's val_cases leave them out). It now warns, logs, and the export's card records them as
    init_val_overlap; a split inside the card's held-out cases records nothing. Only on the data the weights
    were trained on: the shipped weights (trained on the Harvard pairs) on synthetic pairs named like those
    are not compared (tests/fusion/test_train_recipe.py has the case of the same data)."""
    shipped = infer.default_weights_path()
    held = json.loads(shipped.with_suffix(".json").read_text())["val_cases"]["CT-MRI"]
    cases = sorted({*map(int, held), 5, 7, 9})
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=cases, slices=1)
    seeds = {s: _val_cases(data, s) for s in range(50)}
    leaky = next(s for s, v in seeds.items() if set(v) - set(held))
    before = shipped.read_bytes()

    def fine_tune(init, seed, name):
        return tr.main(["--data", str(data), "--run-dir", str(tmp_path / name), "--init", str(init),
                        "--epochs", "0", "--steps-3d", "0", "--val-limit", "1", "--threads", "1",
                        "--seed", str(seed)])

    with warnings.catch_warnings():  # synthetic data named like the Harvard pairs: other files, no warning
        warnings.simplefilter("error", MedfuseWarning)
        assert fine_tune(shipped, leaky, "shipped") == 0
    assert "init_val_overlap" not in json.loads((tmp_path / "shipped" / "export" / "medfuse_fusion.json")
                                                .read_text())
    assert "cannot be told" in (tmp_path / "shipped" / "train.log").read_text()
    assert shipped.read_bytes() == before

    # Weights exported from this very data (seed 0, the shipped card's split of it) and fine-tuned with a seed
    # that validates on their training cases.
    init = tmp_path / "shipped" / "export" / "medfuse_fusion.safetensors"
    card = json.loads(init.with_suffix(".json").read_text())
    card.update(seed=0, val_cases={"CT-MRI": held})
    init.with_suffix(".json").write_text(json.dumps(card))
    capsys.readouterr()
    with pytest.warns(MedfuseWarning, match="were not held out from these validation cases"):
        assert fine_tune(init, leaky, "leaky") == 0
    out = json.loads((tmp_path / "leaky" / "export" / "medfuse_fusion.json").read_text())
    assert out["init_val_overlap"] == {"CT-MRI": sorted(set(seeds[leaky]) - set(held), key=int)}
    assert "WARNING: the --init weights were not held out" in (tmp_path / "leaky" / "train.log").read_text()
    # shown once, as the warning: not a second time on the console from the run's log
    assert "were not held out" not in capsys.readouterr().out
    clean = next(s for s, v in seeds.items() if set(v) <= set(held))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        assert fine_tune(init, clean, "clean") == 0
    assert "init_val_overlap" not in json.loads((tmp_path / "clean" / "export" / "medfuse_fusion.json").read_text())


# ---------------------------------------------------------------------------------------------- 3. pair sizes
def test_validation_pads_pairs_whose_size_is_not_a_multiple_of_the_factor(tmp_path, harvard_folder):
    """A 45x45 pair (not a multiple of the factor 4) failed in validate() with an internal RuntimeError after a
    whole epoch; it is padded as fuse() pads and cropped back, and every metric of the network row is a number."""
    from medfuse.fusion.network import FusionNet

    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1,), slices=1, size=45)
    pair = tr.harvard_pairs(data / "harvard-pairs")["CT-MRI"]
    torch.manual_seed(0)
    model = FusionNet(width=4, factor=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = tr.validate(model, {"CT-MRI": pair})
    row = table["CT-MRI"]["network"]
    assert all(np.isfinite(row[k]) for k in ("Qabf", "VIF", "SSIM", "MI")), row


def test_pairs_smaller_than_the_metrics_allow_are_refused_before_the_run_folder_is_made(
        tmp_path, no_volumes, harvard_folder, capsys):
    """32x32 pairs trained a whole epoch, then failed in the validation metrics with an internal error; now exit
    2 before anything is written, naming the size limit and a pair."""
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2), slices=1, size=32)
    rc = _train(data, tmp_path / "run")
    err = capsys.readouterr().err
    assert rc == 2 and f"at least {tr.MIN_PAIR_SIZE}x{tr.MIN_PAIR_SIZE}" in err and "32x32" in err, err
    assert "Fix:" in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- 4. --init ckpt
def test_init_from_a_checkpoint_keeps_its_architecture_config(tmp_path, no_volumes, harvard_folder):
    """``--init last.ckpt`` read the architecture config from safetensors exports only, so a run of --factor 2,
    --empty-guard 3, ... was fine-tuned (and exported) as factor 4 without them. The checkpoint's recorded
    options now give them, as an export's config does."""
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2), slices=1)
    arch = ["--factor", "2", "--empty-guard", "3", "--coarse-pixel-rule-3d", "2", "--coarse-rule-learned", "0.005",
            "--functional-k", "30"]
    assert _train(data, tmp_path / "a", *arch) == 0
    first = infer.load_model(tmp_path / "a" / "export" / "medfuse_fusion.safetensors").config()
    assert tr.main(["--data", str(data), "--run-dir", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "last.ckpt"),
                    "--epochs", "0", "--steps-3d", "0", "--val-limit", "1", "--threads", "1"]) == 0
    again = infer.load_model(tmp_path / "b" / "export" / "medfuse_fusion.safetensors").config()
    assert again == first and again["factor"] == 2 and again["empty_guard"] == 3


# ---------------------------------------------------------------------------------------------- 5. bad inputs
def test_corrupted_init_weights_are_refused_by_their_recorded_hash(tmp_path, no_volumes, harvard_folder, capsys):
    """A flipped byte in the tensor data still loads; fuse(weights=) refused it by the card's SHA-256 and a
    fine-tune used it. Now exit 2 naming the file, and no run folder."""
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2), slices=1)
    bad = tmp_path / "w" / "medfuse_fusion.safetensors"
    bad.parent.mkdir()
    shutil.copy(infer.default_weights_path(), bad)
    shutil.copy(infer.default_weights_path().with_suffix(".json"), bad.with_suffix(".json"))
    raw = bytearray(bad.read_bytes())
    raw[-5] ^= 0x01  # tensor data, not the header
    bad.write_bytes(bytes(raw))
    rc = tr.main(["--data", str(data), "--run-dir", str(tmp_path / "run"), "--init", str(bad), "--epochs", "0",
                  "--steps-3d", "0", "--val-limit", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "SHA-256" in err and str(bad) in err and "Fix:" in err, err
    assert not (tmp_path / "run").exists()


def test_a_half_copied_volume_folder_is_a_typed_error_before_the_run_folder_is_made(tmp_path, harvard_folder, capsys):
    """An empty brats-gli-00001/ beside valid pairs gave an internal FileNotFoundError (exit 3) and left train.log;
    now exit 2 naming the folder and the missing files, and nothing is written. A whole folder holding a file that
    is not a NIfTI is an UnreadableFileError naming that file (it was nibabel's own error)."""
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2), slices=1)
    (data / "brats-gli-00001").mkdir()
    rc = _train(data, tmp_path / "run")
    err = capsys.readouterr().err
    assert rc == 2 and "brats-gli-00001" in err and "holds none of its files" in err and "t1n.nii.gz" in err, err
    assert "Fix:" in err
    assert not (tmp_path / "run").exists()
    for name in tr.VOLUME_FILES["brats-gli-00001"]:  # whole, but one file is not a NIfTI: named, typed
        (data / "brats-gli-00001" / name).write_bytes(b"not a volume")
    with pytest.raises(UnreadableFileError, match="t1n.nii.gz: cannot read the 3-D training volume"):
        tr.volumes_in(data)


def test_init_weights_with_another_merge_warn_that_the_merge_restarts(tmp_path, no_volumes, harvard_folder):
    """A re-export of the shipped (convex-merge) weights with --merge conv changed the 3-D output by up to 0.49
    without a word: the merge restarts from the plain mean. Said now; the same merge says nothing."""
    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2, 3, 4, 5), slices=1)
    shipped = infer.default_weights_path()
    base = ["--init", str(shipped), "--epochs", "0", "--steps-3d", "0"]
    with pytest.warns(MedfuseWarning, match="another tri-plane merge than this run's --merge conv") as said:
        assert _train(data, tmp_path / "conv", *base, "--merge", "conv", "--out", str(tmp_path / "o1")) == 0
    assert len([w for w in said if "tri-plane merge" in str(w.message)]) == 1  # once, not per model loaded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _train(data, tmp_path / "convex", *base, "--merge", "convex", "--out", str(tmp_path / "o2")) == 0
    assert not [w for w in caught if "tri-plane merge" in str(w.message)]


def test_evaluate_split_val_warns_when_the_weights_were_not_held_out_from_those_cases(tmp_path, harvard_folder,
                                                                                      capsys):
    """A model trained with --seed 3 scored with ``evaluate --split val`` (seed 0) was scored on its own training
    cases, its table optimistic, without a word; its card records the cases it was held out from."""
    import shutil

    from medfuse.cli import main

    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2, 3, 4, 5), slices=1)
    shipped = infer.default_weights_path()
    mine = tmp_path / "w" / "medfuse_fusion.safetensors"
    mine.parent.mkdir()
    shutil.copy(shipped, mine)
    # A card of weights trained on this folder (its data fingerprint): the shipped weights' card names the Harvard
    # pairs, and on other data, whose case names are other images, evaluate says nothing.
    root = data / "harvard-pairs"
    card = {**json.loads(shipped.with_suffix(".json").read_text()),
            "data_fingerprint": tr.data_fingerprint(tr.harvard_pairs(root), root)}
    val = _val_cases(data, 0)
    other = [c for c in ("1", "2", "3", "4", "5") if c not in val][:len(val)]
    argv = ["evaluate", str(data / "harvard-pairs"), "--split", "val", "--methods", "Network", "--weights", str(mine),
            "--no-save", "--no-progress", "-q"]  # any letter case, as evaluate takes method names
    for held, says in ((other, True), (val, False)):
        mine.with_suffix(".json").write_text(json.dumps({**card, "val_cases": {"CT-MRI": held}}))
        out = tmp_path / f"o{len(held)}{says}"
        assert main([*argv, "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert ("not held out from" in err) is says, err
        if says:
            assert f"CT-MRI {', '.join(sorted(val, key=int))}" in err and "--seed and --val-fraction" in err
            assert "medfuse evaluate: warning:" in err
    # Only the cases scored: with --limit 1, the one pair kept, held out, says nothing of the others.
    mine.with_suffix(".json").write_text(json.dumps({**card, "val_cases": {"CT-MRI": val[:1]}}))
    assert main([*argv, "--limit", "1", "--out", str(tmp_path / "limited")]) == 0
    scored = json.loads((tmp_path / "limited" / "metrics.json").read_text())["images"][0]["name"]
    err = capsys.readouterr().err
    assert ("not held out from" in err) is (tr.case_of(scored) != val[0]), (scored, err)
    # The shipped card (no fingerprint: trained on the Harvard pairs) on this synthetic folder: other images.
    mine.with_suffix(".json").write_text(json.dumps({k: v for k, v in card.items() if k != "data_fingerprint"}
                                                    | {"val_cases": {"CT-MRI": other}}))
    assert main([*argv, "--out", str(tmp_path / "other-data")]) == 0
    assert "not held out from" not in capsys.readouterr().err


def test_a_state_dict_with_a_refinement_head_names_the_option_it_needs(tmp_path, no_volumes, harvard_folder, capsys):
    """Converting the shipped weights' state dict (as fuse's error for a .pt file advises) said to pass
    --width/--per-input-gain/--scan/--merge, none of which helps; it is --refine-head. "0 tensor(s) missing, e.g.
    []" is left out too."""
    from safetensors.torch import load_file

    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2), slices=1)
    state = tmp_path / "state.pt"
    torch.save(load_file(str(infer.default_weights_path())), state)
    rc = tr.main(["--data", str(data), "--run-dir", str(tmp_path / "run"), "--init", str(state), "--epochs", "0",
                  "--steps-3d", "0", "--val-limit", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Fix: pass --refine-head N (the file has a refinement head)" in err, err
    assert "missing from the file" not in err and "unexpected, e.g. ['refine." in err


def test_png_files_ending_in_upper_case_are_pairs_too(tmp_path, harvard_folder):
    """``.PNG`` files (a Windows tool's) were left out of training and evaluation without a word: glob('*.png')
    is case-sensitive on Linux."""
    from medfuse.harvard import list_pairs

    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2), slices=1)
    folder = data / "harvard-pairs" / "CT-MRI"
    for sub in ("MRI", "CT"):
        (folder / sub / "2000.png").rename(folder / sub / "2000.PNG")
    assert sorted(a.name for a, _ in tr.harvard_pairs(data / "harvard-pairs")["CT-MRI"]) == ["1000.png", "2000.PNG"]
    assert sorted(p.name for p in list_pairs(data / "harvard-pairs")) == ["1000.png", "2000.PNG"]


class _Marker:
    """Unpickled, it would create a file: the proof that loading ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_as_init_is_refused_saying_why_and_runs_no_code(tmp_path, harvard_folder, capsys):
    """A plain pickle as --init gave torch's "please file an issue" warning and "cannot read the --init weights
    (UnpicklingError)", which did not say why. Nothing in it runs."""
    import pickle

    data = harvard_folder(tmp_path / "data", types=("CT-MRI",), cases=(1, 2), slices=1)
    evil, marker = tmp_path / "evil.pt", tmp_path / "RAN"
    evil.write_bytes(pickle.dumps({"w": _Marker(marker)}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = tr.main(["--data", str(data), "--run-dir", str(tmp_path / "run"), "--init", str(evil), "--epochs", "0",
                      "--steps-3d", "0", "--val-limit", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds Python objects besides tensors" in err and "could run code" in err, err
    assert not marker.exists() and not [w for w in caught if "pickle" in str(w.message).lower()]
