"""The Register and Fuse tabs' status labels for keyboard and screen-reader users, and pickers that pre-select a
layer the viewer shows (a study folder opens with its other series hidden)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtTest import QTest  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from tests.napari.test_reader_study_folders import _copy_series  # noqa: E402

pytestmark = pytest.mark.napari


def _blob(seed):
    rng = np.random.default_rng(seed)
    a = np.zeros((16, 20, 24), np.float32)
    a[3:-3, 4:-4, 5:-5] = 100 + 20 * rng.random((10, 12, 14))
    return a


def _reachable(label):
    flags = label.textInteractionFlags()
    return (bool(flags & Qt.TextSelectableByKeyboard) and bool(flags & Qt.TextSelectableByMouse)
            and bool(label.focusPolicy() & Qt.TabFocus) and label.accessibleDescription() == label.toolTip() != "")


def test_fusion_status_is_reached_with_tab_and_named_with_its_text(make_napari_viewer, qtbot):
    # The status was a label with no name that Tab skipped: a screen-reader user pressing Fuse never heard that
    # the fused layer was added (or why it was not).
    viewer = make_napari_viewer(show=True)
    for name, seed in (("mr", 0), ("pet", 1)):
        viewer.add_image(_blob(seed), name=name, scale=(2.0, 2.0, 2.0))
    _, widget = viewer.window.add_plugin_dock_widget("medfuse", "medfuse")
    widget.tabs.setCurrentIndex(1)
    fp = widget.fuse_panel
    assert _reachable(fp.status)
    assert fp.status.text() == "" and fp.status.accessibleName() == "fusion status: none"
    fp.inputs[0].set_layer("mr")
    fp.inputs[1].set_layer("pet")
    fp.method.setCurrentText("mean")
    fp.run()
    qtbot.waitUntil(lambda: fp.worker is None, timeout=60_000)
    assert fp.status.text() == "added 'fused (mean)'"
    assert fp.status.accessibleName() == "fusion status: added 'fused (mean)'"

    # From Fuse, Tab goes (past the disabled Cancel and the progress bar) to the status, whose text the keyboard
    # selects for copying.
    fp.window().activateWindow()
    fp.run_button.setFocus(Qt.TabFocusReason)
    QApplication.processEvents()
    QTest.keyClick(fp.run_button, Qt.Key_Tab)
    QApplication.processEvents()
    assert fp.window().focusWidget() is fp.status
    QTest.keyClick(fp.status, Qt.Key_A, Qt.ControlModifier)  # select all, to copy with Ctrl+C
    assert fp.status.selectedText() == "added 'fused (mean)'"


def test_registration_status_and_result_check_are_named_with_their_text(make_napari_viewer):
    # The stage / level label had no accessible name at all, the result check a fixed one without its verdict.
    from medfuse_napari._widget import MedfuseWidget

    viewer = make_napari_viewer()
    widget = MedfuseWidget(viewer)
    rp = widget.register_panel
    assert _reachable(rp.level_label) and _reachable(rp.suspect_label)
    assert rp.level_label.accessibleName() == "registration status: none"
    assert rp.suspect_label.accessibleName() == "registration result check: none"
    rp._on_progress(0.4, "rigid: level 2/3, iteration 7")  # as the worker reports it
    assert rp.level_label.text() == "rigid: resolution level 2 of 3"
    assert rp.level_label.accessibleName() == "registration status: rigid: resolution level 2 of 3"
    rp._show_suspect("⚠ SUSPECT result: check before use", True)
    assert rp.suspect_label.accessibleName() == "registration result check: ⚠ SUSPECT result: check before use"
    assert rp.suspect_label.styleSheet() != ""  # still drawn as a warning


def test_pickers_pre_select_a_shown_layer_over_a_hidden_series(make_napari_viewer, tmp_path, samples_dir):
    # A CT study of two series opens with the second (bone kernel) hidden; with an MR opened beside it, the second
    # pickers took the hidden bone series (second in the list), not the MR the viewer shows.
    from medfuse_napari._widget import MedfuseWidget

    study = tmp_path / "ctstudy"
    for folder in ("1_ct", "2_bone"):
        (study / folder).mkdir(parents=True)
    _copy_series(samples_dir / "ct", study / "1_ct", number=2, description="CT head")
    _copy_series(samples_dir / "ct", study / "2_bone", number=3, description="CT bone")
    viewer = make_napari_viewer()
    widget = MedfuseWidget(viewer)
    rp, fp = widget.register_panel, widget.fuse_panel
    head, bone = viewer.open(str(study), plugin="medfuse")
    assert (head.visible, bone.visible) == (True, False)
    # One layer shown, which the first pickers hold: the second ones take the hidden series, not the same layer.
    assert [c.layer() for c in (rp.fixed, rp.moving, fp.inputs[0], fp.inputs[1])] == [head, bone, head, bone]

    (mr,) = viewer.open(str(samples_dir / "mr_t1.nii.gz"), plugin="medfuse")
    assert mr.visible
    assert [c.layer() for c in (rp.fixed, rp.moving, fp.inputs[0], fp.inputs[1])] == [head, mr, head, mr]

    # The user's choice of the hidden series stays when another shown layer comes.
    rp.moving.set_layer(bone.name)
    fp.inputs[1].set_layer(bone.name)
    viewer.open(str(samples_dir / "mr_t2.nii.gz"), plugin="medfuse")
    assert (rp.moving.layer(), fp.inputs[1].layer()) == (bone, bone)
