"""Flicker/compare visibility, fusing layers that miss the base, compare views whose layer is
closed, patient identifiers in reader messages and layer names, napari-worded fixes, stale Fuse status."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from medfuse_napari._overlay import OverlayPanel  # noqa: E402
from medfuse_napari._widget import MedfuseWidget  # noqa: E402

pytestmark = pytest.mark.napari


def _blob(shape=(20, 24, 28), seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros(shape, np.float32)
    a[4:-4, 5:-5, 6:-6] = 100 + 10 * rng.random((shape[0] - 8, shape[1] - 10, shape[2] - 12))
    return a


@pytest.fixture
def pair(make_napari_viewer):
    """Two small overlapping volumes and a third one, in a viewer with the medfuse widget."""
    viewer = make_napari_viewer()
    for name, seed in (("mr", 0), ("pet", 1), ("spect", 2)):
        viewer.add_image(_blob(seed=seed), name=name, scale=(2.0, 2.0, 2.0))
    widget = MedfuseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="medfuse")
    return viewer, widget


def _capture(monkeypatch, *kinds):
    shown = {k: [] for k in kinds}
    for k in kinds:
        monkeypatch.setattr(f"napari.utils.notifications.show_{k}", shown[k].append)
    return shown


# ------------------------------------------------------------------------------------------ 1. flicker
def _flickering(qtbot, pair):
    """MR under PET with the flicker on, caught in its phase where the PET is hidden."""
    viewer, widget = pair
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    pet = viewer.layers["pet"]
    op.flicker.setChecked(True)
    qtbot.waitUntil(lambda: not pet.visible, timeout=3000)
    return viewer, op, pet


def test_flicker_then_checkerboard_then_off_leaves_the_overlay_visible(qtbot, pair):
    viewer, op, pet = _flickering(qtbot, pair)
    op.compare.setCurrentText("checkerboard")
    op.flicker.setChecked(False)
    op.compare.setCurrentText("overlay")
    assert pet.visible and viewer.layers["mr"].visible


def test_flicker_then_another_overlay_restores_the_first(qtbot, pair):
    viewer, op, pet = _flickering(qtbot, pair)
    op.overlay.set_layer("spect")
    op.flicker.setChecked(False)
    assert pet.visible and viewer.layers["spect"].visible


# ------------------------------------------------------------------------------------------ 2. overlap
def _fuse(qtbot, widget, first, second):
    fp = widget.fuse_panel
    fp.inputs[0].set_layer(first)
    fp.inputs[1].set_layer(second)
    fp.method.setCurrentText("mean")
    fp.run()
    qtbot.waitUntil(lambda: fp.worker is None, timeout=60_000)
    return fp


def test_fusing_a_layer_outside_the_base_is_refused_by_name(qtbot, pair, monkeypatch):
    viewer, widget = pair
    shown = _capture(monkeypatch, "error", "warning")
    viewer.layers["pet"].translate = (400.0, 400.0, 400.0)  # dragged away / another coordinate origin
    n = len(viewer.layers)
    _fuse(qtbot, widget, "mr", "pet")
    assert len(viewer.layers) == n, "nothing fused"
    assert len(shown["error"]) == 1 and "'pet'" in shown["error"][0] and "Register tab" in shown["error"][0]
    assert "/" not in shown["error"][0]  # the layer's name, not a path


def test_fusing_a_layer_that_barely_overlaps_is_warned(qtbot, pair, monkeypatch):
    viewer, widget = pair
    shown = _capture(monkeypatch, "error", "warning")
    viewer.layers["pet"].translate = (36.0, 0.0, 0.0)  # 40 mm deep: 4 of 40 mm overlap
    _fuse(qtbot, widget, "mr", "pet")
    assert viewer.layers[-1].name == "fused (mean)" and not shown["error"]
    assert any("'pet' covers only 10%" in m and "'mr'" in m for m in shown["warning"]), shown


def test_fusing_an_all_zero_layer_is_warned(qtbot, pair, monkeypatch):
    viewer, widget = pair
    viewer.add_image(np.zeros((20, 24, 28), np.float32), name="empty", scale=(2.0, 2.0, 2.0))
    shown = _capture(monkeypatch, "error", "warning")
    _fuse(qtbot, widget, "mr", "empty")
    assert any("'empty' holds no signal" in m for m in shown["warning"]), shown


def test_an_all_zero_base_layer_is_warned_too(qtbot, pair, monkeypatch):
    """Only the second layer was looked at: an empty base gave the other layer alone, without a word."""
    viewer, widget = pair
    viewer.add_image(np.zeros((20, 24, 28), np.float32), name="empty", scale=(2.0, 2.0, 2.0))
    shown = _capture(monkeypatch, "error", "warning")
    _fuse(qtbot, widget, "empty", "mr")
    assert [m for m in shown["warning"] if "holds no signal" in m] == [
        "'empty' holds no signal (every voxel is 0): only the other layer will contribute to the fused image "
        "(darker with rules that average, such as mean)."], shown


def test_a_classical_rule_shows_a_busy_bar_while_it_runs(pair):
    """It reports only its start and end: the bar stood at 20 % for the whole of a gff run."""
    _, widget = pair
    fp = widget.fuse_panel
    fp._on_progress(0.1, "resampling pet onto mr")
    assert (fp.progress.maximum(), fp.progress.value()) == (1000, 100)
    fp._on_progress(0.2, "fusing (gff)")
    assert fp.progress.maximum() == 0  # Qt's busy bar
    fp._on_progress(1.0, "fused")
    assert (fp.progress.maximum(), fp.progress.value()) == (1000, 1000)
    fp._on_progress(0.36, "network fusion: features")
    assert fp.progress.maximum() == 1000


# ------------------------------------------------------------------------------------------ 3. compare + close
@pytest.mark.parametrize("mode", ["curtain", "checkerboard"])
def test_closing_a_compared_layer_ends_the_compare_view(qtbot, pair, monkeypatch, mode):
    viewer, widget = pair
    shown = _capture(monkeypatch, "info")
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    op.compare.setCurrentText(mode)
    assert "compare: overlay" in [l.name for l in viewer.layers]
    viewer.layers.remove("pet")
    qtbot.wait(400)  # past the coalesced rebuild timer: no compare view of 'spect' springs up
    assert op.compare.currentText() == "overlay"
    assert not [l.name for l in viewer.layers if l.name.startswith("compare:")]
    assert viewer.layers["mr"].visible and viewer.layers["spect"].visible
    assert any("'pet'" in m and "ended" in m for m in shown["info"]), shown


# ------------------------------------------------------------------------------------------ 4. identifiers
@pytest.fixture
def named_after_patient(samples_dir, tmp_path):
    """The sample PET as a PACS export folder named after the patient, and a copy with a damaged slice."""
    pydicom = pytest.importorskip("pydicom")
    good, bad = tmp_path / "MRN998877_DOE", tmp_path / "MRN998877_DOE_bad"
    good.mkdir()
    for f in sorted((samples_dir / "pet").iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.SeriesDescription = "DOE^JOHN", "MRN998877", "DOE JOHN FDG"
        ds.save_as(good / f.name)
    shutil.copytree(good, bad)
    damaged = sorted(bad.iterdir())[len(list(bad.iterdir())) // 2]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    return good, bad, damaged


def test_patient_identifiers_are_blanked_from_reader_messages_and_layer_names(make_napari_viewer, monkeypatch,
                                                                              named_after_patient):
    good, bad, damaged = named_after_patient
    shown = _capture(monkeypatch, "error", "warning")
    viewer = make_napari_viewer()
    viewer.open(str(bad), plugin="medfuse")
    viewer.open(str(damaged), plugin="medfuse")  # one damaged slice of it
    layer = viewer.open(str(good), plugin="medfuse")[0]
    said = shown["error"] + shown["warning"]
    assert said, "the damaged series is reported"
    for text in said + [l.name for l in viewer.layers]:
        assert "MRN998877" not in text and "DOE" not in text.upper().replace("DOES", ""), text
    assert layer.name.startswith("PT")  # still says what it is


# ------------------------------------------------------------------------------------------ 5. napari words
def test_python_and_command_line_fixes_are_put_in_napari_terms():
    from medfuse_napari._jobs import napari_words

    seen = [
        "likely misaligned; register them first (medfuse.register, or --register rigid on the command line)",
        "Fix: replace them before fusing: numpy.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0), for a Volume "
        "v.with_array(numpy.nan_to_num(v.array, nan=0.0, posinf=0.0, neginf=0.0)); or save the file with them set "
        "to 0.",
        "loaded alone; for the whole series pass the folder (or whole_series=True)",
    ]
    for text in map(napari_words, seen):
        for python in ("medfuse.register", "--register", "nan_to_num", "with_array", "whole_series"):
            assert python not in text, text
    assert "Register tab" in napari_words(seen[0]) and "series folder" in napari_words(seen[2])


def test_a_nan_layer_fused_is_refused_in_napari_terms(qtbot, pair, monkeypatch):
    viewer, widget = pair
    data = _blob(seed=3)
    data[::3] = np.nan
    viewer.add_image(data, name="withnan", scale=(2.0, 2.0, 2.0))
    shown = _capture(monkeypatch, "error", "warning")
    _fuse(qtbot, widget, "mr", "withnan")
    assert shown["error"] and "NaN" in shown["error"][0] and "nan_to_num" not in shown["error"][0], shown


def test_opening_one_slice_of_a_series_is_worded_for_napari(make_napari_viewer, monkeypatch, samples_dir, tmp_path):
    """A damaged slice opened alone: medfuse's "pass the folder (or whole_series=True)" is Python advice (and the
    reader already tried the series); neither a notification nor a raw warning passed to napari says it."""
    import warnings

    shutil.copytree(samples_dir / "ct", tmp_path / "ct")
    files = sorted((tmp_path / "ct").iterdir())
    middle = files[len(files) // 2]
    middle.write_bytes(middle.read_bytes()[: middle.stat().st_size // 2])
    shown = _capture(monkeypatch, "error", "warning")
    viewer = make_napari_viewer()
    with warnings.catch_warnings(record=True) as raw:  # what napari's own hook would show, unworded
        warnings.simplefilter("always")
        viewer.open(str(middle), plugin="medfuse")
    said = shown["error"] + shown["warning"] + [str(w.message) for w in raw]
    assert shown["error"] and not [m for m in said if "whole_series" in m], said


# ------------------------------------------------------------------------------------------ 6. minor
def test_a_refused_fuse_clears_the_last_runs_status(qtbot, pair, monkeypatch):
    viewer, widget = pair
    fp = _fuse(qtbot, widget, "mr", "pet")
    assert fp.status.text() == "added 'fused (mean)'" and fp.progress.value() == 1000
    viewer.add_image(np.zeros((20, 20), np.float32), name="slice2d")
    _capture(monkeypatch, "error")
    fp.inputs[1].set_layer("slice2d")
    fp.run()  # refused: 2-D and 3-D mixed
    assert fp.worker is None and "added" not in fp.status.text() and fp.progress.value() == 0


def test_opacity_and_blending_are_disabled_in_compare_modes(pair):
    viewer, widget = pair
    op = widget.overlay_panel
    op.base.set_layer("mr")
    op.overlay.set_layer("pet")
    op.compare.setCurrentText("checkerboard")
    assert not op.opacity.isEnabled() and not op.blending.isEnabled()
    assert "checkerboard" in op.opacity.toolTip()
    op.compare.setCurrentText("overlay")
    assert op.opacity.isEnabled() and op.blending.isEnabled() and "checkerboard" not in op.opacity.toolTip()


def test_a_bare_overlay_panel_still_works(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(_blob(), name="a")
    viewer.add_image(_blob(seed=1), name="b")
    panel = OverlayPanel(viewer)
    panel.compare.setCurrentText("curtain")
    viewer.layers.remove("a")
    assert panel.compare.currentText() == "overlay"


def test_a_lazily_loaded_layer_is_read_once_when_a_registration_starts(qtbot, pair, monkeypatch):
    """Starting a registration read a lazy (dask) fixed layer twice on the GUI thread: its file grid and its display
    grid. The Register panel's start reads it once (the registration itself is stubbed: only the start counts)."""
    import medfuse
    from medfuse.errors import RegistrationError

    viewer, widget = pair
    mr = viewer.layers["mr"]
    pixels = np.asarray(mr.data)
    reads = []

    class Lazy:  # stands for a dask array: converting it to numpy is a read
        shape, dtype, ndim = pixels.shape, pixels.dtype, pixels.ndim

        def __array__(self, dtype=None, copy=None):
            reads.append(1)
            return pixels

    lazy = Lazy()
    original = type(mr).data

    def stub(*args, **kwargs):
        raise RegistrationError("stopped by the test")

    monkeypatch.setattr(medfuse, "register", stub)
    panel = widget.register_panel
    panel.fixed.set_layer("mr")
    panel.moving.set_layer("pet")
    monkeypatch.setattr(type(mr), "data", property(lambda self: lazy if self is mr else original.fget(self)))
    panel.run()
    assert len(reads) == 1
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert len(reads) == 1
