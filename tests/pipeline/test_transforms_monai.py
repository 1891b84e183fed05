"""medfuse's transforms inside a MONAI classifier pipeline, as a MONAI user writes one: items that keep their
loaded Volumes, MONAI's own intensity and spatial transforms after the fusion, batching, caching, rule options,
subjects with a missing image, and the error for images left on different grids."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("monai")
torch = pytest.importorskip("torch")

import medfuse  # noqa: E402
from medfuse.errors import GeometryError  # noqa: E402

N, SPACING = 20, 4.0  # small volumes: each test runs in about a second


def _blob(*, shift_mm: float = 0.0, n: int = N, seed: int = 0, modality: str = "MR") -> medfuse.Volume:
    """A smooth head-like blob with a bright off-centre 'lesion' (its side differs per seed)."""
    g = (np.indices((n, n, n)).astype(np.float32) - n / 2) * SPACING
    x = g[0] - shift_mm
    side = 1 if seed % 2 else -1
    arr = 100 * np.exp(-((x / 30) ** 2 + (g[1] / 20) ** 2 + (g[2] / 25) ** 2))
    arr += 60 * np.exp(-(((x - side * 16) / 8) ** 2 + (g[1] / 8) ** 2 + (g[2] / 8) ** 2))
    aff = np.diag([SPACING, SPACING, SPACING, 1.0])
    aff[:3, 3] = -n / 2 * SPACING + np.array([seed, 2.0 * seed, 0.0])  # each subject its own origin
    return medfuse.Volume(arr.astype(np.float32), aff, modality=modality)


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """Two subjects' NIfTI files: t1 and flair on one grid, and a PET on a coarser grid."""
    folder = tmp_path_factory.mktemp("classifier")
    items = []
    for i in range(2):
        t1 = _blob(seed=i)
        flair = t1.with_array(t1.array.max() - 0.5 * t1.array)
        pet = _blob(seed=i, n=N - 6, modality="PT")
        paths = {}
        for name, vol in {"t1": t1, "flair": flair, "pet": pet.with_array(pet.array, unit="SUVbw")}.items():
            paths[name] = str(medfuse.save(vol, folder / f"sub-{i}_{name}.nii.gz"))
        items.append({**paths, "label": i})
    return items


def test_items_that_keep_their_volumes_batch_and_feed_a_classifier(subjects):
    """The pipeline a MONAI user writes first: no SelectItemsd, so the loaded Volumes stay in each item.
    They batch as MONAI's LoadImaged images do (a MetaTensor with each subject's own affine) and decollate;
    the fused channel, through MONAI's intensity and spatial transforms, runs through a small classifier."""
    from monai.data import DataLoader, Dataset, MetaTensor, decollate_batch
    from monai.networks.nets import DenseNet121
    from monai.transforms import Compose, EnsureTyped, RandFlipd, ResizeWithPadOrCropd, ScaleIntensityd
    from monai.utils import set_determinism

    from medfuse.transforms import FuseModalitiesd, LoadVolumed

    pre = Compose([
        LoadVolumed(keys=["t1", "flair"]),
        FuseModalitiesd(keys=["t1", "flair"], output_key="image", method="max"),
        ScaleIntensityd(keys="image"),
        ResizeWithPadOrCropd(keys="image", spatial_size=(16, 16, 16)),
        RandFlipd(keys="image", prob=0.5, spatial_axis=0),
        EnsureTyped(keys=["image", "label"]),
    ])
    set_determinism(seed=0)
    try:
        batch = next(iter(DataLoader(Dataset(subjects, pre), batch_size=2, num_workers=0)))
    finally:
        set_determinism(seed=None)
    assert tuple(batch["image"].shape) == (2, 1, 16, 16, 16) and batch["image"].is_batch
    assert torch.equal(batch["label"], torch.tensor([0, 1]))
    t1s = batch["t1"]
    assert isinstance(t1s, MetaTensor) and t1s.is_batch and tuple(t1s.shape) == (2, 1, N, N, N)
    for i, item in enumerate(subjects):  # each subject's own grid, not the first one's
        assert np.allclose(np.asarray(t1s.affine[i]), medfuse.load(item["t1"]).affine_ras)
    flair = medfuse.load(subjects[1]["flair"])
    back = medfuse.Volume.from_metatensor(decollate_batch(batch)[1]["flair"])
    assert back.same_grid(flair) and np.array_equal(back.array, flair.array) and back.modality == "MR"

    net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=8,
                      block_config=(2, 2)).eval()
    with torch.no_grad():
        logits = net(batch["image"].as_tensor())
    assert tuple(logits.shape) == (2, 2) and bool(torch.isfinite(logits).all())


def test_volumes_batch_in_spawned_workers(subjects):
    """A spawned worker starts without medfuse's collate registration: unpickling the transforms imports
    it, so a worker batches an item holding Volumes as the main process does."""
    import multiprocessing as mp

    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose

    from medfuse.transforms import LoadVolumed

    if "spawn" not in mp.get_all_start_methods():
        pytest.skip("no spawn start method here")
    loader = DataLoader(Dataset(subjects, Compose([LoadVolumed(keys=["t1"])])), batch_size=2, num_workers=1,
                        multiprocessing_context="spawn")
    batch = next(iter(loader))
    assert tuple(batch["t1"].shape) == (2, 1, N, N, N)
    assert np.array_equal(batch["t1"][1, 0].numpy(), medfuse.load(subjects[1]["t1"]).array)


def test_fusion_options_reach_the_rule_and_give_another_cache_key(subjects, tmp_path):
    """A rule's options (here the mean's weights) go through the transform to medfuse.fuse, and a change of
    them gives PersistentDataset (hashed with pickle_hashing) another cache key, so a cache never serves
    images fused with other weights."""
    from monai.data import PersistentDataset
    from monai.data.utils import pickle_hashing
    from monai.transforms import Compose

    from medfuse.transforms import FuseModalitiesd, LoadVolumed

    item = subjects[0]
    t1, flair = medfuse.load(item["t1"]), medfuse.load(item["flair"])
    expected = medfuse.fuse(t1, flair, method="mean", weights=[0.8, 0.2])
    even = medfuse.fuse(t1, flair, method="mean")
    assert not np.allclose(expected.array, even.array)  # the weights matter on these images

    def pre(**options):
        return Compose([LoadVolumed(keys=["t1", "flair"]),
                        FuseModalitiesd(keys=["t1", "flair"], output_key="image", method="mean",
                                        delete_keys=True, **options)])

    out = pre(weights=[0.8, 0.2])(dict(item))["image"]
    assert np.allclose(out[0].numpy(), expected.array, atol=1e-6)
    assert "weights=[0.8, 0.2]" in repr(pre(weights=[0.8, 0.2]).transforms[1])  # MONAI's errors show it

    def key(**options):
        ds = PersistentDataset([item], pre(**options), cache_dir=tmp_path, hash_transform=pickle_hashing)
        return ds.transform_hash

    assert key(weights=[0.8, 0.2]) == key(weights=[0.8, 0.2])
    assert key(weights=[0.8, 0.2]) != key(weights=[0.2, 0.8]) != key()


def test_allow_missing_keys_fuses_the_images_a_subject_has(subjects):
    """As every MONAI dictionary transform: with allow_missing_keys a subject without its PET gets its t1
    and flair fused, and a subject with one image passes through unchanged."""
    from monai.transforms import Compose

    from medfuse.transforms import FuseModalitiesd, LoadVolumed

    item = {k: v for k, v in subjects[0].items() if k != "pet"}
    loaded = LoadVolumed(keys=["t1", "flair", "pet"], allow_missing_keys=True)(item)
    fuse3 = FuseModalitiesd(keys=["t1", "flair", "pet"], output_key="image", method="max",
                            allow_missing_keys=True)
    got = Compose([fuse3])(dict(loaded))["image"]
    two = FuseModalitiesd(keys=["t1", "flair"], output_key="image", method="max")(dict(loaded))["image"]
    assert torch.equal(got.as_tensor(), two.as_tensor())
    alone = {"t1": loaded["t1"], "label": 0}
    assert fuse3(alone) == alone
    with pytest.raises(KeyError, match="pet"):  # without it, MONAI's usual missing-key error
        FuseModalitiesd(keys=["t1", "flair", "pet"], method="max")(dict(loaded))


def test_images_on_different_grids_name_their_keys_and_the_transform_that_mends_it(subjects):
    """A PET left on its own grid: the error names the keys (not "volume 2") and the transform that puts it
    on the reference grid; RegisterToReferenced(kind=None) then mends it."""
    from monai.transforms import Compose

    from medfuse.transforms import FuseModalitiesd, LoadVolumed, RegisterToReferenced

    d = LoadVolumed(keys=["t1", "pet"])(dict(subjects[0]))
    with pytest.raises(GeometryError) as info:
        FuseModalitiesd(keys=["t1", "pet"], method="max")(d)
    text = str(info.value)
    assert "'pet' is on a different grid than the reference 't1'" in text
    assert "shape (14, 14, 14) against (20, 20, 20)" in text
    assert "RegisterToReferenced(keys=['pet'], reference_key='t1')" in text and "resample=True" in text
    out = Compose([RegisterToReferenced(keys=["pet"], reference_key="t1", kind=None),
                   FuseModalitiesd(keys=["t1", "pet"], method="max")])(d)
    assert tuple(out["fused"].shape) == (1, N, N, N)


def test_brats_fused_channel_follows_monai_augmentation_like_monais_own_loader(shared):
    """Real BraTS t1n and t2f: after fusing, MONAI's crop, flip and affine augmentation give the fused
    channel the same affine they give MONAI's own LoadImaged t1n with the same random state, and the
    fused channel and the plain two-channel stack (t1n, t2f) both batch for a classifier."""
    from monai.data import list_data_collate
    from monai.transforms import (Compose, ConcatItemsd, EnsureTyped, LoadImaged, RandAffined, RandFlipd,
                                  ResizeWithPadOrCropd, ScaleIntensityd)

    from medfuse.transforms import FuseModalitiesd, LoadVolumed

    item = {k: str(shared("data", "brats-gli-00001", f"{k}.nii.gz")) for k in ("t1n", "t2f")}

    def augment(key):
        return Compose([ScaleIntensityd(keys=key),
                        ResizeWithPadOrCropd(keys=key, spatial_size=(32, 32, 24)),
                        RandFlipd(keys=key, prob=1.0, spatial_axis=0),
                        RandAffined(keys=key, prob=1.0, rotate_range=(0.2, 0.2, 0.2), translate_range=(4, 4, 4),
                                    padding_mode="zeros"),
                        EnsureTyped(keys=key)])

    fused = Compose([LoadVolumed(keys=["t1n", "t2f"], as_tensor=True),
                     FuseModalitiesd(keys=["t1n", "t2f"], output_key="image", method="max")])(dict(item))
    monai_t1n = LoadImaged(keys="t1n", image_only=True, ensure_channel_first=True)(dict(item))["t1n"]
    assert np.allclose(np.asarray(fused["image"].affine), np.asarray(monai_t1n.affine), atol=1e-5)

    a, b = augment("image"), augment("t1n")
    a.set_random_state(3)
    b.set_random_state(3)
    x = a({"image": fused["image"]})["image"]
    y = b({"t1n": monai_t1n.float()})["t1n"]
    assert tuple(x.shape) == (1, 32, 32, 24)
    assert np.allclose(np.asarray(x.affine), np.asarray(y.affine), atol=1e-4)
    assert not np.allclose(np.asarray(x.affine), np.asarray(fused["image"].affine))  # augmentation moved it

    stacked = ConcatItemsd(keys=["t1n", "t2f"], name="image")(dict(fused))["image"]
    small = ResizeWithPadOrCropd(keys="image", spatial_size=(32, 32, 24))({"image": stacked})["image"]
    batch = list_data_collate([{"fused": x, "stacked": small, "label": 1}] * 2)
    assert tuple(batch["fused"].shape) == (2, 1, 32, 32, 24) and tuple(batch["stacked"].shape) == (2, 2, 32, 32, 24)
