"""NIfTI/MetaImage/NRRD reading: real templates, NIfTI-2, 4-D, and bad files."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from medfuse.errors import GeometryError, InvalidInputError, MedfuseWarning, MultipleSeriesError, UnreadableFileError
from medfuse.io.nifti import load_image, load_image_volumes

TEMPLATES = ["EPI", "PD", "PET", "SPECT", "T1", "T2", "Transm", "avg152PD", "avg152T1", "avg152T2", "avg305T1",
             "single_subj_T1"]


def _world_box(v):
    lo, hi = v.bounds()
    return np.concatenate([lo, hi])


def test_spm12_templates_share_one_world_box(shared):
    folder = shared("data", "spm12-templates")
    ref = load_image(folder / "T1.nii")
    assert ref.shape == (91, 109, 91) and ref.spacing == pytest.approx((2, 2, 2))
    # T1 is LAS on disk: in LPS the first axis runs towards patient left
    assert ref.orientation == "LAS"
    box = _world_box(ref)
    for name in TEMPLATES:
        v = load_image(folder / f"{name}.nii", modality="NM" if name == "SPECT" else None)
        assert np.allclose(_world_box(v), box, atol=1e-3), name
        assert v.array.dtype.isnative and v.provenance["reader"] == "nibabel"


def test_spect_big_endian_and_flipped_lands_on_same_voxels(shared):
    folder = shared("data", "spm12-templates")
    spect = load_image(folder / "SPECT.nii", modality="SPECT")
    t1 = load_image(folder / "T1.nii")
    assert spect.modality == "NM" and spect.unit == "arbitrary"
    raw = nib.load(str(folder / "SPECT.nii"))
    assert raw.header.endianness == ">"
    assert spect.array.dtype == np.dtype("int16") and spect.array.dtype.isnative
    # voxel values equal nibabel's (which handles endianness) and the first axis is mirrored against T1
    assert np.array_equal(spect.array, np.asarray(raw.dataobj))
    assert spect.orientation == "RAS" and t1.orientation == "LAS"  # i axes mirrored
    # the same world point maps to mirrored i indices
    p = t1.index_to_world([10, 20, 30])
    assert np.allclose(spect.world_to_index(p), [80, 20, 30], atol=1e-6)


def test_brats_loads(shared):
    v = load_image(shared("data", "brats-gli-00001", "t1n.nii.gz"), modality="MR")
    assert v.shape == (240, 240, 155) and v.spacing == pytest.approx((1, 1, 1))
    assert v.modality == "MR" and v.provenance["source"].endswith("t1n.nii.gz")
    assert float(v.array.max()) > 0


def _img(tmp_path, affine, data=None, name="x.nii.gz", cls=nib.Nifti1Image):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4) if data is None else data
    img = cls(data, affine)
    p = tmp_path / name
    nib.save(img, str(p))
    return p


def test_nifti2_and_sform_preferred_and_scaling(tmp_path):
    aff = np.diag([-1.5, 2.0, 3.0, 1.0])
    aff[:3, 3] = [10, -20, 30]
    p = _img(tmp_path, aff, name="n2.nii", cls=nib.Nifti2Image)
    v = load_image(p)
    assert np.allclose(v.affine_ras, aff) and v.array.dtype == np.int16
    # sform code > 0 wins over a different qform
    img = nib.Nifti1Image(np.ones((2, 3, 4), np.int16), np.eye(4))
    img.set_qform(np.diag([5.0, 5.0, 5.0, 1.0]), code=1)
    img.set_sform(aff, code=2)
    img.header.set_slope_inter(2.0, -1.0)
    nib.save(img, str(tmp_path / "s.nii"))
    v = load_image(tmp_path / "s.nii")
    assert np.allclose(v.affine_ras, aff)
    assert np.allclose(v.array, 1.0)  # 1 * 2 - 1


def test_4d_volumes(tmp_path):
    data = np.random.default_rng(0).random((4, 5, 6, 3)).astype(np.float32)
    p = _img(tmp_path, np.eye(4), data=data, name="four.nii.gz")
    with pytest.raises(MultipleSeriesError, match="3 volumes") as e:
        load_image(p)
    assert str(p) in str(e.value)
    vols = load_image_volumes(p)
    assert len(vols) == 3 and np.array_equal(vols[2].array, data[..., 2])
    assert vols[1].provenance["volume_index"] == 1 and vols[1].provenance["n_volumes"] == 3
    one = _img(tmp_path, np.eye(4), data=data[..., :1], name="one.nii.gz")
    assert load_image(one).shape == (4, 5, 6)


def test_sheared_and_singular_affine_name_the_file(tmp_path):
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    p = _img(tmp_path, sheared, name="shear.nii.gz")
    with pytest.raises(GeometryError, match="sheared") as e:
        load_image(p)
    assert str(p) in str(e.value)
    img = nib.Nifti1Image(np.ones((2, 3, 4), np.int16), np.eye(4))
    img.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # a zero-length third axis
    img.set_qform(None, code=0)
    p = tmp_path / "singular.nii.gz"
    nib.save(img, str(p))
    with pytest.raises(GeometryError) as e:
        load_image(p)
    assert str(p) in str(e.value)


def test_nan_and_zero_size_name_the_file(tmp_path):
    p = _img(tmp_path, np.eye(4), data=np.full((3, 3, 3), np.nan, np.float32), name="nan.nii.gz")
    with pytest.raises(InvalidInputError, match="NaN") as e:
        load_image(p)
    assert str(p) in str(e.value)
    p = _img(tmp_path, np.eye(4), data=np.zeros((3, 0, 3), np.float32), name="zero.nii")
    with pytest.raises(InvalidInputError, match="zero size") as e:
        load_image(p)
    assert str(p) in str(e.value)


def test_empty_and_truncated_files(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="empty") as e:
        load_image(empty)
    assert str(empty) in str(e.value) and "Fix:" in str(e.value)
    good = _img(tmp_path, np.eye(4), data=np.random.default_rng(1).random((30, 30, 30)).astype(np.float32))
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UnreadableFileError) as e:
        load_image(trunc)
    assert str(trunc) in str(e.value)
    trunc_raw = tmp_path / "trunc.nii"
    trunc_raw.write_bytes(gzip.decompress(good.read_bytes())[:1000])
    with pytest.raises(UnreadableFileError):
        load_image(trunc_raw)
    bad_mha = tmp_path / "bad.mha"
    bad_mha.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 9 9 9\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    with pytest.raises(UnreadableFileError) as e:
        load_image(bad_mha)
    assert str(bad_mha) in str(e.value)


def test_modality_override_and_defaults(tmp_path):
    p = _img(tmp_path, np.eye(4))
    v = load_image(p)
    assert (v.modality, v.unit) == ("unknown", "arbitrary")
    v = load_image(p, modality="PET", unit="Bq/mL")
    assert (v.modality, v.unit) == ("PT", "Bq/mL")
    with pytest.raises(InvalidInputError):
        load_image(p, unit="furlongs")


def test_4d_metaimage_and_dispatch(tmp_path):
    import SimpleITK as sitk

    import medfuse

    frames = [sitk.GetImageFromArray(np.full((4, 3, 2), t, np.int16)) for t in range(2)]
    img = sitk.JoinSeries(frames)
    p = tmp_path / "four.mha"
    sitk.WriteImage(img, str(p))
    with pytest.raises(MultipleSeriesError, match="2 volumes"):
        medfuse.load(p)
    vols = medfuse.load_volumes(p)
    assert [int(v.array.max()) for v in vols] == [0, 1] and vols[0].shape == (2, 3, 4)
    assert vols[0].provenance["reader"] == "SimpleITK"


@pytest.mark.parametrize("unit, to_mm", [("meter", 1000.0), ("micron", 0.001), ("mm", 1.0)])
def test_spatial_units_become_mm(tmp_path, unit, to_mm):
    """A file in metres or microns loads in mm, as ITK reads it (the writer then labels it mm)."""
    aff = np.diag([0.002, 0.002, 0.004, 1.0]) if unit == "meter" else np.diag([2.0, 2.0, 4.0, 1.0])
    aff[:3, 3] = [0.01, -0.02, 0.03]
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.int16), aff)
    img.header.set_xyzt_units(unit, "sec")
    nib.save(img, str(tmp_path / "u.nii"))
    v = load_image(tmp_path / "u.nii")
    assert np.allclose(v.affine_ras, np.diag([to_mm] * 3 + [1.0]) @ aff)
    import SimpleITK as sitk

    assert np.allclose(v.spacing, sitk.ReadImage(str(tmp_path / "u.nii")).GetSpacing())


def test_nifti_without_qform_or_sform_warns(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.int16), np.eye(4))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "bare.nii"))
    with pytest.warns(MedfuseWarning, match="neither a qform nor an sform"):
        load_image(tmp_path / "bare.nii")
