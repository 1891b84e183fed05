"""A kept turned orientation is suspect: the headers disagreed by that turn (or the search kept a turn the headers
do not show), and a flipped axis looks the same.

A curator's PET with its slice order reversed (header unchanged: a reflection) registered onto the T1 turned
180 degrees about y (rotation 179.96, MI -1.002 against -1.019 unmirrored), so the output was mirrored left-right,
and nothing said so. A true misorientation (the header turned 180 degrees) wins the same way and is right: the
images cannot tell the two apart, so both are flagged with one reason that says to check the header.
"""

import warnings

import numpy as np
import pytest

from medfuse.io import load
from medfuse.phantom import rigid_matrix
from medfuse.registration import register
from medfuse.volume import Volume

#: The one reason a kept turn adds (its distinctive phrases).
HEADERS = "orientation headers disagreed by a turn of 180 degrees about"
#: The reason when both headers give the same axes (a reversed slice order with the header unchanged): the start
#: search kept the turn, and the headers did not disagree.
SAME_AXES = "orientation headers give the same axis directions, yet registration's start search scored a start " \
            "turned by 180 degrees about"
CHECK = "check the moving image's orientation header"


@pytest.fixture(scope="module")
def spm():
    from tests.conftest import shared_path

    d = shared_path("data", "spm12-templates")
    return load(d / "T1.nii", modality="MR"), load(d / "PET.nii", modality="PT")


def _register(fixed, moving):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return register(fixed, moving).report


def _only_the_turn_reason(rep, axis, *, same_axes=False):
    assert rep.initialisation.startswith(f"turned 180{axis}+"), rep.initialisation
    assert len(rep.suspect_reasons) == 1 and rep.suspect, rep.suspect_reasons
    reason = rep.suspect_reasons[0]
    said = f"{SAME_AXES} {axis} better" if same_axes else f"{HEADERS} {axis},"
    assert said in reason and CHECK in reason and "mirrored" in reason, reason
    # It cannot know which case it is: it asks for a look, and does not call the result wrong.
    assert "wrong" not in reason, reason


def test_a_reversed_slice_order_that_registers_turned_is_suspect(spm):
    t1, pet = spm
    flipped = Volume(np.ascontiguousarray(pet.array[:, :, ::-1]), pet.affine, modality="PT", unit=pet.unit)
    rep = _register(t1, flipped)
    # A reflection along z is a 180-degree turn about y times a left-right mirror: the turn is all a rigid
    # transform can do.
    assert abs(rep.rotation_deg - 180) < 2, rep.rotation_deg
    _only_the_turn_reason(rep, "y", same_axes=True)  # the header was left as it was: the axes agree


def test_a_true_misorientation_is_flagged_with_the_same_reason(spm):
    t1, pet = spm
    M = rigid_matrix((180, 0, 0), (0, 0, 0), center=pet.center)
    rep = _register(t1, Volume(pet.array, M @ pet.affine, modality="PT", unit=pet.unit))
    assert abs(rep.rotation_deg - 180) < 2, rep.rotation_deg
    _only_the_turn_reason(rep, "x")
    # The unturned PET: no turn kept, nothing said.
    plain = _register(t1, pet)
    assert not plain.initialisation.startswith("turned") and not plain.suspect, plain.suspect_reasons
