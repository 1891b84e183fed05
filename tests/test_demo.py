"""`medfuse demo`: the sample MR + PET end to end; the PET lesion shows in the fused volume where it belongs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse import provenance as prov
from medfuse.cli import main
from medfuse.phantom import load_ground_truth

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_volumes"


def _sphere_mean(vol, centre, radius_mm):
    idx = np.rint(vol.world_to_index(centre)).astype(int)
    r = int(np.ceil(radius_mm / min(vol.spacing))) + 1
    sl = tuple(slice(max(0, c - r), c + r + 1) for c in idx)
    grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in sl], indexing="ij"), -1)
    inside = np.linalg.norm(vol.index_to_world(grid) - centre, axis=-1) <= radius_mm
    return float(vol.array[sl][inside].mean())


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo_output"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    fused_path = out / "fused.nii.gz"
    for name in ("fused.nii.gz", "fused.png", "fused.json", "pet_to_mr.tfm"):
        assert (out / name).is_file(), name
        assert str(out / name) in printed  # the demo says where everything went

    fused = medfuse.load(fused_path)
    mr = medfuse.load(SAMPLES / "mr_t1.nii.gz")
    assert fused.same_grid(mr)
    rec = json.loads((out / "fused.json").read_text())
    assert rec["output"]["sha256"] == prov.hash_path(fused_path)
    assert rec["registration"][0]["kind"] == "rigid" and not rec["registration"][0]["suspect"]
    assert rec["method_used"] in ("network", "laplacian")
    if rec["method_used"] != "network":
        assert rec["fallback"]["requested"] == "network"  # the fallback is recorded, not silent
    else:
        assert rec["weights_sha256"]
        assert rec["network_functional"] is True  # MR + PET: the 3-D path keeps PET uptake (coarse pixel rule)
        assert rec["network_path"] == "tri-plane 3-D"

    # The lesion: a hot spot on the PET, but its core is darker than white matter on the MR T1.
    # In the fused volume the lesion core must be brighter than the same point in the other
    # hemisphere, a contrast flip only the correctly registered PET can produce. Misregistered by the
    # sample's 14 mm, both checks fail (measured, Laplacian rule: core - mirror = -0.22, shift 0.12).
    gt = load_ground_truth(SAMPLES)["lesion"]
    c = np.asarray(gt["center_lps_mm"], dtype=float)
    mirror = c * np.array([-1.0, 1.0, 1.0])
    lo, hi = np.percentile(mr.array, [0.5, 99.5])
    mr01 = mr.with_array(np.clip((mr.array - lo) / (hi - lo), 0, 1))
    f_contrast = _sphere_mean(fused, c, 3.0) - _sphere_mean(fused, mirror, 3.0)
    mr_contrast = _sphere_mean(mr01, c, 3.0) - _sphere_mean(mr01, mirror, 3.0)
    assert mr_contrast < -0.2  # on the MR alone the core is clearly darker
    assert f_contrast > 0.0, f_contrast
    assert f_contrast - mr_contrast > 0.2, (f_contrast, mr_contrast)

    from PIL import Image

    png = Image.open(out / "fused.png")
    assert png.width > 2 * png.height and np.asarray(png).std() > 10  # three panels, not blank

    # running it again rewrites its own files (make demo twice)
    assert main(["demo", "--out", str(out), "--no-progress", "--method", "mean"]) == 0
    assert json.loads((out / "fused.json").read_text())["method_used"] == "mean"


def test_demo_refuses_a_folder_with_files_it_did_not_write(tmp_path, capsys):
    # The demo rewrites its own files (make demo twice), but wrote over a user's files of the same names too.
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "fused.nii.gz").write_bytes(b"my own fused volume")
    assert main(["demo", "--out", str(mine), "--method", "mean", "-q"]) == 2
    err = capsys.readouterr().err
    assert "fused.nii.gz" in err and "not written by medfuse demo" in err and "Fix:" in err
    assert (mine / "fused.nii.gz").read_bytes() == b"my own fused volume"
    assert sorted(p.name for p in mine.iterdir()) == ["fused.nii.gz"]


def test_a_cancelled_demo_leaves_no_folder_and_its_own_folder_is_rewritten(tmp_path, capsys, monkeypatch):
    import medfuse.pipeline as pipeline
    from medfuse.errors import CancelledError

    def cancelled(*a, **k):
        raise CancelledError()

    monkeypatch.setattr(pipeline, "fuse_files", cancelled)
    out = tmp_path / "demo_output"
    assert main(["demo", "--out", str(out), "--method", "mean", "-q"]) == 130
    assert not out.exists()  # a folder this run made is not left behind (empty but for the demo's mark)
    # the demo's own folder (marked by an earlier run): its files are rewritten, not refused
    out.mkdir()
    (out / ".medfuse-demo").write_text("x")
    (out / "fused.png").write_bytes(b"an earlier demo's picture")
    assert main(["demo", "--out", str(out), "--method", "mean", "-q"]) == 130  # got past the check
    assert "not written by medfuse demo" not in capsys.readouterr().err


def test_switching_anatomy_leaves_one_consistent_set(tmp_path, capsys):
    """`demo`, then `demo --anatomy ct` in the same folder left pet_to_mr.tfm beside the CT run's files."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--method", "mean", "-q"]) == 0
    assert (out / "pet_to_mr.tfm").is_file()
    assert main(["demo", "--out", str(out), "--method", "mean", "--anatomy", "ct"]) == 0
    assert "removed pet_to_mr.tfm" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".medfuse-demo", "fused.json", "fused.nii.gz", "fused.png",
                                                     "pet_to_ct.tfm"]
    assert Path(json.loads((out / "fused.json").read_text())["inputs"][0]["path"]).name == "ct"
