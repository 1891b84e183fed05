"""medfuse batch for dataset curators and research pipelines: BraTS file names, the registered images and
transforms kept beside the fused output, the registration's figures in the report, and what redoes a subject."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medfuse.batch import _name_modalities, discover_subject
from medfuse.errors import InvalidInputError

from tests.conftest import shared_path

#: BraTS 2023's four MR sequences, as its files name them (``BraTS-GLI-00001-000-t1n.nii.gz``).
BRATS = ("t1n", "t1c", "t2w", "t2f")


def _brats_subject(folder: Path, sequences=BRATS) -> Path:
    """A subject folder with the shared BraTS case's volumes linked under BraTS's own file names."""
    folder.mkdir(parents=True)
    for seq in sequences:
        (folder / f"BraTS-GLI-00001-000-{seq}.nii.gz").symlink_to(shared_path("data", "brats-gli-00001",
                                                                                f"{seq}.nii.gz"))
    return folder


def test_brats_names_are_mr(tmp_path):
    sub = _brats_subject(tmp_path / "BraTS-GLI-00001-000")
    with pytest.raises(InvalidInputError) as e:
        discover_subject(sub)
    msg = str(e.value)
    # All four are MR now (before: "unknown modality ...t1c, ...t1n, ...t2f"); the subject lacks only its PET.
    assert "no PET or SPECT found" in msg and "unknown modality" not in msg
    for seq in BRATS:
        assert f"BraTS-GLI-00001-000-{seq}.nii.gz" in msg.split("found: MR ")[1]


@pytest.mark.parametrize("seq", ["t1n", "t1c", "t1ce", "t1gd", "t2f"])
def test_brats_sequence_pairs_with_a_pet(tmp_path, seq):
    sub = tmp_path / "sub"
    sub.mkdir()
    mr = sub / f"BraTS-GLI-00001-000-{seq}.nii.gz"
    mr.symlink_to(shared_path("data", "brats-gli-00001", "t1n.nii.gz"))
    (sub / "BraTS-GLI-00001-000-pet.nii").symlink_to(shared_path("data", "spm12-templates", "PET.nii"))
    fixed, moving = discover_subject(sub)
    assert (fixed, moving) == (os.fspath(mr), [os.fspath(sub / "BraTS-GLI-00001-000-pet.nii")])
    assert _name_modalities([fixed, *moving]) == ["MR", "PT"]


# ----------------------------------------------------------------------------- --keep-registered
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One small phantom subject (MR T1 at 4 mm, PET in SUVbw at 3 mm: two grids) and its manifest folder."""
    from medfuse.batch import write_phantom_subjects

    root = tmp_path_factory.mktemp("phantom")
    write_phantom_subjects(root, 1, first_seed=5, downsample=4)
    return root / "sub-01"


def _subject(phantom: Path, tmp_path: Path, register: str):
    from medfuse.batch import Subject

    return Subject(subject="sub-01", fixed=os.fspath(phantom / "mr_t1.nii.gz"),
                   moving=[os.fspath(phantom / "pet.nii.gz")], output=os.fspath(tmp_path / "out" / "sub-01_fused.nii.gz"),
                   register=register)


def _run(subjects, tmp_path, **kw):
    from medfuse.batch import run_batch

    return run_batch(subjects, scheduler="synchronous", method="mean", report=tmp_path / "report.json", **kw)


def test_keep_registered_rigid_writes_the_pet_in_suv_and_the_transform(phantom, tmp_path):
    import json

    import numpy as np

    import medfuse
    from medfuse import provenance as prov

    s = _subject(phantom, tmp_path, "rigid")
    first = _run([s], tmp_path, keep_registered=True)
    assert [r.status for r in first.results] == ["done"], first.table()
    image, tfm = tmp_path / "out" / "sub-01_pet_registered.nii.gz", tmp_path / "out" / "sub-01_pet.tfm"
    fixed, pet, kept = medfuse.load(s.fixed), medfuse.load(s.moving[0]), medfuse.load(image)
    # On the MR's grid, in the PET's own unit (SUVbw), not the fusion's 0..1.
    assert kept.same_grid(fixed) and (kept.modality, kept.unit) == ("PT", "SUVbw")
    assert float(kept.array.max()) > 1.5
    # The transform is the one register writes (fixed -> moving points): resampling the PET through it gives the
    # kept image.
    again = medfuse.resample(pet, fixed, transform=medfuse.load_transform(tfm), interpolation="linear")
    np.testing.assert_allclose(kept.array, again.array, atol=1e-4)
    listed = prov.read_sidecar(s.output)["registered_outputs"]
    assert listed == [{"moving": s.moving[0], "image": image.name, "transform": tfm.name}]
    row = json.loads((tmp_path / "report.json").read_text())[0]
    assert row["registered_outputs"] == [os.fspath(image), os.fspath(tfm)]
    # The registration's figures, as the registration module returned them (the sidecar holds them unrounded).
    reg = prov.read_sidecar(s.output)["registration"][0]
    assert row["rotation_deg"] == round(reg["rotation_deg"], 2) and row["translation_mm"] == round(
        reg["translation_mm"], 2)
    assert 1 < row["rotation_deg"] < 30 and row["turned_start"] is False  # the phantom's PET is turned ~10 degrees
    assert row["inputs"] == [s.fixed, s.moving[0]]  # a list in JSON (the CSV keeps "a;b")
    # A rerun finds all three up to date.
    again = _run([s], tmp_path, keep_registered=True)
    assert [r.status for r in again.results] == ["skipped"] and again.results[0].registered_outputs == f"{image};{tfm}"
    assert again.results[0].rotation_deg == row["rotation_deg"]  # a skipped row's figures from the sidecar
    # The kept transform's sidecar tells its direction: measuring the PET with a mask on the MR through it is
    # refused without --inverse, as for one medfuse register wrote.
    from medfuse.cli import EXIT_OK, EXIT_USAGE, main

    base = ["measure", s.moving[0], "--mask", s.fixed, "--threshold", "1", "--transform", os.fspath(tfm)]
    assert main(base) == EXIT_USAGE and main([*base, "--inverse"]) == EXIT_OK


def test_keep_registered_without_registration(phantom, tmp_path):
    import numpy as np

    import medfuse
    from medfuse import provenance as prov

    s = _subject(phantom, tmp_path, "none")
    fused = Path(s.output)
    image = tmp_path / "out" / "sub-01_pet_registered.nii.gz"
    # Made without --keep-registered first: a rerun with it writes only the missing image, the fused output stays.
    assert _run([s], tmp_path).results[0].status == "done" and not image.exists()
    before = (prov.hash_path(fused), fused.stat().st_mtime_ns)
    res = _run([s], tmp_path, keep_registered=True).results[0]
    assert res.status == "done" and "registered images written (missing)" in res.note
    assert (res.rotation_deg, res.translation_mm, res.turned_start) == (None, None, None)  # nothing registered
    assert (prov.hash_path(fused), fused.stat().st_mtime_ns) == before
    # The PET resampled onto the MR's grid as it lies (no transform file), in SUV.
    expected = medfuse.resample(medfuse.load(s.moving[0]), medfuse.load(s.fixed), interpolation="linear")
    kept = medfuse.load(image)
    np.testing.assert_allclose(kept.array, expected.array, atol=1e-4)
    assert kept.unit == "SUVbw" and not (tmp_path / "out" / "sub-01_pet.tfm").exists()
    assert _run([s], tmp_path, keep_registered=True).results[0].status == "skipped"
    # An image edited since (its sidecar no longer verifies it) is made again.
    image.write_bytes(image.read_bytes() + b"edited")
    res = _run([s], tmp_path, keep_registered=True).results[0]
    assert res.status == "done" and "(stale)" in res.note
    np.testing.assert_allclose(medfuse.load(image).array, expected.array, atol=1e-4)
    # A folder of outputs, kept images and transforms is no subject of a dataset holding it.
    from medfuse.batch import _only_outputs

    (tmp_path / "out" / "sub-01_pet.tfm").write_text("#Insight Transform File V1.0\n")
    assert _only_outputs(tmp_path / "out")


def test_registered_paths_tell_movings_of_one_modality_apart():
    from medfuse.batch import registered_paths

    got = registered_paths("/o/s1_fused.nii.gz", ["PT", "NM", "PT", None])
    assert [p[0].name for p in got] == ["s1_pet1_registered.nii.gz", "s1_spect_registered.nii.gz",
                                        "s1_pet3_registered.nii.gz", "s1_moving_registered.nii.gz"]
    assert [p[1].name for p in got][:2] == ["s1_pet1.tfm", "s1_spect.tfm"]
    assert registered_paths("/o/s1.mha", ["PT"])[0][0] == Path("/o/s1_pet_registered.nii.gz")


# ----------------------------------------------------------------------------- the registration in the report
#: ``initialisation`` as medfuse.register reports it: a turned start that won, and one that lost (the text of a
#: real run on the phantom with its PET's header turned 180 degrees about y: the unturned start won).
TURNED_WON = "turned 180y+world>world"
TURNED_LOST = ("moments (the turned result, turned 180y+moments>world, scored -0.7002 after the final stages, the "
               "unturned -0.6505: not clearly better)")


def _row(*registrations):
    from medfuse.batch import SubjectResult, _from_sidecar

    res = SubjectResult(subject="s1", status="done", output="/o/s1_fused.nii.gz")
    _from_sidecar(res, {"registration": list(registrations)})
    return res


def test_a_turned_start_is_reported_and_noted_in_the_table():
    from medfuse.batch import BatchSummary

    won = _row({"initialisation": TURNED_WON, "rotation_deg": 178.4321, "translation_mm": 3.0, "suspect": False})
    assert (won.rotation_deg, won.translation_mm, won.turned_start) == (178.43, 3.0, "180y")
    lost = _row({"initialisation": TURNED_LOST, "rotation_deg": 9.39, "translation_mm": 14.0, "suspect": False})
    assert lost.turned_start is False
    # Two moving images: the largest figures, and the turn of the one that won turned.
    both = _row({"initialisation": "moments", "rotation_deg": 9.0, "translation_mm": 20.0},
                {"initialisation": "turned 90z+geometry>geometry", "rotation_deg": 91.0, "translation_mm": 2.0})
    assert (both.rotation_deg, both.translation_mm, both.turned_start) == (91.0, 20.0, "90z")
    assert _row().turned_start is None  # register none: no figures at all
    table = BatchSummary(results=[won, lost], report_path=None, wall_seconds=1.0, workers=1).table()
    noted = [line for line in table.splitlines() if "turned 180y" in line]
    assert len(noted) == 1 and "header" in noted[0]
    # A long table shows the turned subject among the first rows, as it shows failures.
    rows = [_row({"initialisation": "moments"}) for _ in range(5)] + [won]
    for i, r in enumerate(rows):
        r.subject = f"s{i}"
    short = BatchSummary(results=rows, report_path=None, wall_seconds=1.0, workers=1).table(max_rows=2)
    assert "turned 180y" in short


# ----------------------------------------------------------------------------- --suv and what it can change
def test_a_suv_change_redoes_only_subjects_it_can_change(phantom, tmp_path):
    import json
    import shutil

    from medfuse.batch import Subject

    from tests.conftest import SAMPLES

    plain = _subject(phantom, tmp_path, "none")  # MR + a NIfTI PET without a PET-BIDS sidecar: suv changes nothing
    bids = tmp_path / "bids"
    shutil.copytree(phantom, bids)
    # A PET-BIDS sidecar with SUV fields: the reader may make SUV from it, so another suv may change the PET.
    (bids / "pet.json").write_text(json.dumps({"TracerRadionuclide": "F18", "InjectedRadioactivity": 300,
                                               "InjectedRadioactivityUnits": "MBq", "BodyWeight": 70}))
    with_sidecar = Subject(subject="bids", fixed=os.fspath(bids / "mr_t1.nii.gz"), moving=[os.fspath(bids / "pet.nii.gz")],
                           output=os.fspath(tmp_path / "out" / "bids_fused.nii.gz"), register="none")
    dicom = Subject(subject="dicom", fixed=os.fspath(SAMPLES / "mr_t1.nii.gz"), moving=[os.fspath(SAMPLES / "pet")],
                    output=os.fspath(tmp_path / "out" / "dicom_fused.nii.gz"), register="none")
    subjects = [plain, with_sidecar, dicom]
    first = _run(subjects, tmp_path)
    assert [r.status for r in first.results] == ["done"] * 3, first.table()
    again = _run(subjects, tmp_path, suv="lbm")
    got = {r.subject: (r.status, r.note) for r in again.results}
    assert got["sub-01"] == ("skipped", None)  # before: "redone: parameters changed (load)"
    assert got["bids"] == ("done", "redone: parameters changed (load)")
    assert got["dicom"] == ("done", "redone: parameters changed (load)")  # its SUVlbm differs from SUVbw
    # Back to the default: the plain subject's output (made under bw) is still current, the others are redone.
    back = {r.subject: r.status for r in _run(subjects, tmp_path).results}
    assert back == {"sub-01": "skipped", "bids": "done", "dicom": "done"}


# ----------------------------------------------------------------------------- --write-manifest's notes
def test_write_manifest_says_why_cells_are_empty(tmp_path):
    import csv
    import shutil

    pydicom = pytest.importorskip("pydicom")
    from medfuse.batch import read_manifest, write_manifest

    from tests.conftest import SAMPLES

    ds = tmp_path / "ds"
    for sub in ("alone", "paired", "export"):
        (ds / sub).mkdir(parents=True)
        shutil.copy(SAMPLES / "mr_t1.nii.gz", ds / sub / "t1.nii.gz")
    shutil.copy(SAMPLES / "spect.nii.gz", ds / "paired" / "spect.nii.gz")
    # A PACS export: two PET series side by side in one folder (the second a copy under its own UID and number).
    folder, uid = ds / "export" / "export", pydicom.uid.generate_uid()
    folder.mkdir()
    files = sorted((SAMPLES / "pet").glob("*.dcm"))
    for f in files:
        shutil.copy(f, folder / f.name)
        d = pydicom.dcmread(f)
        d.SeriesInstanceUID, d.SeriesNumber = uid, 7
        d.save_as(folder / f"nac_{f.name}")
    number = pydicom.dcmread(files[0]).SeriesNumber
    manifest = write_manifest(ds, tmp_path / "m.csv")
    rows = {r["subject"]: r for r in csv.DictReader(manifest.read_text(encoding="utf-8").splitlines())}
    assert rows["alone"]["note"] == "unpaired: no PET or SPECT found (found: MR t1.nii.gz)"
    # The two series named apart by number and image count (before: "(export, export)").
    note = rows["export"]["note"]
    assert note.startswith("ambiguous: 2 PET candidates (") and note.endswith(")")
    named = note[len("ambiguous: 2 PET candidates ("):-1].split(", ")
    assert sorted(named) == sorted([f"export series {number} ({len(files)} images)",
                                    f"export series 7 ({len(files)} images)"])
    assert rows["paired"]["note"] == "" and rows["paired"]["fixed"]
    # The manifest reads as it is: the note is no unknown column, and an unpaired row's error repeats it.
    subjects = {s.subject: s for s in read_manifest(manifest)}
    assert subjects["paired"].problem is None
    assert "(unpaired: no PET or SPECT found (found: MR t1.nii.gz))" in subjects["alone"].problem


# ----------------------------------------------------------------------------- names one file on macOS
def test_subject_folders_differing_only_in_unicode_normalisation_are_refused(tmp_path):
    import shutil
    import unicodedata

    from medfuse.batch import run_batch

    from tests.conftest import SAMPLES

    ds = tmp_path / "ds"
    composed, decomposed = unicodedata.normalize("NFC", "Café"), unicodedata.normalize("NFD", "Café")
    assert composed != decomposed
    for name in (composed, decomposed):  # two folders here; one on macOS, where both outputs are one file
        (ds / name).mkdir(parents=True)
        shutil.copy(SAMPLES / "mr_t1.nii.gz", ds / name / "t1.nii.gz")
        shutil.copy(SAMPLES / "spect.nii.gz", ds / name / "spect.nii.gz")
    with pytest.raises(InvalidInputError, match="Unicode NFC or NFD") as e:
        run_batch(ds, scheduler="synchronous", register="none", method="mean")
    assert "rename one of the two subject folders" in e.value.fix
    assert not (ds / "derivatives").exists()  # refused before any work: no output, no report


def test_keep_registered_refuses_two_outputs_that_would_share_the_kept_names(phantom, tmp_path):
    """``out/a_fused.nii.gz`` and ``out/a.nii.gz`` both keep ``out/a_pet_registered.nii.gz``: the second subject wrote
    over the first's (the review found it). Refused before any work; without --keep-registered they are fine."""
    from medfuse.batch import Subject, run_batch
    from medfuse.errors import InvalidInputError

    s = _subject(phantom, tmp_path, "none")
    out = tmp_path / "out"
    a = Subject(subject="a", fixed=s.fixed, moving=list(s.moving), output=os.fspath(out / "a_fused.nii.gz"),
                register="none", method="mean")
    b = Subject(subject="b", fixed=s.fixed, moving=list(s.moving), output=os.fspath(out / "A.nii.gz"),
                register="none", method="mean")
    with pytest.raises(InvalidInputError, match="'a' and 'b' would keep their registered images under one name"):
        run_batch([a, b], scheduler="synchronous", keep_registered=True, report=os.fspath(tmp_path / "r.csv"))
    assert not out.exists() or not any(out.iterdir())
