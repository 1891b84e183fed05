"""Ctrl-C on the command line: exit 130 whenever it came, saying which outputs were kept; and the progress bar text."""

from __future__ import annotations

import io
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest

import medfuse.cli as cli
import medfuse.io.writers as writers
from medfuse.cli import EXIT_CANCELLED, main
from medfuse.errors import CancelledError


def _pair(folder: Path):
    """Two small aligned NIfTI volumes (a blob and its square), quick to fuse and register."""
    import nibabel as nib

    grid = np.indices((24, 24, 24)).astype(np.float32) - 11.5
    blob = np.exp(-((grid[0] / 6) ** 2 + (grid[1] / 5) ** 2 + (grid[2] / 4) ** 2)).astype(np.float32)
    paths = [folder / "a.nii.gz", folder / "b.nii.gz"]
    for p, arr in zip(paths, (blob, blob ** 2)):
        nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(p))
    return paths


def _ctrl_c_during_nifti_write(monkeypatch, *, hard: bool) -> None:
    """A Ctrl-C while the output is being written: a real SIGINT (the first Ctrl-C, caught by the command's
    handler), or KeyboardInterrupt (a second Ctrl-C) from inside the write."""
    real = writers._save_nifti

    def save(*a, **k):
        if hard:
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(writers, "_save_nifti", save)


def _others(folder: Path, *inputs: Path):
    return sorted(p.name for p in folder.iterdir() if p not in inputs)


def test_fuse_ctrl_c_during_the_final_save_exits_130_and_says_what_it_kept(tmp_path, monkeypatch, capsys):
    """Before: the first Ctrl-C only set the cancel token, which nothing checks after the save began: exit 0."""
    a, b = _pair(tmp_path)
    out = tmp_path / "f.nii.gz"
    _ctrl_c_during_nifti_write(monkeypatch, hard=False)
    assert main(["fuse", str(a), str(b), "-o", str(out), "--method", "max", "-q"]) == EXIT_CANCELLED
    err = capsys.readouterr().err
    assert f"kept what was complete before the cancel: {out}, {tmp_path / 'f.json'}" in err
    assert _others(tmp_path, a, b) == ["f.json", "f.nii.gz"]  # complete files, nothing half-written


def test_fuse_second_ctrl_c_inside_the_write_exits_130_and_writes_nothing(tmp_path, monkeypatch, capsys):
    a, b = _pair(tmp_path)
    out = tmp_path / "f.nii.gz"
    _ctrl_c_during_nifti_write(monkeypatch, hard=True)
    assert main(["fuse", str(a), str(b), "-o", str(out), "--method", "max", "-q"]) == EXIT_CANCELLED
    err = capsys.readouterr().err.strip()
    assert err == "medfuse fuse: cancelled; nothing was written (files that were there before are unchanged)"
    assert _others(tmp_path, a, b) == []


def test_register_ctrl_c_after_the_last_check_exits_130_before_writing(tmp_path, monkeypatch, capsys):
    import medfuse.registration as registration

    real = registration.register

    def register(*a, **k):  # Ctrl-C as the registration returns: after its last cancel check
        res = real(*a, **k)
        signal.raise_signal(signal.SIGINT)
        return res

    monkeypatch.setattr(registration, "register", register)
    a, b = _pair(tmp_path)
    out = tmp_path / "r.nii.gz"
    assert main(["register", str(a), str(b), "-o", str(out), "-q", "--initialise", "none"]) == EXIT_CANCELLED
    assert "nothing was written" in capsys.readouterr().err and _others(tmp_path, a, b) == []


def test_register_ctrl_c_while_writing_the_transform_names_the_image_kept(tmp_path, monkeypatch, capsys):
    from medfuse.registration.transforms import Transform

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Transform, "save", interrupted)
    a, b = _pair(tmp_path)
    out = tmp_path / "r.nii.gz"
    assert main(["register", str(a), str(b), "-o", str(out), "-q", "--initialise", "none"]) == EXIT_CANCELLED
    err = capsys.readouterr().err
    assert f"kept what was complete before the cancel: {out}; not written: {tmp_path / 'r.tfm'}, " \
           f"{tmp_path / 'r.json'}" in err
    assert _others(tmp_path, a, b) == ["r.nii.gz"]


def test_the_sigint_handler_turns_a_late_ctrl_c_into_a_cancel(monkeypatch):
    """The handler every long command (register, fuse, demo, batch) runs under."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(CancelledError):
        with cli._CancelOnSigint() as token:
            signal.raise_signal(signal.SIGINT)
            assert token.cancelled
    assert signal.getsignal(signal.SIGINT) is before
    with cli._CancelOnSigint(raise_on_exit=False) as token:  # batch: reports its own summary, then 130
        signal.raise_signal(signal.SIGINT)
    assert token.cancelled
    with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C stops at once
        with cli._CancelOnSigint():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)


# ----------------------------------------------------------------------------- progress text
def test_progress_bar_text_has_no_stray_separator(monkeypatch):
    """Before: ``| 00:00 , register: level 2`` with a message, ``| 00:00 `` (trailing space) without."""
    monkeypatch.setattr(cli.sys, "stderr", io.StringIO())
    with cli._Bar("fuse", enabled=True) as bar:
        bar.bar._time = lambda: bar.bar.start_t  # elapsed 00:00 whatever the machine's speed
        states = [str(bar.bar)]
        bar(0.5, "register: level 2")
        states.append(str(bar.bar))
        bar(1.0)
        states.append(str(bar.bar))
    assert [s.split("|")[0] for s in states] == ["fuse:   0%", "fuse:  50%", "fuse: 100%"]
    assert [s.split("|")[-1] for s in states] == [" 00:00", " 00:00, register: level 2",
                                                 " 00:00, register: level 2"]


def test_the_handler_takes_sigterm_as_a_cancel(capsys):
    """SIGTERM (a scheduler's time limit, ``kill``) is a cancel like Ctrl-C: it used to end the process at once."""
    def unhandled(signum, frame):  # stands in for the default action (the end of this test process)
        raise AssertionError("SIGTERM reached the process's own handler: the command did not take it")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(CancelledError):
            with cli._CancelOnSigint() as token:
                signal.raise_signal(signal.SIGTERM)
                assert token.cancelled
        assert signal.getsignal(signal.SIGTERM) is unhandled
        assert "SIGTERM" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):  # a second one stops at once
            with cli._CancelOnSigint():
                signal.raise_signal(signal.SIGTERM)
                signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, before)



@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this system")
def test_sigusr1_a_schedulers_warning_is_a_cancel_and_an_ignored_one_stays_ignored():
    """SLURM's --signal=USR1@60 killed a batch on the spot (exit 138, report rows 'pending' for good). Run in a
    child process: where the handler is missing, the signal's default action ends that process, not pytest."""
    import subprocess
    import sys

    code = """
import faulthandler, signal, sys
from medfuse import cli
from medfuse.errors import CancelledError
cli._CONSOLE[0] = True  # as main() sets it for the console script
try:
    with cli._TermAsInterrupt(), cli._CancelOnSigint() as token:  # nested, as main() runs every command
        signal.raise_signal(signal.SIGUSR1)
except CancelledError:
    print("cancel", token.cancelled, signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL)
try:
    with cli._TermAsInterrupt():
        signal.raise_signal(signal.SIGUSR2)
except KeyboardInterrupt:
    print("interrupt", signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a wrapper that ignores it: kept, not taken over
with cli._CancelOnSigint(raise_on_exit=False) as token:
    signal.raise_signal(signal.SIGUSR1)
print("ignored", token.cancelled, signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)
signal.signal(signal.SIGUSR1, signal.SIG_DFL)
cli._CONSOLE[0] = False  # a program calling main([...]): its own handlers (one set from C here) stay
faulthandler.register(signal.SIGUSR1, chain=False)
with cli._TermAsInterrupt():
    pass
print("kept", cli._warning_signals() == ())
sys.stdout.flush()
signal.raise_signal(signal.SIGUSR1)  # faulthandler dumps the stack and the process goes on
print("alive")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert run.stdout.split("\n")[:5] == ["cancel True True", "interrupt True", "ignored False True", "kept True",
                                         "alive"]
    assert "cancelling on SIGUSR1 (a scheduler's warning" in run.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this system")
def test_a_batch_whose_job_gets_sigusr1_cancels_cleanly(tmp_path):
    """The console script with local Dask workers, the signal sent to the whole process group as SLURM sends its
    notice: exit 130 with the cancel said, no worker tracebacks (they died of it and printed a dozen)."""
    import csv
    import os
    import sys

    pytest.importorskip("distributed")
    code, err, _ = _signalled_batch(tmp_path, [sys.executable, "-m", "medfuse", "batch"], ["--workers", "2"],
                                    lambda proc: os.killpg(proc.pid, signal.SIGUSR1))
    assert code == EXIT_CANCELLED, err
    assert "cancelling on SIGUSR1" in err and "Traceback" not in err, err
    rows = {r["subject"]: r["status"] for r in csv.DictReader(open(tmp_path / "manifest-report.csv"))}
    assert set(rows.values()) <= {"done", "skipped", "cancelled"} and "pending" not in rows.values(), rows


def _signalled_batch(tmp_path, command, options, send):
    """Run ``command MANIFEST options --no-progress`` on 4 phantom subjects, ``send(proc)`` once the first output
    exists; returns (exit code, stderr, manifest)."""
    import os
    import subprocess
    import time

    from medfuse.batch import write_phantom_subjects

    manifest = write_phantom_subjects(tmp_path, 4, first_seed=1, method="max", register=None, downsample=4)
    outputs = lambda: sorted(p for p in (tmp_path / "out").glob("*.nii.gz") if not p.name.startswith("."))  # noqa: E731
    proc = subprocess.Popen([*command, str(manifest), *options, "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not outputs() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the batch ended before the signal: " + proc.stderr.read()
        send(proc)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode, err, manifest


@pytest.mark.parametrize("scheduler,group", [("synchronous", False), ("local", False), ("local", True)])
def test_batch_killed_by_sigterm_reports_done_and_cancelled_subjects(tmp_path, scheduler, group):
    """SLURM sends SIGTERM at a job's time limit. Before, the batch died there: exit -15, every subject not yet
    finished left 'pending' in the report and nothing said so. Now: exit 130, finished subjects 'done', the
    others 'cancelled', and the outputs that exist are complete."""
    import csv
    import os
    import sys

    from medfuse import provenance as prov
    from medfuse.batch import read_manifest

    pytest.importorskip("distributed")

    def send(proc):
        if group:  # to the command and its Dask workers alike, as SLURM does at a time limit
            os.killpg(proc.pid, signal.SIGTERM)
        else:  # to the command itself, as `kill PID` does
            proc.send_signal(signal.SIGTERM)

    code, err, manifest = _signalled_batch(
        tmp_path, [sys.executable, "-c", "import sys; from medfuse.cli import main; sys.exit(main(sys.argv[1:]))",
                   "batch"], ["--scheduler", scheduler, "--workers", "2"], send)
    assert code == EXIT_CANCELLED, err
    assert " - ERROR - " not in err, err  # Dask's "marked as failed because 1 workers died": a cancel is no error
    rows = {r["subject"]: r["status"] for r in csv.DictReader(open(tmp_path / "manifest-report.csv"))}
    # "skipped": with the workers signalled too, Dask may hand a killed worker's subject to another before the
    # batch sees the cancel, and that one finds the output the first had completed (seen once in CI).
    assert set(rows.values()) <= {"done", "skipped", "cancelled"} and "done" in rows.values(), rows
    assert "Traceback" not in err
    subjects = {s.subject: s for s in read_manifest(manifest)}
    for name, status in rows.items():
        out = Path(subjects[name].output)
        if status in ("done", "skipped"):  # a reported output is complete and current
            assert prov.is_up_to_date(out, input_paths=[subjects[name].fixed, *subjects[name].moving])


def test_sigterm_while_a_command_still_loads_its_inputs_exits_130(tmp_path):
    """``register`` sets its cancel handler once the images are loaded; a SIGTERM before that ended it with -15."""
    import subprocess
    import sys

    a, b = _pair(tmp_path)
    script = textwrap.dedent('''
        import sys, time
        import medfuse.cli, medfuse.io
        real = medfuse.io.load
        def slow_load(*args, **kwargs):
            print("loading", flush=True)
            time.sleep(60)
            return real(*args, **kwargs)
        medfuse.io.load = slow_load
        sys.exit(medfuse.cli.main(sys.argv[1:]))
    ''')
    proc = subprocess.Popen([sys.executable, "-c", script, "register", str(a), str(b), "-o", str(tmp_path / "r.nii.gz"),
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "loading"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_CANCELLED, err
    assert "cancelled" in err and "Traceback" not in err
    assert not (tmp_path / "r.nii.gz").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or not hasattr(__import__("os"), "kill"), reason="POSIX signals")
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_after_the_command_ended_exits_130_with_a_line(samples_dir, tmp_path, name):
    """The console script's teardown (torch, tqdm, Dask) takes up to about 0.7 s: a SIGTERM there ended the process
    with -15 and no word, a Ctrl-C with -2, 0 or a traceback from an atexit callback."""
    import subprocess
    import sys

    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from medfuse.cli import main
        sys.argv = ["medfuse", "info", {str(samples_dir / "mr_t1.nii.gz")!r}]
        code = main()
        os.kill(os.getpid(), signal.{name})  # as if it came while Python shuts down
        time.sleep(30)
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_CANCELLED, (done.returncode, done.stderr)
    assert "values" in done.stdout  # what the command printed is out, not lost to os._exit
    assert done.stderr.strip().endswith("interrupted while exiting, after the command had ended (exit code 0); "
                                        "what it wrote is complete")
    assert "Traceback" not in done.stderr
    # main([...]) called by a program (or a test) leaves its handlers alone.
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info", str(samples_dir / "mr_t1.nii.gz")]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
