"""A turned orientation that wins the start search on the few samples a small fixed mask leaves is flagged (kept
or not: since a turned result must win by 10 %, the unturned one may be kept, and is wrong there too).

Measured on a BraTS t1c crop (80x90x50 mm) onto itself rotated 8.7 degrees: fixed_mask = the brightest 3 % of
the crop (a scattered region, 16 voxels of the 8 mm copies the start search scores on) ended turned 172 degrees,
103 mm off, with ``report.suspect`` False.
"""
import warnings

import numpy as np
import pytest

import medfuse


def _pair(shared, tmp_path):
    """The crop, the crop rotated (0.12, -0.05, 0.08) rad and shifted onto an oblique 1.25 mm grid, as the probe;
    both through NIfTI files as there (the regime is noisy: the in-memory pair, whose geometry differs from the
    files' in float32's last digits, ended turned too but kept the scanners' placement at the end)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(shared("data", "brats-gli-00001", "t1c.nii.gz")))[60:140, 60:150, 50:100]
    t = sitk.Euler3DTransform()
    c = img.TransformContinuousIndexToPhysicalPoint([s / 2 for s in img.GetSize()])
    t.SetCenter(c)
    t.SetRotation(0.12, -0.05, 0.08)
    t.SetTranslation((4, -3, 2))
    ref = sitk.Image([70, 76, 44], sitk.sitkFloat32)
    ref.SetSpacing((1.25, 1.25, 1.25))
    r = sitk.Euler3DTransform()
    r.SetRotation(0.05, 0.1, -0.07)
    ref.SetDirection(r.GetMatrix())
    ref.SetOrigin(tuple(np.array(c) - np.array(r.GetMatrix()).reshape(3, 3) @ (np.array([70, 76, 44]) * 1.25 / 2)))
    mov = sitk.Resample(img, ref, t, sitk.sitkLinear, 0, sitk.sitkInt16)
    sitk.WriteImage(img, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(mov, str(tmp_path / "moving.nii.gz"))
    return medfuse.load(tmp_path / "fixed.nii.gz"), medfuse.load(tmp_path / "moving.nii.gz")


def _turned_180z(v):
    """The same voxels, placed turned 180 degrees about z around their centre (a wrong orientation header)."""
    c = np.asarray(v.center, float)
    to, back = np.eye(4), np.eye(4)
    to[:3, 3], back[:3, 3] = c, -c
    return medfuse.Volume(v.array, to @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ back @ v.affine, modality=v.modality)


def _register(fixed, moving, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return medfuse.register(fixed, moving, kind="rigid", **kw).report


def test_a_turned_win_inside_a_small_fixed_mask_is_suspect(shared, tmp_path):
    fixed, moving = _pair(shared, tmp_path)
    a = fixed.array.astype(float)
    small = a > np.percentile(a[a > 0], 97)  # ~3 % of the crop, scattered
    rep = _register(fixed, moving, fixed_mask=small)
    # The mechanism this test is about: a turned orientation won the start search. Since 2026-12-07 a turned result
    # must beat the unturned one by 10 % after the final stages; here it does not (-0.127 against -0.159), and the
    # unturned result kept ended 24-27 degrees off (truth 8.7): flagged all the same.
    assert "turned" in rep.initialisation, rep.initialisation
    assert rep.suspect
    assert any("won the start search, judged within the fixed mask" in r for r in rep.suspect_reasons), \
        rep.suspect_reasons


@pytest.mark.parametrize("mask", ["head", "none"])
def test_a_right_turned_win_with_a_large_mask_or_none_is_flagged_only_for_the_header(shared, tmp_path, mask):
    """The moving image's header turned 180 degrees: "auto" finds it back (0.1 mm) with a head mask (439 voxels of
    the 8 mm copies) or none, and that win is not flagged by the small-mask check."""
    fixed, moving = _pair(shared, tmp_path)
    a = fixed.array.astype(float)
    kw = {"fixed_mask": a > np.percentile(a, 40)} if mask == "head" else {}
    rep = _register(fixed, _turned_180z(moving), **kw)
    assert rep.initialisation.startswith("turned 180z"), rep.initialisation
    assert abs(rep.rotation_deg - 175.6) < 2, rep.rotation_deg
    # Only the reason every kept turn gets (a flipped axis wins turned the same way): check the header.
    assert len(rep.suspect_reasons) == 1, rep.suspect_reasons
    assert "orientation headers disagreed by a turn of 180 degrees about z" in rep.suspect_reasons[0]
