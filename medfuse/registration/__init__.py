"""Registration: rigid, affine and deformable (B-spline) alignment, resampling and ITK transforms.

See ``docs/registration.md``. All transforms map fixed-space physical points to moving-space
points (ITK convention), LPS millimetres.
"""

from .presets import PRESETS, get_preset, preset_for
from .register import RegistrationReport, RegistrationResult, register
from .resample import common_grid, coverage, resample, resample_to_common_grid
from .transforms import Transform, load_transform

__all__ = [
    "register", "RegistrationResult", "RegistrationReport", "resample", "resample_to_common_grid", "common_grid",
    "coverage", "Transform", "load_transform", "PRESETS", "get_preset", "preset_for",
]
