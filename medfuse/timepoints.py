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


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


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
    * different scanner manufacturers (a softer note: reconstructions differ; PERCIST asks for the same scanner
      or one harmonised with it).

    Attenuation correction is not compared: the reader does not record it in the provenance (it shows only in a
    DICOM folder's series listing).

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
    for key, what in (("tracer", "tracers"), ("radionuclide", "radionuclides")):
        if _same_name(first.get(key), second.get(key)) is False:
            reasons.append(f"different {what}: {first[key]} at baseline, {second[key]} at follow-up: their SUVs "
                           "measure different uptake and are not compared")
            break  # a different radionuclide is a different tracer: said once
    early, late = _number(first.get("uptake_min")), _number(second.get("uptake_min"))
    if early is not None and late is not None and abs(late - early) > MAX_UPTAKE_DIFFERENCE_MIN:
        reasons.append(f"uptake times differ by {abs(late - early):.0f} min ({early:.0f} min at baseline, "
                       f"{late:.0f} min at follow-up), more than the {MAX_UPTAKE_DIFFERENCE_MIN:.0f} min PERCIST 1.0 "
                       "allows: an SUV changes with time after injection")
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
