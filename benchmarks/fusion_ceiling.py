"""What can the images of our Harvard split reach? A per-image optimisation study of the fusion goals.

The fusion goals compare us with anchors measured on another split (CDDFuse's test slices, which are not in
``../shared``). This script asks what the *images of our split* allow: for each validation pair it
optimises the fused image's pixels directly (:func:`medfuse.fusion.targets.optimise_pixels`,
from a chosen start image) and scores the result with the reference metrics of :mod:`medfuse.metrics`, after
rounding to 8 bits like every other table. The optimum is local and depends on the start image, so a result
shows what is reachable, never what is not.

* ``qabf`` objective: the highest Qabf found for that very image pair.
* ``anchor`` objective: a soft minimum of Qabf and VIF, each divided by the issue's anchor for the pair type:
  whether one image can pass both anchors at once.
* ``dominate`` objective: a soft minimum of Qabf, VIF and SSIM, each divided by the best classical rule's
  value on that pair: how far an image can get above every rule on all three metrics at once.

    python benchmarks/fusion_ceiling.py [--types CT-MRI] [--every 3] [--iters 400]
                                        [--objective qabf|anchor|dominate] [--start network|max|gff|mean]
                                        [--family pixels|mixing] [--smooth K]

``--family mixing`` optimises the shipped network's low-resolution selection and gain maps instead of the
pixels: what the network's *architecture* can produce for that pair, before asking whether its encoder can
predict it. ``--smooth K`` (mixing only) restricts the change of those maps to a K×K box average at their
resolution: what a smooth per-image change of the maps can reach.

Measured numbers are in docs/network.md ("What the images allow", "Fourth round", "Fifth round").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _reference_scores(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from medfuse.metrics import qabf, ssim, vif

    f8 = np.round(np.clip(f, 0, 1) * 255.0)
    return np.array([qabf(f8, a * 255.0, b * 255.0), vif(f8, a * 255.0, b * 255.0), ssim(f8, a * 255.0, b * 255.0)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("MEDFUSE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data")
    p.add_argument("--types", nargs="+", default=["CT-MRI", "PET-MRI", "SPECT-MRI"])
    p.add_argument("--every", type=int, default=3, help="take every k-th validation pair")
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--objective", choices=("qabf", "dominate", "anchor"), default="qabf")
    p.add_argument("--start", choices=("network", "max", "gff", "mean"), default="network",
                   help="the image the optimisation starts from (a local optimum depends on it)")
    p.add_argument("--family", choices=("pixels", "mixing"), default="pixels",
                   help="optimise free pixels, or the shipped network's low-resolution selection/gain maps "
                        "(images its architecture can produce; starts from its own maps, so --start is ignored)")
    p.add_argument("--smooth", type=int, default=0,
                   help="mixing family: the maps' change is a K×K box average of free parameters (0: free)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from medfuse.fusion.classical import fuse_arrays as classical
    from medfuse.fusion.infer import default_weights_path, fuse_arrays, load_model
    from medfuse.fusion.targets import ANCHORS, optimise_mixing, optimise_pixels
    from medfuse.fusion.train import case_of, harvard_pairs, load_pair

    torch.set_num_threads(args.threads)
    meta = json.loads((default_weights_path().parent / "medfuse_fusion.json").read_text())
    pairs = harvard_pairs(args.data / "harvard-pairs")
    origin = "the network's own maps" if args.family == "mixing" else f"the {args.start} image"
    if args.family == "mixing" and args.smooth > 1:
        origin += f", changed smoothly ({args.smooth}×{args.smooth} box)"
    print(f"objective {args.objective}, {args.iters} Adam steps per pair on {args.family} from {origin}, "
          f"every {args.every}th validation pair")
    print(f"{'pair':10s} {'n':>3s} | {'rules (best per metric)':>23s} | {'network':>19s} | {'optimised image':>19s}"
          f" | anchor Qabf")
    model = load_model()
    for ptype in args.types:
        val = [p for p in pairs[ptype] if case_of(p[0].name) in set(meta["val_cases"][ptype])][:: args.every]
        rules, net, best = [], [], []
        t0 = time.perf_counter()
        for a_path, b_path in val:
            x = load_pair(a_path, b_path)
            a, b = x[0], x[1]
            per_rule = np.array([_reference_scores(np.clip(classical([a, b], method=m), 0, 1), a, b)
                                 for m in ("max", "mean", "laplacian", "wavelet", "gff")])
            rules.append(per_rule.max(0))
            f_net = fuse_arrays([a, b])
            net.append(_reference_scores(f_net, a, b))
            start = f_net if args.start == "network" else np.clip(classical([a, b], method=args.start), 0, 1)
            ref = np.array(ANCHORS[ptype] + (1.0,)) if args.objective == "anchor" else rules[-1]
            if args.family == "mixing":
                f_opt = optimise_mixing(model, [a, b], objective=args.objective, reference=ref, iters=args.iters,
                                        smooth=args.smooth)
            else:
                f_opt = optimise_pixels(start, [a, b], objective=args.objective, reference=ref, iters=args.iters)
            best.append(_reference_scores(f_opt, a, b))
        r, n, o = (np.mean(v, 0) for v in (rules, net, best))
        fmt = "{:.3f}/{:.3f}/{:.3f}"
        print(f"{ptype:10s} {len(val):3d} | {fmt.format(*r):>23s} | {fmt.format(*n):>19s} | {fmt.format(*o):>19s}"
              f" | {ANCHORS[ptype][0]:.3f}   ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("columns: Qabf/VIF/SSIM means; 'rules' takes each metric's best classical rule per pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
