"""The fill outside the moving image's field in register()'s resampled image, and the warning that it biases a
quantitative PET's regional means.

A PET cut 16 slices short (cerebellum truncated), registered onto its T1, read a cerebellum mean of 0.524 for a
true 0.821: the fill 0 lay inside the T1's brain, and nothing said so (overlap_fraction 0.798 in the sidecar).
``fill=float('nan')`` (``medfuse register --fill nan``) marks it as no data, which measuring leaves out.
"""

import json
import warnings

import numpy as np
import pytest

from medfuse.errors import InvalidInputError
from medfuse.io import load
from medfuse.measure import mask_statistics
from medfuse.registration import register
from medfuse.registration.register import _partial_field_note
from medfuse.registration.resample import not_for_measuring
from medfuse.volume import Volume

CUT = 16  # the lowest slices cut off
WARNED = "regional means there would be biased low"


@pytest.fixture(scope="module")
def spm():
    """The SPM12 T1, its PET as SUVbw (the templates share one space: the truth is the identity), the PET with its
    lowest CUT slices cut (same world positions), and a lower-brain region on the T1's grid reaching below the cut."""
    from tests.conftest import shared_path

    d = shared_path("data", "spm12-templates")
    t1 = load(d / "T1.nii", modality="MR")
    pet = load(d / "PET.nii", modality="PT")
    pet = Volume(pet.array.astype(np.float32), pet.affine, modality="PT", unit="SUVbw")
    assert np.allclose(t1.affine, pet.affine) and t1.shape == pet.shape
    shift = np.eye(4)
    shift[2, 3] = CUT
    cropped = Volume(np.ascontiguousarray(pet.array[:, :, CUT:]), pet.affine @ shift, modality="PT", unit="SUVbw")
    region = np.zeros(pet.shape, bool)
    region[:, :, 10:40] = pet.array[:, :, 10:40] > 0.5 * pet.array.max()
    return t1, pet, cropped, region


def _register(fixed, moving, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = register(fixed, moving, **kw)
    return r, [str(w.message) for w in caught if WARNED in str(w.message)]


def test_a_pet_covering_part_of_the_fixed_image_is_warned_about_and_nan_fill_measures_right(spm):
    t1, pet, cropped, region = spm
    true = float(pet.array[region].mean())
    mask = Volume(region.astype(np.uint8), t1.affine)
    r, said = _register(t1, cropped)
    overlap = r.report.overlap_fraction
    assert overlap < 0.9 and len(said) == 1, (overlap, said)
    assert f"only {overlap:.0%} of the fixed image" in said[0] and "fill value 0" in said[0], said
    assert "--inverse" in said[0] and "--fill nan" in said[0], said
    assert said[0] in r.resampled.provenance["warnings"]  # the output's sidecar keeps it
    biased = mask_statistics(r.resampled, mask)["mean"]
    assert biased < 0.9 * true, (biased, true)
    # Fusion resamples to look, not to measure: not said there.
    with not_for_measuring():
        assert _partial_field_note(cropped, overlap, r.resampled) is None
    # NaN as the fill: said nowhere, NaN below the cut, and the region's mean is the PET's own.
    r, said = _register(t1, cropped, fill=float("nan"))
    assert not said and r.resampled.provenance["history"][-1]["fill"] == "nan"
    assert np.isnan(r.resampled.array[:, :, :CUT - 3]).all()
    got = mask_statistics(r.resampled, mask)["mean"]
    assert abs(got - true) <= 0.02 * true, (got, true, biased)


def test_a_whole_field_pet_is_not_warned_about(spm):
    t1, pet, _, _ = spm
    r, said = _register(t1, pet)
    assert r.report.overlap_fraction >= 0.95 and not said, (r.report.overlap_fraction, said)
    assert r.resampled.provenance["history"][-1]["fill"] == 0.0


def test_the_command_line_fill_reaches_the_output(spm, tmp_path):
    from medfuse.cli import main
    from medfuse.io import save

    t1, _, cropped, _ = spm
    save(t1, tmp_path / "t1.nii.gz")
    save(cropped, tmp_path / "pet.nii.gz")
    out = tmp_path / "out.nii.gz"
    assert main(["register", str(tmp_path / "t1.nii.gz"), str(tmp_path / "pet.nii.gz"), "-o", str(out),
                 "--fill", "nan", "--modalities", "MR", "PT", "--no-progress"]) == 0
    got = load(out)
    # (Above the cut the field's sides lie a few mm off, as the registration does: 2.8 mm, these templates' limit.)
    assert np.isnan(got.array[:, :, :CUT - 3]).all() and np.isfinite(got.array[:, :, CUT + 3:]).mean() > 0.9
    side = json.loads(out.with_name("out.json").read_text())
    assert "nan" in json.dumps(side), side.keys()


def test_a_fill_that_is_not_a_number_is_refused_before_any_work(spm):
    t1, _, cropped, _ = spm
    with pytest.raises(InvalidInputError, match="fill"):
        register(t1, cropped, fill="zero")

