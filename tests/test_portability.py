"""Windows and macOS behaviour, simulated on Linux: imports without POSIX-only modules, consoles whose encoding
lacks a path's characters, file systems without hard links or with files held open, case-insensitive names.

CI runs on Linux only; each test here makes this machine behave like the other platform in the one respect it
checks (a missing module or attribute, a console code page, an error code Windows gives).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError, OutputExistsError, OutputWriteError
from medfuse.io import _atomic

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_volumes"


def _run(args, *, env_extra=None, cwd=None, timeout=180):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONIOENCODING", "PYTHONUTF8", "LC_"))}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], capture_output=True, env=env, cwd=cwd or ROOT, timeout=timeout)


# ----------------------------------------------------------------------------- imports
_IMPORT_ON_WINDOWS = textwrap.dedent('''
    import importlib, importlib.abc, os, pkgutil, signal, sys

    POSIX_ONLY = {"fcntl", "resource", "termios", "pwd", "grp", "pty", "tty", "syslog", "crypt", "readline",
                  "curses", "_posixsubprocess", "posix"}

    def importer():
        f = sys._getframe(2)
        while f is not None and f.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
            f = f.f_back
        return f.f_globals.get("__name__", "") if f is not None else ""

    class WindowsHasNo(importlib.abc.MetaPathFinder):
        """A POSIX-only module imported by medfuse's own code is missing, as on Windows."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in POSIX_ONLY and importer().split(".")[0] in ("medfuse", "medfuse_napari"):
                raise ImportError(f"No module named {name!r} (as on Windows)")
            return None

    # The dependencies first: they run on Windows in their own way, which Linux cannot imitate.
    for dep in ("numpy", "scipy", "SimpleITK", "nibabel", "pydicom", "skimage", "sklearn", "pywt", "PIL", "tqdm",
                "yaml", "torch", "monai", "safetensors", "dask.distributed", "napari", "magicgui", "matplotlib"):
        try:
            importlib.import_module(dep)
        except ImportError:
            pass
    sys.meta_path.insert(0, WindowsHasNo())
    for name in ("fcntl", "resource", "termios", "pwd", "grp"):
        sys.modules.pop(name, None)
    for attr in ("getuid", "geteuid", "getgid", "getegid", "uname", "killpg", "getpgid", "setsid", "fork"):
        if hasattr(os, attr):
            delattr(os, attr)
    for attr in ("SIGHUP", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGQUIT", "SIGCHLD", "SIGPIPE"):
        if hasattr(signal, attr):
            delattr(signal, attr)
    try:  # the simulation itself works: medfuse code that imports fcntl fails
        exec("import fcntl", {"__name__": "medfuse._probe"})
        raise SystemExit("the simulation did not hide fcntl")
    except ImportError:
        pass
    done = []
    for pkg in ("medfuse", "medfuse_napari"):
        mod = importlib.import_module(pkg)
        done.append(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            importlib.import_module(info.name)
            done.append(info.name)
    print("imported", len(done), " ".join(done))
''')


@pytest.mark.slow
def test_every_module_imports_without_posix_only_modules_and_calls():
    """``import medfuse`` (and every submodule, the napari plugin's too) on Windows: no fcntl, resource, pwd, no
    os.getuid / os.uname, no SIGHUP / SIGKILL."""
    res = _run(["-c", _IMPORT_ON_WINDOWS], env_extra={"QT_QPA_PLATFORM": "offscreen"})
    out = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 0, out[-3000:]
    names = out.split("imported", 1)[1].split()
    assert {"medfuse.cli", "medfuse.batch", "medfuse.io.dicom_writer", "medfuse.fusion._allocator",
            "medfuse_napari._widget", "medfuse_napari._writer"} <= set(names)


def test_the_allocator_tuning_is_skipped_off_glibc(monkeypatch):
    """macOS and Windows have no libc.so.6: the tuning is a no-op there, not a failed CDLL."""
    import ctypes

    from medfuse.fusion import _allocator

    def no_cdll(*a, **k):
        raise AssertionError("loaded a C library off Linux")

    monkeypatch.setattr(ctypes, "CDLL", no_cdll)
    for system in ("Darwin", "Windows"):
        monkeypatch.setattr(_allocator.platform, "system", lambda s=system: s)
        assert _allocator._apply() is False


# ----------------------------------------------------------------------------- console encodings
@pytest.fixture(scope="module")
def non_latin_folder(tmp_path_factory) -> Path:
    """A folder whose name a Windows console's code page (cp1252) cannot show: ``C:\\Users\\Łukasz``-like."""
    folder = tmp_path_factory.mktemp("enc") / "Łódź"
    folder.mkdir()
    shutil.copy(SAMPLES / "spect.nii.gz", folder / "spect.nii.gz")
    return folder


@pytest.mark.parametrize("encoding", ["cp1252", "ascii"])
def test_info_prints_a_path_the_console_cannot_encode(non_latin_folder, encoding):
    """A Windows console or redirected output (cp1252), or an ASCII-only one: the path is escaped, not a crash
    (before: exit 3, 'internal error: UnicodeEncodeError')."""
    res = _run(["-m", "medfuse.cli", "info", str(non_latin_folder / "spect.nii.gz")],
               env_extra={"PYTHONIOENCODING": encoding, "PYTHONUTF8": "0", "LANG": "C"})
    err = res.stderr.decode(encoding, "replace")
    assert res.returncode == 0, err
    out = res.stdout.decode(encoding)
    assert "\\u0141" in out and "spect.nii.gz" in out and "UnicodeEncodeError" not in err
    assert "SPECT" in out or "NM" in out  # the report itself was printed


def test_fuse_into_such_a_folder_exits_0_after_writing(non_latin_folder, tmp_path):
    out = non_latin_folder / f"fused-{tmp_path.name}.nii.gz"
    src = str(non_latin_folder / "spect.nii.gz")
    res = _run(["-m", "medfuse.cli", "fuse", src, src, "-o", str(out), "--method", "mean"],
               env_extra={"PYTHONIOENCODING": "cp1252", "PYTHONUTF8": "0"})
    assert res.returncode == 0, res.stderr.decode("cp1252", "replace")
    assert out.is_file() and out.with_name(out.name.replace(".nii.gz", ".json")).is_file()
    assert "wrote" in res.stdout.decode("cp1252")


def test_the_command_line_opens_no_text_file_in_the_locale_encoding(tmp_path):
    """Windows' default text encoding is cp1252, not UTF-8: every text file medfuse opens names its encoding
    (PEP 597's EncodingWarning, an error here for medfuse's own code)."""
    code = textwrap.dedent(f'''
        import json, warnings
        from pathlib import Path
        warnings.filterwarnings("error", category=EncodingWarning, module="medfuse")
        from medfuse import cli
        out = Path({str(tmp_path / "demo")!r})
        cli._claim_demo_folder(out, ["fused.nii.gz"])
        (out / "fused.json").write_text(json.dumps({{"inputs": []}}), encoding="utf-8")
        cli._earlier_demo(out)
        print("ok")
    ''')
    res = _run(["-X", "warn_default_encoding", "-c", code])
    assert res.returncode == 0 and b"ok" in res.stdout, res.stderr.decode()[-2000:]


# ----------------------------------------------------------------------------- file systems
def _winerror(err: int, winerror: int, text: str) -> OSError:
    """An OSError as Python raises it on Windows (errno mapped from the Windows code, which it keeps)."""
    e = OSError(err, text)
    e.winerror = winerror
    return e


def test_no_clobber_write_falls_back_where_windows_has_no_hard_links(tmp_path, monkeypatch):
    """exFAT / FAT32 (a USB stick) on Windows: os.link fails with WinError 1 (errno EINVAL). The exclusive-create
    fallback is used, as for FAT on Linux; before, the raw OSError ended the save."""
    def no_links(src, dst):
        raise _winerror(errno.EINVAL, 1, "Incorrect function")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "fused.nii.gz"
    _atomic.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".medfuse-tmp-")]
    with pytest.raises(OutputExistsError, match="exists"):  # still never replaces without overwrite
        _atomic.atomic_write_bytes(target, b"other")
    assert target.read_bytes() == b"new"


def test_replacing_a_file_another_program_holds_open_says_so(tmp_path, monkeypatch):
    """Windows cannot replace a file that is open (a batch report open in Excel): WinError 32, errno EACCES.
    The error says to close it; before, it said 'permission denied, change its permissions'."""
    target = tmp_path / "report.csv"
    target.write_text("earlier\n", encoding="utf-8")

    def in_use(src, dst):
        raise _winerror(errno.EACCES, 32, "The process cannot access the file because it is being used")

    monkeypatch.setattr(os, "replace", in_use)
    with pytest.raises(OutputWriteError, match="open in another program") as info:
        _atomic.atomic_write_text(target, "new\n", overwrite=True)
    assert "close it" in info.value.fix
    assert target.read_text(encoding="utf-8") == "earlier\n"


def test_a_temporary_file_windows_will_not_delete_does_not_hide_the_writers_error(tmp_path, monkeypatch):
    """A writer that fails may still hold its file open on Windows, which then refuses to delete it: the
    writer's own error is what the user sees, not the PermissionError of the clean-up."""
    real_unlink = os.unlink

    def locked(p, *a, **k):
        if Path(p).name.startswith(".medfuse-tmp-"):
            raise PermissionError(errno.EACCES, "The process cannot access the file", str(p))
        return real_unlink(p, *a, **k)

    monkeypatch.setattr(os, "unlink", locked)
    with pytest.raises(ValueError, match="the writer failed"):
        with _atomic.atomic_path(tmp_path / "x.nii.gz"):
            raise ValueError("the writer failed")
    assert not (tmp_path / "x.nii.gz").exists()


# ----------------------------------------------------------------------------- case-insensitive names
def test_manifest_outputs_differing_only_in_case_are_refused(tmp_path):
    """``P1.nii.gz`` and ``p1.nii.gz`` are one file on Windows and macOS: the second subject would replace the
    first's output and the report call both done."""
    from medfuse.batch import read_manifest

    manifest = tmp_path / "study.csv"
    manifest.write_text("subject,fixed,moving,output\n"
                        "a,a/mr.nii.gz,a/pet.nii.gz,out/P1.nii.gz\n"
                        "b,b/mr.nii.gz,b/pet.nii.gz,out/p1.nii.gz\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="differ only in letter case"):
        read_manifest(manifest)
    manifest.write_text("subject,fixed,moving,output\n"
                        "a,a/mr.nii.gz,a/pet.nii.gz,out/P1.nii.gz\n"
                        "b,b/mr.nii.gz,b/pet.nii.gz,out/P2.nii.gz\n", encoding="utf-8")
    assert [Path(s.output).name for s in read_manifest(manifest)] == ["P1.nii.gz", "P2.nii.gz"]


def test_evaluate_numbers_pair_names_that_differ_only_in_case(tmp_path):
    """Two pairs named ``S1`` and ``s1`` would write one file on Windows and macOS: each gets its own."""
    from medfuse import evaluate as E

    rng = np.random.default_rng(3)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    pairs = [(medfuse.Volume(rng.random((12, 12, 10)) * 100, aff, modality="MR"),
              medfuse.Volume(rng.random((12, 12, 10)) * 50, aff, modality="CT", unit="HU")) for _ in range(2)]
    res = E.evaluate([{"name": "S1", "inputs": pairs[0]}, {"name": "s1", "inputs": pairs[1]}], methods=["max"],
                     mode="native", out_dir=tmp_path / "o")
    assert res.ok and [r["name"] for r in res.rows] == ["001_S1", "002_s1"]
    written = sorted(p.name for p in (tmp_path / "o" / "max").iterdir())
    assert written == ["001_S1.nii.gz", "002_s1.nii.gz"]


# ----------------------------------------------------------------------------- batch report lock (Windows: msvcrt)
def _windows_locking(monkeypatch, locking):
    """``import fcntl`` fails and ``msvcrt.locking`` is ``locking``, as on Windows."""
    import types

    fake = types.SimpleNamespace(LK_NBLCK=2, locking=locking)
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)


def test_batch_report_lock_on_windows_refuses_a_second_run(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    from medfuse.batch import _report_lock

    def locking(fd, mode, nbytes):  # byte-range lock semantics of msvcrt, built on flock for the simulation
        assert mode == 2 and nbytes >= 1
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None

    _windows_locking(monkeypatch, locking)
    report = tmp_path / "study-report.csv"
    with _report_lock(report):
        with pytest.raises(OutputExistsError, match="another medfuse batch run"):
            with _report_lock(report):
                pass
    with _report_lock(report):  # released at the end of the first run
        pass


def test_batch_report_lock_on_a_windows_share_without_locks_still_runs(tmp_path, monkeypatch):
    """A share whose byte-range locking fails (EINVAL) is a file system without locks: the run goes ahead
    unlocked, as on Linux; before, every run there was refused as 'another run is writing this report'."""
    from medfuse.batch import _report_lock

    def unsupported(fd, mode, nbytes):
        raise OSError(errno.EINVAL, "Invalid argument")

    _windows_locking(monkeypatch, unsupported)
    ran = False
    with _report_lock(tmp_path / "study-report.csv"):
        ran = True
    assert ran


def test_commands_to_copy_quote_paths_for_the_platform(monkeypatch):
    """A hint such as 'then: medfuse batch PATH' quotes PATH for the user's shell: single quotes are not
    quoting in Windows' cmd.exe, double quotes are."""
    from medfuse import cli

    assert cli._shell_quote("/data/my study.csv") == "'/data/my study.csv'"
    monkeypatch.setattr(os, "name", "nt")
    quoted = cli._shell_quote("C:\\My Data\\study.csv")
    monkeypatch.undo()
    assert quoted == '"C:\\My Data\\study.csv"'


# ----------------------------------------------------------------------------- long names and paths
def test_an_output_name_too_long_for_the_file_system_is_a_typed_error(tmp_path, capsys):
    """255 bytes a name (Linux, macOS); Windows' 260-character paths are reached sooner. Before: a raw
    'OSError: File name too long' from the first check, and exit 3 ('internal error') on the command line."""
    from medfuse import cli

    vol = medfuse.load(SAMPLES / "spect.nii.gz")
    long_name = tmp_path / ("x" * 300 + ".nii.gz")
    with pytest.raises(OutputWriteError, match="too long") as info:
        medfuse.save(vol, long_name)
    assert "shorter" in info.value.fix
    assert cli.main(["info", str(long_name)]) == cli.EXIT_USAGE
    assert "too long" in capsys.readouterr().err


def test_a_windows_path_over_260_characters_is_a_typed_error(tmp_path, monkeypatch):
    """Windows without long paths enabled: ERROR_FILENAME_EXCED_RANGE (WinError 206, errno ENOENT), e.g. when the
    earlier output is moved aside during an overwrite. Before: 'no such file or folder. Fix: check the path'."""
    target = tmp_path / "fused.nii.gz"
    target.write_bytes(b"earlier")

    def too_long(src, dst):
        raise _winerror(errno.ENOENT, 206, "The filename or extension is too long")

    monkeypatch.setattr(os, "replace", too_long)
    with pytest.raises(OutputWriteError, match="too long"):
        _atomic.atomic_write_bytes(target, b"new", overwrite=True)
    assert target.read_bytes() == b"earlier"


# ----------------------------------------------------------------------------- SimpleITK and non-ASCII paths
def _windows_itk(monkeypatch, aliases):
    """SimpleITK as on Windows: a path with characters outside ASCII names no file. ``aliases`` maps a folder to
    its short (8.3) ASCII name, as Windows keeps one (an empty mapping: 8.3 names switched off)."""
    import SimpleITK as sitk

    from medfuse.io import nifti

    def ascii_only(fn):
        def call(*args, **kwargs):
            for a in (*args, *kwargs.values()):
                if isinstance(a, str) and not a.isascii():
                    raise RuntimeError(f"The file {a!r} does not exist")
            return fn(*args, **kwargs)
        return call

    for name in ("ReadImage", "WriteImage", "ReadTransform", "WriteTransform"):
        monkeypatch.setattr(sitk, name, ascii_only(getattr(sitk, name)))
    monkeypatch.setattr(sitk.ImageFileReader, "SetFileName", ascii_only(sitk.ImageFileReader.SetFileName))

    def short(path):
        p = Path(path)
        for real, alias in aliases.items():
            if p == real or real in p.parents:
                return os.fspath(alias / p.relative_to(real)) if p.exists() else None
        return os.fspath(p) if os.fspath(p).isascii() and p.exists() else None

    monkeypatch.setattr(nifti, "_ITK_NEEDS_ASCII", True)
    monkeypatch.setattr(nifti, "_short_path", short)


def test_metaimage_nrrd_and_transforms_in_a_non_ascii_folder_on_windows(tmp_path, monkeypatch):
    """``C:\\Users\\Łukasz\\...`` on Windows: SimpleITK is given the folder's short ASCII name. Before, saving a
    .mha there failed (and a .mha there could not be read: 'not MetaImage/NRRD')."""
    folder = tmp_path / "Łódź"
    folder.mkdir()
    alias = tmp_path / "LODZ~1"
    alias.symlink_to(folder, target_is_directory=True)
    _windows_itk(monkeypatch, {folder: alias})
    vol = medfuse.load(SAMPLES / "spect.nii.gz")
    from medfuse.io.writers import check_save_target

    check_save_target(folder / "Łukasz.mha")  # written under an ASCII temporary name, then renamed
    with pytest.raises(OutputWriteError, match="outside ASCII"):  # a header pair is written under its own name
        check_save_target(folder / "Łukasz.mhd")
    for name in ("spect.mha", "spect.nrrd", "spect.mhd"):
        written = medfuse.save(vol, folder / name)
        back = medfuse.load(written)
        np.testing.assert_array_equal(back.array, vol.array)
        np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)
        assert back.modality == vol.modality
    from medfuse.registration.transforms import Transform, load_transform

    matrix = np.eye(4)
    matrix[:3, 3] = (3.0, -2.0, 1.5)
    Transform.from_matrix(matrix).save(folder / "pet_to_mr.tfm")
    np.testing.assert_allclose(load_transform(folder / "pet_to_mr.tfm").matrix, matrix, atol=1e-9)


def test_without_short_names_a_non_ascii_path_is_a_typed_error_on_windows(tmp_path, monkeypatch):
    """A disk with 8.3 names switched off: the error says why (SimpleITK, Windows, ASCII) and what to do."""
    folder = tmp_path / "Łódź"
    folder.mkdir()
    vol = medfuse.load(SAMPLES / "spect.nii.gz")
    medfuse.save(vol, folder / "before.mha")  # written as on Linux, then read as on Windows
    _windows_itk(monkeypatch, {})
    with pytest.raises(OutputWriteError, match="outside ASCII") as info:
        medfuse.save(vol, folder / "spect.mha")
    assert "NIfTI" in info.value.fix
    from medfuse.io.writers import check_save_target

    with pytest.raises(OutputWriteError, match="outside ASCII"):  # before the work of a fuse or register
        check_save_target(folder / "fused.nrrd")
    assert not list(folder.glob(".medfuse-tmp*"))
    from medfuse.errors import UnreadableFileError

    with pytest.raises(UnreadableFileError, match="outside ASCII"):
        medfuse.load(folder / "before.mha")
    assert not (folder / "spect.mha").exists()
    medfuse.save(vol, folder / "spect.nii.gz")  # NIfTI does not go through SimpleITK
