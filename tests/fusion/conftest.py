"""Fixtures of the ``medfuse train`` tests: a tiny synthetic Harvard folder (64² PNGs), so no shared data."""

from __future__ import annotations

import numpy as np
import pytest


def write_harvard(root, *, types=None, cases=(1, 2), slices=2, size=64, colour=False):
    """``root/harvard-pairs`` holding ``types`` (default: all): ``cases`` × ``slices`` smooth random pairs named
    CASE + 3-digit slice; ``colour`` stores PET/SPECT as RGB (CT stays grey), as the Harvard atlas does."""
    from PIL import Image

    import medfuse.fusion.train as tr

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for ptype in (types or tuple(tr.PAIR_TYPES)):
        other = tr.PAIR_TYPES[ptype]
        for c in cases:
            for k in range(slices):
                blob = np.exp(-((yy - rng.integers(16, 48)) ** 2 + (xx - rng.integers(16, 48)) ** 2) / 150.0)
                mri = (200 * blob + 20 * rng.random((size, size))).astype(np.uint8)
                img = (255 * blob[::-1]).astype(np.uint8)
                if colour and other != "CT":
                    img = np.stack([img, img // 2, 255 - img], -1)
                for sub, array in (("MRI", mri), (other, img)):
                    (root / "harvard-pairs" / ptype / sub).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(array).save(root / "harvard-pairs" / ptype / sub / f"{c}{k:03d}.png")
    return root


@pytest.fixture
def no_volumes(monkeypatch):
    """Leave the 3-D sets (BraTS, SPM12, the phantom: seconds to make) out of training."""
    import medfuse.fusion.train as tr

    monkeypatch.setattr(tr, "volumes_in", lambda folder: [])


@pytest.fixture
def harvard_folder():
    """:func:`write_harvard`, for tests that build a folder of their own."""
    return write_harvard
