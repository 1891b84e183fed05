"""An RT dose (unit Gy, modality ``unknown``) counts as functional in the plugin, as PET/SPECT do: the reader draws it
over the CT opened with it, and the pickers of the overlay (Overlay tab) and of the fusion's second input pre-select
it. The Register tab's moving picker does not (registration refuses a dose: it holds no anatomy).

Before: only the modality (PT/NM) made a layer functional, so a dose opened before its CT lay under it, opaque, and
the overlay picker took the second layer, a CT, as the overlay.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse.volume import Volume  # noqa: E402
from medfuse_napari import napari_get_reader  # noqa: E402
from medfuse_napari._layers import is_functional, volume_to_layer  # noqa: E402

pytestmark = pytest.mark.napari

AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


def _ct(bone: float = 1000.0) -> Volume:
    a = np.full((12, 14, 16), -1000.0, np.float32)  # air
    a[2:-2, 2:-2, 2:-2] = 40.0  # soft tissue
    a[2:-2, 2:-2, 2] = bone  # a wall of bone
    return Volume(a, AFFINE, modality="CT", unit="HU")


def _dose() -> Volume:
    d = np.zeros((12, 14, 16), np.float32)
    d[4:8, 5:9, 6:10] = 60.0
    return Volume(d, AFFINE, modality="unknown", unit="Gy")


def _pet() -> Volume:
    p = np.zeros((12, 14, 16), np.float32)
    p[5:7, 6:8, 7:9] = 8.0
    return Volume(p, AFFINE, modality="PT", unit="SUVbw")


VOLUMES = {"ct": _ct, "ct bone": lambda: _ct(2000.0), "dose": _dose, "pet": _pet}


def _open(viewer, names) -> None:
    for name in names:
        data, kwargs, _ = volume_to_layer(VOLUMES[name](), name=name)
        viewer.add_image(data, **kwargs)


def _picked(widget) -> dict:
    rp, fp, op = widget.register_panel, widget.fuse_panel, widget.overlay_panel
    combos = {"base": op.base, "overlay": op.overlay, "fixed": rp.fixed, "moving": rp.moving,
              "fuse 1": fp.inputs[0], "fuse 2": fp.inputs[1]}
    return {role: c.layer().name if c.layer() is not None else None for role, c in combos.items()}


def test_is_functional_reads_the_modality_or_the_unit_of_volumes_layers_and_metadata(make_napari_viewer):
    assert [is_functional(VOLUMES[n]()) for n in ("ct", "dose", "pet")] == [False, True, True]
    assert is_functional({"modality": "NM", "unit": "counts"}) and not is_functional({"modality": "MR"})
    viewer = make_napari_viewer()
    _open(viewer, ["ct", "dose"])
    assert [is_functional(layer) for layer in viewer.layers] == [False, True]
    assert not is_functional(viewer.add_image(np.zeros((4, 4, 4)), name="other plugin"))  # no medfuse metadata


@pytest.mark.parametrize("names, expected", [
    # The dose opened first: the overlay picker took the second layer, the CT. (The Overlay tab then raises the
    # overlay above the base, so the moving picker's second layer is the dose: no other layer to register here.)
    (["dose", "ct"], {"base": "ct", "overlay": "dose", "fixed": "ct", "fuse 1": "ct", "fuse 2": "dose"}),
    # Two CTs before the dose: the overlay picker took the second CT.
    (["ct", "ct bone", "dose"], {"base": "ct", "overlay": "dose", "fixed": "ct", "moving": "ct bone",
                                 "fuse 1": "ct", "fuse 2": "dose"}),
    # A PET is still preferred, also as the moving image; the first functional layer in the list is the overlay.
    (["pet", "ct", "dose"], {"base": "ct", "overlay": "pet", "fixed": "ct", "moving": "pet", "fuse 1": "ct",
                             "fuse 2": "pet"}),
], ids=["dose-then-ct", "two-cts-then-dose", "pet-ct-dose"])
def test_pickers_pre_select_the_dose_as_the_overlay_and_the_ct_as_the_base(make_napari_viewer, dock_widget, qtbot,
                                                                          names, expected):
    viewer = make_napari_viewer()
    _open(viewer, names)
    widget = dock_widget(viewer)
    qtbot.wait(20)  # the overlay panel's raise timer
    picked = _picked(widget)
    assert {role: picked[role] for role in expected} == expected


def test_a_dose_opened_after_the_dock_is_pre_selected_but_a_user_pick_is_kept(make_napari_viewer, dock_widget,
                                                                              qtbot):
    viewer = make_napari_viewer()
    widget = dock_widget(viewer)
    _open(viewer, ["ct", "ct bone"])
    op, fp = widget.overlay_panel, widget.fuse_panel
    index = fp.inputs[1].findText("ct")
    fp.inputs[1].setCurrentIndex(index)
    fp.inputs[1].activated.emit(index)  # the user picks the CT as the fusion's second input
    _open(viewer, ["dose"])
    qtbot.wait(20)
    assert op.overlay.layer().name == "dose"  # the box was filled before the dose came: the preference re-applied
    assert fp.inputs[1].layer().name == "ct"  # a user's pick is never moved


def test_a_dose_opened_with_its_cts_is_drawn_on_top_and_picked_as_the_overlay(tmp_path, make_napari_viewer,
                                                                              dock_widget, qtbot):
    # `napari --stack dose ct ct_bone` (one read of the list): the dose was the bottom layer, under two opaque CTs.
    paths = []
    for name in ("dose", "ct", "ct bone"):
        path = tmp_path / f"{name.replace(' ', '_')}.nii.gz"
        medfuse.save(VOLUMES[name](), path)
        paths.append(str(path))
    layers = napari_get_reader(paths)(paths)
    assert [k["name"] for _, k, _ in layers] == ["ct", "ct_bone", "dose"]
    assert [k.get("visible", True) for _, k, _ in layers] == [True, False, True]  # one CT shown, under the dose
    assert layers[-1][1]["blending"] == "additive"
    viewer = make_napari_viewer()
    for data, kwargs, _ in layers:
        viewer.add_image(data, **kwargs)
    widget = dock_widget(viewer)
    qtbot.wait(20)
    assert (widget.overlay_panel.base.layer().name, widget.overlay_panel.overlay.layer().name) == ("ct", "dose")
