"""medfuse batch as a training pipeline's preprocessing (nnU-Net, MONAI): label maps beside the images, the
``outputs`` mapping of each row, registration only (``method="none"``) for any number of channels, the fixed image
re-saved, one dtype per channel, and paths holding ``;``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.batch import Subject, discover_subject, read_manifest, run_batch, write_phantom_subjects
from medfuse.errors import InvalidInputError


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One small phantom subject: an MR T1 at 4 mm and a PET in SUVbw at 3 mm (two grids, the PET turned)."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_subjects(root, 1, first_seed=5, downsample=4)
    return root / "sub-01"


def _tiny(path: Path, shape=(4, 5, 6), value: int = 1) -> None:
    medfuse.save(medfuse.Volume(np.full(shape, value, np.int16), np.eye(4)), path)


def _run(subjects, tmp_path, **kw):
    return run_batch(subjects, scheduler="synchronous", report=tmp_path / "report.json", **kw)


# ----------------------------------------------------------------------------- discovery and manifests
def test_label_maps_are_no_candidates_and_are_found(tmp_path):
    sub = tmp_path / "sub-02"
    sub.mkdir()
    for name in ("ct.nii.gz", "ct_seg.nii.gz", "pet.nii.gz", "pet_mask.nii.gz", "seg.nii.gz", "sub-02_dseg.nii.gz",
                 "BraTS-GLI-00001-000-seg.nii.gz", "ct_roi.nii.gz", "t1_labels.nii.gz"):
        _tiny(sub / name)
    fixed, moving, labels = discover_subject(sub, with_labels=True)
    # Before: "ambiguous: 2 CT candidates" (ct_seg), and seg / dseg / BraTS's seg passed over without a word.
    assert (Path(fixed).name, [Path(m).name for m in moving]) == ("ct.nii.gz", ["pet.nii.gz"])
    assert sorted(Path(x).name for x in labels) == sorted(["BraTS-GLI-00001-000-seg.nii.gz", "ct_roi.nii.gz",
                                                          "ct_seg.nii.gz", "pet_mask.nii.gz", "seg.nii.gz",
                                                          "sub-02_dseg.nii.gz", "t1_labels.nii.gz"])
    assert discover_subject(sub) == (fixed, moving)  # the two-item form callers unpack is unchanged
    # Whole words only: "segment" or "masked" are no label words, so the subject stays paired by its names.
    (sub / "pet.nii.gz").rename(sub / "pet_segment.nii.gz")
    assert Path(discover_subject(sub)[1][0]).name == "pet_segment.nii.gz"
    # An unpaired subject's message names its label maps.
    (sub / "pet_segment.nii.gz").unlink()
    with pytest.raises(InvalidInputError) as e:
        discover_subject(sub)
    assert "label maps (not fused)" in str(e.value) and "pet_mask.nii.gz" in str(e.value)


def test_manifest_header_names_its_row_and_labels_column_is_read(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("subject,fixed,moving,output,label\ns1,a/mr.nii,a/pet.nii,out/s1.nii.gz,a/seg.nii\n")
    with pytest.raises(InvalidInputError) as e:
        read_manifest(m)
    # Before: "manifest row 2: unknown column(s) 'label'" for a column of the header, row 1.
    assert "the header (row 1) has unknown column(s) 'label' (did you mean 'labels'?)" in str(e.value)
    m.write_text("\nsubject,fixed,moving,output,labels\ns1,a/mr.nii,a/pet.nii,out/s1.nii.gz,a/seg.nii;a/roi.nii\n")
    (s,) = read_manifest(m)
    assert s.labels == [os.fspath(tmp_path / "a" / "seg.nii"), os.fspath(tmp_path / "a" / "roi.nii")]
    m.write_text("\nsubject,fixed,moving,output,regster\ns1,a/mr.nii,a/pet.nii,out/s1.nii.gz,rigid\n")
    with pytest.raises(InvalidInputError, match=r"the header \(row 2\) has unknown column"):
        read_manifest(m)


# ----------------------------------------------------------------------------- keep_registered: labels, fixed
def test_keep_registered_carries_labels_and_resaves_the_fixed_image(phantom, tmp_path):
    sub = tmp_path / "sub-01"
    shutil.copytree(phantom, sub)
    mr, pet = medfuse.load(sub / "mr_t1.nii.gz"), medfuse.load(sub / "pet.nii.gz")
    # A float64 PET (as an SPM uint8 PET loads): its registered image was float64, the others float32.
    as64 = pet.with_array(pet.array.astype(np.float64), provenance={})
    (sub / "pet.nii.gz").unlink()
    medfuse.save(as64, sub / "pet.nii.gz")
    on_pet = (pet.array > np.percentile(pet.array, 95)).astype(np.uint8) * 3
    medfuse.save(pet.with_array(on_pet, modality="unknown", unit="arbitrary"), sub / "pet_mask.nii.gz")
    medfuse.save(mr.with_array((mr.array > mr.array.mean()).astype(np.int16), modality="unknown",
                               unit="arbitrary"), sub / "seg.nii.gz")
    _tiny(sub / "roi.nii.gz")  # on no input's grid
    out = tmp_path / "out"
    first = _run(tmp_path, tmp_path, register="none", method="mean", out_dir=out, keep_registered=True)
    (res,) = first.results
    assert res.status == "done", first.table()
    o = res.outputs
    fixed_copy, kept_pet, kept_mask = out / "sub-01_mr_fixed.nii.gz", out / "sub-01_pet_registered.nii.gz", \
        out / "sub-01_mask_label.nii.gz"
    assert o["fused"] == os.fspath(out / "sub-01_fused.nii.gz") and o["fixed"] == os.fspath(fixed_copy)
    assert o["registered"] == {"pet": os.fspath(kept_pet)} and o["transforms"] == {}
    # Keyed and named by their label word, never by the file's other words (which may be a patient's name).
    assert o["labels"] == {"mask": os.fspath(kept_mask), "seg": os.fspath(sub / "seg.nii.gz")}
    assert "roi.nii.gz not carried" in res.note and "no input's grid" in res.note
    # The label on the PET's grid: nearest neighbour onto the MR's grid, its labels and integer type kept.
    moved = medfuse.load(kept_mask)
    expected = medfuse.resample(medfuse.load(sub / "pet_mask.nii.gz"), mr, interpolation="nearest")
    assert moved.same_grid(mr) and moved.dtype == np.uint8
    np.testing.assert_array_equal(moved.array, expected.array)
    assert set(np.unique(moved.array)) == {0, 3}
    # The fixed image re-saved on its own grid, and the PET: both float32.
    again = medfuse.load(fixed_copy)
    assert again.same_grid(mr) and again.dtype == np.float32
    np.testing.assert_allclose(again.array, mr.array, rtol=1e-6)
    assert medfuse.load(kept_pet).dtype == np.float32
    # The JSON report holds the same mapping.
    row = json.loads((tmp_path / "report.json").read_text())[0]
    assert row["outputs"] == o and row["registered_outputs"] == [os.fspath(kept_pet)]
    # A rerun finds everything up to date; an edited label map makes the kept files be written again, not the fused.
    fused = out / "sub-01_fused.nii.gz"
    before = fused.stat().st_mtime_ns
    assert _run(tmp_path, tmp_path, register="none", method="mean", out_dir=out,
                keep_registered=True).results[0].status == "skipped"
    (sub / "pet_mask.nii.gz").unlink()
    medfuse.save(pet.with_array(on_pet * 2, modality="unknown", unit="arbitrary"), sub / "pet_mask.nii.gz")
    res = _run(tmp_path, tmp_path, register="none", method="mean", out_dir=out, keep_registered=True).results[0]
    assert res.status == "done" and "registered images written (labels changed)" in res.note
    assert fused.stat().st_mtime_ns == before and set(np.unique(medfuse.load(kept_mask).array)) == {0, 6}
    # Without --keep-registered the labels are named, not passed over.
    res = _run(tmp_path, tmp_path, register="none", method="mean", out_dir=out).results[0]
    assert "label maps not fused: pet_mask.nii.gz, roi.nii.gz, seg.nii.gz" in res.note


# ----------------------------------------------------------------------------- registration only
def _four_channels(phantom: Path, tmp_path: Path) -> Subject:
    """BraTS-like: an MR fixed (t1n) and three MR moving images (t1c, t2w, t2f), the last one shifted 8 mm."""
    mr = medfuse.load(phantom / "mr_t1.nii.gz")
    case = tmp_path / "case"
    case.mkdir()
    for seq, scale in (("t1n", 1.0), ("t1c", 1.5), ("t2w", 0.5), ("t2f", 2.0)):
        vol = mr.with_array((mr.array * scale).astype(np.float32))
        if seq == "t2f":
            vol = vol.copy()
            vol.affine = vol.affine + np.array([[0, 0, 0, 8.0]] + [[0, 0, 0, 0]] * 3)
        medfuse.save(vol, case / f"c-{seq}.nii.gz")
    return Subject(subject="c", fixed=os.fspath(case / "c-t1n.nii.gz"),
                   moving=[os.fspath(case / f"c-{q}.nii.gz") for q in ("t1c", "t2w", "t2f")],
                   output=os.fspath(tmp_path / "prep" / "c_fused.nii.gz"), register="none")


def test_method_none_registers_any_number_of_images_and_names_them_after_their_files(phantom, tmp_path):
    s = _four_channels(phantom, tmp_path)
    # With fusion, refused before any work (it failed after registering all four, writing nothing).
    (res,) = _run([s], tmp_path, method="mean", keep_registered=True).results
    assert res.status == "failed" and "fusion takes two or three images; this subject has 4" in res.error
    assert "--method none" in res.error and not (tmp_path / "prep").exists()
    (res,) = _run([s], tmp_path, method="none").results
    assert res.status == "done", res.error
    prep = tmp_path / "prep"
    names = {w: prep / f"c_{w}_registered.nii.gz" for w in ("t1c", "t2w", "t2f")}
    assert res.outputs["registered"] == {w: os.fspath(p) for w, p in names.items()}
    assert res.outputs["fused"] is None and not (prep / "c_fused.nii.gz").exists()
    assert res.output == res.outputs["fixed"] == os.fspath(prep / "c_t1n_fixed.nii.gz")
    fixed = medfuse.load(s.fixed)
    for w, scale in (("t1c", 1.5), ("t2w", 0.5)):  # on the fixed grid already: the same voxels
        np.testing.assert_allclose(medfuse.load(names[w]).array, fixed.array * scale, rtol=1e-5)
    shifted = medfuse.load(names["t2f"])
    expected = medfuse.resample(medfuse.load(s.moving[2]), fixed, interpolation="linear")
    assert shifted.same_grid(fixed) and shifted.dtype == np.float32
    np.testing.assert_allclose(shifted.array, expected.array, atol=1e-4)
    assert _run([s], tmp_path, method="none").results[0].status == "skipped"
    # The row's method too, as the manifest's "method none" says it.
    s2 = Subject(**{**s.__dict__, "method": "none"})
    assert _run([s2], tmp_path, method="mean").results[0].status == "skipped"


def test_run_batch_takes_register_none_and_keeps_paths_with_semicolons_whole(phantom, tmp_path):
    sub = tmp_path / "ds" / "a;b"
    shutil.copytree(phantom, sub)
    out = tmp_path / "out"
    # register="none" was refused ("unknown registration kind 'none'. Fix: use None") where the CLI takes it.
    summary = _run(tmp_path / "ds", tmp_path, register="none", method="mean", out_dir=out, keep_registered=True)
    (res,) = summary.results
    assert res.status == "done", summary.table()
    inputs = [os.fspath(sub / "mr_t1.nii.gz"), os.fspath(sub / "pet.nii.gz")]
    row = json.loads((tmp_path / "report.json").read_text())[0]
    # Before, the JSON lists were the CSV text split at ';': every path of the folder "a;b" came out in two.
    assert row["inputs"] == inputs == res.outputs["inputs"]
    assert row["outputs"]["registered"] == {"pet": os.fspath(out / "a;b_pet_registered.nii.gz")}
    assert row["registered_outputs"] == [os.fspath(out / "a;b_pet_registered.nii.gz")]
    # A CSV report keeps the mapping as JSON text.
    csv_summary = run_batch(tmp_path / "ds", scheduler="synchronous", register="none", method="mean", out_dir=out,
                            keep_registered=True, report=tmp_path / "r.csv")
    import csv

    (cells,) = list(csv.DictReader((tmp_path / "r.csv").open(encoding="utf-8")))
    assert csv_summary.results[0].status == "skipped" and json.loads(cells["outputs"])["inputs"] == inputs
