"""Loaders under damaged and awkward input as it arrives from real sites and broken transfers.

Every case is built from the real files in ``../shared`` (copied into ``tmp_path``, then damaged; ``../shared`` is
never written) or with pydicom/nibabel/SimpleITK writers, and checks what a user gets: the right volume, or a typed
error that says what is wrong and how to fix it.
"""

from __future__ import annotations

import gc
import gzip
import shutil
import struct
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import medfuse
from medfuse.errors import GeometryError, MedfuseWarning, UnreadableFileError

PHILIPS = ("data", "dicom", "qa-philips-scaling", "In", "Magdeburg_2014", "fmri")
#: The Philips EPI's normal: row x column cosines (0.973, 0, 0.229) x (0, 1, 0).
NORMAL = np.array([-0.22944974899291, 0.0, 0.97332048416137])


def _quiet_load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)
        return medfuse.load(path, **kw)


@pytest.fixture
def epi(shared, tmp_path):
    """The first volume of the real Philips EPI (9 slices, 64x64, oblique), copied; files in slice order."""
    src = shared(*PHILIPS)
    dst = tmp_path / "epi"
    dst.mkdir()
    for f in sorted(src.glob("*_0001_*.dcm")):
        shutil.copy(f, dst / f.name)
    files = sorted(dst.iterdir(), key=lambda f: float(np.dot(
        np.array(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, float), NORMAL)))
    assert len(files) == 9
    return dst, files


# ---------------------------------------------------------------------------- DICOM
def test_one_missing_slice_is_named_with_its_gap(epi):
    folder, files = epi
    whole = medfuse.load(folder)
    files[4].unlink()
    with pytest.warns(MedfuseWarning, match=r"a gap of 16\.00 mm after slice 4 of 8, where slices are 8\.00 mm "
                                            r"apart.*interpolated, not measured"):
        vol = medfuse.load(folder)
    # Geometry survives; the measured slices are the real ones (within the regular grid's rounding: the scanner's
    # positions are not exactly 8 mm apart), only the gap is made up.
    np.testing.assert_allclose(vol.affine, whole.affine, atol=1e-6)
    assert vol.shape == whole.shape and vol.provenance["resampled"] is True
    kept = [0, 1, 2, 3, 5, 6, 7, 8]
    assert np.abs(vol.array[..., kept] - whole.array[..., kept]).max() < 1e-3 * np.abs(whole.array).max()


def test_media_files_beside_the_series_are_ignored(epi, tmp_path):
    """A CD/USB export: DICOMDIR, a macOS .DS_Store, a JPEG preview and a text file among the slices."""
    from PIL import Image
    from pydicom.fileset import FileSet

    folder, files = epi
    whole = medfuse.load(folder)
    ds = pydicom.dcmread(files[0])
    ds.StudyID, ds.StudyDate, ds.StudyTime, ds.SeriesNumber = "1", "20140214", "090000", 1
    fs = FileSet()
    fs.add(ds)
    fs.write(tmp_path / "cd")
    shutil.copy(tmp_path / "cd" / "DICOMDIR", folder / "DICOMDIR")
    with warnings.catch_warnings():  # the FileSet's staging folder, removed now rather than at a later test's GC
        warnings.simplefilter("ignore", ResourceWarning)
        del fs
        gc.collect()
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 100)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "preview.jpg")
    (folder / "notes.txt").write_text("exported by PACS")
    vol = medfuse.load(folder)
    np.testing.assert_array_equal(vol.array, whole.array)
    np.testing.assert_allclose(vol.affine, whole.affine)
    with pytest.raises(medfuse.UnsupportedDataError, match="holds no image"):
        medfuse.load(folder / "DICOMDIR")
    with pytest.raises(UnreadableFileError, match="not a medical image"):
        medfuse.load(folder / "preview.jpg")


def test_slice_resent_under_a_new_uid_names_the_odd_position(epi):
    """A PACS re-send gives one slice a second SOPInstanceUID: not a duplicate file, not a 4-D series."""
    folder, files = epi
    ds = pydicom.dcmread(files[3])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "resent.dcm")
    with pytest.raises(GeometryError, match=r"9 positions: 8 hold 1, 1 holds 2.*stored twice") as e:
        medfuse.load(folder)
    assert files[3].name in e.value.fix and "resent.dcm" in e.value.fix


def test_a_copy_of_one_instance_with_other_pixels_is_refused_whichever_name_sorts_first(epi):
    """Same SOPInstanceUID, position and number, other pixels: which copy was read depended on the file names
    (a slice of zeros under 'aaa.dcm')."""
    folder, files = epi
    ds = pydicom.dcmread(files[4])
    ds.PixelData = bytes(len(ds.PixelData))
    for name in ("aaa.dcm", "zzz.dcm"):
        ds.save_as(folder / name)
        with pytest.raises(UnreadableFileError, match="same image .* with different pixel data") as e:
            medfuse.load(folder)
        assert name in str(e.value) and files[4].name in str(e.value)
        (folder / name).unlink()
    # Other pixels and a longer header (an added tag): refused too, not "the longer copy wins".
    ds.ImageComments = "reprocessed"
    ds.save_as(folder / "aaa.dcm")
    with pytest.raises(UnreadableFileError, match="different pixel data"):
        medfuse.load(folder)
    # A copy whose header alone differs (a re-export, of another length) is still a duplicate, read once, and not
    # called damaged.
    ds = pydicom.dcmread(files[4])
    ds.InstitutionName = "re-exported by another PACS"
    ds.save_as(folder / "aaa.dcm")
    assert (folder / "aaa.dcm").stat().st_size != files[4].stat().st_size
    with pytest.warns(MedfuseWarning, match="1 duplicate file") as rec:
        medfuse.load(folder)
    assert not any("shorter" in str(w.message) for w in rec)


def test_a_copy_of_the_series_under_another_patient_is_refused_not_deduplicated(epi, tmp_path):
    """A PACS patient merge re-sends the same instances under another patient: dropped as duplicates, the
    mixed-patients refusal never fired, and which patient's copy was kept depended on the file sizes."""
    folder, files = epi
    other = folder / "export2"
    other.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID = str(ds.get("PatientID", "")) + "99"  # longer: kept under the old rule
        ds.save_as(other / f.name)
    with pytest.raises(UnreadableFileError, match="different patients"):
        medfuse.load(folder)


def test_a_copy_whose_patient_fields_differ_only_in_formatting_is_still_a_duplicate(epi):
    """The mixed-patients check takes a trailing '^' or an emptied birth date as one patient; keyed on the raw
    values, such a backup copy was neither merged nor refused: a 3-D series read as 4-D."""
    folder, files = epi
    backup = folder / "backup"
    backup.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName = str(ds.get("PatientName", "")) + "^^"
        ds.PatientBirthDate = ""
        ds.save_as(backup / f.name)
    with pytest.warns(MedfuseWarning, match="9 duplicate files"):
        assert medfuse.load(folder).shape == (64, 64, 9)


def test_a_4d_series_missing_a_file_says_so_not_remove_a_copy(shared, tmp_path):
    src = shared(*PHILIPS)
    dst = tmp_path / "epi4d"
    shutil.copytree(src, dst)
    victim = sorted(dst.glob("*_0002_*.dcm"))[3]
    victim.unlink()
    with pytest.raises(GeometryError, match="an image missing at the odd position") as e:
        medfuse.load_volumes(dst)
    assert "remove a second copy" not in e.value.fix and "re-export the complete series" in e.value.fix


def test_orientation_drift_is_said_as_drift_not_as_a_localizer(epi):
    """Direction cosines drifting by 0.0002 a slice (0.1 degree in all) were refused as "a localizer or scout", with
    the advice to move most of the series out of the folder."""
    folder, files = epi
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        r = np.array(ds.ImageOrientationPatient, float)
        r[:3] += np.array([0.0, 2e-4 * k, 0.0])
        r[:3] /= np.linalg.norm(r[:3])
        ds.ImageOrientationPatient = [float(x) for x in r]
        ds.save_as(f)
    with pytest.raises(GeometryError, match=r"orientation drifts across the series, by up to 0\.\d+ degrees") as e:
        medfuse.load(folder)
    assert "localizer" not in str(e.value) and "move the" not in e.value.fix


def test_localizer_stored_in_the_series_is_left_out(epi):
    folder, files = epi
    whole = medfuse.load(folder)
    ds = pydicom.dcmread(files[0])  # a scout: another orientation and size, same SeriesInstanceUID
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Rows, ds.PixelData = 32, ds.PixelData[: 32 * 64 * 2]
    ds.save_as(folder / "scout.dcm")
    with pytest.warns(MedfuseWarning, match="1 localizer .*left out") as rec:
        vol = medfuse.load(folder)
    np.testing.assert_array_equal(vol.array, whole.array)
    np.testing.assert_allclose(vol.affine, whole.affine)
    assert any("localizer" in w for w in vol.provenance["warnings"])
    assert len([w for w in rec if issubclass(w.category, MedfuseWarning)]) == 1
    assert medfuse.scan(folder)[0].n_volumes == 1
    # Not typed LOCALIZER: refused, naming the odd file; picking a series cannot help (it is the same series).
    ds.ImageType, ds.Rows, ds.PixelData = ["ORIGINAL", "PRIMARY", "M"], 64, pydicom.dcmread(files[0]).PixelData
    ds.save_as(folder / "scout.dcm")
    with pytest.raises(GeometryError, match=r"mixes 2 slice orientations \(9, 1 images") as e:
        medfuse.load(folder)
    assert "scout.dcm" in e.value.fix and "series_uid" not in e.value.fix


@pytest.mark.parametrize("cut, words", [("pixels", r"cut short: its pixel data holds 5192 of the 8192 bytes"),
                                        ("element", r"cut short: it ends before or inside its pixel data")])
def test_file_cut_in_its_pixel_data_is_named(epi, cut, words):
    folder, files = epi
    raw = files[4].read_bytes()
    files[4].write_bytes(raw[:-3000] if cut == "pixels" else raw[:raw.rindex(b"\xe0\x7f\x10\x00") + 6])
    with pytest.raises(UnreadableFileError, match=words) as e:
        medfuse.load(folder)  # in its series: the damaged slice is named, never interpolated
    assert e.value.path == str(files[4])
    with pytest.raises(UnreadableFileError, match=words):
        _quiet_load(files[4])


def _with_transfer_syntax(data: bytes, uid: str) -> bytes:
    """The file's bytes with another TransferSyntaxUID in its (explicit little-endian) file meta."""
    b = bytearray(data)
    i = b.index(b"\x02\x00\x10\x00UI", 132)
    old = struct.unpack("<H", b[i + 6:i + 8])[0]
    new = uid.encode() + b"\0" * (len(uid) % 2)
    b[i + 6:i + 8 + old] = struct.pack("<H", len(new)) + new
    j = b.index(b"\x02\x00\x00\x00UL", 132)
    b[j + 8:j + 12] = struct.pack("<I", struct.unpack("<I", b[j + 8:j + 12])[0] + len(new) - old)
    return bytes(b)


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2.4.110", "1.2.3.4.5.6"])  # JPEG XL; a private syntax
def test_transfer_syntax_no_decoder_reads_says_convert(shared, tmp_path, uid):
    """No package makes pydicom read these: the advice is to convert, not "the file may be truncated"."""
    f = tmp_path / "x.dcm"
    f.write_bytes(_with_transfer_syntax(shared("data", "dicom", "qa-transfer-syntaxes", "In", "9.dcm").read_bytes(),
                                        uid))
    assert str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) == uid
    with pytest.raises(UnreadableFileError, match=f"no decoder for the transfer syntax {uid}") as e:
        medfuse.load(f)
    assert "gdcmconv --raw" in e.value.fix and "truncated" not in str(e.value)


def _sample_pet_without(tag, samples_dir, folder):
    """A copy of the sample PET series in ``folder`` with ``tag`` deleted from every file."""
    folder.mkdir()
    for f in sorted((samples_dir / "pet").iterdir()):
        ds = pydicom.dcmread(f)
        delattr(ds, tag)
        ds.save_as(folder / f.name)
    return folder


def test_pet_without_units_says_bqml_is_assumed(tmp_path, samples_dir):
    folder = _sample_pet_without("Units", samples_dir, tmp_path / "pet")
    with pytest.warns(MedfuseWarning, match=r"PET loaded in Bq/mL \(assumed: the header has no Units\), not SUV"):
        vol = medfuse.load(folder)
    assert vol.unit == "Bq/mL"
    np.testing.assert_array_equal(vol.array, medfuse.load(samples_dir / "pet", suv="none").array)


def test_pet_loaded_without_suv_says_how_to_get_suv(tmp_path, samples_dir):
    """The warning of a PET that could not be made SUV carries the fix, as the error of ``suv='bw'`` does."""
    folder = _sample_pet_without("PatientWeight", samples_dir, tmp_path / "pet")
    with pytest.warns(MedfuseWarning, match=r"not SUV: PatientWeight is missing") as w:
        vol = medfuse.load(folder)
    said = next(str(x.message) for x in w if "not SUV" in str(x.message))
    assert "Fix: enter the patient's weight in kg" in said and "suv='none'" in said
    assert vol.unit == "Bq/mL" and any("Fix: enter the patient's weight" in n for n in vol.provenance["warnings"])


# ---------------------------------------------------------------------------- NIfTI / MetaImage / NRRD
@pytest.fixture
def t1(shared):
    return shared("data", "spm12-templates", "T1.nii")


def test_nifti_whose_compression_is_not_its_name_loads_with_a_warning(t1, tmp_path):
    ref = medfuse.load(t1)
    plain = tmp_path / "plain.nii.gz"
    shutil.copy(t1, plain)
    packed = tmp_path / "packed.nii"
    packed.write_bytes(gzip.compress(t1.read_bytes()))
    for f, words in ((plain, "named .nii.gz but is not gzip-compressed.*rename it to end in .nii$"),
                     (packed, "named .nii but is gzip-compressed.*rename it to end in .nii.gz$")):
        with pytest.warns(MedfuseWarning, match=words):
            vol = medfuse.load(f)
        np.testing.assert_array_equal(vol.array, ref.array)
        np.testing.assert_allclose(vol.affine, ref.affine)
        assert vol.provenance["nifti_space"] == ref.provenance["nifti_space"]


def test_file_whose_ending_lies_names_what_it_holds(t1, tmp_path, samples_dir):
    (tmp_path / "a.mha").write_bytes(t1.read_bytes())
    sitk.WriteImage(sitk.ReadImage(str(t1)), str(tmp_path / "b.mha"))
    (tmp_path / "b.nii.gz").write_bytes((tmp_path / "b.mha").read_bytes())
    (tmp_path / "c.nrrd").write_bytes(gzip.compress(t1.read_bytes()))
    (tmp_path / "d.nii").write_bytes((samples_dir / "ct" / "IM00001.dcm").read_bytes())
    for name, holds, ending in (("a.mha", "NIfTI", ".nii"), ("b.nii.gz", "MetaImage", ".mha"),
                                ("c.nrrd", "NIfTI", ".nii.gz"), ("d.nii", "DICOM", ".dcm")):
        with pytest.raises(UnreadableFileError, match=f"holds {holds} data") as e:
            medfuse.load(tmp_path / name)
        assert e.value.fix.startswith(f"rename it to end in {ending} ")


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_nifti_header_claiming_more_voxels_than_the_file_holds_is_refused_before_allocating(t1, tmp_path, name):
    hdr = bytearray(t1.read_bytes()[:352])
    hdr[40:48] = struct.pack("<4h", 3, 400, 400, 400)  # 64 M voxels of uint8 claimed
    body = bytes(hdr) + b"\0" * 700
    (tmp_path / name).write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    tracemalloc.start()
    try:
        with pytest.raises(UnreadableFileError, match=r"describes 400x400x400 voxels of uint8 \(64 MB of voxel "
                                                      r"data\), but the file holds only .*truncated") as e:
            medfuse.load(tmp_path / name)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16e6 and e.value.path == str(tmp_path / name)


@pytest.mark.parametrize("name, header", [
    ("huge.mha", b"ObjectType = Image\nNDims = 3\nBinaryData = True\nDimSize = 1000 1000 1000\n"
                 b"ElementType = MET_FLOAT\nElementDataFile = LOCAL\n"),
    ("hugez.mha", b"ObjectType = Image\nNDims = 3\nBinaryData = True\nCompressedData = True\nCompressedDataSize = "
                  b"1000\nDimSize = 1000 1000 1000\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"),
    ("huge.nrrd", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 1000 1000 1000\nencoding: raw\nendian: little\n\n"),
    ("hugez.nrrd", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 1000 1000 1000\nencoding: gzip\n"
                   b"endian: little\n\n"),
])
def test_itk_header_claiming_more_voxels_than_the_file_holds_is_refused(tmp_path, name, header):
    payload = gzip.compress(b"\0" * 1000) if b"gzip" in header or b"Compressed" in header else b"\0" * 1000
    (tmp_path / name).write_bytes(header + payload)
    with pytest.raises(UnreadableFileError, match=r"describes 1000x1000x1000 voxels \(4 GB of voxel data\), but "
                                                  r"the file holds only"):
        medfuse.load(tmp_path / name)


@pytest.mark.parametrize("header", ["t.mhd", "t.nhdr"])
def test_detached_header_names_its_missing_or_short_data_file(t1, tmp_path, header):
    img = sitk.ReadImage(str(t1))
    sitk.WriteImage(img, str(tmp_path / header))
    ref = medfuse.load(tmp_path / header)
    np.testing.assert_allclose(ref.array, medfuse.load(t1).array, rtol=1e-6)
    data = next(f for f in tmp_path.iterdir() if f.name != header)
    kept = data.read_bytes()
    data.write_bytes(kept[:1000])
    with pytest.raises(UnreadableFileError, match=f"its data file {data.name} holds only 1000 bytes"):
        medfuse.load(tmp_path / header)
    data.unlink()
    with pytest.raises(UnreadableFileError, match=f"data file its header names .*'{data.name}'.* is missing") as e:
        medfuse.load(tmp_path / header)
    assert str(data) in str(e.value) and "beside" in e.value.fix


def test_a_nii_gz_damaged_in_the_middle_is_refused_not_read_as_other_voxels(tmp_path):
    """nibabel stops before the gzip trailer, so its CRC was never checked: a flipped byte in a stored (or
    luckily still decodable) deflate block loaded silently as a different voxel."""
    import gzip

    import nibabel as nib

    from medfuse.errors import UnreadableFileError

    arr = np.arange(16 * 16 * 8, dtype=np.int16).reshape(16, 16, 8)
    raw = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(raw))
    good = tmp_path / "good.nii.gz"
    good.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=0))  # stored blocks: bytes as they are
    assert np.array_equal(np.asarray(medfuse.load(good).array), arr)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the voxels
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(data))
    assert not np.array_equal(np.asarray(nib.load(str(bad)).dataobj), arr)  # nibabel alone reads other voxels
    with pytest.raises(UnreadableFileError, match="damaged.*checksum"):
        medfuse.load(bad)


def test_loader_warnings_point_at_the_callers_line(samples_dir, tmp_path):
    """The duplicate-file, damaged-file and "PET loaded in Bq/mL" warnings pointed into contextlib.py, so a
    per-module warning filter (or the line Python shows) missed the caller."""
    folder = tmp_path / "pet"
    shutil.copytree(samples_dir / "pet", folder)
    first = sorted(folder.glob("*.dcm"))[0]
    shutil.copy(first, folder / "zz_copy.dcm")  # the same instance stored twice
    (folder / "zz_cut.dcm").write_bytes(first.read_bytes()[:300])  # a damaged file beside the series
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        medfuse.load(folder, suv="none")
    said = [w for w in seen if issubclass(w.category, MedfuseWarning)]
    assert len(said) >= 2, [str(w.message) for w in said]
    assert {Path(w.filename).name for w in said} == {Path(__file__).name}, [(w.filename, str(w.message)) for w in said]


def test_of_two_copies_of_one_instance_the_complete_one_is_kept(samples_dir, tmp_path):
    """A truncated copy that sorted first was the one kept, and the whole load failed on it ("the file is cut
    short") although the complete copy was there; the warning called it a duplicate only."""
    whole = medfuse.load(samples_dir / "pet")
    folder = tmp_path / "pet"
    shutil.copytree(samples_dir / "pet", folder)
    victim = sorted(folder.glob("*.dcm"))[5]
    (folder / "0000_cut.dcm").write_bytes(victim.read_bytes()[:-100])  # sorts before every file of the series
    with pytest.warns(MedfuseWarning, match=r"1 duplicate file .* was ignored; 1 of them shorter than the copy kept "
                                            r"\(damaged or truncated: 0000_cut\.dcm\)"):
        loaded = medfuse.load(folder)
    np.testing.assert_array_equal(loaded.array, whole.array)


def test_a_folder_of_damaged_dicom_files_only_says_so(samples_dir, tmp_path):
    """load, scan and info said "no readable DICOM image files were found; check the folder" (the wrong folder?)
    where the DICOM files were there, all truncated or empty."""
    folder = tmp_path / "cut"
    folder.mkdir()
    first = sorted((samples_dir / "pet").glob("*.dcm"))[0]
    (folder / "a.dcm").write_bytes(first.read_bytes()[:200])
    (folder / "b.dcm").write_bytes(b"")
    for call in (medfuse.load, medfuse.scan):
        with pytest.raises(UnreadableFileError, match=r"no readable DICOM image files were found: 2 DICOM file\(s\) "
                                                      r"here are damaged, truncated or empty\.") as e:
            call(folder)
        assert "a.dcm" not in str(e.value)  # counted, not named: no header to blank a patient's name from


def test_a_compressed_copy_of_an_instance_is_not_called_damaged(samples_dir, tmp_path):
    """Copies are compared by size only under one transfer syntax: an RLE copy beside the plain one is smaller
    and whole, and was about to be called "damaged or truncated ... may be deleted"."""
    from pydicom.uid import RLELossless

    whole = medfuse.load(samples_dir / "pet")
    folder = tmp_path / "pet"
    shutil.copytree(samples_dir / "pet", folder)
    ds = pydicom.dcmread(sorted(folder.glob("*.dcm"))[5])
    ds.compress(RLELossless, generate_instance_uid=False)  # the same instance, compressed
    ds.save_as(folder / "zz_rle.dcm")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loaded = medfuse.load(folder)
    said = [str(w.message) for w in seen if issubclass(w.category, MedfuseWarning)]
    assert any("1 duplicate file (the same instance stored twice) was ignored" in m for m in said), said
    assert not any("damaged" in m for m in said), said
    np.testing.assert_array_equal(loaded.array, whole.array)


@pytest.mark.parametrize("name", ["IM00020.dcm", "IM00040.dcm", "IM00020"])
def test_a_slice_cut_inside_its_preamble_is_a_damaged_file_not_a_stranger(samples_dir, tmp_path, name):
    """A slice cut to 100 bytes (before the "DICM" prefix) was taken for a file that is no DICOM: the gap it left
    was interpolated with only an "uneven slice spacing" warning, and the last slice went without a word."""
    folder = tmp_path / "ct"
    shutil.copytree(samples_dir / "ct", folder)
    src, cut = folder / (name if name.endswith(".dcm") else name + ".dcm"), folder / name
    head = src.read_bytes()[:100]  # the preamble: zeros in the sample, as most writers leave it
    src.unlink()
    cut.write_bytes(head)
    if name.startswith("IM00040"):  # the last slice: left out, and said
        with pytest.warns(MedfuseWarning, match=r"1 DICOM file\(s\) beside the series could not be read .*IM00040.*"
                                                r"may be its first or last slices.*loads with 39 slices"):
            assert medfuse.load(folder).shape == (160, 192, 39)
    else:  # a middle slice: refused, never interpolated
        with pytest.raises(UnreadableFileError, match="slices are missing from the series, and 1 DICOM file"):
            medfuse.load(folder)
