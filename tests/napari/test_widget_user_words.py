"""The dock widget's messages in a radiologist's terms: the layers by name, counts of the layer's own voxels,
advice the panel can follow, and a compare view of a layer that is not there refused as Fuse refuses it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from medfuse_napari import _widget  # noqa: E402
from medfuse_napari._jobs import napari_words  # noqa: E402
from medfuse_napari._widget import MedfuseWidget  # noqa: E402

pytestmark = pytest.mark.napari


def _md(modality):
    return {"medfuse": {"modality": modality, "unit": "arbitrary"}}


def _blobs():
    a = np.zeros((24, 24, 24), np.float32)
    a[4:18, 6:20, 4:20] = 50
    a[8:12, 9:14, 6:11] = 120
    return a


@pytest.fixture
def study(make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(_blobs(), name="mr", scale=(2, 2, 2), metadata=_md("MR"))
    said = {"error": [], "warning": []}
    monkeypatch.setattr(_widget, "_notify_error", said["error"].append)
    monkeypatch.setattr(_widget, "_notify_warning", said["warning"].append)
    return viewer, MedfuseWidget(viewer), said


def _fuse(qtbot, widget, second):
    panel = widget.fuse_panel
    panel.inputs[0].set_layer("mr")
    panel.inputs[1].set_layer(second)
    panel.method.setCurrentText("mean")
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    return panel


def test_nan_in_a_layer_is_counted_in_its_own_voxels_and_named(qtbot, study):
    """Fuse counted NaN after resampling onto the base's grid (607,380 for a layer with 76,800) and said
    'volume 2'."""
    viewer, widget, said = study
    bad = np.ones((12, 12, 12), np.float32)
    bad[:2] = np.nan  # 288 of 1,728 voxels
    viewer.add_image(bad, name="withnan", scale=(4, 4, 4), metadata=_md("PT"))  # another grid than the MR's
    _fuse(qtbot, widget, "withnan")
    assert len(said["error"]) == 1
    assert said["error"][0].startswith("layer 'withnan' has 288 NaN or infinite values (16.7 % of it)")
    assert "numpy" not in said["error"][0]  # the fix in napari terms
    assert "fused (mean)" not in viewer.layers


@pytest.mark.parametrize("value", [5.0, -3.0])
def test_a_constant_layer_is_warned_of_once_by_name(qtbot, study, value):
    """A constant layer (not 0) added a flat level to the fusion with no word; Register already refused it."""
    viewer, widget, said = study
    viewer.add_image(np.full((24, 24, 24), value, np.float32), name="flat", scale=(2, 2, 2), metadata=_md("PT"))
    _fuse(qtbot, widget, "flat")
    assert "fused (mean)" in viewer.layers  # a warning, not a refusal
    constant = [w for w in said["warning"] if "constant" in w]
    assert constant == [f"'flat' is constant (every voxel is {value:g}): it holds no image, and the fusion takes it "
                        "as a flat level beside the other layers. Check that the intended layer is picked."]
    viewer.add_image(_blobs() * 2 + 1, name="pet", scale=(2, 2, 2), metadata=_md("PT"))
    said["warning"].clear()
    _fuse(qtbot, widget, "pet")
    assert not [w for w in said["warning"] if "constant" in w]


def test_fusion_notes_name_the_layers_not_input_numbers(qtbot, study):
    """A note medfuse gives of 'input 2' or 'volume 2' named no layer the user can see."""
    assert _widget._input_names("input 2: the volume looks like a label map", ["mr", "mask"]) == \
        "'mask': the volume looks like a label map"
    assert _widget._input_names("volume 1 is constant (every voxel", ["mr", "mask"]) == \
        "'mr' is constant (every voxel"
    assert _widget._input_names("input 3: x", ["mr", "mask"]) == "input 3: x"  # no such layer: as it was
    assert _widget._input_names("the voxels are anisotropic", ["mr"]) == "the voxels are anisotropic"
    viewer, widget, said = study
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[3:9, 3:9, 3:9] = 100
    viewer.add_image(mask, name="mask", scale=(4, 4, 4))  # no medfuse metadata: modality unknown
    _fuse(qtbot, widget, "mask")
    label = [w for w in said["warning"] if "label map" in w]
    assert len(label) == 1 and label[0].startswith("fused (mean): 'mask': the volume looks like a label map")
    assert "interpolation=" not in label[0] and "Convert to Labels" in label[0]


def test_python_advice_of_registration_is_put_in_panel_terms():
    """Register's 'pass initialise='geometry' ... or initial_transform=' named options the panel does not have."""
    import medfuse
    from medfuse.errors import RegistrationError

    fixed = medfuse.Volume(_blobs(), np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR")
    far = np.diag([2.0, 2.0, 2.0, 1.0])
    far[0, 3] = 1000.0
    with pytest.raises(RegistrationError) as ei:
        medfuse.register(fixed, medfuse.Volume(_blobs(), far, modality="PT"), kind="rigid")
    words = napari_words(ei.value.one_line())
    assert "initialise=" not in words and "initial_transform=" not in words
    assert "'start from the moving layer's placement in the viewer' ticked" in words
    with pytest.raises(RegistrationError) as ei:
        medfuse.register(fixed, medfuse.Volume(_blobs(), np.diag([2.0, 2.0, 2.0, 1.0]), modality="PT"),
                         kind="rigid", initial_transform=medfuse.Transform.from_matrix(far))
    words = napari_words(ei.value.one_line())
    assert ".inverse()" not in words and "untick 'start from the moving layer's placement" in words


def test_a_failed_registration_names_the_layer_in_its_role(qtbot, study):
    viewer, widget, said = study
    bad = _blobs()
    bad[0, 0, :4] = np.nan
    viewer.add_image(bad, name="withnan", scale=(2, 2, 2), metadata=_md("PT"))
    panel = widget.register_panel
    panel.fixed.set_layer("mr")
    panel.moving.set_layer("withnan")
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert len(said["error"]) == 1 and said["error"][0].startswith("the moving layer 'withnan' has 4 NaN")
    assert panel._layer_words("fixed is constant (every voxel is 0)") == \
        "the fixed layer 'mr' is constant (every voxel is 0)"
    assert panel._layer_words("the fixed layer is fine") == "the fixed layer is fine"


def test_a_compare_view_of_a_layer_outside_the_base_is_refused(study, monkeypatch):
    """Checkerboard and curtain showed empty overlay tiles without a word, where Fuse refuses the same pair."""
    viewer, widget, _ = study
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    viewer.add_image(_blobs(), name="far", scale=(2, 2, 2), translate=(1000, 0, 0), metadata=_md("PT"))
    viewer.add_image(_blobs(), name="near", scale=(2, 2, 2), translate=(10, 0, 0), metadata=_md("PT"))
    ov = widget.overlay_panel
    ov.base.set_layer("mr")
    for mode in ("checkerboard", "curtain"):
        ov.overlay.set_layer("far")
        shown.clear()
        ov.set_compare(mode)
        assert len(shown) == 1 and shown[0].startswith("'far' does not overlap the base 'mr'")
        assert ov.compare.currentText() == "overlay"
        assert not [l for l in viewer.layers if l.name.startswith("compare:")]
        ov.overlay.set_layer("near")  # partly overlapping: built
        ov.set_compare(mode)
        assert ov.compare.currentText() == mode and "compare: overlay" in viewer.layers
        ov.set_compare("overlay")
