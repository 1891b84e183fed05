"""Modality and unit of NIfTI files that medfuse did not write: a dcm2niix BIDS sidecar, or ``modality="CT"``.

A CT converted by dcm2niix (in HU, with ``"Modality": "CT"`` in its .json) loaded as unknown/arbitrary: resampling
then filled outside it with 0 (water, not air), registration picked the generic preset, and ``medfuse register``
had no way to say what it was.
"""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest

import medfuse
from medfuse.cli import main
from medfuse.errors import MedfuseWarning


@pytest.fixture(scope="module")
def ct_nifti(tmp_path_factory, samples_dir):
    """The sample CT series written by plain nibabel (no medfuse tag), as a converter would, and the sample MR."""
    ct = medfuse.load(samples_dir / "ct")
    assert ct.unit == "HU" and float(ct.array.min()) < -900
    d = tmp_path_factory.mktemp("ctnii")
    nib.save(nib.Nifti1Image(ct.array.astype(np.int16), ct.affine_ras), d / "ct.nii.gz")
    return d / "ct.nii.gz", ct


def test_untagged_ct_is_unknown_without_a_sidecar(ct_nifti):
    v = medfuse.load(ct_nifti[0])
    assert (v.modality, v.unit) == ("unknown", "arbitrary") and "labels_from" not in v.provenance


def test_bids_sidecar_names_a_ct_in_hu(ct_nifti, tmp_path, samples_dir):
    src, ct = ct_nifti
    nii = tmp_path / "sub-01_ct.nii.gz"
    nii.write_bytes(src.read_bytes())
    (tmp_path / "sub-01_ct.json").write_text(json.dumps({"Modality": "CT", "ConversionSoftware": "dcm2niix"}))
    v = medfuse.load(nii)
    assert (v.modality, v.unit, v.provenance["labels_from"]) == ("CT", "HU", "BIDS sidecar")
    np.testing.assert_array_equal(v.array, ct.array)
    # Outside its field of view the resampled CT is air, as the DICOM original's is.
    mr = medfuse.load(samples_dir / "mr_t1.nii.gz")
    shifted = medfuse.Volume(mr.array, mr.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -40.0],
                                                             [0, 0, 0, 1]]))
    out = medfuse.resample(v, shifted)
    assert out.array.min() == pytest.approx(medfuse.resample(ct, shifted).array.min()) and out.array.min() <= -1000


@pytest.mark.parametrize("meta, want", [
    ({"Modality": "PT", "Units": "BQML"}, ("PT", "Bq/mL")),
    ({"Modality": "PT", "Units": "GML"}, ("PT", "SUVbw")),
    ({"Modality": "PT"}, ("PT", "arbitrary")),
    ({"Modality": "MR"}, ("MR", "arbitrary")),
    ({"Modality": "US"}, ("unknown", "arbitrary")),           # not a modality medfuse fuses: ignored
    ({"modality": "CT"}, ("unknown", "arbitrary")),           # not BIDS's key
    (["CT"], ("unknown", "arbitrary")),
    ("{not json", ("unknown", "arbitrary")),                  # a broken sidecar is ignored; the image still loads
])
def test_bids_sidecar_values(ct_nifti, tmp_path, meta, want):
    nii = tmp_path / "x.nii.gz"
    nii.write_bytes(ct_nifti[0].read_bytes())
    (tmp_path / "x.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    v = medfuse.load(nii)
    assert (v.modality, v.unit) == want


def test_medfuse_own_tag_wins_over_a_json_beside_it(tmp_path, samples_dir):
    """A fused output's own sidecar (fused.json) is provenance, not BIDS; the tag in the file decides."""
    pet = medfuse.load(samples_dir / "pet")
    medfuse.save(pet, tmp_path / "pet.nii.gz")
    (tmp_path / "pet.json").write_text(json.dumps({"Modality": "CT"}))
    v = medfuse.load(tmp_path / "pet.nii.gz")
    assert (v.modality, v.unit) == ("PT", pet.unit)


def test_modality_ct_argument_means_hu_only_with_negative_values(ct_nifti, tmp_path):
    assert medfuse.load(ct_nifti[0], modality="CT").unit == "HU"
    assert medfuse.load(ct_nifti[0], modality="CT", unit="arbitrary").unit == "arbitrary"  # the argument wins
    raw = tmp_path / "raw.nii.gz"  # stored values without the rescale (0..4095): not HU
    nib.save(nib.Nifti1Image((ct_nifti[1].array + 1024).astype(np.uint16), ct_nifti[1].affine_ras), raw)
    with pytest.warns(MedfuseWarning, match="unit='HU'"):
        assert medfuse.load(raw, modality="CT").unit == "arbitrary"


def test_cli_register_takes_modalities(ct_nifti, tmp_path, samples_dir, capsys):
    out = tmp_path / "ct_on_mr.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["register", str(samples_dir / "mr_t1.nii.gz"), str(ct_nifti[0]), "-o", str(out),
                     "--modalities", "MR", "CT", "--no-progress", "-q"])
    assert code == 0, capsys.readouterr().err
    v = medfuse.load(out)
    assert (v.modality, v.unit) == ("CT", "HU")
    side = json.loads(out.with_name("ct_on_mr.json").read_text())
    assert "MR-CT" in json.dumps(side["registration"])
    assert main(["register", str(samples_dir / "mr_t1.nii.gz"), str(ct_nifti[0]), "-o", str(tmp_path / "b.nii.gz"),
                 "--modalities", "MR"]) == 2
    assert "--modalities names 1 modalities for 2 inputs" in capsys.readouterr().err


def test_an_inputs_bids_sidecar_is_never_replaced_by_a_provenance_sidecar(ct_nifti, tmp_path, capsys):
    """t1.nii.gz + t1.json (dcm2niix), output t1.mha: --overwrite replaced the input's sidecar with provenance."""
    nii = tmp_path / "t1.nii.gz"
    nii.write_bytes(ct_nifti[0].read_bytes())
    side = tmp_path / "t1.json"
    side.write_text(json.dumps({"Modality": "CT", "ConversionSoftware": "dcm2niix"}))
    before = side.read_bytes()
    for extra in ([], ["--overwrite"]):
        code = main(["fuse", str(nii), str(nii), "-o", str(tmp_path / "t1.mha"), "--method", "mean",
                     "--no-progress", *extra])
        assert code == 2
        err = capsys.readouterr().err
        assert "t1.json is an image's BIDS sidecar" in err and "another output name" in err
    assert side.read_bytes() == before and not (tmp_path / "t1.mha").exists()
