"""The writer runs on napari's GUI thread: it must not hash a large input series there.

Before, every save of a fused layer hashed each input (a whole DICOM series) for the provenance sidecar while
napari was frozen. Now the inputs are hashed ahead of time in a worker (``prehash_inputs``) and the writer takes
the kept hash while the files are unchanged.
"""

import json
import os
import threading

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse import provenance  # noqa: E402

pytestmark = pytest.mark.napari


def _fused_attributes(sources):
    """A writer's ``attributes`` for a layer medfuse fused from ``sources`` (so it gets a sidecar)."""
    return {"name": "fused (mean)",
            "metadata": {"medfuse": {"provenance": {"sources": [str(s) for s in sources],
                                                    "fusion": {"method": "mean"}}}}}


@pytest.fixture
def hashed(monkeypatch):
    """Every path medfuse.provenance.hash_path is asked for, with the thread that asked."""
    calls = []
    real = provenance.hash_path

    def spy(path):
        calls.append((os.path.realpath(path), threading.current_thread() is threading.main_thread()))
        return real(path)

    monkeypatch.setattr(provenance, "hash_path", spy)
    return calls


def test_inputs_hashed_in_a_worker_are_not_hashed_again_on_save(qtbot, samples_dir, tmp_path, hashed):
    from napari.qt.threading import thread_worker

    from medfuse_napari import _writer

    _writer._HASHES.clear()
    series = samples_dir / "pet"  # a DICOM series folder
    attrs = _fused_attributes([series])
    worker = thread_worker(_writer.prehash_inputs)(attrs["metadata"])
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        worker.start()
    assert (os.path.realpath(series), False) in hashed  # hashed off the GUI thread
    del hashed[:]

    data = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    out = tmp_path / "fused.nii.gz"
    written = _writer.write_image(str(out), data, attrs)
    assert written == [str(out), str(tmp_path / "fused.json")]
    # On the GUI thread only the file just written is hashed, not the series.
    assert [p for p, _ in hashed] == [os.path.realpath(out)]
    side = json.loads((tmp_path / "fused.json").read_text())
    assert side["inputs"][0]["sha256"] == provenance.hash_path(series)  # the kept hash is the true one
    np.testing.assert_array_equal(medfuse.load(out).array, data)


def test_a_changed_input_is_hashed_again(tmp_path, hashed):
    from medfuse_napari import _writer

    _writer._HASHES.clear()
    src = tmp_path / "src.nii.gz"
    medfuse.save(medfuse.Volume(np.zeros((6, 7, 8), np.float32), np.eye(4)), src)
    attrs = _fused_attributes([src])
    before = _writer.prehash_inputs(attrs["metadata"])[str(src)]
    medfuse.save(medfuse.Volume(np.ones((6, 7, 8), np.float32), np.eye(4)), src, overwrite=True)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # a later modification time, whatever the clock
    del hashed[:]
    _writer.write_image(str(tmp_path / "f.nii.gz"), np.zeros((6, 7, 8), np.float32), attrs)
    side = json.loads((tmp_path / "f.json").read_text())
    assert side["inputs"][0]["sha256"] == provenance.hash_path(src) != before
    assert os.path.realpath(src) in [p for p, _ in hashed]  # not the stale kept hash


def test_a_missing_input_records_no_hash(tmp_path):
    from medfuse_napari import _writer

    attrs = _fused_attributes([tmp_path / "gone.nii.gz"])
    assert _writer.prehash_inputs(attrs["metadata"]) == {str(tmp_path / "gone.nii.gz"): None}
    _writer.write_image(str(tmp_path / "f.nii.gz"), np.zeros((6, 7, 8), np.float32), attrs)
    side = json.loads((tmp_path / "f.json").read_text())
    assert side["inputs"][0]["sha256"] is None


def test_a_layer_fused_in_the_widget_saves_without_hashing_its_inputs_on_the_gui_thread(
        make_napari_viewer, samples_dir, tmp_path, hashed, fuse_in_widget):
    """The widget's fusion worker (and the reader, in the background) hash the inputs: the save that follows
    hashes only its own output on the GUI thread."""
    import shutil

    from napari import save_layers

    from medfuse_napari import _writer

    _writer._HASHES.clear()
    shutil.copy(samples_dir / "mr_t1.nii.gz", tmp_path / "mr_t1.nii.gz")
    shutil.copytree(samples_dir / "pet", tmp_path / "pet")
    viewer = make_napari_viewer()
    t1 = viewer.open(str(tmp_path / "mr_t1.nii.gz"), plugin="medfuse")[0]
    pet = viewer.open(str(tmp_path / "pet"), plugin="medfuse")[0]
    _, fused = fuse_in_widget(viewer, t1, pet, "mean")
    sources = {os.path.realpath(s) for s in fused.metadata["medfuse"]["provenance"]["sources"]}
    assert sources == {os.path.realpath(tmp_path / "mr_t1.nii.gz"), os.path.realpath(tmp_path / "pet")}
    (tmp_path / "out").mkdir()
    del hashed[:]
    out = save_layers(str(tmp_path / "out" / "fused.nii.gz"), [fused])
    assert out
    on_gui = {path for path, gui in hashed if gui}
    assert not on_gui & sources, on_gui
    side = json.loads((tmp_path / "out" / "fused.json").read_text())
    assert {i["sha256"] for i in side["inputs"]} == {provenance.hash_path(s) for s in sources}
