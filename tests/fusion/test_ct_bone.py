"""CT bone beside an MR: the network on CT Volumes keeps the bone bright, as the max rule does.

Why: the learned 3-D choice traded the CT's skull for the MR's dark skull band (the edges of both are where the
field's metrics look), and left 58 % of the phantom's skull darker than 0.12 of the range. CT Volumes now get
the "brighter wins" coarse choice that PT/NM Volumes get (docs/network.md, "Thirty-first round").
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

import medfuse  # noqa: E402
from medfuse.phantom import make_phantom  # noqa: E402


@pytest.fixture(scope="module")
def mr_ct():
    ph = make_phantom(seed=0, misalign={"pet": None, "spect": None})
    return ph.t1, medfuse.resample(ph.ct, ph.t1)


def _dark_bone_fraction(fused, ct):
    bone = np.asarray(ct.array) > 300  # cortical bone in HU
    assert bone.sum() > 1000, "the phantom's skull is missing: the test would prove nothing"
    return float((np.asarray(fused.array)[bone] < 0.12).mean())


def test_the_network_keeps_ct_bone_beside_an_mr(mr_ct):
    mr, ct = mr_ct
    fused = medfuse.fuse(mr, ct)
    assert fused.provenance["network_functional"] is True
    learned = medfuse.fuse(mr, ct, functional=False)  # what CT Volumes got before
    assert _dark_bone_fraction(learned, ct) > 0.3  # the defect, so that the check below means something
    assert _dark_bone_fraction(fused, ct) <= _dark_bone_fraction(medfuse.fuse(mr, ct, method="max"), ct) + 0.01
    # and the brain is still the MR's: the network does not collapse into the max rule there
    brain = (np.asarray(mr.array) > 0) & (np.asarray(ct.array) > 0) & (np.asarray(ct.array) < 80)
    mr01 = np.asarray(medfuse.fuse(mr, mr, method="mean").array)  # the MR on the fusion's 0..1 scale
    assert np.corrcoef(np.asarray(fused.array)[brain], mr01[brain])[0, 1] > 0.8


def test_mr_only_volumes_keep_the_learned_choice(mr_ct):
    mr, _ = mr_ct
    t2 = mr.with_array(np.asarray(mr.array)[::-1].copy())
    assert medfuse.fuse(mr, t2).provenance["network_functional"] is False
