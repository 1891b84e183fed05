"""The public API's typing contract: what mypy/pyright see is what runs.

Found by a new user's probe: the flat API (``medfuse.load``, ``fuse``, ``Transform``...) was ``Any`` to type
checkers, which cannot see through the lazy ``__getattr__``; ``fuse`` and ``normalise`` were annotated (or
inferred) as returning arrays where a Volume comes back; ``medfuse.batch``/``progress``/``pipeline``/``provenance``
raised AttributeError after a bare ``import medfuse``; ``help(medfuse.fuse)`` showed ``b=<object object at 0x...>``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError
from medfuse.volume import Volume

INIT = Path(medfuse.__file__)


def _type_checking_imports() -> dict:
    """``{name: "module:attribute"}`` (``"module"`` for a module) from the ``if TYPE_CHECKING:`` block of
    medfuse/__init__.py, in _LAZY's notation."""
    tree = ast.parse(INIT.read_text("utf-8"))
    blocks = [node for node in tree.body if isinstance(node, ast.If)
              and isinstance(node.test, ast.Name) and node.test.id in ("TYPE_CHECKING", "_TYPE_CHECKING")]
    assert len(blocks) == 1, "medfuse/__init__.py has no (or more than one) module-level `if TYPE_CHECKING:` block"
    found = {}
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            # `import X as X`: what mypy and pyright take as an explicit re-export.
            assert alias.asname == alias.name, f"re-export {alias.name} as itself (`{alias.name} as {alias.name}`)"
            if node.module is None:  # from . import metrics
                found[alias.name] = f"medfuse.{alias.name}"
            else:  # from .io import load
                found[alias.name] = f"medfuse.{node.module}:{alias.name}"
    return found


def test_the_type_checking_block_matches_the_lazy_table():
    assert _type_checking_imports() == medfuse._LAZY


def test_each_type_checking_name_is_the_run_time_object():
    for name, target in _type_checking_imports().items():
        needs = medfuse._OPTIONAL.get(name, ())
        if not all(medfuse._installed(pkg) for pkg in needs):
            continue  # medfuse.transforms without MONAI: an error that says what to install (test_api_surface)
        mod_name, _, attr = target.partition(":")
        mod = importlib.import_module(mod_name)
        assert getattr(medfuse, name) is (getattr(mod, attr) if attr else mod), name


def test_the_modules_the_docs_name_are_attributes_after_a_bare_import():
    code = """
import json, sys, medfuse
heavy = sorted(m for m in ("torch", "SimpleITK", "pydicom", "monai", "dask", "napari", "qtpy", "PyQt5", "PyQt6",
                           "PySide2", "PySide6") if m in sys.modules)
out = {"heavy": heavy, "batch": callable(medfuse.batch.run_batch), "progress": medfuse.progress.CancelToken.__name__,
       "pipeline": medfuse.pipeline.PipelineState.__name__, "provenance": callable(medfuse.provenance.scrub)}
ns = {}
exec("from medfuse import *", ns)
out["star"] = sorted({"batch", "progress", "pipeline", "provenance"} & set(ns))
print(json.dumps(out))
"""
    got = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                    text=True).stdout.splitlines()[-1])
    assert got == {"heavy": [], "batch": True, "progress": "CancelToken", "pipeline": "PipelineState",
                   "provenance": True, "star": []}
    assert not {"batch", "progress", "pipeline", "provenance"} & set(medfuse.__all__)


def test_fuse_shows_its_required_second_input_readably():
    b = inspect.signature(medfuse.fuse).parameters["b"]
    assert repr(b.default) == "<required>" and "object at 0x" not in str(inspect.signature(medfuse.fuse))
    with pytest.raises(InvalidInputError, match="two or three images"):
        medfuse.fuse(np.zeros((8, 8)), method="max")


def _returns(func) -> list:
    """The return annotations of ``func``'s overloads, as written."""
    return [inspect.signature(f).return_annotation for f in typing.get_overloads(func)]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is new in Python 3.11")
def test_the_overloads_say_what_comes_back():
    from medfuse.fusion.normalise import denormalise, normalise
    from medfuse.metrics import score

    # Volume in: Volume; NumPy array in: array; anything else (lists, tensors, a value typed Any): either.
    assert _returns(medfuse.fuse) == ["Volume", "np.ndarray", "Union[Volume, np.ndarray]"]
    assert _returns(normalise) == ["Tuple[Volume, Dict[str, Any]]", "Tuple[np.ndarray, Dict[str, Any]]",
                                   "Tuple[Union[np.ndarray, Volume], Dict[str, Any]]"]
    assert _returns(denormalise) == ["Volume", "np.ndarray", "Union[np.ndarray, Volume]"]
    assert _returns(score) == ["Dict[str, float]", "Dict[str, Any]"]


def _vol(modality: str = "MR", unit: str = "arbitrary") -> Volume:
    rng = np.random.default_rng(0)
    return Volume((rng.random((12, 12, 12)) * 100).astype(np.float32), np.eye(4), modality=modality, unit=unit)


def test_what_runs_matches_the_annotations():
    """The run-time types the overloads promise, Volume or array by input; a mix is refused."""
    from medfuse.fusion.normalise import denormalise, normalise

    v = _vol()
    assert isinstance(medfuse.fuse(v, _vol("CT", "HU"), method="max"), Volume)
    assert type(medfuse.fuse(v.array, v.array, method="max")) is np.ndarray
    with pytest.raises(InvalidInputError, match="mix Volumes and plain arrays"):
        medfuse.fuse(v, v.array, method="max")
    scaled, rec = normalise(_vol("CT", "HU"))
    assert isinstance(scaled, Volume) and isinstance(denormalise(scaled, rec), Volume)
    scaled_array, rec = normalise(v.array)
    assert type(scaled_array) is np.ndarray and type(denormalise(scaled_array, rec)) is np.ndarray


def test_score_gives_floats_in_2d():
    rng = np.random.default_rng(1)
    a, b, c = (rng.random((16, 16)) * 255 for _ in range(3))
    got = medfuse.metrics.score(a, b, c)
    assert got and all(isinstance(v, float) for v in got.values())


def test_scan_gives_series_infos(samples_dir):
    from medfuse.io.dicom import SeriesInfo

    infos = medfuse.scan(samples_dir / "ct")
    assert infos and all(isinstance(i, SeriesInfo) for i in infos)
