"""Loader messages and exactness: invalid NIfTI dims, special files (FIFO, socket), link loops, MetaImage/NRRD
names that are not UTF-8, DICOM integers above 2**24, and nibabel's header repairs."""

from __future__ import annotations

import gzip
import os
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.errors import UnreadableFileError

LINUX = sys.platform.startswith("linux")


# ------------------------------------------------------------------------------------------ 1. NIfTI dim field
def _nifti_with_dim(tmp_path: Path, name: str, index: int, value: int) -> Path:
    """A valid 4x5x6 NIfTI whose header's dim[index] is overwritten with value (gzip if name ends .gz)."""
    import nibabel as nib

    two = "nifti2" in name
    img = (nib.Nifti2Image if two else nib.Nifti1Image)(np.zeros((4, 5, 6), np.int16), np.eye(4))
    plain = tmp_path / "plain.nii"
    nib.save(img, plain)
    data = bytearray(plain.read_bytes())
    fmt, offset = ("<q", 16) if two else ("<h", 40)
    struct.pack_into(fmt, data, offset + struct.calcsize(fmt) * index, value)
    out = tmp_path / name
    out.write_bytes(gzip.compress(bytes(data)) if name.endswith(".gz") else bytes(data))
    return out


@pytest.mark.parametrize("name", ["neg.nii", "neg.nii.gz", "neg_nifti2.nii"])
def test_negative_dim_is_named_not_called_truncated(tmp_path, name):
    """dim[2] = -5 was reported as "the file looks truncated (OverflowError/ValueError)"."""
    p = _nifti_with_dim(tmp_path, name, 2, -5)
    with pytest.raises(UnreadableFileError) as ei:
        medfuse.load(p)
    msg = str(ei.value)
    assert "dim[2] is -5" in msg and "dimension" in msg and "Fix: repair the header" in msg
    assert "truncated" not in msg and "Error)" not in msg


@pytest.mark.parametrize("value", [-3, 9])
def test_dim0_out_of_range_is_named(tmp_path, value):
    """dim[0] outside 1..7 made nibabel guess the byte order wrongly: "not a valid NIfTI file (or truncated)"."""
    p = _nifti_with_dim(tmp_path, "d0.nii", 0, value)
    with pytest.raises(UnreadableFileError, match=rf"dim\[0\] \(the number of axes\) is {value}, where NIfTI "
                                                  r"allows 1 to 7"):
        medfuse.load(p)


def test_a_valid_nifti_still_loads_with_an_unused_negative_dim(tmp_path):
    """dim[4] beyond dim[0] = 3 is not part of the shape (some writers leave junk there)."""
    v = medfuse.load(_nifti_with_dim(tmp_path, "ok.nii", 4, -2))
    assert v.shape == (4, 5, 6)


# ------------------------------------------------------------------------------------------ 2. pipes and sockets
def _load_in_child(path: Path, timeout: float = 120) -> str:
    """medfuse.load(path) in a child process (a regression would block on a FIFO forever); its error text."""
    code = ("import sys, medfuse\n"
            "try:\n    medfuse.load(sys.argv[1])\nexcept medfuse.errors.MedfuseError as e:\n"
            "    print(type(e).__name__, e.one_line())\nelse:\n    print('LOADED')\n")
    done = subprocess.run([sys.executable, "-c", code, os.fspath(path)], capture_output=True, text=True,
                          timeout=timeout)
    return done.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("name", ["pipe", "pipe.nii.gz", "pipe.mha"])
def test_a_fifo_is_refused_as_not_a_regular_file_without_blocking(tmp_path, name):
    """A FIFO was read as a DICOM folder ("no readable DICOM image files"); opening one would block forever."""
    fifo = tmp_path / name
    os.mkfifo(fifo)
    out = _load_in_child(fifo)
    assert out.startswith("UnreadableFileError") and "named pipe (FIFO)" in out
    assert "not a regular file or folder" in out and "DICOM image files" not in out


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="UNIX sockets")
def test_a_socket_is_refused_as_not_a_regular_file(tmp_path):
    path = tmp_path / "s.nii"
    if len(os.fsencode(path)) > 100:  # sun_path holds about 108 bytes
        path = Path(tempfile.mkdtemp(prefix="mfs")) / "s.nii"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(path))
        with pytest.raises(UnreadableFileError, match="this is a socket, not a regular file or folder"):
            medfuse.load(path)
        with pytest.raises(UnreadableFileError, match="this is a socket"):
            medfuse.io.nifti.load_image(path)  # the reader's own check, not only load's
    path.unlink()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_the_fuse_command_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "in.nii.gz"
    os.mkfifo(fifo)
    cli = Path(sys.executable).with_name("medfuse")
    cmd = [os.fspath(cli)] if cli.exists() else [sys.executable, "-m", "medfuse.cli"]
    done = subprocess.run(cmd + ["fuse", os.fspath(fifo), os.fspath(fifo), "-o", os.fspath(tmp_path / "f.nii.gz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "named pipe (FIFO), not a regular file or folder" in done.stderr + done.stdout
    assert not (tmp_path / "f.nii.gz").exists()


# ------------------------------------------------------------------------------------------ 3. link loops
@pytest.mark.parametrize("name", ["a", "a.nii.gz"])
def test_a_symlink_loop_says_it_loops(tmp_path, name):
    """a -> b, b -> a was reported as "no such file or folder"."""
    a, b = tmp_path / name, tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    for call in (medfuse.load, medfuse.io.load_volumes, medfuse.io.scan):
        with pytest.raises(UnreadableFileError, match="symbolic link that loops"):
            call(a)


def test_a_dangling_symlink_names_its_missing_target(tmp_path):
    link = tmp_path / "ct.nii.gz"
    link.symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(UnreadableFileError, match="symbolic link to .*gone.nii.gz', which does not exist"):
        medfuse.load(link)


def test_a_missing_path_still_says_no_such_file(tmp_path):
    with pytest.raises(UnreadableFileError, match="no such file or folder"):
        medfuse.load(tmp_path / "nothing.nii.gz")


# ------------------------------------------------------------------------------------------ 4. names not UTF-8
@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's folder moved to an empty one of this test's, to see that the reader leaves nothing there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", os.fspath(folder))
    return folder


def _volume():
    arr = (np.arange(60, dtype=np.int16).reshape(3, 4, 5) - 7)
    return medfuse.Volume(arr, np.diag([1.0, 2.0, 3.0, 1.0]), modality="MR", unit="arbitrary")


@pytest.mark.skipif(not LINUX, reason="names with bytes that are not UTF-8 exist on Linux file systems")
@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_a_single_file_image_whose_name_is_not_utf8_reads_back(tmp_path, private_tmp, ending):
    """medfuse wrote x\\xff.mha but refused to read it ("rename the file")."""
    name = os.fsdecode(os.fsencode(os.fspath(tmp_path)) + b"/x\xff" + ending.encode())
    vol = _volume()
    medfuse.save(vol, name)
    back = medfuse.load(name)
    assert np.array_equal(back.array, vol.array) and back.array.dtype == vol.array.dtype
    assert np.allclose(back.affine, vol.affine)
    assert back.provenance["source"] == name
    assert list(private_tmp.iterdir()) == []  # the temporary links are gone


def _pair_with_names(folder: Path, ending: str, header: bytes, data: bytes) -> bytes:
    """A MetaImage/NRRD header+data pair of _volume(), renamed to ``header`` and ``data`` (bytes; data may hold
    a sub-folder), with the header's data-file line changed to match. Returns the header's path as bytes."""
    import SimpleITK as sitk

    vol = _volume()
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vol.array, (2, 1, 0))))
    img.SetSpacing((1.0, 2.0, 3.0))
    with tempfile.TemporaryDirectory() as ascii_dir:  # SimpleITK itself must never see a name that is not UTF-8
        sitk.WriteImage(img, os.path.join(ascii_dir, f"a{ending}"))
        written = [f for f in os.listdir(ascii_dir) if not f.endswith(ending)]
        assert len(written) == 1
        with open(os.path.join(ascii_dir, f"a{ending}"), "rb") as fh:
            text = fh.read().replace(written[0].encode(), data)
        base = os.fsencode(os.fspath(folder))
        target = os.path.join(base, data)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(os.fsencode(ascii_dir), written[0].encode()), target)
    out = os.path.join(base, header)
    with open(out, "wb") as fh:
        fh.write(text)
    return out


@pytest.mark.skipif(not LINUX, reason="names with bytes that are not UTF-8 exist on Linux file systems")
@pytest.mark.parametrize("ending,header,data", [
    (".mhd", b"h\xff.mhd", b"d\xfe.raw"),
    (".mhd", b"h\xff.mhd", b"sub/plain.raw"),
    (".nhdr", b"h\xff.nhdr", b"d\xfd.raw"),
    (".mhd", b"plain.mhd", b"d\xfe.raw"),  # the header's name is UTF-8, its folder's is not (below)
])
def test_a_header_and_data_pair_whose_names_are_not_utf8_reads_back(tmp_path, private_tmp, ending, header, data):
    folder = tmp_path / (os.fsdecode(b"f\xfc") if header == b"plain.mhd" else "pair")
    folder.mkdir()
    hdr = _pair_with_names(folder, ending, header, data)
    back = medfuse.load(os.fsdecode(hdr))
    assert np.array_equal(back.array, _volume().array)
    assert list(private_tmp.iterdir()) == []


@pytest.mark.skipif(not LINUX, reason="names with bytes that are not UTF-8 exist on Linux file systems")
def test_a_pair_whose_data_file_is_outside_the_header_folder_keeps_the_typed_refusal(tmp_path, private_tmp):
    sub = tmp_path / "s"
    sub.mkdir()
    hdr = _pair_with_names(sub, ".mhd", b"h\xff.mhd", b"../up.raw")
    with pytest.raises(UnreadableFileError, match="not UTF-8 text.*Fix: rename the file or folder to UTF-8"):
        medfuse.load(os.fsdecode(hdr))
    assert list(private_tmp.iterdir()) == []


def test_a_data_file_named_in_utf8_is_found(tmp_path):
    """The header was decoded as latin-1, so ElementDataFile = é.raw was looked for as Ã©.raw ("missing")."""
    (tmp_path / "pair").mkdir()
    hdr = _pair_with_names(tmp_path / "pair", ".mhd", b"h.mhd", "é.raw".encode("utf-8"))
    back = medfuse.load(os.fsdecode(hdr))
    assert np.array_equal(back.array, _volume().array)


# ------------------------------------------------------------------------------------------ 5. DICOM exactness
def _dicom(path: Path, pixels: np.ndarray, *, bits: int, signed: bool = False, slope=None, intercept=None,
           z: float = 0.0, series: str = "1.2.826.0.1.3680043.8.498.1") -> Path:
    """A minimal uncompressed CT slice (no patient data) holding ``pixels`` as stored values."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), series, "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, int(signed)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, z], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype(f"<{'i' if signed else 'u'}{bits // 8}").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _exact(vol_slice: np.ndarray, expected) -> bool:
    """Every voxel equals the exact (Python int) value, compared without float rounding."""
    return [int(x) for x in vol_slice.T.ravel().tolist()] == [int(e) for e in np.ravel(expected).tolist()]


@pytest.mark.parametrize("stored,bits,slope,intercept", [
    ([[65535, 55739], [1, 3]], 16, 301, 0),          # uint16 x 301 -> 19726035, 16777439 (odd, above 2**24)
    ([[16777217, 2 ** 32 - 1], [0, 5]], 32, 1, 1),    # uint32 + intercept
    ([[16777217, 2 ** 31], [0, 5]], 32, 3, -2),       # uint32 x slope
    ([[16777217, 2 ** 32 - 1], [0, 5]], 32, None, None),
])
def test_dicom_integers_above_2_24_are_exact(tmp_path, stored, bits, slope, intercept):
    """uint16 x RescaleSlope 301 went to float32: 16777439 read as 16777440."""
    arr = np.array(stored, dtype=np.int64)
    p = _dicom(tmp_path / "s.dcm", arr, bits=bits, slope=slope, intercept=intercept)
    vol = medfuse.load(p)
    expected = [[int(v) * (slope or 1) + (intercept or 0) for v in row] for row in stored]
    assert _exact(vol.array[:, :, 0], expected)


def test_dicom_small_rescaled_values_stay_float32(tmp_path):
    """float64 only where float32 would round: a PET-like slope keeps the memory of float32."""
    p = _dicom(tmp_path / "s.dcm", np.array([[65535, 2], [1, 3]]), bits=16, slope=0.5, intercept=0)
    assert medfuse.load(p).array.dtype == np.float32


def test_dicom_gap_resampling_keeps_measured_slices_exact(tmp_path):
    """Slices resampled over a gap were interpolated in float32, rounding measured values above 2**24."""
    folder = tmp_path / "series"
    folder.mkdir()
    base = np.array([[16777217, 33554433], [16777219, 7]], dtype=np.int64)
    zs = [0.0, 1.0, 2.0, 4.0]  # one slice missing between 2 and 4: resampled onto 0..4
    for k, z in enumerate(zs):
        _dicom(folder / f"{k}.dcm", base + k, bits=32, z=z)
    with pytest.warns(medfuse.errors.MedfuseWarning, match="uneven slice spacing"):
        vol = medfuse.load(folder)
    assert vol.shape[2] == 5
    for k, z in enumerate(zs):
        assert _exact(vol.array[:, :, int(z)], base + k)


# ------------------------------------------------------------------------------------------ 6. nibabel's own lines
def test_nibabel_header_repairs_become_one_medfuse_warning_not_stderr_lines(tmp_path, capfd):
    """nibabel printed "pixdim[1,2,3] should be non-zero; setting 0 dims to 1" on stderr during medfuse.load."""
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4))
    img.header.set_qform(np.eye(4), 1)
    img.header.set_sform(None, 0)
    p = tmp_path / "z.nii"
    nib.save(img, p)
    data = bytearray(p.read_bytes())
    struct.pack_into("<f", data, 76 + 4 * 2, 0.0)  # pixdim[2] = 0
    p.write_bytes(bytes(data))
    capfd.readouterr()
    with pytest.warns(medfuse.errors.MedfuseWarning) as record:
        medfuse.load(p)
    err = capfd.readouterr().err
    assert "should be non-zero" not in err
    repaired = [str(w.message) for w in record if "nibabel repaired it" in str(w.message)]
    assert len(repaired) == 1 and "pixdim[1,2,3] should be non-zero" in repaired[0] and str(p) in repaired[0]


def test_a_series_in_a_hidden_folder_is_not_listed(tmp_path, capsys):
    """A killed write's .medfuse-tmp-*/ folder beside a DICOM output held a partial series, which scan() and
    medfuse info listed as one more series (and info listed .medfuse-tmp-*.nii.gz files as images)."""
    import shutil

    from medfuse.cli import main
    from medfuse.io import scan

    samples = Path(__file__).resolve().parents[2] / "sample_volumes"
    shutil.copytree(samples / "pet", tmp_path / "pet")
    hidden = tmp_path / ".medfuse-tmp-0123456789ab-89abcdef-123-abcdefgh"
    hidden.mkdir()
    for f in sorted((samples / "pet").iterdir())[:5]:
        shutil.copy(f, hidden / f.name)
    shutil.copy(samples / "mr_t1.nii.gz", tmp_path / ".medfuse-tmp-0123456789ab-89abcdef-123-abcdefgi.nii.gz")
    assert [os.path.basename(s.folder) for s in scan(tmp_path)] == ["pet"]
    assert main(["info", str(tmp_path), "--json"]) == 0
    assert ".medfuse-tmp" not in capsys.readouterr().out
