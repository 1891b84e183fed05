"""The dock widget as a radiologist meets it: Cancel honoured at every step, status after a job, overlay ranges,
compare views that follow their pair, 4-D series and 2-D inputs refused with the way forward."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse.progress import check  # noqa: E402
from medfuse_napari._overlay import OverlayPanel  # noqa: E402
from medfuse_napari._widget import MedfuseWidget  # noqa: E402

pytestmark = pytest.mark.napari


def _md(modality):
    return {"medfuse": {"modality": modality, "unit": "arbitrary"}}


def _blobs(shift=(0, 0, 0)):
    """A 32^3 volume with three bright boxes (enough structure for a rigid registration)."""
    from scipy.ndimage import gaussian_filter

    a = np.zeros((32, 32, 32), np.float32)
    a[6:24, 8:26, 5:27] = 50
    a[10:16, 11:18, 8:14] = 120
    a[18:23, 19:24, 16:24] = 200
    return gaussian_filter(np.roll(a, shift, axis=(0, 1, 2)), 1.2)


@pytest.fixture
def pair(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(_blobs(), name="mr", scale=(2, 2, 2), metadata=_md("MR"))
    viewer.add_image(_blobs((1, -2, 1)), name="pet", scale=(2, 2, 2), metadata=_md("PT"))
    return viewer, MedfuseWidget(viewer)


def _start_a_held_mean_fusion(qtbot, panel, monkeypatch) -> threading.Event:
    """Start a mean fusion of mr and pet whose rule (the real one) waits until the returned event is set; returns
    once the rule has started."""
    import medfuse.fusion.classical as classical

    real, started, release = classical.fuse_arrays, threading.Event(), threading.Event()

    def held(*args, **kwargs):
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(classical, "fuse_arrays", held)
    panel.inputs[0].set_layer("mr")
    panel.inputs[1].set_layer("pet")
    panel.method.setCurrentText("mean")
    panel.run()
    qtbot.waitUntil(started.is_set, timeout=30_000)
    return release


def test_cancel_during_a_fusion_rule_that_polls_no_token_adds_no_layer(qtbot, pair, monkeypatch):
    """A classical rule is one call that never looks at the token (gff: ~10 s on a 160x192x160 MR); a Cancel
    pressed meanwhile must still leave no fused layer, not one that appears after the user cancelled."""
    import medfuse.fusion.classical as classical

    viewer, widget = pair
    panel = widget.fuse_panel
    real = classical.fuse_arrays
    n = len(viewer.layers)
    clicked = _start_a_held_mean_fusion(qtbot, panel, monkeypatch)
    panel.cancel_button.click()
    clicked.set()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    assert len(viewer.layers) == n, [l.name for l in viewer.layers]
    assert panel.status.text() == "cancelled"
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()
    # Run again: the next fusion is not cancelled by the old token.
    monkeypatch.setattr(classical, "fuse_arrays", real)
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    assert len(viewer.layers) == n + 1 and panel.status.text() == "added 'fused (mean)'"


def test_run_called_again_while_a_job_runs_is_refused_and_cancel_still_reaches_it(qtbot, pair, monkeypatch):
    """A script or the console calling run() again replaced the worker and token: the first job could no longer
    be cancelled (the button is disabled meanwhile, the method was not)."""
    from medfuse_napari import _widget

    viewer, widget = pair
    errors = []
    monkeypatch.setattr(_widget, "_notify_error", errors.append)
    panel = widget.fuse_panel
    n = len(viewer.layers)
    release = _start_a_held_mean_fusion(qtbot, panel, monkeypatch)
    first = panel.worker
    panel.run()
    assert panel.worker is first and any("A fusion is running" in e for e in errors), errors
    panel.cancel_button.click()
    release.set()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    assert len(viewer.layers) == n and panel.status.text() == "cancelled"
    reg = widget.register_panel
    reg.worker = first  # as while a registration runs
    reg.run()
    assert any("A registration is running" in e for e in errors)
    reg.worker = None


def test_cancel_as_a_registration_ends_applies_nothing(qtbot, pair, monkeypatch):
    """Without resampling there is no later check: a Cancel that arrives after the last iteration still wins."""
    viewer, widget = pair
    panel = widget.register_panel
    real = medfuse.register

    def register_then_cancel(*args, **kwargs):
        result = real(*args, **kwargs)
        panel.token.cancel()  # Cancel pressed as the registration ends
        return result

    monkeypatch.setattr(medfuse, "register", register_then_cancel)
    panel.fixed.set_layer("mr")
    panel.moving.set_layer("pet")
    panel.resample_box.setChecked(False)
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.level_label.text() == "cancelled" and panel.result is None
    np.testing.assert_allclose(viewer.layers["pet"].affine.affine_matrix, np.eye(4))
    assert not panel.save_button.isEnabled()


def test_progress_reported_after_cancel_does_not_move_the_bar(qtbot, pair, monkeypatch):
    """medfuse's registration starts the next level before it sees the token: the bar must not jump ahead."""
    viewer, widget = pair
    panel = widget.register_panel
    clicked = threading.Event()

    def register(fixed, moving, *, progress=None, cancel=None, **kwargs):
        progress(0.2, "rigid: level 1/3, iteration 5")
        clicked.wait(30)
        progress(0.45, "rigid: level 2/3")  # what medfuse reports once more after Cancel
        progress(0.7, "rigid: level 3/3")
        check(cancel, "registration")
        raise AssertionError("the token was not cancelled")

    monkeypatch.setattr(medfuse, "register", register)
    panel.fixed.set_layer("mr")
    panel.moving.set_layer("pet")
    panel.run()
    qtbot.waitUntil(lambda: panel.progress.value() == 200, timeout=30_000)
    panel.cancel_button.click()
    clicked.set()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    assert panel.progress.value() == 200
    assert panel.level_label.text() == "cancelled"
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()


def test_registration_status_says_done_after_the_resampling_step(qtbot, pair):
    viewer, widget = pair
    panel = widget.register_panel
    panel.fixed.set_layer("mr")
    panel.moving.set_layer("pet")
    panel.resample_box.setChecked(True)
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.result is not None and "pet on mr" in viewer.layers
    assert panel.level_label.text() == "done" and panel.progress.value() == 1000


def test_registration_whose_layer_was_removed_says_so_in_the_panel(qtbot, pair, monkeypatch):
    viewer, widget = pair
    panel = widget.register_panel
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    panel.fixed.set_layer("mr")
    panel.moving.set_layer("pet")
    panel.run()
    viewer.layers.remove("pet")  # while the job runs
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.level_label.text() == "done; result not applied"
    assert len(errors) == 1 and "moving layer was removed" in errors[0]
    assert panel.run_button.isEnabled()


@pytest.fixture
def ct_over_mr(make_napari_viewer, samples_dir):
    viewer = make_napari_viewer()
    viewer.open(str(samples_dir / "mr_t1.nii.gz"), plugin="medfuse")
    ct = viewer.open(str(samples_dir / "ct"), plugin="medfuse")[0]
    pet = viewer.open(str(samples_dir / "pet"), plugin="medfuse")[0]
    panel = OverlayPanel(viewer)
    panel.base.set_layer("mr_t1")
    return viewer, ct, pet, panel


def test_overlay_range_of_a_ct_overlay_keeps_its_negative_hu_floor(ct_over_mr):
    """A CT over an MR: editing the overlay maximum must not lift its floor from -160 HU to 0 (a PET rule)."""
    viewer, ct, pet, panel = ct_over_mr
    panel.overlay.set_layer("ct")
    ct.contrast_limits = (-160.0, 240.0)  # soft-tissue window, set with napari's slider
    assert panel.suv_threshold.value() == -160.0 and panel.range_box.title() == "Overlay range (HU)"
    panel.suv_max.setValue(300.0)
    assert tuple(ct.contrast_limits) == (-160.0, 300.0)
    # A PET overlay keeps the floor at 0 SUV.
    panel.overlay.set_layer(pet.name)
    assert panel.range_box.title() == "Overlay range (SUVbw)"
    panel.suv_threshold.setValue(-2.0)
    assert panel.suv_threshold.value() == 0.0 and tuple(pet.contrast_limits)[0] == 0.0


def test_overlay_threshold_above_the_maximum_never_shows_a_value_the_layer_lacks(ct_over_mr):
    viewer, ct, pet, panel = ct_over_mr
    panel.overlay.set_layer(pet.name)
    panel.set_suv_range(10.0, 2.5)
    panel.suv_threshold.setValue(12.0)  # typed above the maximum
    lo, hi = (float(v) for v in pet.contrast_limits)
    assert (panel.suv_threshold.value(), panel.suv_max.value()) == pytest.approx((lo, hi))
    assert lo < hi == 10.0 and lo > 2.5
    panel.suv_max.setValue(1.0)  # typed below the threshold
    lo2, hi2 = (float(v) for v in pet.contrast_limits)
    assert (panel.suv_threshold.value(), panel.suv_max.value()) == pytest.approx((lo2, hi2)) and lo2 < hi2


def test_a_4d_dicom_series_alone_says_how_to_get_volumes_and_its_split_volumes_register(
        qtbot, make_napari_viewer, shared, monkeypatch):
    """Every series of the GE/Siemens EPI folders opens as one 4-D layer, which the pickers do not offer: the
    message names napari's Split Stack, and the volumes it gives keep the file's geometry and register."""
    from napari._app_model import get_app_model
    from medfuse_napari import _widget

    folder = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918Si", "mr_0003")
    viewer = make_napari_viewer()
    series = viewer.open(str(folder), plugin="medfuse")[0]
    assert series.ndim == 4
    errors = []
    monkeypatch.setattr(_widget, "_notify_error", errors.append)
    widget = MedfuseWidget(viewer)
    panel = widget.register_panel
    panel.run()
    widget.fuse_panel.run()
    assert panel.worker is None and len(errors) == 2
    assert all(f"'{series.name}' is a 4-D series" in e and "Split Stack" in e for e in errors), errors

    viewer.layers.selection.active = series
    get_app_model().commands.execute_command("napari.layer.split_stack").result()
    names = [panel.fixed.itemText(i) for i in range(panel.fixed.count())]
    assert len(names) == 2, names
    volumes = medfuse.load_volumes(folder)
    first = _widget.native_volume(viewer.layers[names[0]])
    np.testing.assert_allclose(first.affine, volumes[0].affine, atol=1e-6)
    np.testing.assert_array_equal(first.array, volumes[0].array)
    panel.fixed.set_layer(names[0])
    panel.moving.set_layer(names[1])
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.result is not None and panel.level_label.text() == "done", errors
    # Two volumes of one run, seconds apart: the head barely moved.
    assert panel.result.report.rotation_deg < 1.0 and panel.result.report.translation_mm < 1.5


def test_compare_view_follows_a_registration_and_a_new_window(qtbot, pair):
    """A checkerboard opened before a registration must show the overlay where the registration put it."""
    viewer, widget = pair
    panel = widget.overlay_panel
    mr, pet = viewer.layers["mr"], viewer.layers["pet"]
    panel.base.set_layer("mr")
    panel.overlay.set_layer("pet")
    panel.set_compare("checkerboard")
    shown = viewer.layers["compare: overlay"]
    mask = panel._mask(mr, "checkerboard")  # True: the base's tiles
    # 'pet' is 'mr' rolled by (1, -2, 1) voxels of 2 mm: moved back by its affine, it lies on 'mr' exactly.
    back = np.eye(4)
    back[:3, 3] = (-2.0, 4.0, -2.0)
    pet.affine = back  # what the Register panel does with a result
    qtbot.waitUntil(lambda: viewer.layers["compare: overlay"] is not shown, timeout=5_000)
    inner = (slice(3, -3),) * 3
    overlay_tiles = ~mask[inner]
    got = np.asarray(viewer.layers["compare: overlay"].data)[inner][overlay_tiles]
    np.testing.assert_allclose(got, np.asarray(mr.data)[inner][overlay_tiles], atol=1e-3)
    assert not pet.visible and not mr.visible  # the pair stays hidden behind the rebuilt view
    # A new window on the base (the W/L boxes act on it) reaches the view too.
    panel.set_window_level(90.0, 55.0)
    qtbot.waitUntil(lambda: tuple(viewer.layers["compare: base"].contrast_limits) == (10.0, 100.0), timeout=5_000)
    # Another overlay picked while the checkerboard is shown replaces the old one in it.
    viewer.add_image(_blobs(), name="ct", scale=(2, 2, 2), metadata=_md("CT"))
    panel.overlay.set_layer("ct")
    qtbot.waitUntil(lambda: viewer.layers["compare: overlay"].metadata["medfuse"]["modality"] == "CT", timeout=5_000)
    panel.set_compare("overlay")
    assert mr.visible and pet.visible and "compare: base" not in viewer.layers


def test_two_colour_layers_are_refused_not_fused_across_their_channels(qtbot, make_napari_viewer, monkeypatch):
    """Two pseudo-colour 2-D layers (a PET and a SPECT of the Harvard set): medfuse.fuse on arrays would take them
    as 3-slice volumes and filter across R, G and B; the panel says what to pick instead."""
    from medfuse_napari import _widget

    viewer = make_napari_viewer()
    rng = np.random.default_rng(3)
    viewer.add_image(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), name="pet rgb", rgb=True)
    viewer.add_image(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), name="spect rgb", rgb=True)
    viewer.add_image(rng.random((48, 48)).astype(np.float32), name="mri")
    errors = []
    monkeypatch.setattr(_widget, "_notify_error", errors.append)
    widget = MedfuseWidget(viewer)
    panel = widget.fuse_panel
    panel.inputs[0].set_layer("pet rgb")
    panel.inputs[1].set_layer("spect rgb")
    panel.method.setCurrentText("laplacian")
    n = len(viewer.layers)
    panel.run()
    assert panel.worker is None and len(viewer.layers) == n
    assert len(errors) == 1 and "one colour (RGB) layer at most" in errors[0] and "Fix:" in errors[0], errors
    # Grey + colour still fuses: colour in, colour out.
    panel.inputs[0].set_layer("mri")
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    assert len(viewer.layers) == n + 1 and viewer.layers[-1].rgb, errors


def test_2d_layers_of_different_sizes_are_refused_in_the_panel(make_napari_viewer, monkeypatch, shared):
    """A Harvard MRI slice beside a smaller image: said in GUI terms, before any job starts."""
    from medfuse_napari import _widget

    png = shared("data", "harvard-pairs", "CT-MRI", "MRI")
    viewer = make_napari_viewer()
    mri = viewer.open(str(sorted(png.glob("*.png"))[0]))[0]
    viewer.add_image(np.asarray(mri.data)[:200], name="cropped")
    errors = []
    monkeypatch.setattr(_widget, "_notify_error", errors.append)
    widget = MedfuseWidget(viewer)
    panel = widget.fuse_panel
    panel.inputs[0].set_layer(mri.name)
    panel.inputs[1].set_layer("cropped")
    panel.method.setCurrentText("mean")
    panel.run()
    assert panel.worker is None and panel.run_button.isEnabled()
    assert len(errors) == 1 and "'cropped' is 200 x 256 pixels" in errors[0] and "Fix:" in errors[0], errors


def test_view_and_grid_controls_use_napari_current_api(pair):
    """napari 0.9 moved the camera and the grid (``viewer.camera``/``viewer.grid`` warn "deprecated attribute");
    the controls still take effect."""
    import warnings

    viewer, widget = pair
    panel = widget.overlay_panel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        panel.view.setCurrentText("coronal")
        panel.grid.setChecked(True)
    deprecated = [str(w.message) for w in caught if "deprecated attribute" in str(w.message)]
    assert not deprecated, deprecated
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    grid = viewer.canvas.grid if hasattr(getattr(viewer, "canvas", None), "grid") else viewer.grid
    assert tuple(viewer.dims.order) == (1, 0, 2) and tuple(camera.orientation2d)[:2] == ("up", "right")
    assert grid.enabled


def test_a_second_fusion_and_a_rename_while_fusing_are_named_as_the_viewer_shows_them(qtbot, pair, monkeypatch):
    """napari names a repeated layer 'fused (mean) [1]', and the status said 'fused (mean)', the older one; an input
    renamed while fusing was recorded under its old name, one no longer in the viewer."""
    import medfuse.fusion.classical as classical

    viewer, widget = pair
    panel = widget.fuse_panel
    real = classical.fuse_arrays
    panel.inputs[0].set_layer("mr")
    panel.inputs[1].set_layer("pet")
    panel.method.setCurrentText("mean")
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)

    started, renamed = threading.Event(), threading.Event()

    def held_rule(*args, **kwargs):  # the real rule, held until the user renamed the base (in the GUI thread)
        started.set()
        renamed.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(classical, "fuse_arrays", held_rule)
    panel.run()
    qtbot.waitUntil(started.is_set, timeout=30_000)
    viewer.layers["mr"].name = "MR renamed"
    renamed.set()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    assert panel.status.text() == "added 'fused (mean) [1]'"
    record = viewer.layers["fused (mean) [1]"].metadata["medfuse"]["provenance"]["fusion"]
    assert record["inputs"] == ["MR renamed", "pet"] and record["grid"] == "MR renamed"
    # An input closed while fusing is named, not only its role.
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    started.clear(), renamed.clear()
    n = len(viewer.layers)
    panel.run()
    qtbot.waitUntil(started.is_set, timeout=30_000)
    viewer.layers.remove("pet")
    renamed.set()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    assert len(viewer.layers) == n - 1
    assert errors == ["The fusion result was not added: the second layer, 'pet', was removed while fusing. Fix: keep "
                      "the input layers open until the fusion ends and run it again."]
