"""Command line: only inputs are read for identifiers, trained weights for fuse, and outputs that name a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfuse.cli import EXIT_USAGE, main

SAMPLES = Path(__file__).resolve().parents[1] / "sample_volumes"


@pytest.fixture
def read_for_identifiers(monkeypatch):
    """The paths whose DICOM headers the command reads to blank identifiers from its messages."""
    import medfuse.provenance as prov

    seen = []
    real = prov.patient_identifiers

    def spy(paths):
        paths = list(paths)
        seen.extend(str(p) for p in paths)
        return real(paths)

    monkeypatch.setattr(prov, "patient_identifiers", spy)
    return seen


def test_only_inputs_are_read_for_identifiers_never_outputs(tmp_path, capsys, read_for_identifiers):
    # An output folder full of files (here: a big one stands for '/' or a cluster home) is not walked.
    out_dir = tmp_path / "big"
    out_dir.mkdir()
    for i in range(50):
        (out_dir / f"f{i}.dcm").write_bytes(b"x")
    (out_dir / "fused.nii.gz").write_bytes(b"mine")
    rc = main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o",
               str(out_dir / "fused.nii.gz"), "--method", "mean"])
    assert rc == EXIT_USAGE and "exists" in capsys.readouterr().err
    assert read_for_identifiers and not any(p.startswith(str(out_dir)) for p in read_for_identifiers)
    assert {str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz")} <= set(read_for_identifiers)


def test_a_delegated_commands_output_option_is_not_read(tmp_path, read_for_identifiers):
    import argparse

    from medfuse.cli import _identifiers

    pairs, out = tmp_path / "pairs", tmp_path / "eval"
    pairs.mkdir()
    out.mkdir()
    args = argparse.Namespace(command="evaluate", rest=[str(pairs), "--methods", "mean", "-o", str(out)],
                              output=str(out))
    assert _identifiers(args) == []
    assert read_for_identifiers == [str(pairs)]


def test_fuse_takes_trained_weights_and_records_their_hash(tmp_path, capsys):
    import json
    import shutil

    import numpy as np

    import medfuse
    from medfuse import provenance as prov

    rng = np.random.default_rng(0)
    paths = []
    for name, mod in (("mr.nii.gz", "MR"), ("pet.nii.gz", "PT")):
        vol = medfuse.Volume(rng.random((32, 32, 32)).astype(np.float32), np.eye(4), modality=mod,
                             unit="arbitrary" if mod == "MR" else "Bq/mL")
        paths.append(str(medfuse.save(vol, tmp_path / name)))
    shipped = Path(medfuse.__file__).parent / "fusion" / "weights" / "medfuse_fusion.safetensors"
    mine = shutil.copy(shipped, tmp_path / "mine.safetensors")
    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", *paths, "-o", str(out), "--weights", str(mine), "-q"]) == 0
    rec = json.loads((tmp_path / "fused.json").read_text())
    assert rec["weights_sha256"] == prov.hash_path(mine)
    # Weights with a classical rule, or a missing file: refused before any work.
    assert main(["fuse", *paths, "-o", str(tmp_path / "m.nii.gz"), "--weights", str(mine), "--method", "mean"]) == 2
    assert "classical" in capsys.readouterr().err and not (tmp_path / "m.nii.gz").exists()
    assert main(["fuse", *paths, "-o", str(tmp_path / "n.nii.gz"), "--weights", str(tmp_path / "no.safetensors")]) == 2
    assert not (tmp_path / "n.nii.gz").exists()


@pytest.mark.parametrize("name", [".", "..", "/"])
def test_an_output_that_names_a_folder_is_a_usage_error(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    rc = main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", name, "--method", "mean"])
    assert rc == EXIT_USAGE and "names a folder" in capsys.readouterr().err
    rc = main(["register", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", name])
    assert rc == EXIT_USAGE and "names a folder" in capsys.readouterr().err


def test_identifier_search_never_enters_kernel_file_systems(tmp_path, monkeypatch):
    import medfuse.provenance as prov

    fake_proc = tmp_path / "proc"
    (fake_proc / "1").mkdir(parents=True)
    (fake_proc / "1" / "pipe").write_bytes(b"x")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "IM1.dcm").write_bytes(b"x")
    monkeypatch.setattr(prov, "_PSEUDO_FS", (str(fake_proc),))
    assert [p.name for p in prov._candidate_files(tmp_path)] == ["IM1.dcm"]
