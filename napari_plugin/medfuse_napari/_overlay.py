"""Overlay controls for the active pair (base + overlay): blend, colour maps, W/L, SUV, compare modes, views."""

from __future__ import annotations

import weakref
from typing import Any, Dict, Optional, Tuple

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QLabel, QSlider,
                            QVBoxLayout, QWidget)

from ._combo import LayerCombo
from ._layers import (FUNCTIONAL, checker3d, coverage_onto, curtain3d, data_to_world, is_functional, layer_array,
                      layer_axis, layer_geometry, meta, real_layer, resample_onto, voxel_spacing)

# cividis, viridis, inferno, magma and plasma stay readable under colour-vision deficiency (cividis was made for
# it); red beside green, and turbo, are hard to tell apart under deuteranopia (kept: users rely on them).
COLORMAPS = ("gray", "inferno", "hot", "magma", "plasma", "viridis", "cividis", "turbo", "red", "green", "blue",
             "cyan", "magenta", "yellow", "gray_r")
#: Colour maps that stay readable under red-green colour-vision deficiency (monotonic lightness, no red against
#: green), offered first in each box, above a separator; the others follow in COLORMAPS order. The overlay's list
#: starts with ``inferno``, the PET default of ``medfuse.display``; the base's with the greys of anatomy.
CVD_SAFE = ("inferno", "cividis", "viridis", "magma", "plasma")
BASE_COLORMAPS = ("gray", "gray_r", *CVD_SAFE)
OVERLAY_COLORMAPS = (*CVD_SAFE, "gray", "gray_r")
BLENDINGS = ("additive", "translucent", "opaque", "minimum")
COMPARE = ("overlay", "checkerboard", "curtain")
VIEWS = {"axial": ((0, 1, 2), ("down", "right")), "coronal": ((1, 0, 2), ("up", "right")),
         "sagittal": ((2, 0, 1), ("up", "right"))}
WINDOW_LABELS = {"brain": "brain", "subdural": "subdural", "soft_tissue": "soft tissue", "lung": "lung",
                 "bone": "bone"}
_COMPARE_TAG = "compare"
#: Layer properties a compare view is made from: the pair's voxels and placement (a change rebuilds it).
_COMPARE_INPUTS = ("data", "scale", "translate", "rotate", "shear", "affine")
#: Layer properties a compare view copies from its pair (a change is copied; no rebuild, see _compare_display).
_COMPARE_DISPLAY = ("contrast_limits", "colormap")
_FLOOR_SUFFIX = "_floor"


def floored_colormap(colormap: Any) -> Any:
    """A copy of ``colormap`` that draws values at or below the low contrast limit transparent.

    Why: the overlay threshold sets the low contrast limit, and napari draws values below it in the colour
    map's lowest colour; for maps whose lowest colour is not black (gray_r, viridis, turbo, plasma) additive
    blending then tinted the whole PET field of view. Named ``<map>_floor`` (napari's colour map list shows it).
    """
    from napari.utils.colormaps import Colormap, ensure_colormap

    cmap = ensure_colormap(colormap)
    if cmap.low_color is not None and float(np.asarray(cmap.low_color)[3]) == 0.0:
        return cmap
    fields = cmap.model_dump()
    fields.pop("display_name", None)
    name = cmap.name if cmap.name.endswith(_FLOOR_SUFFIX) else cmap.name + _FLOOR_SUFFIX
    fields.update(name=name, low_color=[0.0, 0.0, 0.0, 0.0])
    return Colormap(display_name=name.replace("_", " "), **fields)


def threshold_colormap(colormap: Any, blending: str) -> Any:
    """``colormap`` as the overlay threshold needs it: its :func:`floored_colormap` unless already invisible there.

    A map whose lowest colour is black adds nothing under additive blending (``hot``, ``inferno`` stay themselves,
    names included); any other map, or any map under another blending, gets its floored copy.
    """
    from napari.utils.colormaps import ensure_colormap

    cmap = ensure_colormap(colormap)
    lowest = np.asarray(cmap.map(np.array([0.0])))[0]
    # 0.05: hot's lowest colour (4 % red) and inferno's are dark enough to add nothing one sees over a CT.
    if str(blending) == "additive" and np.allclose(lowest[:3], 0.0, atol=0.05):
        return cmap
    return floored_colormap(cmap)


def plain_colormap_name(name: str) -> str:
    """The name the colour map boxes show: ``viridis`` for ``viridis_floor``."""
    return name[: -len(_FLOOR_SUFFIX)] if name.endswith(_FLOOR_SUFFIX) else name


def _fill_value(dtype: np.dtype, low: float) -> Optional[float]:
    """The largest value of ``dtype`` at or below ``low``, or None when ``dtype`` holds none."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        value = min(float(np.floor(low)), float(info.max))
        return value if value >= info.min else None
    value = dtype.type(low)
    if float(value) > low:  # rounded up into the window: one step down
        value = np.nextafter(value, dtype.type(-np.inf))
    return float(value)


def _masked(data: Any, keep: Any, low: float) -> Tuple[np.ndarray, float]:
    """``data`` where ``keep`` and a fill value at or below ``low`` (the low contrast limit) elsewhere; and the fill.

    The fill is drawn transparent by a :func:`floored_colormap` whatever the window later, as long as the low limit
    stays at or above it (see ``OverlayPanel._compare_display`` otherwise). The data type is kept (an int16 CT stays
    int16; float64 becomes float32): the float64 copies of ``np.where(mask, data, limit)`` took 315 MB each for a
    150x512x512 CT.
    """
    data = np.asarray(data)
    dtype = data.dtype
    if not np.issubdtype(dtype, np.integer) and (not np.issubdtype(dtype, np.floating) or dtype.itemsize > 4):
        dtype = np.dtype(np.float32)
    fill = _fill_value(dtype, low)
    if fill is None:  # e.g. a uint8 image under a negative window
        dtype = np.dtype(np.float32)
        fill = _fill_value(dtype, low)
    # One pass, in the data type (a typed scalar: np.where does not widen to float64).
    return np.where(keep, data.astype(dtype, copy=False), dtype.type(fill)), fill


def _is_compare(layer: Any) -> bool:
    return bool(meta(layer).get(_COMPARE_TAG))


def _weak(obj: Any) -> Any:
    """A weak reference to ``obj``, or ``obj`` itself when it takes none (a dask array may not)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return obj


def _alive(ref: Any) -> Any:
    return ref() if isinstance(ref, weakref.ref) else ref


def _show_choice(box: QComboBox, text: str) -> None:
    """Select ``text`` in a combo box without emitting; a choice made elsewhere (napari's controls) is added."""
    box.blockSignals(True)
    if box.findText(text) < 0:
        box.addItem(text)
    box.setCurrentText(text)
    box.blockSignals(False)


def _spin(lo: float, hi: float, value: float, step: float = 1.0, decimals: int = 1) -> QDoubleSpinBox:
    s = QDoubleSpinBox()
    s.setRange(lo, hi)
    s.setDecimals(decimals)
    s.setSingleStep(step)
    s.setValue(value)
    # Applied on Enter or leaving the box, not per keystroke: typing 1500 set the window to 1, 15, 150, 1500.
    s.setKeyboardTracking(False)
    return s


def _camera(viewer: Any) -> Any:
    """The viewer's camera: ``viewer.scene.camera`` since napari 0.9 (``viewer.camera`` warns there)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if hasattr(scene, "camera") else viewer.camera


def _grid(viewer: Any) -> Any:
    """The viewer's grid: ``viewer.canvas.grid`` since napari 0.9 (``viewer.grid`` warns there)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if hasattr(canvas, "grid") else viewer.grid


def _floor(layer: Any) -> float:
    """Lowest overlay threshold: 0 for PET/SPECT and doses (no negative uptake or dose), none for others (a CT
    overlay in HU)."""
    return 0.0 if is_functional(layer) else -1e12


def unit_label(unit: Optional[str]) -> str:
    """How a unit is written after a value (``arbitrary`` -> ``a.u.``)."""
    return {"arbitrary": "a.u.", None: ""}.get(unit, unit or "")


def voxel_value(layer: Any, world_position: Any) -> Optional[float]:
    """Nearest-voxel value of a 3-D layer at a world position, through its full transform (None outside).

    Why not ``layer.get_value``: with a registration affine it reads the currently displayed slice only.
    """
    try:
        idx = np.round(np.asarray(layer.world_to_data(tuple(world_position)), dtype=float)[-3:]).astype(int)
    except (ValueError, TypeError, IndexError):
        return None
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data  # full resolution
    shape = np.asarray(data.shape[-3:])
    if np.any(idx < 0) or np.any(idx >= shape):
        return None
    return float(np.asarray(data[tuple(idx)]))


def widen_contrast_range(layer: Any) -> None:
    """Let napari's contrast slider of a medfuse layer cover the whole image, not just the window it opened with.

    Why: napari sets a layer's slider range to the contrast limits passed when it is added (a CT opened in the
    brain window could only be dragged within 0..80 HU). Layers from other plugins are left alone.
    """
    from medfuse.display import slider_range
    from napari.layers import Image

    if not isinstance(layer, Image) or layer.rgb or not meta(layer):
        return
    data = layer.data[0] if layer.multiscale else layer.data
    if not isinstance(data, np.ndarray):  # dask/zarr: reading it all for a slider is not worth it
        return
    lo, hi = slider_range(data, layer.contrast_limits)
    r_lo, r_hi = layer.contrast_limits_range
    wanted = (min(lo, r_lo), max(hi, r_hi))
    if wanted[1] > wanted[0] and list(wanted) != list(layer.contrast_limits_range):
        layer.contrast_limits_range = wanted


def _widen_inserted(event: Any) -> None:
    widen_contrast_range(event.value)


def _set_readout(label: QLabel, text: str) -> None:
    """Show ``text`` in a readout label, also as its accessible name after what it reads out (its ``readout``
    property: ``value under cursor: t1: 412 a.u.``).

    Why in the name: a screen reader reads a Qt label's accessible name, not its text, once it has one; with no
    name an empty readout had nothing to announce. Unchanged text sets nothing (no announcement per mouse move).
    """
    if label.text() == text and label.accessibleName():
        return
    label.setText(text)
    label.setAccessibleName(f"{label.property('readout')}: {text or 'none'}")


def _readouts(labels: Dict[QLabel, str]) -> None:
    """Status labels a keyboard or screen-reader user can reach (Tab), select and copy, each named by what it
    reads out followed by its text (``fusion status: added 'fused (mean)'``), as the Overlay tab's own readouts.

    Why: they were labels with no name, reachable by mouse only, so a screen reader had nothing to announce when
    a job ended. Their text is set through :func:`_set_readout` from then on, which keeps the name current.
    """
    for label, what in labels.items():
        label.setProperty("readout", what)
        label.setTextInteractionFlags(Qt.TextSelectableByMouse | Qt.TextSelectableByKeyboard)
        label.setFocusPolicy(Qt.StrongFocus)
        _set_readout(label, label.text())


class OverlayPanel(QWidget):
    """Display controls; every control acts on napari layer properties only (no voxel changes)."""

    def __init__(self, viewer: Any):
        super().__init__()
        self.viewer = viewer
        self.base = LayerCombo(viewer, prefer=("MR", "CT"), skip=_is_compare, shown=self.shown_by_user)
        self.overlay = LayerCombo(viewer, prefer=FUNCTIONAL, skip=_is_compare, default_index=1,
                                  shown=self.shown_by_user)
        self.base_cmap, self.overlay_cmap = QComboBox(), QComboBox()
        for box, first in ((self.base_cmap, BASE_COLORMAPS), (self.overlay_cmap, OVERLAY_COLORMAPS)):
            box.addItems(first)
            box.insertSeparator(box.count())  # the maps that read well under colour-vision deficiency above it
            box.addItems([n for n in COLORMAPS if n not in first])
        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.blending = QComboBox()
        self.blending.addItems(BLENDINGS)
        # Window / level (base layer, CT presets in HU).
        self.window_preset = QComboBox()
        self.window_preset.addItems(["custom", *WINDOW_LABELS.values()])
        # Wide ranges, precision following the base image (see _limits_changed): an MR scaled 0..1 or a PET in
        # Bq/mL (levels of 10^4) must not be clamped or rounded by the boxes.
        self.ww, self.wl = _spin(1e-9, 1e12, 80), _spin(-1e12, 1e12, 40)
        self.wwwl_readout = QLabel("")
        # Overlay range and threshold (SUV for a PET; the group is titled with the overlay's unit).
        self.suv_max = _spin(1e-9, 1e12, 6.0, 0.5, 2)
        self.suv_threshold = _spin(-1e12, 1e12, 0.0, 0.5, 2)  # floor 0 for PET/SPECT only (see _floor)
        # Compare modes.
        self.compare = QComboBox()
        self.compare.addItems(COMPARE)
        # Down to 0.1 mm, with a decimal: a mouse brain (18 mm) had one tile boundary at the 16 mm default, and
        # 0.5 mm was clamped to 2.
        self.tile_mm = _spin(0.1, 200, 16, 1, 1)
        self.curtain = QSlider(Qt.Horizontal)
        self.curtain.setRange(0, 100)
        self.curtain.setValue(50)
        self.flicker = QCheckBox("flicker overlay")
        self._flicker_timer = QTimer(self)
        self._flicker_timer.setInterval(500)
        # A compare view is rebuilt when its pair changes (a registration moving the overlay, a new window on the
        # base); coalesced, since napari's transform mode or a contrast slider emits many changes in a row.
        self._rebuild_timer = QTimer(self)
        self._rebuild_timer.setSingleShot(True)
        self._rebuild_timer.setInterval(150)
        # The overlay is put above the base once the layer list has settled (see _raise_overlay): a pair picked as a
        # layer is inserted must not reorder the list inside napari's own insertion.
        self._raise_timer = QTimer(self)
        self._raise_timer.setSingleShot(True)
        self._raise_timer.setInterval(0)
        # Views.
        self.view = QComboBox()
        self.view.addItems(list(VIEWS))
        self.grid = QCheckBox("grid (one tile per layer)")
        self.mip = QCheckBox("3-D MIP")
        self.cursor_value = QLabel("")
        # Readouts a keyboard or screen-reader user can reach (Tab) and copy, not only a mouse user.
        _readouts({self.wwwl_readout: "window of the base", self.cursor_value: "value under cursor"})

        tips = {
            self.base: "Base layer of the pair (usually the MR or CT): window/level, compare modes and the value "
                       "under the cursor act on it.",
            self.overlay: "Overlay layer of the pair (usually the PET or SPECT), drawn over the base.",
            self.base_cmap: "Colour map of the base layer.",
            self.overlay_cmap: "Colour map of the overlay layer (cividis, viridis, inferno, magma and plasma read "
                               "well with colour-vision deficiency; red with green, and turbo, do not).",
            self.opacity: "Overlay opacity, 0-100 %.",
            self.blending: "How the overlay is drawn over the base: additive (PET on MR/CT), translucent, opaque "
                           "or minimum.",
            self.window_preset: "CT window preset (WW/WL in HU) for the base layer; a CT in HU only.",
            self.ww: "Window width (WW) of the base, in its unit (HU for a CT).",
            self.wl: "Window level (WL, the centre) of the base, in its unit (HU for a CT).",
            self.suv_max: "Overlay value shown at full colour, in the overlay's unit (SUV for a PET in SUV, HU for "
                          "a CT).",
            self.suv_threshold: "Overlay floor: values at or below it are not drawn (the colour map is made "
                                "transparent there unless its lowest colour is black under additive blending), in "
                                "the overlay's unit (SUV for a PET in SUV, HU for a CT; never below 0 for PET/SPECT).",
            self.compare: "overlay: the pair blended; checkerboard: tiles alternating base and overlay; curtain: "
                          "base on one side, overlay on the other (new 'compare:' layers, the others hidden).",
            self.tile_mm: "Checkerboard tile size, in mm.",
            self.curtain: "Curtain position across the view, 0-100 % (left to right).",
            self.flicker: "Toggle the overlay on and off twice a second (misalignment shows as movement).",
            self.view: "Slice orientation: axial, coronal or sagittal (radiological convention).",
            self.grid: "Show the layers side by side, one tile per layer.",
            self.mip: "3-D maximum-intensity projection of the image layers (off: back to 2-D slices).",
            self.wwwl_readout: "The base layer's window width and level as napari shows them, in its unit.",
            self.cursor_value: "Values of the base and overlay layers at the mouse cursor, in their units (HU, SUV, "
                               "counts, a.u.).",
        }
        for control, text in tips.items():
            control.setToolTip(text)
            control.setAccessibleDescription(text)

        pair = QFormLayout()
        pair.addRow("base", self.base)
        pair.addRow("base colour map", self.base_cmap)
        pair.addRow("overlay", self.overlay)
        pair.addRow("overlay colour map", self.overlay_cmap)
        pair.addRow("overlay opacity", self.opacity)
        pair.addRow("blending", self.blending)
        wl = QFormLayout()
        wl.addRow("CT preset", self.window_preset)
        wl.addRow("width (WW)", self.ww)
        wl.addRow("level (WL)", self.wl)
        wl.addRow(self.wwwl_readout)
        suv = QFormLayout()
        suv.addRow("max", self.suv_max)
        suv.addRow("threshold (floor)", self.suv_threshold)
        cmp_ = QFormLayout()
        cmp_.addRow("mode", self.compare)
        cmp_.addRow("tile (mm)", self.tile_mm)
        cmp_.addRow("curtain", self.curtain)
        cmp_.addRow(self.flicker)
        views = QFormLayout()
        views.addRow("orientation", self.view)
        views.addRow(self.grid)
        views.addRow(self.mip)
        lay = QVBoxLayout(self)
        for title, sub in (("Active pair", pair), ("Window / level (base)", wl), ("Overlay range (SUV)", suv),
                           ("Compare", cmp_), ("Views", views)):
            box = QGroupBox(title)
            box.setLayout(sub)
            lay.addWidget(box)
            if sub is suv:
                self.range_box = box  # titled with the overlay's unit (HU for a CT overlay, not SUV)
        lay.addWidget(QLabel("value under cursor:"))
        lay.addWidget(self.cursor_value)
        lay.addStretch(1)

        # Saved by layer identity, not name: a layer renamed meanwhile must still get its state back.
        self._hidden: Dict[int, Tuple[Any, bool]] = {}
        # Layers the flicker toggled, with their visibility before it: put back when the flicker stops or its
        # target changes (another overlay, a compare view built or ended), so no layer is left hidden.
        self._flickered: Dict[int, Tuple[Any, bool]] = {}
        self._compared: Tuple[Any, ...] = ()  # the pair a compare view shows (ended when one is closed)
        self._pair_tips = {c: c.toolTip() for c in (self.opacity, self.blending)}
        self._renderings: Dict[int, Tuple[Any, str]] = {}
        self._resampled_cache: Optional[tuple] = None  # (inputs, placements, the overlay on the base grid)
        self._watched = []
        self.base.currentTextChanged.connect(self._pair_changed)
        self.overlay.currentTextChanged.connect(self._pair_changed)
        self.base_cmap.currentTextChanged.connect(lambda n: self._set(self.base.layer(), colormap=n))
        # The overlay's map draws below the threshold transparent, as the threshold's tooltip says.
        self.overlay_cmap.currentTextChanged.connect(lambda n: self._set_overlay(colormap=n))
        self.opacity.valueChanged.connect(lambda v: self._set(self.overlay.layer(), opacity=v / 100.0))
        self.blending.currentTextChanged.connect(lambda b: self._set_overlay(blending=b))
        self.window_preset.currentTextChanged.connect(self._preset_chosen)
        self.ww.valueChanged.connect(self._window_edited)
        self.wl.valueChanged.connect(self._window_edited)
        self.suv_max.valueChanged.connect(self._suv_edited)
        self.suv_threshold.valueChanged.connect(self._suv_edited)
        self.compare.currentTextChanged.connect(self.set_compare)
        self.tile_mm.valueChanged.connect(lambda *_: self._recompute_compare())
        self.curtain.valueChanged.connect(lambda *_: self._recompute_compare())
        self.flicker.toggled.connect(self.set_flicker)
        self._flicker_timer.timeout.connect(self._flick)
        self._rebuild_timer.timeout.connect(self._recompute_compare)
        self._raise_timer.timeout.connect(self._raise_overlay)
        self.view.currentTextChanged.connect(self.set_view)
        self.grid.toggled.connect(lambda on: setattr(_grid(self.viewer), "enabled", bool(on)))
        self.mip.toggled.connect(self.set_mip)
        self.viewer.cursor.events.position.connect(self._cursor_moved)
        # A plain function, not a method: it holds nothing of the panel, so closing the widget leaves no dead slot.
        self.viewer.layers.events.inserted.connect(_widen_inserted)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        # napari's own transpose/roll buttons (and scripts) change which axis is horizontal: the curtain follows.
        self._curtain_split: Optional[Tuple[int, bool]] = None  # (base axis, reversed) the curtain was built on
        self.viewer.dims.events.order.connect(self._dims_order_changed)
        for layer in self.viewer.layers:
            widen_contrast_range(layer)
        self._pair_changed()

    def shown_by_user(self, layer: Any) -> bool:
        """Whether the user shows ``layer``: the visibility a compare view or the flicker set aside, else its own.

        Why: the layer pickers pre-select shown layers; a layer opened while a compare view hid the pair (or the
        flicker hid the overlay) moved them off the pair the user was looking at.
        """
        for saved in (getattr(self, "_flickered", {}), getattr(self, "_hidden", {})):
            kept = saved.get(id(layer))
            if kept is not None and kept[0] is layer:
                return bool(kept[1])
        return bool(layer.visible)

    def _open(self) -> list:
        """The viewer's layers themselves (not napari's proxies of them), for identity checks and caches."""
        return [real_layer(l) for l in self.viewer.layers]

    # -------------------------------------------------------------------- pair
    @staticmethod
    def _set(layer: Any, **props: Any) -> None:
        if layer is None:
            return
        for k, v in props.items():
            setattr(layer, k, v)

    def _set_overlay(self, **props: Any) -> None:
        """Set the overlay's colour map or blending, with the colour map the threshold needs (see its tooltip)."""
        ov = self.overlay.layer()
        if ov is None:
            return
        self._set(ov, **props)
        cmap = threshold_colormap(ov.colormap, ov.blending)
        if cmap.name != ov.colormap.name:
            ov.colormap = cmap

    def _watch(self, layer: Any, connect: bool) -> None:
        """(Dis)connect the layer events that the panel's controls follow.

        Why: napari's own layer controls change colour map, opacity and blending too; a control left stale
        shows the wrong state and puts its old value back the next time it is touched.
        """
        shown = [(name, self._pair_edited) for name in _COMPARE_INPUTS]
        shown += [(name, self._compare_display) for name in _COMPARE_DISPLAY]
        for name, slot in (("contrast_limits", self._limits_changed), ("colormap", self._display_changed),
                           ("opacity", self._display_changed), ("blending", self._display_changed), *shown):
            emitter = getattr(layer.events, name)
            if connect:
                emitter.connect(slot)
                continue
            try:
                emitter.disconnect(slot)
            except (TypeError, RuntimeError, ValueError):
                pass

    def _pair_changed(self, *_: Any) -> None:
        self._unflick()  # the previous overlay is not left hidden by a flicker that moves to the new one
        self._end_flicker_of_broken_pair()
        for layer in self._watched:
            self._watch(layer, connect=False)
        self._watched = []
        base, ov = self.base.layer(), self.overlay.layer()
        for layer in (base, ov):
            if layer is not None and layer not in self._watched:
                self._watch(layer, connect=True)
                self._watched.append(layer)
        self._display_changed()
        self._limits_changed()
        self._pair_edited()  # a compare view shows the pair picked now, not the previous one
        self._raise_timer.start()

    def _raise_overlay(self) -> None:
        """Move the overlay directly above the base in the layer list when it lies below it (others keep their order).

        Why: napari draws the list bottom up, so an overlay below an opaque base was hidden while its controls
        acted on it: the sample PET opened before the MR showed 0 coloured pixels at the lesion slice (27016 with
        the MR opened first).
        """
        base, ov = self.base.layer(), self.overlay.layer()
        if base is None or ov is None or base is ov:
            return
        at = {id(l): n for n, l in enumerate(self._open())}
        if id(ov) not in at or id(base) not in at or at[id(ov)] > at[id(base)]:
            return
        self.viewer.layers.move(at[id(ov)], at[id(base)] + 1)
        from napari.utils.notifications import show_info

        show_info(f"'{ov.name}' was below '{base.name}' in the layer list, where the base hid it; it was moved "
                  f"directly above it to be drawn as the overlay.")

    def _display_changed(self, *_: Any) -> None:
        """Show the pair's colour maps, the overlay's opacity and its blending as the layers have them now."""
        base, ov = self.base.layer(), self.overlay.layer()
        for box, layer in ((self.base_cmap, base), (self.overlay_cmap, ov)):
            if layer is not None:
                _show_choice(box, plain_colormap_name(layer.colormap.name))
        if ov is not None:
            self.opacity.blockSignals(True)
            self.opacity.setValue(int(round(ov.opacity * 100)))
            self.opacity.blockSignals(False)
            _show_choice(self.blending, str(ov.blending))

    # -------------------------------------------------------------------- window / level
    def set_window(self, name: str) -> None:
        """Apply a CT window preset (``brain``, ``soft_tissue``, ``lung``, ``bone``, ``subdural``) to the base.

        Refused (a notification) when the base is not a CT in HU, e.g. a PET left as the only layer.
        """
        from medfuse.display import CT_WINDOWS, check_ct_window
        from medfuse.errors import MedfuseError
        from napari.utils.notifications import show_error

        width, level = CT_WINDOWS[name]
        base = self.base.layer()
        if base is None:
            return
        md = meta(base)
        try:
            check_ct_window(md.get("modality"), md.get("unit"))
        except MedfuseError as exc:
            show_error(f"{base.name}: {exc.one_line()}")
            self._limits_changed()  # the preset box goes back to what the base shows
            return
        self.set_window_level(width, level)

    def set_window_level(self, width: float, level: float) -> None:
        from medfuse.display import window_to_limits

        base = self.base.layer()
        if base is not None:
            base.contrast_limits = window_to_limits(width, level)

    def _preset_chosen(self, label: str) -> None:
        key = {v: k for k, v in WINDOW_LABELS.items()}.get(label)
        if key:
            self.set_window(key)

    def _window_edited(self, *_: Any) -> None:
        self.set_window_level(self.ww.value(), self.wl.value())

    def _limits_changed(self, *_: Any) -> None:
        """Keep the W/L boxes (base) and the range boxes (overlay) on the layers' limits, however they changed.

        Why: napari's own contrast slider changes them too, and a box left stale would put its old value back
        the next time the other box of its pair is edited.
        """
        self._sync_window()
        self._sync_range()

    def _sync_range(self) -> None:
        from medfuse.display import window_precision

        ov = self.overlay.layer()
        if ov is None:
            self.range_box.setTitle("Overlay range")  # not the unit of an overlay closed meanwhile
            return
        unit = unit_label(meta(ov).get("unit"))
        self.range_box.setTitle(f"Overlay range ({unit})" if unit else "Overlay range")
        lo, hi = (float(v) for v in ov.contrast_limits)
        step, decimals = window_precision(hi - lo)
        floor = _floor(ov)
        threshold = max(floor, lo)
        eps = 10.0 ** -decimals
        # Each box stops one step short of the other: a threshold typed above the maximum is held just below it,
        # not refused unseen (the box would show a value the layer does not have).
        for spin, value, lowest, highest in ((self.suv_threshold, threshold, floor, hi - eps),
                                             (self.suv_max, hi, threshold + eps, 1e12)):
            spin.blockSignals(True)
            spin.setDecimals(decimals)
            spin.setSingleStep(step)
            spin.setRange(lowest, max(lowest, highest))
            spin.setValue(value)
            spin.blockSignals(False)

    def _sync_window(self) -> None:
        from medfuse.display import CT_WINDOWS, limits_to_window, window_precision

        base = self.base.layer()
        if base is None:
            _set_readout(self.wwwl_readout, "")
            return
        width, level = limits_to_window(*base.contrast_limits)
        step, decimals = window_precision(width)
        for spin, value in ((self.ww, width), (self.wl, level)):
            spin.blockSignals(True)
            spin.setDecimals(decimals)
            spin.setSingleStep(step)
            if spin is self.ww:
                spin.setMinimum(10.0 ** -decimals)
            spin.setValue(float(value))
            spin.blockSignals(False)
        name = next((WINDOW_LABELS[k] for k, (w, l) in CT_WINDOWS.items()
                     if abs(w - width) < 0.5 and abs(l - level) < 0.5), "custom")
        self.window_preset.blockSignals(True)
        self.window_preset.setCurrentText(name)
        self.window_preset.blockSignals(False)
        unit = unit_label(meta(base).get("unit"))
        shown = max(0, decimals - 1)
        _set_readout(self.wwwl_readout, f"WW {width:.{shown}f} / WL {level:.{shown}f} {unit}".strip())

    # -------------------------------------------------------------------- SUV
    def set_suv_range(self, maximum: float, threshold: float = 0.0) -> None:
        """Overlay contrast limits ``(threshold, maximum)``; below the threshold nothing is added."""
        ov = self.overlay.layer()
        if ov is not None and maximum > threshold:
            cmap = threshold_colormap(ov.colormap, ov.blending)  # below the threshold: nothing drawn (tooltip)
            if cmap.name != ov.colormap.name:
                ov.colormap = cmap
            ov.contrast_limits = (max(_floor(ov), float(threshold)), float(maximum))

    def _suv_edited(self, *_: Any) -> None:
        self.set_suv_range(self.suv_max.value(), self.suv_threshold.value())

    # -------------------------------------------------------------------- compare modes
    def set_compare(self, mode: str) -> None:
        """``overlay`` (normal), ``checkerboard`` or ``curtain``: tiles/halves of base and overlay side by side."""
        from medfuse.errors import MedfuseError
        from napari.utils.notifications import show_error

        from ._jobs import napari_words

        if self.compare.currentText() != mode:
            self.compare.setCurrentText(mode)  # re-enters through the signal
            return
        self._clear_compare()
        if mode == "overlay":
            return
        base, ov = self.base.layer(), self.overlay.layer()
        if base is None or ov is None or base is ov:
            show_error("Compare modes need a base and a different overlay layer. Fix: pick both above.")
            self._reset_mode()
            return
        try:
            if coverage_onto(ov, base) <= 0.0:
                # Every tile of the overlay would be empty: a compare view of the base alone, with no word.
                show_error(f"'{ov.name}' does not overlap the base '{base.name}' where napari shows them, so its "
                           f"{mode} tiles would all be empty. Fix: align '{ov.name}' onto '{base.name}' in the "
                           f"Register tab first (or check that the right layers are picked).")
                self._reset_mode()
                return
            self._build_compare(base, ov, mode)
        except MedfuseError as exc:
            show_error(napari_words(exc.one_line()))
            self._reset_mode()

    def _reset_mode(self) -> None:
        self.compare.blockSignals(True)
        self.compare.setCurrentText("overlay")
        self.compare.blockSignals(False)

    def _overlay_on_base(self, base: Any, ov: Any) -> np.ndarray:
        # The layers and their voxel arrays by identity (ids alone are reused once a layer is deleted): new voxels
        # in the overlay, or the next study's layers on the same grid, must not get the old resampling. Weak
        # references: a closed study's layers are not kept in memory by the cache.
        objects = (base, ov, base.data, ov.data)
        placement = (data_to_world(base).tobytes(), data_to_world(ov).tobytes())
        cached = self._resampled_cache
        if cached is None or cached[1] != placement or not all(_alive(r) is o for r, o in zip(cached[0], objects)):
            import warnings

            from medfuse.errors import MedfuseWarning
            from napari.utils.notifications import show_warning

            from ._jobs import napari_words

            with warnings.catch_warnings(record=True) as caught:  # medfuse's advice in napari terms
                warnings.simplefilter("always", MedfuseWarning)
                cached = (tuple(_weak(o) for o in objects), placement, resample_onto(ov, base).array)
            for w in caught:
                if issubclass(w.category, MedfuseWarning):
                    show_warning(napari_words(str(w.message)))
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            self._resampled_cache = cached
        return cached[2]

    def _curtain_axis(self, base: Any) -> Tuple[int, bool]:
        """The base's data axis drawn along the screen's horizontal, and whether it runs right to left.

        The screen's horizontal axis is a viewer dimension (``dims.order[-1]``, changed by napari's transpose and
        roll); the base's own axis there is shifted when the viewer has more dimensions than the base (a 4-D series
        open beside it). A rotated base (``rotate`` or an affine) shows another data axis there, or the same one
        reversed: the data axis whose world direction is closest to the horizontal. A viewer axis the base lacks:
        its last axis, the usual horizontal one.
        """
        ndim = layer_array(base).ndim
        horizontal = layer_axis(int(self.viewer.dims.order[-1]), self.viewer.dims.ndim, ndim)
        if horizontal is None:
            return ndim - 1, False
        lin = data_to_world(base)[:3, :3]  # columns: each data axis's world direction (layer world axes)
        along = lin[horizontal - (ndim - 3)] / np.maximum(np.linalg.norm(lin, axis=0), 1e-12)
        axis = int(np.argmax(np.abs(along)))
        return axis + (ndim - 3), bool(along[axis] < 0)

    def _mask(self, base: Any, mode: str) -> np.ndarray:
        shape = tuple(layer_array(base).shape)
        if mode == "checkerboard":
            # The true voxel spacing (a spacing held in the layer's affine by another reader, not scale 1).
            tiles = tuple(max(1, int(round(self.tile_mm.value() / s))) for s in voxel_spacing(base))
            return checker3d(shape, tiles)
        axis, reverse = self._curtain_axis(base)
        self._curtain_split = (axis, reverse)
        mask = curtain3d(shape, axis=axis, position=self.curtain.value() / 100.0)
        # Base on the screen's left: the high indices when the axis runs right to left.
        return np.flip(mask, axis=axis) if reverse else mask

    def _dims_order_changed(self, *_: Any) -> None:
        """Rebuild a curtain whose split no longer runs across the screen (napari's transpose or roll)."""
        try:
            if self.compare.currentText() != "curtain" or not self._compared:
                return
            base = self._compared[0]
            if self._curtain_axis(base) != self._curtain_split:
                self._rebuild_timer.start()
        except RuntimeError:  # the widget was closed but the viewer still emits: stop listening
            self.viewer.dims.events.order.disconnect(self._dims_order_changed)

    def close_views(self) -> None:
        """End a compare view and a flicker, giving the layers back the visibility the user had set.

        Why: called when the dock is closed; what it left would keep the study half hidden with no control left
        to undo it (the pair hidden under 'compare:' layers, the overlay hidden for good by the flicker).
        """
        self._rebuild_timer.stop()
        self.flicker.setChecked(False)  # stops the timer and gives the overlay its visibility back
        self._flicker_timer.stop()
        self._unflick()
        if self.compare.currentText() != "overlay" or self._compared or self._hidden:
            self._clear_compare()
            self._reset_mode()

    def _build_compare(self, base: Any, ov: Any, mode: str) -> None:
        ov_data = self._overlay_on_base(base, ov)
        mask = self._mask(base, mode)
        b_data, b_fill = _masked(layer_array(base), mask, float(base.contrast_limits[0]))
        o_data, o_fill = _masked(ov_data, np.logical_not(mask), float(ov.contrast_limits[0]))
        self._fills = {"compare: base": b_fill, "compare: overlay": o_fill}
        # Where each compare layer holds its fill (the other image's tiles), for _refill.
        self._fill_masks = {"compare: base": np.logical_not(mask), "compare: overlay": mask}
        self._unflick()  # record the visibility the user set, not the flicker's current phase
        self._hidden = {id(l): (l, l.visible) for l in self._open()}
        for l in self._open():
            l.visible = False
        self._compared = (base, ov)
        self._pair_controls(compare=True)
        geo = layer_geometry(base)
        # Additive over black: each tile shows exactly one of the two images, in its own colours; the other
        # image's tiles hold a fill value its floored colour map draws transparent.
        for name, data, src in (("compare: base", b_data, base), ("compare: overlay", o_data, ov)):
            md = dict(meta(src))
            md[_COMPARE_TAG] = mode
            self.viewer.add_image(data, name=name, colormap=floored_colormap(src.colormap),
                                  contrast_limits=src.contrast_limits, blending="additive", opacity=1.0,
                                  metadata={"medfuse": md}, **geo)

    def _compare_display(self, *_: Any) -> None:
        """Copy the pair's window and colour maps onto the compare layers, without rebuilding their voxels.

        Why: rebuilding on every contrast change took 4.5-7.6 s on the GUI thread for a 150x512x512 CT. Rebuilt
        only when a low limit goes below the fill value (the fill would then show as a colour).
        """
        if self.compare.currentText() == "overlay":
            return
        sources = {"compare: base": self.base.layer(), "compare: overlay": self.overlay.layer()}
        fills = getattr(self, "_fills", {})
        for layer in self._open():
            src = sources.get(layer.name) if _is_compare(layer) else None
            if src is None:
                continue
            low, high = (float(v) for v in src.contrast_limits)
            if low < fills.get(layer.name, -np.inf) and not self._refill(layer, low - (high - low)):
                self._rebuild_timer.start()
                return
            cmap = floored_colormap(src.colormap)
            if not cmap.same_colors(layer.colormap) or cmap.name != layer.colormap.name:
                layer.colormap = cmap
            if list(layer.contrast_limits) != list(src.contrast_limits):
                layer.contrast_limits = src.contrast_limits

    def _refill(self, layer: Any, low: float) -> bool:
        """Lower the fill value of a compare layer in place, below a window that went under it; False if it cannot.

        Why a window's width lower: dragging the window down then refills once, not at every step.
        """
        data, where = layer.data, getattr(self, "_fill_masks", {}).get(layer.name)
        if where is None or not isinstance(data, np.ndarray) or not data.flags.writeable:
            return False
        fill = _fill_value(data.dtype, low)
        if fill is None:
            return False
        np.copyto(data, data.dtype.type(fill), where=where)
        self._fills[layer.name] = fill
        layer.refresh()
        return True

    def _pair_edited(self, *_: Any) -> None:
        if self.compare.currentText() != "overlay":
            self._rebuild_timer.start()

    def _recompute_compare(self) -> None:
        mode = self.compare.currentText()
        if mode == "overlay":
            return
        base, ov = self.base.layer(), self.overlay.layer()
        if base is None or ov is None or base is ov:
            # The pair's layers were closed (the study is done): the compare view ends quietly. Not an error
            # notification to a user who did nothing wrong, and not a compare view springing up over the next
            # study's layers when they open.
            self._clear_compare()
            self._reset_mode()
            return
        self.set_compare(mode)

    def _clear_compare(self) -> None:
        self._unflick()
        self._compared = ()
        for l in [l for l in self.viewer.layers if _is_compare(l)]:
            self.viewer.layers.remove(l)
        for layer, visible in self._hidden.values():
            if any(layer is l for l in self._open()):
                layer.visible = visible
        self._hidden = {}
        self._pair_controls(compare=False)

    def _pair_controls(self, compare: bool) -> None:
        """Disable opacity/blending in a compare view: they act on the overlay layer, hidden there (why the tip)."""
        for control, tip in self._pair_tips.items():
            control.setEnabled(not compare)
            control.setToolTip(tip + (" Not used in checkerboard/curtain mode: each tile shows one image at full "
                                      "opacity; back to 'overlay' mode to change it." if compare else ""))

    def _layer_removed(self, event: Any) -> None:
        """End a compare view whose base or overlay was closed, with a notice.

        Why: the overlay picker moves to the next layer, and the view silently compared another image.
        """
        try:
            gone = real_layer(getattr(event, "value", None))
            if gone is None or not any(gone is l for l in self._compared):
                return
            from napari.utils.notifications import show_info

            mode = self.compare.currentText()
            self._clear_compare()
            self._reset_mode()
            show_info(f"The {mode} view ended: '{gone.name}', one of its two layers, was closed.")
        except RuntimeError:  # the widget was closed but the viewer still emits: stop listening
            self.viewer.layers.events.removed.disconnect(self._layer_removed)

    def stop_flicker(self) -> None:
        """Stop the flicker and give the overlay back its visibility (the dock was hidden: its box out of sight)."""
        self.flicker.setChecked(False)
        self.set_flicker(False)  # also when it was started without the box (set_flicker(True) from a script)

    def set_flicker(self, on: bool) -> None:
        """Toggle the overlay (or the compare overlay) on and off twice a second."""
        if on:
            self._flicker_timer.start()
        else:
            self._flicker_timer.stop()
            self._unflick()

    def _end_flicker_of_broken_pair(self) -> None:
        """Stop the flicker when the pickers no longer hold two layers (one of the pair was closed).

        Why: the overlay picker fell back onto the base, and the flicker went on blinking the base itself (the MR
        hidden and shown twice a second), or the PET when the base was the one closed.
        """
        base, ov = self.base.layer(), self.overlay.layer()
        if not self._flicker_timer.isActive() or (base is not None and ov is not None and base is not ov):
            return
        self.flicker.setChecked(False)
        self.set_flicker(False)  # also when it was started without the box (set_flicker(True) from a script)
        from napari.utils.notifications import show_info

        show_info("The flicker stopped: it needs a base and a different overlay layer; pick them, then tick "
                  "'flicker overlay' again.")

    def _unflick(self) -> None:
        """Give the layers the flicker toggled their visibility from before it (those still open)."""
        flickered, self._flickered = self._flickered, {}
        for layer, visible in flickered.values():
            if any(layer is l for l in self._open()):
                layer.visible = visible

    def _flicker_target(self):
        compare = [l for l in self._open() if _is_compare(l) and l.name == "compare: overlay"]
        return compare[0] if compare else self.overlay.layer()

    def _flick(self) -> None:
        target = self._flicker_target()
        if target is not None and self._flicker_timer.isActive():  # not a tick queued before the flicker stopped
            self._flickered.setdefault(id(target), (target, target.visible))
            target.visible = not target.visible

    # -------------------------------------------------------------------- views
    def set_view(self, name: str) -> None:
        """Axial, coronal or sagittal slicing (radiological orientation; superior up)."""
        order, orientation = VIEWS[name]
        if self.viewer.dims.ndim >= 3:
            lead = tuple(range(self.viewer.dims.ndim - 3))
            self.viewer.dims.order = lead + tuple(len(lead) + o for o in order)
            try:
                _camera(self.viewer).orientation2d = orientation
            except (AttributeError, ValueError):
                pass
        if self.compare.currentText() == "curtain":
            self._recompute_compare()

    def set_mip(self, on: bool) -> None:
        """3-D maximum-intensity projection of the image layers (back to 2-D slices when off)."""
        from napari.layers import Image

        if on:
            for l in self._open():
                if isinstance(l, Image):
                    self._renderings.setdefault(id(l), (l, l.rendering))  # a second "on" keeps the first
                    l.rendering = "mip"
            self.viewer.dims.ndisplay = 3
        else:
            self.viewer.dims.ndisplay = 2
            for layer, rendering in self._renderings.values():
                if any(layer is l for l in self._open()):
                    layer.rendering = rendering
            self._renderings = {}

    # -------------------------------------------------------------------- cursor
    def cursor_text(self, position=None) -> str:
        """Values of the base and overlay layers at a world position (default: the cursor), with units."""
        pos = self.viewer.cursor.position if position is None else position
        parts = []
        for layer in (self.base.layer(), self.overlay.layer()):
            if layer is None:
                continue
            value = voxel_value(layer, pos)
            if value is None:
                continue
            parts.append(f"{layer.name}: {float(value):.4g} {unit_label(meta(layer).get('unit'))}".strip())
        return "   ".join(parts)

    def _cursor_moved(self, *_: Any) -> None:
        try:
            _set_readout(self.cursor_value, self.cursor_text())
        except RuntimeError:  # the widget was closed but the viewer still emits: stop listening
            self.viewer.cursor.events.position.disconnect(self._cursor_moved)
