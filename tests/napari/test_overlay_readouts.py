"""The Overlay tab's readouts (value under the cursor, WW/WL) for keyboard and screen-reader users."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse_napari._overlay import OverlayPanel  # noqa: E402

pytestmark = pytest.mark.napari


def test_cursor_and_window_readouts_are_named_with_their_value_and_reachable_by_keyboard(make_napari_viewer,
                                                                                        samples_dir):
    # The value under the cursor was an empty label with no name, selectable by mouse and focused by click only:
    # a screen-reader user could neither reach it nor hear it.
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    panel = OverlayPanel(viewer)
    readout = panel.cursor_value
    assert readout.accessibleName() == "value under cursor: none" and readout.text() == ""
    viewer.open(str(samples_dir / "ct"), plugin="medfuse")
    viewer.open(str(samples_dir / "pet"), plugin="medfuse")
    for label in (panel.cursor_value, panel.wwwl_readout):
        flags = label.textInteractionFlags()
        assert flags & Qt.TextSelectableByKeyboard and flags & Qt.TextSelectableByMouse
        assert label.focusPolicy() & Qt.TabFocus  # in the Tab chain, not click-only
        assert label.accessibleDescription() == label.toolTip() != ""
    # The CT's brain window, in HU, as the readout shows and names it.
    assert panel.wwwl_readout.text() == "WW 80 / WL 40 HU"
    assert panel.wwwl_readout.accessibleName() == "window of the base: WW 80 / WL 40 HU"

    # The cursor over a PET voxel: the readout's text and name hold both layers' values at that point.
    pet = medfuse.load(samples_dir / "pet")
    ijk = (30, 30, 20)
    lps = pet.index_to_world(np.asarray(ijk, dtype=float))
    viewer.cursor.position = (lps[2], lps[1], lps[0])  # napari world: S, P, L
    text = readout.text()
    assert text == panel.cursor_text() and "HU" in text and "SUVbw" in text
    assert f"pet: {float(pet.array[ijk]):.4g} SUVbw" in text  # the PET's own voxel, in its unit
    assert readout.accessibleName() == f"value under cursor: {text}"
