"""Synthetic focal uptake for training: PET/SPECT hot spots that the fused image must keep visible.

Why: Qabf and VIF reward following the input with the stronger local structure. A small hot spot in the
functional input, at a place where the MRI shows a darker core with a brighter rim (a necrotic lesion), is
exactly where those metrics prefer the MRI, and a network trained on them alone learns to hide the
uptake (docs/network.md, "Seventh round"). Training pairs therefore get Gaussian hot spots added to the
functional input, half of them over a darkened MRI core, and a loss asks the fused image to show each spot
at least as clearly as the plain mean of the inputs does.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["add_hot_spots", "hot_spot_loss", "spot_contrast"]

#: Gaussian-profile thresholds of a spot's core and of the ring around it (radii ~1.0σ and ~2.1σ-3.0σ).
_CORE, _RING_HI, _RING_LO = 0.6, 0.1, 0.01


def add_hot_spots(batch: np.ndarray, rng: np.random.Generator, *, fraction: float, functional: int = 1,
                  sigma: Tuple[float, float] = (2.0, 5.0), amplitude: Tuple[float, float] = (0.3, 0.6),
                  dark_core: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """Add one hot spot to the functional input of a ``fraction`` of the items of a (B, N, H, W) batch.

    Args:
        batch: inputs in 0..1; not modified (a copy is returned).
        rng: the random stream (the training sampler's, so a resumed run repeats it).
        fraction: probability that an item gets a spot.
        functional: index of the functional (PET/SPECT) input; the others are treated as anatomy.
        sigma: range of the spot's Gaussian width, pixels.
        amplitude: range of the spot's peak, as a fraction of the headroom above the local value.
        dark_core: probability that the anatomical inputs get a darker core under the spot (down to 60-80 %).

    Returns:
        (augmented batch, spot profiles (B, H, W), zero for items without a spot).
    """
    out = batch.copy()
    b, n, h, w = batch.shape
    spots = np.zeros((b, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(b):
        if rng.random() >= fraction:
            continue
        s = float(rng.uniform(*sigma))
        inside = (batch[i].min(axis=0) > 0.05)
        margin = int(np.ceil(3 * s))
        inside[:margin], inside[-margin:], inside[:, :margin], inside[:, -margin:] = False, False, False, False
        cand = np.flatnonzero(inside)
        if cand.size == 0:
            continue
        cy, cx = divmod(int(cand[int(rng.integers(cand.size))]), w)
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)).astype(np.float32)
        f = out[i, functional]
        out[i, functional] = f + float(rng.uniform(*amplitude)) * (1.0 - f) * g
        if rng.random() < dark_core:
            depth = float(rng.uniform(0.2, 0.4))
            for j in range(n):
                if j != functional:
                    out[i, j] = out[i, j] * (1.0 - depth * g)
        spots[i] = g
    return out, spots


def spot_contrast(img, spots):
    """Per item: mean over a spot's core minus mean over the ring around it. img, spots: (B, H, W) tensors."""
    core = (spots > _CORE).to(img.dtype)
    ring = ((spots > _RING_LO) & (spots < _RING_HI)).to(img.dtype)
    mean = lambda m: (img * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)  # noqa: E731
    return mean(core) - mean(ring)


def hot_spot_loss(fused, x, spots):
    """Mean shortfall of the fused spot contrast below that of the mean of the inputs, over items with a spot.

    Args:
        fused: (B, H, W) fused batch.
        x: (B, N, H, W) inputs.
        spots: (B, H, W) profiles from :func:`add_hot_spots` (a tensor on the same device).

    Returns:
        A scalar tensor (0 when no item has a spot).
    """
    has = spots.flatten(1).amax(1) > 0
    if not bool(has.any()):
        return fused.sum() * 0.0
    f, xs, sp = fused[has].float(), x[has].float(), spots[has]
    target = spot_contrast(xs.mean(dim=1), sp)
    return (target - spot_contrast(f, sp)).clamp_min(0.0).mean()
