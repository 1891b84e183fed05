"""Peak memory and time of the network's 2-D path on one large pair (a mammogram's size by default) against a
named peer, the Laplacian-pyramid rule, on the same pair.

Three fresh processes, each timing one fusion of two float32 images in 0..1 and reporting its own maximum
resident set size (``getrusage``):

- ``network``: ``medfuse.fusion.infer.fuse_2d`` as shipped (strips of rows once the image is larger than
  ``STRIP_PIXELS``);
- ``network, whole``: the same with ``STRIP_PIXELS`` raised above the image (how every image was fused before the
  thirty-eighth round);
- ``laplacian``: ``medfuse.fusion.classical.fuse_arrays(method="laplacian")``, the peer.

Printed: seconds and peak MB for each, and the ratios network / laplacian. No file is written.

    .venv/bin/python benchmarks/memory_2d.py [--size 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
import numpy as np
mode, n = sys.argv[1], int(sys.argv[2])
y, x = np.ogrid[:n, :n]
a = (0.5 + 0.3 * np.sin(y / 37.0) * np.cos(x / 25.0)).astype(np.float32)
b = np.random.default_rng(0).random((n, n), dtype=np.float32)
if mode == "laplacian":
    from medfuse.fusion.classical import fuse_arrays
    run = lambda: fuse_arrays([a, b], method="laplacian")
else:
    from medfuse.fusion import infer
    if mode == "whole":
        infer.STRIP_PIXELS = 2 ** 40
    infer.load_model()
    run = lambda: infer.fuse_2d([a, b])
t = time.perf_counter()
out = run()
seconds = time.perf_counter() - t
assert out.shape == (n, n) and np.isfinite(out).all()
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(mode: str, size: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, str(size)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096, help="side of the square pair, pixels (default 4096)")
    args = p.parse_args()
    rows = {name: _run(mode, args.size) for name, mode in
            (("network", "strips"), ("network, whole", "whole"), ("laplacian (peer)", "laplacian"))}
    peer = rows["laplacian (peer)"]
    print(f"2-D pair {args.size}x{args.size}, float32, one fusion per fresh process")
    print(f"{'':18} {'seconds':>8} {'peak MB':>9} {'time / peer':>12} {'memory / peer':>14}")
    for name, r in rows.items():
        print(f"{name:18} {r['seconds']:8.2f} {r['peak_mb']:9.0f} {r['seconds'] / peer['seconds']:12.2f} "
              f"{r['peak_mb'] / peer['peak_mb']:14.2f}")


if __name__ == "__main__":
    main()
