"""Speed of the fusion network against the Laplacian-pyramid rule on the same inputs.

Prints, for a 256×256 pair and a 256×256×180 volume pair (tri-plane), the median wall time of the
network and of ``classical.fuse_arrays(method="laplacian")``, their ratio, and each one's peak resident
memory (every 3-D measurement runs in a fresh subprocess so the peaks do not mix).

    python benchmarks/fusion_speed.py [--threads 2] [--repeats 5] [--device cpu|cuda] [--shape 256 256 180]
                                      [--weights other.safetensors] [--processes 8]

``--processes N`` times the 2-D pair in N fresh processes and prints each one's median and the spread: on a
busy VM one process's median varies more between processes than within one.

Goals (issue 5): 256² pair ≤ 30 ms and 256×256×180 ≤ 20 s with peak ≤ 3 GB on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _inputs(shape, seed=0):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    out = []
    for k in range(2):
        x = ndi.gaussian_filter(rng.random(shape, dtype=np.float32), 1.5)
        x = (x - x.min()) / (x.max() - x.min())
        out.append(x.astype(np.float32))
    return out


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


def _time_2d(args):
    """Median wall times (ms) of the network and the Laplacian rule on one 256² pair, in this process."""
    from medfuse.fusion.classical import fuse_arrays
    from medfuse.fusion.infer import fuse_2d

    a, b = _inputs((256, 256))
    for _ in range(3):
        fuse_2d([a, b], device=args.device, weights=args.weights, refine=not args.no_refine)
        fuse_arrays([a, b], method="laplacian")
    t_net, t_lap = [], []
    for _ in range(max(3, args.repeats * 4)):
        t = time.perf_counter()
        fuse_2d([a, b], device=args.device, weights=args.weights, refine=not args.no_refine)
        t_net.append(time.perf_counter() - t)
        t = time.perf_counter()
        fuse_arrays([a, b], method="laplacian")
        t_lap.append(time.perf_counter() - t)
    return float(np.median(t_net) * 1e3), float(np.median(t_lap) * 1e3)


def _child(args) -> None:
    """One 3-D measurement in this (fresh) process: prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "2d":
        from medfuse.fusion.infer import load_model

        load_model(args.weights, device=args.device)  # applies the allocator tuning, as in the parent
        n2, l2 = _time_2d(args)
        print(json.dumps({"network_ms": n2, "laplacian_ms": l2}))
        return
    xs = _inputs(tuple(args.shape))
    base = _peak_gb()
    if args.child == "network":
        from medfuse.fusion.infer import fuse_3d, load_model

        load_model(args.weights, device=args.device)
        t = time.perf_counter()
        fuse_3d(xs, device=args.device, batch_size=args.batch_size, weights=args.weights)
        if args.device == "cuda":
            torch.cuda.synchronize()
    else:
        from medfuse.fusion.classical import fuse_arrays

        t = time.perf_counter()
        fuse_arrays(xs, method="laplacian")
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_gb": _peak_gb(), "inputs_peak_gb": base}))


def _child_output(args, which: str) -> str:
    """The JSON line a fresh ``--child which`` process prints."""
    cmd = [sys.executable, __file__, "--child", which, "--threads", str(args.threads), "--device", args.device,
           "--batch-size", str(args.batch_size), "--shape", *map(str, args.shape), "--repeats", str(args.repeats)]
    if args.weights is not None:
        cmd += ["--weights", str(args.weights)]
    if args.no_refine:
        cmd += ["--no-refine"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


def _run_child(args, which: str) -> dict:
    return json.loads(_child_output(args, which))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64, help="3-D slab thickness")
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 180])
    p.add_argument("--skip-3d", action="store_true")
    p.add_argument("--no-refine", action="store_true",
                   help="2-D: skip the weights' full-resolution refinement head (fuse(..., refine=False))")
    p.add_argument("--weights", type=Path, default=None, help="time these weights instead of the shipped ones")
    p.add_argument("--processes", type=int, default=1,
                   help="2-D: repeat the measurement in this many fresh processes and print the spread")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    import torch

    from medfuse.fusion._allocator import ENV, keep_freed_memory
    from medfuse.fusion.infer import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.weights, device=args.device)
    # The 2-D figure depends on it: without, each call page-faults its buffers anew (docs/network.md).
    tuned = "on" if keep_freed_memory() else f"off (not glibc, or {ENV}=0)"
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, "
          f"{sum(p.numel() for p in model.parameters())} parameters, allocator tuning {tuned}")
    if args.processes > 1:
        # One process's median says little on a busy VM: the same code varies 20-35 ms between fresh processes.
        per = [json.loads(_child_output(args, "2d")) for _ in range(args.processes)]
        for i, r in enumerate(per):
            print(f"  process {i + 1}: network {r['network_ms']:6.1f} ms   laplacian {r['laplacian_ms']:6.1f} ms")
        nets = [r["network_ms"] for r in per]
        ratios = [r["network_ms"] / r["laplacian_ms"] for r in per]
        met = sum(v <= 30 for v in nets)
        print(f"256x256 pair over {len(per)} fresh processes:  network {min(nets):.1f}-{max(nets):.1f} ms (median "
              f"{np.median(nets):.1f})   ratio network/laplacian {min(ratios):.2f}-{max(ratios):.2f}   "
              f"(goal <= 30 ms: met in {met} of {len(per)})")
    else:
        n2, l2 = _time_2d(args)
        print(f"256x256 pair:  network {n2:7.1f} ms   laplacian {l2:7.1f} ms   ratio network/laplacian "
              f"{n2 / l2:5.2f}   (goal <= 30 ms: {'met' if n2 <= 30 else 'NOT met'})")
    if args.skip_3d:
        return 0
    shape = "x".join(map(str, args.shape))
    runs = {w: [_run_child(args, w) for _ in range(max(1, args.repeats // 2))] for w in ("network", "laplacian")}
    n3 = float(np.median([r["seconds"] for r in runs["network"]]))
    l3 = float(np.median([r["seconds"] for r in runs["laplacian"]]))
    pn = max(r["peak_gb"] for r in runs["network"])
    pl = max(r["peak_gb"] for r in runs["laplacian"])
    print(f"{shape} volume: network (tri-plane) {n3:6.2f} s, peak {pn:4.2f} GiB   laplacian {l3:6.2f} s, "
          f"peak {pl:4.2f} GiB   ratio network/laplacian {n3 / l3:5.2f}")
    print(f"  goals: <= 20 s: {'met' if n3 <= 20 else 'NOT met'}; peak <= 3 GB: {'met' if pn <= 3 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
