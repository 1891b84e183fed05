"""The widget opened from the Plugins menu (a proxy viewer), curtain mode beside a 4-D layer,
compare views that keep the data type and follow a new window without a rebuild, an overlay threshold that
really hides what is below it, and layers in micrometres saved in mm."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from medfuse_napari import _overlay  # noqa: E402

pytestmark = pytest.mark.napari


def _blob(shape=(20, 24, 28), seed=0, shift=(0, 0, 0)):
    rng = np.random.default_rng(seed)
    a = np.zeros(shape, np.float32)
    a[4:-4, 5:-5, 6:-6] = 100 + 10 * rng.random((shape[0] - 8, shape[1] - 10, shape[2] - 12))
    a[8:12, 9:13, 10:16] += 150  # a bright block: something to align
    return np.roll(a, shift, axis=(0, 1, 2))


def _real(viewer, name):
    """The layer itself, by iteration (``viewer.layers[name]`` on a proxy viewer is a proxy)."""
    return next(l for l in viewer.layers if l.name == name)


@pytest.fixture
def docked(make_napari_viewer, dock_widget):
    """MR, PET and SPECT blobs in a viewer, and the medfuse widget opened the Plugins-menu way."""
    viewer = make_napari_viewer()
    viewer.add_image(_blob(seed=0), name="mr", scale=(2.0, 2.0, 2.0), metadata={"medfuse": {"modality": "MR"}})
    viewer.add_image(_blob(seed=1, shift=(1, 0, 1)), name="pet", scale=(2.0, 2.0, 2.0),
                     metadata={"medfuse": {"modality": "PT", "unit": "SUVbw"}})
    viewer.add_image(_blob(seed=2), name="spect", scale=(2.0, 2.0, 2.0), metadata={"medfuse": {"modality": "NM"}})
    widget = dock_widget(viewer)
    yield viewer, widget
    for panel in (widget.register_panel, widget.fuse_panel):
        if panel.token is not None:
            panel.token.cancel()


# ------------------------------------------------------------------------------------------ 1. proxy viewer
def test_the_dock_opened_widget_gets_a_proxy_and_its_pickers_give_the_layers_themselves(docked):
    from napari.utils._proxies import PublicOnlyProxy

    viewer, widget = docked
    assert isinstance(widget.viewer, PublicOnlyProxy)  # the situation the fixes are for
    op = widget.overlay_panel
    op.base.set_layer("mr")
    assert op.base.layer() is _real(viewer, "mr")
    assert op.base.layer() is op.base.layer()


def test_fusion_from_the_dock_opened_widget_adds_its_layer(qtbot, docked, monkeypatch):
    viewer, widget = docked
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    fp = widget.fuse_panel
    fp.inputs[0].set_layer("mr")
    fp.inputs[1].set_layer("pet")
    fp.method.setCurrentText("mean")
    n = len(viewer.layers)
    fp.run()
    qtbot.waitUntil(lambda: fp.worker is None, timeout=60_000)
    assert errors == []
    assert len(viewer.layers) == n + 1 and viewer.layers[-1].name == "fused (mean)"


def test_registration_from_the_dock_opened_widget_is_applied(qtbot, docked, monkeypatch):
    viewer, widget = docked
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    rp = widget.register_panel
    rp.fixed.set_layer("mr")
    rp.moving.set_layer("pet")
    rp.kind.setCurrentText("rigid")
    rp.run()
    qtbot.waitUntil(lambda: rp.worker is None, timeout=240_000)
    pet = _real(viewer, "pet")
    assert errors == []
    assert rp.level_label.text() == "done"
    assert "registration" in pet.metadata["medfuse"]
    assert not np.allclose(pet.affine.affine_matrix, np.eye(4))  # the pet was shifted by a voxel: it moved


def test_curtain_from_the_dock_opened_widget_ends_when_its_overlay_is_closed(docked):
    viewer, widget = docked
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("spect")
    op.set_compare("curtain")
    assert any(_overlay._is_compare(l) for l in viewer.layers)
    viewer.layers.remove("spect")
    assert op.compare.currentText() == "overlay"
    assert not any(_overlay._is_compare(l) for l in viewer.layers)
    assert all(l.visible for l in viewer.layers)


def test_flicker_from_the_dock_opened_widget_leaves_the_overlay_visible(docked):
    viewer, widget = docked
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    pet = _real(viewer, "pet")
    op.set_flicker(True)
    op._flick()
    assert not pet.visible  # caught in the hidden phase
    op.set_flicker(False)
    assert pet.visible


def test_compare_views_from_the_dock_opened_widget_reuse_the_resampled_overlay(docked, monkeypatch):
    viewer, widget = docked
    calls = []
    real = _overlay.resample_onto
    monkeypatch.setattr(_overlay, "resample_onto", lambda *a: calls.append(a) or real(*a))
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    op.set_compare("checkerboard")
    op.set_compare("curtain")
    op.curtain.setValue(30)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------ 2. curtain, 4-D
def test_curtain_beside_a_4d_layer_splits_the_base_along_its_own_horizontal_axis(docked, monkeypatch):
    viewer, widget = docked
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer.add_image(np.zeros((3, 20, 24, 28), np.float32), name="fmri", scale=(1.0, 2.0, 2.0, 2.0))
    assert viewer.dims.ndim == 4
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("spect")
    op.curtain.setValue(50)
    op.set_compare("curtain")
    assert errors == [] and op.compare.currentText() == "curtain"
    base = _real(viewer, "compare: base")
    mr = np.asarray(_real(viewer, "mr").data)
    data = np.asarray(base.data)
    low = base.contrast_limits[0]
    # The screen's horizontal axis is the viewer's last one, the base's own axis 2: the split runs across it,
    # the base on the left, the fill (drawn transparent) on the right, where the MR has signal.
    assert np.array_equal(data[:, :, :10], mr[:, :, :10])
    assert (mr[:, :, -10:] > low).any() and (data[:, :, -10:] <= low).all()


# ------------------------------------------------------------------------------------------ 3. compare cost
@pytest.fixture
def ct_pet(make_napari_viewer, dock_widget):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    ct = (rng.random((16, 40, 40)) * 2000 - 1000).astype(np.int16)
    # The PET covers the CT's voxel centres and is never 0: no overlay voxel equals a compare view's fill.
    pet = (rng.random((11, 17, 17)) * 10 + 0.5).astype(np.float32)
    viewer.add_image(ct, name="ct", scale=(2.0, 0.7, 0.7), contrast_limits=(-160, 240),
                     metadata={"medfuse": {"modality": "CT", "unit": "HU"}})
    viewer.add_image(pet, name="pet", scale=(3.0, 1.75, 1.75), contrast_limits=(0, 6), colormap="inferno",
                     blending="additive", metadata={"medfuse": {"modality": "PT", "unit": "SUVbw"}})
    widget = dock_widget(viewer)
    op = widget.overlay_panel
    op.base.set_layer("ct")
    op.overlay.set_layer("pet")
    return viewer, op


def test_compare_layers_keep_the_base_data_type(ct_pet):
    viewer, op = ct_pet
    op.set_compare("checkerboard")
    assert _real(viewer, "compare: base").data.dtype == np.int16
    assert _real(viewer, "compare: overlay").data.dtype == np.float32


@pytest.fixture
def checkerboard(ct_pet, monkeypatch):
    """The ct_pet scene in checkerboard mode, and the list of compare rebuilds made from then on."""
    viewer, op = ct_pet
    op.set_compare("checkerboard")
    builds = []
    real = op._build_compare
    monkeypatch.setattr(op, "_build_compare", lambda *a: builds.append(a) or real(*a))
    return viewer, op, builds


def test_a_new_window_is_copied_onto_the_compare_view_without_a_rebuild(qtbot, checkerboard):
    viewer, op, builds = checkerboard
    ct, pet = _real(viewer, "ct"), _real(viewer, "pet")
    ct.contrast_limits = (-100, 200)
    pet.colormap = "viridis"
    assert not op._rebuild_timer.isActive()  # no rebuild scheduled
    qtbot.wait(op._rebuild_timer.interval() + 100)  # let anything scheduled run
    assert builds == []
    shown = _real(viewer, "compare: base")
    assert tuple(shown.contrast_limits) == (-100, 200)
    assert _overlay.plain_colormap_name(_real(viewer, "compare: overlay").colormap.name) == "viridis"
    # The other image's tiles hold a fill value at or below the window: drawn transparent.
    fill = np.asarray(shown.data)[np.asarray(shown.data) != np.asarray(ct.data)]
    assert fill.size and fill.max() <= shown.contrast_limits[0]
    assert shown.colormap.map(np.array([0.0]))[0, 3] == 0.0


def test_a_window_below_the_fill_value_refills_the_compare_view_in_place(checkerboard):
    viewer, op, builds = checkerboard
    pet, shown = _real(viewer, "pet"), _real(viewer, "compare: overlay")
    resampled = np.asarray(op._overlay_on_base(_real(viewer, "ct"), pet)).astype(shown.data.dtype)
    elsewhere = np.asarray(shown.data) != resampled  # the base's tiles
    low = op._fills["compare: overlay"] - 5.0
    pet.contrast_limits = (low, 6.0)
    assert tuple(shown.contrast_limits) == (low, 6.0)
    assert np.asarray(shown.data)[elsewhere].max() <= low  # still drawn transparent
    assert np.array_equal(np.asarray(shown.data)[~elsewhere], resampled[~elsewhere])  # the overlay's own tiles
    assert builds == [] and not op._rebuild_timer.isActive()


def test_a_window_the_data_type_cannot_fill_below_rebuilds_the_compare_view(make_napari_viewer, dock_widget):
    viewer = make_napari_viewer()
    viewer.add_image(np.arange(8 * 10 * 12, dtype=np.uint16).reshape(8, 10, 12) % 200, name="mr",
                     metadata={"medfuse": {"modality": "MR"}})
    viewer.add_image(_blob((8, 10, 12)), name="pet", metadata={"medfuse": {"modality": "PT"}})
    op = dock_widget(viewer).overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    op.set_compare("checkerboard")
    _real(viewer, "mr").contrast_limits = (-50.0, 150.0)  # below 0: no uint16 value is under it
    assert op._rebuild_timer.isActive()


# ------------------------------------------------------------------------------------------ 4. threshold
@pytest.mark.parametrize("cmap", ["viridis", "gray_r", "turbo", "plasma"])
def test_the_overlay_threshold_draws_nothing_below_it(ct_pet, cmap):
    viewer, op = ct_pet
    op.overlay_cmap.setCurrentText(cmap)
    op.suv_threshold.setValue(2.0)
    pet = _real(viewer, "pet")
    lo, hi = pet.contrast_limits
    assert lo == pytest.approx(2.0)
    rgba = pet.colormap.map(np.array([0.0, 0.5, 1.0]))  # normalised: at the threshold, mid-range, the maximum
    assert rgba[0, 3] == 0.0 and rgba[1, 3] > 0 and rgba[2, 3] > 0
    assert op.overlay_cmap.currentText() == cmap  # the box shows the map the user chose


def test_the_overlay_threshold_leaves_the_rendered_base_untouched_below_it(make_napari_viewer, dock_widget):
    viewer = make_napari_viewer(show=True)  # screenshots need a shown canvas (Xvfb in CI)
    yy, xx = np.mgrid[0:40, 0:40]
    ct = np.broadcast_to(((xx + yy) * 10).astype(np.float32), (5, 40, 40)).copy()
    pet = np.full((5, 40, 40), 1.0, np.float32)  # all below the threshold
    pet[:, 15:25, 15:25] = 5.0  # one lesion above it
    viewer.add_image(ct, name="ct", metadata={"medfuse": {"modality": "CT", "unit": "HU"}})
    viewer.add_image(pet, name="pet", blending="additive", contrast_limits=(0, 6),
                     metadata={"medfuse": {"modality": "PT", "unit": "SUVbw"}})
    op = dock_widget(viewer).overlay_panel
    op.base.set_layer("ct")
    op.overlay.set_layer("pet")
    op.overlay_cmap.setCurrentText("viridis")  # its lowest colour is purple, not black
    op.suv_threshold.setValue(2.0)
    viewer.reset_view()

    def shot():
        return np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)

    with_pet = shot()
    _real(viewer, "pet").visible = False
    base_only = shot()
    changed = np.abs(with_pet - base_only).sum(-1) > 10
    h, w = changed.shape
    # The lesion (the central quarter of the image) changes; the rest of the PET field of view does not.
    assert changed[h // 2, w // 2]
    ring = changed.copy()
    ring[h // 2 - h // 4:h // 2 + h // 4, w // 2 - w // 4:w // 2 + w // 4] = False
    assert ring.mean() < 0.01


# ------------------------------------------------------------------------------------------ 5. writer units
def test_a_layer_in_micrometres_is_saved_in_mm(make_napari_viewer, tmp_path):
    import medfuse

    viewer = make_napari_viewer()
    layer = viewer.add_image(_blob(), name="um", scale=(2.0, 2.0, 2.0), translate=(10.0, 0.0, 0.0),
                             units=("um", "um", "um"))
    layer.save(str(tmp_path / "um.nii.gz"))
    vol = medfuse.load(tmp_path / "um.nii.gz")
    assert np.allclose(vol.spacing, 0.002, rtol=1e-5)
    # napari's world point of voxel (1, 2, 3), in mm, is that voxel in the file (LPS = world reversed), translate too.
    world_mm = np.asarray(layer.data_to_world((1, 2, 3))) / 1000.0
    assert np.allclose(vol.world_to_index(world_mm[::-1]), (1, 2, 3), atol=1e-3)  # the grid keeps napari's order


def test_a_layer_with_a_time_axis_unit_is_refused_in_words(make_napari_viewer, tmp_path):
    from medfuse_napari._writer import LayerSaveError, write_image

    viewer = make_napari_viewer()
    layer = viewer.add_image(_blob(), name="timed", units=("s", "um", "um"))
    data, attributes, _ = layer.as_layer_data_tuple()
    with pytest.raises(LayerSaveError, match="not all lengths") as info:
        write_image(str(tmp_path / "t.nii.gz"), data, attributes)
    assert "Fix:" in str(info.value)
    assert not (tmp_path / "t.nii.gz").exists()


def test_without_torch_the_fuse_panel_offers_only_the_classical_rules(make_napari_viewer, monkeypatch):
    """With medfuse[napari] alone, 'network' was offered as the default and failed with "needs the optional
    package 'torch'"; the panel's own "not available here" tooltip could never show."""
    import sys

    from medfuse_napari import _widget

    assert "network" in _widget.available_methods()  # this environment has torch
    monkeypatch.setitem(sys.modules, "torch", None)  # what a missing package looks like to the import system
    assert _widget.available_methods() == ["mean", "max", "laplacian", "wavelet", "gff"]
    panel = _widget.FusePanel(make_napari_viewer())
    assert panel.method.currentText() == "mean" and "medfuse[ml]" in panel.method.toolTip()
