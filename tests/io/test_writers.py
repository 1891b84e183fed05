"""Writers: NIfTI/MetaImage/NRRD/DICOM round trips, atomicity, overwrite refusal, de-identification."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

import medfuse.io._atomic as atomic
from medfuse.errors import OutputExistsError, OutputWriteError, SUVError
from medfuse.io.nifti import load_image
from medfuse.io.suv import header_from_dataset, series_suv_factors
from medfuse.io.writers import save
from medfuse.volume import Volume


def _oblique_affine():
    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_matrix() * [0.9, 1.1, 2.5]
    aff[:3, 3] = [-100.0, 20.0, 35.0]
    return aff


@pytest.fixture
def ct():
    rng = np.random.default_rng(0)
    return Volume(rng.integers(-1024, 3000, (20, 24, 7)).astype(np.int16), _oblique_affine(), modality="CT", unit="HU")


@pytest.fixture
def pet():
    rng = np.random.default_rng(1)
    return Volume((rng.random((20, 24, 7)) * 12).astype(np.float32), _oblique_affine(), modality="PT", unit="SUVbw")


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.mha", "v.mhd", "v.nrrd", "v.nhdr"])
def test_image_round_trip_exact(tmp_path, ct, pet, name):
    for vol in (ct, pet):
        out = save(vol, tmp_path / f"{vol.modality}_{name}")
        back = load_image(out)
        assert back.array.dtype == vol.array.dtype and np.array_equal(back.array, vol.array)
        assert np.allclose(back.affine, vol.affine, atol=1e-4) and back.is_oblique
        assert (back.modality, back.unit) == (vol.modality, vol.unit)


def test_nifti_qform_sform_codes_and_nifti2(tmp_path, pet):
    import nibabel as nib

    out = save(pet, tmp_path / "p.nii.gz")
    hdr = nib.load(str(out)).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    assert np.allclose(hdr.get_sform(), pet.affine_ras, atol=1e-5)
    assert np.allclose(hdr.get_qform(), pet.affine_ras, atol=1e-4)
    out2 = save(pet, tmp_path / "p2.nii", format="nifti2")
    assert isinstance(nib.load(str(out2)), nib.Nifti2Image)
    back = load_image(out2)
    assert np.array_equal(back.array, pet.array) and back.unit == "SUVbw"


@pytest.mark.parametrize("affine", [np.array([[1.0, 0, 0, 1e39], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
                                    np.diag([1e-50, 1.0, 1.0, 1.0])])
def test_a_geometry_float32_cannot_hold_is_refused_for_nifti1_and_kept_by_nifti2(tmp_path, affine):
    """An origin past float32's range was written as infinity (a file every reader refuses, medfuse's too) and a
    spacing of 1e-50 as 0 (read back as 1 mm), with only NumPy's cast warning."""
    from medfuse.errors import GeometryError

    vol = Volume(np.random.default_rng(0).random((6, 6, 6)).astype(np.float32), affine)
    with pytest.raises(GeometryError, match="does not fit a NIfTI-1 header") as e:
        save(vol, tmp_path / "v.nii.gz")
    assert "nifti2" in e.value.fix and not (tmp_path / "v.nii.gz").exists()
    for name, kw in (("v2.nii.gz", {"format": "nifti2"}), ("v.mha", {})):
        back = load_image(save(vol, tmp_path / name, **kw))
        np.testing.assert_allclose(back.affine, vol.affine, rtol=1e-12)


def test_real_nifti_round_trip_input_untouched(shared, tmp_path):
    src = shared("data", "spm12-templates", "SPECT.nii")
    before = _sha(src)
    v = load_image(src, modality="SPECT")
    back = load_image(save(v, tmp_path / "spect.nii.gz"))
    assert np.array_equal(back.array, v.array) and np.allclose(back.affine, v.affine, atol=1e-4)
    assert back.modality == "NM"
    with pytest.raises(OutputExistsError, match="source"):
        save(v, src, overwrite=True)
    assert _sha(src) == before


def test_overwrite_refusal(tmp_path, ct):
    out = save(ct, tmp_path / "a.nii.gz")
    with pytest.raises(OutputExistsError) as e:
        save(ct, out)
    assert str(out) in str(e.value) and "overwrite=True" in str(e.value)
    save(ct.with_array(ct.array + 1), out, overwrite=True)
    assert np.array_equal(load_image(out).array, ct.array + 1)
    folder = save(ct, tmp_path / "dcm")
    with pytest.raises(OutputExistsError):
        save(ct, folder)
    save(ct, folder, overwrite=True)
    assert len(os.listdir(folder)) == ct.shape[2]


def test_failure_mid_write_leaves_nothing(tmp_path, ct, monkeypatch):
    import nibabel as nib

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(RuntimeError):
        save(ct, tmp_path / "x.nii.gz")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    # DICOM: fail on the fourth slice
    calls = {"n": 0}
    real = pydicom.Dataset.save_as

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        return real(self, *a, **k)

    monkeypatch.setattr(pydicom.Dataset, "save_as", flaky)
    with pytest.raises(OSError):
        save(ct, tmp_path / "series")
    assert os.listdir(tmp_path) == []


def _read_series(folder):
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(folder)))
    return Volume.from_sitk(r.Execute())


def test_dicom_ct_exact_and_oblique_geometry(tmp_path, ct):
    folder = save(ct, tmp_path / "ct")
    back = _read_series(folder)  # an independent reader (GDCM)
    assert np.array_equal(back.array, ct.array)
    assert np.allclose(back.affine, ct.affine, atol=1e-4)
    files = sorted(folder.iterdir())
    ds = [pydicom.dcmread(str(f)) for f in files]
    assert {d.SeriesInstanceUID for d in ds} == {ds[0].SeriesInstanceUID}
    assert len({d.SOPInstanceUID for d in ds}) == len(ds)
    # CT Image module: value 3 AXIAL (not a localizer), docs/dicom.md
    assert list(ds[0].ImageType) == ["DERIVED", "SECONDARY", "AXIAL"] and ds[0].Modality == "CT"
    assert ds[0].pixel_array.dtype == np.int16 and float(ds[0].RescaleSlope) == 1.0
    assert float(ds[0].SpacingBetweenSlices) == pytest.approx(2.5)


def test_dicom_float_within_documented_bound(tmp_path, pet):
    folder = save(pet, tmp_path / "pet")
    back = _read_series(folder)
    assert np.allclose(back.affine, pet.affine, atol=1e-4)
    for k in range(pet.shape[2]):
        peak = float(np.abs(pet.array[:, :, k]).max())
        assert np.abs(back.array[:, :, k] - pet.array[:, :, k]).max() <= peak / 131070 * 1.0001
    ds = pydicom.dcmread(str(sorted(folder.iterdir())[0]))
    assert ds.Units == "GML" and ds.Modality == "PT"
    assert series_suv_factors([header_from_dataset(ds)]) == [1.0]


def test_dicom_template_deidentified(tmp_path, ct):
    tpl = pydicom.Dataset()
    tpl.PatientName = "Doe^Jane"
    tpl.PatientID = "MRN123456"
    tpl.PatientBirthDate = "19600101"
    tpl.PatientSex = "F"
    tpl.InstitutionName = "General Hospital"
    tpl.StudyInstanceUID = pydicom.uid.generate_uid()
    tpl.FrameOfReferenceUID = pydicom.uid.generate_uid()
    tpl.StudyDescription = "HEAD"
    tpl.SeriesInstanceUID = pydicom.uid.generate_uid()
    folder = save(ct, tmp_path / "anon", template=tpl, series_description="fused")
    for f in folder.iterdir():
        raw = f.read_bytes()
        assert b"Doe" not in raw and b"MRN123456" not in raw and b"19600101" not in raw and b"General" not in raw
        ds = pydicom.dcmread(str(f))
        # PS3.15 Basic Profile (docs/dicom.md): study and frame-of-reference UIDs replaced, StudyDescription removed
        assert ds.StudyInstanceUID != tpl.StudyInstanceUID and ds.FrameOfReferenceUID != tpl.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != tpl.SeriesInstanceUID and ds.PatientIdentityRemoved == "YES"
        assert ds.SeriesDescription == "fused" and "StudyDescription" not in ds
    kept = save(ct, tmp_path / "kept", template=tpl, deidentify=False)
    ds = pydicom.dcmread(str(next(kept.iterdir())))
    assert ds.PatientID == "MRN123456" and ds.StudyInstanceUID == tpl.StudyInstanceUID
    assert ds.FrameOfReferenceUID == tpl.FrameOfReferenceUID
    # without a template, de-identified output gets a fresh study
    a = pydicom.dcmread(str(next(save(ct, tmp_path / "n1").iterdir())))
    b = pydicom.dcmread(str(next(save(ct, tmp_path / "n2").iterdir())))
    assert a.StudyInstanceUID != b.StudyInstanceUID


def test_dicom_pet_bqml_keeps_suv_tags_from_template(tmp_path):
    tpl = pydicom.Dataset()
    tpl.StudyInstanceUID = pydicom.uid.generate_uid()
    tpl.PatientWeight = "70"
    tpl.Units, tpl.DecayCorrection, tpl.CorrectedImage = "BQML", "START", ["ATTN", "DECY"]
    tpl.SeriesDate, tpl.SeriesTime = "20240101", "100000"
    tpl.AcquisitionDate, tpl.AcquisitionTime = "20240101", "100000"
    item = pydicom.Dataset()
    item.RadionuclideHalfLife, item.RadionuclideTotalDose = "6586.2", "3.5e8"
    item.RadiopharmaceuticalStartDateTime = "20240101090000"
    tpl.RadiopharmaceuticalInformationSequence = pydicom.Sequence([item])
    vol = Volume(np.full((8, 8, 3), 5000.0, np.float32), np.eye(4), modality="PT", unit="Bq/mL")
    folder = save(vol, tmp_path / "bq", template=tpl)
    hs = [header_from_dataset(pydicom.dcmread(str(f))) for f in sorted(folder.iterdir())]
    assert hs[0]["Units"] == "BQML"
    expected = series_suv_factors([header_from_dataset(tpl)])[0]
    assert series_suv_factors(hs) == pytest.approx([expected] * 3)
    no_tags = save(vol, tmp_path / "bare")
    with pytest.raises(SUVError, match="RadionuclideTotalDose|PatientWeight"):
        series_suv_factors([header_from_dataset(pydicom.dcmread(str(next(no_tags.iterdir()))))])


def test_dicom_round_trip_with_medfuse_load(tmp_path, ct, pet):
    pytest.importorskip("medfuse.io.dicom", reason="the DICOM reader is not in this checkout yet")
    import medfuse

    for vol in (ct, pet):
        back = medfuse.load(save(vol, tmp_path / vol.modality))
        assert np.allclose(back.affine, vol.affine, atol=1e-4)
        assert (back.modality, back.unit) == (vol.modality, vol.unit)
        peak = float(np.abs(vol.array).max())
        # documented bound, plus float32 rounding of the reader's decoded values
        tol = 0 if vol.unit == "HU" else peak / 131070 + 2 * peak * float(np.finfo(np.float32).eps)
        assert np.abs(back.array.astype(float) - vol.array).max() <= tol


def test_atomic_helpers_refuse_source_folder(tmp_path):
    src = tmp_path / "series"
    src.mkdir()
    with pytest.raises(OutputExistsError, match="source"):
        atomic.check_output(src / "out", overwrite=True, inputs=[src])
    out = atomic.atomic_write_text(tmp_path / "a.txt", "x")
    with pytest.raises(OutputExistsError):
        atomic.atomic_write_text(out, "y")
    assert out.read_text() == "x"


def _philips_first_volume(shared):
    """The first dynamic of the real Philips EPI, read with SimpleITK (an independent reader)."""
    folder = shared("data", "dicom", "qa-philips-scaling", "In", "Magdeburg_2014", "fmri")
    files = sorted(folder.glob("*_0001_*.dcm"))
    dss = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    normal = np.cross(*np.reshape([float(x) for x in dss[0].ImageOrientationPatient], (2, 3)))
    order = np.argsort([normal @ [float(x) for x in d.ImagePositionPatient] for d in dss])
    files = [files[i] for i in order]
    r = sitk.ImageSeriesReader()
    r.SetFileNames([str(f) for f in files])
    return files, dss[0], Volume.from_sitk(r.Execute(), modality="MR", provenance={"source": str(folder)})


def test_real_dicom_derived_series_round_trip(shared, tmp_path):
    files, tpl, vol = _philips_first_volume(shared)
    assert vol.is_oblique and vol.shape == (64, 64, 9)
    hashes = [_sha(f) for f in files]
    folder = save(vol, tmp_path / "derived", template=files[0])
    back = _read_series(folder)
    assert np.allclose(back.affine, vol.affine, atol=1e-4)
    for k in range(vol.shape[2]):
        peak = float(np.abs(vol.array[:, :, k]).max())
        assert np.abs(back.array[:, :, k] - vol.array[:, :, k]).max() <= peak / 131070 * 1.0001
    phi = [str(tpl.get(k, "")).encode() for k in ("PatientName", "PatientID", "PatientBirthDate")]
    for f in folder.iterdir():
        raw = f.read_bytes()
        assert not any(p and p in raw for p in phi)
        ds = pydicom.dcmread(str(f))
        assert ds.StudyInstanceUID != tpl.StudyInstanceUID and ds.SeriesInstanceUID != tpl.SeriesInstanceUID
        assert ds.FrameOfReferenceUID != tpl.FrameOfReferenceUID and ds.Modality == "MR"  # replaced: de-identified
    assert [_sha(f) for f in files] == hashes
    with pytest.raises(OutputExistsError, match="source"):
        save(vol, files[0].parent / "out", overwrite=True)


@pytest.mark.parametrize("unit", ["SUVlbm", "SUVbsa"])
def test_dicom_round_trip_keeps_stored_suv_kind(tmp_path, pet, unit):
    """A GML series declares its SUV kind in SUVType; loading it must not relabel it as SUVbw."""
    import medfuse

    vol = Volume(pet.array, pet.affine, modality="PT", unit=unit)
    folder = save(vol, tmp_path / "pet")
    ds = pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)
    # DICOM's defined terms: g/mL for SUVbw/SUVlbm, cm2/mL for SUVbsa
    assert (ds.Units, ds.SUVType) == ("CM2ML" if unit == "SUVbsa" else "GML", unit[3:].upper())
    back = medfuse.load(folder)
    assert back.unit == unit
    assert np.allclose(back.array, vol.array, atol=float(vol.array.max()) / 1000)
    # the stored values are returned unchanged when asked for them as stored
    assert medfuse.load(folder, suv="none").unit == unit


def test_nifti_codes_follow_the_recorded_space(tmp_path, pet):
    import nibabel as nib

    from medfuse.errors import InvalidInputError

    for space, code in (("scanner", 1), ("aligned", 2), ("talairach", 3), ("mni", 4), ("template", 5)):
        v = pet.copy()
        v.provenance["nifti_space"] = space
        hdr = nib.load(str(save(v, tmp_path / f"{space}.nii.gz"))).header
        assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (code, code), space
        assert np.allclose(hdr.get_sform(), pet.affine_ras, atol=1e-5)
    # MetaImage/NRRD have no such code: the space is simply not stored there, and writing still works.
    v = pet.copy()
    v.provenance["nifti_space"] = "mni"
    assert np.array_equal(load_image(save(v, tmp_path / "m.nrrd")).array, pet.array)
    # A space name that is not NIfTI's is refused before anything is written.
    v.provenance["nifti_space"] = "MNI152NLin2009cAsym"
    with pytest.raises(InvalidInputError, match="nifti_space") as e:
        save(v, tmp_path / "bad.nii.gz")
    assert "mni" in e.value.fix and not (tmp_path / "bad.nii.gz").exists()


# ----------------------------------------------------------------------------- inputs never touched, outputs kept
def _leftovers(folder):
    return [p.name for p in folder.rglob(".medfuse-*")]


def test_hard_link_to_the_source_is_refused(tmp_path, ct):
    """Another spelling of the source (a hard link here; ``A.NII.GZ`` on a case-insensitive disk) is the source."""
    src = save(ct, tmp_path / "in.nii.gz")
    v = load_image(src)
    before = _sha(src)
    link = tmp_path / "link.nii.gz"
    os.link(src, link)
    with pytest.raises(OutputExistsError, match="source"):
        save(v.with_array(v.array + 1), link, overwrite=True)
    assert _sha(src) == before and os.path.samefile(src, link)


def test_mhd_input_data_file_is_never_written_over(tmp_path, ct):
    header = save(ct, tmp_path / "m.mhd")
    v = load_image(header)
    raw_sha = _sha(tmp_path / "m.raw")
    # a DICOM series folder named like the input's data file
    with pytest.raises(OutputExistsError, match="source"):
        save(v, tmp_path / "m.raw", overwrite=True)
    # a header whose data file is the input's (the input header was renamed, so its .raw has another stem)
    os.replace(header, tmp_path / "renamed.mhd")
    v2 = load_image(tmp_path / "renamed.mhd")
    with pytest.raises(OutputExistsError, match="source"):
        save(v2.with_array(v2.array * 0), tmp_path / "m.mhd", overwrite=True)
    assert _sha(tmp_path / "m.raw") == raw_sha
    assert sorted(os.listdir(tmp_path)) == ["m.raw", "renamed.mhd"]


@pytest.mark.parametrize("name", ["U.MHA", "u.Nii.Gz", "U.MHD", "U.NHDR", "U.NRRD", "U.NII"])
def test_upper_case_suffix_writes_the_real_image(tmp_path, ct, name):
    """ITK and nibabel pick the format from the (lower-case) name: the temp name is lower case, the final keeps
    the user's case. Before, ``U.MHA`` was installed as an empty file beside stray ``.mhd``/``.zraw`` temps."""
    out = save(ct, tmp_path / name)
    assert out.name == name and out.stat().st_size > 0 and _leftovers(tmp_path) == []
    low = tmp_path / "low"
    low.mkdir()
    for f in tmp_path.iterdir():  # medfuse's reader (SimpleITK) needs a lower-case ending too; data file names stay
        if f.is_file():
            (low / (f.name.lower() if f == out else f.name)).write_bytes(f.read_bytes())
    assert np.array_equal(load_image(low / name.lower()).array, ct.array)


def test_a_folder_in_the_way_of_a_file_is_kept(tmp_path, ct):
    folder = tmp_path / "f.nii.gz"
    folder.mkdir()
    (folder / "keep.txt").write_text("user data")
    for name in ("f.nii.gz",):
        with pytest.raises(OutputExistsError, match="folder is in the way"):
            save(ct, tmp_path / name, overwrite=True)
    assert (folder / "keep.txt").read_text() == "user data" and _leftovers(tmp_path) == []


def test_dicom_overwrite_replaces_only_a_dicom_series(tmp_path, ct):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.docx").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not a DICOM series"):
        save(ct, docs, overwrite=True)
    assert (docs / "thesis.docx").read_text() == "years of work" and (docs / "sub").is_dir()
    notes = tmp_path / "notes"
    notes.write_text("a file, not a series")
    with pytest.raises(OutputExistsError, match="file is in the way"):
        save(ct, notes, overwrite=True)
    assert notes.read_text() == "a file, not a series" and _leftovers(tmp_path) == []
    series = save(ct, tmp_path / "series")  # an earlier series is replaced
    save(ct.with_array(ct.array + 1), series, overwrite=True)
    assert len(os.listdir(series)) == ct.shape[2] and _leftovers(tmp_path) == []


def _fail_at_replace(monkeypatch, n: int, error: BaseException, name: str = "replace") -> None:
    """Make the n-th ``os.<name>`` call of the write raise ``error`` (a crash, Ctrl-C or a full disk then)."""
    real, calls = getattr(os, name), [0]

    def fail_once(a, b, *args, **kw):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return real(a, b, *args, **kw)

    monkeypatch.setattr(os, name, fail_once)


def test_dicom_overwrite_interrupted_at_the_swap_keeps_the_old_series(tmp_path, ct, monkeypatch):
    series = save(ct, tmp_path / "series")
    before = {f.name: _sha(f) for f in series.iterdir()}
    # The old series is aside, the new one not yet in place.
    _fail_at_replace(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save(ct.with_array(ct.array + 1), series, overwrite=True)
    monkeypatch.undo()
    assert {f.name: _sha(f) for f in series.iterdir()} == before and _leftovers(tmp_path) == []


def test_mhd_overwrite_failing_at_the_header_keeps_the_old_pair(tmp_path, ct, monkeypatch):
    import errno

    header = save(ct, tmp_path / "h.mhd")
    before = {f.name: _sha(f) for f in tmp_path.iterdir()}
    # Old .raw aside, new .raw placed, old header aside: placing the new header (a hard link) fails.
    _fail_at_replace(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"), name="link")
    with pytest.raises(OutputWriteError, match="disk is full") as e:
        save(ct.with_array(ct.array + 1), header, overwrite=True)
    monkeypatch.undo()
    assert e.value.fix and {f.name: _sha(f) for f in tmp_path.iterdir()} == before
    assert np.array_equal(load_image(header).array, ct.array)


@pytest.mark.parametrize("name", ["x.nii.gz", "x.mha", "x.mhd", "series"])
def test_permission_denied_is_a_typed_error(tmp_path, ct, monkeypatch, name):
    """Root ignores folder permissions, so the refusal is simulated where the file system would give it."""
    import errno
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(OutputWriteError, match="permission denied") as e:
        save(ct, tmp_path / name)
    assert e.value.fix and e.value.path == str(tmp_path / name) and os.listdir(tmp_path) == []


def test_disk_full_is_typed_keeps_the_old_file_and_cleans_up(tmp_path, ct, monkeypatch):
    import errno

    import nibabel as nib

    out = save(ct, tmp_path / "a.nii.gz")
    before = _sha(out)

    def full(img, filename, *a, **k):
        with open(filename, "wb") as fh:
            fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    with pytest.raises(OutputWriteError, match="disk is full") as e:
        save(ct.with_array(ct.array + 1), out, overwrite=True)
    assert e.value.fix and _sha(out) == before and os.listdir(tmp_path) == ["a.nii.gz"]


# ----------------------------------------------------------------------------- dtypes a format cannot hold
def test_dtypes_are_converted_exactly_or_refused(tmp_path):
    from medfuse.errors import InvalidInputError

    aff = np.eye(4)
    big = Volume(np.full((4, 4, 3), 2 ** 60 + 1, np.int64), aff)
    for name in ("big.nii.gz", "big.mha", "big.nrrd"):
        with pytest.raises(InvalidInputError, match="exactly"):  # was float64: 2**60 + 1 came back as 2**60
            save(big, tmp_path / name)
    fits = Volume(np.full((4, 4, 3), 2 ** 40, np.int64), aff)  # exact in float64
    assert load_image(save(fits, tmp_path / "fits.nii.gz")).array.max() == 2 ** 40
    cplx = Volume((np.arange(48).reshape(4, 4, 3) * (1 + 2j)).astype(np.complex64), aff)
    for name in ("c.mha", "c.mhd", "c_dicom"):  # two components medfuse cannot read back / imaginary part dropped
        with pytest.raises(InvalidInputError, match="complex64"):
            save(cplx, tmp_path / name)
    assert np.array_equal(load_image(save(cplx, tmp_path / "c.nii.gz")).array, cplx.array)
    if hasattr(np, "float128") and np.dtype(np.longdouble).itemsize > 8:
        ld = Volume(np.arange(48, dtype=np.longdouble).reshape(4, 4, 3), aff)
        for name in ("ld.nii.gz", "ld.mha"):  # was a raw TypeError/HeaderDataError
            back = load_image(save(ld, tmp_path / name))
            assert back.array.dtype == np.float64 and np.array_equal(back.array, ld.array)
    mask = Volume(np.arange(48).reshape(4, 4, 3) % 2 == 0, aff)
    back = load_image(save(mask, tmp_path / "mask.nii.gz"))
    assert back.array.dtype == np.uint8 and np.array_equal(back.array, mask.array)
    assert _leftovers(tmp_path) == [] and not any(p.name.startswith(("big", "c.m", "c_")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("name", ["scan.img", "scan.hdr", "SCAN.IMG"])
def test_analyze_names_are_refused_not_made_a_dicom_folder(tmp_path, ct, name):
    from medfuse.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="does not write"):
        save(ct, tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_overwrite_never_takes_another_images_data_file(tmp_path, ct):
    """``a.nhdr`` and ``a.mhd`` both keep their voxels in ``a.raw``: overwrite=True names a.nhdr, not a.mhd."""
    save(ct, tmp_path / "a.mhd")
    raw = _sha(tmp_path / "a.raw")
    for overwrite in (False, True):  # without overwrite it said "pass overwrite=True", which led here
        with pytest.raises(OutputExistsError, match="another image"):
            save(ct.with_array(ct.array + 1), tmp_path / "a.nhdr", overwrite=overwrite)
    assert _sha(tmp_path / "a.raw") == raw and sorted(os.listdir(tmp_path)) == ["a.mhd", "a.raw"]
    save(ct.with_array(ct.array + 1), tmp_path / "a.mhd", overwrite=True)  # its own pair is replaced
    assert np.array_equal(load_image(tmp_path / "a.mhd").array, ct.array + 1)


@pytest.mark.parametrize("name", ["a.nii.gz", "a.mhd", "series"])
def test_overwrite_keeps_a_private_outputs_permissions(tmp_path, ct, name):
    """An output made private (it holds patient data) must not become world-readable when it is replaced."""
    import stat

    out = save(ct, tmp_path / name)
    files = [out] + ([tmp_path / "a.raw"] if name == "a.mhd" else [])
    for f in files:
        os.chmod(f, 0o700 if f.is_dir() else 0o600)
    save(ct.with_array(ct.array + 1), out, overwrite=True)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == (0o700 if f.is_dir() else 0o600), f


def test_fused_volume_is_never_saved_over_the_files_it_was_made_from(tmp_path):
    # A fused Volume carried no source, so save(fused, "mr.nii.gz", overwrite=True) replaced the MR it came from.
    import hashlib

    import medfuse

    mr_path, pet_path = tmp_path / "mr.nii.gz", tmp_path / "pet.nii.gz"
    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    medfuse.save(Volume(rng.random((24, 24, 16)).astype(np.float32) * 500, aff, modality="MR"), mr_path)
    medfuse.save(Volume(rng.random((24, 24, 16)).astype(np.float32) * 6, aff, modality="PT", unit="SUVbw"), pet_path)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (mr_path, pet_path)}
    fused = medfuse.fuse(medfuse.load(mr_path), medfuse.load(pet_path), method="max")
    assert set(fused.provenance["sources"]) == {str(mr_path), str(pet_path)}
    for target in (mr_path, pet_path):
        with pytest.raises(OutputExistsError):
            medfuse.save(fused, target, overwrite=True)
    # ... nor over them through a copy (a derived volume keeps the list).
    with pytest.raises(OutputExistsError):
        medfuse.save(fused.copy(), pet_path, overwrite=True)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (mr_path, pet_path)} == before
    medfuse.save(fused, tmp_path / "fused.nii.gz")  # anywhere else is fine


def test_picture_and_sidecar_names_are_refused_not_made_a_dicom_folder(tmp_path):
    # save(vol, "fused.png") wrote a DICOM series folder named fused.png (only the CLI refused such names).
    from medfuse.errors import InvalidInputError

    vol = Volume(np.zeros((4, 4, 3), np.float32), np.eye(4))
    for name in ("fused.png", "x.JSON", "t.tfm"):
        with pytest.raises(InvalidInputError, match="not a 3-D image format"):
            save(vol, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
