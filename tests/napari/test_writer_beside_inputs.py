"""The writer refuses only the open inputs themselves (and files inside an input folder), never
a new file beside them, which is where a reader saves results next to a study."""

import shutil

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse.errors import OutputExistsError  # noqa: E402

pytestmark = pytest.mark.napari


def test_a_new_file_beside_open_inputs_is_saved(make_napari_viewer, samples_dir, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(samples_dir / "mr_t1.nii.gz", study / "mr_t1.nii.gz")
    shutil.copytree(samples_dir / "pet", study / "pet")
    viewer = make_napari_viewer()
    t1 = viewer.open(str(study / "mr_t1.nii.gz"), plugin="medfuse")[0]
    pet = viewer.open(str(study / "pet"), plugin="medfuse")[0]
    # Beside the MR file and beside the PET's DICOM folder: allowed.
    assert t1.save(str(study / "t1_copy.nii.gz")) == [str(study / "t1_copy.nii.gz")]
    assert pet.save(str(study / "pet.nii.gz"))[0] == str(study / "pet.nii.gz")
    np.testing.assert_allclose(medfuse.load(study / "t1_copy.nii.gz").affine,
                               medfuse.load(study / "mr_t1.nii.gz").affine)
    # The inputs themselves, and a file inside the DICOM folder: refused.
    with pytest.raises(OutputExistsError):
        pet.save(str(study / "mr_t1.nii.gz"))
    with pytest.raises(OutputExistsError):
        t1.save(str(study / "pet" / "x.nii.gz"))


def test_a_file_saved_in_an_opened_study_folder_beside_its_series_folders(make_napari_viewer, samples_dir, tmp_path):
    """Opening a study folder (one sub-folder per series) and saving the result in it, beside the series
    folders: no series' file is touched, so it is written; inside a series folder it is refused."""
    study = tmp_path / "patient01"
    study.mkdir()
    shutil.copytree(samples_dir / "pet", study / "pet")
    shutil.copytree(samples_dir / "ct", study / "ct")
    viewer = make_napari_viewer()
    layers = viewer.open(str(study), plugin="medfuse")
    assert len(layers) == 2

    assert layers[0].save(str(study / "saved.nii.gz"))[0] == str(study / "saved.nii.gz")
    with pytest.raises(OutputExistsError):
        layers[0].save(str(study / "pet" / "x.nii.gz"))


def test_the_sidecar_of_a_saved_layer_holds_no_series_description(make_napari_viewer, samples_dir, tmp_path):
    """A series description is free text that may name the patient or a physician: the README promises it never
    reaches a sidecar (the CLI's do not hold it), but a registered DICOM layer's sidecar copied it."""
    import json

    from medfuse.phantom import load_ground_truth
    from medfuse_napari._layers import lps_to_world

    shutil.copytree(samples_dir / "pet", tmp_path / "pet")
    viewer = make_napari_viewer()
    pet = viewer.open(str(tmp_path / "pet"), plugin="medfuse")[0]
    assert pet.metadata["medfuse"]["provenance"]["series_description"]  # "phantom FDG PET"
    pet.affine = lps_to_world(np.linalg.inv(load_ground_truth()["mr_to_pet"]))  # placed: a sidecar is written
    written = pet.save(str(tmp_path / "pet_on_mr.nii.gz"))
    text = (tmp_path / "pet_on_mr.json").read_text(encoding="utf-8")
    assert written[1] == str(tmp_path / "pet_on_mr.json")
    assert "description" not in text and "phantom FDG PET" not in text
    assert json.loads(text)["layer_provenance"]["reader"] == "medfuse.dicom"  # the rest is kept
