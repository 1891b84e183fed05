"""Which torch device the network runs on: ``"cpu"``, ``"cuda"`` (``"cuda:N"``), ``"mps"`` or ``"auto"``.

Why a check of our own: torch reports a missing GPU with an ``AssertionError`` from deep inside its CUDA
initialisation, and an unknown name with a list of two dozen backends. A user who typed ``--device cuda`` on
a laptop should instead learn that this machine has no usable GPU and what to pass instead.
"""

from __future__ import annotations

from .._checks import label
from ..errors import InvalidInputError

__all__ = ["resolve_device", "check_network_device", "check_device_name"]


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
    raise InvalidInputError(f"unknown device {label(device)}", fix="use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")


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
    """Fail fast on a bad ``device`` for ``method="network"``, before minutes of loading and registration.

    Does nothing for the classical rules, for the CPU, or when torch is not installed (then the network cannot
    run at all, and a fallback or the missing-dependency error deals with that).

    Raises:
        InvalidInputError: as :func:`resolve_device`.
    """
    if str(method).lower() != "network" or str(device).strip().lower() == "cpu":
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    resolve_device(device)
