"""Wrong argument types to the pipeline and batch entry points get a typed medfuse error with a fix.

Before: ``Pipeline().run(None)`` raised Python's "has no len()", ``Pipeline(method="maxx")`` was accepted and failed
only at the fuse step (after loading and registration), and the batch functions raised pathlib's "expected str,
bytes or os.PathLike object", ``os.scandir``'s NotADirectoryError or "dictionary update sequence". Messages
describe a wrong value by its type and never repeat a str argument (it may be a patient's path).
"""

from __future__ import annotations

import numpy as np
import pytest

from medfuse import Volume
from medfuse.batch import discover, discover_subject, read_manifest, run_batch, write_manifest
from medfuse.errors import InvalidInputError, MedfuseError, OutputExistsError, UnreadableFileError
from medfuse.pipeline import FuseStep, NormaliseStep, Pipeline, fuse_files

torch = pytest.importorskip("torch")

PATIENT = "/data/DOE^JOHN/scan.nii"


def _vol() -> Volume:
    return Volume(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4), modality="MR")


def _not_paths():
    """Wrong values where a path (or a list of images) is wanted, each with its label."""
    return {"list": [1, 2, 3], "None": None, "tensor": torch.zeros(16, 16, 16), "4d": np.zeros((2, 16, 16, 16)),
            "int": 5}


def _file(tmp_path):
    f = tmp_path / "scan.nii"
    f.write_bytes(b"not an image")
    return f


def _dataset(tmp_path):
    """A dataset folder with one (unpaired) subject folder, so that discovery gets past "no subjects"."""
    root = tmp_path / "dataset"
    (root / "sub-01").mkdir(parents=True)
    return root


def _raises(kind, fn, *args, **kwargs) -> MedfuseError:
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    err = info.value
    assert isinstance(err, MedfuseError)
    assert err.fix, f"no fix in {err}"
    assert "DOE^JOHN" not in str(err) and "DOE^JOHN" not in err.fix
    return err


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.mark.parametrize("label", ["None", "int", "tensor", "4d"])
def test_pipeline_run_refuses_inputs_that_are_no_list_of_images(label):
    bad = _not_paths()[label]
    err = _raises(InvalidInputError, Pipeline(method="max").run, bad)
    assert "inputs must be a list" in str(err)


def test_pipeline_run_refuses_items_that_are_no_images():
    v = _vol()
    for bad in ([1, 2, 3], [v, None], [v, 5], [v, np.zeros((2, 16, 16, 16))], [v, torch.zeros(16, 16, 16)]):
        _raises(InvalidInputError, Pipeline(method="max").run, bad)
    err = _raises(InvalidInputError, Pipeline(method="max").run, PATIENT)
    assert "got 1" in str(err)


def test_pipeline_run_takes_a_tuple_and_a_generator_of_volumes():
    v = _vol()
    assert Pipeline(method="max").run((v, v)).fused.shape == v.shape
    assert Pipeline(method="max").run(x for x in (v, v)).fused.shape == v.shape


@pytest.mark.parametrize("label", ["path", "typo", "list", "None", "tensor", "4d", "int"])
def test_pipeline_refuses_an_unknown_fusion_method_when_built(label):
    bad = {"path": PATIENT, "typo": "lapalcian", **_not_paths()}[label]
    err = _raises(InvalidInputError, Pipeline, method=bad)
    assert "unknown fusion method" in str(err) and "laplacian" in err.fix
    _raises(InvalidInputError, FuseStep, bad)


@pytest.mark.parametrize("label", ["path", "network", "list", "tensor", "4d", "int"])
def test_pipeline_refuses_a_fallback_that_is_no_classical_method_when_built(label):
    bad = {"path": PATIENT, "network": "network", **_not_paths()}[label]
    err = _raises(InvalidInputError, Pipeline, method="network", fallback=bad)
    assert "fallback" in str(err)


def test_pipeline_still_takes_every_known_method_in_any_case():
    for m in ("network", "mean", "max", "laplacian", "wavelet", "gff", "MAX", "Laplacian"):
        # Recorded lower-cased: one method is one parameter set for batch re-runs, whatever its spelling.
        assert Pipeline(method=m).step("fuse").params["method"] == m.lower()
    assert Pipeline(method="network", fallback="Mean").step("fuse").params["fallback"] == "mean"


@pytest.mark.parametrize("option", ["register", "grid", "normalise"])
def test_pipeline_choices_refuse_arrays_and_do_not_echo_text(option):
    for bad in (PATIENT, np.zeros((2, 16, 16, 16)), torch.zeros(16, 16, 16), [1, 2, 3], 5):
        err = _raises(InvalidInputError, Pipeline, **{option: bad})
        assert "unknown" in str(err)


@pytest.mark.parametrize("option", ["modalities", "series"])
def test_pipeline_per_input_options_must_be_lists(option):
    for bad in ("MR", 5, np.array(["MR", "PT"]), torch.zeros(2), {"a": 1}):
        err = _raises(InvalidInputError, Pipeline, **{option: bad})
        assert "one entry per input" in str(err)
    assert Pipeline(**{option: ("MR", "PT") if option == "modalities" else ("-", "-")})


def test_pipeline_steps_and_threads_are_checked():
    for bad in (PATIENT, [1, 2, 3], 5, np.zeros(3)):
        _raises(InvalidInputError, Pipeline, steps=bad)
    for bad in (PATIENT, [1, 2, 3], 1.5, True, 0):
        _raises(InvalidInputError, Pipeline, threads=bad)
    assert Pipeline(threads=1).step("register").params["threads"] == 1
    # A step name (the caller's code) is shown; text that may be a path or a name is not.
    assert "'denoise'" in str(_raises(InvalidInputError, Pipeline, steps={"denoise": lambda s: s}))
    _raises(InvalidInputError, Pipeline, steps={PATIENT: lambda s: s})


def test_fuse_files_refuses_an_empty_moving_list_naming_moving():
    err = _raises(InvalidInputError, fuse_files, _vol(), [], None, method="max")
    assert "moving is an empty list" in str(err)


# ------------------------------------------------------------------------------------------------ fuse_files
@pytest.mark.parametrize("label", ["list", "None", "tensor", "4d", "int"])
def test_fuse_files_refuses_wrong_inputs(label):
    bad = _not_paths()[label]
    v = _vol()
    _raises(InvalidInputError, fuse_files, bad, v, None, method="max")
    _raises(InvalidInputError, fuse_files, v, bad, None, method="max")


@pytest.mark.parametrize("label", ["list", "tensor", "4d", "int"])
def test_fuse_files_refuses_an_output_that_is_no_path(label):
    v = _vol()
    _raises(InvalidInputError, fuse_files, v, v, _not_paths()[label], method="max")


def test_fuse_files_refuses_an_unknown_method_before_loading(tmp_path):
    # The inputs do not exist: the method is refused first, without a word of the str given.
    missing = tmp_path / "nothing.nii.gz"
    err = _raises(InvalidInputError, fuse_files, missing, missing, None, method=PATIENT)
    assert "unknown fusion method" in str(err)
    _raises(InvalidInputError, fuse_files, missing, missing, None, method="max", fallback=PATIENT)


def test_fuse_files_refuses_an_existing_output(tmp_path):
    v = _vol()
    _raises(OutputExistsError, fuse_files, v, v, _file(tmp_path), method="max")


# ------------------------------------------------------------------------------------------------ batch
@pytest.mark.parametrize("label", ["list", "None", "tensor", "4d", "int"])
def test_read_manifest_refuses_a_non_path(label):
    err = _raises(InvalidInputError, read_manifest, _not_paths()[label])
    assert "manifest" in str(err)


@pytest.mark.parametrize("low, high", [("0.5", 99.5), (None, 99.5), (0.5, np.zeros(2)), (True, 99.5),
                                       (float("nan"), 99.5), (-1, 99.5), (0.5, 101), (99.5, 0.5), (5, 5)])
def test_normalise_step_percentiles_of_a_wrong_type_or_order(low, high):
    err = _raises(InvalidInputError, NormaliseStep, method="percentile", low=low, high=high)
    assert "percentile" in str(err)


def test_normalise_step_records_its_percentiles_as_floats():
    assert NormaliseStep(method="percentile", low=1, high=99).params == {"method": "percentile", "low": 1.0,
                                                                          "high": 99.0}


def test_a_manifest_register_cell_holding_a_path_is_not_echoed(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"subject,fixed,moving,output,register\nsub-01,a.nii.gz,b.nii.gz,o.nii.gz,{PATIENT}\n")
    err = _raises(InvalidInputError, read_manifest, manifest)
    assert "unknown register value (a str of" in str(err)
    manifest.write_text("subject,fixed,moving,output,register\nsub-01,a.nii.gz,b.nii.gz,o.nii.gz,rigd\n")
    assert "'rigd'" in str(_raises(InvalidInputError, read_manifest, manifest))


def test_read_manifest_refuses_a_folder(tmp_path):
    err = _raises(UnreadableFileError, read_manifest, tmp_path)
    assert "folder" in str(err)


@pytest.mark.parametrize("label", ["list", "None", "tensor", "4d", "int"])
def test_discover_refuses_a_non_path(label, tmp_path):
    bad = _not_paths()[label]
    _raises(InvalidInputError, discover, bad)
    _raises(InvalidInputError, discover_subject, bad)
    if bad is not None:
        _raises(InvalidInputError, discover, _dataset(tmp_path), out_dir=bad)


def test_discover_refuses_a_file_or_nothing_where_a_folder_is_wanted(tmp_path):
    f = _file(tmp_path)
    for fn in (discover, discover_subject, write_manifest):
        err = _raises(UnreadableFileError, fn, f)
        assert isinstance(err, OSError) and err.path == str(f)
        _raises(UnreadableFileError, fn, tmp_path / "missing")


@pytest.mark.parametrize("label", ["list", "None", "tensor", "4d", "int"])
def test_write_manifest_refuses_wrong_types(label, tmp_path):
    bad = _not_paths()[label]
    _raises(InvalidInputError, write_manifest, bad)
    if bad is not None:
        root = _dataset(tmp_path)
        _raises(InvalidInputError, write_manifest, root, bad)
        _raises(InvalidInputError, write_manifest, root, out_dir=bad)
        assert not (root / "derivatives").exists()


def test_write_manifest_still_writes_beside_the_dataset(tmp_path):
    root = _dataset(tmp_path)
    assert write_manifest(root).is_file()
    assert write_manifest(root, "", out_dir=tmp_path / "elsewhere").parent == tmp_path / "elsewhere"


@pytest.mark.parametrize("label", ["None", "tensor", "4d", "int"])
def test_run_batch_refuses_a_manifest_that_is_no_path_or_list(label, tmp_path):
    err = _raises(InvalidInputError, run_batch, _not_paths()[label], scheduler="synchronous",
                  report=tmp_path / "r.csv")
    assert "manifest" in str(err)
    assert not (tmp_path / "r.csv").exists()


def test_run_batch_refuses_a_list_of_non_subjects(tmp_path):
    for bad in ([1, 2, 3], [None], [PATIENT], [torch.zeros(3)], [np.zeros((2, 16, 16, 16))]):
        err = _raises(InvalidInputError, run_batch, bad, scheduler="synchronous", report=tmp_path / "r.csv")
        assert "run_batch takes a Subject" in str(err)
    assert not (tmp_path / "r.csv").exists()


def test_run_batch_checks_its_options_before_any_work(tmp_path):
    root = _dataset(tmp_path)
    report = tmp_path / "r.csv"
    for kw in ({"report": 5}, {"report": [1, 2, 3]}, {"out_dir": 5}, {"method": PATIENT}, {"method": None},
               {"fallback": PATIENT}, {"register": np.zeros(3)}, {"register": PATIENT}, {"scheduler": np.zeros(3)},
               {"scheduler": PATIENT}, {"threads_per_worker": PATIENT}, {"threads_per_worker": None},
               {"threads_per_worker": 0}, {"threads_per_worker": -2}):
        kw = {"scheduler": "synchronous", "report": report, **kw}
        _raises(InvalidInputError, run_batch, root, **kw)
    _raises(InvalidInputError, run_batch, root, scheduler="local", workers=np.zeros(3), report=report)
    assert not report.exists()


@pytest.mark.parametrize("suffix, text", [
    (".csv", "subject,fixed,moving,output,methd\nsub-01,a.nii.gz,b.nii.gz,o.nii.gz,max\n"),
    (".yaml", "defaults: {regster: rigid}\nsubjects:\n  - {subject: s1, fixed: a, moving: b, output: o.nii.gz}\n"),
    (".yaml", "- {subject: s1, fixed: a, moving: b, output: o.nii.gz, notes: first scan}\n"),
])
def test_a_manifest_column_medfuse_does_not_know_is_refused(tmp_path, suffix, text):
    """A misspelt column was ignored: the subject ran with the default method or registration, unsaid."""
    manifest = tmp_path / f"m{suffix}"
    manifest.write_text(text)
    err = _raises(InvalidInputError, read_manifest, manifest)
    assert "unknown column" in str(err)
    near = {"methd": "'method'", "regster": "'register'"}
    for typo, right in near.items():
        if typo in text:
            assert f"did you mean {right}" in str(err)


def test_a_manifest_with_every_known_column_and_moving2_is_read(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,fixed,moving,moving2,output,register,method,series\n"
                        "s1,a.nii.gz,b.nii.gz,c.nii.gz,o.nii.gz,rigid,max,-;-;-\n")
    (row,) = read_manifest(manifest)
    assert (row.register, row.method, len(row.moving), row.series) == ("rigid", "max", 2, ["-", "-", "-"])


def test_thread_and_worker_counts_beyond_any_machine_are_refused(tmp_path):
    """10**20 threads failed inside SWIG with an OverflowError (the CLI said "internal error")."""
    from medfuse.batch import cap_threads
    from medfuse.transforms import RegisterToReference

    huge = 10 ** 20
    for call in (lambda: Pipeline(register="rigid", threads=huge), lambda: cap_threads(huge),
                 lambda: cap_threads(1025), lambda: RegisterToReference(threads=huge)):
        err = _raises(InvalidInputError, call)
        assert "from 1 to 1024" in str(err)
    root = _dataset(tmp_path)
    for kw in ({"threads_per_worker": huge}, {"scheduler": "local", "workers": huge}):
        _raises(InvalidInputError, run_batch, root, report=tmp_path / "r.csv", **{"scheduler": "synchronous", **kw})
    assert not (tmp_path / "r.csv").exists()
    Pipeline(register="rigid", threads=1024)  # the most is still allowed
