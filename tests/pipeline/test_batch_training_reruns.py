"""Reruns and names of ``--keep-registered`` / ``--method none`` kept files: reruns skip where the input paths hold a
patient's name (sidecars record them blanked), kept names and ``outputs`` keys never carry a file name's other words,
label maps of one file name are kept apart, and an earlier version's kept files are neither registered again nor
renamed."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

import medfuse
from medfuse.batch import Subject, _is_label_name, run_batch, write_phantom_subjects
from medfuse.provenance import read_sidecar, write_sidecar


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One small phantom subject: an MR T1 at 4 mm and a PET in SUVbw at 3 mm (two grids)."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_subjects(root, 1, first_seed=5, downsample=4)
    return root / "sub-01"


def _run(subjects, tmp_path, **kw):
    return run_batch(subjects, scheduler="synchronous", report=tmp_path / "report.json", **kw)


def _keys(value) -> list:
    """Every key of the mappings nested in ``value``."""
    if isinstance(value, dict):
        return [*value, *(k for v in value.values() for k in _keys(v))]
    return [k for v in value for k in _keys(v)] if isinstance(value, list) else []


def test_reruns_skip_and_kept_names_hold_no_patient_name(tmp_path):
    from tests.test_privacy import phi_series

    # DICOM series whose header names Doe^Jane, in folders named after her; the CT on a grid of its own.
    ct = phi_series(tmp_path / "scan_ct", modality="CT", z=[1.0 + 2.0 * k for k in range(8)])
    pa = phi_series(tmp_path / "DOE_JANE_PET_1", modality="PT", uid="1.2.3.4.5.1")
    pb = phi_series(tmp_path / "DOE_JANE_PET_2", modality="PT", uid="1.2.3.4.5.2", z=[2.0 * k for k in range(10)])
    v = medfuse.load(pa)
    (tmp_path / "Doe_Jane").mkdir()
    medfuse.save(v.with_array((v.array > v.array.mean()).astype(np.uint8), modality="unknown", unit="arbitrary"),
                 tmp_path / "Doe_Jane" / "Doe_Jane_seg.nii.gz")
    for method, register in (("mean", None), ("none", "rigid")):
        s = Subject(subject="s1", fixed=os.fspath(ct), moving=[os.fspath(pa), os.fspath(pb)],
                    output=os.fspath(tmp_path / method / "s1_fused.nii.gz"),
                    labels=[os.fspath(tmp_path / "Doe_Jane" / "Doe_Jane_seg.nii.gz")])
        first = _run([s], tmp_path, register=register, method=method, keep_registered=True).results[0]
        assert first.status == "done", first.error
        # Before, the sidecars' blanked paths ("/[removed]_PET_1") were compared with the real ones: never skipped.
        again = _run([s], tmp_path, register=register, method=method, keep_registered=True).results[0]
        assert again.status == "skipped", (again.status, again.note, again.error)
        names = sorted(p.name for p in (tmp_path / method).iterdir())
        # By position, as before 2026-12 (s1_doe-jane-pet-1_registered.nii.gz before this fix); the label by its
        # word (s1_Doe_Jane_seg_registered.nii.gz before).
        assert {"s1_ct_fixed.nii.gz", "s1_pet1_registered.nii.gz", "s1_pet2_registered.nii.gz",
                "s1_seg_label.nii.gz", *(["s1_pet1.tfm", "s1_pet2.tfm"] if register else [])} <= set(names), names
        report = (tmp_path / "report.json").read_text()
        for text in (" ".join(names), " ".join(_keys(json.loads(report))), " ".join(_keys(again.outputs)), report):
            assert not re.search(r"doe|jane", text, re.I), text
        assert set(again.outputs["labels"]) == {"seg"} and set(again.outputs["registered"]) == {"pet1", "pet2"}


def test_label_maps_of_one_file_name_are_both_kept(phantom, tmp_path):
    pet = medfuse.load(phantom / "pet.nii.gz")
    mr = medfuse.load(phantom / "mr_t1.nii.gz")
    labels = []
    for k, q in ((1, 90), (2, 98)):  # two raters' segmentations, both named seg.nii.gz
        (tmp_path / f"r{k}").mkdir()
        arr = (pet.array > np.percentile(pet.array, q)).astype(np.uint8) * k
        medfuse.save(pet.with_array(arr, modality="unknown", unit="arbitrary"), tmp_path / f"r{k}" / "seg.nii.gz")
        labels.append(os.fspath(tmp_path / f"r{k}" / "seg.nii.gz"))
    out = tmp_path / "out"
    s = Subject(subject="s1", fixed=os.fspath(phantom / "mr_t1.nii.gz"), moving=[os.fspath(phantom / "pet.nii.gz")],
                output=os.fspath(out / "s1_fused.nii.gz"), labels=labels)
    # A foreign file at a label map's path fails the subject before any kept file is written.
    out.mkdir()
    (out / "s1_seg2_label.nii.gz").write_bytes(b"not ours")
    (res,) = _run([s], tmp_path, register="none", method="mean", keep_registered=True).results
    assert res.status == "failed" and "no medfuse sidecar verifies it" in res.error
    assert not (out / "s1_mr_fixed.nii.gz").exists() and not (out / "s1_pet_registered.nii.gz").exists()
    (out / "s1_seg2_label.nii.gz").unlink()
    (res,) = _run([s], tmp_path, register="none", method="mean", keep_registered=True).results
    assert res.status == "done", res.error
    # Before, both went to s1_seg_registered.nii.gz: the second replaced the first and every rerun was "stale".
    kept = {w: out / f"s1_{w}_label.nii.gz" for w in ("seg1", "seg2")}
    assert res.outputs["labels"] == {w: os.fspath(p) for w, p in kept.items()}
    for k, w in ((0, "seg1"), (1, "seg2")):
        expected = medfuse.resample(medfuse.load(labels[k]), mr, interpolation="nearest")
        np.testing.assert_array_equal(medfuse.load(kept[w]).array, expected.array)
    assert set(np.unique(medfuse.load(kept["seg2"]).array)) == {0, 2}
    assert _run([s], tmp_path, register="none", method="mean", keep_registered=True).results[0].status == "skipped"
    # Swapped: the hashes in order tell it, and both are written again.
    s2 = Subject(**{**s.__dict__, "labels": labels[::-1]})
    res = _run([s2], tmp_path, register="none", method="mean", keep_registered=True).results[0]
    assert res.status == "done" and "labels changed" in res.note
    assert set(np.unique(medfuse.load(kept["seg1"]).array)) == {0, 2}


def test_earlier_keep_registered_outputs_are_not_registered_again_nor_renamed(phantom, tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    mr = medfuse.load(phantom / "mr_t1.nii.gz")
    for seq, scale in (("t1n", 1.0), ("t1c", 1.5), ("t2w", 0.5)):
        medfuse.save(mr.with_array((mr.array * scale).astype(np.float32)), case / f"c-{seq}.nii.gz")
    out = tmp_path / "out" / "c_fused.nii.gz"
    s = Subject(subject="c", fixed=os.fspath(case / "c-t1n.nii.gz"),
                moving=[os.fspath(case / f"c-{q}.nii.gz") for q in ("t1c", "t2w")], output=os.fspath(out))
    assert _run([s], tmp_path, register="none", method="mean", keep_registered=True).results[0].status == "done"
    # As the version before 2026-12 left them: moving images of one modality named by position (_mr1_, _mr2_), no
    # fixed copy, and a fused sidecar without fixed_output or label_outputs.
    rec = read_sidecar(out)
    for entry, old in zip(rec["registered_outputs"], ("c_mr1_registered", "c_mr2_registered")):
        new = entry["image"][: -len(".nii.gz")]
        for ending in (".nii.gz", ".json"):
            (out.parent / f"{new}{ending}").rename(out.parent / f"{old}{ending}")
        entry["image"] = f"{old}.nii.gz"
    for ending in (".nii.gz", ".json"):
        (out.parent / f"c_t1n_fixed{ending}").unlink()
    write_sidecar(out, {k: v for k, v in rec.items() if k not in ("fixed_output", "label_outputs")},
                  input_paths=[s.fixed, *s.moving])
    olds = [out.parent / f"c_mr{k}_registered.nii.gz" for k in (1, 2)]
    stamps = [p.stat().st_mtime_ns for p in (out, *olds)]
    res = _run([s], tmp_path, register="none", method="mean", keep_registered=True).results[0]
    # Before, every kept file was registered again and written under new names, the old ones left orphaned.
    assert res.status == "done" and res.note.startswith("fixed image re-saved"), (res.note, res.error)
    assert [p.stat().st_mtime_ns for p in (out, *olds)] == stamps
    assert res.outputs["registered"] == {"mr1": os.fspath(olds[0]), "mr2": os.fspath(olds[1])}
    assert not list(out.parent.glob("c_t1c_*")) and not list(out.parent.glob("c_t2w_*"))
    np.testing.assert_allclose(medfuse.load(res.outputs["fixed"]).array, mr.array, rtol=1e-6)
    assert _run([s], tmp_path, register="none", method="mean", keep_registered=True).results[0].status == "skipped"


def test_bids_entity_values_make_no_label_map():
    # acq-roi and label-GM are BIDS entities: their values name no segmentation.
    assert not _is_label_name("sub-01_acq-roi_T1w.nii.gz")
    assert not _is_label_name("sub-01_label-GM_pet.nii.gz")
    assert _is_label_name("sub-01_label-GM_dseg.nii.gz") and _is_label_name("ct_seg.nii.gz")
    assert _is_label_name("BraTS-GLI-00001-000-seg.nii.gz")
    assert not _is_label_name("segment_pet.nii.gz")



def test_a_redone_subject_never_writes_over_a_users_file_at_a_kept_path(phantom, tmp_path):
    """A stale fused output is medfuse's own and is redone; the same permission reached the kept files, and a user's
    file at ``<subject>_pet_registered.nii.gz`` was replaced without --overwrite once an input had changed."""
    import shutil

    (tmp_path / "in").mkdir()
    mr, pet = (shutil.copy(phantom / n, tmp_path / "in" / n) for n in ("mr_t1.nii.gz", "pet.nii.gz"))
    out = tmp_path / "out"
    s = Subject(subject="s1", fixed=os.fspath(mr), moving=[os.fspath(pet)], output=os.fspath(out / "s1_fused.nii.gz"))
    assert _run([s], tmp_path, register="none", method="mean", keep_registered=True).results[0].status == "done"
    user = out / "s1_pet_registered.nii.gz"
    (out / "s1_pet_registered.json").unlink()
    user.write_bytes(b"USER DATA")
    import nibabel as nib

    img = nib.load(pet)
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] += 1
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), pet)  # an input changed: the subject is redone
    (res,) = _run([s], tmp_path, register="none", method="mean", keep_registered=True).results
    assert res.status == "failed" and "no medfuse sidecar verifies it" in res.error, res.error
    assert user.read_bytes() == b"USER DATA"
    # The fused output was redone (its sidecar holds the new input's hash): the note says so, not "not redone".
    assert res.note.startswith("fused output redone: inputs changed"), res.note
    assert read_sidecar(out / "s1_fused.nii.gz")["inputs"][1]["sha256"] == medfuse.provenance.hash_path(pet)
    # With --overwrite the user's file goes, as asked.
    (res,) = _run([s], tmp_path, register="none", method="mean", keep_registered=True, overwrite=True).results
    assert res.status == "done" and user.read_bytes() != b"USER DATA"
