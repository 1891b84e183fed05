"""Write a Volume as a derived DICOM series: one file per slice, written atomically.

Choices (see docs/io.md and docs/dicom.md):

* New SeriesInstanceUID and SOPInstanceUIDs; ImageType ``DERIVED\\SECONDARY`` (``DERIVED\\PRIMARY`` for PET and
  ``DERIVED\\SECONDARY\\OTHER`` for MR, as their IODs require).
* Geometry per slice: ImagePositionPatient = affine·(0, 0, k), ImageOrientationPatient from the
  i (row) and j (column) directions, PixelSpacing ``[Δj, Δi]``, SliceThickness and
  SpacingBetweenSlices ``Δk`` to 7 significant digits, or the template's own values as written when the output lies
  on the template's slices (:func:`_slice_spacing`). Slices are written in k order; a DICOM reader sorts them along
  row × column, so a left-handed volume comes back with k reversed (same world geometry). An
  I×1×K volume is written as one slice with its rows along k (ITK stacks one-row images wrongly).
* Voxels are stored 16-bit, with one PixelRepresentation for the whole series (readers such as
  SimpleITK/GDCM decode every slice with the first one's type). Integer data whose whole range
  fits int16 or uint16 (CT in HU, counts; whole numbers in float too, a label map saved as float) is stored
  exactly with RescaleSlope 1, RescaleIntercept 0. Anything else (SUV, float MR) is quantised per slice: RescaleSlope = max|slice| / 32767 (signed:
  the volume has a negative voxel) or / 65535 (non-negative volume), so the error is at most
  slope/2, i.e. ≤ 1/65534 (signed) or 1/131070 (non-negative) of the slice's largest absolute value
  (plus at most one part in 1e9: a quantised slice never has a whole-number slope, which would make
  GDCM/ITK decode the series as integers when that slice is read first). A series whose slopes all lie
  within dcm2niix's tolerance of each other gets the largest one on every slice (:func:`series_slopes`).
* Equipment: Manufacturer empty (dcm2niix read "medfuse" as the vendor Mediso); ManufacturerModelName
  ``medfuse`` and SoftwareVersions name the software. PatientPosition and AnatomicalOrientationType come from
  a template of any modality (they define its patient coordinates, in which the output is written); a PET has no
  PatientPosition (not allowed beside its PatientOrientationCodeSequence): it is coded in the PET's
  PatientOrientationCodeSequence and PatientGantryRelationshipCodeSequence instead (PS3.16 CID 19, 20, 21), unless
  a PET template has its own.
* Text: SpecificCharacterSet ``ISO_IR 192`` (UTF-8) when any text is not ASCII; none otherwise.
* PET in SUVbw is written with Units ``GML`` (g/mL is SUVbw by definition; factor 1 on reading,
  and what PACS show as SUV), SUVType ``BW``, CorrectedImage ``ATTN\\DECY``, DecayCorrection
  ``ADMIN``. SUVlbm is written the same way with SUVType ``LBM``, SUVbsa with Units ``CM2ML`` (cm²/ml, the
  standard's unit of SUVbsa) and SUVType ``BSA``. SUVType cannot say which lean-body-mass formula an SUVlbm
  used, so when the volume's provenance says (``suv`` ``lbm`` or ``lbm_janma``) DerivationDescription records it
  (``medfuse.io.suv.LBM_JANMA_NOTE``/``LBM_JAMES_NOTE``), and the reader converts the series with that formula.
  PET in Bq/mL is written with Units ``BQML``. The radiopharmaceutical sequence (tracer, dose, injection time),
  PatientWeight/Size/Sex, DecayCorrection and the series/acquisition dates and times (which the decay correction
  refers to) come from the PET's own DICOM series (its provenance ``source``, kept through resampling and
  registration), whatever the template: a PET registered onto another PET keeps its own dose and weight, so the
  SUV a PACS computes is its own. Without a readable own series, a PET template gives them when the volume names
  no other series; else none are written (an empty sequence; a warning for Bq/mL). A weight, height or sex given
  at loading (``medfuse.load(..., body=)``, kept in the history's ``suv`` step, also through resampling and
  fusion) is written in place of any header's: the SUV was made with it. NM in Bq/mL
  (quantitative SPECT) is written with Units ``BQML`` too, so that it reads back in Bq/mL, not counts.
* Whole numbers that fit neither int16 nor uint16 (int32 HU, label maps above 65535) are quantised like float
  data, with a ``MedfuseWarning`` giving the largest error. A slice spacing below the reader's position
  tolerance (0.01 mm) is refused (``InvalidInputError``): the series would not read back as one volume.
* Study context (StudyInstanceUID, study date/time/description, FrameOfReferenceUID, patient
  module unless de-identifying) is taken from ``template``. The FrameOfReferenceUID comes from the template
  only (the series whose patient space the voxels are in: the fixed image for a registered result), never
  from provenance; without one a new frame of reference is made. Without a template a new StudyInstanceUID
  is made. With ``deidentify=False`` a volume from another DICOM frame of reference that no registration or
  transform placed in the template's frame is refused (:func:`refuse_unregistered_frame`): the template's real frame
  would tell a navigation system that it is aligned with the template series.
* DerivationDescription says what medfuse did (from the history, no identifiers); with ``deidentify=False``
  ReferencedSeriesSequence points at the template series, and SourceImageSequence (the template's voxels went into
  the output) or ReferencedImageSequence (a related image) at the template instance: on the template's own slices
  each slice at the instance at its position (:func:`_references`). De-identified
  outputs carry no references (pseudonymous UIDs would name no series that exists).
* ``deidentify=True`` (the default) follows the DICOM PS3.15 Basic Application Level Confidentiality Profile
  with the *Retain Longitudinal Temporal Information Full Dates* and *Retain Patient Characteristics* options
  (dates and times, sex, age, size and weight are kept: SUV needs them): names, IDs, birth date, accession
  number, study ID, referring physician and study description are removed or emptied (at any depth), private
  elements are dropped, and every UID copied from the template (Study, FrameOfReference, any in a sequence) is
  replaced by a pseudonym. The pseudonym is a hash of the original UID with a key made once per process (a batch
  run hands its key to its workers): the series written by one run from one template share their new study and
  frame of reference (so they still overlay), and no one can recompute them from the original UIDs. PatientID is
  ``MF`` + 16 hex digits, a keyed hash (same key) of the patient's ID and issuer (else name and birth date; else
  the study UID) in the template, else in the volume's own series; PatientName ``<that>^PSEUDONYM``: one patient's
  outputs of one run are filed under one pseudonymous patient, other patients' under others. PatientIdentityRemoved ``YES``,
  DeidentificationMethod and DeidentificationMethodCodeSequence (CID 7050) say so.
* SeriesNumber: ``1HHMMSS`` from the clock, raised when needed so that every series this process writes gets a
  larger number than the one before, and never the template's own number. Processes on one machine (batch
  workers) never give one number twice on one day: each claims its number by creating an empty file named after
  it, exclusively, in a per-user folder of the temporary directory (``medfuse-series-numbers-<uid>/<date>/``;
  folders of days more than two days old are removed), and takes the next number when the file exists. Where
  that folder cannot be used, the process's own numbering still holds.
* IOD modules: CT Image (ImageType ``DERIVED\\SECONDARY\\AXIAL``, KVP and AcquisitionNumber), MR Image
  (ScanningSequence, SequenceVariant, ScanOptions, MRAcquisitionType, EchoTime, EchoTrainLength,
  RepetitionTime/InversionTime/TriggerTime when their condition holds: InversionTime only for IR, TriggerTime only
  for CG/PPG gating) and PET Series/Image (DecayCorrection, DecayFactor,
  CorrectedImage, Units, ...) are complete: values are copied from a template of the same modality; without one
  Type 1 attributes get generic values for a derived image (ScanningSequence ``RM``, SequenceVariant ``NONE``,
  DecayCorrection ``NONE`` for counts, DecayFactor 1) and Type 2 ones are present but empty.
* SOP classes: CT, MR and PET Image Storage; NM and unknown use Secondary Capture (the NM IOD
  is multi-frame only), still with the geometry attributes.
* A dose in Gy (an RT dose grid, whatever its modality) is written as one RT Dose object (RT Dose Storage, Modality
  ``RTDOSE``), which keeps the unit where an OT series would lose it: multi-frame, ImagePositionPatient of the first
  frame and GridFrameOffsetVector (relative, increasing: a left-handed grid is written with its frames in reverse
  order), DoseUnits ``GY``, unsigned 32-bit pixels times DoseGridScaling (max dose / (2³² - 1): error at most
  DoseGridScaling / 2). DoseType, DoseSummationType and ReferencedRTPlanSequence come from the dose's own RTDOSE
  (its provenance ``source``) when it can be read, else ``PHYSICAL`` and ``PLAN`` (without a plan reference, which
  medfuse does not know). Negative doses (an interpolation's overshoot) are stored as 0 with a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import datetime as _dt
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time as _time
import warnings
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np

from .._checks import describe
from ..errors import InvalidInputError, MedfuseError, MedfuseWarning, UnreadableFileError
from ..volume import Volume
from ._atomic import atomic_dir
from .dicom import _POS_TOL
from .dicom import without_value_checks as _without_value_checks

__all__ = ["write_dicom_series", "quantise_slice", "series_slopes", "PHI_KEYWORDS"]

PathLike = Union[str, os.PathLike]

#: Identifying attributes removed when de-identifying (weight, size, sex are kept: SUV needs them).
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs", "OtherPatientNames",
    "OtherPatientIDsSequence", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "MedicalRecordLocator", "PatientComments", "IssuerOfPatientID", "ReferringPhysicianName", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "PerformingPhysicianName", "OperatorsName",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician", "AccessionNumber",
    "StationName", "DeviceSerialNumber", "MilitaryRank", "EthnicGroup", "Occupation", "AdditionalPatientHistory",
    "PatientBirthName", "CountryOfResidence", "RegionOfResidence", "StudyID", "IssuerOfPatientIDQualifiersSequence",
    "IssuerOfAccessionNumberSequence",
)
#: Removed when de-identifying although not patient identifiers: the Basic Profile removes free-text
#: descriptions (X) unless the Clean Descriptors option is applied, which medfuse does not do.
_DEID_REMOVE = ("StudyDescription",)
_STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "StudyID", "AccessionNumber",
                   "ReferringPhysicianName", "FrameOfReferenceUID", "PositionReferenceIndicator")
#: Acquisition attributes of the CT Image and MR Image modules copied from a template of the same modality.
_MODALITY_KEYWORDS = {
    "CT": ("KVP", "AcquisitionNumber", "PatientPosition"),
    # InversionTime and TriggerTime are 2C: copied only when their condition holds (see _modality_attributes).
    "MR": ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
           "EchoTime", "EchoTrainLength", "InversionTime", "TriggerTime", "PatientPosition"),
    "PT": ("PatientOrientationCodeSequence", "PatientGantryRelationshipCodeSequence"),
}
#: PS3.16 CID 7050 codes of what the de-identification did (the profile and the options applied).
_DEID_CODES = (("113100", "Basic Application Confidentiality Profile"),
               ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
               ("113108", "Retain Patient Characteristics Option"))
#: UIDs naming a coding scheme (e.g. SNOMED's OID) in a code item: not instances, so not replaced.
_CODING_UIDS = ("CodingSchemeUID", "MappingResourceUID", "ContextGroupExtensionCreatorUID")
#: Key of the UID and patient pseudonyms, made once per process (see the module docstring); a batch run hands its
#: own to its workers (:class:`PseudonymKey`, :func:`using_key`) so that all its outputs share one set of pseudonyms.
_UID_KEY = secrets.token_hex(32)
#: A batch run's key while a subject of it is written (:func:`using_key`): per thread and task, not a module global
#: swapped for the block (two runs on one multi-threaded worker put their keys back under each other).
_RUN_KEY: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar("medfuse_pseudonym_key", default=None)
_SERIES_LOCK = threading.Lock()
_last_series_number = 0
#: General Series attributes that define the template's patient coordinates (PS3.3 C.7.3.1, C.7.6.2.1.1), in
#: which the output's ImagePositionPatient/ImageOrientationPatient are written: copied from a template of any
#: modality. AnatomicalOrientationType QUADRUPED changes what the x, y, z axes mean (dcm2niix warns on it);
#: PatientPosition (HFS...) is what dcm2niix and viewers report (dcm2niix warns when it is missing).
_FRAME_KEYWORDS = ("PatientPosition", "AnatomicalOrientationType")
_PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
                     "PatientWeight", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
                     "OtherPatientIDsSequence", "IssuerOfAccessionNumberSequence")
#: What the SUV of a PET's values depends on: always taken from the PET's own series (see :func:`_pet_context`).
_PET_KEYWORDS = ("RadiopharmaceuticalInformationSequence", "DecayCorrection", "CorrectedImage", "Units",
                 "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "PatientWeight", "PatientSize")
_SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "PT": "1.2.840.10008.5.1.4.1.1.128"}
_SC = "1.2.840.10008.5.1.4.1.1.7"
_RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
#: Largest stored value of the RT dose's unsigned 32-bit pixels.
_DOSE_TOP = (1 << 32) - 1
_DICOM_MODALITY = {"CT": "CT", "MR": "MR", "PT": "PT", "NM": "NM", "unknown": "OT"}
#: PatientPosition (PS3.3 C.7.3.1.1.2) as the PET IOD's NM/PET Patient Orientation module codes it: the patient
#: recumbent (PS3.16 CID 19 Patient Orientation), the modifier (CID 20 Patient Orientation Modifier) and which end
#: enters the gantry first (CID 21 Patient Equipment Relationship). Codes as the current PS3.16 gives them (SCT and
#: DCM; the "99SDM" designator of older editions is retired).
_RECUMBENT = ("102538003", "SCT", "recumbent")
_POSITION_MODIFIERS = {"S": ("40199007", "SCT", "supine"), "P": ("1240000", "SCT", "prone"),
                       "DR": ("102535000", "SCT", "right lateral decubitus"),
                       "DL": ("102536004", "SCT", "left lateral decubitus")}
_POSITION_FIRST = {"HF": ("102540008", "SCT", "headfirst"), "FF": ("102541007", "SCT", "feet-first"),
                   "LF": ("126830", "DCM", "left first"), "RF": ("126831", "DCM", "right first"),
                   "PF": ("126832", "DCM", "posterior first"), "AF": ("126833", "DCM", "anterior first")}
#: PatientPosition's defined terms for a biped (PS3.3 C.7.3.1.1.2): the ones coded above.
_PATIENT_POSITIONS = ("HFP", "HFS", "HFDR", "HFDL", "FFDR", "FFDL", "FFP", "FFS", "LFP", "LFS", "RFP", "RFS",
                      "AFDR", "AFDL", "PFDR", "PFDL")


def _template_files(p: Path) -> list:
    """The files of a template path as the loader lists them: hidden files and folders left out (a CT slice in
    a .trash folder gave a PET its study and frame of reference)."""
    from .dicom import _files

    return _files(p) if p.is_file() or p.is_dir() else []


def _read_template(template: Any, series_uid: Optional[str] = None, frame_uid: Optional[str] = None):
    """The template's header. From a folder: a file of the volume's own series ``series_uid`` in its frame of
    reference ``frame_uid`` (as far as each is known); else a file in that frame of reference (a PET resampled
    onto the CT beside it: the CT's frame, which its positions are in); else the first readable file.

    Why: the first file was taken whatever it was: a folder of several series (a PACS export of CT and PET) gave
    a PET the CT's header, without its dose or weight, and its SUV was lost on reload.
    """
    import pydicom

    if template is None or isinstance(template, pydicom.Dataset):
        return template
    p = Path(template)
    from .dicom import _BROKEN, _read_header

    first = same_frame = None
    for f in _template_files(p):
        # The reader's header function: it also reads files written without the preamble (old PACS exports), so
        # every folder medfuse loads can be its own template. None / _BROKEN: not DICOM or damaged, try the next.
        ds = _read_header(f, strict=False)
        if ds is None or ds is _BROKEN or "StudyInstanceUID" not in ds:
            continue
        series_ok = not series_uid or str(ds.get("SeriesInstanceUID", "")) == series_uid
        frame_ok = not frame_uid or str(ds.get("FrameOfReferenceUID", "")) == frame_uid
        if series_ok and frame_ok:
            return ds
        if frame_uid and frame_ok and same_frame is None:
            same_frame = ds
        first = first if first is not None else ds
    found = same_frame if same_frame is not None else first
    if found is not None:
        return found
    raise UnreadableFileError("the DICOM template holds no readable DICOM file",
                              fix="pass the DICOM file or folder the volume came from, or template=None", path=p)


def _own_series(volume: Volume):
    """(path, header) of the DICOM series ``volume`` was loaded from, as its provenance names it (kept through
    resampling and registration); (None, None) when it names none or it cannot be read now."""
    prov = volume.provenance
    source = prov.get("source")
    if prov.get("reader") != "medfuse.dicom" or not isinstance(source, str) or not Path(source).exists():
        return None, None
    try:
        ds = _read_template(source, str(prov.get("series_uid") or "") or None)
    except MedfuseError:
        return None, None
    own_uid = str(prov.get("series_uid") or "")
    if ds is None or (own_uid not in ("", "unknown") and str(ds.get("SeriesInstanceUID", "")) != own_uid):
        return None, None  # the folder no longer holds that series: another series' dose would be wrong
    return source, ds


def _suv_body(volume: Volume) -> dict:
    """The header tags (PatientWeight, PatientSize, PatientSex) that ``body=`` gave at loading in place of the PET
    header's, as the loader recorded them (the history's ``suv`` step), also within a fusion's input histories; a
    tag given two values (two PETs fused) is left out, and ``{}`` when none was given."""
    from .suv import BODY_KEYS

    found: dict = {}

    def walk(history) -> None:
        for step in history if isinstance(history, list) else []:
            if not isinstance(step, dict):
                continue
            if step.get("step") == "suv" and isinstance(step.get("body"), dict):
                for kw, value in step["body"].items():
                    # Only values check_body makes: a provenance edited by hand must not break the write.
                    number = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e6
                    if (value in ("M", "F")) if kw == "PatientSex" else number:
                        found.setdefault(kw, set()).add(value)
            for inner in step.get("input_histories") or []:
                walk(inner)

    walk(volume.provenance.get("history"))
    return {kw: next(iter(v)) for kw, v in found.items() if kw in BODY_KEYS.values() and len(v) == 1}


def _is_pet_header(hdr) -> bool:
    """Whether a template header is a PET's: Modality PT, or no Modality and a radiopharmaceutical (a Dataset a
    caller built with only the PET tags, as the writer's own tests and scripts do)."""
    if hdr is None:
        return False
    modality = str(hdr.get("Modality", "") or "").strip().upper()
    return modality == "PT" or (not modality and "RadiopharmaceuticalInformationSequence" in hdr)


def _pet_context(volume: Volume, template: Any, tpl) -> Tuple[Any, Any]:
    """The (path or template, header) whose tracer, dose, weight and scan times a PET output carries: the PET's own
    series when its provenance names one that can be read; else a PET template, unless the volume's provenance
    names another series than the template's; else (None, None).

    Why the own series first: a PET registered onto another PET (of another day) took the fixed PET's dose, weight
    and times, which do not belong to its values, so the SUV a PACS (or medfuse.load) made of it was off (3 % to
    24 %); a PET onto a CT took the CT's header alone (no tracer, no weight, the time of writing).
    """
    source, ds = _own_series(volume)
    if ds is not None and str(ds.get("Modality", "")).strip().upper() == "PT":
        return source, ds
    if not _is_pet_header(tpl):
        return None, None
    own_uid = str(volume.provenance.get("series_uid") or "")
    if own_uid not in ("", "unknown") and own_uid != str(tpl.get("SeriesInstanceUID", "")):
        return None, None
    return template, tpl


def _earliest_acquisition(template: Any, tpl) -> Optional[Tuple[str, str]]:
    """(AcquisitionDate, AcquisitionTime) of the earliest instance of the template's series, when the template
    is a folder holding it; None otherwise.

    SUV from BQML decays the dose to the series time, or to the earliest acquisition of the series when the
    series time is later (a re-created series). One template file's acquisition time is not the series' earliest
    when the beds of a whole-body PET were acquired one after another, so it is looked up over the series.
    """
    import pydicom

    from .dicom import _BROKEN, _read_header
    from .suv import _parse_date, _parse_time

    if template is None or isinstance(template, pydicom.Dataset) or not Path(template).is_dir():
        return None
    uid = str(tpl.get("SeriesInstanceUID", ""))
    best = None
    for f in _template_files(Path(template)):
        ds = _read_header(f, strict=False)
        if ds is None or ds is _BROKEN or str(ds.get("SeriesInstanceUID", "")) != uid:
            continue
        d, t = str(ds.get("AcquisitionDate", "") or "").strip(), str(ds.get("AcquisitionTime", "") or "").strip()
        try:
            when = _parse_date(d) + _parse_time(t)
        except (ValueError, IndexError):
            continue
        if best is None or when < best[0]:
            best = (when, d, t)
    return None if best is None else (best[1], best[2])


def _ds_number(x: float) -> float:
    """The float a DICOM DS (16 characters) will carry back."""
    from pydicom.valuerep import format_number_as_ds

    return float(format_number_as_ds(float(x)))


def _slope_for(peak: float, top: int) -> float:
    """The RescaleSlope (a DS value) for a slice whose largest absolute value is ``peak``, stored up to ``top``."""
    slope = _ds_number(peak / top) if peak > 0 else 1.0
    if slope * top < peak:  # DS rounding made the slope slightly too small
        slope = _ds_number(slope * (1 + 1e-9) + np.spacing(slope) * 4)
    # A whole-number slope (1 for an all-zero slice, 2 for a peak of 2 x 65535...) makes GDCM/ITK decode
    # the series into an integer type when that slice is the one it reads first, truncating the fractions of
    # every other slice. One part in 1e9 more keeps the series fractional (and the bound, to that part).
    step = 1e-9
    while float(slope).is_integer() and slope < 2.0 ** 52 and step < 1e-3:
        slope = _ds_number(slope * (1 + step))
        step *= 10
    return slope


def _float_plane(plane: np.ndarray) -> np.ndarray:
    return np.nan_to_num(plane.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _peaks(arr: np.ndarray) -> list:
    """max|slice| over finite values (0 if none) for each slice k (last axis), as :func:`quantise_slice` sees it.

    One pass over the whole volume in its own type (exact: min, max and abs do not round; no float64 copy, and
    a slice of k is strided in memory); a slice holding NaN or inf is looked at again alone.
    """
    if arr.size == 0:
        return [0.0] * arr.shape[2]
    los, his = arr.min(axis=(0, 1)), arr.max(axis=(0, 1))
    out = []
    for k, (lo, hi) in enumerate(zip(los, his)):
        if np.issubdtype(arr.dtype, np.floating) and not (np.isfinite(lo) and np.isfinite(hi)):
            mag = np.abs(np.asarray(arr[:, :, k]))  # stored as 0 by quantise_slice
            out.append(float(np.max(mag, where=np.isfinite(mag), initial=0)))
        else:
            out.append(float(max(abs(lo.item()), abs(hi.item()))))
    return out


def quantise_slice(plane: np.ndarray, *, exact_int: bool, signed: Optional[bool] = None,
                   value_range: Optional[Tuple[int, int]] = None, slope: Optional[float] = None):
    """Return (stored uint16/int16 array, slope, intercept) for one slice.

    Integer data in int16/uint16 range is stored exactly. Otherwise the slope is chosen from the
    slice's largest absolute value so that the quantisation error is at most slope/2.

    ``signed`` (int16 vs uint16) and ``value_range`` (the (min, max) that picks the exact integer
    type, e.g. the whole volume's) let a writer make the same choice for every slice of a series: one series must
    not mix PixelRepresentation 0 and 1, which readers (SimpleITK/GDCM among them) decode with
    the first slice's type, wrapping the others. By default both come from this slice alone.

    Args:
        plane: the slice's voxels.
        exact_int: the data are whole numbers, to be stored exactly when their range fits 16 bits.
        signed: int16 (True) or uint16 (False); default from this slice's values.
        value_range: ``(min, max)`` that picks the exact integer type (e.g. the whole volume's).
        slope: a larger slope than the slice's own, chosen for the series (see :func:`series_slopes`).

    Returns:
        ``(stored, slope, intercept)``: the int16/uint16 array, RescaleSlope and RescaleIntercept.

    Raises:
        InvalidInputError: ``plane`` is a Volume (pass its voxels, one slice).
    """
    if isinstance(plane, Volume):
        raise InvalidInputError("quantise_slice takes one slice's voxels, got a medfuse Volume",
                                fix="pass a 2-D array, e.g. vol.array[:, :, k]")
    if exact_int:
        lo, hi = (int(plane.min()), int(plane.max())) if value_range is None else value_range
        if lo >= -32768 and hi <= 32767 and signed is not False:
            return plane.astype(np.int16), 1.0, 0.0
        if lo >= 0 and hi <= 65535 and signed is not True:
            return plane.astype(np.uint16), 1.0, 0.0
    f = _float_plane(plane)
    signed = bool(f.min() < 0) if signed is None else bool(signed)
    top = 32767 if signed else 65535
    own = _slope_for(float(np.abs(f).max()) if f.size else 0.0, top)
    slope = own if slope is None else max(float(slope), own)
    q = np.clip(np.rint(f / slope), -32768 if signed else 0, top)
    return q.astype(np.int16 if signed else np.uint16), slope, 0.0


#: float32's machine epsilon: dcm2niix takes two RescaleSlopes as equal when they differ by about this much or less
#: (measured with dcm2niix v1.0.20260724: 1.19e-7 apart for slopes near 1e-5 and 1e-3, 1.8e-7 near 1, 3.8e-6 near
#: 100, i.e. epsilon plus half a float32 step).
_FLT_EPS = float(np.finfo(np.float32).eps)


def series_slopes(arr: np.ndarray, *, signed: bool) -> list:
    """Per-slice RescaleSlopes for quantised data (k along the last axis): each slice's own, or one slope for all.

    Why: dcm2niix compares every slice's slope with the first slice's with an absolute tolerance (float32's
    epsilon, see :data:`_FLT_EPS`); when all are that close but not equal, it writes the raw stored values with
    the first slice's slope, so each slice is off by up to 65535 x the difference (0.0019 on 0..1 data).
    Such a series (all slopes within 4 x (epsilon + one float32 step) of each other, e.g. a 0..1 volume whose
    slices all peak near 1) gets its largest slope on every slice: exactly what dcm2niix reads, each slice still
    within slope/2 (its own slope raised by at most 4.8e-7 + 4 float32 steps). Other series keep their own slopes:
    dcm2niix sees them vary and applies each one (PS3.3 C.11.1: RescaleSlope belongs to each image).

    Args:
        arr: the voxels, slices along the last axis (a Volume's voxels are read as they are).
        signed: int16 (True) or uint16 (False) storage.

    Returns:
        One RescaleSlope per slice.

    Raises:
        InvalidInputError: ``arr`` is not 3-D.
    """
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise InvalidInputError(f"series_slopes takes a 3-D array (slices along the last axis), got {arr.ndim}-D",
                                fix="pass the volume's voxels, e.g. vol.array")
    top = 32767 if signed else 65535
    own = [_slope_for(peak, top) for peak in _peaks(arr)]
    if not own:
        return own
    lo, hi = min(own), max(own)
    if hi > float(np.finfo(np.float32).max):  # beyond float32 (np.float32(hi) would overflow): dcm2niix cannot
        return own                              # hold these values anyway, so each slice keeps its own slope
    same = 4 * (_FLT_EPS + float(np.spacing(np.float32(hi))))
    return [hi] * len(own) if lo != hi and hi - lo <= same else own


#: Text value representations, whose bytes SpecificCharacterSet governs.
_TEXT_VRS = ("SH", "LO", "ST", "LT", "UT", "PN", "UC")


def _text_is_ascii(ds) -> bool:
    """True when every text value of ``ds`` (sequences included) is plain ASCII, the default repertoire."""
    for el in ds.iterall():
        if el.VR in _TEXT_VRS and el.value is not None:
            values = [el.value] if isinstance(el.value, (str, bytes)) or el.VM == 1 else list(el.value)
            if not all(str(v).isascii() for v in values):
                return False
    return True


def _decode_text(base, tpl) -> None:
    """Decode the text ``base`` copied from ``tpl`` in the template's character set, sequences included.

    Why: text inside a copied sequence stayed in the template's bytes (Latin-1, GB18030) while the series is
    declared UTF-8 whenever any text is not ASCII, so readers showed "Fluorod\ufffdsoxyglucose".
    """
    charset = tpl.get("SpecificCharacterSet")
    if charset is None:
        return
    base.SpecificCharacterSet = copy.deepcopy(charset)
    try:
        base.decode()
    finally:
        del base.SpecificCharacterSet


def _lo_text(text: str) -> str:
    """``text`` as one LO value: no backslash (the value separator) or control characters, 64 characters."""
    text = "".join(c if c.isprintable() else " " for c in str(text)).replace("\\", "/")
    return text.strip()[:64]


def _is_standard_uid(uid: str) -> bool:
    """True for UIDs the DICOM standard defines (SOP classes, transfer syntaxes, context groups): not identifying."""
    return str(uid).startswith("1.2.840.10008.")


def pseudonym_uid(uid: str) -> str:
    """The UID that de-identified output uses instead of ``uid``: the same one for the whole process (or batch
    run), a different one in another, and not computable from ``uid`` without the key."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[_key(), str(uid)])


class PseudonymKey:
    """The pseudonym key in a form that never shows itself: its repr is a placeholder, so a Dask task's arguments
    printed in a log (a failed task) do not carry it. Pickled to a batch's workers with their options."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = str(value)

    def __repr__(self) -> str:
        return "PseudonymKey(<hidden>)"

    __str__ = __repr__

    def __getstate__(self):
        return self._value

    def __setstate__(self, state) -> None:
        self._value = state


def _key() -> str:
    return _RUN_KEY.get() or _UID_KEY


def current_key() -> PseudonymKey:
    """The pseudonym key in use here (for a batch run to hand to its workers, :func:`using_key`)."""
    return PseudonymKey(_key())


@contextlib.contextmanager
def using_key(key: Optional[PseudonymKey]):
    """Make pseudonyms with ``key`` (a batch run's, :func:`current_key`) inside the block; None: this process's own.

    Why: each Dask worker is its own process with its own key, so outputs of one batch run on one fixed series got
    different pseudonymous study and frame of reference UIDs (and patients), and no longer overlaid in a PACS.
    """
    if key is None:
        yield
        return
    if not isinstance(key, PseudonymKey):
        raise InvalidInputError("the pseudonym key must be a medfuse.io.dicom_writer.PseudonymKey",
                                fix="pass medfuse.io.dicom_writer.current_key() from the process that runs the batch")
    token = _RUN_KEY.set(key._value)
    try:
        yield
    finally:
        _RUN_KEY.reset(token)


def _patient_pseudonym(hdr, fallback: str) -> str:
    """PatientID/PatientName of a de-identified output: a keyed hash of the patient's identity in ``hdr`` (the
    template, else the volume's own series): ID with its issuer, else name and birth date; ``fallback`` (the
    study's UID) when it names no one. One patient's outputs of one run share it, other patients' differ, and
    without the run's key it cannot be traced back (nor recomputed from the real ID).

    Why: every de-identified output had an empty PatientID and PatientName, and a PACS filed the outputs of all
    patients under one patient with no ID.
    """
    import hashlib
    import hmac

    from .._patient import _name

    ident = ""
    if hdr is not None:
        pid = " ".join(str(hdr.get("PatientID", "") or "").split()).upper()
        issuer = " ".join(str(hdr.get("IssuerOfPatientID", "") or "").split()).upper()
        name, born = _name(hdr.get("PatientName", "")), str(hdr.get("PatientBirthDate", "") or "").strip()
        ident = f"id={pid}\0issuer={issuer}" if pid else (f"name={name}\0born={born}" if name or born else "")
    ident = ident or f"study={fallback}"
    digest = hmac.new(_key().encode(), b"medfuse-patient\0" + ident.encode("utf-8", "replace"), hashlib.sha256)
    return "MF" + digest.hexdigest()[:16].upper()


def _uid_values(el) -> list:
    if el.value is None or el.value == "":
        return []
    return [str(v) for v in (el.value if el.VM > 1 else [el.value])]


def _deidentify(base, pseudonym: str) -> None:
    """Apply the Basic Profile to ``base``, which holds what was copied from the template (in place; see the
    module docstring); ``pseudonym`` (:func:`_patient_pseudonym`) becomes its PatientID and PatientName."""
    base.remove_private_tags()  # recursive: private elements inside copied sequences too
    drop = set(PHI_KEYWORDS) | set(_DEID_REMOVE)

    def clean(ds, el):
        if el.keyword in drop:
            del ds[el.tag]
        elif el.VR == "UI" and el.value and el.keyword not in _CODING_UIDS:
            new = [v if _is_standard_uid(v) else pseudonym_uid(v) for v in _uid_values(el)]
            el.value = new if el.VM > 1 else new[0]

    base.walk(clean)
    # Family^given: a name of one component is the retired form (dciodvfy warns); lists sort by the pseudonym.
    base.PatientName = f"{pseudonym}^PSEUDONYM"
    base.PatientID = pseudonym
    base.PatientBirthDate = ""
    base.PatientIdentityRemoved = "YES"
    base.DeidentificationMethod = "medfuse: PS3.15 Basic Profile, full dates, characteristics kept"  # LO: 64
    base.LongitudinalTemporalInformationModified = "UNMODIFIED"
    items = []
    for value, meaning in _DEID_CODES:
        item = type(base)()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    from pydicom.sequence import Sequence

    base.DeidentificationMethodCodeSequence = Sequence(items)


def _claims_root() -> Path:
    """The per-user folder where processes on this machine claim SeriesNumbers (see :func:`_series_number`)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    return Path(tempfile.gettempdir()) / ("medfuse-series-numbers" + (f"-{uid}" if uid is not None else ""))


_pruned_claims = False


def _claims_dir(day: str) -> Optional[Path]:
    """Today's claims folder, made when needed; None when it cannot be used (then numbers are per process)."""
    global _pruned_claims
    root = _claims_root()
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st = root.lstat()
        # Only a real folder of our own: a link, or a folder another user made, could steer or block the claims.
        if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            return None
        folder = root / day
        folder.mkdir(exist_ok=True)
    except OSError:
        return None
    if not _pruned_claims:  # once per process: old days' claims are no longer needed (numbers repeat daily)
        _pruned_claims = True
        for old in root.iterdir():
            try:
                if old.name != day and _time.time() - old.lstat().st_mtime > 2 * 86400:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
    return folder


def _claim(folder: Path, n: int) -> bool:
    """Claim number ``n`` for this process: False when another process (or this one) already has it."""
    try:
        os.close(os.open(folder / str(n), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:  # disk full, a read-only temp folder: numbering stays per process rather than failing the write
        return True
    return True


def _series_number(now: _dt.datetime, tpl) -> int:
    """``1HHMMSS``, or one more than the last number this process gave, skipping the template's number and any
    number another process on this machine took today (so that batch workers writing in the same second differ)."""
    global _last_series_number
    try:
        avoid = int(str(tpl.get("SeriesNumber", "")).strip()) if tpl is not None else None
    except ValueError:
        avoid = None
    with _SERIES_LOCK:
        n = max(1_000_000 + int(now.strftime("%H%M%S")), _last_series_number + 1)
        claims = _claims_dir(now.strftime("%Y%m%d"))
        while n == avoid or (claims is not None and not _claim(claims, n)):
            n += 1
        _last_series_number = n
    return n


def _modality_attributes(base, tpl, modality: str) -> None:
    """Acquisition attributes of the CT/MR Image and NM/PET Patient Orientation modules (PS3.3 C.8.2.1,
    C.8.3.1, C.8.4.6): copied from a template of the same modality, else generic values for a derived image
    (Type 1) or present and empty (Type 2; Type 2C when its condition holds)."""
    import pydicom

    same = tpl is not None and _DICOM_MODALITY.get(modality) == str(tpl.get("Modality", "")).strip().upper()
    for kw in _MODALITY_KEYWORDS.get(modality, ()):
        if same and kw in tpl:
            setattr(base, kw, copy.deepcopy(tpl.data_element(kw).value))
    for kw in _FRAME_KEYWORDS:  # whatever the template's modality: its patient coordinates are the output's
        if tpl is not None and kw not in base and str(tpl.get(kw, "") or "").strip():
            setattr(base, kw, tpl.data_element(kw).value)
    if modality == "CT":
        base.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]  # CT Image module: value 3 AXIAL (not a LOCALIZER)
        for kw in ("KVP", "AcquisitionNumber"):
            base.setdefault(kw, None)
    elif modality == "MR":
        base.ImageType = ["DERIVED", "SECONDARY", "OTHER"]  # MR Image module: value 3 is required (OTHER: none fits)
        # Type 1: RM (research mode) and NONE are the defined terms for a sequence the image does not come from.
        if not str(base.get("ScanningSequence", "") or "").strip():
            base.ScanningSequence = "RM"
        if not str(base.get("SequenceVariant", "") or "").strip():
            base.SequenceVariant = "NONE"
        for kw in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
            base.setdefault(kw, None)
        seq = {str(v).upper() for v in _as_list(base.ScanningSequence)}
        var = {str(v).upper() for v in _as_list(base.SequenceVariant)}
        if not ("EP" in seq and "SK" not in var):  # RepetitionTime: 2C, not required for EPI without SK
            base.setdefault("RepetitionTime", None)
        if "IR" in seq:  # InversionTime: 2C, required for inversion recovery
            base.setdefault("InversionTime", None)
        else:  # ... and not present otherwise (a Philips enhanced template's InversionTime 0 beside RM: dciodvfy)
            base.pop("InversionTime", None)
        options = {str(v).upper() for v in _as_list(base.get("ScanOptions"))}
        if not options & {"CG", "PPG"}:  # TriggerTime: 2C, for cardiac or pulse gated images only
            base.pop("TriggerTime", None)
    if modality in ("CT", "MR"):
        base.setdefault("PatientPosition", None)  # 2C: CT and MR images without PatientOrientationCodeSequence
    if modality == "PT":
        base.ImageType = ["DERIVED", "PRIMARY"]  # PET Image module: value 2 shall be PRIMARY
        if not base.get("PatientOrientationCodeSequence") and not base.get("PatientGantryRelationshipCodeSequence"):
            # The PET's only record of the patient's position (PatientPosition may not stand beside it): left
            # empty, a planning system could not tell a feet-first PET from a head-first one.
            _orientation_codes(base, str(base.get("PatientPosition", "") or ""),
                               str(base.get("AnatomicalOrientationType", "") or ""))
        for kw in ("PatientOrientationCodeSequence", "PatientGantryRelationshipCodeSequence"):
            if kw not in base:
                setattr(base, kw, pydicom.Sequence())
        # General Series: PatientPosition shall not be present with PatientOrientationCodeSequence (type 2 in the
        # PET IOD, so always present): a CT template's HFS made every PET on it fail dciodvfy.
        base.pop("PatientPosition", None)


def _code_item(code: Tuple[str, str, str]):
    import pydicom

    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _orientation_codes(base, position: str, anatomy: str) -> None:
    """Fill the PET's PatientOrientationCodeSequence (recumbent, with its modifier) and
    PatientGantryRelationshipCodeSequence from ``position`` (PatientPosition, e.g. ``FFS``); nothing for a
    position that is not a biped's defined term (unknown, or a quadruped's: ``anatomy`` QUADRUPED)."""
    import pydicom

    position = position.strip().upper()
    if position not in _PATIENT_POSITIONS or anatomy.strip().upper() == "QUADRUPED":
        return
    orientation = _code_item(_RECUMBENT)
    orientation.PatientOrientationModifierCodeSequence = pydicom.Sequence(
        [_code_item(_POSITION_MODIFIERS[position[2:]])])
    base.PatientOrientationCodeSequence = pydicom.Sequence([orientation])
    base.PatientGantryRelationshipCodeSequence = pydicom.Sequence([_code_item(_POSITION_FIRST[position[:2]])])


def refuse_unregistered_frame(volume: Volume, frame_uid: Any, *, what: str = "the image") -> None:
    """Refuse to write ``volume`` into the frame of reference ``frame_uid`` (a kept identity's: the fixed series')
    when it lies in another DICOM frame of reference that no registration or transform placed it out of.

    Why: written with the fixed series' FrameOfReferenceUID, a navigation or planning system takes such an image
    as aligned with that series, which nothing says it is (another session's or scanner's coordinates). A
    registration or a transform puts the image into the fixed frame (and its record says so); one frame of
    reference (a PET/CT) needs neither.

    Args:
        volume: the image to write: its own frame of reference is compared; for a fused one (no frame of its own)
            the warnings its inputs' resampling left (an input placed across frames without a transform).
        frame_uid: the FrameOfReferenceUID it would be written with.
        what: the image, in the caller's words.

    Raises:
        InvalidInputError: ``volume`` comes from another frame of reference, unregistered.
    """
    from ..registration.resample import OTHER_FRAME_MARK, _is_fusion

    own = str(volume.provenance.get("frame_of_reference_uid") or "")
    if own and own != str(frame_uid or ""):
        whose = f"{what} comes"
    elif _is_fusion(volume) and any(OTHER_FRAME_MARK in str(w) for w in volume.provenance.get("warnings") or []):
        # Only a fusion's: resample() drops the note once a transform places the image itself.
        whose = f"{what} is a fusion with an input that comes"
    else:
        return
    raise InvalidInputError(
        f"{whose} from another DICOM frame of reference than the fixed (reference) series (another session or "
        "scanner), and no registration or transform placed it in that series' frame: written with that series' "
        "frame of reference (the identity kept), a navigation or planning system would take it as aligned with "
        "that series, which it likely is not",
        fix="register it first (medfuse register, or --register rigid with fuse; medfuse.register in "
            "Python), or pass the registration's transform (--transform T.tfm), or leave out "
            "--keep-identity (deidentify=True in Python): the output then gets a pseudonymous study and frame")


def _template_slices(template: Any, tpl) -> list:
    """(ImagePositionPatient, SOPClassUID, SOPInstanceUID) of each instance of the template's series: every one in
    the template folder, or, for one file (or a Dataset read from one), in the folder beside it (not below: a
    study's whole tree); the template header's own when none can be read."""
    import pydicom

    from .dicom import _BROKEN, _read_header

    if isinstance(template, pydicom.Dataset):
        template = getattr(template, "filename", None)
    files: list = []
    if isinstance(template, (str, os.PathLike)):
        where = Path(template)
        if where.is_dir():
            files = _template_files(where)
        elif where.is_file():
            files = sorted(f for f in where.parent.iterdir() if f.is_file() and not f.name.startswith("."))

    def entry(ds):
        try:
            ipp = np.array([float(x) for x in ds.ImagePositionPatient], float)
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        if ipp.shape != (3,) or not np.all(np.isfinite(ipp)):
            return None
        return ipp, str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")

    uid, iop = str(tpl.get("SeriesInstanceUID", "")), str(list(tpl.get("ImageOrientationPatient", []) or []))
    out = []
    for f in files:
        ds = _read_header(f, strict=False)
        if ds is None or ds is _BROKEN or str(ds.get("SeriesInstanceUID", "")) != uid or \
                str(list(ds.get("ImageOrientationPatient", []) or [])) != iop:  # a localizer of the series
            continue
        e = entry(ds)
        if e is not None:
            out.append(e)
    return out or [e for e in [entry(tpl)] if e is not None]


def _on_template_grid(volume: Volume, template: Any, tpl) -> Optional[dict]:
    """Output slice index -> (SOPClassUID, SOPInstanceUID) of the template instance at its position, when
    ``volume``'s slices are the template series' own (its slice plane, pixel spacing, slice step, and its slices
    (:func:`_template_slices`) on the volume's slices within the reader's position tolerance, at least one inside
    the volume); None when they are not.

    The slice step is SpacingBetweenSlices, else measured from the template's slice positions (SliceThickness is
    not a step: an 8 mm slice every 4 mm), else (one file, no SpacingBetweenSlices) not compared.
    """
    try:
        iop = np.array([float(x) for x in tpl.ImageOrientationPatient], float)
        pixel = [float(x) for x in tpl.PixelSpacing]
        sbs = tpl.get("SpacingBetweenSlices")
        step = float(sbs) if sbs not in (None, "") else None
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    d, sp = volume.direction, np.asarray(volume.spacing, float)
    if iop.shape != (6,) or len(pixel) != 2 or not np.all(np.isfinite(iop)):
        return None
    if not (np.allclose(iop[:3], d[:, 0], atol=1e-4) and np.allclose(iop[3:], d[:, 1], atol=1e-4)) or \
            not np.allclose([pixel[1], pixel[0]], sp[:2], rtol=1e-5, atol=0):
        return None
    slices = _template_slices(template, tpl)  # the series' files read only for an output in its plane
    if step is None and len(slices) > 1:
        normal = np.cross(iop[:3], iop[3:])
        offsets = np.unique(np.round([float(e[0] @ normal) for e in slices], 4))
        step = float(np.median(np.diff(offsets))) if len(offsets) > 1 else None
    if not slices or (step is not None and not np.isclose(step, sp[2], rtol=1e-5, atol=0)):
        return None
    found = {}
    for ipp, sop_class, sop_uid in slices:
        idx = volume.world_to_index(ipp)
        k = round(float(idx[2]))
        if not (abs(idx[0]) * sp[0] <= _POS_TOL and abs(idx[1]) * sp[1] <= _POS_TOL and
                abs(idx[2] - k) * sp[2] <= _POS_TOL):
            return None  # a template slice between the volume's: another grid
        if 0 <= k < volume.shape[2]:
            found.setdefault(k, (sop_class, sop_uid))
    return found or None


def _ds_as_written(tpl, keyword: str) -> Optional[str]:
    """The template's DS value of ``keyword`` as its file wrote it ("8", not "8.0"); None when absent or empty."""
    value = tpl.get(keyword)
    if value is None or str(value).strip() == "":
        return None
    return str(getattr(value, "original_string", None) or _fmt(float(value))).strip()


def _slice_spacing(volume: Volume, tpl, on_grid: Optional[dict]) -> Tuple[str, str]:
    """(SliceThickness, SpacingBetweenSlices) to write: the template's as written when the output lies on its own
    slices (``on_grid``, from :func:`_on_template_grid`), the slice spacing where it has none; else the slice
    spacing, rounded to 7 significant digits.

    Why: the spacing computed from normalised orientation vectors came out as 7.99999980880457 where the source said
    8 (and its 6 mm thickness, with a 2 mm gap, was lost); 7 digits drop float32-level noise (1e-7) and keep
    every spacing a DICOM reader can separate (> 0.01 mm) to 1 part in 1e6.
    """
    own = _fmt(float(f"{float(volume.spacing[2]):.7g}"))
    if tpl is None or not on_grid:
        return own, own
    return _ds_as_written(tpl, "SliceThickness") or own, _ds_as_written(tpl, "SpacingBetweenSlices") or own


#: ITK transform class names, as the kind of placement a DerivationDescription names.
_TRANSFORM_KINDS = {"Euler3DTransform": "rigid", "VersorRigid3DTransform": "rigid", "TranslationTransform": "rigid",
                    "Similarity3DTransform": "similarity", "ScaleVersor3DTransform": "affine",
                    "AffineTransform": "affine", "BSplineTransform": "deformable",
                    "DisplacementFieldTransform": "deformable"}


def _placement(history, registration=None) -> Optional[str]:
    """How the last resampling in ``history`` placed the image, in a few words; None when it was not resampled."""
    steps = [h for h in history or [] if isinstance(h, dict) and h.get("step") == "resample"]
    if not steps:
        return None
    if isinstance(registration, dict) and registration.get("kind"):
        return f"registered ({registration['kind']}) onto the reference grid"
    name = steps[-1].get("transform")
    if not name:
        return "resampled onto the reference grid without a transform"
    kind = _TRANSFORM_KINDS.get(str(name))
    return f"resampled onto the reference grid with transform {name}" + (f" ({kind})" if kind else "")


def _derivation(volume: Volume) -> str:
    """DerivationDescription: what medfuse did to make the voxels (registration, resampling, fusion), from the
    volume's history; no names, IDs or paths (it is kept when de-identifying)."""
    prov = volume.provenance
    history = prov.get("history") or []
    parts = []
    fuse = next((h for h in reversed(history) if isinstance(h, dict) and h.get("step") == "fuse"), None)
    if fuse is not None:
        for i, inner in enumerate(fuse.get("input_histories") or [], start=1):
            placed = _placement(inner)
            if placed is not None:
                parts.append(f"input {i} {placed}")
        parts.append(f"fused ({fuse.get('method', 'unknown')}) from {fuse.get('n_inputs', '?')} inputs")
    else:
        placed = _placement(history, prov.get("registration"))
        if placed is not None:
            parts.append(placed)
    # Nothing to tell (a phantom, a volume saved as loaded): no description rather than an empty "derived".
    return f"{_software_version()}: " + "; ".join(parts) if parts else ""


def _template_is_source(volume: Volume, tpl) -> bool:
    """Whether the template's series holds voxels the output was made of: the volume's own series, or one of a
    fusion's inputs (a template file inside a source folder)."""
    prov = volume.provenance
    if str(prov.get("series_uid") or "") == str(tpl.get("SeriesInstanceUID", "")):
        return True
    filename = getattr(tpl, "filename", None)
    if not isinstance(filename, str) or not filename:
        return False
    here = Path(filename).resolve()
    for source in [prov.get("source"), *(prov.get("sources") or [])]:
        if isinstance(source, str) and source:
            root = Path(source).resolve()
            if here == root or root in here.parents:
                return True
    return False


def _references(base, volume: Volume, tpl, on_grid: Optional[dict]) -> Optional[Tuple[str, dict]]:
    """Point the output at the template series it was written into (identity kept only): ReferencedSeriesSequence
    (Common Instance Reference module) with the template instance(s), and an instance as SourceImageSequence when
    the template series holds voxels the output was made of (a fusion's fixed input), else as
    ReferencedImageSequence (a related image: the series whose grid and frame the output is in).

    Off the template's slices, every slice points at the template instance. On them (``on_grid``, from
    :func:`_on_template_grid`) each slice points at the template instance at its own position, and a slice with
    none there at nothing: returned as (keyword, slice index -> item) for the slice loop to set; None otherwise.
    """
    import pydicom

    def item(sop_class: str, sop_uid: str):
        ref = pydicom.Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
        return ref

    sop_class, sop_uid = str(tpl.get("SOPClassUID", "") or ""), str(tpl.get("SOPInstanceUID", "") or "")
    series_uid = str(tpl.get("SeriesInstanceUID", "") or "")
    if not (sop_class and sop_uid and series_uid):
        return None  # a template Dataset made by hand: nothing that exists to point at
    per_slice = {k: item(*ref) for k, ref in sorted((on_grid or {}).items()) if ref[0] and ref[1]}
    series = pydicom.Dataset()
    series.SeriesInstanceUID = series_uid
    series.ReferencedInstanceSequence = pydicom.Sequence(
        [copy.deepcopy(x) for x in per_slice.values()] or [item(sop_class, sop_uid)])
    base.ReferencedSeriesSequence = pydicom.Sequence([series])
    kw = "SourceImageSequence" if _template_is_source(volume, tpl) else "ReferencedImageSequence"
    if per_slice:
        return kw, per_slice
    setattr(base, kw, pydicom.Sequence([item(sop_class, sop_uid)]))
    return None


def _software_version() -> str:
    from .. import __version__

    return f"medfuse {__version__}"


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value or [])


def _fmt(x: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(x))


@_without_value_checks()
def write_dicom_series(volume: Volume, folder: PathLike, *, overwrite: bool = False, deidentify: bool = True,
                       series_description: Optional[str] = None, template: Any = None) -> Path:
    """Write ``volume`` as a derived DICOM series into the new folder ``folder`` (atomic).

    See the module docstring for the encoding and de-identification rules.

    Args:
        volume: the :class:`~medfuse.volume.Volume` to write.
        folder: the series folder to create (it must not exist, unless ``overwrite``).
        overwrite: replace an existing DICOM series folder medfuse wrote (only its DICOM files inside; never an
            input, never a scanner's series).
        deidentify: drop patient name/ID/birth date and other identifiers taken from the template.
        series_description: SeriesDescription of the derived series (default: from the volume).
        template: a pydicom Dataset, DICOM file or folder whose study context (and, without ``deidentify``,
            patient module) is kept; None for a new study.

    Returns:
        The folder written.

    Raises:
        InvalidInputError: an argument of the wrong type, or every voxel is NaN or infinite.
        OutputExistsError: the folder exists (without ``overwrite``), is an input, or holds anything but a DICOM
            series medfuse wrote.
        OutputWriteError: the folder cannot be written (permission, read-only or full disk, a name too long, its
            parent missing); ``errno`` says which.
        UnreadableFileError: the template holds no readable DICOM file.
    """
    import pydicom
    from pydicom.uid import generate_uid

    from . import _as_path, _check_flag, _check_text
    from .writers import _check_template, _refuse_all_nonfinite

    if not isinstance(volume, Volume):
        raise InvalidInputError(f"expected a medfuse Volume, got {describe(volume)}",
                                fix="load or build a Volume first (medfuse.load or medfuse.Volume)")
    folder = _as_path(folder, what="the output folder", fix="pass the new series folder's name as a str or Path")
    overwrite = _check_flag(overwrite, "overwrite")
    deidentify = _check_flag(deidentify, "deidentify")
    _check_text(series_description, "series_description", "pass the description as text, or leave it out")
    _check_template(template)
    _refuse_all_nonfinite(volume.array, folder)
    tpl = _read_template(template, str(volume.provenance.get("series_uid") or "") or None,
                         str(volume.provenance.get("frame_of_reference_uid") or "") or None)
    if not deidentify and tpl is not None and str(tpl.get("FrameOfReferenceUID", "") or ""):
        # The identity kept: the template's real frame of reference is a claim of alignment with that series.
        refuse_unregistered_frame(volume, tpl.FrameOfReferenceUID)
    if volume.shape[1] == 1 and volume.shape[2] > 1:
        # Images one row high are stacked along their row axis by ITK/GDCM (SimpleITK, Slicer...), which puts
        # every slice in the wrong place; the same voxels written as one slice whose rows run along k are read
        # right by all. World geometry is unchanged (a reader returns the j and k axes swapped).
        volume = Volume(np.swapaxes(volume.array, 1, 2), volume.affine[:, [0, 2, 1, 3]], modality=volume.modality,
                        unit=volume.unit, provenance=volume.provenance)
    if volume.shape[2] > 1 and volume.spacing[2] <= _POS_TOL:  # the reader separates gaps > _POS_TOL
        # Readers group slice positions closer than this as one position (scanners jitter positions by
        # micrometres), medfuse's among them: such a series would not read back as this volume.
        raise InvalidInputError(
            f"the volume's slice spacing is {_POS_TOL:g} mm or less, which a DICOM series cannot hold: medfuse's DICOM "
            "reader takes slice positions closer than that as one position (4-D)",
            fix="save it as NIfTI or NRRD (e.g. 'out.nii.gz', 'out.nrrd'), or resample it to a larger slice spacing")
    arr = volume.array
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    # Whole numbers in float of any unit (a label map or mask written as float by nnU-Net or nibabel) are stored
    # exactly when they fit int16 or uint16: quantised, label 2 read back as 1.99997 on some slices and 2 on
    # others. The range first (no copy): most float volumes stop there, before the whole-number test's copies.
    exact_int = np.issubdtype(arr.dtype, np.integer)
    if not exact_int and np.issubdtype(arr.dtype, np.floating) and arr.size:
        lo, hi = float(arr.min()), float(arr.max())  # NaN: neither test below holds
        fits = (-32768 <= lo and hi <= 32767) or (0 <= lo and hi <= 65535)
        exact_int = bool((volume.unit in ("HU", "counts") or fits) and np.isfinite(lo) and np.isfinite(hi)
                         and all(np.array_equal(arr[:, :, k], np.rint(arr[:, :, k])) for k in range(arr.shape[2])))
    if exact_int:
        arr = np.rint(arr).astype(np.int64) if np.issubdtype(arr.dtype, np.floating) else arr
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        warnings.warn(f"{folder}: NaN/infinite voxels are stored as 0 (DICOM pixels are integers)",
                      MedfuseWarning, stacklevel=3)
    modality = volume.modality
    dose = volume.unit == "Gy"  # an RT dose grid: an RT Dose object, which keeps Gy (see _write_dose)
    sop_class = _RT_DOSE if dose else _SOP.get(modality, _SC)
    if not dose and ((modality not in _SOP and modality != "NM" and volume.unit != "arbitrary") or
                     (modality == "NM" and volume.unit not in ("Bq/mL", "arbitrary", "counts"))):
        # An OT series holds no unit, an NM series only Bq/mL (Units BQML), counts or NONE: the unit is lost.
        held = "an NM series, which holds Bq/mL or counts" if modality == "NM" else \
            "an 'other' (OT) series, which holds no unit"
        warnings.warn(f"{folder.name}: a volume of modality {modality!r} is written as {held}: its unit "
                      f"{volume.unit!r} is not kept (set the volume's modality, e.g. CT for HU or "
                      "PT for SUV, or save it as NIfTI or NRRD, which keep the unit)", MedfuseWarning, stacklevel=3)
    if modality == "PT" and volume.unit == "SUVlbm" and volume.provenance.get("suv") not in ("lbm", "lbm_janma"):
        # SUVType LBM alone reads as James's formula: an SUVlbm made with Janmahasatian's and converted later
        # (load(..., suv='bw')) is then about 3 % off.
        warnings.warn(f"{folder.name}: the volume is SUVlbm, but which lean-body-mass formula made it is not "
                      "recorded (it was not loaded by medfuse, or came through a file format or tool that does "
                      "not keep it): the series says SUVType LBM, which readers (medfuse too) take as James's "
                      "formula, so a later conversion to another SUV is off if it was Janmahasatian's. Record it "
                      "first: volume.provenance['suv'] = 'lbm_janma' (or 'lbm' for James's)",
                      MedfuseWarning, stacklevel=3)
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    series_uid = generate_uid()
    prov = volume.provenance
    if tpl is not None and "StudyInstanceUID" in tpl:
        study_uid = str(tpl.StudyInstanceUID)  # replaced by its pseudonym when de-identifying
    else:
        # Not the provenance's study: written without a patient module, a series filed into it by a PACS sits
        # nameless in that study, and it may be another patient's (a PET registered onto another patient's CT).
        study_uid = generate_uid()
    # Only the template says which patient space the voxels are in (a registered volume keeps the provenance of
    # the moving image it was made from): without one, a new frame of reference claims no spatial relationship.
    for_uid = (str(tpl.FrameOfReferenceUID) if tpl is not None and "FrameOfReferenceUID" in tpl
               else generate_uid())
    d = volume.direction
    sp = volume.spacing
    iop = [float(x) for x in np.concatenate([d[:, 0], d[:, 1]])]
    normal = np.cross(d[:, 0], d[:, 1])

    base = pydicom.Dataset()
    if tpl is not None:
        # Patient (with its issuers and other IDs), study and frame of reference: the template's.
        for kw in _STUDY_KEYWORDS + (() if deidentify else _PATIENT_KEYWORDS):
            if kw in tpl:  # a copy: de-identification edits it, and the caller's template stays as it was
                setattr(base, kw, copy.deepcopy(tpl.data_element(kw).value))
        if deidentify:
            for kw in ("PatientSex", "PatientAge", "PatientSize", "PatientWeight"):
                if kw in tpl and kw not in base:
                    setattr(base, kw, tpl.data_element(kw).value)
    # What the PET's values were measured with (dose, weight, scan times): its own series', never another PET's.
    pet_source, pet = _pet_context(volume, template, tpl) if modality == "PT" else (None, None)
    if pet is not None:
        for kw in _PET_KEYWORDS:
            if kw in pet:  # copies, de-identified below with the rest
                setattr(base, kw, copy.deepcopy(pet.data_element(kw).value))
            elif kw in ("PatientWeight", "PatientSize") and pet is not tpl and _is_pet_header(tpl):
                base.pop(kw, None)  # another PET's weight, with this PET's dose, would make a wrong SUV
        if str(pet.get("PatientSex", "") or "").strip():  # SUVlbm and SUVbsa depend on it
            base.PatientSex = pet.PatientSex
        if volume.unit == "Bq/mL":
            earliest = _earliest_acquisition(pet_source, pet)
            if earliest is not None:
                base.AcquisitionDate, base.AcquisitionTime = earliest
    elif modality == "PT" and _is_pet_header(tpl):
        for kw in ("PatientWeight", "PatientSize"):  # the template PET's, not this one's (see _pet_context)
            base.pop(kw, None)
    if modality == "PT" and pet is None and volume.unit == "Bq/mL":
        other_pet = _is_pet_header(tpl)
        why = ("could not be read, and the template is another PET series, whose values do not belong to these "
               "voxels" if other_pet else "is not known or could not be read")
        # A CT template or none said nothing: the series went out without a dose, as if that were complete.
        warnings.warn(f"{folder.name}: the PET's own DICOM series (its dose, weight and scan times) {why}: the "
                      "output carries no dose, so no SUV can be computed from it (load the PET from its DICOM "
                      "series, and keep that folder in place while saving)", MedfuseWarning, stacklevel=3)
    for kw, value in (_suv_body(volume) if modality == "PT" else {}).items():
        # The weight, height and sex the SUV was made with (load(..., body=)), not the header's: SUV computed
        # from this series' header (a PACS's, a later conversion to another SUV kind) must be these voxels' own.
        setattr(base, kw, value if kw == "PatientSex" else _fmt(value))
    base.ImageType = ["DERIVED", "SECONDARY"]
    _modality_attributes(base, tpl, modality)  # before de-identifying: what it copies is cleaned too
    if dose:
        _dose_attributes(base, volume)  # before de-identifying too: the plan reference holds UIDs
    if tpl is not None:
        _decode_text(base, tpl)
    base.StudyInstanceUID = study_uid
    base.FrameOfReferenceUID = for_uid
    if deidentify:
        # The patient the output is filed under: the template's, else the one of the volume's own series.
        who = tpl if tpl is not None else _own_series(volume)[1]
        _deidentify(base, _patient_pseudonym(who, str(tpl.StudyInstanceUID) if tpl is not None and
                                             "StudyInstanceUID" in tpl else study_uid))
    else:
        for kw in ("PatientName", "PatientID", "PatientBirthDate"):
            if kw not in base:
                setattr(base, kw, "")
    base.PatientSex = base.get("PatientSex", "")
    base.StudyDate = base.get("StudyDate", date)
    base.StudyTime = base.get("StudyTime", time)
    base.ReferringPhysicianName = base.get("ReferringPhysicianName", "")
    base.StudyID = base.get("StudyID", "")
    base.AccessionNumber = base.get("AccessionNumber", "")
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = _series_number(now, tpl)
    base.SeriesDate = base.get("SeriesDate", date) if modality == "PT" else date
    base.SeriesTime = base.get("SeriesTime", time) if modality == "PT" else time
    fused = isinstance(prov.get("method"), str) and any(
        isinstance(h, dict) and h.get("step") == "fuse" for h in prov.get("history", []) or [])
    # A fusion said as one in a PACS list ("medfuse derived unknown (arbitrary)" told it from nothing).
    default = f"medfuse fused ({prov['method']})" if fused else "medfuse derived RT dose (Gy)" if dose else \
        f"medfuse derived {modality} ({volume.unit})"
    base.SeriesDescription = _lo_text(series_description or default)
    base.Modality = "RTDOSE" if dose else _DICOM_MODALITY.get(modality, "OT")
    base.PositionReferenceIndicator = base.get("PositionReferenceIndicator", "")
    # Manufacturer (General Equipment, type 2) is left empty: dcm2niix identifies a vendor by the first two letters
    # ("medfuse" read as Mediso, a scanner maker, in its BIDS sidecar and vendor-specific handling). The software
    # is named in ManufacturerModelName and SoftwareVersions (type 3) instead.
    base.Manufacturer = ""
    base.ManufacturerModelName = "medfuse"
    base.SoftwareVersions = _software_version()
    base.SOPClassUID = sop_class
    if sop_class == _SC:
        base.ConversionType = "WSD"  # SC Equipment module, type 1: made on a workstation
        # Modality LUT: RescaleType is 1C beside the rescale (US: unspecified); General Image: PatientOrientation
        # is 2C for an IOD that does not require the image plane (dciodvfy named both missing).
        base.RescaleType = "US"
        base.PatientOrientation = ""
    base.ContentDate, base.ContentTime = date, time
    base.AcquisitionDate = base.get("AcquisitionDate", date)
    base.AcquisitionTime = base.get("AcquisitionTime", time)
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = int(arr.shape[1]), int(arr.shape[0])
    base.PixelSpacing = [_fmt(sp[1]), _fmt(sp[0])]
    on_grid = None if tpl is None else _on_template_grid(volume, template, tpl)
    base.SliceThickness, base.SpacingBetweenSlices = _slice_spacing(volume, tpl, on_grid)
    base.ImageOrientationPatient = [_fmt(x) for x in iop]
    base.BitsAllocated, base.BitsStored, base.HighBit = 16, 16, 15
    base.BurnedInAnnotation = "NO"
    if modality == "CT":
        # CT Image module: RescaleType is required when the values are not Hounsfield units (a normalised CT).
        base.RescaleType = "HU" if volume.unit == "HU" else "US"
    if modality == "NM" and volume.unit in ("Bq/mL", "arbitrary"):
        # The reader's cue for quantitative SPECT (see medfuse.io.dicom); NONE for values on no physical scale
        # (a normalised SPECT), which without it read back as counts.
        base.Units = "BQML" if volume.unit == "Bq/mL" else "NONE"
    if modality == "PT":
        if volume.unit.startswith("SUV"):
            # PS3.3 Units defined terms: GML (g/ml) is SUVbw and SUVlbm, CM2ML (cm²/ml) SUVbsa.
            base.Units = "CM2ML" if volume.unit == "SUVbsa" else "GML"
            base.SUVType = {"SUVbw": "BW", "SUVlbm": "LBM", "SUVbsa": "BSA"}[volume.unit]
            if volume.unit == "SUVlbm" and prov.get("suv") in ("lbm", "lbm_janma"):
                # SUVType LBM does not say which formula; converting the series later needs it (see suv.py).
                from .suv import LBM_JAMES_NOTE, LBM_JANMA_NOTE

                base.DerivationDescription = LBM_JANMA_NOTE if prov["suv"] == "lbm_janma" else LBM_JAMES_NOTE
            base.DecayCorrection = "ADMIN"
            base.CorrectedImage = ["ATTN", "DECY"]
        elif volume.unit == "Bq/mL":
            base.Units = "BQML"
            base.CorrectedImage = base.get("CorrectedImage", ["ATTN", "DECY"])
            base.DecayCorrection = base.get("DecayCorrection", "START")
        else:
            base.Units = "CNTS" if volume.unit == "counts" else "NONE"
            # PET Series module: DecayCorrection is type 1, CorrectedImage type 2 (as the PET's series says, if any).
            for kw, default in (("DecayCorrection", "NONE"), ("CorrectedImage", None)):
                if pet is not None and kw in pet:
                    setattr(base, kw, copy.deepcopy(pet.data_element(kw).value))
                else:
                    base.setdefault(kw, default)
        if str(base.DecayCorrection).strip().upper() != "NONE":
            # PET Image module, 1C: medfuse scales by no decay of its own; the values are corrected as
            # DecayCorrection says (one template file's factor would be wrong for the other beds' slices).
            base.DecayFactor = "1"
        if "RadiopharmaceuticalInformationSequence" not in base:  # PET Isotope module, type 2: present, empty
            base.RadiopharmaceuticalInformationSequence = pydicom.Sequence()
        for item in base.RadiopharmaceuticalInformationSequence:  # type 2 in each item (dciodvfy named it missing)
            if "RadionuclideCodeSequence" not in item:
                item.RadionuclideCodeSequence = pydicom.Sequence()
        base.SeriesType = ["STATIC", "IMAGE"]
        base.CountsSource = "EMISSION"
        base.CollimatorType = "NONE"
        base.NumberOfSlices = int(arr.shape[2])
        base.FrameReferenceTime = "0"
        base.ActualFrameDuration = 0
    # What was done (after the SUVlbm formula note, which the reader looks for anywhere in the text).
    described = "; ".join(x for x in (_derivation(volume), str(base.get("DerivationDescription", "") or "")) if x)
    if described:
        base.DerivationDescription = described
    slice_refs = None
    if not deidentify and tpl is not None:
        # Only with the identity kept: de-identified, the template's UIDs are pseudonyms of a series that does
        # not exist under them, so no references are written.
        slice_refs = _references(base, volume, tpl, on_grid)
    # Text outside ASCII (a template's names or descriptions, a SeriesDescription such as "Fusión") is written
    # in UTF-8 and declared so; all-ASCII series keep the default repertoire, which every PACS reads.
    if not _text_is_ascii(base):
        base.SpecificCharacterSet = "ISO_IR 192"
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    # The default LINEAR function (PS3.3 C.11.2.1.2.1) ramps from c - 0.5 - (w - 1) / 2 to c - 0.5 + (w - 1) / 2:
    # centre + 0.5 and range + 1 show exactly lo..hi, in every viewer, for any range. The plain centre and range
    # made a fused 0..1 series (width 1) a black-and-white mask: every voxel above 0 full white.
    base.WindowCenter = _fmt((lo + hi) / 2 + 0.5)
    base.WindowWidth = _fmt(max(hi - lo, 1e-6) + 1)
    inputs = [prov.get("source"), *prov.get("sources", [])] + ([template] if isinstance(template, (str, os.PathLike))
                                                              else [])
    if dose:
        with atomic_dir(folder, overwrite=overwrite, inputs=inputs, own_series=True) as tmp:
            _write_dose(base, volume, tmp / "RD00001.dcm", folder)
        return folder

    # One PixelRepresentation for the whole series (see quantise_slice): exact integers keep the
    # type their whole range fits; quantised data is signed when any voxel is negative.
    quantised = not exact_int
    if exact_int:
        vlo, vhi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if -32768 <= vlo and vhi <= 32767:
            series_signed = True
        elif vlo >= 0 and vhi <= 65535:
            series_signed = False
        else:  # fits neither 16-bit type: quantised
            series_signed, quantised = vlo < 0, True
    else:  # slice by slice, so that no float64 copy of the whole volume is made
        series_signed = False
        for k in range(arr.shape[2]):
            plane = np.asarray(arr[:, :, k])
            if np.any((plane < 0) & np.isfinite(plane)):
                series_signed = True
                break

    lost = 0.0  # largest error of whole numbers that had to be quantised (they fit no 16-bit type)
    # own_series: overwrite replaces only a series this writer made, never a scanner's original one.
    with atomic_dir(folder, overwrite=overwrite, inputs=inputs, own_series=True) as tmp:
        slopes = series_slopes(arr, signed=series_signed) if quantised else None
        for k in range(arr.shape[2]):
            stored, slope, intercept = quantise_slice(np.asarray(arr[:, :, k]).T, exact_int=bool(exact_int),
                                                      signed=series_signed,
                                                      value_range=(vlo, vhi) if exact_int else None,
                                                      slope=None if slopes is None else slopes[k])
            if exact_int and quantised:
                plane = np.asarray(arr[:, :, k]).T.astype(np.float64)
                lost = max(lost, float(np.max(np.abs(stored * slope + intercept - plane), initial=0.0)))
            ds = copy.deepcopy(base)
            uid = generate_uid()
            ds.SOPInstanceUID = uid
            ds.InstanceNumber = k + 1
            ipp = volume.index_to_world([0.0, 0.0, float(k)])
            ds.ImagePositionPatient = [_fmt(x) for x in ipp]
            ds.SliceLocation = _fmt(float(ipp @ normal))
            ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
            ds.RescaleSlope = _fmt(slope)
            ds.RescaleIntercept = _fmt(intercept)
            if modality == "PT":
                ds.ImageIndex = k + 1
            if slice_refs is not None and k in slice_refs[1]:
                setattr(ds, slice_refs[0], pydicom.Sequence([copy.deepcopy(slice_refs[1][k])]))
            ds.PixelData = np.ascontiguousarray(stored).tobytes()
            ds.file_meta = _file_meta(sop_class, uid)
            _save_slice(ds, tmp / f"IM{k + 1:05d}.dcm")
    if exact_int and quantised:
        # Whole numbers beyond int16/uint16 (int32 HU, a label map above 65535) were scaled into 16 bits.
        warnings.warn(f"{folder}: the volume's whole numbers ({vlo}..{vhi}) fit no 16-bit DICOM pixel type, so they "
                      f"were scaled (RescaleSlope) and are no longer exact: off by up to {lost:.4g} when read back "
                      f"(labels may merge); save as NIfTI or NRRD to keep them exact", MedfuseWarning, stacklevel=3)
    return folder


def _dose_attributes(base, volume: Volume) -> None:
    """DoseType, DoseSummationType and ReferencedRTPlanSequence of the RT Dose module: those of the dose's own
    RTDOSE when it can be read (a resampled dose is still that plan's dose), else ``PHYSICAL`` and ``PLAN``."""
    own = _own_series(volume)[1]
    if own is not None and str(own.get("Modality", "")).strip().upper() != "RTDOSE":
        own = None
    kind = str(own.get("DoseType", "") or "").strip().upper() if own is not None else ""
    base.DoseType = kind if kind in ("PHYSICAL", "EFFECTIVE") else "PHYSICAL"  # ERROR would need signed pixels
    summed = str(own.get("DoseSummationType", "") or "").strip().upper() if own is not None else ""
    base.DoseSummationType = summed or "PLAN"
    if own is not None and "ReferencedRTPlanSequence" in own:
        base.ReferencedRTPlanSequence = copy.deepcopy(own.ReferencedRTPlanSequence)


def _write_dose(base, volume: Volume, path: Path, folder: Path) -> None:
    """Write ``volume`` (in Gy) as one multi-frame RT Dose object at ``path`` (``base``: the series' attributes).

    A Volume's grid is orthogonal (it refuses shear), so its slice axis lies along row x column, or against it.
    """
    from pydicom.tag import Tag
    from pydicom.uid import generate_uid

    d, sp = volume.direction, volume.spacing
    along = float(np.dot(d[:, 2], np.cross(d[:, 0], d[:, 1])))
    # Frames in increasing offset order along row x column: a left-handed grid's from its last slice.
    order = list(range(volume.shape[2]))[::-1 if along < 0 else 1]
    values = _float_plane(np.asarray(volume.array))
    low = float(values.min()) if values.size else 0.0
    if low < 0:
        warnings.warn(f"{folder.name}: the dose has negative values (down to {low:.3g} Gy; an interpolation's "
                      "overshoot?), which an RT dose (DoseType PHYSICAL) cannot hold: they are stored as 0 Gy",
                      MedfuseWarning, stacklevel=4)
        np.maximum(values, 0.0, out=values)
    peak = float(values.max()) if values.size else 0.0
    scaling = _slope_for(peak, _DOSE_TOP)  # a DS value that reaches the peak within 32 bits
    stored = np.stack([np.clip(np.rint(values[:, :, k].T / scaling), 0, _DOSE_TOP).astype("<u4") for k in order])
    for kw in ("SpacingBetweenSlices", "WindowCenter", "WindowWidth", "RescaleType"):  # not in the RT Dose IOD
        base.pop(kw, None)
    ds = base
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [_fmt(x) for x in volume.index_to_world([0.0, 0.0, float(order[0])])]
    ds.NumberOfFrames = len(order)
    ds.FrameIncrementPointer = Tag("GridFrameOffsetVector")
    ds.GridFrameOffsetVector = [_fmt(m * sp[2]) for m in range(len(order))]
    ds.DoseUnits = "GY"
    ds.DoseGridScaling = _fmt(scaling)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.file_meta = _file_meta(_RT_DOSE, uid)
    _save_slice(ds, path)


def _file_meta(sop_class_uid: str, sop_instance_uid: str):
    """The file meta information of one written object: explicit VR little endian, pydicom's implementation UID."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _save_slice(ds, path: Path) -> None:
    """``ds.save_as(path)``, with a failed write's errno (disk full, permission) kept for the typed error."""
    try:
        ds.save_as(str(path), enforce_file_format=True)
    except OSError as e:
        # pydicom re-raises an error inside an element's write as OSError(text) without its errno (with the
        # original as the cause): a full disk then read as an internal error with a pydicom traceback.
        cause = e.__cause__
        if e.errno is None and isinstance(cause, OSError) and cause.errno is not None:
            raise cause from None
        raise
