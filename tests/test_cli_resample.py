"""`medfuse resample`: an image put on another's grid through saved transforms, a chain of them included.

The truth is the sample volumes' own (sample_volumes/ground_truth.json: the MR->PET and MR->SPECT matrices the
phantom was made with), so a chain PET -> MR -> SPECT has a known composite.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medfuse
from medfuse.cli import EXIT_USAGE, main

SAMPLES = Path(__file__).resolve().parents[1] / "sample_volumes"
TRUTH = json.loads((SAMPLES / "ground_truth.json").read_text())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """PET -> MR and MR -> SPECT as transform files, and the composite PET -> SPECT matrix."""
    folder = tmp_path_factory.mktemp("chain")
    mr_to_pet, mr_to_spect = np.array(TRUTH["mr_to_pet"]), np.array(TRUTH["mr_to_spect"])
    first, second = folder / "pet_to_mr.tfm", folder / "mr_to_spect.tfm"
    medfuse.Transform.from_matrix(np.linalg.inv(mr_to_pet)).save(first)
    medfuse.Transform.from_matrix(mr_to_spect).save(second)
    return first, second, mr_to_spect @ np.linalg.inv(mr_to_pet)


def test_a_chain_of_transforms_is_applied_from_the_reference_on(chain, tmp_path, capsys):
    first, second, composite = chain
    out = tmp_path / "spect_on_pet.nii.gz"
    assert main(["resample", str(SAMPLES / "pet"), str(SAMPLES / "spect.nii.gz"), "--transform", str(first),
                 str(second), "-o", str(out)]) == 0
    assert "through 2 transforms" in capsys.readouterr().out
    pet, spect = medfuse.load(SAMPLES / "pet"), medfuse.load(SAMPLES / "spect.nii.gz")
    want = medfuse.resample(spect, pet, transform=medfuse.Transform.from_matrix(composite))
    got = medfuse.load(out)
    np.testing.assert_allclose(got.affine, pet.affine, atol=1e-6)  # the reference's grid, geometry and all
    np.testing.assert_allclose(got.array, want.array, atol=1e-4 * float(want.array.max()))
    # The other order is another transform: the chain's order is not a detail.
    wrong = medfuse.resample(spect, pet, transform=medfuse.Transform.from_matrix(
        np.linalg.inv(np.array(TRUTH["mr_to_pet"])) @ np.array(TRUTH["mr_to_spect"])))
    assert float(np.abs(wrong.array - want.array).max()) > 0.1 * float(want.array.max())
    record = json.loads(out.with_name("spect_on_pet.json").read_text())
    assert [t["path"] for t in record["transforms"]] == [str(first), str(second)]
    assert all(len(t["sha256"]) == 64 for t in record["transforms"])
    assert record["inputs"][0]["role"] == "reference" and record["inputs"][1]["unit"] == "counts"
    np.testing.assert_allclose(np.array(record["resample"]["transform_matrix"]), composite, atol=1e-6)


def test_nearest_keeps_a_label_maps_labels_and_linear_warns_of_them(tmp_path, capsys):
    mr = medfuse.load(SAMPLES / "mr_t1.nii.gz")
    labels = np.zeros(mr.shape, np.uint8)
    labels[40:120, 50:140, 40:120] = 1
    labels[70:90, 80:110, 70:90] = 3
    lab_path = tmp_path / "labels.nii.gz"
    medfuse.save(medfuse.Volume(labels, mr.affine), lab_path)
    out = tmp_path / "labels_on_pet.nii.gz"
    assert main(["resample", str(SAMPLES / "pet"), str(lab_path), "--transform", str(SAMPLES / "pet_to_mr.tfm"),
                 "--interpolation", "nearest", "-o", str(out), "-q"]) == 0
    got = np.asarray(nib.load(str(out)).dataobj)
    assert set(np.unique(got)) == {0, 1, 3}
    assert main(["resample", str(SAMPLES / "pet"), str(lab_path), "-o", str(tmp_path / "lin.nii.gz"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "looks like a label map" in err and "--interpolation nearest" in err and "interpolation='" not in err


def test_a_missing_transform_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "x.nii.gz"
    assert main(["resample", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "--transform",
                 str(tmp_path / "nope.tfm"), "-o", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "nope.tfm" in err and "Fix:" in err and not out.exists()


def test_the_sidecar_keeps_what_resampling_warned(tmp_path, capsys):
    """The PET put on the MR grid (linear) loses part of its maximum: said on the terminal and, as fuse's sidecar
    keeps its warnings, in the output's sidecar (it was only shown)."""
    out = tmp_path / "pet_on_mr.nii.gz"
    assert main(["resample", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "pet"), "--transform",
                 str(SAMPLES / "pet_to_mr.tfm"), "-o", str(out)]) == 0
    shown = capsys.readouterr().err
    before = float(medfuse.load(SAMPLES / "pet").array.max())
    after = float(medfuse.load(out).array.max())
    side = json.loads(out.with_name("pet_on_mr.json").read_text())
    kept = [w for w in side["warnings"] if "lowered the maximum" in w]
    assert len(kept) == 1 and f"from {before:.2f} to {after:.2f} SUVbw" in kept[0] and kept[0][:60] in shown
