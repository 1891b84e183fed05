"""Two patients' series combined: a warning that names nobody (medfuse._patient)."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse._patient import DIFFERENT_PATIENTS, different_patients, patient_key
from medfuse.errors import MedfuseWarning

SAMPLES = Path(__file__).resolve().parents[1] / "sample_volumes"
JANE = {"PatientName": "DOE^JANE", "PatientID": "PIDAAA111", "PatientBirthDate": "19600102"}
JOHN = {"PatientName": "SMITH^JOHN", "PatientID": "PIDBBB222", "PatientBirthDate": "19551111"}
NEEDLES = ("DOE", "JANE", "SMITH", "JOHN", "PIDAAA111", "PIDBBB222", "19600102", "19551111")


def _copy_series(src: Path, dst: Path, tags: dict) -> Path:
    """The sample series with these patient tags (everything else as it is)."""
    import pydicom

    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(dst / f.name)
    return dst


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("patients")
    return {"ct_jane": _copy_series(SAMPLES / "ct", root / "ct_jane", JANE),
            "pet_jane": _copy_series(SAMPLES / "pet", root / "pet_jane", JANE),
            "pet_john": _copy_series(SAMPLES / "pet", root / "pet_john", JOHN)}


def _said(record) -> str:
    return " ".join(str(w.message) for w in record)


def test_keys_compare_patients_not_spellings():
    jane = patient_key(JANE)
    assert jane and not any(n.lower() in jane.lower() for n in NEEDLES)
    same = patient_key({**JANE, "PatientName": "doe^jane^^", "PatientID": " pidaaa111 "})
    assert not different_patients({"patient_key": jane}, {"patient_key": same})
    assert different_patients({"patient_key": jane}, {"patient_key": patient_key(JOHN)})
    # One patient at two hospitals (two IDs, one name and birth date), or renamed (one ID): not reported.
    assert not different_patients({"patient_key": jane}, {"patient_key": patient_key({**JANE, "PatientID": "X9"})})
    assert not different_patients({"patient_key": jane},
                                  {"patient_key": patient_key({**JANE, "PatientName": "ROE^JANE"})})
    # Anonymised (no identifiers) or only an ID on one side: compared on what both hold.
    assert patient_key({}) is None
    assert different_patients({"patient_key": jane}, {"patient_key": patient_key({"PatientID": "PIDBBB222"})})
    assert not different_patients({"patient_key": jane}, {})
    # A key from another process (another salt) is never compared.
    other = "0" * 8 + jane[8:]
    assert not different_patients({"patient_key": jane}, {"patient_key": other})


def test_registering_and_fusing_two_patients_warns_without_naming_them(series):
    ct = medfuse.load(series["ct_jane"])
    pet_john = medfuse.load(series["pet_john"], suv="none")
    pet_jane = medfuse.load(series["pet_jane"], suv="none")
    assert ct.provenance["patient_key"] != pet_john.provenance["patient_key"]
    assert not any(n in repr(ct.provenance) for n in NEEDLES)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        moved = medfuse.resample(pet_john, ct)
    assert [str(w.message) for w in rec if DIFFERENT_PATIENTS in str(w.message)] == [DIFFERENT_PATIENTS]
    assert all(issubclass(w.category, MedfuseWarning) for w in rec if DIFFERENT_PATIENTS in str(w.message))
    assert not any(n.lower() in _said(rec).lower() for n in NEEDLES)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fused = medfuse.fuse(ct, moved, method="mean")
    # Said once (at resampling), and kept with the result for its sidecar.
    assert DIFFERENT_PATIENTS not in _said(rec)
    assert any(DIFFERENT_PATIENTS in w for w in fused.provenance["warnings"])
    # Fusing two patients' images that are already on one grid (no resampling) warns at fusion.
    john_on_grid = medfuse.Volume(moved.array, moved.affine, modality="PT", unit=moved.unit,
                                  provenance={"patient_key": pet_john.provenance["patient_key"]})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fused = medfuse.fuse(ct, john_on_grid, method="mean")
    assert _said(rec).count(DIFFERENT_PATIENTS) == 1 and DIFFERENT_PATIENTS in fused.provenance["warnings"]
    # One patient's series: nothing said.
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        medfuse.fuse(ct, medfuse.resample(pet_jane, ct), method="mean")
    assert DIFFERENT_PATIENTS not in _said(rec)


def test_register_warns_once_at_its_start(series):
    ct = medfuse.load(series["ct_jane"])
    pet = medfuse.load(series["pet_john"], suv="none")
    seen = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = medfuse.register(ct, pet, kind="rigid", iterations=(5, 5, 5), initialise="none",
                               progress=lambda f, msg: seen.append((f, _said(rec).count(DIFFERENT_PATIENTS))))
    assert _said(rec).count(DIFFERENT_PATIENTS) == 1
    assert [n for f, n in seen if 0.05 < f < 0.9][:1] == [1]  # said at the start, before the optimisation
    assert DIFFERENT_PATIENTS in res.resampled.provenance["warnings"]


def test_the_key_is_never_written_and_not_compared_across_processes(series, tmp_path, capsys):
    from medfuse.cli import main

    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(series["ct_jane"]), str(series["pet_john"]), "-o", str(out), "--method", "mean"]) == 0
    err = capsys.readouterr().err
    assert "different patients" in err and not any(n.lower() in err.lower() for n in NEEDLES)
    side = (tmp_path / "fused.json").read_text()
    assert "patient_key" not in side and "different patients" in side
    assert not any(n.lower() in side.lower() for n in NEEDLES)
    # Reloaded from its file, a result has no key (the salt lives in this process only).
    assert "patient_key" not in medfuse.load(out).provenance
    vol = medfuse.load(series["pet_john"], suv="none")
    assert pickle.loads(pickle.dumps(vol)).provenance["patient_key"] == vol.provenance["patient_key"]
    assert np.array_equal(pickle.loads(pickle.dumps(vol)).array, vol.array)
    assert json.loads(side)["output"]


def test_a_birth_date_left_out_is_no_other_patient_and_ids_rule_across_series():
    from medfuse._patient import keys_disagree

    jane_no_date = patient_key({k: v for k, v in JANE.items() if k != "PatientBirthDate"})
    assert not keys_disagree(patient_key(JANE), jane_no_date)
    assert not different_patients({"patient_key": patient_key(JANE)}, {"patient_key": jane_no_date})
    # Within one series any identifier both files hold must agree; across series only ID and name both differing
    # (or, without them, the birth date) count.
    other_id = patient_key({**JANE, "PatientID": "X9"})
    assert keys_disagree(patient_key(JANE), other_id)
    assert not different_patients({"patient_key": patient_key(JANE)}, {"patient_key": other_id})
    born_only = {"patient_key": patient_key({"PatientBirthDate": "19600102"})}
    assert different_patients(born_only, {"patient_key": patient_key({"PatientBirthDate": "19551111"})})
