"""``medfuse measure`` (the value at a point, statistics within a mask) and ``--json`` on register, fuse and resample.

Found by a blind researcher who scripts the command line with a screen reader, and a PET reader: no command
reported a value at a point or in a region (only napari's cursor readout did), ``--json`` existed on ``info``
alone, and ``fuse --help`` listed gff, wavelet, laplacian without saying what they are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.cli import EXIT_OK, EXIT_USAGE, main
from medfuse.volume import Volume, affine_from_geometry
from tests.conftest import SAMPLES


def _oblique_file(folder: Path) -> Path:
    """A PET-like NIfTI on a grid turned 0.3 rad about z with its j axis flipped."""
    c, s = math.cos(0.3), math.sin(0.3)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])
    arr = np.random.default_rng(0).random((10, 12, 14)).astype(np.float32) * 10
    v = Volume(arr, affine_from_geometry((2.0, 3.0, 4.0), (10.0, -20.0, 30.0), direction), modality="PT",
               unit="SUVbw")
    return medfuse.save(v, folder / "pet.nii.gz")


def _json(capsys) -> dict:
    out, err = capsys.readouterr()
    return json.loads(out), err  # one JSON object and nothing else: json.loads refuses trailing text


# ----------------------------------------------------------------------------- measure
def test_measure_reads_the_voxel_at_world_ras_and_voxel_points(tmp_path, capsys):
    path = _oblique_file(tmp_path)
    v = medfuse.load(path)
    ijk = (3, 7, 9)
    lps = v.affine[:3, :3] @ ijk + v.affine[:3, 3]  # the voxel centre, from the affine itself
    ras = lps * [-1, -1, 1]
    assert main(["measure", str(path), "--at", *map(str, lps), "--json"]) == EXIT_OK
    rec, _ = _json(capsys)
    assert rec["unit"] == "SUVbw" and rec["modality"] == "PT"
    assert rec["points"][0]["value"] == pytest.approx(float(v.array[ijk])) and rec["points"][0]["voxel"] == list(ijk)
    assert main(["measure", str(path), "--at", *map(str, ras), "--ras", "--at", "3", "7", "9", "--voxel"]) \
        == EXIT_USAGE  # --ras and --voxel say how every --at is read: one or the other
    capsys.readouterr()
    for argv in (["--at", *map(str, ras), "--ras"], ["--at", "3.4", "6.6", "9.2", "--voxel"]):
        assert main(["measure", str(path), *argv]) == EXIT_OK
        out = capsys.readouterr().out
        line = next(ln for ln in out.splitlines() if ln.startswith("value "))
        # The figure, its unit, and what was read, on one line that reads aloud on its own.
        assert line.startswith(f"value {float(v.array[ijk]):.6g} SUVbw at ") and "(nearest voxel)" in line, out
        assert "; read from voxel i 3, j 7, k 9" in line


def test_several_points_and_linear_interpolation(tmp_path, capsys):
    path = _oblique_file(tmp_path)
    v = medfuse.load(path)
    argv = ["measure", str(path), "--voxel", "--at", "0", "0", "0", "--at", "2.5", "3", "4", "--interpolation",
            "linear", "--json"]
    assert main(argv) == EXIT_OK
    rec, _ = _json(capsys)
    assert [p["at"] for p in rec["points"]] == [[0, 0, 0], [2.5, 3, 4]]
    assert rec["points"][0]["value"] == pytest.approx(float(v.array[0, 0, 0]))
    assert rec["points"][1]["value"] == pytest.approx(float(v.array[2:4, 3, 4].mean()), rel=1e-6)
    np.testing.assert_allclose(rec["points"][1]["lps_mm"], v.affine[:3, :3] @ [2.5, 3, 4] + v.affine[:3, 3],
                               atol=1e-3)


def test_measure_mask_statistics_equal_numpy(tmp_path, capsys):
    path = _oblique_file(tmp_path)
    v = medfuse.load(path)
    m = np.zeros(v.shape, np.uint8)
    m[2:7, 3:9, 4:12] = 1
    mask = medfuse.save(v.with_array(m, modality="unknown", unit="arbitrary"), tmp_path / "roi.nii.gz")
    assert main(["measure", str(path), "--mask", str(mask), "--json"]) == EXIT_OK
    rec, _ = _json(capsys)
    sel = v.array[m > 0].astype(np.float64)
    st = rec["mask"]
    assert st["count"] == sel.size and st["volume_ml"] == pytest.approx(sel.size * 24 / 1000)
    assert st["mean"] == pytest.approx(sel.mean()) and st["sd"] == pytest.approx(sel.std())
    assert st["min"] == pytest.approx(sel.min()) and st["max"] == pytest.approx(sel.max())
    assert st["unit"] == "SUVbw" and st["mask_resampled"] is False and rec["points"] == []
    assert main(["measure", str(path), "--mask", str(mask), "-q"]) == EXIT_OK  # the figures are the output
    out = capsys.readouterr().out
    assert f"  mean {sel.mean():.6g} SUVbw" in out and f"  voxels {sel.size}" in out and "  volume " in out
    # The hottest 1 mL sphere, where it is and how much of a mL this grid's voxels make of it.
    peak = next(ln for ln in out.splitlines() if ln.startswith("  peak "))
    assert peak.startswith(f"  peak {st['peak']:.6g} SUVbw (hottest 1 mL sphere, {st['peak_ml']:.3g} mL of voxels")
    assert peak.endswith(f"centred at x {st['peak_at_lps_mm'][0]:.6g}, y {st['peak_at_lps_mm'][1]:.6g}, "
                         f"z {st['peak_at_lps_mm'][2]:.6g} mm LPS)")


def test_measure_a_dicom_folder(capsys):
    """The bundled PET is a DICOM series in SUVbw: read as fuse and register read it."""
    pet = SAMPLES / "pet"
    if not pet.is_dir():
        pytest.skip("the bundled sample_volumes/pet is not in this checkout")
    v = medfuse.load(pet)
    assert main(["measure", str(pet), "--at", "32", "37", "32", "--voxel", "--json"]) == EXIT_OK
    rec, _ = _json(capsys)
    assert rec["unit"] == "SUVbw" and rec["points"][0]["value"] == pytest.approx(float(v.array[32, 37, 32]))


def test_measure_outside_the_field_says_its_extent_and_json_says_the_error(tmp_path, capsys):
    path = _oblique_file(tmp_path)
    lo, hi = medfuse.load(path).bounds(edges=True)
    assert main(["measure", str(path), "--at", "500", "0", "0"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "outside the image" in err and f"x {lo[0]:.1f}..{hi[0]:.1f}" in err and "Fix:" in err
    assert main(["measure", str(path), "--at", "500", "0", "0", "--json"]) == EXIT_USAGE
    rec, err = _json(capsys)
    assert rec["command"] == "measure" and "outside the image" in rec["error"] and "outside the image" in err


def test_measure_needs_something_to_measure(tmp_path, capsys):
    path = _oblique_file(tmp_path)
    assert main(["measure", str(path)]) == EXIT_USAGE
    assert "--at X Y Z" in capsys.readouterr().err
    assert main(["measure", str(path), "--at", "0", "0", "0", "--voxel", "--label", "2"]) == EXIT_USAGE
    assert "--label picks a label of the --mask" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --json on register, fuse, resample
def _blobs(folder: Path):
    """Two 20^3 NIfTI blobs, 2 mm voxels, the second 2 mm further along x and 2 mm back along y."""
    import nibabel as nib

    x, y, z = np.mgrid[:20, :20, :20]
    paths = []
    for name, c in (("a", (10, 10, 10)), ("b", (11, 9, 10))):
        blob = 100 * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 / 2 + (z - c[2]) ** 2 / 3) / 20.0)
        nib.save(nib.Nifti1Image(blob.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(folder / f"{name}.nii.gz"))
        paths.append(folder / f"{name}.nii.gz")
    return paths


def test_register_json_holds_the_sidecar_figures(tmp_path, capsys):
    a, b = _blobs(tmp_path)
    out = tmp_path / "r.nii.gz"
    argv = ["register", str(a), str(b), "-o", str(out), "--initialise", "none", "--threads", "1", "--json",
            "--no-progress"]
    assert main(argv) == EXIT_OK
    rec, err = _json(capsys)
    side = json.loads((tmp_path / "r.json").read_text())
    assert rec["command"] == "register"
    assert rec["outputs"] == {"image": str(out), "transform": str(tmp_path / "r.tfm"), "sidecar": str(tmp_path / "r.json")}
    assert all(Path(p).is_file() for p in rec["outputs"].values())
    assert rec["registration"] == side["registration"][0]  # every figure, the notes list included
    assert isinstance(rec["registration"]["notes"], list)
    assert rec["seconds"] == side["steps"][0]["seconds"] and isinstance(rec["warnings"], list)
    assert rec["registration"]["translation_mm"] == pytest.approx(2 * math.sqrt(2), abs=0.3)  # the known shift
    assert "registered (rigid)" in err and "wrote " in err  # the lines a person reads: on stderr
    # A failure is one JSON object too (the output exists), and said on stderr.
    assert main(argv) == EXIT_USAGE
    rec, err = _json(capsys)
    assert rec["command"] == "register" and "--overwrite" in rec["error"] and "error:" in err


def test_fuse_json_holds_the_outputs_and_the_sidecar_method(tmp_path, capsys):
    a, b = _blobs(tmp_path)
    out = tmp_path / "f.nii.gz"
    assert main(["fuse", str(a), str(b), "-o", str(out), "--method", "max", "--json", "--no-progress"]) == EXIT_OK
    rec, err = _json(capsys)
    side = json.loads((tmp_path / "f.json").read_text())
    assert rec["command"] == "fuse" and rec["outputs"] == {"image": str(out), "sidecar": str(tmp_path / "f.json")}
    assert rec["method_used"] == side["method_used"] == "max" and rec["registrations"] == [None]
    assert rec["seconds"] >= 0 and "fused 2 volumes" in err and "not registered" in err


def test_resample_json(tmp_path, capsys):
    a, b = _blobs(tmp_path)
    out = tmp_path / "s.nii.gz"
    assert main(["resample", str(a), str(b), "-o", str(out), "--interpolation", "nearest", "--json", "-q"]) == EXIT_OK
    rec, err = _json(capsys)
    side = json.loads((tmp_path / "s.json").read_text())
    assert rec["outputs"]["image"] == str(out) and rec["interpolation"] == "nearest" and rec["transforms"] == []
    assert rec["seconds"] == side["steps"][0]["seconds"] and err == ""  # -q: nothing for a person to read


# ----------------------------------------------------------------------------- fuse --help
def test_fuse_help_says_what_each_method_is(capsys):
    from medfuse.cli import _METHODS

    assert main(["fuse", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    block = out[out.index("methods (--method):"):].splitlines()[1:len(_METHODS) + 1]
    assert [ln.split()[0] for ln in block] == list(_METHODS)
    assert all(len(ln.split()) > 3 and len(ln) <= 80 for ln in block), block  # a description each, on one line
    assert "guided-filter" in out and "Laplacian pyramid" in out and "wavelet transform" in out


def test_measure_blanks_a_dicom_folder_named_after_the_patient(tmp_path):
    """Its lines and its JSON quote the input's path, as every command's messages do: blanked alike."""
    pytest.importorskip("pydicom")
    from tests.test_privacy import _cli, leaks, phi_series

    ct = phi_series(tmp_path / "DOE^JANE_MRN123456_ct", modality="CT")
    patient = ("Doe", "Jane", "MRN123456")
    v = medfuse.load(ct)
    for extra in ([], ["--json"]):
        rc, text = _cli(["measure", ct, "--at", "4", "5", "3", "--voxel", *extra])
        assert rc == EXIT_OK and leaks(text, patient) == [] and "[removed]" in text, text
        assert f"{float(v.array[4, 5, 3]):.6g}" in text
    rc, text = _cli(["measure", ct, "--at", "40", "5", "3", "--voxel", "--json"])
    assert rc == EXIT_USAGE and leaks(text, patient) == [] and '"error"' in text, text


def test_measure_modalities_give_a_plain_nifti_ct_its_hounsfield_units(tmp_path, capsys):
    import nibabel as nib

    arr = np.full((8, 8, 8), -1000.0, np.float32)
    arr[2:6, 2:6, 2:6] = 40.0
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    assert main(["measure", str(path), "--at", "3", "3", "3", "--voxel", "--json"]) == EXIT_OK
    assert _json(capsys)[0]["unit"] == "arbitrary"  # a plain NIfTI records no modality
    assert main(["measure", str(path), "--at", "3", "3", "3", "--voxel", "--modalities", "CT"]) == EXIT_OK
    assert "value 40 HU at voxel i 3, j 3, k 3" in capsys.readouterr().out
    assert main(["measure", str(path), "--at", "3", "3", "3", "--modalities", "CT", "PT"]) == EXIT_USAGE
    assert "--modalities names 2 modalities for 1 input: IMAGE (no --mask was given)" in capsys.readouterr().err


def test_measure_carries_a_mask_of_another_session_through_its_transform(tmp_path, capsys):
    """A baseline lesion mask measured on the follow-up: by the scanners' placement it reads other voxels (an
    oncology probe's SUVmax 9.85 for a true 14.55); through the transform register writes, the lesion's own."""
    rng = np.random.default_rng(3)
    g = np.mgrid[:24, :26, :20].astype(np.float32)
    lesion = 12 * np.exp(-((g[0] - 9) ** 2 + (g[1] - 15) ** 2 + (g[2] - 8) ** 2) / 6)
    arr = (lesion + rng.random(g.shape[1:]) + 1).astype(np.float32)
    base = Volume(arr, affine_from_geometry((2.0, 2.0, 3.0), (-20.0, -30.0, 10.0), np.eye(3)), modality="PT",
                  unit="SUVbw")
    # The follow-up: the same voxels, the patient turned 0.2 rad about z and moved (world = R @ baseline world).
    c, s = math.cos(0.2), math.sin(0.2)
    R = np.array([[c, -s, 0, 12.0], [s, c, 0, -7.0], [0, 0, 1, 9.0], [0, 0, 0, 1]])
    follow = Volume(arr, R @ base.affine, modality="PT", unit="SUVbw")
    mask = Volume((lesion > 6).astype(np.uint8), base.affine)
    paths = [medfuse.save(v, tmp_path / n) for v, n in ((follow, "fu.nii.gz"), (mask, "mask.nii.gz"))]
    # Follow-up points to baseline points, as `medfuse register FOLLOW-UP BASELINE` writes it.
    tfm = medfuse.Transform.from_matrix(np.linalg.inv(R)).save(tmp_path / "fu_to_bl.tfm")
    truth = medfuse.mask_statistics(base, mask)
    assert main(["measure", str(paths[0]), "--mask", str(paths[1]), "--transform", str(tfm), "--json"]) == EXIT_OK
    rec, _ = _json(capsys)
    for key in ("count", "mean", "max", "peak"):
        assert rec["mask"][key] == pytest.approx(truth[key], rel=1e-6), key
    assert rec["mask"]["mask_resampled"] is True
    assert main(["measure", str(paths[0]), "--mask", str(paths[1]), "--json"]) == EXIT_OK
    placed, _ = _json(capsys)
    assert placed["mask"]["max"] < 0.8 * truth["max"]  # the wrong voxels, as the probe found
    assert main(["measure", str(paths[0]), "--at", "0", "0", "0", "--transform", str(tfm)]) == EXIT_USAGE
    assert "--transform carries the --mask" in capsys.readouterr().err
