"""``--volume N|sum|mean`` on info, register, resample, fuse and measure; the 4-D refusal naming it; ``info``'s
volumes line, projection listing and short uptake times. Inputs are synthetic DICOM written per test."""

from __future__ import annotations

import json

import numpy as np

import medfuse
from medfuse.cli import EXIT_OK, EXIT_USAGE, _tracer_text, build_parser, main
from tests.io.test_dicom_gates import NZ, nm_file, pet_series


def _gated(tmp_path):
    return nm_file(tmp_path / "gated.dcm")  # 4 gates, gate g holding 100 + 10 g counts


def test_a_4d_input_refused_names_the_option(tmp_path, capsys):
    ref = tmp_path / "ref.nii.gz"
    gated = _gated(tmp_path)
    medfuse.save(medfuse.load(gated, volume_index=0), ref)
    assert main(["fuse", str(ref), str(gated), "-o", str(tmp_path / "f.nii.gz"), "--method", "max", "-q"]) \
        == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--volume N" in err and "--volume sum" in err and "--volume mean" in err
    assert "0 gate 1/4" in err  # what each volume is, by index


def test_info_volume_sum_and_labels(tmp_path, capsys):
    gated = _gated(tmp_path)
    assert main(["info", str(gated), "--volume", "sum", "--json"]) == EXIT_OK
    facts = json.loads(capsys.readouterr().out)
    assert facts["volumes"] == ["gate 1/4", "gate 2/4", "gate 3/4", "gate 4/4"]
    assert facts["volume_shown"] == "their sum"
    assert facts["max"] == 100 + 110 + 120 + 130
    assert main(["info", str(gated)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "volumes      4 (4-D: gate 1/4 .. gate 4/4;" in out and "volume 0 (the first)" in out


def test_resample_and_measure_take_the_volume_asked(tmp_path, capsys):
    gated = _gated(tmp_path)
    ref = tmp_path / "ref.nii.gz"
    medfuse.save(medfuse.load(gated, volume_index=0), ref)
    out = tmp_path / "sum_on_ref.nii.gz"
    assert main(["resample", str(ref), str(gated), "-o", str(out), "--volume", "sum", "-q"]) == EXIT_OK
    assert np.allclose(medfuse.load(out).array, 460.0)  # the sum of the 4 gates, on the same grid
    # 3-D inputs ignore it: the reference above is 3-D and --volume 2 picks gate 3 of the 4-D input.
    out2 = tmp_path / "g3.nii.gz"
    assert main(["resample", str(ref), str(gated), "-o", str(out2), "--volume", "2", "-q"]) == EXIT_OK
    assert np.allclose(medfuse.load(out2).array, 120.0)
    assert main(["measure", str(gated), "--at", "1", "1", str(NZ // 2), "--voxel", "--volume", "-1",
                 "--json"]) == EXIT_OK
    assert "130" in capsys.readouterr().out


def test_refused_combination_in_command_line_words(tmp_path, capsys):
    dual = nm_file(tmp_path / "dual.dcm", itype="RECON TOMO", windows=["Tl201", "Tc99m"])
    assert main(["info", str(dual), "--volume", "sum"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Tl201" in err and "Tc99m" in err and "--volume N" in err and "volume_index" not in err
    assert main(["info", str(dual), "--volume", "5"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--volume 5 is out of range" in err and "volume_index" not in err


def test_volume_option_values(capsys):
    parser = build_parser()
    for cmd in ("info", "register", "resample", "fuse", "measure"):
        action = next(a for a in parser._subparsers._group_actions[0].choices[cmd]._actions
                      if "--volume" in a.option_strings)
        assert "3-D inputs ignore it" in action.help
    assert main(["info", "x", "--volume", "median"]) == EXIT_USAGE
    assert "sum or mean" in capsys.readouterr().err


def test_gated_pet_mean_in_info(tmp_path, capsys):
    folder = pet_series(tmp_path / "gated", instance="reversed")
    assert main(["info", str(folder), "--volume", "mean", "--suv", "none", "--json"]) == EXIT_OK
    facts = json.loads(capsys.readouterr().out)
    assert facts["min"] == facts["max"] == 21500.0  # (20000 + 21000 + 22000 + 23000) / 4 Bq/mL
    assert facts["volumes"][0] == "gate 1/4 (trigger 0 ms)"


def test_projection_file_listed_as_projections(tmp_path, capsys):
    folder = tmp_path / "nm"
    folder.mkdir()
    nm_file(folder / "proj.dcm", itype="GATED TOMO")
    nm_file(folder / "gated.dcm")
    assert main(["info", str(folder)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "gated projections (GATED TOMO, not reconstructed)" in out
    assert "x0 " not in out and " 0 vol" not in out
    assert main(["info", str(folder), "--json"]) == EXIT_OK  # the JSON listing says it too
    rows = json.loads(capsys.readouterr().out)["series"]
    assert [r.get("not_volume") for r in rows].count("gated projections (GATED TOMO, not reconstructed)") == 1


def test_short_uptake_times_keep_their_seconds():
    assert "uptake 1.5 min (90 s)" in _tracer_text({"uptake_min": 1.5})
    assert "uptake 62 min" in _tracer_text({"uptake_min": 62.4})
