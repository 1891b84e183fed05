"""A layer whose napari ``units`` are not mm (another plugin's layer in µm) is registered and fused
in mm, and the result placed back in the layer's own units; units that are not lengths are refused with the fix.

Why: medfuse's registration presets are in mm, and napari draws a layer in µm with scale 2000 exactly like one in
mm with scale 2; the widget took the µm numbers for mm (the sample PET/MR registered 180° and 3202 mm off).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from medfuse_napari._layers import data_to_world, display_grid  # noqa: E402

pytestmark = pytest.mark.napari

#: µm per mm, written out (the test does not use the plugin's own conversion).
UM = 1000.0


@functools.lru_cache(maxsize=1)
def _samples():
    """The sample MR T1 and PET on their napari display grids: ``{name: (array, scale_mm, translate_mm, modality)}``."""
    from medfuse.phantom import load_samples

    volumes = load_samples()
    out = {}
    for name in ("t1", "pet"):
        arr, scale, translate, _ = display_grid(volumes[name])
        out[name] = (arr, np.asarray(scale), np.asarray(translate), volumes[name].modality)
    return out


def _real(viewer, name):
    """The layer itself, by iteration (``viewer.layers[name]`` on a proxy viewer is a proxy)."""
    return next(l for l in viewer.layers if l.name == name)


@pytest.fixture
def notes(monkeypatch):
    shown = {"error": [], "warning": []}
    monkeypatch.setattr("napari.utils.notifications.show_error", shown["error"].append)
    monkeypatch.setattr("napari.utils.notifications.show_warning", shown["warning"].append)
    return shown


def _open(make_napari_viewer, dock_widget, units):
    """The sample pair as another plugin gives it (no medfuse metadata but the modality): ``units`` per layer name."""
    viewer = make_napari_viewer()
    for name, (arr, scale, translate, modality) in _samples().items():
        unit = units[name]
        per_mm = UM if unit == "um" else 1.0
        viewer.add_image(arr, name=name, scale=tuple(scale * per_mm), translate=tuple(translate * per_mm),
                         units=(unit,) * 3, metadata={"medfuse": {"modality": modality}})
    return viewer, dock_widget(viewer)


def _placement_mm(layer) -> np.ndarray:
    """The layer's napari data -> world 4x4 in mm (µm layers converted here, by the test)."""
    per_mm = {"micrometer": UM, "millimeter": 1.0}[str(layer.units[-1])]
    return np.diag([1 / per_mm] * 3 + [1.0]) @ data_to_world(layer)


def test_a_pair_in_micrometres_registers_as_the_same_pair_in_mm(register_in_dock, make_napari_viewer, dock_widget,
                                                                 notes):
    runs = {}
    for unit in ("mm", "um"):
        viewer, widget = _open(make_napari_viewer, dock_widget, {"t1": unit, "pet": unit})
        rp = register_in_dock(widget, "t1", "pet", timeout_ms=120_000)
        assert notes["error"] == [] and rp.level_label.text() == "done"
        rep = rp.result.report
        runs[unit] = (_placement_mm(_real(viewer, "pet")), rep.rotation_deg, rep.translation_mm)
    (mm, rot_mm, shift_mm), (um, rot_um, shift_um) = runs["mm"], runs["um"]
    # The PET lands at the same place in mm: corners of its grid.
    shape = _samples()["pet"][0].shape
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    gap = np.linalg.norm((corners @ um.T - corners @ mm.T)[:, :3], axis=1)
    # Same grids in mm, same start: identical but for sampling; before, the µm pair was 180° and 3202 mm off.
    assert gap.max() < 2.0, gap
    assert abs(rot_um - rot_mm) < 1.0 and abs(shift_um - shift_mm) < 2.0, (rot_mm, rot_um, shift_mm, shift_um)
    assert shift_um < 100.0  # a head-sized misalignment, in mm


def test_a_fusion_of_a_micrometre_layer_with_a_mm_layer_is_the_fusion_in_mm(qtbot, make_napari_viewer, dock_widget,
                                                                         notes):
    fused = {}
    for t1_unit, pet_unit in (("mm", "mm"), ("mm", "um"), ("pixel", "um")):
        viewer, widget = _open(make_napari_viewer, dock_widget, {"t1": t1_unit, "pet": pet_unit})
        fp = widget.fuse_panel
        fp.inputs[0].set_layer("t1")
        fp.inputs[1].set_layer("pet")
        fp.method.setCurrentText("mean")
        fp.run()
        qtbot.waitUntil(lambda: fp.worker is None, timeout=120_000)
        assert notes["error"] == [], notes["error"]
        fused[t1_unit, pet_unit] = np.asarray(_real(viewer, "fused (mean)").data)
        # napari draws pixel beside µm unconverted: said, since the fused image is right in mm all the same.
        warned = [w for w in notes["warning"] if "without converting" in w]
        assert len(warned) == (t1_unit == "pixel"), notes["warning"]
        notes["warning"].clear()
    # napari draws the PET in µm where it draws it in mm: the fused voxels are the same (pixel is taken as mm).
    np.testing.assert_allclose(fused["mm", "um"], fused["mm", "mm"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused["pixel", "um"], fused["mm", "mm"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("action", ["register", "fuse"])
def test_a_layer_in_seconds_is_refused_with_the_fix(make_napari_viewer, dock_widget, notes, action):
    viewer, widget = _open(make_napari_viewer, dock_widget, {"t1": "mm", "pet": "mm"})
    pet = _real(viewer, "pet")
    pet.units = ("second", "second", "second")
    before = pet.affine.affine_matrix.copy()
    if action == "register":
        panel = widget.register_panel
        panel.fixed.set_layer("t1")
        panel.moving.set_layer("pet")
    else:
        panel = widget.fuse_panel
        panel.inputs[0].set_layer("t1")
        panel.inputs[1].set_layer("pet")
    panel.run()
    assert panel.worker is None  # refused before any work
    assert len(notes["error"]) == 1
    message = notes["error"][0]
    assert "'pet'" in message and "second" in message and "not all lengths" in message and "Fix:" in message
    assert "units" in message.split("Fix:")[1]
    np.testing.assert_allclose(pet.affine.affine_matrix, before)  # nothing applied
    assert [l.name for l in viewer.layers] == ["t1", "pet"]  # nothing added


def test_the_writers_sidecar_holds_no_patient_key(tmp_path):
    """A layer's provenance carries the session's salted patient key (for the different-patients warning); the
    writer's sidecar must not (medfuse._patient: never written)."""
    import json

    import medfuse
    from medfuse._patient import patient_key
    from medfuse_napari import _layers, _writer

    key = {"patient_key": patient_key({"PatientID": "PIDAAA111"})}
    fixed = medfuse.Volume(np.zeros((8, 8, 8), np.float32), np.eye(4), modality="MR", provenance=key)
    moving = medfuse.Volume(np.ones((8, 8, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR",
                            provenance=key)
    vol = medfuse.resample(moving, fixed)  # a layer medfuse made: the writer gives it a sidecar
    data, kw, _ = _layers.volume_to_layer(vol, name="mr")
    assert kw["metadata"]["medfuse"]["provenance"]["patient_key"]
    _writer.write_image(str(tmp_path / "layer.nii.gz"), data, kw)
    assert "patient_key" not in (tmp_path / "layer.json").read_text()
    assert json.loads((tmp_path / "layer.json").read_text())
