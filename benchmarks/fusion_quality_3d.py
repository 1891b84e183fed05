"""Fusion quality on volumes: the tri-plane network beside the max and mean rules, slice by slice on all axes.

For each co-registered volume pair (the 3-D training sets of ``medfuse train``: BraTS 2023 case 00001, the
SPM12 templates at about 1 mm, the phantom's T1 + T2; and the phantom's MR + PET, which no training used)
it prints the mean Qabf / VIF / SSIM over every ``--step``-th slice along each of the three axes (slices
with more than 20 % of the first input non-zero), and the worst per-axis anisotropy gap to the mean rule (a
slice-stacking artefact or stripes raise it). The network runs three times: with the "brighter wins" choice
(``functional=True``, what PT/NM Volumes get), with the stronger-detail coarse pixel rule (``functional=None``,
what arrays of unknown modality get) and without a rule (``functional=False``, what MR-only Volumes get).
Under each pair, the peer ratios: each network choice's Qabf / VIF / SSIM over the best of the max and mean rules on
the same slices (above 1: the network leads). The last block is the phantom PET lesion's core-minus-shell contrast
in 3-D.

    python benchmarks/fusion_quality_3d.py [--data ../shared/data] [--weights W.safetensors] [--step 8] [--limit N]

A short run: ``--step 32 --limit 1`` (BraTS t1c+t2f and the phantom MR+PET, about 2 minutes on 2 CPU cores).

The figures in docs/network.md ("Ninth round", "Sixteenth round") come from this protocol.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAMES = ("BraTS t1c+t2f", "BraTS t1n+t2w", "BraTS t1c+t2w", "SPM T1+PET", "SPM T1+T2", "SPM T1+SPECT",
         "phantom T1+T2")


def phantom_pet():
    """The phantom's T1 and PET (resampled onto it) as Volumes, and both scaled to 0..1 by modality."""
    from medfuse.fusion.normalise import normalise
    from medfuse.phantom import make_phantom
    from medfuse.registration.resample import resample

    ph = make_phantom(seed=0, misalign={"pet": None})
    pet = resample(ph.pet, ph.t1)
    a, _ = normalise(np.asarray(ph.t1.array), modality="MR")
    b, _ = normalise(np.asarray(pet.array), modality="PT", unit=pet.unit)
    return ph, pet, a.astype(np.float32), b.astype(np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("MEDFUSE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data",
                   help="folder holding brats-gli-00001/ and spm12-templates/ (default ../shared/data)")
    p.add_argument("--weights", type=Path, default=None, help="score these weights instead of the shipped ones")
    p.add_argument("--step", type=int, default=8, help="score every STEP-th slice along each axis")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N pairs of the data (the phantom MR+PET is always scored)")
    args = p.parse_args(argv)

    import torch

    import medfuse
    from medfuse.fusion import infer
    from medfuse.fusion.classical import fuse_arrays as rule
    from medfuse.fusion.train import volume_sets
    from medfuse.metrics import anisotropy, sampled_slice_scores
    from medfuse.phantom import lesion_contrast

    torch.set_num_threads(args.threads)
    pairs = []
    if (args.data / "brats-gli-00001").is_dir() and (args.data / "spm12-templates").is_dir():
        sets = volume_sets(args.data.parent)
        pairs = [(n, s[0], s[1]) for n, s in zip(NAMES, sets)]  # the 3-input BraTS set: its first two
    else:
        print(f"no BraTS and SPM12 data under {args.data}: only the phantom pairs are scored (pass --data)")
        from medfuse.fusion.train import _norm01
        from medfuse.phantom import make_phantom

        ph1 = make_phantom(seed=1, misalign={"pet": None, "spect": None})
        pairs = [("phantom T1+T2", _norm01(ph1.t1.array), _norm01(ph1.t2.array))]
    if args.limit is not None:
        pairs = pairs[:max(0, args.limit)]
    ph, pet, a, b = phantom_pet()
    pairs.append(("phantom MR+PET (unseen)", a, b))

    methods = ("network (functional)", "network (rule)", "network (learned)", "max", "mean")
    functional = {"network (functional)": True, "network (rule)": None, "network (learned)": False}
    print(f"per-slice Qabf / VIF / SSIM, every {args.step}th slice on 3 axes; "
          "g: worst anisotropy gap to the mean rule")
    print(f"{'volume pair':24s} " + " ".join(f"{m:>28s}" for m in methods))
    t0 = time.time()
    for name, x, y in pairs:
        ref = anisotropy((x + y) / 2, (x, y))
        cells, scores = [], {}
        for m in methods:
            if m.startswith("network"):
                f = infer.fuse_3d([x, y], weights=args.weights, functional=functional[m])
            else:
                f = np.clip(rule([x, y], method=m), 0, 1)
            q = sampled_slice_scores(f, x, y, step=args.step, metrics=("Qabf", "VIF", "SSIM"))
            gap = float(np.abs(anisotropy(f, (x, y)) - ref).max())
            cells.append(f"{q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f} g{gap:.3f}")
            scores[m] = q[:3]
        print(f"{name:24s} " + " ".join(f"{c:>28s}" for c in cells), flush=True)
        best = [max(scores["max"][k], scores["mean"][k]) for k in range(3)]  # the peer: the better rule per metric
        ratios = [f"{m.split('(')[1][:-1]} " + "/".join(f"{scores[m][k] / best[k]:.3f}" if best[k] else "n/a"
                                                           for k in range(3)) for m in methods[:3]]
        print(f"{'  ratio to best rule':24s} " + ", ".join(ratios), flush=True)

    print("\nphantom PET lesion, core minus shell in 3-D (the hot-spot test needs over half the mean rule's):")
    opts = {"weights": args.weights} if args.weights else {}
    runs = (("network (Volumes: MR + PT)", opts), ("network (rule, functional=None)", {**opts, "functional": None}),
            ("network (learned)", {**opts, "functional": False}),
            ("max", {"method": "max"}), ("mean", {"method": "mean"}))
    for label, kw in runs:
        fused = medfuse.fuse(ph.t1, pet, **kw)
        c = lesion_contrast(fused.array, fused.affine, ph.lesion_center, ph.lesion_radius_mm)
        print(f"  {label:34s} {c:+.3f}")
    print(f"\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
