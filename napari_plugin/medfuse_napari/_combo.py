"""A combo box of the viewer's image layers that follows layer additions, removals, moves and renames."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

from qtpy.QtWidgets import QComboBox

from ._layers import FUNCTIONAL, is_functional, meta, real_layer


class LayerCombo(QComboBox):
    """Pick an image layer by name.

    Args:
        viewer: the napari viewer.
        prefer: modality codes to pre-select (e.g. ``("MR", "CT")``) until the user picks an item; with
            :data:`FUNCTIONAL` among them an RT dose (unit Gy, modality ``unknown``) is preferred too
            (:func:`is_functional`) unless ``prefer_dose`` is False.
        allow_none: add a "(none)" entry (optional third fusion input).
        skip: layers to leave out.
        allow_2d: also offer 2-D layers, grey or RGB (fusion of 2-D images); 3-D greyscale layers only otherwise.
        default_index: the image layer to pre-select when none has a preferred modality (1 for a second input,
            so that two layers of unknown modality do not both default to the first one).
        shown: whether the user shows a layer (default: its ``visible`` flag); see :meth:`set_shown`.
        prefer_dose: False for a picker of functional layers that must not prefer a dose (registration refuses
            one: a dose holds no anatomy).

    Until the user picks an item, the pre-selection falls on a layer shown in the viewer when one fits: a study
    folder opens with only its first anatomical and first functional series shown, and a picker took a hidden
    series of it (the CT bone kernel) instead of the MR opened beside it and shown. Among the shown layers the
    picker keeps its own rule: its preferred modalities first, otherwise the ``default_index``-th one; a preferred
    layer stays picked when no shown layer has a preferred modality, and a hidden one when too few are shown (one
    shown layer is the first picker's). Visibility is read when the layer list changes (a layer added, closed,
    moved or renamed), not on every toggle of an eye: a compare view or the flicker hiding the pair must not move
    the pickers, and a choice the user made is never changed.
    """

    NONE = "(none)"

    def __init__(self, viewer: Any, *, prefer: Sequence[str] = (), allow_none: bool = False,
                 skip: Optional[Callable[[Any], bool]] = None, allow_2d: bool = False, default_index: int = 0,
                 shown: Optional[Callable[[Any], bool]] = None, prefer_dose: bool = True):
        super().__init__()
        self._viewer, self._prefer, self._allow_none = viewer, tuple(prefer), allow_none
        self._skip = skip or (lambda layer: False)
        self._shown = shown or (lambda layer: bool(layer.visible))
        self._allow_2d = allow_2d
        self._default_index = int(default_index)
        # The overlay's and the fusion's functional pickers prefer a dose too: it is drawn over the CT.
        self._functional = prefer_dose and set(FUNCTIONAL) <= set(self._prefer)
        self._chosen_once = False  # True once the user (or set_layer) picked an item: the preference stops
        self._items: List[Any] = []  # the layer behind each item (None for "(none)"), to follow renames
        self._watched: List[Any] = []  # layers whose name events we listen to
        # Why `activated`: it fires on user choices only, never on programmatic changes (refresh, clear).
        self.activated.connect(self._on_activated)
        ev = viewer.layers.events
        ev.inserted.connect(self.refresh)
        ev.removed.connect(self.refresh)
        ev.moved.connect(self.refresh)
        self.refresh()

    def _on_activated(self, *_: Any) -> None:
        self._chosen_once = True

    def set_shown(self, shown: Callable[[Any], bool]) -> None:
        """Tell shown layers by ``shown(layer)`` from now on (e.g. the visibility a compare view set aside)."""
        self._shown = shown

    def _accepts(self, layer: Any) -> bool:
        from napari.layers import Image

        if not isinstance(layer, Image) or self._skip(layer):
            return False
        if layer.ndim == 3 and not layer.rgb:
            return True
        return self._allow_2d and layer.ndim == 2  # 2-D grey or 2-D RGB(A)

    def _preferred(self, layer: Any) -> bool:
        return meta(layer).get("modality") in self._prefer or (self._functional and is_functional(layer))

    def _images(self):
        return [l for l in map(real_layer, self._viewer.layers) if self._accepts(l)]

    def refresh(self, *_: Any) -> None:
        try:
            self._watch_names()
            self._refresh()
        except RuntimeError:  # the widget was closed but the viewer still emits: stop listening
            self._disconnect()

    def _watch_names(self) -> None:
        """Listen to the name of every layer in the viewer (and stop listening to removed ones)."""
        layers = [real_layer(l) for l in self._viewer.layers]
        for l in self._watched:
            if not any(l is m for m in layers):
                l.events.name.disconnect(self.refresh)
        for l in layers:
            if not any(l is w for w in self._watched):
                l.events.name.connect(self.refresh)
        self._watched = layers

    def _disconnect(self) -> None:
        ev = self._viewer.layers.events
        for emitter in (ev.inserted, ev.removed, ev.moved):
            emitter.disconnect(self.refresh)
        for l in self._watched:
            l.events.name.disconnect(self.refresh)
        self._watched = []

    def _refresh(self) -> None:
        current = self.currentText()
        idx = self.currentIndex()
        previous = self._items[idx] if 0 <= idx < len(self._items) else None
        images = self._images()
        if previous is not None and not any(previous is l for l in images):
            # The picked layer was closed (e.g. the study is done): the choice went with it, and the preference
            # picks again. Otherwise the next study's pickers all fell on its first layer (a CT as the overlay).
            self._chosen_once = False
        items = ([None] if self._allow_none else []) + images
        names = [self.NONE if l is None else l.name for l in items]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        self._items = items
        # The same layer stays selected, by identity: a rename keeps the choice.
        kept = [n for n, l in enumerate(items) if l is not None and l is previous]
        if not self._chosen_once and self._prefer:
            # Until the user picks, re-apply the preference: the box may have been filled before that layer came.
            preferred = [n for n, l in enumerate(items) if l is not None and self._preferred(l)]
            if preferred and not (kept and kept[0] in preferred):
                kept = preferred[:1]
            elif not preferred and images:
                kept = [len(items) - len(images) + min(self._default_index, len(images) - 1)]
        if kept:
            self.setCurrentIndex(kept[0])
        elif current in names:
            self.setCurrentText(current)
        if not self._chosen_once:
            self._prefer_shown()
        self.blockSignals(False)
        if current != self.currentText():
            self.currentTextChanged.emit(self.currentText())

    def _prefer_shown(self) -> None:
        """Move a pre-selection that fell on a hidden layer onto a shown one that fits (see the class docstring)."""
        idx = self.currentIndex()
        current = self._items[idx] if 0 <= idx < len(self._items) else None
        if current is None or self._shown(current):
            return
        shown = [n for n, l in enumerate(self._items) if l is not None and self._shown(l)]
        preferred = [n for n in shown if self._preferred(self._items[n])]
        if preferred:
            self.setCurrentIndex(preferred[0])
        elif not self._preferred(current) and len(shown) > self._default_index:
            self.setCurrentIndex(shown[self._default_index])

    def layer(self):
        """The chosen layer itself (never napari's proxy of it), or None.

        Why the layer itself: opened from the Plugins menu the widget gets a proxy viewer whose
        ``layers[name]`` is a new proxy object on every call, so the panels' identity checks (is the layer
        still open? the same pair as the cached one?) always failed.
        """
        name = self.currentText()
        if not name or name == self.NONE or name not in self._viewer.layers:
            return None
        return real_layer(self._viewer.layers[name])

    def set_layer(self, name: str) -> None:
        self._chosen_once = True
        self.setCurrentText(name)
