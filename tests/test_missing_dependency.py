"""A package that is installed but fails to import is not called "not installed" (a cluster job's memory limit
made torch's libraries fail to map, and medfuse sent the user to pip install what they had)."""

import importlib.util

import pytest

from medfuse.errors import MissingDependencyError


def _raised(package: str, text: str) -> MissingDependencyError:
    try:
        raise ImportError(text)
    except ImportError:
        return MissingDependencyError.for_package(package, "the fusion network", "ml")


def test_installed_but_unloadable_quotes_the_cause_and_the_memory_limit(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    e = _raised("torch", "libtorch_cpu.so: failed to map segment from shared object")
    assert "installed but could not be imported (libtorch_cpu.so: failed to map segment" in str(e)
    assert "ulimit -v" in e.fix and "python -c 'import torch'" in e.fix


@pytest.mark.parametrize("spec", [None, ValueError])
def test_a_package_that_is_absent_is_still_not_installed(monkeypatch, spec):
    def find_spec(name):
        if spec is ValueError:  # sys.modules[name] set to a module without __spec__
            raise ValueError(f"{name}.__spec__ is None")
        return None

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    e = _raised("torch", "No module named 'torch'")
    assert "which is not installed" in str(e) and e.fix == "pip install 'medfuse[ml]'"


def test_the_failing_submodule_is_reported_as_its_package(monkeypatch):
    """train passes the ImportError's name, the submodule that failed (torch._C): it was called not installed."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "torch" else None)
    e = _raised("torch._C", "libtorch_cpu.so: failed to map segment from shared object")
    assert "package 'torch', which is installed but could not be imported" in str(e)
    e = _raised("dask[distributed]", "No module named 'distributed'")  # an extra: which part is missing is untold
    assert "which is not installed" in str(e)
