"""``medfuse measure`` and ``medfuse info`` as a clinical physicist checks them.

Found by a physicist measuring the bundled FDG PET and a NEMA-like phantom: no ``--threshold`` for a probability
mask, a peak line that did not say where the sphere was or how much of a mL it held, a tied maximum shown as one
voxel, a mask partly outside the image measured without saying so, ``--json`` that did not record how its numbers
were made (SUV factor, file hashes, version), ``--modalities PT`` refused for an image measured with a mask (fuse's
wording, "FIXED first"), ``info`` printing an SUV factor without its unit and an oblique grid as "(oblique)" alone.

References: the arrays loaded here (numpy on the same voxels), hashlib on the files' bytes, the stored Bq/mL of
the bundled PET against its SUVs, and the rotations the test grids are built with.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.cli import EXIT_OK, EXIT_USAGE, _oblique_angle, main
from medfuse.volume import Volume, affine_from_geometry
from tests.conftest import SAMPLES

PET = SAMPLES / "pet"
RADIUS = (3000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # mm: the 1 mL sphere


def _json(capsys) -> dict:
    out, _ = capsys.readouterr()
    return json.loads(out)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pet() -> Volume:
    return medfuse.load(PET)


@pytest.fixture(scope="module")
def lesion(pet, tmp_path_factory) -> Path:
    """The bundled PET's hot region (SUV above 6) as a mask file on its grid."""
    path = tmp_path_factory.mktemp("lesion") / "lesion.nii.gz"
    return medfuse.save(pet.with_array((pet.array > 6).astype(np.uint8), modality="unknown", unit="arbitrary"), path)


# ----------------------------------------------------------------------------- --threshold
def test_threshold_measures_a_probability_map(pet, tmp_path, capsys):
    from scipy.ndimage import gaussian_filter

    prob = gaussian_filter((pet.array > 6).astype(np.float32), 1.0)
    path = medfuse.save(pet.with_array(prob, modality="unknown", unit="arbitrary"), tmp_path / "prob.nii.gz")
    prob = medfuse.load(path).array  # as written
    assert main(["measure", str(PET), "--mask", str(path), "--threshold", "0.5", "--json"]) == EXIT_OK
    st = _json(capsys)["mask"]
    ref = pet.array[prob >= 0.5].astype(np.float64)
    assert st["threshold"] == 0.5 and st["count"] == ref.size and 0 < ref.size < (prob > 0).sum()
    assert st["mean"] == pytest.approx(ref.mean()) and st["max"] == pytest.approx(ref.max())
    assert main(["measure", str(PET), "--mask", str(path), "--threshold", "0.5"]) == EXIT_OK
    assert f"mask {path}: voxels at or above 0.5" in capsys.readouterr().out
    # Without it, refused with the option that fixes it (every voxel above 0 would have counted).
    assert main(["measure", str(PET), "--mask", str(path)]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and "probability map" in err and "--threshold 0.5" in err


@pytest.mark.parametrize("argv, words", [
    (["--mask", "M", "--threshold", "0.5", "--label", "1"], "give --label or --threshold, not both"),
    (["--at", "0", "0", "0", "--threshold", "0.5"], "--threshold selects the --mask's voxels at or above it"),
    (["--mask", "M", "--threshold", "nan"], "--threshold must be a finite number, got nan"),
])
def test_threshold_usage_errors(argv, words, lesion, capsys):
    argv = [str(lesion) if a == "M" else a for a in argv]
    assert main(["measure", str(PET), *argv]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and words in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the max, peak and volume lines
def test_a_tied_maximum_and_the_hottest_sphere_are_said(tmp_path, capsys):
    """A uniform 37 mm hot sphere (every voxel ties for the maximum) in a warm background, 2 x 2 x 3.27 mm."""
    shape, spacing = (48, 48, 24), (2.0, 2.0, 3.27)
    ijk = np.indices(shape).reshape(3, -1).T * spacing
    inside = (np.linalg.norm(ijk - (np.asarray(shape) - 1) / 2 * spacing, axis=1) <= 18.5).reshape(shape)
    arr = np.where(inside, 6.27679, 1.569198).astype(np.float32)
    v = Volume(arr, affine_from_geometry(spacing, (-40.0, 10.0, 5.0), np.eye(3)), modality="PT", unit="SUVbw")
    img = medfuse.save(v, tmp_path / "phantom.nii.gz")
    mask = medfuse.save(v.with_array(inside.astype(np.uint8), unit="arbitrary", modality="unknown"),
                        tmp_path / "sphere.nii.gz")
    v = medfuse.load(img)
    assert main(["measure", str(img), "--mask", str(mask), "--json"]) == EXIT_OK
    st = _json(capsys)["mask"]
    top = float(v.array[inside].max())
    assert st["max_voxels"] == int((v.array[inside] == top).sum()) == int(inside.sum())
    # The sphere found holds the hot value alone: its voxels, from the arrays, all inside the hot sphere.
    world = np.indices(shape).reshape(3, -1).T @ v.affine[:3, :3].T + v.affine[:3, 3]
    near = np.linalg.norm(world - st["peak_at_lps_mm"], axis=1) <= RADIUS
    assert st["peak"] == pytest.approx(float(v.array.reshape(-1)[near].astype(np.float64).mean()), rel=1e-9)
    assert st["peak"] == pytest.approx(top, rel=1e-6)
    assert st["peak_ml"] == pytest.approx(near.sum() * np.prod(spacing) / 1000.0) and st["peak_ml"] < 1.0
    assert main(["measure", str(img), "--mask", str(mask)]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    mx = next(ln for ln in lines if ln.startswith("  max "))
    assert mx.startswith(f"  max {top:.6g} SUVbw, at ") and mx.endswith(
        f"({int(inside.sum())} voxels share it; the first is shown)")
    pk = next(ln for ln in lines if ln.startswith("  peak "))
    assert pk.startswith(f"  peak {st['peak']:.6g} SUVbw (hottest 1 mL sphere, {near.sum() * np.prod(spacing) / 1000:.3g}"
                         " mL of voxels on this grid, centred at x ")
    # Mask and image on one grid: one volume, said once.
    assert f"  volume {inside.sum() * np.prod(spacing) / 1000:.4g} mL" in lines


def test_a_mask_partly_outside_the_image_shows_its_own_volume(pet, tmp_path, capsys):
    """The lesion mask moved 60 mm up (S): part of it lies beyond the PET's last slice."""
    m = (pet.array > 2).astype(np.uint8)
    moved = Volume(m, np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 60.0], [0, 0, 0, 1]]) @ pet.affine)
    path = medfuse.save(moved, tmp_path / "moved.nii.gz")
    idx = np.argwhere(m > 0)
    ijk = (np.linalg.inv(pet.affine) @ moved.affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T
    outside = float(np.any((ijk < -0.5) | (ijk > np.asarray(pet.shape) - 0.5), axis=1).mean())
    own_ml = idx.shape[0] * np.prod(pet.spacing) / 1000.0
    assert 0.05 < outside < 0.95
    assert main(["measure", str(PET), "--mask", str(path)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert f"{100 * outside:.1f} % of the mask's region" in err  # mask_statistics' warning
    line = next(ln for ln in out.splitlines() if ln.startswith("  volume "))
    assert line.endswith(f" mL measured (the mask's region: {own_ml:.4g} mL on its own grid, "
                         f"{100 * outside:.1f} % of it outside the image)")


# ----------------------------------------------------------------------------- --json: how the numbers were made
def test_json_records_the_suv_factor_hashes_and_version(pet, lesion, capsys):
    tfm = SAMPLES / "pet_to_mr.tfm"
    assert main(["measure", str(PET), "--mask", str(lesion), "--at", "0", "0", "0", "--json"]) == EXIT_OK
    rec = _json(capsys)
    stored = medfuse.load(PET, suv="none")
    assert stored.unit == "Bq/mL"
    hot = stored.array > 0
    # The factor turns the stored Bq/mL into the SUVs measured (g/Bq x Bq/mL = g/mL).
    ratio = np.median(pet.array[hot].astype(np.float64) / stored.array[hot])
    assert rec["suv_factor"] == pytest.approx(ratio, rel=1e-5) and rec["suv_factor_unit"] == "g/Bq"
    assert "Units BQML" in rec["suv_source"]
    assert rec["image_sha256"] == medfuse.provenance.hash_path(PET)  # a folder: as sidecars hash inputs
    assert rec["mask"]["sha256"] == _sha256(lesion)
    assert rec["versions"]["medfuse"] == medfuse.__version__
    for key in ("mask_ml", "outside_fraction", "max_voxels", "peak_at_lps_mm", "peak_ml", "threshold"):
        assert key in rec["mask"], key
    # The MR measured within the PET's lesion, carried by the transform: its file is recorded with its hash.
    mr = SAMPLES / "mr_t1.nii.gz"
    assert main(["measure", str(mr), "--mask", str(lesion), "--transform", str(tfm), "--json"]) == EXIT_OK
    rec = _json(capsys)
    assert rec["transforms"] == [{"path": str(tfm), "sha256": _sha256(tfm)}]
    assert rec["image_sha256"] == _sha256(mr) and "suv_factor" not in rec


# ----------------------------------------------------------------------------- --modalities for measure
@pytest.fixture(scope="module")
def plain_bqml(tmp_path_factory):
    """The bundled PET in Bq/mL as a plain NIfTI (no modality recorded) and a lesion mask beside it."""
    import nibabel as nib

    folder = tmp_path_factory.mktemp("plain")
    stored = medfuse.load(PET, suv="none")
    nib.save(nib.Nifti1Image(stored.array, stored.affine_ras), str(folder / "pet_bqml.nii.gz"))
    nib.save(nib.Nifti1Image((stored.array > np.percentile(stored.array, 99)).astype(np.uint8), stored.affine_ras),
             str(folder / "m.nii.gz"))
    return folder / "pet_bqml.nii.gz", folder / "m.nii.gz"


@pytest.mark.parametrize("given", [["PT"], ["PT", "-"], ["PET", "-"]])
def test_measure_takes_the_image_modality_alone(given, plain_bqml, capsys):
    image, mask = plain_bqml
    assert main(["measure", str(image), "--modalities", *given, "--mask", str(mask), "--series", "-",
                 "--json"]) == EXIT_OK
    rec = _json(capsys)
    arr, sel = medfuse.load(image).array, medfuse.load(mask).array > 0
    assert rec["modality"] == "PT" and rec["mask"]["mean"] == pytest.approx(arr[sel].astype(np.float64).mean())
    assert rec["image_sha256"] == _sha256(image)


@pytest.mark.parametrize("given, words", [
    (["PT", "PT", "PT"], "--modalities names 3 modalities for 2 inputs: IMAGE and MASK"),
    (["PX"], "--modalities: unknown modality 'PX' for input 1"),
])
def test_measure_modalities_errors_speak_of_image_and_mask(given, words, plain_bqml, capsys):
    image, mask = plain_bqml
    assert main(["measure", str(image), "--modalities", *given, "--mask", str(mask)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert words in err and "FIXED" not in err


# ----------------------------------------------------------------------------- info: SUV factor unit, direction
def test_info_gives_the_suv_factor_its_unit(pet, capsys):
    assert main(["info", str(PET)]) == EXIT_OK
    line = next(x for x in capsys.readouterr().out.splitlines() if "SUV factor" in x)
    assert line.startswith(f"  SUV factor   {pet.provenance['suv_factor']:.7g} = body weight")
    assert line.endswith("; unit g/Bq (stored Bq/mL x factor = SUVbw in g/mL)")
    assert main(["info", str(PET), "--json"]) == EXIT_OK
    facts = _json(capsys)
    assert facts["suv_factor_unit"] == "g/Bq" and facts["oblique_deg"] == 0.0


def _rotation(axis, angle) -> np.ndarray:
    """Rodrigues' rotation matrix about a unit ``axis``."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def test_the_oblique_angle_is_the_rotation_from_the_nearest_axis_aligned_grid():
    # Voxel axes k, i, j along world S, L, A (a sagittal-like order), then turned 0.2 rad about a skew axis.
    base = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    for turn in (_rotation((1, 2, 3), 0.2), _rotation((0, 0, 1), -0.35)):
        code, angle = _oblique_angle(base @ turn)
        assert code == "SLA" and angle == pytest.approx(math.degrees(np.arccos((np.trace(turn) - 1) / 2)))
    assert _oblique_angle(np.diag([-1.0, -1.0, 1.0])) == ("RAS", 0.0)


def test_info_shows_an_oblique_grid_s_direction(tmp_path, capsys):
    c, s = math.cos(0.3), math.sin(0.3)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])
    v = Volume(np.ones((6, 7, 8), np.float32), affine_from_geometry((2.0, 3.0, 4.0), (10.0, -20.0, 30.0), direction))
    path = medfuse.save(v, tmp_path / "oblique.nii.gz")
    assert main(["info", str(path)]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert f"  direction    {math.degrees(0.3):.2f} deg from LAS, the nearest axis-aligned orientation" in out
    cosines = next(x for x in out if x.startswith("  cosines "))
    assert cosines.startswith(f"  cosines      i ({c:.4f}, {s:.4f}, 0.0000), j ({s:.4f}, {-c:.4f}, 0.0000)")
    assert main(["info", str(path), "--json"]) == EXIT_OK
    facts = _json(capsys)
    written = medfuse.load(path)
    np.testing.assert_allclose(facts["direction_lps"], written.affine[:3, :3] / written.spacing, atol=1e-6)
    assert facts["oblique_deg"] == pytest.approx(math.degrees(0.3), abs=1e-3) and facts["oblique"] is True
    assert main(["info", str(SAMPLES / "mr_t1.nii.gz")]) == EXIT_OK
    assert not any(x.startswith("  direction ") for x in capsys.readouterr().out.splitlines())
