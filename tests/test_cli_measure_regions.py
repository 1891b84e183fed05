"""``medfuse measure`` with several labels, a reference region (SUVR) and ``--inverse``, as a neuroimaging user runs
it: labels on a T1, the PET in its own space, ``medfuse register T1 PET --transform t.tfm`` (PET moving).

Found: ``--label 1 2`` was an argparse error, there was no ratio to a reference label, and that t.tfm passed to
``measure PET --transform t.tfm`` silently measured the wrong voxels (a mean 867.4 for a true 1057.3, SUVR 0.84
for 1.014): it maps the T1's points to the PET's, the other way from what measure takes.

References: the SPM12 PET template's own voxels under labels drawn on the SPM12 T1 (one grid), the PET placed in
its own space by a known rigid motion (the same array, no resampling: its true figures are the template's), and
the register sidecar written as ``medfuse register`` writes it (provenance.build with the fixed and moving images'
SHA-256 and the transform's path and SHA-256).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse import provenance as prov
from medfuse.cli import EXIT_OK, EXIT_USAGE, main
from medfuse.registration.transforms import Transform
from medfuse.volume import Volume
from tests.conftest import shared_path
from tests.test_measure_regions import MOTION, _brain_labels


@pytest.fixture(scope="module")
def neuro(tmp_path_factory):
    """Files: the T1, the PET in its own space, labels on the T1, and the truth per label from the template."""
    folder = shared_path("data", "spm12-templates")
    t1_path = folder / "T1.nii"
    t1, pet = medfuse.load(t1_path), medfuse.load(folder / "PET.nii")
    out = tmp_path_factory.mktemp("neuro")
    (out / "reg").mkdir()
    labels = _brain_labels(t1)
    files = {"t1": t1_path,
             "pet": medfuse.save(Volume(pet.array, MOTION @ np.asarray(pet.affine), modality="PT", unit=pet.unit),
                                 out / "pet.nii.gz"),
             "labels": medfuse.save(t1.with_array(labels, modality="unknown", unit="arbitrary"),
                                    out / "labels_on_t1.nii.gz"),
             "pet_on_t1": medfuse.save(pet, out / "reg" / "pet_on_t1.nii.gz")}
    truth = {lab: float(pet.array[labels == lab].mean()) for lab in (1, 2, 3)}
    return files, truth


def _register_outputs(files, tfm: Path, *, fixed: str = "t1", moving: str = "pet") -> Path:
    """The transform and sidecar ``medfuse register FIXED MOVING -o pet_on_t1.nii.gz --transform tfm`` writes,
    with the known motion as its transform (FIXED's points to MOVING's)."""
    m = MOTION if (fixed, moving) == ("t1", "pet") else np.linalg.inv(MOTION)
    Transform.from_matrix(m).save(tfm, overwrite=True)
    out = files["pet_on_t1"]
    record = prov.build(inputs=[{"role": "fixed", "path": files[fixed], "sha256": prov.hash_path(files[fixed])},
                                {"role": "moving", "path": files[moving], "sha256": prov.hash_path(files[moving])}],
                        output=out, output_sha256=prov.hash_path(out),
                        steps=[{"name": "register", "params": {"kind": "rigid"}, "seconds": 1.0}],
                        parameters={"kind": "rigid"}, extra={"transform": {"path": str(tfm),
                                                                           "sha256": prov.hash_path(tfm)}})
    return prov.write_sidecar(out, record)


def _measure(capsys, *argv) -> dict:
    assert main(["measure", *map(str, argv), "--json"]) == EXIT_OK
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["t.tfm", "pet_on_t1.tfm"])  # named apart, and register's default OUT.tfm
def test_the_register_transform_is_refused_without_inverse_and_right_with_it(neuro, capsys, name):
    files, truth = neuro
    tfm = files["pet_on_t1"].parent / name
    side = _register_outputs(files, tfm)
    try:
        base = ["measure", str(files["pet"]), "--mask", str(files["labels"]), "--label", "1", "2",
                "--reference", "3", "--transform", str(tfm)]
        assert main(base) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "maps the other way" in err and "MOVING" in err and "--inverse" in err
        rec = _measure(capsys, *base[1:], "--inverse")
    finally:
        side.unlink()
        tfm.unlink()
    assert rec["mask"]["reference"] == 3 and rec["inverse"] is True
    regions = {r["label"]: r for r in rec["mask"]["regions"]}
    assert list(regions) == [1, 2, 3]
    for lab in (1, 2):
        assert regions[lab]["mean"] == pytest.approx(truth[lab], rel=1e-9)
        assert regions[lab]["ratio_to_reference"] == pytest.approx(truth[lab] / truth[3], rel=1e-9)
    assert regions[3]["ratio_to_reference"] == 1.0


def test_inverse_with_the_image_as_the_fixed_image_is_refused(neuro, capsys, tmp_path):
    """register PET T1 (PET fixed) wrote the transform measure takes as it is: --inverse turns it the wrong way."""
    files, truth = neuro
    tfm = files["pet_on_t1"].parent / "pet_to_t1.tfm"
    side = _register_outputs(files, tfm, fixed="pet", moving="t1")
    try:
        base = ["measure", str(files["pet"]), "--mask", str(files["labels"]), "--label", "1", "--transform", str(tfm)]
        assert main([*base, "--inverse"]) == EXIT_USAGE
        assert "--inverse turns the transform the wrong way" in capsys.readouterr().err
        rec = _measure(capsys, *base[1:])
    finally:
        side.unlink()
        tfm.unlink()
    assert rec["mask"]["mean"] == pytest.approx(truth[1], rel=1e-9)


def test_without_a_sidecar_nothing_is_checked(neuro, capsys, tmp_path):
    """A transform with no register sidecar beside it: measured as given (the help says it is not checked)."""
    files, truth = neuro
    tfm = Transform.from_matrix(MOTION).save(tmp_path / "t.tfm")
    rec = _measure(capsys, files["pet"], "--mask", files["labels"], "--label", "1", "--transform", tfm, "--inverse")
    assert rec["mask"]["mean"] == pytest.approx(truth[1], rel=1e-9)


def test_one_label_keeps_the_single_region_json_and_text(neuro, capsys):
    files, truth = neuro
    rec = _measure(capsys, files["t1"], "--mask", files["labels"], "--label", "2")
    assert rec["mask"]["label"] == 2 and "regions" not in rec["mask"] and "inverse" not in rec
    t1 = medfuse.load(files["t1"]).array
    assert rec["mask"]["mean"] == pytest.approx(float(t1[_brain_labels(medfuse.load(files["t1"])) == 2].mean()))


def test_reference_prints_each_ratio(neuro, capsys):
    """On the template's own grid (no transform): each block, then the ratio line of the labels measured."""
    files, truth = neuro
    pet = files["pet_on_t1"]  # the template PET on the T1's grid
    assert main(["measure", str(pet), "--mask", str(files["labels"]), "--label", "1", "2", "--reference", "3"]) \
        == EXIT_OK
    out = capsys.readouterr().out
    assert out.count("ratio to label 3 ") == 2 and "voxels of label 3 (the reference)" in out
    ratio = float(out.split("ratio to label 3 ")[1].split()[0])
    assert ratio == pytest.approx(truth[1] / truth[3], rel=1e-5)


@pytest.mark.parametrize("extra, words", [
    (["--reference", "3", "--threshold", "0.5"], "give --reference or --threshold"),
    (["--transform", "t.tfm", "--inverse", "--reference", "3"], None),  # the transform file is missing: its error
])
def test_option_conflicts_are_refused(neuro, capsys, extra, words):
    files, _ = neuro
    assert main(["measure", str(files["pet"]), "--mask", str(files["labels"]), *extra]) == EXIT_USAGE
    if words:
        assert words in capsys.readouterr().err


def test_inverse_and_reference_need_what_they_act_on(neuro, capsys):
    files, _ = neuro
    assert main(["measure", str(files["pet"]), "--at", "0", "0", "0", "--reference", "3"]) == EXIT_USAGE
    assert "--reference picks a label of the --mask" in capsys.readouterr().err
    assert main(["measure", str(files["pet"]), "--mask", str(files["labels"]), "--inverse"]) == EXIT_USAGE
    assert "--inverse inverts the --transform files" in capsys.readouterr().err
