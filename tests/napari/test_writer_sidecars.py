"""The writer's provenance sidecars: never another output's, never a false one left behind, no series description.

Before: saving ``fused.mha`` after ``fused.nii.gz`` silently took over ``fused.json`` (the CLI refuses that);
saving a layer as read over a fused output left the old ``fused.json`` claiming a fusion with a hash that no
longer matched; and a DICOM layer the reader named by modality + series description (its folder name held a
patient identifier) carried that description into ``parameters.inputs``, ``grid``, ``layer`` and the
registration's ``to``.
"""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse import provenance  # noqa: E402
from medfuse.errors import OutputExistsError  # noqa: E402

pytestmark = pytest.mark.napari

DESCRIPTION = "ax_asc_35sl wb"  # free text; the reader puts it in the layer name


def _volume(seed=0):
    return np.random.default_rng(seed).random((6, 7, 8)).astype(np.float32)


def _fused_attributes(tmp_path):
    """A writer's ``attributes`` for a layer medfuse fused (so it gets a sidecar)."""
    src = tmp_path / "in.nii.gz"
    if not src.exists():
        medfuse.save(medfuse.Volume(_volume(9), np.eye(4), modality="MR"), src)
    return {"name": "fused (mean)",
            "metadata": {"medfuse": {"provenance": {"sources": [str(src)], "fusion": {"method": "mean"}}}}}


def _write(path, data, attributes):
    from medfuse_napari._writer import write_image

    return write_image(str(path), data, attributes)


# ------------------------------------------------------------------------------ 1. another output's sidecar
def test_a_second_output_of_the_same_name_does_not_take_over_the_first_ones_sidecar(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    attrs = _fused_attributes(tmp_path)
    _write(out / "fused.nii.gz", _volume(), attrs)
    before = (out / "fused.json").read_text()
    assert json.loads(before)["output"]["path"].endswith("fused.nii.gz")

    with pytest.raises(OutputExistsError, match="belongs to fused.nii.gz") as info:
        _write(out / "fused.mha", _volume(1), attrs)
    assert "Fix:" in str(info.value) and "another output name" in str(info.value)
    assert (out / "fused.json").read_text() == before  # fused.nii.gz keeps its record
    assert not (out / "fused.mha").exists()  # refused before the image: never an image without its record
    assert provenance.read_sidecar(out / "fused.nii.gz")["output"]["sha256"] == provenance.hash_path(
        out / "fused.nii.gz")

    # Its own record is replaced with the image (napari's dialog asked about the image).
    written = _write(out / "fused.nii.gz", _volume(2), attrs)
    assert written == [str(out / "fused.nii.gz"), str(out / "fused.json")]
    assert provenance.read_sidecar(out / "fused.nii.gz")["output"]["sha256"] == provenance.hash_path(
        out / "fused.nii.gz")
    # A record whose output is gone is stale: the new output of that name takes it over.
    (out / "fused.nii.gz").unlink()
    _write(out / "fused.mha", _volume(3), attrs)
    assert provenance.read_sidecar(out / "fused.mha")["output"]["path"].endswith("fused.mha")


# ------------------------------------------------------------------------------ 2. a stale, false record
def test_a_layer_saved_as_read_over_a_fused_output_removes_its_now_false_record(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    _write(out / "fused.nii.gz", _volume(), _fused_attributes(tmp_path))
    assert (out / "fused.json").exists()

    written = _write(out / "fused.nii.gz", _volume(5), {"name": "mr"})  # as read: no record of its own
    assert written == [str(out / "fused.nii.gz")]
    assert not (out / "fused.json").exists()  # it claimed a mean fusion, with another file's hash
    np.testing.assert_array_equal(medfuse.load(out / "fused.nii.gz").array, _volume(5))


def test_only_the_replaced_outputs_own_record_is_removed(tmp_path):
    """Never someone's JSON, nor the record of another output sharing the name; a record whose output name was
    blanked (it quoted the patient) is recognised by the hash of the file it described."""
    out = tmp_path / "o"
    out.mkdir()
    attrs = _fused_attributes(tmp_path)
    _write(out / "fused.nii.gz", _volume(), attrs)
    record = (out / "fused.json").read_text()
    _write(out / "fused.mha", _volume(1), {"name": "mr"})  # shares the name: fused.json is fused.nii.gz's
    assert (out / "fused.json").read_text() == record

    (out / "notes.json").write_text('{"mine": 1}')
    _write(out / "notes.nii.gz", _volume(1), {"name": "mr"})
    assert json.loads((out / "notes.json").read_text()) == {"mine": 1}

    # The record as written for an output named after the patient: its name blanked, its hash kept.
    _write(out / "x.nii.gz", _volume(), attrs)
    blanked = json.loads((out / "x.json").read_text())
    blanked["output"]["path"] = str(out / "[removed].nii.gz")
    (out / "x.json").write_text(json.dumps(blanked))
    _write(out / "x.nii.gz", _volume(4), {"name": "mr"})
    assert not (out / "x.json").exists()


# ------------------------------------------------------------------------------ 3. series descriptions
@pytest.fixture
def described(samples_dir, tmp_path):
    """The sample PET as a PACS export folder named after the patient, with a series description."""
    pydicom = pytest.importorskip("pydicom")
    folder = tmp_path / "in" / "MRN998877_DOE"
    folder.mkdir(parents=True)
    for f in sorted((samples_dir / "pet").iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.SeriesDescription = "DOE^JOHN", "MRN998877", DESCRIPTION
        ds.save_as(folder / f.name)
    shutil.copy(samples_dir / "mr_t1.nii.gz", tmp_path / "in" / "mr_t1.nii.gz")
    return folder, tmp_path / "in" / "mr_t1.nii.gz"


def _names_in(record):
    return [*record["parameters"]["inputs"], record["parameters"]["grid"], record["layer"],
            *record["layer_provenance"]["fusion"]["inputs"], record["layer_provenance"]["fusion"]["grid"]]


def test_layer_names_from_a_series_description_are_blanked_in_sidecars(make_napari_viewer, described, tmp_path,
                                                                       fuse_in_widget):
    from medfuse.phantom import load_ground_truth
    from medfuse_napari._layers import lps_to_world

    folder, mr_file = described
    viewer = make_napari_viewer()
    mr = viewer.open(str(mr_file), plugin="medfuse")[0]
    pet = viewer.open(str(folder), plugin="medfuse")[0]
    assert pet.name == f"PT {DESCRIPTION}"  # the reader's name: modality + description
    pet.affine = lps_to_world(np.linalg.inv(load_ground_truth()["mr_to_pet"]))
    _, fused = fuse_in_widget(viewer, pet, mr, "mean")
    assert fused.metadata["medfuse"]["provenance"]["fusion"]["inputs"] == [pet.name, mr.name]

    fused.save(str(tmp_path / "fused.nii.gz"))
    text = (tmp_path / "fused.json").read_text(encoding="utf-8")
    assert "ax_asc" not in text
    record = json.loads(text)
    assert record["parameters"]["inputs"] == ["PT [removed]", "mr_t1"]  # the modality and other names kept
    assert record["parameters"]["grid"] == "PT [removed]" and record["layer"] == "fused (mean)"

    # The registered layer itself, and a layer registered onto it (the widget's report names the fixed layer).
    pet.save(str(tmp_path / "pet_on_mr.nii.gz"))
    record = json.loads((tmp_path / "pet_on_mr.json").read_text(encoding="utf-8"))
    assert record["layer"] == "PT [removed]"
    mr.metadata["medfuse"]["registration"] = {"to": pet.name, "metric_after": -0.5}  # as the widget leaves it
    mr.save(str(tmp_path / "mr_on_pet.nii.gz"))
    text = (tmp_path / "mr_on_pet.json").read_text(encoding="utf-8")
    assert "ax_asc" not in text and json.loads(text)["registration"]["to"] == "PT [removed]"

    # The input layer closed before saving: the description is found in the series' own headers.
    viewer.layers.remove(pet)
    fused.save(str(tmp_path / "later.nii.gz"))
    text = (tmp_path / "later.json").read_text(encoding="utf-8")
    assert "ax_asc" not in text and json.loads(text)["parameters"]["inputs"] == ["PT [removed]", "mr_t1"]
    for name in _names_in(json.loads(text)):
        assert "MRN998877" not in name and "DOE" not in name


def test_a_file_named_after_the_patient_registered_onto_their_dicom_is_blanked_in_its_sidecar(
        make_napari_viewer, samples_dir, tmp_path, register_in_dock):
    """A NIfTI holds no patient module: a PET read from ``DOE_JOHN_MRN998877_pet.nii.gz`` and registered onto the
    patient's DICOM CT was saved with a sidecar quoting its file name (layer, source, inputs) verbatim; only the
    CT's headers name the patient, and they were not consulted."""
    pydicom = pytest.importorskip("pydicom")
    from medfuse_napari._widget import MedfuseWidget

    study = tmp_path / "study"
    (study / "ct").mkdir(parents=True)
    for f in sorted((samples_dir / "ct").iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = "DOE^JOHN", "MRN998877"
        ds.save_as(study / "ct" / f.name)
    pet_file = study / "DOE_JOHN_MRN998877_pet.nii.gz"
    medfuse.save(medfuse.load(samples_dir / "pet"), pet_file)
    viewer = make_napari_viewer()
    ct = viewer.open(str(study / "ct"), plugin="medfuse")[0]
    pet = viewer.open(str(pet_file), plugin="medfuse")[0]
    widget = MedfuseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="medfuse")
    register_in_dock(widget, ct.name, pet.name)
    assert pet.metadata["medfuse"]["registration"]["to"] == ct.name
    written = pet.save(str(tmp_path / "pet_on_ct.nii.gz"), plugin="medfuse")
    assert written and (tmp_path / "pet_on_ct.json").is_file()
    text = (tmp_path / "pet_on_ct.json").read_text(encoding="utf-8")
    assert "DOE" not in text.upper() and "MRN998877" not in text, text
    record = json.loads(text)
    assert record["layer"] == "[removed]_[removed]_pet"  # name and ID blanked, the rest of the name kept
    assert record["inputs"][0]["sha256"] == provenance.hash_path(pet_file)  # still the file's record


# ------------------------------------------------------------------------------ 4. volumes of a 4-D series
def test_a_split_stack_part_saved_unmoved_records_its_volume_index(make_napari_viewer, tmp_path):
    """A part of a 4-D NIfTI (napari's Split Stack) saved as read: its file alone cannot say which volume it is, so
    it gets a sidecar with ``volume_index``. Before: no sidecar, nothing recorded the volume."""
    import nibabel as nib
    from napari.layers.utils.stack_utils import stack_to_images

    rng = np.random.default_rng(4)
    arr = np.stack([rng.random((6, 5, 4)).astype(np.float32) + t for t in range(3)], axis=-1)
    src = tmp_path / "series4d.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0])), str(src))
    viewer = make_napari_viewer()
    parts = stack_to_images(viewer.open(str(src), plugin="medfuse")[0], 0)
    for t in (2, 0):
        written = parts[t].save(str(tmp_path / f"vol{t}.nii.gz"))
        assert written == [str(tmp_path / f"vol{t}.nii.gz"), str(tmp_path / f"vol{t}.json")]
        img = nib.load(written[0])
        np.testing.assert_array_equal(np.asarray(img.dataobj), arr[..., t])  # nibabel: the file's volume t
        np.testing.assert_allclose(img.affine, np.diag([2.0, 2.0, 3.0, 1.0]), atol=1e-6)
        record = json.loads((tmp_path / f"vol{t}.json").read_text())
        assert record["layer_provenance"]["volume_index"] == t
        assert record["placement_lps"] is None  # saved unmoved
        assert record["inputs"][0]["sha256"] == provenance.hash_path(src)


def test_a_volume_of_the_ge_epi_series_saved_unmoved_records_its_volume_index(make_napari_viewer, shared, tmp_path):
    """The same for a real 4-D DICOM series (GE EPI), split with napari's own Split Stack command."""
    from napari._app_model import get_app_model

    folder = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0005")
    viewer = make_napari_viewer()
    series = viewer.open(str(folder), plugin="medfuse")[0]
    n = series.data.shape[0]
    viewer.layers.selection.active = series
    get_app_model().commands.execute_command("napari.layer.split_stack").result()
    part = viewer.layers[-2]  # the volume before the last
    written = part.save(str(tmp_path / "vol.nii.gz"))
    assert len(written) == 2, written
    record = json.loads((tmp_path / "vol.json").read_text())
    assert record["layer_provenance"]["volume_index"] == n - 2
    truth = medfuse.load(folder, volume_index=n - 2)
    np.testing.assert_array_equal(medfuse.load(written[0]).array, truth.array)
    # A plain 3-D layer saved as read still gets none (nothing to record).
    plain = tmp_path / "plain.nii.gz"
    medfuse.save(medfuse.Volume(_volume(1), np.eye(4), modality="MR"), plain)
    layer = viewer.open(str(plain), plugin="medfuse")[0]
    assert layer.save(str(tmp_path / "plain_out.nii.gz")) == [str(tmp_path / "plain_out.nii.gz")]


def test_a_name_typed_without_its_ending_does_not_replace_that_file_and_says_how_to(tmp_path):
    """The dialog asked about 'mine', not 'mine.nii.gz': refused, with a fix in dialog terms (it said "pass
    overwrite=True", which a napari user cannot do)."""
    (tmp_path / "mine.nii.gz").write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match=r"mine\.nii\.gz exists: the dialog asked about the name typed, "
                                                r"'mine', not about it") as info:
        _write(tmp_path / "mine", _volume(), {"name": "mine"})
    assert "type the whole name, 'mine.nii.gz', to replace it" in info.value.fix
    assert "overwrite=True" not in str(info.value)
    assert (tmp_path / "mine.nii.gz").read_bytes() == b"precious"
    # Typed whole, the dialog has asked: replaced.
    _write(tmp_path / "mine.nii.gz", _volume(), {"name": "mine"})
    assert medfuse.load(tmp_path / "mine.nii.gz").shape == (6, 7, 8)


# ------------------------------------------------------------------------------ 5. nothing that gives the weight back
def test_a_pet_layers_sidecar_holds_neither_its_dose_beside_the_factor_nor_the_body_given(tmp_path, samples_dir):
    """The writer's ``layer_provenance`` kept the whole provenance: the injected dose beside the SUV factor gives
    the patient's weight back exactly, and a ``body=`` at loading is in the history as the values themselves."""
    pet = medfuse.load(samples_dir / "pet", body={"weight_kg": 82.5, "height_m": 1.81, "sex": "F"})
    moved = medfuse.resample(pet, medfuse.Volume(np.zeros((20, 20, 10), np.uint8), pet.affine))  # a step on
    given = [h for h in moved.provenance["history"] if h.get("step") == "suv"]
    assert given and given[0]["body"]["PatientWeight"] == 82.5  # there to be left out
    assert moved.provenance["pet_acquisition"]["injected_mbq"] > 0
    record = {**moved.provenance, "sources": [str(samples_dir / "pet")], "fusion": {"method": "mean"}}
    attrs = {"name": "PT", "metadata": {"medfuse": {"provenance": record}}}
    _write(tmp_path / "pet.nii.gz", moved.array, attrs)
    text = (tmp_path / "pet.json").read_text()
    layer = json.loads(text)["layer_provenance"]
    assert "injected_mbq" not in layer["pet_acquisition"] and layer["suv_factor"] == pet.provenance["suv_factor"]
    assert [h for h in layer["history"] if h.get("step") == "suv"] == [{"step": "suv", "kind": given[0]["kind"]}]
    assert "82.5" not in text and "1.81" not in text
