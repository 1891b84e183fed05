"""``medfuse resample --spacing/--orientation`` (a challenge dataset's grid: 1 mm isotropic RAS), and the
transform's direction checked against the sidecar ``medfuse register`` wrote with it, as ``measure`` checks it.

References: :func:`medfuse.registration.common_grid` and :func:`medfuse.resample` (the same grid and values from
Python), nibabel's ``aff2axcodes`` for the axes written, and the sample volumes' known MR -> PET matrix
(sample_volumes/ground_truth.json) for the direction.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medfuse
from medfuse import provenance as prov
from medfuse.cli import EXIT_OK, EXIT_USAGE, main
from medfuse.registration import common_grid

SAMPLES = Path(__file__).resolve().parents[1] / "sample_volumes"
TRUTH = json.loads((SAMPLES / "ground_truth.json").read_text())


@pytest.mark.parametrize("spacing, code", [(["2"], "RAS"), (["1.5", "2", "3"], "LPS"), (None, "ras")])
def test_spacing_and_orientation_give_the_grid_python_gives(tmp_path, capsys, spacing, code):
    out = tmp_path / "pet_on_grid.nii.gz"
    argv = ["resample", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "-o", str(out),
            "--orientation", code] + (["--spacing", *spacing] if spacing else [])
    assert main(argv) == EXIT_OK
    said = capsys.readouterr().out
    mr, pet = medfuse.load(SAMPLES / "mr_t1.nii.gz"), medfuse.load(SAMPLES / "pet")
    want_spacing = None if spacing is None else float(spacing[0]) if len(spacing) == 1 else tuple(map(float, spacing))
    grid = common_grid([mr], spacing=want_spacing, orientation=code)
    want = medfuse.resample(pet, grid)
    got = medfuse.load(out)
    np.testing.assert_allclose(got.affine, grid.affine, atol=1e-6)
    np.testing.assert_allclose(got.array, want.array, atol=1e-5 * float(want.array.max()))
    img = nib.load(out)
    assert "".join(nib.aff2axcodes(img.affine)) == code.upper()
    expected = [min(mr.spacing)] * 3 if spacing is None else [float(s) for s in spacing] * (3 // len(spacing))
    np.testing.assert_allclose(img.header.get_zooms()[:3], expected, rtol=1e-6)
    assert f"{code.upper()} grid" in said
    params = json.loads(out.with_name("pet_on_grid.json").read_text())["parameters"]
    assert params["orientation"] == code.upper()
    assert params.get("spacing") == (None if spacing is None else want_spacing if len(spacing) == 1
                                     else list(want_spacing))


@pytest.mark.parametrize("extra, said", [
    (["--orientation", "RAX"], "--orientation: orientation 'RAX' is not an orientation code"),
    (["--orientation", "RRS"], "names the L/R axis twice"),
    (["--spacing", "0"], "--spacing:"),
    (["--spacing", "1", "2"], "--spacing: spacing must be one number"),
])
def test_a_wrong_grid_is_refused_before_anything_is_read_or_written(tmp_path, capsys, extra, said):
    out = tmp_path / "o.nii.gz"
    assert main(["resample", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "-o", str(out), *extra]) \
        == EXIT_USAGE
    err = capsys.readouterr().err
    assert said in err and "Fix:" in err
    assert not out.exists() and not out.with_name("o.json").exists()


def test_a_transform_register_wrote_is_refused_the_wrong_way_round(tmp_path, capsys):
    """``register MR PET`` writes MR's points -> PET's; ``resample PET MR --transform`` needs ``--inverse``."""
    fixed, moving = SAMPLES / "mr_t1.nii.gz", SAMPLES / "pet"
    tfm = tmp_path / "mr_to_pet.tfm"
    medfuse.Transform.from_matrix(np.array(TRUTH["mr_to_pet"])).save(tfm)
    registered = tmp_path / "pet_on_mr.nii.gz"
    medfuse.save(medfuse.load(fixed), registered)  # stands for register's output image (only hashed)
    record = prov.build(inputs=[{"role": "fixed", "path": fixed, "sha256": prov.hash_path(fixed)},
                                {"role": "moving", "path": moving, "sha256": prov.hash_path(moving)}],
                        output=registered, output_sha256=prov.hash_path(registered),
                        steps=[{"name": "register", "params": {"kind": "rigid"}, "seconds": 1.0}],
                        parameters={"kind": "rigid"},
                        extra={"transform": {"path": str(tfm), "sha256": prov.hash_path(tfm)}})
    prov.write_sidecar(registered, record)
    out = tmp_path / "mr_on_pet.nii.gz"
    base = ["resample", str(moving), str(fixed), "--transform", str(tfm), "-o", str(out)]
    assert main(base) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "maps the other way" in err and "REFERENCE as its MOVING image" in err and "--inverse" in err
    assert not out.exists()
    assert main([*base, "--inverse"]) == EXIT_OK
    got = medfuse.load(out)
    want = medfuse.resample(medfuse.load(fixed), medfuse.load(moving),
                            transform=medfuse.Transform.from_matrix(np.linalg.inv(np.array(TRUTH["mr_to_pet"]))))
    np.testing.assert_allclose(got.array, want.array, atol=1e-4 * float(np.abs(want.array).max()))
    # The right way round (REFERENCE the registration's FIXED image) passes, and --inverse there is refused.
    capsys.readouterr()
    assert main(["resample", str(fixed), str(moving), "--transform", str(tfm), "-o", str(tmp_path / "p.nii.gz")]) \
        == EXIT_OK
    assert main(["resample", str(fixed), str(moving), "--transform", str(tfm), "--inverse",
                 "-o", str(tmp_path / "q.nii.gz")]) == EXIT_USAGE
    assert "--inverse turns the transform the wrong way" in capsys.readouterr().err
