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


def _world_of_voxels(kwargs, shape):
    """LPS world position of every display voxel (napari axes are S, P, L)."""
    from medfuse_napari._layers import R4, layer_matrix

    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return (np.c_[idx, np.ones(len(idx))] @ (R4 @ layer_matrix(kwargs["scale"], kwargs["translate"])).T)[:, :3]


def test_reader_reorders_flipped_axes_to_s_p_l(tmp_path):
    import nibabel as nib
    from napari.layers import Image

    affine = np.diag([1.5, -2.0, 3.0, 1.0])  # RAS: i runs to patient right, i.e. -L in LPS: flipped + permuted
    affine[:3, 3] = [10.0, -20.0, 30.0]
    path = tmp_path / "vol.nii.gz"
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    volume = medfuse.load(path)
    data, kwargs, kind = napari_get_reader(str(path))(str(path))[0]
    assert kind == "image" and data.shape == (6, 5, 4)  # (S, P, L)
    assert np.all(np.asarray(kwargs["scale"]) > 0)
    np.testing.assert_allclose(kwargs["scale"], (3.0, 2.0, 1.5))
    np.testing.assert_allclose(kwargs["metadata"]["medfuse"]["affine"], volume.affine)
    assert kwargs["metadata"]["medfuse"]["display_grid"] == "reordered"
    # Every voxel is shown where the file says it is.
    world = _world_of_voxels(kwargs, data.shape)
    ijk = np.round(volume.world_to_index(world)).astype(int)
    np.testing.assert_array_equal(data.reshape(-1), volume.array[tuple(ijk.T)])
    # ... and the file's own grid can be recovered from the layer (registration runs on it).
    from medfuse_napari._layers import native_volume

    layer = Image(data, **kwargs)
    back = native_volume(layer)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.affine, volume.affine)


def test_reader_resamples_oblique_and_keeps_true_affine(tmp_path):
    import nibabel as nib

    from medfuse.volume import LPS_TO_RAS

    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    lps = np.eye(4)
    lps[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) * 2.0
    lps[:3, 3] = [-20, -20, -10]
    arr = np.zeros((20, 20, 10), dtype=np.float32)
    arr[12, 5, 4] = 1000.0  # one bright voxel to find again
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(arr, LPS_TO_RAS @ lps), str(path))
    data, kwargs, _ = napari_get_reader(str(path))(str(path))[0]
    md = kwargs["metadata"]["medfuse"]
    assert md["display_grid"] == "resampled"
    np.testing.assert_allclose(md["affine"], lps, atol=1e-5)
    world = _world_of_voxels(kwargs, data.shape)
    expected = lps[:3, :3] @ [12, 5, 4] + lps[:3, 3]
    np.testing.assert_allclose(world[int(np.argmax(data.reshape(-1)))], expected, atol=2.0)


def test_reader_declines_non_dicom_folders(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    assert napari_get_reader(str(tmp_path)) is None
    store = tmp_path / "image.zarr"
    store.mkdir()
    assert napari_get_reader(str(store)) is None


def test_corrupt_dicom_is_a_notification_not_a_crash(tmp_path, make_napari_viewer, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    viewer = make_napari_viewer()
    layers = viewer.open(str(bad), plugin="medfuse")
    assert layers == [] and len(viewer.layers) == 0
    assert len(shown) == 1 and "broken.dcm" in shown[0] and "Traceback" not in shown[0]


def test_sample_phantom_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    for data, kwargs, kind in load_phantom():
        viewer.add_image(data, **kwargs)
    assert len(viewer.layers) >= 4
    for layer in viewer.layers:
        meta = layer.metadata["medfuse"]
        assert np.all(np.asarray(layer.scale) > 0) and meta["modality"]


def test_reader_dicom_folders_get_modality_defaults(samples_dir):
    pet_data, pet, _ = napari_get_reader(str(samples_dir / "pet"))(str(samples_dir / "pet"))[0]
    assert pet["metadata"]["medfuse"]["unit"] == "SUVbw"
    assert list(pet["contrast_limits"]) == [0.0, 6.0] and pet["blending"] == "additive"
    assert pet["colormap"] in ("inferno", "hot") and pet_data.min() >= 0
    _, ct, _ = napari_get_reader(str(samples_dir / "ct"))(str(samples_dir / "ct"))[0]
    assert ct["colormap"] == "gray" and list(ct["contrast_limits"]) == [0.0, 80.0]  # brain window 80/40
    _, spect, _ = napari_get_reader(str(samples_dir / "spect.nii.gz"))(str(samples_dir / "spect.nii.gz"))[0]
    assert spect["colormap"] not in ("gray", pet["colormap"])  # SPECT has its own colour map


def test_layer_names_keep_dots_that_are_not_image_suffixes(tmp_path, samples_dir):
    # A DICOM folder named by UID must not become "1"; pet.ac / pet.nac must stay apart.
    import shutil

    import nibabel as nib

    uid = tmp_path / "1.3.12.2.1107.5.1.4.11090.30000023"
    shutil.copytree(samples_dir / "pet", uid)
    arr = np.zeros((4, 5, 6), dtype=np.float32)
    for name in ("pet.ac.nii.gz", "pet.nac.nii.gz", "mr.T1.nii", "ct.mha"):
        if name.endswith(".mha"):
            medfuse.save(medfuse.Volume(arr, np.eye(4)), tmp_path / name)
        else:
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / name))
    names = {p: napari_get_reader(str(tmp_path / p))(str(tmp_path / p))[0][1]["name"]
             for p in (uid.name, "pet.ac.nii.gz", "pet.nac.nii.gz", "mr.T1.nii", "ct.mha")}
    assert names == {uid.name: uid.name, "pet.ac.nii.gz": "pet.ac", "pet.nac.nii.gz": "pet.nac",
                     "mr.T1.nii": "mr.T1", "ct.mha": "ct"}
