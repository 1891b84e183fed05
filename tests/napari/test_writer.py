"""The napari writer: a layer saved from napari keeps its place in the patient (napari's own writers do not)."""

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse.errors import MedfuseError  # noqa: E402
from medfuse_napari._layers import R4, data_to_world  # noqa: E402

pytestmark = pytest.mark.napari


def _oblique_free_nifti(tmp_path):
    """A NIfTI whose voxel axes are permuted and flipped against LPS (napari shows it reordered)."""
    import nibabel as nib

    ras = np.array([[0.0, -2.0, 0.0, 14.0], [0.0, 0.0, 3.0, -9.0], [-1.5, 0.0, 0.0, 31.0], [0.0, 0.0, 0.0, 1.0]])
    arr = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    path = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(arr, ras), str(path))
    return path


def test_a_reordered_layer_saves_as_the_file_held_it(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    src = _oblique_free_nifti(tmp_path)
    layer = viewer.open(str(src), plugin="medfuse")[0]
    assert layer.metadata["medfuse"]["display_grid"] == "reordered"
    out = tmp_path / "out.nii.gz"
    layer.save(str(out), plugin="medfuse")
    back, original = medfuse.load(out), medfuse.load(src)
    np.testing.assert_array_equal(back.array, original.array)  # the file's voxel order, not napari's
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-6)
    # The file the layer came from is never written over, whatever napari's dialog said.
    with pytest.raises(MedfuseError):
        layer.save(str(src), plugin="medfuse")
    np.testing.assert_array_equal(medfuse.load(src).array, original.array)


def test_a_layer_placed_by_a_registration_saves_where_napari_draws_it(make_napari_viewer, samples_dir, tmp_path):
    """The registration the widget applies is a layer affine: the saved volume carries it (voxels untouched),
    so any viewer shows the saved PET where napari showed it."""
    viewer = make_napari_viewer()
    pet = viewer.open(str(samples_dir / "pet"), plugin="medfuse")[0]
    move = np.eye(4)
    move[:3, 3] = [4.0, -7.0, 12.5]  # napari world (S, P, L) mm
    pet.affine = move
    out = tmp_path / "pet_placed.mha"
    pet.save(str(out), plugin="medfuse")
    back = medfuse.load(out)
    original = medfuse.load(samples_dir / "pet")
    np.testing.assert_array_equal(back.array, original.array)
    assert (back.modality, back.unit) == ("PT", "SUVbw")
    # Every display voxel: where napari draws it == where the saved file puts the same value.
    drawn = R4 @ data_to_world(pet)  # display index -> LPS
    corner = drawn @ np.array([2.0, 3.0, 5.0, 1.0])
    value = np.asarray(pet.data)[2, 3, 5]
    ijk = np.linalg.solve(back.affine, corner)[:3]
    assert np.allclose(ijk, np.round(ijk), atol=1e-6)
    assert back.array[tuple(np.round(ijk).astype(int))] == value


def test_layers_that_are_not_volumes_are_refused_clearly(make_napari_viewer, tmp_path):
    """napari itself does not offer this writer for a 2-D layer; called anyway (or with an RGB layer), it says why."""
    from medfuse_napari._writer import write_image

    viewer = make_napari_viewer()
    for layer in (viewer.add_image(np.zeros((5, 6)), name="slice"),
                  viewer.add_image(np.zeros((4, 5, 6, 3), np.uint8), name="colour", rgb=True)):
        data, state = layer.data, layer._get_state()
        with pytest.raises(MedfuseError, match=f"layer '{layer.name}' is not a 3-D greyscale volume"):
            write_image(str(tmp_path / "x.nii.gz"), data, state)
    assert not (tmp_path / "x.nii.gz").exists()


def test_a_4d_series_is_refused_with_the_way_to_save_its_volumes(make_napari_viewer, shared, tmp_path):
    """The GE fMRI series opens as one 4-D layer; its volumes (napari's Split Stack) save with the file geometry."""
    from napari._app_model import get_app_model

    from medfuse_napari._writer import write_image

    folder = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0004")
    viewer = make_napari_viewer()
    series = viewer.open(str(folder), plugin="medfuse")[0]
    with pytest.raises(MedfuseError, match="Split Stack"):
        write_image(str(tmp_path / "x.nii.gz"), series.data, series._get_state())
    assert not (tmp_path / "x.nii.gz").exists()
    viewer.layers.selection.active = series
    get_app_model().commands.execute_command("napari.layer.split_stack").result()
    last = viewer.layers[-1]
    written = write_image(str(tmp_path / "last.nii.gz"), last.data, last._get_state())
    back, truth = medfuse.load(written[0]), medfuse.load_volumes(folder)[-1]
    np.testing.assert_allclose(back.affine, truth.affine, atol=1e-4)
    np.testing.assert_array_equal(back.array, truth.array)
