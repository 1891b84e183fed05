"""Fusion quality on the Harvard validation split: the network beside every classical rule, per pair type.

The split is the one the shipped network was trained with (by case; the validation cases are recorded in
``medfuse/fusion/weights/medfuse_fusion.json`` and were never used for training). Every metric of
:func:`medfuse.metrics.score` is computed on the grey (luma) images on the 0–255 scale, with the fused image
rounded to 8 bits, plus ``SSIM_r2``, the SSIM with ``data_range=2`` that CDDFuse's published values used.
Two identity baselines are scored beside them: ``copy-a`` (the MRI unchanged) and ``copy-b`` (the CT/PET/SPECT
unchanged), as ``medfuse evaluate --methods copy-a,copy-b`` scores them. They are no fusion, yet VIF, SSIM and MI
sum over the sources (F = A scores about 1 + f(A, B)) and Qabf rewards copying the edge-rich source, so a copy
meets several of the anchors; a fusion's figure means something only beside theirs (docs/fusion.md).
The last lines print, per pair type, the network's ratio to the best classical rule, to the better copy and to
issue 5's anchors (the benchmark's own targets, ``ANCHORS`` below; not CDDFuse's published figures).

    python benchmarks/fusion_quality.py [--limit N] [--data ../shared/data] [--weights candidate.safetensors]
                                        [--functional]

``--weights`` scores candidate weights (their ``medfuse_fusion.json`` beside them names the validation
cases) on the same split, without touching the shipped file. ``--functional`` adds a row ``net-functional``
for PET/SPECT–MRI: the network with ``functional=True`` (coarse details by the pixel rule, which keeps hot
spots visible), to show what that safety costs on these metrics.
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

ANCHORS = {  # issue 5's targets, (Qabf, VIF, SSIM_r2) to beat; a copy of one source meets most of them
    "CT-MRI": (0.68, 0.708, 1.34), "PET-MRI": (0.714, 0.920, 1.49), "SPECT-MRI": (0.78, 0.97, 1.48),
}
SHOW = ("Qabf", "VIF", "SSIM", "SSIM_r2", "MI", "EN", "SD", "SF", "AG", "SCD", "CC", "PSNR", "FMI", "MS-SSIM")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("MEDFUSE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data")
    p.add_argument("--limit", type=int, default=None, help="at most this many validation pairs per type")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", type=Path, default=None, help="score these weights instead of the shipped ones")
    p.add_argument("--json", type=Path, default=None, help="also write the table here")
    p.add_argument("--functional", action="store_true",
                   help="also score the network with functional=True on PET/SPECT-MRI (row net-functional)")
    args = p.parse_args(argv)

    import torch

    from medfuse.fusion.classical import METHODS, fuse_arrays as classical
    from medfuse.fusion.infer import default_weights_path, fuse_2d, weights_sha256
    from medfuse.fusion.train import case_of, harvard_pairs, load_pair
    from medfuse.harvard import spread
    from medfuse.metrics import score

    torch.set_num_threads(args.threads)
    wpath = args.weights or default_weights_path()
    meta = json.loads((wpath.parent / "medfuse_fusion.json").read_text())
    pairs = harvard_pairs(args.data / "harvard-pairs")
    print(f"weights sha256 {weights_sha256(wpath)[:16]}…; validation cases {meta['val_cases']}")
    table = {}
    t0 = time.time()
    for ptype, items in pairs.items():
        val = [pp for pp in items if case_of(pp[0].name) in set(meta["val_cases"][ptype])]
        val = spread(val, args.limit or None)
        acc: dict = {}
        for a_path, b_path in val:
            x = load_pair(a_path, b_path)
            fused = {"network": fuse_2d([x[0], x[1]], weights=wpath)}
            if args.functional and ptype != "CT-MRI":
                fused["net-functional"] = fuse_2d([x[0], x[1]], weights=wpath, functional=True)
            for m in METHODS:
                fused[m] = np.clip(classical([x[0], x[1]], method=m), 0, 1)
            fused["copy-a"], fused["copy-b"] = x[0], x[1]  # identity baselines: no fusion at all
            srcs = (x[0] * 255.0, x[1] * 255.0)
            for m, f in fused.items():
                f8 = np.round(f * 255.0)
                s = score(f8, *srcs)
                for k, v in s.items():
                    acc.setdefault(m, {}).setdefault(k, []).append(float(v))
        table[ptype] = {"n_pairs": len(val),
                        "methods": {m: {k: float(np.nanmean(v)) for k, v in d.items()} for m, d in acc.items()}}
    print(f"scored in {time.time() - t0:.0f} s\n")
    head = f"{'pair':10s} {'method':10s} " + " ".join(f"{k:>7s}" for k in SHOW)
    for ptype, block in table.items():
        print(f"{ptype}: {block['n_pairs']} validation pairs")
        print(head)
        for m, d in block["methods"].items():
            print(f"{ptype:10s} {m:10s} " + " ".join(f"{d.get(k, float('nan')):7.3f}" for k in SHOW))
        print()
    print("network vs the best classical rule, the better copy and the anchors (ratio > 1 means the network is "
          "ahead):")
    for ptype, block in table.items():
        rows = block["methods"]
        net = rows["network"]
        parts = []
        for k in ("Qabf", "VIF", "SSIM", "MI"):
            best_m = max((m for m in rows if m in METHODS), key=lambda m: rows[m][k])
            best_c = max(("copy-a", "copy-b"), key=lambda m: rows[m][k])
            parts.append(f"{k} {net[k] / rows[best_m][k]:.3f}x {best_m}, {net[k] / rows[best_c][k]:.3f}x {best_c}")
        q, v, s2 = ANCHORS[ptype]
        parts.append(f"| anchors: Qabf {net['Qabf'] / q:.3f}x, VIF {net['VIF'] / v:.3f}x, SSIM_r2 {net['SSIM_r2'] / s2:.3f}x,"
                     f" MI vs mean {net['MI'] / rows['mean']['MI']:.3f}x")
        print(f"  {ptype:10s} " + ", ".join(parts))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
