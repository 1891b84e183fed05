"""Which torch device the network runs on: ``"cpu"``, ``"cuda"`` (``"cuda:N"``), ``"mps"`` or ``"auto"``.

Why a check of our own: torch reports a missing GPU with an ``AssertionError`` from deep inside its CUDA
initialisation, and an unknown name with a list of two dozen backends. A user who typed ``--device cuda`` on
a laptop should instead learn that this machine has no usable GPU and what to pass instead.
"""

from __future__ import annotations

from .._checks import did_you_mean, label
from ..errors import InvalidInputError

__all__ = ["resolve_device", "check_network_device", "check_device_name", "device_used"]


def check_device_name(device) -> str:
    """The device name, lower-cased, if it is one medfuse knows (no torch needed); else InvalidInputError.

    Used on its own where no network runs (classical rules still refuse a misspelt ``--device``).
    """
    # A torch.device is spelt by str(); str() of anything else (an array, a path object) is no device name.
    is_torch_device = type(device).__module__ == "torch" and type(device).__name__ == "device"
    name = (device if isinstance(device, str) else str(device) if is_torch_device else "").strip().lower()
    kind, sep, index = name.partition(":")
    if kind == "cpu" and sep and index.isdigit():  # torch's spelling of its one CPU device
        return "cpu"
    if name in ("auto", "cpu", "mps") or (kind == "cuda" and (not sep or index.isdigit())):
        return name
    raise InvalidInputError(f"unknown device {label(device)}{_near_device(device, kind, sep, index)}",
                            fix="use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")


#: Everyday words for a GPU that name no torch device, and the device each means.
_GPU_WORDS = {"gpu": "cuda", "nvidia": "cuda", "metal": "mps", "apple": "mps"}


def _near_device(device, kind: str, sep: str, index: str) -> str:
    """``"; did you mean 'cuda'?"`` for a ``device`` str: ``gpu`` (``gpu:1``: ``cuda:1``) and the like by
    meaning, a typo of a plain word (``cdua``) by spelling; else ``""``.

    Why by meaning first: spelling alone offered ``'cpu'`` for ``'gpu'``, the opposite of what was meant.
    """
    if not isinstance(device, str):
        return ""
    if kind in _GPU_WORDS and (not sep or index.isdigit()):  # 'gpu:1' too: a word and digits show no path
        return f"; did you mean '{_GPU_WORDS[kind]}{sep + index if _GPU_WORDS[kind] == 'cuda' else ''}'?"
    return did_you_mean(device.strip(), ("auto", "cpu", "cuda", "mps"))


def resolve_device(device) -> str:
    """Check ``device`` against this torch build and machine; returns the device string to use.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"auto"`` (CUDA when present, else the CPU),
            or a ``torch.device``.

    Returns:
        A device string torch accepts (``"auto"`` resolved).

    Raises:
        InvalidInputError: an unknown device name, or a GPU that this torch build or machine does not have.
    """
    import torch

    name = check_device_name(device)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cpu":
        return "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InvalidInputError(f"device {str(device)!r} was asked for, but {why}",
                                    fix="use device 'cpu' (or 'auto', which picks a GPU only when there is one)")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise InvalidInputError(f"device {str(device)!r} was asked for, but this machine has {count} CUDA GPU(s)",
                                    fix=f"use 'cuda:0' .. 'cuda:{count - 1}', or 'cuda' for the current one")
        return name
    mps = getattr(torch.backends, "mps", None)  # the only name left
    if mps is None or not mps.is_available():
        raise InvalidInputError(f"device {str(device)!r} was asked for, but Apple's MPS backend is not available here",
                                fix="use device 'cpu'")
    return "mps"


def check_network_device(method: str, device) -> None:
    """Fail fast on a bad ``device``, for every ``method``, before minutes of loading and registration.

    The classical rules run on the CPU whatever the device, so a GPU this machine has is fine for them; a device
    it lacks (``--device cuda`` on a laptop, ``mps`` off a Mac) is refused as for the network, not ignored
    while the provenance recorded it as the device used. Does nothing for the CPU. Without torch the network
    cannot run at all (a fallback or the missing-dependency error deals with that); a classical rule is then
    refused any GPU (medfuse reaches a GPU only through torch).

    Raises:
        InvalidInputError: as :func:`resolve_device`; or, without torch, a GPU asked for with a classical rule.
    """
    name = check_device_name(device)
    if name in ("cpu", "auto"):
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        if str(method).lower() == "network":
            return
        raise InvalidInputError(f"device {str(device)!r} was asked for, but torch is not installed, so medfuse can "
                                "use no GPU here", fix="use device 'cpu' (the classical rules run on the CPU), or "
                                "install torch with GPU support") from None
    resolve_device(device)


def device_used(method: str, device) -> str:
    """The device ``method`` runs on with ``device``: the CPU for the classical rules (whatever ``device`` says),
    the resolved device for the network (``"auto"`` becomes ``"cuda"`` or ``"cpu"``); for the provenance.

    Raises:
        InvalidInputError: as :func:`resolve_device` (the network only).
    """
    if str(method).lower() != "network":
        return "cpu"
    return resolve_device(device)
