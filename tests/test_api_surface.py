"""The public Python API as a researcher meets it in a notebook: names, ``dir()``, ``help()`` and bad input.

Checked for medfuse's own top-level names and for the ``__all__`` of ``medfuse.volume``, ``medfuse.metrics``,
``medfuse.transforms``, ``medfuse.display``, ``medfuse.errors``, ``medfuse.evaluate``, ``medfuse.provenance`` and
``medfuse.measure``,
of the I/O face and the sample-data helpers (``medfuse.io`` and its readers and writers, ``medfuse.phantom``,
``medfuse.harvard``; their wrong-type tests are in ``tests/io/test_io_api.py``), and, for the docstrings and
keyword-only options, of registration, fusion, the pipeline and batch processing (their bad-input tests are in
``tests/registration``, ``tests/fusion`` and ``tests/pipeline``):

* every name exists and has a Google-style docstring whose ``Args`` name exactly the signature's parameters
  (``inspect.signature`` is the reference), with ``Returns`` and ``Raises`` sections;
* options (parameters with a default) are keyword-only;
* a wrong type (a path where a Volume is wanted, a list, None, a tensor, a 4-D array, an int) raises a
  :class:`medfuse.MedfuseError` with a fix, not a library's TypeError or AttributeError.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import medfuse
from medfuse import Volume
from medfuse.errors import MedfuseError

MODULES = ("medfuse.volume", "medfuse.metrics", "medfuse.transforms", "medfuse.display", "medfuse.errors",
           "medfuse.evaluate", "medfuse.provenance", "medfuse.measure")

#: The loaders and writers, and the sample-data helpers.
IO_MODULES = ("medfuse.io", "medfuse.io.nifti", "medfuse.io.dicom", "medfuse.io.suv", "medfuse.io.writers",
              "medfuse.io.dicom_writer", "medfuse.phantom", "medfuse.harvard")

#: Registration, fusion, the pipeline and batch processing: docstrings and keyword-only options.
CORE_MODULES = ("medfuse.registration.register", "medfuse.registration.resample", "medfuse.registration.transforms",
                "medfuse.registration.presets", "medfuse.fusion", "medfuse.fusion.classical", "medfuse.fusion.infer",
                "medfuse.fusion.normalise", "medfuse.fusion.network", "medfuse.pipeline", "medfuse.batch")

#: Top-level names checked by neither list.
ELSEWHERE: set = set()

#: Functions that raise nothing on any argument, so a ``Raises`` section would be empty.
RAISES_NOTHING = {"Volume.bounds", "Volume.add_history", "medfuse.display.DisplaySettings",
                  "medfuse.display.SlicePanel", "medfuse.provenance.versions",
                  "medfuse.provenance.scrub", "medfuse.evaluate.EvaluationResult",
                  "medfuse.evaluate.add_arguments", "medfuse.io.dicom.SeriesInfo", "medfuse.phantom.Phantom",
                  "medfuse.harvard.HarvardPair", "medfuse.registration.register.RegistrationResult",
                  "medfuse.registration.register.RegistrationReport", "medfuse.registration.presets.preset_for",
                  "medfuse.pipeline.PipelineState", "medfuse.pipeline.PipelineResult", "medfuse.batch.Subject",
                  "medfuse.batch.SubjectResult", "medfuse.batch.BatchSummary", "medfuse.fusion.normalise.auto_method",
                  "medfuse.fusion.network.decompose"}

#: Parameters with a default that are data, not options (a point to centre the views on).
POSITIONAL_DEFAULTS = {("medfuse.display.orthogonal_slices", "center_world"),
                       ("medfuse.display.orthogonal_snapshot", "center_world"),
                       ("medfuse.errors.CancelledError", "problem"),  # the message, as Exception's
                       # Data with a default: which samples folder, which command line.
                       ("medfuse.phantom.load_samples", "folder"), ("medfuse.phantom.load_ground_truth", "folder"),
                       ("medfuse.phantom.main", "argv"),
                       # The second image of a fusion; which weights file (a path is data).
                       ("medfuse.fusion.fuse", "b"), ("medfuse.fusion.infer.load_model", "weights"),
                       ("medfuse.fusion.infer.weights_sha256", "weights"),
                       # A preset's name with the modalities it is chosen from; a modality's unit.
                       ("medfuse.registration.presets.get_preset", "fixed_modality"),
                       ("medfuse.registration.presets.get_preset", "moving_modality"),
                       ("medfuse.fusion.normalise.auto_method", "unit"),
                       # A step's one choice, as Pipeline().replace("fuse", FuseStep("mean")) reads; where a
                       # manifest goes.
                       ("medfuse.pipeline.RegisterStep", "kind"), ("medfuse.pipeline.FuseStep", "method"),
                       ("medfuse.batch.write_manifest", "path")}


def _public_callables():
    """``(qualified name, object)`` for every callable in scope, Volume's public methods included."""
    out = []
    for mod_name in MODULES + IO_MODULES + CORE_MODULES:
        mod = importlib.import_module(mod_name)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if callable(obj) and getattr(obj, "__module__", mod_name) == mod_name:
                out.append((f"{mod_name}.{name}", obj))
    for name, attr in vars(Volume).items():
        fn = attr.__func__ if isinstance(attr, (classmethod, staticmethod)) else attr
        if not name.startswith("_") and inspect.isfunction(fn):
            out.append((f"Volume.{name}", fn))
    return out


CALLABLES = _public_callables()


def test_top_level_names_are_covered_here_or_listed_as_elsewhere():
    """A name added to ``medfuse.__all__`` is either checked by this file or named as another module's."""
    covered = {id(obj) for _, obj in CALLABLES}
    for name in medfuse.__all__:
        obj = getattr(medfuse, name)
        if callable(obj) and name not in ELSEWHERE:
            assert id(obj) in covered, f"medfuse.{name} is checked nowhere: add its module to MODULES"


def _documented_args(doc: str):
    """Names in the docstring's ``Args:`` (or, for dataclasses, ``Attributes:``) section, or None."""
    m = re.search(r"^(Args|Attributes):\s*\n(.*?)(?=^\S|\Z)", doc, re.M | re.S)
    if m is None:
        return None
    lines = [ln for ln in m.group(2).splitlines() if ln.strip()]
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines)
    names = []
    for ln in lines:
        if len(ln) - len(ln.lstrip()) == indent:
            head = re.match(r"\s*([\w*, ]+?)\s*(\([^)]*\))?:", ln)
            assert head, f"cannot read the Args entry {ln.strip()!r}"
            names += [n.strip().lstrip("*") for n in head.group(1).split(",")]
    return names


def _params(obj):
    target = obj
    sig = inspect.signature(target)
    return [p for p in sig.parameters.values() if p.name not in ("self", "cls")], sig


def _own_init(obj) -> bool:
    """A class whose parameters its docstring must document (exceptions inheriting __init__ do not)."""
    if not issubclass(obj, BaseException):
        return True
    return "__init__" in vars(obj)


@pytest.mark.parametrize("name, obj", CALLABLES, ids=[n for n, _ in CALLABLES])
def test_docstring_documents_the_signature(name, obj):
    doc = inspect.getdoc(obj)
    assert doc, f"{name} has no docstring"
    if inspect.isclass(obj) and not _own_init(obj):
        return
    params, sig = _params(obj)
    if not params:
        return
    documented = _documented_args(doc)
    assert documented is not None, f"{name}: no Args section for {[p.name for p in params]}"
    assert sorted(documented) == sorted(p.name for p in params), (
        f"{name}: the docstring documents {documented}, the signature has {[p.name for p in params]}")
    if not inspect.isclass(obj) and sig.return_annotation not in (None, "None", inspect.Signature.empty):
        assert re.search(r"^Returns:", doc, re.M), f"{name}: no Returns section"
    if name not in RAISES_NOTHING and not (inspect.isclass(obj) and issubclass(obj, BaseException)):
        assert re.search(r"^Raises:", doc, re.M), f"{name}: no Raises section"


@pytest.mark.parametrize("name, obj", CALLABLES, ids=[n for n, _ in CALLABLES])
def test_options_are_keyword_only(name, obj):
    if inspect.isclass(obj) and (dataclasses.is_dataclass(obj) and obj is not Volume or not _own_init(obj)):
        return  # a record's fields, or an exception's inherited message argument
    params, _ = _params(obj)
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty
                  and (name, p.name) not in POSITIONAL_DEFAULTS]
    assert not positional, f"{name}: options {positional} can be given by position; make them keyword-only"


def test_the_namespace_as_a_notebook_sees_it():
    """Run in a fresh interpreter: what ``import medfuse`` alone gives (earlier tests import submodules)."""
    code = """
import json, sys, medfuse
out = {"dir": dir(medfuse), "all_ok": [n for n in medfuse.__all__ if not hasattr(medfuse, n)],
       "heavy_after_star": None}
ns = {}
exec("from medfuse import *", ns)
out["star_has_errors"] = "InvalidInputError" in ns and "GeometryError" in ns
out["heavy_after_star"] = sorted(m for m in ("torch", "monai") if m in sys.modules)
out["transforms"] = medfuse.transforms.LoadVolumed.__name__
try:
    medfuse.lod
except AttributeError as e:
    out["typo"] = [e.name, e.obj is medfuse]
print(json.dumps(out))
"""
    got = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                    text=True).stdout.splitlines()[-1])
    assert got["all_ok"] == []
    # Tab completion: the public names, not this module's helpers (importlib, typing.Any, __future__).
    assert not {"importlib", "Any", "annotations", "_LAZY"} & set(got["dir"])
    assert {"Volume", "fuse", "metrics", "transforms", "InvalidInputError", "errors"} <= set(got["dir"])
    assert got["star_has_errors"] and got["heavy_after_star"] == []
    assert got["transforms"] == "LoadVolumed"
    assert got["typo"] == ["lod", True]  # what Python's "Did you mean: 'load'?" is built from


def test_version_is_the_packaged_one():
    """``medfuse.__version__`` (what a notebook prints, and the provenance sidecars record) is pyproject's."""
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text("utf-8"))
    assert medfuse.__version__ == project["project"]["version"]


def test_help_and_dir_work_without_the_optional_packages():
    """``medfuse.transforms`` is reachable as an attribute; without MONAI it says what to install, and
    ``help(medfuse)`` (which reads every name ``dir`` lists) still works instead of raising on it."""
    code = """
import json, pydoc, sys
sys.modules["monai"] = None  # as if MONAI were not installed: importing it raises ImportError
import medfuse
out = {"in_dir": "transforms" in dir(medfuse), "help": len(pydoc.render_doc(medfuse))}
try:
    medfuse.transforms
except Exception as e:
    out["error"] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""
    got = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                    text=True).stdout.splitlines()[-1])
    assert got["in_dir"] is False and got["help"] > 1000
    assert got["error"][0] == "MissingDependencyError" and "pip install 'medfuse[ml]'" in got["error"][1]


# ------------------------------------------------------------------------------------------------ wrong types
def _vol() -> Volume:
    return Volume(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4), modality="MR")


def _bad_values():
    torch = pytest.importorskip("torch")
    return {"path": "sample_volumes/mr_t1.nii.gz", "list": [1, 2, 3], "None": None,
            "tensor": torch.zeros(16, 16, 16), "4d": np.zeros((2, 16, 16, 16)), "int": 5}


def _calls():
    import medfuse.display as D
    import medfuse.measure as MS
    import medfuse.metrics as M

    v = _vol()
    img = v.array[:, :, 8]
    return {
        "measure.value_at(x, point)": lambda x: MS.value_at(x, (0, 0, 0)),
        "measure.value_at(vol, x)": lambda x: MS.value_at(v, x) if not isinstance(x, list) else MS.value_at(v, [1]),
        "measure.mask_statistics(vol, x)": lambda x: MS.mask_statistics(v, x),
        "fuse(x, vol)": lambda x: medfuse.fuse(x, v, method="max"),
        "fuse(vol, x)": lambda x: medfuse.fuse(v, x, method="max"),
        "Volume(x, eye)": lambda x: Volume(x, np.eye(4)) if not hasattr(x, "detach") else Volume(x[None], np.eye(4)),
        "Volume(a, x)": lambda x: Volume(v.array, x),
        "vol.same_grid(x)": lambda x: v.same_grid(x),
        "vol.grid_difference(x)": lambda x: v.grid_difference(x),
        "vol.max_voxel_distance(x)": lambda x: v.max_voxel_distance(x),
        "vol.with_array(x)": lambda x: v.with_array(x) if not hasattr(x, "detach") else v.with_array(v),
        "vol.reorient(x)": lambda x: v.reorient(x),
        "vol.index_to_world(x)": lambda x: v.index_to_world(x) if not isinstance(x, list) else v.index_to_world("x"),
        "Volume.from_metatensor(x)": lambda x: Volume.from_metatensor(x),
        "Volume.from_nibabel(x)": lambda x: Volume.from_nibabel(x),
        "Volume.from_sitk(x)": lambda x: Volume.from_sitk(x),
        "metrics.score(x, a, b)": lambda x: M.score(x, img, img) if not hasattr(x, "detach") else M.score(v, img, img),
        "metrics.en(x)": lambda x: M.en(x) if isinstance(x, (str, type(None), int)) else M.en(v),
        "metrics.anisotropy(a, x)": lambda x: M.anisotropy(v.array, x) if not isinstance(x, (list, np.ndarray))
        else M.anisotropy(v.array, x[:1]),
        "display.display_settings(x)": lambda x: D.display_settings(x),
        "display.orthogonal_slices(x)": lambda x: D.orthogonal_slices(x),
        "display.percentile_limits(x)": lambda x: D.percentile_limits(x) if isinstance(x, (str, type(None), int))
        else D.percentile_limits(np.full((4, 4), np.nan)),
        "display.slider_range(x, lims)": lambda x: D.slider_range(x, (0, 1)) if isinstance(x, (str, type(None), int))
        else D.slider_range(v, (0, x)),
        "display.window_to_limits(x, 40)": lambda x: D.window_to_limits(x, 40) if not isinstance(x, int)
        else D.window_to_limits(-x, 40),
        "display.checkerboard_mask(x)": lambda x: D.checkerboard_mask(x) if not isinstance(x, list)
        else D.checkerboard_mask([16]),
        "display.curtain_mask(x)": lambda x: D.curtain_mask(x) if not isinstance(x, list) else D.curtain_mask([0]),
    }


@pytest.mark.parametrize("call", list(_calls()))
def test_a_wrong_type_gets_a_medfuse_error_with_a_fix(call):
    """Each call meets each wrong value; where a value is legitimately accepted (a list of indices, a tensor of
    voxels) the lambda swaps in a nearby wrong one. Before: TypeError, AttributeError or a silent result."""
    fn = _calls()[call]
    for label, bad in _bad_values().items():
        with pytest.raises(MedfuseError) as info:
            fn(bad)
        assert info.value.fix, f"{call} with a {label}: no fix in {info.value}"


# ------------------------------------------------------------------------------------------------ transforms
def test_transforms_return_the_type_and_layout_they_were_given():
    """TorchIO's rule for MONAI pipelines: a Volume comes back a Volume, a MetaTensor a MetaTensor of the same
    channel layout, a dict a dict with the other keys untouched; a bare array (no geometry) is refused."""
    pytest.importorskip("monai")
    from monai.data import MetaTensor

    from medfuse.transforms import FuseModalities, RegisterToReference, RegisterToReferenced

    ref = _vol()
    moving = Volume(ref.array[::-1].copy(), np.diag([1.1, 1.0, 1.0, 1.0]), modality="PT", unit="SUVbw")
    reg = RegisterToReference(kind=None)  # resampling only: the type rule, not registration, is under test
    out = reg(moving, ref)
    assert type(out) is Volume and out.same_grid(ref) and out.unit == "SUVbw"
    for layout in (moving.to_metatensor(), moving.to_metatensor()[0]):
        got = reg(layout, ref)
        assert isinstance(got, MetaTensor) and tuple(got.shape) == (1,) * (layout.ndim - 3) + ref.shape
        np.testing.assert_allclose(Volume.from_metatensor(got).affine, ref.affine, atol=1e-9)
    with pytest.raises(MedfuseError, match="not a medfuse Volume or MONAI MetaTensor"):
        reg(moving.array, ref)
    data = {"mr": ref, "pet": moving.to_metatensor(), "label": 3}
    d = RegisterToReferenced(keys=["pet"], reference_key="mr", kind=None)(data)
    assert type(d) is dict and d["label"] == 3 and d["mr"] is ref and isinstance(d["pet"], MetaTensor)
    assert type(FuseModalities(method="max", as_tensor=False)([ref, out])) is Volume
    assert isinstance(FuseModalities(method="max")([ref, out]), MetaTensor)  # as_tensor=True: for a network


def _option_calls():
    import medfuse.display as D
    import medfuse.evaluate as E
    import medfuse.metrics as M
    import medfuse.provenance as P

    v = _vol()
    a = np.round(v.array * 255)
    out = "/nonexistent-medfuse-test/eval"  # never created: every call below fails before writing
    return {
        "score(metrics=5)": (lambda: M.score(a, a, a, mode="native", metrics=5), "metrics must be metric names"),
        "score(min_content='a')": (lambda: M.score(a, a, a, mode="slicewise", min_content="a"),
                                   "min_content must be a fraction from 0 to 1"),
        "sampled_slice_scores(min_fraction=None)": (lambda: M.sampled_slice_scores(v, v, v, min_fraction=None),
                                                    "min_fraction must be a fraction"),
        "percentile_limits(low='a')": (lambda: D.percentile_limits(a, low="a"), "low must be a number"),
        "percentile_limits(max_samples=0.5)": (lambda: D.percentile_limits(a, max_samples=0.5),
                                               "max_samples must be a whole number"),
        "orthogonal_slices(mm_per_pixel='a')": (lambda: D.orthogonal_slices(v, mm_per_pixel="a"),
                                                "mm_per_pixel must be a number"),
        "orthogonal_snapshot(limits=5)": (lambda: D.orthogonal_snapshot(v, limits=5), "limits must be two numbers"),
        "orthogonal_snapshot(gap='a')": (lambda: D.orthogonal_snapshot(v, gap="a"), "gap must be a whole number"),
        "evaluate(None)": (lambda: E.evaluate(None, out_dir=out), "evaluate takes a folder or a list of pairs"),
        "evaluate(vol)": (lambda: E.evaluate(v, out_dir=out), "evaluate takes a folder or a list of pairs"),
        "evaluate(methods=5)": (lambda: E.evaluate([(v, v)], methods=5, out_dir=out), "methods must be method"),
        "evaluate(out_dir=None)": (lambda: E.evaluate([(v, v)], out_dir=None), "out_dir must be a folder path"),
        "format_table(None)": (lambda: E.format_table(None), "format_table takes the means"),
        "sidecar_path(None)": (lambda: P.sidecar_path(None), "the output must be a file path"),
        "hash_path(5)": (lambda: P.hash_path(5), "must be a file path"),
        "is_up_to_date(None)": (lambda: P.is_up_to_date(None, input_paths=[]), "the output must be a file path"),
        "is_up_to_date(input_paths='a.nii')": (lambda: P.is_up_to_date("out.nii", input_paths="a.nii"),
                                               "input_paths takes a list of paths"),
        "patient_identifiers('a.dcm')": (lambda: P.patient_identifiers("a.dcm"), "takes a list of paths"),
        "build(inputs=None)": (lambda: P.build(inputs=None), "inputs must be a list of dicts"),
    }


@pytest.mark.parametrize("call", list(_option_calls()))
def test_an_option_of_the_wrong_type_is_named(call):
    """Before: "'int' object is not iterable", "'<=' not supported between 'int' and 'str'", "cannot unpack
    non-iterable int object", "expected str, bytes or os.PathLike object, not NoneType", or (a str of paths)
    a silent result built character by character."""
    fn, message = _option_calls()[call]
    with pytest.raises(MedfuseError, match=message) as info:
        fn()
    assert info.value.fix


def test_transform_options_are_checked_when_the_transform_is_built():
    """MONAI checks a transform's options in its constructor: a bad ``threads`` failed only on the first item,
    inside a DataLoader worker, with "invalid literal for int() with base 10"."""
    pytest.importorskip("monai")
    from medfuse.transforms import RegisterToReference, RegisterToReferenced

    for threads in ("a", 0, 1.5, True):
        with pytest.raises(MedfuseError, match="threads must be a whole number"):
            RegisterToReference(kind=None, threads=threads)
        with pytest.raises(MedfuseError, match="threads must be a whole number"):
            RegisterToReferenced(keys=["pet"], reference_key="mr", threads=threads)
    assert RegisterToReference(kind=None, threads=np.int64(2)).threads == 2


def test_metric_ranges_in_the_docstrings_hold():
    """The ranges ``help()`` gives (EN 0..8 bits, CC -1..1, Qabf and FMI 0..1, SSIM up to 1 a source) on
    images chosen to push them: noise, an inverted source, a copy, a flat image beside a structured one."""
    import medfuse.metrics as M

    rng = np.random.default_rng(11)
    noise = rng.integers(0, 256, (48, 48)).astype(float)
    ramp = np.tile(np.linspace(0, 255, 48).round(), (48, 1))
    flat = np.full((48, 48), 7.0)
    cases = [(noise, noise, 255 - noise), (ramp, ramp, ramp), (noise, ramp, ramp.T), (flat, ramp, noise)]
    for f, a, b in cases:
        assert 0.0 <= M.en(f) <= 8.0
        assert -1.0 - 1e-12 <= M.cc(f, a, b) <= 1.0 + 1e-12
        for q in (M.qabf(f, a, b), M.fmi(f, a, b)):
            assert np.isnan(q) or 0.0 <= q <= 1.0 + 1e-12
        assert M.ssim(f, a, b) <= 2.0 + 1e-12


def test_wrong_values_in_less_used_corners_are_typed_errors():
    """Found by a probe of the public API: a bare KeyError, 'truth value of an array is ambiguous' and an
    AttributeError from deep inside, where a typed error with a fix belongs."""
    import numpy as np

    from medfuse.errors import InvalidInputError
    from medfuse.evaluate import format_table
    from medfuse.metrics import score
    from medfuse.pipeline import Pipeline

    with pytest.raises(InvalidInputError, match="no step 'x'.*load"):
        Pipeline().step("x")
    img = np.random.default_rng(0).random((16, 16))
    with pytest.raises(InvalidInputError, match="mode must be a string"):
        score(img, img, img, mode=np.array(["2d"]))
    with pytest.raises(InvalidInputError, match="result.means"):
        format_table({"a": 1})


def test_a_method_name_passed_as_a_third_image_says_method_is_keyword_only():
    import numpy as np

    import medfuse
    from medfuse.errors import InvalidInputError

    img = np.random.default_rng(0).random((16, 16))
    with pytest.raises(InvalidInputError, match=r"method name 'mean'.*method='mean'"):
        medfuse.fuse(img, img, "mean")


def test_a_volume_made_before_a_reload_is_named_so():
    """After importlib.reload(medfuse.volume) in a notebook, save() said "expected a medfuse Volume, got Volume"."""
    code = """
import importlib, json, numpy as np, medfuse, medfuse.volume
v = medfuse.Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
importlib.reload(medfuse.volume)
importlib.reload(medfuse)
try:
    medfuse.save(v, "never-written.nii.gz")
except medfuse.errors.MedfuseError as e:
    print(json.dumps(str(e)))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "made before medfuse was reloaded" in json.loads(out.splitlines()[-1])
