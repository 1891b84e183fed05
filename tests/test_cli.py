"""The medfuse command line: help, info, register, fuse, errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medfuse import provenance as prov
from medfuse.cli import EXIT_CANCELLED, EXIT_USAGE, _delegate, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_volumes"


def test_help_lists_commands_and_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("info", "register", "fuse", "evaluate", "train", "batch", "demo", "exit codes", "130"):
        assert word in out
    for cmd in ("info", "register", "fuse", "batch", "demo"):
        assert main([cmd, "--help"]) == 0
        assert f"medfuse {cmd}" in capsys.readouterr().out
    assert main([]) == EXIT_USAGE


def test_help_does_not_import_torch():
    code = ("import sys; from medfuse.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'SimpleITK' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_a_gpu_this_machine_lacks_is_a_usage_error(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "f.nii.gz"
    code = main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "mr_t2.nii.gz"), "-o", str(out), "--device",
                 "cuda", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and "internal error" not in err, err
    assert len(err.splitlines()) == 1 and "'cuda' was asked for" in err and "Fix:" in err
    assert not out.exists()
    # demo and batch check it before any subject is loaded
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cuda", "-q"]) == EXIT_USAGE
    assert "'cuda' was asked for" in capsys.readouterr().err and not (tmp_path / "demo").exists()
    assert main(["batch", str(tmp_path / "none.csv"), "--device", "cuda:0", "-q"]) == EXIT_USAGE
    assert "'cuda:0' was asked for" in capsys.readouterr().err


def test_info_on_a_dicom_pet_folder(capsys):
    assert main(["info", str(SAMPLES / "pet")]) == 0
    out = capsys.readouterr().out
    assert "PT" in out and "SUVbw" in out and "64 x 76 x 64" in out and "LPS" in out
    assert main(["info", "--json", str(SAMPLES / "mr_t1.nii.gz")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["modality"] == "MR" and facts["shape"] == [160, 192, 160] and facts["spacing_mm"] == [1.0, 1.0, 1.0]


def test_info_takes_several_paths_as_a_shell_glob_gives_them(tmp_path, capsys):
    """`medfuse info scans/*` was "unrecognized arguments: (a str of 17 characters, not shown) ..."."""
    one, two = SAMPLES / "mr_t1.nii.gz", SAMPLES / "spect.nii.gz"
    missing = tmp_path / "gone.nii.gz"
    assert main(["info", str(one), str(missing), str(two)]) == EXIT_USAGE  # the rest are still shown
    got = capsys.readouterr()
    assert got.out.count("modality") == 2 and "160 x 192 x 160" in got.out and "44 x 52 x 44" in got.out
    assert got.err.strip() == f"medfuse info: error: {missing}: no such file or folder. Fix: check the path."
    assert main(["info", "--json", str(one), str(two)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [r["shape"] for r in listing] == [[160, 192, 160], [44, 52, 44]]
    assert main(["info", "--json", str(one), str(missing)]) == EXIT_USAGE
    listing = json.loads(capsys.readouterr().out)
    assert listing[0]["modality"] == "MR" and "no such file" in listing[1]["error"]
    assert main(["info", str(one), str(SAMPLES / "ct"), "--series", "1"]) == EXIT_USAGE
    assert "--series picks a series of one folder, and 2 paths were given" in capsys.readouterr().err


def test_errors_are_one_line_with_fix_and_no_traceback(tmp_path, capsys):
    missing = tmp_path / "nope.nii.gz"
    assert main(["info", str(missing)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "Fix:" in err and "Traceback" not in err
    assert main(["--debug", "info", str(missing)]) == EXIT_USAGE
    assert "Traceback" in capsys.readouterr().err
    assert main(["info", str(missing), "--debug"]) == EXIT_USAGE  # --debug after the command works too
    assert "Traceback" in capsys.readouterr().err
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    out = tmp_path / "f.nii.gz"
    assert main(["fuse", str(bad), str(SAMPLES / "pet"), "-o", str(out), "--method", "mean"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.nii.gz" in err and "Traceback" not in err
    assert not out.exists()
    # usage errors (argparse) exit 2 as well
    assert main(["fuse", str(bad)]) == EXIT_USAGE
    assert main(["fuse", str(bad), str(bad), "-o", str(out), "--method", "magic"]) == EXIT_USAGE


def test_nan_voxels_name_the_input_and_leave_no_output(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    data = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    holes = data.copy()
    holes[:4] = np.nan  # outside a field of view, as resampled or masked files often have
    paths = [tmp_path / "patient_doe_a.nii.gz", tmp_path / "patient_doe_b.nii.gz"]
    for path, arr in zip(paths, (data, holes)):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    before = paths[1].read_bytes()
    out = tmp_path / "f.nii.gz"
    assert main(["fuse", *map(str, paths), "-o", str(out), "--method", "max"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "input 2 has 1024 NaN" in err and "25 %" in err and "Fix:" in err
    assert "doe" not in err  # a file name may carry a patient's name: the input is named by position
    assert not out.exists() and paths[1].read_bytes() == before


def test_output_exists_is_refused(tmp_path, capsys):
    out = tmp_path / "f.nii.gz"
    out.write_bytes(b"x")
    rc = main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "-o", str(out), "--method", "mean"])
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert "exists" in err and "overwrite" in err.lower()
    assert out.read_bytes() == b"x"


def test_register_writes_volume_transform_and_sidecar(tmp_path, capsys):
    out = tmp_path / "pet_on_mr.nii.gz"
    mine = tmp_path / "pet_on_mr.json"
    mine.write_text("my notes")  # a file of the user's at the sidecar path: refused before any work
    assert main(["register", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "-o", str(out)]) == EXIT_USAGE
    assert "sidecar" in capsys.readouterr().err and mine.read_text() == "my notes" and not out.exists()
    mine.unlink()
    import SimpleITK as sitk

    import medfuse.registration as reg_pkg  # what the command imports register from

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    seen = []
    real = reg_pkg.register

    def spy(*a, **k):  # the thread count ITK runs the registration with
        seen.append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reg_pkg, "register", spy)
        assert main(["register", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "-o", str(out),
                     "--threads", "1"]) == 0
    assert seen == [1] and sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before
    text = capsys.readouterr().out
    assert "rotation" in text and str(out) in text
    import medfuse
    from medfuse.phantom import load_ground_truth

    moved = medfuse.load(out)
    assert moved.same_grid(medfuse.load(SAMPLES / "mr_t1.nii.gz"))
    t = medfuse.load_transform(tmp_path / "pet_on_mr.tfm")
    gt = load_ground_truth(SAMPLES)["mr_to_pet"]
    lesion = load_ground_truth(SAMPLES)["lesion"]["center_lps_mm"]
    err = t.transform_points(lesion[None]) - (gt[:3, :3] @ lesion + gt[:3, 3])
    assert float(abs(err).max()) < 2.0  # mm, at the lesion
    rec = json.loads((tmp_path / "pet_on_mr.json").read_text())
    assert rec["registration"][0]["kind"] == "rigid" and rec["output"]["sha256"] == prov.hash_path(out)
    assert rec["parameters"]["threads"] == 1
    # What each input is, as fuse's sidecar says (it had path and hash only).
    assert [(i["role"], i["modality"], i["unit"]) for i in rec["inputs"]] == [("fixed", "MR", "arbitrary"),
                                                                             ("moving", "PT", "SUVbw")]
    assert rec["inputs"][1]["shape"] == list(medfuse.load(SAMPLES / "pet").shape)


def test_fuse_command(tmp_path, capsys):
    out = tmp_path / "fused.nii.gz"
    rc = main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", str(out),
               "--method", "mean", "--register", "rigid"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "method mean" in text and "fused.json" in text
    rec = json.loads((tmp_path / "fused.json").read_text())
    assert rec["parameters"]["register"]["kind"] == "rigid"


def test_delegated_commands_fail_cleanly_when_missing(capsys):
    parser = build_parser()
    args = parser.parse_args(["evaluate", "--help"])
    args.debug = False
    handler = _delegate("medfuse.no_such_module", "evaluate", "medfuse evaluate")
    from medfuse.errors import MedfuseError

    with pytest.raises(MedfuseError, match="not available"):
        handler(args)
    assert args.rest == ["--help"]  # options after the command go to the delegated parser


def test_cancel_maps_to_130(monkeypatch, capsys):
    import medfuse.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    assert main(["info", "x"]) == EXIT_CANCELLED
    assert "cancelled" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,module", [("evaluate", "medfuse.evaluate"), ("train", "medfuse.fusion.train")])
def test_delegated_commands_show_their_options(cmd, module, capsys):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not part of this checkout yet")
    assert main([cmd, "--help"]) == 0
    assert f"medfuse {cmd}" in capsys.readouterr().out
    assert main([cmd, "--no-such-option"]) == EXIT_USAGE


def test_fuse_modalities_pick_the_network_3d_path(tmp_path, capsys):
    """NIfTI files carry no modality: ``--modalities`` gives it (one per input, FIXED first). Two MR inputs
    use the network's learned choice at every level (``network_functional`` false in the sidecar); without
    the option the modality is unknown and the 3-D path keeps its coarse pixel rule (null)."""
    pytest.importorskip("torch")
    import nibabel as nib

    plain = []
    for name in ("mr_t1.nii.gz", "mr_t2.nii.gz"):  # copies without medfuse's modality note in the header
        img = nib.load(str(SAMPLES / name))
        img.header["descrip"] = b""
        nib.save(img, str(tmp_path / name))
        plain.append(str(tmp_path / name))
    mr1, mr2 = plain
    rc = main(["fuse", mr1, mr2, "-o", str(tmp_path / "a.nii.gz"), "--modalities", "MR", "mri", "--no-progress"])
    assert rc == 0
    rec = json.loads((tmp_path / "a.json").read_text())
    assert rec["network_functional"] is False and [i["modality"] for i in rec["inputs"]] == ["MR", "MR"]
    assert main(["fuse", mr1, mr2, "-o", str(tmp_path / "b.nii.gz"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["network_functional"] is None
    capsys.readouterr()
    assert main(["fuse", mr1, mr2, "-o", str(tmp_path / "c.nii.gz"), "--modalities", "MR"]) == EXIT_USAGE
    assert "one per input" in capsys.readouterr().err and not (tmp_path / "c.nii.gz").exists()
    assert main(["fuse", mr1, mr2, "-o", str(tmp_path / "c.nii.gz"), "--modalities", "MR", "XR"]) == EXIT_USAGE
    assert "modality" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,module,opts", [("evaluate", "medfuse.evaluate", ["pairs", "--out", "o"]),
                                             ("train", "medfuse.fusion.train", ["--epochs", "1"])])
def test_debug_and_quiet_reach_delegated_commands(cmd, module, opts, monkeypatch):
    """``--debug`` and ``-q`` work after ``evaluate``/``train`` as after any command (they were 'unrecognized
    arguments'), and before them they are passed on (``-q`` was dropped). The command's own options stay."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not part of this checkout yet")
    mod = importlib.import_module(module)
    seen = []
    monkeypatch.setattr(mod, "run", lambda a: seen.append(a) or 0)
    assert main([cmd, *opts, "--debug", "-q"]) == 0
    assert seen[-1].debug and seen[-1].quiet and seen[-1].argv == opts
    assert main(["-q", cmd, *opts]) == 0
    assert seen[-1].quiet and not seen[-1].debug and seen[-1].argv == opts
    if cmd == "evaluate":
        assert seen[-1].no_progress  # "print only errors": no progress bar
    assert main([cmd, *opts, "--quiet"]) == 0 and seen[-1].quiet


def test_train_errors_are_usage_errors_with_a_traceback_under_debug(tmp_path, capsys):
    """A bad ``medfuse train`` value is exit 2 with one line and the fix (``--val-limit 0`` was an internal
    error, exit 3); ``--debug`` after ``train`` adds the traceback."""
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    args = ["train", "--val-limit", "0", "--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--val-limit must be 1 or more" in err and "Fix:" in err, err
    assert main([*args, "--debug"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" in err and "--val-limit must be 1 or more" in err and "unrecognized" not in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("cmd", ["register", "fuse"])
def test_a_folder_that_save_would_refuse_is_refused_before_any_work(tmp_path, capsys, monkeypatch, cmd):
    # A DICOM-series output (no image ending) onto a folder of the user's own files: save() refuses it (overwrite
    # replaces only a DICOM series), but the commands found out only after registering/fusing.
    import importlib

    out = tmp_path / "study"
    out.mkdir()
    (out / "notes.docx").write_bytes(b"mine")
    ran = []

    def no_work(*a, **k):
        ran.append(1)
        raise AssertionError("registration ran before the output was checked")

    for name in ("medfuse.registration", "medfuse.registration.register"):
        monkeypatch.setattr(importlib.import_module(name), "register", no_work)
    args = [cmd, str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "-o", str(out), "--overwrite", "--no-progress"]
    if cmd == "fuse":
        args += ["--method", "mean", "--register", "rigid"]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "not a DICOM series" in err and "Traceback" not in err
    assert not ran and sorted(p.name for p in out.iterdir()) == ["notes.docx"]


# ----------------------------------------------------------------------------- the command line as a new user meets it
def test_a_mistyped_choice_or_command_gets_a_suggestion(tmp_path, capsys):
    out = str(tmp_path / "f.nii.gz")
    assert main(["fuse", "a", "b", "-o", out, "--method", "lapacian"]) == EXIT_USAGE
    assert "did you mean 'laplacian'?" in capsys.readouterr().err
    assert main(["fuse", "a", "b", "-o", out, "--register", "Rigid"]) == EXIT_USAGE
    assert "did you mean 'rigid'?" in capsys.readouterr().err
    assert main(["fuze", "a"]) == EXIT_USAGE
    assert "did you mean 'fuse'?" in capsys.readouterr().err
    assert main(["fuse", "a", "b", "-o", out, "--method", "zzz"]) == EXIT_USAGE
    assert "did you mean" not in capsys.readouterr().err  # nothing near: no guess


def test_info_on_a_folder_lists_its_series_and_image_files(tmp_path, capsys):
    # sample_volumes holds two DICOM series (ct/, pet/) and three NIfTI files: all are listed (the NIfTI files
    # were left out), each series with the folder to give to 'fuse'.
    assert main(["info", str(SAMPLES)]) == 0
    out = capsys.readouterr().out
    assert "2 DICOM series and 3 image files" in out and "folder=pet" in out and "folder=ct" in out
    assert "mr_t1.nii.gz" in out and "spect.nii.gz" in out and "44x52x44" in out
    assert main(["info", "--json", str(SAMPLES)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert len(listing["series"]) == 2 and len(listing["files"]) == 3
    # a folder of NIfTI files only was "no readable DICOM image files were found"
    only = tmp_path / "my scans"
    only.mkdir()
    (only / "t1.nii.gz").write_bytes((SAMPLES / "mr_t1.nii.gz").read_bytes())
    assert main(["info", str(only)]) == 0  # one file: its details
    assert "160 x 192 x 160" in capsys.readouterr().out
    (only / "t2.nii.gz").write_bytes((SAMPLES / "mr_t2.nii.gz").read_bytes())
    assert main(["info", str(only)]) == 0
    out = capsys.readouterr().out
    assert "2 image files" in out and "t2.nii.gz" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["info", str(empty)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no DICOM image series and no NIfTI" in err and len(err.strip().splitlines()) == 1


def test_info_series_errors_name_the_command_line_not_the_python_api(capsys):
    assert main(["info", str(SAMPLES), "--series", "1.2.3"]) == EXIT_USAGE
    err = capsys.readouterr().err
    # The sample PET's study is dated before the CT's: studies are listed in date order, the PET first.
    assert "no series in this folder matches" in err and "2: CT" in err and "medfuse.scan" not in err
    assert main(["info", str(SAMPLES / "mr_t1.nii.gz"), "--series", "1.2.3"]) == EXIT_USAGE  # was ignored
    assert "--series" in capsys.readouterr().err
    uid = medfuse_scan_uid("PT")
    assert main(["info", str(SAMPLES), "--series", uid]) == 0
    assert "SUVbw" in capsys.readouterr().out


def medfuse_scan_uid(modality):
    import medfuse

    return next(s.series_uid for s in medfuse.scan(SAMPLES) if s.modality == modality)


def test_info_on_a_pet_shows_where_the_suv_factor_came_from(capsys):
    assert main(["info", str(SAMPLES / "pet")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "SUV factor" in x)
    assert "body weight / injected dose" in line and "Units BQML" in line and "DecayCorrection START" in line
    assert main(["info", "--json", str(SAMPLES / "pet")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["unit"] == "SUVbw" and "DecayCorrection START" in facts["suv_factor_source"]
    assert facts["n_volumes"] == 1
    assert main(["info", "--json", str(SAMPLES / "mr_t1.nii.gz")]) == 0
    assert json.loads(capsys.readouterr().out)["suv_factor_source"] is None


def test_info_on_a_4d_series_describes_it(shared, tmp_path, capsys):
    # was: "the series holds 3 volumes (4-D). Fix: pass volume_index=0..2" (a Python argument), exit 2
    folder = shared("data", "dicom", "qa-philips-scaling", "In")
    assert main(["info", str(folder)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "volumes      3 (4-D" in out and "64 x 64 x 9" in out
    # fuse cannot read it: the fix says what to do from the command line
    assert main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(folder), "-o", str(tmp_path / "u.nii.gz"),
                 "--method", "mean", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "4-D" in err and "volume_index=0" in err and "pass volume_index" not in err
    assert f"medfuse.load({str(folder)!r}, volume_index=0)" in err  # the path itself, not a placeholder
    assert not (tmp_path / "u.nii.gz").exists()


def test_fuse_refuses_a_picture_name_as_output_before_any_work(tmp_path, capsys):
    # '-o fused.png' wrote a DICOM series *folder* named fused.png (register refused it, fuse did not)
    out = tmp_path / "fused.png"
    assert main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", str(out),
                 "--method", "mean", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "not a 3-D image format" in err and "Fix:" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_fuse_errors_give_command_line_fixes(tmp_path, capsys):
    out = tmp_path / "f.nii.gz"
    out.write_bytes(b"x")
    args = ["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", str(out), "--method",
            "mean", "-q"]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err, err
    # a folder of several series: the fix said "pass series_uid= (see medfuse.scan(folder))"
    assert main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES), "-o", str(tmp_path / "g.nii.gz"),
                 "--method", "mean", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "2 series" in err and "medfuse info" in err and "series_uid=" not in err, err
    assert not (tmp_path / "g.nii.gz").exists()


def test_a_misspelt_device_is_refused_whatever_the_method(tmp_path, capsys):
    # '--device gpu' failed with the network but was silently ignored with a classical rule
    out = tmp_path / "f.nii.gz"
    assert main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", str(out),
                 "--method", "mean", "--device", "gpu", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown device 'gpu'" in err and "Fix:" in err and not out.exists()
    assert main(["demo", "--out", str(tmp_path / "d"), "--method", "mean", "--device", "gpu", "-q"]) == EXIT_USAGE
    assert "unknown device 'gpu'" in capsys.readouterr().err and not (tmp_path / "d").exists()
    # batch too: it ran every subject with the classical rule and said nothing
    manifest = tmp_path / "subjects.csv"
    manifest.write_text(f"subject,fixed,moving,output\ns1,{SAMPLES / 'mr_t1.nii.gz'},{SAMPLES / 'spect.nii.gz'},"
                        f"{tmp_path / 'b' / 's1.nii.gz'}\n")
    assert main(["batch", str(manifest), "--method", "mean", "--device", "gpu", "-q"]) == EXIT_USAGE
    assert "unknown device 'gpu'" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_an_internal_error_is_exit_3_on_one_line(monkeypatch, capsys):
    import medfuse.cli as cli

    def bug(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "_cmd_info", bug)
    assert main(["info", "x"]) == cli.EXIT_INTERNAL == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error: RuntimeError: something broke" in err and "--debug" in err
    assert main(["info", "x", "--debug"]) == 3 and "Traceback" in capsys.readouterr().err


def test_info_never_shows_patient_identifiers(tmp_path, capsys):
    import pydicom

    folder = tmp_path / "Doe_Jane_pet"
    folder.mkdir()
    for f in sorted((SAMPLES / "pet").iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Roe^Janet", "MRN4455667", "19510203"
        ds.save_as(folder / f.name)
    for extra in ([], ["--json"]):
        assert main(["info", str(folder), *extra]) == 0
        out = capsys.readouterr().out
        assert "SUVbw" in out and "SUV" in out
        for ident in ("Roe", "Janet", "MRN4455667", "19510203", "70.0"):  # 70.0: the PatientWeight (kg)
            assert ident not in out, ident


@pytest.mark.parametrize("tags,expect", [({"Units": "GML"}, "stored as SUVbw in the series (Units GML"),
                                         ({"DecayCorrection": "ADMIN"}, "decay-corrected to the injection")])
def test_info_names_the_suv_factor_source_of_other_pet_headers(tmp_path, capsys, tags, expect):
    import pydicom

    folder = tmp_path / "pet"
    folder.mkdir()
    for f in sorted((SAMPLES / "pet").iterdir()):
        ds = pydicom.dcmread(f)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(folder / f.name)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "unit SUVbw" in out and expect in out, out


def test_info_on_a_4d_nifti_describes_it(tmp_path, capsys):
    # was: "the file holds 3 volumes (4-D). Fix: use medfuse.load_volumes(path)", exit 2
    import nibabel as nib
    import numpy as np

    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 9, 10, 3), np.float32), np.eye(4)), str(path))
    assert main(["info", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "volumes      3 (4-D" in out and "8 x 9 x 10" in out
    assert main(["info", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["n_volumes"] == 3


def test_register_errors_give_command_line_fixes(tmp_path, capsys):
    # register said "pass overwrite=True" (a Python argument) to a command-line user.
    out = tmp_path / "pet_on_mr.nii.gz"
    out.write_bytes(b"mine")
    assert main(["register", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "-o", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err and out.read_bytes() == b"mine"


def test_register_initialise_option_and_its_advice(tmp_path, capsys):
    # The advice for disjoint fields of view said "pass initialise='geometry'", which the command line could not do.
    import numpy as np

    import medfuse
    from medfuse import Volume

    rng = np.random.default_rng(0)
    box = np.zeros((30, 30, 30), np.float32)
    box[8:22, 10:20, 6:24] = 100 + rng.normal(0, 5, (14, 10, 18))
    medfuse.save(Volume(box, np.eye(4), modality="MR"), tmp_path / "a.nii.gz")
    far = np.eye(4)
    far[:3, 3] = (500.0, 0.0, 0.0)  # the same object, 500 mm away: unrelated scanner coordinates
    medfuse.save(Volume(box, far, modality="MR"), tmp_path / "b.nii.gz")
    args = ["register", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
            "--no-progress"]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "medfuse register --initialise geometry" in err and "initialise='" not in err
    assert main(args + ["--initialise", "geometry"]) == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "o.json").read_text())
    assert rec["steps"][0]["params"]["initialise"] == "geometry"
    t = medfuse.load_transform(tmp_path / "o.tfm")
    assert np.allclose(t.transform_points(np.array([[15.0, 15.0, 15.0]])), [[515.0, 15.0, 15.0]], atol=1.0)


def test_batch_on_a_dataset_folder_needs_register_said_and_can_write_its_manifest(tmp_path, capsys):
    """A dataset folder (one folder per subject) runs without a manifest, but only once the user says whether
    the images are aligned: discovery pairs files by name and cannot know, and an unregistered pair from two
    sessions fuses misaligned. --write-manifest shows what discovery found; --out is for datasets only."""
    from medfuse.batch import write_phantom_subjects

    write_phantom_subjects(tmp_path / "ds", 2)
    ds = tmp_path / "ds"
    assert main(["batch", str(ds), "--method", "max", "--scheduler", "synchronous", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "needs --register" in err and "--register rigid" in err and "--register none" in err
    assert not (ds / "derivatives").exists()

    assert main(["batch", str(ds), "--write-manifest", str(tmp_path / "m.csv")]) == 0
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0] == "subject,fixed,moving,output" and len(rows) == 3 and "mr_t1.nii.gz" in rows[1]
    assert not (ds / "derivatives" / "medfuse").exists() or not list((ds / "derivatives" / "medfuse").glob("*.nii.gz"))

    out = tmp_path / "out"
    assert main(["batch", str(ds), "--register", "none", "--method", "max", "--scheduler", "synchronous",
                 "--out", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.glob("*_fused.nii.gz")) == ["sub-01_fused.nii.gz", "sub-02_fused.nii.gz"]
    assert (out / "batch-report.csv").is_file()

    capsys.readouterr()
    assert main(["batch", str(tmp_path / "m.csv"), "--out", str(out), "-q"]) == EXIT_USAGE
    assert "--out is for a dataset folder" in capsys.readouterr().err


def test_fuse_without_registration_across_frames_of_reference_warns_and_records_it(samples_dir, tmp_path, capsys):
    """The sample PET lies in another DICOM frame of reference than the CT (misplaced on purpose): fused with the
    default --register none it is misaligned. The terminal and the sidecar both say so; registered, neither."""
    out = tmp_path / "f.nii.gz"
    args = ["fuse", str(samples_dir / "ct"), str(samples_dir / "pet"), "--method", "max", "--no-progress"]
    assert main([*args, "-o", str(out)]) == 0
    assert "different DICOM frames of reference" in capsys.readouterr().err
    said = json.loads(prov.sidecar_path(out).read_text())["warnings"]
    assert any(w.startswith("input 2: the two images come from different DICOM frames") for w in said)
    reg = tmp_path / "r.nii.gz"
    assert main([*args, "-o", str(reg), "--register", "rigid"]) == 0
    assert "frames of reference" not in capsys.readouterr().err
    assert not any("frames of reference" in w for w in json.loads(prov.sidecar_path(reg).read_text()).get("warnings", []))


@pytest.fixture(scope="module")
def pacs_export(tmp_path_factory):
    """The bundled CT and PET series side by side in one folder, as a PACS or CD export of a study often
    leaves them (same file names in both series, so each gets a prefix)."""
    import shutil

    study = tmp_path_factory.mktemp("export") / "study"
    study.mkdir()
    for kind in ("ct", "pet"):
        for f in (SAMPLES / kind).iterdir():
            shutil.copyfile(f, study / f"{kind}_{f.name}")
    return study


def test_fuse_and_register_pick_series_of_one_folder(pacs_export, tmp_path, capsys):
    """Before --series, a folder holding the CT and the PET could not be fused at all: the error said to
    give the folder of one series, and the series shared that folder."""
    import medfuse

    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(pacs_export), str(pacs_export), "-o", str(out), "--method", "max"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "2 series" in err and "--series" in err
    assert main(["fuse", str(pacs_export), str(pacs_export), "-o", str(out), "--method", "max",
                 "--series", "CT", "PET", "--no-progress"]) == 0
    ct = medfuse.load(SAMPLES / "ct")
    fused = medfuse.load(out)
    assert fused.same_grid(ct)
    from medfuse.pipeline import fuse_files

    want = fuse_files(SAMPLES / "ct", SAMPLES / "pet", None, method="max").fused  # each series in its own folder
    np.testing.assert_array_equal(fused.array, want.array)
    rec = json.loads((tmp_path / "fused.json").read_text())
    assert rec["parameters"]["load"]["series"] == ["CT", "PET"]
    # by number, as the error lists them, and for register; a UID is recorded as "uid", never as itself
    uid = medfuse.scan(pacs_export)[0].series_uid  # the PET: its study is dated before the CT's
    reg = tmp_path / "reg.nii.gz"
    assert main(["register", str(pacs_export), str(pacs_export), "-o", str(reg), "--series", "2", uid,
                 "--no-progress"]) == 0
    capsys.readouterr()
    rec = json.loads((tmp_path / "reg.json").read_text())
    assert rec["parameters"]["series"] == ["2", "uid"] and uid not in (tmp_path / "reg.json").read_text()
    assert medfuse.load(reg).same_grid(ct)


@pytest.mark.parametrize("choice,words", [(["CT"], "1 choices for 2 inputs"), (["3", "PT"], "folder holds 2"),
                                          (["MR", "PT"], "no MR series"), (["CT", "nonsense"], "matches")])
def test_series_choices_that_name_nothing_are_usage_errors(pacs_export, tmp_path, capsys, choice, words):
    out = tmp_path / "f.nii.gz"
    assert main(["fuse", str(pacs_export), str(pacs_export), "-o", str(out), "--method", "max",
                 "--series", *choice]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and not out.exists()


def test_a_reader_that_leaves_early_is_no_internal_error():
    """`medfuse info FOLDER | head -1`: the pipe closes under the listing. That exited 3, 'internal error:
    BrokenPipeError'; the reader has what it wanted, so it is a quiet success."""
    proc = subprocess.Popen([sys.executable, "-m", "medfuse.cli", "info", str(SAMPLES)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before medfuse writes a byte: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "internal error" not in err and "Traceback" not in err


def test_quiet_batch_still_names_the_failed_subjects(tmp_path, capsys):
    """-q prints only errors: a batch with a failed subject printed nothing at all and exited 1."""
    from medfuse.batch import write_phantom_subjects

    manifest = write_phantom_subjects(tmp_path / "ds", 2, first_seed=3, method="max", register=None)
    mr = tmp_path / "ds" / "sub-02" / "mr_t1.nii.gz"
    mr.write_bytes(mr.read_bytes()[:300])  # truncated: this subject fails, the other is written
    assert main(["batch", str(manifest), "--scheduler", "synchronous", "-q"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "1 of 2 subject(s) failed, 1 complete:" in err and "sub-02" in err and "mr_t1.nii.gz" in err
    assert "sub-01" not in err  # the subject that was written is not an error
    # Without -q the table (stdout) names it, and stderr says it too: a cron job keeping stderr saw nothing.
    assert main(["batch", str(manifest), "--scheduler", "synchronous", "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert "FAILED" in out
    assert "medfuse batch: 1 of 2 subject(s) failed, 1 complete:" in err and "sub-02" in err and "report: " in err
    assert "sub-01" not in err


def test_a_looping_link_is_called_a_loop_not_a_missing_file(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for argv in (["info", str(tmp_path / "a")], ["fuse", str(tmp_path / "a"), str(tmp_path / "b"), "-o",
                                                  str(tmp_path / "f.nii.gz"), "--method", "max"]):
        assert main(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "loops" in err and "no such file" not in err, err


def test_quiet_keeps_warnings_about_the_data_and_drops_the_rest(tmp_path, capsys):
    """-q is documented as 'only warnings and errors': a warning about the inputs (two frames of reference)
    must still reach the user; the lines about what was written must not."""
    out = tmp_path / "f.nii.gz"
    assert main(["fuse", str(SAMPLES / "ct"), str(SAMPLES / "pet"), "-o", str(out), "--method", "max", "-q"]) == 0
    cap = capsys.readouterr()
    assert out.exists() and cap.out == ""
    assert "frames of reference" in cap.err and "wrote" not in cap.err
    assert "print only warnings and errors" in build_parser().format_help()


def test_the_examples_sample_paths_say_how_to_make_the_samples(tmp_path, monkeypatch, capsys):
    """A pip install has no sample_volumes/: the README's first command said only 'check the path'."""
    monkeypatch.chdir(tmp_path)
    assert main(["info", "sample_volumes"]) == EXIT_USAGE
    assert "python -m medfuse.phantom --write sample_volumes" in capsys.readouterr().err
    assert main(["info", "elsewhere"]) == EXIT_USAGE
    assert "Fix: check the path." in capsys.readouterr().err


def test_info_json_lists_the_nan_warning_and_complex_values_are_their_magnitude(tmp_path, capsys):
    """The NaN/inf warning went to stderr only (a JSON reader saw "warnings": []), and a complex image's range
    was its real part's."""
    import nibabel as nib

    data = np.full((6, 6, 6), 2.0, np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    assert main(["info", "--json", str(tmp_path / "nan.nii.gz")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert any("2 voxel(s) were NaN or infinite" in w for w in facts["warnings"]), facts["warnings"]
    assert (facts["min"], facts["max"]) == (2.0, 2.0)
    c = np.full((6, 6, 6), 3 + 4j, np.complex64)
    c[0, 0, 0] = -5 + 0j
    nib.save(nib.Nifti1Image(c, np.eye(4)), tmp_path / "c.nii.gz")
    assert main(["info", str(tmp_path / "c.nii.gz")]) == 0
    assert "values       5 .. 5 arbitrary (magnitude of complex voxels)" in capsys.readouterr().out


def test_dicom_outputs_of_a_dicom_fixed_take_it_as_their_template(tmp_path):
    """Command-line DICOM outputs got a new study and frame of reference, today's dates, no patient position, and
    a fusion was called "medfuse derived unknown (arbitrary)"."""
    import pydicom

    ct = pydicom.dcmread(str(sorted((SAMPLES / "ct").iterdir())[0]), stop_before_pixels=True)
    fused, moved = tmp_path / "fused", tmp_path / "moved"
    assert main(["fuse", str(SAMPLES / "ct"), str(SAMPLES / "pet"), "-o", str(fused), "--method", "mean",
                 "--register", "rigid", "-q"]) == 0
    assert main(["register", str(SAMPLES / "ct"), str(SAMPLES / "pet"), "-o", str(moved), "-q"]) == 0
    f, m = (pydicom.dcmread(str(sorted(d.iterdir())[0]), stop_before_pixels=True) for d in (fused, moved))
    assert f.SeriesDescription == "medfuse fused (mean)" and m.SeriesDescription == "medfuse derived PT (SUVbw)"
    for ds in (f, m):
        assert ds.StudyDate == ct.StudyDate and ds.PatientIdentityRemoved == "YES"
        assert ds.FrameOfReferenceUID != ct.FrameOfReferenceUID  # the de-identified pseudonym of it
    # A NIfTI fixed has no DICOM study to give: a new one, as before.
    nii = tmp_path / "nii_fixed"
    assert main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", str(nii), "--method",
                 "mean", "-q"]) == 0
    assert pydicom.dcmread(str(sorted(nii.iterdir())[0]), stop_before_pixels=True).SeriesDescription == \
        "medfuse fused (mean)"


def test_running_out_of_memory_is_said_as_such_not_as_a_bug(tmp_path, monkeypatch, capsys):
    """A fusion that ran out of memory said "internal error: MemoryError ... report the traceback", exit 3."""
    import medfuse.fusion.classical as C

    def no_memory(*a, **k):
        raise MemoryError("Unable to allocate 600. MiB for an array with shape (512, 512, 300) and data type float64")

    monkeypatch.setattr(C, "_max", no_memory)
    out = tmp_path / "f.nii.gz"
    assert main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", str(out), "--method",
                 "max", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "error: not enough memory for this command (MemoryError)" in err and "internal error" not in err
    assert "mean and max least" in err and not out.exists()


def test_every_fusion_method_is_offered_by_the_commands_that_fuse():
    """The command line kept its own list of methods: a rule added to classical.METHODS reached the API, napari,
    MONAI and a manifest's method column, but `--method` refused it."""
    from medfuse.fusion import CLASSICAL_METHODS, available_methods

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "fuse" in a.choices).choices
    checked = []
    for command in ("fuse", "batch", "demo"):
        actions = {a.dest: a for a in subparsers[command]._actions}
        if "method" in actions:
            # batch adds "none": registration only (the kept images, no fusion), which only a batch can write
            extra = ["none"] if command == "batch" else []
            assert list(actions["method"].choices) == available_methods() + extra, command
            checked.append(command)
        if "fallback" in actions:
            assert list(actions["fallback"].choices) == list(CLASSICAL_METHODS), command
    assert {"fuse", "batch"} <= set(checked)
