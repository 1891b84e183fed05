"""Inference with the shipped fusion network: 2-D images and tri-plane 3-D volumes, on arrays scaled to 0..1.

``medfuse.fusion.fuse(..., method="network")`` scales its inputs to 0..1 and calls :func:`fuse_arrays`.
Weights are read from safetensors only (never pickle). 3-D volumes are streamed in slabs along the first
axis, so memory stays bounded whatever the volume's length; the result does not depend on the slab size
(each slab carries a halo wider than the network's full-resolution support).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from .._checks import all_finite, as_path, choice, describe, refuse_volumes, slab_slices, whole
from ..errors import InvalidInputError, MedfuseWarning, MissingDependencyError, WeightsError
from ..progress import CancelToken, ProgressFn, check, check_callbacks, report

__all__ = ["fuse_arrays", "fuse_2d", "fuse_3d", "load_model", "weights_sha256", "default_weights_path",
           "MIN_SIZE_3D"]

PathLike = Union[str, os.PathLike]
#: The smallest extent along any axis that the tri-plane path accepts.
MIN_SIZE_3D = 8
_LOCK = threading.Lock()
_CACHE: dict = {}
#: Network models kept loaded at once (one per weights file and device; the shipped weights are one).
_MAX_MODELS = 4


def default_weights_path() -> Path:
    """The weights shipped inside the package."""
    return Path(__file__).resolve().parent / "weights" / "medfuse_fusion.safetensors"


def _resolve(weights: Optional[PathLike]) -> Path:
    """The weights file's path: None is the shipped weights; anything but a path is a typed error.

    Why: ``Path(weights)`` raised pathlib's bare TypeError for a list, an array or a tensor (weights passed where
    the images go), and ``Path("")`` is the working folder.
    """
    if weights is None:
        return default_weights_path()
    p = as_path(weights, what="weights", images=False, fix="pass weights= the path of a medfuse_fusion.safetensors "
                                                           "file (a str or pathlib.Path), or leave it out for "
                                                           "the shipped weights")
    # The card and the run folder sit beside the weights, and were taken for them: a folder read as "corrupt
    # (OSError)", the card as "does not match the SHA-256 ... reinstall medfuse".
    if p.is_dir():
        inside = sorted(p.glob("*.safetensors"))
        raise WeightsError("weights= names a folder; it takes the weights file itself", path=p,
                           fix=f"pass weights={str(inside[0])!r}" if len(inside) == 1 else
                           "pass weights= the .safetensors file that 'medfuse train' wrote (in its run's export/)")
    try:
        mode = os.stat(p).st_mode
    except OSError as e:  # missing: said where the file is read
        if e.errno == errno.ELOOP:  # it was "missing", sending the user to look for a file that is there
            raise WeightsError("weights= names a symbolic link that loops (it points back to itself)", path=p,
                               fix="point the link at the .safetensors file, or pass that file itself") from None
    else:
        if not stat.S_ISREG(mode):  # a named pipe blocked safetensors in native code, past Ctrl-C
            raise WeightsError("weights= names something that is not a regular file (a named pipe, a device...)",
                               path=p, fix="pass weights= the .safetensors file itself")
    if p.suffix.lower() == ".json":
        beside = p.with_suffix(".safetensors")
        raise WeightsError("weights= names a model card (.json), not the weights", path=p,
                           fix=f"pass weights={str(beside)!r}" if beside.is_file() else
                           "pass weights= the .safetensors file the card describes")
    return p


def weights_sha256(weights: Optional[PathLike] = None) -> str:
    """SHA-256 (hex) of the weights file: recorded in provenance so a fused image names its exact model.

    Args:
        weights: a safetensors weights file (default: the shipped weights, :func:`default_weights_path`).

    Returns:
        The 64-character hex digest (cached per path, modification time and size: the file is read once).

    Raises:
        WeightsError: the file is missing or unreadable.
        InvalidInputError: ``weights`` is neither None nor a path (a str or os.PathLike), or is an empty string.
    """
    p = _resolve(weights)
    try:
        st = p.stat()
        key = ("sha", str(p), st.st_mtime_ns, st.st_size)
        if key not in _CACHE:
            _CACHE[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        return _CACHE[key]
    except OSError:
        raise WeightsError("the fusion network's weights file is missing or unreadable", path=p,
                           fix=_missing_fix(p)) from None


def check_weights_file(weights: Any) -> None:
    """Refuse a network weights file that is missing, unreadable, or not a whole safetensors file.

    The header is read without torch (8 bytes of length, a JSON table of tensors and their byte ranges), so a
    truncated or foreign file is found before any work (when a transform or pipeline step is built); a file whose
    tensors do not fit the model is found at the first fusion, where it is an error too (never a reason to fall back).

    Raises:
        WeightsError: as said.
        InvalidInputError: ``weights`` is not a path.
    """
    import struct

    weights_sha256(weights)  # missing or unreadable: WeightsError; not a path: InvalidInputError
    path = os.fspath(weights)
    fix = ("pass weights= a medfuse_fusion.safetensors file written by 'medfuse train', or leave it out for the "
           "shipped weights")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n).decode("utf-8")) if 0 < n <= size - 8 else None
        ends = [int(v["data_offsets"][1]) for k, v in (header or {}).items() if k != "__metadata__"]
        whole_file = bool(ends) and 8 + n + max(ends) == size
    except (OSError, ValueError, struct.error, TypeError, KeyError, IndexError, AttributeError):
        whole_file = False
    if not whole_file:
        torch_file = _torch_file_error(Path(path))
        if torch_file is not None:  # it was "corrupt or truncated", which sent the user looking for a damaged file
            raise torch_file
        raise WeightsError("the fusion network's weights file is not a whole safetensors file (corrupt or truncated)",
                           path=path, fix=fix)


def _check_recorded_hash(p: Path) -> None:
    """Refuse weights whose SHA-256 differs from the one their card (``<stem>.json``, written with them) records.

    Why: a flipped or overwritten byte in the tensor data still parses as safetensors and loads into the model,
    which then fuses with other numbers than the ones validated and named in provenance.
    """
    card = p.with_suffix(".json")
    try:
        recorded = json.loads(card.read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        return  # no card (weights from elsewhere) or an unreadable one: nothing to compare with
    if isinstance(recorded, str) and recorded and weights_sha256(p) != recorded:
        raise WeightsError(f"the fusion network's weights file does not match the SHA-256 recorded in {card.name} "
                           "(corrupted or partly overwritten)", path=p,
                           fix="reinstall medfuse to restore the shipped weights" if p == default_weights_path()
                           else "restore both files from where they came, or export them again with 'medfuse train'")


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the install
        raise MissingDependencyError.for_package("torch", "the fusion network", "ml") from None
    _one_thread_after_fork()
    return torch


_FORK_HOOK: list = []


def _one_thread_after_fork() -> None:
    """A process forked after the network ran in this one gets one torch thread, as DataLoader workers do.

    Why: torch's OpenMP pool (libgomp) does not survive a fork: a multiprocessing child (start method "fork")
    hung for good in its first network fusion after the parent had run one. One thread runs no OpenMP region.
    """
    if _FORK_HOOK or not hasattr(os, "register_at_fork"):
        return

    def child() -> None:
        import sys

        torch = sys.modules.get("torch")
        if torch is not None:
            try:
                torch.set_num_threads(1)
            except Exception:  # noqa: BLE001 - a child must start whatever torch says
                pass

    os.register_at_fork(after_in_child=child)
    _FORK_HOOK.append(child)


def load_model(weights: Optional[PathLike] = None, *, device: str = "cpu"):
    """Load (and cache) the network from a safetensors file.

    The first call in a process also raises glibc's malloc thresholds, so that repeated fusions reuse their
    freed buffers instead of page-faulting them anew (:mod:`medfuse.fusion._allocator`; set
    ``MEDFUSE_MALLOC_TUNING=0`` to leave the allocator alone).

    Args:
        weights: a safetensors weights file (default: the shipped weights, :func:`default_weights_path`).
        device: torch device ("cpu", "cuda", "cuda:N", "mps", or "auto": CUDA when present).

    Returns:
        The :class:`~medfuse.fusion.network.FusionNet`, in eval mode on ``device``; one model per file (path,
        modification time, size) and device, shared by later calls.

    Raises:
        WeightsError: the file is missing, not a safetensors file, truncated, does not fit the model, holds NaN
            or infinite values, or differs from the SHA-256 that its card (``medfuse_fusion.json`` beside it)
            records.
        InvalidInputError: ``device`` is unknown, or a GPU this machine or torch build does not have; ``weights``
            is neither None nor a path (a str or os.PathLike), or is an empty string.
        MissingDependencyError: torch or safetensors is not installed (``pip install 'medfuse[ml]'``).
    """
    torch = _torch()
    from ._allocator import keep_freed_memory
    from .device import resolve_device
    from .network import FusionNet, config_from_metadata

    device = resolve_device(device)
    p = _resolve(weights)
    try:
        st = p.stat()
    except OSError:
        raise WeightsError("the fusion network's weights file is missing", path=p, fix=_missing_fix(p)) from None
    key = ("model", str(p), st.st_mtime_ns, st.st_size, str(device))
    with _LOCK:
        if key in _CACHE:
            _CACHE[key] = _CACHE.pop(key)  # the newest again: the model in use is the last to go
            return _CACHE[key]
        keep_freed_memory()  # once per process: no page faults for every call's intermediates (see _allocator)
        _check_recorded_hash(p)
        try:
            from safetensors import safe_open
        except ImportError:  # pragma: no cover
            raise MissingDependencyError.for_package("safetensors", "the fusion network", "ml") from None
        try:
            with safe_open(str(p), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
                if "config" not in meta:
                    # Said: a state dict saved with safetensors' save_file (a training loop of one's own) was
                    # "corrupt or does not fit the model (KeyError)"; the settings that loading needs are missing.
                    raise WeightsError("the fusion network's weights file records no architecture config (its "
                                       "safetensors metadata has no 'config' entry), which loading needs: it was "
                                       "not written by medfuse's export", path=p,
                                       fix="save the model with medfuse.fusion.train.export_weights(model, OUT_DIR, "
                                           "{}) (it writes OUT_DIR/medfuse_fusion.safetensors with its config), or "
                                           "convert this file with 'medfuse train --data DATA --init FILE --width N "
                                           "--epochs 0 --steps-3d 0 --out OUT_DIR' (N: the width it was built with)")
                config = config_from_metadata(json.loads(meta["config"]))
                try:
                    with torch.device("meta"):  # the model's shapes, with no memory: compared before it is built
                        wanted = {k: tuple(v.shape) for k, v in FusionNet(**config).state_dict().items()}
                except ValueError as exc:  # a setting out of its range: named
                    raise WeightsError(f"the fusion network's weights file holds an invalid setting: {exc}",
                                       path=p, fix=_bad_file_fix(p)) from None
                if wanted != shapes:
                    raise WeightsError("the fusion network's weights file does not fit the model its settings "
                                       "describe (tensor names or shapes differ)", path=p, fix=_bad_file_fix(p))
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            # Its initial weights (overwritten next) drew from torch's global generator: a caller's seeded
            # torch.rand after the first network fusion differed from one without it.
            with torch.random.fork_rng(devices=[]):
                model = FusionNet(**config)
            model.load_state_dict(tensors, strict=True)
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors/torch raise several types for a bad file
            raise _unloadable(p, exc) from None
        for t in model.state_dict().values():
            if not torch.isfinite(t).all():
                raise WeightsError("the fusion network's weights contain NaN or infinite values", path=p,
                                   fix=_bad_file_fix(p))
        model = model.to(device).eval().channels_last_()
        # A file replaced in place (another modification time or size) leaves its earlier model unusable, and a
        # service loading many files kept every model: 200 hot-swaps held 200 models (150 kB each on the CPU,
        # more on a GPU). The earlier ones of this file on this device go, and the least recently used beyond
        # _MAX_MODELS.
        for old in [k for k in _CACHE if k[0] == "model" and k[1] == key[1] and k[4] == key[4]]:
            del _CACHE[old]
        models = [k for k in _CACHE if k[0] == "model"]
        for old in models[:max(0, len(models) + 1 - _MAX_MODELS)]:
            del _CACHE[old]
        _CACHE[key] = model
        return model


def _missing_fix(p: Path) -> str:
    """The fix for a weights file that is not there: reinstalling restores only the shipped one (it was advised
    for a mistyped path of the user's own too)."""
    if p == default_weights_path():
        return "reinstall medfuse, or pass weights= pointing at a medfuse_fusion.safetensors"
    return ("check the path given as weights= (a medfuse_fusion.safetensors exported by 'medfuse train'), or leave "
            "it out for the shipped weights")


def _torch_file_error(p: Path) -> Optional[WeightsError]:
    """The error for a weights file that is a PyTorch file (torch.save's zip or a bare pickle: a training
    checkpoint, a state dict), else None."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        return None
    return WeightsError(
        "the weights file is a PyTorch (torch.save) file, such as a training checkpoint (best.ckpt), not "
        "safetensors; weights= reads safetensors only, since unpickling a file can run code", path=p,
        fix="pass a training run's export (RUN/export/medfuse_fusion.safetensors, written when 'medfuse train' ends), "
            "or convert a checkpoint or state dict you trust with 'medfuse train --init FILE --epochs 0 --steps-3d 0 "
            "--val-limit 1 --out DIR' (read with weights_only, no code runs; it validates on the training data of "
            "--data, about a minute) and pass DIR's medfuse_fusion.safetensors")


def _unloadable(p: Path, exc: Exception) -> WeightsError:
    """The error for a weights file safetensors cannot load: a PyTorch file (torch.save's zip or a bare pickle)
    is said to be one (it was called "corrupt", with advice to reinstall medfuse), and reinstalling is advised for
    the shipped file only."""
    torch_file = _torch_file_error(p)
    if torch_file is not None:
        return torch_file
    return WeightsError(f"the fusion network's weights file is corrupt or does not fit the model "
                        f"({type(exc).__name__})", path=p, fix=_bad_file_fix(p))


def _bad_file_fix(p: Path) -> str:
    """Reinstalling restores the shipped file only; a file of the user's own is re-exported."""
    if p == default_weights_path():
        return "reinstall medfuse to restore the shipped weights, or retrain with 'medfuse train'"
    return ("pass a medfuse_fusion.safetensors exported by 'medfuse train' (re-export it if the file was damaged), "
            "or leave weights= out for the shipped weights")


# ----------------------------------------------------------------------------- checks
def _validated(arrays: Sequence[np.ndarray], ndim: Optional[int]) -> list:
    """The inputs as arrays, after every check that needs no float32 copy (count, shapes, dtype, finiteness)."""
    if isinstance(arrays, np.ndarray):
        arrays = list(arrays)
    if not isinstance(arrays, (list, tuple)) or not 2 <= len(arrays) <= 3:
        got = f"{len(arrays)}" if isinstance(arrays, (list, tuple)) else describe(arrays)  # never a path's text
        raise InvalidInputError(f"the fusion network takes a list of 2 or 3 images, got {got}",
                                fix="pass a list of 2 or 3 co-registered arrays")
    arrs = [np.asarray(a) for a in arrays]
    shapes = {a.shape for a in arrs}
    if len({len(sh) for sh in shapes}) > 1:  # not a grid matter: resampling advice sent users the wrong way
        raise InvalidInputError(f"the inputs have different numbers of dimensions {sorted(shapes)}",
                                fix="give every input the same dimensions: squeeze singleton axes "
                                    "(numpy.squeeze), or fuse 2-D images with 2-D images and volumes with volumes")
    if len(shapes) != 1:
        raise InvalidInputError(f"the inputs have different shapes {sorted(shapes)}",
                                fix="put them on one grid first with medfuse.register or medfuse.resample")
    shape = arrs[0].shape
    if ndim is not None and len(shape) != ndim:
        # In medfuse.fuse's terms (its mode= option), where users meet this; fuse_2d/fuse_3d only for their callers.
        other = f", or pass mode='{len(shape)}d' (called directly: fuse_{len(shape)}d)" if len(shape) in (2, 3) else ""
        raise InvalidInputError(f"the {ndim}-D path (mode='{ndim}d') was given {len(shape)}-D arrays of shape {shape}",
                                fix=f"leave mode='auto' (the default), which picks the path from the arrays{other}")
    if len(shape) not in (2, 3):
        raise InvalidInputError(f"the fusion network takes 2-D or 3-D arrays, got shape {shape}",
                                fix="squeeze singleton axes, or fuse each 3-D volume of a 4-D series separately")
    if min(shape) < (MIN_SIZE_3D if len(shape) == 3 else 4):
        raise InvalidInputError(f"the arrays are too small for the network: shape {shape}",
                                fix=("colour images fuse only with a grey one, channels last (medfuse.fuse(grey, "
                                     "rgb), rgb of shape (H, W, 3): a (3, H, W) tensor's is rgb.transpose(1, 2, 0)); "
                                     "convert the others to grey first. Volumes this "
                                     "thin: wrap them as medfuse.Volume(array, affine), which medfuse.fuse fuses "
                                     "slice by slice with the 2-D path"
                                     if len(shape) == 3 and ((shape[2] in (3, 4) and min(shape[:2]) >= MIN_SIZE_3D)
                                                             or (shape[0] in (3, 4) and min(shape[1:]) >= MIN_SIZE_3D))
                                     else "fuse thin volumes slice by slice with the 2-D path (medfuse.fuse does so "
                                          "for arrays and Volumes thin along one axis)"
                                     if len(shape) == 3 and sum(n < MIN_SIZE_3D for n in shape) == 1
                                     else "use a classical rule (e.g. method='laplacian') for volumes this thin "
                                          "along more than one axis" if len(shape) == 3
                                     else "use a classical rule for tiny images" if min(shape) >= 2
                                     else "an image needs at least 2 pixels a side (4 for the network)"))
    for a in arrs:
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
            raise InvalidInputError(f"the inputs must be real numbers, got dtype {a.dtype}", fix="pass float arrays")
    if not all(all_finite(a, CHUNK_ELEMENTS) for a in arrs):
        raise InvalidInputError("an input contains NaN or infinite values",
                                fix="replace them (e.g. numpy.nan_to_num) before fusing")
    return arrs


#: Values per chunk of the input checks (1 MB of float32): a 512x512 CT slice a chunk.
CHUNK_ELEMENTS = 1 << 18


def _check_arrays(arrays: Sequence[np.ndarray], ndim: Optional[int]) -> np.ndarray:
    """The inputs stacked as float32 and clipped to 0..1, after :func:`_validated`'s checks."""
    arrs = _validated(arrays, ndim)
    x = np.stack([a.astype(np.float32, copy=False) for a in arrs])
    if not np.isfinite(x).all():
        raise InvalidInputError("an input has values beyond float32's range; the network takes inputs in 0..1",
                                fix="scale the inputs to 0..1 first (medfuse.fuse does it for you)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        warnings.warn(f"network fusion expects inputs scaled to 0..1 (got {lo:.3g}..{hi:.3g}); clipping",
                      MedfuseWarning, stacklevel=3)
    # In place: x is a fresh stack, and a second copy of every input would only raise the peak memory.
    return np.clip(x, 0.0, 1.0, out=x)


def _pad_to(x, factor: int, axes: Sequence[int]):
    """Replicate-pad the given axes of a torch tensor at their ends to a multiple of ``factor``."""
    torch = _torch()
    for ax in axes:
        r = (-x.shape[ax]) % factor
        if r:
            tail = x.narrow(ax, x.shape[ax] - 1, 1)
            x = torch.cat([x] + [tail] * r, dim=ax)
    return x


def _tri_state(functional: Any) -> Optional[bool]:
    """``functional`` as None, True or False; 1/0 and NumPy booleans count as True/False."""
    if functional is None:
        return None
    if isinstance(functional, (bool, np.bool_)) or (isinstance(functional, (int, np.integer)) and functional in (0, 1)):
        return bool(functional)
    raise InvalidInputError(f"functional must be True, False or None, got {describe(functional)}",
                            fix="pass functional=True for a PET/SPECT input, False for anatomy only, None if unknown")


def check_options(*, mode: Any = "auto", batch_size: Any = 32, functional: Any = None, refine: Any = True) -> None:
    """Refuse bad values of the network's options before any image is read.

    Why: the MONAI transforms check them when built; otherwise ``batch_size=0`` or ``mode="bogus"`` failed at the
    first item, inside a DataLoader worker.

    Raises:
        InvalidInputError: ``mode`` not auto/2d/3d, ``batch_size`` not a whole number >= 1, ``functional`` not
            True/False/None, ``refine`` not True/False.
    """
    choice(mode, "mode", ("auto", "2d", "3d"), fix="use mode='auto'")
    whole(batch_size, "batch_size", minimum=1, what="a whole number of slices",
          example="batch_size=32 (smaller uses less memory)")
    _tri_state(functional)
    _check_refine(refine)


def _check_refine(refine: Any) -> None:
    """Refuse a ``refine`` whose truth is not a plain yes/no (an array's raised NumPy's "ambiguous" error)."""
    if refine is None or isinstance(refine, (bool, np.bool_)) or \
            (isinstance(refine, (int, np.integer)) and refine in (0, 1)):
        return
    raise InvalidInputError(f"refine must be True or False, got {describe(refine)}",
                            fix="pass refine=False to skip the refinement head, or leave it out")


# ----------------------------------------------------------------------------- 2-D
def fuse_2d(arrays: Sequence[np.ndarray], *, device: str = "cpu", weights: Optional[PathLike] = None,
            refine: bool = True, functional: Optional[bool] = None, progress: Optional[ProgressFn] = None,
            cancel: Optional[CancelToken] = None) -> np.ndarray:
    """Fuse 2-3 co-registered 2-D images in 0..1 -> float32 image in 0..1 (same shape).

    An image of more than :data:`STRIP_PIXELS` pixels is fused in strips of rows after one low-resolution pass
    over the whole image: the whole image's result (to float rounding) in bounded memory.

    ``refine=False`` skips the weights' full-resolution refinement head, if they have one: about half the
    time on a CPU, at stage 6's quality (docs/network.md, "Twelfth round").

    ``functional=True`` (an input shows PET/SPECT uptake) leaves the weights' ``coarse_pixel_rule_3d``
    coarsest detail levels to the pixel rule, as the 3-D path does: a hot spot over a dark MR core stays
    visible, at a cost in Qabf/VIF (docs/network.md, "Fourteenth round"). False or None (not known, the
    default here, unlike the 3-D path) keeps the learned choice, which scores best on the Harvard pairs
    but can hide such a spot.

    Args:
        arrays: 2 or 3 images of one shape, every side at least 4 pixels, values in 0..1 (others are clipped,
            with a warning).
        device: torch device ("cpu", "cuda", "cuda:N", "mps", or "auto": CUDA when present).
        weights: a safetensors file (default: the shipped weights).
        refine: run the weights' refinement head, if they have one (see above).
        functional: whether an input shows uptake (PET/SPECT): True, False or None (see above).
        progress, cancel: see :mod:`medfuse.progress`.

    Returns:
        float32 image of the inputs' shape, in 0..1.

    Raises:
        InvalidInputError: not 2 or 3 arrays, shapes that differ, arrays that are not 2-D, smaller than 4 pixels
            a side, not real numbers, or holding NaN/inf (or values beyond float32); ``functional`` not
            True/False/None; ``refine`` not True/False; an unknown or absent ``device``; ``weights`` not a path;
            ``progress`` not callable or ``cancel`` not a CancelToken.
        WeightsError: the weights are missing, corrupt or do not fit the model (see :func:`load_model`).
        MissingDependencyError: torch or safetensors is not installed (``pip install 'medfuse[ml]'``).
        CancelledError: ``cancel`` was set (checked before the model loads), or ``progress`` raised it.
    """
    x = _check_arrays(arrays, 2)
    functional = _tri_state(functional)
    _check_refine(refine)
    check_callbacks(progress, cancel)
    torch = _torch()
    check(cancel, "network fusion")
    model = load_model(weights, device=device)
    device = next(model.parameters()).device  # "auto" resolved by load_model
    h, w = x.shape[1:]
    with torch.inference_mode():
        t = _pad_to(torch.from_numpy(x)[None].to(device), model.factor, (2, 3))
        del x  # the padded copy is what the network reads (a view of x where no padding was needed)
        rule = model.coarse_pixel_rule_3d if functional else 0
        rows = _strip_rows(t.shape[3], model.factor)
        if h * w <= STRIP_PIXELS or rows >= t.shape[2]:  # on the image's own size, as documented
            out = model(t, refine=refine, coarse_pixel_rule=rule)[0, :h, :w].float().cpu().numpy()
        else:
            out = _fuse_2d_strips(model, t, rows, refine=refine, rule=rule, progress=progress,
                                  cancel=cancel)[:h, :w]
    report(progress, 1.0, "network fusion done")
    return out.astype(np.float32, copy=False)


#: Full-resolution pixels the 2-D path works on at a time. An image with more is fused in strips of whole rows
#: (each with its halo) after one low-resolution pass over the whole image, which gives the whole image's result
#: (to float rounding) in bounded memory: about 370 bytes a pixel at once made a 4096² pair (a mammogram's size)
#: take 7.2 GB; a strip of 2**20 pixels holds about 0.4 GB.
STRIP_PIXELS = 2 ** 20


def _strip_rows(width: int, factor: int) -> int:
    """Rows of a 2-D strip for an image ``width`` wide: :data:`STRIP_PIXELS` worth, a multiple of ``factor``."""
    return max(factor, STRIP_PIXELS // max(1, width) // factor * factor)


def _fuse_2d_strips(model, t, rows: int, *, refine: bool, rule: int, progress: Optional[ProgressFn],
                    cancel: Optional[CancelToken]) -> np.ndarray:
    """The 2-D forward pass of ``model`` on the padded (1, N, H, W) tensor ``t``, ``rows`` output rows at a time.

    The low-resolution logits need the whole image (the encoder's and any scan's field is wide), but they are
    computed from pooled features, which strips give exactly; everything at full resolution reads only
    :meth:`FusionNet.halo_2d` pixels around each output pixel, so a strip with that halo of real rows (rounded up
    to the factor, to stay on the low-resolution grid) gives its rows as the whole image does.
    """
    torch = _torch()
    from .network import decompose

    f, height = model.factor, t.shape[2]
    strips = list(_slabs(height, rows))
    total = 2 * len(strips) + 1
    halo = _on_grid(model.halo, f)
    feats = []
    for i, (s, e) in enumerate(strips):
        check(cancel, "network fusion")
        lo, hi = max(0, s - halo), min(height, e + halo)
        feats.append(model._features(t[:, :, lo:hi])[2][..., (s - lo) // f:(e - lo) // f, :])
        report(progress, (i + 1) / total, "network fusion: features")
    check(cancel, "network fusion")
    lowres = model.lowres_logits(torch.cat(feats, dim=3))
    del feats
    report(progress, (len(strips) + 1) / total, "network fusion: low resolution")
    halo = _on_grid(model.halo_2d(refine), f)
    out = np.empty(tuple(t.shape[2:]), dtype=np.float32)
    for i, (s, e) in enumerate(strips):
        check(cancel, "network fusion")
        lo, hi = max(0, s - halo), min(height, e + halo)
        piece = t[:, :, lo:hi]
        base, details = decompose(piece, model.levels)
        up = _logit_rows(lowres, lo, hi, f)
        fused = model.render_upsampled(piece, base, details, up, refine=refine, coarse_pixel_rule=rule)
        out[s:e] = fused[0, s - lo:e - lo].float().cpu().numpy()
        del base, details, up, fused
        report(progress, (len(strips) + 2 + i) / total, "network fusion: combining")
    return out


# ----------------------------------------------------------------------------- 3-D (tri-plane)
def _slabs(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(n, s + size)


class _Padded:
    """The inputs as the network reads them, built slab by slab: float32, clipped to 0..1 and replicate-padded
    at the ends of every axis to a multiple of ``factor``.

    Why: one stacked, padded copy of all inputs cost 4 bytes a voxel and input for the whole fusion (0.6 GB for
    a 512x512x300 pair) beside the inputs themselves; a slab holds the same values, so the result is the same.
    """

    def __init__(self, arrays: Sequence[np.ndarray], factor: int):
        self.arrays, self.factor = list(arrays), int(factor)
        self.size = arrays[0].shape
        self.shape = (len(self.arrays),) + tuple(-(-n // self.factor) * self.factor for n in self.size)

    def take(self, lo: int, hi: int):
        """Padded slices ``lo:hi`` along the first axis of the volumes: a (N, hi-lo, H', W') torch tensor."""
        stop = min(hi, self.size[0])
        x = np.empty((len(self.arrays), hi - lo) + tuple(self.size[1:]), dtype=np.float32)
        for i, a in enumerate(self.arrays):
            x[i, :stop - lo] = a[lo:stop]  # cast on assignment: the values astype(np.float32) gives
        x[:, stop - lo:] = x[:, stop - lo - 1:stop - lo]  # the padding repeats the last real slice
        np.clip(x, 0.0, 1.0, out=x)
        return _pad_to(_torch().from_numpy(x), self.factor, (2, 3))


def _scan_volumes(arrays: Sequence[np.ndarray]) -> list:
    """:func:`_check_arrays`' checks for the 3-D path, chunk by chunk: no stacked copy of the inputs."""
    arrs = _validated(arrays, 3)
    lo, hi = np.inf, -np.inf
    for a in arrs:
        for s in slab_slices(a, CHUNK_ELEMENTS):  # one volume-sized temporary would cost a byte a voxel or more
            c = a[s].astype(np.float32, copy=False)
            if not np.isfinite(c).all():
                raise InvalidInputError("an input has values beyond float32's range; the network takes inputs in "
                                        "0..1", fix="scale the inputs to 0..1 first (medfuse.fuse does it for you)")
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    if lo < -1e-3 or hi > 1 + 1e-3:
        warnings.warn(f"network fusion expects inputs scaled to 0..1 (got {lo:.3g}..{hi:.3g}); clipping",
                      MedfuseWarning, stacklevel=3)
    return arrs


def _slab_input(vol: _Padded, s: int, e: int, halo: int) -> Tuple[object, int]:
    """(N, e-s+2·halo', H, W) piece of ``vol`` with up to ``halo`` real neighbours each side; returns offset."""
    lo, hi = max(0, s - halo), min(vol.shape[1], e + halo)
    return vol.take(lo, hi), s - lo


#: Slices combined at a time in the tri-plane path's last pass (a multiple of the network's factor).
COMBINE_SLICES = 8
#: Low-resolution slices the tri-plane step encodes at a time, and slices (along the first axis) it merges at a
#: time. Other merge sizes give the same logits to the bit (the same convolution of the same padded values);
#: other encoder batch sizes the same to float32 rounding (each slice is encoded on its own, but oneDNN may pick
#: another kernel for 64 slices than for 8: 6e-8 apart on an AMD EPYC with AVX2, identical on the machines
#: measured before); these bound the step's memory (at clinical size 64 slices and the
#: whole merge at once cost about 1.6 GB beside the volumes, these 0.36 GB) and let cancel act within a
#: fraction of a second. On the CPU only (checked there, in channels-last memory, as load_model keeps the
#: model): other devices keep the former 64 slices and one merge call, whose results their kernels were not
#: checked to keep to the bit in smaller pieces.
PLANE_BATCH = 8
MERGE_SLICES = 8


def _on_grid(n: int, f: int) -> int:
    """``n`` rounded up to a multiple of the factor ``f``: a halo that keeps slabs and strips on the low-resolution
    grid."""
    return -(-n // f) * f


def _logit_rows(lr, s: int, e: int, f: int):
    """Full-resolution rows (axis 2) ``s:e`` of the low-resolution logits ``lr`` upsampled by ``f``, as the whole
    map's upsampling gives them: one low-resolution row more each side is upsampled, so the bilinear weights of
    the rows at the ends read the rows the whole map's do."""
    from .network import _up

    a0, a1 = max(0, s // f - 1), min(lr.shape[2], e // f + 1)
    return _up(lr[:, :, a0:a1], f)[:, :, s - a0 * f:e - a0 * f]


def _combine_into(out: np.ndarray, model, lr, piece, base, details, s: int, e: int, off: int, f: int,
                  brighter: bool) -> None:
    """Combine slices ``s:e`` (``off`` in the slab ``piece``) into ``out[s:e]``: the same slices, logits and
    empty guard that a slab ``s:e`` of its own gives (its halo holds the guard's radius)."""
    sl = slice(off, off + e - s)
    up = _logit_rows(lr, s, e, f)
    empty = None
    if model.empty_guard:  # the guard needs only its own radius of the halo, not all of it
        r = model.empty_guard // 2
        lo = max(0, off - r)
        empty = model.empty_mask(piece[:, :, lo:off + e - s + r])[:, :, off - lo:off - lo + e - s]
    fused = model.combine(piece[:, :, sl], base[:, :, sl], [d[:, :, sl] for d in details], up, empty=empty,
                          brighter=brighter)
    out[s:e] = fused[0].float().cpu().numpy()


def fuse_3d(arrays: Sequence[np.ndarray], *, device: str = "cpu", weights: Optional[PathLike] = None,
            batch_size: int = 32, functional: Optional[bool] = None, progress: Optional[ProgressFn] = None,
            cancel: Optional[CancelToken] = None) -> np.ndarray:
    """Tri-plane fusion of 2-3 co-registered 3-D volumes in 0..1 -> float32 volume in 0..1 (same shape).

    Args:
        arrays: the volumes (same shape, every axis at least :data:`MIN_SIZE_3D`).
        device: torch device ("cpu", "cuda", "cuda:N", "mps", or "auto": CUDA when present).
        weights: a safetensors file (default: the shipped weights).
        batch_size: slices per slab along the first axis (rounded to the network's factor); bounds memory.
        functional: whether an input is a functional image (PET/SPECT uptake). False (anatomical inputs
            only) uses the learned selection at every detail level; True or None (not known) leaves the
            weights' ``coarse_pixel_rule_3d`` coarsest levels to the pixel rule, which keeps focal uptake
            visible over a dark MR core (docs/network.md, "Ninth round"). With True, weights that set
            ``functional_k`` choose the base and those levels by "the brighter input at that scale wins"
            (docs/network.md, "Sixteenth round"); None keeps the stronger-detail rule, which suits two MR
            volumes better.
        progress, cancel: see :mod:`medfuse.progress`.

    Returns:
        float32 volume of the inputs' shape, in 0..1.

    Raises:
        InvalidInputError: not 2 or 3 arrays, shapes that differ, arrays that are not 3-D, under
            :data:`MIN_SIZE_3D` along an axis, not real numbers, or holding NaN/inf (or values beyond float32);
            ``functional`` not True/False/None; ``batch_size`` not a whole number >= 1; an unknown or absent
            ``device``; ``weights`` not a path; ``progress`` not callable or ``cancel`` not a CancelToken.
        WeightsError: the weights are missing, corrupt or do not fit the model (see :func:`load_model`).
        MissingDependencyError: torch or safetensors is not installed (``pip install 'medfuse[ml]'``).
        CancelledError: ``cancel`` was set (checked between slabs and tri-plane batches), or ``progress``
            raised it.
    """
    arrs = _scan_volumes(arrays)
    functional = _tri_state(functional)
    check_callbacks(progress, cancel)
    whole(batch_size, "batch_size", minimum=1, what="a whole number of slices",
          example="batch_size=32 (smaller uses less memory)")
    torch = _torch()
    from .network import _pool, decompose

    model = load_model(weights, device=device)
    device = next(model.parameters()).device  # "auto" resolved by load_model
    f = model.factor
    halo = _on_grid(model.halo, f)  # slabs stay aligned with the low-res grid
    size = max(f, (int(batch_size) // f) * f)
    shape = arrs[0].shape
    with torch.inference_mode():
        vol = _Padded(arrs, f)
        n_slabs = -(-vol.shape[1] // size)
        total = 2 * n_slabs + 1
        # Pass 1: low-resolution features, slab by slab.
        feats = []
        for i, (s, e) in enumerate(_slabs(vol.shape[1], size)):
            check(cancel, "network fusion")
            piece, off = _slab_input(vol, s, e, halo)
            piece = piece[None].to(device)
            base, details = decompose(piece, model.levels)
            core = [t[:, :, off:off + e - s] for t in [piece] + [d.abs() for d in details]]
            feats.append(torch.stack([_pool(t, f) for t in core], dim=2)[0])
            del base, details, piece
            report(progress, (i + 1) / total, "network fusion: features")
        feats3 = torch.cat(feats, dim=2)  # (N, C, d, h, w)
        del feats
        # Pass 2: the 2-D network on the three planes of the low-res volume, merged in 3-D.
        check(cancel, "network fusion")
        # A known functional input (True) gets the weights' "brighter wins" choice, if they have one.
        brighter = functional is True and model.has_brighter_rule
        # Cancel is checked between its encoder batches and merge chunks: at clinical size this step alone ran
        # for tens of seconds unchecked (Ctrl-C and napari's Cancel waited for it).
        planes_progress = None if progress is None else \
            (lambda fr, msg: report(progress, (n_slabs + fr) / total, msg))
        on_cpu = device.type == "cpu"
        logits = model.planes_logits(feats3, coarse_pixel_rule=0 if functional is False else None,
                                     brighter=brighter, batch=PLANE_BATCH if on_cpu else 64,
                                     merge_depth=MERGE_SLICES if on_cpu else None,
                                     cancel=cancel, progress=planes_progress)  # (K, d, h, w)
        del feats3
        report(progress, (n_slabs + 1) / total, "network fusion: tri-plane")
        # Pass 3: full-resolution combination, slab by slab.
        out = np.empty(tuple(vol.shape[1:]), dtype=np.float32)
        lr = logits[None]
        step = min(size, COMBINE_SLICES // f * f or f)
        for i, (s, e) in enumerate(_slabs(vol.shape[1], size)):
            check(cancel, "network fusion")
            piece, off = _slab_input(vol, s, e, halo)
            piece = piece[None].to(device)
            base, details = decompose(piece, model.levels)
            # The combination is voxel-wise: a few slices at a time, so that its upsampled logits and weights
            # (a dozen full-resolution channels) are held for those slices only, not for the whole slab.
            for cs, ce in _slabs(e - s, step):
                _combine_into(out, model, lr, piece, base, details, s + cs, s + ce, off + cs, f, brighter)
            del base, details, piece
            report(progress, (n_slabs + 2 + i) / total, "network fusion: combining")
    report(progress, 1.0, "network fusion done")
    return out[: shape[0], : shape[1], : shape[2]]


def fuse_arrays(arrays: Sequence[np.ndarray], *, device: str = "cpu", weights: Optional[PathLike] = None,
                batch_size: int = 32, mode: str = "auto", functional: Optional[bool] = None,
                refine: bool = True, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> np.ndarray:
    """Fuse 2-3 co-registered arrays scaled to 0..1; 2-D arrays take the 2-D path, 3-D the tri-plane path.

    Args:
        arrays: 2 or 3 arrays of one shape, 2-D or 3-D, values in 0..1 (others are clipped, with a warning).
        device: torch device.
        weights: safetensors weights (default: shipped).
        batch_size: 3-D slab thickness (slices); bounds memory.
        mode: ``"auto"``, ``"2d"`` or ``"3d"``; a mismatch with the arrays' dimension is an error.
        functional: whether an input shows uptake (PET/SPECT); see :func:`fuse_2d` and :func:`fuse_3d`
            (None means the learned choice in 2-D and the pixel rule in 3-D).
        refine: 2-D only, see :func:`fuse_2d` (the tri-plane path never runs the refinement head).
        progress, cancel: see :mod:`medfuse.progress`.

    Returns:
        float32 array of the inputs' shape, in 0..1.

    Raises:
        InvalidInputError: an unknown ``mode``, or one that does not match the arrays' dimension; Volumes
            instead of arrays (fuse them with :func:`medfuse.fuse`); not a list of 2 or 3 arrays; arrays that are
            not 2-D or 3-D, or as :func:`fuse_2d` and :func:`fuse_3d` refuse them (shapes, size, NaN,
            ``functional``, ``refine``, ``batch_size``, ``device``, ``weights``, ``progress``, ``cancel``).
        WeightsError: the weights are missing, corrupt or do not fit the model (see :func:`load_model`).
        MissingDependencyError: torch or safetensors is not installed (``pip install 'medfuse[ml]'``).
        CancelledError: ``cancel`` was set, or ``progress`` raised it.
    """
    # Every option before the arrays, refine on 3-D too (it was taken there, where it is not used, and refused on 2-D).
    check_options(mode=mode, batch_size=batch_size, functional=functional, refine=refine)
    refuse_volumes(arrays, takes="this function takes arrays scaled to 0..1")
    ndim = {"auto": None, "2d": 2, "3d": 3}[mode]
    if ndim is None:
        try:
            ndim = np.ndim(arrays[0])
        except (TypeError, IndexError, KeyError):
            raise InvalidInputError("the fusion network takes a list of 2 or 3 arrays",
                                    fix="pass [array_a, array_b]") from None
    if ndim == 2:
        return fuse_2d(arrays, device=device, weights=weights, refine=refine, functional=functional,
                       progress=progress, cancel=cancel)
    if ndim == 3:
        return fuse_3d(arrays, device=device, weights=weights, batch_size=batch_size, functional=functional,
                       progress=progress, cancel=cancel)
    raise InvalidInputError(f"the fusion network takes 2-D or 3-D arrays, got {ndim}-D",
                            fix="squeeze singleton axes, or fuse each 3-D volume of a 4-D series separately")
