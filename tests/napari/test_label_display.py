"""An oblique label map opened in napari keeps its labels (nearest neighbour, integer dtype); images stay linear.

Why: the reader put oblique volumes on napari's axis-aligned grid with linear interpolation only, so a uint8 label
map {0, 1, 2, 4} opened as float32 with tens of thousands of values (~3.0 between labels 2 and 4), with no
warning, and saving it back as labels wrote a label 3 that was never drawn.
"""

import warnings

import numpy as np
import pytest

pytest.importorskip("napari")

import medfuse  # noqa: E402
from medfuse.volume import LPS_TO_RAS  # noqa: E402
from medfuse_napari import napari_get_reader  # noqa: E402

pytestmark = pytest.mark.napari

LABELS = {0, 1, 2, 4}


def _oblique_affine() -> np.ndarray:
    """LPS voxel -> mm: rotated 20 degrees about S (and 10 about P), 1.5 x 1.25 x 2 mm voxels."""
    a, b = np.radians(20), np.radians(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    lps = np.eye(4)
    lps[:3, :3] = rz @ ry @ np.diag([1.5, 1.25, 2.0])
    lps[:3, 3] = [-15.0, -12.0, -18.0]
    return lps


def _label_array() -> np.ndarray:
    """20 x 22 x 18 uint8 with labels 0, 1, 2, 4; labels 2 and 4 touch, where linear interpolation gave ~3."""
    arr = np.zeros((20, 22, 18), dtype=np.uint8)
    arr[3:17, 3:19, 3:15] = 1
    arr[5:11, 6:16, 5:13] = 2
    arr[11:15, 6:16, 5:13] = 4
    return arr


def _write(tmp_path, arr: np.ndarray, name: str) -> str:
    import nibabel as nib

    path = tmp_path / name
    nib.save(nib.Nifti1Image(arr, LPS_TO_RAS @ _oblique_affine()), str(path))
    return str(path)


def _read(path: str):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*json_encoders.*")
        layers = napari_get_reader(path)(path)
    assert len(layers) == 1
    return layers[0]


def _world_lps(kwargs, shape) -> np.ndarray:
    """LPS mm position of every display voxel of a layer (napari axes S, P, L), C order."""
    from medfuse_napari._layers import R4, layer_matrix

    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return (np.c_[idx, np.ones(len(idx))] @ (R4 @ layer_matrix(kwargs["scale"], kwargs["translate"])).T)[:, :3]


def test_oblique_label_map_opens_with_its_labels_only(tmp_path):
    src = _label_array()
    path = _write(tmp_path, src, "labels.nii.gz")
    data, kwargs, kind = _read(path)
    md = kwargs["metadata"]["medfuse"]
    assert md["display_grid"] == "resampled"  # oblique: put on the display grid
    np.testing.assert_allclose(md["affine"], _oblique_affine(), atol=1e-5)  # the true affine is kept
    assert np.issubdtype(data.dtype, np.integer), data.dtype
    assert set(np.unique(data).tolist()) <= LABELS
    assert set(np.unique(data).tolist()) == LABELS  # every label survives (the blocks are several voxels wide)
    # Nearest neighbour on the right grid: each display voxel inside the source box holds the label of the
    # source voxel nearest to it (ties on a voxel boundary may go either way: 0.02 voxel margin).
    world = _world_lps(kwargs, data.shape)
    ijk = (np.c_[world, np.ones(len(world))] @ np.linalg.inv(_oblique_affine()).T)[:, :3]
    near = np.round(ijk).astype(int)
    inside = np.all((near >= 0) & (near < np.array(src.shape)), axis=1)
    clear = np.all(np.abs(ijk - np.round(ijk)) < 0.48, axis=1) & inside
    assert clear.sum() > 0.5 * src.size
    expected = src[tuple(near[clear].T)]
    np.testing.assert_array_equal(data.reshape(-1)[clear], expected)


def test_oblique_label_layer_saved_as_labels_keeps_the_label_set(tmp_path):
    from napari.layers import Image, Labels

    from medfuse_napari._layers import layer_to_volume, native_volume
    from medfuse_napari._writer import write_labels

    path = _write(tmp_path, _label_array(), "labels.nii.gz")
    data, kwargs, _ = _read(path)
    image = Image(data, **kwargs)
    # napari's Convert to Labels, then File > Save Selected Layer(s).
    labels = Labels(np.asarray(image.data).astype(np.int64), scale=image.scale, translate=image.translate,
                    affine=image.affine, metadata=image.metadata)
    vol = native_volume(labels)  # a resampled layer: its display grid, where napari shows it
    assert set(np.unique(vol.array).tolist()) == LABELS
    np.testing.assert_allclose(vol.affine, layer_to_volume(labels, registered=False).affine, atol=1e-9)
    d, attributes, _ = labels.as_layer_data_tuple()
    out = write_labels(str(tmp_path / "resaved.nii.gz"), d, attributes)[0]
    back = medfuse.load(out)
    assert np.issubdtype(back.array.dtype, np.integer)
    assert set(np.unique(back.array).tolist()) == LABELS
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    np.testing.assert_array_equal(back.array, vol.array)


def test_oblique_image_is_still_interpolated(tmp_path):
    rng = np.random.default_rng(0)
    src = rng.normal(100.0, 20.0, size=(20, 22, 18)).astype(np.float32)
    path = _write(tmp_path, src, "image.nii.gz")
    data, kwargs, _ = _read(path)
    assert kwargs["metadata"]["medfuse"]["display_grid"] == "resampled"
    assert data.dtype.kind == "f"
    assert len(np.unique(data)) > len(np.unique(src))  # linear: values between the source's
    # Exactly what medfuse.resample's linear interpolation gives on the display grid.
    from medfuse_napari._layers import _axis_aligned, display_grid

    vol = medfuse.load(path)
    linear = medfuse.resample(vol, _axis_aligned(vol), interpolation="linear")
    np.testing.assert_array_equal(data, display_grid(linear)[0])


def test_oblique_integer_image_with_many_values_is_still_interpolated(tmp_path):
    src = (np.arange(20 * 22 * 18) % 997).reshape(20, 22, 18).astype(np.int16)  # an image, not a label map
    path = _write(tmp_path, src, "image_i16.nii.gz")
    data, _, _ = _read(path)
    assert data.dtype.kind == "f"
    assert not set(np.unique(data).tolist()) <= set(np.unique(src).tolist())


def test_an_oblique_label_map_of_a_hundred_labels_keeps_them(tmp_path):
    """TotalSegmentator's 117 classes and FreeSurfer's aparc+aseg exceed the 64 values resample() warns at: they
    were still blended."""
    import nibabel as nib

    rng = np.random.default_rng(3)
    labels = np.kron(rng.integers(0, 100, (6, 6, 5)), np.ones((4, 4, 4))).astype(np.int32)  # 100 flat blocks
    c, s_ = np.cos(0.3), np.sin(0.3)
    affine = np.array([[c, -s_, 0, 0], [s_, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    path = tmp_path / "many_labels.nii.gz"
    nib.save(nib.Nifti1Image(labels, affine), str(path))
    data, _, _ = napari_get_reader(str(path))(str(path))[0]
    assert np.issubdtype(np.asarray(data).dtype, np.integer)
    assert set(np.unique(data).tolist()) <= set(np.unique(labels).tolist())
