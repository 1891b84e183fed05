"""Fixtures of the napari plugin tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fuse_in_widget(qtbot):
    """Callable fixture: fuse two layers through the dock widget's Fuse panel, as a user does, and wait.

    ``fuse_in_widget(viewer, first, second, method="mean")`` -> ``(panel, fused_layer)``.
    """
    from medfuse_napari._widget import MedfuseWidget

    def fuse(viewer, first, second, method: str = "mean"):
        widget = MedfuseWidget(viewer)
        viewer.window.add_dock_widget(widget, name="medfuse")  # held by the window, as in napari
        panel = widget.fuse_panel
        panel.inputs[0].set_layer(first.name)
        panel.inputs[1].set_layer(second.name)
        panel.method.setCurrentText(method)
        panel.run()
        qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
        return panel, viewer.layers[-1]

    return fuse


@pytest.fixture
def dock_widget():
    """Callable fixture: the medfuse widget opened as napari opens it from the Plugins menu.

    ``dock_widget(viewer)`` -> the widget. Why: napari then hands the widget a ``PublicOnlyProxy`` of the viewer,
    whose ``layers[name]`` is a new proxy object on every call; a widget built with the viewer itself hides that.
    """

    def open_(viewer):
        _, widget = viewer.window.add_plugin_dock_widget("medfuse", "medfuse")
        return widget

    return open_


@pytest.fixture
def register_in_dock(qtbot):
    """Callable fixture: run a registration from a widget's Register panel and wait for it.

    ``register_in_dock(widget, fixed, moving, kind="rigid", timeout_ms=240_000)`` -> the panel.
    """

    def run(widget, fixed: str, moving: str, kind: str = "rigid", timeout_ms: int = 240_000):
        rp = widget.register_panel
        rp.fixed.set_layer(fixed)
        rp.moving.set_layer(moving)
        rp.kind.setCurrentText(kind)
        rp.run()
        qtbot.waitUntil(lambda: rp.worker is None, timeout=timeout_ms)
        return rp

    return run
