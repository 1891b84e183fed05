"""Registration leaves nothing behind: every SimpleITK registration method it made is freed."""
import gc
import warnings

import numpy as np
import pytest

import medfuse

sitk = pytest.importorskip("SimpleITK")


def _pair():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    a = gaussian_filter(rng.random((32, 32, 32)), 2).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    return medfuse.Volume(a, aff, modality="MR"), medfuse.Volume(np.roll(a, 1, axis=0), aff, modality="MR")


def _live_methods() -> int:
    gc.collect()
    return sum(isinstance(o, sitk.ImageRegistrationMethod) for o in gc.get_objects())


@pytest.mark.parametrize("kind", ["rigid", "deformable"])
def test_registration_methods_are_freed_after_each_call(kind):
    """The iteration callbacks referred to their method: a cycle through SimpleITK's command object kept 13
    ImageRegistrationMethods (about 40 KB) alive per rigid call, for the life of the process."""
    fixed, moving = _pair()
    before = _live_methods()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            medfuse.register(fixed, moving, kind=kind)
    assert _live_methods() == before
