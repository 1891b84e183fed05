"""PET standardised uptake value (SUV) scaling factors.

The rules follow the QIBA / cornerstone ``calculate-suv`` reference calculator:

* ``Units`` ``GML`` is already SUV of the SUVType's kind (BW when absent; factor 1), ``CM2ML`` SUVbsa; an
  SUVType medfuse has no kind for (IBW) is no SUV it knows (unit ``arbitrary``, never SUVbw);
  ``BQML`` is activity concentration;
  ``CNTS`` is Philips counts, scaled by the private SUV scale factor (7053,1000)
  or, failing that, the activity concentration scale factor (7053,1009).
* ``DecayCorrection`` ``ADMIN``: pixels are decay-corrected to injection, so the
  injected dose is used as is. ``START``: pixels are corrected to the scan start,
  so the dose is decayed from injection to the scan time.
* Injection time: RadiopharmaceuticalStartDateTime; when it is cut at the date or the hour (DICOM allows it), its
  date with RadiopharmaceuticalStartTime, refused when that does not give the minutes; when only
  RadiopharmaceuticalStartTime is
  given, on the day of the scan time, or on the day before when that time is 12 h or more after the scan
  time (injection before midnight, scan after it; less than that is an injection after the scan). That is
  refused for half-lives over 2.4 h (Tc-99m, Cu-64, Zr-89, I-124...: imaged up to days after injection, a
  day's error is not impossible, and not visible).
* Date-times with a UTC offset (e.g. RadiopharmaceuticalStartDateTime ``...+0000``) are moved
  into the series' TimezoneOffsetFromUTC when the header gives one; otherwise the offset is dropped.
* Scan time: the series date/time when it is not after the earliest acquisition
  date/time of the series; otherwise the GE private post-injection time when present (only under GE's
  private creator), else the earliest acquisition date/time.
* A scan before the injection is refused (``START``); a DYNAMIC series starting at most
  :data:`_FIRST_PASS_LEAD_S` before it is a first-pass protocol, and the reason says so instead of blaming the
  header (SUV is not defined before the injection: the series stays in Bq/mL, what kinetic models read).
* RadionuclideTotalDose outside :data:`DOSE_RANGE_BQ` (MBq typed as Bq) is refused like an implausible weight.
* PatientSize is metres (:data:`HEIGHT_RANGE_M`); a value that only makes sense in centimetres is read so, with a
  warning; any other is refused for the kinds that need a height. A weight and height whose body-mass index is
  outside :data:`BMI_RANGE` are refused (for SUVbw too when the index is too high: a weight in grams). A lean body
  mass above the body weight (infants: the formulas were fitted in adults) is capped at it, with a warning.

Weight, size and sex are needed for SUV but are never put in messages, logs or
provenance: errors name the *tag*, never its value (the injected dose, which identifies no one, is shown).
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ..errors import InvalidInputError, MedfuseWarning, SUVError

__all__ = ["header_from_dataset", "suv_factor", "series_suv_factors", "check_header", "suv_problem", "factor_source",
           "SUV_KINDS", "KIND_UNITS", "stored_unit", "counts_to_bq_ml", "DOSE_RANGE_BQ", "acquisition_facts",
           "ACQUISITION_KEYS", "WEIGHT_RANGE_KG", "HEIGHT_RANGE_M", "BMI_RANGE", "BODY_KEYS", "check_body"]

#: Accepted ``kind`` values and their medfuse unit.
KIND_UNITS = {"bw": "SUVbw", "lbm": "SUVlbm", "lbm_janma": "SUVlbm", "bsa": "SUVbsa"}
SUV_KINDS = tuple(KIND_UNITS)
# DICOM SUVType (0054,1006) -> the kind GML pixels already hold.
_STORED_KIND = {"BW": "bw", "LBM": "lbm", "BSA": "bsa"}
#: Units (0054,1001) of pixels that already are SUV (PS3.3 PET Series module, Units defined terms): GML g/ml
#: (SUVbw, SUVlbm; medfuse also reads SUVbsa stored as GML, as it wrote it before 2026-12), CM2ML cm²/ml (SUVbsa).
_SUV_UNITS = ("GML", "CM2ML")
#: Written by medfuse into DerivationDescription (0008,2111) of an SUVlbm series: SUVType has only LBM, not which
#: lean-body-mass formula, and converting the series to another SUV kind needs it (James and Janmahasatian differ by
#: about 3 % for a lean man, far more at a high BMI).
LBM_JANMA_NOTE = "SUVlbm lean body mass: Janmahasatian"
LBM_JAMES_NOTE = "SUVlbm lean body mass: James"


def _stored_kind(h: Dict[str, Any]) -> Optional[str]:
    """The SUV kind stored pixels hold (GML/CM2ML), ``lbm_janma`` when medfuse recorded Janmahasatian; None when
    the Units/SUVType pair names none medfuse can use (an SUVType such as IBW, or CM2ML with a weight SUVType)."""
    units = str(h.get("Units") or "").strip().upper()
    suv_type = str(h.get("SUVType") or "").strip().upper()
    if units == "CM2ML":  # cm²/ml is SUVbsa whatever else; a contradicting SUVType is not guessed away
        return "bsa" if suv_type in ("", "BSA") else None
    if units != "GML":
        return None
    kind = _STORED_KIND.get(suv_type or "BW")
    if kind == "lbm" and h.get("LBMFormula") == "janmahasatian":
        return "lbm_janma"
    return kind


def stored_unit(header: Dict[str, Any]) -> str:
    """The unit of the stored pixels (after rescale) as the header declares it.

    Args:
        header: one instance's header (:func:`header_from_dataset`).

    Returns:
        ``Bq/mL`` (BQML, or no Units), ``counts`` (CNTS), the SUV unit of a GML or CM2ML series, else
        ``arbitrary``.

    Raises:
        InvalidInputError: ``header`` is not a dict.
    """
    _check_headers([header])
    units = str(header.get("Units") or "").strip().upper()
    if units in _SUV_UNITS:
        # An SUVType medfuse has no kind for (IBW, ideal body weight) is not SUVbw: labelled so, it was saved
        # back as SUVType BW and became body-weight SUV for good.
        kind = _stored_kind(header)
        return KIND_UNITS[kind] if kind else "arbitrary"
    # Units is mandatory for PET; when an export drops it, Bq/mL is what scanners store.
    return {"BQML": "Bq/mL", "": "Bq/mL", "CNTS": "counts"}.get(units, "arbitrary")


def counts_to_bq_ml(header: Dict[str, Any]) -> Optional[float]:
    """The factor that turns a Philips CNTS instance's stored (rescaled) counts into Bq/mL: its activity
    concentration scale factor (7053,1009), the factor the SUV of such a series is made from.

    Args:
        header: one instance's header (:func:`header_from_dataset`).

    Returns:
        The factor, or None when Units is not CNTS or the factor is absent, not positive or not finite.

    Raises:
        InvalidInputError: ``header`` is not a dict.
    """
    _check_headers([header])
    if str(header.get("Units") or "").strip().upper() != "CNTS":
        return None
    acf = _philips(header, "ActivityConcentrationScaleFactor")
    return acf if acf is not None and acf > 0 else None

_FIX_TAGS = "the scanner export is incomplete; re-export the PET series with its full header, or load it with suv='none' to keep Bq/mL"

# Values that must be equal in every instance of one series.
_SERIES_KEYS = (
    "Units", "DecayCorrection", "RadionuclideHalfLife", "RadionuclideTotalDose",
    "RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime", "PatientWeight",
    "PatientSize", "PatientSex", "SeriesDate", "SeriesTime", "CorrectedImage",
)


# --------------------------------------------------------------------------- header extraction
def _value(ds: Any, keyword: str) -> Any:
    v = getattr(ds, keyword, None) if ds is not None else None
    if v is None or v == "":
        return None
    return v


def _private(ds: Any, group: int, creator: str, offset: int) -> Any:
    """A private element of ``creator``'s block, in whichever block the file reserved for it; None when absent.

    Only a block whose private creator is ``creator`` is read, never a fixed tag: (0009,100D) is GE's
    post-injection time under GEMS_PETD_01, and a Siemens file (creator "SIEMENS SYNGO") with a date there
    became the scan time SUV was decayed to.
    """
    try:
        for el in range(0x10, 0x100):
            elem = ds.get((group, el))
            if elem is None:
                continue
            name = elem.value.decode("ascii", "ignore") if isinstance(elem.value, bytes) else str(elem.value)
            if name.strip("\x00 ") == creator:
                value = ds.get((group, (el << 8) | offset))
                return None if value is None else value.value
    except Exception:  # noqa: BLE001 - a malformed private element: treat it as absent
        return None
    return None


def _as_float(v: Any) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("ascii", "ignore").strip("\x00 ")
    try:
        if isinstance(v, (list, tuple)) or (hasattr(v, "__len__") and not isinstance(v, str)):
            v = list(v)[0]
        return float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _code_meaning(seq: Any) -> Optional[str]:
    """CodeMeaning of a code sequence's first item; None when absent, empty or malformed."""
    try:
        return (str(seq[0].CodeMeaning).strip() or None) if seq else None
    except Exception:  # noqa: BLE001 - a malformed item: as absent, it only labels the tracer
        return None


def header_from_dataset(ds: Any) -> Dict[str, Any]:
    """Extract the SUV-relevant header values of one PET instance from a pydicom Dataset.

    Keys are named as in ``pet-suv-expected.json`` (``Units``, ``DecayCorrection``,
    ``RadionuclideHalfLife``, ``PatientWeight``, ``PhilipsSUVScaleFactor``, ...), plus the tracer's names for
    :func:`acquisition_facts`: ``Radiopharmaceutical`` (0018,0031), ``RadiopharmaceuticalCodeMeaning`` and
    ``RadionuclideCodeMeaning`` (the CodeMeaning of the RadiopharmaceuticalCodeSequence and RadionuclideCodeSequence).
    Absent values are left out.

    Args:
        ds: the instance's pydicom Dataset (pixels need not be read).

    Returns:
        The header as a dict.

    Raises:
        InvalidInputError: ``ds`` is not a pydicom Dataset (a path: read it with pydicom.dcmread first).
    """
    if not (type(ds).__module__.startswith("pydicom") and hasattr(ds, "data_element")):
        raise InvalidInputError(f"header_from_dataset takes a pydicom Dataset, got {type(ds).__name__}",
                                fix="read the file first: header_from_dataset(pydicom.dcmread(path))")
    h: Dict[str, Any] = {}
    for key in ("Units", "SUVType", "DecayCorrection", "PatientSex", "SeriesDate", "SeriesTime",
                "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "TimezoneOffsetFromUTC"):
        v = _value(ds, key)
        if v is not None:
            h[key] = str(v).strip()
    derivation = str(_value(ds, "DerivationDescription") or "")
    if LBM_JANMA_NOTE in derivation:  # medfuse's record of the LBM formula (see LBM_JANMA_NOTE)
        h["LBMFormula"] = "janmahasatian"
    elif LBM_JAMES_NOTE in derivation:
        h["LBMFormula"] = "james"
    ci = _value(ds, "CorrectedImage")
    if ci is not None:
        h["CorrectedImage"] = [str(x).strip() for x in (ci if not isinstance(ci, str) else ci.split("\\"))]
    st = _value(ds, "SeriesType")  # (0054,1000): STATIC, DYNAMIC, GATED, WHOLE BODY; then IMAGE/REPROJECTION
    if st is not None:
        h["SeriesType"] = str(st if isinstance(st, str) else st[0]).split("\\")[0].strip().upper()
    for key in ("PatientWeight", "PatientSize", "FrameReferenceTime", "ActualFrameDuration"):
        raw = _value(ds, key)
        f = _as_float(raw)
        if f is None and raw is not None and key == "PatientWeight":
            f = math.nan  # why: present but not a number; absent would be reported as "missing"
        if f is not None:
            h[key] = f
    seq = _value(ds, "RadiopharmaceuticalInformationSequence")
    if seq:
        item = seq[0]
        for key in ("RadionuclideHalfLife", "RadionuclideTotalDose"):
            f = _as_float(_value(item, key))
            if f is not None:
                h[key] = f
        for key in ("RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime", "Radiopharmaceutical"):
            v = _value(item, key)
            if v is not None:
                h[key] = str(v).strip()
        for seq_key, key in (("RadiopharmaceuticalCodeSequence", "RadiopharmaceuticalCodeMeaning"),
                             ("RadionuclideCodeSequence", "RadionuclideCodeMeaning")):
            meaning = _code_meaning(_value(item, seq_key))
            if meaning:
                h[key] = meaning
    sf = _as_float(_private(ds, 0x7053, "Philips PET Private Group", 0x00))
    if sf is not None:
        h["PhilipsSUVScaleFactor"] = sf
    acf = _as_float(_private(ds, 0x7053, "Philips PET Private Group", 0x09))
    if acf is not None:
        h["PhilipsActivityConcentrationScaleFactor"] = acf
    ge = _private(ds, 0x0009, "GEMS_PETD_01", 0x0D)  # post-injection (scan) date/time
    if ge is not None:
        h["GEPrivatePostInjectionDateTime"] = (ge.decode("ascii", "ignore") if isinstance(ge, bytes) else str(ge)).strip("\x00 ")
    return h


# --------------------------------------------------------------------------- date/time parsing
def _parse_time(t: str) -> timedelta:
    t = str(t).strip()
    main, _, frac = t.partition(".")
    main = main.replace(":", "")
    if not main.isdigit() or len(main) < 2:
        raise ValueError(t)
    hh = int(main[0:2])
    mm = int(main[2:4]) if len(main) >= 4 else 0
    ss = int(main[4:6]) if len(main) >= 6 else 0
    us = float("0." + frac) if frac.strip().isdigit() else 0.0
    return timedelta(hours=hh, minutes=mm, seconds=ss + us)


def _parse_date(d: str) -> datetime:
    d = str(d).strip().replace("-", "").replace(".", "")
    return datetime(int(d[0:4]), int(d[4:6]), int(d[6:8]))


def _offset(text: Any) -> Optional[timedelta]:
    """A DICOM UTC offset ``+hhmm``/``-hhmm`` as a timedelta; None when absent or malformed."""
    t = str(text or "").strip()
    if len(t) != 5 or t[0] not in "+-" or not t[1:].isdigit():
        return None
    d = timedelta(hours=int(t[1:3]), minutes=int(t[3:5]))
    return d if t[0] == "+" else -d


def _parse_dt(dt: str, local_offset: Any = None) -> datetime:
    """A DICOM DT as a naive datetime in the series' local time.

    A UTC offset (+hhmm/-hhmm) after the time part is dropped when the header gives no
    TimezoneOffsetFromUTC (all times of one series are then taken to share it); when it does, a
    DT written in another offset is moved into the series' offset (times such as SeriesTime
    carry no offset and are in TimezoneOffsetFromUTC).
    """
    s = str(dt).strip()
    own = None
    for sign in ("+", "-"):
        pos = s.rfind(sign)
        if pos >= 8:
            own = _offset(s[pos:])
            s = s[:pos]
    value = _parse_date(s[:8]) + (_parse_time(s[8:]) if len(s) > 8 else timedelta())
    local = _offset(local_offset)
    if own is not None and local is not None:
        value += local - own
    return value


def _datetime(h: Dict[str, Any], date_key: str, time_key: str, tag_for_error: str) -> datetime:
    try:
        return _parse_date(h[date_key]) + _parse_time(h[time_key])
    except KeyError as e:
        raise SUVError(f"the PET header lacks {e.args[0]}, needed for {tag_for_error}", fix=_FIX_TAGS) from None
    except (ValueError, IndexError):
        raise SUVError(f"the PET header's {date_key}/{time_key} is not a valid DICOM date/time", fix=_FIX_TAGS) from None


def _time_digits(text: Any) -> str:
    """The hhmmss digits of a DICOM TM (or of a DT's time part), without the fraction."""
    return str(text or "").strip().partition(".")[0].replace(":", "")


def _dt_time_digits(dt: str) -> str:
    """The time digits of a DICOM DT: "" for a date alone, "08" for one cut at the hour."""
    s = str(dt).strip()
    for sign in ("+", "-"):
        pos = s.rfind(sign)
        if pos >= 8:
            s = s[:pos]
    return _time_digits(s[8:])


def _injection_datetime(h: Dict[str, Any], scan: Optional[datetime] = None) -> datetime:
    dt = h.get("RadiopharmaceuticalStartDateTime")
    if dt:
        try:
            inj = _parse_dt(dt, h.get("TimezoneOffsetFromUTC"))
            cut = len(_dt_time_digits(dt)) < 4
        except (ValueError, IndexError):
            raise SUVError("RadiopharmaceuticalStartDateTime is not a valid DICOM date-time", fix=_FIX_TAGS) from None
        if not cut:
            return inj
        # DICOM allows a DT cut at the date or the hour (anonymisers do it). Read as exact, 20201217 was midnight,
        # hours before the real injection: SUV 25x too high on a real Siemens header, with no word.
        return _injection_time_on_date(h, dt, inj)
    t = h.get("RadiopharmaceuticalStartTime")
    if not t:
        raise SUVError(
            "the PET header lacks RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime "
            "(in RadiopharmaceuticalInformationSequence), so the injection time is unknown", fix=_FIX_TAGS)
    # Time only: the day is inferred below, which holds only when an injection a day or more earlier would leave
    # under 1/1000 of the dose (more than _MAX_HALF_LIVES half-lives in 24 h: half-lives up to 2.4 h, F-18, Ga-68,
    # C-11, Rb-82). Longer-lived tracers (Tc-99m, Cu-64, Zr-89, I-124) are imaged up to days after injection, and
    # each day wrongly assumed changes the factor by 2 ** (24 h / half-life), 24 % for Zr-89, with no way to see it.
    half_life = _number(h, "RadionuclideHalfLife")
    if half_life is not None and math.isfinite(half_life) and half_life > _DAY_S / _MAX_HALF_LIVES:
        raise SUVError(
            "the PET header gives the injection time (RadiopharmaceuticalStartTime) but not its date, and with "
            f"this tracer's half-life (RadionuclideHalfLife, {half_life / 3600:.1f} h) the scan may be days after "
            f"the injection: each day assumed wrongly would change SUV by a factor of "
            f"{2.0 ** (_DAY_S / half_life):.2f}, so the injection day cannot be inferred (a header with "
            "RadiopharmaceuticalStartDateTime, the injection's date and time, gives it)",
            fix="re-export the series with RadiopharmaceuticalStartDateTime (the injection date and time, in "
                "RadiopharmaceuticalInformationSequence), or load it with suv='none' to keep Bq/mL")
    # Time only: the reference calculator takes the series date (injection on the scan day). We
    # take the date of the scan time itself, which is the series date unless the series was
    # re-created later (then the scan time is the earliest acquisition).
    if scan is not None:
        try:
            inj = datetime(scan.year, scan.month, scan.day) + _parse_time(t)
        except (ValueError, IndexError):
            raise SUVError("RadiopharmaceuticalStartTime is not a valid DICOM time", fix=_FIX_TAGS) from None
    else:
        inj = _datetime({**h, "RadiopharmaceuticalStartTime": t}, "SeriesDate", "RadiopharmaceuticalStartTime",
                        "the injection date")
    if scan is not None and inj - scan >= _DAY_BEFORE_AFTER:
        # Injected before midnight, scanned after it: with no injection date, the injection
        # was on the day before the scan (uptake times are far shorter than a day).
        inj -= timedelta(days=1)
    return inj


def _injection_time_on_date(h: Dict[str, Any], dt: str, local: datetime) -> datetime:
    """The injection on a RadiopharmaceuticalStartDateTime cut at the date or the hour, timed by
    RadiopharmaceuticalStartTime when that gives the minutes; refused when nothing does.

    ``local``: the DT read in the series' UTC offset (:func:`_parse_dt`). A TM such as the start time is in that
    offset, so an hour is compared (and a date taken) as moved there; a date alone carries no hour to move."""
    given = _dt_time_digits(dt)
    t = h.get("RadiopharmaceuticalStartTime")
    digits = _time_digits(t)
    if len(digits) < 4 or not digits.isdigit():
        raise SUVError(
            "the PET header's RadiopharmaceuticalStartDateTime gives the injection's "
            f"{'date' if not given else 'date and hour'} but not its minutes, and no RadiopharmaceuticalStartTime "
            "gives them: SUV would be off by up to "
            f"{'a day' if not given else 'an hour'} of decay", fix=_FIX_TAGS)
    try:
        tm = _parse_time(t)
    except (ValueError, IndexError):
        raise SUVError("RadiopharmaceuticalStartTime is not a valid DICOM time", fix=_FIX_TAGS) from None
    if not given:
        return _parse_date(str(dt).strip()[:8]) + tm
    # The hour the DT gives, moved into the series' offset, spans [local, local + 1 h): at :30 for an offset of
    # half an hour, and past midnight for an hour of 23 moved forward.
    day = datetime(local.year, local.month, local.day)
    for inj in (day + tm, day + timedelta(days=1) + tm, day - timedelta(days=1) + tm):
        if local <= inj < local + timedelta(hours=1):
            return inj
    raise SUVError(
        "the PET header's RadiopharmaceuticalStartDateTime (cut at the hour) and RadiopharmaceuticalStartTime "
        "give different injection hours", fix=_FIX_TAGS)


#: A time-only injection this much or more after the scan's time of day is dated the day before (23:30 and a scan
#: at 00:30: 23 h, so 1 h of uptake); one less than this after it is on the scan day, the nearer of the two, and is
#: refused as an injection after the scan. Why: 30 s after a 10:00:00 scan start (a dynamic series started before
#: the injection, or a clock off) was moved a day back and reported as "13 half-lives (24.0 h) after the
#: injection", where the same header with a date said the scan is before the injection.
_DAY_BEFORE_AFTER = timedelta(hours=12)


def _scan_datetime(headers: Sequence[Dict[str, Any]]) -> datetime:
    h0 = headers[0]
    series = _datetime(h0, "SeriesDate", "SeriesTime", "the scan time")
    acq: List[datetime] = []
    for h in headers:
        if h.get("AcquisitionDateTime"):
            try:
                acq.append(_parse_dt(h["AcquisitionDateTime"], h.get("TimezoneOffsetFromUTC")))
                continue
            except (ValueError, IndexError):
                pass
        if h.get("AcquisitionDate") and h.get("AcquisitionTime"):
            acq.append(_datetime(h, "AcquisitionDate", "AcquisitionTime", "the scan time"))
    if not acq:
        return series
    earliest = min(acq)
    if series <= earliest:
        return series
    # Series time after the acquisition: the series was re-created (e.g. post-processing).
    ge = h0.get("GEPrivatePostInjectionDateTime")
    if ge:
        try:
            return _parse_dt(ge, h0.get("TimezoneOffsetFromUTC"))
        except (ValueError, IndexError):
            pass
    return earliest


# --------------------------------------------------------------------------- checks and factors
def _number(h: Dict[str, Any], key: str) -> Optional[float]:
    v = h.get(key)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _philips(h: Dict[str, Any], name: str) -> Optional[float]:
    v = _number(h, "Philips" + name)
    if v is None:
        v = _as_float((h.get("PhilipsPETPrivateGroup") or {}).get(name))
    # Not finite: as absent (an infinite factor passed "> 0" and gave an all-infinite SUV volume).
    return v if v is not None and math.isfinite(v) else None


#: Plausible PatientWeight (kg). Why these bounds: they hold every human weight on record (the heaviest adult,
#: about 635 kg) and the animals of preclinical PET (a mouse, 0.015-0.04 kg; 0.25 kg, the lightest newborn, refused
#: every mouse, whose PET then loaded in Bq/mL), while the usual header mistakes fall outside: a human's grams
#: entered as kilograms (70000), a bool or a placeholder such as 9999.
WEIGHT_RANGE_KG = (0.01, 650.0)


def _weight(h: Dict[str, Any], why: str) -> float:
    """PatientWeight in kg, checked; ``why`` says what it is needed for (end of the message).

    The value is never put in the message (a free-text header field may hold a name).

    Raises:
        SUVError: missing, not a number (a bool, text, NaN), not finite, zero, negative, or outside
            :data:`WEIGHT_RANGE_KG`.
    """
    fix = "enter the patient's weight in kg in the PET header (PatientWeight), or load with suv='none'"
    v = h.get("PatientWeight")
    if v is None or (isinstance(v, (str, bytes)) and not v.strip()):
        raise SUVError(f"PatientWeight is missing, {why}", fix=fix)
    # Why: float(True) is 1.0, and a string such as "70 kg" or a name is not a weight; say so, not "missing".
    w = None if isinstance(v, bool) else _number(h, "PatientWeight")
    if w is None or math.isnan(w):
        raise SUVError(f"PatientWeight is not a number, {why}", fix=fix)
    if not math.isfinite(w):
        raise SUVError(f"PatientWeight is infinite, {why}", fix=fix)
    if w == 0:
        raise SUVError(f"PatientWeight is zero, {why}", fix=fix)
    if w < 0:
        raise SUVError(f"PatientWeight is negative, {why}", fix=fix)
    lo, hi = WEIGHT_RANGE_KG
    if not lo <= w <= hi:
        raise SUVError(f"PatientWeight is outside the plausible {lo:g}-{hi:g} kg (grams instead of kilograms, or a "
                       f"placeholder?), {why}", fix=fix)
    return w


#: Plausible PatientSize (m; DICOM's unit). Why these bounds: 2.72 m is the tallest height on record (Robert
#: Wadlow), and a live-born infant of 22 weeks' gestation, the youngest on growth charts (Fenton & Kim 2013, BMC
#: Pediatr 13:59), is about 0.27 m long. A value that only makes sense in centimetres (20-275) is read as such, with a
#: warning; anything else (520: a neonate's 52 cm in millimetres, read as 5.2 m before 2026-12; 5.2: a metres typo)
#: is refused for the kinds that need a height.
HEIGHT_RANGE_M = (0.2, 2.75)
#: Plausible body-mass index PatientWeight / PatientSize² (kg/m²). Why these bounds: a term neonate's is about 12-14,
#: a 24-week preterm infant's about 7 (0.65 kg, 0.31 m on Fenton & Kim 2013) and a growth-restricted one's down to
#: about 4, the lowest in anorexia nervosa about 7; the heaviest patient on record (about 635 kg at 1.85 m) about
#: 186, as :data:`WEIGHT_RANGE_KG` holds every weight on record. Outside fall a premature infant's weight in grams
#: (600 g at 0.30 m reads as 6667) and a height the weight cannot belong to (an adult's 1.75 m with a 3.2 kg baby's
#: weight: 1.0). Not a narrower 8-80: it refused premature infants (0.9 kg at 0.36 m: 6.9).
BMI_RANGE = (3.0, 200.0)


def _plausible_height(h: Dict[str, Any]) -> Optional[float]:
    """PatientSize in metres when it is one (:data:`HEIGHT_RANGE_M`) or plausible read as centimetres; else None."""
    size = _number(h, "PatientSize")
    if size is None or not math.isfinite(size):
        return None
    lo, hi = HEIGHT_RANGE_M
    if lo <= size <= hi:
        return size
    return size / 100.0 if lo * 100.0 <= size <= hi * 100.0 else None


def _height(h: Dict[str, Any], kind: str, said: List[str]) -> float:
    """PatientSize in metres, checked, for SUV``kind``; a value read as centimetres is said in ``said``.

    Raises:
        SUVError: missing, not positive, or neither a height in metres nor one in centimetres
            (:data:`HEIGHT_RANGE_M`). The problem starts with "PatientSize": the DICOM loader then falls back to
            SUVbw, as for a missing height.
    """
    size = _number(h, "PatientSize")
    if size is None or not math.isfinite(size) or size <= 0:
        raise SUVError(f"PatientSize is missing or zero, needed for SUV{kind}",
                       fix="enter the patient's height (PatientSize, m), or use SUVbw")
    m = _plausible_height(h)
    lo, hi = HEIGHT_RANGE_M
    if m is None:
        raise SUVError(f"PatientSize is outside the plausible {lo:g}-{hi:g} m of a height in metres (DICOM's unit) "
                       f"and the {lo * 100:g}-{hi * 100:g} read as centimetres (millimetres, or a typing slip?), "
                       f"needed for SUV{kind}",
                       fix="enter the patient's height in metres in PatientSize (52 cm is 0.52), or use SUVbw")
    if m != size:
        said.append(f"PatientSize is over {hi:g}, which no height in metres (DICOM's unit) is: it was read as "
                    f"centimetres for SUV{kind}; enter it in metres (52 cm is 0.52) to be sure of it")
    return m


def _check_bmi(w: float, height_m: float, kind: str) -> None:
    """Refuse a weight and height that give an implausible body-mass index (:data:`BMI_RANGE`).

    The message names the tags, never their values (nor the BMI, which is made of them).

    Raises:
        SUVError: outside :data:`BMI_RANGE`. Its problem starts with "PatientWeight": a weight in grams would make
            SUVbw as wrong as the SUV asked for, so the loader does not fall back to it.
    """
    lo, hi = BMI_RANGE
    bmi = w / height_m ** 2
    if lo <= bmi <= hi:
        return
    why = ("above any patient's on record: PatientWeight in grams instead of kilograms (a premature infant's "
           "grams pass the weight's own 0.01-650 kg check), or PatientSize too small?" if bmi > hi else
           "below any patient's: PatientSize in the wrong unit, or a weight and height of different patients?")
    raise SUVError(f"PatientWeight and PatientSize give a body-mass index (weight / height²) {why} "
                   f"(plausible: {lo:g}-{hi:g} kg/m²), needed for SUV{kind}",
                   fix="correct PatientWeight (kg) and PatientSize (m) in the PET header, or give them with "
                       "medfuse.load(path, body={'weight_kg': ..., 'height_m': ...}), or load with suv='none'")


#: The keys of ``body=`` (:func:`check_body`) and the header tags they stand in for.
BODY_KEYS = {"weight_kg": "PatientWeight", "height_m": "PatientSize", "sex": "PatientSex"}
_BODY_FIX = ("pass body={'weight_kg': 3.2, 'height_m': 0.52, 'sex': 'M'} (any of the three; kilograms, metres, "
             "'M' or 'F'), or leave body out to use the PET header's")


def check_body(body: Any) -> Optional[Dict[str, Any]]:
    """``body=`` of :func:`medfuse.load` checked: the patient's weight, height and sex given in place of the header's.

    The values are never put in a message (they are the patient's).

    Args:
        body: None, or a dict with any of :data:`BODY_KEYS`: ``weight_kg`` (a number within
            :data:`WEIGHT_RANGE_KG`), ``height_m`` (a number within :data:`HEIGHT_RANGE_M`: metres, not read as
            centimetres as a header's may be), ``sex`` (``"M"`` or ``"F"``).

    Returns:
        None for None; otherwise the values as header tags (``PatientWeight``, ``PatientSize``, ``PatientSex``).

    Raises:
        InvalidInputError: not a dict, empty, an unknown key, or a value of the wrong type or out of range.
    """
    if body is None:
        return None
    if not isinstance(body, Mapping):
        raise InvalidInputError(f"body must be a dict, got {type(body).__name__}", fix=_BODY_FIX)
    unknown = sorted(str(k) for k in body if k not in BODY_KEYS)
    if unknown or not body:
        raise InvalidInputError(f"body has {'the unknown key(s) ' + ', '.join(map(repr, unknown)) if unknown else 'no key'}"
                                f"; it takes {', '.join(map(repr, BODY_KEYS))}", fix=_BODY_FIX)
    tags: Dict[str, Any] = {}
    for key, (lo, hi, unit) in (("weight_kg", (*WEIGHT_RANGE_KG, "kg")), ("height_m", (*HEIGHT_RANGE_M, "m"))):
        if key not in body:
            continue
        v = body[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise InvalidInputError(f"body['{key}'] must be a finite number, got {type(v).__name__}", fix=_BODY_FIX)
        if not lo <= float(v) <= hi:
            raise InvalidInputError(f"body['{key}'] is outside the plausible {lo:g}-{hi:g} {unit}"
                                    + (" (centimetres? give metres: 0.52 for 52 cm)" if key == "height_m" else
                                       " (grams? give kilograms: 0.6 for 600 g)"), fix=_BODY_FIX)
        tags[BODY_KEYS[key]] = float(v)
    if "sex" in body:
        sex = body["sex"]
        if not isinstance(sex, str) or sex.strip().upper() not in ("M", "F"):
            raise InvalidInputError("body['sex'] must be 'M' or 'F'", fix=_BODY_FIX)
        tags["PatientSex"] = sex.strip().upper()
    return tags


def with_body(header: Dict[str, Any], body: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``header`` with the tags of ``body`` in place of its own.

    Args:
        header: one instance's header (:func:`header_from_dataset`).
        body: :func:`check_body`'s result, or None.

    Returns:
        A new dict; ``header`` itself when ``body`` is None or empty.
    """
    return header if not body else {**header, **body}


def body_note(body: Optional[Dict[str, Any]]) -> str:
    """What ``provenance["suv_source"]`` adds when ``body=`` was given: the tags replaced, never their values.

    Args:
        body: :func:`check_body`'s result, or None.

    Returns:
        ``"; body= gave weight_kg in place of the header's PatientWeight"`` and the like; ``""`` for None.
    """
    if not body:
        return ""
    given = [k for k, tag in BODY_KEYS.items() if tag in body]
    return (f"; body= gave {', '.join(given)} in place of the header's "
            f"{', '.join(BODY_KEYS[k] for k in given)}")


def check_header(header: Dict[str, Any]) -> None:
    """Raise :class:`SUVError` naming the first missing or invalid tag; return None when SUV can be computed.

    Args:
        header: one instance's header (:func:`header_from_dataset`).

    Raises:
        SUVError: naming the first missing or invalid tag, with a fix.
        InvalidInputError: ``header`` is not a dict.
    """
    _check_headers([header])
    ci = header.get("CorrectedImage")
    flags = [str(x).strip().upper() for x in (ci.split("\\") if isinstance(ci, str) else (ci or []))]
    missing = [f for f in ("ATTN", "DECY") if f not in flags]
    if missing:
        raise SUVError(
            f"CorrectedImage lacks {' and '.join(missing)}: the PET was not "
            + ("attenuation" if missing == ["ATTN"] else "decay" if missing == ["DECY"] else "attenuation- or decay")
            + "-corrected, so SUV would be meaningless",
            fix="use the attenuation- and decay-corrected PET series (CorrectedImage must contain ATTN and DECY), "
                "or load it with suv='none'",
        )
    units = str(header.get("Units") or "").strip().upper()
    if units not in ("BQML", "CNTS") + _SUV_UNITS:
        raise SUVError(
            f"Units is {units or 'missing'}; SUV needs BQML, CNTS (Philips), GML or CM2ML",
            fix="use a quantitative PET reconstruction, or load it with suv='none'",
        )
    if units in _SUV_UNITS:
        return
    _weight(header, "so SUV cannot be computed")
    if units == "CNTS":
        sf = _philips(header, "SUVScaleFactor")
        acf = _philips(header, "ActivityConcentrationScaleFactor")
        if not ((sf and sf > 0) or (acf and acf > 0)):
            raise SUVError(
                "Units is CNTS but neither the Philips SUV scale factor (7053,1000) nor the activity "
                "concentration scale factor (7053,1009) is valid (a positive, finite number)",
                fix="export the series with Philips' private PET group, or as BQML; or load with suv='none'")
        if sf and sf > 0:
            return
    dc = str(header.get("DecayCorrection") or "").strip().upper()
    if dc not in ("ADMIN", "START"):
        raise SUVError(f"DecayCorrection is {dc or 'missing'}; SUV needs ADMIN or START",
                       fix="use a decay-corrected PET series, or load with suv='none'")
    for key in ("RadionuclideTotalDose", "RadionuclideHalfLife"):
        v = _number(header, key)
        if v is None or not math.isfinite(v) or v <= 0:
            raise SUVError(f"{key} (RadiopharmaceuticalInformationSequence) is missing or not positive",
                           fix=_FIX_TAGS)
    _check_dose(float(header["RadionuclideTotalDose"]))


#: Plausible RadionuclideTotalDose (Bq). Why these bounds: clinical FDG is 100-800 MBq (children down to about
#: 15-26 MBq), Zr-89 and I-124 antibody/thyroid PET about 37-75 MBq, Rb-82 and O-15 water up to about 2 GBq,
#: Y-90 microsphere PET a few GBq (up to about 20 GBq); small-animal PET a few MBq. Outside fall the usual entry
#: mistakes: MBq typed as Bq (370 for 3.7e8 gave SUVbw 1e6 times too large, max 221069, without a word) and mCi
#: typed as Bq (10).
DOSE_RANGE_BQ = (1e5, 5e10)


def _check_dose(dose: float) -> None:
    """Refuse an implausible injected dose (see :data:`DOSE_RANGE_BQ`).

    The dose is shown: it identifies no one, and seeing 370 says at once that it is in MBq.

    Raises:
        SUVError: outside :data:`DOSE_RANGE_BQ`.
    """
    lo, hi = DOSE_RANGE_BQ
    if not lo <= dose <= hi:
        # The likely slip differs by side: a unit too large typed as Bq (MBq, mCi) below, an extra digit above.
        why = ("megabecquerels or millicuries entered as becquerels? 370 MBq is 370000000 Bq" if dose < lo else
               "more than any diagnostic or therapy dose: a typing slip, or kBq entered as Bq?")
        raise SUVError(
            f"RadionuclideTotalDose (RadiopharmaceuticalInformationSequence) is {dose:g} Bq, outside the plausible "
            f"{lo / 1e6:g} MBq to {hi / 1e9:g} GBq ({why}), so SUV cannot be computed",
            fix="enter the injected dose in becquerels in RadionuclideTotalDose (370 MBq is 370000000; 10 mCi is "
                "370000000), or load with suv='none' to keep Bq/mL")


#: James's lean body mass a·W − b·(W/H)² (W kg, H cm) by PatientSex: (a, b), as in the reference calculator.
_JAMES = {"M": (1.10, 120.0), "F": (1.07, 148.0)}


def _body_ratio(h: Dict[str, Any], kind: str, said: List[str], *, undo: bool = False) -> float:
    """The SUV normaliser in grams (bw, lbm) or cm² (bsa) for this patient; what is to be warned goes to ``said``.

    ``undo``: the normaliser a scanner already applied (a stored SUVlbm being converted): James's formula is then
    taken as the scanner took it, past its peak too (it is exact to invert), as long as it stays positive.
    """
    w = _weight(h, f"needed for SUV{kind}")
    if kind == "bw":
        # A height is not needed, but when a plausible one is given, a weight in grams shows as a BMI no one has
        # (600 g as 600 kg: SUVbw 1000 times too large). A low BMI is not refused here: the height would be wrong.
        height = _plausible_height(h)
        if height is not None and w / height ** 2 > BMI_RANGE[1]:
            _check_bmi(w, height, kind)
        return w * 1000.0
    size = _height(h, kind, said)
    _check_bmi(w, size, kind)  # before the formulas: James's "use lbm_janma" is no advice for a height in error
    if kind == "bsa":  # Du Bois, m² -> cm²
        return 0.007184 * w ** 0.425 * (size * 100.0) ** 0.725 * 1e4
    sex = str(h.get("PatientSex") or "").strip().upper()
    if sex not in ("M", "F"):
        raise SUVError(f"PatientSex is missing or not M/F, needed for SUV{kind}",
                       fix="enter the patient's sex (PatientSex), or use SUVbw")
    if kind == "lbm":  # James, as in the reference calculator
        hcm = size * 100.0
        a, b = _JAMES[sex]
        # James's LBM a·W − b·(W/H)² peaks at W = a·H²/(2b) and falls beyond it, to zero and below (a
        # negative SUVlbm, or a division by zero): the formula does not hold there, so it is refused. The
        # message names the threshold (a BMI), never the patient's values.
        lbm = a * w - b * (w / hcm) ** 2
        if (w > a * hcm ** 2 / (2.0 * b) and not undo) or lbm <= 0:
            raise SUVError(
                f"James's lean-body-mass formula (SUV{kind}) does not hold for this patient: for PatientSex {sex} "
                f"it peaks at a body-mass index (PatientWeight / PatientSize²) of {a / (2.0 * b) * 1e4:.1f} kg/m² "
                "and falls for heavier patients, to zero and below, and this patient's is above that; "
                "Janmahasatian's (suv='lbm_janma') holds at any BMI",
                fix="use suv='lbm_janma' (Janmahasatian's lean body mass, which holds at any BMI) or suv='bw'")
        formula, below = "James's", (a - 1.0) / b * 1e4  # a·W − b·(W/H)² > W below this BMI
    else:  # lbm_janma: Janmahasatian
        bmi = w / size ** 2
        lbm = 9270.0 * w / (6680.0 + 216.0 * bmi) if sex == "M" else 9270.0 * w / (8780.0 + 244.0 * bmi)
        formula = "Janmahasatian's"
        below = (9270.0 - 6680.0) / 216.0 if sex == "M" else (9270.0 - 8780.0) / 244.0
    if lbm > w:
        # Lean mass cannot exceed body mass; both formulas were fitted in adults, and give more than the weight at
        # an infant's BMI. Capped (undone the same way, so medfuse's SUVlbm converts back exactly).
        said.append(f"{formula} lean body mass exceeds the body weight at a body-mass index under {below:.1f} "
                    f"kg/m² (PatientSex {sex}), as this patient's is: it was capped at the body weight, so SUV{kind} "
                    "equals SUVbw. The lean-body-mass formulas were derived in adults (James 1976; Janmahasatian "
                    "et al. 2005: 373 adults aged 18-82, BMI 17-70) and do not hold for infants and small children")
        lbm = w
    return lbm * 1000.0


#: DICOM SUVType (0054,1006) defined terms, in words (PS3.3 C.8.9.1.1.4).
_SUV_TYPE_WORDS = {"BW": "body weight", "LBM": "lean body mass", "BSA": "body surface area",
                   "IBW": "ideal body weight"}


def _unknown_stored_kind(h: Dict[str, Any], units: str) -> str:
    """Why a GML/CM2ML series' SUVType gives no SUV kind medfuse knows (the problem of its SUVError)."""
    suv_type = str(h.get("SUVType") or "").strip().upper()
    if units == "CM2ML":
        return (f"SUVType is {suv_type!r} with Units CM2ML: cm²/ml is the unit of SUVbsa, and an SUVType that "
                "contradicts it is not guessed away, so the values are not taken as any SUV")
    words = _SUV_TYPE_WORDS.get(suv_type)
    return (f"SUVType is {suv_type!r}{f' ({words})' if words else ''} with Units GML: the values are an SUV "
            f"normalised by {'that' if words else 'something'}, not by body weight, so they are not SUVbw, and medfuse "
            "cannot convert them to an SUV it knows (bw, lbm, bsa)")


def _factor(h: Dict[str, Any], kind: str, scan: Optional[datetime], said: List[str]) -> float:
    if kind not in KIND_UNITS:
        raise SUVError(f"unknown SUV kind {kind!r}", fix=f"use one of {', '.join(SUV_KINDS)}")
    check_header(h)
    units = str(h["Units"]).strip().upper()
    if units in _SUV_UNITS:
        # GML/CM2ML pixels are already SUV, of the kind SUVType names (BW when absent; CM2ML is BSA).
        stored = _stored_kind(h)
        if stored is None:
            raise SUVError(_unknown_stored_kind(h, units), fix="load it with suv='none' to keep the stored values")
        if kind == stored:
            return 1.0
        try:
            _weight(h, f"needed to turn {units} into SUV{kind}")
            return _body_ratio(h, kind, said) / _body_ratio(h, stored, said, undo=True)
        except SUVError as e:  # said as a conversion: "needed for SUVlbm" read as if SUV could not be had at all
            have, want = KIND_UNITS[stored], KIND_UNITS[kind]
            problem = e.problem.replace(f"needed for SUV{stored}", f"needed to convert {have} to {want}")
            problem = problem.replace(f"needed for SUV{kind}", f"needed to convert {have} to {want}")
            fix = re.sub(r",? or (use SUVbw|load with suv='none')$", "", e.fix or "").rstrip(".")
            raise SUVError(problem,
                           fix=(fix + " to convert it, or " if fix else "") + f"keep the stored {have} "
                               f"(suv='auto')") from None
    if units == "CNTS":
        sf = _philips(h, "SUVScaleFactor")
        if sf and sf > 0:
            return sf if kind == "bw" else sf * _body_ratio(h, kind, said) / _body_ratio(h, "bw", said)
        acf = _philips(h, "ActivityConcentrationScaleFactor")
    else:
        acf = 1.0
    dose = float(h["RadionuclideTotalDose"])
    if str(h["DecayCorrection"]).strip().upper() == "START":
        t = scan if scan is not None else _scan_datetime([h])
        inj = _injection_datetime(h, t)
        dt = (t - inj).total_seconds()
        if dt < 0:
            given = ("RadiopharmaceuticalStartDateTime" if str(h.get("RadiopharmaceuticalStartDateTime") or "").strip()
                     else "RadiopharmaceuticalStartTime")
            if str(h.get("SeriesType") or "").strip().upper() == "DYNAMIC" and -dt <= _FIRST_PASS_LEAD_S:
                # Why not SUV decayed to the injection: the header is right, and the early frames hold no tracer
                # per injected dose yet; a first-pass study is quantified in Bq/mL (blood flow), not SUV.
                raise SUVError(f"this dynamic series (SeriesType DYNAMIC) starts {round(-dt, 1):g} s before the "
                               f"injection ({given}), as a first-pass protocol does (the acquisition is started "
                               "before the bolus so that its arrival is recorded); SUV is not defined before the "
                               "injection, so the series is kept in Bq/mL, which kinetic models read",
                               fix="none needed for a first-pass study (load it with suv='none' to keep Bq/mL "
                                   "without this warning); if the injection did not follow the scan start, check "
                                   f"SeriesTime/AcquisitionTime and {given} in the header")
            raise SUVError("the scan time is before the injection time (negative decay time)",
                           fix=f"check SeriesTime/AcquisitionTime and {given} in the header, or load with "
                               "suv='none' to keep Bq/mL")
        half_lives = dt / float(h["RadionuclideHalfLife"])
        if half_lives > _MAX_HALF_LIVES:
            # A wrong injection date (a day typo, a default date) gave factors of 1e7 to 1e43 without a word.
            raise SUVError(f"the scan is {half_lives:.0f} half-lives ({dt / 3600:.1f} h) after the injection: the "
                           "activity left would be under 1/1000 of the dose, which no PET scan images",
                           fix="check RadiopharmaceuticalStartDateTime (its date) and the series time in the header, "
                               "or load it with suv='none' to keep Bq/mL")
        dose = dose * math.exp(-math.log(2.0) * half_lives)
    return float(acf) * _body_ratio(h, kind, said) / dose


#: Seconds a DYNAMIC series may start before the injection and be told apart as a first-pass protocol, not a
#: header error: the list-mode acquisition is started before the bolus (Rb-82 infusion, N-13 ammonia, O-15 water,
#: dynamic FDG) so that its arrival is recorded, the injection following within seconds to a minute; 2 min leaves
#: room for a slow manual injection, while a header error is off by hours (a wrong hour or time zone) or days. A
#: fixed limit, not a half-life: one of F-18's (110 min) would take any wrong hour for a protocol.
_FIRST_PASS_LEAD_S = 120.0
#: More half-lives than this between injection and scan (decay to under 1/1000 of the dose) is a wrong date in
#: the header, not a scan: FDG is imaged at 0.5 to 2 half-lives, Zr-89 at up to about 2.
_MAX_HALF_LIVES = 10.0
#: Seconds in a day: a RadiopharmaceuticalStartTime without a date may be off by whole days.
_DAY_S = 86400.0


def _said(said: List[str], notes: Optional[List[str]]) -> None:
    """Each of ``said`` once: appended to ``notes`` when given, else warned (a :class:`MedfuseWarning`)."""
    for msg in dict.fromkeys(said):
        if notes is not None:
            notes.append(msg)
        else:
            warnings.warn(msg, MedfuseWarning, stacklevel=3)


def suv_factor(header: Dict[str, Any], *, kind: str = "bw", notes: Optional[List[str]] = None) -> float:
    """SUV scaling factor of one PET instance: stored (rescaled) pixel × factor = SUV.

    Args:
        header: values as returned by :func:`header_from_dataset` (weight kg, size m, dose Bq, half-life s).
        kind: ``"bw"`` (body weight), ``"lbm"`` (James), ``"lbm_janma"`` (Janmahasatian) or ``"bsa"`` (Du Bois).
        notes: when given, what would be warned (a PatientSize read as centimetres, a lean body mass capped at the
            body weight) is appended to it instead.

    Returns:
        The factor (g/Bq for SUVbw and SUVlbm, cm²/Bq for SUVbsa, times the stored unit's scale).

    Raises:
        SUVError: naming the missing or invalid tag (or an unknown ``kind``), with a fix.
        InvalidInputError: ``header`` is not a dict.
    """
    _check_headers([header])
    said: List[str] = []
    factor = _factor(header, kind, None, said)
    _said(said, notes)
    return factor


def series_suv_factors(headers: Iterable[Dict[str, Any]], *, kind: str = "bw",
                       notes: Optional[List[str]] = None) -> List[float]:
    """SUV factors of every instance of one series, after checking series-level consistency.

    The scan time is one for the whole series (see the module docstring).

    Args:
        headers: one header per instance (:func:`header_from_dataset`).
        kind: as :func:`suv_factor` takes it.
        notes: as :func:`suv_factor` takes it (each thing said once for the series).

    Returns:
        One factor per instance, in the order given.

    Raises:
        SUVError: when series-level values differ between instances, or a tag is missing/invalid.
        InvalidInputError: ``headers`` is not a list of dicts.
    """
    hs = _check_headers(headers)
    if not hs:
        raise SUVError("no PET instances were given", fix="pass the headers of every instance of the series")
    # Sex and height enter SUVbw only through a scanner's stored lean-body-mass SUV (GML), which is undone.
    body = kind != "bw" or str(hs[0].get("Units", "")).strip().upper() == "GML"
    keys = _SERIES_KEYS if body else tuple(k for k in _SERIES_KEYS if k not in ("PatientSex", "PatientSize"))
    given = {k: {repr(_norm(h.get(k))) for h in hs if _norm(h.get(k)) not in (None, "")} for k in keys}
    for key in keys:  # two values anywhere: a mixed series, whatever else is missing
        if len(given[key]) > 1:
            raise SUVError(f"{key} differs between instances of one series",
                           fix="load the instances of one series only; a mixed series cannot be scaled to SUV")
    for key in keys:
        empty = sum(1 for h in hs if _norm(h.get(key)) in (None, ""))
        if given[key] and empty:
            # One value and a gap: a header defect, not a mixed series (whose fix did not apply).
            raise SUVError(f"{key} is missing or empty in {empty} of the series' {len(hs)} instances (the "
                           "others agree on one value)",
                           fix=f"complete {key} in those instances' headers")
    for h in hs:
        check_header(h)
    scan = None
    units = str(hs[0].get("Units", "")).strip().upper()
    needs_time = units == "BQML" or (units == "CNTS" and not (_philips(hs[0], "SUVScaleFactor") or 0) > 0)
    if needs_time and str(hs[0].get("DecayCorrection", "")).strip().upper() == "START":
        scan = _scan_datetime(hs)
    said: List[str] = []
    factors = [_factor(h, kind, scan, said) for h in hs]
    _said(said, notes)
    return factors


def _check_headers(headers: Any) -> List[Dict[str, Any]]:
    """``headers`` as a list of header dicts.

    Raises:
        InvalidInputError: not an iterable of dicts (a single dict where a list is wanted, a Dataset, a path).
    """
    if isinstance(headers, (str, bytes, Mapping)) or not hasattr(headers, "__iter__"):
        raise InvalidInputError(f"expected a list of header dicts, got {type(headers).__name__}",
                                fix="pass [header_from_dataset(ds) for ds in datasets]")
    hs = list(headers)
    for h in hs:
        if not isinstance(h, Mapping):
            raise InvalidInputError(f"a header must be a dict, got {type(h).__name__}",
                                    fix="make it with header_from_dataset(pydicom.dcmread(path))")
    return hs


def _norm(v: Any) -> Any:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, (list, tuple)):
        return tuple(str(x).strip() for x in v)
    if isinstance(v, (int, float)):
        return round(float(v), 9)
    return v


def suv_problem(headers: Any, *, kind: str = "bw") -> Optional[str]:
    """Why SUV cannot be computed for these header(s), as one sentence naming the tag; None when it can.

    For readers that fall back to Bq/mL with a warning instead of raising.

    Args:
        headers: one header, or one per instance (:func:`header_from_dataset`).
        kind: as :func:`suv_factor` takes it.

    Returns:
        The reason, or None when SUV can be computed.

    Raises:
        InvalidInputError: ``headers`` is not a dict or a list of dicts.
    """
    hs = _check_headers([headers] if isinstance(headers, Mapping) else headers)
    try:
        series_suv_factors(hs, kind=kind, notes=[])  # the reason only: nothing warned
    except SUVError as e:
        return e.problem
    return None


def factor_source(header: Dict[str, Any], *, kind: str = "bw") -> str:
    """Where a series' SUV factor comes from, in words: the tags' names and the rule, never their values.

    Args:
        header: one instance's header (:func:`header_from_dataset`).
        kind: the SUV kind applied (``"bw"``, ``"lbm"``, ``"lbm_janma"``, ``"bsa"``).

    Returns:
        One sentence, e.g. ``"body weight / injected dose decayed to the scan start (Units BQML, ...)"``.

    Raises:
        InvalidInputError: ``header`` is not a dict.
    """
    _check_headers([header])
    units = str(header.get("Units") or "").strip().upper()
    kind = str(kind).lower()
    if units in _SUV_UNITS:
        stored = str(header.get("SUVType") or ("BSA" if units == "CM2ML" else "BW")).strip().upper()
        formula = {"janmahasatian": " (Janmahasatian, as DerivationDescription records)",
                   "james": " (James, as DerivationDescription records)"}.get(header.get("LBMFormula"), "")
        return (f"stored as SUV{stored.lower()}{formula if stored == 'LBM' else ''} in the series (Units {units}, "
                f"SUVType {stored})" + ("" if _stored_kind(header) == kind
                                         else f", converted to SUV{kind} with the patient's body size"))
    body = {"bw": "body weight", "bsa": "body surface area", "lbm": "lean body mass (James)",
            "lbm_janma": "lean body mass (Janmahasatian)"}.get(kind, kind)
    dc = str(header.get("DecayCorrection") or "").strip().upper()
    if units == "CNTS":
        if (_philips(header, "SUVScaleFactor") or 0) > 0:
            return "Philips private SUV scale factor (7053,1000) (Units CNTS)"
        return (f"Philips activity concentration scale factor (7053,1009) x {body} / injected dose "
                f"(Units CNTS, DecayCorrection {dc})")
    dose = ("injected dose (the pixels are decay-corrected to the injection)" if dc == "ADMIN"
            else "injected dose decayed to the scan start")
    return f"{body} / {dose} (Units {units or 'BQML'}, DecayCorrection {dc})"


# --------------------------------------------------------------------------- acquisition facts
#: The keys of :func:`acquisition_facts` (``provenance["pet_acquisition"]``), in order. NIfTI PET with a PET-BIDS
#: sidecar fills the same keys.
ACQUISITION_KEYS = ("tracer", "radionuclide", "half_life_s", "injected_mbq", "uptake_min", "decay_correction")
#: A date written in free text (20201217, 2020-12-17, 17.12.2020, 12/17/20): the tracer's name is free text, and a
#: date is an identifier (HIPAA) that this record never holds.
_DATE_LIKE = re.compile(r"\d{8}|\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}")
#: Keys the uptake time is computed from: instances that differ in them give no uptake time.
_UPTAKE_KEYS = ("RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime", "SeriesDate", "SeriesTime",
                "TimezoneOffsetFromUTC", "GEPrivatePostInjectionDateTime", "RadionuclideHalfLife")


def _agreed(hs: Sequence[Mapping[str, Any]], key: str) -> Any:
    """``key``'s value when every instance gives the same one (absent counts as a value); None otherwise."""
    values = {repr(_norm(h.get(key))) for h in hs}
    return hs[0].get(key) if len(values) == 1 else None


def _text_fact(v: Any) -> Optional[str]:
    if not isinstance(v, str) or not v.strip() or _DATE_LIKE.search(v):
        return None
    return v.strip()


def _positive(v: Any) -> Optional[float]:
    f = None if isinstance(v, bool) else _as_float(v)
    return f if f is not None and math.isfinite(f) and f > 0 else None


def _uptake_min(hs: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Minutes from the injection to the scan start SUV is decayed to, as :func:`series_suv_factors` takes both;
    None when the header does not give them, or gives a negative or implausible interval."""
    if any(_agreed(hs, k) is None and any(h.get(k) is not None for h in hs) for k in _UPTAKE_KEYS):
        return None
    try:
        scan = _scan_datetime(hs)
        seconds = (scan - _injection_datetime(hs[0], scan)).total_seconds()
    except (SUVError, ValueError, TypeError, IndexError, OverflowError, AttributeError):
        return None
    half_life = _positive(hs[0].get("RadionuclideHalfLife"))
    if seconds < 0 or (half_life is not None and seconds / half_life > _MAX_HALF_LIVES):
        return None  # a scan before the injection, or a wrong date (see _MAX_HALF_LIVES): not an uptake time
    return seconds / 60.0


def acquisition_facts(headers: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """The tracer, dose and timing of a PET (or SPECT/NM) series, for ``provenance["pet_acquisition"]``.

    Each value is None when the header does not state it, states it damaged (not a number, not positive, a name
    holding a date), or when the series' instances disagree on it. No date or time of day is kept: dates are
    identifiers, the uptake interval is not.

    Args:
        headers: one header per instance (:func:`header_from_dataset`).

    Returns:
        A dict with exactly the keys of :data:`ACQUISITION_KEYS`: ``tracer`` (Radiopharmaceutical, else the
        RadiopharmaceuticalCodeSequence's CodeMeaning), ``radionuclide`` (the RadionuclideCodeSequence's
        CodeMeaning as stated, e.g. ``"^18^Fluorine"``), ``half_life_s`` (RadionuclideHalfLife), ``injected_mbq``
        (RadionuclideTotalDose / 1e6), ``uptake_min`` (injection to the scan start the SUV decay correction uses,
        in minutes) and ``decay_correction`` (DecayCorrection: ``START``, ``ADMIN``, ``NONE``).

    Raises:
        InvalidInputError: ``headers`` is not a list of dicts.
    """
    hs = _check_headers(headers)
    if not hs:
        return dict.fromkeys(ACQUISITION_KEYS)
    tracer = _text_fact(_agreed(hs, "Radiopharmaceutical"))
    if tracer is None and not any(_text_fact(h.get("Radiopharmaceutical")) for h in hs):
        tracer = _text_fact(_agreed(hs, "RadiopharmaceuticalCodeMeaning"))
    dose = _positive(_agreed(hs, "RadionuclideTotalDose"))
    decay = _text_fact(_agreed(hs, "DecayCorrection"))
    return {"tracer": tracer,
            "radionuclide": _text_fact(_agreed(hs, "RadionuclideCodeMeaning")),
            "half_life_s": _positive(_agreed(hs, "RadionuclideHalfLife")),
            "injected_mbq": None if dose is None else dose / 1e6,
            "uptake_min": _uptake_min(hs),
            "decay_correction": None if decay is None else decay.upper()}
