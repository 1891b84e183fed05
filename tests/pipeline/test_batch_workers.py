"""Batch loose ends: a worker Dask restarts keeps SIGINT ignored, and the refusals of colliding manifest rows show
paths normalised (``out/../out/x.nii.gz`` is shown as ``out/x.nii.gz``), patient names still blanked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medfuse.batch import Subject, read_manifest, run_batch
from medfuse.errors import InvalidInputError

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_volumes"
NAME = "DOE^JOHN"


# ----------------------------------------------------------------------------- 1. a restarted worker
_RESTART = textwrap.dedent("""
    import os, signal, sys, time
    if __name__ == "__main__":
        from medfuse.batch import _client
        client, cluster = _client("local", 2, 1)
        try:
            ignored = lambda: signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            before = client.run(os.getpid)
            first = client.run(ignored)
            victim = sorted(before.values())[0]
            os.kill(victim, signal.SIGKILL)  # as the OOM killer does; the nanny starts a new worker process
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                pids = client.run(os.getpid, on_error="ignore")  # the dead worker's address fails until it goes
                if len(pids) == 2 and victim not in pids.values():
                    break
                time.sleep(0.1)
            else:
                print("no-restart", before, pids); sys.exit(2)
            new = [a for a, pid in pids.items() if pid not in before.values()]
            settle = time.monotonic() + 5  # the worker may still be setting up when it first answers
            while True:
                after = client.run(ignored, workers=new)
                if all(after.values()) or time.monotonic() > settle:
                    break
                time.sleep(0.2)
            print(len(first), all(first.values()), len(after), all(after.values()),
                  signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        finally:
            client.close(); cluster.close()
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and SIGINT are POSIX")
def test_a_worker_restarted_after_another_dies_still_ignores_sigint(tmp_path):
    """The workers inherited SIGINT "ignored" only from the seconds the cluster took to start: a worker the nanny
    started again after one died (the OOM killer) had Python's default handler, so Ctrl-C printed its
    KeyboardInterrupt traceback again. The caller's own handler is untouched."""
    pytest.importorskip("distributed")
    script = tmp_path / "restart.py"
    script.write_text(_RESTART)
    # SIGINT at its default in the child, whatever this process inherited: a runner started in the background by a
    # shell without job control ignores SIGINT, the child inherited "ignore", and Python then installs no handler.
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert run.stdout.split() == ["2", "True", "1", "True", "True"], (run.stdout, run.stderr[-3000:])


# ----------------------------------------------------------------------------- 2. paths in the refusals


@pytest.mark.parametrize("a, b, words", [
    ("out/x.nii.gz", "out/../out/x.nii.gz", "both outputs are one file"),
    ("out/./x.nii.gz", "lnk/x.nii.gz", "are one file"),
    ("deep/x.nii.gz", "up/../x.nii.gz", "are one file"),  # up -> deep/a: its ".." is deep, not the manifest's folder
    ("out/./x.nii.gz", "out/sub/../X.nii.gz", "letter case"),
    ("out/s.nii.gz", "out//sub/../s.mha", "share one provenance sidecar"),
    ("out/a.nii.gz", "in/../in/mr.nii.gz", "is the other row's input"),
    ("in/../in/notes.nii.gz", "out/b.nii.gz", "the sidecar of output .* is the other row's input"),
])
def test_colliding_rows_are_shown_with_normalised_paths(tmp_path, a, b, words, patients):
    """``out/../out/x.nii.gz`` was quoted as written (``/data/out/../out/x.nii.gz``) beside ``out/x.nii.gz``,
    two spellings the user had to work out were one file. Every path quoted is normalised, no ``..``, ``.`` or
    ``//`` left, and the patient's name in a folder is still blanked."""
    (tmp_path / "in").mkdir()
    (tmp_path / "lnk").symlink_to("out/../out", target_is_directory=True)
    (tmp_path / "deep" / "a").mkdir(parents=True)
    (tmp_path / "up").symlink_to("deep/a", target_is_directory=True)
    for f in ("mr.nii.gz", "mr.mha", "ct.nii.gz", "notes.json"):
        (tmp_path / "in" / f).write_bytes(b"x")
    patients.named_pet(tmp_path / "in" / NAME, NAME, "PID12345")
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,fixed,moving,output\n"
                        f"s1,in/mr.nii.gz,in/ct.nii.gz,{a}\n"
                        f"s2,in/mr.mha,in/notes.json;in/{NAME},{b}\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=words) as e:
        read_manifest(manifest)
    msg = str(e.value)
    quoted = msg.split("'")[1::2]
    paths = [q for q in quoted if os.sep in q]
    assert paths, msg
    for q in paths:
        assert q == os.path.normpath(q) and os.path.isabs(q), msg
        assert q.startswith(str(tmp_path.resolve())) or q.startswith(str(tmp_path)), msg
    assert "row 2" in msg and "row 3" in msg and not patients.leaks(msg), msg
    assert not (tmp_path / "out").exists()


def test_a_patient_named_output_folder_is_blanked_when_shown_normalised(tmp_path, patients):
    """Normalising must not undo the blanking: an output folder named after the patient is ``[removed]``."""
    patients.named_pet(tmp_path / "in" / NAME, NAME, "PID12345")
    out = tmp_path / "out" / NAME
    subjects = [Subject("a", str(SAMPLES / "mr_t1.nii.gz"), [str(tmp_path / "in" / NAME)], str(out / "f.nii.gz")),
                Subject("b", str(SAMPLES / "mr_t2.nii.gz"), [str(tmp_path / "in" / NAME)],
                        str(out / ".." / NAME / "F.nii.gz"))]
    with pytest.raises(InvalidInputError, match="letter case") as e:
        run_batch(subjects, scheduler="synchronous", method="max", report=tmp_path / "r.csv")
    msg = str(e.value)
    assert not patients.leaks(msg) and "[removed]" in msg and ".." not in msg, msg
    assert not (tmp_path / "r.csv").exists() and not (tmp_path / "out").exists()


def test_an_unverified_output_is_named_normalised_in_the_subjects_error(tmp_path):
    """A subject's refusal to replace a file it did not make quoted ``/d/out/../out/x.nii.gz`` as written."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.nii.gz").write_bytes(b"someone's own file")
    raw = os.path.join(str(tmp_path), "out", "..", "out", ".", "x.nii.gz")
    summary = run_batch([Subject("a", str(SAMPLES / "mr_t1.nii.gz"), [str(SAMPLES / "spect.nii.gz")], raw)],
                        scheduler="synchronous", method="max", report=tmp_path / "r.csv")
    error = summary.results[0].error
    assert "not verified" in error and str(tmp_path / "out" / "x.nii.gz") in error and ".." not in error, error
    assert (tmp_path / "out" / "x.nii.gz").read_bytes() == b"someone's own file"


def test_each_subjects_warnings_go_to_its_own_row_with_several_threads(capsys):
    """catch_warnings swapped process-wide state: with two threads a worker (a remote dask worker runs one per
    core), subject A's warning landed in B's row and, once A had finished, B's was printed raw in the worker's log.
    The order that showed it: A starts, B starts, A warns and ends, B warns."""
    import threading
    import warnings

    from medfuse.batch import _subject_warnings
    from medfuse.errors import MedfuseWarning

    rows = {}
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()

    def subject_a() -> None:
        with _subject_warnings() as said:
            a_in.set()
            b_in.wait(10)
            warnings.warn("warning of A", MedfuseWarning)
        rows["A"] = list(said)
        a_done.set()

    def subject_b() -> None:
        a_in.wait(10)
        with _subject_warnings() as said:
            b_in.set()
            a_done.wait(10)
            warnings.warn("warning of B", MedfuseWarning)
        rows["B"] = list(said)

    threads = [threading.Thread(target=subject_a), threading.Thread(target=subject_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert rows == {"A": ["warning of A"], "B": ["warning of B"]}
    assert "warning of" not in capsys.readouterr().err
    assert not any(f[2] is MedfuseWarning and f[0] == "always" for f in warnings.filters)  # left as it was
    with pytest.warns(MedfuseWarning, match="after"):  # and a warning outside a subject is shown as before
        warnings.warn("after", MedfuseWarning)


# ----------------------------------------------------------------------------- 3. a second Ctrl-C while closing
_SECOND_CTRL_C = textwrap.dedent("""
    import os, sys, threading, time
    from pathlib import Path

    def task(s, options):  # a subject that moves its output into place a few seconds in
        out = Path(s["output"])
        Path(str(out) + ".started").write_text(str(os.getpid()))
        time.sleep(3)
        out.write_text("written after the report")
        return {"subject": s["subject"], "status": "done", "output": s["output"]}

    if __name__ == "__main__":
        from medfuse import batch
        from medfuse.progress import CancelToken

        real = batch._client

        def interrupted_close(*args):
            client, cluster = real(*args)
            close = client.close

            def second_ctrl_c():  # the second Ctrl-C arrives while the client closes
                client.close = close
                raise KeyboardInterrupt

            client.close = second_ctrl_c
            return client, cluster

        batch._client = interrupted_close
        out = Path(sys.argv[1]) / "a.txt"
        started = Path(str(out) + ".started")
        token = CancelToken()

        def first_ctrl_c():
            while not started.exists():
                time.sleep(0.05)
            token.cancel()

        threading.Thread(target=first_ctrl_c, daemon=True).start()
        subject = batch.Subject(subject="a", fixed="f", moving=["m"], output=os.fspath(out))
        try:
            batch._run_on_dask([subject], {"threads": 1}, "local", 1, lambda d: None, token, task=task)
            print("not-interrupted")
        except KeyboardInterrupt:
            late = batch._finished_meanwhile(subject, 0.0)  # what run_batch checks before its last report
            time.sleep(4)  # past the moment the subject would have written its output
            print("interrupted", late is None, out.exists())
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_a_second_ctrl_c_while_closing_stops_the_workers_before_the_report(tmp_path):
    """The second Ctrl-C broke out of client.close(): the report said "cancelled, not run" while the workers went on
    and moved complete outputs into place 0.1-1.6 s later. The workers are now stopped before it returns."""
    pytest.importorskip("distributed")
    script = tmp_path / "second.py"
    script.write_text(_SECOND_CTRL_C)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.stdout.split() == ["interrupted", "True", "False"], (run.stdout, run.stderr[-3000:])


# ----------------------------------------------------------------------------- a cancel while workers start
def test_a_cancel_while_the_workers_start_is_a_cancel_not_a_cluster_error(tmp_path, monkeypatch):
    """A SIGTERM to the job's process group while LocalCluster started its workers killed them too: the run ended
    as "the local Dask cluster did not start" (exit 2, the __main__ advice), every subject 'stopped on an error'."""
    import medfuse.batch as batch
    from medfuse.errors import MedfuseError
    from medfuse.progress import CancelToken

    manifest = batch.write_phantom_subjects(tmp_path / "ds", 2)
    token = CancelToken()

    def killed(*args, **kwargs):
        token.cancel()  # what the CLI's SIGTERM handler does, while the nannies die of the same signal
        raise MedfuseError("the local Dask cluster did not start (Nanny failed to start.)", fix="...")

    monkeypatch.setattr(batch, "_client", killed)
    summary = run_batch(manifest, scheduler="local", workers=2, method="max", register=None, cancel=token)
    assert summary.cancelled
    assert [r.status for r in summary.results] == ["cancelled", "cancelled"]
    assert all("not run: the batch was cancelled" in (r.error or "") for r in summary.results)
    # Without a cancel, the same failure is still the cluster's error.
    with pytest.raises(MedfuseError, match="did not start"):
        run_batch(manifest, scheduler="local", workers=2, method="max", register=None, cancel=CancelToken())


@pytest.mark.parametrize("cores,expected", [(1, 1), (8, 2)])
def test_the_default_worker_count_follows_the_cores_this_process_may_use(tmp_path, monkeypatch, cores, expected):
    """Under ``taskset -c 0`` or a one-CPU cluster job, the default of 2 workers was kept and then warned of as
    oversubscribing the one core."""
    import medfuse.batch as batch

    manifest = batch.write_phantom_subjects(tmp_path / "ds", 3)
    seen = []

    def run_on_dask(subjects, options, scheduler, workers, finished, cancel):
        seen.append(workers)
        return workers, True  # nothing run: only the count matters here

    monkeypatch.setattr(batch, "_usable_cores", lambda: cores)
    monkeypatch.setattr(batch, "_run_on_dask", run_on_dask)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no oversubscription warning either
        run_batch(manifest, method="max", register=None)
    assert seen == [expected]


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this system")
def test_a_programs_own_sigusr1_handler_survives_the_cluster_start():
    """run_batch from a program that dumps stacks on SIGUSR1 (faulthandler, a handler set from C, which getsignal
    reports as SIG_DFL): the cluster start 'restored' SIG_DFL, and the next SIGUSR1 killed the program (review)."""
    code = textwrap.dedent("""
        import faulthandler, os, signal, sys, time
        faulthandler.register(signal.SIGUSR1, file=sys.stderr)
        from medfuse.batch import _workers_ignore_sigint
        with _workers_ignore_sigint():
            pass
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        print("survived")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "survived", (run.returncode, run.stderr[-1000:])
