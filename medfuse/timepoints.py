"""Whether two PET scans of one patient (a baseline and a follow-up) can be compared by their SUVs.

A change of SUV between two time points means a response to treatment only where the two scans were acquired and
quantified alike. :func:`comparability` lists what differs; the command line prints each as a ``note:`` line
(``medfuse register``, ``medfuse resample``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, List, Mapping, Optional

if TYPE_CHECKING:  # imported where used at run time
    from .volume import Volume

__all__ = ["comparability", "MAX_UPTAKE_DIFFERENCE_MIN"]

#: PERCIST 1.0 (Wahl et al., J Nucl Med 2009;50 Suppl 1:122S-150S): the follow-up scan starts within 15 min of the
#: baseline's uptake time (injection to scan start), since an FDG SUV keeps rising with time after injection.
MAX_UPTAKE_DIFFERENCE_MIN = 15.0


def _acquisition(vol: "Volume") -> Mapping[str, Any]:
    facts = vol.provenance.get("pet_acquisition")
    return facts if isinstance(facts, Mapping) else {}


def _same_name(a: Any, b: Any) -> Optional[bool]:
    """Whether two free-text names (a tracer, a radionuclide, a manufacturer) name one thing, by their letters and
    digits alone ("F-18 FDG" and "f18fdg" alike); None when either is unknown."""
    if not a or not b:
        return None
    key = [re.sub(r"[^0-9a-z]", "", str(x).lower()) for x in (a, b)]
    return key[0] == key[1]


#: Element names and symbols of the PET radionuclides (the DICOM code meaning spells the element, "^18^Fluorine";
#: PET-BIDS and free text the symbol, "F18", "18F").
_ELEMENTS = {"fluorine": "f", "carbon": "c", "oxygen": "o", "nitrogen": "n", "gallium": "ga", "copper": "cu",
             "zirconium": "zr", "rubidium": "rb", "iodine": "i", "technetium": "tc", "yttrium": "y", "scandium": "sc"}
#: Names of one tracer, as scanners' free text spells it (each reduced to the key).
_TRACER_NAMES = {"fluorodeoxyglucose": "fdg", "fludeoxyglucose": "fdg", "2deoxy2fluorodglucose": "fdg",
                 "2deoxy2fluoroglucose": "fdg"}
#: A radionuclide written into a tracer's name: "18F-", "[18F]", "^18^F", "F-18", "F^18^", "Fluorine-18", "99mTc".
_NUCLIDE_WORD = "(?:" + "|".join(sorted({*_ELEMENTS, *_ELEMENTS.values()}, key=len, reverse=True)) + ")"
_IN_NAME = re.compile(rf"\[?\^?\d{{1,3}}m?\^?\s*-?\s*{_NUCLIDE_WORD}\]?(?![a-z])"
                      rf"|(?<![a-z]){_NUCLIDE_WORD}\s*-?\s*\^?\d{{1,3}}m?\^?(?![0-9])")


def _nuclide_key(text: Any) -> str:
    """``^18^Fluorine``, ``F18``, ``18F``, ``F-18`` -> ``f18``: element symbol then mass number."""
    s = re.sub(r"[^0-9a-z]", "", str(text).lower())
    for name, symbol in _ELEMENTS.items():
        s = s.replace(name, symbol)
    m = re.fullmatch(r"(\d+)([a-z]+)", s)
    return m.group(2) + m.group(1) if m else s


def _tracer_key(text: Any) -> frozenset:
    """A tracer's name without its radionuclide and spelling, as a set of words: ``18F-FDG``, ``[18F]FDG``,
    ``Fluorodeoxyglucose F^18^`` (the DICOM code meaning), ``FDG -- fluorodeoxyglucose`` (GE's free text) and
    ``FDG`` -> {fdg}; ``PSMA-1007`` -> {psma, 1007}, not ``PSMA-11``'s."""
    s = _IN_NAME.sub(" ", str(text).lower())
    words = [w for w in re.split(r"[^0-9a-z]+", s) if w]
    joined = "".join(words)
    if joined in _TRACER_NAMES:  # "2-deoxy-2-fluoro-D-glucose" is one name in several words
        return frozenset({_TRACER_NAMES[joined]})
    return frozenset(_TRACER_NAMES.get(w, w) for w in words) or frozenset({joined})


def _same_nuclide(a: Mapping[str, Any], b: Mapping[str, Any]) -> Optional[bool]:
    """By name where both state one (:func:`_nuclide_key`), else by half-life (to 1 %); None when unknown."""
    if a.get("radionuclide") and b.get("radionuclide"):
        return _nuclide_key(a["radionuclide"]) == _nuclide_key(b["radionuclide"])
    ha, hb = _number(a.get("half_life_s")), _number(b.get("half_life_s"))
    return abs(ha - hb) <= 0.01 * max(ha, hb) if ha and hb else None


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _attenuation_reasons(first: Mapping[str, Any], second: Mapping[str, Any]) -> List[str]:
    """An AC against a NAC image, or (softer) two attenuation correction methods; [] where either is unknown."""
    corrected = first.get("attenuation_corrected"), second.get("attenuation_corrected")
    if all(isinstance(c, bool) for c in corrected) and corrected[0] != corrected[1]:
        said = ["attenuation-corrected" if c else "not attenuation-corrected (NAC)" for c in corrected]
        return [f"one image is attenuation-corrected and the other is not: {said[0]} at baseline, {said[1]} at "
                "follow-up: the values of a NAC image are not quantitative (its SUV is meaningless), and the two "
                "are not compared; load the attenuation-corrected series of both studies"]
    if False in corrected:  # two NAC images: their methods are none
        return []
    methods = first.get("attenuation_method"), second.get("attenuation_method")
    if _same_name(*methods) is False:
        return [f"attenuation corrected by different methods ({methods[0]} at baseline, {methods[1]} at "
                "follow-up): the same uptake may give different SUVs"]
    return []


def comparability(baseline: "Volume", followup: "Volume") -> List[str]:
    """Why the SUVs of two PET volumes are not comparable for response assessment (PERCIST-style).

    Checked where both volumes record the fact (``provenance["pet_acquisition"]``, as the DICOM reader fills it,
    ``provenance["manufacturer"]`` and the unit); what one of them does not record is not guessed:

    * different tracers (or radionuclides): their SUVs measure different biology;
    * uptake times (injection to scan start) more than 15 min apart: PERCIST 1.0 (Wahl RL, Jacene H, Kasamon Y,
      Lodge MA. From RECIST to PERCIST: evolving considerations for PET response criteria in solid tumors.
      J Nucl Med 2009;50 Suppl 1:122S-150S) asks the follow-up to be within 15 min of the baseline's, as
      an FDG SUV keeps changing with time after injection;
    * different units: SUV kinds (``SUVbw`` against ``SUVlbm``, the SUL PERCIST uses) or one not in SUV at all
      (``Bq/mL``, ``counts``);
    * one attenuation-corrected and the other not (``attenuation_corrected`` True against False): the values of a
      non-attenuation-corrected (NAC) image are not quantitative, and a study folder often holds both series;
    * attenuation corrected by different methods (a softer note: ``attenuation_method`` compared as text by its
      letters and digits, so one method spelt two ways, "CTAC" and "CT-based", is noted too);
    * different scanner manufacturers (a softer note: reconstructions differ; PERCIST asks for the same scanner
      or one harmonised with it).

    Args:
        baseline: the earlier PET (the reference of the comparison).
        followup: the later PET.

    Returns:
        One sentence per reason, baseline's value first; ``[]`` when nothing recorded differs, or when the two are
        not both PET (``modality`` ``PT``).

    Example:
        >>> import numpy as np
        >>> from medfuse.volume import Volume
        >>> a = Volume(np.zeros((2, 2, 2)), np.eye(4), modality="PT", unit="SUVbw")
        >>> comparability(a, Volume(np.zeros((2, 2, 2)), np.eye(4), modality="PT", unit="SUVlbm"))[0][:34]
        'SUVs of different kinds: SUVbw at '
    """
    if baseline.modality != "PT" or followup.modality != "PT":
        return []
    reasons: List[str] = []
    first, second = _acquisition(baseline), _acquisition(followup)
    # Free text: the DICOM reader's "Fluorodeoxyglucose" / "^18^Fluorine" and a PET-BIDS "FDG" / "F18" are one
    # tracer (compared by name alike, a baseline from DICOM and a follow-up from BIDS read as different tracers).
    tracers = first.get("tracer"), second.get("tracer")
    if all(tracers) and _tracer_key(tracers[0]) != _tracer_key(tracers[1]):
        reasons.append(f"different tracers: {tracers[0]} at baseline, {tracers[1]} at follow-up: their SUVs "
                       "measure different uptake and are not compared")
    elif _same_nuclide(first, second) is False:  # a different radionuclide is a different tracer: said once
        shown = [f.get("radionuclide") or f"half-life {f.get('half_life_s'):g} s" for f in (first, second)]
        reasons.append(f"different radionuclides: {shown[0]} at baseline, {shown[1]} at follow-up: their SUVs "
                       "measure different uptake and are not compared")
    early, late = _number(first.get("uptake_min")), _number(second.get("uptake_min"))
    if early is not None and late is not None and abs(late - early) > MAX_UPTAKE_DIFFERENCE_MIN:
        reasons.append(f"uptake times differ by {abs(late - early):.0f} min ({early:.0f} min at baseline, "
                       f"{late:.0f} min at follow-up), more than the {MAX_UPTAKE_DIFFERENCE_MIN:.0f} min PERCIST 1.0 "
                       "allows: an SUV changes with time after injection")
    reasons.extend(_attenuation_reasons(first, second))
    if baseline.unit != followup.unit:
        suv = [u for u in (baseline.unit, followup.unit) if str(u).startswith("SUV")]
        why = ("SUVs of different kinds" if len(suv) == 2 else "one image is in SUV and the other is not")
        reasons.append(f"{why}: {baseline.unit} at baseline, {followup.unit} at follow-up: read both alike "
                       "(suv= of medfuse.load, --suv on the command line)")
    if _same_name(baseline.provenance.get("manufacturer"), followup.provenance.get("manufacturer")) is False:
        reasons.append(f"scanners of different manufacturers ({baseline.provenance['manufacturer']} at baseline, "
                       f"{followup.provenance['manufacturer']} at follow-up): their reconstructions may give "
                       "different SUVs for the same uptake unless harmonised (e.g. EARL)")
    return reasons
