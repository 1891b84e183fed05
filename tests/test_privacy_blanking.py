"""``medfuse info`` blanks like every other command; the cancel message, ``--debug``
tracebacks, internal errors and evaluate's summary line are blanked; and ``provenance.scrub`` finds the names and
IDs as real exports spell them (NFD file names, ASCII-folded names, IDs with other punctuation).

The study is written in folders named after the patient, as a hospital export names them
(``DOE^JANE_MRN123456_ct``), with series descriptions that quote the name.
"""

from __future__ import annotations

import json
import signal
import unicodedata
from pathlib import Path

import pytest

pytest.importorskip("pydicom")

from tests.test_privacy import CT_UID, PT_UID, _cli, leaks, phi_series  # noqa: E402

from medfuse.provenance import patient_identifiers, scrub  # noqa: E402

#: What the listing must not show: the patient's name and ID in any spelling (the UIDs are the user's to see).
PATIENT = ("Doe", "Jane", "MRN123456", "123456")


def _export(tmp_path: Path, *, ct_description="ax_asc Doe Jane", pt_description="PET static"):
    """A study folder holding a CT and a PET series, each in a folder named after the patient."""
    root = tmp_path / "in"
    ct = phi_series(root / "DOE^JANE_MRN123456_ct", modality="CT", description=ct_description)
    pt = phi_series(root / "DOE^JANE_MRN123456_pt", modality="PT", description=pt_description)
    (tmp_path / "out").mkdir()
    return root, ct, pt, tmp_path / "out"


# ----------------------------------------------------------------------------- medfuse info
def test_info_of_one_series_blanks_its_path_and_a_description_naming_the_patient(tmp_path):
    """`medfuse info "in/DOE^JANE_PID12345_ts"` printed the path and "series  ax_asc_35sl Doe Jane", though its
    help says it never shows patient identifiers; the JSON held them under "path" and "series_description"."""
    _, ct, pt, _ = _export(tmp_path)
    rc, text = _cli(["info", ct])
    assert rc == 0, text
    assert leaks(text, PATIENT) == [], text
    assert "[removed]_[removed]_ct" in text and "series       [removed]" in text
    rc, text = _cli(["info", ct, "--json"])
    facts = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert leaks(text, PATIENT) == [], text
    assert facts["path"].endswith("[removed]_[removed]_ct") and facts["series_description"] == "[removed]"
    assert facts["series_uid"] == CT_UID  # the user picks a series by it
    # A description that names no one is shown as it is.
    rc, text = _cli(["info", pt, "--json"])
    assert json.loads(text[text.index("{"):text.rindex("}") + 1])["series_description"] == "PET static"


def test_info_listing_of_a_study_blanks_folders_and_descriptions_and_keeps_uids(tmp_path):
    """`medfuse info in` listed "ax_asc_35sl Doe Jane  folder=DOE^JANE_PID12345_mr"; --json its rows' "folder"
    and "description"."""
    root, _, _, _ = _export(tmp_path)
    rc, text = _cli(["info", root])
    assert rc == 0, text
    assert leaks(text, PATIENT) == [], text
    assert "folder=[removed]_[removed]_ct" in text and "PET static" in text
    assert f"uid={CT_UID}" in text and f"uid={PT_UID}" in text
    rc, text = _cli(["info", root, "--json"])
    listing = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert leaks(text, PATIENT) == [], text
    assert {r["series_uid"] for r in listing["series"]} == {CT_UID, PT_UID}
    assert sorted(r["description"] for r in listing["series"]) == ["PET static", "[removed]"]
    rc, text = _cli(["info", root, "--series", "CT"])
    assert rc == 0 and leaks(text, PATIENT) == [], text


def test_info_keeps_a_uid_that_holds_the_patient_id_digits(tmp_path):
    """The listing's UIDs are added after the blanking: a numeric patient ID inside a UID must not break it."""
    root = tmp_path / "study"
    uid = "1.2.999.123456.7"
    phi_series(root / "a", modality="CT", uid=uid, extra={"PatientID": "123456"})
    phi_series(root / "b", modality="PT")
    rc, text = _cli(["info", root])
    assert rc == 0 and f"uid={uid}" in text, text


# ----------------------------------------------------------------------------- the other unblanked lines
def test_cancel_message_blanks_the_outputs_it_names(tmp_path, monkeypatch):
    """"cancelled; kept what was complete before the cancel: <paths>" was printed raw."""
    import medfuse.io.writers as writers

    _, ct, pt, out = _export(tmp_path)
    real = writers._save_nifti

    def save(*a, **k):  # the first Ctrl-C, while the output is written
        signal.raise_signal(signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(writers, "_save_nifti", save)
    target = out / "Doe_Jane_MRN123456_fused.nii.gz"
    rc, text = _cli(["fuse", ct, pt, "-o", target, "--method", "max", "-q"])
    assert rc == 130, text
    assert "kept what was complete before the cancel: " in text and "out/[removed]_[removed]_fused.nii.gz" in text
    assert leaks(text, PATIENT) == [], text


@pytest.mark.parametrize("error", ["medfuse", "oserror"])
def test_debug_traceback_is_blanked(tmp_path, monkeypatch, error):
    """--debug printed Python's traceback, whose last line quotes the path the error is about, unblanked (a
    medfuse error, and an OSError the user can fix such as permission denied)."""
    import errno

    import medfuse.pipeline as pipeline
    from medfuse.errors import UnsupportedDataError

    _, ct, pt, out = _export(tmp_path)

    def failing(fixed, *a, **k):
        if error == "medfuse":
            raise UnsupportedDataError("cannot fuse this input", fix="give another", path=fixed)
        raise PermissionError(errno.EACCES, "Permission denied", str(fixed))

    monkeypatch.setattr(pipeline, "fuse_files", failing)
    rc, text = _cli(["--debug", "fuse", ct, pt, "-o", out / "f.nii.gz", "--method", "max", "--no-progress"])
    assert rc == 2 and "Traceback (most recent call last)" in text and "[removed]_[removed]_ct" in text, text
    assert leaks(text, PATIENT) == [], text


@pytest.mark.parametrize("debug", [False, True])
def test_internal_error_line_and_traceback_are_blanked(tmp_path, monkeypatch, debug):
    """A bug's one line quoted ``str(e)`` (its first 300 characters) unblanked, and --debug its traceback."""
    import medfuse.pipeline as pipeline

    _, ct, pt, out = _export(tmp_path)

    def broken(fixed, *a, **k):
        raise RuntimeError(f"unexpected state reading {fixed}")

    monkeypatch.setattr(pipeline, "fuse_files", broken)
    rc, text = _cli([*(["--debug"] if debug else []), "fuse", ct, pt, "-o", out / "f.nii.gz", "--method", "max"])
    assert rc == 3 and "internal error: RuntimeError: unexpected state reading" in text, text
    assert ("Traceback" in text) == debug
    assert leaks(text, PATIENT) == [], text


def test_evaluate_summary_line_blanks_the_output_folder(tmp_path):
    """evaluate's last line "wrote out/eval_DOE^JANE/metrics.csv and ..." was not blanked."""
    _, ct, pt, out = _export(tmp_path)
    rc, text = _cli(["evaluate", "--pair", ct, pt, "--methods", "max", "--mode", "native", "--out",
                     out / "eval_DOE^JANE", "--no-progress"])
    assert rc == 0, text
    assert "eval_[removed]/metrics.csv" in text and leaks(text, PATIENT) == [], text


# ----------------------------------------------------------------------------- spellings scrub finds
@pytest.mark.parametrize("header_form, text_form", [("NFC", "NFD"), ("NFD", "NFC")])
def test_a_name_is_found_whatever_its_unicode_normal_form(tmp_path, patient_header, header_form, text_form):
    """macOS writes file names in NFD: "MÜLLER^JÜRGEN_pet" from Finder did not match the header's NFC name."""
    name = unicodedata.normalize(header_form, "Müller^Jürgen")
    ids = patient_identifiers([patient_header(tmp_path / "x.dcm", name, "AB-123/45", charset="ISO_IR 192")])
    folder = unicodedata.normalize(text_form, "in/MÜLLER^JÜRGEN_pet/jürgen müller.dcm")
    assert scrub(folder, ids) == "in/[removed]_pet/[removed].dcm"


def test_ascii_folded_names_and_ids_with_other_punctuation_are_found(tmp_path, patient_header):
    """PACS exports write "Müller^Jürgen" as MULLER_JURGEN or MUELLER_JUERGEN, and the ID "AB-123/45" as
    AB-123-45, AB_123_45 or AB12345 (a "/" cannot be in a file name)."""
    ids = patient_identifiers([patient_header(tmp_path / "x.dcm", "Müller^Jürgen", "AB-123/45",
                                              charset="ISO_IR 192")])
    for text in ("MULLER_JURGEN", "MUELLER_JUERGEN", "mueller.juergen", "Jurgen Muller", "AB-123-45", "AB_123_45",
                 "AB12345", "ab 123 45"):
        assert scrub(f"out/{text}_pet", ids) == "out/[removed]_pet", text
    ids = patient_identifiers([patient_header(tmp_path / "y.dcm", "Strauß^Bjørn", "X1", charset="ISO_IR 192")])
    assert scrub("STRAUSS_BJORN Strauss-Bjorn", ids) == "[removed] [removed]"


def test_short_and_partial_words_are_still_left_alone(tmp_path, patient_header):
    """The new spellings keep the old rules: a part under 3 characters is not blanked alone, nor an ID whose
    letters and digits are under 3 written another way, and a name does not blank a longer word."""
    ids = patient_identifiers([patient_header(tmp_path / "x.dcm", "Li^Wu", "A-1", charset="ISO_IR 192")])
    assert scrub("Li Wu, li_wu, LiWu", ids) == "[removed], [removed], [removed]"
    assert scrub("Li/ct Wu a 1 mm A1 a.1 spacing 1.2 x 1.2", ids) == "Li/ct Wu a 1 mm A1 a.1 spacing 1.2 x 1.2"
    ids = patient_identifiers([patient_header(tmp_path / "y.dcm", "Doe^Jane", "12345", charset="ISO_IR 192")])
    assert scrub("so does Janet, Doerte and Doe_Jane in 9123456 at 12.5 mm", ids) == \
        "so does Janet, Doerte and [removed] in 9123456 at 12.5 mm"
    # "Doé" (NFD) is a spelling of DOE, as "Müller" is of MULLER: blanked, accent and all; a longer word is not.
    assert scrub(unicodedata.normalize("NFD", "Doé"), ids) == "[removed]"
    assert scrub(unicodedata.normalize("NFD", "Doéx"), ids) == unicodedata.normalize("NFD", "Doéx")


def test_scrub_leaves_hashes_and_values_other_than_strings():
    digest = "ab" + "0" * 60 + "12"
    assert scrub({"sha256": digest, "n": 3, "p": ["x/AB-123-45"]}, ["AB-123/45"]) == \
        {"sha256": digest, "n": 3, "p": ["x/[removed]"]}


def test_an_ids_punctuation_does_not_blank_numbers_next_to_digits(tmp_path, patient_header):
    """Review: an ID's parts joined by "." or ", " blanked numbers ("12-345" in "a 12.345 mm shift" and in
    "(12, 345, 40)"), and "CT-01" blanked "the CT 01 volume"; in file names they stay blanked."""
    ids = patient_identifiers([patient_header(tmp_path / "x.dcm", "Doe^Jane", "12-345")])
    for text in ("a 12.345 mm shift", "grid (12, 345, 40)", "uid 1.2.840.12.345.6"):
        assert scrub(text, ids) == text
    assert scrub("case_12345 12_345 12-345 12 345", ids) == "case_[removed] [removed] [removed] [removed]"
    ids = patient_identifiers([patient_header(tmp_path / "y.dcm", "Doe^Jane", "CT-01")])
    assert scrub("the CT 01 volume", ids) == "the CT 01 volume"
    assert scrub("out/CT_01_pet out/ct01", ids) == "out/[removed]_pet out/[removed]"
