"""Transforms as other tools meet them: files written by medfuse, read and applied by plain SimpleITK.

The SPM12 templates share one space, so a transform written into a moving image's affine is the whole truth, and
plain ``sitk.Resample(moving, fixed, sitk.ReadTransform(path))`` on the files as SimpleITK reads them must give
what medfuse's own ``resample`` gives.
"""

import numpy as np
import pytest
import SimpleITK as sitk

from medfuse.errors import InvalidInputError
from medfuse.phantom import rigid_matrix
from medfuse.registration import Transform, load_transform, register, resample
from medfuse.volume import Volume


@pytest.fixture(scope="module")
def spm_dir():
    from tests.conftest import shared_path

    return shared_path("data", "spm12-templates")


def _load(path, modality):
    from medfuse.io import load

    return load(path, modality=modality)


def _sitk_resample(moving_img, fixed_img, path):
    out = sitk.Resample(moving_img, fixed_img, sitk.ReadTransform(str(path)), sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


# SPECT.nii is big-endian int16 stored in RAS voxel order, PET.nii LAS uint8: both orientations meet the files.
@pytest.mark.parametrize("name", ["SPECT", "PET"])
def test_saved_linear_transforms_applied_by_plain_simpleitk_match_medfuse(spm_dir, tmp_path, name):
    fixed, moving = _load(spm_dir / "T1.nii", "MR"), _load(spm_dir / f"{name}.nii", "NM")
    rigid = rigid_matrix((8, -5, 12), (6, -4, 9), center=fixed.center)
    affine = rigid @ np.diag([1.06, 0.95, 1.1, 1.0])
    fixed_img, moving_img = sitk.ReadImage(str(spm_dir / "T1.nii")), sitk.ReadImage(str(spm_dir / f"{name}.nii"))
    for m in (rigid, affine):
        ours = resample(moving, fixed, transform=Transform.from_matrix(m)).array
        assert np.abs(ours - resample(moving, fixed).array).max() > 0.2 * np.abs(ours).max()  # it does move
        for suffix in (".tfm", ".h5", ".mat"):
            p = Transform.from_matrix(m).save(tmp_path / f"t{suffix}", overwrite=True)
            np.testing.assert_allclose(_sitk_resample(moving_img, fixed_img, p), ours,
                                       atol=1e-5 * np.abs(ours).max(), err_msg=suffix)


def test_a_matrix_maps_fixed_points_to_moving_points_in_lps(spm_dir):
    """``Transform.from_matrix(M)``: M takes a fixed (LPS) point to the moving point that lands there. A moving
    image whose affine was multiplied by M (its voxel at p now lies at M p) is put back exactly by M, not by M^-1."""
    fixed, pet = _load(spm_dir / "T1.nii", "MR"), _load(spm_dir / "PET.nii", "PT")
    M = rigid_matrix((8, -5, 12), (6, -4, 9), center=fixed.center)
    moved = Volume(pet.array, M @ pet.affine, modality="PT")
    want = resample(pet, fixed).array
    np.testing.assert_allclose(resample(moved, fixed, transform=Transform.from_matrix(M)).array, want, atol=1e-9)
    assert np.abs(resample(moved, fixed, transform=Transform.from_matrix(np.linalg.inv(M))).array - want).max() > 0.5
    # The same for a point: the voxel the fixed image has at p is the moved image's voxel at M p.
    p = fixed.index_to_world([40.0, 50.0, 45.0])
    np.testing.assert_allclose(Transform.from_matrix(M).transform_points(p), M[:3, :3] @ p + M[:3, 3], atol=1e-9)


def test_a_saved_deformable_composite_gives_the_same_displacement_when_reread(spm_dir, tmp_path):
    fixed = _load(spm_dir / "T1.nii", "MR")
    bs = sitk.BSplineTransformInitializer(fixed.to_sitk(), [4, 4, 4], 3)
    rng = np.random.default_rng(0)
    bs.SetParameters(tuple(float(x) for x in rng.normal(0.0, 3.0, bs.GetNumberOfParameters())))
    # As register(kind="deformable") returns it: the linear stage, then the B-spline (applied first).
    warp = Transform.from_matrix(rigid_matrix((4, -3, 6), (5, 2, -3), center=fixed.center)).compose(Transform(bs))
    head = np.argwhere(fixed.array > 0.2 * fixed.array.max())[::97]
    pts = fixed.index_to_world(head)
    ours = warp.transform_points(pts)
    linear_only = Transform.from_matrix(rigid_matrix((4, -3, 6), (5, 2, -3), center=fixed.center)).transform_points(pts)
    assert np.linalg.norm(ours - linear_only, axis=1).mean() > 1.0  # the B-spline part does displace
    for suffix in (".h5", ".tfm"):
        p = warp.save(tmp_path / f"warp{suffix}")
        raw = sitk.ReadTransform(str(p))
        back = np.array([raw.TransformPoint(tuple(map(float, q))) for q in pts])
        np.testing.assert_allclose(back, ours, atol=1e-6, err_msg=suffix)
        np.testing.assert_allclose(load_transform(p).transform_points(pts), ours, atol=1e-6, err_msg=suffix)


def test_affine_registration_recovers_a_known_affine_and_its_files_reproduce_the_result(spm_dir, tmp_path):
    """T1 on T1 (MR-MR: one optimum, the identity) with a known 6 degree turn, 5-8 % scaling and a shift written
    into the moving image's affine; the saved result applied by plain SimpleITK gives ``resampled``."""
    t1 = _load(spm_dir / "T1.nii", "MR")
    M = rigid_matrix((6, -4, 5), (5, -6, 4), center=t1.center) @ _scaling((1.08, 0.95, 1.05), t1.center)
    moving = Volume(t1.array, M @ t1.affine, modality="MR")
    r = register(t1, moving, kind="affine", initialise="local", multistart_deg=0.0, final_mm=None)
    head = t1.array > 0.2 * t1.array.max()
    pts = t1.index_to_world(np.argwhere(head)[::41])
    err = np.linalg.norm(r.transform.transform_points(pts) - (pts @ M[:3, :3].T + M[:3, 3]), axis=1).mean()
    assert err < 0.5, (err, r.report.to_dict())
    np.testing.assert_allclose(sorted(r.report.scale), sorted(np.linalg.svd(M[:3, :3])[1]), atol=0.01)
    assert not r.report.suspect, r.report.suspect_reasons
    for suffix in (".tfm", ".h5", ".mat"):
        p = r.transform.save(tmp_path / f"r{suffix}")
        np.testing.assert_allclose(_sitk_resample(moving.to_sitk(), t1.to_sitk(), p), r.resampled.array,
                                   atol=1e-5 * np.abs(r.resampled.array).max(), err_msg=suffix)


def _scaling(s, centre):
    c = np.asarray(centre, dtype=float)
    m = np.diag([*s, 1.0])
    m[:3, 3] = c - np.asarray(s) * c
    return m


@pytest.mark.slow
def test_deformable_registration_recovers_a_known_warp_and_its_file_rereads(spm_dir, tmp_path):
    """A 3 mm copy of T1 warped by a known smooth B-spline (2.4 mm mean, 5 mm largest displacement): the
    deformable result is far closer to the warp than its affine stage, and SimpleITK re-reads it unchanged."""
    from medfuse.volume import affine_from_geometry

    t1 = _load(spm_dir / "T1.nii", "MR")
    shape = [int(round(n * 2 / 3)) for n in t1.shape]
    edge = t1.index_to_world([-0.5, -0.5, -0.5])
    grid = Volume(np.zeros(shape, np.uint8), affine_from_geometry((3.0,) * 3, edge + t1.direction @ np.full(3, 1.5),
                                                                  t1.direction))
    bs = sitk.BSplineTransformInitializer(grid.to_sitk(), [2, 2, 2], 3)
    bs.SetParameters(tuple(float(x) for x in np.random.default_rng(1).normal(0.0, 4.0, bs.GetNumberOfParameters())))
    G = Transform(bs)  # fixed (warped) point -> T1 point: the truth of register(warped, plain)
    warped = resample(t1, grid, transform=G)
    plain = resample(t1, grid)
    pts = grid.index_to_world(np.argwhere(plain.array > 0.2 * plain.array.max())[::7])
    truth = G.transform_points(pts)
    r = register(warped, plain, kind="deformable", initialise="none", bspline_grid_mm=60.0, bspline_levels_mm=(3.0,),
                 bspline_iterations=(30,), bspline_samples=3000)
    e_lin = np.linalg.norm(r.linear_transform.transform_points(pts) - truth, axis=1).mean()
    e_def = np.linalg.norm(r.transform.transform_points(pts) - truth, axis=1).mean()
    assert e_lin > 0.7, e_lin  # the warp is not affine: the test is meaningful
    assert e_def < 0.5 * e_lin, (e_lin, e_def, r.report.to_dict())
    assert r.report.jacobian_min > 0 and not r.report.suspect, r.report.to_dict()
    raw = sitk.ReadTransform(str(r.transform.save(tmp_path / "warp.h5")))
    back = np.array([raw.TransformPoint(tuple(map(float, q))) for q in pts])
    np.testing.assert_allclose(back, r.transform.transform_points(pts), atol=1e-6)


def test_transform_files_with_upper_case_endings_read_back_and_are_never_written(tmp_path):
    """ITK picks a transform reader from the ending as written: medfuse reads A.TFM from elsewhere (a Windows
    export), but writing one made a file SimpleITK, Slicer and ANTs cannot open, so it is refused."""
    euler = Transform(sitk.Euler3DTransform((1, 2, 3), 0.1, 0.2, 0.3, (4, 5, 6)))
    endings = ("TFM", "MAT", "Txt", "H5")
    for ending in endings:
        with pytest.raises(InvalidInputError, match="not lower case") as e:
            euler.save(tmp_path / f"a.{ending}")
        assert e.value.fix == f"name it 'a.{ending.lower()}'"
        path = euler.save(tmp_path / f"a.{ending.lower()}").rename(tmp_path / f"a.{ending}")
        np.testing.assert_allclose(load_transform(path).matrix, euler.matrix, atol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"a.{e}" for e in endings)  # no copy left beside


def test_a_mat_file_holds_every_linear_transform_as_ants_writes_it(tmp_path):
    """ANTs writes AffineTransform_double_3_3 (12 parameters, 3 fixed); scripts that parse .mat files look that field
    up. A rigid result was stored as Euler3DTransform_double_3_3 with 4 fixed values."""
    from scipy.io import loadmat

    centre = (4.0, 5.0, 6.0)
    for t in (sitk.Euler3DTransform(centre, 0.1, 0.2, 0.3, (1, 2, 3)), sitk.VersorRigid3DTransform(
            (0.1, 0.0, 0.0, 0.99498743710662), (1, 2, 3), centre), sitk.TranslationTransform(3, (1, 2, 3))):
        mine = Transform(t)
        path = mine.save(tmp_path / f"{t.GetName()}.mat")
        fields = {k: v.ravel() for k, v in loadmat(str(path)).items() if not k.startswith("__")}
        assert sorted(fields) == ["AffineTransform_double_3_3", "fixed"]
        assert fields["AffineTransform_double_3_3"].size == 12 and fields["fixed"].size == 3
        point = (30.0, -10.0, 5.0)
        np.testing.assert_allclose(sitk.ReadTransform(str(path)).TransformPoint(point), t.TransformPoint(point),
                                   atol=1e-9)


def test_a_file_listing_several_transforms_outside_a_composite_is_refused(tmp_path):
    """SimpleITK reads only the first transform of ITK's older list layout, saying so on stderr alone: the affine
    after a translation was dropped and the rest of the run went on."""
    from medfuse.errors import UnreadableFileError

    path = tmp_path / "two.tfm"
    path.write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: TranslationTransform_double_3_3\n"
                    "Parameters: 1 0 0\nFixedParameters: \n#Transform 1\nTransform: AffineTransform_double_3_3\n"
                    "Parameters: 2 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n")
    with pytest.raises(UnreadableFileError, match=r"lists 2 transforms one after another.*not in a composite") as e:
        load_transform(path)
    assert "Transform.compose" in e.value.fix
    composite = sitk.CompositeTransform([sitk.TranslationTransform(3, (1, 0, 0)), sitk.AffineTransform(3)])
    sitk.WriteTransform(composite, str(tmp_path / "composite.tfm"))  # a composite lists its parts too: still read
    np.testing.assert_allclose(load_transform(tmp_path / "composite.tfm").transform_points([(0.0, 0.0, 0.0)]),
                               [(1.0, 0.0, 0.0)])


def test_a_cut_short_or_miscounted_transform_file_is_refused_before_simpleitk_reads_it(tmp_path):
    """SimpleITK read a .tfm cut inside its Parameters line as the identity, without an error, and one with two
    parameters for an Euler transform read past them (the process later died of a corrupted heap). A .h5 that
    is not HDF5 printed HDF5's own traces before the error. Files SimpleITK writes, of every fixed-count kind,
    are still read."""
    from medfuse.errors import UnreadableFileError

    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.17, -0.1, 0.14, (7.0, -5.0, 9.0))
    good = tmp_path / "good.tfm"
    sitk.WriteTransform(euler, str(good))
    text = good.read_text()
    cut = tmp_path / "cut.tfm"
    cut.write_text(text[:text.index("\nFixedParameters")])  # the Parameters line whole, nothing after it
    with pytest.raises(UnreadableFileError, match="its Euler3DTransform_double_3_3 has no FixedParameters line.*"
                                                  "cut short") as e:
        load_transform(cut)
    assert "FixedParameters: 0 0 0" in e.value.fix
    # Without the line SimpleITK reads even a translation (no fixed parameters) as the identity; with it, as it is.
    bare = tmp_path / "translation.tfm"
    text_t = "#Insight Transform File V1.0\nTransform: TranslationTransform_double_3_3\nParameters: 1 2 3\n"
    bare.write_text(text_t)
    assert sitk.ReadTransform(str(bare)).TransformPoint((0.0, 0.0, 0.0)) == (0.0, 0.0, 0.0)
    with pytest.raises(UnreadableFileError, match="no FixedParameters line"):
        load_transform(bare)
    bare.write_text(text_t + "FixedParameters:\n")
    np.testing.assert_allclose(load_transform(bare).transform_points([(0.0, 0.0, 0.0)])[0], (1.0, 2.0, 3.0))
    short = tmp_path / "short.tfm"
    short.write_text(text.replace(text.split("Parameters: ")[1].split("\n")[0], "0.1 0.2", 1))
    with pytest.raises(UnreadableFileError, match="has 2 parameters .* that kind has 6"):
        load_transform(short)
    words = tmp_path / "words.tfm"
    words.write_text(text.replace("FixedParameters: ", "FixedParameters: x", 1))
    with pytest.raises(UnreadableFileError, match="FixedParameters value that is not a number"):
        load_transform(words)
    not_h5 = tmp_path / "not.h5"
    not_h5.write_bytes(b"garbage" * 100)
    with pytest.raises(UnreadableFileError, match="not an HDF5 file"):
        load_transform(not_h5)

    point = (30.0, -10.0, 5.0)
    np.testing.assert_allclose(load_transform(good).transform_points([point])[0], euler.TransformPoint(point))
    kinds = [sitk.AffineTransform(3), sitk.VersorRigid3DTransform(), sitk.Similarity3DTransform(),
             sitk.ScaleVersor3DTransform(), sitk.ScaleSkewVersor3DTransform(), sitk.VersorTransform(),
             sitk.TranslationTransform(3, (1.0, 2.0, 3.0)), sitk.ScaleTransform(3, (1.0, 2.0, 3.0)),
             sitk.BSplineTransformInitializer(sitk.Image([8, 8, 8], sitk.sitkFloat32), [3, 3, 3])]
    for t in kinds:
        for ending in (".tfm", ".h5"):
            path = tmp_path / f"{t.GetName()}{ending}"
            sitk.WriteTransform(t, str(path))
            np.testing.assert_allclose(load_transform(path).transform_points([point])[0], t.TransformPoint(point),
                                       err_msg=path.name)
    # Euler files of older ITK have three fixed parameters (no ZYX flag): still read.
    older = tmp_path / "older.tfm"
    older.write_text(text.replace("FixedParameters: 1 2 3 0", "FixedParameters: 1 2 3"))
    assert "FixedParameters: 1 2 3\n" in older.read_text()
    np.testing.assert_allclose(load_transform(older).transform_points([point])[0], euler.TransformPoint(point))


def test_an_image_given_as_a_transform_is_named_as_an_image(tmp_path):
    from medfuse.errors import UnreadableFileError

    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3), str(tmp_path / "warp.nii.gz"))
    with pytest.raises(UnreadableFileError, match="this is an image file, not a transform file") as e:
        load_transform(tmp_path / "warp.nii.gz")
    assert "DisplacementFieldTransform" in e.value.fix
