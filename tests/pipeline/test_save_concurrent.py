"""Two runs saving one output at once leave a matching output and sidecar pair."""
import json
import sys
import threading

import numpy as np
import pytest

import medfuse
from medfuse.errors import OutputExistsError
from medfuse.pipeline import SaveStep, fuse_files
from medfuse.provenance import hash_path


def _pair():
    rng = np.random.default_rng(0)
    return [medfuse.Volume(rng.random((12, 12, 12)).astype(np.float32), np.eye(4), modality="MR") for _ in range(2)]


@pytest.mark.skipif(sys.platform == "win32", reason="the save lock is POSIX flock (Windows saves unlocked)")
def test_a_run_that_loses_the_output_does_not_leave_its_sidecar(tmp_path, monkeypatch):
    """Run A wrote its sidecar after run B had finished; A's rename then failed ("the output exists"), and the
    sidecar left described A's image beside B's (6 of 7 tries of three `medfuse fuse` at once in a probe)."""
    out = tmp_path / "fused.nii.gz"
    a_ready, b_done = threading.Event(), threading.Event()
    original = SaveStep._sidecar

    def sidecar(self, state, written, out_, inputs, replaces=None, before_rename=False):
        if state.notes.get("method_used") == "mean":  # run A: hold on until B has finished (or 3 s)
            a_ready.set()
            b_done.wait(timeout=3)
        return original(self, state, written, out_, inputs, replaces=replaces, before_rename=before_rename)

    monkeypatch.setattr(SaveStep, "_sidecar", sidecar)
    errors = {}

    def run(method, done=None):
        try:
            fuse_files(*_pair(), out, method=method)
        except OutputExistsError as e:
            errors[method] = e
        finally:
            if done is not None:
                done.set()

    a = threading.Thread(target=run, args=("mean",))
    a.start()
    assert a_ready.wait(timeout=30)
    b = threading.Thread(target=run, args=("max", b_done))
    b.start()
    a.join(60)
    b.join(60)
    assert len(errors) == 1  # one run wrote, the other was refused
    record = json.loads(out.with_suffix("").with_suffix(".json").read_text())
    assert record["output"]["sha256"] == hash_path(out)
    winner = ({"mean", "max"} - set(errors)).pop()
    assert record["method_used"] == winner
