"""What the command line says: a 2-D picture given to ``fuse``, warnings of the delegated commands (train,
evaluate) in the CLI's one-line form, the transform file's permissions after ``register``, and the hint after
``batch --write-manifest``."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.cli import EXIT_OK, EXIT_USAGE, main
from medfuse.errors import MedfuseWarning

SAMPLES = Path(__file__).resolve().parents[1] / "sample_volumes"


# ------------------------------------------------------------------ fuse: a PNG/JPEG input
@pytest.mark.parametrize("name", ["mri.png", "pet.JPG", "x.jpeg", "y.tif"])
def test_fuse_refuses_a_2d_picture_naming_the_commands_that_fuse_them(tmp_path, capsys, name):
    pic = tmp_path / name
    pic.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # what it holds does not matter: the ending says 2-D
    mr = tmp_path / "mr.nii.gz"
    shutil.copy(SAMPLES / "mr_t1.nii.gz", mr)
    for args in ([str(mr), str(pic)], [str(pic), str(mr)]):
        assert main(["fuse", *args, "-o", str(tmp_path / "out.nii.gz"), "--method", "max", "-q"]) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert name in err and "2-D picture" in err
        assert "medfuse evaluate --pair" in err and "medfuse.fuse" in err
        assert "not a medical image" not in err
    assert not (tmp_path / "out.nii.gz").exists()


def test_fuse_of_a_missing_png_still_says_no_such_file(tmp_path, capsys):
    mr = tmp_path / "mr.nii.gz"
    shutil.copy(SAMPLES / "mr_t1.nii.gz", mr)
    assert main(["fuse", str(mr), str(tmp_path / "gone.png"), "-o", str(tmp_path / "o.nii.gz"), "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no such file" in err and "2-D picture" not in err


# ------------------------------------------------------------------ train/evaluate warnings, once, one line
@pytest.mark.parametrize("cmd, module", [("train", "medfuse.fusion.train"), ("evaluate", "medfuse.evaluate")])
def test_a_delegated_commands_warning_is_one_cli_line(monkeypatch, capsys, cmd, module):
    import importlib
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not part of this checkout")
    mod = importlib.import_module(module)
    text = "the --init weights were not held out from these validation cases"

    def run(args):
        warnings.warn(text, MedfuseWarning, stacklevel=2)
        warnings.warn("an unrelated library note", DeprecationWarning, stacklevel=2)
        return 0

    monkeypatch.setattr(mod, "run", run)
    with pytest.warns(DeprecationWarning, match="unrelated"):  # other warnings go where they went before
        assert main([cmd, "--run-dir", "r"] if cmd == "train" else [cmd, "pairs", "--out", "o"]) == EXIT_OK
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if text in ln]
    assert lines == [f"medfuse: warning: {text}"], err  # once, in the CLI's form
    assert "MedfuseWarning:" not in err and "return int(mod.run" not in err  # not Python's file:line form
    assert warnings.showwarning.__name__ != "_show"  # the hook is gone after the command


# ------------------------------------------------------------------ register: the .tfm is no wider than inputs
def _blob(shift=0.0):
    z, y, x = np.mgrid[:24, :24, :24].astype(np.float32)
    a = np.exp(-(((x - 12 - shift) / 5) ** 2 + ((y - 11) / 4) ** 2 + ((z - 12) / 6) ** 2))
    a += 0.5 * np.exp(-(((x - 7 - shift) / 2) ** 2 + ((y - 16) / 2) ** 2 + ((z - 9) / 3) ** 2))
    return a


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_register_transform_file_is_no_wider_than_the_inputs(tmp_path, mode):
    old = os.umask(0o022)
    try:
        fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
        medfuse.save(medfuse.Volume(_blob(), np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR"), fixed)
        medfuse.save(medfuse.Volume(_blob(1.5), np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR"), moving)
        moving.chmod(mode)
        out = tmp_path / "out" / "moved.nii.gz"
        out.parent.mkdir()
        assert main(["register", str(fixed), str(moving), "-o", str(out), "-q", "--no-progress"]) == EXIT_OK
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.parent.iterdir()}
        assert set(modes) == {"moved.nii.gz", "moved.tfm", "moved.json"}, modes
        assert modes == {name: mode for name in modes}, modes  # image, sidecar and transform alike
        assert stat.S_IMODE(moving.stat().st_mode) == mode  # the input untouched
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_transform_save_follows_its_inputs_and_never_writes_over_one(tmp_path):
    from medfuse.errors import OutputExistsError
    from medfuse.registration.transforms import Transform

    old = os.umask(0o022)
    try:
        private = tmp_path / "pet.nii.gz"
        shutil.copy(SAMPLES / "spect.nii.gz", private)
        private.chmod(0o600)
        t = Transform.from_matrix(np.eye(4))
        p = t.save(tmp_path / "a.tfm", inputs=[private, None])
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert stat.S_IMODE(t.save(tmp_path / "b.tfm").stat().st_mode) == 0o644  # no inputs: the umask's
        given = tmp_path / "given.tfm"
        shutil.copy(p, given)
        with pytest.raises(OutputExistsError):
            t.save(given, overwrite=True, inputs=[given])
    finally:
        os.umask(old)


# ------------------------------------------------------------------ batch --write-manifest: the next command
def test_write_manifest_keeps_the_register_given(tmp_path, capsys):
    """--register with --write-manifest was dropped: the manifest had no register column, so running it as
    written fused each subject unregistered."""
    import csv

    from medfuse.batch import read_manifest

    ds = tmp_path / "ds"
    (ds / "sub-01").mkdir(parents=True)
    shutil.copy(SAMPLES / "mr_t1.nii.gz", ds / "sub-01" / "mr.nii.gz")
    shutil.copy(SAMPLES / "spect.nii.gz", ds / "sub-01" / "spect.nii.gz")
    m1, m2 = tmp_path / "m1.csv", tmp_path / "m2.csv"
    assert main(["batch", str(ds), "--write-manifest", str(m1), "--register", "rigid"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"medfuse batch {m1})" in out and "--register" not in out  # the manifest says it itself
    assert [r["register"] for r in csv.DictReader(m1.open())] == ["rigid"]
    assert [s.register for s in read_manifest(m1)] == ["rigid"]
    assert main(["batch", str(ds), "--write-manifest", str(m2)]) == EXIT_OK
    assert "--register rigid|none)" in capsys.readouterr().out
    assert "register" not in next(csv.reader(m2.open()))
    # --method goes into the manifest too; --fallback, which a manifest cannot hold, goes on the next command
    m3 = tmp_path / "m3.csv"
    assert main(["batch", str(ds), "--write-manifest", str(m3), "--register", "none", "--method", "mean",
                 "--fallback", "max"]) == EXIT_OK
    assert f"medfuse batch {m3} --fallback max)" in capsys.readouterr().out
    assert [(s.register, s.method) for s in read_manifest(m3)] == [("none", "mean")]


def test_a_manifest_row_saying_register_none_is_not_registered_by_the_batch_option(tmp_path, capsys):
    """A row's "none" read as "not said", so --register rigid registered it anyway: a manifest written with
    --register none (or a row the fix text sends to "register none") ran registered."""
    from medfuse.batch import write_manifest

    ds = tmp_path / "ds"
    (ds / "sub-01").mkdir(parents=True)
    shutil.copy(SAMPLES / "mr_t1.nii.gz", ds / "sub-01" / "mr.nii.gz")
    shutil.copy(SAMPLES / "spect.nii.gz", ds / "sub-01" / "spect.nii.gz")
    m = write_manifest(ds, tmp_path / "m.csv", register="none")
    assert main(["batch", str(m), "--register", "rigid", "--method", "mean", "--workers", "1", "--no-progress"]) == EXIT_OK
    sidecar = next(tmp_path.rglob("*fused.json"))
    rec = json.loads(sidecar.read_text())
    assert rec["parameters"]["register"]["kind"] is None, rec["parameters"]



# ------------------------------------------------------------------ register / fuse: suspect reasons
def test_suspect_reasons_name_the_command_line_options_not_python_arguments(tmp_path, capsys):
    """`medfuse register` printed "use metric='mattes'" and "use initialise='auto'", arguments it does not have."""
    out = tmp_path / "pet_on_mr.nii.gz"
    assert main(["register", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "-o", str(out),
                 "--metric", "correlation", "--no-progress", "-q"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "looks suspect" in err and "--metric mattes" in err, err
    assert "metric='" not in err and "initialise='" not in err, err


def test_cli_advice_per_command():
    from medfuse.cli import _cli_advice

    reason = ("the moving image matches clearly better turned ~90 degrees from this result: use initialise='auto' "
              "(it searches the 24 orientations); for one subject's scans use kind='rigid'; use a coarser "
              "bspline_grid_mm")
    reg = _cli_advice(reason, "register")
    assert "use --initialise auto (it searches" in reg and "use --kind rigid" in reg and "='" not in reg
    fuse = _cli_advice(reason, "fuse")
    assert "medfuse register --initialise auto" in fuse and "use --register rigid" in fuse
    assert "medfuse.register(..., bspline_grid_mm=)" in fuse
    assert _cli_advice(reason, "info") == reason


def test_advice_given_for_both_faces_names_the_command_line_option_alone(samples_dir, tmp_path, capsys):
    """'pass overwrite=True (--overwrite)', 'pass report= (--report)' and 'or pass format='dicom'' (no such option
    on the command line) reached the command line as written."""
    mr, spect = str(samples_dir / "mr_t1.nii.gz"), str(samples_dir / "spect.nii.gz")
    (tmp_path / "f.json").write_text('{"mine": 1}')
    assert main(["fuse", mr, spect, "--method", "mean", "-o", str(tmp_path / "f.nii.gz")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "add --overwrite to replace it" in err and "overwrite=True" not in err
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"subject,fixed,moving,output\na,{mr},{spect},{tmp_path / 'out.csv'}\n")
    assert main(["batch", str(manifest), "--method", "mean", "--scheduler", "synchronous", "--no-progress"]) == 1
    out = capsys.readouterr().out + (tmp_path / "m-report.csv").read_text()
    assert "for a DICOM series use a name without a dot ending or an existing series folder" in out
    assert "format=" not in out
    assert main(["batch", str(manifest), "--method", "mean", "--report", str(manifest)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "pass --report another path" in err and "report=" not in err


def test_a_4d_series_picked_with_series_gets_a_fix_that_loads_that_series(shared, tmp_path, capsys):
    """The fix said medfuse.load(FOLDER, volume_index=0), which a folder of 4 series refuses (MultipleSeriesError)."""
    folder = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE")
    mr = str(Path(__file__).resolve().parents[1] / "sample_volumes" / "mr_t1.nii.gz")
    out = str(tmp_path / "f.nii.gz")
    assert main(["fuse", mr, str(folder), "--series", "-", "3", "--method", "max", "-o", out]) == EXIT_USAGE
    err = capsys.readouterr().err
    snippet = err.split('python -c "', 1)[1].split('"', 1)[0]
    assert "series_uid='3', volume_index=0" in snippet
    scope: dict = {}
    exec(snippet.replace("medfuse.save(v, 'vol0.nii.gz')", "pass"), scope)  # the advice runs as given
    assert scope["v"].shape == (64, 64, 15)
    # The same folder picked twice: which pick failed is not known, so the fix says how to fill it in.
    assert main(["fuse", str(folder), str(folder), "--series", "1", "2", "--method", "max", "-o", out]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "series_uid=N, volume_index=0" in err and "N being the series' number" in err


def test_python_only_load_options_are_not_advised_on_the_command_line(capsys):
    """`medfuse info` advised "load with suv='none'" and "whole_series=True", which no command takes."""
    from medfuse.cli import _cli_advice, _cli_words

    said = ("PET loaded in counts, not SUV: Units is CNTS. Fix: export the series with Philips' private PET group, "
            "or as BQML; or load with suv='none'")
    assert _cli_words(said).endswith("or as BQML") and "suv=" not in _cli_advice(said, "fuse")
    assert "suv=" not in _cli_words("Fix: use a decay-corrected PET series, or load with suv='none'")
    one = sorted((SAMPLES / "pet").iterdir())[0]
    assert main(["info", str(one)]) == 0
    out, err = capsys.readouterr()
    assert "pass the folder" in out + err and "whole_series" not in out + err


def test_evaluate_options_are_named_as_the_command_takes_them(capsys):
    """"Fix: pass e.g. val_fraction=0.2" named the Python argument of --val-fraction."""
    from medfuse.cli import _cli_words

    assert _cli_words("Fix: pass e.g. val_fraction=0.2") == "Fix: pass e.g. --val-fraction 0.2"
    assert _cli_words("check that the sources are not empty, or lower min_content") == \
        "check that the sources are not empty"


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_help_give_examples_whose_options_exist(command, capsys):
    """Every other command's help gave examples; these two gave none (a bare 'medfuse train' runs an hour)."""
    import re

    from medfuse.cli import main

    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    examples = out[out.index("examples:"):out.index("exit codes:")]
    lines = [ln for ln in examples.splitlines() if ln.strip().startswith("medfuse " + command)]
    assert len(lines) >= 2
    options = set(re.findall(r"(--[a-z0-9-]+)", out[:out.index("examples:")]))
    for used in re.findall(r"\s(--[a-z0-9-]+)", examples):
        assert used in options, used
