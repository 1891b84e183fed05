"""RegisterToReferenced(label_keys=...): a label map drawn on a moving image follows that image's registration.

Before it the item kept only a report dict: nothing inside a ``Compose`` could move the segmentation with its image
(``kind=None, interpolation="nearest"`` resampled it without the transform, misaligned).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("monai")
torch = pytest.importorskip("torch")

import medfuse  # noqa: E402
from medfuse.errors import InvalidInputError  # noqa: E402

LABELS = (0, 1, 2, 4)


def _blob(n: int, spacing: float, origin: np.ndarray, *, shift_mm: float = 0.0) -> np.ndarray:
    """A smooth body with an off-centre bright 'lesion', sampled on an ``n``-cube grid (world mm, LPS)."""
    idx = np.indices((n, n, n)).astype(np.float32)
    g = [idx[i] * spacing + origin[i] for i in range(3)]
    x = g[0] - shift_mm
    arr = 100 * np.exp(-((x / 26) ** 2 + (g[1] / 18) ** 2 + (g[2] / 22) ** 2))
    arr += 80 * np.exp(-(((x - 12) / 7) ** 2 + ((g[1] + 4) / 7) ** 2 + (g[2] / 7) ** 2))
    return arr


def _volume(arr: np.ndarray, spacing: float, origin: np.ndarray, **kw) -> medfuse.Volume:
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = origin
    return medfuse.Volume(arr, aff, **kw)


@pytest.fixture(scope="module")
def subject():
    """A fixed MR (3 mm grid), a moving MR shifted by 6 mm on its own 3.5 mm grid, and a uint8 label map
    {0, 1, 2, 4} on the moving grid (body, lesion, a small box)."""
    o_fix, o_mov = np.full(3, -33.0), np.array([-30.0, -31.5, -29.0])
    fixed = _volume(_blob(22, 3.0, o_fix).astype(np.float32), 3.0, o_fix, modality="MR")
    marr = _blob(18, 3.5, o_mov, shift_mm=6.0)
    moving = _volume(marr.astype(np.float32), 3.5, o_mov, modality="MR")
    lab = np.zeros(marr.shape, np.uint8)
    lab[marr > 30] = 1
    lab[marr > 110] = 2
    lab[2:5, 2:5, 8:11] = 4
    assert set(np.unique(lab)) == set(LABELS)
    return {"img": fixed, "mov": moving, "mov_lab": _volume(lab, 3.5, o_mov)}


@pytest.fixture(scope="module")
def plain(subject):
    """What medfuse.register + medfuse.resample give, outside MONAI (one ITK thread, as the transform runs)."""
    from medfuse.pipeline import _itk_threads

    with _itk_threads(1):
        reg = medfuse.register(subject["img"], subject["mov"], kind="rigid")
        lab = medfuse.resample(subject["mov_lab"], subject["img"], transform=reg.transform, interpolation="nearest")
    return reg, lab


@pytest.fixture(scope="module")
def moved(subject):
    from medfuse.transforms import RegisterToReferenced

    t = RegisterToReferenced(keys=["mov"], reference_key="img", kind="rigid", threads=1,
                             label_keys={"mov": ["mov_lab"]})
    return t(dict(subject))


def test_label_map_follows_its_image_registration_exactly_as_a_plain_resample(subject, moved, plain):
    reg, expected = plain
    out = moved["mov_lab"]
    assert isinstance(out, medfuse.Volume)
    assert out.shape == subject["img"].shape
    assert out.array.dtype == np.uint8
    np.testing.assert_array_equal(out.affine, subject["img"].affine)
    np.testing.assert_array_equal(out.array, expected.array)  # the same transform, nearest neighbour
    assert set(np.unique(out.array)) <= set(LABELS) and {1, 2} <= set(np.unique(out.array))
    # The registered image is what it was without label_keys, and the input item is untouched.
    np.testing.assert_allclose(moved["mov"].array, reg.resampled.array)
    assert subject["mov_lab"].shape == (18, 18, 18)
    steps = [h["step"] for h in out.provenance["history"]]
    assert steps[-2:] == ["resample", "follow_registration"]
    assert out.provenance["history"][-1] == {"step": "follow_registration", "image": "mov", "reference": "img",
                                             "kind": "rigid"}
    # It moved: the lesion label lies over the fixed image's lesion (6 mm off where it was drawn).
    fix = subject["img"].array
    assert fix[out.array == 2].mean() > 110


def test_label_metatensor_keeps_its_dtype_layout_and_gets_the_reference_affine(subject, plain):
    from medfuse.transforms import RegisterToReferenced

    _, expected = plain
    d = {k: v.to_metatensor() for k, v in subject.items()}
    d["mov_lab"] = d["mov_lab"][0]  # (I, J, K) stays 3-D, as RegisterToReference keeps an image's layout
    out = RegisterToReferenced(keys="mov", reference_key="img", kind="rigid", threads=1,
                               label_keys="mov_lab")(d)["mov_lab"]
    assert tuple(out.shape) == subject["img"].shape and out.dtype == torch.uint8
    np.testing.assert_array_equal(out.affine.numpy(), d["img"].affine.numpy())
    np.testing.assert_array_equal(out.numpy(), expected.array)


def test_kind_none_resamples_labels_as_placed_and_keeps_labels_on_the_grid(subject):
    from medfuse.transforms import RegisterToReferenced

    t = RegisterToReferenced(keys=["mov"], reference_key="img", kind=None, label_keys=["mov_lab"])
    out = t(dict(subject))["mov_lab"]
    expected = medfuse.resample(subject["mov_lab"], subject["img"], interpolation="nearest")
    assert out.array.dtype == np.uint8
    np.testing.assert_array_equal(out.array, expected.array)
    # Already on the reference grid: passed through.
    same = {"img": subject["img"], "mov": subject["img"], "mov_lab": expected}
    assert t(same)["mov_lab"] is expected


def test_without_label_keys_nothing_changes(subject):
    from medfuse.transforms import RegisterToReferenced

    t = RegisterToReferenced(keys=["mov"], reference_key="img", kind=None)
    out = t(dict(subject))
    assert out["mov_lab"] is subject["mov_lab"]
    assert "label_keys" not in repr(t)
    assert t.label_keys == {}


def test_collate_two_items_with_moved_labels(moved):
    from monai.data import list_data_collate
    from torch.utils.data import default_collate

    items = [{k: moved[k] for k in ("img", "mov", "mov_lab")} for _ in range(2)]
    for collate in (default_collate, list_data_collate):
        batch = collate(items)
        assert tuple(batch["mov_lab"].shape) == (2, 1, *moved["img"].shape)
        assert batch["mov_lab"].dtype == torch.uint8
        np.testing.assert_array_equal(batch["mov_lab"].affine[0].numpy(), batch["img"].affine[0].numpy())
    # Nothing besides the images and the report (dropped as documented) is put in the item.
    assert set(moved) == {"img", "mov", "mov_lab", "mov_registration"}


def test_label_keys_are_checked_when_built():
    from medfuse.transforms import RegisterToReference, RegisterToReferenced

    ok = RegisterToReferenced(keys=["mov", "pet"], reference_key="img", label_keys={"mov": "mov_lab",
                                                                                  "pet": ["pet_a", "pet_b"]})
    assert ok.label_keys == {"mov": ("mov_lab",), "pet": ("pet_a", "pet_b")}
    assert "label_keys={'mov': ['mov_lab'], 'pet': ['pet_a', 'pet_b']}" in repr(ok)
    assert pickle.loads(pickle.dumps(ok)).label_keys == ok.label_keys
    cases = [
        (dict(keys=["mov"], label_keys={"mvo": ["mov_lab"]}), "label_keys names moving key(s) 'mvo'"),
        (dict(keys=["mov"], label_keys={"img": ["lab"]}), "names the reference key 'img'"),
        (dict(keys=["mov", "pet"], label_keys=["mov_lab"]), "does not say which of the 2 moving images"),
        (dict(keys=["mov"], label_keys={"mov": ["mov"]}), "'mov', which is a moving image key"),
        (dict(keys=["mov"], label_keys=["img"]), "'img', which is the reference key"),
        (dict(keys=["mov"], label_keys=[3]), "a label key must be a non-empty str"),
        (dict(keys=["mov"], label_keys=[""]), "a label key must be a non-empty str"),
        (dict(keys=["mov"], label_keys={"mov": 5}), "must be a str or a list of str"),
        (dict(keys=["mov"], label_keys=["mov_registration"]), "the key a registration report is stored under"),
        (dict(keys=["mov", "pet"], label_keys={"mov": ["lab"], "pet": ["lab"]}), "lists 'lab' twice"),
    ]
    for kw, msg in cases:
        with pytest.raises(InvalidInputError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
            RegisterToReferenced(reference_key="img", kind="rigid", **kw)
        assert e.value.fix, kw
    # The array version takes none, and says where it belongs; interpolation= with a kind points to it.
    with pytest.raises(InvalidInputError, match="label_keys") as e:
        RegisterToReference(kind="rigid", label_keys=["lab"])
    assert "RegisterToReferenced" in e.value.fix
    with pytest.raises(InvalidInputError) as e:
        RegisterToReferenced(keys=["mov"], reference_key="img", kind="rigid", interpolation="nearest")
    assert "label_keys" in e.value.fix


def test_a_missing_label_map_fails_before_registering_unless_allowed(subject):
    from medfuse.transforms import RegisterToReferenced

    d = {k: subject[k] for k in ("img", "mov")}
    with pytest.raises(InvalidInputError, match="'mov_lab' that follow 'mov' are not in the data"):
        RegisterToReferenced(keys=["mov"], reference_key="img", kind="rigid", label_keys=["mov_lab"])(d)
    out = RegisterToReferenced(keys=["mov"], reference_key="img", kind=None, label_keys=["mov_lab"],
                               allow_missing_keys=True)(d)
    assert "mov_lab" not in out and out["mov"].shape == subject["img"].shape
