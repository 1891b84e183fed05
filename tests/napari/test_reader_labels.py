"""A label map NIfTI opens as a napari Labels layer placed on the image it was drawn on; images stay Images.

Why: the reader opened every volume as an Image, so a segmentation (FreeSurfer's aseg, a lesion mask) showed as a
grey opaque layer hiding the T1, where napari's own reader and 3D Slicer show coloured, semi-transparent labels.
"""

import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

import medfuse  # noqa: E402
from medfuse_napari import napari_get_reader  # noqa: E402

pytestmark = pytest.mark.napari

SAMPLES = Path(__file__).resolve().parents[2] / "sample_volumes"  # in the repository (conftest's samples_dir)
MR = SAMPLES / "mr_t1.nii.gz"


def _read(path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*json_encoders.*")
        return napari_get_reader(str(path))(str(path))


def _on_mr_grid(tmp_path, arr: np.ndarray, name: str) -> str:
    """``arr`` saved on the sample MR's grid (its header's affine), as a segmentation tool writes it."""
    import nibabel as nib

    mr = nib.load(str(MR))
    assert arr.shape == mr.shape
    path = tmp_path / name
    nib.save(nib.Nifti1Image(arr, mr.affine), str(path))
    return str(path)


def _regions(dtype, values) -> np.ndarray:
    """Blocks of the given label values on the MR's grid (0 around them), several voxels wide each."""
    import nibabel as nib

    shape = nib.load(str(MR)).shape
    arr = np.zeros(shape, dtype=dtype)
    for n, value in enumerate(values):
        lo = [s // 8 + n * s // (2 * len(values)) for s in shape]
        arr[lo[0]:lo[0] + shape[0] // 6, lo[1]:lo[1] + shape[1] // 6, lo[2]:lo[2] + shape[2] // 6] = value
    return arr


def test_a_label_map_on_the_mr_grid_opens_as_labels_on_the_mr(make_napari_viewer, tmp_path):
    from napari.layers import Image, Labels

    from medfuse_napari._layers import data_to_world

    path = _on_mr_grid(tmp_path, _regions(np.uint8, [1, 2, 3]), "cerebellum_precuneus.nii.gz")
    viewer = make_napari_viewer()
    mr = viewer.open(str(MR), plugin="medfuse")[0]
    labels = viewer.open(path, plugin="medfuse")[0]
    assert isinstance(mr, Image) and isinstance(labels, Labels)
    assert labels.name == "cerebellum_precuneus" and labels.opacity == pytest.approx(0.5)
    assert np.issubdtype(labels.data.dtype, np.integer)
    assert set(np.unique(labels.data).tolist()) == {0, 1, 2, 3}
    # The same world placement: every voxel of the labels lies on the MR voxel of the same index.
    assert labels.data.shape == mr.data.shape
    np.testing.assert_allclose(data_to_world(labels), data_to_world(mr), atol=1e-9)
    voxel = np.array([5.0, 7.0, 11.0])
    np.testing.assert_allclose(labels.data_to_world(voxel), mr.data_to_world(voxel), atol=1e-9)
    # ... and the medfuse geometry the widgets and the writer read is there, as on an image.
    md, mr_md = labels.metadata["medfuse"], mr.metadata["medfuse"]
    np.testing.assert_allclose(md["affine"], mr_md["affine"], atol=1e-6)
    assert md["display_grid"] == mr_md["display_grid"]
    # The labels sit where the file put them: the MR file's voxel order, read back through the layer.
    from medfuse_napari._layers import native_volume

    np.testing.assert_array_equal(native_volume(labels).array, medfuse.load(path).array)


def test_a_freesurfer_like_int32_map_opens_as_labels(tmp_path):
    values = [2, 41, 1002, 2029]  # cerebral white matter L/R, ctx-lh/rh labels of aparc+aseg
    path = _on_mr_grid(tmp_path, _regions(np.int32, values), "aparc+aseg.nii.gz")
    (data, kwargs, kind), = _read(path)
    assert kind == "labels"
    assert data.dtype == np.int32 and set(np.unique(data).tolist()) == {0, *values}
    assert kwargs["opacity"] == pytest.approx(0.5) and "colormap" not in kwargs


def test_a_float_0_1_lesion_mask_opens_as_integer_labels(tmp_path):
    path = _on_mr_grid(tmp_path, _regions(np.float32, [1.0]), "lesion_mask.nii.gz")
    (data, _, kind), = _read(path)
    assert kind == "labels" and data.dtype == np.uint8
    assert set(np.unique(data).tolist()) == {0, 1}


def test_a_label_map_opened_with_its_mr_goes_on_top(tmp_path):
    """napari draws the last layer on top: a segmentation sorting before its T1 was hidden under the opaque T1."""
    labels = _on_mr_grid(tmp_path, _regions(np.uint8, [1, 2]), "a_seg.nii.gz")
    paths = [labels, str(MR)]
    layers = napari_get_reader(paths)(paths)
    assert [(kwargs["name"], kind) for _, kwargs, kind in layers] == [("mr_t1", "image"), ("a_seg", "labels")]
    assert all(kwargs.get("visible", True) for _, kwargs, _ in layers)


@pytest.mark.parametrize("name", ["mr_t1.nii.gz", "mr_t2.nii.gz", "spect.nii.gz", "ct", "pet"])
def test_the_sample_volumes_stay_images(name):
    layers = _read(SAMPLES / name)
    assert [kind for _, _, kind in layers] == ["image"] * len(layers)


def test_brats_t1n_an_int16_mr_of_unknown_modality_stays_an_image(shared):
    path = shared("data", "brats-gli-00001", "t1n.nii.gz")
    vol = medfuse.load(path)
    # What makes it a test: int16, modality unknown, and fewer distinct values than the label limit.
    from medfuse_napari._layers import LABEL_VALUES

    assert vol.array.dtype == np.int16 and vol.modality == "unknown"
    assert len(np.unique(vol.array)) < LABEL_VALUES
    (_, kwargs, kind), = _read(path)
    assert kind == "image" and kwargs["opacity"] == pytest.approx(1.0)


def test_labels_with_a_physical_unit_or_negative_values_stay_images():
    from medfuse_napari._layers import is_label_map

    arr = _regions(np.int16, [1, 2])
    affine = np.eye(4)
    assert is_label_map(medfuse.Volume(arr, affine))
    assert not is_label_map(medfuse.Volume(arr, affine, modality="CT", unit="HU"))
    assert not is_label_map(medfuse.Volume(arr, affine, unit="Gy"))
    assert not is_label_map(medfuse.Volume(arr - 1, affine))  # -1 outside: not a label map napari can show


def test_a_labels_layer_saved_through_the_writer_reads_back_identical(make_napari_viewer, tmp_path):
    from medfuse_napari._writer import write_labels

    path = _on_mr_grid(tmp_path, _regions(np.int32, [2, 41, 1002, 2029]), "aseg.nii.gz")
    viewer = make_napari_viewer()
    viewer.open(str(MR), plugin="medfuse")
    labels = viewer.open(path, plugin="medfuse")[0]
    data, attributes, kind = labels.as_layer_data_tuple()
    assert kind == "labels"
    out = write_labels(str(tmp_path / "aseg_saved.nii.gz"), data, attributes)[0]
    source, back = medfuse.load(path), medfuse.load(out)
    assert np.issubdtype(back.array.dtype, np.integer)
    np.testing.assert_array_equal(back.array, source.array)
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-5)


def test_a_labels_layer_is_not_offered_as_an_image_input(make_napari_viewer, dock_widget, qtbot, tmp_path):
    """The Register, Fuse and Overlay pickers take images: a label map beside the MR is not offered, nor does
    opening one with the widget open break it."""
    viewer = make_napari_viewer()
    widget = dock_widget(viewer)
    viewer.open(str(MR), plugin="medfuse")
    viewer.open(str(SAMPLES / "spect.nii.gz"), plugin="medfuse")
    viewer.open(_on_mr_grid(tmp_path, _regions(np.uint8, [1, 2]), "mask.nii.gz"), plugin="medfuse")
    qtbot.wait(20)
    combos = [widget.register_panel.fixed, widget.register_panel.moving, *widget.fuse_panel.inputs,
              widget.overlay_panel.base, widget.overlay_panel.overlay]
    for combo in combos:
        names = [combo.itemText(n) for n in range(combo.count())]
        assert "mask" not in names and any("mr_t1" in n for n in names), names
