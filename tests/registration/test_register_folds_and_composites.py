"""The fold check on flipped/permuted grids, nested composites on disk, and the affine stage."""
import numpy as np
import pytest
import SimpleITK as sitk

from medfuse.registration.register import _jacobian


def _linear_bspline(ref, A):
    """A B-spline on ``ref`` whose displacement is exactly u(x) = A (x - c) (cubic B-splines reproduce lines)."""
    bs = sitk.BSplineTransformInitializer(ref, [4, 4, 4], 3)
    c = np.asarray(ref.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ref.GetSize()]))
    coeffs = bs.GetCoefficientImages()
    pts = np.array([coeffs[0].TransformIndexToPhysicalPoint(tuple(int(i) for i in idx[::-1]))
                    for idx in np.ndindex(sitk.GetArrayViewFromImage(coeffs[0]).shape)])
    u = (pts - c) @ np.asarray(A).T
    bs.SetParameters(tuple(float(v) for v in np.concatenate([u[:, 0], u[:, 1], u[:, 2]])))
    return bs


@pytest.mark.parametrize("direction", [
    np.eye(3),
    np.diag([-1.0, -1.0, 1.0]),  # RAS-stored NIfTI
    np.diag([1.0, -1.0, 1.0]),  # the SPM12 templates (LAS)
    np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),  # a permuted (sagittal-like) grid
], ids=["LPS", "RAS", "LAS", "permuted"])
@pytest.mark.parametrize("A, det", [
    (np.diag([0.0, -1.2, 0.0]), -0.2),  # a squeeze along y that folds
    (np.diag([-0.5, 0.0, 0.0]), 0.5),  # a squeeze along x that does not
    ([[0.0, 0.3, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.2]], 1.2),  # shear + stretch
])
def test_fold_check_uses_the_physical_jacobian_on_any_grid_orientation(direction, A, det):
    ref = sitk.Image([24, 20, 16], sitk.sitkFloat32)
    ref.SetSpacing((2.0, 2.5, 3.0))
    ref.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    ref.SetOrigin((10.0, -20.0, 30.0))
    jmin, share, _, _ = _jacobian(_linear_bspline(ref, A), ref)
    assert jmin == pytest.approx(det, abs=1e-6)
    assert share == (1.0 if det <= 0 else 0.0)


@pytest.mark.parametrize("suffix", [".tfm", ".txt", ".h5"])
def test_a_transform_composed_twice_saves_and_rereads_as_the_same_mapping(tmp_path, suffix):
    """ITK files hold one level of composite: a deformable result composed with an affine raised a raw
    SimpleITK error on save. Composites are now flat, in the same order."""
    from medfuse.registration.transforms import Transform, load_transform

    ref = sitk.Image([16, 16, 16], sitk.sitkFloat32)
    ref.SetSpacing((4.0, 4.0, 4.0))
    warp = Transform(_linear_bspline(ref, [[0.0, 0.05, 0.0], [0.0, 0.0, 0.0], [0.02, 0.0, -0.03]]))
    a = Transform.from_matrix(np.array([[1.1, 0, 0, 3.0], [0, 0.9, 0.1, -2.0], [0, 0, 1.0, 1.0], [0, 0, 0, 1]]))
    b = Transform.from_matrix(np.array([[0, -1.0, 0, 5.0], [1.0, 0, 0, 0.0], [0, 0, 1.0, -4.0], [0, 0, 0, 1]]))
    chained = a.compose(warp).compose(b)  # p -> a(warp(b(p)))
    pts = np.random.default_rng(0).uniform(5, 55, size=(50, 3))
    expected = a.transform_points(warp.transform_points(b.transform_points(pts)))
    np.testing.assert_allclose(chained.transform_points(pts), expected, atol=1e-9)
    # A nested SimpleITK composite handed in from elsewhere is written flat too.
    nested = sitk.CompositeTransform(3)
    nested.AddTransform(a.compose(warp).sitk)
    nested.AddTransform(b.sitk)
    for name, t in (("chained", chained), ("nested", Transform(nested))):
        path = t.save(tmp_path / f"{name}{suffix}")
        np.testing.assert_allclose(load_transform(path).transform_points(pts), expected, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(sitk.ReadTransform(str(path)).TransformPoint(tuple(pts[0])), expected[0],
                                   atol=1e-6, err_msg=name)


@pytest.fixture
def one_itk_thread():
    """ITK's multi-threaded metric sums vary run to run in the last digits, and these two affine fits are unstable
    enough to amplify that: the EPI onto the T1 (2 threads, seed 0) ended anywhere from 0.68 to 0.82 on its
    smallest axis and 9-18 mm off in 13 runs, and once (in CI) just inside the 20 % the check allows. One thread
    gives the same fit every run (0.728, 15.2 mm)."""
    from medfuse.pipeline import _itk_threads

    with _itk_threads(1):
        yield


def _scaling(s, centre):
    c = np.asarray(centre, dtype=float)
    m = np.diag([*s, 1.0])
    m[:3, 3] = c - np.asarray(s) * c
    return m


def test_an_affine_that_shrinks_the_phantom_pet_is_suspect_and_a_true_scaling_is_not(one_itk_thread):
    """Mutual information with the blurred phantom PET favours a fit shrunk by 14-17 % (13 mm off; rigid 0.5 mm),
    which was reported as fine. A known 4-6 % scaling of the same PET is recovered and not flagged."""
    from medfuse import register
    from medfuse.phantom import make_phantom
    from medfuse.volume import Volume

    ph = make_phantom(seed=0)
    r = register(ph.t1, ph.pet, kind="affine")
    truth = ph.transforms["pet"]
    pts = ph.t1.index_to_world(np.argwhere(ph.labels.array > 0)[::997])
    err = np.linalg.norm(r.transform.transform_points(pts) - (pts @ truth[:3, :3].T + truth[:3, 3]), axis=1).mean()
    flagged = [x for x in r.report.suspect_reasons if "scaled the PT image" in x]
    assert err > 5 and min(r.report.scale) < 0.9  # the case the check is for
    assert flagged and "kind='rigid'" in flagged[0], r.report.suspect_reasons

    aligned = make_phantom(seed=0, misalign={"pet": None})
    M = _scaling((1.06, 0.96, 1.04), ph.t1.center)
    scaled = Volume(aligned.pet.array, M @ aligned.pet.affine, modality="PT", unit=aligned.pet.unit)
    r2 = register(ph.t1, scaled, kind="affine")
    err2 = np.linalg.norm(r2.transform.transform_points(pts) - (pts @ M[:3, :3].T + M[:3, 3]), axis=1).mean()
    assert err2 < 3.0, err2
    assert not [x for x in r2.report.suspect_reasons if "scaled the" in x], r2.report.suspect_reasons


def test_an_affine_that_shrinks_an_mr_by_a_fifth_is_suspect_and_a_known_twelve_percent_scaling_is_not(
        shared, one_itk_thread):
    """The SPM12 EPI onto the T1 of the same space (truth: identity) ended scaled (0.88, 0.87, 0.70), 15-17 mm off
    (rigid: 2.4 mm), and nothing said so but an iteration limit. A known scaling of 8-12 % of the T2 is recovered
    and not flagged."""
    from medfuse import load, register
    from medfuse.volume import Volume

    d = shared("data", "spm12-templates")
    t1, epi, t2 = (load(d / f"{n}.nii", modality="MR") for n in ("T1", "EPI", "T2"))
    head = t1.index_to_world(np.argwhere(t1.array > 0.2 * t1.array.max())[::17])
    r = register(t1, epi, kind="affine")
    err = np.linalg.norm(r.transform.transform_points(head) - head, axis=1).mean()
    assert err > 8 and min(r.report.scale) < 0.8, (err, r.report.scale)  # the case the check is for
    flagged = [x for x in r.report.suspect_reasons if "scaled the moving image" in x]
    assert flagged and "kind='rigid'" in flagged[0], r.report.suspect_reasons

    M = _scaling((1.12, 0.9, 1.08), t1.center)
    r2 = register(t1, Volume(t2.array, M @ t2.affine, modality="MR"), kind="affine")
    err2 = np.linalg.norm(r2.transform.transform_points(head) - (head @ M[:3, :3].T + M[:3, 3]), axis=1).mean()
    assert err2 < 2.0, err2
    assert not [x for x in r2.report.suspect_reasons if "scaled the" in x], r2.report.suspect_reasons


def test_a_registered_volume_belongs_to_the_reference_study(samples_dir, tmp_path):
    """resample(pet, ct, transform=...) kept the PET's study beside the CT's frame of reference: saved as DICOM
    (deidentify=False, no template) it claimed the PET's study on the CT's grid."""
    import pydicom

    import medfuse
    from medfuse.registration.resample import resample
    from medfuse.registration.transforms import Transform

    ct = medfuse.load(samples_dir / "ct")
    pet = medfuse.load(samples_dir / "pet")
    pet.provenance["study_uid"] = "1.2.826.0.1.3680043.8.498.1"  # another study than the CT's
    moved = resample(pet, ct, transform=Transform.from_matrix(np.eye(4)))
    assert moved.provenance["study_uid"] == ct.provenance["study_uid"] != pet.provenance["study_uid"]
    # Saved without a template, it is a new study (it carries no patient module to be filed under); with the
    # CT as template, the CT's study.
    folder = medfuse.save(moved, tmp_path / "moved", deidentify=False)
    ds = pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)
    assert ds.StudyInstanceUID not in (ct.provenance["study_uid"], pet.provenance["study_uid"])
    folder = medfuse.save(moved, tmp_path / "moved_ct", deidentify=False, template=samples_dir / "ct")
    ds = pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)
    assert ds.StudyInstanceUID == ct.provenance["study_uid"]
