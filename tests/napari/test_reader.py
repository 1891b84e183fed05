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



@pytest.mark.parametrize("opened", ["pair.hdr", "pair.img"])
def test_reader_opens_an_analyze_nifti_pair_as_medfuse_load_does(tmp_path, opened):
    """medfuse.load reads .hdr/.img pairs (docs/io.md), but the plugin declined them: napari's own reader took
    them without the geometry."""
    import nibabel as nib

    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [5.0, -6.0, 7.0]
    nib.save(nib.Nifti1Pair(np.arange(60, dtype=np.float32).reshape(3, 4, 5), affine), str(tmp_path / "pair.hdr"))
    data, kwargs, kind = napari_get_reader(str(tmp_path / opened))(str(tmp_path / opened))[0]
    volume = medfuse.load(tmp_path / "pair.hdr")
    assert kind == "image" and kwargs["name"] == "pair"
    np.testing.assert_allclose(kwargs["metadata"]["medfuse"]["affine"], volume.affine)
    assert sorted(np.asarray(data).ravel().tolist()) == list(range(60))
    # Both files of the pair chosen together: one layer, not two.
    both = [str(tmp_path / "pair.hdr"), str(tmp_path / "pair.img")]
    assert len(napari_get_reader(both)(both)) == 1

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


def _layer_voxel(data, kwargs, world_sp_l):
    """Nearest display voxel of a reader layer (3-D, or the last three axes of a 4-D one) at a world position."""
    from medfuse_napari._layers import layer_matrix

    m = layer_matrix(kwargs["scale"][-3:], kwargs["translate"][-3:])
    idx = np.linalg.solve(m, np.r_[world_sp_l, 1.0])[:3]
    return tuple(int(i) for i in np.round(idx))


def test_reader_opens_4d_nifti_as_one_layer_with_a_volume_slider(tmp_path):
    import nibabel as nib

    arr = np.random.default_rng(0).random((6, 5, 4, 3)).astype(np.float32)
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    layers = napari_get_reader(str(path))(str(path))
    assert len(layers) == 1
    data, kwargs, kind = layers[0]
    assert kind == "image" and data.shape == (3, 4, 5, 6) and len(kwargs["scale"]) == 4
    assert kwargs["metadata"]["medfuse"]["n_volumes"] == 3
    for t in range(3):
        volume = medfuse.load_volumes(path)[t]
        lps = volume.index_to_world([1, 2, 3])
        idx = _layer_voxel(data, kwargs, (lps[2], lps[1], lps[0]))
        assert data[(t, *idx)] == volume.array[1, 2, 3] == arr[1, 2, 3, t]


def test_reader_opens_4d_dicom_series(shared):
    folder = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0005")
    volumes = medfuse.load_volumes(folder)
    layers = napari_get_reader(str(folder))(str(folder))
    assert len(layers) == 1
    data, kwargs, _ = layers[0]
    assert data.shape[0] == len(volumes) == 10
    for t in (0, 9):
        lps = volumes[t].index_to_world([10, 20, 5])
        assert data[(t, *_layer_voxel(data, kwargs, (lps[2], lps[1], lps[0])))] == volumes[t].array[10, 20, 5]


def _study(tmp_path, samples_dir, *, nested):
    import shutil

    study = tmp_path / "study"
    study.mkdir()
    for series in ("ct", "pet"):
        if nested:  # PACS export: study/series/files
            shutil.copytree(samples_dir / series, study / series)
        else:  # every file of both series in one folder
            for f in (samples_dir / series).iterdir():
                shutil.copy(f, study / f"{series}_{f.name}")
    return study


@pytest.mark.parametrize("nested", [False, True])
def test_reader_opens_every_series_of_a_study_folder(tmp_path, samples_dir, nested):
    study = _study(tmp_path, samples_dir, nested=nested)
    reader = napari_get_reader(str(study))
    assert reader is not None
    layers = reader(str(study))
    by_modality = {k["metadata"]["medfuse"]["modality"]: (d, k) for d, k, _ in layers}
    assert set(by_modality) == {"CT", "PT"} and len(layers) == 2
    for folder, modality in (("ct", "CT"), ("pet", "PT")):
        data, kwargs = by_modality[modality]
        direct, expected, _ = napari_get_reader(str(samples_dir / folder))(str(samples_dir / folder))[0]
        np.testing.assert_array_equal(data, direct)
        for key in ("scale", "translate", "contrast_limits", "colormap", "blending"):
            assert list(np.atleast_1d(kwargs[key])) == list(np.atleast_1d(expected[key]))
        assert kwargs["name"].startswith("study " + modality)


def test_reader_still_declines_nested_non_dicom_folders(tmp_path):
    (tmp_path / "scans" / "a").mkdir(parents=True)
    (tmp_path / "scans" / "a" / "slice.png").write_bytes(b"\x89PNG" + b"\0" * 200)
    (tmp_path / "scans" / "store.zarr").mkdir()
    (tmp_path / "scans" / "store.zarr" / "x.dcm").write_bytes(b"")
    assert napari_get_reader(str(tmp_path / "scans")) is None


def test_reader_big_endian_nifti(shared):
    import nibabel as nib

    path = shared("data", "spm12-templates", "SPECT.nii")
    img = nib.load(str(path))
    assert img.header.endianness == ">"
    data, kwargs, _ = napari_get_reader(str(path))(str(path))[0]
    assert data.dtype.isnative
    volume = medfuse.load(path)
    ijk = (45, 60, 40)
    lps = volume.index_to_world(ijk)
    assert data[_layer_voxel(data, kwargs, (lps[2], lps[1], lps[0]))] == np.asanyarray(img.dataobj)[ijk] != 0
    lo, hi = kwargs["contrast_limits"]
    assert 0 < lo < hi <= float(volume.array.max())


def test_reader_2d_image_is_a_single_slice(tmp_path):
    import nibabel as nib

    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(30, 40).astype(np.float32), np.eye(4)), str(path))
    data, kwargs, _ = napari_get_reader(str(path))(str(path))[0]
    assert data.shape == (1, 40, 30) and kwargs["contrast_limits"][1] > kwargs["contrast_limits"][0]


@pytest.mark.parametrize("name,content", [("garbage.nii", b"\x01" * 400), ("garbage.nii.gz", b"nope"),
                                          ("empty.dcm", b""), ("bad.nrrd", b"NRRD0004\nfoo\n")])
def test_unreadable_files_are_one_notification(tmp_path, name, content, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    path = tmp_path / name
    path.write_bytes(content)
    assert napari_get_reader(str(path))(str(path)) == [(None,)]
    assert len(shown) == 1 and name in shown[0] and "Fix:" in shown[0]


def test_manifest_is_valid_and_names_existing_commands():
    import importlib
    from pathlib import Path

    from npe2 import PluginManifest

    import medfuse_napari
    from medfuse_napari._reader import _SUFFIXES

    manifest = PluginManifest.from_file(Path(medfuse_napari.__file__).parent / "napari.yaml")
    for command in manifest.contributions.commands:
        module, _, attr = command.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), command.id
    ids = {c.id for c in manifest.contributions.commands}
    used = [r.command for r in manifest.contributions.readers] + [s.command for s in manifest.contributions.sample_data] \
        + [w.command for w in manifest.contributions.widgets]
    assert set(used) <= ids
    (reader,) = manifest.contributions.readers
    assert reader.accepts_directories and {"*" + s for s in _SUFFIXES} <= set(reader.filename_patterns)


def _claimed(name, patterns):
    """npe2's matching: the name with its extension lower-cased against each lower-cased pattern."""
    from fnmatch import fnmatch
    from pathlib import Path

    p = Path(name)
    name = p.name[: len(p.name) - len("".join(p.suffixes))] + "".join(p.suffixes).lower()
    return any(fnmatch(name, pat.lower()) for pat in patterns)


def test_manifest_claims_dicom_file_names_without_taking_napari_builtin_formats():
    """DICOM files named as scanners name them had no reader ("No plugin found capable of reading IM0001"). The
    patterns that offer them must not overlap napari's own reader: an overlap turns every open of such a file
    (.h5, .mp4, .h264...) into a reader-choice dialog."""
    from pathlib import Path

    import napari_builtins
    from npe2 import PluginManifest

    import medfuse_napari

    ours = PluginManifest.from_file(Path(medfuse_napari.__file__).parent / "napari.yaml").contributions.readers[0]
    builtin = PluginManifest.from_file(Path(napari_builtins.__file__).parent / "builtins.yaml")
    extra = [p for p in ours.filename_patterns if p not in {"*.nii", "*.nii.gz", "*.mha", "*.mhd", "*.nrrd",
                                                          "*.nhdr", "*.img", "*.hdr", "*.dcm"}]
    theirs = [p for r in builtin.contributions.readers for p in r.filename_patterns]
    assert len(theirs) > 100
    for pat in theirs:
        if pat.startswith("*."):
            for stem in ("x", "IMG", "scan_01"):
                assert not _claimed(stem + pat[1:], extra), pat
                assert not _claimed(stem + pat[1:].upper(), extra), pat
    for name in ("IM0001", "IM_0001", "im-7", "IMG1", "MR000064", "I0264", "1.3.12.2.1107.5.2.32.35162.1",
                 "i1234.MRDC.12", "slice.IMA", "2.16.840.1.113669.632.20.1234"):
        assert _claimed(name, ours.filename_patterns), name


def test_dicom_files_without_dcm_open_from_napari_by_their_marker(tmp_path, make_napari_viewer):
    """napari finds medfuse's reader for them on its own (plugin=None, as the GUI opens files); a file with the same
    kind of name that is not DICOM is left to others."""
    import shutil

    from pydicom.uid import generate_uid

    write = _slice_writer()
    folder = tmp_path / "export"
    folder.mkdir()
    data = (np.arange(4 * 8 * 10).reshape(4, 8, 10) * 7) % 2000
    uid = generate_uid()
    for k in range(4):
        write(folder / f"IM{k:04d}.dcm", arr=data[k], pos=(0.0, 0.0, 2.0 * k), series_uid=uid, number=k + 1)
    for k in range(4):  # the names a PACS export gives: no extension
        shutil.move(folder / f"IM{k:04d}.dcm", folder / f"IM{k:04d}")
    shutil.copy(folder / "IM0002", tmp_path / "slice.IMA")
    viewer = make_napari_viewer()
    viewer.open(str(folder / "IM0001"), plugin=None)  # as File > Open and drag-and-drop call it
    assert len(viewer.layers) == 1 and viewer.layers[0].data.shape == (4, 8, 10), [l.name for l in viewer.layers]
    assert napari_get_reader(str(tmp_path / "slice.IMA")) is not None
    notes = tmp_path / "notes_v2"
    notes.write_text("not an image")
    assert napari_get_reader(str(notes)) is None


def test_sample_data_command_in_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("medfuse", "phantom")
    assert [l.name for l in viewer.layers] == ["ct", "t1", "t2", "pet", "spect"]
    pet, ct = viewer.layers["pet"], viewer.layers["ct"]
    assert pet.colormap.name == "inferno" and tuple(pet.contrast_limits) == (0.0, 6.0) and pet.blending == "additive"
    assert ct.colormap.name == "gray" and tuple(ct.contrast_limits) == (0.0, 80.0)
    assert viewer.layers["spect"].colormap.name == "hot"


def test_reader_declines_folders_it_cannot_list(tmp_path, monkeypatch):
    from pathlib import Path

    (tmp_path / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    assert napari_get_reader(str(tmp_path)) is None


def test_sample_data_with_a_broken_samples_folder_builds_the_phantom(tmp_path, monkeypatch):
    warned = []
    monkeypatch.setattr("napari.utils.notifications.show_warning", warned.append)
    monkeypatch.setenv("MEDFUSE_SAMPLES", str(tmp_path / "nowhere"))
    layers = load_phantom()
    assert [k["name"] for _, k, _ in layers] == ["ct", "t1", "t2", "pet", "spect"]
    assert len(warned) == 1 and "nowhere" in warned[0]
    # The fix is what a napari user changed, not the command that rewrites a folder.
    assert "correct MEDFUSE_SAMPLES (the folder it names) or unset it, and restart napari" in warned[0]
    assert "python -m medfuse.phantom" not in warned[0]


def test_study_folder_with_one_unreadable_series_opens_the_others(tmp_path, samples_dir, monkeypatch):
    import shutil

    import pydicom
    from pydicom.uid import generate_uid

    warned, errors = [], []
    monkeypatch.setattr("napari.utils.notifications.show_warning", warned.append)
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    study = tmp_path / "study"
    shutil.copytree(samples_dir / "ct", study / "ct")
    (study / "bad").mkdir()
    series_uid = generate_uid()
    for i, f in enumerate(sorted((samples_dir / "pet").iterdir())[:6]):
        ds = pydicom.dcmread(str(f))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        if i == 3:  # one tilted slice: medfuse refuses the series
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
        ds.save_as(str(study / "bad" / f"{i}.dcm"))
    layers = napari_get_reader(str(study))(str(study))
    assert [k["metadata"]["medfuse"]["modality"] for _, k, _ in layers] == ["CT"]
    assert not errors and len(warned) == 1 and "PT" in warned[0] and "orientation" in warned[0]


def test_4d_series_on_different_grids_gives_one_layer_per_volume():
    from medfuse_napari._reader import _series_layers

    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    shifted = np.eye(4)
    shifted[:3, 3] = [0, 0, 10]
    layers = _series_layers([medfuse.Volume(arr, np.eye(4)), medfuse.Volume(arr, shifted)], "dyn")
    assert [k["name"] for _, k, _ in layers] == ["dyn [0]", "dyn [1]"]
    assert all(d.ndim == 3 for d, _, _ in layers)
    assert layers[1][1]["translate"][0] == layers[0][1]["translate"][0] + 10  # S is napari's first axis


def _slice_writer():
    """The synthetic DICOM slice writer of tests/io/test_dicom.py (loaded by path: pytest uses importlib mode)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "io" / "test_dicom.py"
    spec = importlib.util.spec_from_file_location("_medfuse_test_dicom_napari", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._write_slice


def test_opening_one_dicom_slice_opens_its_series(tmp_path, monkeypatch):
    """Dropping one .dcm slice of a classic series on napari showed a one-slice layer. It now opens the series the
    slice belongs to (not the other series in the folder), named after the folder; when that series cannot be
    read (here: slices missing), the slice alone is shown with a warning saying why."""
    from pydicom.uid import generate_uid

    write = _slice_writer()
    folder = tmp_path / "ct_head"
    folder.mkdir()
    uid, other = generate_uid(), generate_uid()
    data = (np.arange(6 * 8 * 10).reshape(6, 8, 10) * 5) % 2000
    for k in range(6):
        write(folder / f"IM{k:03d}.dcm", arr=data[k], pos=(0.0, 0.0, 2.0 * k), series_uid=uid, number=k + 1)
    write(folder / "localizer.dcm", arr=data[0], pos=(0.0, 0.0, 0.0), series_uid=other)
    path = str(folder / "IM003.dcm")
    layers = napari_get_reader(path)(path)
    assert len(layers) == 1
    arr, kwargs, kind = layers[0]
    assert kind == "image" and arr.shape == (6, 8, 10) and kwargs["name"] == "ct_head"
    assert np.array_equal(np.sort(arr.ravel()), np.sort((data - 1024).ravel()))

    gappy = tmp_path / "gappy"
    gappy.mkdir()
    for k in (0, 1, 9):  # a gap of 8 slices is refused for the series
        write(gappy / f"IM{k:03d}.dcm", arr=data[k % 6], pos=(0.0, 0.0, 2.0 * k), series_uid=uid, number=k + 1)
    warned = []
    monkeypatch.setattr("napari.utils.notifications.show_warning", warned.append)
    path = str(gappy / "IM001.dcm")
    layers = napari_get_reader(path)(path)
    assert len(layers) == 1 and layers[0][0].shape[0] == 1 and layers[0][1]["name"] == "IM001"
    assert len(warned) == 1 and "only this file" in warned[0] and "missing" in warned[0]
