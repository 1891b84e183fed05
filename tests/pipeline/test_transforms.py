"""MONAI dictionary transforms and the classifier example."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monai")
torch = pytest.importorskip("torch")

import medfuse  # noqa: E402
from medfuse.batch import read_manifest, write_phantom_subjects  # noqa: E402
from medfuse.errors import GeometryError, InvalidInputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def item(tmp_path_factory):
    folder = tmp_path_factory.mktemp("monai")
    s = read_manifest(write_phantom_subjects(folder, 1, first_seed=9))[0]
    return {"mr": s.fixed, "pet": s.moving[0], "label": 1}


def test_compose_loads_aligns_fuses_and_hands_a_tensor(item):
    from monai.data import MetaTensor
    from monai.transforms import Compose, Resized, SelectItemsd

    from medfuse.phantom import make_phantom
    from medfuse.transforms import FuseModalitiesd, LoadVolumed, RegisterToReferenced

    pre = Compose([
        LoadVolumed(keys=["mr", "pet"]),
        RegisterToReferenced(keys=["pet"], reference_key="mr", kind="rigid", threads=1),
        FuseModalitiesd(keys=["mr", "pet"], output_key="image", method="mean"),
    ])
    d = pre(dict(item))
    mr = medfuse.load(item["mr"])
    img = d["image"]
    assert isinstance(img, MetaTensor) and tuple(img.shape) == (1, *mr.shape) and img.dtype == torch.float32
    assert np.allclose(np.asarray(img.affine), mr.affine_ras)  # geometry survives into MONAI (RAS)
    assert d["pet"].same_grid(mr) and d["pet"].modality == "PT"
    rep = d["pet_registration"]
    assert rep["metric_after"] < rep["metric_before"] and not rep["suspect"]
    # the PET lesion lands at the phantom's lesion centre
    c = make_phantom(seed=9).lesion_center
    ijk = tuple(np.rint(mr.world_to_index(c)).astype(int))
    assert float(img[0][ijk]) > float(np.percentile(img.numpy(), 99))
    # continues into plain MONAI transforms and a model
    small = Compose([Resized(keys=["image"], spatial_size=(16, 16, 16)), SelectItemsd(keys=["image", "label"])])(d)
    assert tuple(small["image"].shape) == (1, 16, 16, 16) and set(small) == {"image", "label"}


def test_transforms_refuse_misaligned_or_bad_input(item):
    from medfuse.transforms import FuseModalities, FuseModalitiesd, LoadVolumed, RegisterToReference

    d = LoadVolumed(keys=["mr", "pet"])(dict(item))
    with pytest.raises(GeometryError):
        FuseModalitiesd(keys=["mr", "pet"], method="mean")(d)  # different grids, not registered
    resampled = FuseModalities(method="mean", resample=True, as_tensor=False)([d["mr"], d["pet"]])
    assert resampled.same_grid(d["mr"])
    with pytest.raises(InvalidInputError, match="not a medfuse Volume"):
        RegisterToReference(kind=None)(np.zeros((4, 4, 4)), d["mr"])
    # MetaTensors (e.g. from MONAI's LoadImaged) go in and come out as MetaTensors
    out = RegisterToReference(kind=None)(d["pet"].to_metatensor(), d["mr"].to_metatensor())
    assert tuple(out.shape) == (1, *d["mr"].shape)


@pytest.mark.slow
def test_classifier_example_feeds_a_model(tmp_path):
    spec = importlib.util.spec_from_file_location("monai_classifier", ROOT / "examples" / "monai_classifier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run(tmp_path, subjects=2, steps=2, size=16, batch_size=2, verbose=False)
    assert res["batch_shape"] == (2, 1, 16, 16, 16)
    assert len(res["losses"]) == 2 and all(np.isfinite(res["losses"]))
    lo, hi = res["image_range"]
    assert 0.0 <= lo < hi <= 1.0 + 1e-6


def test_classifier_example_refuses_a_misspelt_method_before_any_work(tmp_path, capsys):
    """It wrote the phantom subjects first (about 12 s), then died with a traceback ending in the refusal."""
    spec = importlib.util.spec_from_file_location("monai_classifier", ROOT / "examples" / "monai_classifier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        mod.main(["--workdir", str(tmp_path / "work"), "--subjects", "2", "--method", "lapacian"])
    assert e.value.code == 2
    assert "error: unknown fusion method 'lapacian'; did you mean 'laplacian'? Fix: use one of" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_monai_loaded_tensors_keep_their_layout_name_and_space(shared):
    """MetaTensors from MONAI's LoadImage come back as they came (3-D stays 3-D), named after their file
    (SaveImaged uses it), in the reference's NIfTI space; an MNI template's fused image stays "mni"."""
    from monai.data import MetaTensor
    from monai.transforms import LoadImage

    from medfuse.transforms import FuseModalities, LoadVolume, RegisterToReference

    t1_path = str(shared("data", "spm12-templates", "T1.nii"))
    pet_path = str(shared("data", "spm12-templates", "PET.nii"))
    t1 = LoadImage(image_only=True)(t1_path)  # (I, J, K): no channel
    pet = LoadImage(image_only=True, ensure_channel_first=True)(pet_path)
    out = RegisterToReference(kind=None)(t1, pet)
    assert isinstance(out, MetaTensor) and tuple(out.shape) == tuple(t1.shape)
    assert out.meta["filename_or_obj"] == t1_path and out.meta["nifti_space"] == "mni"
    out = RegisterToReference(kind=None)(pet, t1)
    assert tuple(out.shape) == tuple(pet.shape) and out.meta["filename_or_obj"] == pet_path
    assert np.allclose(np.asarray(out.affine), np.asarray(pet.affine))
    fused = FuseModalities(method="mean")([t1, pet])
    assert fused.meta["nifti_space"] == "mni" and int(fused.meta["sform_code"]) == 4
    # LoadVolume passes an already-loaded tensor through (as it passes a Volume), converted
    v = LoadVolume(modality="PET")(pet)
    assert isinstance(v, medfuse.Volume) and v.modality == "PT" and v.provenance["nifti_space"] == "mni"


def test_fuse_refuses_a_wrong_number_of_images(item):
    from medfuse.transforms import FuseModalities, LoadVolumed

    d = LoadVolumed(keys=["mr"])(dict(item))
    for images in ([d["mr"]], d["mr"], [d["mr"]] * 4):
        with pytest.raises(InvalidInputError, match="two or three images"):
            FuseModalities(method="mean")(images)


def test_registration_reports_stay_with_their_subject_across_threads(monkeypatch):
    """MONAI runs transforms in threads (CacheDataset(num_workers=...), ThreadDataLoader): each subject's
    report must be its own even when another subject's registration finishes in between."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from monai.transforms.traits import ThreadUnsafe

    import medfuse.registration as registration
    from medfuse.transforms import RegisterToReference, RegisterToReferenced

    b_reported = threading.Event()

    class Result:
        def __init__(self, moving):
            self.name = "A" if moving.array.flat[0] == 0 else "B"
            self._moving = moving
            self.report = SimpleNamespace(to_dict=self._to_dict)

        def _to_dict(self):
            if self.name == "B":
                b_reported.set()
            return {"subject": self.name, "suspect": False}

        @property
        def resampled(self):  # A's result is handed over only after B's report is out
            if self.name == "A":
                b_reported.wait(5)
                time.sleep(0.1)
            return self._moving

    monkeypatch.setattr(registration, "register", lambda fixed, moving, kind, **kw: Result(moving))
    ref = medfuse.Volume(np.ones((4, 4, 4), np.float32), np.eye(4))
    items = [{"ref": ref, "pet": ref.with_array(np.full((4, 4, 4), v, np.float32))} for v in (0.0, 1.0)]
    t = RegisterToReferenced(keys=["pet"], reference_key="ref")
    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(t, items))
    assert [d["pet_registration"]["subject"] for d in out] == ["A", "B"]
    assert isinstance(RegisterToReference(), ThreadUnsafe)  # keeps last_report: copied per thread by MONAI


def test_load_volume_keeps_the_suv_kind_a_series_is_stored_in(tmp_path):
    """LoadVolume(d) loads as medfuse.load does: a GML series stored as SUVlbm stays SUVlbm (not turned into
    SUVbw through the patient's weight)."""
    import pydicom

    from medfuse.io import save
    from medfuse.transforms import LoadVolume, LoadVolumed

    pet = medfuse.Volume(np.random.default_rng(0).uniform(0, 8, (16, 16, 12)).astype(np.float32),
                         np.diag([3.0, 3.0, 3.0, 1.0]), modality="PT", unit="SUVlbm")
    folder = save(pet, tmp_path / "pet")
    for f in folder.iterdir():  # a weight, height and sex: SUVbw could be computed from the stored SUVlbm
        ds = pydicom.dcmread(str(f))
        ds.PatientWeight, ds.PatientSize, ds.PatientSex = 70, 1.75, "M"
        ds.save_as(str(f))
    ref = medfuse.load(folder)
    for v in (LoadVolume()(folder), LoadVolumed(keys=["pet"])({"pet": folder})["pet"]):
        assert v.unit == ref.unit == "SUVlbm" and np.allclose(v.array, ref.array)
    assert LoadVolume(suv="bw")(folder).unit == "SUVbw"


@pytest.mark.parametrize("value", [np.zeros((4, 4, 4)), None, 3])
def test_load_volume_refuses_what_is_not_a_path(value):
    from medfuse.transforms import LoadVolume

    with pytest.raises(InvalidInputError, match="needs a file or DICOM folder path"):
        LoadVolume()(value)


@pytest.mark.parametrize("make", [lambda suv: medfuse.transforms.LoadVolume(suv=suv),
                                  lambda suv: medfuse.transforms.LoadVolumed(keys="img", suv=suv)])
def test_load_transforms_check_suv_when_built(make):
    """A wrong suv= failed only at the first load, inside a DataLoader worker, epochs into a run."""
    with pytest.raises(InvalidInputError, match="suv must be one of"):
        make("SUV")
    assert make("lbm").suv == "lbm"
