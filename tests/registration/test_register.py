"""register(): accuracy on real data with known misalignments, deformable recovery, honesty and bad input.

Misalignments are written into the moving volume's affine (a voxel at world p moves to M p), so the truth
(fixed point p -> moving point M p) is exact and nothing is interpolated.
"""

import numpy as np
import pytest

from medfuse.errors import CancelledError, InvalidInputError, RegistrationError
from medfuse.phantom import rigid_matrix
from medfuse.progress import CancelToken
from medfuse.registration import Transform, register, resample
from medfuse.volume import LPS_TO_RAS, Volume, affine_from_geometry

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "sample_volumes"


def _load(path, modality):
    try:
        from medfuse.io import load

        return load(path, modality=modality)
    except ImportError:  # the NIfTI reader is another engineer's; fall back to nibabel
        import nibabel as nib

        img = nib.load(str(path))
        return Volume(np.asarray(img.dataobj).astype(np.float32), LPS_TO_RAS @ img.affine, modality=modality)


def _misalign(v, rot, tr):
    M = rigid_matrix(rot, tr, center=v.center)
    return Volume(v.array, M @ v.affine, modality=v.modality, unit=v.unit), M


def _tre(transform, fixed, mask, truth, step=17):
    pts = fixed.index_to_world(np.argwhere(mask)[::step])
    want = truth(pts) if callable(truth) else pts @ truth[:3, :3].T + truth[:3, 3]
    return float(np.linalg.norm(transform.transform_points(pts) - want, axis=1).mean())


@pytest.fixture(scope="module")
def spm():
    from tests.conftest import shared_path

    d = shared_path("data", "spm12-templates")
    return {n: _load(d / f"{n}.nii", m) for n, m in (("T1", "MR"), ("PET", "PT"), ("SPECT", "NM"))}


def _mi_optimum(fixed, moving):
    """Where Mattes MI (plain SimpleITK, not medfuse) puts ``moving`` when started at the identity."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)  # 25 %: within ~0.05 mm of full sampling here, 2x cheaper
    reg.SetMetricSamplingPercentage(0.25, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 0.005, 300, relaxationFactor=0.7, gradientMagnitudeTolerance=1e-10)
    reg.SetOptimizerScalesFromPhysicalShift()
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in fixed.center))
    reg.SetInitialTransform(t, inPlace=True)
    reg.Execute(sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32), sitk.Cast(moving.to_sitk(), sitk.sitkFloat32))
    return Transform(t).matrix


@pytest.fixture(scope="module")
def spm_optima(spm):
    return {n: _mi_optimum(spm["T1"], spm[n]) for n in ("PET", "SPECT")}


def _midsagittal_x(v):
    """World x (LPS mm) of the plane of left-right symmetry: correlation-register the volume to its mirror image."""
    import SimpleITK as sitk

    img = sitk.Cast(v.to_sitk(), sitk.sitkFloat32)
    flip = sitk.AffineTransform(3)
    flip.SetMatrix((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    mirror = sitk.Resample(img, img, flip, sitk.sitkLinear, 0.0)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 0.005, 300, relaxationFactor=0.7, gradientMagnitudeTolerance=1e-10)
    reg.SetOptimizerScalesFromPhysicalShift()
    t = sitk.Euler3DTransform()
    t.SetCenter((0.0, float(v.center[1]), float(v.center[2])))
    reg.SetInitialTransform(t, inPlace=True)
    reg.Execute(img, mirror)
    return -t.GetParameters()[3] / 2  # symmetric about x = c  <=>  x-translation -2c to its mirror


@pytest.mark.slow
def test_spm_templates_mi_optimum_is_offset_from_identity(spm, spm_optima):
    """Why <= 1.0 mm against the identity is out of reach on these templates (docs/registration.md).

    MI from the identity moves PET ~2.8 mm and SPECT ~2.1 mm. The left-right part of that move is confirmed by an
    MI-free measurement: the PET template's plane of symmetry lies ~1.6 mm to the right (LPS -x) of T1's.
    """
    t1 = spm["T1"]
    head = t1.array > 0.2 * t1.array.max()
    off = {n: _tre(Transform.from_matrix(spm_optima[n]), t1, head, np.eye(4)) for n in ("PET", "SPECT")}
    assert off["PET"] > 2.0 and off["SPECT"] > 1.5, off
    dx_sym = _midsagittal_x(spm["PET"]) - _midsagittal_x(t1)
    dx_mi = spm_optima["PET"][0, 3]  # x-translation of the MI optimum (rotations are < 0.5 degree)
    assert dx_sym < -1.0, dx_sym
    assert abs(dx_sym - dx_mi) < 0.5, (dx_sym, dx_mi)


# The SPM12 PET and SPECT templates are offset from T1 by ~2.8 / ~2.1 mm (mean over the head) at their MI optimum
# (test above). So the issue's <= 1.0 mm target is asserted where it is meaningful, against that optimum (what the
# method adds), and the error against the identity is held to the data-limited bound.
@pytest.mark.parametrize("name,rot,tr,bound", [("PET", (15, -10, 12), (12, -20, 15), 3.3),
                                               ("SPECT", (-12, 18, -10), (-15, 10, 22), 2.6)])
def test_rigid_spm_templates(spm, spm_optima, name, rot, tr, bound):
    t1 = spm["T1"]
    moving, M = _misalign(spm[name], rot, tr)
    r = register(t1, moving, kind="rigid")
    head = t1.array > 0.2 * t1.array.max()
    vs_optimum = _tre(r.transform, t1, head, M @ spm_optima[name])
    vs_identity = _tre(r.transform, t1, head, M)
    assert vs_optimum <= 0.6, (vs_optimum, vs_identity, r.report.to_dict())
    assert vs_identity <= bound, (vs_optimum, vs_identity, r.report.to_dict())
    assert not r.report.suspect, r.report.suspect_reasons
    assert r.report.converged and r.report.metric_after < r.report.metric_before
    assert r.resampled.same_grid(t1) and r.resampled.modality == spm[name].modality


def test_thirty_degree_tilt_is_caught(spm, spm_optima):
    t1 = spm["T1"]
    moving, M = _misalign(spm["PET"], (30, 0, 0), (0, 10, 0))
    r = register(t1, moving, kind="rigid")
    assert _tre(r.transform, t1, t1.array > 0.2 * t1.array.max(), M @ spm_optima["PET"]) <= 0.6
    assert "multistart" in r.report.initialisation


def test_cancel_from_another_thread_stops_a_running_registration_within_2s(spm):
    """The napari plugin runs register() in a worker and sets the token from the UI thread."""
    import threading
    import time

    t1 = spm["T1"]
    moving, _ = _misalign(spm["PET"], (15, -10, 12), (12, -20, 15))
    for stage in ("initialising", "rigid: level 3/3, iteration 2"):
        token = CancelToken()
        reached = threading.Event()
        outcome = {}

        def progress(f, m, stage=stage, reached=reached):
            if m.startswith(stage):
                reached.set()

        def work(token=token, progress=progress, outcome=outcome):
            try:
                register(t1, moving, kind="affine", progress=progress, cancel=token)
                outcome["result"] = "finished"
            except CancelledError:
                outcome["result"] = "cancelled"
            outcome["t"] = time.perf_counter()

        th = threading.Thread(target=work)
        th.start()
        assert reached.wait(60), stage
        t_cancel = time.perf_counter()
        token.cancel()
        th.join(30)
        assert outcome.get("result") == "cancelled", (stage, outcome)
        assert outcome["t"] - t_cancel < 2.0, (stage, outcome["t"] - t_cancel)


@pytest.fixture(scope="module")
def brats():
    from tests.conftest import shared_path

    d = shared_path("data", "brats-gli-00001")
    return _load(d / "t1n.nii.gz", "MR"), _load(d / "t2f.nii.gz", "MR")


def test_rigid_brats_mr_mr(brats):
    t1n, t2f = brats
    moving, M = _misalign(t2f, (10, -8, 14), (10, 15, -12))
    r = register(t1n, moving, kind="rigid")
    err = _tre(r.transform, t1n, t1n.array > 0, M, step=97)
    assert err <= 0.5, (err, r.report.to_dict())
    json_safe = r.report.to_dict()
    assert set(json_safe) >= {"metric_before", "metric_after", "iterations_per_level", "stop_reason", "seconds",
                              "converged", "suspect", "suspect_reasons"}


@pytest.mark.slow
def test_deformable_brats_recovers_known_smooth_field(brats):
    import SimpleITK as sitk

    t1n, _ = brats
    # 2 mm copy of t1n, to keep the test to seconds on 2 cores.
    grid = Volume(np.zeros((120, 120, 78), np.uint8), affine_from_geometry((2, 2, 2), t1n.index_to_world([0.5, 0.5, 0.5]), t1n.direction))
    fixed0 = resample(t1n, grid)
    # Known smooth field G(p) = p + d(p), up to ~5 mm; warped(p) = t1n(G(p)), so the truth for
    # register(warped, t1n) is G itself.
    c = fixed0.center

    def disp(p):
        q = (p - c) / 40.0
        return np.stack([5 * np.sin(q[..., 1] * 1.5), 4 * np.cos(q[..., 2] * 1.5) * np.sin(q[..., 0]),
                         4.5 * np.sin(q[..., 0] * 1.2)], axis=-1)

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    field = disp(grid.index_to_world(ijk)).astype(np.float64)
    fimg = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(field, (2, 1, 0, 3))), isVector=True)
    ref = grid.to_sitk()
    fimg.CopyInformation(ref)
    G = Transform(sitk.DisplacementFieldTransform(fimg))
    warped = resample(t1n, grid, transform=G)

    def truth(pts):
        return pts + disp(pts)

    brain = warped.array > 0
    dfm = register(warped, fixed0, kind="deformable", bspline_grid_mm=40.0, bspline_samples=12000)
    e_aff = _tre(dfm.linear_transform, warped, brain, truth, step=7)  # the affine stage alone
    e_def = _tre(dfm.transform, warped, brain, truth, step=7)
    assert e_aff > 1.0  # the field is not affine: the test is meaningful
    assert e_def <= 0.3 * e_aff, (e_aff, e_def, dfm.report.to_dict())
    assert dfm.report.jacobian_min > 0 and dfm.report.jacobian_fraction_nonpositive == 0


@pytest.mark.slow
def test_sample_volumes_recovered():
    """The bundled PET (3 mm voxels) and SPECT (4.5 mm) within 1 mm of the stored truth, whatever the random
    sample set (measured: PET 0.11-0.46 mm, SPECT 0.36-0.83 mm over seeds 0-4)."""
    ph = pytest.importorskip("medfuse.phantom")
    vols = ph.load_samples()
    gt = ph.load_ground_truth()
    t1 = vols["t1"]
    head = t1.array > np.percentile(t1.array, 60)
    for name, seeds, bound in (("pet", (0, 1), 1.0), ("spect", (0, 1, 2), 1.0)):
        for seed in seeds:
            r = register(t1, vols[name], kind="rigid", seed=seed)
            err = _tre(r.transform, t1, head, gt[f"mr_to_{name}"], step=53)
            assert err <= bound, (name, seed, err, r.report.to_dict())
            assert not r.report.suspect, r.report.suspect_reasons


# ----------------------------------------------------------------------------- honesty and bad input
def _blob(shape=(40, 40, 40), spacing=2.0, origin=(0.0, 0.0, 0.0), modality="MR"):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    c = np.asarray(shape) / 2
    r = np.linalg.norm((ijk - c) / [12, 9, 7], axis=-1)
    arr = (np.exp(-r ** 2) * 100 + (r < 0.6) * 50).astype(np.float32)
    aff = np.diag([spacing] * 3 + [1.0])
    aff[:3, 3] = origin
    return Volume(arr, aff, modality=modality)


def test_non_overlapping_volumes_error_and_geometry_opt_in():
    a = _blob()
    b = _blob(origin=(1000.0, 0.0, 0.0))
    with pytest.raises(RegistrationError, match="do not overlap") as ei:
        register(a, b)
    assert "initialise='geometry'" in str(ei.value)
    r = register(a, b, initialise="geometry")
    np.testing.assert_allclose(r.transform.matrix[:3, 3], [1000, 0, 0], atol=1.0)


def test_constant_empty_2d_and_nan_inputs():
    a = _blob()
    with pytest.raises(RegistrationError, match="constant"):
        register(a, a.with_array(np.zeros(a.shape, np.float32)))
    with pytest.raises(RegistrationError, match="constant"):
        register(a.with_array(np.full(a.shape, 7.0)), a)
    flat = Volume(np.random.default_rng(0).random((64, 64, 1)), np.eye(4))
    with pytest.raises(InvalidInputError, match="2-D"):
        register(a, flat)
    with pytest.raises(InvalidInputError, match="2-D"):
        register(np.zeros((64, 64)), a)
    nan = a.array.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        register(a, a.with_array(nan))
    with pytest.raises(InvalidInputError):
        register(a, a, kind="elastic")


def test_voxel_types_and_too_few_slices():
    a = _blob()
    # Complex voxels (MR phase or k-space data) failed deep inside a SimpleITK cast with a raw RuntimeError.
    with pytest.raises(InvalidInputError, match="complex64") as ei:
        register(a, a.with_array(a.array.astype(np.complex64)))
    assert "numpy.abs" in ei.value.fix
    # Three slices: not "a single slice"; the fix names what the user can do.
    with pytest.raises(InvalidInputError, match="only 3 voxels along axis 2") as ei:
        register(a, Volume(a.array[:, :, 18:21].copy(), a.affine, modality="MR"))
    assert "whole_series" in ei.value.fix and "medfuse.resample" in ei.value.fix
    # Integer and float16 voxels register as they are (the blob's 0-150 fits every type here).
    for dtype in (np.uint8, np.int16, np.uint16, np.int32, np.float16):
        rep = register(a, a.with_array(a.array.astype(dtype))).report
        assert rep.rotation_deg < 0.5 and rep.translation_mm < 0.5 and not rep.suspect, (dtype, rep.to_dict())


def test_masks():
    a = _blob()
    with pytest.raises(RegistrationError, match="covers no voxel"):
        register(a, a, fixed_mask=np.zeros(a.shape, bool))
    with pytest.raises(InvalidInputError):
        register(a, a, moving_mask=np.ones((3, 3, 3), bool))
    moving, M = _misalign(a, (5, 0, 0), (4, -3, 2))
    r = register(a, moving, fixed_mask=a.array > 20, moving_mask=moving.with_array(moving.array > 20))
    assert _tre(r.transform, a, a.array > 20, M) < 1.0


def test_progress_and_cancel():
    a = _blob()
    moving, _ = _misalign(a, (5, 0, 0), (4, -3, 2))
    seen = []
    register(a, moving, progress=lambda f, m: seen.append((f, m)))
    assert seen[-1][0] == 1.0 and any("rigid: level 2/2" in m for _, m in seen) and any("iteration" in m for _, m in seen)
    assert all(b >= a_ - 1e-9 for (a_, _), (b, _) in zip(seen, seen[1:]))
    token = CancelToken()
    calls = []

    def cancel_after_some(f, m):
        calls.append(m)
        if "iteration 3" in m:
            token.cancel()

    with pytest.raises(CancelledError):
        register(a, moving, progress=cancel_after_some, cancel=token)
    assert sum("iteration" in m for m in calls) <= 5  # stopped promptly


def test_a_start_that_ends_worse_is_re_optimised_from_the_placement_or_the_placement_kept():
    a = _blob()
    r = register(a, a.copy())
    assert not r.report.suspect, r.report.suspect_reasons  # aligned input stays aligned
    # Already aligned in world coordinates, but the moving field of view extends 40 mm further on one side, so a
    # forced geometry-centre start is 20 mm off; with almost no iterations its result ends worse than the start.
    padded = np.zeros((60, 40, 40), np.float32)
    padded[:40] = a.array
    moving = Volume(padded, a.affine.copy(), modality="MR")
    few = dict(iterations=(1, 1, 1), multistart_iterations=1, min_step_mm=0.001)
    rep = register(a, moving, initialise="geometry", learning_rate_mm=0.05, **few).report
    # It is optimised from the scanners' placement as well, and that better result is kept and named.
    assert rep.initialisation.startswith("world (re-optimised from the scanners' placement"), rep.initialisation
    assert rep.translation_mm < 0.5 and rep.rotation_deg < 0.5, rep.to_dict()
    assert not any("got worse" in s for s in rep.suspect_reasons), rep.suspect_reasons
    # The same from an initial transform (the truth) when the scanners placed the images 27 mm apart.
    M = rigid_matrix((0, 0, 0), (25, -10, 0), center=a.center)
    r = register(a, Volume(padded, M @ a.affine, modality="MR"), initialise="geometry", initial_transform=M,
                 learning_rate_mm=0.05, **few)
    # The winner is named first: the CLI and the napari panel read "initial..." as "the initial transform won".
    assert r.report.initialisation.startswith("initial (re-optimised from the initial transform"), \
        r.report.initialisation
    np.testing.assert_allclose(r.transform.matrix, M, atol=0.5)
    # An optimiser that leaps 15 mm a step ends worse from every start: the placement itself is kept, and said.
    bad = register(a, moving, initialise="geometry", learning_rate_mm=15.0, **few)
    assert bad.report.initialisation.startswith("world (kept the scanners' placement as it is"), \
        bad.report.initialisation
    assert "was: world (re-optimised from the scanners' placement" in bad.report.initialisation
    np.testing.assert_allclose(bad.transform.matrix, np.eye(4), atol=1e-9)
    assert bad.report.metric_after == bad.report.metric_before
    assert not any("got worse" in s for s in bad.report.suspect_reasons), bad.report.suspect_reasons
    # initialise="none" insists on its start: a result worse than it is flagged, never replaced.
    none = register(a, moving, initialise="none", learning_rate_mm=15.0, **few).report
    assert none.metric_after > none.metric_before and none.suspect and not none.converged
    assert any("got worse" in s for s in none.suspect_reasons), none.suspect_reasons
    assert any("iteration limit" in s for s in none.suspect_reasons), none.suspect_reasons
    # The same pair with the default initialisation recovers the identity and is not suspect.
    good = register(a, moving)
    assert not good.report.suspect, good.report.suspect_reasons
    np.testing.assert_allclose(good.transform.matrix, np.eye(4), atol=0.6)


def test_identical_images_are_not_flagged_suspect(shared):
    # Registering a volume to itself ends 0.003-0.03 mm from the identity, but on the report's sample set it scored
    # up to 8e-5 x |metric| worse than the start (the optimiser's samples are not the evaluation's), and a 1e-6
    # tolerance flagged 12 of 17 such perfect results "the similarity got worse".
    d = shared("data", "spm12-templates")
    for name, seed in (("T1", 0), ("T2", 1), ("EPI", 2)):
        v = _load(d / f"{name}.nii", "MR")
        r = register(v, v.copy(), seed=seed)
        assert r.report.translation_mm < 0.1 and r.report.rotation_deg < 0.1, r.report.to_dict()
        assert not r.report.suspect, (name, seed, r.report.suspect_reasons)


def test_seed_must_be_a_valid_sampling_seed():
    # seed=-1 became SimpleITK's "wall clock" seed (every run different), 2**33 a raw SWIG OverflowError.
    a = _blob()
    for bad in (-1, 2 ** 33, 1.5, True):
        with pytest.raises(InvalidInputError, match="seed"):
            register(a, a, seed=bad)


def test_cli_register_refuses_bad_output_names_before_work_and_survives_unmeasurable_start(tmp_path, capsys):
    from medfuse.cli import main
    from medfuse.io import save

    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    save(_blob(), a)
    # The moving box touches the fixed one only at a corner: as the scanners placed them too few samples overlap
    # to measure the metric (metric_before is None). The CLI used to crash with a TypeError (exit 3) after
    # writing its outputs.
    save(_blob(origin=(79.5, 79.5, 79.5)), b)
    inputs = [str(a), str(b)]
    before = sorted(p.name for p in tmp_path.iterdir())
    # A transform name SimpleITK cannot write used to be found only after the registration, with the image
    # already written; a .png output became a DICOM folder called out.png; a deformable .mat is unreadable.
    for extra in (["-o", str(tmp_path / "x.nii.gz"), "--transform", str(tmp_path / "x.json")],
                  ["-o", str(tmp_path / "x.png")],
                  ["-o", str(tmp_path / "x.nii.gz"), "--transform", str(tmp_path / "x.mat"), "--kind", "deformable"]):
        assert main(["register", *inputs, *extra, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Fix:" in err and "Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    out = tmp_path / "out.nii.gz"
    assert main(["register", *inputs, "-o", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert "metric n/a ->" in capsys.readouterr().out
    assert out.exists() and (tmp_path / "out.tfm").exists() and (tmp_path / "out.json").exists()


def test_small_moving_field_of_view_placed_right_is_not_suspect(shared):
    # A 30 mm slab of BraTS t2f (misaligned 4 deg, 3.6 mm) onto the whole t1n: recovered to ~0.4 mm, but only
    # 19 % of the fixed image maps inside the slab, and that alone used to mark the result suspect. All of the
    # slab lies inside the fixed image; a result is suspect only when neither image lies mostly inside the other.
    d = shared("data", "brats-gli-00001")
    t1, t2 = _load(d / "t1n.nii.gz", "MR"), _load(d / "t2f.nii.gz", "MR")
    z0, nz = 62, 30
    shift = np.eye(4)
    shift[2, 3] = z0
    slab = Volume(np.ascontiguousarray(t2.array[:, :, z0:z0 + nz]), t2.affine @ shift, modality="MR")
    moving, M = _misalign(slab, (0, 0, 4), (3, -2, 0))
    r = register(t1, moving)
    inside = np.zeros(t1.shape, bool)
    inside[:, :, z0:z0 + nz] = t1.array[:, :, z0:z0 + nz] > 0
    assert _tre(r.transform, t1, inside, M, step=37) < 0.8
    rep = r.report
    assert not rep.suspect, rep.suspect_reasons
    assert rep.overlap_fraction < 0.25 and rep.overlap_fraction_moving > 0.95, rep.to_dict()


def test_preset_overrides_are_checked_and_follow_the_pyramid():
    from medfuse.registration import get_preset

    a = _blob()
    moving, M = _misalign(a, (5, 0, 0), (4, -3, 2))
    # Used to fail deep in SimpleITK ("shrink factors and smoothing sigmas don't match", with a fix about the
    # inputs' geometry) or to run silently with nonsense (1 histogram bin, a negative B-spline grid, a negative step).
    for bad in (dict(samples=0), dict(histogram_bins=1), dict(iterations=(0, 0)), dict(learning_rate_mm=-1.0),
                dict(relaxation=1.5), dict(levels_mm=(2.0, 4.0)), dict(kind="deformable", bspline_grid_mm=-5.0),
                dict(smoothing_vox=(1.0,))):
        with pytest.raises(InvalidInputError, match="registration setting") as ei:
            register(a, moving, **bad)
        assert "Fix:" in str(ei.value)
    # A longer pyramid than the preset's (smoothing and iterations follow it) and a three-level B-spline stage run.
    r = register(a, moving, levels_mm=(8.0, 4.0, 2.0, 1.0))
    assert _tre(r.transform, a, a.array > 20, M) < 1.0 and not r.report.suspect, r.report.to_dict()
    r = register(a, moving, kind="deformable", bspline_levels_mm=(6.0, 4.0, 2.0), bspline_iterations=(3, 3, 3))
    assert r.report.iterations_per_level[-3:] == [3, 3, 3]
    # A modality pair names the same preset in either order.
    assert get_preset("CT-MR")["name"] == "MR-CT" and get_preset("PET-CT")["name"] == "CT-PT"


def test_preset_for_reads_a_pair_in_either_order_and_anything_else_as_unknown():
    from medfuse.registration.presets import PRESETS, preset_for

    assert preset_for("CT", "MR") == preset_for("MR", "CT") == "MR-CT"
    assert preset_for("PT", "PT") == "MR-PT" and preset_for("NM", "PT") == "MR-NM" and preset_for("CT", "CT") == "MR-MR"
    # Not a modality code: the default preset, never a bare NumPy "truth value is ambiguous" ValueError.
    for odd in (None, 3, np.array(["MR", "CT"]), ["MR"], "unknown"):
        assert preset_for(odd, "CT") == "default" and preset_for("MR", odd) == "default"
    assert all(preset_for(*name.split("-")) == name for name in PRESETS if name != "default")


def test_reported_translation_is_the_shift_of_the_image_not_of_the_world_origin(shared):
    # The SPM12 T1 placed 370 mm from the world origin (as scanner coordinates often are), rotated 6 degrees about
    # its own centre and not shifted: the report said "translation 36.30 mm" (the matrix's translation column,
    # i.e. the movement of the world origin), which the CLI and the napari panel print as the image's shift.
    t1 = _load(shared("data", "spm12-templates") / "T1.nii", "MR")
    far = np.eye(4)
    far[:3, 3] = (200.0, -300.0, 150.0)
    fixed = Volume(t1.array, far @ t1.affine, modality="MR")
    moving, M = _misalign(fixed, (0, 0, 6), (0, 0, 0))
    r = register(fixed, moving)
    assert _tre(r.transform, fixed, fixed.array > 0.2 * fixed.array.max(), M) < 0.5
    assert abs(r.report.rotation_deg - 6.0) < 0.3
    assert r.report.translation_mm < 0.5, r.report.to_dict()
    # With a real shift, the shift is what is reported.
    moving, M = _misalign(fixed, (0, 0, 6), (4.0, -3.0, 0.0))
    assert abs(register(fixed, moving).report.translation_mm - 5.0) < 0.5


# ----------------------------------------------------------------------------- initial_transform
def _near(M, center):
    """A start ~14 mm (mean over the head) from the truth ``M``: 8/-6/5 degrees and (5, -4, 3) mm off."""
    return M @ rigid_matrix((8, -6, 5), (5, -4, 3), center=center)


def test_initial_transform_recovers_a_rotation_registration_alone_misses(spm, tmp_path):
    from medfuse.registration import load_transform

    t1, pet = spm["T1"], spm["PET"]
    head = t1.array > 0.2 * t1.array.max()
    moving, M = _misalign(pet, (150, 0, 0), (5, -8, 4))  # upside down: beyond the +-30 degree multi-start
    alone = register(t1, moving, initialise="local")  # no orientation search (initialise="auto" has one)
    assert _tre(alone.transform, t1, head, M) > 20, alone.report.to_dict()  # the test is meaningful
    start = Transform.from_matrix(_near(M, t1.center))
    assert _tre(start, t1, head, M) > 10
    r = register(t1, moving, initial_transform=start)
    rep = r.report
    # Same data-limited bound as test_rigid_spm_templates (the templates' MI optimum is ~2.8 mm off the identity).
    assert _tre(r.transform, t1, head, M) <= 3.3, rep.to_dict()
    assert rep.initialisation.startswith("initial") and not rep.suspect, rep.to_dict()
    assert rep.metric_after < rep.metric_initial < rep.metric_before  # metric_before: as the scanners placed them
    # The returned transform is the whole mapping: resampling with it alone puts the PET back on the T1.
    back = resample(moving, t1, transform=r.transform).array
    assert np.corrcoef(back[head], pet.array[head])[0, 1] > 0.95
    assert np.corrcoef(alone.resampled.array[head], pet.array[head])[0, 1] < 0.5
    # One matrix, read back unchanged from the files other tools read.
    assert r.transform.is_linear
    np.testing.assert_allclose(r.linear_transform.matrix, r.transform.matrix, atol=1e-9)
    for name in ("t.tfm", "t.mat", "t.h5"):
        np.testing.assert_allclose(load_transform(r.transform.save(tmp_path / name)).matrix, r.transform.matrix,
                                   atol=1e-6)


def test_a_wrong_initial_transform_does_no_worse_than_none(spm):
    t1 = spm["T1"]
    head = t1.array > 0.2 * t1.array.max()
    moving, M = _misalign(spm["PET"], (15, -10, 12), (12, -20, 15))
    wrong = M @ rigid_matrix((0, 160, 0), (30, 0, -20), center=t1.center)  # e.g. a transform of another pair
    r = register(t1, moving, initial_transform=wrong)
    assert _tre(r.transform, t1, head, M) <= 3.3, r.report.to_dict()
    # A start of a run without it won (the scanners' placement, its centre or moments).
    assert not r.report.initialisation.startswith("initial"), r.report.initialisation
    # initialise="none" starts exactly there and nowhere else (the documented way to insist on the start).
    assert register(t1, moving, initial_transform=_near(M, t1.center), initialise="none",
                    iterations=(1, 1, 1)).report.initialisation == "initial"


@pytest.mark.parametrize("kind", ["affine", "deformable"])
def test_initial_transform_with_affine_and_deformable_kinds(spm, kind):
    t1 = spm["T1"]
    head = t1.array > 0.2 * t1.array.max()
    moving, M = _misalign(spm["PET"], (0, 0, 120), (-6, 4, 10))
    # An affine start (2 % scaling on top of the near-truth start), as an ITK matrix from another tool would be.
    start = _near(M, t1.center) @ np.diag([1.02, 0.98, 1.0, 1.0])
    # A short B-spline stage: what is tested is that the initial transform is in the composite.
    r = register(t1, moving, kind=kind, initial_transform=start, bspline_levels_mm=(4.0,), bspline_iterations=(5,),
                 bspline_samples=5000)
    assert _tre(r.linear_transform, t1, head, M) <= 3.3, r.report.to_dict()
    # The B-spline also fits the templates' own differences (3.9 mm measured, as from a 10 degree misalignment
    # without an initial transform); without the initial transform in the composite it would be ~100 mm.
    assert _tre(r.transform, t1, head, M) <= 5.0, r.report.to_dict()
    assert r.report.initialisation.startswith("initial") and r.report.scale is not None
    # A deformable result is linear only when its warp was dropped (then it is the affine part itself).
    assert r.transform.is_linear == (kind == "affine" or r.report.bspline_kept is False)


def test_initial_transform_makes_disjoint_fields_of_view_registrable_and_checks_its_direction():
    a = _blob()
    b = _blob(origin=(1000.0, 0.0, 0.0))  # unrelated scanner coordinates: 1000 mm apart
    shift = np.eye(4)
    shift[0, 3] = 1000.0  # fixed point -> moving point
    r = register(a, b, initial_transform=shift)
    np.testing.assert_allclose(r.transform.matrix, shift, atol=0.6)
    assert r.report.initialisation.startswith("initial")
    # The moving -> fixed direction (a common mix-up) is named in the error.
    with pytest.raises(RegistrationError, match="do not overlap") as ei:
        register(a, b, initial_transform=np.linalg.inv(shift))
    assert "inverse()" in str(ei.value)


def test_initial_transform_bad_input_is_a_typed_error_naming_the_file(tmp_path):
    import SimpleITK as sitk

    from medfuse.errors import UnreadableFileError

    a = _blob()
    missing = tmp_path / "nowhere.tfm"
    with pytest.raises(UnreadableFileError, match="nowhere.tfm"):
        register(a, a, initial_transform=missing)
    junk = tmp_path / "junk.tfm"
    junk.write_text("not a transform\n")
    with pytest.raises(UnreadableFileError, match="junk.tfm") as ei:
        register(a, a, initial_transform=str(junk))
    assert "Fix:" in str(ei.value)
    bs = sitk.BSplineTransformInitializer(a.to_sitk(), [3, 3, 3])
    warp = Transform(bs).save(tmp_path / "warp.h5")
    with pytest.raises(InvalidInputError, match="warp.h5.*deformable") as ei:
        register(a, a, initial_transform=warp)
    assert "linear_transform" in str(ei.value)
    with pytest.raises(InvalidInputError, match="deformable"):
        register(a, a, initial_transform=Transform(bs))
    for bad in ({"matrix": np.eye(4)}, np.eye(3), [[1, 2], [3, 4]], 7):
        with pytest.raises(InvalidInputError, match="initial_transform"):
            register(a, a, initial_transform=bad)
    with pytest.raises(InvalidInputError, match="singular"):
        register(a, a, initial_transform=np.diag([1.0, 1.0, 0.0, 1.0]))
    # A mirroring start was kept, and a rigid run returned a left-right swapped result (determinant -1).
    mirror = Transform(sitk.ScaleTransform(3, [-1.0, 1.0, 1.0])).save(tmp_path / "mirror.tfm")
    for start in (mirror, np.diag([-1.0, 1.0, 1.0, 1.0])):
        for kind in ("rigid", "affine"):
            with pytest.raises(InvalidInputError, match="mirrors space") as ei:
                register(a, a, kind=kind, initial_transform=start)
            assert "correct its header" in ei.value.fix
    with pytest.raises(InvalidInputError, match="mirror.tfm.*mirrors space"):  # the file named
        register(a, a, initial_transform=mirror)


def test_cli_register_initial_transform_files(spm, tmp_path, capsys):
    import json

    from medfuse.cli import main
    from medfuse.io import save
    from medfuse.registration import load_transform

    t1 = spm["T1"]
    head = t1.array > 0.2 * t1.array.max()
    moving, M = _misalign(spm["PET"], (150, 0, 0), (5, -8, 4))
    f, m = tmp_path / "t1.nii.gz", tmp_path / "pet.nii.gz"
    save(t1, f)
    save(moving, m)
    start = Transform.from_matrix(_near(M, t1.center))
    # medfuse's own .tfm, and the MATLAB .mat ANTs writes.
    for name in ("start.tfm", "start.mat"):
        init = start.save(tmp_path / name)
        out = tmp_path / f"out_{init.suffix[1:]}.nii.gz"
        assert main(["register", str(f), str(m), "-o", str(out), "--initial-transform", str(init),
                     "--no-progress"]) == 0, capsys.readouterr().err
        said = capsys.readouterr().out
        assert "at the initial transform, started from it" in said, said
        written = load_transform(out.with_suffix("").with_suffix(".tfm"))
        assert _tre(written, t1, head, M) <= 3.3
        side = json.loads(out.with_suffix("").with_suffix(".json").read_text())
        assert side["initial_transform"]["path"] == str(init) and side["initial_transform"]["sha256"]
        assert side["registration"][0]["initialisation"].startswith("initial")
    # Bad files are refused before any work, naming the file; nothing is written.
    bs = Transform(__import__("SimpleITK").BSplineTransformInitializer(_blob().to_sitk(), [3, 3, 3]))
    warp = bs.save(tmp_path / "warp.h5")
    before = sorted(p.name for p in tmp_path.iterdir())
    for bad, why in ((tmp_path / "nowhere.tfm", "nowhere.tfm"), (warp, "warp.h5: the initial transform is deformable")):
        assert main(["register", str(f), str(m), "-o", str(tmp_path / "x.nii.gz"), "--initial-transform", str(bad),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert why in err and "Fix:" in err and "Traceback" not in err, err
    # The initial transform is an input: the output transform may not be written over it.
    init = tmp_path / "start.tfm"
    assert main(["register", str(f), str(m), "-o", str(tmp_path / "y.nii.gz"), "--transform", str(init),
                 "--initial-transform", str(init), "--overwrite", "--no-progress"]) == 2
    assert "onto the --initial-transform file, an input" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ----------------------------------------------------------------------------- gross misorientation
# A wrong header, prone vs supine, head-first vs feet-first: the moving image arrives turned by ~90-180 degrees,
# beyond the +-30 degree multi-start. initialise="auto" also scores the 23 other axis-aligned orientations; the
# SPM12 templates share one space, so the misalignment written into the affine is the whole truth.
@pytest.mark.parametrize("rot,tr", [((150, 0, 0), (5, -8, 4)),    # upside down
                                    ((0, 180, 0), (3, -5, 2))])   # head-first vs feet-first
def test_auto_initialisation_recovers_gross_misorientation(spm, rot, tr):
    t1 = spm["T1"]
    head = t1.array > 0.2 * t1.array.max()
    moving, M = _misalign(spm["PET"], rot, tr)
    r = register(t1, moving)
    # Same data-limited bound as test_rigid_spm_templates (the templates' MI optimum is ~2.8 mm off the identity);
    # the +-30 degree multi-start alone ends 114-126 mm off here.
    assert _tre(r.transform, t1, head, M) <= 3.3, r.report.to_dict()
    assert r.report.initialisation.startswith("turned 180"), r.report.initialisation
    # Right, but a flipped axis wins turned the same way: the one reason asks to check the header.
    assert len(r.report.suspect_reasons) == 1, r.report.suspect_reasons
    assert "orientation headers disagreed by a turn of 180 degrees" in r.report.suspect_reasons[0]
    assert abs(r.report.rotation_deg - abs(max(rot, key=abs))) < 2.0, r.report.rotation_deg
    assert np.linalg.det(r.transform.matrix[:3, :3]) > 0  # turned, never mirrored


@pytest.mark.parametrize("kind,bound", [("affine", 3.3), ("rigid", 10.0)])
def test_a_turned_start_that_wins_only_the_coarse_rigid_score_loses_to_the_unturned_one_after_the_final_stages(
        spm, kind, bound):
    """A stretched SPECT (x 1.10, 0.92, 1.05 about the head's centre) won the orientation search turned 82 degrees
    on the rigid 8 mm score. The affine stage from there ended 79 mm off (metric -0.754); rigid, 77 mm off (-0.6745,
    only 1.3 % better than the unturned -0.6659). The unturned start now runs the final stages too, and a turned
    result must still be clearly better: affine -0.878, within the templates' data-limited bound; rigid 6.7 mm (a
    10 % stretch that a rigid transform cannot follow)."""
    t1 = spm["T1"]
    head = t1.array > 0.2 * t1.array.max()
    c = np.asarray(t1.center)
    S = np.eye(4)
    S[:3, :3] = np.diag([1.10, 0.92, 1.05])
    S[:3, 3] = c - S[:3, :3] @ c
    moving = Volume(spm["SPECT"].array, S @ spm["SPECT"].affine, modality="NM", unit=spm["SPECT"].unit)
    r = register(t1, moving, kind=kind)
    assert _tre(r.transform, t1, head, S) <= bound, r.report.to_dict()
    assert r.report.rotation_deg < 3.0, r.report.initialisation
    label = r.report.initialisation
    assert "unturned" in label and label.count("(") == label.count(")"), label
    assert label.endswith(": worse)" if kind == "affine" else ": not clearly better)"), label


def test_a_run_without_orientation_search_that_ends_misoriented_is_flagged_suspect(spm):
    t1 = spm["T1"]
    head = t1.array > 0.2 * t1.array.max()
    moving, M = _misalign(spm["PET"], (0, 0, 120), (-6, 4, 10))
    bad = register(t1, moving, initialise="local")  # the +-30 degree multi-start only: ends ~119 mm off
    assert _tre(bad.transform, t1, head, M) > 20, bad.report.to_dict()
    assert bad.report.suspect and any("matches clearly better turned" in s and "initialise='auto'" in s
                                      for s in bad.report.suspect_reasons), bad.report.suspect_reasons
    # A correct result of the same run kind is not flagged (the check compares with a turned candidate only when
    # that lies > 20 mm away and beats the result by > 2 % of |metric|).
    moving, M = _misalign(spm["PET"], (15, -10, 12), (12, -20, 15))
    good = register(t1, moving, initialise="local")
    assert _tre(good.transform, t1, head, M) <= 3.3
    assert not good.report.suspect, good.report.suspect_reasons


def test_report_says_whether_the_images_share_a_frame_of_reference():
    """A PET/CT of one session shares a DICOM frame of reference (the scanner placed both); the report says so,
    and the registered image is then in the fixed image's frame. NIfTI-like volumes have no frame: None."""
    a = _blob()
    b = Volume(np.roll(a.array, 2, axis=0), a.affine.copy(), modality="PT")
    with_frame = lambda v, uid: Volume(v.array, v.affine, modality=v.modality,  # noqa: E731
                                       provenance={"frame_of_reference_uid": uid})
    assert register(a, b, initialise="local").report.same_frame_of_reference is None
    one = register(with_frame(a, "1.2.3"), with_frame(b, "1.2.3"), initialise="local")
    assert one.report.same_frame_of_reference is True and one.report.to_dict()["same_frame_of_reference"] is True
    two = register(with_frame(a, "1.2.3"), with_frame(b, "1.2.4"), initialise="local")
    assert two.report.same_frame_of_reference is False
    assert two.resampled.provenance["frame_of_reference_uid"] == "1.2.3"


@pytest.mark.slow
def test_a_thin_slab_placed_right_is_neither_turned_nor_flagged(spm):
    """4 slices (8 mm) of the T1 on the T1, placed right (the identity is the truth). Their 8 mm copy is one slice
    of data padded with zeros: "auto" took a 180 degree turn from it (left to the fallback to undo) and "local"'s
    orientation check flagged the correct result "matches clearly better turned 180 degrees". Both now confirm a
    turn on the working images."""
    t1 = spm["T1"]
    shift = np.eye(4)
    shift[2, 3] = 40  # voxel k of the slab is voxel k + 40 of the T1
    slab = Volume(t1.array[:, :, 40:44].copy(), t1.affine @ shift, modality="MR")
    for initialise in ("auto", "local"):
        rep = register(t1, slab, initialise=initialise).report
        assert rep.rotation_deg < 0.5 and rep.translation_mm < 0.5, rep.to_dict()
        assert not rep.suspect, (initialise, rep.suspect_reasons)
        assert "turned" not in rep.initialisation and "re-optimised" not in rep.initialisation, rep.initialisation


def test_an_aligned_pair_whose_search_ends_worse_keeps_the_scanners_placement():
    """The bundled CT and MR share a frame and are aligned. The search from their placement ended 0.1 degrees off
    and 0.3 % worse (rigid; affine: 5 % worse), flagged suspect; 'fuse --register rigid' on them said SUSPECT.
    That placement itself is the better answer by the registration's own measure, so it is kept."""
    import medfuse

    ct, mr = medfuse.load(SAMPLES / "ct"), medfuse.load(SAMPLES / "mr_t1.nii.gz")
    for kind in ("rigid", "affine"):
        r = register(ct, mr, kind=kind)
        assert not r.report.suspect, (kind, r.report.suspect_reasons)
        np.testing.assert_allclose(r.transform.matrix, np.eye(4), atol=1e-9)
        assert r.report.initialisation.startswith("world (kept the scanners' placement"), r.report.initialisation


def test_boolean_masks_registered_as_images_warn_that_no_check_catches_a_wrong_result():
    """A mask passed as the image (an ellipsoid ended 38 degrees off, not flagged): warned, with the mask options."""
    from medfuse.errors import MedfuseWarning

    a = _blob()
    mask = Volume(a.array > 0.5 * a.array.max(), a.affine.copy(), modality="MR")
    with pytest.warns(MedfuseWarning, match="moving_mask="):
        register(mask, mask.with_array(mask.array.copy()), kind="rigid")
