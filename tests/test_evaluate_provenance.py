"""medfuse evaluate's metrics.json says how its scores were made: software versions, the time, each pair's inputs
(path and SHA-256) and each fused image's SHA-256, as every other medfuse output's provenance sidecar does.

Why: metrics.json held no versions, no time, for ``--pair`` runs not even the inputs' paths (``source: "list of
pairs"``, rows only ``name``), and no hash of an input or an output, so a reviewer could not tell which data and
which medfuse made a table of scores."""

from __future__ import annotations

import argparse
import hashlib
import json
import re

import numpy as np
from PIL import Image

from medfuse import Volume
from medfuse import __version__
from medfuse import evaluate as E
from medfuse.io import save


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pair(tmp_path):
    """Two tiny NIfTI volumes on one grid."""
    base = np.zeros((12, 12, 10))
    base[2:10, 2:10, 2:8] = 1.0
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    a, b = tmp_path / "mr.nii.gz", tmp_path / "pet.nii.gz"
    save(Volume(base * 500 + 10, aff, modality="MR"), a)
    save(Volume(base[::-1] * 300 + 5, aff, modality="MR"), b)
    return a, b


def test_pair_run_records_versions_time_input_and_output_hashes(tmp_path):
    a, b = _pair(tmp_path)
    mask = tmp_path / "brain.nii.gz"
    box = np.zeros((12, 12, 10), dtype=np.uint8)
    box[1:11, 1:11, 1:9] = 1
    save(Volume(box, np.diag([1.0, 1.0, 2.0, 1.0])), mask)
    parser = E.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "ev"
    assert E.run(parser.parse_args(["--pair", str(a), str(b), "--methods", "max,mean", "--mode", "native",
                                    "--mask", str(mask), "--no-progress", "-q", "--out", str(out)])) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["versions"]["medfuse"] == __version__
    from medfuse.provenance import RESULTS_VERSION

    assert doc["results_version"] == RESULTS_VERSION
    assert doc["versions"]["numpy"] == np.__version__ and "scipy" in doc["versions"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["created_utc"])
    # The keys other readers use keep their meaning.
    assert doc["source"] == "list of pairs" and doc["selection"] is None and doc["ok"] is True
    assert [r["method"] for r in doc["images"]] == ["max", "mean"]
    for row in doc["images"]:
        assert row["inputs"] == [
            {"role": "fixed", "path": str(a), "sha256": _sha(a)},
            {"role": "moving", "path": str(b), "sha256": _sha(b)},
            {"role": "mask", "path": str(mask), "sha256": _sha(mask)},
        ]
        written = out / row["output"]
        assert written.is_file() and row["output_sha256"] == _sha(written)


def test_no_save_records_inputs_and_no_output_hash(tmp_path):
    a, b = _pair(tmp_path)
    res = E.evaluate([(a, b)], methods=["max"], mode="native", out_dir=tmp_path / "o", save_outputs=False)
    row = json.loads((tmp_path / "o" / "metrics.json").read_text())["images"][0]
    assert row["output"] is None and row["output_sha256"] is None
    assert [i["sha256"] for i in row["inputs"]] == [_sha(a), _sha(b)]
    assert res.rows[0]["inputs"][0]["path"] == str(a)  # the Python result holds them too


def test_a_volume_given_in_memory_has_no_path_nor_hash(tmp_path):
    a, b = _pair(tmp_path)
    from medfuse.io import load

    E.evaluate([(a, load(b))], methods=["max"], mode="native", out_dir=tmp_path / "o")
    row = json.loads((tmp_path / "o" / "metrics.json").read_text())["images"][0]
    assert row["inputs"] == [{"role": "fixed", "path": str(a), "sha256": _sha(a)},
                             {"role": "moving", "path": None, "sha256": None}]
    assert row["output_sha256"] == _sha(tmp_path / "o" / row["output"])


def test_folder_of_2d_pairs_records_each_pngs_hash(tmp_path):
    root = tmp_path / "pairs"
    (root / "CT-MRI" / "MRI").mkdir(parents=True)
    (root / "CT-MRI" / "CT").mkdir()
    yy, xx = np.mgrid[0:32, 0:32]
    Image.fromarray((100 + 60 * np.sin(xx / 3.0)).astype(np.uint8)).save(root / "CT-MRI" / "MRI" / "5001.png")
    Image.fromarray((((xx - 16) ** 2 + (yy - 16) ** 2 < 64) * 230).astype(np.uint8)).save(
        root / "CT-MRI" / "CT" / "5001.png")
    E.evaluate(root, methods=["max"], out_dir=tmp_path / "o", metrics=["EN", "SSIM"])
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    row = doc["images"][0]
    mri, ct = root / "CT-MRI" / "MRI" / "5001.png", root / "CT-MRI" / "CT" / "5001.png"
    assert [(i["path"], i["sha256"]) for i in row["inputs"]] == [(str(mri), _sha(mri)), (str(ct), _sha(ct))]
    assert row["output"] == "max/CT-MRI/5001.png" and row["output_sha256"] == _sha(tmp_path / "o" / row["output"])
    assert doc["versions"]["medfuse"] == __version__ and doc["created_utc"]
