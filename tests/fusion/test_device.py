"""Device names are checked by medfuse, not left to torch's internals (medfuse.fusion.device)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medfuse.errors import InvalidInputError  # noqa: E402
from medfuse.fusion import fuse  # noqa: E402
from medfuse.fusion.device import resolve_device  # noqa: E402


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as a laptop without CUDA, whatever the test machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_cpu_and_auto_without_a_gpu(no_gpu):
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    assert resolve_device(torch.device("cpu")) == "cpu"
    assert resolve_device("auto") == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_a_missing_gpu_is_a_clear_error(no_gpu, name):
    with pytest.raises(InvalidInputError, match=r"was asked for.*Fix: use device 'cpu'"):
        resolve_device(name)


def test_a_gpu_index_past_the_last_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(InvalidInputError, match=r"has 2 CUDA GPU.*'cuda:0' \.\. 'cuda:1'"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "cpu:x", ""])
def test_unknown_device_names(name):
    with pytest.raises(InvalidInputError, match="unknown device"):
        resolve_device(name)


def test_fuse_reports_a_missing_gpu_before_any_work(no_gpu):
    a = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    with pytest.raises(InvalidInputError, match="'cuda' was asked for"):
        fuse(a, a[::-1], device="cuda")
    with pytest.raises(InvalidInputError, match="unknown device 'tpu'"):
        fuse(a, a[::-1], device="tpu")
    out = fuse(a, a[::-1], device="auto")
    np.testing.assert_array_equal(out, fuse(a, a[::-1], device="cpu"))


def test_a_fallback_does_not_hide_a_wrong_device(no_gpu):
    from medfuse.fusion.device import check_network_device
    from medfuse.pipeline import FuseStep

    with pytest.raises(InvalidInputError, match="'cuda' was asked for"):
        FuseStep("network", device="cuda", fallback="laplacian")
    with pytest.raises(InvalidInputError, match="'cuda' was asked for"):  # round 29: every method checks it
        FuseStep("laplacian", device="cuda")
    check_network_device("network", "cpu")
    with pytest.raises(InvalidInputError, match="unknown device"):
        check_network_device("mean", "tpu")
    with pytest.raises(InvalidInputError, match="unknown device"):
        check_network_device("network", "tpu")


def test_a_classical_rule_refuses_a_misspelt_device_too():
    """A classical rule ignored the device, so ``device='tpu'`` passed silently (the network refused it)."""
    a = np.random.default_rng(1).random((24, 24))
    with pytest.raises(InvalidInputError, match="unknown device 'tpu'"):
        fuse(a, a.T, method="mean", device="tpu")
    # A rule runs on the CPU whatever the device: "auto" (and a GPU this machine has) gives the CPU's result.
    np.testing.assert_array_equal(fuse(a, a.T, method="mean", device="auto"), fuse(a, a.T, method="mean"))


def test_a_torch_device_is_named_as_the_user_wrote_it(no_gpu):
    a = np.random.default_rng(2).random((32, 32)).astype(np.float32)
    with pytest.raises(InvalidInputError, match=r"device 'cuda:0' was asked for"):
        fuse(a, a.T, device=torch.device("cuda", 0))
    np.testing.assert_array_equal(fuse(a, a.T, device=torch.device("cpu")), fuse(a, a.T))
