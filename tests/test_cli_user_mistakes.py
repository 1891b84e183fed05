"""What the command line says about a new user's common mistakes: advice in its own terms (``--weights``, not
``weights=``; no "reinstall medfuse" for a mistyped path of the user's own), options that would be ignored, extra
arguments, a folder that holds an image file, the same image given twice, and a folder in the way of the output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medfuse.cli import EXIT_OK, EXIT_USAGE, main

SAMPLES = Path(__file__).resolve().parents[1] / "sample_volumes"


@pytest.fixture
def mr(tmp_path):
    p = tmp_path / "mr.nii.gz"
    shutil.copy(SAMPLES / "mr_t1.nii.gz", p)
    return p


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_fallback_with_a_classical_method_is_refused_as_weights_are(mr, tmp_path, capsys):
    out = tmp_path / "f.nii.gz"
    assert main(["fuse", str(mr), str(mr), "-o", str(out), "--method", "max", "--fallback", "mean", "-q"]) == EXIT_USAGE
    err = _err(capsys)
    assert "--fallback" in err and "--method is max" in err and "drop --fallback, or use --method network" in err
    assert main(["fuse", str(mr), str(mr), "-o", str(out), "--method", "max", "--weights", str(mr), "-q"]) == EXIT_USAGE
    err = _err(capsys)
    # The command's options, not FuseStep's Python arguments.
    assert "--weights names" in err and "--method is max" in err and "weights=" not in err and "method='" not in err
    assert not out.exists()


def test_a_missing_weights_file_of_the_users_own_is_not_a_reason_to_reinstall(mr, tmp_path, capsys):
    code = main(["fuse", str(mr), str(mr), "-o", str(tmp_path / "f.nii.gz"), "--weights",
                 str(tmp_path / "mine.safetensors"), "-q"])
    assert code == EXIT_USAGE
    err = _err(capsys)
    assert "mine.safetensors" in err and "check the path given as --weights" in err
    assert "reinstall" not in err and "weights=" not in err


def test_extra_arguments_point_to_the_commands_own_help(mr, tmp_path, capsys):
    assert main(["register", str(mr), str(mr), str(mr), "-o", str(tmp_path / "r.nii.gz")]) == EXIT_USAGE
    err = _err(capsys)
    assert err.startswith("medfuse register: error: unrecognized arguments") and "'medfuse register --help'" in err
    assert main(["info", str(mr), "--frobnicate"]) == EXIT_USAGE
    assert "'medfuse info --help'" in _err(capsys)


def test_a_folder_that_holds_an_image_file_names_it(mr, tmp_path, capsys):
    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(mr, folder / "t1.nii.gz")
    assert main(["fuse", str(folder), str(mr), "-o", str(tmp_path / "f.nii.gz"), "--method", "max", "-q"]) == EXIT_USAGE
    err = _err(capsys)
    assert "no readable DICOM image files" in err and "'t1.nii.gz'" in err and "pass the file itself" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fuse", str(empty), str(mr), "-o", str(tmp_path / "f.nii.gz"), "--method", "max", "-q"]) == EXIT_USAGE
    assert "pass the file itself" not in _err(capsys)


def test_the_same_image_twice_is_warned_about_and_recorded(mr, tmp_path, capsys):
    out = tmp_path / "f.nii.gz"
    assert main(["fuse", str(mr), str(mr), "-o", str(out), "--method", "max", "-q"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "input 2 (moving) holds the same image as input 1 (fixed)" in err, err
    assert any("same image" in w for w in json.loads(out.with_name("f.json").read_text())["warnings"])
    # A different image says nothing of the kind.
    assert main(["fuse", str(mr), str(SAMPLES / "pet"), "-o", str(tmp_path / "g.nii.gz"), "--method", "max",
                 "-q"]) == EXIT_OK
    assert "same image" not in capsys.readouterr().err


def test_a_folder_in_the_way_of_the_output_is_not_told_to_use_overwrite(mr, tmp_path, capsys):
    (tmp_path / "f.nii.gz").mkdir()
    assert main(["fuse", str(mr), str(mr), "-o", str(tmp_path / "f.nii.gz"), "--method", "max", "-q"]) == EXIT_USAGE
    err = _err(capsys)
    assert "a folder is in the way" in err and "--overwrite" not in err.split("Fix:")[1]


def test_evaluate_help_gives_the_exit_codes_and_what_quiet_keeps(capsys):
    assert main(["evaluate", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "exit codes:" in out and "--debug" in out
    assert "print only warnings and errors" in out


def test_info_json_of_one_of_several_series_sharing_a_uid_gives_the_key_series_takes_back(shared, capsys):
    """The 9 series of qa-transfer-syntaxes share one SeriesInstanceUID. ``info --series 3 --json`` gave that UID,
    and ``--series UID`` was then refused as "shared by 9 series"; it now gives the listed key (``UID#3``)."""
    folder = shared("data", "dicom", "qa-transfer-syntaxes", "In")
    assert main(["info", str(folder), "--series", "3", "--json"]) == EXIT_OK
    key = json.loads(capsys.readouterr().out)["series_uid"]
    assert key.endswith("#3"), key
    assert main(["info", str(folder), "--series", key, "--json"]) == EXIT_OK
    again = json.loads(capsys.readouterr().out)
    assert again["series_uid"] == key


def test_a_training_checkpoint_given_as_weights_is_named_as_one(mr, tmp_path, capsys):
    """``--weights run/best.ckpt`` was called "not a whole safetensors file (corrupt or truncated)"; and a fix
    quoting a path read ``--weights'x'``."""
    torch = pytest.importorskip("torch")
    ckpt = tmp_path / "best.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, ckpt)
    out = tmp_path / "f.nii.gz"
    assert main(["fuse", str(mr), str(mr), "-o", str(out), "--weights", str(ckpt), "-q"]) == EXIT_USAGE
    err = _err(capsys)
    assert "is a PyTorch (torch.save) file, such as a training checkpoint (best.ckpt)" in err and "corrupt" not in err
    assert "RUN/export/medfuse_fusion.safetensors" in err and "--init FILE --epochs 0 --steps-3d 0" in err
    assert "weights=" not in err
    assert not out.exists()
    torch.save({"model": {"w": torch.zeros(2)}}, ckpt, _use_new_zipfile_serialization=False)  # the older format
    assert main(["fuse", str(mr), str(mr), "-o", str(out), "--weights", str(ckpt), "-q"]) == EXIT_USAGE
    assert "is a PyTorch (torch.save) file" in _err(capsys)
    from medfuse.cli import _fusion_options

    assert _fusion_options("pass weights='a/b.safetensors' instead") == "pass --weights 'a/b.safetensors' instead"
    assert _fusion_options("weights= names a file") == "--weights names a file"


def test_batch_fixes_name_what_a_batch_user_can_do(tmp_path):
    """A batch row's fix said "pass overwrite=True" (an output another run wrote meanwhile) and
    "medfuse.batch.write_manifest(DATASET)"; subject folders differing in case were told to name outputs that
    dataset mode does not let them name."""
    from medfuse import batch
    from medfuse.errors import InvalidInputError, OutputExistsError
    from medfuse.io._atomic import _appeared

    row = batch._row_error_text(_appeared(tmp_path / "s.nii.gz"), [])
    assert "rerun with --overwrite (overwrite=True) to replace it" in row and "pass overwrite" not in row
    assert isinstance(_appeared(tmp_path / "s.nii.gz"), OutputExistsError)
    assert "'medfuse batch DATASET --write-manifest'" in batch._MANIFEST_FIX
    # The path as the row's output column quotes it, not "out/../elsewhere/s.nii.gz".
    from medfuse.errors import OutputWriteError

    odd = tmp_path / "out" / ".." / "elsewhere" / "s.nii.gz"
    row = batch._row_error_text(OutputWriteError("cannot write the output", fix="x", path=odd), [])
    assert row.startswith(f"{tmp_path / 'elsewhere' / 's.nii.gz'}: cannot write the output")
    pytest.importorskip("SimpleITK")
    from medfuse.batch import Subject, run_batch

    folders = []
    for name in ("Sub-A", "sub-a"):
        (tmp_path / "ds" / name).mkdir(parents=True)
        folders.append(tmp_path / "ds" / name)
    subjects = [Subject(subject=f.name, fixed="", moving=[], output=str(tmp_path / "out" / f"{f.name}.nii.gz"),
                        folder=str(f)) for f in folders]
    with pytest.raises(InvalidInputError, match="differ only in letter case") as ei:
        run_batch(subjects, scheduler="synchronous", report=tmp_path / "r.csv", progress=False)
    assert "rename one of the two subject folders" in ei.value.fix and "--write-manifest" in ei.value.fix


def test_evaluate_pairs_on_two_grids_fail_once_each_with_a_command_line_fix(mr, tmp_path, capsys):
    """Each failing pair was listed once per method, with a fix in Python (medfuse.register(...).resampled)."""
    shutil.copy(SAMPLES / "spect.nii.gz", tmp_path / "spect.nii.gz")
    code = main(["evaluate", "--pair", str(mr), str(tmp_path / "spect.nii.gz"), "--pair", str(tmp_path / "spect.nii.gz"),
                 str(mr), "--methods", "mean,max", "--out", str(tmp_path / "ev"), "-q", "--no-progress"])
    assert code != EXIT_OK
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(lines) == 2 and all(line.startswith("  mean, max: ") for line in lines), err
    assert "medfuse register FIRST SECOND -o SECOND_on_FIRST.nii.gz" in err and "medfuse.register(" not in err


def test_register_speaks_command_line_and_shows_reader_warnings_as_one_line(mr, tmp_path, capsys):
    """The NaN fix named numpy calls, --transform onto the --initial-transform file was called "the volume's own
    source file", the ending list left out .mat, and a reader's warning came as Python's two-line
    "bin/medfuse:6: MedfuseWarning ... sys.exit(main())"."""
    import nibabel as nib
    import numpy as np

    img = nib.load(mr)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[0, 0, 0] = np.nan
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), nan)
    out = tmp_path / "r.nii.gz"
    assert main(["register", str(mr), str(nan), "-o", str(out), "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "medfuse: warning: " in err and "NaN or infinite when loaded; they were kept" in err
    assert "MedfuseWarning" not in err
    assert "python -c \"import medfuse, numpy" in err and "for a Volume v.with_array" not in err
    from medfuse.registration import Transform

    init = Transform.from_matrix(np.eye(4)).save(tmp_path / "init.tfm")
    assert main(["register", str(mr), str(mr), "-o", str(out), "--initial-transform", str(init), "--transform",
                 str(init), "-q"]) == EXIT_USAGE
    err = _err(capsys)
    assert "onto the --initial-transform file, an input" in err and "source" not in err
    assert main(["register", str(mr), str(mr), "-o", str(out), "--transform", str(tmp_path / "t.nii.gz"),
                 "-q"]) == EXIT_USAGE
    assert "use .tfm, .txt, .h5 or .mat" in _err(capsys)
    from medfuse.cli import _cli_words

    assert "medfuse.load_transform('T.tfm').inverse().save('T_inverse.tfm')" in _cli_words(
        "it must map fixed points to moving points (ITK convention); a moving -> fixed transform needs .inverse() "
        "first")


def test_register_fixes_for_thin_complex_and_masked_cases_name_command_line_steps(mr, tmp_path, capsys):
    """whole_series=True, medfuse.resample(moving, fixed), v.with_array(numpy.abs(...)) and masks= are Python;
    a 2-D transform file was refused without its name."""
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk

    from medfuse.cli import _cli_error
    from medfuse.errors import RegistrationError, UnreadableFileError
    from medfuse.registration import load_transform
    from medfuse.registration.register import _raise_sitk_failure

    img = nib.load(mr)
    thin = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32)[:, :, :3], img.affine), thin)
    out = tmp_path / "r.nii.gz"
    assert main(["register", str(mr), str(thin), "-o", str(out), "-q"]) == EXIT_USAGE
    err = _err(capsys)
    assert "pass the series folder" in err and "medfuse fuse FIXED MOVING --register none" in err
    assert "whole_series" not in err and "medfuse.resample" not in err
    cplx = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32).astype(np.complex64), img.affine), cplx)
    assert main(["register", str(mr), str(cplx), "-o", str(out), "-q"]) == EXIT_USAGE
    assert "numpy.abs(v.array)), 'OUT.nii.gz')\"" in _err(capsys)
    with pytest.raises(RegistrationError) as ei:
        _raise_sitk_failure(RuntimeError("All samples map outside moving image buffer"))
    assert "the Python API's medfuse.register(..., fixed_mask=, moving_mask=)" in _cli_error(ei.value).fix
    flat = tmp_path / "e2d.tfm"
    sitk.WriteTransform(sitk.Euler2DTransform(), str(flat))
    with pytest.raises(UnreadableFileError, match=r"e2d.tfm: the file holds a 2-D transform"):
        load_transform(flat)
