"""What can the images of our Harvard split reach? A per-image optimisation study of the fusion goals.

The fusion goals compare us with anchors measured on another split (CDDFuse's test slices, which are not in
``../shared``). This script asks what the *images of our split* allow: for each validation pair it
optimises the fused image's pixels directly (Adam on the differentiable metrics of ``medfuse.fusion.train``,
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

Measured numbers are in docs/network.md ("What the images allow").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ANCHORS = {"CT-MRI": (0.68, 0.708), "PET-MRI": (0.714, 0.920), "SPECT-MRI": (0.78, 0.97)}  # issue 5: Qabf, VIF


def _reference_scores(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from medfuse.metrics import qabf, ssim, vif

    f8 = np.round(np.clip(f, 0, 1) * 255.0)
    return np.array([qabf(f8, a * 255.0, b * 255.0), vif(f8, a * 255.0, b * 255.0), ssim(f8, a * 255.0, b * 255.0)])


def optimise(start: np.ndarray, a: np.ndarray, b: np.ndarray, *, objective: str, reference: np.ndarray,
             iters: int, lr: float = 0.05) -> np.ndarray:
    """Free-pixel optimisation of a fused image in 0..1 (sigmoid-parametrised) for one pair."""
    import torch

    from medfuse.fusion.train import torch_metrics

    z = torch.logit(torch.from_numpy(np.clip(start, 1e-3, 1 - 1e-3)).float()).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    srcs = [torch.from_numpy(a).float()[None], torch.from_numpy(b).float()[None]]
    ref = torch.tensor(reference, dtype=torch.float32)
    for _ in range(iters):
        m = torch_metrics(torch.sigmoid(z)[None], srcs)
        if objective == "qabf":
            loss = -m["Qabf"][0]
        elif objective == "anchor":
            ratios = torch.stack([m["Qabf"][0], m["VIF"][0]]) / ref[:2]
            loss = torch.logsumexp(-50.0 * ratios, 0) / 50.0
        else:
            ratios = torch.stack([m["Qabf"][0], m["VIF"][0], m["SSIM"][0]]) / ref
            loss = torch.logsumexp(-50.0 * ratios, 0) / 50.0  # minus a soft minimum of the three ratios
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(z).detach().numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--types", nargs="+", default=["CT-MRI", "PET-MRI", "SPECT-MRI"])
    p.add_argument("--every", type=int, default=3, help="take every k-th validation pair")
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--objective", choices=("qabf", "dominate", "anchor"), default="qabf")
    p.add_argument("--start", choices=("network", "max", "gff", "mean"), default="network",
                   help="the image the optimisation starts from (a local optimum depends on it)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from medfuse.fusion.classical import fuse_arrays as classical
    from medfuse.fusion.infer import default_weights_path, fuse_arrays
    from medfuse.fusion.train import case_of, harvard_pairs, load_pair

    torch.set_num_threads(args.threads)
    meta = json.loads((default_weights_path().parent / "medfuse_fusion.json").read_text())
    pairs = harvard_pairs(args.data / "harvard-pairs")
    print(f"objective {args.objective}, {args.iters} Adam steps per pair from the {args.start} image, "
          f"every {args.every}th validation pair")
    print(f"{'pair':10s} {'n':>3s} | {'rules (best per metric)':>23s} | {'network':>19s} | {'optimised image':>19s}"
          f" | anchor Qabf")
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
            f_opt = optimise(start, a, b, objective=args.objective, reference=ref, iters=args.iters)
            best.append(_reference_scores(f_opt, a, b))
        r, n, o = (np.mean(v, 0) for v in (rules, net, best))
        fmt = "{:.3f}/{:.3f}/{:.3f}"
        print(f"{ptype:10s} {len(val):3d} | {fmt.format(*r):>23s} | {fmt.format(*n):>19s} | {fmt.format(*o):>19s}"
              f" | {ANCHORS[ptype][0]:.3f}   ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("columns: Qabf/VIF/SSIM means; 'rules' takes each metric's best classical rule per pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
