"""Batch throughput: subjects per minute with 1 versus 2 Dask workers (goal: >= 1.8x on 2 workers).

Phantom subjects (2 mm MR T1 + 3 mm PET, rigid registration, Laplacian fusion) are written once;
then the same subjects are fused by ``medfuse.batch.run_batch`` on a local Dask cluster of 1 worker
(the peer) and of 2 workers, interleaved, best of ``--repeats``. Clusters are started and their
workers warmed up (imports) before timing, so the figure is steady-state throughput; cluster
start-up is printed separately. Each worker is capped to 1 thread (ITK, BLAS, torch).

    .venv/bin/python benchmarks/batch.py [--subjects 8] [--repeats 2] [--method laplacian]

The scaling ratio is only meaningful when the machine has at least 2 idle cores; ``os.cpu_count()``
and the 1-minute load average are printed with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # read when distributed is first imported


def _warm() -> str:
    # Import what a subject needs so that the first timed subject does not pay for it.
    import SimpleITK  # noqa: F401
    import scipy.ndimage  # noqa: F401

    import medfuse.fusion.classical  # noqa: F401
    import medfuse.io.nifti  # noqa: F401
    import medfuse.pipeline  # noqa: F401
    import medfuse.registration  # noqa: F401

    return str(os.getpid())


def _cluster(n: int):
    from dask.distributed import Client, LocalCluster

    from medfuse.batch import THREAD_ENV_VARS

    t0 = time.perf_counter()
    # As medfuse.batch does: no dashboard (its updates steal CPU from the workers).
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR, env={v: "1" for v in THREAD_ENV_VARS})
    client = Client(cluster)
    client.run(_warm)
    return cluster, client, time.perf_counter() - t0


def _run(subjects, cluster, out_dir: Path, method: str) -> float:
    from medfuse.batch import run_batch

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    subs = [dataclasses.replace(s, output=str(out_dir / Path(s.output).name)) for s in subjects]
    t0 = time.perf_counter()
    summary = run_batch(subs, scheduler=cluster.scheduler_address, method=method, report=out_dir / "report.csv")
    wall = time.perf_counter() - t0
    if summary.n_done != len(subs):
        raise SystemExit(f"benchmark run failed:\n{summary.table()}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--method", default="laplacian")
    args = ap.parse_args()

    from medfuse.batch import read_manifest, write_phantom_subjects

    work = Path(tempfile.mkdtemp(prefix="medfuse-bench-batch-"))
    try:
        t0 = time.perf_counter()
        subjects = read_manifest(write_phantom_subjects(work, args.subjects, first_seed=1, register="rigid"))
        print(f"wrote {args.subjects} phantom subjects in {time.perf_counter() - t0:.1f} s ({work})")
        clusters = {}
        for n in (1, 2):
            cluster, client, startup = _cluster(n)
            clusters[n] = (cluster, client)
            print(f"{n}-worker local cluster: start + warm-up {startup:.1f} s")
        best = {1: float("inf"), 2: float("inf")}
        for r in range(args.repeats):
            for n in (1, 2):  # interleaved, so that background load hits both alike
                wall = _run(subjects, clusters[n][0], work / f"out-{n}w-{r}", args.method)
                best[n] = min(best[n], wall)
                print(f"  repeat {r + 1}: {n} worker(s) {wall:6.1f} s  ({60 * args.subjects / wall:5.1f} subjects/min)")
        for cluster, client in clusters.values():
            client.close()
            cluster.close()
        rate = {n: 60.0 * args.subjects / best[n] for n in best}
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\nmachine: {os.cpu_count()} CPUs, 1-min load average {load:.1f}; method {args.method}, rigid registration, "
              f"{args.subjects} subjects (MR 80x96x80 2 mm + PET 64x76x64 3 mm)")
        print(f"1 worker (peer): {rate[1]:.1f} subjects/min   2 workers: {rate[2]:.1f} subjects/min")
        ratio = rate[2] / rate[1]
        print(f"scaling ratio 2 vs 1 workers: {ratio:.2f}x  (goal >= 1.8x) -> {'MET' if ratio >= 1.8 else 'NOT MET'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
