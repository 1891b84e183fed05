"""What a sidecar must record for a reviewer to rerun an output exactly (a probe reproduced outputs from their
sidecars alone): register's --modalities, and the torch thread count a network fusion ran with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.cli import main


def _blob_pair(tmp_path):
    g = np.mgrid[:40, :40, :32].astype(np.float32)
    blob = np.exp(-((g[0] - 20) ** 2 / 60 + (g[1] - 18) ** 2 / 90 + (g[2] - 16) ** 2 / 40))
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed, moving = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    medfuse.save(medfuse.Volume(blob * 1000 + 10, aff), fixed)
    medfuse.save(medfuse.Volume(np.roll(blob, 2, axis=0) * 50, aff), moving)
    return fixed, moving


def test_register_records_the_modalities_that_chose_its_preset(tmp_path):
    """--modalities picks the preset (MR-NM against default) and so the result, yet the sidecar's parameters
    were the same with and without it."""
    fixed, moving = _blob_pair(tmp_path)
    assert main(["register", str(fixed), str(moving), "-o", str(tmp_path / "r.nii.gz"), "--threads", "1",
                 "--modalities", "MR", "NM", "-q"]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["parameters"]["modalities"] == ["MR", "NM"]
    # ... and how the moving image was put on the fixed grid, which a fuse sidecar said and this one did not.
    assert record["resample"] == {"interpolation": "linear", "fill": 0.0}
    assert main(["register", str(fixed), str(moving), "-o", str(tmp_path / "s.nii.gz"), "--threads", "1",
                 "-q"]) == 0
    assert "modalities" not in json.loads((tmp_path / "s.json").read_text())["parameters"]


def test_a_network_fusion_records_torchs_thread_count(tmp_path):
    """On a CPU the network's last digits depend on torch's thread count (2.4e-7 on the samples), which no
    sidecar said: a batch output was not reproduced by `medfuse fuse` until OMP_NUM_THREADS matched."""
    torch = pytest.importorskip("torch")
    fixed, moving = _blob_pair(tmp_path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, b = medfuse.load(fixed), medfuse.load(moving)
        assert medfuse.fuse(a, b).provenance["network_threads"] == 1
        medfuse.fuse_files(fixed, [moving], tmp_path / "f.nii.gz")
        assert json.loads((tmp_path / "f.json").read_text())["network_threads"] == 1
        assert "network_threads" not in medfuse.fuse(a, b, method="max").provenance
    finally:
        torch.set_num_threads(before)


def test_a_pets_suv_kind_and_a_4d_inputs_volume_are_in_the_sidecar(tmp_path):
    """The SUV kind and rule a PET was read in, and which volume of a 4-D file was fused, were recorded nowhere."""
    import nibabel as nib

    from medfuse.pipeline import _volume_facts

    root = Path(__file__).resolve().parents[1] / "sample_volumes"
    facts = _volume_facts(medfuse.load(root / "pet"))
    assert facts["suv"] == "bw" and "body weight" in facts["suv_source"] and "volume_index" not in facts
    four = tmp_path / "d4.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 6, 3)).astype(np.float32), np.eye(4)), str(four))
    facts = _volume_facts(medfuse.load(four, volume_index=2))
    assert facts["volume_index"] == 2 and facts["n_volumes"] == 3


def test_a_sidecar_of_relative_paths_records_the_folder_they_are_relative_to(tmp_path, monkeypatch):
    """``cd /tmp; medfuse fuse base/a.nii.gz ... -o out/f.nii.gz`` recorded ``base/a.nii.gz``, relative to a
    working folder nothing recorded: read later from elsewhere, the sidecar named no file."""
    (tmp_path / "base").mkdir()
    (tmp_path / "out").mkdir()
    _blob_pair(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    assert main(["fuse", "base/a.nii.gz", "base/b.nii.gz", "--method", "max", "-o", "out/f.nii.gz", "-q"]) == 0
    record = json.loads((tmp_path / "out" / "f.json").read_text())
    assert Path(record["working_folder"]) == tmp_path
    for entry in record["inputs"]:
        assert (Path(record["working_folder"]) / entry["path"]).is_file()
    # Absolute paths need no folder: none is recorded.
    monkeypatch.chdir(tmp_path / "out")
    assert main(["fuse", str(tmp_path / "base/a.nii.gz"), str(tmp_path / "base/b.nii.gz"), "--method", "max",
                 "-o", str(tmp_path / "out/g.nii.gz"), "-q"]) == 0
    assert "working_folder" not in json.loads((tmp_path / "out" / "g.json").read_text())
