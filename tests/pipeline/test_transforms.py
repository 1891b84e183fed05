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
