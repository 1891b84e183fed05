"""The command line on PET: `info`'s acquisition facts, the baseline/follow-up notes of `register` and `resample`,
`fuse --ct-window/--suv-range` and `resample --inverse`.

References: the sample PET's own DICOM header (read here with pydicom), the sample volumes' transform, and values
computed here from the loaded inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

import medfuse
from medfuse.cli import EXIT_USAGE, _tracer_text, main

from tests.conftest import SAMPLES

PET = SAMPLES / "pet"


def _header() -> pydicom.Dataset:
    return pydicom.dcmread(sorted(PET.iterdir())[0], stop_before_pixels=True)


def test_info_shows_the_tracer_dose_and_uptake_the_header_states(capsys):
    ds = _header()
    drug = ds.RadiopharmaceuticalInformationSequence[0]
    assert main(["info", str(PET)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("tracer"))
    uptake = (int(ds.SeriesTime[:2]) * 60 + int(ds.SeriesTime[2:4])) - (
        int(drug.RadiopharmaceuticalStartTime[:2]) * 60 + int(drug.RadiopharmaceuticalStartTime[2:4]))
    assert line.split(None, 1)[1] == (
        f"{drug.Radiopharmaceutical} (half-life {float(drug.RadionuclideHalfLife) / 60:.1f} min), "
        f"{float(drug.RadionuclideTotalDose) / 1e6:.1f} MBq injected, uptake {uptake} min, "
        f"decay-corrected to {ds.DecayCorrection}, attenuation-corrected")
    assert "ATTN" in ds.CorrectedImage  # what the last part reads
    assert main(["info", str(PET), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["pet_acquisition"]
    assert set(facts) == {"tracer", "radionuclide", "half_life_s", "injected_mbq", "uptake_min", "decay_correction",
                          "attenuation_corrected", "attenuation_method"}
    assert facts["injected_mbq"] == pytest.approx(float(drug.RadionuclideTotalDose) / 1e6)
    assert facts["uptake_min"] == pytest.approx(uptake)


def test_info_of_an_image_that_is_not_pet_has_no_tracer(capsys):
    assert main(["info", str(SAMPLES / "mr_t1.nii.gz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pet_acquisition"] is None


def test_the_tracer_line_reads_dicoms_radionuclide_and_leaves_out_the_unknown():
    full = {"tracer": "FDG", "radionuclide": "^18^Fluorine", "half_life_s": 6586.2, "injected_mbq": 370.0,
            "uptake_min": 62.4, "decay_correction": "START"}
    assert _tracer_text(full) == ("FDG (18F, half-life 109.8 min), 370.0 MBq injected, uptake 62 min, "
                                  "decay-corrected to START")
    assert _tracer_text({**dict.fromkeys(full), "radionuclide": "^99m^Technetium", "half_life_s": 21624.0,
                         "decay_correction": "NONE"}) == "99mTc, half-life 6.01 h, not decay-corrected"
    assert _tracer_text({**dict.fromkeys(full), "injected_mbq": 200.0}) == "200.0 MBq injected"
    assert _tracer_text({**full, "attenuation_corrected": True, "attenuation_method": "CT-based"}).endswith(
        "decay-corrected to START, attenuation-corrected (CT-based)")
    assert _tracer_text({**dict.fromkeys(full), "attenuation_corrected": False}) == \
        "NOT attenuation-corrected (its values are not quantitative)"
    assert _tracer_text(None) == ""


@pytest.fixture(scope="module")
def followup(tmp_path_factory) -> Path:
    """The sample PET as a follow-up with another tracer, injected 30 min earlier (uptake 90 min, not 60)."""
    out = tmp_path_factory.mktemp("followup") / "pet"
    out.mkdir()
    for f in sorted(PET.iterdir()):
        ds = pydicom.dcmread(f)
        drug = ds.RadiopharmaceuticalInformationSequence[0]
        drug.Radiopharmaceutical = "Fluciclovine"
        drug.RadiopharmaceuticalStartTime = "093000.000000"
        if "RadiopharmaceuticalStartDateTime" in drug:
            drug.RadiopharmaceuticalStartDateTime = drug.RadiopharmaceuticalStartDateTime[:8] + "093000.000000"
        ds.save_as(out / f.name)
    return out


def test_resample_of_a_follow_up_pet_notes_why_its_suvs_do_not_compare(followup, tmp_path, capsys):
    assert medfuse.load(followup).provenance["pet_acquisition"]["uptake_min"] == pytest.approx(90.0)
    out = tmp_path / "fu_on_bl.nii.gz"
    assert main(["resample", str(PET), str(followup), "-o", str(out)]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  note: ")]
    assert len(notes) == 2
    assert "different tracers: Fluorodeoxyglucose at baseline, Fluciclovine at follow-up" in notes[0]
    assert "uptake times differ by 30 min (60 min at baseline, 90 min at follow-up)" in notes[1]
    assert main(["resample", str(PET), str(followup), "-o", str(out), "--overwrite", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [f"  note: {n}" for n in record["notes"]] == notes
    # The same scan twice: nothing to note.
    assert main(["resample", str(PET), str(PET), "-o", str(tmp_path / "same.nii.gz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []


def test_register_notes_them_too(followup, tmp_path, capsys):
    out = tmp_path / "reg.nii.gz"
    assert main(["register", str(PET), str(followup), "-o", str(out), "--initialise", "none", "--json",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    notes = json.loads(captured.out)["notes"]
    assert len(notes) == 2 and notes[1].startswith("uptake times differ by 30 min")
    assert f"  note: {notes[1]}" in captured.err.splitlines()  # --json: the lines a person reads go to stderr


# ----------------------------------------------------------------------------- fuse --ct-window / --suv-range
def test_fuse_maps_the_ct_window_and_suv_range_given(tmp_path, capsys):
    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(SAMPLES / "ct"), str(PET), "-o", str(out), "--method", "max", "--ct-window", "400",
                 "1800", "--suv-range", "1", "6", "--no-progress"]) == 0
    assert "was not used" not in capsys.readouterr().out
    record = json.loads(out.with_name("fused.json").read_text())
    ct_rec, pet_rec = record["normalisation"]
    assert (ct_rec["method"], ct_rec["level"], ct_rec["width"], ct_rec["low"], ct_rec["high"]) == \
        ("window", 400.0, 1800.0, -500.0, 1300.0)
    assert (pet_rec["method"], pet_rec["low"], pet_rec["high"], pet_rec["unit"]) == ("range", 1.0, 6.0, "SUVbw")
    ct = medfuse.load(SAMPLES / "ct").array
    assert ct_rec["clipped_fraction"] == pytest.approx(float(np.mean((ct < -500) | (ct > 1300))), abs=1e-9)
    normalise = next(s for s in record["steps"] if s["name"] == "normalise")["params"]
    assert normalise["ct_window"] == [400.0, 1800.0] and normalise["suv_range"] == [1.0, 6.0]
    # The max rule never goes below the CT as this window maps it; with the default window (-160..240 HU) soft
    # tissue would map higher (40 HU: 0.5, not 0.3), and the fused image is below that over much of the body.
    fused = medfuse.load(out).array
    windowed = np.clip((ct.astype(np.float64) + 500.0) / 1800.0, 0.0, 1.0)
    assert np.all(fused >= windowed - 1e-4)
    body = ct > -300
    assert np.mean((fused < np.clip((ct + 160.0) / 400.0, 0.0, 1.0) - 0.05)[body]) > 0.3


def test_fuse_suv_range_from_zero_is_the_suv_rule_with_its_top(tmp_path, capsys):
    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(PET), "-o", str(out), "--method", "max",
                 "--suv-range", "0", "4", "--ct-window", "40", "80", "--no-progress"]) == 0
    # No CT among the inputs: the window is said to be unused, not dropped without a word.
    assert "  note: --ct-window was not used: no input is a CT in HU" in capsys.readouterr().out.splitlines()
    pet_rec = json.loads(out.with_name("fused.json").read_text())["normalisation"][1]
    assert (pet_rec["method"], pet_rec["suv_max"], pet_rec["low"], pet_rec["high"]) == ("suv", 4.0, 0.0, 4.0)


@pytest.mark.parametrize("option, words", [
    (["--ct-window", "40", "0"], "--ct-window: the width must be a number above 0 HU, got 0"),
    (["--ct-window", "40", "-400"], "--ct-window: the width must be a number above 0 HU, got -400"),
    (["--suv-range", "5", "2"], "--suv-range: LOW must be below HIGH, got 5 and 2"),
    (["--suv-range", "0", "nan"], "--suv-range: LOW must be below HIGH"),
])
def test_fuse_refuses_an_empty_window_or_range_before_any_work(option, words, tmp_path, capsys):
    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(SAMPLES / "ct"), str(PET), "-o", str(out), "--method", "max", *option]) == EXIT_USAGE
    assert words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_pipeline_applies_them_in_its_own_normalise_step_and_releases_the_inputs(monkeypatch):
    """fuse_files(ct_window=, suv_range=): each input's record is normalise()'s with those options on the input on
    the CT's grid (the PET resampled as medfuse.resample puts it there), the step's parameters record them, and
    the inputs as loaded are released before the fusion (a wrapper step kept them: the release checks the steps'
    types)."""
    from medfuse.fusion.normalise import normalise
    from medfuse import pipeline

    released = []
    real = pipeline._release_originals

    def spy(state, later):
        real(state, later)
        released.append(state.originals == [] and "_original_facts" in state.notes)

    monkeypatch.setattr(pipeline, "_release_originals", spy)
    ct = medfuse.load(SAMPLES / "ct")
    pet = medfuse.resample(medfuse.load(PET), ct)
    res = pipeline.fuse_files(SAMPLES / "ct", PET, None, method="max", ct_window=(400, 1800), suv_range=(1, 6))
    assert released == [True]
    ct_rec, pet_rec = res.provenance["normalisation"]
    want_ct = normalise(ct.array, modality="CT", unit=ct.unit, level=400, width=1800)[1]
    want_pet = normalise(pet.array, method="range", modality="PT", unit=pet.unit, low=1, high=6)[1]
    assert want_ct["method"] == "window" and want_pet["method"] == "range"
    for got, want in ((ct_rec, want_ct), (pet_rec, want_pet)):
        assert set(want) <= set(got)
        for k, value in want.items():
            assert got[k] == (pytest.approx(value, abs=1e-9) if isinstance(value, float) else value), k
    assert res.steps[3]["name"] == "normalise" and res.steps[3]["params"] == {
        "method": "auto", "ct_window": [400.0, 1800.0], "suv_range": [1.0, 6.0]}
    assert "normalisation_unused" not in res.provenance
    # Only a CT: the SUV range applies to no input, and the provenance says so.
    res = pipeline.fuse_files(SAMPLES / "ct", SAMPLES / "mr_t1.nii.gz", None, method="max", suv_range=(0, 4))
    assert res.provenance["normalisation_unused"] == ["suv_range"]


@pytest.mark.parametrize("options, words", [
    ({"ct_window": (40, 0)}, "ct_window: the width must be above 0 HU, got 0"),
    ({"suv_range": (5, 2)}, "suv_range: low must be below high, got 5 and 2"),
    ({"ct_window": "40 400"}, "ct_window must be a pair of finite numbers"),
    ({"suv_range": (0, float("inf"))}, "suv_range must be a pair of finite numbers"),
    ({"suv_range": (0, 5), "normalise": "percentile"}, "and method is 'percentile'"),
])
def test_the_pipeline_refuses_a_bad_window_or_range_when_built(options, words):
    from medfuse.errors import InvalidInputError
    from medfuse.pipeline import Pipeline, pipeline_parameters

    with pytest.raises(InvalidInputError, match=words.replace("(", r"\(")):
        Pipeline(**options)
    with pytest.raises(InvalidInputError, match=words.replace("(", r"\(")):
        pipeline_parameters(**options)


def test_fuse_of_two_pets_notes_why_their_suvs_do_not_compare(followup, tmp_path, capsys):
    from medfuse.timepoints import comparability

    want = comparability(medfuse.load(PET), medfuse.load(followup))
    assert len(want) == 2
    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(PET), str(followup), "-o", str(out), "--method", "mean", "--no-progress"]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  note: ")]
    assert notes == [f"  note: {n}" for n in want]
    assert json.loads(out.with_name("fused.json").read_text())["comparability"] == want
    assert main(["fuse", str(PET), str(followup), "-o", str(out), "--method", "mean", "--overwrite", "--json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == want
    # A PET with an MR: nothing to compare.
    assert main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(PET), "-o", str(out), "--method", "mean",
                 "--overwrite", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []
    assert "comparability" not in json.loads(out.with_name("fused.json").read_text())


# ----------------------------------------------------------------------------- resample --inverse
def test_resample_inverse_puts_the_image_back_on_its_own_grid(tmp_path, capsys):
    """PET -> MR grid through pet_to_mr.tfm, then back with --inverse.

    Nearest neighbour: exact wherever the MR grid covered the PET voxel. A PET voxel centre comes back to the MR
    voxel nearest its image (within half a 1 mm voxel's diagonal, 0.87 mm), whose value is that of the PET voxel
    nearest to where that lands: within 0.87 mm of the centre, less than half the 3 mm PET voxel, so itself.
    Linear: two interpolations average neighbours, so values are bounded by the 3x3x3 neighbourhood's range (each
    sample lies within 1.73 mm of the centre, inside the cells around it), and total uptake is kept.
    """
    tfm, pet = SAMPLES / "pet_to_mr.tfm", medfuse.load(PET)
    mr = medfuse.load(SAMPLES / "mr_t1.nii.gz")
    # PET voxels whose pre-image lies inside the MR grid, one MR voxel in from its edge.
    ijk = np.indices(pet.shape).reshape(3, -1).T.astype(float)
    world = ijk @ pet.affine[:3, :3].T + pet.affine[:3, 3]
    on_mr = medfuse.load_transform(tfm).inverse().transform_points(world)
    mr_ijk = (on_mr - mr.affine[:3, 3]) @ np.linalg.inv(mr.affine[:3, :3]).T
    covered = np.all((mr_ijk >= 1) & (mr_ijk <= np.array(mr.shape) - 2), axis=1).reshape(pet.shape)
    assert covered.mean() > 0.3 and (pet.array[covered] > 0).mean() > 0.5

    for how in ("nearest", "linear"):
        there, back = tmp_path / f"on_mr_{how}.nii.gz", tmp_path / f"back_{how}.nii.gz"
        assert main(["resample", str(SAMPLES / "mr_t1.nii.gz"), str(PET), "--transform", str(tfm),
                     "--interpolation", how, "-o", str(there)]) == 0
        assert main(["resample", str(PET), str(there), "--transform", str(tfm), "--inverse", "--interpolation",
                     how, "-o", str(back)]) == 0
        assert "through the inverse of 1 transform" in capsys.readouterr().out
        got = medfuse.load(back)
        assert got.same_grid(pet) and got.unit == pet.unit
        np.testing.assert_allclose(got.affine, pet.affine, atol=1e-6)
        a, b = pet.array[covered], got.array[covered]
        if how == "nearest":
            np.testing.assert_array_equal(b, a)
        else:
            from scipy import ndimage

            lo = ndimage.minimum_filter(pet.array, size=3)[covered]
            hi = ndimage.maximum_filter(pet.array, size=3)[covered]
            assert np.all(b >= lo - 1e-4) and np.all(b <= hi + 1e-4)
            assert float(b.sum()) == pytest.approx(float(a.sum()), rel=0.01)
            assert float(np.abs(b - a).max()) > 0  # not the nearest run again
        assert json.loads(back.with_name(f"back_{how}.json").read_text())["parameters"]["inverse"] is True


def test_resample_inverse_refuses_a_deformable_transform_and_no_transform(tmp_path, capsys):
    import SimpleITK as sitk

    bspline = sitk.BSplineTransformInitializer(sitk.Image([8, 8, 8], sitk.sitkFloat32), [2, 2, 2])
    tfm = tmp_path / "warp.tfm"
    sitk.WriteTransform(bspline, str(tfm))
    out = tmp_path / "x.nii.gz"
    assert main(["resample", str(PET), str(PET), "--transform", str(tfm), "--inverse", "-o", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--inverse: this transform is deformable" in err and "no closed-form inverse" in err
    assert "warp.tfm" in err and "Traceback" not in err
    assert main(["resample", str(PET), str(PET), "--inverse", "-o", str(out)]) == EXIT_USAGE
    assert "--inverse inverts the --transform files, and none was given" in capsys.readouterr().err
    assert not out.exists()


def test_a_fuse_sidecar_keeps_the_tracer_and_uptake_but_not_the_dose(tmp_path):
    """With the SUV factor (weight / decayed dose) and the uptake time, the injected dose gives the patient's weight
    back exactly: the sidecar, which travels with de-identified outputs, keeps the rest of the facts only."""
    out = tmp_path / "fused.nii.gz"
    medfuse.fuse_files(str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), str(out), register=None,
                       method="mean")
    side = json.loads(out.with_name("fused.json").read_text())
    pet = [i for i in side["inputs"] if i.get("modality") == "PT"][0]
    facts = pet["pet_acquisition"]
    assert pet["suv_factor"] > 0 and "injected_mbq" not in facts
    assert facts["tracer"] == "Fluorodeoxyglucose" and facts["uptake_min"] == pytest.approx(60.0)
