"""Getting results out of napari: the layers the plugin makes, saved the ways napari saves them, reopened.

napari saves through ``napari.save_layers`` / ``viewer.layers.save`` / ``layer.save``: with no ``plugin=`` it
picks a writer by the file's ending; the *File › Save Selected Layers* dialog passes the writer of the chosen
filter and the name as typed.
"""

import hashlib
import json
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import medfuse  # noqa: E402
from medfuse.errors import MedfuseError, OutputExistsError, OutputWriteError  # noqa: E402
from medfuse.phantom import load_ground_truth  # noqa: E402
from medfuse_napari._layers import R4, data_to_world, lps_to_world  # noqa: E402

pytestmark = pytest.mark.napari


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _medfuse_writer():
    """The writer contribution napari's save dialog passes when 'medfuse volume with geometry' is the filter."""
    from npe2 import PluginManager

    return PluginManager.instance().get_manifest("medfuse").contributions.writers[0]


def _assert_drawn_where_saved(layer, path):
    """Every sampled display voxel: the value napari draws at a world point is the file's value there (nibabel)."""
    import nibabel as nib

    img = nib.load(str(path))
    file_arr, ras = np.asarray(img.dataobj), img.affine
    to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ R4 @ data_to_world(layer)  # display index -> RAS mm
    arr = np.asarray(layer.data)
    idx = np.random.default_rng(0).integers(0, arr.shape, size=(200, 3))
    ijk = np.linalg.solve(ras, to_ras @ np.c_[idx, np.ones(len(idx))].T)[:3].T
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-4)  # the same grid, voxel for voxel
    np.testing.assert_array_equal(file_arr[tuple(np.round(ijk).astype(int).T)], arr[tuple(idx.T)])


@pytest.mark.parametrize("how", ["layer.save", "viewer.layers.save", "plugin=medfuse"])
def test_why_a_layer_is_not_saved_reaches_the_user(make_napari_viewer, tmp_path, how):
    """napari 0.9.2 turns a ValueError from the writer it picked into 'No data written! A plugin could not be
    found' and returns []: the writer's reason must not be a ValueError."""
    viewer = make_napari_viewer()
    colour = viewer.add_image(np.zeros((4, 5, 6, 3), np.uint8), name="colour", rgb=True)  # a pseudo-colour fusion
    huge = viewer.add_image(np.full((3, 4, 5), 2 ** 60, np.int64), name="huge")  # medfuse.save refuses these values
    out = tmp_path / "x.nii.gz"
    for layer, reason in ((colour, "not a 3-D greyscale volume"), (huge, "cannot be stored exactly")):
        viewer.layers.selection = {layer}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "No data written!" would be a warning
            with pytest.raises(MedfuseError, match=reason) as info:
                if how == "layer.save":
                    layer.save(str(out))
                elif how == "viewer.layers.save":
                    viewer.layers.save(str(out), selected=True)
                else:
                    layer.save(str(out), plugin="medfuse")
        assert "Fix:" in str(info.value)
    assert not out.exists()


@pytest.fixture
def mr_pet(make_napari_viewer, samples_dir, tmp_path):
    """The sample MR and PET (copies: a wrong writer must never touch the samples), PET placed on the MR."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(samples_dir / "mr_t1.nii.gz", src / "mr_t1.nii.gz")
    shutil.copytree(samples_dir / "pet", src / "pet")
    viewer = make_napari_viewer()
    t1 = viewer.open(str(src / "mr_t1.nii.gz"), plugin="medfuse")[0]
    pet = viewer.open(str(src / "pet"), plugin="medfuse")[0]
    # What a registration in the widget leaves: the PET layer's affine (the phantom's ground truth here).
    pet.affine = lps_to_world(np.linalg.inv(load_ground_truth()["mr_to_pet"]))
    return viewer, t1, pet, src


def test_fused_and_registered_layers_round_trip_with_geometry_unit_and_provenance(mr_pet, tmp_path,
                                                                                   fuse_in_widget):
    from napari import save_layers

    viewer, t1, pet, src = mr_pet
    panel, fused = fuse_in_widget(viewer, t1, pet, "mean")
    assert fused.name == "fused (mean)", panel.status.text()

    (f_out,) = [p for p in save_layers(str(tmp_path / "fused.nii.gz"), [fused]) if p.endswith(".nii.gz")]
    _assert_drawn_where_saved(fused, f_out)
    back, base = medfuse.load(f_out), medfuse.load(src / "mr_t1.nii.gz")
    assert back.shape == base.shape  # the base file's grid, in its own voxel order
    np.testing.assert_allclose(back.affine, base.affine, atol=1e-5)
    side = json.loads((tmp_path / "fused.json").read_text())  # how it was made goes with it, as from the CLI
    assert side["medfuse_provenance"] and side["parameters"]["method"] == "mean"
    assert side["parameters"]["inputs"] == [t1.name, pet.name]
    assert {i["path"] for i in side["inputs"]} == set(fused.metadata["medfuse"]["provenance"]["sources"])
    assert all(len(i["sha256"]) == 64 for i in side["inputs"])
    assert side["output"]["sha256"] == medfuse.provenance.hash_path(f_out)

    p_out = save_layers(str(tmp_path / "pet_on_mr.nii.gz"), [pet])[0]
    _assert_drawn_where_saved(pet, p_out)  # the registration is in the affine, voxels untouched
    back = medfuse.load(p_out)
    assert (back.modality, back.unit) == ("PT", "SUVbw")
    side = json.loads((tmp_path / "pet_on_mr.json").read_text())
    np.testing.assert_allclose(side["placement_lps"], R4 @ pet.affine.affine_matrix @ R4, atol=1e-9)
    assert not any("uid" in k.lower() for k in side["layer_provenance"])

    # A JSON of the user's where the sidecar would go: refused before anything is written.
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    with pytest.raises(OutputExistsError, match="JSON"):
        save_layers(str(tmp_path / "notes.nii.gz"), [fused])
    assert not (tmp_path / "notes.nii.gz").exists()
    assert json.loads((tmp_path / "notes.json").read_text()) == {"mine": 1}


def test_a_file_an_open_layer_was_read_from_is_never_written_over(mr_pet):
    """`viewer.layers['fused'].save('mr_t1.nii.gz')` from the console: napari asks nothing; the MR file stays."""
    viewer, t1, pet, src = mr_pet
    before = _md5(src / "mr_t1.nii.gz")
    other = viewer.add_image(np.ones((4, 5, 6), np.float32), name="scratch")  # not derived from the MR at all
    for layer in (other, t1):
        with pytest.raises(OutputExistsError, match="open in napari was read from"):
            layer.save(str(src / "mr_t1.nii.gz"))
    with pytest.raises(OutputExistsError):
        other.save(str(src / "pet" / "x.nii.gz"))  # inside the DICOM folder the PET was read from
    assert _md5(src / "mr_t1.nii.gz") == before
    assert not (src / "pet" / "x.nii.gz").exists()


def test_the_save_dialog_with_a_plain_name_writes_nifti_not_a_dicom_folder(mr_pet, tmp_path):
    """The dialog passes the name as typed (its default is the layer's name): 'pet' must not become a folder of
    DICOM slices, and a file the dialog did not ask about is not replaced."""
    viewer, _, pet, _ = mr_pet
    viewer.layers.selection = {pet}
    out = tmp_path / "out"
    out.mkdir()
    saved = viewer.layers.save(str(out / "pet.ac"), selected=True, _writer=_medfuse_writer())
    assert saved[0] == str(out / "pet.ac.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == ["pet.ac.json", "pet.ac.nii.gz"]
    _assert_drawn_where_saved(pet, saved[0])
    before = _md5(out / "pet.ac.nii.gz")
    with pytest.raises(OutputExistsError, match="exists"):
        viewer.layers.save(str(out / "pet.ac"), selected=True, _writer=_medfuse_writer())
    assert _md5(out / "pet.ac.nii.gz") == before
    with pytest.raises(MedfuseError, match="not .tif"):  # another format's name with this writer's filter
        viewer.layers.save(str(out / "pet.tif"), selected=True, _writer=_medfuse_writer())
    # MetaImage header + data pair, picked by its ending (napari found no writer for .mhd before).
    written = pet.save(str(out / "pet.mhd"))
    assert written[0] == str(out / "pet.mhd") and (out / "pet.raw").exists()
    np.testing.assert_allclose(medfuse.load(written[0]).affine, medfuse.load(saved[0]).affine, atol=1e-5)


def test_the_save_dialog_writes_with_geometry_or_says_why(mr_pet, tmp_path, monkeypatch):
    """*File › Save Selected Layers* (the dialog answered by a patch): the file is written with its geometry; a
    folder it cannot write in is an OutputWriteError saying so (napari shows it as an error notification)."""
    import errno
    import tempfile

    from napari.plugins._npe2 import file_extensions_string_for_layers
    from qtpy.QtWidgets import QFileDialog

    viewer, _, pet, _ = mr_pet
    viewer.layers.selection = {pet}
    medfuse_filter = file_extensions_string_for_layers([pet])[0].split(";;")[0]
    assert "medfuse volume with geometry" in medfuse_filter  # the first filter, the dialog's default
    target = tmp_path / "pet_saved.nii.gz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), medfuse_filter))
    viewer.window._qt_viewer._save_layers_dialog(selected=True)
    _assert_drawn_where_saved(pet, target)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    target.unlink()
    monkeypatch.setattr(tempfile, "mkstemp", denied)  # what a read-only folder answers (root bypasses chmod)
    with pytest.raises(OutputWriteError, match="permission denied"):
        viewer.window._qt_viewer._save_layers_dialog(selected=True)
    assert not target.exists()


def test_a_fused_layer_is_saved_in_the_base_files_voxel_order(make_napari_viewer, shared, tmp_path, fuse_in_widget):
    """SPM12's T1 (LAS, 91 x 109 x 91) fused with its SPECT in the widget, then saved: T1's own shape, affine and
    voxel order, as ``medfuse fuse T1.nii SPECT.nii`` writes it. Before: napari's display order (axcodes S, P, L),
    equal in size, so a voxel-wise use beside T1.nii (numpy, fslmaths) combined transposed data silently."""
    import nibabel as nib

    t1_file = shared("data", "spm12-templates", "T1.nii")
    spect_file = shared("data", "spm12-templates", "SPECT.nii")
    viewer = make_napari_viewer()
    t1 = viewer.open(str(t1_file), plugin="medfuse")[0]
    spect = viewer.open(str(spect_file), plugin="medfuse")[0]
    assert t1.metadata["medfuse"]["display_grid"] == "reordered"
    panel, fused = fuse_in_widget(viewer, t1, spect, "mean")
    assert fused.name == "fused (mean)", panel.status.text()

    out = fused.save(str(tmp_path / "fused.nii.gz"))[0]
    img, ref = nib.load(out), nib.load(str(t1_file))
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(ref.affine) == ("L", "A", "S")
    # What the CLI computes (SPECT resampled onto T1's grid, then fused), written by medfuse.save.
    base = medfuse.load(t1_file)
    expected = medfuse.fuse(base, medfuse.resample(medfuse.load(spect_file), base), method="mean")
    medfuse.save(expected, tmp_path / "cli.nii.gz")
    want = np.asarray(nib.load(str(tmp_path / "cli.nii.gz")).dataobj)
    np.testing.assert_allclose(np.asarray(img.dataobj), want, rtol=1e-4, atol=1e-4)
    _assert_drawn_where_saved(fused, out)
