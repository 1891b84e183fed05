"""Reader and sample-data tests for the medfuse napari plugin."""

import numpy as np
import pytest

pytest.importorskip("napari")

import medfuse  # noqa: E402
from medfuse_napari import napari_get_reader  # noqa: E402
from medfuse_napari._sample_data import load_phantom  # noqa: E402

pytestmark = pytest.mark.napari


@pytest.mark.parametrize("name", ["notes.txt", "photo.png", "table.csv"])
def test_reader_declines_non_medical_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not a medical image")
    assert napari_get_reader(str(path)) is None


def test_reader_sets_scale_translate_and_metadata(tmp_path):
    import nibabel as nib

    affine = np.diag([-1.5, -2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), affine), str(path))
    volume = medfuse.load(path)
    data, kwargs, kind = napari_get_reader(str(path))(str(path))[0]
    assert kind == "image" and data.shape == volume.shape
    np.testing.assert_allclose(kwargs["scale"], volume.spacing)
    np.testing.assert_allclose(kwargs["translate"], volume.origin)
    np.testing.assert_allclose(kwargs["metadata"]["medfuse"]["affine"], volume.affine)


def test_sample_phantom_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    for data, kwargs, kind in load_phantom():
        viewer.add_image(data, **kwargs)
    assert len(viewer.layers) >= 4
    for layer in viewer.layers:
        meta = layer.metadata["medfuse"]
        assert np.all(np.asarray(layer.scale) > 0) and meta["modality"]
