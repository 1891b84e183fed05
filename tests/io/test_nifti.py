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
    with pytest.warns(MedfuseWarning, match="sform .code 2. and qform .code 1."):  # tools disagree on such a file
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
    with pytest.warns(MedfuseWarning, match=r"bare\.nii: a NIfTI file with neither a qform nor an sform"):
        load_image(tmp_path / "bare.nii")  # the file is named, as the other NIfTI warnings name it


# ----------------------------------------------------------------------------- NIfTI space (xform code)
def _codes(path):
    hdr = nib.load(str(path)).header
    return int(hdr["sform_code"]), int(hdr["qform_code"])


def test_nifti_space_names_match_nibabel():
    from medfuse.io.nifti import NIFTI_SPACES

    assert [nib.nifti1.xform_codes.label[c] for c in range(1, 6)] == list(NIFTI_SPACES)


@pytest.mark.parametrize("name, space, code", [("T1", "mni", 4), ("single_subj_T1", "aligned", 2)])
def test_template_space_survives_load_and_save(shared, tmp_path, name, space, code):
    from medfuse.io.writers import save

    src = shared("data", "spm12-templates", f"{name}.nii")
    assert _codes(src) == (code, code)  # the real SPM12 files: MNI templates and an "aligned" single subject
    before = src.read_bytes()
    v = load_image(src)
    assert v.provenance["nifti_space"] == space
    # copies and new voxels on the same grid keep the space
    assert v.copy().provenance["nifti_space"] == space
    assert v.with_array(v.array.astype(np.float32)).provenance["nifti_space"] == space
    for out in (save(v, tmp_path / "v.nii.gz"), save(v, tmp_path / "v2.nii", format="nifti2")):
        assert _codes(out) == (code, code)
        back = load_image(out)
        assert back.provenance["nifti_space"] == space
        assert np.allclose(back.affine, v.affine, atol=1e-4) and np.array_equal(back.array, v.array)
    assert src.read_bytes() == before  # the input is never touched


def test_fused_templates_keep_the_reference_space(shared, tmp_path):
    from medfuse.fusion import fuse
    from medfuse.io.writers import save

    d = shared("data", "spm12-templates")
    t1, pet, single = load_image(d / "T1.nii"), load_image(d / "PET.nii"), load_image(d / "single_subj_T1.nii")
    fused = fuse(t1, pet, method="mean")
    assert fused.provenance["nifti_space"] == "mni" and fused.same_grid(t1)
    assert _codes(save(fused, tmp_path / "f.nii.gz")) == (4, 4)
    # The fused image lies on the first volume's grid, so it takes that volume's space.
    fused2 = fuse(single, t1, method="mean")
    assert _codes(save(fused2, tmp_path / "f2.nii.gz")) == (2, 2)


def test_pipeline_keeps_template_space(shared, tmp_path):
    from medfuse.pipeline import fuse_files

    d = shared("data", "spm12-templates")
    for grid in ("fixed", "finest"):  # "finest" resamples every input onto a new common grid
        r = fuse_files(d / "single_subj_T1.nii", d / "PET.nii", tmp_path / f"{grid}.nii.gz", method="mean", grid=grid)
        assert _codes(r.output) == (2, 2), grid


def test_scanner_and_qform_only_spaces(tmp_path):
    from medfuse.io.writers import save

    aff = np.diag([-1.5, 2.0, 3.0, 1.0])
    aff[:3, 3] = [10, -20, 30]
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    nib.save(img, str(tmp_path / "scanner.nii"))
    v = load_image(tmp_path / "scanner.nii")
    assert v.provenance["nifti_space"] == "scanner"
    assert _codes(save(v, tmp_path / "scanner_out.nii")) == (1, 1)
    # sform code 0: the qform is the transform used, so its code (3, Talairach) is the space.
    img.set_sform(None, code=0)
    img.set_qform(aff, code=3)
    nib.save(img, str(tmp_path / "tal.nii"))
    v = load_image(tmp_path / "tal.nii")
    assert v.provenance["nifti_space"] == "talairach" and np.allclose(v.affine_ras, aff)
    assert _codes(save(v, tmp_path / "tal_out.nii")) == (3, 3)


def test_unknown_space_code_0_is_written_as_scanner(tmp_path):
    """Code 0 means "no transform": medfuse used nibabel's guess, and writes it with code 1 so that other
    tools use that same affine instead of guessing their own (code 1 claims no template alignment)."""
    from medfuse.io.writers import save

    img = nib.Nifti1Image(np.ones((4, 5, 6), np.int16), np.eye(4))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "bare.nii"))
    with pytest.warns(MedfuseWarning, match="neither a qform nor an sform"):
        v = load_image(tmp_path / "bare.nii")
    assert "nifti_space" not in v.provenance
    out = save(v, tmp_path / "bare_out.nii")
    assert _codes(out) == (1, 1)
    assert np.allclose(nib.load(str(out)).affine, nib.load(str(tmp_path / "bare.nii")).affine)


def test_nibabel_conversions_keep_the_space(shared):
    from medfuse.volume import Volume

    t1 = load_image(shared("data", "spm12-templates", "T1.nii"))
    img = t1.to_nibabel()
    assert (int(img.header["sform_code"]), int(img.header["qform_code"])) == (4, 4)
    assert Volume.from_nibabel(img).provenance["nifti_space"] == "mni"
    assert Volume.from_nibabel(nib.load(str(shared("data", "spm12-templates", "single_subj_T1.nii")))
                               ).provenance["nifti_space"] == "aligned"


def test_metatensor_round_trip_keeps_the_space(shared):
    pytest.importorskip("monai")
    from medfuse.volume import Volume

    t1 = load_image(shared("data", "spm12-templates", "T1.nii"))
    mt = t1.to_metatensor()
    assert mt.meta["nifti_space"] == "mni"
    assert Volume.from_metatensor(mt).provenance["nifti_space"] == "mni"



@pytest.mark.parametrize("name", ["A.NII.GZ", "b.Nii.Gz", "c.NII", "D.MHA", "e.Mhd", "F.NRRD"])
def test_endings_in_any_case_load_the_same_image(shared, tmp_path, name):
    # medfuse writes these names (the suffix is matched case-blind) but read none of them back: ITK chose no
    # reader for "D.MHA" and nibabel looked for "b.nii.Gz". (A .mhd's data file keeps the name its header gives.)
    import SimpleITK as sitk

    src = shared("data", "brats-gli-00001", "t1n.nii.gz")
    ref = load_image(src)
    low = tmp_path / ("x" + name[name.index("."):].lower())
    sitk.WriteImage(sitk.ReadImage(str(src)), str(low))
    low.rename(tmp_path / name)
    v = load_image(tmp_path / name)
    np.testing.assert_array_equal(v.array, ref.array)
    np.testing.assert_allclose(v.affine, ref.affine, atol=1e-4)


def test_readers_record_an_absolute_source(shared, tmp_path, monkeypatch):
    # save() refuses to write over a volume's own source; a relative source stopped protecting it after a chdir.
    import shutil

    from medfuse.io.dicom import load_dicom

    shutil.copy(shared("data", "brats-gli-00001", "t1n.nii.gz"), tmp_path / "t1.nii.gz")
    monkeypatch.chdir(tmp_path)
    assert load_image("t1.nii.gz").provenance["source"] == str(tmp_path / "t1.nii.gz")
    dcm = shared("data", "dicom", "qa-transfer-syntaxes", "In", "1.dcm")
    shutil.copy(dcm, tmp_path / "one.dcm")
    assert load_dicom("one.dcm").provenance["source"] == str(tmp_path / "one.dcm")
