"""Synthetic hot spots for training: where they go, what they change, and what the loss asks of a fusion."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medfuse.fusion.hotspots import add_hot_spots, hot_spot_loss, spot_contrast  # noqa: E402


def _batch(b=4, size=64):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    head = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2).astype(np.float32)
    mri = head * (0.6 + 0.2 * rng.random((b, size, size)))
    pet = head * 0.3 * np.ones((b, size, size))
    return np.stack([mri, pet], axis=1).astype(np.float32)


def test_spots_go_into_the_functional_input_inside_the_head_and_leave_the_batch_alone():
    x = _batch()
    before = x.copy()
    out, spots = add_hot_spots(x, np.random.default_rng(1), fraction=1.0, dark_core=0.0)
    assert np.array_equal(x, before)  # the caller's batch is not modified
    assert (spots.reshape(len(x), -1).max(1) > 0.99).all()  # one spot per item, peak 1
    peak = spots.reshape(len(x), -1).argmax(1)
    assert (x[:, 1].reshape(len(x), -1)[np.arange(len(x)), peak] > 0).all()  # centred inside the head
    assert np.array_equal(out[:, 0], x[:, 0])  # dark_core=0: the anatomy is untouched
    rise = out[:, 1] - x[:, 1]
    assert rise.min() >= 0 and out.max() <= 1.0
    assert (spot_contrast(torch.from_numpy(out[:, 1]), torch.from_numpy(spots)) > 0.1).all()


def test_a_dark_core_darkens_the_anatomy_under_the_spot_only():
    x = _batch()
    out, spots = add_hot_spots(x, np.random.default_rng(2), fraction=1.0, dark_core=1.0)
    drop = x[:, 0] - out[:, 0]
    assert (drop >= -1e-7).all()
    assert drop[spots > 0.6].mean() > 5 * drop[spots < 0.01].mean() + 1e-3


def test_fraction_zero_adds_nothing():
    x = _batch()
    out, spots = add_hot_spots(x, np.random.default_rng(3), fraction=0.0)
    assert np.array_equal(out, x) and not spots.any()


def test_the_loss_is_zero_for_the_mean_rule_and_positive_for_a_fusion_that_follows_the_mri():
    x, spots = add_hot_spots(_batch(), np.random.default_rng(4), fraction=1.0, dark_core=1.0)
    xt, st = torch.from_numpy(x), torch.from_numpy(spots)
    assert float(hot_spot_loss(xt.mean(1), xt, st)) == 0.0
    assert float(hot_spot_loss(xt.max(1).values, xt, st)) < float(hot_spot_loss(xt[:, 0], xt, st))
    assert float(hot_spot_loss(xt[:, 0], xt, st)) > 0.05
    # Items without a spot do not count; a batch without any gives 0 and still a graph to backpropagate.
    f = xt[:, 0].clone().requires_grad_(True)
    loss = hot_spot_loss(f, xt, torch.zeros_like(st))
    loss.backward()
    assert loss.item() == 0.0 and f.grad is not None
