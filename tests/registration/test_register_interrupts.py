"""Ctrl-C (or a notebook's "Interrupt kernel") during :func:`medfuse.register` reaches the caller as a
KeyboardInterrupt, at every stage.

SimpleITK turns an exception raised in a Python command into a RuntimeError ("There was an error executing the
Python Callable") after printing its traceback. Measured on the sample MR + PET (rigid, interrupt_main after
0.5/2/5 s): an interrupt in the coarse polish was swallowed (the registration ran on and returned normally), one in
the optimisation surfaced as "RegistrationError: SimpleITK registration failed ... check the inputs' geometry".
"""
import importlib
import sys
import warnings

import numpy as np
import pytest

import medfuse
from medfuse.errors import CancelledError
from medfuse.progress import CancelToken

reg_mod = importlib.import_module("medfuse.registration.register")  # the package's name is the function

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _smooth(seed=0, shape=(32, 32, 32)):
    from scipy.ndimage import gaussian_filter

    a = gaussian_filter(np.random.default_rng(seed).random(shape), 2)
    return ((a - a.min()) / (a.max() - a.min())).astype(np.float32)


def _pair():
    a = _smooth()
    fixed = medfuse.Volume(a, AFFINE, modality="MR")
    moving = medfuse.Volume(np.roll(a, 2, axis=0), AFFINE, modality="MR")
    return fixed, moving


def _interrupt_at_callback_entry(monkeypatch, stage: str, nth: int):
    """Raise KeyboardInterrupt at the ``nth`` call of a SimpleITK command added from the function ``stage``, before
    medfuse's callback runs: where a real Ctrl-C lands (the first line of the Python callable).

    Returns the list of stages whose commands were called after the interrupt (should stay empty)."""
    import SimpleITK as sitk

    original = sitk.ProcessObject.AddCommand
    state = {"calls": 0, "raised": False, "after": []}

    def add_command(self, event, callback):
        names = set()
        f = sys._getframe(1)
        while f is not None:
            names.add(f.f_code.co_name)
            f = f.f_back
        own = next((n for n in ("_exhaustive", "_polish", "_optimise") if n in names), "other")

        def wrapped():
            if state["raised"]:
                state["after"].append(own)
            if own == stage and not state["raised"]:
                state["calls"] += 1
                if state["calls"] >= nth:
                    state["raised"] = True
                    raise KeyboardInterrupt
            return callback()

        return original(self, event, wrapped)

    monkeypatch.setattr(sitk.ImageRegistrationMethod, "AddCommand", add_command)
    return state


@pytest.mark.parametrize("stage, nth", [("_exhaustive", 3), ("_polish", 2), ("_optimise", 5)])
def test_ctrl_c_in_a_callback_raises_keyboard_interrupt(monkeypatch, capfd, stage, nth):
    """Without the fix: "_polish" returned a result, "_optimise" raised RegistrationError, and SimpleITK printed the
    interrupt's traceback to stderr."""
    fixed, moving = _pair()
    state = _interrupt_at_callback_entry(monkeypatch, stage, nth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):
            medfuse.register(fixed, moving, kind="rigid")
    assert state["raised"], f"no command of {stage} ran"
    assert state["after"] == [], "the registration ran on after the interrupt"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    monkeypatch.undo()
    # Nothing left behind: the next registration runs normally.
    assert getattr(reg_mod._CAUGHT, "box", None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert medfuse.register(fixed, moving, kind="rigid").report.iterations_per_level


def test_keyboard_interrupt_from_the_progress_callback_stops_the_optimisation(capfd):
    """A progress callback (a UI) raising KeyboardInterrupt inside an iteration: it came back as RegistrationError."""
    fixed, moving = _pair()
    seen = []

    def progress(frac, msg):
        seen.append(msg)
        if "iteration 3" in msg:
            raise KeyboardInterrupt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):
            medfuse.register(fixed, moving, kind="rigid", progress=progress)
    assert "iteration 3" in seen[-1], seen[-3:]  # stopped at once: no progress after the interrupt
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def test_a_cancel_token_still_raises_cancelled_error():
    """The CLI's first Ctrl-C sets a CancelToken: that path keeps its CancelledError."""
    fixed, moving = _pair()
    token = CancelToken()

    def progress(frac, msg):
        if "iteration 2" in msg:
            token.cancel()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CancelledError):
            medfuse.register(fixed, moving, kind="rigid", progress=progress, cancel=token)
