"""MetaImage/NRRD headers from a tampered data share: data files named outside the header's folder (absolute,
``..``), NRRD in bzip2 or in several files, and slice lists or patterns claiming 10^9 slices. Each is refused,
typed, before ITK reads (or allocates) anything; data files below the header's folder, and links in it that
point elsewhere (git-annex, DataLad), still load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.errors import UnreadableFileError

_VOXELS = bytes(range(1, 9))  # 2x2x2 MET_UCHAR / uchar
_FIX = "copy the data file beside the header and name it without a folder"


def _mhd(folder: Path, data_file: str, *, names=(), dims="2 2 2", extra=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["ObjectType = Image", "NDims = 3", f"DimSize = {dims}", "ElementType = MET_UCHAR",
             "ElementSpacing = 1 1 1", *extra, f"ElementDataFile = {data_file}", *names]
    (folder / "img.mhd").write_text("\n".join(lines) + "\n")
    return folder / "img.mhd"


def _nhdr(folder: Path, data_file: str, *, sizes="2 2 2", type_="uchar", encoding="raw", after=(),
          name="img.nhdr", comments=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["NRRD0004", f"type: {type_}", "dimension: 3", f"sizes: {sizes}", "endian: little",
             "space: left-posterior-superior", "space directions: (1,0,0) (0,1,0) (0,0,1)",
             f"encoding: {encoding}", *(["# " + "x" * 70] * comments), f"data file: {data_file}", *after]
    (folder / name).write_text("\n".join(lines) + "\n\n")
    return folder / name


def _forbidden(*args, **kwargs):
    raise AssertionError("SimpleITK was asked to read the image before medfuse refused it")


@pytest.fixture
def no_itk_read(monkeypatch):
    """SimpleITK must not be asked anything (its header reading included): any reader fails the test."""
    import SimpleITK as sitk

    monkeypatch.setattr(sitk, "ReadImage", _forbidden)
    monkeypatch.setattr(sitk, "ImageFileReader", _forbidden)


@pytest.fixture
def no_itk_voxel_read(monkeypatch):
    """SimpleITK may read the header's sizes (a MetaImage's slice count needs them), not the voxels."""
    import SimpleITK as sitk

    monkeypatch.setattr(sitk, "ReadImage", _forbidden)


@pytest.fixture
def secret(tmp_path) -> Path:
    """A readable file outside the headers' folder (hdr/), of exactly the 2x2x2 voxels the headers claim."""
    f = tmp_path / "secret.raw"
    f.write_bytes(_VOXELS)
    return f


# ------------------------------------------------------------------------------------------ 1. outside the folder
@pytest.mark.parametrize("how", ["absolute", "traversal", "colon", "colon-value"])
def test_a_metaimage_data_file_outside_the_header_folder_is_refused(tmp_path, secret, no_itk_read, how):
    """Was read silently: ElementDataFile = /etc/passwd loaded as voxels. MetaIO also takes ':' as the separator
    and skips '=' and ':' before the value, so those spellings must be judged too."""
    line = {"absolute": str(secret), "traversal": "../secret.raw", "colon": str(secret),
            "colon-value": f":{secret}"}[how]
    p = _mhd(tmp_path / "hdr", line)
    if how == "colon":
        p.write_text(p.read_text().replace("ElementDataFile = ", "ElementDataFile : "))
    with pytest.raises(UnreadableFileError, match="absolute path" if how != "traversal" else "'\\.\\.'") as e:
        medfuse.load(p)
    assert _FIX in e.value.fix and "ElementDataFile" in e.value.fix


@pytest.mark.parametrize("how", ["absolute", "traversal", "deep-traversal", "datafile-spelling"])
def test_an_nrrd_data_file_outside_the_header_folder_is_refused(tmp_path, secret, no_itk_read, how):
    name = {"absolute": str(secret), "traversal": "../secret.raw", "deep-traversal": "sub/../../secret.raw",
            "datafile-spelling": str(secret)}[how]
    p = _nhdr(tmp_path / "hdr", name)
    (tmp_path / "hdr" / "sub").mkdir()  # so that sub/../.. resolves (ITK read it)
    if how == "datafile-spelling":
        p.write_text(p.read_text().replace("data file:", "DataFile:"))
    with pytest.raises(UnreadableFileError, match="absolute path|'\\.\\.'") as e:
        medfuse.load(p)
    assert _FIX in e.value.fix



@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\x1c", "\x85"])
@pytest.mark.parametrize("kind", ["mhd", "nhdr"])
def test_a_data_file_line_hidden_in_a_comment_does_not_pass_the_check(tmp_path, secret, no_itk_read, kind,
                                                                      separator):
    """str.splitlines breaks at \\x0b, \\x0c, \\x1c-\\x1e and \\x85; ITK only at newlines. A comment holding one
    showed medfuse a harmless data-file line, and ITK then read the real one outside the folder (review)."""
    folder = tmp_path / "hdr"
    (folder).mkdir()
    (folder / "good.raw").write_bytes(_VOXELS)
    if kind == "mhd":
        p = _mhd(folder, "../secret.raw", extra=[f"Comment = c{separator}ElementDataFile = good.raw"])
    else:
        p = _nhdr(folder, "../secret.raw")
        p.write_text(p.read_text().replace("encoding: raw\n", f"encoding: raw\n# c{separator}data file: good.raw\n"))
    with pytest.raises(UnreadableFileError, match="'\\.\\.'"):
        medfuse.load(p)


def test_an_nrrd_data_file_named_through_a_colon_equals_folder_is_judged(tmp_path, secret, no_itk_read):
    """A line with ':=' after its ': ' is a field to NrrdIO (a key:=value pair only has ':=' first); skipped here,
    its data file ':=/../../secret.raw' went unchecked (review)."""
    folder = tmp_path / "hdr"
    (folder / ":=").mkdir(parents=True)
    p = _nhdr(folder, ":=/../../secret.raw")
    with pytest.raises(UnreadableFileError, match="'\\.\\.'"):
        medfuse.load(p)

def test_a_data_file_field_past_64_kb_of_comments_is_still_judged(tmp_path, secret, no_itk_read):
    """The header was read for its data file in its first 64 kB only: one padded past them went unchecked."""
    p = _nhdr(tmp_path / "hdr", str(secret), comments=1200)
    assert p.stat().st_size > 65536
    with pytest.raises(UnreadableFileError, match="absolute path"):
        medfuse.load(p)


def test_a_metaimage_list_entry_outside_the_header_folder_is_refused(tmp_path, secret, no_itk_voxel_read):
    folder = tmp_path / "hdr"
    folder.mkdir()
    (folder / "s0.raw").write_bytes(_VOXELS[:4])
    p = _mhd(folder, "LIST", names=["s0.raw", str(secret)])
    with pytest.raises(UnreadableFileError, match=f"'{secret}'.*absolute path") as e:
        medfuse.load(p)
    assert _FIX in e.value.fix


def test_a_missing_data_file_outside_the_folder_says_nothing_of_its_existence(tmp_path, secret, no_itk_read):
    """Was an existence oracle: "...is missing: /root/.ssh/id_rsa" for a missing file, voxels for a present one."""
    there, absent = _mhd(tmp_path / "a", str(secret)), _mhd(tmp_path / "b", str(tmp_path / "absent.raw"))
    messages = []
    for p, name in ((there, str(secret)), (absent, str(tmp_path / "absent.raw"))):
        with pytest.raises(UnreadableFileError) as e:
            medfuse.load(p)
        messages.append(e.value.problem.replace(name, "NAME"))
    assert messages[0] == messages[1] and "missing" not in messages[0]


def test_a_data_file_in_a_folder_below_the_header_loads(tmp_path):
    folder = tmp_path / "hdr"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "x.raw").write_bytes(_VOXELS)
    for p in (_mhd(folder, "data/x.raw"), _nhdr(folder, "data/x.raw")):
        v = medfuse.load(p)
        assert v.array.shape == (2, 2, 2) and sorted(v.array.ravel().tolist()) == list(range(1, 9))


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="symbolic links")
def test_a_link_in_the_header_folder_to_data_elsewhere_loads(tmp_path, secret):
    """git-annex and DataLad keep data as links into .git/annex: the name is judged, not where it leads."""
    folder = tmp_path / "hdr"
    folder.mkdir()
    (folder / "x.raw").symlink_to(secret)
    (folder / "s0.raw").symlink_to(os.path.relpath(secret, folder))
    for p in (_mhd(folder, "x.raw"), _nhdr(folder, "x.raw")):
        assert sorted(medfuse.load(p).array.ravel().tolist()) == list(range(1, 9))
    (folder / "s1.raw").write_bytes(_VOXELS[4:])
    p = _mhd(folder, "LIST", names=["s0.raw", "s1.raw"], dims="2 2 2")
    (folder / "s0.raw").unlink()
    short = tmp_path / "four.raw"
    short.write_bytes(_VOXELS[:4])
    (folder / "s0.raw").symlink_to(short)
    assert sorted(medfuse.load(p).array.ravel().tolist()) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_an_nrrd_data_file_written_after_several_blanks_is_found(tmp_path):
    """NrrdIO skips every blank before the value; one space was taken off, so '   x.raw' was 'missing'."""
    folder = tmp_path / "hdr"
    folder.mkdir()
    (folder / "x.raw").write_bytes(_VOXELS)
    p = _nhdr(folder, "   x.raw")
    assert sorted(medfuse.load(p).array.ravel().tolist()) == list(range(1, 9))


# ------------------------------------------------------------------------------------------ 2. NRRD bombs
@pytest.mark.parametrize("encoding", ["bzip2", "bz2"])
def test_a_bzip2_nrrd_is_refused_before_itk_allocates(tmp_path, no_itk_read, encoding):
    """ITK's NrrdIO has no bzip2 decoder but allocated the claimed size first: 1 kB made 1.5 GB."""
    p = tmp_path / "b.nrrd"
    p.write_bytes(b"NRRD0004\ntype: float\nendian: little\ndimension: 3\nsizes: 1500 1500 1500\nencoding: "
                  + encoding.encode() + b"\n\nBZh9" + bytes(1000))
    with pytest.raises(UnreadableFileError, match="bzip2") as e:
        medfuse.load(p)
    assert "raw or gzip" in e.value.fix


@pytest.mark.parametrize("data_file, after", [
    ("LIST 2", ["x1.raw"] * 1500),  # the same 100-byte file 1500 times
    ("LIST", ["x1.raw"]),
    ("x%d.raw 1 1 1 2", []),
    ("x%03d.raw 1 1500 1", []),
], ids=["list-repeated", "list", "pattern", "pattern-padded"])
def test_an_nrrd_in_several_data_files_is_refused_before_itk_allocates(tmp_path, no_itk_read, data_file, after):
    """ITK allocated the size such a header claims before opening any file (100 bytes made 1.7 GB; 13.5 GB
    claimed killed the process)."""
    (tmp_path / "x1.raw").write_bytes(bytes(100))
    p = _nhdr(tmp_path, data_file, sizes="1500 1500 1500", type_="float", after=after)
    with pytest.raises(UnreadableFileError, match="several files") as e:
        medfuse.load(p)
    assert "one file" in e.value.fix


def test_a_single_nrrd_data_file_with_a_percent_in_its_name_still_loads(tmp_path):
    """NrrdIO reads only '%' + digits + 'd' as a pattern: '50%.raw' is one file."""
    (tmp_path / "dose 50%.raw").write_bytes(_VOXELS)
    p = _nhdr(tmp_path, "dose 50%.raw")
    assert sorted(medfuse.load(p).array.ravel().tolist()) == list(range(1, 9))


# ------------------------------------------------------------------------------------------ 3. 10^9 slices
# The peak is this process's own (VmHWM): ru_maxrss survives exec on Linux, and a child of a pytest worker that
# had grown to 1.7 GB reported that, whatever it used itself (seen in CI). 0 where /proc is not there.
_CHILD = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import medfuse
from medfuse.errors import UnreadableFileError

def peak_kb():
    try:
        with open("/proc/self/status") as fh:
            return next((int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")), 0)
    except OSError:
        return 0

t = time.perf_counter()
try:
    medfuse.load(sys.argv[1])
except UnreadableFileError as e:
    print("REFUSED", round(time.perf_counter() - t, 2), peak_kb(), e)
    sys.exit(0)
except BaseException as e:
    print("OTHER", type(e).__name__, e)
    sys.exit(3)
sys.exit(4)
"""


@pytest.mark.parametrize("data_file, names, match", [
    ("s%d.raw 1 1000000000 1", [], "3 or more of the 1000000000 .* missing: s2.raw, s3.raw, s4.raw"),
    ("LIST 2", ["s1.raw"], "lists 1 data files.*need 1000000000"),
    ("LIST", ["s1.raw"], "lists 1 data files.*need 1000000000"),
], ids=["pattern", "list-2d", "list"])
def test_a_metaimage_claiming_1e9_slice_files_is_refused_quickly(tmp_path, data_file, names, match):
    """A 142-byte header built a list of 10^9 names (27 s, 3.5 GB; a LIST's padding, 8 GB) before looking at
    any file. Run in a child process under a 3 GB address-space limit, so that a regression fails the test
    rather than the machine."""
    import re

    (tmp_path / "s1.raw").write_bytes(b"\0")
    p = _mhd(tmp_path, data_file, names=names, dims="1 1 1000000000")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(p)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stdout[-800:], done.stderr[-800:])
    _, seconds, maxrss_kb, message = done.stdout.split(" ", 3)
    assert re.search(match, message), message
    assert float(seconds) < 10 and int(maxrss_kb) < 1_000_000, done.stdout


def test_a_metaimage_pattern_that_is_not_one_number_is_refused(tmp_path, no_itk_voxel_read):
    """ITK fills the pattern with C's sprintf and one int: '%s' or two conversions read memory not given."""
    p = _mhd(tmp_path, "s%s_%d.raw 1 2 1")
    with pytest.raises(UnreadableFileError, match="one slice number"):
        medfuse.load(p)


def test_metaimage_slice_files_in_a_folder_below_still_load(tmp_path):
    (tmp_path / "slices").mkdir()
    for k in range(2):
        (tmp_path / "slices" / f"s{k + 1:03d}.raw").write_bytes(_VOXELS[4 * k:4 * k + 4])
    for data_file, names in (("slices/s%03d.raw 1 2 1", ()), ("LIST", ["slices/s001.raw", "slices/s002.raw"])):
        v = medfuse.load(_mhd(tmp_path, data_file, names=names))
        np.testing.assert_array_equal(v.array.transpose(2, 1, 0).ravel(), np.arange(1, 9))
