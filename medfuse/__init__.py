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

import importlib as _importlib
import sys as _sys
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from . import errors as _errors
from .errors import *  # noqa: F401,F403  (the exception hierarchy is part of the API)
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
    # Why: ``medfuse.transforms.LoadVolumed`` after a bare ``import medfuse`` raised AttributeError.
    "transforms": "medfuse.transforms",
    "evaluate": "medfuse.evaluate",
    # The value at a point and statistics within a mask (medfuse measure on the command line).
    "value_at": "medfuse.measure:value_at",
    "mask_statistics": "medfuse.measure:mask_statistics",
    "region_statistics": "medfuse.measure:region_statistics",
    "measure": "medfuse.measure",
    # The packages the docs name as medfuse.registration.PRESETS, medfuse.fusion.classical...: AttributeError after
    # a bare ``import medfuse`` until something imported them.
    "registration": "medfuse.registration",
    "fusion": "medfuse.fusion",
    "io": "medfuse.io",
    # Why: the docs write medfuse.batch.run_batch(...), medfuse.progress.CancelToken...; AttributeError after a bare
    # ``import medfuse`` too.
    "batch": "medfuse.batch",
    "progress": "medfuse.progress",
    "pipeline": "medfuse.pipeline",
    "provenance": "medfuse.provenance",
}
#: Sub-packages and modules reached as attributes, not names of the API: left out of ``from medfuse import *``.
_SUBPACKAGES = {"registration", "fusion", "io", "batch", "progress", "pipeline", "provenance", "measure"}

#: Reached as attributes but left out of ``from medfuse import *``: they need these optional packages (``[ml]``).
_OPTIONAL = {"transforms": ("monai", "torch")}

__all__ = ["Volume", "__version__", *_errors.__all__, *sorted(set(_LAZY) - set(_OPTIONAL) - _SUBPACKAGES)]

if _TYPE_CHECKING:
    # What _LAZY names, for mypy/pyright: resolved through __getattr__ alone, every name was Any to them. Never run,
    # so ``import medfuse`` stays light (tests/test_api_typing.py checks that this matches _LAZY).
    from . import batch as batch
    from . import display as display
    from . import evaluate as evaluate
    from . import fusion as fusion
    from . import io as io
    from . import measure as measure
    from . import metrics as metrics
    from . import phantom as phantom
    from . import pipeline as pipeline
    from . import progress as progress
    from . import provenance as provenance
    from . import registration as registration
    from . import transforms as transforms
    from .fusion import fuse as fuse
    from .io import load as load
    from .io import load_volumes as load_volumes
    from .io import save as save
    from .io import scan as scan
    from .io import select_series as select_series
    from .measure import mask_statistics as mask_statistics
    from .measure import region_statistics as region_statistics
    from .measure import value_at as value_at
    from .pipeline import Pipeline as Pipeline
    from .pipeline import fuse_files as fuse_files
    from .registration import Transform as Transform
    from .registration import load_transform as load_transform
    from .registration import register as register
    from .registration import resample as resample
    from .registration import resample_to_common_grid as resample_to_common_grid


def __getattr__(name: str) -> _Any:
    target = _LAZY.get(name)
    if target is None:
        # name= and obj= let Python's traceback suggest a close name ("Did you mean: 'load'?").
        raise AttributeError(f"module 'medfuse' has no attribute {name!r}", name=name, obj=_sys.modules[__name__])
    mod_name, _, attr = target.partition(":")
    mod = _importlib.import_module(mod_name)
    value = getattr(mod, attr) if attr else mod
    globals()[name] = value
    return value


def __dir__():
    # The public names only (tab completion): not the helpers this module imports, nor private ones. An optional
    # module only where its packages are installed: help(medfuse) reads every name dir() gives, and failed on it.
    usable = {name for name, needs in _OPTIONAL.items() if all(_installed(pkg) for pkg in needs)}
    # The sub-packages too, which are not in __all__ (``from medfuse import *`` leaves them out) but which the
    # docs use (medfuse.batch.write_phantom_subjects, medfuse.progress.CancelToken): tab completion missed them.
    return sorted(set(__all__) | usable | _SUBPACKAGES | {"errors", "volume"})


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported, found without importing it."""
    from importlib.util import find_spec

    try:
        return find_spec(package) is not None
    except (ImportError, ValueError):  # a broken install, or a module with no spec
        return False
