"""A voxel spacing held in a layer's napari ``affine`` (other readers) registers and tiles as with
``scale``, new layers keep napari ``units``, a fusion whose input moved meanwhile is not added, the curtain follows
napari's transpose/roll and a rotated base, and closing the dock gives back the layers a compare view or the flicker
hid. The widget is opened as napari opens it from the Plugins menu (``dock_widget``)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from medfuse_napari import _overlay  # noqa: E402
from medfuse_napari._combo import LayerCombo  # noqa: E402
from medfuse_napari._layers import data_to_world, layer_to_volume, viewer_alignment  # noqa: E402

pytestmark = pytest.mark.napari


def _blob(shape=(20, 24, 28), seed=0, shift=(0, 0, 0)):
    """A noisy box with a bright block (something to align), as in round 29 (test modules cannot import each other
    under --import-mode=importlib)."""
    rng = np.random.default_rng(seed)
    a = np.zeros(shape, np.float32)
    a[4:-4, 5:-5, 6:-6] = 100 + 10 * rng.random((shape[0] - 8, shape[1] - 10, shape[2] - 12))
    a[8:12, 9:13, 10:16] += 150
    return np.roll(a, shift, axis=(0, 1, 2))


def _real(viewer, name):
    """The layer itself, by iteration (``viewer.layers[name]`` on a proxy viewer is a proxy)."""
    return next(l for l in viewer.layers if l.name == name)

MR_SPACING, PET_SPACING = (2.0, 2.0, 2.0), (3.0, 2.5, 2.0)
PET_ORIGIN = (6.0, -4.0, 8.0)


def _grid_affine(scale, translate=(0.0, 0.0, 0.0)):
    aff = np.eye(4)
    aff[:3, :3] = np.diag(scale)
    aff[:3, 3] = translate
    return aff


def _add(viewer, data, name, scale, translate=(0.0, 0.0, 0.0), *, in_affine, **kwargs):
    """A layer with its grid in ``scale``/``translate`` or, as some readers write it, in ``affine`` (scale 1)."""
    if in_affine:
        return viewer.add_image(data, name=name, affine=_grid_affine(scale, translate), **kwargs)
    return viewer.add_image(data, name=name, scale=scale, translate=translate, **kwargs)


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    return shown


@pytest.fixture
def pair(make_napari_viewer, dock_widget):
    """Callable: an MR and a shifted PET blob on different grids, the widget opened the Plugins-menu way."""

    def make(in_affine):
        viewer = make_napari_viewer()
        # +10 over a window from 0: no voxel at the compare views' fill value (the low contrast limit), so the
        # base's tiles can be told from the overlay's.
        window = dict(contrast_limits=(0.0, 300.0))
        _add(viewer, _blob(seed=0) + 10, "mr", MR_SPACING, in_affine=in_affine,
             metadata={"medfuse": {"modality": "MR"}}, **window)
        _add(viewer, _blob(shape=(14, 20, 28), seed=1, shift=(1, 0, 1)) + 10, "pet", PET_SPACING, PET_ORIGIN,
             in_affine=in_affine, metadata={"medfuse": {"modality": "PT"}}, **window)
        return viewer, dock_widget(viewer)

    return make


# ------------------------------------------------------------------------------------------ 1. spacing in affine
def test_a_grid_held_in_the_affine_is_the_layer_grid_not_a_placement(pair):
    viewer, _ = pair(in_affine=True)
    mr, pet = _real(viewer, "mr"), _real(viewer, "pet")
    assert viewer_alignment(mr, pet) is None  # no placement: the scanners' coordinates, as with scale/translate
    vol = layer_to_volume(pet, registered=False)
    assert np.allclose(vol.spacing, PET_SPACING)  # per voxel axis (not 1 mm)
    assert np.allclose(vol.affine[:3, 3], PET_ORIGIN[::-1])


def test_a_pair_with_its_spacing_in_the_affine_registers_as_with_scale(register_in_dock, pair, errors):
    placed = {}
    for in_affine in (False, True):
        viewer, widget = pair(in_affine)
        rp = register_in_dock(widget, "mr", "pet")
        assert errors == [] and rp.level_label.text() == "done"
        placed[in_affine] = data_to_world(_real(viewer, "pet"))
    # The PET lands at the same world positions (its corners and centre, in mm) either way.
    corners = np.array([[i, j, k, 1.0] for i in (0, 13) for j in (0, 19) for k in (0, 27)])
    gap = np.linalg.norm((corners @ placed[True].T - corners @ placed[False].T)[:, :3], axis=1)
    # Same grids, same start: identical here; 3 mm leaves room for a sampling difference. Taking the spacing in the
    # affine for a placement put the PET 6-10 mm off on this pair (115 mm median on the sample PET/MR).
    assert gap.max() < 3.0, gap


def test_a_registered_layer_with_its_spacing_in_the_affine_keeps_its_grid(register_in_dock, pair, errors):
    viewer, widget = pair(in_affine=True)
    register_in_dock(widget, "mr", "pet")
    pet = _real(viewer, "pet")
    # The affine holds the grid and the registration now: the grid is still the spacing, the rest a rigid placement.
    vol = layer_to_volume(pet, registered=False)
    assert np.allclose(vol.spacing, PET_SPACING)
    alignment = viewer_alignment(_real(viewer, "mr"), pet)
    assert alignment is not None and np.allclose(alignment[:3, :3].T @ alignment[:3, :3], np.eye(3), atol=1e-6)


def test_an_affine_with_a_shear_keeps_its_true_spacing_as_the_grid_and_the_shear_as_placement(make_napari_viewer):
    viewer = make_napari_viewer()
    sheared = _grid_affine(PET_SPACING, PET_ORIGIN)
    sheared[0, 1] = 1.5  # a grid cannot hold it: it stays a placement, applied exactly when resampling
    viewer.add_image(_blob(seed=1), name="pet", affine=sheared)
    pet = _real(viewer, "pet")
    vol = layer_to_volume(pet, registered=False)
    assert np.allclose(vol.spacing, np.linalg.norm(sheared[:3, :3], axis=0))  # the true spacing, not 1 mm
    from medfuse_napari._layers import layer_grid, lps_to_world, world_matrix

    # Grid and placement together are exactly what napari shows.
    assert np.allclose(lps_to_world(world_matrix(pet)) @ layer_grid(pet), data_to_world(pet))


def test_checkerboard_tiles_use_the_spacing_held_in_the_affine(pair):
    viewer, widget = pair(in_affine=True)
    op = widget.overlay_panel
    op.base.set_layer("pet")
    op.overlay.set_layer("mr")
    op.tile_mm.setValue(6)
    op.set_compare("checkerboard")
    shown = np.asarray(_real(viewer, "compare: base").data) != op._fills["compare: base"]
    # 6 mm tiles: 2 voxels of 3 mm along axis 0, 3 voxels of 2 mm along axis 2 (not 6 voxels of "1 mm").
    runs0 = np.diff(np.flatnonzero(np.diff(shown[:, 5, 5].astype(int)) != 0))
    runs2 = np.diff(np.flatnonzero(np.diff(shown[5, 5, :].astype(int)) != 0))
    assert set(runs0.tolist()) == {2} and set(runs2.tolist()) == {3}


# ------------------------------------------------------------------------------------------ 2. units
def test_fused_resampled_and_compare_layers_keep_the_units_and_are_saved_in_mm(qtbot, make_napari_viewer,
                                                                             dock_widget, errors, tmp_path):
    import medfuse

    viewer = make_napari_viewer()
    um = ("um", "um", "um")
    a = viewer.add_image(_blob(seed=0), name="a", scale=(2000.0, 1500.0, 1000.0), translate=(5000.0, 0, 0), units=um)
    viewer.add_image(_blob(seed=1), name="b", scale=(2000.0, 1500.0, 1000.0), translate=(5000.0, 0, 0), units=um)
    widget = dock_widget(viewer)
    fp = widget.fuse_panel
    fp.inputs[0].set_layer("a")
    fp.inputs[1].set_layer("b")
    fp.method.setCurrentText("mean")
    fp.run()
    qtbot.waitUntil(lambda: fp.worker is None, timeout=60_000)
    fused = _real(viewer, "fused (mean)")
    op = widget.overlay_panel
    op.base.set_layer("a")
    op.overlay.set_layer("b")
    op.set_compare("checkerboard")
    assert errors == []
    for layer in (fused, _real(viewer, "compare: base")):
        assert tuple(str(u) for u in layer.units) == tuple(str(u) for u in a.units)
    fused.save(str(tmp_path / "fused.nii.gz"))
    vol = medfuse.load(tmp_path / "fused.nii.gz")
    assert np.allclose(vol.spacing, (2.0, 1.5, 1.0), rtol=1e-5)  # mm per voxel axis (not 1000 times that)


def test_the_resampled_registration_layer_keeps_the_units(make_napari_viewer, dock_widget):
    from medfuse_napari._layers import layer_geometry

    viewer = make_napari_viewer()
    um = ("um", "um", "um")
    viewer.add_image(_blob(seed=0), name="a", scale=(2000.0, 1500.0, 1000.0), units=um)
    viewer.add_image(_blob(seed=1), name="b", scale=(2000.0, 1500.0, 1000.0), units=um)
    a, b = _real(viewer, "a"), _real(viewer, "b")
    rp = dock_widget(viewer).register_panel
    # What run() snapshots of the fixed layer, then the step that adds "moving on fixed" (no registration needed).
    rp._fixed_geometry, rp._fixed_grid = layer_geometry(a), None
    rp._add_resampled(layer_to_volume(b, registered=False), b, a)
    added = viewer.layers[-1]
    assert added.name == "b on a"
    assert tuple(str(u) for u in added.units) == tuple(str(u) for u in a.units)


# ------------------------------------------------------------------------------------------ 3. fusion vs. a move
def _mean_fusion_panel(widget):
    fp = widget.fuse_panel
    fp.inputs[0].set_layer("mr")
    fp.inputs[1].set_layer("pet")
    fp.method.setCurrentText("mean")
    return fp


def test_a_fusion_whose_input_moved_meanwhile_is_not_added(qtbot, pair, errors):
    viewer, widget = pair(in_affine=False)
    fp = _mean_fusion_panel(widget)
    n = len(viewer.layers)
    fp.run()
    # Before the worker's result can reach the GUI thread: a registration ending, or a hand drag, moves the PET.
    _real(viewer, "pet").affine = _grid_affine((1.0, 1.0, 1.0), (0.0, 4.0, 0.0))
    qtbot.waitUntil(lambda: fp.worker is None, timeout=60_000)
    assert len(viewer.layers) == n  # the fused image of the old alignment is not added
    assert len(errors) == 1 and "'pet' was moved" in errors[0] and "Fix:" in errors[0]
    assert fp.status.text().startswith("not added")


def test_a_fusion_whose_inputs_stayed_put_is_added(qtbot, pair, errors):
    viewer, widget = pair(in_affine=False)
    fp = _mean_fusion_panel(widget)
    n = len(viewer.layers)
    _real(viewer, "pet").name = "pet renamed"  # a rename is no move
    fp.run()
    qtbot.waitUntil(lambda: fp.worker is None, timeout=60_000)
    assert errors == [] and len(viewer.layers) == n + 1


def _picked(fp):
    return [c.layer().name if c.layer() is not None else None for c in fp.inputs]


def test_the_fuse_pickers_never_share_a_layer_after_an_input_is_closed(qtbot, pair, errors):
    """Probe t13: after the PET of a running fusion was closed the pickers were ['mr_t1', 'mr_t1', None]; with a
    third layer open, two pickers fell on it. A picker that lost its layer takes a free one, an optional one goes
    back to (none), and with one layer left the panel says why Fuse cannot run."""
    viewer, widget = pair(in_affine=False)
    viewer.add_image(_blob(seed=2) + 10, name="ct", scale=MR_SPACING, metadata={"medfuse": {"modality": "CT"}})
    fp = widget.fuse_panel
    # Three inputs; the second's layer closed: it fell on the third's 'ct' (no other PET to prefer).
    for combo, name in zip(fp.inputs, ("mr", "pet", "ct")):
        combo.set_layer(name)
    viewer.layers.remove("pet")
    assert _picked(fp) == ["mr", "ct", None]
    # The base's layer closed: the base picker (MR/CT preferred) fell on the second's 'ct'; it takes a free layer.
    viewer.add_image(_blob(seed=3) + 10, name="pet2", scale=MR_SPACING, metadata={"medfuse": {"modality": "PT"}})
    fp.inputs[1].set_layer("ct")
    fp.inputs[2].set_layer(LayerCombo.NONE)
    viewer.layers.remove("mr")
    picked = _picked(fp)
    assert picked[0] != picked[1] and None not in picked[:2], picked
    # The t13 case: a running fusion's second input closed, one layer left.
    viewer.layers.remove("pet2")
    assert _picked(fp)[:2] == ["ct", "ct"]  # the only layer left: the panel says so
    assert "different layers" in fp.status.text()
    viewer.add_image(_blob(seed=1) + 10, name="pet", scale=PET_SPACING, metadata={"medfuse": {"modality": "PT"}})
    fp.inputs[1].set_layer("pet")
    fp.method.setCurrentText("mean")
    n = len(viewer.layers)
    fp.run()
    viewer.layers.remove("pet")  # before the result comes back
    qtbot.waitUntil(lambda: fp.worker is None, timeout=60_000)
    assert len(viewer.layers) == n - 1 and _picked(fp) == ["ct", "ct", None]
    errors.clear()
    fp.run()  # says why it cannot run
    assert len(errors) == 1 and "2 or 3 different image layers" in errors[0], errors
    assert len(viewer.layers) == n - 1


# ------------------------------------------------------------------------------------------ 4. curtain
def _base_side(viewer, op, axis_world):
    """'B' where the compare base shows the base, '.' where its fill is, along a world axis through its centre."""
    cb = _real(viewer, "compare: base")
    fill = op._fills["compare: base"]
    data = np.asarray(cb.data)
    centre = np.asarray(cb.data_to_world(tuple(np.array(data.shape) // 2)), dtype=float)
    out = []
    for t in np.linspace(-60, 60, 41):
        p = centre.copy()
        p[axis_world] += t
        j = np.round(np.asarray(cb.world_to_data(tuple(p)), dtype=float)).astype(int)
        if np.all(j >= 0) and np.all(j < data.shape):
            out.append("B" if data[tuple(j)] != fill else ".")
    return "".join(out)


def _split_left_right(line):
    """Base on the left, overlay on the right: one run of B then one run of '.'."""
    return line.startswith("B") and line.endswith(".") and "B" not in line.lstrip("B").lstrip(".") \
        and "." not in line.rstrip(".").rstrip("B")


def test_the_curtain_follows_napari_transpose(qtbot, pair):
    viewer, widget = pair(in_affine=False)
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    op.set_compare("curtain")
    assert _split_left_right(_base_side(viewer, op, viewer.dims.order[-1]))
    viewer.dims.transpose()  # napari's own transpose button
    qtbot.waitUntil(lambda: _split_left_right(_base_side(viewer, op, viewer.dims.order[-1])), timeout=5_000)
    assert set(_base_side(viewer, op, viewer.dims.order[-2])) == {"B"} or \
        set(_base_side(viewer, op, viewer.dims.order[-2])) == {"."}  # not split along the vertical


def test_the_curtain_splits_a_rotated_base_across_the_screen(pair):
    viewer, widget = pair(in_affine=False)
    _real(viewer, "mr").rotate = 90  # turned in the slice plane by hand
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    op.set_compare("curtain")
    assert _split_left_right(_base_side(viewer, op, viewer.dims.order[-1]))


# ------------------------------------------------------------------------------------------ 5. closing the dock
def test_closing_the_dock_in_a_compare_view_gives_the_layers_back(pair):
    viewer, widget = pair(in_affine=False)
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    op.set_compare("checkerboard")
    assert not _real(viewer, "mr").visible
    viewer.window.remove_dock_widget(widget)
    assert not any(_overlay._is_compare(l) for l in viewer.layers)
    assert all(l.visible for l in viewer.layers)


def _flickering(pair):
    """(viewer, widget, overlay panel) with MR as the base, PET as the overlay, the flicker on in its hidden phase."""
    viewer, widget = pair(in_affine=False)
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    op.flicker.setChecked(True)
    op._flick()
    return viewer, widget, op


def test_closing_the_dock_while_flickering_leaves_the_overlay_visible(pair):
    viewer, widget, op = _flickering(pair)
    pet = _real(viewer, "pet")
    assert not pet.visible  # caught in the hidden phase
    viewer.window.remove_dock_widget(widget)
    assert pet.visible and not op._flicker_timer.isActive()


# ------------------------------------------------------------------------------------------ 5. saved voxel order
def test_the_resampled_registration_layer_is_saved_in_the_fixed_files_voxel_order(make_napari_viewer, dock_widget,
                                                                                 register_in_dock, tmp_path):
    """'moving on fixed' saved: the fixed file's shape, affine and voxel order (nibabel), its voxels those of
    medfuse.resample on the files. Before: napari's display order (S, P, L) with a permuted affine, so a voxel-wise
    combination with the fixed file (numpy, fslmaths) mixed transposed data."""
    import nibabel as nib

    import medfuse

    ras = np.diag([2.0, 1.5, 2.5, 1.0])  # RAS: napari shows it reordered (S, P, L)
    ras[:3, 3] = (-20.0, -15.0, -30.0)
    fixed_file, moving_file = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(_blob(seed=0), (2, 1, 0)).copy(), ras), str(fixed_file))  # 28x24x20
    nib.save(nib.Nifti1Image(np.transpose(_blob(seed=1, shift=(1, 0, 1)), (2, 1, 0)).copy(), ras), str(moving_file))
    viewer = make_napari_viewer()
    fixed = viewer.open(str(fixed_file), plugin="medfuse")[0]
    viewer.open(str(moving_file), plugin="medfuse")
    assert fixed.metadata["medfuse"]["display_grid"] == "reordered" and fixed.data.shape == (20, 24, 28)
    widget = dock_widget(viewer)
    widget.register_panel.resample_box.setChecked(True)
    rp = register_in_dock(widget, "fixed", "moving")
    added = viewer.layers[-1]
    assert added.name == "moving on fixed", rp.level_label.text()

    out = tmp_path / "moving_on_fixed.nii.gz"
    added.save(str(out))
    img, ref = nib.load(str(out)), nib.load(str(fixed_file))
    assert img.shape == ref.shape == (28, 24, 20)
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(ref.affine) == ("R", "A", "S")
    # The same resampling on the files, written by medfuse.save: voxel for voxel (float rounding of the grids).
    expected = medfuse.resample(medfuse.load(moving_file), medfuse.load(fixed_file), transform=rp.result.transform)
    medfuse.save(expected, tmp_path / "expected.nii.gz")
    want = np.asarray(nib.load(str(tmp_path / "expected.nii.gz")).dataobj)
    np.testing.assert_allclose(np.asarray(img.dataobj), want, rtol=1e-4, atol=1e-3)
    assert np.abs(want).max() > 100  # not an empty volume compared with another


@pytest.mark.parametrize("closed", ["pet", "mr"])
def test_the_flicker_stops_when_one_of_its_pair_is_closed(pair, monkeypatch, closed):
    """The overlay picker fell back onto the base and the flicker went on blinking the MR itself (or the PET, when
    the base was closed) twice a second."""
    said = []
    monkeypatch.setattr("napari.utils.notifications.show_info", said.append)
    viewer, _, op = _flickering(pair)
    viewer.layers.remove(closed)
    kept = viewer.layers[0]
    assert not op.flicker.isChecked() and not op._flicker_timer.isActive()
    assert kept.visible
    op._flick()  # a tick already queued changes nothing now
    assert kept.visible
    assert any("The flicker stopped" in m for m in said), said
