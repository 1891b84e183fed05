"""medfuse's MONAI transforms as the preprocessing of a classifier: DataLoader workers, caches, MONAI's own
transforms after them, channels stacked, and failures inside workers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("monai")
torch = pytest.importorskip("torch")

import medfuse  # noqa: E402
from medfuse.errors import GeometryError, RegistrationError  # noqa: E402

N, SPACING = 24, 4.0  # small volumes: every test here runs in seconds


def _blob(shift_mm: float = 0.0, *, n: int = N, origin_mm: float = 0.0) -> medfuse.Volume:
    """A smooth head-like blob with a small bright 'lesion', shifted along x (a rigid misalignment)."""
    g = (np.indices((n, n, n)).astype(np.float32) - n / 2) * SPACING
    x = g[0] - shift_mm
    arr = 100 * np.exp(-((x / 30) ** 2 + (g[1] / 20) ** 2 + (g[2] / 25) ** 2))
    arr += 50 * np.exp(-(((x - 20) / 8) ** 2 + ((g[1] + 10) / 8) ** 2 + (g[2] / 8) ** 2))
    aff = np.diag([SPACING, SPACING, SPACING, 1.0])
    aff[:3, 3] = -n / 2 * SPACING + origin_mm
    return medfuse.Volume(arr.astype(np.float32), aff)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """NIfTI files of one BraTS-like subject (t1n, t2w on one grid) and a shifted PET on another grid."""
    folder = tmp_path_factory.mktemp("training")
    mr, pet, far = _blob(), _blob(6.0, n=N - 4), _blob(origin_mm=1000.0)
    out = {}
    for name, vol in {
        "t1n": mr.with_array(mr.array, modality="MR"),
        "t2w": mr.with_array(mr.array.max() - mr.array, modality="MR"),
        "pet": pet.with_array(pet.array, modality="PT", unit="SUVbw"),
        "far": far.with_array(far.array, modality="PT", unit="SUVbw"),
    }.items():
        out[name] = str(medfuse.save(vol, folder / f"{name}.nii.gz"))
    return out


def _preprocessing(*, threads=None, method="max"):
    from monai.transforms import Compose, SelectItemsd

    from medfuse.transforms import FuseModalitiesd, LoadVolumed, RegisterToReferenced

    return Compose([
        LoadVolumed(keys=["t1n", "pet"]),
        RegisterToReferenced(keys=["pet"], reference_key="t1n", kind="rigid", threads=threads),
        FuseModalitiesd(keys=["t1n", "pet"], output_key="image", method=method, delete_keys=True),
        SelectItemsd(keys=["image", "label", "pet_registration"]),
    ])


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_workers_pickle_the_transforms_use_one_itk_thread_and_match_the_main_process(files, start):
    """Two DataLoader workers (fork and spawn: the Compose and its outputs are pickled) give each subject
    the result the main process gives with one ITK thread, and register with one ITK thread each (not all
    cores each), as torch limits its own threads in workers."""
    import multiprocessing as mp

    from monai.data import Dataset, MetaTensor
    from torch.utils.data import DataLoader

    if start not in mp.get_all_start_methods():
        pytest.skip(f"no {start} start method here")
    items = [{"t1n": files["t1n"], "pet": files["pet"], "label": i} for i in range(2)]
    loader = DataLoader(Dataset(items, _preprocessing()), batch_size=None, num_workers=2,
                        multiprocessing_context=start)
    got = list(loader)
    expected = _preprocessing(threads=1)(dict(items[0]))["image"]
    t1n = medfuse.load(files["t1n"])
    for d in got:
        img = d["image"]
        assert isinstance(img, MetaTensor) and tuple(img.shape) == (1, *t1n.shape)
        assert d["pet_registration"]["itk_threads"] == 1
        assert np.allclose(np.asarray(img.affine), t1n.affine_ras)
        assert torch.equal(img.as_tensor(), expected.as_tensor())  # deterministic: a cache of it stays valid
    # in the main process the user's setting (here SimpleITK's default) is recorded as such
    assert _preprocessing()(dict(items[0]))["pet_registration"]["itk_threads"] is None


def test_a_failing_subject_in_a_worker_names_its_file(files):
    """A subject whose PET does not overlap its MR fails in the worker with medfuse's error naming the PET
    file (a file, not a patient) and MONAI's wrapper naming the transform and its parameters."""
    from monai.data import DataLoader, Dataset

    items = [{"t1n": files["t1n"], "pet": files["far"], "label": 0}]
    loader = DataLoader(Dataset(items, _preprocessing(threads=1)), batch_size=1, num_workers=1,
                        multiprocessing_context="fork")
    with pytest.raises(Exception) as info:
        next(iter(loader))
    text = str(info.value)
    assert f"RegistrationError: {files['far']}: the two volumes do not overlap" in text
    assert "RegisterToReferenced(keys=('pet',), reference_key='t1n', kind='rigid', threads=1)" in text


def test_fusion_and_registration_errors_name_the_subject_file(files):
    from medfuse.transforms import FuseModalitiesd, LoadVolumed, RegisterToReferenced

    d = LoadVolumed(keys=["t1n", "pet", "far"])(dict(files))
    with pytest.raises(GeometryError) as info:  # not registered: different grids
        FuseModalitiesd(keys=["t1n", "pet"], method="max")(d)
    assert info.value.path == files["t1n"] and str(info.value).startswith(files["t1n"])
    with pytest.raises(RegistrationError) as info:
        RegisterToReferenced(keys=["far"], reference_key="t1n", threads=1)(d)
    assert info.value.path == files["far"]


def test_fused_tensor_feeds_monai_spatial_intensity_collate_and_invert(files):
    """The fused MetaTensor carries what MONAI's transforms read (RAS affine, space, spatial_shape,
    original_affine, filename_or_obj); Spacing/Orientation keep world positions; Invertd undoes MONAI's
    own spatial transforms back onto the fused (reference) grid and passes medfuse's transforms by."""
    from monai.data import list_data_collate
    from monai.transforms import (Compose, CropForegroundd, EnsureTyped, Invertd, Orientationd,
                                  RandSpatialCropd, ScaleIntensityd, Spacingd)

    from medfuse.transforms import FuseModalitiesd, LoadVolumed, RegisterToReferenced

    pre = Compose([
        LoadVolumed(keys=["t1n", "pet"]),
        RegisterToReferenced(keys=["pet"], reference_key="t1n", kind=None),
        FuseModalitiesd(keys=["t1n", "pet"], output_key="image", method="max", delete_keys=True),
    ])
    d = pre({"t1n": files["t1n"], "pet": files["pet"], "label": 1})
    img, t1n = d["image"], medfuse.load(files["t1n"])
    assert img.meta["filename_or_obj"] == files["t1n"]  # named after its reference (SaveImaged uses it)
    assert str(img.meta["space"]) == "RAS" and tuple(np.asarray(img.meta["spatial_shape"])) == t1n.shape
    assert np.allclose(np.asarray(img.meta["original_affine"]), t1n.affine_ras)

    spatial = Compose([Orientationd(keys="image", axcodes="LPS"), Spacingd(keys="image", pixdim=(8, 8, 8))])
    out = spatial(dict(d))
    assert np.allclose(np.abs(np.diag(np.asarray(out["image"].affine))[:3]), 8)
    assert np.abs(_centroid_ras(out["image"]) - _centroid_ras(img)).max() < 4.0  # the anatomy stays put
    back = Invertd(keys="image", transform=spatial, orig_keys="image", nearest_interp=False)(out)
    assert tuple(back["image"].shape) == tuple(img.shape)
    assert np.allclose(np.asarray(back["image"].affine), np.asarray(img.affine))

    aug = Compose([CropForegroundd(keys="image", source_key="image"),
                   RandSpatialCropd(keys="image", roi_size=(8, 8, 8), random_size=False),
                   ScaleIntensityd(keys="image"), EnsureTyped(keys=["image", "label"])])
    aug.set_random_state(0)
    items = [{k: aug(dict(d))[k] for k in ("image", "label")} for _ in range(2)]  # as SelectItemsd does
    batch = list_data_collate(items)
    assert tuple(batch["image"].shape) == (2, 1, 8, 8, 8) and batch["image"].is_batch
    assert float(batch["image"].min()) >= 0 and float(batch["image"].max()) <= 1 + 1e-6


def _centroid_ras(t) -> np.ndarray:
    """Intensity-weighted centre of a channel-first MetaTensor, in RAS world millimetres."""
    a = t[0].numpy().astype(float)
    ijk = np.array([(np.indices(a.shape)[i] * a).sum() / a.sum() for i in range(3)])
    return (np.asarray(t.affine) @ np.r_[ijk, 1.0])[:3]


def test_mr_sequences_and_fused_image_stack_as_channels_on_one_grid(files):
    """BraTS-like channels: MR sequences + the PET put on the t1n grid + the fused image, concatenated;
    every channel has the t1n grid, so the stacked tensor's affine is the truth for all of them."""
    from monai.transforms import Compose, ConcatItemsd

    from medfuse.transforms import FuseModalitiesd, LoadVolumed, RegisterToReferenced

    pre = Compose([
        LoadVolumed(keys=["t1n", "t2w", "pet"], as_tensor=True),
        RegisterToReferenced(keys=["t2w", "pet"], reference_key="t1n", kind=None),
        FuseModalitiesd(keys=["t1n", "pet"], output_key="fused", method="max"),
    ])
    d = pre(dict(files))
    for k in ("t2w", "pet", "fused"):
        assert tuple(d[k].shape) == tuple(d["t1n"].shape)
        assert np.allclose(np.asarray(d[k].affine), np.asarray(d["t1n"].affine))
    x = ConcatItemsd(keys=["t1n", "t2w", "pet", "fused"], name="image")(d)["image"]
    assert tuple(x.shape) == (4, *d["t1n"].shape[1:])
    assert np.allclose(np.asarray(x.affine), medfuse.load(files["t1n"]).affine_ras)


def test_persistent_cache_reloads_without_recomputing_and_rekeys_on_parameters(files, tmp_path):
    """PersistentDataset (torch.load with weights_only=True) with MetaTensors throughout: the second read
    comes from disk, equal to the first, with its geometry; another fusion rule gives another cache file."""
    from monai.data import PersistentDataset
    from monai.data.utils import pickle_hashing
    from monai.transforms import Compose

    from medfuse.transforms import FuseModalitiesd, LoadVolumed, RegisterToReferenced

    def dataset(method, cache):
        pre = Compose([
            LoadVolumed(keys=["t1n", "pet"], as_tensor=True),
            RegisterToReferenced(keys=["pet"], reference_key="t1n", kind=None),
            FuseModalitiesd(keys=["t1n", "pet"], output_key="image", method=method),
        ])
        return PersistentDataset([{"t1n": files["t1n"], "pet": files["pet"]}], transform=pre, cache_dir=cache,
                                 hash_transform=pickle_hashing, track_meta=True)

    cache = tmp_path / "cache"
    first = dataset("max", cache)[0]
    saved = sorted(cache.iterdir())
    again = dataset("max", cache)
    again.transform.transforms[0].keys = ("nothing",)  # a recomputation would now fail: only the cache can answer
    reloaded = again[0]
    assert sorted(cache.iterdir()) == saved and len(saved) == 1
    assert torch.equal(reloaded["image"].as_tensor(), first["image"].as_tensor())
    assert np.allclose(np.asarray(reloaded["image"].affine), np.asarray(first["image"].affine))
    assert reloaded["image"].meta["filename_or_obj"] == files["t1n"]
    dataset("mean", cache)[0]
    assert len(list(cache.iterdir())) == 2


def test_brats_sequences_from_monai_and_a_fused_channel_share_one_grid(shared):
    """A real BraTS subject loaded by MONAI's LoadImaged: the fused t1c+t2f channel comes back on the exact
    grid MONAI gave the sequences, so ConcatItemsd stacks five channels with one true affine."""
    from monai.transforms import Compose, ConcatItemsd, LoadImaged

    from medfuse.transforms import FuseModalitiesd

    keys = ["t1n", "t1c", "t2w", "t2f"]
    item = {k: str(shared("data", "brats-gli-00001", f"{k}.nii.gz")) for k in keys}
    d = Compose([
        LoadImaged(keys=keys, image_only=True, ensure_channel_first=True),
        FuseModalitiesd(keys=["t1c", "t2f"], output_key="fused", method="max"),
        ConcatItemsd(keys=[*keys, "fused"], name="image"),
    ])(item)
    x, fused = d["image"], d["fused"]
    assert tuple(x.shape) == (5, *d["t1n"].shape[1:])
    assert np.allclose(np.asarray(fused.affine), np.asarray(d["t1n"].affine), atol=1e-5)
    assert fused.meta["filename_or_obj"] == item["t1c"]
    assert torch.equal(x[4], fused[0].as_tensor())
