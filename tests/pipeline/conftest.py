"""Fixtures of the pipeline and batch tests: DICOM series relabelled with made-up patients, and a check that text
names none of them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "sample_volumes"
#: Every made-up identifier the batch tests give a series (names, their parts, IDs).
IDENTIFIERS = ("DOE^JOHN", "DOE JOHN", "JOHN", "DOE^JANE", "JANE", "PID12345")


def named_pet(dst: Path, name: str, pid: str) -> None:
    """The sample PET series, re-labelled as patient ``name``."""
    pydicom = pytest.importorskip("pydicom")
    dst.mkdir(parents=True)
    for f in sorted((SAMPLES / "pet").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, "19600101"
        ds.save_as(dst / f.name)


def leaks(text: str) -> bool:
    """Whether ``text`` names one of the made-up patients."""
    return any(x.lower() in text.lower() for x in IDENTIFIERS)


@pytest.fixture(scope="session")
def patients():
    """``patients.named_pet(dst, name, pid)`` and ``patients.leaks(text)``."""
    return SimpleNamespace(named_pet=named_pet, leaks=leaks)


@pytest.fixture
def network_fails(monkeypatch):
    """Callable fixture: ``network_fails(error)`` makes the pipeline's network fusion raise ``error`` (what a
    missing torch or broken shipped weights raise); classical rules run as usual."""
    import medfuse.pipeline as pl

    real = pl._fuse

    def install(error: BaseException) -> None:
        def fuse(vols, *, method, device, **kw):
            if method == "network":
                raise error
            return real(vols, method=method, device=device, **kw)

        monkeypatch.setattr(pl, "_fuse", fuse)

    return install
