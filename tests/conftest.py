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


def _write_patient_header(path: Path, name: str, pid: str, dob: str = "", charset: str = "") -> Path:
    """A minimal DICOM file holding a patient module (no image): what identifier searches read."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName, ds.PatientID = name, pid
    if dob:
        ds.PatientBirthDate = dob
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture
def patient_header():
    """Callable fixture: ``patient_header(path, name, pid, dob="", charset="")`` writes a DICOM file holding only
    a patient module and returns its path."""
    return _write_patient_header
