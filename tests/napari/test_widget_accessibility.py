"""Accessibility of the dock widget as napari shows it (its stylesheet applied): nothing cut off on the right,
keyboard focus kept in the panel while a job runs, the flicker stopped when the dock is hidden, the SUSPECT text
legible on both themes, accessible names, a colour map for colour-vision deficiency, W/L boxes applied on Enter."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtTest import QTest  # noqa: E402
from qtpy.QtWidgets import (QAbstractButton, QAbstractSpinBox, QApplication, QComboBox, QPlainTextEdit,  # noqa: E402
                            QProgressBar, QSlider)

pytestmark = pytest.mark.napari


def _blob(shape=(16, 20, 24), seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros(shape, np.float32)
    a[3:-3, 4:-4, 5:-5] = 100 + 20 * rng.random((shape[0] - 6, shape[1] - 8, shape[2] - 10))
    return a


@pytest.fixture
def shown(make_napari_viewer, qtbot):
    """A shown viewer (napari's stylesheet applied) with two volumes and the dock opened from the Plugins menu."""
    viewer = make_napari_viewer(show=True)
    for name, seed in (("mr", 0), ("pet", 1)):
        viewer.add_image(_blob(seed=seed), name=name, scale=(2.0, 2.0, 2.0))
    dock, widget = viewer.window.add_plugin_dock_widget("medfuse", "medfuse")
    qtbot.wait(50)
    return viewer, dock, widget


def _pump(qtbot, ms=30):
    QApplication.processEvents()
    qtbot.wait(ms)


def _wcag(first, second) -> float:
    """WCAG 2 contrast ratio (written out here, apart from the widget's own)."""
    def lum(rgb):
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((lum(first), lum(second)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _hex(colour: str):
    return tuple(int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))


# --------------------------------------------------------------------------------------------- 1. clipping
@pytest.mark.parametrize("tab", [0, 1, 2])
def test_every_control_lies_inside_its_scroll_area_once_styled(shown, qtbot, tab):
    """The Register panel needed 423 px in a 410 px area measured before napari's stylesheet: 11 controls cut off."""
    viewer, dock, widget = shown
    viewer.window._qt_window.resize(1200, 900)
    widget.tabs.setCurrentIndex(tab)
    _pump(qtbot)
    dock.resize(dock.minimumSizeHint().width(), dock.height())  # as narrow as napari lets the user make it
    _pump(qtbot)
    area = widget.tabs.widget(tab)
    panel, viewport = area.widget(), area.viewport()
    assert panel.width() <= viewport.width()
    kinds = (QAbstractButton, QComboBox, QAbstractSpinBox, QProgressBar, QPlainTextEdit, QSlider)
    controls = [c for c in panel.findChildren(kinds) if c.isVisibleTo(panel)]
    assert controls
    cut = [(type(c).__name__, c.text() if isinstance(c, QAbstractButton) else "",
            c.mapTo(viewport, c.rect().topRight()).x() - viewport.width() + 1)
           for c in controls if c.mapTo(viewport, c.rect().topRight()).x() >= viewport.width()]
    assert not cut, cut


def test_the_scroll_area_follows_a_wider_panel(shown, qtbot):
    """A panel that grows (a long button text) widens its area instead of being cut off."""
    _, _, widget = shown
    widget.tabs.setCurrentIndex(0)
    panel = widget.register_panel
    area = widget.tabs.widget(0)
    before = area.minimumWidth()
    panel.save_button.setText("Save transform of 'a rather long name' onto 'another long name'…")
    _pump(qtbot)
    assert area.minimumWidth() >= panel.minimumSizeHint().width() > before - area.verticalScrollBar().width()
    assert panel.save_button.mapTo(area.viewport(), panel.save_button.rect().topRight()).x() < area.viewport().width()


# --------------------------------------------------------------------------------------------- 2. focus
def _focused(widget):
    return widget.window().focusWidget()


def _space_on(qtbot, button):
    button.window().activateWindow()
    button.setFocus(Qt.TabFocusReason)
    _pump(qtbot)
    assert _focused(button) is button
    QTest.keyClick(button, Qt.Key_Space)
    _pump(qtbot)


def test_space_on_fuse_leaves_focus_on_cancel_then_back_on_fuse(shown, qtbot):
    viewer, dock, widget = shown
    widget.tabs.setCurrentIndex(1)
    fp = widget.fuse_panel
    fp.inputs[0].set_layer("mr")
    fp.inputs[1].set_layer("pet")
    fp.method.setCurrentText("mean")
    _space_on(qtbot, fp.run_button)
    if fp.worker is not None:  # the small fusion may have ended already: then focus is back on Fuse (below)
        assert _focused(fp.run_button) is fp.cancel_button
    qtbot.waitUntil(lambda: fp.worker is None, timeout=60_000)
    _pump(qtbot)
    assert fp.status.text().startswith("added"), fp.status.text()
    assert _focused(fp.run_button) is fp.run_button
    assert dock.isVisible()


def test_space_on_run_then_space_on_cancel_keeps_focus_in_the_register_panel(shown, qtbot):
    viewer, dock, widget = shown
    widget.tabs.setCurrentIndex(0)
    rp = widget.register_panel
    rp.fixed.set_layer("mr")
    rp.moving.set_layer("pet")
    _space_on(qtbot, rp.run_button)
    assert rp.worker is not None
    assert _focused(rp.run_button) is rp.cancel_button and rp.cancel_button.isEnabled()
    QTest.keyClick(rp.cancel_button, Qt.Key_Space)  # a second Space cancels, it does not hide the panel
    qtbot.waitUntil(lambda: rp.worker is None, timeout=120_000)
    _pump(qtbot)
    assert dock.isVisible()
    assert rp.token.cancelled
    assert _focused(rp.run_button) is rp.run_button


# --------------------------------------------------------------------------------------------- 3. flicker
def test_hiding_the_dock_stops_the_flicker_and_shows_the_overlay(shown, qtbot):
    viewer, dock, widget = shown
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    pet = viewer.layers["pet"]
    op.flicker.setChecked(True)
    qtbot.waitUntil(lambda: not pet.visible, timeout=3000)  # caught in its hidden phase
    dock.titleBarWidget().hide_button.click()  # napari's "hide this panel" button
    _pump(qtbot)
    assert not dock.isVisible()
    assert not op._flicker_timer.isActive() and not op.flicker.isChecked()
    assert pet.visible
    qtbot.wait(1100)  # two flicker periods: nothing blinks any more
    assert pet.visible


def test_switching_tabs_does_not_stop_the_flicker(shown, qtbot):
    """Only the dock hidden stops it: the flicker runs while the user registers in another tab."""
    viewer, dock, widget = shown
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    widget.tabs.setCurrentIndex(2)
    op.flicker.setChecked(True)
    widget.tabs.setCurrentIndex(0)
    _pump(qtbot)
    assert op._flicker_timer.isActive()
    op.flicker.setChecked(False)


# --------------------------------------------------------------------------------------------- 4. contrast
def test_contrast_ratio_matches_wcag_references():
    from medfuse_napari._widget import contrast_ratio

    assert contrast_ratio((0, 0, 0), (1, 1, 1)) == pytest.approx(21.0)
    assert contrast_ratio((0.2, 0.5, 0.9), (0.1, 0.1, 0.1)) == pytest.approx(_wcag((0.2, 0.5, 0.9), (0.1, 0.1, 0.1)))
    # The prober's figures for the old fixed red on napari's two backgrounds.
    assert contrast_ratio(_hex("#e0533d"), _hex("#23242b")) == pytest.approx(4.03, abs=0.01)
    assert contrast_ratio(_hex("#e0533d"), _hex("#ebe7e6")) == pytest.approx(3.12, abs=0.01)


def test_the_suspect_text_reads_at_wcag_aa_on_both_themes(shown, qtbot):
    from napari.utils.theme import get_theme

    viewer, _, widget = shown
    rp = widget.register_panel
    rp._show_suspect("⚠ SUSPECT result: check before use", True)
    colours = {}
    for theme in ("dark", "light", "dark"):
        viewer.theme = theme
        _pump(qtbot)
        style = rp.suspect_label.styleSheet()
        colour = style.split("color:")[1].split(";")[0].strip()
        background = tuple(c / 255 for c in get_theme(theme).background.as_rgb_tuple()[:3])
        # The panel is drawn on the theme's background (what the ratio is measured against).
        shown_bg = rp.palette().color(rp.backgroundRole())
        assert np.allclose([shown_bg.redF(), shown_bg.greenF(), shown_bg.blueF()], background, atol=2 / 255)
        assert _wcag(_hex(colour), background) >= 4.5, (theme, colour)
        red, green, blue = _hex(colour)
        assert red > green and red > blue  # still a warning red
        colours[theme] = colour
    assert colours["dark"] != colours["light"]
    rp._show_suspect("result not suspect", False)
    assert rp.suspect_label.styleSheet() == ""


# --------------------------------------------------------------------------------------------- 5. names
def test_progress_bars_and_the_report_have_accessible_names(shown):
    _, _, widget = shown
    rp, fp = widget.register_panel, widget.fuse_panel
    unnamed = [n for n, w in (("register overall", rp.progress), ("register level", rp.level_progress),
                              ("fuse", fp.progress), ("report", rp.report_view)) if not w.accessibleName()]
    assert not unnamed
    assert len({rp.progress.accessibleName(), rp.level_progress.accessibleName()}) == 2
    assert rp.report_view.toolTip() and rp.report_view.accessibleDescription() == rp.report_view.toolTip()
    assert rp.run_button.accessibleDescription() == rp.run_button.toolTip()


def test_tab_mnemonics_avoid_napari_menus(shown, qtbot):
    _, _, widget = shown
    keys = []
    for n in range(widget.tabs.count()):
        text = widget.tabs.tabText(n)
        assert text.count("&") == 1, text
        keys.append(text[text.index("&") + 1].upper())
    assert len(set(keys)) == len(keys) and not set(keys) & set("FVLPWH"), keys
    widget.window().activateWindow()
    widget.tabs.setCurrentIndex(0)
    widget.register_panel.kind.setFocus()
    _pump(qtbot)
    QTest.keyClick(widget.register_panel.kind, Qt.Key_O, Qt.AltModifier)
    _pump(qtbot)
    assert widget.tabs.currentIndex() == 2


# --------------------------------------------------------------------------------------------- 6. colour maps
def test_cividis_is_offered_and_applies(shown, qtbot):
    viewer, _, widget = shown
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    for box in (op.base_cmap, op.overlay_cmap):
        assert box.findText("cividis") >= 0
    op.overlay_cmap.setCurrentText("cividis")
    assert viewer.layers["pet"].colormap.name.startswith("cividis")
    # Maps users rely on stay offered.
    assert all(op.overlay_cmap.findText(n) >= 0 for n in ("inferno", "hot", "turbo", "red", "green"))


def test_typing_a_window_width_applies_it_once_on_enter(shown, qtbot):
    viewer, _, widget = shown
    op = widget.overlay_panel
    op.base.set_layer("mr")
    mr = viewer.layers["mr"]
    widths = []
    mr.events.contrast_limits.connect(lambda e: widths.append(float(np.diff(mr.contrast_limits)[0])))
    op.ww.window().activateWindow()
    op.ww.setFocus()
    op.ww.lineEdit().selectAll()
    QTest.keyClicks(op.ww.lineEdit(), "150")
    _pump(qtbot)
    assert widths == []  # not 1, then 15, then 150
    QTest.keyClick(op.ww.lineEdit(), Qt.Key_Return)
    _pump(qtbot)
    assert widths and widths[-1] == pytest.approx(150.0) and all(w == pytest.approx(150.0) for w in widths)
