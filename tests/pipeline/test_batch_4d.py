"""A 4-D image in a manifest: the row's fix is one a batch can follow (a manifest has no volume_index)."""

import csv

import nibabel as nib
import numpy as np

import medfuse
from medfuse.batch import run_batch


def test_a_4d_moving_image_gets_a_fix_a_manifest_can_follow(tmp_path):
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((12, 12, 10)).astype(np.float32), np.eye(4)), str(tmp_path / "mr.nii.gz"))
    nib.save(nib.Nifti1Image(rng.random((12, 12, 10, 3)).astype(np.float32), np.eye(4)), str(tmp_path / "pet.nii.gz"))
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["subject", "fixed", "moving", "output"],
                                  ["s1", "mr.nii.gz", "pet.nii.gz", "out/s1.nii.gz"]])
    summary = run_batch(manifest, scheduler="synchronous", method="max", register=None)
    (row,) = summary.results
    assert row.status == "failed" and "4-D" in row.error
    assert "pass volume_index" not in row.error and "name that file in the manifest" in row.error
    assert medfuse.load(tmp_path / "pet.nii.gz", volume_index=0).shape == (12, 12, 10)  # the advice works
