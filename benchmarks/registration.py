"""Registration benchmark: medfuse vs the SimpleITK tutorial recipe vs itk-elastix's default rigid map.

Same pairs, one process. Pairs: SPM12 PET->T1 and SPECT->T1 (2 mm) and BraTS t2f->t1n (1 mm, 240x240x155),
each with a known rigid misalignment put into the moving image's affine (no interpolation), so the truth is exact.
Error: mean target registration error (mm) over brain voxels of the fixed image.

    .venv/bin/python benchmarks/registration.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _load(path, modality):
    import nibabel as nib

    from medfuse.volume import LPS_TO_RAS, Volume

    img = nib.load(str(path))
    return Volume(np.asarray(img.dataobj).astype(np.float32), LPS_TO_RAS @ img.affine, modality=modality)


def pairs():
    from medfuse.phantom import rigid_matrix
    from medfuse.volume import Volume

    spm = SHARED / "spm12-templates"
    brats = SHARED / "brats-gli-00001"
    t1 = _load(spm / "T1.nii", "MR")
    out = []
    for name, mod, rot, tr in (("PET", "PT", (15, -10, 12), (12, -20, 15)), ("SPECT", "NM", (-12, 18, -10), (-15, 10, 22))):
        m = _load(spm / f"{name}.nii", mod)
        M = rigid_matrix(rot, tr, center=m.center)
        out.append((f"{name}->T1", t1, Volume(m.array, M @ m.affine, modality=mod), M, t1.array > 0.2 * t1.array.max()))
    f = _load(brats / "t1n.nii.gz", "MR")
    m = _load(brats / "t2f.nii.gz", "MR")
    M = rigid_matrix((10, -8, 14), (10, 15, -12), center=m.center)
    out.append(("BraTS t2f->t1n", f, Volume(m.array, M @ m.affine, modality="MR"), M, f.array > 0))
    return out


def tre(transform_points, fixed, brain, M):
    pts = fixed.index_to_world(np.argwhere(brain)[::37])
    truth = pts @ M[:3, :3].T + M[:3, 3]
    return float(np.linalg.norm(transform_points(pts) - truth, axis=1).mean())


def run_medfuse(f, m):
    from medfuse.registration import register

    r = register(f, m, kind="rigid")
    return r.transform.transform_points


def run_sitk_tutorial(f, m):
    """The recipe of SimpleITK's registration tutorial (Mattes 50 bins, 1% random, GD lr 1, shrink 4/2/1)."""
    import SimpleITK as sitk

    fi = sitk.Cast(f.to_sitk(), sitk.sitkFloat32)
    mi = sitk.Cast(m.to_sitk(), sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(fi, mi, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.01, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=100, convergenceMinimumValue=1e-6,
                                      convergenceWindowSize=10)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    t = reg.Execute(fi, mi)
    return lambda pts: np.array([t.TransformPoint(tuple(map(float, p))) for p in pts])


def run_elastix(f, m):
    import itk

    fi = itk.image_from_array(np.ascontiguousarray(np.transpose(f.array, (2, 1, 0))).astype(np.float32))
    mi = itk.image_from_array(np.ascontiguousarray(np.transpose(m.array, (2, 1, 0))).astype(np.float32))
    for img, v in ((fi, f), (mi, m)):
        img.SetSpacing([float(s) for s in v.spacing])
        img.SetOrigin([float(o) for o in v.origin])
        img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(v.direction)))
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
    _, tp = itk.elastix_registration_method(fi, mi, parameter_object=params, log_to_console=False)

    def tx(pts):
        import itk as _itk

        out = []
        t = _itk.transformix_pointset if False else None  # noqa: F841 - transformix needs files; use the matrix
        p = [float(x) for x in tp.GetParameter(0, "TransformParameters")]
        c = [float(x) for x in tp.GetParameter(0, "CenterOfRotationPoint")]
        import SimpleITK as sitk

        e = sitk.Euler3DTransform()
        e.SetCenter(c)
        e.SetRotation(*p[:3])
        e.SetTranslation(p[3:6])
        for q in pts:
            out.append(e.TransformPoint(tuple(map(float, q))))
        return np.array(out)

    return tx


def main() -> int:
    if not SHARED.exists():
        print("needs ../shared/data")
        return 1
    import SimpleITK as sitk

    print(f"threads: SimpleITK {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}")
    print(f"{'pair':18s} {'method':16s} {'time s':>8s} {'TRE mm':>8s}")
    for name, f, m, M, brain in pairs():
        res = {}
        for label, fn in (("medfuse", run_medfuse), ("sitk-tutorial", run_sitk_tutorial), ("elastix-rigid", run_elastix)):
            try:
                t0 = time.perf_counter()
                tp = fn(f, m)
                dt = time.perf_counter() - t0
                err = tre(tp, f, brain, M)
            except Exception as e:  # noqa: BLE001 - a peer failing must not stop the benchmark
                print(f"{name:18s} {label:16s} failed: {type(e).__name__}: {e}"[:200])
                continue
            res[label] = (dt, err)
            print(f"{name:18s} {label:16s} {dt:8.2f} {err:8.2f}")
        if "medfuse" in res:
            for peer in ("sitk-tutorial", "elastix-rigid"):
                if peer in res:
                    print(f"{'':18s} ratio {peer}/medfuse: time x{res[peer][0] / res['medfuse'][0]:.2f}, "
                          f"TRE x{res[peer][1] / max(res['medfuse'][1], 1e-6):.2f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
