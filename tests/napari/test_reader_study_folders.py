"""A study folder opened whole: the PET drawn over the anatomy, and layer names that tell the series apart."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("napari")

import medfuse  # noqa: E402
from medfuse_napari import napari_get_reader  # noqa: E402

pytestmark = pytest.mark.napari


def _copy_series(source, target, *, number=None, description=None, uid=True, **header):
    """Copy a sample DICOM series into ``target`` (a folder, or a file-name prefix in a flat folder) as another
    series: a new SeriesInstanceUID, and the SeriesNumber / SeriesDescription / other header values given."""
    import pydicom
    from pydicom.uid import generate_uid

    series_uid = generate_uid() if uid else None
    files = sorted(source.iterdir())
    for f in files:
        ds = pydicom.dcmread(str(f))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if series_uid:
            ds.SeriesInstanceUID = series_uid
        if number is not None:
            ds.SeriesNumber = number
        if description is not None:
            ds.SeriesDescription = description
        for key, value in header.items():
            setattr(ds, key, value)
        if target.is_dir():
            ds.save_as(str(target / f.name))
        else:  # a flat PACS export: every series' files side by side
            ds.save_as(str(target.parent / f"{target.name}_{f.name}"))
    return series_uid


def _by_uid(layers):
    return {k["metadata"]["medfuse"]["provenance"]["series_uid"]: k for _, k, _ in layers}


def test_a_pet_mr_study_opens_with_the_pet_on_top_and_one_anatomical_layer_shown(tmp_path, samples_dir,
                                                                                 make_napari_viewer):
    # Series folders as a hybrid scanner exports them: the PET's folder sorts first. napari adds a reader's layers
    # bottom up, so the PET lay under two opaque anatomical layers and no colour was drawn at all.
    study = tmp_path / "petct"
    for folder in ("1_pet", "2_ct", "3_ct_bone"):
        (study / folder).mkdir(parents=True)
    pet_uid = _copy_series(samples_dir / "pet", study / "1_pet", number=2, description="PET AC")
    ct_uid = _copy_series(samples_dir / "ct", study / "2_ct", number=3, description="CT head")
    bone_uid = _copy_series(samples_dir / "ct", study / "3_ct_bone", number=4, description="CT bone")
    layers = napari_get_reader(str(study))(str(study))
    uids = [k["metadata"]["medfuse"]["provenance"]["series_uid"] for _, k, _ in layers]
    assert uids == [ct_uid, bone_uid, pet_uid]  # anatomy in scan order, then the functional series on top
    shown = {uid: k.get("visible", True) for uid, k in _by_uid(layers).items()}
    assert shown == {ct_uid: True, bone_uid: False, pet_uid: True}  # the second CT would hide the first one

    viewer = make_napari_viewer(show=True)  # a shown canvas for the screenshot
    opened = viewer.open(str(study), plugin="medfuse")
    assert [l.metadata["medfuse"]["modality"] for l in viewer.layers] == ["CT", "CT", "PT"]
    assert [l.visible for l in viewer.layers] == [True, False, True]
    pet = opened[-1]
    centre = np.asarray(pet.data.shape) // 2  # inside the PET's head, where it holds activity
    viewer.dims.set_point(range(3), tuple(pet.data_to_world(centre)))
    viewer.reset_view()
    img = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    coloured = int((np.abs(img[..., 0] - img[..., 2]) > 60).sum())  # inferno over grey: red far above blue
    pet.visible = False
    img = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    assert coloured > 2000 and int((np.abs(img[..., 0] - img[..., 2]) > 60).sum()) == 0  # the colour is the PET's


def test_series_of_a_flat_folder_are_named_by_number_and_description(tmp_path, samples_dir):
    # A flat PACS export of several anatomical series and a PET opened as `flat MR #1` ... `flat MR #6`. The
    # SeriesNumber is named only where the description alone does not tell two series apart.
    flat = tmp_path / "flat"
    flat.mkdir()
    uids = {
        _copy_series(samples_dir / "ct", flat / "a", number=2, description="t1_in"): "flat CT t1_in",
        _copy_series(samples_dir / "ct", flat / "b", number=3, description="t1_opp"): "flat CT t1_opp",
        _copy_series(samples_dir / "ct", flat / "c", number=4, description="  t1   W\x1b "): "flat CT t1 W",
        _copy_series(samples_dir / "pet", flat / "d", number=8, description="PET_AC"): "flat PT PET_AC",
        _copy_series(samples_dir / "ct", flat / "g", number=6, description="t2"): "flat CT series 6 t2",
        _copy_series(samples_dir / "ct", flat / "h", number=7, description="t2"): "flat CT series 7 t2",
    }
    # Two series alike in number and description: told apart by their number as `medfuse info` lists them.
    twins = [_copy_series(samples_dir / "ct", flat / p, number=5, description="loc") for p in ("e", "f")]
    listed = {s.series_uid: i for i, s in enumerate(medfuse.scan(flat), start=1)}
    uids.update({uid: f"flat CT series 5 loc #{listed[uid]}" for uid in twins})
    layers = napari_get_reader(str(flat))(str(flat))
    assert {uid: k["name"] for uid, k in _by_uid(layers).items()} == uids
    assert layers[-1][1]["metadata"]["medfuse"]["modality"] == "PT"


def test_study_layer_names_leave_out_what_names_the_patient(tmp_path, samples_dir):
    # The folder is named after the patient and one description holds the patient ID: those parts are left out
    # (the sub-folders and the CT's own description still name each series).
    pid = "PID77441"
    study = tmp_path / f"DOE_JANE_{pid}"
    for folder in ("ct", "pet"):
        (study / folder).mkdir(parents=True)
    header = dict(PatientName="DOE^JANE", PatientID=pid)
    ct_uid = _copy_series(samples_dir / "ct", study / "ct", number=3, description="CT head", **header)
    pet_uid = _copy_series(samples_dir / "pet", study / "pet", number=2, description=f"PET {pid}", **header)
    layers = napari_get_reader(str(study))(str(study))
    assert {uid: k["name"] for uid, k in _by_uid(layers).items()} == {ct_uid: "CT ct CT head", pet_uid: "PT pet"}


def test_a_single_series_folder_keeps_its_name_and_stays_shown(samples_dir):
    layers = napari_get_reader(str(samples_dir / "pet"))(str(samples_dir / "pet"))
    assert [k["name"] for _, k, _ in layers] == ["pet"] and "visible" not in layers[0][1]


def test_several_files_opened_stacked_put_the_pet_on_top(tmp_path, samples_dir):
    # `napari --stack pet ct` (one read of the whole list) gives the same order as a study folder.
    pet, ct = tmp_path / "pet", tmp_path / "ct"
    shutil.copytree(samples_dir / "pet", pet)
    shutil.copytree(samples_dir / "ct", ct)
    paths = [str(pet), str(ct)]
    layers = napari_get_reader(paths)(paths)
    assert [k["name"] for _, k, _ in layers] == ["ct", "pet"]
    assert all(k.get("visible", True) for _, k, _ in layers)
