"""`--weight-kg`, `--height-m`, `--sex` (info, register, resample, fuse, measure) and `fuse_files(body=)`: a DICOM
PET's body in place of its header's, for SUV.

Reference: the bundled sample PET's own DICOM header (PatientWeight, read here with pydicom). SUVbw is body weight /
decayed dose, so a weight W given in place of the header's scales the SUV factor, and every SUV, by exactly
W / PatientWeight.
"""

from __future__ import annotations

import json

import pydicom
import pytest

import medfuse
from medfuse.cli import EXIT_USAGE, build_parser, main
from medfuse.errors import InvalidInputError

from tests.conftest import SAMPLES

PET = SAMPLES / "pet"
CT = SAMPLES / "ct"
WEIGHT = 61.25  # kg: a value that appears nowhere else in a record, to show the records leave it out


def _header_weight() -> float:
    return float(pydicom.dcmread(sorted(PET.iterdir())[0], stop_before_pixels=True).PatientWeight)


def _info(capsys, *options: str) -> dict:
    assert main(["info", str(PET), "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_scales_the_suvbw_factor_by_the_weight_given_over_the_headers(capsys):
    plain = _info(capsys)
    given = _info(capsys, "--weight-kg", str(WEIGHT))
    assert plain["unit"] == given["unit"] == "SUVbw"
    assert given["suv_factor"] / plain["suv_factor"] == pytest.approx(WEIGHT / _header_weight(), rel=1e-9)
    assert given["max"] / plain["max"] == pytest.approx(WEIGHT / _header_weight(), rel=1e-6)
    assert given["body"] == ["weight_kg"] and "body" not in plain
    assert "in place of the header's PatientWeight" in given["suv_factor_source"]
    # The sex alone (a partial body) is taken and leaves body-weight SUV as it was.
    sex = _info(capsys, "--sex", "f")
    assert sex["suv_factor"] == pytest.approx(plain["suv_factor"], rel=1e-12) and sex["body"] == ["sex"]


def test_info_text_names_the_options_not_the_python_argument(capsys):
    assert main(["info", str(PET), "--weight-kg", str(WEIGHT), "--height-m", "1.7"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("SUV factor"))
    assert "--weight-kg, --height-m given in place of the header's PatientWeight, PatientSize" in line
    assert "body=" not in line and str(WEIGHT) not in line


def test_measure_values_scale_with_the_weight_given(capsys):
    at = ["--at", "32", "37", "32", "--voxel", "--json"]
    assert main(["measure", str(PET), *at]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["measure", str(PET), *at, "--weight-kg", str(WEIGHT)]) == 0
    given = json.loads(capsys.readouterr().out)
    ratio = WEIGHT / _header_weight()
    assert plain["points"][0]["value"] > 0
    assert given["points"][0]["value"] / plain["points"][0]["value"] == pytest.approx(ratio, rel=1e-6)
    assert given["suv_factor"] / plain["suv_factor"] == pytest.approx(ratio, rel=1e-9)
    assert given["body"] == ["weight_kg"] and given["warnings"] == []


@pytest.mark.parametrize("option, value, words", [
    ("--weight-kg", "3000", "--weight-kg is outside the plausible 0.01-650 kg"),
    ("--weight-kg", "0", "--weight-kg is outside the plausible"),
    ("--weight-kg", "-4", "--weight-kg is outside the plausible"),
    ("--weight-kg", "nan", "--weight-kg must be a finite number"),
    ("--height-m", "170", "--height-m is outside the plausible 0.2-2.75 m (centimetres?"),
])
def test_an_implausible_value_is_a_usage_error_naming_the_option(capsys, tmp_path, option, value, words):
    assert main(["info", str(PET), option, value]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert words in err and "body[" not in err and "Traceback" not in err
    # fuse refuses it before any work: nothing written.
    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(CT), str(PET), "-o", str(out), "--method", "mean", option, value]) == EXIT_USAGE
    assert words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_sex_other_than_m_or_f_is_refused_by_the_parser(capsys):
    assert main(["info", str(PET), "--sex", "X"]) == EXIT_USAGE
    assert "--sex: invalid choice 'X'" in capsys.readouterr().err


def test_fuse_gives_the_body_to_the_pet_only_and_records_which_fields_not_values(capsys, tmp_path):
    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(CT), str(PET), "-o", str(out), "--method", "mean", "--weight-kg", str(WEIGHT),
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert "not used" not in captured.err  # the CT beside the PET: no warning that the body did not apply to it
    text = (tmp_path / "fused.json").read_text()
    side = json.loads(text)
    assert side["parameters"]["load"]["body"] == ["weight_kg"]
    ct, pet = side["inputs"]
    assert not any("body" in str(w) for w in side.get("warnings", []))
    assert "suv_factor" not in ct and pet["suv_factor"] == pytest.approx(
        medfuse.load(PET, suv="bw").provenance["suv_factor"] * WEIGHT / _header_weight(), rel=1e-9)
    assert str(WEIGHT) not in text and str(WEIGHT) not in captured.out + captured.err


def test_options_for_no_dicom_pet_are_said_once(capsys):
    assert main(["measure", str(CT), "--at", "1", "1", "1", "--voxel", "--weight-kg", str(WEIGHT)]) == 0
    err = capsys.readouterr().err
    assert err.count("--weight-kg, --height-m and --sex were not used") == 1 and "body=" not in err


def test_fuse_files_body_reaches_the_pet_load_and_not_the_ct():
    res = medfuse.fuse_files(CT, PET, None, method="mean", body={"weight_kg": WEIGHT})
    ct, pet = res.provenance["inputs"]
    plain = medfuse.load(PET, suv="bw").provenance["suv_factor"]
    assert pet["suv_factor"] / plain == pytest.approx(WEIGHT / _header_weight(), rel=1e-9)
    assert "PatientWeight" in pet["suv_source"] and "suv_source" not in ct
    assert res.provenance["parameters"]["load"]["body"] == ["weight_kg"]
    assert res.fused.shape == medfuse.load(CT).shape  # on the fixed CT's grid


def test_fuse_files_refuses_a_bad_body_before_any_work(tmp_path):
    with pytest.raises(InvalidInputError, match=r"body\['weight_kg'\] is outside"):
        medfuse.fuse_files(CT, PET, tmp_path / "f.nii.gz", method="mean", body={"weight_kg": 3000})
    assert list(tmp_path.iterdir()) == []


def test_batch_has_no_body_options():
    """One body for a whole cohort would be wrong: batch reads each subject's from its PET headers."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    options = {o for a in sub.choices["batch"]._actions for o in a.option_strings}
    assert "--suv" in options and not {"--weight-kg", "--height-m", "--sex"} & options
    for command in ("info", "register", "resample", "fuse", "measure"):
        names = {o for a in sub.choices[command]._actions for o in a.option_strings}
        assert {"--weight-kg", "--height-m", "--sex"} <= names, command


def test_one_body_is_refused_for_two_dicom_pets(tmp_path, capsys):
    """A baseline and a follow-up each have their own weight: one --weight-kg for both would replace the follow-up's
    header weight silently (the review found it) and be written into its DICOM output."""
    out = tmp_path / "pet_on_pet.nii.gz"
    assert main(["register", str(SAMPLES / "pet"), str(SAMPLES / "pet"), "-o", str(out), "--weight-kg", "60"]) \
        == EXIT_USAGE
    err = capsys.readouterr().err
    assert "one body (weight, height, sex) was given for 2 DICOM PETs" in err and "with one PET input only" in err
    assert "body=" not in err and not out.exists()
    import medfuse.pipeline as pipeline

    with pytest.raises(InvalidInputError, match="was given for 2 DICOM PETs"):
        pipeline.fuse_files(SAMPLES / "pet", SAMPLES / "pet", tmp_path / "f.nii.gz", method="mean",
                            body={"weight_kg": 60.0})
    assert not (tmp_path / "f.nii.gz").exists()
