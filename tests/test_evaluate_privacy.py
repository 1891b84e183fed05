"""Evaluate's metrics.json blanks a mask path named after the patient (and looks up a DICOM
mask's own identifiers), records which folder and which of its pairs were scored; ``normalise`` refuses an
empty array with a typed error; ``scrub`` finds a birth date written with slashes and an ID written with
separators inserted."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medfuse import evaluate as E
from medfuse.errors import InvalidInputError
from medfuse.fusion.normalise import normalise

pydicom = pytest.importorskip("pydicom")

from tests.test_evaluate import _write_three_types  # noqa: E402
from tests.test_privacy import _cli, _write_slice, leaks, phi_series  # noqa: E402

PATIENT = ("Doe", "Jane", "MRN123456", "123456")
OTHER = ("Smith", "John", "PIDBBB222")


def _pair_and_box(tmp_path: Path):
    """A CT and a PET series of Doe^Jane in a folder named after her, and a 0/1 box on their grid."""
    root = tmp_path / "DOE_JANE"
    ct = phi_series(root / "ct", modality="CT", description="CT")
    pt = phi_series(root / "pt", modality="PT", description="PET")
    box = np.zeros((12, 12), dtype=np.uint16)
    box[2:10, 3:9] = 1
    return root, ct, pt, box


def _dicom_mask(folder: Path, box: np.ndarray) -> Path:
    """The box as a DICOM series (8 slices on the pair's grid) whose header names another patient."""
    folder.mkdir(parents=True)
    for k in range(8):
        _write_slice(folder / f"M{k + 1:04d}.dcm", box, 2.0 * k, series_uid="1.2.999.4242.77777.8", modality="PT",
                     description="mask", number=k + 1,
                     extra={"PatientName": "Smith^John", "PatientID": "PIDBBB222", "Units": "NONE"})
    return folder


def test_mask_path_named_after_the_patient_is_blanked_in_metrics_json_and_rows(tmp_path):
    from medfuse.io import load, save

    root, ct, pt, box = _pair_and_box(tmp_path)
    ref = load(ct)
    mask = root / "mask_DOE_JANE.nii.gz"
    m = np.zeros(ref.shape, dtype=np.uint8)
    m[2:8, 3:9] = 1
    save(ref.with_array(m, unit="arbitrary"), mask)
    out = tmp_path / "out"
    rc, text = _cli(["evaluate", "--pair", ct, pt, "--methods", "mean", "--mode", "native", "--metrics", "EN,SD",
                     "--mask", mask, "--out", out, "--no-progress"])
    assert rc == 0, text
    raw = (out / "metrics.json").read_text()
    doc = json.loads(raw)
    assert doc["mask"]["kind"] == "file" and doc["mask"]["path"].endswith("mask_[removed].nii.gz")
    assert all(r["mask"] == doc["mask"] for r in doc["images"])
    assert leaks(raw, PATIENT) == [], leaks(raw, PATIENT)
    # The Python API's rows are what the JSON holds.
    res = E.evaluate([(ct, pt)], methods=["mean"], out_dir=tmp_path / "api", mode="native", metrics=["EN"],
                     mask=str(mask))
    assert res.rows and all("[removed]" in r["mask"]["path"] and leaks(r["mask"]["path"], PATIENT) == []
                            for r in res.rows)


def test_a_dicom_masks_own_identifiers_are_blanked(tmp_path):
    """A global mask joined the inputs only after their identifiers were read: its own patient was never looked
    up, so a mask folder named after it stayed in metrics.json and in the summary line."""
    root, ct, pt, box = _pair_and_box(tmp_path)
    mask = _dicom_mask(tmp_path / "SMITH_JOHN_PIDBBB222_mask", box)
    out = tmp_path / "out"
    rc, text = _cli(["evaluate", "--pair", ct, pt, "--methods", "mean", "--mode", "native", "--metrics", "EN",
                     "--mask", mask, "--out", out, "--no-progress"])
    assert rc == 0, text
    raw = (out / "metrics.json").read_text()
    doc = json.loads(raw)
    assert doc["mask"]["path"].endswith("[removed]_mask"), doc["mask"]
    assert doc["images"][0]["mask_fraction"] == pytest.approx(box.mean())  # the mask was used, not skipped
    assert leaks(raw, OTHER) == [] and leaks(text, OTHER) == [], (raw, text)


def test_folder_run_records_the_folder_and_the_options_that_chose_its_pairs(tmp_path):
    root = _write_three_types(tmp_path / "h")
    parser = E.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "o"
    assert E.run(parser.parse_args([str(root), "--split", "val", "--seed", "3", "--val-fraction", "0.4",
                                    "--limit", "1", "--pair-types", "CT-MRI,PET-MRI", "--methods", "mean",
                                    "--metrics", "EN", "--no-save", "--no-progress", "-q", "--out", str(out)])) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["source"] == str(root)
    sel = doc["selection"]
    assert sel["folder"] == str(root) and sel["split"] == "val" and sel["seed"] == 3
    assert sel["val_fraction"] == 0.4 and sel["limit"] == 1 and sel["pair_types"] == ["CT-MRI", "PET-MRI"]
    assert sel["n_pairs"] == len(doc["images"]) == 2
    # The CSV keeps its layout: the header row first (readers of the table are not broken).
    with open(out / "metrics.csv") as f:
        assert next(csv.reader(f))[:5] == ["kind", "method", "pair_type", "name", "output"]
    # A whole folder: split "all", and the seed and fraction, which chose nothing, are null.
    out2 = tmp_path / "o2"
    assert E.run(parser.parse_args([str(root), "--methods", "mean", "--metrics", "EN", "--no-save", "-q",
                                    "--out", str(out2)])) == 0
    doc2 = json.loads((out2 / "metrics.json").read_text())
    sel = doc2["selection"]
    assert (sel["split"], sel["seed"], sel["val_fraction"], sel["limit"]) == ("all", None, None, None)
    assert doc2["higher_is_better"] == ["EN"]  # the direction of each metric scored is said, not left to guess
    # ... and a seed or fraction given for the whole folder chose nothing: refused (it was recorded null, unsaid).
    for extra in (["--seed", "4"], ["--val-fraction", "0.3"], ["--split", "all", "--seed", "0"]):
        with pytest.raises(InvalidInputError, match=f"{extra[-2]} chooses the training/validation split") as e:
            E.run(parser.parse_args([str(root), *extra, "--methods", "mean", "-q", "--out", str(tmp_path / "o4")]))
        assert "--split val" in e.value.fix
    assert not (tmp_path / "o4").exists()
    # The Python API on a folder records it and its pair types; a list of pairs records none.
    E.evaluate(root, methods=["mean"], metrics=["EN"], out_dir=tmp_path / "o3", save_outputs=False,
               pair_types=["CT-MRI"])
    doc = json.loads((tmp_path / "o3" / "metrics.json").read_text())
    assert doc["source"] == str(root) and doc["selection"] == {"folder": str(root), "pair_types": ["CT-MRI"]}


@pytest.mark.parametrize("method", ["auto", "percentile", "minmax", "window", "suv", "none"])
@pytest.mark.parametrize("dtype", [None, np.float32])
@pytest.mark.parametrize("array", [np.array([]), np.zeros((0, 3)), np.zeros((4, 0, 2), dtype=np.float32)])
def test_normalise_refuses_an_empty_array_with_a_typed_error(method, dtype, array):
    with pytest.raises(InvalidInputError, match="empty image"):
        normalise(array, method=method, dtype=dtype)


def test_normalise_of_one_value_still_works():
    y, rec = normalise(np.array([5.0]), method="minmax")
    assert y.tolist() == [0.0] and rec["low"] == 5.0


@pytest.mark.parametrize("dob, text", [("19510203", "born 03/02/1951"), ("19510302", "born 03/02/1951"),
                                       ("19510203", "born 1951/02/03")])
def test_birth_date_with_slashes_is_blanked(tmp_path, patient_header, dob, text):
    from medfuse.provenance import patient_identifiers, scrub

    ids = patient_identifiers([patient_header(tmp_path / "x.dcm", "Doe^Jane", "PIDAAA111", dob=dob)])
    assert scrub(text, ids) == "born [removed]"


def test_id_with_separators_inserted_is_blanked_and_numbers_are_not(tmp_path, patient_header):
    from medfuse.provenance import patient_identifiers, scrub

    ids = patient_identifiers([patient_header(tmp_path / "x.dcm", "Doe^Jane", "PIDAAA111")])
    for text in ("pid-aaa-111", "PID_AAA_111", "pid.aaa.111", "pid aaa 111", "PIDAAA-1-11"):
        assert scrub(f"PET {text} static", ids) == "PET [removed] static", text
    # Other IDs, a longer number and a short one are left alone; short IDs keep the old rules.
    assert scrub("PIDAAA1112 PIDAAB111 pid-aaa-11", ids) == "PIDAAA1112 PIDAAB111 pid-aaa-11"
    ids = patient_identifiers([patient_header(tmp_path / "y.dcm", "Doe^Jane", "CT0001")])
    assert scrub("case CT-0001 and c.t.0001", ids) == "case [removed] and [removed]"
    ids = patient_identifiers([patient_header(tmp_path / "z.dcm", "Doe^Jane", "CT01")])
    assert scrub("the CT 01 volume", ids) == "the CT 01 volume"
    ids = patient_identifiers([patient_header(tmp_path / "w.dcm", "Doe^Jane", "123456")])
    assert scrub("a 123.456 mm shift, case 123-456", ids) == "a 123.456 mm shift, case [removed]"


def test_medfuse_info_blanks_such_descriptions(tmp_path):
    for i, desc in enumerate(("born 14/03/1962", "born 03/14/1962", "PET mrn-123-456")):
        folder = phi_series(tmp_path / f"s{i}", modality="PT", description=desc)
        rc, text = _cli(["info", folder])
        assert rc == 0, text
        assert desc not in text and "[removed]" in text, text


def test_evaluate_scores_trained_weights_as_the_network_and_records_them(tmp_path):
    import json
    import shutil

    import medfuse
    from medfuse import provenance as prov
    from medfuse.errors import InvalidInputError, WeightsError
    from medfuse.evaluate import evaluate

    rng = np.random.default_rng(1)
    a = medfuse.Volume(rng.random((32, 32, 32)).astype(np.float32), np.eye(4), modality="MR")
    b = a.with_array(rng.random((32, 32, 32)).astype(np.float32))
    shipped = Path(medfuse.__file__).parent / "fusion" / "weights" / "medfuse_fusion.safetensors"
    mine = Path(shutil.copy(shipped, tmp_path / "mine.safetensors"))
    res = evaluate([(a, b)], methods=["network", "mean"], out_dir=tmp_path / "ev", weights=mine,
                   metrics=["EN", "SD"], save_outputs=False)
    assert res.ok and {r["method"] for r in res.rows} == {"network", "mean"}
    rec = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert rec["network_weights"]["sha256"] == prov.hash_path(mine)
    with pytest.raises(InvalidInputError, match="network"):
        evaluate([(a, b)], methods=["mean"], out_dir=tmp_path / "ev2", weights=mine)
    with pytest.raises(WeightsError):
        evaluate([(a, b)], methods=["network"], out_dir=tmp_path / "ev3", weights=tmp_path / "none.safetensors")
    assert not (tmp_path / "ev2").exists() and not (tmp_path / "ev3").exists()
