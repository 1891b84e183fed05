"""Cancelling the tri-plane network step: its encoder batches and 3-D merge check the cancel token.

At clinical size (CT 512x512x300) ``FusionNet.planes_logits`` ran for tens of seconds without a check, so
SIGTERM, Ctrl-C and napari's Cancel waited for it. These tests count batches run, never seconds.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import medfuse  # noqa: E402
from medfuse.errors import CancelledError  # noqa: E402
from medfuse.fusion import infer  # noqa: E402
from medfuse.fusion.network import ConvexMerge3d, FusionNet  # noqa: E402
from medfuse.progress import CancelToken  # noqa: E402
from medfuse.volume import Volume  # noqa: E402

SHAPE = (40, 36, 32)  # pooled 10 x 9 x 8


def _batches(shape=SHAPE):
    """Encoder batches fuse_3d runs on ``shape``: the three planes' pooled slices, PLANE_BATCH at a time."""
    return sum(-(-(n // 4) // infer.PLANE_BATCH) for n in shape)


def _pair(shape=SHAPE):
    from scipy import ndimage

    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random(shape), 2)
    b = ndimage.gaussian_filter(rng.random(shape), 3)
    return [((x - x.min()) / (x.max() - x.min())).astype(np.float32) for x in (a, b)]


@pytest.fixture
def counted(monkeypatch):
    """Counts of encoder batches, merges and combinations run; ``hook`` runs after each encoder batch."""
    seen = {"batches": 0, "merges": 0, "combines": 0, "hook": None, "merge_hook": None}
    lowres, merge, combine = FusionNet.lowres_logits, ConvexMerge3d.forward, FusionNet.combine
    merge_padded = FusionNet._merge_padded

    def spy_lowres(self, feats):
        out = lowres(self, feats)
        seen["batches"] += 1
        if seen["hook"] is not None:
            seen["hook"](seen["batches"])
        return out

    def spy_merge(self, x):
        out = merge(self, x)
        seen["merges"] += 1
        if seen["merge_hook"] is not None:
            seen["merge_hook"](seen["merges"])
        return out

    def spy_merge_padded(self, x):  # the merge of a few slices (fuse_3d), or of all (a merge_depth)
        out = merge_padded(self, x)
        seen["merges"] += 1
        if seen["merge_hook"] is not None:
            seen["merge_hook"](seen["merges"])
        return out

    def spy_combine(self, *a, **k):
        seen["combines"] += 1
        return combine(self, *a, **k)

    monkeypatch.setattr(FusionNet, "lowres_logits", spy_lowres)
    monkeypatch.setattr(ConvexMerge3d, "forward", spy_merge)
    monkeypatch.setattr(FusionNet, "combine", spy_combine)
    monkeypatch.setattr(FusionNet, "_merge_padded", spy_merge_padded)
    return seen


def test_a_token_cancelled_during_an_encoder_batch_stops_before_the_next(counted):
    token = CancelToken()
    counted["hook"] = lambda n: token.cancel() if n == 1 else None
    with pytest.raises(CancelledError):
        infer.fuse_3d(_pair(), cancel=token)
    # Before: every batch and the merge ran, then the combination's first check raised.
    assert _batches() > 2
    assert counted["batches"] == 1 and counted["merges"] == 0 and counted["combines"] == 0


def test_a_token_cancelled_after_the_last_batch_skips_the_merge(counted):
    token = CancelToken()
    counted["hook"] = lambda n: token.cancel() if n == _batches() else None
    with pytest.raises(CancelledError):
        infer.fuse_3d(_pair(), cancel=token)
    assert counted["batches"] == _batches() and counted["merges"] == 0 and counted["combines"] == 0


def test_a_token_cancelled_during_the_merge_stops_it(counted):
    # The merge runs MERGE_SLICES low-resolution slices at a time, each call a chance to stop.
    token = CancelToken()
    counted["merge_hook"] = lambda n: token.cancel() if n == 1 else None
    with pytest.raises(CancelledError):
        infer.fuse_3d(_pair(), cancel=token)
    assert SHAPE[0] // 4 > infer.MERGE_SLICES  # more than one merge call
    assert counted["batches"] == _batches() and counted["merges"] == 1 and counted["combines"] == 0


def test_a_progress_callback_that_cancels_stops_the_tri_plane_step(counted):
    # napari's worker and the CLI's signal handler cancel from outside; a progress callback is the earliest
    # place a caller hears of the step at all: it is now told after each batch.
    token = CancelToken()
    messages = []

    def progress(fraction, message):
        messages.append((fraction, message))
        if message == "network fusion: tri-plane":
            token.cancel()

    with pytest.raises(CancelledError):
        infer.fuse_3d(_pair(), cancel=token, progress=progress)
    assert counted["batches"] == 1 and counted["merges"] == 0
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions)


def test_medfuse_fuse_on_volumes_passes_the_token_to_the_tri_plane_step(counted):
    a, b = _pair()
    ct = Volume(a, np.eye(4), modality="CT", unit="arbitrary")
    pet = Volume(b * 5.0, np.eye(4), modality="PT", unit="SUVbw")
    token = CancelToken()
    counted["hook"] = lambda n: token.cancel() if n == 2 else None
    with pytest.raises(CancelledError):
        medfuse.fuse(ct, pet, cancel=token)
    assert counted["batches"] == 2 and counted["merges"] == 0 and counted["combines"] == 0


def test_planes_logits_checks_its_token_between_batches(counted):
    model = infer.load_model()
    feats = torch.rand(2, 4, 12, 9, 8, generator=torch.Generator().manual_seed(1))
    token = CancelToken()
    counted["hook"] = lambda n: token.cancel() if n == 2 else None
    with torch.inference_mode(), pytest.raises(CancelledError):
        model.planes_logits(feats, batch=4, cancel=token)  # 3 + 3 + 2 batches
    assert counted["batches"] == 2 and counted["merges"] == 0


def test_an_uncancelled_token_and_progress_change_nothing(counted):
    model = infer.load_model()
    feats = torch.rand(2, 4, 12, 9, 8, generator=torch.Generator().manual_seed(2))
    calls = []
    with torch.inference_mode():
        plain = model.planes_logits(feats, batch=4)
        watched = model.planes_logits(feats, batch=4, cancel=CancelToken(), progress=lambda f, m: calls.append(f))
    assert torch.equal(plain, watched)
    assert len(calls) == 8 and calls == sorted(calls) and calls[-1] < 1.0
    calls.clear()
    with torch.inference_mode():
        by_slice = model.planes_logits(feats, batch=4, merge_depth=1, progress=lambda f, m: calls.append(f))
    assert torch.equal(by_slice, plain)
    assert len(calls) == 8 + 12 and calls == sorted(calls) and calls[-1] < 1.0
    pair = _pair()
    assert np.array_equal(infer.fuse_3d(pair), infer.fuse_3d(pair, cancel=CancelToken(), progress=lambda f, m: None))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method (POSIX)")
def test_a_process_forked_after_a_network_fusion_can_run_one():
    """torch's OpenMP pool does not survive a fork: a multiprocessing child (start method "fork") hung for good in
    its first network fusion after the parent had run one. Forked children get one torch thread, as DataLoader
    workers do."""
    import multiprocessing as mp

    rng = np.random.default_rng(0)
    a, b = (rng.random((24, 24, 24)).astype(np.float32) for _ in range(2))
    here = medfuse.fuse(a, b, method="network")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_fuse_into, args=(q, a, b))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung in its network fusion")
    assert p.exitcode == 0
    np.testing.assert_allclose(q.get(timeout=10), here, atol=1e-5)


def _fuse_into(q, a, b):
    q.put(medfuse.fuse(a, b, method="network"))
