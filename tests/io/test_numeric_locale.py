"""MetaImage/NRRD under a decimal-comma number locale, and under an ASCII file-system encoding (LC_ALL=C).

ITK's NRRD reader and writer parse and print numbers with the C library's ``LC_NUMERIC``. Under ``de_DE.UTF-8``
(Qt's QApplication sets it from LANG, so napari always runs so) spacing 4.5 mm read as 4 mm and origin -96.75 as
-96 with no error, and medfuse wrote ``space origin: (-96,75,-114,75,-96,75)``, which no reader reads.
"""

from __future__ import annotations

import locale
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.io._c_locale import c_numeric_locale

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parents[2]

#: The LC_NUMERIC category of de_DE (glibc's locales/de_DE): decimal comma, point between thousands. Only this
#: category decides how strtod/printf read and write numbers, and building it needs no locale data (10 ms), so
#: the tests run wherever localedef is (libc-bin on Debian/Ubuntu), also where /usr/share/i18n/locales is absent.
_COMMA_NUMERIC = """comment_char %
escape_char /
LC_NUMERIC
decimal_point "<U002C>"
thousands_sep "<U002E>"
grouping 3;3
END LC_NUMERIC
"""


def _comma(name: str) -> bool:
    try:
        locale.setlocale(locale.LC_NUMERIC, name)
        return locale.localeconv()["decimal_point"] == ","
    except locale.Error:
        return False


@pytest.fixture(scope="session")
def _comma_locale_dir(tmp_path_factory):
    """(LOCPATH or None, name) of a decimal-comma locale: an installed one, else one built with localedef."""
    before = locale.setlocale(locale.LC_NUMERIC)
    try:
        for name in ("de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8"):
            if _comma(name):
                return None, name
    finally:
        locale.setlocale(locale.LC_NUMERIC, before)
    if os.name != "posix" or shutil.which("localedef") is None:
        pytest.skip("no decimal-comma locale is installed and localedef (glibc's libc-bin) is missing to build one")
    where = tmp_path_factory.mktemp("locales")
    (where / "comma.def").write_text(_COMMA_NUMERIC)
    tried = []
    # -c: the definition has only LC_NUMERIC (localedef warns about the others and exits 1, yet writes it).
    runs = [(["localedef", "-c", "-i", os.fspath(where / "comma.def"), os.fspath(where / "xx_COMMA")], "xx_COMMA")]
    if Path("/usr/share/i18n/locales/de_DE").is_file():  # the real one, where the locale data is installed
        runs.append((["localedef", "-i", "de_DE", "-f", "UTF-8", os.fspath(where / "de_DE.UTF-8")], "de_DE.UTF-8"))
    for cmd, name in runs:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if (where / name / "LC_NUMERIC").is_file():
            return os.fspath(where), name
        tried.append(f"{' '.join(cmd)} -> {r.returncode}: {r.stderr.strip()[-300:]}")
    msg = "localedef could not build a decimal-comma locale: " + "; ".join(tried)
    if IN_CI:
        pytest.fail(msg + " (CI has localedef: it must build)")
    pytest.skip(msg)


@pytest.fixture
def comma_locale(_comma_locale_dir):
    """The process's LC_NUMERIC is a decimal-comma locale during the test (as under napari in Germany); the
    previous one (and LOCPATH, which glibc reads at each setlocale) is restored after it. Yields its name."""
    path, name = _comma_locale_dir
    before = locale.setlocale(locale.LC_NUMERIC)
    old_path = os.environ.get("LOCPATH")
    if path is not None:
        os.environ["LOCPATH"] = path
    try:
        assert _comma(name), f"the decimal-comma locale {name} could not be set"
        assert locale.setlocale(locale.LC_NUMERIC) == name
        yield name
    finally:
        if old_path is None:
            os.environ.pop("LOCPATH", None)
        else:
            os.environ["LOCPATH"] = old_path
        locale.setlocale(locale.LC_NUMERIC, before)


def _in_c_locale(fn, *args, **kw):
    """``fn(...)`` with LC_NUMERIC "C" (the reference: how every tool reads and writes these files)."""
    before = locale.setlocale(locale.LC_NUMERIC)
    locale.setlocale(locale.LC_NUMERIC, "C")
    try:
        return fn(*args, **kw)
    finally:
        locale.setlocale(locale.LC_NUMERIC, before)


def _spect(samples_dir) -> medfuse.Volume:
    vol = medfuse.load(samples_dir / "spect.nii.gz")
    # The sample's geometry, which the bug truncated: 4.5 mm voxels, origin -96.75 mm.
    assert vol.spacing == (4.5, 4.5, 4.5) and vol.origin == (-96.75, -114.75, -96.75)
    return vol


def _oblique() -> medfuse.Volume:
    """A volume whose spacing, origin and direction cosines are all fractions (30 degrees about z)."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = direction * np.array([4.5, 2.25, 3.125])
    aff[:3, 3] = (-96.75, -114.75, 0.5)
    arr = (np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 50) * 3
    return medfuse.Volume(arr, aff, modality="CT", unit="HU")


def _same(a: medfuse.Volume, b: medfuse.Volume) -> None:
    assert a.spacing == b.spacing
    assert a.origin == b.origin
    assert np.array_equal(a.direction, b.direction)
    assert np.array_equal(a.array, b.array) and a.array.dtype == b.array.dtype


@pytest.mark.parametrize("ending", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_a_file_written_by_any_tool_reads_with_its_geometry_under_a_decimal_comma_locale(tmp_path, samples_dir,
                                                                                        comma_locale, ending):
    """The NRRD read as 4 mm voxels at -96 mm (no error); now exactly as in the C locale."""
    vol = _spect(samples_dir)
    out = _in_c_locale(medfuse.save, vol, tmp_path / f"spect{ending}")
    back = medfuse.load(out)
    assert locale.setlocale(locale.LC_NUMERIC) == comma_locale  # the user's locale is theirs again
    _same(back, vol)
    assert back.spacing == (4.5, 4.5, 4.5) and back.origin == (-96.75, -114.75, -96.75)


@pytest.mark.parametrize("ending", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_an_oblique_volume_round_trips_under_a_decimal_comma_locale(tmp_path, comma_locale, ending):
    """Save and load both under the comma locale: the same geometry as both in "C", read by "C" as well."""
    vol = _oblique()
    reference = _in_c_locale(lambda: medfuse.load(medfuse.save(vol, tmp_path / f"c{ending}")))
    np.testing.assert_allclose(reference.affine, vol.affine, rtol=0, atol=1e-12)
    out = medfuse.save(vol, tmp_path / f"comma{ending}")
    assert locale.setlocale(locale.LC_NUMERIC) == comma_locale
    _same(medfuse.load(out), reference)
    _same(_in_c_locale(medfuse.load, out), reference)  # any other reader reads the file written
    assert locale.setlocale(locale.LC_NUMERIC) == comma_locale


def test_the_nrrd_written_under_a_decimal_comma_locale_has_decimal_points(tmp_path, samples_dir, comma_locale):
    """It held 'space origin: (-96,75,-114,75,-96,75)': six numbers for three, unreadable in any locale."""
    out = medfuse.save(_spect(samples_dir), tmp_path / "spect.nrrd")
    with open(out, "rb") as fh:
        head = fh.read(1024).split(b"\n\n")[0].decode("ascii")
    assert "space origin: (-96.75,-114.75,-96.75)" in head
    assert "space directions: (4.5,0,0) (0,4.5,0) (0,0,4.5)" in head


def test_the_users_locale_is_restored_when_a_read_fails(tmp_path, comma_locale):
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nspacings: 1.5 x 1\nencoding: raw\n\n"
                    + b"\0" * 16)
    with pytest.raises(medfuse.errors.UnreadableFileError, match="ITK says"):  # refused inside SimpleITK's read
        medfuse.load(bad)
    assert locale.setlocale(locale.LC_NUMERIC) == comma_locale
    assert locale.localeconv()["decimal_point"] == ","


def test_reads_in_threads_at_once_each_see_c_numbers_and_leave_the_users_locale(tmp_path, samples_dir, comma_locale):
    vol = _spect(samples_dir)
    files = [_in_c_locale(medfuse.save, vol, tmp_path / f"s{i}.nrrd") for i in range(4)]
    got, errors = [], []

    def read(f):
        try:
            for _ in range(3):
                got.append(medfuse.load(f).spacing)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and got == [(4.5, 4.5, 4.5)] * 12
    assert locale.setlocale(locale.LC_NUMERIC) == comma_locale


def test_c_numeric_locale_nests_and_restores_on_error(comma_locale):
    with pytest.raises(RuntimeError):
        with c_numeric_locale():
            assert locale.localeconv()["decimal_point"] == "."
            with c_numeric_locale():
                assert locale.setlocale(locale.LC_NUMERIC) == "C"
            assert locale.setlocale(locale.LC_NUMERIC) == "C"  # the inner block leaves the outer one's
            raise RuntimeError("ITK failed")
    assert locale.setlocale(locale.LC_NUMERIC) == comma_locale


_ASCII_FS_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import medfuse
    from medfuse.errors import OutputWriteError

    assert sys.getfilesystemencoding() == "ascii", sys.getfilesystemencoding()
    base = os.fsencode(sys.argv[1])
    folder = os.path.join(base, "Donn\\u00e9es".encode("utf-8"))  # valid UTF-8 bytes
    os.mkdir(folder)
    folder = os.fsdecode(folder)  # as Python holds it here: with surrogate escapes
    assert "\\udcc3" in folder
    vol = medfuse.load(sys.argv[2])
    for ending in (".mha", ".nrrd", ".mhd", ".nhdr"):
        name = "x_" + ending[1:] + ending
        out = medfuse.save(vol, os.path.join(folder, name))
        assert os.path.isfile(os.path.join(base, "Donn\\u00e9es".encode("utf-8"), name.encode())), ending
        back = medfuse.load(out)
        assert np.array_equal(back.array, vol.array), ending
        assert back.spacing == vol.spacing and back.origin == vol.origin, ending
    # A name whose bytes are not UTF-8 is still refused (SimpleITK's binding would abort the process).
    try:
        os.mkdir(os.path.join(base, b"caf\\xe9"))
        medfuse.save(vol, os.fsdecode(os.path.join(base, b"caf\\xe9", b"x.mha")))
    except OutputWriteError as e:
        assert "not UTF-8" in str(e)
    else:
        raise AssertionError("a name that is not UTF-8 was written through SimpleITK")
    print("OK")
""")


@pytest.mark.skipif(sys.platform != "linux", reason="an ASCII file-system encoding under LC_ALL=C is a POSIX matter")
def test_a_utf8_folder_name_is_written_and_read_under_an_ascii_file_system_encoding(tmp_path, samples_dir):
    """Under LC_ALL=C without UTF-8 mode Python holds 'Données' as 'Donn\\udcc3\\udca9es': medfuse refused it as
    "bytes that are not UTF-8 text" for MetaImage/NRRD, though its bytes are UTF-8."""
    env = dict(os.environ, LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", LANG="C")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), os.fspath(ROOT)]))
    r = subprocess.run([sys.executable, "-c", _ASCII_FS_SCRIPT, os.fspath(tmp_path),
                        os.fspath(samples_dir / "spect.nii.gz")], capture_output=True, text=True, env=env,
                       timeout=120, errors="backslashreplace")
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
