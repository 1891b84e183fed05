"""Per-image optimised fusion targets: what the images allow, and a teacher for the network.

A fused image's pixels can be optimised directly (Adam on the differentiable metrics of
:func:`medfuse.fusion.train.torch_metrics`). ``benchmarks/fusion_ceiling.py`` uses this to ask what the
validation images allow; ``medfuse train --ct-target-weight`` uses it on the *training* pairs as a per-image
teacher. The network cannot copy the pixels (it only mixes its inputs' base and detail layers), so the pull
moves its selection maps towards the teacher's, which is the point.

Objectives, each a loss to minimise:

* ``qabf``: Qabf alone;
* ``anchor``: minus a soft minimum of Qabf and VIF, each divided by the reference (the issue's anchors);
* ``dominate``: minus a soft minimum of Qabf, VIF and SSIM, each divided by the reference (the best rules).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ANCHORS", "optimise_pixels", "optimise_mixing", "anchor_targets"]

#: The issue's goals per pair type: (Qabf, VIF) to beat.
ANCHORS = {"CT-MRI": (0.68, 0.708), "PET-MRI": (0.714, 0.920), "SPECT-MRI": (0.78, 0.97)}

_SOFTMIN_SHARPNESS = 50.0


def _adam_on_objective(param, render, sources, *, objective: str, reference: Sequence[float], iters: int,
                       lr: float):
    """Adam on ``param`` so that ``render(param)`` (a (1, H, W) image in 0..1) scores well; returns the image."""
    import torch

    from .train import torch_metrics

    if objective not in ("qabf", "anchor", "dominate"):
        raise ValueError(f"unknown objective {objective!r}: use 'qabf', 'anchor' or 'dominate'")
    param.requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr)
    ref = torch.tensor(np.asarray(reference, dtype=np.float32))
    best, best_img = float("inf"), None
    for step in range(iters + 1):
        img = render(param)
        m = torch_metrics(img, sources)
        if objective == "qabf":
            loss = -m["Qabf"][0]
        else:
            keys = ("Qabf", "VIF") if objective == "anchor" else ("Qabf", "VIF", "SSIM")
            ratios = torch.stack([m[k][0] for k in keys]) / ref[: len(keys)]
            loss = torch.logsumexp(-_SOFTMIN_SHARPNESS * ratios, 0) / _SOFTMIN_SHARPNESS
        if float(loss.detach()) < best:  # Adam can step past the optimum; keep the best image seen (the start included)
            best, best_img = float(loss.detach()), img.detach()[0].numpy().astype(np.float32)
        if step == iters:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best_img


def optimise_pixels(start: np.ndarray, sources: Sequence[np.ndarray], *, objective: str,
                    reference: Sequence[float], iters: int, lr: float = 0.05) -> np.ndarray:
    """Optimise a 2-D fused image's pixels (sigmoid-parametrised, so they stay in 0..1) for one set of sources.

    Args:
        start: the image the optimisation starts from (its local optimum depends on it), values in 0..1.
        sources: the 2-D inputs in 0..1, each shaped like ``start``.
        objective: ``"qabf"``, ``"anchor"`` or ``"dominate"`` (see the module docstring).
        reference: the divisors of the ratios: (Qabf, VIF) for ``anchor``, (Qabf, VIF, SSIM) for ``dominate``.
        iters: Adam steps.
        lr: Adam learning rate on the logits.

    Returns:
        The optimised image, float32 in 0..1.
    """
    import torch

    z = torch.logit(torch.from_numpy(np.clip(start, 1e-3, 1 - 1e-3)).float())[None]
    srcs = [torch.from_numpy(np.asarray(s, dtype=np.float32))[None] for s in sources]
    return _adam_on_objective(z, torch.sigmoid, srcs, objective=objective, reference=reference, iters=iters, lr=lr)


def optimise_mixing(model, sources: Sequence[np.ndarray], *, objective: str, reference: Sequence[float],
                    iters: int, lr: float = 0.1, smooth: int = 0) -> np.ndarray:
    """Optimise, for one set of 2-D sources, the low-resolution selection/gain maps of ``model``'s combination.

    The maps start from the model's own prediction and are then free per pixel (at the model's 1/``factor``
    resolution); the model's full-resolution part (its refinement head, if any, and the combination) renders
    them, so the start is exactly the model's output. The result is an image the model's
    architecture can produce exactly, so it is a teacher the network can in principle match.

    Args:
        model: a :class:`medfuse.fusion.network.FusionNet` (its weights are not changed).
        sources: the 2-D inputs in 0..1, same shape, each side a multiple of ``model.factor``.
        objective, reference, iters, lr: as for :func:`optimise_pixels` (``lr`` on the logits).
        smooth: if > 1, the change to the maps is a ``smooth`` × ``smooth`` box average (at the maps'
            resolution) of the free parameters, so the teacher differs from the model by a smooth map change,
            which a network predicting maps from local features can follow more easily.

    Returns:
        The optimised image, float32 in 0..1.
    """
    import torch

    if smooth > 1 and smooth % 2 == 0:
        raise ValueError(f"smooth must be odd (a centred box), got {smooth}")
    x = torch.from_numpy(np.stack([np.asarray(s, dtype=np.float32) for s in sources]))[None]
    with torch.no_grad():
        base, details, feats = model._features(x)
        logits = model.lowres_logits(feats).detach().clone()
    srcs = [x[:, i] for i in range(x.shape[1])]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)

    def render(delta):
        if smooth > 1:
            delta = torch.nn.functional.avg_pool2d(delta, smooth, 1, smooth // 2, count_include_pad=False)
        return model.render(x, base, details, logits + delta)  # as the model's forward renders its own maps

    try:
        return _adam_on_objective(torch.zeros_like(logits), render, srcs, objective=objective, reference=reference,
                                  iters=iters, lr=lr)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def anchor_targets(pairs: Sequence[Tuple[Path, Path]], *, ptype: str, iters: int, model=None, smooth: int = 0,
                   cache: Optional[Path] = None, log: Callable[[str], None] = lambda _m: None) -> List[np.ndarray]:
    """Per-pair teacher images that aim at both of the pair type's anchors (the ``anchor`` objective).

    Two kinds:

    * ``model`` given: :func:`optimise_mixing`, the model's own selection maps made free per pixel. The
      teacher is an image the architecture can produce, so the network is pulled towards something it can
      reach (on the CT-MRI validation pairs this family reaches Qabf 0.706 / VIF 0.778 from the shipped
      weights' maps, see docs/network.md).
    * no model: :func:`optimise_pixels` from the guided-filter rule's fusion (free pixels; from gff's output
      the per-pixel study passed both CT-MRI anchors, while from the max rule's output it stalled).

    Args:
        pairs: (input A, input B) image paths as :func:`medfuse.fusion.train.harvard_pairs` lists them.
        ptype: the pair type, which picks the anchors.
        iters: Adam steps per pair (100 take about 5 s for a 256² pair on 2 CPU threads).
        model: the network whose output family the teacher is searched in, or None for free pixels.
        smooth: for ``model`` teachers, the box size of :func:`optimise_mixing`'s smooth map change (0: free).
        cache: an ``.npz`` file; targets made with the same pairs, settings and model weights are read from it,
            and new ones are written to it (atomically), so a resumed or later run does not recompute them.
        log: progress messages.

    Returns:
        One float32 image per pair, in the pairs' order.
    """
    from .classical import fuse_arrays as classical
    from .train import load_pair

    settings = f"|{ptype}|{iters}" + (f"|s{smooth}" if smooth > 1 else "")  # smooth 0 keeps the older keys
    h = hashlib.sha256(("|".join(f"{a.name}+{b.name}" for a, b in pairs) + settings).encode())
    if model is not None:
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().numpy().tobytes())
    key = h.hexdigest()[:16]
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                log(f"{ptype} teacher targets read from {cache}")
                return [z[f"t{i}"] for i in range(len(pairs))]
    out = []
    for i, (a, b) in enumerate(pairs):
        x = load_pair(a, b)
        if model is None:
            start = np.clip(classical([x[0], x[1]], method="gff"), 0, 1)
            t = optimise_pixels(start, [x[0], x[1]], objective="anchor", reference=ANCHORS[ptype], iters=iters)
        else:
            t = optimise_mixing(model, [x[0], x[1]], objective="anchor", reference=ANCHORS[ptype], iters=iters,
                                smooth=smooth)
        out.append(t)
        if (i + 1) % 10 == 0 or i + 1 == len(pairs):
            log(f"{ptype} teacher targets: {i + 1}/{len(pairs)}")
    if cache is not None:
        from ..io._atomic import atomic_path

        arrays: Dict[str, np.ndarray] = {f"t{i}": t for i, t in enumerate(out)}
        with atomic_path(cache, overwrite=True) as tmp:  # keeps the .npz suffix, so numpy adds none
            np.savez_compressed(tmp, key=np.array(key), **arrays)
    return out
