"""Patient names in other scripts and encodings are blanked like any other: Chinese, Japanese and Korean names
(two-character ones, and ones written inside other CJK text, which has no spaces between words), names whose
header spelling is ASCII-folded while the folder keeps the native letters (``YILMAZ^IBRAHIM`` /
``Yılmaz_İbrahim``, ``STRASSER^HANS`` / ``Straßer_Hans``), and folder names read under a locale that is not
UTF-8 (Latin-1 mojibake ``MÃ¼ller``, surrogate escapes ``M\\udcc3\\udcbcller``).

A locale probe found `medfuse info` printing ``series 患者王小明 PET`` and ``folder=Müller_Jürgen_CT``, and the fuse
sidecar recording ``"path": "患者王小明/PET"``, though the README promises that none of them holds a patient name.
The inputs are copies of the sample PET series with the patient module rewritten, in folders named after the
patient as hospital exports name them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")

from tests.test_privacy import _cli  # noqa: E402

from medfuse.provenance import patient_identifiers, scrub  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PET = ROOT / "sample_volumes" / "pet"
REMOVED = "[removed]"


def _series(folder: Path, name: str, charset: str, description: str = "phantom FDG PET",
            pid: str = "PX4471") -> Path:
    """The first 12 slices of the sample PET in ``folder``, with this patient name (in ``charset``)."""
    files = sorted(PET.glob("*.dcm"))[:12]
    if not files:
        pytest.skip("no sample_volumes/pet beside the package")
    folder.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()  # each copy its own series
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SpecificCharacterSet = charset
        ds.PatientName, ds.PatientID, ds.SeriesDescription = name, pid, description
        ds.save_as(folder / f.name, enforce_file_format=True)
    return folder


def _json(text: str) -> dict:
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


#: (PatientName, its character set, the folder, the series description, what must not be shown).
CASES = {
    # Two Han characters (the commonest form of a Chinese name), written inside other Chinese text.
    "zhang": ("Zhang^Wei=张^伟", "GB18030", "患者张伟全身", "PET 张伟 全身", ("张伟", "Zhang")),
    # A Japanese name with its honorific: no space before 様.
    "yamada": ("Yamada^Tarou=山田^太郎", "ISO_IR 192", "山田太郎様", "山田太郎様 PET", ("山田", "太郎", "Yamada")),
    # ASCII-folded header (older PACS exports), native spelling in the folder: ı and İ (Turkish).
    "yilmaz": ("YILMAZ^IBRAHIM", "ISO_IR 192", "Yılmaz_İbrahim_PET", "Yılmaz PET", ("Yılmaz", "İbrahim")),
    # ß written as ss in the header.
    "strasser": ("STRASSER^HANS", "ISO_IR 100", "Straßer_Hans_PET", "PET Straßer", ("Straßer", "Hans")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_info_and_its_errors_blank_the_name_as_the_folder_writes_it(tmp_path, case):
    name, charset, folder, description, shown = CASES[case]
    series = _series(tmp_path / "in" / folder / "PET", name, charset, description)
    rc, text = _cli(["info", series, "--json"])
    assert rc == 0, text
    facts = _json(text)
    assert [s for s in shown if s.casefold() in text.casefold()] == [], text
    assert REMOVED in facts["path"], facts["path"]
    assert facts["series_description"] == REMOVED  # names the patient: dropped whole
    # The listing of the study folder: the series' folder column.
    rc, text = _cli(["info", tmp_path / "in"])
    assert rc == 0 and [s for s in shown if s.casefold() in text.casefold()] == [], text
    # An error that quotes the input's path.
    rc, text = _cli(["info", series, "--series", "9"])
    assert rc != 0 and "series 9" in text, text
    assert [s for s in shown if s.casefold() in text.casefold()] == [] and REMOVED in text, text


def test_info_shows_exactly_where_the_name_stood(tmp_path):
    """The blank replaces the name's own characters in the text as written, not in its folded form."""
    for k, (case, expected) in enumerate((("zhang", "患者[removed]全身"), ("yilmaz", "[removed]_PET"),
                                          ("strasser", "[removed]_PET"), ("yamada", "[removed]様"))):
        name, charset, folder, description, _ = CASES[case]
        series = _series(tmp_path / f"s{k}" / folder / "PET", name, charset, description)
        rc, text = _cli(["info", series, "--json"])
        assert rc == 0, text
        assert _json(text)["path"].endswith(f"s{k}/{expected}/PET"), (case, text)


@pytest.mark.parametrize("case, expected", [("zhang", "患者[removed]全身/PET"), ("yilmaz", "[removed]_PET/PET")])
def test_fuse_sidecar_paths_hold_no_name(tmp_path, case, expected):
    name, charset, folder, description, shown = CASES[case]
    series = _series(tmp_path / "in" / folder / "PET", name, charset, description)
    out = tmp_path / "out"
    out.mkdir()
    rc, text = _cli(["fuse", series, series, "-o", out / "f.nii.gz", "--method", "max", "-q"])
    assert rc == 0, text
    raw = (out / "f.json").read_text(encoding="utf-8")
    record = json.loads(raw)
    paths = [i["path"] for i in record["inputs"]]
    assert len(paths) == 2 and all(p.endswith(expected) for p in paths), paths
    flat = json.dumps(record, ensure_ascii=False)
    assert [s for s in shown if s.casefold() in flat.casefold()] == [], flat


# ----------------------------------------------------------------------------- provenance.scrub itself
@pytest.fixture
def ids_of(tmp_path, patient_header):
    def ids(name: str, charset: str = "ISO_IR 192", pid: str = "PX4471"):
        return patient_identifiers([patient_header(tmp_path / f"{abs(hash(name))}.dcm", name, pid, charset=charset)])
    return ids


@pytest.mark.parametrize("name, text, expected", [
    ("张^伟", "PET 张伟 全身", "PET [removed] 全身"),
    ("张^伟", "患者张伟全身", "患者[removed]全身"),
    ("Wang^Xiaoming=王^小明", "患者王小明 PET", "患者[removed] PET"),
    ("山田^太郎", "山田太郎様_CT", "[removed]様_CT"),
    ("김^민준", "김민준님 PET", "[removed]님 PET"),
    ("Wang^Fang=王^芳", "患者Wang_Fang全身", "患者[removed]全身"),  # a Latin name next to CJK text
    ("YILMAZ^IBRAHIM", "Yılmaz_İbrahim_PET", "[removed]_PET"),
    ("STRASSER^HANS", "Straßer_Hans", "[removed]"),
    ("MULLER^JURGEN", "Müller_Jürgen_CT", "[removed]_CT"),
    ("MULLER^JURGEN", "Mu\u0308ller_Ju\u0308rgen_CT", "[removed]_CT"),  # NFD (macOS file names)
    ("MUELLER^JUERGEN", "Müller_Jürgen_CT", "[removed]_CT"),
    ("Müller^Jürgen", "MUELLER_JUERGEN_CT", "[removed]_CT"),
    ("Straßer^Hans", "STRASSER_HANS", "[removed]"),
])
def test_scrub_finds_cjk_names_in_running_text_and_folds_both_sides(ids_of, name, text, expected):
    assert scrub(text, ids_of(name)) == expected


@pytest.mark.parametrize("text", [
    "dcm/MÃ¼ller_JÃ¼rgen_CT",  # UTF-8 read as Latin-1 (LC_ALL=de_DE.ISO-8859-1)
    "dcm/M\udcc3\udcbcller_J\udcc3\udcbcrgen_CT",  # read as ASCII with surrogate escapes (LC_ALL=C, PYTHONUTF8=0)
])
def test_scrub_blanks_a_name_in_utf8_read_under_another_locale(ids_of, text):
    assert scrub(text, ids_of("Müller^Jürgen")) == "dcm/[removed]_CT"
    assert scrub(text, ids_of("MULLER^JURGEN", "ISO_IR 100")) == "dcm/[removed]_CT"


def test_scrub_blanks_cjk_mojibake_and_cp1252_mojibake(ids_of):
    cjk = "张伟".encode("utf-8")
    assert scrub(cjk.decode("latin-1") + "_PET", ids_of("张^伟")) == "[removed]_PET"
    assert scrub(cjk.decode("ascii", "surrogateescape") + "_PET", ids_of("张^伟")) == "[removed]_PET"
    assert scrub("Straße".encode("utf-8").decode("cp1252") + "r_CT", ids_of("STRASSER^HANS")) == "[removed]_CT"


@pytest.mark.parametrize("name, text", [
    ("LI^NA", "Lisbon_CT NAC li-ct na"),  # short Latin parts are never blanked alone, nor inside a word
    ("LI^NA", "患者Li全身"),
    ("王^芳", "王府井 芳香"),  # one CJK character alone is not a name
    ("张^伟", "张三 伟大"),
    ("Doe^Jane", "Janet Doerte Does"),
    ("MULLER^HANS", "Müllerstraße Hansestadt"),  # folded, still whole words only
    ("Müller^Jürgen", "Café Ã 10 µm → ü \udcc3 Ã¼x"),  # odd characters and stray mojibake bytes
])
def test_scrub_does_not_blank_innocent_text(ids_of, name, text):
    assert scrub(text, ids_of(name)) == text


def test_two_character_cjk_names_are_identifiers_and_one_character_is_not(ids_of):
    ids = ids_of("Zhang^Wei=张^伟", "GB18030")
    assert "张伟" in ids and "张" not in ids and "伟" not in ids
    assert "Wei" in ids and not any(len(i) < 3 and i.isascii() for i in ids)  # short Latin parts: as before
    assert "Li" not in ids_of("LI^NA") and "LI" not in ids_of("LI^NA")


def test_scrub_never_fails_on_odd_text(ids_of):
    ids = ids_of("Müller^Jürgen")
    odd = ["", "\udcc3", "Ã", "\u0308Müller", "Müller\u0308", "ﬀ", "\U0001f600 Müller", "\x00Müller\x9f",
           "\udcff\udcfe", "Ã\udcbc", "𠀀𠀁", "Ｍüｌｌｅｒ", "İ" * 50, "ß" * 50, "\udce5\udcbc"]
    for text in odd:
        assert isinstance(scrub(text, ids), str)
    assert scrub("\U0001f600 Müller", ids) == "\U0001f600 [removed]"


# ----------------------------------------------------------------------------- a real process in the C locale
def test_info_under_the_c_locale_blanks_a_non_ascii_folder(tmp_path):
    """LC_ALL=C and PYTHONUTF8=0: Python reads the folder name as surrogate escapes; `info` printed
    ``folder=Müller_Jürgen_PET`` (the raw bytes) beside ``[removed]`` in the name column."""
    name = "Müller^Jürgen"
    _series(tmp_path / "in" / "Müller_Jürgen_PET", name, "ISO_IR 192")
    _series(tmp_path / "in" / "Müller_Jürgen_CT", name, "ISO_IR 100")  # two series: a listing with folders
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8", "PYTHONIOENC"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "medfuse.cli", "info", os.fsencode(tmp_path / "in")],
                          capture_output=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert b"folder=[removed]_PET" in out and b"folder=[removed]_CT" in out, out
    for shown in ("Müller", "Jürgen", "MÃ¼ller"):
        assert shown.encode("utf-8") not in out, out


def test_a_folder_named_in_latin1_bytes_is_blanked_as_read_and_as_shown():
    """A folder named from an ISO_IR 100 PatientName by an old exporter: its bytes are not UTF-8, so a UTF-8
    process holds them as surrogates (M\\udcfcller) and messages show them as \\xfc; neither was blanked."""
    import os

    from medfuse.provenance import _spellings, scrub

    ids = _spellings("PatientName", "M\u00fcller^Hans")
    assert scrub(os.fsdecode(b"/data/M\xfcller_Hans/ct"), ids) == "/data/[removed]/ct"
    assert scrub("/data/M\\xfcller_Hans/ct", ids) == "/data/[removed]/ct"
    assert scrub("/data/M\\x41ller/ct", ids) == "/data/M\\x41ller/ct"  # an ASCII escape is left as it is


def test_a_cjk_name_is_not_looked_for_given_name_first():
    from medfuse.provenance import _values, scrub

    ids = _values({"PatientName": "\u5f20^\u4f1f"})  # 张^伟, as patient_identifiers reads a header
    assert scrub("\u60a3\u8005\u5f20\u4f1f\u5168\u8eab", ids) == "\u60a3\u8005[removed]\u5168\u8eab"
    assert scrub("\u4f1f\u5f20", ids) == "\u4f1f\u5f20"  # 伟张: not a way the name is written
