"""Shared fixtures.

Tests that need the real data in ``../shared`` use :func:`shared_path`. On a
user's machine without it they skip with the reason; in CI (``CI=true``) a
missing ``../shared`` is a failure, so a broken checkout can never pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDFUSE_SHARED", ROOT.parent / "shared"))
SAMPLES = ROOT / "sample_volumes"


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip (fail in CI) when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        msg = f"needs the real data at {p} (the team's ../shared folder beside the checkout)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI must have it")
        pytest.skip(msg)
    return p


@pytest.fixture
def shared():
    """Callable fixture: ``shared("data", "spm12-templates", "T1.nii")``."""
    return shared_path


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES
