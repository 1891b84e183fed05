"""``progress`` and ``cancel`` of the wrong kind are refused up front by every long operation.

``progress=3`` used to pass silently (``report`` swallows a callback's errors so that a broken bar cannot lose a
result), and ``cancel=3`` raised an AttributeError at its first check, after loading or registering.
"""

from __future__ import annotations

import numpy as np
import pytest

import medfuse
from medfuse import Volume
from medfuse.errors import InvalidInputError
from medfuse.progress import CancelToken, check_callbacks

#: A value that must never be echoed (it may be a patient's path).
PATIENT = "/data/DOE^JOHN/scan.nii"


def _vol(seed: int = 0) -> Volume:
    return Volume(np.random.default_rng(seed).random((16, 16, 16)).astype(np.float32), np.eye(4), modality="MR")


def _img() -> np.ndarray:
    return np.random.default_rng(0).random((16, 16)).astype(np.float32)


def _calls():
    from medfuse.batch import run_batch
    from medfuse.evaluate import evaluate
    from medfuse.fusion.classical import fuse_arrays
    from medfuse.pipeline import Pipeline
    from medfuse.registration import register

    v, a = _vol(), _img()
    return {
        "fuse-network": lambda **kw: medfuse.fuse(a, a, **kw),
        "fuse-max": lambda **kw: medfuse.fuse(a, a, method="max", **kw),
        "fuse-volumes-mean": lambda **kw: medfuse.fuse(v, v, method="mean", **kw),
        "classical": lambda cancel=None, progress=None: fuse_arrays([a, a], method="max", cancel=cancel),
        "register": lambda **kw: register(v, v, kind="rigid", **kw),
        "pipeline": lambda **kw: Pipeline(method="max").run([v, v], **kw),
        "evaluate": lambda **kw: evaluate([(a, a)], methods=["max"], out_dir=PATIENT, save_outputs=False, **kw),
        "batch": lambda cancel=None, progress=None: run_batch([], report=PATIENT, cancel=cancel),
    }


@pytest.mark.parametrize("entry", ["fuse-network", "fuse-max", "fuse-volumes-mean", "register", "pipeline",
                                   "evaluate"])
@pytest.mark.parametrize("bad", [3, PATIENT, np.zeros(3)], ids=["int", "str", "ndarray"])
def test_a_progress_that_cannot_be_called_is_refused(entry, bad):
    with pytest.raises(InvalidInputError, match="progress must be a function") as ei:
        _calls()[entry](progress=bad)
    assert ei.value.fix and "DOE" not in str(ei.value)


@pytest.mark.parametrize("entry", ["fuse-network", "fuse-max", "fuse-volumes-mean", "classical", "register",
                                   "pipeline", "evaluate", "batch"])
@pytest.mark.parametrize("bad", [3, True, PATIENT, object()], ids=["int", "bool", "str", "object"])
def test_a_cancel_that_is_no_token_is_refused(entry, bad):
    with pytest.raises(InvalidInputError, match="cancel must be a medfuse.progress.CancelToken") as ei:
        _calls()[entry](cancel=bad)
    assert ei.value.fix and "DOE" not in str(ei.value)


def test_callables_and_tokens_still_pass():
    seen = []
    check_callbacks(lambda f, m: None, CancelToken())
    check_callbacks(None, None)
    out = medfuse.fuse(_img(), _img(), method="max", progress=lambda f, m: seen.append(f), cancel=CancelToken())
    assert out.shape == (16, 16) and seen and seen[-1] == 1.0
