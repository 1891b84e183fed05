"""Provenance hashes: an image written as header + data file is hashed as one."""

from __future__ import annotations

import numpy as np
import pytest

from medfuse import Volume
from medfuse.io.writers import save
from medfuse.provenance import hash_path


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_detached_header_hash_covers_the_data_file(tmp_path, suffix):
    vol = Volume(np.arange(512, dtype=np.float32).reshape(8, 8, 8), np.eye(4))
    header = save(vol, tmp_path / f"img{suffix}")
    before = hash_path(header)
    data = [p for p in tmp_path.iterdir() if p != header]
    assert len(data) == 1
    raw = bytearray(data[0].read_bytes())
    raw[-1] ^= 1  # one changed voxel byte; the header is untouched
    data[0].write_bytes(bytes(raw))
    assert hash_path(header) != before
