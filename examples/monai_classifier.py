"""Fused MR + PET volumes as the input of a MONAI classifier (lesion vs no lesion).

A folder of synthetic subjects (half with a tumour, half without; ``medfuse.phantom``) goes
through a MONAI ``Compose`` that loads each subject's MR and PET, registers the PET onto the
MR, fuses them with medfuse and resizes the fused volume for a small 3-D CNN, which is then
trained for a few steps and evaluated.

    python examples/monai_classifier.py --workdir /tmp/mf_cls --subjects 8 --steps 20

With your own data, replace ``make_subjects`` by a list of ``{"mr": path, "pet": path, "label": 0/1}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def make_subjects(folder: Path, n: int) -> List[Dict[str, Any]]:
    """Write ``n`` phantom subjects (alternating with/without lesion) and return MONAI data items."""
    from medfuse.batch import read_manifest, write_phantom_subjects

    lesion = [i % 2 == 0 for i in range(n)]
    manifest = write_phantom_subjects(folder, n, lesion=lesion, downsample=2)
    return [{"mr": s.fixed, "pet": s.moving[0], "label": int(has)}
            for s, has in zip(read_manifest(manifest), lesion)]


def preprocessing(*, size: int, method: str, fallback: Optional[str]):
    """The MONAI Compose: load -> register PET onto MR -> fuse -> resize -> tensor + label."""
    from monai.transforms import Compose, EnsureTyped, Resized, SelectItemsd

    from medfuse.transforms import FuseModalitiesd, LoadVolumed, RegisterToReferenced

    return Compose([
        LoadVolumed(keys=["mr", "pet"], modality={"mr": "MR", "pet": "PT"}),
        RegisterToReferenced(keys=["pet"], reference_key="mr", kind="rigid", threads=1),
        FuseModalitiesd(keys=["mr", "pet"], output_key="image", method=method, fallback=fallback, delete_keys=True),
        Resized(keys=["image"], spatial_size=(size, size, size)),
        EnsureTyped(keys=["image", "label"]),
        SelectItemsd(keys=["image", "label"]),
    ])


def run(workdir: Path, *, subjects: int = 4, steps: int = 5, size: int = 32, method: str = "laplacian",
        fallback: Optional[str] = "laplacian", batch_size: int = 2, seed: int = 0, verbose: bool = True) -> Dict[str, Any]:
    """Build the data, train a tiny classifier for ``steps`` steps and evaluate it. Returns figures."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.networks.nets import Classifier
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    # Built first: the transforms check their settings (a misspelt method) before any subject is written.
    transform = preprocessing(size=size, method=method, fallback=fallback)
    items = make_subjects(Path(workdir), subjects)
    # CacheDataset runs the deterministic part (load, register, fuse) once per subject.
    ds = CacheDataset(items, transform=transform, num_workers=0, progress=False)
    t_pre = time.perf_counter() - t0
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True)
    model = Classifier(in_shape=(1, size, size, size), classes=2, channels=(8, 16, 32), strides=(2, 2, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses: List[float] = []
    batch_shape = None
    step = 0
    model.train()
    while step < steps:
        for batch in loader:
            x, y = batch["image"].float(), batch["label"].long()
            batch_shape = tuple(x.shape)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if verbose:
                print(f"step {step:3d}  loss {losses[-1]:.4f}")
            if step >= steps:
                break
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in DataLoader(ds, batch_size=batch_size):
            pred = model(batch["image"].float()).argmax(dim=1)
            correct += int((pred == batch["label"].long()).sum())
            total += int(pred.numel())
    out = {"subjects": subjects, "batch_shape": batch_shape, "losses": losses, "accuracy": correct / max(1, total),
           "preprocess_seconds": t_pre, "total_seconds": time.perf_counter() - t0,
           "image_range": (float(ds[0]["image"].min()), float(ds[0]["image"].max()))}
    if verbose:
        print(f"preprocessed {subjects} subjects in {t_pre:.1f} s; batch {batch_shape}; "
              f"accuracy on the training subjects after {steps} steps: {out['accuracy']:.2f} "
              f"(a few steps on a handful of subjects: a smoke test, not a model)")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True, help="folder for the synthetic subjects")
    p.add_argument("--subjects", type=int, default=8, help="number of subjects (half with a lesion)")
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--size", type=int, default=32, help="classifier input size (voxels per side)")
    p.add_argument("--method", default="laplacian", help="fusion method (network, laplacian, ...)")
    args = p.parse_args(argv)
    from medfuse.errors import MedfuseError

    try:
        run(args.workdir, subjects=args.subjects, steps=args.steps, size=args.size, method=args.method)
    except MedfuseError as e:  # a setting or a file medfuse refused: its message and fix, not a traceback
        p.exit(2, f"{p.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
