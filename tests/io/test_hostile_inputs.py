"""Hostile or odd files given to the loaders: each gets a typed error (or loads) quickly and in little memory.

Found by a probe: a non-UTF-8 byte in a path aborted the interpreter (napari with it) inside SimpleITK; a 900-byte
DICOM claiming 2**31 frames took a minute and all memory; a gzip bomb named .NII.GZ was decompressed whole; a
NIfTI dim[0] of 9 gave nibabel's raw HeaderDataError; complex voxels were fused with the imaginary part dropped.
"""

from __future__ import annotations

import gzip
import os
import sys
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import medfuse
from medfuse.errors import InvalidInputError, UnreadableFileError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names (bytes that are not UTF-8)")


def _nifti_bytes(shape=(10, 10, 10)) -> bytes:
    img = nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.int16).reshape(shape), np.eye(4))
    return img.to_bytes()


def test_a_name_that_is_not_utf8_never_aborts_the_process(tmp_path, samples_dir):
    # In a subprocess: before the fix SimpleITK aborted the interpreter (rc 134), which no except can catch.
    import subprocess

    code = (
        "import os, sys, numpy as np, medfuse\n"
        "from medfuse.errors import UnreadableFileError, OutputWriteError\n"
        "d = os.fsdecode(sys.argv[1].encode())\n"
        "src = os.path.join(d, os.fsdecode(b'mr\\xff.nii.gz'))\n"
        "open(src, 'wb').write(open(sys.argv[2], 'rb').read())\n"
        "v = medfuse.load(src)\n"   # NIfTI: read by nibabel; the ITK cross-check is skipped
        "assert v.shape == (160, 192, 160), v.shape\n"
        "bad = os.path.join(d, os.fsdecode(b'dir\\xff'))\n"
        "os.mkdir(bad)\n"
        "try:\n"
        "    medfuse.save(v, os.path.join(bad, 'o.mha'))\n"
        "    raise SystemExit('saved')\n"
        "except OutputWriteError as e:\n"
        "    assert 'not UTF-8' in str(e) and 'dir\\\\xff' in str(e), str(e)\n"
        "assert os.listdir(bad) == []\n"
        "mha = os.path.join(d, os.fsdecode(b'x\\xff.mha'))\n"
        "medfuse.save(v, mha)\n"     # written under an ASCII temporary name, then renamed: it works
        "assert np.array_equal(medfuse.load(mha).array, v.array)\n"  # and reads back (through an ASCII link)
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(samples_dir / "mr_t1.nii.gz")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-500:], r.stderr[-2000:])


def _dicom(path, *, frames):
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CTImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, fm.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing, ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 1], [1, 0, 0, 0, 1, 0], [0, 0, 0]
    ds.SliceThickness, ds.RescaleSlope, ds.RescaleIntercept, ds.InstanceNumber = 1, 1, 0, 1
    ds.NumberOfFrames = frames
    ds.PixelData = b"\0" * 32
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("frames", [1_000_000])  # 2**31 - 1 as well, by hand: without the fix it takes all memory
def test_a_frame_count_the_file_cannot_hold_is_refused_before_any_work(tmp_path, frames):
    _dicom(tmp_path / "a.dcm", frames=frames)
    tracemalloc.start()
    try:
        # scan lists the series with no volume (load says why), as for any series it cannot read.
        assert [i.n_volumes for i in medfuse.scan(tmp_path)] == [0]
        with pytest.raises(UnreadableFileError, match=f"says {frames} frames.*cannot hold them"):
            medfuse.load(tmp_path / "a.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, peak  # a list of a million frame records took 500 MB


@pytest.mark.parametrize("name", ["BOMB.NII.GZ", "bomb.nii"])
def test_a_gzip_bomb_is_not_decompressed_whole(tmp_path, name):
    """A small image followed by 300 MB of zeros, gzipped (300 kB), under a name nibabel cannot open itself."""
    path = tmp_path / name
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(_nifti_bytes())
        block = b"\0" * (1 << 20)
        for _ in range(300):
            fh.write(block)
    assert path.stat().st_size < 3e6
    tracemalloc.start()
    try:
        with pytest.warns(medfuse.errors.MedfuseWarning) if name.endswith(".nii") else _nothing():
            v = medfuse.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert v.shape == (10, 10, 10)
    np.testing.assert_array_equal(np.asarray(v.array).ravel(), np.arange(1000))
    assert peak < 50e6, peak


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("dim0", [8, 9, -1])
def test_a_dim0_outside_1_to_7_is_a_typed_error(tmp_path, dim0):
    raw = bytearray(_nifti_bytes())
    raw[40:42] = int(dim0).to_bytes(2, "little", signed=True)
    (tmp_path / "x.nii").write_bytes(bytes(raw))
    with pytest.raises(UnreadableFileError, match="not a valid NIfTI"):
        medfuse.load(tmp_path / "x.nii")


def test_complex_voxels_are_not_fused_as_their_real_part(tmp_path):
    rng = np.random.default_rng(0)
    c = (rng.random((16, 16, 16)) + 1j * rng.random((16, 16, 16))).astype(np.complex64)
    nib.save(nib.Nifti1Image(c, np.eye(4)), tmp_path / "c.nii.gz")
    nib.save(nib.Nifti1Image(np.abs(c).astype(np.float32), np.eye(4)), tmp_path / "m.nii.gz")
    with pytest.raises(InvalidInputError, match="complex") as e:
        medfuse.fuse_files(tmp_path / "c.nii.gz", tmp_path / "m.nii.gz", tmp_path / "f.nii.gz", method="mean")
    assert "numpy.abs" in e.value.fix
    assert sorted(os.listdir(tmp_path)) == ["c.nii.gz", "m.nii.gz"]


@pytest.mark.parametrize("name, gz", [("EXT.NII", False), ("EXT.NII.GZ", True), ("ext_gz_named.nii", True)])
def test_nifti_extensions_survive_the_bounded_read(tmp_path, name, gz):
    """A 5 kB extension (AFNI writes such) between the header and the voxels: the bounded read of a file nibabel
    cannot open by its name parsed the extensions from the first 540 bytes and called the file damaged."""
    a = (np.arange(8000).reshape(20, 20, 20) % 200).astype(np.int16)
    img = nib.Nifti1Image(a, np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"x" * 5000))
    raw = img.to_bytes()
    (tmp_path / name).write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.warns(medfuse.errors.MedfuseWarning) if name.endswith(".nii") else _nothing():
        v = medfuse.load(tmp_path / name)
    np.testing.assert_array_equal(v.array, a)
