"""A combo box of the viewer's 3-D image layers that follows layer additions, removals and renames."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from qtpy.QtWidgets import QComboBox

from ._layers import meta


class LayerCombo(QComboBox):
    """Pick an image layer by name.

    Args:
        viewer: the napari viewer.
        prefer: modality codes to pre-select when the box is first filled (e.g. ``("PT", "NM")``).
        allow_none: add a "(none)" entry (optional third fusion input).
    """

    NONE = "(none)"

    def __init__(self, viewer: Any, *, prefer: Sequence[str] = (), allow_none: bool = False,
                 skip: Optional[Callable[[Any], bool]] = None):
        super().__init__()
        self._viewer, self._prefer, self._allow_none = viewer, tuple(prefer), allow_none
        self._skip = skip or (lambda layer: False)
        self._chosen_once = False
        ev = viewer.layers.events
        ev.inserted.connect(self.refresh)
        ev.removed.connect(self.refresh)
        self.refresh()

    def _images(self):
        from napari.layers import Image

        return [l for l in self._viewer.layers
                if isinstance(l, Image) and l.ndim == 3 and not l.rgb and not self._skip(l)]

    def refresh(self, *_: Any) -> None:
        try:
            self._refresh()
        except RuntimeError:  # the widget was closed but the viewer still emits: stop listening
            ev = self._viewer.layers.events
            ev.inserted.disconnect(self.refresh)
            ev.removed.disconnect(self.refresh)

    def _refresh(self) -> None:
        current = self.currentText()
        names = ([self.NONE] if self._allow_none else []) + [l.name for l in self._images()]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        elif not self._chosen_once and self._prefer:
            for l in self._images():
                if meta(l).get("modality") in self._prefer:
                    self.setCurrentText(l.name)
                    break
        self.blockSignals(False)
        if current != self.currentText():
            self.currentTextChanged.emit(self.currentText())

    def layer(self):
        """The chosen layer, or None."""
        name = self.currentText()
        if not name or name == self.NONE or name not in self._viewer.layers:
            return None
        return self._viewer.layers[name]

    def set_layer(self, name: str) -> None:
        self._chosen_once = True
        self.setCurrentText(name)
