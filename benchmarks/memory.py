"""Peak memory of the default path (``medfuse fuse CT PET``: load, register, resample, normalise, network
fusion, write) against a named peer: SimpleITK reading the same pair, resampling the PET onto the CT grid and
writing it.

Both run in fresh processes; the peak is each process's own maximum resident set size (``getrusage``).
Printed: each peak in MB and in bytes a CT voxel, and the ratio
medfuse / SimpleITK. A synthetic CT (int16, HU) and PET (float32,
SUV, shifted 3 mm) are written to a temporary folder first (never into the repository).

    .venv/bin/python benchmarks/memory.py [--size clinical|small] [--register none|rigid]

``clinical``: CT 512x512x300 at 0.8x0.8x1.5 mm, PET 200x200x150 at 3 mm (about 2-5 minutes on 2 cores);
``small``: CT 256x256x180 at 1.5x1.5x2.5 mm, PET 120x120x100.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"clinical": ((512, 512, 300), (0.8, 0.8, 1.5), (200, 200, 150), (3.0, 3.0, 3.0)),
         "small": ((256, 256, 180), (1.5, 1.5, 2.5), (120, 120, 100), (3.0, 3.0, 4.5))}

_WRITE = r"""
import ast, sys, numpy as np
from scipy import ndimage
import medfuse
from medfuse.volume import Volume, affine_from_geometry
ct_shape, ct_sp, pet_shape, pet_sp = (ast.literal_eval(a) for a in sys.argv[1:5])
folder = sys.argv[5]
def grid(shape, sp, shift):
    o = [-(n - 1) * s / 2 for n, s in zip(shape, sp)]
    ax = [(o[i] + sp[i] * np.arange(shape[i], dtype=np.float32) - shift[i]) for i in range(3)]
    return ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :], o
def scene(X, Y, Z):
    body = (X / 170) ** 2 + (Y / 120) ** 2 <= 1
    organ = ((X + 40) / 60) ** 2 + ((Y - 10) / 50) ** 2 + ((Z + 40) / 60) ** 2 <= 1
    lesion = (X - 60) ** 2 + (Y - 10) ** 2 + (Z - 20) ** 2 <= 144
    return body, organ, lesion
X, Y, Z, o = grid(ct_shape, ct_sp, (0, 0, 0))
body, organ, lesion = scene(X, Y, Z)
ct = np.where(body, 30, -1000) + np.where(organ, 30, 0)
ct = (ct + np.random.default_rng(0).normal(0, 15, ct_shape)).astype(np.int16)
ct = Volume(ct, affine_from_geometry(ct_sp, o, np.eye(3)), modality="CT", unit="HU")
medfuse.save(ct, f"{folder}/ct.nii.gz")
X, Y, Z, o = grid(pet_shape, pet_sp, (3.0, -2.0, 4.0))
body, organ, lesion = scene(X, Y, Z)
pet = ndimage.gaussian_filter((1.0 * body + 1.5 * organ + 7.0 * lesion).astype(np.float32), 1.5)
pet = Volume(pet, affine_from_geometry(pet_sp, o, np.eye(3)), modality="PT", unit="SUVbw")
medfuse.save(pet, f"{folder}/pet.nii.gz")
"""

_PEER = r"""
import sys, SimpleITK as sitk
ct, pet = sitk.ReadImage(sys.argv[1]), sitk.ReadImage(sys.argv[2])
out = sitk.Resample(sitk.Cast(pet, sitk.sitkFloat32), ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
sitk.WriteImage(out, sys.argv[3], True)
"""


_MEASURED = r"""
import resource, sys
code, sys.argv = sys.argv[1], sys.argv[1:]
try:
    exec(compile(code, "<measured>", "exec"), {"__name__": "__measured__"})
finally:
    print(f"peak_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""

_MEDFUSE = "import sys\nfrom medfuse.cli import main\nrc = main(sys.argv[1:])\nassert rc == 0, rc"


def _peak_mb(code: str, *args: str) -> float:
    """Run ``code`` with ``args`` as ``sys.argv[1:]`` in a fresh process; its peak resident set size in MB."""
    r = subprocess.run([sys.executable, "-c", _MEASURED, code, *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the measured command failed: {r.stderr[-2000:]}")
    kb = [line for line in r.stderr.splitlines() if line.startswith("peak_kb=")][-1]
    return int(kb.split("=")[1]) / 1024.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="clinical")
    p.add_argument("--register", choices=["none", "rigid"], default="none")
    args = p.parse_args(argv)
    ct_shape, ct_sp, pet_shape, pet_sp = SIZES[args.size]
    n = ct_shape[0] * ct_shape[1] * ct_shape[2]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", _WRITE, repr(ct_shape), repr(ct_sp), repr(pet_shape), repr(pet_sp),
                        tmp], check=True)
        ct, pet = f"{tmp}/ct.nii.gz", f"{tmp}/pet.nii.gz"
        peer = _peak_mb(_PEER, ct, pet, f"{tmp}/peer.nii.gz")
        ours = _peak_mb(_MEDFUSE, "fuse", ct, pet, "-o", f"{tmp}/fused.nii.gz", "--register", args.register,
                        "--threads", "2", "--no-progress", "-q")
    print(f"CT {ct_shape} + PET {pet_shape}, register={args.register}")
    print(f"SimpleITK read + resample + write (peer): {peer:7.0f} MB  {peer * 2**20 / n:5.1f} bytes a CT voxel")
    print(f"medfuse fuse (network):                  {ours:7.0f} MB  {ours * 2**20 / n:5.1f} bytes a CT voxel")
    print(f"ratio medfuse / SimpleITK: {ours / peer:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
