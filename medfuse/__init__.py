"""medfuse: multimodal fusion of 3-D medical volumes.

The public API is flat and lazy: ``import medfuse`` pulls in NumPy only, and the
heavier parts (SimpleITK, pydicom, torch, MONAI) load on first use.

    >>> import medfuse
    >>> ct = medfuse.load("sample_volumes/ct")            # doctest: +SKIP
    >>> pet = medfuse.load("sample_volumes/pet")          # doctest: +SKIP
    >>> reg = medfuse.register(ct, pet, kind="rigid")     # doctest: +SKIP
    >>> fused = medfuse.fuse(ct, reg.resampled)           # doctest: +SKIP
    >>> medfuse.save(fused, "fused.nii.gz")              # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import *  # noqa: F401,F403  (the exception hierarchy is part of the API)
from .errors import MedfuseError
from .volume import Volume

__version__ = "0.1.0"

# name -> "module:attribute", imported on first access (PEP 562).
_LAZY = {
    "load": "medfuse.io:load",
    "load_volumes": "medfuse.io:load_volumes",
    "scan": "medfuse.io:scan",
    "select_series": "medfuse.io:select_series",
    "save": "medfuse.io:save",
    "register": "medfuse.registration:register",
    "resample": "medfuse.registration:resample",
    "resample_to_common_grid": "medfuse.registration:resample_to_common_grid",
    "Transform": "medfuse.registration:Transform",
    "load_transform": "medfuse.registration:load_transform",
    "fuse": "medfuse.fusion:fuse",
    "fuse_files": "medfuse.pipeline:fuse_files",
    "Pipeline": "medfuse.pipeline:Pipeline",
    "metrics": "medfuse.metrics",
    "phantom": "medfuse.phantom",
    "display": "medfuse.display",
}

__all__ = ["Volume", "MedfuseError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'medfuse' has no attribute {name!r}")
    mod_name, _, attr = target.partition(":")
    mod = importlib.import_module(mod_name)
    value = getattr(mod, attr) if attr else mod
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
