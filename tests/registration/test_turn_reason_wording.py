"""The reason a kept turn adds says the headers disagreed only when they do.

A nearly symmetric phantom, both headers axial LPS and identical, kept a 120-degree turn from the start search, and the
warning read "the images' orientation headers disagreed by a turn of 120 degrees about the (1,1,-1) axis, which
registration undid". No registration is run here: the wording is chosen from the two headers and the start's label.
"""

from __future__ import annotations

import numpy as np

from medfuse.phantom import rigid_matrix
from medfuse.registration.register import _same_axes, _turn_kept_reason
from medfuse.volume import Volume

CHECK = "check the moving image's orientation header"


def _vol(affine) -> Volume:
    return Volume(np.zeros((4, 5, 6), np.float32), affine, modality="CT")


def test_identical_axial_headers_agree_and_a_turned_or_flipped_one_does_not():
    axial = np.diag([2.0, 2.0, 3.0, 1.0])
    shifted = axial.copy()
    shifted[:3, 3] = (10.0, -4.0, 7.5)  # another origin and spacing: the axes still point the same way
    shifted[:3, :3] = np.diag([1.0, 1.0, 2.5])
    assert _same_axes(_vol(axial), _vol(shifted))
    turned = rigid_matrix((180, 0, 0), (0, 0, 0), center=(0, 0, 0)) @ axial
    assert not _same_axes(_vol(axial), _vol(turned))
    flipped = axial @ np.diag([1.0, 1.0, -1.0, 1.0])  # a reversed slice axis in the header
    assert not _same_axes(_vol(axial), _vol(flipped))


def test_agreeing_headers_say_the_search_kept_a_turn_not_that_they_disagreed():
    text = _turn_kept_reason("turned 120(1,1,-1)+geometry", headers_agree=True)
    assert text.startswith("the images' orientation headers give the same axis directions"), text
    assert "scored a start turned by 120 degrees about the (1,1,-1) axis better than the headers' placement and " \
           "kept it" in text, text
    assert "check the result" in text and CHECK in text, text
    assert "which registration undid" not in text and "disagreed" not in text, text
    # The same axes are no proof of right headers (a prone scan recorded as supine): the turn may be right, so
    # initialise='none' is offered only for positions known right (the reviewer's upside-down case).
    assert "right when a header misstated the patient's position by that turn" in text, text
    assert "initialise='none' when the recorded positions are known right" in text, text


def test_disagreeing_headers_keep_the_wording_of_a_header_turn():
    text = _turn_kept_reason("turned 180y+geometry")
    assert text.startswith("the images' orientation headers disagreed by a turn of 180 degrees about y, which "
                           "registration undid:"), text
    assert CHECK in text and "mirrored" in text and "headers agree" not in text, text
