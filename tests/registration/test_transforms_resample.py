"""Transforms (ITK files, composition, points) and resampling (geometry, modality, labels, common grid)."""

import numpy as np
import pytest
import SimpleITK as sitk

from medfuse.errors import InvalidInputError, OutputExistsError, UnreadableFileError
from medfuse.phantom import rigid_matrix
from medfuse.registration import Transform, common_grid, load_transform, resample, resample_to_common_grid
from medfuse.volume import Volume


def _vol(shape=(20, 24, 16), spacing=(2.0, 1.5, 3.0), origin=(-10.0, 5.0, 30.0), modality="PT", unit="SUVbw"):
    rng = np.random.default_rng(0)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return Volume(rng.random(shape).astype(np.float32), aff, modality=modality, unit=unit)


@pytest.mark.parametrize("suffix", [".tfm", ".txt", ".h5"])
def test_save_load_roundtrip_is_exact_and_readable_by_sitk(tmp_path, suffix):
    M = rigid_matrix((10, -5, 20), (3, -4, 12), center=(5, 6, 7))
    t = Transform.from_matrix(M)
    p = t.save(tmp_path / f"t{suffix}")
    back = load_transform(p)
    np.testing.assert_allclose(back.matrix, M, atol=1e-9)
    raw = sitk.ReadTransform(str(p))  # what Slicer/ANTs/SimpleITK would do
    np.testing.assert_allclose(raw.TransformPoint((1.0, 2.0, 3.0)), M[:3, :3] @ [1, 2, 3] + M[:3, 3], atol=1e-9)
    with pytest.raises(OutputExistsError):
        t.save(p)
    t.save(p, overwrite=True)


def test_bad_transform_files(tmp_path):
    with pytest.raises(UnreadableFileError):
        load_transform(tmp_path / "missing.tfm")
    bad = tmp_path / "bad.tfm"
    bad.write_text("not a transform")
    with pytest.raises(UnreadableFileError):
        load_transform(bad)
    with pytest.raises(InvalidInputError):
        Transform.identity().save(tmp_path / "t.json")


def test_compose_inverse_points():
    A = rigid_matrix((0, 0, 30), (10, 0, 0))
    B = rigid_matrix((15, 0, 0), (0, -5, 2))
    a, b = Transform.from_matrix(A), Transform.from_matrix(B)
    np.testing.assert_allclose(a.compose(b).matrix, A @ B, atol=1e-9)  # b first, then a
    np.testing.assert_allclose(a.inverse().matrix, np.linalg.inv(A), atol=1e-9)
    pts = np.array([[0.0, 0, 0], [10, 20, 30]])
    np.testing.assert_allclose(a.transform_points(pts), pts @ A[:3, :3].T + A[:3, 3], atol=1e-9)
    np.testing.assert_allclose(a.transform_points(pts[1]), A[:3, :3] @ pts[1] + A[:3, 3], atol=1e-9)


def test_resample_preserves_reference_geometry_and_moving_modality_unit():
    mov = _vol()
    ref = _vol(shape=(10, 12, 9), spacing=(3.0, 3.0, 3.0), origin=(-5.0, 8.0, 33.0), modality="MR", unit="arbitrary")
    out = resample(mov, ref)
    assert out.same_grid(ref)
    np.testing.assert_allclose(out.affine, ref.affine)
    assert (out.modality, out.unit) == ("PT", "SUVbw")
    # identity resampling at voxel centres that coincide reproduces the values
    same = resample(mov, mov)
    np.testing.assert_allclose(same.array, mov.array, atol=1e-6)


def test_translation_moves_content_by_the_right_amount():
    arr = np.zeros((30, 30, 30), np.float32)
    arr[10, 12, 14] = 1
    v = Volume(arr, np.eye(4))
    # fixed point p samples the moving image at p + (2, 0, -3)
    out = Transform.from_matrix(np.array([[1, 0, 0, 2], [0, 1, 0, 0], [0, 0, 1, -3], [0, 0, 0, 1.0]])).apply(v)
    assert tuple(np.argwhere(out.array == 1)[0]) == (8, 12, 17)


def test_label_maps_use_nearest_neighbour():
    lab = np.zeros((20, 20, 20), np.int16)
    lab[5:15, 5:15, 5:15] = 7
    v = Volume(lab, np.eye(4), modality="MR")
    ref = Volume(np.zeros((13, 13, 13)), np.diag([1.5, 1.5, 1.5, 1.0]) + np.diag([0, 0, 0, 0]))
    out = resample(v, ref, interpolation="nearest")
    assert set(np.unique(out.array)) <= {0, 7}
    mask = Volume(lab > 0, np.eye(4))
    out_b = resample(mask, ref)  # boolean: nearest automatically
    assert out_b.array.dtype == bool and out_b.array.any()
    with pytest.raises(InvalidInputError):
        resample(v, ref, interpolation="cubic")


def test_an_integer_label_map_of_unknown_modality_left_to_the_default_is_warned_about(shared, tmp_path):
    """A segmentation saved as integers (BraTS: uint8 labels 0, 1, 2, 3) resampled without ``interpolation=``
    came back with values between its labels at every edge, without a word."""
    import warnings

    import nibabel as nib

    from medfuse.errors import MedfuseWarning
    from medfuse.io import load

    t2f = nib.load(str(shared("data", "brats-gli-00001", "t2f.nii.gz")))
    x = np.asarray(t2f.dataobj, dtype=np.float32)
    seg = np.digitize(x, np.percentile(x[x > 0], [60, 90, 99])).astype(np.uint8)  # labels 0-3 on real anatomy
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(seg, t2f.affine), str(path))
    labels = load(path)
    assert labels.modality == "unknown" and labels.array.dtype == np.uint8
    # 2.5 mm voxels: their centres fall between the 1 mm ones, where linear interpolation blends.
    coarse = Volume(np.zeros((96, 96, 62), np.float32), labels.affine @ np.diag([2.5, 2.5, 2.5, 1.0]))

    with pytest.warns(MedfuseWarning, match=r"label map or mask \(uint8, 4 distinct values: 0, 1, 2, 3; "
                                             r"modality unknown\).*interpolation='nearest'"):
        blended = resample(labels, coarse)
    assert not np.array_equal(blended.array, np.round(blended.array))  # what the warning is for
    assert "interpolation='nearest'" in blended.provenance["warnings"][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        kept = resample(labels, coarse, interpolation="nearest")
        assert kept.array.dtype == np.uint8 and set(np.unique(kept.array)) == {0, 1, 2, 3}
        on_purpose = resample(labels, coarse, interpolation="linear")
        np.testing.assert_array_equal(on_purpose.array, blended.array)
        # An image is an image: the same integers as MR, and the T2-FLAIR's own grey levels, are not warned about.
        resample(load(path, modality="MR"), coarse)
        grey = labels.with_array(np.clip(x, 0, 65535).astype(np.uint16))
        resample(grey, coarse)
        resample_to_common_grid([coarse, labels], interpolation="nearest")
    with pytest.warns(MedfuseWarning, match="label map"):
        resample_to_common_grid([coarse, labels])


def test_ct_default_is_air():
    ct = _vol(modality="CT", unit="HU")
    far = _vol(origin=(500.0, 500.0, 500.0))
    assert np.all(resample(ct, far).array == -1024)


def test_common_grid_finest_spacing_covering_fixed_fov():
    fixed = _vol(shape=(20, 24, 16), spacing=(2.0, 2.0, 3.0))
    fine = _vol(shape=(10, 10, 10), spacing=(1.0, 1.0, 1.0), origin=(0.0, 10.0, 40.0))
    grid = common_grid([fixed, fine])
    assert grid.spacing == (1.0, 1.0, 1.0)
    e0 = fixed.index_to_world([-0.5, -0.5, -0.5]), fixed.index_to_world(np.asarray(fixed.shape) - 0.5)
    e1 = grid.index_to_world([-0.5, -0.5, -0.5]), grid.index_to_world(np.asarray(grid.shape) - 0.5)
    np.testing.assert_allclose(e1[0], e0[0], atol=1e-9)
    np.testing.assert_allclose(e1[1], e0[1], atol=1e-9)
    outs = resample_to_common_grid([fixed, fine])
    assert all(o.same_grid(grid) for o in outs)
    assert [o.modality for o in outs] == ["PT", "PT"]


def test_mat_files_hold_only_what_can_be_read_back(tmp_path):
    # A composite of matrices (what compose() returns) used to be written to .mat as a file that SimpleITK, ANTs
    # and medfuse itself could not read; a B-spline too. Composites of matrices are now flattened, and deformable
    # transforms refused before anything is written.
    A = rigid_matrix((0, 0, 30), (10, 0, 0), center=(5, 6, 7))
    B = rigid_matrix((15, -5, 0), (0, -5, 2))
    p = Transform.from_matrix(A).compose(Transform.from_matrix(B)).save(tmp_path / "ab.mat")
    np.testing.assert_allclose(load_transform(p).matrix, A @ B, atol=1e-9)
    raw = sitk.ReadTransform(str(p))  # what ANTs/SimpleITK would do
    np.testing.assert_allclose(raw.TransformPoint((1.0, 2.0, 3.0)), (A @ B)[:3, :3] @ [1, 2, 3] + (A @ B)[:3, 3],
                               atol=1e-9)
    ref = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    bs = sitk.BSplineTransformInitializer(ref, [2, 2, 2], order=3)
    bs.SetParameters(tuple(np.linspace(-1, 1, len(bs.GetParameters()))))
    dfm = Transform.from_matrix(A).compose(Transform(bs))
    with pytest.raises(InvalidInputError, match=r"\.mat"):
        dfm.save(tmp_path / "dfm.mat")
    assert not (tmp_path / "dfm.mat").exists()
    pts = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_allclose(load_transform(dfm.save(tmp_path / "dfm.h5")).transform_points(pts),
                               dfm.transform_points(pts), atol=1e-9)


def test_outside_value_is_not_wrapped_around_in_integer_volumes(shared):
    # -1024 HU written into an unsigned CT used to wrap around to 64512 (uint16) or turn into 0 (uint8).
    ct16 = _vol(modality="CT", unit="HU").with_array(np.full((20, 24, 16), 40, np.uint16))
    far = _vol(origin=(500.0, 500.0, 500.0))
    out = resample(ct16, far, interpolation="nearest")
    assert out.array.dtype == np.int32 and np.all(out.array == -1024)
    out8 = resample(ct16.with_array(np.full((20, 24, 16), 40, np.uint8)), far, interpolation="nearest")
    assert out8.array.dtype == np.int16 and np.all(out8.array == -1024)
    # A user-chosen outside marker on unsigned uptake counts, and the inside values kept exactly.
    spect_like = _vol(modality="NM", unit="arbitrary").with_array(np.arange(20 * 24 * 16, dtype=np.uint16).reshape(20, 24, 16))
    half = _vol(origin=(-10.0 + 20.0, 5.0, 30.0))  # shifted by 10 voxels: half inside, half outside
    o = resample(spect_like, half, interpolation="nearest", default=-1)
    assert np.all(o.array[10:] == -1) and np.array_equal(o.array[:10], spect_like.array[10:])
    # Masks stay boolean and False outside even when they carry CT's modality and unit; dtypes SimpleITK
    # refuses (float16, e.g. a half-precision network output) are resampled as float32.
    mask = ct16.with_array(np.ones((20, 24, 16), bool))
    assert resample(mask, far).array.dtype == bool and not resample(mask, far).array.any()
    h = _vol().with_array(np.ones((20, 24, 16), np.float16))
    assert np.allclose(resample(h, h).array, 1.0)
    # The real big-endian int16 SPECT template keeps its values with nearest neighbour.
    from medfuse.io import load

    d = shared("data", "spm12-templates")
    spect, t1 = load(d / "SPECT.nii", modality="NM"), load(d / "T1.nii", modality="MR")
    o = resample(spect, t1, interpolation="nearest", default=-1)
    assert o.array.dtype == np.int16 and o.array.min() >= 0  # the grids coincide: nothing falls outside
    np.testing.assert_array_equal(o.array, spect.array[::-1])  # RAS stored -> LAS grid: x is flipped


def test_resampled_image_takes_the_reference_nifti_space(shared, tmp_path):
    """The output lies on the reference grid, in the reference's world: its NIfTI space is the reference's."""
    import nibabel as nib

    from medfuse.io import load, save

    d = shared("data", "spm12-templates")
    mni, aligned = load(d / "T1.nii"), load(d / "single_subj_T1.nii")  # sform codes 4 and 2
    assert (mni.provenance["nifti_space"], aligned.provenance["nifti_space"]) == ("mni", "aligned")
    shift = Transform.from_matrix(rigid_matrix((0, 0, 5), (2, 0, 0)))
    assert resample(aligned, mni, transform=shift).provenance["nifti_space"] == "mni"
    out = save(resample(mni, aligned, transform=shift), tmp_path / "on_aligned.nii.gz")
    hdr = nib.load(str(out)).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (2, 2)
    # A reference with no recorded space (scanner space, e.g. DICOM or a bare grid): no template label survives.
    grid = _vol(shape=(30, 30, 30), spacing=(3.0, 3.0, 3.0), origin=(-45.0, -60.0, -30.0))
    onto_scanner = resample(mni, grid)
    assert "nifti_space" not in onto_scanner.provenance
    hdr = nib.load(str(save(onto_scanner, tmp_path / "scanner.nii.gz"))).header
    assert int(hdr["sform_code"]) == 1
    # A common grid lies in its reference's world and passes the space on.
    assert common_grid([mni, _vol()]).provenance["nifti_space"] == "mni"
    assert {v.provenance.get("nifti_space") for v in resample_to_common_grid([mni, grid])} == {"mni"}


def test_volume_already_on_the_common_grid_takes_the_reference_space(shared):
    # The volume on the grid is copied, not resampled; it used to keep its own label ("aligned" beside an MNI
    # reference), so the two outputs of one call claimed different worlds for the same coordinates.
    from medfuse.io import load

    d = shared("data", "spm12-templates")
    mni = load(d / "T1.nii")
    same_grid_other_label = Volume(mni.array.copy(), mni.affine.copy(), modality="MR",
                                   provenance={"nifti_space": "aligned"})
    out = resample_to_common_grid([mni, same_grid_other_label])
    assert out[1].same_grid(mni)
    assert [v.provenance.get("nifti_space") for v in out] == ["mni", "mni"]


def test_resampling_across_dicom_frames_of_reference_without_a_transform_is_warned(samples_dir):
    """The sample PET was acquired in another frame of reference than the CT (it is misplaced against it, as
    ground_truth.json says): put on the CT grid as it lies, it is misaligned, and the user must hear so. A
    transform (registration) takes the PET into the CT's frame; volumes of one frame, and NIfTI files (which
    carry no frame), resample without a word. The UIDs never appear in the message."""
    import warnings

    import medfuse
    from medfuse.errors import MedfuseWarning

    ct, pet = medfuse.load(samples_dir / "ct"), medfuse.load(samples_dir / "pet")
    ct_frame, pet_frame = ct.provenance["frame_of_reference_uid"], pet.provenance["frame_of_reference_uid"]
    assert ct_frame and pet_frame and ct_frame != pet_frame
    with pytest.warns(MedfuseWarning, match="different DICOM frames of reference.*register them first") as rec:
        out = resample(pet, ct)
    assert all(uid not in str(w.message) for w in rec for uid in (ct_frame, pet_frame))
    assert out.provenance["frame_of_reference_uid"] == pet_frame  # not moved into the CT's patient space
    assert any("frames of reference" in w for w in out.provenance["warnings"])
    with pytest.warns(MedfuseWarning, match="frames of reference"):
        resample_to_common_grid([ct, pet])  # the common grid lies in the CT's frame

    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        # nearest: a PET resampled linearly warns that its maximum fell (tests/registration/test_resample_suv_peak.py)
        moved = resample(pet, ct, transform=Transform.from_matrix(np.eye(4)), interpolation="nearest")
        assert moved.provenance["frame_of_reference_uid"] == ct_frame
        resample(ct, common_grid([ct, pet]))  # one frame
        mr = medfuse.load(samples_dir / "mr_t1.nii.gz")
        resample(mr, ct)  # a NIfTI file has no frame of reference to compare
        resample(pet, mr, interpolation="nearest")


@pytest.mark.parametrize("dtype, default, widened", [(np.uint8, 300, np.uint16), (np.int8, 200, np.int16),
                                                     (np.uint16, 70000, np.uint32), (np.uint32, -1, np.int64),
                                                     (np.uint8, 7, np.uint8)])
def test_nearest_widens_labels_to_an_integer_type_that_holds_the_default(dtype, default, widened):
    """A default outside the labels' type gave float64 for every widened type but int16/32/64: a uint8
    segmentation came back as a float image (MONAI and other tools then take it for one)."""
    ref = Volume(np.zeros((4, 4, 4), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    labels = np.full((4, 4, 4), 3, dtype)
    labels[0] = 1
    out = resample(Volume(labels, np.eye(4)), ref, interpolation="nearest", default=default)
    assert out.array.dtype == widened
    assert out.array[0, 0, 0] == 1 and out.array[1, 1, 1] == 3 and out.array[3, 3, 3] == default


def test_nearest_keeps_64_bit_labels_beyond_float64_exactly():
    """ITK resamples through a double: the label 2**53 + 1 came back as 2**53 with no word."""
    big = np.full((6, 6, 6), 2 ** 53 + 1, np.uint64)
    big[:2] = 2 ** 63 + 5
    big[2:4] = 3
    vol = Volume(big, np.eye(4))
    same = resample(vol, vol, interpolation="nearest")
    assert same.array.dtype == np.uint64 and np.array_equal(same.array, big)
    ref = Volume(np.zeros((5, 5, 5), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))  # every other voxel, and beyond
    out = resample(vol, ref, interpolation="nearest", default=7)
    assert out.array.dtype == np.uint64
    assert np.array_equal(out.array[:3, :3, :3], big[::2, ::2, ::2]) and np.all(out.array[3:] == 7)
    signed = Volume(np.where(big > 2 ** 62, -(2 ** 60), 2 ** 60).astype(np.int64), np.eye(4))
    o = resample(signed, ref, interpolation="nearest", default=-1)
    assert sorted(np.unique(o.array).tolist()) == [-(2 ** 60), -1, 2 ** 60]
    with pytest.raises(InvalidInputError, match=r"above 2\*\*53, and no type holds both them and default=-1") as ei:
        resample(vol, ref, interpolation="nearest", default=-1)
    assert "default=0" in ei.value.fix


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_infinite_voxels_stay_infinite_after_resampling(interpolation):
    """ITK clamps outputs to the pixel type: +-inf came back as +-3.4e38, which no NaN/inf check then caught."""
    a = np.ones((10, 10, 6), np.float32)
    a[3, 3, 3], a[6, 6, 2] = np.inf, -np.inf
    vol = Volume(a, np.eye(4), modality="PT", unit="SUVbw")
    out = resample(vol, vol, interpolation=interpolation).array
    assert out[3, 3, 3] == np.inf and out[6, 6, 2] == -np.inf
    fine = resample(vol, Volume(np.zeros((20, 20, 12), np.float32), np.diag([0.5, 0.5, 0.5, 1.0])),
                    interpolation=interpolation).array
    assert np.abs(fine[np.isfinite(fine)]).max() < 1e38 and np.isposinf(fine).any() and np.isneginf(fine).any()


def test_bspline_refuses_nan_which_it_would_spread_over_the_volume():
    a = np.ones((10, 10, 6), np.float32)
    a[4, 4, 3] = np.nan
    vol = Volume(a, np.eye(4))
    with pytest.raises(InvalidInputError, match="B-spline") as e:
        resample(vol, Volume(np.zeros((20, 20, 12), np.float32), np.diag([0.5, 0.5, 0.5, 1.0])),
                 interpolation="bspline")
    assert "linear" in e.value.fix and "nan_to_num" in e.value.fix
    assert np.isnan(resample(vol, vol, interpolation="linear").array).sum() <= 8  # linear keeps it local


def test_transform_save_checks_overwrite_and_makes_no_folder(tmp_path):
    """overwrite="no" overwrote (a true str); a file in the folder's place was a bare FileExistsError from mkdir;
    a missing folder was made, where medfuse.save refuses it."""
    from medfuse.errors import OutputWriteError

    t = Transform.identity()
    t.save(tmp_path / "x.tfm")
    with pytest.raises(InvalidInputError, match="overwrite must be True or False"):
        t.save(tmp_path / "x.tfm", overwrite="no")
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputWriteError, match="folder is a file"):
        t.save(tmp_path / "f" / "x.tfm")
    with pytest.raises(OutputWriteError, match="folder does not exist"):
        t.save(tmp_path / "sub" / "x.tfm")
    assert not (tmp_path / "sub").exists()
