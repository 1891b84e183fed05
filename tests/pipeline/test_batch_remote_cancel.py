"""A cancelled run on a remote Dask cluster reaches subjects already running there.

The run's stop file is on the driver's disk; a worker on another machine never sees it, and closing the client does
not stop a task that is running. The run now also sets a ``distributed.Event``, which a subject reads at its
pipeline's checks. The cluster here is a local one addressed by its scheduler's address, as a remote one is; its
workers are processes (a worker thread in the test's own process would find the run's client, not its own).
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from medfuse import batch
from medfuse.batch import Subject, SubjectResult
from medfuse.progress import CancelToken

distributed = pytest.importorskip("distributed")


@pytest.fixture
def remote():
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def _subject(tmp_path: Path) -> Subject:
    return Subject(subject="s1", fixed=str(tmp_path / "mr.nii.gz"), moving=[str(tmp_path / "pet.nii.gz")],
                   output=str(tmp_path / "s1_fused.nii.gz"))


def _runs_until_cancelled(subject, options):
    """A subject that runs (up to 30 s) until the run's cancel reaches it, checking as the pipeline does."""
    token = batch._RunStop(options["stop_event"])
    out = Path(subject["output"])
    out.with_suffix(".started").touch()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        if token.cancelled:
            out.with_suffix(".seen").write_text(f"{time.monotonic() - t0:.2f}")
            break
        time.sleep(0.05)
    return asdict(SubjectResult(subject=subject["subject"], status="cancelled", output=subject["output"]))


def _wait_for(path: Path, seconds: float) -> bool:
    t0 = time.monotonic()
    while not path.exists() and time.monotonic() - t0 < seconds:
        time.sleep(0.05)
    return path.exists()


def test_a_subject_running_on_a_remote_worker_sees_the_cancel(tmp_path, remote):
    s = _subject(tmp_path)
    token, got, out = CancelToken(), [], {}

    def run():
        out["result"] = batch._run_on_dask([s], {"threads": 1}, remote, 1, got.append, token,
                                           task=_runs_until_cancelled)

    t = threading.Thread(target=run)
    t.start()
    assert _wait_for(Path(s.output).with_suffix(".started"), 30), "the subject never started"
    assert not Path(s.output).with_suffix(".seen").exists()  # not cancelled yet: it keeps running
    token.cancel()
    t.join(60)
    assert not t.is_alive() and out["result"][1] is True  # the run ended as cancelled
    # the running task learnt of it (the client is closed by now): before, it ran on for its whole 30 s
    assert _wait_for(Path(s.output).with_suffix(".seen"), 10)


def test_a_subject_starting_after_a_remote_cancel_is_not_run(tmp_path, remote):
    s = _subject(tmp_path)
    with distributed.Client(remote) as client:
        distributed.Event("medfuse-stop-test", client=client).set()
        row = client.submit(batch.run_subject, asdict(s), {"threads": 1, "cap_process_threads": False,
                                                           "stop_event": "medfuse-stop-test"}, pure=False).result()
        assert (row["status"], row["error"]) == ("cancelled", "not run: the batch was cancelled")
        # another run's name, not set: the subject runs (and fails here: its inputs do not exist)
        row = client.submit(batch.run_subject, asdict(s), {"threads": 1, "cap_process_threads": False,
                                                           "stop_event": "medfuse-stop-other"}, pure=False).result()
        assert row["status"] == "failed" and "mr.nii.gz" in row["error"]


def test_the_token_off_a_worker_is_a_plain_token():
    """Outside a Dask worker (no scheduler to ask) it is never cancelled by the event, only by cancel()."""
    token = batch._RunStop("medfuse-stop-nowhere")
    assert not token.cancelled
    token.cancel()
    assert token.cancelled
