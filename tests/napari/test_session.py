"""The dock widget through a whole reading session: layers removed or renamed under it (idle and mid-job), a
second study opened in the same viewer, the widget or the viewer closed while a job runs, a small screen, and
tooltips with units."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse_napari._widget import MedfuseWidget  # noqa: E402

pytestmark = pytest.mark.napari


def _md(modality, unit="arbitrary"):
    return {"medfuse": {"modality": modality, "unit": unit}}


def _blobs(shift=(0, 0, 0), scale=1.0):
    a = np.zeros((24, 24, 24), np.float32)
    a[4:18, 6:20, 4:20] = 50
    a[8:12, 9:14, 6:11] = 120
    return np.roll(a, shift, axis=(0, 1, 2)) * scale


def _study(viewer, fixed="mr", moving="pet", shift=(0, 0, 0), scale=1.0):
    viewer.add_image(_blobs(), name=fixed, scale=(2, 2, 2), metadata=_md("MR"))
    viewer.add_image(_blobs(shift, scale), name=moving, scale=(2, 2, 2), metadata=_md("PT", "SUVbw"))


@pytest.fixture
def session(make_napari_viewer):
    viewer = make_napari_viewer()
    _study(viewer)
    return viewer, MedfuseWidget(viewer)


class _Held:
    """Replace a medfuse call by one that waits until released (a job that is deterministically "still running")."""

    def __init__(self, monkeypatch, name):
        self.started, self.release = threading.Event(), threading.Event()
        real = getattr(medfuse, name)

        def held(*args, **kwargs):
            self.started.set()
            self.release.wait(30)
            return real(*args, **kwargs)

        monkeypatch.setattr(medfuse, name, held)


def _fusion_held_running(qtbot, panel, monkeypatch) -> "_Held":
    """Start a mean fusion of mr + pet that stays running until ``.release`` is set."""
    held = _Held(monkeypatch, "fuse")
    panel.inputs[0].set_layer("mr")
    panel.inputs[1].set_layer("pet")
    panel.method.setCurrentText("mean")
    panel.run()
    qtbot.waitUntil(held.started.is_set, timeout=30_000)
    return held


# ------------------------------------------------------------------------------------------------ layers change
def test_idle_pickers_follow_rename_and_removal_and_run_refuses_cleanly(qtbot, session):
    viewer, widget = session
    reg, fuse, ov = widget.register_panel, widget.fuse_panel, widget.overlay_panel
    reg.fixed.set_layer("mr")
    reg.moving.set_layer("pet")
    viewer.layers["pet"].name = "pet renamed"
    for combo in (reg.moving, fuse.inputs[1], ov.overlay):
        assert combo.currentText() == "pet renamed" and combo.layer() is viewer.layers["pet renamed"]
    viewer.layers.move(0, 1)  # reorder: choices kept
    assert reg.fixed.layer() is viewer.layers["mr"]
    viewer.layers.remove("pet renamed")
    for combo in (reg.fixed, reg.moving, *fuse.inputs, ov.base, ov.overlay):  # no dead entry left to pick
        assert "pet renamed" not in [combo.itemText(i) for i in range(combo.count())]
        assert combo.layer() is None or combo.layer() is viewer.layers["mr"]
    errors = []
    import medfuse_napari._widget as w

    orig = w._notify_error
    w._notify_error = errors.append
    try:
        reg.run()
        fuse.run()
    finally:
        w._notify_error = orig
    assert len(errors) == 2 and all("Fix:" in e for e in errors)
    assert reg.worker is None and fuse.worker is None


def test_fusion_whose_inputs_were_removed_adds_no_layer_to_the_next_study(qtbot, session, monkeypatch):
    """Fusion of study A still running while the user closes A and opens B: A's fused image must not land
    among B's layers (a result from another patient, shown on B's grid)."""
    viewer, widget = session
    panel = widget.fuse_panel
    held = _fusion_held_running(qtbot, panel, monkeypatch)
    viewer.layers.clear()
    _study(viewer, "ct", "pet")  # the next patient, a PET under the same name
    held.release.set()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    assert [l.name for l in viewer.layers] == ["ct", "pet"]
    assert panel.status.text() == "failed"


def test_fusion_with_an_input_renamed_meanwhile_is_added(qtbot, session, monkeypatch):
    viewer, widget = session
    panel = widget.fuse_panel
    held = _fusion_held_running(qtbot, panel, monkeypatch)
    viewer.layers["pet"].name = "pet (AC)"
    held.release.set()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    assert "fused (mean)" in viewer.layers


# ------------------------------------------------------------------------------------------------ second study
def test_compare_view_follows_new_voxels_of_its_pair(qtbot, session):
    """The resampled overlay of a compare view is cached; new voxels in the overlay layer (or a new layer in the
    same place) must not bring back the old ones."""
    viewer, widget = session
    ov = widget.overlay_panel
    ov.base.set_layer("mr")
    ov.overlay.set_layer("pet")
    ov.overlay.layer().contrast_limits = (0, 200)
    ov.set_compare("checkerboard")
    first = viewer.layers["compare: overlay"].data.max()
    viewer.layers["pet"].data = _blobs(scale=0.5)  # e.g. a re-read or a corrected series
    ov._recompute_compare()  # what the rebuild timer does
    second = viewer.layers["compare: overlay"].data.max()
    assert second == pytest.approx(first * 0.5)


def _registered(qtbot, widget):
    """The Register panel after a rigid registration of pet onto mr (no resampled layer)."""
    panel = widget.register_panel
    panel.fixed.set_layer("mr")
    panel.moving.set_layer("pet")
    panel.resample_box.setChecked(False)
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    return panel


def test_next_study_does_not_inherit_the_previous_registration(qtbot, session):
    """After study A's registration, closing A and opening B must not leave A's report on show nor let
    'Save transform…' write A's transform as if it were B's."""
    viewer, widget = session
    panel = _registered(qtbot, widget)
    assert panel.result is not None and panel.save_button.isEnabled()
    viewer.add_image(np.zeros((4, 4, 4), np.float32), name="scratch")
    viewer.layers.remove("scratch")  # another layer closed: the result still belongs to open layers
    assert panel.result is not None and panel.save_button.isEnabled()
    viewer.layers.clear()
    _study(viewer, "ct", "pet")  # the next patient, a PET under the same name
    assert panel.result is None and not panel.save_button.isEnabled()
    assert panel.report_view.toPlainText() == "" and panel.suspect_label.text() == ""
    assert panel.progress.value() == 0


def test_a_failed_or_cancelled_rerun_keeps_the_last_result_on_show(qtbot, session, monkeypatch):
    """A rerun that failed (or was cancelled) cleared the last result's report and its suspect flag, while
    'Save transform…' still wrote that result's transform: a suspect transform could be saved with no warning
    left on screen."""
    viewer, widget = session
    panel = _registered(qtbot, widget)
    shown = (panel.report_view.toPlainText(), panel.suspect_label.text(), panel.suspect_label.styleSheet())
    assert shown[0] and shown[1] and panel.save_button.isEnabled()
    first = panel.result

    bad = _blobs()
    bad[0, 0, :5] = np.nan
    viewer.add_image(bad, name="broken", scale=(2, 2, 2), metadata=_md("PT", "SUVbw"))
    panel.moving.set_layer("broken")
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.result is first and panel.save_button.isEnabled()
    assert (panel.report_view.toPlainText(), panel.suspect_label.text(), panel.suspect_label.styleSheet()) == shown
    assert panel.level_label.text() == "failed; the previous result is still shown"

    held = _Held(monkeypatch, "register")
    panel.moving.set_layer("pet")
    panel.run()
    assert held.started.wait(30)
    assert panel.report_view.toPlainText() == ""  # the running job's report is not the last one
    panel.cancel()
    held.release.set()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.result is first
    assert (panel.report_view.toPlainText(), panel.suspect_label.text()) == shown[:2]
    assert panel.level_label.text().startswith("cancel")

    viewer.layers.remove("pet")  # the result's own layer closed: then nothing of it is left to save
    assert panel.result is None and not panel.save_button.isEnabled() and panel.report_view.toPlainText() == ""


def test_next_study_pickers_choose_by_modality_again(qtbot, session):
    """Layers picked by hand in study A are gone with it: in study B the pickers choose by modality again, not
    all fall on B's first layer (the CT as moving layer and as overlay)."""
    viewer, widget = session
    reg, fuse, ov = widget.register_panel, widget.fuse_panel, widget.overlay_panel
    for combo, name in ((reg.fixed, "mr"), (reg.moving, "pet"), (fuse.inputs[0], "mr"), (fuse.inputs[1], "pet"),
                        (ov.base, "mr"), (ov.overlay, "pet")):
        combo.set_layer(name)
    viewer.layers.clear()
    _study(viewer, "ct", "pet")
    assert [reg.fixed.currentText(), reg.moving.currentText()] == ["ct", "pet"]
    assert [c.currentText() for c in fuse.inputs] == ["ct", "pet", "(none)"]
    assert [ov.base.currentText(), ov.overlay.currentText()] == ["ct", "pet"]
    assert ov.range_box.title() == "Overlay range (SUVbw)"


def test_closing_a_study_in_compare_mode_ends_it_quietly_and_the_next_study_opens_plain(qtbot, session,
                                                                                         monkeypatch):
    import napari.utils.notifications as notifications

    viewer, widget = session
    ov = widget.overlay_panel
    errors = []
    monkeypatch.setattr(notifications, "show_error", errors.append)
    ov.base.set_layer("mr")
    ov.overlay.set_layer("pet")
    ov.set_compare("curtain")
    assert "compare: overlay" in viewer.layers
    viewer.layers.clear()
    qtbot.wait(400)  # the compare view's rebuild timer (150 ms) fires
    assert errors == [] and ov.compare.currentText() == "overlay"
    assert ov.range_box.title() == "Overlay range"
    _study(viewer, "ct", "pet")
    qtbot.wait(400)
    assert [l.name for l in viewer.layers] == ["ct", "pet"] and all(l.visible for l in viewer.layers)
    assert ov.range_box.title() == "Overlay range (SUVbw)"


# ------------------------------------------------------------------------------------------------ closing
def test_removing_the_dock_widget_mid_registration_cancels_it(qtbot, make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer()
    _study(viewer)
    widget = MedfuseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="medfuse")
    panel = widget.register_panel
    held = _Held(monkeypatch, "register")
    panel.fixed.set_layer("mr")
    panel.moving.set_layer("pet")
    panel.resample_box.setChecked(True)
    panel.run()
    qtbot.waitUntil(held.started.is_set, timeout=30_000)
    token = panel.token
    viewer.window.remove_dock_widget(widget)  # the dock's close button
    assert token.cancelled
    held.release.set()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert [l.name for l in viewer.layers] == ["mr", "pet"]
    np.testing.assert_allclose(viewer.layers["pet"].affine.affine_matrix, np.eye(4))


def test_closing_the_viewer_mid_fusion_is_clean(qtbot, make_napari_viewer, monkeypatch):
    from qtpy.QtCore import QThreadPool

    viewer = make_napari_viewer()
    _study(viewer)
    widget = MedfuseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="medfuse")
    panel = widget.fuse_panel
    held = _fusion_held_running(qtbot, panel, monkeypatch)
    token = panel.token
    viewer.close()
    qtbot.waitUntil(lambda: token.cancelled, timeout=10_000)
    held.release.set()
    assert QThreadPool.globalInstance().waitForDone(30_000)
    qtbot.wait(50)  # the worker's "returned" reaches the GUI thread: no callback into deleted widgets raises


# ------------------------------------------------------------------------------------------------ small screens
def test_dock_fits_a_1366x768_laptop(qtbot, session):
    viewer, widget = session
    hint = widget.minimumSizeHint()
    assert hint.width() <= 450, hint
    assert hint.height() <= 600, hint  # 768 px minus title bar, menus, dock title, status bar
    # Squeezed to a laptop's dock, the last control of the longest tab is still reachable (by scrolling).
    widget.resize(hint.width(), 500)
    widget.show()
    widget.tabs.setCurrentWidget(widget.tabs.widget(2))
    qtbot.waitExposed(widget)
    area = widget.tabs.currentWidget()
    mip = widget.overlay_panel.mip
    area.ensureWidgetVisible(mip)
    top_left = mip.mapTo(area.viewport(), mip.rect().topLeft())
    assert area.viewport().rect().contains(top_left), top_left
    assert area.viewport().width() >= widget.overlay_panel.minimumSizeHint().width()  # no sideways scrolling


# ------------------------------------------------------------------------------------------------ tooltips
def test_every_control_has_a_tooltip_and_ranges_say_their_unit(qtbot, session):
    from qtpy.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox, QSlider

    viewer, widget = session
    missing = []
    for panel in (widget.register_panel, widget.fuse_panel, widget.overlay_panel):
        for kind in (QAbstractButton, QComboBox, QAbstractSpinBox, QSlider):
            for control in panel.findChildren(kind):
                if not control.toolTip().strip():
                    what = control.text() if isinstance(control, QAbstractButton) else type(control).__name__
                    missing.append(f"{type(panel).__name__}: {what}")
    assert not missing, missing
    ov = widget.overlay_panel
    for control, unit in ((ov.ww, "HU"), (ov.wl, "HU"), (ov.suv_max, "SUV"), (ov.suv_threshold, "SUV"),
                          (ov.tile_mm, "mm"), (ov.opacity, "%"), (ov.curtain, "%")):
        assert unit in control.toolTip(), (control, control.toolTip())


def test_compare_views_are_not_offered_for_registration_or_fusion(qtbot, session):
    """The checkerboard/curtain layers are displays of a pair: picked as a fusion or registration input they gave
    a fused image of a checkerboard (the Overlay pickers already skipped them)."""
    viewer, widget = session
    ov = widget.overlay_panel
    ov.base.set_layer("mr")
    ov.overlay.set_layer("pet")
    ov.set_compare("checkerboard")
    assert "compare: overlay" in viewer.layers
    combos = [widget.register_panel.fixed, widget.register_panel.moving, *widget.fuse_panel.inputs]
    for combo in combos:
        offered = [combo.itemText(i) for i in range(combo.count())]
        assert not [n for n in offered if n.startswith("compare:")], offered
        assert "mr" in offered and "pet" in offered
