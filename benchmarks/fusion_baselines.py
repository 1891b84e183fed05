"""Fusion baselines on the Harvard pairs, and the speed of medfuse.metrics.score.

1. Fuses the network's validation split of every pair type in ``../shared/data/harvard-pairs``
   (``medfuse.harvard.training_split(val_fraction=0.2, seed=0)``: the split ``medfuse train``
   uses, whose validation cases are the shipped weights' ``val_cases``, also used by
   ``benchmarks/fusion_quality.py`` and ``medfuse evaluate --split val``) with mean, max, Laplacian,
   wavelet and GFF (PET/SPECT through YCbCr), scores each result with medfuse.metrics.score as
   saved 8-bit images, and prints the mean table (Markdown). ``SSIM(dr=2)`` is scikit-image SSIM
   with ``data_range=2``, the convention behind CDDFuse's published SSIM. ``--split val-by-case``
   uses the older joint split ``split_by_case(val_fraction=0.2, seed=0)`` instead (the tables
   published before 2026-12-04; not the network's held-out pairs), ``--split all`` every pair.
2. Times ``score()`` (all 14 metrics) on a 256x256 pair against two named peers measured in
   the same run: scikit-image's ``structural_similarity`` alone (two calls, F-A and F-B) and the
   reference formulation of VIF + MI (``scipy.signal.convolve2d`` with the full 2-D Gaussian
   windows, ``sklearn.metrics.mutual_info_score``), and prints the ratios.

    .venv/bin/python benchmarks/fusion_baselines.py [--limit N] [--split val|val-by-case|all]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDFUSE_SHARED", ROOT.parent / "shared"))
PAIRS = SHARED / "data" / "harvard-pairs"
WEIGHTS_JSON = ROOT / "medfuse" / "fusion" / "weights" / "medfuse_fusion.json"
SPLITS = ("val", "val-by-case", "all")
TABLE = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "SSIM(dr=2)", "PSNR", "CC", "FMI", "MS-SSIM")


def baselines(limit=None, split="val"):
    from medfuse.evaluate import _fuse_2d
    from medfuse.fusion import CLASSICAL_METHODS
    from medfuse.harvard import case_of, list_pairs, load_pair, split_by_case, spread, training_split
    from medfuse.metrics import score

    pairs = list_pairs(PAIRS)
    if split == "val":
        # The network's held-out pairs: split every pair type over all of its pairs, as `medfuse train` did.
        pairs = training_split(pairs, val_fraction=0.2, seed=0)[1]
        found: dict = {}
        for p in pairs:
            found.setdefault(p.pair_type, set()).add(case_of(p.name))
        _check_val_cases(found)
    elif split == "val-by-case":
        pairs = split_by_case(pairs, val_fraction=0.2, seed=0)[1]
    elif split != "all":
        raise SystemExit(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if limit:
        pairs = spread(pairs, limit, per_type=True)
    loaded = [(p, load_pair(p)) for p in pairs]
    results = {}
    for method in CLASSICAL_METHODS:
        t0 = time.perf_counter()
        for p, (mri, other) in loaded:
            # Fused and rounded to 8 bits as medfuse evaluate saves it (ties of the mean rule half-to-even).
            _, f, (a, b) = _fuse_2d([mri, other], method, "cpu", {})
            s = score(f, a, b)
            s["SSIM(dr=2)"] = s["SSIM_r2"]
            results.setdefault((method, p.pair_type), []).append(s)
        print(f"  {method}: {len(loaded)} pairs in {time.perf_counter() - t0:.1f} s", flush=True)
    counts = {}
    for p in pairs:
        counts[p.pair_type] = counts.get(p.pair_type, 0) + 1
    cases = {t: sorted({p.case for p in pairs if p.pair_type == t}) for t in counts}
    print(f"\nsplit {split}: pairs scored {counts}; cases: {cases}\n")
    print("| Pair | Method | " + " | ".join(TABLE) + " |")
    print("|---|---|" + "---|" * len(TABLE))
    for ptype in sorted(counts):
        for method in CLASSICAL_METHODS:
            rows = results[(method, ptype)]
            cells = [f"{np.mean([r[k] for r in rows]):.3f}" for k in TABLE]
            print(f"| {ptype} | {method} | " + " | ".join(cells) + " |")


def _check_val_cases(found):
    """Stop if the split's validation cases are not the shipped weights' recorded ones (the network's tables')."""
    import json

    if not WEIGHTS_JSON.is_file():
        print(f"  (no {WEIGHTS_JSON.name}: validation cases not checked against the shipped weights)")
        return
    recorded = {t: set(c) for t, c in json.loads(WEIGHTS_JSON.read_text())["val_cases"].items()}
    if {t: found.get(t, set()) for t in recorded} != recorded:
        raise SystemExit(f"the validation cases {found} are not the shipped weights' {recorded}")
    shown = {t: sorted(c) for t, c in sorted(recorded.items())}
    print(f"  validation cases = the shipped weights' val_cases: {shown}")


# ---------------------------------------------------------------------- peer: reference formulation
def _peer_vif_pair(ref, dist):
    from scipy.signal import convolve2d

    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        sd = n / 5.0
        t = np.arange(n) - (n - 1) / 2
        win = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sd * sd))
        win /= win.sum()
        if scale > 1:
            ref = convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1, mu2 = convolve2d(ref, win, mode="valid"), convolve2d(dist, win, mode="valid")
        s1 = np.maximum(convolve2d(ref * ref, win, mode="valid") - mu1 ** 2, 0)
        s2 = np.maximum(convolve2d(dist * dist, win, mode="valid") - mu2 ** 2, 0)
        s12 = convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        g = s12 / (s1 + 1e-10)
        sv = np.maximum(s2 - g * s12, 1e-10)
        num += np.sum(np.log10(1 + g * g * s1 / (sv + 2)))
        den += np.sum(np.log10(1 + s1 / 2))
    return num / den


def timing(repeats=5):
    from skimage.metrics import structural_similarity
    from sklearn.metrics import mutual_info_score

    from medfuse.harvard import list_pairs, load_gray
    from medfuse.metrics import mi, score, vif

    p = list_pairs(PAIRS / "CT-MRI")[0]
    a, b = load_gray(p.mri), load_gray(p.other)
    f = np.maximum(a, b)

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_score = best(lambda: score(f, a, b))
    t_ssim = best(lambda: [structural_similarity(f, x, data_range=255) for x in (a, b)])
    t_ours = best(lambda: (vif(f, a, b), mi(f, a, b)))
    t_peer = best(lambda: ([_peer_vif_pair(x, f) for x in (a, b)],
                           [mutual_info_score(f.ravel(), x.ravel()) for x in (a, b)]))
    print(f"\nscore() timing on one 256x256 pair, best of {repeats}:")
    print(f"  medfuse.metrics.score (14 metrics):          {t_score * 1e3:7.1f} ms")
    print(f"  peer: skimage structural_similarity x2 only: {t_ssim * 1e3:7.1f} ms   "
          f"score/peer = {t_score / t_ssim:.2f}")
    print(f"  medfuse VIF + MI:                            {t_ours * 1e3:7.1f} ms")
    print(f"  peer: convolve2d VIF + sklearn MI:           {t_peer * 1e3:7.1f} ms   "
          f"peer/medfuse = {t_peer / t_ours:.1f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="at most N pairs per pair type")
    ap.add_argument("--split", choices=SPLITS, default="val",
                    help="val: the network's validation pairs (training_split, the default); val-by-case: the "
                         "older joint split_by_case split; all: every pair")
    ap.add_argument("--skip-table", action="store_true")
    args = ap.parse_args()
    if not PAIRS.is_dir():
        raise SystemExit(f"needs {PAIRS}")
    if not args.skip_table:
        baselines(args.limit, args.split)
    timing()


if __name__ == "__main__":
    main()
