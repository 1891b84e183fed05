"""Overlay panel as a radiologist drives it: CT + PET opened from DICOM, windows, SUV range, odd layers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse_napari._overlay import OverlayPanel, voxel_value  # noqa: E402

pytestmark = pytest.mark.napari


@pytest.fixture
def ct_pet(make_napari_viewer, samples_dir):
    viewer = make_napari_viewer()
    ct = viewer.open(str(samples_dir / "ct"), plugin="medfuse")[0]
    pet = viewer.open(str(samples_dir / "pet"), plugin="medfuse")[0]
    return viewer, ct, pet, OverlayPanel(viewer)


def _world(volume, ijk):
    """napari world position (S, P, L) of a file voxel."""
    lps = volume.index_to_world(np.asarray(ijk, dtype=float))
    return (lps[2], lps[1], lps[0])


def test_ct_and_pet_from_dicom_line_up_in_world_space(ct_pet, samples_dir):
    viewer, ct, pet, panel = ct_pet
    assert (panel.base.layer() is ct) and (panel.overlay.layer() is pet)
    for layer, folder in ((ct, "ct"), (pet, "pet")):
        volume = medfuse.load(samples_dir / folder)
        rng = np.random.default_rng(0)
        for ijk in zip(*(rng.integers(0, n, 25) for n in volume.shape)):
            assert voxel_value(layer, _world(volume, ijk)) == pytest.approx(float(volume.array[ijk]), abs=1e-4)
    # Defaults: CT brain window in HU, PET inferno 0-6 SUV added over it.
    assert tuple(ct.contrast_limits) == (0.0, 80.0) and ct.colormap.name == "gray"
    assert tuple(pet.contrast_limits) == (0.0, 6.0) and pet.colormap.name == "inferno" and pet.blending == "additive"
    assert (panel.suv_threshold.value(), panel.suv_max.value()) == (0.0, 6.0)
    text = panel.cursor_text(_world(medfuse.load(samples_dir / "pet"), (30, 30, 20)))
    assert "HU" in text and "SUVbw" in text


@pytest.mark.parametrize("name,limits", [("brain", (0, 80)), ("bone", (-700, 1300)), ("lung", (-1350, 150))])
def test_ct_presets_in_hu(ct_pet, name, limits):
    _, ct, pet, panel = ct_pet
    panel.set_window(name)
    assert tuple(ct.contrast_limits) == limits and tuple(pet.contrast_limits) == (0.0, 6.0)
    assert panel.window_preset.currentText() == name


def test_ct_preset_refused_on_a_pet_base(ct_pet, monkeypatch):
    # The CT was closed: the PET is now the only layer, and the base. A bone window (-700..1300 HU) on a PET
    # in SUV would blank it; the preset is refused with a notification and the image keeps its range.
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    viewer, ct, pet, panel = ct_pet
    viewer.layers.remove(ct)
    assert panel.base.layer() is pet
    panel.window_preset.setCurrentText("bone")
    assert tuple(pet.contrast_limits) == (0.0, 6.0)
    assert panel.window_preset.currentText() == "custom"
    assert len(shown) == 1 and "HU" in shown[0] and "Fix:" in shown[0]
    panel.set_window_level(4, 2)  # WW/WL by hand stays possible
    assert tuple(pet.contrast_limits) == (0.0, 4.0)


def test_window_boxes_follow_images_scaled_0_to_1(make_napari_viewer):
    # An MR (or SPM template) scaled 0..1: the WW/WL boxes must show its window, and nudging the level must
    # move the window by a small step, not jump to width 1 (the old box minimum) and blank the image.
    viewer = make_napari_viewer()
    mr = viewer.add_image(np.linspace(0, 0.75, 4 * 5 * 6).reshape(4, 5, 6), name="mr",
                          contrast_limits=(0.01, 0.74), metadata={"medfuse": {"modality": "MR", "unit": "arbitrary"}})
    panel = OverlayPanel(viewer)
    assert panel.ww.value() == pytest.approx(0.73) and panel.wl.value() == pytest.approx(0.375)
    assert panel.wwwl_readout.text() == "WW 0.73 / WL 0.38 a.u."
    panel.wl.stepUp()
    lo, hi = mr.contrast_limits
    assert hi - lo == pytest.approx(0.73) and (hi + lo) / 2 == pytest.approx(0.385)


def test_window_boxes_keep_large_levels(make_napari_viewer):
    # A PET in Bq/mL has levels of 10^4: the old +-5000 level box clamped them.
    viewer = make_napari_viewer()
    pet = viewer.add_image(np.linspace(0, 60000, 120).reshape(4, 5, 6), name="pet", contrast_limits=(0, 50000),
                           metadata={"medfuse": {"modality": "PT", "unit": "Bq/mL"}})
    panel = OverlayPanel(viewer)
    assert (panel.ww.value(), panel.wl.value()) == (50000, 25000)
    panel.ww.setValue(40000)
    assert tuple(pet.contrast_limits) == (5000, 45000)


def test_controls_follow_renamed_and_removed_layers(ct_pet):
    viewer, ct, pet, panel = ct_pet
    pet.name = "FDG"
    assert panel.overlay.currentText() == "FDG"
    panel.opacity.setValue(30)
    panel.overlay_cmap.setCurrentText("hot")
    panel.set_suv_range(4.0, 1.0)
    assert pet.opacity == pytest.approx(0.3) and pet.colormap.name == "hot" and tuple(pet.contrast_limits) == (1, 4)
    viewer.layers.remove(pet)
    viewer.layers.remove(ct)
    assert panel.base.layer() is None and panel.overlay.layer() is None
    # Every control on an empty pair is a no-op, not an exception.
    panel.opacity.setValue(80)
    panel.overlay_cmap.setCurrentText("gray")
    panel.set_suv_range(5)
    panel.set_window("lung")
    panel.ww.setValue(300)
    panel.set_view("coronal")
    assert panel.cursor_text((0, 0, 0)) == "" and panel.wwwl_readout.text() == ""


def test_panel_with_2d_rgb_and_4d_layers(make_napari_viewer, tmp_path):
    import nibabel as nib

    viewer = make_napari_viewer()
    viewer.add_image(np.random.rand(20, 30), name="2d")
    viewer.add_image(np.random.randint(0, 255, (20, 30, 3), dtype=np.uint8), name="rgb", rgb=True)
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(6, 5, 4, 3).astype(np.float32), np.eye(4)), str(path))
    layer = viewer.open(str(path), plugin="medfuse")[0]
    assert layer.ndim == 4
    panel = OverlayPanel(viewer)
    # Only 3-D greyscale layers are offered as base/overlay.
    assert panel.base.layer() is None and panel.overlay.layer() is None
    for view in ("coronal", "sagittal", "axial"):
        panel.set_view(view)
    assert viewer.dims.order[0] == 0  # the volume axis stays a slider


def test_constant_and_nan_images(make_napari_viewer, tmp_path):
    import nibabel as nib

    viewer = make_napari_viewer()
    const = tmp_path / "const.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), 7, np.int16), np.eye(4)), str(const))
    arr = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    arr[0] = np.nan
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(nan))
    c = viewer.open(str(const), plugin="medfuse")[0]
    n = viewer.open(str(nan), plugin="medfuse")[0]
    lo, hi = c.contrast_limits
    assert hi > lo and lo == 7
    assert np.all(np.isfinite(n.contrast_limits)) and n.contrast_limits[1] > n.contrast_limits[0]
    panel = OverlayPanel(viewer)
    panel.base.set_layer("const")
    assert panel.ww.value() == 1 and panel.wl.value() == 7.5


def test_range_boxes_follow_napari_contrast_slider(ct_pet):
    # The radiologist widens the PET with napari's own contrast slider, then raises the floor in the panel:
    # the maximum must stay where the slider put it (it went back to the stale 6 SUV).
    _, ct, pet, panel = ct_pet
    pet.contrast_limits = (0, 10)
    assert panel.suv_max.value() == 10
    panel.suv_threshold.setValue(1.0)
    assert tuple(pet.contrast_limits) == (1.0, 10.0)
    ct.contrast_limits = (-100, 300)  # the same for the W/L boxes of the base
    assert (panel.ww.value(), panel.wl.value()) == (400, 100)


def test_display_controls_follow_napari_layer_controls(ct_pet):
    """Colour map, opacity and blending changed in napari's own layer controls show in the panel, and the
    panel's next edit of one control leaves the others as napari set them (a stale box put its value back)."""
    viewer, ct, pet, panel = ct_pet
    pet.opacity, pet.colormap, pet.blending = 0.25, "viridis", "translucent_no_depth"
    ct.colormap = "bone"
    assert panel.opacity.value() == 25 and panel.overlay_cmap.currentText() == "viridis"
    assert panel.blending.currentText() == "translucent_no_depth" and panel.base_cmap.currentText() == "bone"
    panel.opacity.setValue(60)
    assert pet.opacity == pytest.approx(0.6) and pet.colormap.name == "viridis" and pet.blending == "translucent_no_depth"
    # A layer that left the pair is no longer followed.
    viewer.layers.remove(pet)
    ct2 = viewer.add_image(np.zeros((4, 4, 4)), name="other")
    panel.overlay.setCurrentText("other")
    pet.opacity = 0.9
    assert panel.opacity.value() == int(round(ct2.opacity * 100))


def test_range_boxes_keep_small_overlay_ranges(make_napari_viewer):
    # A probability map 0..0.04 as overlay: the max box (minimum 0.1 before) clamped it to 0.1.
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 5, 6)), name="base")
    prob = viewer.add_image(np.linspace(0, 0.05, 120).reshape(4, 5, 6), name="prob", contrast_limits=(0, 0.04))
    panel = OverlayPanel(viewer)
    panel.overlay.set_layer("prob")
    assert panel.suv_max.value() == pytest.approx(0.04)
    panel.suv_threshold.setValue(0.01)
    assert tuple(prob.contrast_limits) == pytest.approx((0.01, 0.04))


def test_napari_contrast_slider_covers_the_whole_image(ct_pet, samples_dir):
    # napari makes a layer's slider range equal to the limits it was opened with: the CT (brain window 0..80 HU)
    # could not be dragged to a bone or lung window with napari's own contrast slider.
    viewer, ct, pet, panel = ct_pet
    volume = medfuse.load(samples_dir / "ct")
    assert tuple(ct.contrast_limits_range) == (float(volume.array.min()), float(volume.array.max()))
    assert tuple(ct.contrast_limits) == (0.0, 80.0)  # the window itself is untouched
    assert pet.contrast_limits_range[0] == 0.0 and pet.contrast_limits_range[1] >= 6.0
    later = viewer.open(str(samples_dir / "spect.nii.gz"), plugin="medfuse")[0]  # opened after the panel
    assert later.contrast_limits_range[1] == pytest.approx(float(medfuse.load(samples_dir / "spect.nii.gz").array.max()))
    other = viewer.add_image(np.arange(10.0).reshape(1, 2, 5), contrast_limits=(2, 3))  # another plugin's layer
    assert tuple(other.contrast_limits_range) == (2, 3)


def test_compare_and_mip_restore_layers_renamed_meanwhile(ct_pet):
    # Layers were remembered by name: a layer renamed during a compare mode stayed hidden afterwards (the CT
    # vanished), and one renamed during the MIP kept the MIP rendering.
    viewer, ct, pet, panel = ct_pet
    panel.set_compare("checkerboard")
    assert not ct.visible and not pet.visible
    ct.name = "CT head"
    panel.set_compare("overlay")
    assert ct.visible and pet.visible and len(viewer.layers) == 2
    before = pet.rendering
    panel.set_mip(True)
    panel.set_mip(True)  # a second "on" must not record "mip" as the rendering to go back to
    pet.name = "FDG"
    panel.set_mip(False)
    assert pet.rendering == before and ct.rendering == before


def _coloured_pixels(viewer) -> int:
    """Coloured (not grey) pixels of the canvas at the lesion slice: the PET drawn over the grey MR."""
    from medfuse.phantom import load_ground_truth

    lesion = load_ground_truth()["lesion"]["center_lps_mm"]
    viewer.dims.set_point(range(3), (float(lesion[2]), float(lesion[1]), float(lesion[0])))  # world (S, P, L)
    viewer.reset_view()
    img = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    return int((np.abs(img[..., 0] - img[..., 2]) > 60).sum())


def test_an_overlay_below_the_base_is_moved_above_it_and_drawn(qtbot, make_napari_viewer, samples_dir, monkeypatch):
    # The PET opened before the MR lay below it in the layer list: the opaque MR hid the additive PET (0 coloured
    # pixels at the lesion slice, 27016 with the MR opened first), while the panel showed the pair as set.
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_info", shown.append)
    viewer = make_napari_viewer(show=True)  # a shown canvas for the screenshot
    pet = viewer.open(str(samples_dir / "pet"), plugin="medfuse")[0]
    viewer.add_image(np.zeros((4, 4, 4), np.float32), name="extra", visible=False)
    mr = viewer.open(str(samples_dir / "mr_t1.nii.gz"), plugin="medfuse")[0]
    assert [l.name for l in viewer.layers] == ["pet", "extra", "mr_t1"]
    panel = OverlayPanel(viewer)
    assert (panel.base.layer() is mr) and (panel.overlay.layer() is pet)
    qtbot.waitUntil(lambda: [l.name for l in viewer.layers] == ["extra", "mr_t1", "pet"], timeout=5000)
    assert viewer.layers.index(pet) == viewer.layers.index(mr) + 1  # directly above; "extra" kept below the MR
    assert len(shown) == 1 and "'pet'" in shown[0] and "'mr_t1'" in shown[0] and "above" in shown[0], shown
    panel.set_suv_range(6, 0)
    assert _coloured_pixels(viewer) > 5000  # the PET is drawn over the MR


def test_an_overlay_opened_below_the_base_with_the_panel_open_is_moved_above(qtbot, make_napari_viewer, samples_dir):
    # The panel open first: the pair is picked as napari inserts the MR, and the list is reordered after that.
    viewer = make_napari_viewer()
    panel = OverlayPanel(viewer)
    viewer.open(str(samples_dir / "pet"), plugin="medfuse")
    viewer.open(str(samples_dir / "mr_t1.nii.gz"), plugin="medfuse")
    assert (panel.base.layer().name, panel.overlay.layer().name) == ("mr_t1", "pet")
    qtbot.waitUntil(lambda: [l.name for l in viewer.layers] == ["mr_t1", "pet"], timeout=5000)


def test_an_overlay_already_above_the_base_is_left_where_it_is(qtbot, make_napari_viewer, samples_dir, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_info", shown.append)
    viewer = make_napari_viewer()
    ct = viewer.open(str(samples_dir / "ct"), plugin="medfuse")[0]
    viewer.add_image(np.zeros((4, 4, 4), np.float32), name="extra")
    pet = viewer.open(str(samples_dir / "pet"), plugin="medfuse")[0]
    panel = OverlayPanel(viewer)
    assert (panel.base.layer() is ct) and (panel.overlay.layer() is pet)
    qtbot.wait(100)
    assert [l.name for l in viewer.layers] == ["ct", "extra", "pet"] and not shown
    # Picking a pair whose overlay lies below (the CT as the overlay of the PET): the CT goes directly above the PET.
    panel.base.set_layer("pet")
    panel.overlay.set_layer("ct")
    qtbot.waitUntil(lambda: [l.name for l in viewer.layers] == ["extra", "pet", "ct"], timeout=5000)
    assert len(shown) == 1 and "'ct'" in shown[0], shown
