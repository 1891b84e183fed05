"""Dock-widget tests (headless under Xvfb): registration, fusion, overlay controls, screenshots, cancel."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from medfuse.phantom import load_ground_truth  # noqa: E402
from medfuse_napari._layers import R4, layer_matrix, layer_to_volume, lps_to_world  # noqa: E402
from medfuse_napari._sample_data import load_phantom  # noqa: E402
from medfuse_napari import _widget  # noqa: E402
from medfuse_napari._widget import MedfuseWidget  # noqa: E402

pytestmark = pytest.mark.napari


@functools.lru_cache(maxsize=1)
def _phantom_layers():
    return load_phantom()  # read the sample files once for the whole module


@pytest.fixture
def workstation(make_napari_viewer):
    viewer = make_napari_viewer(show=True)  # screenshots need a shown canvas (Xvfb in CI)
    for data, kwargs, _ in _phantom_layers():
        viewer.add_image(data, **{**kwargs, "metadata": {"medfuse": dict(kwargs["metadata"]["medfuse"])}})
    widget = MedfuseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="medfuse")
    yield viewer, widget
    panel = widget.register_panel
    if panel.token is not None:
        panel.token.cancel()


def _pet_world_error_mm(viewer) -> float:
    """Mean distance (mm) over the MR head between where napari shows PET and where the ground truth puts it.

    Same measure as the core registration test (mean target registration error over t1 > 60th percentile).
    """
    pet, t1 = viewer.layers["pet"], layer_to_volume(viewer.layers["t1"])
    gt = load_ground_truth()["mr_to_pet"]
    shown = R4 @ layer_matrix(pet.scale, pet.translate, pet.affine.affine_matrix)  # PET voxel -> LPS world
    native = R4 @ layer_matrix(pet.scale, pet.translate)  # PET voxel -> PET scanner LPS
    world_to_pet = native @ np.linalg.inv(shown)  # what the layer's transform says
    head = t1.array > np.percentile(t1.array, 60)
    pts = np.c_[t1.index_to_world(np.argwhere(head)[::53]), np.ones(int(np.ceil(head.sum() / 53)))]
    return float(np.linalg.norm((pts @ world_to_pet.T - pts @ gt.T)[:, :3], axis=1).mean())


def _run_registration(qtbot, widget, *, kind="rigid", timeout_ms=120_000):
    panel = widget.register_panel
    panel.fixed.set_layer("t1")
    panel.moving.set_layer("pet")
    panel.kind.setCurrentText(kind)
    return _run_counting_ticks(qtbot, panel, timeout_ms=timeout_ms)


def _run_counting_ticks(qtbot, panel, *, timeout_ms=120_000):
    """Start a panel's job and wait for it, counting 20 ms Qt timer ticks: (ticks, t_start, t_end)."""
    from qtpy.QtCore import QTimer

    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    t0 = time.perf_counter()
    panel.run()
    assert panel.worker is not None  # returned at once: the work is in a thread
    qtbot.waitUntil(lambda: panel.worker is None, timeout=timeout_ms)
    timer.stop()
    return ticks, t0, time.perf_counter()


def test_register_pet_to_mr_through_widget(qtbot, workstation, tmp_path):
    viewer, widget = workstation
    before = _pet_world_error_mm(viewer)
    ticks, t0, t1 = _run_registration(qtbot, widget)
    panel = widget.register_panel
    assert panel.result is not None, panel.level_label.text()
    # The Qt event loop kept ticking while registering (a blocked UI would stop for the whole registration, seconds;
    # on a loaded 2-core machine single gaps reach ~0.5 s, so the bound leaves room for that and nothing more).
    gaps = np.diff([t0, *ticks, t1])
    assert len(ticks) > (t1 - t0) / 0.25 and gaps.max() < 1.5, (len(ticks), t1 - t0, gaps.max())
    print(f"registration {t1 - t0:.2f} s, {len(ticks)} ticks of 20 ms, longest gap {gaps.max() * 1000:.0f} ms")
    # Applied as the layer's affine (no resampling): the PET data are untouched, the layer moved.
    pet = viewer.layers["pet"]
    assert pet.data.shape == _phantom_layers()[3][0].shape
    assert before > 5.0
    err = _pet_world_error_mm(viewer)
    print(f"mean error over the head: {before:.2f} mm before, {err:.3f} mm after")
    assert err < 1.0
    # Report shown, progress complete, transform saved.
    assert "stop reason" in panel.report_view.toPlainText()
    assert "suspect" in panel.suspect_label.text().lower()
    assert panel.progress.value() == 1000
    assert pet.metadata["medfuse"]["registration"]["to"] == "t1"
    saved = panel.save_transform(str(tmp_path / "pet_to_mr.tfm"))
    import medfuse

    np.testing.assert_allclose(medfuse.load_transform(saved).matrix, panel.result.transform.matrix, atol=1e-6)


def test_resample_on_request_adds_layer_on_fixed_grid(qtbot, workstation):
    viewer, widget = workstation
    widget.register_panel.resample_box.setChecked(True)
    _run_registration(qtbot, widget)
    layer = viewer.layers["pet on t1"]
    assert layer.data.shape == viewer.layers["t1"].data.shape
    np.testing.assert_allclose(layer.scale, viewer.layers["t1"].scale)
    np.testing.assert_allclose(layer.translate, viewer.layers["t1"].translate)
    # Voxel for voxel what the ground truth gives on the MR's display grid.
    truth = _pet_resampled_with_truth(viewer, load_ground_truth()).array
    assert np.corrcoef(layer.data.ravel(), truth.ravel())[0, 1] > 0.98
    assert np.abs(layer.data - truth).mean() < 0.05 * truth.max()
    # The report that made these voxels stays with them (the writer puts it in the saved file's sidecar).
    report = layer.metadata["medfuse"]["registration"]
    assert report["resampled_onto"] == "t1" and report["metric_after"] < report["metric_before"]


def test_registration_onto_a_registered_fixed_layer_composes(qtbot, workstation):
    viewer, widget = workstation
    # Move the MR by a known rigid transform (as if registered to something else): PET must follow it.
    shift = np.eye(4)
    shift[:3, 3] = [12.0, -8.0, 5.0]  # LPS mm: MR physical -> world
    viewer.layers["t1"].affine = lps_to_world(shift)
    _run_registration(qtbot, widget)
    pet = viewer.layers["pet"]
    gt = load_ground_truth()["mr_to_pet"]
    native = R4 @ layer_matrix(pet.scale, pet.translate)
    shown = R4 @ layer_matrix(pet.scale, pet.translate, pet.affine.affine_matrix)
    expected = shift @ np.linalg.inv(gt) @ native
    centre = np.r_[np.asarray(pet.data.shape) / 2, 1]
    assert np.linalg.norm((shown - expected) @ centre) < 1.5


@pytest.mark.parametrize("when", ["initialising", "level"])
def test_cancel_stops_registration_within_2s(qtbot, workstation, when):
    viewer, widget = workstation
    panel = widget.register_panel
    panel.fixed.set_layer("t1")
    panel.moving.set_layer("pet")
    panel.kind.setCurrentText("deformable")
    panel.run()
    qtbot.waitUntil(lambda: when in panel.level_label.text(), timeout=60_000)
    t0 = time.perf_counter()
    panel.cancel_button.click()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=10_000)
    latency = time.perf_counter() - t0
    print(f"cancel during {when!r}: stopped after {latency:.3f} s")
    assert latency < 2.0
    assert panel.level_label.text() == "cancelled" and panel.result is None
    np.testing.assert_allclose(viewer.layers["pet"].affine.affine_matrix, np.eye(4))  # nothing applied
    assert panel.run_button.isEnabled()


def _apply_ground_truth(viewer):
    gt = load_ground_truth()
    viewer.layers["pet"].affine = lps_to_world(np.linalg.inv(gt["mr_to_pet"]))
    return gt


def test_fuse_adds_layer_with_base_geometry_and_provenance(qtbot, workstation):
    fusion = pytest.importorskip("medfuse.fusion", reason="medfuse.fusion has not landed yet")
    if not hasattr(fusion, "fuse"):
        pytest.skip("medfuse.fusion.fuse has not landed yet")
    viewer, widget = workstation
    _apply_ground_truth(viewer)
    panel = widget.fuse_panel
    panel.inputs[0].set_layer("t1")
    panel.inputs[1].set_layer("pet")
    panel.method.setCurrentText("laplacian")  # ~2 s on the phantom: long enough to watch the event loop
    n = len(viewer.layers)
    ticks, t0, t1 = _run_counting_ticks(qtbot, panel)
    gaps = np.diff([t0, *ticks, t1])
    print(f"fusion {t1 - t0:.2f} s, longest event-loop gap {gaps.max() * 1000:.0f} ms")
    # The UI never froze: it ticked throughout (scipy calls that hold the GIL give single gaps of 0.3-0.8 s).
    assert gaps.max() < 2.0 and len(ticks) > (t1 - t0) / 0.25, (len(ticks), t1 - t0, gaps.max())
    assert len(viewer.layers) == n + 1, panel.status.text()
    fused = viewer.layers[-1]
    t1 = viewer.layers["t1"]
    assert fused.data.shape == t1.data.shape
    np.testing.assert_allclose(fused.scale, t1.scale)
    np.testing.assert_allclose(fused.translate, t1.translate)
    prov = fused.metadata["medfuse"]["provenance"]["fusion"]
    assert prov["method"] == "laplacian" and prov["inputs"] == ["t1", "pet"]


def test_fuse_with_one_layer_is_a_notification(workstation, monkeypatch):
    viewer, widget = workstation
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    panel = widget.fuse_panel
    panel.inputs[0].set_layer("t1")
    panel.inputs[1].set_layer("t1")
    n = len(viewer.layers)
    panel.run()
    assert panel.worker is None and len(viewer.layers) == n
    assert shown and "Fix:" in shown[0]


def test_window_level_presets_and_readout(workstation):
    viewer, widget = workstation
    ov = widget.overlay_panel
    ov.base.set_layer("ct")
    ov.set_window("lung")
    assert tuple(viewer.layers["ct"].contrast_limits) == (-1350.0, 150.0)
    assert ov.wwwl_readout.text() == "WW 1500 / WL -600 HU"
    ov.window_preset.setCurrentText("bone")
    assert tuple(viewer.layers["ct"].contrast_limits) == (-700.0, 1300.0)
    viewer.layers["ct"].contrast_limits = (0, 80)  # e.g. napari's own slider: the readout follows
    assert ov.window_preset.currentText() == "brain" and ov.ww.value() == 80 and ov.wl.value() == 40


def test_suv_range_threshold_opacity_colormap(workstation):
    viewer, widget = workstation
    ov = widget.overlay_panel
    ov.overlay.set_layer("pet")
    pet = viewer.layers["pet"]
    assert tuple(pet.contrast_limits) == (0.0, 6.0) and pet.blending == "additive"
    ov.suv_max.setValue(10.0)
    ov.suv_threshold.setValue(2.5)
    assert tuple(pet.contrast_limits) == (2.5, 10.0)
    ov.opacity.setValue(30)
    assert pet.opacity == pytest.approx(0.3)
    ov.overlay_cmap.setCurrentText("hot")
    assert pet.colormap.name == "hot"


def test_value_under_cursor_in_layer_units(workstation):
    viewer, widget = workstation
    gt = _apply_ground_truth(viewer)
    ov = widget.overlay_panel
    ov.base.set_layer("ct")
    ov.overlay.set_layer("pet")
    lesion = gt["lesion"]["center_lps_mm"][::-1]  # LPS -> napari (S, P, L)
    text = ov.cursor_text(lesion)
    assert "HU" in text and "SUVbw" in text
    suv = float(text.split("pet:")[1].split()[0])
    assert suv > 10  # the lesion is the hottest structure of the phantom (SUV 16-20 before blurring)


def _pet_resampled_with_truth(viewer, gt):
    import medfuse

    pet, t1 = viewer.layers["pet"], viewer.layers["t1"]
    return medfuse.resample(layer_to_volume(pet, registered=False), layer_to_volume(t1, registered=False),
                            transform=medfuse.Transform.from_matrix(gt["mr_to_pet"]))


def _add_pet_resampled_on_mr(viewer, gt):
    """PET resampled onto the MR grid with the true transform: exact slices (napari ignores out-of-plane
    rotation when it slices a layer with a rotated affine)."""
    pet, t1 = viewer.layers["pet"], viewer.layers["t1"]
    res = _pet_resampled_with_truth(viewer, gt)
    return viewer.add_image(res.array, name="pet on t1", scale=t1.scale, translate=t1.translate,
                            colormap=pet.colormap, contrast_limits=pet.contrast_limits, blending=pet.blending,
                            opacity=pet.opacity, metadata={"medfuse": dict(pet.metadata["medfuse"])})


def _focus_lesion(viewer, gt, visible=("ct", "pet on t1")):
    for layer in viewer.layers:
        layer.visible = layer.name in visible
    centre = gt["lesion"]["center_lps_mm"][::-1]
    viewer.reset_view()
    viewer.dims.set_point(0, float(centre[0]))
    viewer.camera.center = tuple(float(c) for c in centre)
    viewer.camera.zoom = viewer.camera.zoom * 1.5
    return centre


def _shot(viewer):
    return np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)


def test_screenshot_hot_colormap_over_lesion(workstation):
    viewer, widget = workstation
    gt = load_ground_truth()
    _add_pet_resampled_on_mr(viewer, gt)
    widget.overlay_panel.overlay.set_layer("pet on t1")
    widget.overlay_panel.set_suv_range(20.0)  # a lesion-reading range: grey matter (SUV 8) is not saturated
    _focus_lesion(viewer, gt)
    with_pet = _shot(viewer)
    viewer.layers["pet on t1"].visible = False
    base_only = _shot(viewer)
    h, w = with_pet.shape[:2]
    zoom = viewer.camera.zoom * h / viewer.window._qt_viewer.canvas.size[1]  # screen px per mm in the image
    r = max(2, int(0.4 * gt["lesion"]["radius_mm"] * zoom))
    # The lesion sits at the canvas centre; its mirror image across the midline is at x = -27 mm.
    mirror = w // 2 - int(round(2 * gt["lesion"]["center_lps_mm"][0] * zoom))

    def patch(img, x):
        return img[h // 2 - r:h // 2 + r, x - r:x + r].reshape(-1, 3).mean(0)

    lesion, plain = patch(with_pet, w // 2), patch(base_only, w // 2)
    assert abs(plain[0] - plain[2]) < 5  # the CT alone is grey
    # The PET adds a hot (red-dominant) colour over the lesion, much more than over its mirror image.
    gain, mirror_gain = lesion - plain, patch(with_pet, mirror) - patch(base_only, mirror)
    assert gain[0] > 60 and gain[0] > gain[1] + 30 and gain[0] > gain[2] + 25, gain
    assert gain[0] > mirror_gain[0] + 30, (gain, mirror_gain)
    print(f"PET adds RGB {np.round(gain).tolist()} over the lesion, {np.round(mirror_gain).tolist()} over its mirror")
    assert with_pet[:10, :10].max() < 10  # outside the head PET adds nothing (floor at SUV 0)


def test_screenshot_checkerboard_alternates_tiles(workstation):
    viewer, widget = workstation
    gt = _apply_ground_truth(viewer)
    _focus_lesion(viewer, gt, visible=("t1", "pet"))
    ov = widget.overlay_panel
    ov.base.set_layer("t1")
    ov.overlay.set_layer("pet")
    ov.compare.setCurrentText("checkerboard")
    assert [l.name for l in viewer.layers if l.visible] == ["compare: base", "compare: overlay"]
    img = _shot(viewer)
    row = img[img.shape[0] // 2]
    chroma = row.max(1) - row.min(1)
    bright = row.max(1) > 25
    cls = np.where(~bright, 0, np.where(chroma > 30, 2, np.where(chroma < 8, 1, 0)))  # 1 grey MR, 2 coloured PET
    runs = []  # (class, length) of the non-background runs across the head
    for c in cls:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    tile_px = 16 * viewer.camera.zoom * img.shape[0] / viewer.window._qt_viewer.canvas.size[1]  # 16 mm tiles
    long_runs = [(c, n) for c, n in runs if c and n > 0.3 * tile_px]
    classes = [c for c, _ in long_runs]
    switches = sum(a != b for a, b in zip(classes, classes[1:]))
    assert classes.count(1) >= 2 and classes.count(2) >= 2 and switches >= 4, (long_runs, tile_px)
    assert max(n for _, n in long_runs) <= 1.3 * tile_px
    print(f"checkerboard row: {len(long_runs)} tiles, {switches} grey/colour switches, tile {tile_px:.0f} px")
    ov.compare.setCurrentText("overlay")  # back: originals visible again, compare layers gone
    assert not [l for l in viewer.layers if l.name.startswith("compare")]
    assert viewer.layers["pet"].visible and viewer.layers["t1"].visible


def test_curtain_flicker_views_and_mip(qtbot, workstation):
    viewer, widget = workstation
    _apply_ground_truth(viewer)
    ov = widget.overlay_panel
    ov.base.set_layer("t1")
    ov.overlay.set_layer("pet")
    ov.curtain.setValue(30)
    ov.compare.setCurrentText("curtain")
    base_c = viewer.layers["compare: base"]
    cut = int(round(0.3 * base_c.data.shape[2]))
    assert np.all(base_c.data[:, :, cut:] == base_c.contrast_limits[0])  # right of the curtain: overlay only
    assert np.any(base_c.data[:, :, :cut] != base_c.contrast_limits[0])
    ov.compare.setCurrentText("overlay")
    pet = viewer.layers["pet"]
    ov.flicker.setChecked(True)
    seen = set()
    qtbot.waitUntil(lambda: seen.add(pet.visible) or len(seen) == 2, timeout=3000)
    ov.flicker.setChecked(False)
    assert pet.visible
    ov.view.setCurrentText("coronal")
    assert tuple(viewer.dims.order) == (1, 0, 2)
    ov.view.setCurrentText("axial")
    ov.grid.setChecked(True)
    assert viewer.grid.enabled
    ov.grid.setChecked(False)
    pet.rendering = "attenuated_mip"
    ov.mip.setChecked(True)
    assert viewer.dims.ndisplay == 3 and pet.rendering == "mip"
    ov.mip.setChecked(False)
    assert viewer.dims.ndisplay == 2 and pet.rendering == "attenuated_mip"


def test_manifest_contributes_widget_and_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("medfuse", "phantom")
    assert {"ct", "t1", "pet"} <= {l.name for l in viewer.layers}
    _, widget = viewer.window.add_plugin_dock_widget("medfuse", "medfuse")
    assert isinstance(widget, MedfuseWidget)
    assert widget.register_panel.moving.currentText() == "pet"  # functional layer pre-selected as moving
    assert widget.register_panel.fixed.currentText() in ("t1", "t2", "ct")


def test_fuse_accepts_an_affine_registered_layer(qtbot, workstation):
    # An affine registration with scaling/shear cannot be a Volume affine: fusion must still work.
    viewer, widget = workstation
    m = np.array([[1.1, 0.05, 0, 3], [0, 0.95, 0.02, -2], [0, 0, 1.05, 1], [0, 0, 0, 1]])
    viewer.layers["spect"].affine = lps_to_world(m)
    panel = widget.fuse_panel
    panel.inputs[0].set_layer("t1")
    panel.inputs[1].set_layer("spect")
    panel.inputs[2].set_layer("ct")
    panel.method.setCurrentText("mean")
    n = len(viewer.layers)
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert len(viewer.layers) == n + 1, panel.status.text()
    assert viewer.layers[-1].metadata["medfuse"]["provenance"]["fusion"]["inputs"] == ["t1", "spect", "ct"]


def test_closing_the_widget_leaves_the_viewer_working(workstation):
    viewer, widget = workstation
    viewer.window.remove_dock_widget(widget)
    widget.deleteLater()
    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QApplication

    QApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    with pytest.raises(RuntimeError):  # the C++ side is gone
        widget.overlay_panel.cursor_value.text()
    viewer.layers.remove("spect")  # layer events and cursor moves must not reach the deleted widget
    viewer.cursor.position = (0.0, 0.0, 0.0)
    assert "spect" not in viewer.layers


# ----------------------------------------------------------------------------------------------- review fixes
def _md(modality):
    return {"medfuse": {"modality": modality, "unit": "arbitrary"}}


def _run_fuse(qtbot, panel, *names, method="max", timeout_ms=60_000):
    for combo, name in zip(panel.inputs, names):
        combo.set_layer(name)
    panel.method.setCurrentText(method)
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=timeout_ms)


def test_data_to_world_matches_napari_full_chain(make_napari_viewer):
    from medfuse_napari._layers import data_to_world

    viewer = make_napari_viewer()
    aff = np.eye(4)
    aff[:3, :3] = [[1.0, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.1]]
    aff[:3, 3] = [3.0, -2.0, 1.0]
    layer = viewer.add_image(np.zeros((4, 5, 6), np.float32), scale=(2.0, 1.5, 0.5), translate=(1, 2, 3),
                             rotate=(30, 10, -20), shear=(0.1, 0.2, -0.3), affine=aff)
    pts = np.array([[0, 0, 0], [3, 4, 5], [1.5, -2.0, 7.0]])
    mine = np.c_[pts, np.ones(3)] @ data_to_world(layer).T
    np.testing.assert_allclose(mine[:, :3], [layer.data_to_world(p) for p in pts], atol=1e-9)


def test_fuse_follows_rotate_and_places_result_on_rotated_base(qtbot, make_napari_viewer):
    from scipy.spatial.transform import Rotation

    viewer = make_napari_viewer()
    base = np.random.default_rng(0).uniform(0, 10, (40, 40, 40)).astype(np.float32)
    hot = np.zeros((40, 40, 40), np.float32)
    hot[8:12, 8:12, 28:32] = 100.0
    rot = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    c = np.array([39.0, 39.0, 39.0])
    viewer.add_image(base, name="base", scale=(2, 2, 2), metadata=_md("MR"))
    viewer.add_image(hot, name="hot", scale=(2, 2, 2), rotate=rot, translate=c - rot @ c, metadata=_md("PT"))
    widget = MedfuseWidget(viewer)
    _run_fuse(qtbot, widget.fuse_panel, "base", "hot")
    fused = viewer.layers[-1]
    world = viewer.layers["hot"].data_to_world([9.5, 9.5, 29.5])  # where napari shows the hot cube
    idx = tuple(np.round(fused.world_to_data(world)).astype(int))
    assert fused.data[idx] > 0.99 * fused.data.max()

    # A rotated base: the fused layer sits on the base grid exactly as napari shows it.
    viewer.layers["hot"].rotate = np.eye(3)
    viewer.layers["hot"].translate = (0, 0, 0)
    viewer.layers["base"].rotate = rot
    _run_fuse(qtbot, widget.fuse_panel, "base", "hot")
    fused = viewer.layers[-1]
    for p in ([39, 0, 0], [0, 39, 20]):
        np.testing.assert_allclose(fused.data_to_world(p), viewer.layers["base"].data_to_world(p), atol=1e-9)


def test_layer_pickers_follow_renames_and_moves(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 4, 4), np.float32), name="mr", metadata=_md("MR"))
    viewer.add_image(np.zeros((4, 4, 4), np.float32), name="pet", metadata=_md("PT"))
    widget = MedfuseWidget(viewer)
    viewer.layers["pet"].name = "PET FDG"
    for combo in (widget.fuse_panel.inputs[1], widget.register_panel.moving, widget.overlay_panel.overlay):
        assert combo.currentText() == "PET FDG" and combo.layer() is viewer.layers["PET FDG"]
    assert [widget.fuse_panel.inputs[0].itemText(i) for i in range(2)] == ["mr", "PET FDG"]
    viewer.layers.move(1, 0)
    assert [widget.fuse_panel.inputs[0].itemText(i) for i in range(2)] == ["PET FDG", "mr"]
    assert widget.fuse_panel.inputs[0].currentText() == "mr"


def test_modality_preference_applies_when_widget_opened_before_files(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = MedfuseWidget(viewer)  # `napari -w medfuse`, then File > Open: PET first
    viewer.add_image(np.zeros((4, 4, 4), np.float32), name="pet", metadata=_md("PT"))
    viewer.add_image(np.zeros((4, 4, 4), np.float32), name="mr", metadata=_md("MR"))
    rp, fp = widget.register_panel, widget.fuse_panel
    assert (rp.fixed.currentText(), rp.moving.currentText()) == ("mr", "pet")
    assert [c.currentText() for c in fp.inputs] == ["mr", "pet", "(none)"]
    # A user's choice (the `activated` signal) is kept when more layers arrive.
    rp.fixed.setCurrentIndex(rp.fixed.findText("pet"))
    rp.fixed.activated.emit(rp.fixed.currentIndex())
    viewer.add_image(np.zeros((4, 4, 4), np.float32), name="ct", metadata=_md("CT"))
    assert rp.fixed.currentText() == "pet"


def test_fuse_shows_progress_and_cancels(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(1)
    viewer.add_image(rng.random((40, 40, 40), np.float32), name="a", metadata=_md("MR"))
    viewer.add_image(rng.random((40, 40, 40), np.float32), name="b", metadata=_md("PT"))
    widget = MedfuseWidget(viewer)
    panel = widget.fuse_panel
    seen, ranges = [], []
    panel.progress.valueChanged.connect(seen.append)
    set_range = panel.progress.setRange
    panel.progress.setRange = lambda lo, hi: (ranges.append(hi), set_range(lo, hi))  # QProgressBar has no signal
    _run_fuse(qtbot, panel, "a", "b", method="laplacian")
    assert panel.progress.maximum() == 1000 and seen[-1] == 1000
    # A classical rule reports only its start and end: Qt's busy bar while it runs, then back to 0..1000 at the end
    # (it stood still at 20 % before).
    assert 0 in ranges and ranges[-1] == 1000, ranges
    n = len(viewer.layers)
    # The second run is held at its start until Cancel is clicked (a 40^3 Laplacian fusion takes milliseconds and
    # could finish before the click: that race once failed this test on a loaded machine); fuse() itself must
    # then see the token and stop.
    import threading

    import medfuse

    real_fuse, started = medfuse.fuse, threading.Event()

    def held_fuse(*a, cancel=None, **k):
        started.set()
        for _ in range(3000):
            if cancel is not None and cancel.cancelled:
                break
            time.sleep(0.01)
        return real_fuse(*a, cancel=cancel, **k)

    medfuse.fuse = held_fuse
    try:
        panel.run()
        assert panel.cancel_button.isEnabled()
        qtbot.waitUntil(started.is_set, timeout=30_000)
        panel.cancel_button.click()
        qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    finally:
        medfuse.fuse = real_fuse
    assert panel.status.text() == "cancelled" and len(viewer.layers) == n
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()


def test_destroying_the_widget_or_quitting_cancels_jobs(qtbot, make_napari_viewer):
    from qtpy.QtCore import QEvent, QThreadPool
    from qtpy.QtWidgets import QApplication

    from medfuse_napari import _jobs

    viewer = make_napari_viewer()
    for data, kwargs, _ in _phantom_layers():
        viewer.add_image(data, **{**kwargs, "metadata": {"medfuse": dict(kwargs["metadata"]["medfuse"])}})
    widget = MedfuseWidget(viewer)
    panel = widget.register_panel
    panel.fixed.set_layer("t1")
    panel.moving.set_layer("pet")
    panel.kind.setCurrentText("deformable")
    panel.run()
    token = panel.token
    widget.deleteLater()
    QApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    assert token.cancelled
    assert QThreadPool.globalInstance().waitForDone(30_000)
    # Quitting napari: every running job is cancelled and waited for.
    widget2 = MedfuseWidget(viewer)
    widget2.register_panel.fixed.set_layer("t1")
    widget2.register_panel.moving.set_layer("pet")
    widget2.register_panel.run()
    t0 = time.perf_counter()
    _jobs._on_quit()
    assert widget2.register_panel.token.cancelled and time.perf_counter() - t0 < 10
    qtbot.waitUntil(lambda: widget2.register_panel.worker is None, timeout=10_000)


def test_fuse_2d_grey_and_rgb_layers(qtbot, make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer()
    yy, xx = np.mgrid[:64, :64]
    viewer.add_image((xx * 4).astype(np.uint8), name="mri")
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[20:40, 20:40] = (255, 128, 0)
    viewer.add_image(rgb, name="pet", rgb=True)
    widget = MedfuseWidget(viewer)
    panel = widget.fuse_panel
    assert [panel.inputs[0].itemText(i) for i in range(panel.inputs[0].count())] == ["mri", "pet"]
    assert widget.register_panel.fixed.count() == 0  # registration stays 3-D
    _run_fuse(qtbot, panel, "mri", "pet", method="mean")
    fused = viewer.layers[-1]
    assert fused.name == "fused (mean)" and fused.rgb and fused.data.shape == (64, 64, 3), panel.status.text()
    n_layers = len(viewer.layers)
    viewer.layers["pet"].translate = (5, 0)  # moved in napari: pixel-by-pixel fusion would misplace it
    errors = []
    monkeypatch.setattr(_widget, "_notify_error", errors.append)
    _run_fuse(qtbot, panel, "mri", "pet", method="mean")
    assert errors and "placed differently" in errors[0] and len(viewer.layers) == n_layers


def test_fuse_multiscale_layer_at_full_resolution(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    a = np.random.default_rng(2).random((32, 32, 32)).astype(np.float32)
    viewer.add_image([a, a[::2, ::2, ::2]], name="ms", multiscale=True)
    viewer.add_image(a, name="plain")
    widget = MedfuseWidget(viewer)
    _run_fuse(qtbot, widget.fuse_panel, "ms", "plain", method="mean")
    fused = viewer.layers[-1]
    assert fused.data.shape == (32, 32, 32), widget.fuse_panel.status.text()
    np.testing.assert_allclose(fused.extent.world, viewer.layers["ms"].extent.world)


# ----------------------------------------------------------------------------------------------- register geometry
@functools.lru_cache(maxsize=1)
def _register_pair():
    """A 40^3 MR-like volume (2 mm voxels) and the same volume moved by a known rigid transform ``T0``.

    Returns ``(fixed_array, moving_array, T0)``; ``T0`` maps fixed physical points to moving ones (LPS mm), so
    ``medfuse.register`` should return it and resampling the moving array with it gives back the fixed one.
    """
    import medfuse
    from scipy.ndimage import gaussian_filter

    a = np.zeros((40, 40, 40), np.float32)
    a[8:30, 10:32, 6:34] = 50
    a[12:20, 14:22, 10:18] = 120
    a[22:28, 24:30, 20:30] = 200
    a = gaussian_filter(a, 1.5) + np.random.default_rng(0).normal(0, 1, a.shape).astype(np.float32)
    grid = medfuse.Volume(a, R4 @ np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR")  # a layer with scale 2
    t0 = np.eye(4)
    t0[:3, :3] = _rotation([8, -5, 6])
    c = grid.center
    t0[:3, 3] = np.array([4.0, -3.0, 2.0]) + c - t0[:3, :3] @ c
    moved = medfuse.resample(grid, grid, transform=medfuse.Transform.from_matrix(np.linalg.inv(t0)))
    return a, moved.array.astype(np.float32), t0


def _rotation(deg):
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", deg, degrees=True).as_matrix()


def _register_layers(viewer, fixed_kw=None, moving_kw=None):
    a, b, t0 = _register_pair()
    viewer.add_image(a, name="fixed", scale=(2, 2, 2), metadata=_md("MR"), **(fixed_kw or {}))
    moving_kw = dict(moving_kw or {})
    if moving_kw.get("multiscale"):
        b = [b, b[::2, ::2, ::2]]  # registered at full resolution (napari shows the coarse level zoomed out)
    viewer.add_image(b, name="moving", scale=(2, 2, 2), metadata=_md("MR"), **moving_kw)
    return t0


def _run_register(qtbot, panel, *, resample=True, fixed="fixed", moving="moving", kind="rigid"):
    panel.fixed.set_layer(fixed)
    panel.moving.set_layer(moving)
    panel.kind.setCurrentText(kind)
    panel.resample_box.setChecked(resample)
    panel.run()
    assert panel.worker is not None
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)


def _assert_moving_on_fixed(viewer, t0, moving="moving", fixed="fixed", tol_mm=1.0):
    """Where napari shows the moving voxels = where the fixed layer shows the anatomy they hold (per T0)."""
    mov, fix = viewer.layers[moving], viewer.layers[fixed]
    s = layer_matrix((2, 2, 2), (0, 0, 0))  # T0 relates the voxels of the arrays as built (2 mm, no shift)
    fixed_from_moving = np.linalg.inv(s) @ lps_to_world(np.linalg.inv(t0)) @ s  # moving voxel -> fixed voxel
    for v in ([5, 5, 5], [20, 20, 20], [35, 10, 30], [0, 39, 39]):
        u = (fixed_from_moving @ np.r_[v, 1])[:3]
        shown = np.asarray(mov.data_to_world(v))  # napari's own transforms, not the plugin's formula
        expected = np.asarray(fix.data_to_world(u))
        assert np.linalg.norm(shown - expected) < tol_mm, (v, shown, expected)


def _assert_resampled_on_fixed(viewer, name="moving on fixed", fixed="fixed"):
    a, _, _ = _register_pair()
    res, fix = viewer.layers[name], viewer.layers[fixed]
    assert res.data.shape == fix.data.shape
    for p in ([0, 0, 0], [39, 0, 0], [0, 39, 20], [39, 39, 39]):  # the same world grid as the fixed layer
        np.testing.assert_allclose(res.data_to_world(p), fix.data_to_world(p), atol=1e-6)
    inner = (slice(6, 34),) * 3  # the moved volume lost its rim: compare inside
    assert np.corrcoef(res.data[inner].ravel(), a[inner].ravel())[0, 1] > 0.97
    assert np.abs(res.data[inner] - a[inner]).mean() < 4.0


def test_register_rotated_fixed_and_moving_land_on_fixed_world(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    centre = np.array([39.0, 39.0, 39.0])
    rf, rm = _rotation([0, 0, 35]), _rotation([20, 0, -10])
    t0 = _register_layers(viewer, dict(rotate=rf, translate=centre - rf @ centre + [5, -7, 3]),
                          dict(rotate=rm, translate=(-4, 6, 2)))
    widget = MedfuseWidget(viewer)
    panel = widget.register_panel
    seen = []
    panel.level_label.setText = lambda text: seen.append((panel.progress.value(), text))
    _run_register(qtbot, panel)
    assert panel.result is not None, seen[-3:]
    _assert_moving_on_fixed(viewer, t0)
    _assert_resampled_on_fixed(viewer)
    assert viewer.layers["moving on fixed"].metadata["medfuse"]["modality"] == "MR"
    # The resampling after the registration is a reported step of the overall bar, not a silent tail.
    step = [value for value, text in seen if text.startswith("resampling the moving layer onto")]
    assert step and 0 < step[0] < 1000 and panel.progress.value() == 1000, seen[-3:]


def test_register_sheared_and_affine_layers_land_on_fixed_world(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    aff = np.eye(4)
    aff[:3, :3] = [[1.05, 0.1, 0.0], [0.0, 0.95, 0.08], [0.03, 0.0, 1.1]]
    aff[:3, 3] = [6.0, -4.0, 9.0]
    t0 = _register_layers(viewer, dict(affine=aff, shear=(0.05, 0.0, -0.1)),
                          dict(shear=(0.2, -0.1, 0.15), rotate=_rotation([0, 15, 0]), multiscale=True))
    _register_and_check_placement(qtbot, viewer, t0)


def _register_and_check_placement(qtbot, viewer, t0):
    """Register "moving" onto "fixed" through the panel; both the moved and the resampled layer must sit right."""
    widget = MedfuseWidget(viewer)
    panel = widget.register_panel
    _run_register(qtbot, panel)
    assert panel.result is not None, panel.level_label.text()
    _assert_moving_on_fixed(viewer, t0)
    _assert_resampled_on_fixed(viewer)


def _start_register_collecting_errors(viewer, monkeypatch):
    """Start registering "moving" onto "fixed" (with resampling); the panel's error notices go to a list."""
    errors = []
    monkeypatch.setattr(_widget, "_notify_error", errors.append)
    widget = MedfuseWidget(viewer)
    panel = widget.register_panel
    panel.fixed.set_layer("fixed")
    panel.moving.set_layer("moving")
    panel.resample_box.setChecked(True)
    panel.run()
    return widget, panel, errors  # the widget too: the panel lives only as long as it does


def test_register_follows_layers_renamed_during_the_job(qtbot, make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer()
    t0 = _register_layers(viewer)
    widget, panel, errors = _start_register_collecting_errors(viewer, monkeypatch)
    viewer.layers["moving"].name = "moving renamed"  # while the worker registers
    viewer.layers["fixed"].name = "fixed renamed"
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert not errors, errors
    _assert_moving_on_fixed(viewer, t0, moving="moving renamed", fixed="fixed renamed")
    _assert_resampled_on_fixed(viewer, name="moving renamed on fixed renamed", fixed="fixed renamed")
    assert viewer.layers["moving renamed"].metadata["medfuse"]["registration"]["to"] == "fixed renamed"


def test_register_never_moves_a_new_layer_that_took_a_removed_layers_name(qtbot, make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer()
    _register_layers(viewer)
    widget, panel, errors = _start_register_collecting_errors(viewer, monkeypatch)
    viewer.layers.remove("moving")  # while the worker registers: another image is opened under the same name
    newcomer = viewer.add_image(np.zeros((8, 8, 8), np.float32), name="moving")
    n = len(viewer.layers)
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    np.testing.assert_allclose(newcomer.affine.affine_matrix, np.eye(4))  # not given the other layer's transform
    assert "registration" not in newcomer.metadata.get("medfuse", {})
    assert len(viewer.layers) == n  # and no resampled layer named after it
    assert len(errors) == 1 and "removed while registering" in errors[0] and "Fix:" in errors[0], errors
    assert panel.result is not None and panel.save_button.isEnabled()  # the transform can still be saved


def test_register_reader_layers_moved_with_translate(qtbot, make_napari_viewer):
    # Layers from the medfuse reader keep the file's affine in their metadata; a translate set in napari moves
    # the layer, and the registration must align the layers where napari shows them, not where the files were.
    import medfuse
    from medfuse_napari._layers import volume_to_layer

    viewer = make_napari_viewer()
    a, b, t0 = _register_pair()
    for arr, name in ((a, "fixed"), (b, "moving")):
        data, kwargs, _ = volume_to_layer(medfuse.Volume(arr, R4 @ np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR"),
                                          name=name)
        assert kwargs["metadata"]["medfuse"]["display_grid"] == "native"
        viewer.add_image(data, **kwargs)
    viewer.layers["fixed"].translate = (10.0, -6.0, 4.0)
    viewer.layers["moving"].translate = (-8.0, 0.0, 12.0)
    _register_and_check_placement(qtbot, viewer, t0)


def test_register_resampled_layer_metadata_describes_its_own_grid(qtbot, make_napari_viewer):
    import medfuse
    from medfuse_napari._layers import native_volume, volume_to_layer

    viewer = make_napari_viewer()
    a, b, t0 = _register_pair()
    origin = {"fixed": [0.0, 0.0, 0.0], "moving": [20.0, -10.0, 6.0]}
    for arr, name in ((a[:, :, :36], "fixed"), (b, "moving")):  # same spacing, other box and shape
        aff = R4 @ np.diag([2.0, 2.0, 2.0, 1.0])
        aff[:3, 3] = origin[name]
        data, kwargs, _ = volume_to_layer(medfuse.Volume(np.ascontiguousarray(arr), aff, modality="MR"), name=name)
        viewer.add_image(data, **kwargs)
    widget = MedfuseWidget(viewer)
    panel = widget.register_panel
    _run_register(qtbot, panel)
    res = viewer.layers["moving on fixed"]
    md = res.metadata["medfuse"]
    on_grid = R4 @ layer_matrix(res.scale, res.translate)  # the resampled voxels' own LPS affine
    np.testing.assert_allclose(md["affine"], on_grid, atol=1e-9)
    vol = native_volume(res)  # what registering or fusing this layer again would start from
    assert vol.shape == res.data.shape
    np.testing.assert_allclose(vol.affine, on_grid, atol=1e-9)


def test_register_without_two_3d_grey_volumes_says_what_it_needs(make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16), np.float32), name="slice")
    viewer.add_image(np.zeros((4, 16, 16, 3), np.uint8), name="colour", rgb=True)
    viewer.add_image(np.zeros((4, 16, 16), np.float32), name="volume")
    errors = []
    monkeypatch.setattr(_widget, "_notify_error", errors.append)
    widget = MedfuseWidget(viewer)
    panel = widget.register_panel
    assert [panel.fixed.itemText(i) for i in range(panel.fixed.count())] == ["volume"]  # 2-D and RGB not offered
    panel.run()
    assert panel.worker is None
    assert len(errors) == 1 and "3-D greyscale" in errors[0] and "Fix:" in errors[0], errors


def test_register_cancel_after_the_registration_stops_before_resampling(qtbot, make_napari_viewer, monkeypatch):
    import medfuse

    viewer = make_napari_viewer()
    _register_layers(viewer)
    widget = MedfuseWidget(viewer)
    panel = widget.register_panel
    real = medfuse.register

    def register_then_cancel(*args, **kwargs):  # Cancel pressed as the registration ends
        result = real(*args, **kwargs)
        panel.token.cancel()
        return result

    monkeypatch.setattr(medfuse, "register", register_then_cancel)
    n = len(viewer.layers)
    _run_register(qtbot, panel)
    assert panel.level_label.text() == "cancelled" and panel.result is None
    assert len(viewer.layers) == n  # no resampled layer
    np.testing.assert_allclose(viewer.layers["moving"].affine.affine_matrix, np.eye(4))  # nothing applied


# ----------------------------------------------------------------------------------------------- hand alignment
@functools.lru_cache(maxsize=2)
def _upside_down_pair(deg=(150.0, 0.0, 0.0)):
    """Like ``_register_pair`` but turned 150 degrees: beyond the registration's +-30 degree multi-start."""
    import medfuse

    a, _, _ = _register_pair()
    grid = medfuse.Volume(a, R4 @ np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR")
    t0 = np.eye(4)
    t0[:3, :3] = _rotation(list(deg))
    c = grid.center
    t0[:3, 3] = np.array([4.0, -3.0, 2.0]) + c - t0[:3, :3] @ c
    moved = medfuse.resample(grid, grid, transform=medfuse.Transform.from_matrix(np.linalg.inv(t0)))
    return a, moved.array.astype(np.float32), t0


@pytest.mark.parametrize("fixed_placed", [False, True])
def test_register_starts_from_the_moving_layer_placed_by_hand(qtbot, make_napari_viewer, fixed_placed):
    # The user turned the upside-down moving layer roughly onto the fixed one in the viewer (here ~9 degrees and
    # 4 mm off); the panel used to ignore that and register from the files' coordinates, which ends ~84 mm off at
    # a probe voxel.
    viewer = make_napari_viewer()
    a, b, t0 = _upside_down_pair()
    fixed = viewer.add_image(a, name="fixed", scale=(2, 2, 2), metadata=_md("MR"))
    moving = viewer.add_image(b, name="moving", scale=(2, 2, 2), metadata=_md("MR"))
    fixed_world = np.eye(4)
    if fixed_placed:  # the fixed layer registered to something else earlier: the hand alignment is to where it shows
        fixed_world[:3, :3] = _rotation([0, 0, 10])
        fixed_world[:3, 3] = [6.0, -4.0, 9.0]
        fixed.affine = lps_to_world(fixed_world)
    off = np.eye(4)
    off[:3, :3] = _rotation([6, -5, 4])
    off[:3, 3] = [3.0, 2.0, -2.0]
    # Shown where (t0 @ off)^-1 puts it: moving physical -> fixed physical -> the fixed layer's world.
    moving.affine = lps_to_world(fixed_world @ np.linalg.inv(t0 @ off))
    widget = MedfuseWidget(viewer)
    panel = widget.register_panel
    assert panel.start_box.isChecked()  # the default
    _run_register(qtbot, panel, resample=False)
    assert panel.result is not None, panel.level_label.text()
    assert panel.result.report.initialisation.startswith("initial"), panel.result.report.to_dict()
    assert "start: the moving layer's placement in the viewer" in panel.report_view.toPlainText()
    _assert_moving_on_fixed(viewer, t0, tol_mm=0.5)  # napari's own data -> world of both layers


def test_register_start_box_unchecked_ignores_the_placement(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    t0 = _register_layers(viewer)
    turned = np.eye(4)
    turned[:3, :3] = _rotation([0, 90, 0])  # a placement far from the truth
    viewer.layers["moving"].affine = lps_to_world(turned)
    widget = MedfuseWidget(viewer)
    panel = widget.register_panel
    panel.start_box.setChecked(False)
    _run_register(qtbot, panel, resample=False)
    assert panel.result is not None, panel.level_label.text()
    assert panel.result.report.metric_initial is None and "start:" not in panel.report_view.toPlainText()
    _assert_moving_on_fixed(viewer, t0)  # from the files' coordinates, as before


def test_fusing_a_pet_from_another_frame_of_reference_unregistered_is_warned(qtbot, workstation, monkeypatch):
    """The phantom's PET is misplaced against the CT and lies in another DICOM frame of reference: fused where
    napari shows it without a registration, it is misaligned, and the radiologist is told so in the GUI. After
    the ground-truth placement (a registration) it is not."""
    viewer, widget = workstation
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_warning", shown.append)
    panel = widget.fuse_panel
    panel.inputs[0].set_layer("ct")
    panel.inputs[1].set_layer("pet")
    panel.method.setCurrentText("max")
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert any("frames of reference" in m and "register" in m for m in shown), shown
    assert "frames of reference" in " ".join(viewer.layers[-1].metadata["medfuse"]["provenance"]["warnings"])
    shown.clear()
    _apply_ground_truth(viewer)
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert not any("frames of reference" in m for m in shown), shown


# ----------------------------------------------------------------------------------------------- register: pair changes
def _pet_off_t1_mm(viewer, placed) -> float:
    """Largest distance (mm) at the lesion and two head points between the PET anatomy napari shows at a world
    point and the MR anatomy it shows there, by the ground truth (``placed``: each layer's data -> world as read)."""
    t1, pet = viewer.layers["t1"], viewer.layers["pet"]
    gt = load_ground_truth()
    off = []
    for q in (gt["lesion"]["center_lps_mm"], [0.0, 0.0, 0.0], [40.0, 20.0, -30.0]):  # MR points, LPS mm
        d_t1 = np.linalg.solve(placed["t1"], np.r_[q[2], q[1], q[0], 1.0])[:3]
        shown = np.asarray(t1.data_to_world(d_t1))  # where napari shows that MR point now
        d_pet = np.asarray(pet.world_to_data(shown))  # the PET voxel napari shows there
        p = (placed["pet"] @ np.r_[d_pet, 1.0])[:3][::-1]  # that voxel's point in the PET file, LPS
        off.append(np.linalg.norm(p - (gt["mr_to_pet"] @ np.r_[q, 1.0])[:3]))
    return float(max(off))


def test_register_not_applied_when_the_fixed_layer_moves_meanwhile(qtbot, workstation, monkeypatch):
    # The MR dragged 15 mm while its PET registered: the result was applied against the MR's old place, leaving
    # the PET 15 mm off the MR as napari shows it, with "done", not suspect, and no notice.
    errors = []
    monkeypatch.setattr(_widget, "_notify_error", errors.append)
    viewer, widget = workstation
    t1, pet = viewer.layers["t1"], viewer.layers["pet"]
    placed = {l.name: l._data_to_world.affine_matrix.copy() for l in (t1, pet)}
    panel = widget.register_panel
    panel.fixed.set_layer("t1")
    panel.moving.set_layer("pet")
    panel.run()
    assert panel.worker is not None
    t1.translate = np.asarray(t1.translate) + (0.0, 0.0, 15.0)  # while the worker registers
    qtbot.waitUntil(lambda: panel.worker is None, timeout=240_000)
    np.testing.assert_allclose(pet.affine.affine_matrix, np.eye(4))  # not applied
    assert "registration" not in pet.metadata["medfuse"]
    assert panel.level_label.text() == "done; result not applied: an input moved"
    assert len(errors) == 1 and "fixed layer 't1' was moved" in errors[0], errors
    assert "Fix: run the registration again" in errors[0]
    assert panel.save_button.isEnabled()  # the transform between the files stays right, and can be saved
    # Run again now: the PET lands on the MR where napari shows the MR now.
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=240_000)
    assert panel.level_label.text() == "done"
    off = _pet_off_t1_mm(viewer, placed)
    print(f"PET off the moved MR after a second run: {off:.2f} mm")
    assert off < 1.5


def test_register_not_applied_when_the_moving_layer_moves_meanwhile(qtbot, make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer()
    _register_layers(viewer)
    widget, panel, errors = _start_register_collecting_errors(viewer, monkeypatch)
    moving = viewer.layers["moving"]
    moving.translate = (0.0, 6.0, 0.0)  # while the worker registers
    n = len(viewer.layers)
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    np.testing.assert_allclose(moving.affine.affine_matrix, np.eye(4))
    assert len(viewer.layers) == n  # no resampled layer either
    assert len(errors) == 1 and "moving layer 'moving' was moved" in errors[0] and "Fix:" in errors[0], errors


def test_register_report_and_save_name_their_pair(qtbot, workstation, tmp_path, monkeypatch):
    # The pickers switched to another pair during the run: the report and Save transform… belong to the run's pair
    # (pet onto t1) and say so; Save writes that pair's transform.
    import medfuse
    from qtpy.QtWidgets import QFileDialog

    viewer, widget = workstation
    panel = widget.register_panel
    panel.fixed.set_layer("t1")
    panel.moving.set_layer("pet")
    panel.run()
    panel.fixed.set_layer("ct")
    panel.moving.set_layer("spect")
    qtbot.waitUntil(lambda: panel.worker is None, timeout=240_000)
    assert panel.report_view.toPlainText().splitlines()[0] == "'pet' (moving) onto 't1' (fixed)"
    assert panel.save_button.text() == "Save transform of 'pet' onto 't1'…"
    asked = []

    def dialog(parent, title, name, filters):
        asked.append(title)
        return str(tmp_path / "saved.tfm"), filters

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(dialog))
    panel.save_button.click()
    assert asked == ["Save the transform of 'pet' onto 't1'"]
    # The file holds pet onto t1 (fixed point -> moving point), against the phantom's ground truth.
    saved = medfuse.load_transform(tmp_path / "saved.tfm").matrix
    gt = load_ground_truth()["mr_to_pet"]
    pts = np.c_[np.random.default_rng(0).uniform(-60, 60, (50, 3)), np.ones(50)]
    assert np.linalg.norm((pts @ saved.T - pts @ gt.T)[:, :3], axis=1).max() < 1.5
    # Renames are followed; closing the pair clears the name with the result.
    viewer.layers["pet"].name = "pet ac"
    assert panel.save_button.text() == "Save transform of 'pet ac' onto 't1'…"
    assert panel.report_view.toPlainText().splitlines()[0] == "'pet ac' (moving) onto 't1' (fixed)"
    viewer.layers.remove("t1")
    assert panel.save_button.text() == "Save transform…" and not panel.save_button.isEnabled()
