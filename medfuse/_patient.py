"""Whether two loaded images belong to different patients, without keeping who the patients are.

A DICOM series names its patient (PatientID, PatientName, PatientBirthDate). medfuse never stores or logs those
values, yet fusing one patient's PET onto another patient's MR is a mistake a reader must be told about. So the
loader keeps, in a Volume's provenance (``patient_key``), salted hashes of the identifiers: the salt is drawn
anew in every Python process and never written anywhere, so a key cannot be reversed or linked to another run's,
and keys made in different processes are not compared (the check then stays silent rather than guess).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Mapping, Optional

_SALT = os.urandom(16)
# Names the salt (not the salt): keys from another process (an unpickled Volume) carry another prefix.
_RUN = hashlib.sha256(b"medfuse-run" + _SALT).hexdigest()[:8]


def _digest(kind: str, value: str) -> str:
    return hashlib.sha256(_SALT + kind.encode() + b"\0" + value.encode("utf-8", "replace")).hexdigest()[:16]


def _name(value: Any) -> str:
    # PN components: "DOE^JANE^^^" and "doe^jane" are one name; spaces inside a component are kept.
    parts = [" ".join(p.split()).upper() for p in str(value or "").split("=")[0].split("^")]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


def patient_key(header: Any) -> Optional[str]:
    """The in-memory patient key of a DICOM header (a pydicom Dataset or a mapping of keywords).

    Returns:
        ``"<run>:id=<hash>;name=<hash>;born=<hash>"`` with the parts the header has (PatientID, PatientName,
        PatientBirthDate), or None when it holds none of them (an anonymised export).
    """
    get = header.get
    if str(get("DeidentificationMethod", "") or "").startswith("medfuse:") and \
            re.fullmatch(r"MF[0-9A-F]{16}", str(get("PatientID", "") or "").strip()):
        return None  # medfuse's de-identified output: its ID and name are pseudonyms, not the patient's
    values = {"id": " ".join(str(get("PatientID", "") or "").split()).upper(),
              "name": _name(get("PatientName", "")),
              "born": str(get("PatientBirthDate", "") or "").strip()}
    parts = [f"{kind}={_digest(kind, v)}" for kind, v in values.items() if v]
    return f"{_RUN}:" + ";".join(parts) if parts else None


def _parts(key: Any) -> Optional[dict]:
    if not isinstance(key, str) or ":" not in key:
        return None
    run, _, rest = key.partition(":")
    if run != _RUN:  # made in another process: another salt, nothing to compare
        return None
    return dict(p.split("=", 1) for p in rest.split(";") if "=" in p)


def different_keys(ka: Any, kb: Any) -> bool:
    """Whether two patient keys (:func:`patient_key`) say two different patients.

    Only when the ID and the name both differ where both headers hold them: one patient's series from two
    hospitals (two IDs, one name) or after a change of name (one ID) are not reported, nor a birth date left out
    of some files. The birth date decides only where neither ID nor name can be compared.
    """
    pa, pb = _parts(ka), _parts(kb)
    if not pa or not pb:
        return False
    shared = set(pa) & set(pb)
    primary = shared & {"id", "name"}
    compared = primary or shared & {"born"}
    return bool(compared) and all(pa[k] != pb[k] for k in compared)


def keys_disagree(ka: Any, kb: Any) -> bool:
    """Whether two keys disagree on any identifier both hold: the stricter test for the files of one series
    (one patient module per series; an identifier left out of some files is no disagreement)."""
    pa, pb = _parts(ka), _parts(kb)
    return bool(pa and pb) and any(pa[k] != pb[k] for k in set(pa) & set(pb))


def different_patients(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two provenance records say two different patients (:func:`different_keys` of their keys)."""
    return different_keys(a.get("patient_key"), b.get("patient_key"))


DIFFERENT_PATIENTS = ("the images are DICOM series of different patients (their patient ID and name differ; the "
                      "values are not shown): check that these are the series you meant to combine before reading "
                      "the result")


def different_patients_note(a: Mapping[str, Any], b: Mapping[str, Any]) -> Optional[str]:
    """:data:`DIFFERENT_PATIENTS` when :func:`different_patients`, else None."""
    return DIFFERENT_PATIENTS if different_patients(a, b) else None
