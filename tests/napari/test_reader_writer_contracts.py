"""Reader and writer contracts across napari calls: one layer per DICOM series for a multi-file open, inputs open
in any viewer never written over, Split Stack parts recording their own volume, a console move saved as a move."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse.errors import OutputExistsError  # noqa: E402

pytestmark = pytest.mark.napari


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_opening_all_files_of_one_series_gives_one_layer(make_napari_viewer, samples_dir):
    """napari hands the reader one path at a time (`napari ct/*.dcm`, File > Open Files on a selection): each
    slice file opened the whole series again, 40 identical layers for a 40-file CT."""
    files = sorted(str(p) for p in (samples_dir / "ct").glob("*.dcm"))
    assert len(files) > 3
    viewer = make_napari_viewer()
    layers = viewer.open(files, plugin="medfuse")
    expected = medfuse.load_volumes(samples_dir / "ct")
    assert len(expected) == 1
    assert len(layers) == 1 and len(viewer.layers) == 1
    assert layers[0].data.size == expected[0].array.size
    # A later, deliberate open of the same series still gives another layer.
    again = viewer.open(files[len(files) // 2], plugin="medfuse")
    assert len(again) == 1 and len(viewer.layers) == 2


def test_opening_files_of_two_series_together_gives_one_layer_each(make_napari_viewer, samples_dir):
    files = [str(p) for folder in ("ct", "pet") for p in sorted((samples_dir / folder).glob("*.dcm"))[:4]]
    viewer = make_napari_viewer()
    layers = viewer.open(files, plugin="medfuse")
    assert len(layers) == 2
    assert {layer.metadata["medfuse"]["modality"] for layer in layers} == {"CT", "PT"}


def test_two_series_under_one_uid_opened_file_by_file_give_two_layers(make_napari_viewer, samples_dir, tmp_path):
    """medfuse reads one SeriesInstanceUID under two SeriesNumbers as two series; the reader remembered series by
    UID alone, so the second one's files were taken as already read and it was dropped."""
    import pydicom
    from pydicom.uid import generate_uid

    files = []
    for f in sorted((samples_dir / "ct").glob("*.dcm")):
        for number in (1, 2):
            ds = pydicom.dcmread(f)
            ds.SeriesNumber = number
            ds.SOPInstanceUID = generate_uid()
            if number == 2:
                ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
            ds.save_as(tmp_path / f"s{number}_{f.name}")
            files.append(str(tmp_path / f"s{number}_{f.name}"))
    assert len(medfuse.scan(tmp_path)) == 2  # the premise: medfuse's own reading
    layers = make_napari_viewer().open(sorted(files), plugin="medfuse")
    assert len(layers) == 2
    assert not np.array_equal(np.asarray(layers[0].data), np.asarray(layers[1].data))


def test_files_without_a_series_number_open_with_their_series(make_napari_viewer, samples_dir, tmp_path):
    """medfuse keeps files without a SeriesNumber with the numbered files of their UID; opened file by file, each
    such file was taken for another series and opened it again (31 layers for 40 files)."""
    import pydicom

    files = []
    for i, f in enumerate(sorted((samples_dir / "ct").glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        if i < 10:
            del ds.SeriesNumber
        ds.save_as(tmp_path / f.name)
        files.append(str(tmp_path / f.name))
    assert len(medfuse.scan(tmp_path)) == 1  # the premise: medfuse's own reading
    assert len(make_napari_viewer().open(files, plugin="medfuse")) == 1


def test_a_file_open_in_another_viewer_is_never_written_over(make_napari_viewer, samples_dir, tmp_path):
    src = tmp_path / "c.nii.gz"
    shutil.copy(samples_dir / "mr_t1.nii.gz", src)
    before = _sha(src)
    va = make_napari_viewer()
    va.open(str(src), plugin="medfuse")
    vb = make_napari_viewer()  # the current viewer now
    z = vb.add_image(np.zeros((5, 5, 5), np.float32), name="zeros")
    with pytest.raises(OutputExistsError):
        z.save(str(src))
    assert _sha(src) == before
    # A new name beside it is fine.
    assert z.save(str(tmp_path / "zeros.nii.gz")) == [str(tmp_path / "zeros.nii.gz")]


def _four_d(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(3)
    # Volumes with distinct values (and ranges), so each is told apart.
    arr = np.stack([rng.random((6, 5, 4)).astype(np.float32) * 10.0 ** t for t in range(4)], axis=-1)
    path = tmp_path / "series4d.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    return path, arr


def test_split_stack_parts_record_their_own_volume_index(make_napari_viewer, tmp_path):
    import nibabel as nib
    from napari.layers.utils.stack_utils import stack_to_images

    path, arr = _four_d(tmp_path)
    viewer = make_napari_viewer()
    layer = viewer.open(str(path), plugin="medfuse")[0]
    assert layer.data.ndim == 4
    parts = stack_to_images(layer, 0)
    for t in (1, 3):
        part = parts[t]
        part.affine = np.array([[1, 0, 0, 5.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # registered: sidecar
        out = tmp_path / f"vol{t}.nii.gz"
        part.save(str(out))
        np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), arr[..., t])
        record = json.loads((tmp_path / f"vol{t}.json").read_text())
        assert record["layer_provenance"]["volume_index"] == t
    # A part whose voxels were changed records no index, and says why.
    edited = parts[2]
    edited.data = np.asarray(edited.data) + 1.0
    edited.affine = np.array([[1, 0, 0, 5.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    edited.save(str(tmp_path / "edited.nii.gz"))
    record = json.loads((tmp_path / "edited.json").read_text())
    assert "volume_index" not in record["layer_provenance"]
    assert any("volume_index not recorded" in w for w in record["warnings"])


def test_a_layer_moved_by_translate_is_saved_in_the_file_voxel_order_with_a_sidecar(make_napari_viewer, tmp_path):
    """A console move (``layer.translate``) is a placement like a hand drag: the file's own voxel order with the
    move in the affine, and a sidecar; before, it was saved transposed into napari's display order, unrecorded."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    arr = rng.random((6, 7, 8)).astype(np.float32)  # RAS file: napari shows it reordered (S, P, L)
    aff = np.array([[2.0, 0, 0, -5.0], [0, 3.0, 0, 7.0], [0, 0, 4.0, 11.0], [0, 0, 0, 1]])
    src = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(arr, aff), str(src))
    viewer = make_napari_viewer()
    layer = viewer.open(str(src), plugin="medfuse")[0]
    assert layer.metadata["medfuse"]["display_grid"] == "reordered"
    layer.translate = np.asarray(layer.translate) + [0.0, 0.0, 10.0]  # +10 mm towards patient left (L)
    out = tmp_path / "moved.nii.gz"
    layer.save(str(out))
    img = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)  # voxels untouched, the file's order
    expected = aff.copy()
    expected[0, 3] -= 10.0  # RAS: +L is -R
    np.testing.assert_allclose(img.affine, expected, atol=1e-4)
    record = json.loads((tmp_path / "moved.json").read_text())
    assert record["placement_lps"] is not None
    # Unmoved, the same file is saved as read: no sidecar, the same affine.
    layer.translate = np.asarray(layer.translate) - [0.0, 0.0, 10.0]
    layer.save(str(tmp_path / "unmoved.nii.gz"))
    np.testing.assert_allclose(nib.load(str(tmp_path / "unmoved.nii.gz")).affine, aff, atol=1e-4)
    assert not (tmp_path / "unmoved.json").exists()


def _shown_warnings(path, monkeypatch):
    import napari.utils.notifications as notifications

    from medfuse_napari._reader import napari_get_reader

    shown = []
    monkeypatch.setattr(notifications, "show_warning", lambda message: shown.append(str(message)))
    layers = napari_get_reader(str(path))(str(path))
    return layers, shown


def test_a_4d_series_whose_volumes_differ_by_orders_of_magnitude_is_noted(tmp_path, monkeypatch):
    """napari shows every volume of a 4-D layer with volume 0's contrast limits: a volume 1e6 times smaller (a
    Philips B0 field map in Hz beside magnitude images) showed black without a word."""
    import nibabel as nib

    rng = np.random.default_rng(5)
    magnitude = rng.random((8, 8, 8)).astype(np.float32) * 1e8
    field_map = (rng.random((8, 8, 8)).astype(np.float32) - 0.5) * 300.0
    path = tmp_path / "b0.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([magnitude, field_map], axis=-1), np.eye(4)), str(path))
    layers, shown = _shown_warnings(path, monkeypatch)
    low, high = layers[0][1]["contrast_limits"]
    assert np.mean((field_map > low) & (field_map < high)) < 0.01  # volume 1 is outside the limits shown
    notes = [m for m in shown if "orders of magnitude" in m]
    assert len(notes) == 1 and "volume 1" in notes[0] and "Split Stack" in notes[0]

    # Volumes of like ranges (an fMRI run): no note.
    like = np.stack([magnitude, magnitude * 1.5], axis=-1)
    path2 = tmp_path / "run.nii.gz"
    nib.save(nib.Nifti1Image(like, np.eye(4)), str(path2))
    _, shown = _shown_warnings(path2, monkeypatch)
    assert not [m for m in shown if "orders of magnitude" in m]


def _labels_at_saved_voxels(img, layer, n=50):
    """The layer's label, looked up where napari draws it, at up to ``n`` labelled voxels of the saved file."""
    saved = np.asarray(img.dataobj)
    idx = np.argwhere(saved != 0)[:: max(1, int(np.sum(saved != 0)) // n)]
    ras = (img.affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T
    lps = ras * [-1.0, -1.0, 1.0]
    found = []
    for point, voxel in zip(lps, idx):
        d = np.round(layer.world_to_data(point[::-1])).astype(int)  # napari world is (S, P, L)
        found.append((int(layer.data[tuple(d)]), int(saved[tuple(voxel)])))
    return found


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_a_labels_layer_drawn_on_a_ct_is_saved_with_its_geometry(make_napari_viewer, samples_dir, tmp_path, ending):
    import nibabel as nib

    viewer = make_napari_viewer()
    ct = viewer.open(str(samples_dir / "ct"), plugin="medfuse")[0]
    mask = np.zeros(ct.data.shape, np.int32)
    mask[10:20, 50:90, 40:70] = 3
    mask[22:25, 60:70, 100:120] = 7
    labels = viewer.add_labels(mask, scale=ct.scale, translate=ct.translate, name="lesion")
    out = tmp_path / f"lesion{ending}"
    assert labels.save(str(out))[0] == str(out)
    # Read back with the format's own library: integer labels, exactly.
    if ending == ".nii.gz":
        img = nib.load(str(out))
        saved = np.asarray(img.dataobj)
        assert np.issubdtype(saved.dtype, np.integer)
        assert sorted(np.unique(saved)) == [0, 3, 7]
        assert np.sum(saved == 3) == np.sum(mask == 3) and np.sum(saved == 7) == np.sum(mask == 7)
        pairs = _labels_at_saved_voxels(img, labels)
        assert pairs and all(a == b for a, b in pairs)
        # On the CT's grid: the CT file's voxel order and affine, voxel for voxel.
        ct_out = tmp_path / "ct.nii.gz"
        ct.save(str(ct_out))
        np.testing.assert_allclose(img.affine, nib.load(str(ct_out)).affine, atol=1e-4)
        assert img.shape == nib.load(str(ct_out)).shape
    else:
        vol = medfuse.load(out)
        assert np.issubdtype(vol.array.dtype, np.integer) and sorted(np.unique(vol.array)) == [0, 3, 7]
        np.testing.assert_allclose(vol.affine, medfuse.load_volumes(samples_dir / "ct")[0].affine, atol=1e-4)


def test_a_labels_layer_moved_in_napari_is_saved_where_napari_draws_it(make_napari_viewer, tmp_path):
    import nibabel as nib

    viewer = make_napari_viewer()
    mask = np.zeros((6, 7, 8), np.uint8)
    mask[1:3, 2:5, 3:7] = 1
    mask[4, 5, 6] = 2
    labels = viewer.add_labels(mask, scale=(2.0, 1.5, 1.0), translate=(4.0, -3.0, 2.0), name="m")
    labels.affine = np.array([[1, 0, 0, 0], [0, 1, 0, 6.0], [0, 0, 1, 0], [0, 0, 0, 1]])
    out = tmp_path / "m.nii"
    labels.save(str(out))
    img = nib.load(str(out))
    pairs = _labels_at_saved_voxels(img, labels)
    assert pairs and all(a == b for a, b in pairs)
    saved = np.asarray(img.dataobj)
    assert np.sum(saved == 1) == np.sum(mask == 1) and np.sum(saved == 2) == 1


def test_a_stacked_open_of_one_series_gives_one_layer(make_napari_viewer, samples_dir):
    """``stack=True`` (napari ``--stack``) hands the reader the whole list: it was refused ("not a compatible
    reader"); now one layer per series."""
    files = sorted(str(p) for p in (samples_dir / "ct").glob("*.dcm"))
    viewer = make_napari_viewer()
    layers = viewer.open(files, plugin="medfuse", stack=True)
    assert len(layers) == 1 and layers[0].data.size == medfuse.load_volumes(samples_dir / "ct")[0].array.size
