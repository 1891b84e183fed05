"""A local batch run leaves its caller's process as it found it (a service or notebook runs many)."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

import medfuse  # noqa: E402
from medfuse.batch import Subject, run_batch  # noqa: E402


def test_a_local_batch_leaves_the_callers_environment_unchanged(tmp_path, monkeypatch):
    """Dask's nanny set OMP_NUM_THREADS=1 (and MKL/OPENBLAS, MALLOC_TRIM_THRESHOLD_, PYTHONHASHSEED) in the
    caller's os.environ: its own NumPy and torch work then ran on one thread."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_",
                 "PYTHONHASHSEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDFUSE_TEST_KEPT", "yes")
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    a = medfuse.save(medfuse.Volume(rng.random((16, 16, 12)).astype(np.float32), affine, modality="MR"),
                     tmp_path / "a.nii.gz")
    b = medfuse.save(medfuse.Volume(rng.random((16, 16, 12)).astype(np.float32), affine, modality="PT"),
                     tmp_path / "b.nii.gz")
    before = dict(os.environ)
    summary = run_batch([Subject(subject="s1", fixed=str(a), moving=[str(b)], output=str(tmp_path / "o.nii.gz"))],
                        workers=1, method="max", report=tmp_path / "r.csv")
    assert [r.status for r in summary.results] == ["done"], summary.table()
    assert dict(os.environ) == before
