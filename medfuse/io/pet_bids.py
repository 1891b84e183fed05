"""SUV of a NIfTI PET from its PET-BIDS JSON sidecar (``pet.nii.gz`` -> ``pet.json``, that exact sibling only).

A PET-BIDS sidecar gives what a DICOM PET header gives for SUV under other names and units: ``Units`` (Bq/mL),
``InjectedRadioactivity`` with ``InjectedRadioactivityUnits`` (MBq), ``BodyWeight`` (kg), ``TracerRadionuclide``,
and the times ``InjectionStart``, ``ScanStart`` and ``ImageDecayCorrectionTime`` in seconds relative to
``TimeZero``. They are mapped into the header dict :func:`medfuse.io.suv.suv_factor` takes, so that the decay
arithmetic and its checks are medfuse's one SUV code. BIDS has no half-life field: it comes from
``TracerRadionuclide`` through :data:`HALF_LIFE_S`. Only body-weight SUV can be made (a PET sidecar holds no height
or sex). Inheritance of metadata from sidecars higher up a BIDS tree is not read.

The sidecar is only read, never written. Its values (the weight above all) never appear in messages; the injected
activity, which identifies no one, may.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .._checks import user_stacklevel
from ..errors import MedfuseWarning, SUVError
from . import suv as _suv

__all__ = ["HALF_LIFE_S", "SUV_FIELDS", "sidecar_path", "load_json", "read_sidecar", "is_pet_sidecar", "half_life_s",
           "pet_acquisition", "suv_header", "apply_suv"]

#: Physical half-lives (s) of the common PET radionuclides, by their BIDS ``TracerRadionuclide`` spelling.
#: Source: the DDEP recommended data (LNHB, Laboratoire National Henri Becquerel) and NIST's radionuclide
#: half-life measurements: F-18 109.77 min, C-11 20.36 min, N-13 9.965 min, Ga-68 67.71 min, Cu-64 12.70 h,
#: Zr-89 78.41 h, Rb-82 1.2575 min.
HALF_LIFE_S = {"F18": 6586.2, "C11": 1221.8, "O15": 122.24, "N13": 597.9, "GA68": 4062.6, "CU64": 45720.0,
               "ZR89": 282276.0, "RB82": 75.45}

#: ``InjectedRadioactivityUnits`` medfuse converts, in Bq (BIDS recommends MBq).
_ACTIVITY_UNITS = {"BQ": 1.0, "KBQ": 1e3, "MBQ": 1e6, "GBQ": 1e9, "MCI": 3.7e7, "UCI": 3.7e4}

#: The fields SUV is made from; a sidecar with none of them was not meant to give SUV (a plain dcm2niix one).
SUV_FIELDS = ("InjectedRadioactivity", "InjectedRadioactivityUnits", "BodyWeight", "TracerRadionuclide",
              "InjectionStart", "ScanStart", "ImageDecayCorrected", "ImageDecayCorrectionTime")

#: Keys that mark a PET-BIDS sidecar even without ``Modality`` (the BIDS PET section does not require it).
_PET_KEYS = ("TracerRadionuclide", "TracerName", "InjectedRadioactivity")

#: Times this close (s) are one instant: BIDS times are written with a few decimals at most.
_SAME_TIME_S = 1.0

#: A sidecar larger than this is not a BIDS sidecar (dcm2niix's are a few kB); it is not read.
_MAX_BYTES = 1 << 20

#: DICOM names in messages of :mod:`medfuse.io.suv` -> the sidecar's field they were mapped from.
_BIDS_NAMES = {"RadionuclideTotalDose (RadiopharmaceuticalInformationSequence)": "InjectedRadioactivity",
               "RadionuclideTotalDose": "InjectedRadioactivity", "PatientWeight": "BodyWeight",
               "RadiopharmaceuticalStartDateTime": "InjectionStart", "SeriesTime/AcquisitionTime": "ScanStart",
               "the series time": "ScanStart", "RadionuclideHalfLife": "the half-life of TracerRadionuclide"}


class _Refused(Exception):
    """Why the sidecar gives no SUV (``problem``) and what to change (``fix``)."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def sidecar_path(image: Path) -> Path:
    """The BIDS sidecar of a NIfTI: the same name with ``.json`` for ``.nii.gz``/``.nii``/``.img``/``.hdr``."""
    name = image.name
    stem = name[:-len(".nii.gz")] if name.lower().endswith(".nii.gz") else image.stem
    return image.with_name(stem + ".json")


def is_pet_sidecar(meta: Any) -> bool:
    """Whether a parsed sidecar carries PET-BIDS fields (``TracerRadionuclide``, ``TracerName``,
    ``InjectedRadioactivity``) although it may lack ``Modality``."""
    return isinstance(meta, dict) and any(k in meta for k in _PET_KEYS)


def load_json(side: Path) -> Tuple[Optional[Any], Optional[str]]:
    """``(the parsed JSON, None)``, or ``(None, why it cannot be read)``; ``(None, None)`` when there is no such
    file or it is over 1 MB (not a BIDS sidecar: dcm2niix's are a few kB)."""
    try:
        if not side.is_file() or side.stat().st_size > _MAX_BYTES:
            return None, None
        return json.loads(side.read_bytes().decode("utf-8-sig")), None
    except OSError:
        return None, None
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except ValueError as e:
        where = f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        return None, f"is not valid JSON ({where})"


def read_sidecar(image: Path) -> Optional[dict]:
    """The JSON object of the sidecar beside ``image``, or None when there is none (or it is over 1 MB).

    Why warn rather than raise: the sidecar is optional metadata and the image itself is still read; but a broken
    one that was silently skipped left a PET in Bq/mL (or a CT unlabelled) with no word of why.

    Warns:
        MedfuseWarning: the file is not UTF-8 JSON, or not a JSON object, saying where and what to fix.
    """
    side = sidecar_path(image)
    meta, why = load_json(side)
    if why is None and meta is not None and not isinstance(meta, dict):
        why = f"holds a JSON {_json_kind(meta).removeprefix('a ')}, not an object ({{\"Modality\": ...}})"
    if why is not None:
        _warn(image, f"the sidecar {side.name} beside it {why}, so it was not read (its Modality, Units and PET "
                     "fields are unused); correct it, e.g. check it with 'python -m json.tool' (medfuse never "
                     "changes it)")
        return None
    return meta


def _warn(image: Path, message: str) -> None:
    warnings.warn(f"{image}: {message}", MedfuseWarning, stacklevel=user_stacklevel())


# ------------------------------------------------------------------------------------------ field checks
def _typed(meta: dict, key: str, kind: str, fix: str) -> Any:
    """``meta[key]`` checked to be a number (``"number"``, bool refused), ``"text"`` or ``"bool"``; None if absent.

    The value is never put in the message (BodyWeight is the patient's).
    """
    if key not in meta or meta[key] is None:
        return None
    v = meta[key]
    ok = {"number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "text": isinstance(v, str), "bool": isinstance(v, bool)}[kind]
    if kind == "number" and ok and not math.isfinite(v):
        raise _Refused(f"{key} is not a finite number", fix)
    if not ok:
        shown = {"number": "a JSON number", "text": "JSON text", "bool": "true or false"}[kind]
        raise _Refused(f"{key} is {_json_kind(v)}, not {shown}", fix)
    return v


def _json_kind(v: Any) -> str:
    return {bool: "true/false", str: "text", list: "a list", dict: "an object", int: "a number",
            float: "a number"}.get(type(v), type(v).__name__)


def _need(meta: dict, key: str, kind: str, fix: str) -> Any:
    v = _typed(meta, key, kind, fix)
    if v is None:
        raise _Refused(f"{key} is missing", fix)
    return v


def _nuclide_key(text: str) -> str:
    """``F18``, ``18F``, ``[18F]``, ``F-18``, ``^18^F`` -> ``F18`` (letters then mass number, upper case)."""
    s = re.sub(r"[^A-Za-z0-9]", "", text).upper()
    m = re.fullmatch(r"(\d+)([A-Z]+)", s)
    return m.group(2) + m.group(1) if m else s


def half_life_s(meta: dict) -> Optional[float]:
    """The half-life of the sidecar's ``TracerRadionuclide`` from :data:`HALF_LIFE_S`, or None if not known."""
    nuc = meta.get("TracerRadionuclide")
    return HALF_LIFE_S.get(_nuclide_key(nuc)) if isinstance(nuc, str) else None


def _activity_scale(units: Any) -> Optional[float]:
    """Bq per unit of ``InjectedRadioactivityUnits`` (micro as ``u``, ``µ`` or ``μ``), None when not one of
    :data:`_ACTIVITY_UNITS`."""
    if not isinstance(units, str):
        return None
    return _ACTIVITY_UNITS.get(units.strip().replace("\u00b5", "u").replace("\u03bc", "u").upper())


def _num(meta: dict, key: str) -> Optional[float]:
    v = meta.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _decay_code(meta: dict) -> Optional[str]:
    """The DICOM DecayCorrection term the sidecar's decay correction amounts to: ``ADMIN`` (to InjectionStart),
    ``START`` (to ScanStart), ``NONE`` (ImageDecayCorrected false); None when not stated or another time."""
    corrected = meta.get("ImageDecayCorrected")
    if corrected is False:
        return "NONE"
    at, inj, scan = (_num(meta, k) for k in ("ImageDecayCorrectionTime", "InjectionStart", "ScanStart"))
    if corrected is not True or at is None:
        return None
    if inj is not None and abs(at - inj) <= _SAME_TIME_S:
        return "ADMIN"
    if scan is not None and abs(at - scan) <= _SAME_TIME_S:
        return "START"
    return None


#: ``AttenuationCorrection`` texts that say none was applied, as :func:`_attenuation` reduces them (lower case,
#: runs of spaces, hyphens, underscores and stops made one space): "none", "No AC", "NAC", "non-attenuation-corrected",
#: "without attenuation correction", and "n/a" (a BIDS writer's word where there is no method to describe).
_NO_ATTENUATION = re.compile(r"none|no|n/?a|off|false|nac|uncorrected|not applied"
                             r"|(?:no|not|non|without) (?:attenuation )?(?:corrected|correction|applied|ac)")
#: A negation anywhere else ("CT-based, no scatter correction"): what the text says of attenuation is not guessed.
_NEGATION = re.compile(r"\b(?:no|not|non|none|without|nac|uncorrected)\b")


def _attenuation(meta: dict) -> Tuple[Optional[bool], Optional[str]]:
    """``(attenuation_corrected, attenuation_method)`` from the sidecar's ``AttenuationCorrection``.

    BIDS makes it a required short description of the method used, so a method described (``"CT-based"``) is
    True with its text; one of :data:`_NO_ATTENUATION` is False (no method); any other text with a negation in it
    is None (unknown) with its text, as it cannot be read for certain; absent, empty, not text, or holding a date
    (:func:`_text`), None and None. JSON true/false, though not BIDS, are taken as they say."""
    v = meta.get("AttenuationCorrection")
    if isinstance(v, bool):
        return v, None
    text = _text(v)
    if text is None:
        return None, None
    words = re.sub(r"[\s_.,;:-]+", " ", text.lower()).strip()
    if _NO_ATTENUATION.fullmatch(words):
        return False, None
    return (None if _NEGATION.search(words) else True), text


def pet_acquisition(meta: dict) -> Dict[str, Any]:
    """``provenance["pet_acquisition"]``: tracer, radionuclide, half-life (s), injected activity (MBq), uptake
    time (min, ScanStart - InjectionStart), decay correction (``ADMIN``/``START``/``NONE``) and attenuation
    correction (``attenuation_corrected`` True/False and ``attenuation_method``, :func:`_attenuation`), each None
    when the sidecar does not state it (or states it in a form medfuse does not read). No dates, no body size."""
    corrected, method = _attenuation(meta)
    act, units = _num(meta, "InjectedRadioactivity"), meta.get("InjectedRadioactivityUnits")
    scale = _activity_scale(units)
    inj, scan, half = _num(meta, "InjectionStart"), _num(meta, "ScanStart"), half_life_s(meta)
    uptake = scan - inj if inj is not None and scan is not None else None
    if uptake is not None and (uptake < 0 or (half is not None and uptake / half > _suv._MAX_HALF_LIVES)):
        uptake = None  # a scan before the injection, or a wrong time: not an uptake time (as for DICOM)
    return {"tracer": _text(meta.get("TracerName")), "radionuclide": _text(meta.get("TracerRadionuclide")),
            "half_life_s": half,
            "injected_mbq": act * scale / 1e6 if act is not None and act > 0 and scale is not None else None,
            "uptake_min": None if uptake is None else uptake / 60.0,
            "decay_correction": _decay_code(meta), "attenuation_corrected": corrected, "attenuation_method": method}


def _text(v: Any) -> Optional[str]:
    """Free text for provenance, or None: empty, or holding what looks like a date (an identifier, never kept)."""
    if not isinstance(v, str) or not v.strip() or re.search(r"\d{4}-?\d{2}-?\d{2}|\d{1,2}[./]\d{1,2}[./]\d{2,4}", v):
        return None
    return v.strip()


#: An arbitrary day: BIDS times are seconds from TimeZero, and only their differences enter SUV.
_DAY = datetime(2000, 1, 1, 12, 0, 0)


def suv_header(meta: dict, side_name: str) -> Dict[str, Any]:
    """The sidecar's SUV fields as the header dict :func:`medfuse.io.suv.suv_factor` takes.

    Raises:
        _Refused: a field is missing, of the wrong JSON type, or holds a value SUV cannot be made from; the
            problem names the field, the fix says what to write in ``side_name``.
    """
    fix_in = f"in {side_name}"
    weight = _need(meta, "BodyWeight", "number", f"add the patient's weight in kg as a number {fix_in} "
                                                  "(\"BodyWeight\": 70.5)")
    lo, hi = _suv.WEIGHT_RANGE_KG
    if not lo <= weight <= hi:
        raise _Refused(f"BodyWeight is outside the plausible {lo:g}-{hi:g} kg (grams instead of kilograms?)",
                       f"give the weight in kilograms {fix_in}")
    act = _need(meta, "InjectedRadioactivity", "number", f"add the injected activity {fix_in} "
                                                         "(\"InjectedRadioactivity\": 370, with "
                                                         "\"InjectedRadioactivityUnits\": \"MBq\")")
    units = _need(meta, "InjectedRadioactivityUnits", "text", f"add \"InjectedRadioactivityUnits\": \"MBq\" (or "
                                                              f"the unit InjectedRadioactivity is in) {fix_in}")
    scale = _activity_scale(units)
    if scale is None:
        raise _Refused(f"InjectedRadioactivityUnits is {units.strip()[:20]!r}, which medfuse does not convert",
                       f"give InjectedRadioactivity in MBq (BIDS's unit), kBq, Bq, GBq, mCi or uCi {fix_in}")
    dose = act * scale
    dlo, dhi = _suv.DOSE_RANGE_BQ
    if not dlo <= dose <= dhi:
        raise _Refused(f"InjectedRadioactivity is {act:g} {units.strip()}, outside the plausible {dlo / 1e6:g} MBq "
                       f"to {dhi / 1e9:g} GBq (a unit slip, e.g. Bq written where MBq is meant?)",
                       f"check InjectedRadioactivity and InjectedRadioactivityUnits {fix_in}")
    nuc = _need(meta, "TracerRadionuclide", "text", f"add the radionuclide {fix_in} (\"TracerRadionuclide\": "
                                                    "\"F18\")")
    half = half_life_s(meta)
    if half is None:
        raise _Refused(f"TracerRadionuclide {nuc.strip()[:20]!r} is not one whose half-life medfuse knows "
                       f"({', '.join(HALF_LIFE_S)})",
                       f"write it as one of those {fix_in}, or load with suv='none' to keep Bq/mL")
    corrected = _need(meta, "ImageDecayCorrected", "bool", f"state \"ImageDecayCorrected\": true or false {fix_in}")
    if not corrected:
        raise _Refused("ImageDecayCorrected is false: the image is not decay-corrected, so its values depend on "
                       "each frame's time and SUV would be meaningless",
                       "use a decay-corrected reconstruction, or load with suv='none' to keep Bq/mL")
    times_fix = f"give it in seconds relative to TimeZero {fix_in}"
    _need(meta, "ImageDecayCorrectionTime", "number", times_fix)  # its type; _decay_code compares it
    inj = _need(meta, "InjectionStart", "number", times_fix)
    scan = _need(meta, "ScanStart", "number", times_fix)
    code = _decay_code(meta)
    if code is None:
        raise _Refused("ImageDecayCorrectionTime is neither InjectionStart nor ScanStart: medfuse makes SUV from "
                       "images decay-corrected to the injection or to the scan start only",
                       f"check ImageDecayCorrectionTime {fix_in} (seconds relative to TimeZero, as InjectionStart "
                       "and ScanStart), or load with suv='none' to keep Bq/mL")
    if code == "START" and scan < inj:
        raise _Refused("ScanStart is before InjectionStart (a negative uptake time)",
                       f"check ScanStart and InjectionStart {fix_in} (seconds relative to TimeZero)")
    if code == "START" and (scan - inj) / half > _suv._MAX_HALF_LIVES:  # the same bound as for a DICOM PET
        raise _Refused(f"ScanStart is {(scan - inj) / half:.0f} half-lives ({(scan - inj) / 3600:.1f} h) after "
                       "InjectionStart: under 1/1000 of the dose would be left, which no PET scan images",
                       f"check ScanStart and InjectionStart {fix_in} (seconds relative to TimeZero)")
    if _attenuation(meta)[0] is False:
        raise _Refused("AttenuationCorrection says the image is not attenuation-corrected, so its values are not "
                       "quantitative and SUV would be meaningless",
                       "use an attenuation-corrected reconstruction, or load with suv='none' to keep Bq/mL")
    # A quantitative Bq/mL image is attenuation-corrected unless the sidecar says not (the field is free text).
    flags = ["DECY", "ATTN"]
    scan_t, inj_t = _DAY + timedelta(seconds=scan), _DAY + timedelta(seconds=inj)
    return {"Units": "BQML", "CorrectedImage": flags, "DecayCorrection": code, "RadionuclideHalfLife": half,
            "RadionuclideTotalDose": dose, "PatientWeight": float(weight),
            "SeriesDate": scan_t.strftime("%Y%m%d"), "SeriesTime": scan_t.strftime("%H%M%S.%f"),
            "RadiopharmaceuticalStartDateTime": inj_t.strftime("%Y%m%d%H%M%S.%f")}


def _bids_words(text: str) -> str:
    for dicom, bids in _BIDS_NAMES.items():
        text = text.replace(dicom, bids)
    return text


# ------------------------------------------------------------------------------------------ the loader's step
def apply_suv(arrays: List[np.ndarray], meta: dict, image: Path, *, unit: str,
              suv: str) -> Tuple[List[np.ndarray], str, Dict[str, Any]]:
    """SUVbw of a NIfTI PET's volumes from its sidecar, as the NIfTI reader applies it.

    Args:
        arrays: the file's volumes as read (Bq/mL when ``unit`` is).
        meta: the parsed sidecar (:func:`read_sidecar`).
        image: the NIfTI's path (for messages).
        unit: the unit the file and sidecar state; only ``Bq/mL`` is scaled (an image stored as SUV is kept).
        suv: as :func:`medfuse.load` takes it; ``"none"`` keeps Bq/mL, ``"lbm"``/``"lbm_janma"``/``"bsa"`` give
            SUVbw with a warning (a PET sidecar holds no height or sex).

    Returns:
        ``(arrays, unit, provenance facts)``: the facts hold ``pet_acquisition``, and when SUV was made ``suv``,
        ``suv_source`` and ``suv_factor``, or ``warnings`` saying why not.

    Warns:
        MedfuseWarning: the sidecar holds SUV fields but one is missing or wrong (named, with the fix); or a kind
            other than body weight was asked for.
    """
    facts: Dict[str, Any] = {"pet_acquisition": pet_acquisition(meta)}
    if unit != "Bq/mL" or suv == "none" or not any(k in meta for k in SUV_FIELDS):
        return arrays, unit, facts
    side = sidecar_path(image).name
    notes: List[str] = []
    try:
        header = suv_header(meta, side)
        factor = _suv.suv_factor(header, kind="bw")
    except _Refused as e:
        why, fix = e.problem, e.fix
    except SUVError as e:
        why, fix = _bids_words(e.problem), _bids_words(e.fix or "")
    else:
        why = fix = None
    if why is not None:
        msg = f"PET loaded in Bq/mL, not SUV: in its BIDS sidecar {side}, {why}" + (f". Fix: {fix}" if fix else "")
        _warn(image, msg)
        facts["warnings"] = [msg]
        return arrays, unit, facts
    if suv not in ("auto", "bw"):
        msg = (f"PET loaded in SUVbw (body-weight SUV), not {_suv.KIND_UNITS[suv]} as asked: a PET-BIDS sidecar "
               f"({side}) holds no patient height or sex; compare it only with PETs in SUVbw")
        _warn(image, msg)
        notes.append(msg)
    # Scaled in float64, kept float32 (as the DICOM reader's SUV) unless the file was float64.
    out = [(a.astype(np.float64) * factor).astype(a.dtype if a.dtype == np.float64 else np.float32) for a in arrays]
    facts.update(suv="bw", suv_source=f"BIDS sidecar {side} (BodyWeight, InjectedRadioactivity, TracerRadionuclide, "
                                     f"ImageDecayCorrectionTime): {_suv.factor_source(header, kind='bw')}",
                 suv_factor=float(factor))
    if notes:
        facts["warnings"] = notes
    return out, "SUVbw", facts
