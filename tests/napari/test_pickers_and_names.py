"""Every layer picker of the dock pre-selects a shown layer and keeps the user's choice; Run/Cancel keyboard
mnemonics; colour maps for colour-vision deficiency offered first; study-folder layer names without SeriesNumbers
that tell nothing apart."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtTest import QTest  # noqa: E402
from qtpy.QtWidgets import QAbstractButton, QApplication  # noqa: E402

from medfuse_napari import napari_get_reader  # noqa: E402
from tests.napari.test_reader_study_folders import _by_uid, _copy_series  # noqa: E402

pytestmark = pytest.mark.napari

#: (name, modality, shown) in layer-list order: of each kind the hidden layer comes first, where the first-fit rule
#: of the pickers fell on it.
_LAYERS = (("mr hidden", "MR", False), ("mr shown", "MR", True), ("pet hidden", "PT", False),
           ("pet shown", "PT", True))


def _blob(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.zeros((12, 14, 16), np.float32)
    a[2:-2, 3:-3, 3:-3] = 100 + 20 * rng.random((8, 8, 10))
    return a


def _add(viewer, name: str, modality: str, shown: bool, seed: int = 0):
    return viewer.add_image(_blob(seed), name=name, scale=(2.0, 2.0, 2.0), visible=shown,
                            metadata={"medfuse": {"modality": modality}})


def _pickers(widget) -> dict:
    """Every layer picker of the dock by role: True for the anatomical ones (base, fixed), False otherwise."""
    rp, fp, op = widget.register_panel, widget.fuse_panel, widget.overlay_panel
    return {rp.fixed: True, fp.inputs[0]: True, op.base: True,
            rp.moving: False, fp.inputs[1]: False, op.overlay: False}


def _picked(widget) -> list:
    return [c.layer().name if c.layer() is not None else None for c in _pickers(widget)]


def _user_picks(combo, name: str) -> None:
    """Pick ``name`` as a user does: ``activated`` is emitted for choices made in the box only."""
    index = combo.findText(name)
    assert index >= 0, name
    combo.setCurrentIndex(index)
    combo.activated.emit(index)


@pytest.mark.parametrize("dock_first", [False, True], ids=["layers-then-dock", "dock-then-layers"])
def test_every_picker_pre_selects_the_shown_layer_of_its_kind(make_napari_viewer, dock_widget, qtbot, dock_first):
    # The Overlay tab's pickers took the first layer of a kind even when it was hidden (only the Register and Fuse
    # pickers had the shown-first rule); with the layers opened after the dock, one by one as a study opens.
    viewer = make_napari_viewer()
    widget = dock_widget(viewer) if dock_first else None
    for n, (name, modality, shown) in enumerate(_LAYERS):
        _add(viewer, name, modality, shown, seed=n)
    widget = widget or dock_widget(viewer)
    qtbot.wait(20)  # the overlay panel's raise timer
    expected = ["mr shown" if anatomical else "pet shown" for anatomical in _pickers(widget).values()]
    assert _picked(widget) == expected
    assert widget.fuse_panel.inputs[2].layer() is None  # the optional third input stays (none)


def test_a_choice_made_by_the_user_is_kept_whatever_is_shown_later(make_napari_viewer, dock_widget, qtbot):
    viewer = make_napari_viewer()
    for n, (name, modality, shown) in enumerate(_LAYERS):
        _add(viewer, name, modality, shown, seed=n)
    widget = dock_widget(viewer)
    pickers = _pickers(widget)
    for combo, anatomical in pickers.items():
        _user_picks(combo, "mr hidden" if anatomical else "pet hidden")
    chosen = ["mr hidden" if anatomical else "pet hidden" for anatomical in pickers.values()]
    assert _picked(widget) == chosen
    # Eyes toggled both ways, then the layer list changes (a layer added, one renamed), which reads visibility.
    for name, _, shown in _LAYERS:
        viewer.layers[name].visible = not shown
    for name, _, shown in _LAYERS:
        viewer.layers[name].visible = shown
    _add(viewer, "mr new", "MR", True, seed=7)
    _add(viewer, "pet new", "PT", True, seed=8)
    viewer.layers["mr shown"].name = "mr shown again"
    qtbot.wait(20)
    assert _picked(widget) == chosen


def test_a_compare_view_hiding_the_pair_does_not_move_the_pickers(make_napari_viewer, dock_widget, qtbot):
    # A checkerboard hides every layer under its 'compare:' ones; a layer opened meanwhile is the only one shown,
    # and the pickers not chosen by the user moved onto it, off the pair the view compares.
    viewer = make_napari_viewer()
    for n, (name, modality, shown) in enumerate(_LAYERS):
        _add(viewer, name, modality, shown, seed=n)
    widget = dock_widget(viewer)
    qtbot.wait(20)
    before = _picked(widget)
    op = widget.overlay_panel
    op.set_compare("checkerboard")
    assert not viewer.layers["mr shown"].visible and op.shown_by_user(viewer.layers["mr shown"])
    _add(viewer, "mr new", "MR", True, seed=7)
    _add(viewer, "pet new", "PT", True, seed=8)
    qtbot.wait(20)
    assert _picked(widget) == before
    op.set_compare("overlay")
    assert viewer.layers["mr shown"].visible and not viewer.layers["mr hidden"].visible


# --------------------------------------------------------------------------------------------- mnemonics
def _mnemonic(text: str):
    """The letter after the single ``&`` of a button text (``&&`` is a literal ampersand), or None."""
    marks = [n for n, c in enumerate(text) if c == "&" and text[n - 1:n] != "&" and text[n + 1:n + 2] != "&"]
    assert len(marks) <= 1, text
    return text[marks[0] + 1].upper() if marks else None


def _napari_alt_keys(window) -> set:
    """The letters napari itself takes with Alt: its menus' mnemonics and its Alt+letter actions."""
    from qtpy.QtWidgets import QAction

    keys = {_mnemonic(a.text()) for a in window.menuBar().actions()}
    for action in QApplication.instance().findChildren(QAction) + window.findChildren(QAction):
        keys.update(s.toString()[-1] for s in action.shortcuts() if len(s.toString()) == 5
                    and s.toString().startswith("Alt+"))
    return keys - {None}


def test_run_and_cancel_have_distinct_mnemonics_within_each_tab(make_napari_viewer, qtbot):
    from medfuse_napari._widget import MedfuseWidget

    viewer = make_napari_viewer(show=True)
    widget = MedfuseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="medfuse")
    tabs = {_mnemonic(widget.tabs.tabText(n)) for n in range(widget.tabs.count())}
    taken = _napari_alt_keys(viewer.window._qt_window)
    assert set("FVLPWH") <= taken  # the menus found (napari 0.9.2 also has Alt+C and Alt+S: screenshots)
    for panel in (widget.register_panel, widget.fuse_panel):
        for button in (panel.run_button, panel.cancel_button):
            assert button.text().count("&") == 1, button.text()
        keys = [k for k in map(_mnemonic, (b.text() for b in panel.findChildren(QAbstractButton))) if k]
        # Unique in the tab, and none taken from a tab's key or from napari (a key taken twice does nothing).
        assert len(keys) == len(set(keys)) and not set(keys) & (tabs | taken), (keys, taken)

    # Alt + the Fuse button's letter presses it (its slot replaced: no fusion is started).
    fp = widget.fuse_panel
    widget.tabs.setCurrentIndex(1)
    fp.run_button.clicked.disconnect(fp.run)
    pressed = []
    fp.run_button.clicked.connect(lambda *_: pressed.append(True))
    widget.window().activateWindow()
    fp.method.setFocus()
    QApplication.processEvents()
    with qtbot.waitSignal(fp.run_button.clicked, timeout=2000):
        QTest.keyClick(fp.method, getattr(Qt, f"Key_{_mnemonic(fp.run_button.text())}"), Qt.AltModifier)
    assert pressed == [True]


def test_a_layer_name_with_an_ampersand_is_shown_on_the_save_button(make_napari_viewer):
    from medfuse_napari._widget import MedfuseWidget

    viewer = make_napari_viewer()
    widget = MedfuseWidget(viewer)
    rp = widget.register_panel
    fixed, moving = _add(viewer, "t1 & t2", "MR", True), _add(viewer, "pet", "PT", True, seed=1)
    rp._name_pair((fixed, moving))
    assert _mnemonic(rp.save_button.text()) is None and "t1 && t2" in rp.save_button.text()


# --------------------------------------------------------------------------------------------- colour maps
def _lightness(name: str) -> np.ndarray:
    """CIE L* along a napari colour map, from its sRGB colours."""
    from napari.utils.colormaps import ensure_colormap

    rgb = np.asarray(ensure_colormap(name).map(np.linspace(0.0, 1.0, 65)))[:, :3]
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    y = lin @ np.array([0.2126, 0.7152, 0.0722])
    return np.where(y > 0.008856, 116 * np.cbrt(y) - 16, 903.3 * y)


def test_colour_maps_for_colour_vision_deficiency_come_first(make_napari_viewer, samples_dir):
    from medfuse.display import display_settings
    from medfuse_napari._widget import MedfuseWidget

    viewer = make_napari_viewer()
    widget = MedfuseWidget(viewer)
    op = widget.overlay_panel
    for box, first in ((op.base_cmap, "gray"), (op.overlay_cmap, "inferno")):
        names = [box.itemText(i) for i in range(box.count())]
        cut = names.index("")  # the separator
        assert names[0] == first and box.currentText() == first
        # Above the separator: maps whose lightness only rises (or only falls), readable without telling hues
        # apart; turbo (lightness up and down) and red beside green stay offered, below it.
        for name in names[:cut]:
            steps = np.diff(_lightness(name))
            assert (steps >= -0.5).all() or (steps <= 0.5).all(), name
        assert {"turbo", "red", "green", "hot"} <= set(names[cut + 1:])
        assert not (np.diff(_lightness("turbo")) >= -0.5).all()  # the check above tells turbo apart
    # The overlay box's default is medfuse's own PET default, and a PET opens in it.
    (pet,) = viewer.open(str(samples_dir / "pet"), plugin="medfuse")
    import medfuse

    assert display_settings(medfuse.load(samples_dir / "pet")).colormap == op.overlay_cmap.itemText(0)
    op.overlay.set_layer(pet.name)
    assert op.overlay_cmap.currentText() == pet.colormap.name == "inferno"


# --------------------------------------------------------------------------------------------- layer names
def test_study_names_carry_the_series_number_only_where_it_tells_series_apart(tmp_path, samples_dir):
    # Scanners number series in the millions: `flat CT series 1093950 t1` for a series its description names.
    flat = tmp_path / "flat"
    flat.mkdir()
    uids = {
        _copy_series(samples_dir / "ct", flat / "a", number=1093950, description="t1"): "flat CT t1",
        _copy_series(samples_dir / "pet", flat / "b", number=1093951, description="PET AC"): "flat PT PET AC",
        _copy_series(samples_dir / "ct", flat / "c", number=1093952, description="loc"): "flat CT series 1093952 loc",
        _copy_series(samples_dir / "ct", flat / "d", number=1093953, description="loc"): "flat CT series 1093953 loc",
        # No description: the modality alone would name two series, their numbers tell them apart.
        _copy_series(samples_dir / "ct", flat / "e", number=11, description=""): "flat CT series 11",
        _copy_series(samples_dir / "ct", flat / "f", number=12, description=""): "flat CT series 12",
    }
    layers = napari_get_reader(str(flat))(str(flat))
    assert {uid: k["name"] for uid, k in _by_uid(layers).items()} == uids
