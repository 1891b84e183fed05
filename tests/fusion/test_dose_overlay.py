"""An RT dose (unit Gy, modality "unknown") is a functional overlay: fusion scales it on a fixed dose range and
the network keeps its hot spot; the display shows it as a dose wash; registration refuses it.

Before: "auto" gave a dose the percentile rule (its top 0.5 % of voxels, the boost, clipped to the dose around
it), the network's ``functional`` was None beside an MR (the stronger detail, not "brighter wins"), the display
showed it grey, and a registration ran on a grid with no anatomy.
"""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest

import medfuse
from medfuse import fusion
from medfuse._checks import refuse_dose_grid
from medfuse.display import DOSE_COLORMAP, display_settings
from medfuse.errors import InvalidInputError, RegistrationError
from medfuse.fusion import infer
from medfuse.fusion.normalise import auto_method, normalise
from medfuse.volume import Volume

AFFINE = np.array([[2.0, 0.0, 0.0, -40.0], [0.0, 2.5, 0.0, 10.0], [0.0, 0.0, 3.0, -7.5], [0.0, 0.0, 0.0, 1.0]])


def _dose(shape=(30, 32, 20)) -> np.ndarray:
    """60 Gy in a box, a 70 Gy boost in 0.2 % of the grid, 0 Gy outside the beams: exact values to check."""
    d = np.zeros(shape, np.float32)
    d[5:25, 6:26, 3:17] = 60.0
    d[14:16, 15:17, 9:12] = 70.0  # 12 voxels of 19200
    return d


def test_auto_scales_a_dose_from_0_gy_to_its_largest_dose():
    dose = Volume(_dose(), AFFINE, modality="unknown", unit="Gy")
    assert auto_method("unknown", "Gy") == "dose"
    scaled, rec = normalise(dose)
    assert rec["method"] == "dose" and rec["low"] == 0.0 and rec["high"] == 70.0 and rec["clipped_fraction"] == 0.0
    np.testing.assert_allclose(scaled.array, dose.array.astype(np.float64) / 70.0, rtol=0, atol=1e-12)
    # The boost stays brighter than the plan dose around it; the percentile rule flattened them into one.
    assert scaled.array[15, 16, 10] == 1.0 and scaled.array[10, 10, 10] == pytest.approx(60.0 / 70.0)
    flat, _ = normalise(dose, method="percentile")
    assert flat.array[15, 16, 10] == flat.array[10, 10, 10] == 1.0


def test_a_prescription_sets_the_top_of_the_dose_range():
    dose = Volume(_dose(), AFFINE, modality="unknown", unit="Gy")
    scaled, rec = normalise(dose, dose_max=60.0)
    assert rec["method"] == "dose" and rec["dose_max"] == 60.0 and rec["high"] == 60.0
    assert rec["clipped_fraction"] == pytest.approx(12 / dose.array.size)
    np.testing.assert_allclose(scaled.array, np.clip(dose.array.astype(np.float64) / 60.0, 0, 1), rtol=0, atol=1e-12)
    with pytest.raises(InvalidInputError, match="dose_max"):
        normalise(dose, dose_max=0)
    # In fuse's per-input dicts too.
    mr = Volume(np.linspace(0, 1, dose.array.size).reshape(dose.shape), AFFINE, modality="MR")
    out = medfuse.fuse(mr, dose, method="mean", normalise=[{}, {"dose_max": 60.0}])
    assert out.provenance["normalisation"][1]["high"] == 60.0


def test_dose_method_on_another_quantity_warns():
    pet = Volume(_dose(), AFFINE, modality="PT", unit="SUVbw")
    with pytest.warns(medfuse.MedfuseWarning, match="Gy"):
        normalise(pet, method="dose")


def test_the_network_treats_a_dose_beside_an_mr_as_functional():
    """Thin (3 slices): the 2-D path, which is fast and compared slice by slice with fuse_2d(functional=True)."""
    shape = (36, 40, 3)
    mr = np.random.default_rng(1).uniform(0, 1, shape)
    dose = _dose(shape)
    out = medfuse.fuse(Volume(mr, AFFINE, modality="MR"), Volume(dose, AFFINE, modality="unknown", unit="Gy"),
                       method="network", normalise=[{"method": "none"}, {}])
    assert out.provenance["network_functional"] is True
    assert out.provenance["normalisation"][1]["method"] == "dose"
    for k in range(shape[2]):
        want = infer.fuse_2d([mr[:, :, k], dose[:, :, k] / 70.0], functional=True)
        np.testing.assert_allclose(out.array[:, :, k], np.clip(want, 0, 1), rtol=0, atol=1e-6)
    assert fusion._SPEC_KEYS.count("dose_max") == 1


def test_display_shows_a_dose_as_a_magma_wash_from_0_gy_to_its_largest_dose():
    dose = Volume(_dose(), AFFINE, modality="unknown", unit="Gy")
    s = display_settings(dose)
    assert s.colormap == DOSE_COLORMAP == "magma" and s.contrast_limits == (0.0, 70.0)
    o = display_settings(dose, overlay=True)
    assert (o.blending, o.opacity) == ("additive", 0.6)
    # An all-zero dose still gets a usable (non-empty) range.
    assert display_settings(Volume(np.zeros((4, 4, 4)), AFFINE, unit="Gy")).contrast_limits == (0.0, 1.0)


@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_registration_of_a_dose_grid_is_refused_with_commands_that_parse(role):
    from medfuse.cli import build_parser

    refuse_dose_grid(Volume(_dose(), AFFINE, modality="CT", unit="HU"), role=role)  # anatomy: passes
    with pytest.raises(RegistrationError, match=f"the {role} image is an RT dose grid") as err:
        refuse_dose_grid(Volume(_dose(), AFFINE, unit="Gy"), role=role)
    fix = err.value.fix
    assert "planning CT" in fix and "medfuse resample" in fix
    # Every command the fix quotes parses with medfuse's own CLI, its options included.
    commands = re.findall(r"medfuse ((?:register|resample) [^();]*)", fix)
    assert [c.split()[0] for c in commands] == ["register", "resample"]
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command))
        assert args.output.endswith(".nii.gz")
    if role == "moving":  # the CT's transform, written by register, is the one the dose is resampled through
        assert parser.parse_args(shlex.split(commands[0])).transform == "ct.tfm"
        assert parser.parse_args(shlex.split(commands[1])).transform == ["ct.tfm"]
