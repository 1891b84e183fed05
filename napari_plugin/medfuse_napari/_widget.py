"""The "medfuse" dock widget: Register, Fuse and Overlay panels (a thin layer over ``medfuse``)."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from qtpy.QtCore import QEvent, Qt
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QFrame, QHBoxLayout, QLabel,
                            QPlainTextEdit, QProgressBar, QPushButton, QScrollArea, QTabWidget, QVBoxLayout, QWidget)

from medfuse.errors import InvalidInputError

from . import _jobs
from ._combo import LayerCombo
from ._layers import (FUNCTIONAL, coverage_between, grid_record, layer_array, layer_geometry, layer_grid,
                      layer_matrix, layer_to_volume, lps_to_world, meta, mm_matrix, native_volume, read_once,
                      real_layer, resample_between, viewer_alignment, world_matrix)
from ._overlay import OverlayPanel, _is_compare, _readouts, _set_readout

KINDS = ("rigid", "affine", "deformable")
PAIRS = ("auto", "MR-PT", "MR-CT", "MR-NM", "CT-PT", "CT-NM", "MR-MR", "default")
CLASSICAL = ("mean", "max", "laplacian", "wavelet", "gff")
_LEVEL = re.compile(r"^(\w+): level (\d+)/(\d+)(?:, iteration (\d+))?")


class _InputMoved(InvalidInputError):
    """The fixed or moving layer was moved or changed while registering: the result is not applied."""


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def _notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def _notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def _same_placement(layer: Any, other: Any) -> bool:
    """Whether napari shows two layers' pixels at the same world positions (every part of the transform)."""
    parts = ("scale", "translate", "rotate", "shear")
    return all(np.allclose(np.asarray(getattr(layer, k), float), np.asarray(getattr(other, k), float))
               for k in parts) and np.allclose(layer.affine.affine_matrix, other.affine.affine_matrix)


def _placement_key(layer: Any) -> tuple:
    """What a job read of a layer besides its name: its voxel array (by identity) and its whole napari transform."""
    parts = (layer.scale, layer.translate, layer.rotate, layer.shear, layer.affine.affine_matrix)
    return (id(layer.data),) + tuple(np.asarray(p, dtype=float).tobytes() for p in parts)


def _open_layers(viewer: Any) -> List[Any]:
    """The viewer's layers themselves (not napari's proxies of them), for identity checks."""
    return [real_layer(l) for l in viewer.layers]


def _series_fix(viewer: Any, default: str) -> str:
    """The fix for "no volume to pick": split a 4-D layer when there is one (the pickers take 3-D volumes only).

    Why: every series of a 4-D DICOM folder (fMRI, multi-echo, gated) opens as one 4-D layer, so a user who opened
    only such series sees empty pickers; napari's own Split Stack gives its volumes as 3-D layers.
    """
    from napari.layers import Image

    series = [l.name for l in viewer.layers if isinstance(l, Image) and not l.rgb and l.ndim == 4]
    if not series:
        return default
    return (f"'{series[0]}' is a 4-D series, which is not offered: right-click it in the layer list and choose "
            f"'Split Stack' to get its volumes as 3-D layers, then pick those")


def _job_failed(outcome, label, what: str, token: Any = None, *,
                words: Optional[Callable[[str], str]] = None) -> bool:
    """Show a cancelled or failed job in ``label`` and a notification; True when there is no result to use.

    A job that returned although ``token`` was cancelled counts as cancelled: Cancel came during its last step,
    after the last check, and the user asked for no result. ``words`` rewords the failure's message (the
    layers' names for the roles medfuse gives them).
    """
    from medfuse.errors import CancelledError

    error = outcome.error
    if error is None and token is not None and token.cancelled:
        error = CancelledError(f"{what} was cancelled")
    if error is None:
        return False
    if isinstance(error, CancelledError):
        _set_readout(label, "cancelled")
        _notify_info(f"{what.capitalize()} cancelled.")
    else:
        _set_readout(label, "failed")
        message = _jobs.error_message(error, what)
        _notify_error(words(message) if words is not None else message)
    return True


def _cancelling(token: Any) -> bool:
    """Whether Cancel was pressed: progress reported after that (the next level starting) is not shown."""
    return token is not None and token.cancelled


class MedfuseWidget(QWidget):
    """Dock widget with three tabs. napari passes the viewer as ``napari_viewer``."""

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.register_panel = RegisterPanel(napari_viewer)
        self.fuse_panel = FusePanel(napari_viewer)
        self.overlay_panel = OverlayPanel(napari_viewer)
        # Every picker pre-selects a layer as the user shows it, not as a compare view or the flicker hid it.
        for combo in (self.register_panel.fixed, self.register_panel.moving, *self.fuse_panel.inputs):
            combo.set_shown(self.overlay_panel.shown_by_user)
        tabs = QTabWidget()
        # Each tab scrolls: napari gives a dock no scroll bar, and the Overlay tab needs ~900 px of height (a
        # 1366x768 laptop leaves ~600), so its lower controls could not be reached.
        for panel, title in ((self.register_panel, "Register"), (self.fuse_panel, "Fuse"),
                             (self.overlay_panel, "Overlay")):
            tabs.addTab(_scrolling(panel), title)
        self.tabs = tabs
        # Alt+R/U/O switch tabs; napari's menus hold Alt+F, V, L, P, W and H.
        for n, title in enumerate(("&Register", "F&use", "&Overlay")):
            tabs.setTabText(n, title)
        lay = QVBoxLayout(self)
        lay.addWidget(tabs)
        # Closing the widget or the viewer must not leave a registration/fusion running in the background.
        # A lambda over plain Python objects: the panels' C++ side is already gone when `destroyed` fires.
        panels = (self.register_panel, self.fuse_panel)
        self._panels = panels
        self.destroyed.connect(lambda *_: _jobs.cancel_jobs([p.token for p in panels]))

    def hideEvent(self, event: Any) -> None:
        # The dock hidden (its hide button, View menu) or tabbed behind another: a flicker went on blinking the
        # overlay twice a second with the box that stops it out of sight. Not a minimised window (spontaneous).
        if not event.spontaneous():
            try:
                self.overlay_panel.stop_flicker()
            except RuntimeError:  # the viewer is being closed: nothing left to restore
                pass
        super().hideEvent(event)

    def event(self, event: Any) -> bool:
        # The dock's close button (napari's remove_dock_widget) takes the widget out of the window without
        # deleting it while napari or a script still holds it: a job left running would add its layers minutes
        # later to a viewer whose user closed the tool. Moving the dock elsewhere keeps a parent: not cancelled.
        if event.type() == QEvent.ParentChange and self.parent() is None:
            _jobs.cancel_jobs([p.token for p in getattr(self, "_panels", ()) if p.worker is not None])
            # A compare view or a flicker left behind hid the study (the pair hidden, the compare layers shown, the
            # overlay hidden in the flicker's off phase for good): the layers get back what the user had.
            overlay = getattr(self, "overlay_panel", None)
            if overlay is not None:
                try:
                    overlay.close_views()
                except RuntimeError:  # the viewer is being closed too: nothing left to restore
                    pass
        return super().event(event)


class _PanelScroll(QScrollArea):
    """A frameless vertical scroll area that never scrolls sideways (the dock stays narrow) and is as wide as its
    panel needs, measured again whenever the panel's size hints change.

    Why again: measured once when the panel was built, before napari's stylesheet (larger paddings) applied, the
    Register panel needed 423 px in a 410 px area and its right edge (combo arrows, Cancel, the bars) was cut off.
    """

    _REMEASURE = (QEvent.LayoutRequest, QEvent.StyleChange, QEvent.Polish, QEvent.PolishRequest, QEvent.FontChange,
                  QEvent.Show)

    def __init__(self, panel: QWidget):
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setWidget(panel)
        panel.installEventFilter(self)
        self._fit_width()

    def _fit_width(self) -> None:
        panel = self.widget()
        if panel is None:
            return
        frame = 2 * self.frameWidth()
        width = panel.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width() + frame
        if width != self.minimumWidth():
            self.setMinimumWidth(width)

    def eventFilter(self, watched: Any, event: Any) -> bool:
        if watched is self.widget() and event.type() in self._REMEASURE:
            self._fit_width()
        return super().eventFilter(watched, event)

    def event(self, event: Any) -> bool:
        if event.type() in (QEvent.StyleChange, QEvent.Polish, QEvent.Show):  # its scroll bar's width
            self._fit_width()
        return super().event(event)


def _scrolling(panel: QWidget) -> QScrollArea:
    """``panel`` in a :class:`_PanelScroll`."""
    return _PanelScroll(panel)


def _focus_on_job_button(run_button: QPushButton, cancel_button: QPushButton, running: bool) -> None:
    """Enable Cancel while a job runs and Run otherwise; keyboard focus on the one disabled goes to the other.

    Why: Run was disabled before Cancel was enabled, so Qt gave the focus to the next enabled widget (for Fuse the
    dock's hide button: a second Space hid the whole panel while the job ran).
    """
    on, off = (cancel_button, run_button) if running else (run_button, cancel_button)
    on.setEnabled(True)
    if off.window().focusWidget() is off:
        on.setFocus(Qt.OtherFocusReason)
    off.setEnabled(False)


def _luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB colour with channels in 0..1."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast_ratio(first, second) -> float:
    """WCAG contrast ratio of two sRGB colours (channels 0..1): 1 to 21."""
    a, b = sorted((_luminance(first), _luminance(second)), reverse=True)
    return (a + 0.05) / (b + 0.05)


_SUSPECT_RED = (0xE0 / 255, 0x53 / 255, 0x3D / 255)


def _theme_colours(viewer: Any) -> tuple:
    """The napari theme's (background, text) colours as sRGB 0..1, for the viewer's theme (dark when unknown)."""
    from napari.utils.theme import get_theme

    try:
        theme = get_theme(str(getattr(viewer, "theme", "dark")))
    except (ValueError, KeyError, TypeError):
        theme = get_theme("dark")
    return tuple(tuple(c / 255 for c in colour.as_rgb_tuple()[:3]) for colour in (theme.background, theme.text))


def suspect_colour(viewer: Any) -> str:
    """A red for the "SUSPECT result" text that reads at WCAG AA (4.5:1) on the viewer's theme background.

    Why: the fixed #e0533d had 4.03:1 on napari's dark background and 3.12:1 on the light one. It is mixed toward
    the theme's text colour (lighter on dark, darker on light) until it reaches 4.6:1, keeping it red.
    """
    background, text = _theme_colours(viewer)
    colour = _SUSPECT_RED
    for step in range(21):
        t = step / 20
        colour = tuple((1 - t) * r + t * x for r, x in zip(_SUSPECT_RED, text))
        if contrast_ratio(colour, background) >= 4.6:
            break
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in colour)


# ----------------------------------------------------------------------------------------------- register
class RegisterPanel(QWidget):
    """Pick fixed/moving layers and a preset; run ``medfuse.register`` in a worker with progress and Cancel."""

    def __init__(self, viewer: Any):
        super().__init__()
        self.viewer = viewer
        # Compare views (checkerboard, curtain) are displays of a pair, not images to register.
        self.fixed = LayerCombo(viewer, prefer=("MR", "CT"), skip=_is_compare)
        # Not a dose: registration refuses one (no anatomy); its planning CT is registered instead.
        self.moving = LayerCombo(viewer, prefer=FUNCTIONAL, default_index=1, skip=_is_compare, prefer_dose=False)
        self.kind = QComboBox()
        self.kind.addItems(KINDS)
        self.pair = QComboBox()
        self.pair.addItems(PAIRS)
        self.resample_box = QCheckBox("also resample onto the fixed grid")
        # A moving layer rotated/dragged by hand (or registered before) starts from where the viewer shows it.
        # Short: the longest line sets the dock's minimum width (434 px made napari wider than a 1920x1080 @2x
        # screen); the tooltip says the rest.
        self.start_box = QCheckBox("start from its placement in the viewer")
        self.start_box.setChecked(True)
        # Alt+N runs, Alt+A cancels: letters of neither the tabs (R, U, O), nor napari's menus (F, V, L, P, W, H),
        # nor its screenshot actions (Alt+C, Alt+S).
        self.run_button = QPushButton("Ru&n")
        self.cancel_button = QPushButton("C&ancel")
        self.cancel_button.setEnabled(False)
        self.save_button = QPushButton("Save transform…")
        self.save_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.level_progress = QProgressBar()
        self.level_progress.setFormat("level: %v / %m iterations")
        self.level_label = QLabel("")
        self.report_view = QPlainTextEdit()
        self.report_view.setReadOnly(True)
        self.report_view.setMaximumHeight(160)
        self.suspect_label = QLabel("")
        self._suspect = False  # whether the suspect label shows a suspect result (coloured for the theme)

        _tips({
            self.fixed: "Fixed layer: the reference the moving layer is aligned to (usually the MR or CT); it is "
                        "not changed.",
            self.moving: "Moving layer: the layer aligned onto the fixed one (usually the PET or SPECT); its "
                         "voxels are not changed, only where napari shows it.",
            self.kind: "rigid: rotation + translation (same patient, same day); affine: also scaling and shear; "
                       "deformable: also a smooth warp (shown as a new resampled layer).",
            self.pair: "Registration preset (metric, resolution levels, iterations) for the modality pair; "
                       "auto picks it from the layers' modalities.",
            self.resample_box: "Also add the moving layer resampled onto the fixed layer's voxel grid, as a new "
                               "layer (always done for deformable).",
            self.start_box: "Start from where the viewer shows the moving layer now (moved by hand or registered "
                            "before); otherwise from the scanners' coordinates.",
            self.run_button: "Register the moving layer onto the fixed one in the background (the viewer stays "
                             "usable).",
            self.cancel_button: "Stop the running registration; nothing is applied.",
            self.save_button: "Save the last result's transform (of the pair the button names) as an ITK file (.tfm, "
                              ".txt, .h5, .mat) for other tools or the medfuse CLI.",
            self.progress: "Whole registration, in %.",
            self.level_progress: "Iterations done at the current resolution level.",
            self.report_view: "Report of the last registration: its pair, metric before and after, iterations, "
                              "rotation and translation, and why a result is suspect.",
            self.level_label: "What the registration is doing (stage and resolution level), or how it ended.",
            self.suspect_label: "Whether the last registration's result is suspect (check it before use); the "
                                "report below says why.",
        })
        # What a screen reader says for controls with no text of their own (the "overall" label is not linked).
        _names({self.progress: "overall registration progress",
                self.level_progress: "iterations at the current resolution level",
                self.report_view: "registration report"})
        _readouts({self.level_label: "registration status", self.suspect_label: "registration result check"})
        _theme_follower(viewer, self._paint_suspect)
        form = QFormLayout()
        form.addRow("fixed", self.fixed)
        form.addRow("moving", self.moving)
        form.addRow("kind", self.kind)
        form.addRow("modality pair", self.pair)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.resample_box)
        lay.addWidget(self.start_box)
        lay.addLayout(buttons)
        lay.addWidget(QLabel("overall"))
        lay.addWidget(self.progress)
        lay.addWidget(self.level_label)
        lay.addWidget(self.level_progress)
        lay.addWidget(self.suspect_label)
        lay.addWidget(self.report_view)
        lay.addWidget(self.save_button)
        lay.addStretch(1)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.save_button.clicked.connect(self._save_dialog)
        self.worker = None
        self.token = None
        self.result = None
        self._iterations: Dict[str, List[int]] = {}
        self._from_viewer = False  # whether the last run started from the moving layer's placement
        self._job_layers: tuple = ()
        self._job_placements: tuple = ()
        self._named: tuple = ()  # the (fixed, moving) layers the report and Save transform… name
        self._shown: tuple = ("", "", "")  # the report, suspect text and its style before the running job
        viewer.layers.events.removed.connect(self._layers_removed)

    def _layers_removed(self, *_: Any) -> None:
        """Forget a finished registration once its fixed or moving layer is closed.

        Why: after the user closes one study and opens the next, the report of the old pair stayed on show and
        'Save transform…' wrote the old patient's transform, easily taken for the new pair's.
        """
        try:
            if self.worker is not None or self.result is None:
                return
            present = _open_layers(self.viewer)
            if all(any(layer is other for other in present) for layer in self._job_layers):
                return
            self.result = None
            self._name_pair(None)
            self.save_button.setEnabled(False)
            self.report_view.setPlainText("")
            self._show_suspect("", False)
            self.progress.setValue(0)
            self.level_progress.setValue(0)
            _set_readout(self.level_label, "the registered layers were closed")
        except RuntimeError:  # the widget was closed but the viewer still emits: stop listening
            self.viewer.layers.events.removed.disconnect(self._layers_removed)

    # -------------------------------------------------------------------- actions
    def run(self) -> None:
        """Start a registration of the moving layer onto the fixed one (returns at once)."""
        from medfuse.errors import MedfuseError
        from medfuse.progress import CancelToken

        if self.worker is not None:
            # The button is disabled meanwhile; a script or the console calling run() again orphaned the job
            # running (its Cancel reached only the new one).
            _notify_error("A registration is running. Fix: wait for it, or cancel it first.")
            return
        fixed_layer, moving_layer = self.fixed.layer(), self.moving.layer()
        if fixed_layer is None or moving_layer is None or fixed_layer is moving_layer:
            fix = _series_fix(self.viewer, "open two volumes and pick a fixed and a moving layer")
            _notify_error("Registration needs two different 3-D greyscale image layers (2-D, RGB and 4-D layers are "
                          f"not offered). Fix: {fix}.")
            return
        with read_once():  # a lazily loaded (dask) layer is read once, not once per use
            try:
                # The files' own grids: the same result as medfuse.register on the files (and the CLI).
                fixed = native_volume(fixed_layer)
                moving = native_volume(moving_layer)
                fixed_display = layer_to_volume(fixed_layer, registered=False)  # the fixed layer's data grid
                # None when the moving layer has no placement of its own: then the scanners' coordinates, as before.
                initial = viewer_alignment(fixed_layer, moving_layer) if self.start_box.isChecked() else None
                kind = self.kind.currentText()
                preset = None if self.pair.currentText() == "auto" else self.pair.currentText()
                self._iterations = self._stage_iterations(preset, fixed.modality, moving.modality)
                # The volumes are in mm; the result goes back to the moving layer in its own units.
                self._moving_units = mm_matrix(moving_layer)
            except MedfuseError as exc:
                _notify_error(_jobs.error_message(exc, "registration"))
                return
        _warn_unconverted_units(fixed_layer, moving_layer)
        self.token = CancelToken()
        relay = _jobs.ProgressRelay()
        relay.progressed.connect(self._on_progress)
        self._relay = relay  # keep it alive while the worker runs
        token = self.token
        want_resampled = self.resample_box.isChecked() or kind == "deformable"
        # Snapshot in the GUI thread: the layers themselves (they may be renamed meanwhile, or removed and their
        # names reused), the moving grid the transform refers to, and where the fixed layer is shown (a
        # registered fixed layer: its physical space is not the viewer's world).
        self._job_layers = (fixed_layer, moving_layer)
        # Where each was shown and what it held: the result is placed relative to the fixed layer as it was here.
        self._job_placements = (_placement_key(fixed_layer), _placement_key(moving_layer))
        self._moving_grid = layer_grid(moving_layer)
        self._fixed_world = world_matrix(fixed_layer)
        self._fixed_geometry = layer_geometry(fixed_layer)
        self._fixed_grid = grid_record(fixed_layer, layer_grid(fixed_layer))
        self._from_viewer = initial is not None
        share = 0.9 if want_resampled else 1.0  # registration's part of the overall bar

        def registering(fraction: float, message: str = "") -> None:
            relay(share * fraction, message)

        def job():
            import medfuse
            from medfuse.progress import check, report

            result = medfuse.register(fixed, moving, kind=kind, preset=preset, progress=registering, cancel=token,
                                      initial_transform=initial)
            if not want_resampled:
                return result, None
            report(relay, share, "resampling the moving layer onto the fixed grid")
            check(token, "registration")
            # On the fixed layer's own (display) grid, so the new layer shares its scale/translate/affine.
            resampled = medfuse.resample(moving, fixed_display, transform=result.transform)
            _prehash(resampled)
            return result, resampled

        self.progress.setValue(0)
        self.level_progress.setValue(0)
        # The last result's report and suspect flag, shown again if this run fails or is cancelled: its transform
        # stays what *Save transform…* writes, and a suspect one must not be saved with the warning gone.
        self._shown = (self.report_view.toPlainText(), self.suspect_label.text(), self._suspect)
        self.report_view.setPlainText("")
        self._show_suspect("", False)
        _focus_on_job_button(self.run_button, self.cancel_button, running=True)
        self.worker = _jobs.start(job, self._on_done, cancel=token)

    def cancel(self) -> None:
        """Ask the running registration to stop (it raises CancelledError at its next check)."""
        if self.token is not None and self.worker is not None:  # a finished job has nothing to stop
            self.token.cancel()
            _set_readout(self.level_label, "cancelling…")

    def save_transform(self, path: str) -> Optional[str]:
        """Save the last result's transform (ITK .tfm/.txt/.h5/.mat); returns the path or None after a notification.

        The transform is that of the pair the button and the report name (the last registration's layers), not of
        the pair the pickers show now.
        """
        from medfuse.errors import MedfuseError

        if self.result is None:
            _notify_error("There is no registration result to save. Fix: run a registration first.")
            return None
        try:
            return str(self.result.transform.save(path, overwrite=True))  # the dialog asked about overwriting
        except MedfuseError as exc:
            _notify_error(_jobs.error_message(exc, "saving the transform"))
            return None

    def _save_dialog(self) -> None:
        title = "Save transform"
        if self.result is not None and self._named:  # the result's pair (a new run may be under way on another)
            fixed, moving = self._named
            title = f"Save the transform of '{moving.name}' onto '{fixed.name}'"
        path, _ = QFileDialog.getSaveFileName(self, title, "transform.tfm", "ITK transform (*.tfm *.txt *.h5 *.mat)")
        if path:
            self.save_transform(path)

    # -------------------------------------------------------------------- worker callbacks
    @staticmethod
    def _stage_iterations(preset, fixed_modality, moving_modality) -> Dict[str, List[int]]:
        """Iteration budget per level of each stage, for the per-level bars (empty if the preset lacks it)."""
        from medfuse.registration.presets import get_preset

        p = get_preset(preset, fixed_modality, moving_modality)
        its = list(p.get("iterations", ()))
        out = {"rigid": its, "affine": its[-2:], "deformable": list(p.get("bspline_iterations", ()))}
        return {k: v for k, v in out.items() if v}

    def _on_progress(self, fraction: float, message: str) -> None:
        if _cancelling(self.token):
            return
        self.progress.setValue(int(round(fraction * 1000)))
        m = _LEVEL.match(message)
        if not m:
            _set_readout(self.level_label, message)
            return
        stage, level, n, it = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4) or 0)
        its = self._iterations.get(stage, [100])
        _set_readout(self.level_label, f"{stage}: resolution level {level} of {n}")
        self.level_progress.setMaximum(int(its[min(level, len(its)) - 1]))
        self.level_progress.setValue(min(it, self.level_progress.maximum()))

    def _show_suspect(self, text: str, suspect: bool) -> None:
        _set_readout(self.suspect_label, text)
        self._suspect = suspect
        self._paint_suspect()

    def _paint_suspect(self, *_: Any) -> None:
        """Colour a suspect result's text legibly on the theme now shown (called again when the theme changes)."""
        colour = suspect_colour(self.viewer) if self._suspect else None
        self.suspect_label.setStyleSheet(f"color: {colour}; font-weight: bold" if colour else "")

    def _on_done(self, outcome: "_jobs.Outcome") -> None:

        _focus_on_job_button(self.run_button, self.cancel_button, running=False)
        self.worker = None
        if _job_failed(outcome, self.level_label, "registration", self.token, words=self._layer_words):
            if self.result is not None:
                report_text, suspect_text, suspect = self._shown
                self.report_view.setPlainText(report_text)
                self._show_suspect(suspect_text, suspect)
                _set_readout(self.level_label, f"{self.level_label.text()}; the previous result is still shown")
                self._layers_removed()  # unless its layers were closed while this run went on
            return
        self.result, on_fixed = outcome.value
        self._name_pair(self._job_layers)
        try:
            self._apply(self.result, on_fixed)
            _set_readout(self.level_label, "done")  # not the last step's message ("resampling…") left standing
        except Exception as exc:  # noqa: BLE001 - e.g. the layer was deleted meanwhile
            moved = isinstance(exc, _InputMoved)
            _set_readout(self.level_label, "done; result not applied" + (": an input moved" if moved else ""))
            _notify_error(_jobs.error_message(exc, "applying the registration"))
        self.save_button.setEnabled(True)

    def _layer_words(self, message: str) -> str:
        """``message`` with medfuse's "fixed has ..." / "moving is ..." naming the job's layer in that role."""
        roles = dict(zip(("fixed", "moving"), self._job_layers))
        return re.sub(r"^(fixed|moving) (has|is) ",
                      lambda m: f"the {m.group(1)} layer '{roles[m.group(1)].name}' {m.group(2)} "
                      if m.group(1) in roles else m.group(0), message)

    def _name_pair(self, pair: Optional[tuple]) -> None:
        """Name the result's pair in the report and on *Save transform…*, following renames (None: no result).

        Why: after the pickers were switched to another pair (during or after a run), the report and the button
        still held the previous pair's transform with nothing saying so.
        """
        for layer in self._named:
            try:
                layer.events.name.disconnect(self._show_pair)
            except (TypeError, RuntimeError, ValueError):
                pass
        self._named = tuple(pair or ())
        for layer in self._named:
            layer.events.name.connect(self._show_pair)
        self._show_pair()

    def _show_pair(self, *_: Any) -> None:
        try:
            if not self._named:
                self.save_button.setText("Save transform…")
                return
            fixed, moving = self._named
            self.save_button.setText(f"Save transform of {_short(moving.name)} onto {_short(fixed.name)}…"
                                     .replace("&", "&&"))  # a name's "&" shown, not taken as a mnemonic
            shown = self.report_view.toPlainText()
            if shown and self.worker is None:  # the result's report (a new run cleared it), its first line renamed
                self.report_view.setPlainText("\n".join([_pair_line(fixed, moving), *shown.split("\n")[1:]]))
        except RuntimeError:  # the widget was closed but the layers still emit: stop listening
            for layer in self._named:
                layer.events.name.disconnect(self._show_pair)

    def _apply(self, result, on_fixed) -> None:
        rep = result.report
        fixed, moving = self._job_layers
        lines = [_pair_line(fixed, moving),
                 f"kind: {rep.kind}   preset: {rep.preset}   time: {rep.seconds:.1f} s",
                 f"metric (lower is better): before {_fmt(rep.metric_before)}, after {_fmt(rep.metric_after)}",
                 f"iterations per level: {rep.iterations_per_level}",
                 f"stop reason: {rep.stop_reason}"]
        if self._from_viewer:
            won = rep.initialisation.startswith("initial")
            lines.append(f"start: the moving layer's placement in the viewer (metric there {_fmt(rep.metric_initial)})"
                         + ("" if won else "; not used, a start from the files' coordinates scored better"))
        if rep.rotation_deg is not None:
            lines.append(f"rotation {rep.rotation_deg:.2f}°, translation {rep.translation_mm:.2f} mm")
        lines += [f"suspect: {r}" for r in rep.suspect_reasons]
        self.report_view.setPlainText("\n".join(lines))
        self._show_suspect("⚠ SUSPECT result: check before use" if rep.suspect else "result not suspect",
                           bool(rep.suspect))
        if rep.suspect:
            from napari.utils.notifications import show_warning

            show_warning("Registration result is suspect: " + "; ".join(rep.suspect_reasons))
        self.progress.setValue(1000)

        self._check_inputs()
        linear = result.transform if result.transform.is_linear else result.linear_transform
        # transform: fixed point -> moving point; the layer needs moving physical -> world, and the world is
        # the fixed layer's physical space moved by its own registration (identity when it has none).
        # napari applies the layer's own rotate/shear before its affine: undo them so the layer lands there.
        grid = self._moving_grid  # the moving grid as registered
        placed = layer_matrix(moving.scale, moving.translate, rotate=moving.rotate, shear=moving.shear)
        # The registration is in mm (world_matrix, the volumes): the affine napari applies is in the layer's units.
        units = self._moving_units
        moving.affine = (np.linalg.inv(units) @ lps_to_world(self._fixed_world @ np.linalg.inv(linear.matrix))
                         @ units @ grid @ np.linalg.inv(placed))
        moving.metadata.setdefault("medfuse", {})["registration"] = {
            "to": fixed.name, "fixed_to_moving_lps": np.asarray(linear.matrix).tolist(), **rep.to_dict()}
        from ._writer import identity_sources

        # The fixed layer's files name the patient where the moving file may not: its sidecar blanks them too.
        mine = moving.metadata["medfuse"]
        mine["identity_sources"] = list(dict.fromkeys([*identity_sources(mine), *identity_sources(meta(fixed))]))
        # The grid the affine is placed on: a layer whose affine held its voxel spacing (another reader) holds the
        # registration there now too, and must not be taken for a grid with no placement next time.
        moving.metadata["medfuse"]["grid"] = grid_record(moving, grid)
        if on_fixed is not None:
            # A deformable field is not an affine: it is shown resampled (the layer above keeps the linear part).
            self._add_resampled(on_fixed, moving, fixed)

    def _check_inputs(self) -> None:
        """Raise when the fixed or moving layer was removed, moved or changed while registering (nothing applied).

        The layers by identity: a rename keeps them, and a new layer under a removed layer's name is not them. A
        moved layer: the result is placed relative to the fixed layer as the run found it; the sample MR moved by
        15 mm while its PET registered left the PET 15 mm off the MR as shown, with "done" and no word.
        """
        present = _open_layers(self.viewer)
        for role, layer in zip(("fixed", "moving"), self._job_layers):
            if not any(layer is other for other in present):
                raise InvalidInputError(f"the {role} layer was removed while registering, so the result was not "
                                        f"applied",
                                        fix="keep both layers open until the registration ends and run it again "
                                            "(the transform can still be saved with 'Save transform…')")
        moved = [(role, layer) for role, layer, key in zip(("fixed", "moving"), self._job_layers,
                                                           self._job_placements) if _placement_key(layer) != key]
        if moved:
            role, layer = moved[0]
            raise _InputMoved(f"the {role} layer '{layer.name}' was moved or changed while registering (a hand move, "
                              f"a translate or affine set, new voxels), so the result was not applied: it would "
                              f"place the moving layer where the fixed layer was when the run started",
                              fix="run the registration again now (the transform between the files can still be "
                                  "saved with 'Save transform…')")

    def _add_resampled(self, volume, moving, fixed) -> None:
        from ._layers import file_order

        md = dict(meta(moving))
        report = md.pop("registration", None)
        if report:  # the registration that made these voxels (metric, suspect flag) goes into a saved file's sidecar
            md["registration"] = {**report, "resampled_onto": fixed.name}
        md["provenance"] = dict(volume.provenance)
        # The voxels are on the fixed layer's display grid now: the moving file's affine no longer describes them.
        # The fixed file's affine does (saved in its voxel order: 'pet on ct' was saved (40, 192, 160) for a
        # (160, 192, 40) CT); an oblique fixed file's display grid is the grid itself.
        md["affine"] = np.asarray(volume.affine).tolist()
        md["display_grid"] = "native"
        md.update(file_order(fixed))
        md["grid"] = self._fixed_grid  # the fixed layer's grid (its affine may hold the spacing: another reader)
        self.viewer.add_image(
            volume.array, name=f"{moving.name} on {fixed.name}", **self._fixed_geometry, colormap=moving.colormap,
            contrast_limits=moving.contrast_limits, blending=moving.blending, opacity=moving.opacity,
            metadata={"medfuse": md})


def _pair_line(fixed: Any, moving: Any) -> str:
    """The report's first line: which layers the result (and *Save transform…*) belongs to."""
    return f"'{moving.name}' (moving) onto '{fixed.name}' (fixed)"


def _short(name: str, n: int = 18) -> str:
    """A layer name cut to ``n`` characters for a button (the dock stays narrow)."""
    return f"'{name}'" if len(name) <= n else f"'{name[:n - 1]}…'"


def _warn_unconverted_units(*layers: Any) -> None:
    """Warn when napari draws the layers without converting their units (pixel beside µm, say).

    Why: napari converts only between length units; beside napari's default unit (pixel: medfuse's own layers,
    taken as mm) it draws a layer in µm in raw numbers, 1000 times too large, so a correct result looks wrong.
    """
    pixel = [l for l in layers if all(str(u) in ("pixel", "px", "") for u in getattr(l, "units", ()) or ())]
    other = [l for l in layers if all(l is not p for p in pixel) and not np.allclose(mm_matrix(l), np.eye(4))]
    if pixel and other:
        _notify_warning(f"'{other[0].name}' has other axis units than '{pixel[0].name}' (pixel, taken as mm), so "
                        f"napari draws them without converting; medfuse computes in mm and the result is right in "
                        f"mm. Fix: give '{pixel[0].name}' the units mm in napari (layer.units = ('mm', 'mm', 'mm') "
                        f"in the console) to see them together.")


def _tips(tips: Dict[QWidget, str]) -> None:
    """Tooltips, also given as accessible descriptions (what a screen reader reads after the name)."""
    for control, text in tips.items():
        control.setToolTip(text)
        control.setAccessibleDescription(text)


def _names(names: Dict[QWidget, str]) -> None:
    for control, name in names.items():
        control.setAccessibleName(name)


def _theme_follower(viewer: Any, slot: Callable[..., None]) -> None:
    """Call ``slot`` when the viewer's theme changes, until the widget is gone (napari still emits then)."""
    emitter = getattr(getattr(viewer, "events", None), "theme", None)
    if emitter is None:
        return

    def follow(*args: Any) -> None:
        try:
            slot(*args)
        except RuntimeError:  # the widget was closed but the viewer still emits: stop listening
            emitter.disconnect(follow)

    emitter.connect(follow)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


# ----------------------------------------------------------------------------------------------- fuse
def available_methods() -> List[str]:
    """Fusion methods that can run here: ``medfuse.fusion.available_methods()`` (or the classical ones), without
    ``network`` when torch or safetensors is not installed (``medfuse[napari]`` alone): it was offered, as the
    default, and failed with "needs the optional package 'torch'"."""
    try:
        from medfuse.fusion import available_methods as _available
    except ImportError:
        return list(CLASSICAL)
    try:
        methods = list(_available())
    except Exception:  # noqa: BLE001 - a broken optional backend must not break the widget
        return list(CLASSICAL)
    return methods if _network_installed() else [m for m in methods if m != "network"]


def _network_installed() -> bool:
    """Whether the network's packages are installed (looked up, not imported: torch takes seconds)."""
    import importlib.util

    for name in ("torch", "safetensors"):
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):  # a module set to None in sys.modules (blocked), or a broken one
            return False
    return True


class FusePanel(QWidget):
    """Fuse 2-3 layers with ``medfuse.fuse`` on the first layer's grid, in a worker with progress and Cancel.

    3-D greyscale layers are resampled onto the base grid where napari shows them; 2-D layers (grey, or one
    RGB beside grey ones) are fused pixel by pixel and must have the same size.
    """

    def __init__(self, viewer: Any):
        super().__init__()
        self.viewer = viewer
        self.inputs = [LayerCombo(viewer, prefer=("MR", "CT"), allow_2d=True, skip=_is_compare),
                       LayerCombo(viewer, prefer=FUNCTIONAL, allow_2d=True, default_index=1, skip=_is_compare),
                       LayerCombo(viewer, allow_none=True, allow_2d=True, skip=_is_compare)]
        self.inputs[2].setCurrentText(LayerCombo.NONE)
        self.method = QComboBox()
        methods = available_methods()
        self.method.addItems(methods)
        if "network" not in methods:
            self.method.setToolTip("The fusion network is not available here (install medfuse[ml]); "
                                   "classical methods are offered.")
        # Alt+E fuses, Alt+A cancels (F is napari's File menu, U the Fuse tab's own key, S a napari screenshot).
        self.run_button = QPushButton("Fus&e")
        self.cancel_button = QPushButton("C&ancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.busy = self.progress  # older name
        self.status = QLabel("")
        _tips({
            self.inputs[0]: "Base layer: the fused image is made on its voxel grid and placed where it is shown.",
            self.inputs[1]: "Second layer, resampled onto the base grid where napari shows it (a registration in "
                            "the viewer counts).",
            self.inputs[2]: "Optional third layer, resampled like the second.",
            self.run_button: "Fuse the chosen layers in the background; the result is added as a new layer.",
            self.cancel_button: "Stop the running fusion; no layer is added.",
            self.progress: "Fusion progress, in %.",
            self.status: "What the fusion is doing, or how it ended (the layer added, or why not).",
        })
        _names({self.progress: "fusion progress"})
        _readouts({self.status: "fusion status"})
        if not self.method.toolTip():
            self.method.setToolTip("Fusion rule: network (trained model) or a classical rule (mean, max, laplacian "
                                   "pyramid, wavelet, guided filter).")
        form = QFormLayout()
        form.addRow("base (grid)", self.inputs[0])
        form.addRow("second", self.inputs[1])
        form.addRow("third (optional)", self.inputs[2])
        form.addRow("method", self.method)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.worker = None
        self.token = None
        self._picked: List[Any] = []  # the pickers' layers before a removal
        self._constant: List[str] = []  # layers of the running fusion already warned of as constant
        # After the pickers' own handlers (connected first): they have picked again by then.
        viewer.layers.events.removing.connect(self._before_removal)
        viewer.layers.events.removed.connect(self._after_removal)

    def _before_removal(self, *_: Any) -> None:
        try:
            self._picked = [c.layer() for c in self.inputs]
        except RuntimeError:  # the widget was closed but the viewer still emits: stop listening
            self._stop_listening()

    def _after_removal(self, *_: Any) -> None:
        """Keep the pickers on different layers after one's layer was closed.

        Why: a picker whose layer is closed picks again by itself, and fell on a layer another picker holds (after
        the PET of a running fusion was closed: ['mr_t1', 'mr_t1', None]; with a CT open too, the second and third
        both on the CT). Such a picker takes a layer no other picker holds; when none is left, an optional picker
        holding the same layer goes back to (none), and otherwise the status says what to pick.
        """
        try:
            self._separate_pickers()
        except RuntimeError:  # the widget was closed but the viewer still emits: stop listening
            self._stop_listening()

    def _separate_pickers(self) -> None:
        present = _open_layers(self.viewer)
        lost = [n for n, was in enumerate(self._picked) if was is not None and not any(was is l for l in present)]
        self._picked = []
        for n in lost:
            combo = self.inputs[n]
            others = [c.currentText() for m, c in enumerate(self.inputs) if m != n]
            if combo.currentText() not in others:
                continue
            names = [combo.itemText(i) for i in range(combo.count())]
            free = [t for t in names if t != LayerCombo.NONE and t not in others]
            if free:
                combo.setCurrentText(free[0])  # not the user's pick: the combo's preference may still apply
        for n, combo in enumerate(self.inputs):
            others = [c.currentText() for m, c in enumerate(self.inputs) if m != n]
            if combo.currentText() in others and combo.findText(LayerCombo.NONE) >= 0:
                combo.setCurrentText(LayerCombo.NONE)
        chosen = [c.currentText() for c in self.inputs if c.currentText() not in ("", LayerCombo.NONE)]
        if len(set(chosen)) != len(chosen) and self.worker is None:
            _set_readout(self.status, "pick 2 or 3 different layers to fuse (an input was closed)")

    def _stop_listening(self) -> None:
        for emitter, callback in ((self.viewer.layers.events.removing, self._before_removal),
                                  (self.viewer.layers.events.removed, self._after_removal)):
            try:
                emitter.disconnect(callback)
            except (TypeError, RuntimeError, ValueError):
                pass

    def run(self) -> None:
        """Start fusing the chosen layers (returns at once; the fused layer is added when done)."""
        import medfuse.volume
        from medfuse.errors import MedfuseError
        from medfuse.progress import CancelToken

        if self.worker is not None:  # as RegisterPanel.run: a second call orphaned the job running
            _notify_error("A fusion is running. Fix: wait for it, or cancel it first.")
            return
        # A new attempt: the last run's "added 'fused (mean)'" at 100 % must not stand beside a refusal.
        self.progress.setValue(0)
        _set_readout(self.status, "")
        chosen = [c.layer() for c in self.inputs]
        chosen = [l for l in chosen if l is not None]
        if len(chosen) < 2 or len({id(l) for l in chosen}) != len(chosen):
            fix = _series_fix(self.viewer, "pick them in the Fuse panel")
            _notify_error("Fusion needs 2 or 3 different image layers (2-D images or 3-D volumes). "
                          f"Fix: {fix}.")
            return
        method = self.method.currentText()
        names = [l.name for l in chosen]
        base = chosen[0]
        self._base = dict(name=base.name, **layer_geometry(base))
        flat = [l.ndim == 2 for l in chosen]
        if any(flat) and not all(flat):
            _notify_error("Fusion cannot mix 2-D images and 3-D volumes. Fix: pick only 2-D or only 3-D layers.")
            return
        colour = [l.name for l in chosen if l.rgb]
        if len(colour) > 1:
            # Why here: medfuse.fuse sees two (H, W, 3) arrays as thin volumes and would filter across R, G, B.
            _notify_error(f"Fusion takes one colour (RGB) layer at most, beside grey ones; '{colour[0]}' and "
                          f"'{colour[1]}' are both colour. Fix: pick the grey image (e.g. the MRI) with one of them, "
                          f"or make one grey first (right-click it in the layer list › Split RGB).")
            return
        moved = [l.name for l in chosen[1:] if all(flat) and not _same_placement(l, base)]
        if moved:
            # 2-D layers are fused pixel by pixel, with no resampling: they must sit where the base sits.
            _notify_error(f"2-D layer '{moved[0]}' is placed differently from '{base.name}' in napari (scale, "
                          f"translate, rotate, shear or affine), and 2-D layers are fused pixel by pixel. Fix: give "
                          f"it the base layer's placement, or fuse 3-D volumes, which are resampled.")
            return
        with read_once():  # a lazily loaded (dask) layer is read once, not once per use
            sizes = {l.name: tuple(layer_array(l).shape[:2]) for l in chosen} if all(flat) else {}
            other = [n for n, size in sizes.items() if size != sizes[base.name]]
            if other:
                size = " x ".join(map(str, sizes[other[0]]))
                _notify_error(f"2-D layer '{other[0]}' is {size} pixels and '{base.name}' "
                              f"{' x '.join(map(str, sizes[base.name]))}; 2-D layers are fused pixel by pixel. Fix: "
                              f"pick 2-D images of one size (such as an aligned pair), or fuse 3-D volumes, which are "
                              f"resampled.")
                return
            try:  # snapshot the layers in the GUI thread; the worker only computes
                if all(flat):
                    # 2-D: medfuse.fuse on arrays (one RGB beside grey gives RGB); alpha is not an intensity.
                    placed = [layer_array(l)[..., :3] if l.rgb else layer_array(l) for l in chosen]
                else:
                    placed = [(layer_to_volume(l, registered=False), world_matrix(l)) for l in chosen]
                own = placed if all(flat) else [vol.array for vol, _ in placed]
                for layer, arr in zip(chosen, own):
                    # On the layer's own voxels: after resampling onto the base, the count was of the base's grid.
                    medfuse.volume.require_finite(arr, f"layer '{layer.name}'", before="fusing")
            except MedfuseError as exc:
                _notify_error(_jobs.error_message(exc, "fusion"))
                return
            self._constant = _warn_constant_layers(chosen, own)
            if not all(flat) and not self._check_overlap(chosen, placed):
                return
        if not all(flat):
            _warn_unconverted_units(*chosen)
        self.token = CancelToken()
        token = self.token
        relay = _jobs.ProgressRelay()
        relay.progressed.connect(self._on_progress)
        self._relay = relay  # keep it alive while the worker runs
        self._job_layers = tuple(chosen)  # by identity: renamed inputs are still theirs, a new study's are not
        # Where each input was and what it held: moved meanwhile (a registration ending, a hand drag), the
        # result would show the old alignment as if it were the current one.
        self._job_placements = tuple(_placement_key(l) for l in chosen)
        flat2d = all(flat)
        if not flat2d:
            self._base["grid"] = grid_record(base, layer_grid(base))

        def job():
            import medfuse
            from medfuse.progress import check, report

            if flat2d:
                fused = medfuse.fuse(*placed, method=method, progress=relay, cancel=token)
                _prehash(fused)
                return fused, names, method
            # Layers are fused where napari shows them (registrations included), on the first layer's grid.
            ref, ref_world = placed[0]
            others = []
            for n, (vol, world) in enumerate(placed[1:], start=1):
                report(relay, 0.2 * (n - 1) / (len(placed) - 1), f"resampling {names[n]} onto {names[0]}")
                check(token, "fusion")
                others.append(resample_between(vol, world, ref, ref_world))
            check(token, "fusion")

            def fusing(fraction: float, message: str = "") -> None:  # fusion is the last 80 %
                relay(0.2 + 0.8 * fraction, message or "fusing")

            fused = medfuse.fuse(ref, *others, method=method, progress=fusing, cancel=token)
            _prehash(fused)
            return fused, names, method

        _focus_on_job_button(self.run_button, self.cancel_button, running=True)
        self.progress.setValue(0)
        _set_readout(self.status, f"fusing {', '.join(names)} ({method})…")
        self.worker = _jobs.start(job, self._on_done, cancel=token)

    def _check_overlap(self, chosen, placed) -> bool:
        """Refuse a layer outside the base's field of view; warn on little overlap or an empty (all-0) layer.

        Why: resampled where it has no voxels a layer is only background, so the "fusion" was the base alone,
        with no word. False when refused (a notification was shown).
        """
        base = chosen[0].name
        ref, ref_world = placed[0]
        for layer, (vol, world) in zip(chosen[1:], placed[1:]):
            share = coverage_between(vol, world, ref, ref_world)
            if share <= 0.0:
                _set_readout(self.status, "not fused")
                _notify_error(f"'{layer.name}' does not overlap the base '{base}' where napari shows them, so the "
                              f"fused image would be the base alone. Fix: align '{layer.name}' onto '{base}' in the "
                              f"Register tab first (or check that the right layers are picked).")
                return False
            if share < 0.2:
                _notify_warning(f"'{layer.name}' covers only {share:.0%} of the base '{base}' where napari shows "
                                f"them: outside it the fused image is the base alone. Check the alignment (Register "
                                f"tab) if that is not expected.")
        return True

    def cancel(self) -> None:
        """Ask the running fusion to stop (it raises CancelledError at its next check)."""
        if self.token is not None and self.worker is not None:  # a finished job has nothing to stop
            self.token.cancel()
            _set_readout(self.status, "cancelling…")

    def _on_progress(self, fraction: float, message: str) -> None:
        if _cancelling(self.token):
            return
        # A classical rule reports only its start and end: a bar standing still at 20 % for half a minute looked
        # hung. It shows as busy (Qt's moving bar) from "fusing (rule)" until the next report.
        busy = fraction < 1.0 and bool(re.match(r"fusing \((?!network)", message or ""))
        self.progress.setRange(0, 0 if busy else 1000)
        if not busy:
            self.progress.setValue(int(round(fraction * 1000)))
        if message:
            _set_readout(self.status, message)

    def _on_done(self, outcome: "_jobs.Outcome") -> None:
        from medfuse.display import percentile_limits

        self.progress.setRange(0, 1000)  # out of the busy state of a classical rule, whatever the outcome

        from ._layers import file_order

        _focus_on_job_button(self.run_button, self.cancel_button, running=False)
        self.worker = None
        if _job_failed(outcome, self.status, "fusion", self.token):
            return
        fused, names, method = outcome.value
        present = _open_layers(self.viewer)
        gone = [(role, name) for role, layer, name in zip(("base", "second", "third"), self._job_layers, names)
                if not any(layer is other for other in present)]
        if gone:
            # The user closed the study meanwhile (maybe opened the next patient): a fused image of layers no
            # longer open, on a grid no longer shown, must not appear among other layers.
            _set_readout(self.status, "failed")
            _notify_error(f"The fusion result was not added: the {gone[0][0]} layer, '{gone[0][1]}', was removed "
                          f"while fusing. Fix: keep the input layers open until the fusion ends and run it again.")
            return
        # The inputs' names now: one renamed while fusing is recorded as the viewer shows it.
        names = [layer.name for layer in self._job_layers]
        moved = [layer for layer, key in zip(self._job_layers, getattr(self, "_job_placements", ()))
                 if _placement_key(layer) != key]
        if moved:
            _set_readout(self.status, "not added: an input moved")
            _notify_error(f"The fusion result was not added: '{moved[0].name}' was moved or changed while fusing "
                          f"(a registration ending or a hand move), so the result shows the old alignment. Fix: "
                          f"run the fusion again now.")
            return
        arr = fused.array if hasattr(fused, "array") else np.asarray(fused)
        prov = dict(getattr(fused, "provenance", {}) or {})
        prov["fusion"] = {**dict(prov.get("fusion", {}) or {}), "method": method, "inputs": names,
                          "grid": names[0]}
        unit = getattr(fused, "unit", "arbitrary")
        geometry = {k: v for k, v in self._base.items() if k not in ("name", "grid")}
        rgb = arr.ndim == 3 and arr.shape[-1] == 3 and len(geometry["scale"]) == 2
        display = {"rgb": True} if rgb else {"colormap": "gray", "contrast_limits": percentile_limits(arr)}
        added = self.viewer.add_image(
            arr, name=f"fused ({method})", **geometry, **display,
            metadata={"medfuse": {"modality": getattr(fused, "modality", "unknown"), "unit": unit,
                                  "provenance": prov,
                                  # The files that name the patient of every input (a registered layer's fixed
                                  # series too), for the sidecar's blanking: never written themselves.
                                  "identity_sources": _identity_sources_of(self._job_layers),
                                  **({"grid": self._base["grid"]} if "grid" in self._base else {}),
                                  # Saved in the base file's voxel order, as `medfuse fuse` writes it (not S, P, L).
                                  **(file_order(self._job_layers[0]) if "grid" in self._base else {})}})
        self.progress.setValue(1000)
        _set_readout(self.status, f"added '{added.name}'")  # napari makes a repeated name unique: 'fused (mean) [1]'
        # What medfuse said about the inputs or the fusion (a pair from two frames of reference fused without a
        # registration, anisotropic voxels): in the GUI, not only in a log the radiologist never sees.
        for note in prov.get("warnings", []) or []:
            note = _input_names(note, names)
            if any(note.startswith(f"'{n}' is constant") for n in self._constant):
                continue  # said when the fusion started, of the layer's own voxels
            _notify_warning(_jobs.napari_words(f"fused ({method}): {note}"))


def _warn_constant_layers(layers: List[Any], arrays: List[np.ndarray]) -> List[str]:
    """Warn of each layer to fuse whose own voxels hold one value (all 0: no signal); returns their names.

    The base layer too, and 2-D layers: an all-0 base was fused without a word (the result was the other layer).
    """
    from medfuse._checks import constant_value

    flat = []
    for k, (layer, arr) in enumerate(zip(layers, arrays)):
        value = constant_value(np.asarray(arr))
        if value == 0:
            rest = (f"the base '{layers[0].name}'" if len(layers) == 2 and k == 1 else
                    "the other layer" if len(layers) == 2 else "the other layers")
            # "will be the base alone" was not so for the mean rule, which halves it.
            _notify_warning(f"'{layer.name}' holds no signal (every voxel is 0): only {rest} will contribute to the "
                            "fused image (darker with rules that average, such as mean).")
            flat.append(layer.name)
        elif value is not None:
            _notify_warning(f"'{layer.name}' is constant (every voxel is {value:g}): it holds no image, and the "
                            f"fusion takes it as a flat level beside the other layers. Check that the intended "
                            f"layer is picked.")
            flat.append(layer.name)
    return flat


def _identity_sources_of(layers: List[Any]) -> List[str]:
    """Every file whose patient identifiers the layers' sidecars blank (see ``_writer.identity_sources``)."""
    from ._writer import identity_sources

    return list(dict.fromkeys(src for layer in layers for src in identity_sources(meta(layer))))


def _input_names(note: str, names: List[str]) -> str:
    """A fusion note's "input 2: ..." / "volume 2 is ..." naming the layer fused as that input instead."""
    def name(m: "re.Match[str]") -> str:
        k = int(m.group(2)) - 1
        return f"'{names[k]}'{m.group(3)}" if 0 <= k < len(names) else m.group(0)

    return re.sub(r"^(input|volume) (\d+)(:? )", name, note)


def make_widget(napari_viewer: Any) -> MedfuseWidget:
    """npe2 widget command."""
    return MedfuseWidget(napari_viewer)


__all__ = ["MedfuseWidget", "RegisterPanel", "FusePanel", "OverlayPanel", "available_methods", "make_widget"]


def _prehash(result) -> None:
    """Hash the input files of a layer about to be made, in the worker: saving it then does not hash them on the
    GUI thread (see :func:`._writer.prehash_inputs`). Best effort: a file that cannot be hashed is hashed at save."""
    from ._writer import prehash_inputs

    prov = getattr(result, "provenance", None)
    if isinstance(prov, dict):
        prehash_inputs({"provenance": prov})
