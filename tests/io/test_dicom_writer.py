"""DICOM writer: what comes back through three readers (medfuse, SimpleITK/GDCM, pydicom) from real data."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import medfuse
from medfuse.errors import MedfuseWarning
from medfuse.io.dicom_writer import pseudonym_uid
from medfuse.io.writers import save
from medfuse.volume import Volume


def _gdcm_series(folder) -> Volume:
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(folder)))
    return Volume.from_sitk(r.Execute())


def _gdcm_tag(path, tag: str) -> str:
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return r.GetMetaData(tag)


def _same_world(written: Volume, back: Volume, tol: float):
    """Every voxel of ``written`` is found in ``back`` at the same world position (< 1e-3 mm), holding its value
    within ``tol`` (a scalar or one bound per slice k of ``written``); a reader may reverse k."""
    rng = np.random.default_rng(0)
    ijk = np.stack([rng.integers(0, s, 400) for s in written.shape], 1)
    ijk = np.vstack([ijk, [0, 0, 0], np.array(written.shape) - 1])
    world = written.index_to_world(ijk)
    idx = back.world_to_index(world)
    near = np.rint(idx)
    assert np.abs(idx - near).max() < 1e-3 / min(back.spacing)
    assert np.all((near >= 0) & (near < np.array(back.shape)))
    assert np.abs(back.index_to_world(near) - world).max() < 1e-3
    got = back.array[tuple(near.astype(int).T)].astype(float)
    want = written.array[tuple(ijk.T)].astype(float)
    bound = np.broadcast_to(np.asarray(tol, float), (written.shape[2],))[ijk[:, 2]]
    assert np.all(np.abs(got - want) <= bound)


def _slice_bounds(vol: Volume) -> np.ndarray:
    """The documented quantisation bound per slice (signed: max/65534; non-negative: max/131070), plus the
    float32 rounding of a reader's decoded value."""
    a = vol.array.astype(float)
    peak = np.abs(a).max(axis=(0, 1))
    return peak / (65534 if a.min() < 0 else 131070) * (1 + 1e-6) + peak * 2 * float(np.finfo(np.float32).eps)


# ------------------------------------------------------------------------------------------------ values
def test_quantised_series_with_empty_slices_keeps_fractions_in_gdcm(shared, tmp_path):
    """SPM's single_subj_T1 (LAS, flipped axis) has all-zero first and last slices. Such a slice used to get
    RescaleSlope 1, and GDCM/ITK, which pick the output pixel type from the first file, then decoded the whole
    series as uint16: every voxel lost its fraction (errors up to 0.79 on a 0..1 image)."""
    vol = medfuse.load(shared("data", "spm12-templates", "single_subj_T1.nii"))
    assert vol.orientation == "LAS" and not np.any(vol.array[:, :, 0]) and not np.any(vol.array[:, :, -1])
    folder = save(vol, tmp_path / "t1")
    bounds = _slice_bounds(vol)
    gdcm = _gdcm_series(folder)
    assert gdcm.array.dtype.kind == "f"
    _same_world(vol, gdcm, bounds)
    _same_world(vol, medfuse.load(folder), bounds)


def test_first_slice_with_whole_number_slope_keeps_fractions_in_gdcm(shared, tmp_path):
    """A slice whose peak is 2 x 65535 quantises with slope 2: GDCM then decoded the series as integers."""
    vol = medfuse.load(shared("data", "spm12-templates", "T1.nii"))
    arr = vol.array.astype(np.float32) * 1000
    for k in (0, -1):  # whichever end GDCM reads first (the template is left-handed: k runs against the normal)
        arr[:, :, k] = 0
        arr[10, 10, k] = 2 * 65535
    vol = vol.with_array(arr)
    folder = save(vol, tmp_path / "t1")
    gdcm = _gdcm_series(folder)
    assert gdcm.array.dtype.kind == "f"
    _same_world(vol, gdcm, _slice_bounds(vol))


def test_ct_hu_exact_through_three_readers(shared, tmp_path):
    """Real GE EPI (int16) turned into CT-like HU with values below -1024 and a uint16 source: exact everywhere."""
    src = medfuse.load_volumes(shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0004"))[0]
    hu = src.array.astype(np.int32) - 2048  # down to -2048 HU
    for arr in (hu.astype(np.int16), (hu + 2048).astype(np.uint16)):
        vol = Volume(arr, src.affine, modality="CT", unit="HU")
        folder = save(vol, tmp_path / f"ct_{arr.dtype}")
        for back in (medfuse.load(folder), _gdcm_series(folder)):
            _same_world(vol, back, 0)
        ds = pydicom.dcmread(next(folder.iterdir()))
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.RescaleType) == (1.0, 0.0, "HU")


# ------------------------------------------------------------------------------------------------ text
def test_non_ascii_text_is_written_as_declared_utf8(tmp_path):
    """A template in Latin-1 (ISO_IR 100) and a SeriesDescription with characters Latin-1 lacks: without a
    SpecificCharacterSet the text was written in Latin-1 bytes (invalid in the default repertoire) and '–' as '?'."""
    tpl = pydicom.Dataset()
    tpl.SpecificCharacterSet = "ISO_IR 100"
    tpl.PatientName = "Müller^Jürgen"
    tpl.PatientID = "ID1"
    tpl.StudyInstanceUID = pydicom.uid.generate_uid()
    tpl.StudyDescription = "Schädel nativ"
    tpl.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    tpl.SOPInstanceUID = pydicom.uid.generate_uid()
    tpl.file_meta = pydicom.dataset.FileMetaDataset()
    tpl.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    tpl.save_as(tmp_path / "tpl.dcm", enforce_file_format=True)
    vol = Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.diag([1.0, 1.0, 2.0, 1.0]),
                 modality="CT", unit="HU")
    desc = "Fusión PET/TC – medfuse"
    folder = save(vol, tmp_path / "out", template=tmp_path / "tpl.dcm", deidentify=False, series_description=desc)
    f = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(f)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert (ds.SeriesDescription, ds.StudyDescription) == (desc, "Schädel nativ")
    assert str(ds.PatientName) == "Müller^Jürgen"
    raw = f.read_bytes()
    assert "Müller".encode() in raw and "Müller".encode("latin-1") not in raw
    assert _gdcm_tag(f, "0008|103e").strip() == desc
    # all-ASCII output keeps the default repertoire
    plain = pydicom.dcmread(next(save(vol, tmp_path / "plain").iterdir()))
    assert "SpecificCharacterSet" not in plain


def test_series_description_is_one_value(tmp_path):
    """A backslash is DICOM's value separator: 'PET\\CT' became two SeriesDescription values (VM 2)."""
    vol = Volume(np.zeros((3, 4, 2), np.int16), np.eye(4), modality="CT", unit="HU")
    f = next(save(vol, tmp_path / "out", series_description="PET\\CT fused\n").iterdir())
    ds = pydicom.dcmread(f)
    assert ds["SeriesDescription"].VM == 1 and ds.SeriesDescription == "PET/CT fused"
    assert "\\" not in _gdcm_tag(f, "0008|103e")


# ------------------------------------------------------------------------------------------------ geometry
def _crop(vol: Volume, i: slice, j: slice, k: slice) -> Volume:
    aff = vol.affine.copy()
    aff[:3, 3] = vol.index_to_world([i.start or 0, j.start or 0, k.start or 0])
    return Volume(np.ascontiguousarray(vol.array[i, j, k]), aff, modality=vol.modality, unit=vol.unit)


def test_one_voxel_thick_plane_lands_in_place_in_gdcm(shared, tmp_path):
    """A coronal plane of BraTS (I, 1, K): one-row images were stacked by ITK/GDCM along the row axis, so
    SimpleITK put all but one slice of the plane at wrong world positions."""
    brats = medfuse.load(shared("data", "brats-gli-00001", "t1c.nii.gz"))
    plane = _crop(brats, slice(40, 200), slice(120, 121), slice(20, 140))
    assert plane.shape == (160, 1, 120) and np.ptp(plane.array) > 0
    folder = save(plane, tmp_path / "coronal")
    for back in (_gdcm_series(folder), medfuse.load(folder)):
        _same_world(plane, back, 0)


# ------------------------------------------------------------------------------------------------ PET
def _pet_template(shared) -> pydicom.Dataset:
    """The first instance of the real Siemens PET headers as a pydicom data set, with identifiers added."""
    import json

    from pydicom.valuerep import format_number_as_ds as ds_

    h = json.loads(shared("data", "pet-suv-headers", "SIEMENS-instances.json").read_text())[0]
    tpl = pydicom.Dataset()
    tpl.PatientName, tpl.PatientID, tpl.PatientBirthDate = "Doe^John", "MRN778899", "19510203"
    tpl.InstitutionName = "Sample Hospital"
    tpl.StudyInstanceUID, tpl.FrameOfReferenceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    tpl.Modality = "PT"
    for key in ("SeriesDate", "SeriesTime", "PatientSex", "AcquisitionDate", "AcquisitionTime", "DecayCorrection",
                "Units"):
        setattr(tpl, key, str(h[key]).strip())
    tpl.PatientWeight = ds_(float(h["PatientWeight"]))
    tpl.CorrectedImage = h["CorrectedImage"]
    item = pydicom.Dataset()
    item.Radiopharmaceutical = "Fluorodeoxyglucose"
    item.RadionuclideTotalDose = ds_(float(h["RadionuclideTotalDose"]))
    item.RadionuclideHalfLife = ds_(float(h["RadionuclideHalfLife"]))
    item.RadiopharmaceuticalStartDateTime = h["RadiopharmaceuticalStartDateTime"].strip()
    tpl.RadiopharmaceuticalInformationSequence = pydicom.Sequence([item])
    return tpl


def test_pet_suv_keeps_the_tracer_and_bqml_stays_bqml(shared, tmp_path):
    """SPM's PET template as Bq/mL and as SUVbw with real Siemens headers as template. The SUV series used to
    lose the radiopharmaceutical sequence (which tracer the SUV is of), and a PET without template lacked it
    although the PET Isotope module requires it (type 2)."""
    from medfuse.io.suv import header_from_dataset, series_suv_factors

    tpl = _pet_template(shared)
    factor = series_suv_factors([header_from_dataset(tpl)])[0]
    pet = medfuse.load(shared("data", "spm12-templates", "PET.nii"))
    bq = Volume(pet.array.astype(np.float32) * 20000, pet.affine, modality="PT", unit="Bq/mL")
    suv = bq.with_array(bq.array * np.float32(factor), unit="SUVbw")
    for vol, name in ((bq, "bq"), (suv, "suv")):
        folder = save(vol, tmp_path / name, template=tpl)
        files = sorted(folder.iterdir())
        for f in files[:3]:
            raw = f.read_bytes()
            assert b"Doe" not in raw and b"MRN778899" not in raw and b"Sample Hospital" not in raw
            ds = pydicom.dcmread(f)
            assert ds.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical == "Fluorodeoxyglucose"
            assert ds.Units == ("BQML" if vol is bq else "GML")
        bounds = _slice_bounds(vol)
        as_stored = medfuse.load(folder, suv="none")
        assert as_stored.unit == vol.unit
        _same_world(vol, as_stored, bounds)
        _same_world(vol, _gdcm_series(folder), bounds)
        back = medfuse.load(folder)  # SUVbw from both
        assert back.unit == "SUVbw"
        _same_world(suv, back, _slice_bounds(suv) * (1 + 1e-6))
    bare = pydicom.dcmread(next(save(suv, tmp_path / "bare").iterdir()))
    assert "RadiopharmaceuticalInformationSequence" in bare and len(bare.RadiopharmaceuticalInformationSequence) == 0


def test_secondary_capture_states_its_conversion_type(shared, tmp_path):
    """NM and unknown modalities are written as Secondary Capture, whose SC Equipment module requires
    ConversionType (type 1); it was missing. The SPECT template comes back in place through all readers."""
    spect = medfuse.load(shared("data", "spm12-templates", "SPECT.nii"))
    for vol in (Volume(np.rint(spect.array * 100).astype(np.int32), spect.affine, modality="NM", unit="counts"),
                spect):
        folder = save(vol, tmp_path / vol.modality)
        ds = pydicom.dcmread(next(folder.iterdir()))
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.ConversionType == "WSD"
        bounds = 0 if vol.modality == "NM" else _slice_bounds(vol)
        for back in (medfuse.load(folder), _gdcm_series(folder)):
            _same_world(vol, back, bounds)


def _shown(ds):
    """The slice as a viewer shows it: stored values -> rescale -> the series' VOI window (pydicom's LUTs)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    real = apply_modality_lut(ds.pixel_array, ds)
    return real, apply_voi_lut(real, ds)


@pytest.mark.parametrize("case", ["t1 0..1", "fused 0..1", "ct", "narrow ints"])
def test_the_written_window_shows_the_whole_range_linearly(shared, tmp_path, case):
    """A viewer applying the series' window (the default LINEAR function) shows lo..hi as a linear ramp. A fused
    0..1 series (width 1) showed as a black-and-white mask: every voxel above 0 full white."""
    t1 = medfuse.load(shared("data", "spm12-templates", "T1.nii"))
    vol = {"t1 0..1": t1,
           "fused 0..1": Volume((t1.array / t1.array.max()).astype(np.float32), t1.affine),
           "ct": Volume(np.rint(t1.array * 2000 - 1000).astype(np.int16), t1.affine, modality="CT", unit="HU"),
           "narrow ints": Volume(np.rint(t1.array * 3).astype(np.int16), t1.affine)}[case]
    files = sorted(save(vol, tmp_path / "s").iterdir())
    ds = pydicom.dcmread(str(files[len(files) // 2]))
    assert ds.get("VOILUTFunction", "LINEAR") == "LINEAR"
    real, shown = _shown(ds)
    lo, hi = float(vol.array.min()), float(vol.array.max())
    # The standard's LINEAR ramp runs from c - 0.5 - (w - 1) / 2 to c - 0.5 + (w - 1) / 2: exactly lo..hi.
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    assert c - 0.5 - (w - 1) / 2 == pytest.approx(lo, abs=1e-6 * max(1.0, hi - lo))
    assert c - 0.5 + (w - 1) / 2 == pytest.approx(hi, abs=1e-6 * max(1.0, hi - lo))
    # As pydicom's viewer code shows it: a straight line in the real values, nothing clipped or merged.
    inside = real > real.min()
    slope, icpt = np.polyfit(real[inside], shown[inside], 1)
    assert slope > 0
    np.testing.assert_allclose(shown[inside], slope * real[inside] + icpt, atol=1e-6 * np.ptp(shown) + 1e-9)
    assert len(np.unique(shown)) == len(np.unique(real)), "distinct values merged by the window"


# ------------------------------------------------------------------------------------------------ identity
def test_frame_of_reference_only_from_the_template(shared, tmp_path):
    """A resampled (registered) volume keeps the moving image's provenance, so a FrameOfReferenceUID taken from
    provenance would claim the moving scan's patient space for voxels that are in the fixed one's. Only the
    template sets it; otherwise a new one is made. UIDs valid, one series, one SOP instance per file, file meta
    matching the data set."""
    folder = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0004")
    src = medfuse.load_volumes(folder)[0]
    first = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)
    moved = src.with_array(src.array)
    moved.provenance["frame_of_reference_uid"] = str(first.FrameOfReferenceUID)
    bare = [pydicom.dcmread(f) for f in sorted(save(moved, tmp_path / "bare").iterdir())]
    assert {d.FrameOfReferenceUID for d in bare} != {first.FrameOfReferenceUID}
    with_tpl = [pydicom.dcmread(f) for f in sorted(save(moved, tmp_path / "tpl", template=folder,
                                                        deidentify=False).iterdir())]
    for series in (bare, with_tpl):
        uids = [d.SOPInstanceUID for d in series]
        assert len(set(uids)) == len(series) == src.shape[2]
        assert len({d.SeriesInstanceUID for d in series}) == 1
        assert series[0].SeriesInstanceUID != first.SeriesInstanceUID
        assert len({d.FrameOfReferenceUID for d in series}) == 1
        for d in series:
            assert all(pydicom.uid.UID(u).is_valid for u in (d.SOPInstanceUID, d.SeriesInstanceUID,
                                                             d.StudyInstanceUID, d.FrameOfReferenceUID))
            assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
            assert d.file_meta.MediaStorageSOPClassUID == d.SOPClassUID == pydicom.uid.MRImageStorage
            assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert list(d.ImageType[:2]) == ["DERIVED", "SECONDARY"] and "medfuse" in d.SeriesDescription
        pos = [float(np.cross(*np.reshape(d.ImageOrientationPatient, (2, 3))) @ np.array(d.ImagePositionPatient, float))
               for d in sorted(series, key=lambda d: int(d.InstanceNumber))]
        assert np.all(np.diff(pos) > 0) or np.all(np.diff(pos) < 0)
    assert {d.FrameOfReferenceUID for d in with_tpl} == {first.FrameOfReferenceUID}
    assert with_tpl[0].StudyInstanceUID == first.StudyInstanceUID
    # De-identified (the default): the template's frame of reference, under its pseudonym.
    deid = pydicom.dcmread(next(save(moved, tmp_path / "deid", template=folder).iterdir()))
    assert deid.FrameOfReferenceUID == pseudonym_uid(first.FrameOfReferenceUID) != first.FrameOfReferenceUID
    _same_world(src, medfuse.load(tmp_path / "tpl"), 0)


def test_template_folder_without_preamble(shared, tmp_path):
    """A real GE slice rewritten without the 128-byte preamble and file meta (as old PACS export): medfuse loads
    the folder, but as a template it was refused ('holds no readable DICOM file')."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    src = sorted(shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0004").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, ds.file_meta.TransferSyntaxUID.is_implicit_VR
    write_dataset(buf, ds)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "IMG1").write_bytes(buf.getvalue())
    vol = medfuse.load(tmp_path / "old")
    out = save(vol.with_array(vol.array), tmp_path / "derived", template=tmp_path / "old", deidentify=False)
    back = pydicom.dcmread(next(out.iterdir()))
    assert (back.StudyInstanceUID, back.FrameOfReferenceUID) == (ds.StudyInstanceUID, ds.FrameOfReferenceUID)
    _same_world(vol, medfuse.load(out), 0)
    _same_world(vol, _gdcm_series(out), 0)


def test_ct_not_in_hu_does_not_claim_hu(shared, tmp_path):
    """A CT volume normalised to 0..1 (unit 'arbitrary') was written with RescaleType HU; the CT Image module
    requires RescaleType when the values are not Hounsfield units ('US': unspecified)."""
    src = medfuse.load_volumes(shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0004"))[0]
    a = src.array.astype(np.float32)
    norm = Volume((a - a.min()) / np.ptp(a), src.affine, modality="CT", unit="arbitrary")
    folder = save(norm, tmp_path / "norm")
    f = next(folder.iterdir())
    assert pydicom.dcmread(f).RescaleType == "US" and _gdcm_tag(f, "0028|1054").strip() == "US"
    _same_world(norm, _gdcm_series(folder), _slice_bounds(norm))
    # And medfuse's reader does not take it back as HU (it did: every CT loaded as HU, whatever RescaleType said).
    with pytest.warns(MedfuseWarning, match="RescaleType is US, not HU"):
        back = medfuse.load(folder)
    assert (back.modality, back.unit) == ("CT", "arbitrary")
    assert medfuse.load(save(Volume(src.array, src.affine, modality="CT", unit="HU"), tmp_path / "hu")).unit == "HU"


def test_bqml_template_folder_keeps_the_series_scan_time(shared, tmp_path):
    """The real re-created Siemens series (SeriesTime 13:49 after its acquisition 13:03: SUV decays to the earliest
    acquisition) as three beds acquired one after another, the first file holding the last bed. The written Bq/mL
    series took that one file's AcquisitionTime for every slice: SUV came back 7 % high."""
    import json

    from pydicom.dataset import FileMetaDataset
    from pydicom.valuerep import format_number_as_ds as ds_

    h = json.loads(shared("data", "pet-suv-headers", "CPS_AND_BQML_AC_DT_-_S_DT-instances.json").read_text())[0]
    pet = medfuse.load(shared("data", "spm12-templates", "PET.nii"))
    src = tmp_path / "pet"
    src.mkdir()
    uids = [pydicom.uid.generate_uid() for _ in range(3)]
    for n, (k, acq) in enumerate(zip((40, 45, 50), ("131500.000000", "131000.000000", "130348.234000"))):
        plane = np.ascontiguousarray(pet.array[:, :, k].T * 20000)
        ds = pydicom.Dataset()
        ds.SOPClassUID = pydicom.uid.PositronEmissionTomographyImageStorage
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
        ds.Modality, ds.PatientName, ds.PatientID = "PT", "Doe^John", "MRN778899"
        ds.SeriesDate, ds.SeriesTime, ds.AcquisitionDate = h["SeriesDate"], h["SeriesTime"], h["AcquisitionDate"]
        ds.AcquisitionTime, ds.Units, ds.DecayCorrection = acq, h["Units"], h["DecayCorrection"]
        ds.CorrectedImage, ds.PatientWeight = h["CorrectedImage"], ds_(float(h["PatientWeight"]))
        item = pydicom.Dataset()
        item.RadionuclideTotalDose, item.RadionuclideHalfLife = (ds_(float(h[k_])) for k_ in (
            "RadionuclideTotalDose", "RadionuclideHalfLife"))
        item.RadiopharmaceuticalStartTime = h["RadiopharmaceuticalStartTime"]
        ds.RadiopharmaceuticalInformationSequence = pydicom.Sequence([item])
        ds.ImagePositionPatient = [float(x) for x in pet.index_to_world([0, 0, k])]
        ds.ImageOrientationPatient = [float(x) for x in np.concatenate([pet.direction[:, 0], pet.direction[:, 1]])]
        ds.PixelSpacing, ds.SliceThickness = [pet.spacing[1], pet.spacing[0]], pet.spacing[2] * 5
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        slope = float(plane.max()) / 65535
        ds.RescaleSlope, ds.RescaleIntercept = ds_(slope), "0"
        ds.PixelData = np.rint(plane / float(ds.RescaleSlope)).astype(np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.save_as(src / f"{n}.dcm", enforce_file_format=True)
    original = medfuse.load(src)
    assert original.unit == "SUVbw"
    bq = medfuse.load(src, suv="none")
    folder = save(bq, tmp_path / "derived", template=src)
    back = medfuse.load(folder)
    assert back.unit == "SUVbw"
    _same_world(original, back, _slice_bounds(original) * (1 + 1e-6))


# ------------------------------------------------------------------------------------------------ de-identification
def _own_uids(ds) -> set:
    """Every UID value of a data set (sequences included) that the DICOM standard does not define."""
    out = set()
    for el in ds.iterall():
        if el.VR == "UI" and el.value:
            for v in (el.value if el.VM > 1 else [el.value]):
                if not str(v).startswith("1.2.840.10008."):
                    out.add(str(v))
    return out


def test_deidentified_series_keeps_no_template_uid(shared, tmp_path):
    """With deidentify=True (the default) the template's StudyInstanceUID (and any UID it copied, here one inside
    the radiopharmaceutical sequence) survived, linking the output back to the patient's study. Now every UID is
    replaced: consistently within a series and across the series one run writes from one template (they still
    overlay), with geometry and SUV intact; private and identifying elements inside sequences are gone, and the
    caller's template is left as it was."""
    tpl = _pet_template(shared)
    tpl.SeriesInstanceUID, tpl.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    tpl.StudyDescription, tpl.AccessionNumber = "PET-CT Dr Who oncology", "ACC99887766"
    item = tpl.RadiopharmaceuticalInformationSequence[0]
    item.ReferencedSOPInstanceUID = pydicom.uid.generate_uid()  # a UID nested in a copied sequence
    item.OperatorsName = "Operator^Olga"
    item.add_new(0x00090010, "LO", "ACME")  # private creator + private value in a copied sequence
    item.add_new(0x00091001, "LO", "PRIVATE-SECRET")
    secrets_ = _own_uids(tpl)
    assert len(secrets_) == 5
    code = pydicom.Dataset()  # a coding scheme's UID (SNOMED's OID) names no instance: it stays
    code.CodeValue, code.CodingSchemeDesignator, code.CodingSchemeUID = "35321007", "SCT", "2.16.840.1.113883.6.96"
    item.RadiopharmaceuticalCodeSequence = pydicom.Sequence([code])
    before = copy.deepcopy(tpl)
    from medfuse.io.suv import header_from_dataset, series_suv_factors

    pet = medfuse.load(shared("data", "spm12-templates", "PET.nii"))
    bq = Volume(pet.array.astype(np.float32) * 20000, pet.affine, modality="PT", unit="Bq/mL")
    suv = bq.with_array(bq.array * np.float32(series_suv_factors([header_from_dataset(tpl)])[0]), unit="SUVbw")
    studies, frames = set(), set()
    for vol, name in ((bq, "bq"), (suv, "suv")):
        folder = save(vol, tmp_path / name, template=tpl)
        series = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
        for f in folder.iterdir():
            raw = f.read_bytes()
            for text in (*secrets_, "Dr Who", "ACC99887766", "Olga", "PRIVATE-SECRET", "Doe", "MRN778899"):
                assert text.encode() not in raw, text
        studies |= {d.StudyInstanceUID for d in series}
        frames |= {d.FrameOfReferenceUID for d in series}
        d = series[0]
        assert d.PatientIdentityRemoved == "YES" and d.DeidentificationMethod
        assert [c.CodeValue for c in d.DeidentificationMethodCodeSequence] == ["113100", "113106", "113108"]
        assert d.LongitudinalTemporalInformationModified == "UNMODIFIED"
        if vol is bq:  # full dates option: SUV from Bq/mL needs them
            assert (d.SeriesDate, d.SeriesTime, d.AcquisitionDate) == (tpl.SeriesDate, tpl.SeriesTime,
                                                                       tpl.AcquisitionDate)
        assert d.PatientWeight == tpl.PatientWeight and "StudyDescription" not in d and d.AccessionNumber == ""
        assert d.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical == "Fluorodeoxyglucose"
        assert d.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalCodeSequence[0] == code
        bounds = _slice_bounds(vol)
        _same_world(vol, medfuse.load(folder, suv="none"), bounds)
        _same_world(vol, _gdcm_series(folder), bounds)
        _same_world(suv, medfuse.load(folder), _slice_bounds(suv) * (1 + 1e-6))
    assert len(studies) == 1 and len(frames) == 1 and not (studies | frames) & secrets_
    assert tpl == before  # the caller's template is untouched (its sequence items too)
    assert tpl.RadiopharmaceuticalInformationSequence[0] == before.RadiopharmaceuticalInformationSequence[0]
    # Not de-identifying keeps the study and the frame of reference (the output belongs to the template's study).
    kept = pydicom.dcmread(next(save(bq, tmp_path / "kept", template=tpl, deidentify=False).iterdir()))
    assert (kept.StudyInstanceUID, kept.FrameOfReferenceUID) == (tpl.StudyInstanceUID, tpl.FrameOfReferenceUID)


def test_deidentified_series_from_a_real_template_folder(shared, tmp_path):
    """The GE EPI folder as template: no UID of any of its files is in the output, and the output is in place."""
    folder = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0004")
    src = medfuse.load_volumes(folder)[0]
    template_uids = set().union(*(_own_uids(pydicom.dcmread(f, stop_before_pixels=True))
                                  for f in sorted(folder.glob("*.dcm"))[:15]))
    out = save(src.with_array(src.array), tmp_path / "derived", template=folder)
    for f in out.iterdir():
        assert not _own_uids(pydicom.dcmread(f)) & template_uids
    back = medfuse.load(out)
    _same_world(src, back, 0)
    _same_world(src, _gdcm_series(out), 0)


def test_series_numbers_are_new_and_distinct(tmp_path, monkeypatch):
    """SeriesNumber was 1000 + the clock's seconds: two outputs written in the same second (or 60 s apart) from one
    template got the same number. Under a stopped clock, three series get three numbers, none the template's."""
    import datetime as dt
    import types

    import medfuse.io.dicom_writer as dw

    class Stopped(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(dw, "_dt", types.SimpleNamespace(datetime=Stopped))
    monkeypatch.setattr(dw, "_last_series_number", 0)
    monkeypatch.setattr(dw, "_claims_root", lambda: tmp_path / "claims")  # not the machine's real claims
    tpl = pydicom.Dataset()
    tpl.StudyInstanceUID = pydicom.uid.generate_uid()
    tpl.SeriesNumber = 1_030_405  # what the clock rule gives first
    vol = Volume(np.zeros((3, 4, 2), np.int16), np.eye(4), modality="CT", unit="HU")
    numbers = [int(pydicom.dcmread(next(save(vol, tmp_path / f"s{n}", template=tpl).iterdir())).SeriesNumber)
               for n in range(3)]
    assert len(set(numbers)) == 3 and int(tpl.SeriesNumber) not in numbers
    assert all(0 < n < 2 ** 31 for n in numbers)  # IS range


# ------------------------------------------------------------------------------------------------ IOD modules
#: Type 1 (present, with a value) and Type 2 (present) attributes of the modules medfuse writes (PS3.3: Patient
#: C.7.1.1, General Study C.7.2.1, General Series C.7.3.1, Frame of Reference C.7.4.1, General Equipment C.7.5.1,
#: General Image C.7.6.1, Image Plane C.7.6.2, Image Pixel C.7.6.3, SOP Common C.12.1, and per IOD below).
_COMMON = ({"StudyInstanceUID", "Modality", "SeriesInstanceUID", "FrameOfReferenceUID", "PixelSpacing",
            "ImageOrientationPatient", "ImagePositionPatient", "SamplesPerPixel", "PhotometricInterpretation",
            "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData",
            "SOPClassUID", "SOPInstanceUID"},
           {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
            "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "PositionReferenceIndicator",
            "Manufacturer", "InstanceNumber", "SliceThickness"})
_IOD = {
    "CT": ({"ImageType", "RescaleIntercept", "RescaleSlope", "RescaleType"},  # CT Image C.8.2.1
           {"KVP", "AcquisitionNumber", "PatientPosition"}),
    "MR": ({"ImageType", "ScanningSequence", "SequenceVariant"},  # MR Image C.8.3.1
           {"ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "PatientPosition"}),
    "PT": ({"SeriesDate", "SeriesTime", "Units", "CountsSource", "SeriesType", "NumberOfSlices", "DecayCorrection",
            "ImageType", "RescaleIntercept", "RescaleSlope", "FrameReferenceTime", "ImageIndex",
            "ActualFrameDuration"},  # PET Series C.8.9.1, PET Image C.8.9.4
           {"CorrectedImage", "CollimatorType", "RadiopharmaceuticalInformationSequence", "AcquisitionDate",
            "AcquisitionTime", "PatientOrientationCodeSequence", "PatientGantryRelationshipCodeSequence"}),
}


def _check_modules(ds, modality: str) -> None:
    one, two = _COMMON[0] | _IOD[modality][0], _COMMON[1] | _IOD[modality][1]
    missing = sorted(kw for kw in one | two if kw not in ds)
    empty = sorted(kw for kw in one if kw in ds and (ds[kw].value is None or ds[kw].value == ""))
    assert not missing and not empty, (modality, missing, empty)
    if modality == "MR":  # 2C
        seq, var = set(ds.ScanningSequence if ds["ScanningSequence"].VM > 1 else [ds.ScanningSequence]), \
            set(ds.SequenceVariant if ds["SequenceVariant"].VM > 1 else [ds.SequenceVariant])
        assert ("RepetitionTime" in ds) or ("EP" in seq and "SK" not in var)
        assert "InversionTime" in ds or "IR" not in seq
    if modality == "CT":
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    if modality == "PT":  # 1C: a decay correction other than NONE states its factor
        assert ("DecayFactor" in ds and float(ds.DecayFactor) > 0) == (ds.DecayCorrection != "NONE")


def test_iod_modules_are_complete(shared, tmp_path):
    """MR lacked ScanningSequence/SequenceVariant (type 1), ScanOptions/MRAcquisitionType/EchoTime... (type 2);
    CT lacked AcquisitionNumber and ImageType value 3 and never copied KVP; PET in counts lacked DecayCorrection
    (type 1) and CorrectedImage, no PET had DecayFactor (1C) or the NM/PET Patient Orientation module. Checked
    against the module tables, with and without a template of the same modality, and read back by GDCM and
    medfuse in place."""
    folder = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0004")
    src = medfuse.load_volumes(folder)[0]
    first = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)
    ct_tpl = pydicom.Dataset()
    ct_tpl.StudyInstanceUID, ct_tpl.Modality, ct_tpl.KVP, ct_tpl.AcquisitionNumber = first.StudyInstanceUID, "CT", \
        "120", "3"
    arr = src.array.astype(np.int16)
    cases = [("MR", "arbitrary", folder), ("MR", "arbitrary", None), ("CT", "HU", ct_tpl), ("CT", "HU", None),
             ("PT", "SUVbw", None), ("PT", "Bq/mL", None), ("PT", "counts", None), ("PT", "arbitrary", None)]
    for n, (modality, unit, tpl) in enumerate(cases):
        vol = Volume(arr, src.affine, modality=modality, unit=unit)
        out = save(vol, tmp_path / f"{n}", template=tpl)
        files = sorted(out.iterdir())
        ds = pydicom.dcmread(files[0])
        _check_modules(ds, modality)
        if modality == "MR":
            want = (list(first.ScanningSequence), first.SequenceVariant) if tpl is not None else ("RM", "NONE")
            got = (list(ds.ScanningSequence) if ds["ScanningSequence"].VM > 1 else ds.ScanningSequence,
                   ds.SequenceVariant)
            assert got == want
            assert _gdcm_tag(files[0], "0018|0020").strip() == ("EP\\GR" if tpl is not None else "RM")
            if tpl is not None:
                assert (float(ds.RepetitionTime), float(ds.EchoTime)) == (float(first.RepetitionTime),
                                                                          float(first.EchoTime))
        if modality == "CT":
            assert (ds.KVP, ds.AcquisitionNumber) == (("120", 3) if tpl is not None else (None, None))
        _same_world(vol, _gdcm_series(out), 0)
        if modality != "PT":  # PET in SUV/Bq/mL comes back scaled; its values are checked above
            _same_world(vol, medfuse.load(out), 0)


def test_full_disk_during_a_dicom_series_is_a_typed_error(tmp_path, monkeypatch):
    """pydicom re-raises an element's write error as OSError(text) without its errno: a full disk while writing
    a DICOM series was an internal error with a pydicom traceback. It is the typed disk-full error, and nothing
    is left behind."""
    import errno

    import pydicom.filewriter as fw

    from medfuse.errors import MedfuseError

    real = fw.write_data_element

    def full(fp, elem, *a, **k):
        if elem.tag == 0x7FE00010:  # the pixel data: the largest write, where a disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fp, elem, *a, **k)

    monkeypatch.setattr(fw, "write_data_element", full)
    vol = Volume(np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3), np.eye(4), modality="MR")
    with pytest.raises(MedfuseError, match="disk is full") as e:
        save(vol, tmp_path / "series", format="dicom")
    assert "pydicom" not in str(e.value) and "Traceback" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_text_inside_copied_sequences_is_decoded_from_the_templates_character_set(tmp_path):
    """Without de-identification, a tracer name inside the radiopharmaceutical sequence kept its Latin-1 bytes
    while the series was declared UTF-8 (the patient's name made it non-ASCII): readers showed garbage."""
    from tests.conftest import SAMPLES

    src = tmp_path / "tpl"
    src.mkdir()
    for f in sorted((SAMPLES / "pet").iterdir()):
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"
        ds.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical = "Fluorodésoxyglucose"
        ds.save_as(src / f.name)
    vol = medfuse.load(src)
    out = save(vol, tmp_path / "out", template=src, deidentify=False)
    f = sorted(out.iterdir())[0]
    back = pydicom.dcmread(f)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert back.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical == "Fluorodésoxyglucose"
    assert "Fluorodésoxyglucose".encode() in f.read_bytes()


def test_a_folder_template_gives_the_volumes_own_series_header(tmp_path):
    """A PACS export holding a CT and a PET: the PET written with the folder as template took the CT's header
    (no dose, no weight, the CT's frame of reference) and lost its SUV on reload. Hidden files are skipped as the
    loader skips them."""
    import shutil

    from tests.conftest import SAMPLES

    both = tmp_path / "export"
    both.mkdir()
    for kind, prefix in (("ct", "A_"), ("pet", "B_")):  # the CT's files sort first
        for f in sorted((SAMPLES / kind).iterdir()):
            shutil.copy(f, both / (prefix + f.name))
    pet_uid = str(pydicom.dcmread(next((SAMPLES / "pet").iterdir())).SeriesInstanceUID)
    pet = medfuse.load(both, series_uid=pet_uid, suv="none")
    assert pet.unit == "Bq/mL"
    out = save(pet, tmp_path / "pet_out", template=both, deidentify=False)
    back = medfuse.load(out)
    assert back.unit == "SUVbw", "the PET's dose and weight were taken from its own series"
    np.testing.assert_allclose(back.array, medfuse.load(SAMPLES / "pet").array, rtol=2e-3, atol=1e-3)
    # A CT slice in a hidden folder (a desktop's .trash) is not the template either.
    hidden = tmp_path / "pet_copy"
    shutil.copytree(SAMPLES / "pet", hidden)
    (hidden / ".trash").mkdir()
    shutil.copy(next((SAMPLES / "ct").iterdir()), hidden / ".trash" / "A0.dcm")
    ct_study = str(pydicom.dcmread(next((SAMPLES / "ct").iterdir())).FrameOfReferenceUID)
    out2 = save(medfuse.load(hidden, suv="none"), tmp_path / "pet_out2", template=hidden, deidentify=False)
    assert str(pydicom.dcmread(next(out2.iterdir())).FrameOfReferenceUID) != ct_study
    assert medfuse.load(out2).unit == "SUVbw"


def test_a_volume_resampled_onto_another_series_takes_that_series_frame_from_a_folder_template(tmp_path):
    """A PET resampled onto the CT beside it (a PACS export folder of both): its own series' header would claim
    the old PET frame of reference for positions that are in the CT's."""
    import shutil

    from tests.conftest import SAMPLES

    both = tmp_path / "export"
    both.mkdir()
    for kind, prefix in (("ct", "A_"), ("pet", "B_")):
        for f in sorted((SAMPLES / kind).iterdir()):
            shutil.copy(f, both / (prefix + f.name))
    ct_header = pydicom.dcmread(next((SAMPLES / "ct").iterdir()))
    pet_uid = str(pydicom.dcmread(next((SAMPLES / "pet").iterdir())).SeriesInstanceUID)
    ct = medfuse.load(both, series_uid=str(ct_header.SeriesInstanceUID))
    pet = medfuse.load(both, series_uid=pet_uid)
    on_ct = medfuse.resample(pet, ct, transform=medfuse.Transform.from_matrix(np.eye(4)))  # "registered"
    assert on_ct.provenance["series_uid"] == pet_uid  # its own series' header would be found first
    out = save(on_ct, tmp_path / "pet_on_ct", template=both, deidentify=False)
    assert str(pydicom.dcmread(next(out.iterdir())).FrameOfReferenceUID) == str(ct_header.FrameOfReferenceUID)


def test_a_normalised_spect_reads_back_in_arbitrary_units(tmp_path):
    a = np.random.default_rng(0).random((8, 8, 4)).astype(np.float32)
    nm = save(Volume(a, np.eye(4), modality="NM", unit="arbitrary"), tmp_path / "nm")
    assert medfuse.load(nm).unit == "arbitrary"
    counts = save(Volume((a * 100).round(), np.eye(4), modality="NM", unit="counts"), tmp_path / "counts")
    assert medfuse.load(counts).unit == "counts"


def test_a_unit_the_series_cannot_hold_is_warned_of(tmp_path):
    a = np.random.default_rng(0).random((8, 8, 4)).astype(np.float32)
    with pytest.warns(MedfuseWarning, match="'SUVbw' is not kept"):
        out = save(Volume(a, np.eye(4), modality="unknown", unit="SUVbw"), tmp_path / "u")
    assert medfuse.load(out).unit == "arbitrary"
    with pytest.warns(MedfuseWarning, match="NM series, which holds Bq/mL or counts: its unit 'SUVlbm'"):
        save(Volume(a, np.eye(4), modality="NM", unit="SUVlbm"), tmp_path / "nm")


def test_format_dicom_with_a_file_ending_is_refused(tmp_path):
    vol = Volume(np.zeros((4, 4, 2), np.int16), np.eye(4), modality="CT", unit="HU")
    with pytest.raises(medfuse.InvalidInputError, match="ends in '.nii.gz'"):
        save(vol, tmp_path / "x.nii.gz", format="dicom")
    from medfuse.io.writers import check_save_target

    with pytest.raises(medfuse.InvalidInputError, match="ends in '.nii.gz'"):  # refused before the work too
        check_save_target(tmp_path / "x.nii.gz", format="dicom")
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.parametrize("deidentify", [True, False])
def test_a_pet_written_on_a_cts_grid_keeps_its_own_tracer_weight_and_times(samples_dir, tmp_path, deidentify):
    """A PET registered onto a CT and written with the CT as template took the CT's header alone: no
    radiopharmaceutical, no weight, and the time of writing as its acquisition time (a PACS's SUV tools had
    nothing to work from)."""
    import warnings

    from medfuse.registration import resample

    ct, pet = medfuse.load(samples_dir / "ct"), medfuse.load(samples_dir / "pet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)  # the PET maximum lowered: not the point
        # Through a transform (as a registration gives): an unregistered PET of another frame of reference is
        # refused with the identity kept (tests/io/test_dicom_writer_navigation.py).
        on_ct = resample(pet, ct, transform=medfuse.Transform(sitk.Euler3DTransform()))
    out = tmp_path / "pet_on_ct"
    save(on_ct, out, template=samples_dir / "ct", deidentify=deidentify)
    src = pydicom.dcmread(sorted((samples_dir / "pet").iterdir())[0], stop_before_pixels=True)
    ref = pydicom.dcmread(sorted((samples_dir / "ct").iterdir())[0], stop_before_pixels=True)
    ds = pydicom.dcmread(sorted(out.iterdir())[0], stop_before_pixels=True)
    assert len(ds.RadiopharmaceuticalInformationSequence) == len(src.RadiopharmaceuticalInformationSequence) > 0
    assert (ds.PatientWeight, ds.AcquisitionDate, ds.AcquisitionTime) == \
        (src.PatientWeight, src.AcquisitionDate, src.AcquisitionTime)
    assert ds.Modality == "PT" and ds.FrameOfReferenceUID != src.FrameOfReferenceUID  # the CT's frame (or its pseudonym)
    if not deidentify:
        assert ds.FrameOfReferenceUID == ref.FrameOfReferenceUID and ds.StudyInstanceUID == ref.StudyInstanceUID
    back = medfuse.load(out)
    assert back.unit == "SUVbw"
    np.testing.assert_allclose(back.array, on_ct.array, atol=float(np.abs(on_ct.array).max()) / 30000)


@pytest.mark.parametrize("unit,modality", [("arbitrary", "unknown"), ("arbitrary", "MR"), ("SUVbw", "PT")])
def test_whole_numbers_in_float_are_stored_exactly_whatever_the_unit(tmp_path, unit, modality):
    """A label map saved as float (nnU-Net, nibabel) came back as 0.99998/1.99997 on some slices and 1/2 on
    others: only HU and counts were stored as exact integers. Through SimpleITK/GDCM as well as medfuse."""
    a = np.zeros((12, 10, 5), np.float32)
    a[2:6, 3:7, :] = 1
    a[6:10, 2:5, 1:] = 2
    a[1:3, 6:9, 2:4] = 4
    save(Volume(a, np.eye(4), modality=modality, unit=unit), tmp_path / "labels")
    for back in (medfuse.load(tmp_path / "labels").array, _gdcm_series(tmp_path / "labels").array):
        np.testing.assert_array_equal(back, a)
    # Fractions stay quantised, as before (a slope per slice).
    save(Volume(a / 3, np.eye(4), modality=modality, unit=unit), tmp_path / "thirds")
    assert not np.array_equal(medfuse.load(tmp_path / "thirds").array, a / 3)


def test_whole_numbers_that_fit_neither_16_bit_type_are_quantised_without_a_label_warning(tmp_path):
    """-1..40000 lies within -32768..65535 but fits neither int16 nor uint16: it was taken as exact integers and
    then warned of as labels that may merge."""
    import warnings

    a = np.zeros((8, 6, 3), np.float32)
    a[0, 0, :], a[1, 1, :] = -1.0, 40000.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        save(Volume(a, np.eye(4), modality="MR"), tmp_path / "mixed")
    back = medfuse.load(tmp_path / "mixed").array
    assert np.max(np.abs(back - a)) <= 40000 / 32767  # quantised: within one step of the slope
