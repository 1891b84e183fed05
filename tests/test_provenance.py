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


# ----------------------------------------------------------------------------- no patient identifiers in sidecars
@pytest.mark.parametrize("folder, name, pid, dob, leaks", [
    ("Li_Wu_1960-01-02", "Li^Wu", "A7", "19600102", ["li_wu", "1960-01-02"]),  # parts too short alone
    ("WU-LI", "Li^Wu", "A7", "19600102", ["wu-li"]),
    ("doe.jane.02.01.1960", "Doe^Jane", "MRN1", "19600102", ["doe", "jane", "02.01.1960"]),
    ("JaneDoe", "Doe^Jane", "MRN1", "", ["janedoe"]),
    ("Yamada_Tarou", "Yamada^Tarou=^=", "X1", "", ["tarou"]),  # component groups (ideographic/phonetic) after "="
    ("case_12345", "Doe^Jane", "12-345", "", ["12345"]),        # the ID without its punctuation
])
def test_sidecar_blanks_identifiers_as_folders_spell_them(tmp_path, patient_header, folder, name, pid, dob,
                                                           leaks):
    import json

    from medfuse.provenance import build, write_sidecar

    series = tmp_path / folder
    patient_header(series / "IM1", name, pid, dob)
    out = tmp_path / "fused.nii.gz"
    rec = build(inputs=[{"role": "fixed", "path": str(series), "sha256": "0" * 64}], output=out,
                extra={"per_input": {str(series): "a key naming the input"}})  # keys are scrubbed too
    text = write_sidecar(out, rec, input_paths=[series]).read_text(encoding="utf-8")
    assert json.loads(text)["inputs"][0]["sha256"] == "0" * 64
    for leak in leaks:
        assert leak not in text.lower(), (leak, text)


def test_scrub_leaves_hashes_whole():
    from medfuse.provenance import scrub

    digest = "abe" + "0" * 58 + "123"  # a SHA-256 hex digest that happens to contain a short name and an ID
    rec = {"sha256": digest, "path": "/data/Abe_123/ct", "abe": 1}
    out = scrub(rec, ["Abe", "123"])
    assert out["sha256"] == digest
    assert out["path"] == "/data/[removed]_[removed]/ct" and "[removed]" in out


def test_sidecar_never_replaces_an_input(tmp_path, patient_header):
    """A DICOM file that happens to sit where the sidecar goes is an input: refused, left as it was."""
    from medfuse.errors import OutputExistsError
    from medfuse.provenance import build, write_sidecar

    dcm = tmp_path / "fused.json"
    patient_header(dcm, "Doe^Jane", "MRN1", "19600102")
    before = dcm.read_bytes()
    with pytest.raises(OutputExistsError, match="source"):
        write_sidecar(tmp_path / "fused.nii.gz", build(inputs=[]), input_paths=[dcm])
    assert dcm.read_bytes() == before


def test_birth_date_and_name_spellings_in_values(tmp_path, patient_header):
    from medfuse.provenance import patient_identifiers, scrub

    dcm = tmp_path / "IM1"
    patient_header(dcm, "Li^Wu", "A7", "19600102")
    ids = patient_identifiers([dcm])
    paths = ["/d/1960-01-02/ct", "/d/02.01.1960/ct", "/d/19600102/ct", "/d/Wu_Li/ct", "/d/li wu/ct"]
    assert scrub(paths, ids) == ["/d/[removed]/ct"] * 5
    assert scrub("/d/Li/ct", ids) == "/d/Li/ct"  # a two-letter part alone is not blanked (too much innocent text)


def test_folder_hash_ignores_hidden_files_like_the_reader(tmp_path):
    """Finder's .DS_Store (or a temp file) in a DICOM folder made its input hash change, so batch redid the
    subject; a change to a file the reader reads still changes it."""
    d = tmp_path / "series"
    d.mkdir()
    (d / "IM1.dcm").write_bytes(b"slice one")
    (d / "IM2.dcm").write_bytes(b"slice two")
    before = hash_path(d)
    (d / ".DS_Store").write_bytes(b"finder")
    (d / ".medfuse-tmp-x").write_bytes(b"partial")
    assert hash_path(d) == before
    (d / "IM2.dcm").write_bytes(b"slice 2")
    assert hash_path(d) != before


def test_scrub_blanks_identifiers_as_whole_words():
    """A family name "Doe" turned the batch error's "so does" into "so [removed]s"; a name part or an ID is
    blanked where it stands alone or joined by punctuation or digits, not inside a longer word or number."""
    from medfuse.provenance import scrub

    text = "so does Doe_Jane/doe1960/ID 12345 in 9123456, P12345"
    assert scrub(text, ["Doe", "12345"]) == "so does [removed]_Jane/[removed]1960/ID [removed] in 9123456, P[removed]"
