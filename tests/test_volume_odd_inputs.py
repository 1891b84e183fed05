"""Volume given inputs that used to lose information silently: masked arrays, unknown MONAI spaces, and dtypes
torch keeps but cannot compute with."""

from __future__ import annotations

import numpy as np
import pytest

from medfuse.errors import InvalidInputError
from medfuse.volume import Volume

M = np.diag([2.0, 3.0, 4.0, 1.0])
M[:3, 3] = [10.0, -20.0, 30.0]


def _a(dtype=np.float32):
    return np.arange(24, dtype=dtype).reshape(2, 3, 4)


# ---------------------------------------------------------------------------- masked arrays
def test_masked_array_is_refused_by_the_constructor_and_with_array():
    a = _a()
    ma = np.ma.masked_array(a, a > 5)
    with pytest.raises(InvalidInputError, match="masked array") as e:
        Volume(ma, M)
    assert "np.ma.filled" in e.value.fix
    v = Volume(a, M)
    with pytest.raises(InvalidInputError, match="masked array"):
        v.with_array(ma)
    with pytest.raises(InvalidInputError, match="masked array"):
        v.array = ma
    # filled as the fix says, it is accepted with the fill value in place of the masked voxels
    w = Volume(np.ma.filled(ma, 0), M)
    assert w.array.max() == 5 and w.array.dtype == np.float32


# ---------------------------------------------------------------------------- MONAI space
def _metatensor(space):
    pytest.importorskip("monai")
    import torch
    from monai.data import MetaTensor

    meta = {} if space is None else {"space": space}
    return MetaTensor(torch.from_numpy(_a())[None], affine=torch.as_tensor(M), meta=meta)


def test_metatensor_space_ras_lps_and_absent():
    from monai.utils import SpaceKeys

    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ M
    for space, want in ((None, ras), ("RAS", ras), (SpaceKeys.RAS, ras), ("ras", ras),
                        ("LPS", M), (SpaceKeys.LPS, M), (" lps ", M)):
        t = _metatensor(space)
        if space is None:
            t.meta.pop("space", None)  # MetaTensor fills in RAS itself; a meta without it is RAS too
        np.testing.assert_array_equal(Volume.from_metatensor(t).affine, want)


@pytest.mark.parametrize("space", ["XYZ", "LAS", "", None, 3])
def test_metatensor_with_unknown_space_is_refused(space):
    # "XYZ" was taken for LPS (x and y flipped against the RAS default) without a word.
    t = _metatensor("RAS")
    t.meta["space"] = space
    with pytest.raises(InvalidInputError, match=r"meta\['space'\]") as e:
        Volume.from_metatensor(t)
    assert "SpaceKeys" in e.value.fix


# ---------------------------------------------------------------------------- torch dtypes
@pytest.mark.parametrize("dtype,want", [("uint16", "int32"), ("uint32", "int64"), ("uint64", "int64")])
def test_unsigned_voxels_become_a_signed_tensor_torch_computes_with(dtype, want):
    pytest.importorskip("monai")
    import torch

    a = _a(dtype) * 2000  # uint16 values above int16's range
    a[0, 0, 0] = np.iinfo(dtype).max if dtype != "uint64" else np.iinfo(np.int64).max
    t = Volume(a, M).to_metatensor()
    assert t.dtype == getattr(torch, want)
    # uint16 max() raised NotImplementedError in torch
    assert int(t.max()) == int(a.max()) and int(t.min()) == int(a.min())
    np.testing.assert_array_equal(t.as_tensor()[0].numpy(), a)  # values exact
    back = Volume.from_metatensor(t)
    np.testing.assert_array_equal(back.array, a)
    np.testing.assert_array_equal(back.affine, M)
    assert back.dtype == np.dtype(dtype)  # the round trip keeps the dtype
    # A transform that made values negative (or float) keeps the tensor's dtype: narrowing would wrap them.
    shifted = Volume.from_metatensor(t - 2001)  # the smallest voxel is 2000
    assert shifted.dtype == np.dtype(want) and int(shifted.array.min()) == -1
    assert Volume.from_metatensor(t.float()).dtype == np.float32


def test_uint64_beyond_int64_is_refused():
    pytest.importorskip("monai")
    a = _a(np.uint64)
    a[0, 0, 0] = np.iinfo(np.uint64).max
    with pytest.raises(InvalidInputError, match="uint64"):
        Volume(a, M).to_metatensor()


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_dtypes_torch_handles_are_kept(dtype):
    pytest.importorskip("monai")
    import torch

    assert Volume(_a(dtype), M).to_metatensor().dtype == getattr(torch, dtype)


def test_a_volume_read_through_nibabel_or_monai_keeps_its_source_so_save_never_writes_over_it(tmp_path):
    """``save(Volume.from_nibabel(nibabel.load(f)), f, overwrite=True)`` rewrote the input file."""
    import shutil
    from pathlib import Path

    import nibabel as nib

    import medfuse
    from medfuse.errors import OutputExistsError

    f = tmp_path / "mr.nii.gz"
    shutil.copy(Path(__file__).resolve().parents[1] / "sample_volumes" / "mr_t1.nii.gz", f)
    before = f.read_bytes()
    from_nib = medfuse.Volume.from_nibabel(nib.load(f))
    assert from_nib.provenance["source"] == str(f.absolute())
    candidates = [from_nib, from_nib.with_array(from_nib.array * 0)]
    pytest.importorskip("monai")
    from monai.transforms import LoadImage

    candidates.append(medfuse.Volume.from_metatensor(LoadImage(image_only=True, ensure_channel_first=True)(str(f))))
    for v in candidates:
        with pytest.raises(OutputExistsError, match="own source"):
            medfuse.save(v, f, overwrite=True)
    assert f.read_bytes() == before
    # An image in memory names no file: nothing is recorded.
    assert "source" not in medfuse.Volume.from_nibabel(nib.Nifti1Image(np.zeros((4, 4, 4)), np.eye(4))).provenance


@pytest.mark.parametrize("modality, unit", [("PT", "HU"), ("NM", "HU"), ("MR", "SUVbw"), ("MR", "HU"),
                                            ("CT", "SUVlbm"), ("CT", "Bq/mL"), ("MR", "counts")])
def test_a_unit_that_no_image_of_the_modality_has_is_refused(modality, unit):
    """A PET in HU or an MR in SUV was accepted, and the unit then chose its normalisation and its fill value."""
    a = np.ones((4, 4, 4), np.float32)
    with pytest.raises(InvalidInputError, match=f"unit '{unit}' is not a unit of modality '{modality}'") as ei:
        Volume(a, np.eye(4), modality=modality, unit=unit)
    assert "HU goes with CT" in ei.value.fix
    v = Volume(a, np.eye(4), modality=modality)
    with pytest.raises(InvalidInputError, match="is not a unit of modality"):
        v.unit = unit  # set afterwards: checked as the constructor checks it
    assert v.unit == "arbitrary"


def test_units_and_modalities_that_belong_together_are_taken():
    a = np.ones((4, 4, 4), np.float32)
    for modality, unit in (("CT", "HU"), ("PT", "SUVbw"), ("PT", "Bq/mL"), ("NM", "counts"), ("NM", "SUVbw"),
                           ("unknown", "HU"), ("unknown", "SUVbsa"), ("MR", "arbitrary"), ("CT", "arbitrary")):
        assert (Volume(a, np.eye(4), modality=modality, unit=unit).unit) == unit
    ct = Volume(a, np.eye(4), modality="CT", unit="HU")
    with pytest.raises(InvalidInputError, match="'HU' is not a unit of modality 'MR'"):
        ct.modality = "MR"
    assert ct.modality == "CT"
    assert ct.with_array(a, modality="MR", unit="arbitrary").modality == "MR"  # both together
