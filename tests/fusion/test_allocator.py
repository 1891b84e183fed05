"""``medfuse.fusion._allocator``: repeated network fusions reuse freed memory instead of page-faulting it anew."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the allocator tuning applies to glibc only")

# Counts the minor page faults of five 256² network fusions after three warm-up calls, in a fresh process
# (the allocator settings are process-wide and set once).
_PROBE = """
import json, resource
import numpy as np
from scipy import ndimage as ndi
from medfuse.fusion import infer, _allocator
rng = np.random.default_rng(0)
xs = [ndi.gaussian_filter(rng.random((256, 256)), 1.5).astype(np.float32) for _ in range(2)]
xs = [(x - x.min()) / (x.max() - x.min()) for x in xs]
for _ in range(3):
    infer.fuse_2d(xs)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    infer.fuse_2d(xs)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5
print(json.dumps({"faults": faults, "tuned": _allocator.keep_freed_memory()}))
"""


def _probe(tuning: str) -> dict:
    env = dict(os.environ, MEDFUSE_MALLOC_TUNING=tuning, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_loading_the_network_stops_per_call_page_faults():
    tuned = _probe("1")
    assert tuned["tuned"] is True
    # About 20 MB of intermediates per call: 3,400-5,700 fresh 4 KiB pages per call when the heap is handed
    # back each time (measured); 0-220 with the tuning.
    assert tuned["faults"] < 1000, tuned


def _thp_always() -> bool:
    """Transparent huge pages for every mapping: then even a trimmed heap costs few (2 MiB) page faults."""
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@glibc
def test_the_tuning_can_be_switched_off():
    off = _probe("0")
    assert off["tuned"] is False
    if not _thp_always():
        # What the tuning removes: with glibc's defaults the intermediates are page-faulted again every call.
        assert off["faults"] > 2000, off
