"""Messages and options of the loaders found wrong by a probe of the Python API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError, UnreadableFileError

SAMPLES = Path(__file__).resolve().parents[2] / "sample_volumes"


def test_load_volumes_refuses_a_series_choice_for_an_image_file_as_load_does():
    """``load_volumes(nifti, series_uid='1')`` ignored the choice; ``load`` refused it."""
    from medfuse.io import load, load_volumes

    for call in (load, load_volumes):
        with pytest.raises(InvalidInputError, match="a series was chosen, but this file holds one image"):
            call(SAMPLES / "mr_t1.nii.gz", series_uid="1")
    assert len(load_volumes(SAMPLES / "mr_t1.nii.gz")) == 1


def test_a_nifti_short_by_a_few_kilobytes_says_by_how_much(tmp_path):
    """The sizes were rounded to 3 digits: "9.83 MB of voxel data, but the file holds only 9.83 MB"."""
    vol = medfuse.Volume(np.zeros((100, 100, 100), np.float32), np.eye(4))
    full = medfuse.save(vol, tmp_path / "v.nii")
    cut = tmp_path / "cut.nii"
    data = full.read_bytes()
    cut.write_bytes(data[:-1000])
    with pytest.raises(UnreadableFileError) as ei:
        medfuse.load(cut)
    msg = str(ei.value)
    assert f"{4_000_000:,} bytes" in msg and f"{len(data) - 1000:,} bytes" in msg


def test_garbage_metaimage_does_not_quote_itk_reason_success(tmp_path):
    """ITK words errno 0 as "Reason: Success", which the message quoted as the reason."""
    bad = tmp_path / "bad.mha"
    bad.write_bytes(b"garbage garbage\n" * 10)
    with pytest.raises(UnreadableFileError) as ei:
        medfuse.load(bad)
    assert "Success" not in str(ei.value) and "corrupt or truncated" in str(ei.value)
