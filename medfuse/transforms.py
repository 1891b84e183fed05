"""MONAI transforms: load, align and fuse a subject's modalities inside a MONAI ``Compose``.

Dictionary transforms (for ``monai.data.Dataset`` items such as ``{"mr": path, "pet": path, "label": 1}``):

* :class:`LoadVolumed`: paths -> :class:`medfuse.Volume` (DICOM folders, SUV for PET, exact geometry);
* :class:`RegisterToReferenced`: register images onto a reference image and resample them onto its grid (and
  move label maps drawn on them with the same transform: ``label_keys=``);
* :class:`FuseModalitiesd`: fuse the aligned images into one channel-first ``MetaTensor`` for a network.

Array twins: :class:`LoadVolume`, :class:`RegisterToReference`, :class:`FuseModalities`.

    from monai.transforms import Compose, Resized, SelectItemsd
    from medfuse.transforms import LoadVolumed, RegisterToReferenced, FuseModalitiesd

    pre = Compose([
        LoadVolumed(keys=["mr", "pet"]),
        RegisterToReferenced(keys=["pet"], reference_key="mr", kind="rigid"),
        FuseModalitiesd(keys=["mr", "pet"], output_key="image", method="laplacian"),
        Resized(keys=["image"], spatial_size=(64, 64, 64)),
        SelectItemsd(keys=["image", "label"]),
    ])

Values may be medfuse Volumes or MONAI ``MetaTensor`` s (e.g. from ``LoadImaged``): MetaTensors are
converted with :meth:`medfuse.Volume.from_metatensor` (RAS to LPS, NIfTI space from ``sform_code``) and
registered results are returned in the type and channel layout they came in. Bad input raises
:class:`medfuse.errors.InvalidInputError` with a fix. This module needs MONAI (``pip install 'medfuse[ml]'``);
``import medfuse`` never imports it.

Batching and caching (``DataLoader``, ``PersistentDataset``):

* Volumes left in an item (``LoadVolumed``'s output, not dropped) batch as MONAI's ``LoadImaged`` images do:
  a ``(B, 1, I, J, K)`` MetaTensor with each subject's affine (importing this module registers that with
  torch's ``default_collate``, as MONAI registers its MetaTensor). MONAI's own transforms need tensors:
  ``LoadVolumed(..., as_tensor=True)`` for images that go through them (e.g. stacked as channels).
* Registration reports (``"<key>_registration"``) hold ``None`` values and lists of varying length, which
  torch's collate refuses: drop them (``SelectItemsd``, or ``report_postfix=None``) before batching.
* ``PersistentDataset`` reloads with ``torch.load(weights_only=True)``, which refuses Volumes (MONAI then calls
  the file corrupt and recomputes it every time): cache tensors only (``as_tensor=True``, ``delete_keys=True``
  or ``SelectItemsd``). Pass ``hash_transform=monai.data.utils.pickle_hashing`` so that a change of fusion
  method or option gives a new cache key (``json_hashing`` cannot serialise transforms and falls back to
  their class names, so a changed method would reuse the stale cache), and ``track_meta=True`` so that the
  cached images keep their affine. ``docs/classifier.md`` shows a whole classifier pipeline.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from typing import Any, Dict, Hashable, Mapping, Optional, Sequence, Union

from ._checks import MAX_THREADS, choice, describe, flag, label, user_stacklevel, whole
from .errors import GeometryError, InvalidInputError, MedfuseError, MedfuseWarning, MissingDependencyError
from .fusion.normalise import _METHODS as _NORMALISE_METHODS
from .volume import Volume, normalise_modality, relabelled, require_finite

try:
    from monai.config import KeysCollection
    from monai.transforms import MapTransform, Transform
    from monai.transforms.traits import ThreadUnsafe
except ImportError:  # pragma: no cover - depends on the environment
    raise MissingDependencyError.for_package("monai", "medfuse.transforms", "ml") from None

__all__ = [
    "LoadVolume", "LoadVolumed", "RegisterToReference", "RegisterToReferenced",
    "FuseModalities", "FuseModalitiesd", "as_volume",
]


def as_volume(x: Any, *, name: str = "image") -> Volume:
    """A medfuse Volume from a Volume or a MONAI MetaTensor (channel-first, one channel).

    Args:
        x: a :class:`medfuse.Volume` (returned as it is) or a MONAI ``MetaTensor`` of shape ``(1, I, J, K)`` or
            ``(I, J, K)`` (converted with :meth:`medfuse.Volume.from_metatensor`, RAS to LPS).
        name: (keyword-only) what to call ``x`` in an error message (e.g. its dictionary key).

    Returns:
        The Volume.

    Raises:
        InvalidInputError: ``x`` is neither (a path, a plain array or tensor, which carry no geometry), or a
            MetaTensor that is a batch or has several channels.
    """
    if isinstance(x, Volume):
        return x
    if _is_metatensor(x):
        return Volume.from_metatensor(x)
    raise InvalidInputError(
        f"{name} is a {type(x).__name__}, not a medfuse Volume or MONAI MetaTensor (geometry is needed)",
        fix="load it with LoadVolumed or MONAI's LoadImaged(image_only=True) first")


def _is_metatensor(x: Any) -> bool:
    return not isinstance(x, Volume) and hasattr(x, "affine") and hasattr(x, "meta")


def _like(result: Volume, template: Any, *, same_grid: bool = False) -> Any:
    """Return ``result`` in the form ``template`` came in.

    A Volume stays a Volume. A MetaTensor comes back as a MetaTensor with ``template``'s channel layout
    (``(I, J, K)`` stays 3-D, ``(1, I, J, K)`` stays channel-first) and its ``filename_or_obj`` (which MONAI's
    ``SaveImage`` names outputs after); geometry, modality, unit and space are the result's, MONAI's other meta
    keys the template's (and its transform history, on ``same_grid``: see :func:`_keep_meta`).
    """
    if not _is_metatensor(template):
        return result
    out = _keep_meta(result.to_metatensor(), template, same_grid=same_grid)
    meta = template.meta if isinstance(getattr(template, "meta", None), dict) else {}
    if len(template.shape) == 3:
        out = out[0]
        out.meta["original_channel_dim"] = meta.get("original_channel_dim", float("nan"))
    return out


#: The version of what these transforms return (MetaTensor meta keys, labels), raised when that changes. Every
#: transform keeps it as an attribute, so that MONAI's ``PersistentDataset(hash_transform=pickle_hashing)``
#: (docs/classifier.md) gives new cache keys after such an upgrade: MONAI's collate keeps only the meta keys
#: every item of a batch has, and items cached by an older medfuse silently took ``medfuse_sources`` off new ones.
OUTPUT_VERSION = 4  # 3: original_channel_dim "no channel" (NaN), medfuse_method and medfuse_fallback_reason;
# 4: the fused tensor keeps the reference key's loading grid, header fields and transform history


#: Meta keys that describe the result itself (grid, channel layout, NIfTI space, labels, the files it came from):
#: never the template's. ``spatial_shape`` is not one: in MONAI it is the shape at loading, which goes with
#: ``original_affine`` (``SaveImage(resample=True)`` writes back to that pair).
_RESULT_META = {"affine", "space", "original_channel_dim", "nifti_space", "sform_code", "qform_code",
                "medfuse_dtype", "modality", "unit", "medfuse_sources"}


def _keep_meta(out: Any, template: Any, *, same_grid: bool = False) -> Any:
    """``out`` (a new MetaTensor) with ``template``'s other meta keys, as MONAI's own spatial transforms keep them.

    Header fields, ``filename_or_obj``, ``original_affine`` and ``spatial_shape`` (the grid at loading, which
    ``SaveImage(resample=True)`` writes back to) come from ``template``; the current grid is ``out``'s.
    ``applied_operations`` are kept only on ``same_grid``: after a resampling they would invert onto the wrong
    grid, so MONAI's ``Invertd`` stops with an error instead.
    """
    # Back in the space it came in: the original_affine and history kept below are in the template's space.
    # An LPS template (ITKReader(affine_lps_to_ras=False)) beside a RAS affine: SaveImage(resample=True) wrote
    # zeros and Invertd mirrored x and y.
    _in_space_of(out, template)
    import copy

    import torch

    meta = template.meta if isinstance(getattr(template, "meta", None), dict) else {}
    for k, v in meta.items():
        if k not in _RESULT_META:
            # Numbers as tensors, as to_metatensor puts them: LoadImaged's NumPy header arrays made the tensor
            # unloadable by torch.load (weights_only refuses NumPy's reconstruct).
            out.meta[k] = torch.as_tensor(v) if isinstance(v, np.ndarray) and v.dtype.kind in "biuf" else v
    if same_grid:  # copies: a later transform editing one item's history must not edit the reference's
        out.applied_operations = copy.deepcopy(list(getattr(template, "applied_operations", [])))
    return out


def _in_space_of(out: Any, template: Any) -> Any:
    """``out`` (a MetaTensor from :meth:`Volume.to_metatensor`, RAS) turned to LPS when ``template`` is LPS.

    Its affine and its own ``original_affine`` are turned; ``space`` takes the template's value (a str or MONAI's
    ``SpaceKeys``).
    """
    meta = template.meta if _is_metatensor(template) and isinstance(template.meta, dict) else {}
    space = meta.get("space")
    if str(getattr(space, "value", space)).strip().upper() != "LPS":
        return out
    import torch

    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
    out.affine = flip.to(out.affine.dtype) @ out.affine
    out.meta["original_affine"] = flip @ torch.as_tensor(out.meta["original_affine"], dtype=torch.float64)
    out.meta["space"] = space
    return out


def _source(x: Any) -> Optional[str]:
    """The file an image was loaded from (MetaTensor ``filename_or_obj`` or Volume ``provenance["source"]``)."""
    if isinstance(x, Volume):
        src = x.provenance.get("source")
    else:
        meta = getattr(x, "meta", None)
        src = meta.get("filename_or_obj") if isinstance(meta, dict) else None
    return src if isinstance(src, (str, os.PathLike)) and str(src) else None


def _name_file(e: BaseException, image: Any) -> None:
    """Add the image's file to a :class:`MedfuseError` that names none, so that a failure inside a DataLoader
    worker says which subject file it was (MONAI and torch wrap it in their own RuntimeErrors)."""
    src = _source(image)
    if isinstance(e, MedfuseError) and not e.path and src is not None:
        e.path = os.fspath(src)
        e.args = (e._compose(),)


def _threads(threads: Optional[int]) -> Optional[int]:
    """ITK threads: the caller's, else one inside a torch DataLoader worker process.

    torch limits its own threads to one per worker for the same reason: N workers each running ITK on every
    core oversubscribe the CPU (4 phantom subjects, 2 workers on 2 cores: 5.2 s with 2 ITK threads, 4.8 s with 1).
    """
    if threads is not None:
        return threads
    from torch.utils.data import get_worker_info

    return 1 if get_worker_info() is not None else None


def _checked_threads(threads: Any) -> Optional[int]:
    """``threads`` as None or a whole number of 1 or more, checked when the transform is built (not per item)."""
    return whole(threads, "threads", minimum=1, maximum=MAX_THREADS, none_ok=True,
                 example="threads=1 for bit-identical results, or leave it out")


def _checked_modality(modality: Any, what: str = "modality") -> Optional[str]:
    """A modality override as medfuse spells it (``"PET"`` -> ``"PT"``), or None; a typo fails when built."""
    if modality is None:
        return None
    if not isinstance(modality, str):
        raise InvalidInputError(f"{what} must be a modality name (a str) or None, got {describe(modality)}",
                                fix="pass e.g. modality='CT', or a {key: modality} mapping for LoadVolumed")
    return normalise_modality(modality)


def _checked_key(key: Any, what: str) -> Hashable:
    """A data key (a str, or another hashable that is not None); a list failed later as "unhashable type"."""
    if key is None or not isinstance(key, Hashable) or isinstance(key, tuple):
        raise InvalidInputError(f"{what} must be one key of the data dict (e.g. a str), got {describe(key)}",
                                fix=f"pass e.g. {what}='fused'" if what == "output_key" else f"pass e.g. {what}='mr'")
    return key


def _repr(obj: Any, **params: Any) -> str:
    """``Name(param=value, ...)``: MONAI's "applying transform ..." errors and logs then say what ran."""
    shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
    return f"{type(obj).__name__}({shown})"


def _collate_volumes(batch: Sequence[Volume], *, collate_fn_map: Optional[dict] = None) -> Any:
    """torch ``default_collate`` for Volumes: a batched MetaTensor ``(B, 1, I, J, K)`` with each one's affine.

    Why MetaTensors: that is what MONAI's ``LoadImaged`` keys batch into, so that ``decollate_batch``, ``Invertd``
    and shared-memory transfer from workers work on them; volumes of different shapes fail as MONAI's do (its
    error suggests ``pad_list_data_collate``). :meth:`Volume.from_metatensor` turns an item back.
    """
    from monai.data.utils import collate_meta_tensor_fn

    return collate_meta_tensor_fn([v.to_metatensor() for v in batch], collate_fn_map=collate_fn_map)


def _register_collate() -> None:
    """Teach torch's ``default_collate`` (and MONAI's ``list_data_collate``, which calls it) Volumes.

    Without it an item that still holds a loaded Volume (``LoadVolumed``'s default output, kept unless dropped)
    fails to batch with torch's "default_collate: batch must contain tensors, ... found <class
    'medfuse.volume.Volume'>". MONAI registers its MetaTensor the same way; a spawned DataLoader worker imports
    this module when it unpickles the transforms, which registers it there too.
    """
    try:
        from torch.utils.data._utils.collate import default_collate_fn_map
    except ImportError:  # pragma: no cover - a torch without the registry (< 1.13): Volumes stay refused
        return
    default_collate_fn_map.setdefault(Volume, _collate_volumes)


_register_collate()


# ----------------------------------------------------------------------------- load
class LoadVolume(Transform):
    """Load an image file or DICOM folder with :func:`medfuse.load`.

    Args:
        modality: override the modality (NIfTI files carry none).
        suv: PET SUV kind, as :func:`medfuse.load` takes it: ``"auto"`` (default: SUVbw, or the kind an SUV
            series is stored in), ``"bw"``, ``"lbm"``, ``"lbm_janma"``, ``"bsa"``, ``"none"``.
        as_tensor: return a MONAI MetaTensor instead of a Volume.
        whole_series: a path that is one file of a DICOM series loads the whole series it belongs to, as
            :func:`medfuse.load` does (default False: that slice alone, a one-slice volume, with a warning).
        volume_index: which volume of a 4-D file or series to load (0-based, negative from the end), as
            :func:`medfuse.load` takes it; a 4-D input without it (or ``combine``) is refused, naming the count.
        combine: ``"sum"`` or ``"mean"``: all volumes of a 4-D input as one, as :func:`medfuse.load` takes it
            (not with ``volume_index``).

    A Volume or MetaTensor (already loaded) is passed through, a MetaTensor converted to a Volume. ``suv`` is
    applied only when the file is read: the SUV factor needs the DICOM header (injected dose, body size, times),
    which a loaded image does not keep. So a PET medfuse read from DICOM passes only when it is in the ``suv``
    asked for already (``"auto"`` passes any; ``"none"`` one medfuse applied no SUV factor to). A PET from
    NIfTI/MetaImage/NRRD, or a MetaTensor (no record of its reader), passes as its file would load (with a
    warning there: such files hold no SUV header); other images pass as :func:`medfuse.load` ignores ``suv``.

    Raises:
        InvalidInputError: when built, an unknown ``modality`` or ``suv`` (:data:`medfuse.io.SUV_CHOICES`), or
            ``as_tensor`` or ``whole_series`` not True or False; when called, the input
            is neither a path nor an image (a bare array: wrap it as ``medfuse.Volume(array, affine)``), or is a
            PET read from DICOM already, in another unit than ``suv`` asks for; the errors of :func:`medfuse.load`
            (``UnreadableFileError``, ``MultipleSeriesError``, ``SUVError``...) for a file it cannot read.
    """

    def __init__(self, *, modality: Optional[str] = None, suv: str = "auto", as_tensor: bool = False,
                 whole_series: bool = False, volume_index: Optional[int] = None, combine: Optional[str] = None):
        from .io import _check_combine, _check_suv, _check_volume_index

        self.output_version = OUTPUT_VERSION  # part of a PersistentDataset cache key
        # Checked here: a wrong value would fail only at the first load, inside a DataLoader worker.
        self.modality, self.suv = _checked_modality(modality), _check_suv(suv)
        self.as_tensor = flag(as_tensor, "as_tensor")
        self.whole_series = flag(whole_series, "whole_series")
        # A 4-D input was refused with "pass volume_index=", which the transform did not take.
        self.volume_index = _check_volume_index(volume_index)
        self.combine = _check_combine(combine, self.volume_index)

    def __call__(self, path: Any) -> Any:
        from .io import load

        if isinstance(path, Volume):
            # The override applies to an image loaded already too (it did for a MetaTensor, not for a Volume).
            vol = relabelled(path, self.modality)
        elif _is_metatensor(path):  # already loaded (e.g. by MONAI's LoadImage): only converted
            vol = relabelled(Volume.from_metatensor(path, modality=self.modality), self.modality)
        elif not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(
                f"LoadVolume needs a file or DICOM folder path, got a {type(path).__name__}",
                fix="put paths in the data (e.g. {'mr': 'mr.nii.gz'}); a bare array has no geometry: wrap it as "
                "medfuse.Volume(array, affine)")
        else:
            vol = load(path, modality=self.modality, suv=self.suv, whole_series=self.whole_series,
                       volume_index=self.volume_index, combine=self.combine)
        if isinstance(path, Volume) or _is_metatensor(path):
            self._check_loaded_suv(vol, self.suv, recorded=isinstance(path, Volume))
        if self.as_tensor and _is_metatensor(path):  # passed through: its layout, header keys and history stay
            return _like(vol, path, same_grid=True)
        return vol.to_metatensor() if self.as_tensor else vol

    @staticmethod
    def _check_loaded_suv(vol: Volume, suv: str, *, recorded: bool) -> None:
        """Refuse a loaded PET that is not in the ``suv`` asked for (it passed through unchanged, unsaid).

        ``recorded``: the image's provenance is its own (a Volume); a MetaTensor keeps no record of its reader or
        of the SUV kind medfuse applied, and passes as the file it came from would have.

        Raises:
            InvalidInputError: the image is a PET medfuse read from DICOM, and its unit (or the SUV kind medfuse
            recorded) differs.
        """
        from .io.suv import KIND_UNITS

        if suv == "auto" or not (vol.modality == "PT" or vol.unit.startswith("SUV") or vol.unit == "Bq/mL"):
            return  # suv= is PET only: medfuse.load ignores it for other images too
        if not recorded or vol.provenance.get("reader") != "medfuse.dicom":
            # Only a DICOM series could have been converted; the path route gives a NIfTI PET (or one of unknown
            # origin: a MetaTensor keeps no reader) as stored too, with a warning. Refusing here only would make
            # LoadVolumed fail on its own output.
            return
        applied = vol.provenance.get("suv")  # the SUV kind medfuse.load applied (absent: values as read)
        if suv == "none":
            if applied is None:
                return
        elif vol.unit == KIND_UNITS[suv] and applied in (None, suv):  # a recorded kind must match (lbm vs janma)
            return
        kind = f", SUV kind {applied!r} applied" if applied is not None else ""
        raise InvalidInputError(
            f"LoadVolume(suv={suv!r}) got a PET loaded already, in {vol.unit}{kind}: suv= applies only when "
            "LoadVolume reads the file (the SUV factor needs the DICOM header's dose, body size and times, which a "
            "loaded image does not keep), so this image cannot be converted",
            fix=f"give LoadVolume the PET's file or DICOM folder path instead, or load it with "
                f"medfuse.load(path, suv={suv!r}); suv='auto' passes loaded images through as they are")

    def __repr__(self) -> str:
        extra = {k: v for k, v in (("volume_index", self.volume_index), ("combine", self.combine)) if v is not None}
        return _repr(self, modality=self.modality, suv=self.suv, as_tensor=self.as_tensor,
                     whole_series=self.whole_series, **extra)


class LoadVolumed(MapTransform):
    """Dictionary version of :class:`LoadVolume`.

    Args:
        keys: items holding paths.
        modality: one modality for all keys, or a ``{key: modality}`` mapping.
        suv, as_tensor, whole_series: see :class:`LoadVolume`.
        volume_index: for 4-D inputs, one index for all keys or a ``{key: index}`` mapping (see
            :class:`LoadVolume`).
        combine: ``"sum"`` or ``"mean"`` for the 4-D inputs of the keys ``volume_index`` gives no index (see
            :class:`LoadVolume`).
        allow_missing_keys: skip absent keys instead of failing.

    Raises:
        KeyError: a key is missing (unless ``allow_missing_keys``), as MONAI's dictionary transforms raise it.
        InvalidInputError: as :class:`LoadVolume`; when built, a ``modality`` or ``volume_index`` mapping with a
            key not in ``keys``.
    """

    def __init__(self, keys: KeysCollection, *, modality: Union[None, str, Mapping[str, str]] = None,
                 suv: str = "auto", as_tensor: bool = False, whole_series: bool = False,
                 volume_index: Union[None, int, Mapping[str, int]] = None, allow_missing_keys: bool = False,
                 combine: Optional[str] = None):
        super().__init__(keys, allow_missing_keys)
        from .io import _check_combine, _check_suv, _check_volume_index

        for name, given in (("modality", modality), ("volume_index", volume_index)):
            # A key of the mapping that is not loaded (wrong case, a typo) left that image's setting unset, unsaid:
            # a CT then loaded as "unknown" and skipped the HU window and air fill.
            stray = [k for k in given if k not in self.keys] if isinstance(given, Mapping) else []
            if stray:
                raise InvalidInputError(
                    f"{name} names key(s) {', '.join(map(repr, stray))} that LoadVolumed does not load "
                    f"(its keys: {', '.join(map(repr, self.keys))})",
                    fix="use the keys exactly as listed in keys= (letter case included), or add the key to keys=")
        if isinstance(modality, Mapping):
            modality = {k: _checked_modality(m, f"modality of {k!r}") for k, m in modality.items()}
        else:
            modality = _checked_modality(modality)
        self.volume_index = ({k: _check_volume_index(i) for k, i in volume_index.items()}
                             if isinstance(volume_index, Mapping) else _check_volume_index(volume_index))
        self.combine = _check_combine(combine, None if isinstance(self.volume_index, Mapping) else self.volume_index)
        self.modality, self.suv, self.as_tensor = modality, _check_suv(suv), flag(as_tensor, "as_tensor")
        self.whole_series = flag(whole_series, "whole_series")
        self.output_version = OUTPUT_VERSION  # part of a PersistentDataset cache key

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mod = self.modality.get(key) if isinstance(self.modality, Mapping) else self.modality
            index = self.volume_index.get(key) if isinstance(self.volume_index, Mapping) else self.volume_index
            d[key] = LoadVolume(modality=mod, suv=self.suv, as_tensor=self.as_tensor,
                                whole_series=self.whole_series, volume_index=index,
                                combine=None if index is not None else self.combine)(d[key])
        return d

    def __repr__(self) -> str:
        extra = {k: v for k, v in (("volume_index", self.volume_index), ("combine", self.combine)) if v is not None}
        return _repr(self, keys=self.keys, modality=self.modality, suv=self.suv, as_tensor=self.as_tensor,
                     whole_series=self.whole_series, **extra)


# ----------------------------------------------------------------------------- register
class RegisterToReference(Transform, ThreadUnsafe):
    """Register ``moving`` onto ``reference`` and return it resampled on the reference grid.

    Args:
        kind: ``"rigid"``, ``"affine"`` or ``"deformable"``; ``None`` only resamples (same frame assumed).
        threads: ITK threads (``1`` for bit-identical results). ``None``: one inside a torch ``DataLoader``
            worker process (as torch does for its own threads), else SimpleITK's default.
        **options: with a ``kind``, passed to :func:`medfuse.register` (``metric``, ``preset``, ``seed``, preset
            keys...); with ``kind=None``, to :func:`medfuse.resample`: ``interpolation`` (``"nearest"`` for label
            maps and masks: labels and their integer dtype kept) and ``default`` (the value outside). Checked
            when the transform is built.

    The last registration report is kept in :attr:`last_report` (so the transform is marked ``ThreadUnsafe``:
    MONAI's threaded ``CacheDataset`` gives each thread its own copy).

    Returns (when called with ``moving, reference``): the moved image on the reference grid, in the type and
    channel layout ``moving`` came in (a Volume, or a MetaTensor ``(I, J, K)`` or ``(1, I, J, K)``).

    Raises:
        InvalidInputError: when built, an unknown ``kind``, ``threads`` not None or a whole number of 1 or more,
            an option the step does not take (``interpolation`` only with ``kind=None``) or an unknown
            ``interpolation``; when called, an input that is not a Volume or MetaTensor.
        RegistrationError: registration cannot run on these images (no overlap, a constant image...).
    """

    def __init__(self, *, kind: Optional[str] = "rigid", threads: Optional[int] = None, **options: Any):
        from .pipeline import REGISTER_KINDS

        # Checked here: a typo would fail only at the first item, inside a DataLoader worker.
        choice(kind, "registration kind", REGISTER_KINDS, fix="use None, 'rigid', 'affine' or 'deformable'")
        # Options too: kind=None dropped them all unsaid (interpolation="nearest" too, so a label map came back
        # with fractional labels), and a misspelt one failed only inside a DataLoader worker, or never.
        self.kind, self.threads = kind, _checked_threads(threads)
        self.options = _checked_register_options(kind, options)
        self.output_version = OUTPUT_VERSION  # part of a PersistentDataset cache key
        self.last_report: Optional[Dict[str, Any]] = None

    def __call__(self, moving: Any, reference: Any) -> Any:
        out, self.last_report, _ = self._register(moving, reference)
        return out

    def __getstate__(self) -> Dict[str, Any]:
        # Without the last report: a pickle is what PersistentDataset(hash_transform=pickle_hashing) keys its
        # cache on, and the key changed after each call (with whichever subject ran last).
        return {**self.__dict__, "last_report": None}

    def _register(self, moving: Any, reference: Any, names: Sequence[str] = ("the moving image", "the reference"),
                  labels: Sequence[Any] = (), label_names: Sequence[str] = ()):
        """``(registered image, report, moved labels)``, without touching ``self`` (the dictionary version runs it in
        threads).

        ``names``: the two images in messages (the dictionary version's keys). ``labels``: label maps in the moving
        image's space (named ``label_names`` in messages), each put on the reference grid through the same
        transform with nearest neighbour (``kind=None``: resampled as placed, as the image is)."""
        from .pipeline import _itk_threads
        from .registration import register, resample
        from .registration.resample import not_for_measuring

        mv, ref = as_volume(moving, name="moving"), as_volume(reference, name="reference")
        threads = _threads(self.threads)
        report, transform = None, None
        if self.kind is None:
            if mv.same_grid(ref):  # nothing moves: MONAI's meta and transform history stay
                out = _like(mv, moving, same_grid=True)
            else:
                _warn_coverage(mv, ref, names, tail="elsewhere it holds only the background value",
                               fix="check that the images belong together; if they show the same anatomy in "
                                   "unrelated scanner coordinates, register instead of only resampling: "
                                   "RegisterToReference(d) with kind='rigid', initialise='geometry'")
                with _itk_threads(threads), not_for_measuring():
                    out = _like(resample(mv, ref, **self.options), moving)
        else:
            with _itk_threads(threads), not_for_measuring():
                res = register(ref, mv, kind=self.kind, **self.options)
            report = res.report.to_dict()
            report["itk_threads"] = threads  # None: SimpleITK's default (results may vary with the core count)
            if report.get("suspect"):
                warnings.warn(f"registration looks suspect: {'; '.join(report.get('suspect_reasons') or [])}",
                              MedfuseWarning, stacklevel=3)
            out = _like(res.resampled, moving)
            transform = res.transform if labels else None
        moved = []
        for lab, name in zip(labels, label_names):
            try:
                vol = as_volume(lab, name=name)
                if self.kind is None and vol.same_grid(ref):  # nothing moves, as for the image
                    moved.append(_like(vol, lab, same_grid=True))
                    continue
                with _itk_threads(threads):
                    # Nearest neighbour: the labels and their integer dtype kept; 0 (background) outside.
                    r = resample(vol, ref, transform=transform, interpolation="nearest", default=0)
            except MedfuseError as e:
                _name_file(e, lab)
                raise
            r.add_history("follow_registration", image=names[0].strip("'"), reference=names[1].strip("'"),
                          kind=self.kind)
            moved.append(_like(r, lab))
        return out, report, moved

    def __repr__(self) -> str:
        return _repr(self, kind=self.kind, threads=self.threads, **self.options)


def _warn_coverage(moving: Volume, reference: Volume, names: Sequence[str], *, tail: str, fix: str) -> None:
    """Refuse an image resampled (not registered) wholly outside the reference; warn when it covers little, as the
    fusion pipeline does. Why: it was resampled to background alone, and the "fused" item was the reference."""
    from .registration.resample import coverage_note

    try:
        msg = coverage_note(moving, reference, what=names[0], view=f"the field of view of {names[1]}", tail=tail,
                            fix=fix)
    except GeometryError as e:
        _name_file(e, moving)  # the file that misses, not the first image's
        raise
    if msg is not None:
        warnings.warn(msg, MedfuseWarning, stacklevel=user_stacklevel())


def _checked_register_options(kind: Optional[str], options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` when the step ``kind`` takes them all: :func:`medfuse.resample`'s ``interpolation`` and
    ``default`` for ``kind=None``, else :func:`medfuse.register`'s settings and preset keys.

    Raises:
        InvalidInputError: an option the step does not take (a typo, or ``interpolation`` with a registration),
            or an unknown ``interpolation``.
    """
    import inspect

    from .registration import register
    from .registration.presets import PRESETS
    from .registration.resample import _INTERP

    if kind is None:
        allowed = {"interpolation", "default"}
    else:
        allowed = set(inspect.signature(register).parameters) - {"fixed", "moving", "kind", "preset_overrides",
                                                                 "progress", "cancel"}
        allowed |= {k for p in PRESETS.values() for k in p}
    unknown = sorted(set(options) - allowed)
    if unknown:
        if kind is not None and "interpolation" in unknown:
            fix = ("interpolation= applies with kind=None (resampling only); to move a label map with a "
                   "registration, register its image and name the label map in label_keys: "
                   "RegisterToReferenced(keys=['image'], reference_key=..., kind=..., label_keys={'image': ['label']}) "
                   "(nearest neighbour), or medfuse.resample(labels, reference, transform=result.transform, "
                   "interpolation='nearest')")
        elif "label_keys" in unknown:
            fix = ("label_keys= belongs to the dictionary version: RegisterToReferenced(keys=['image'], "
                   "reference_key=..., label_keys={'image': ['label']})")
        else:
            fix = f"kind={kind!r} takes {', '.join(sorted(allowed))}; check the spelling"
        raise InvalidInputError(f"option(s) {', '.join(unknown)} not understood by RegisterToReference(kind={kind!r})",
                                fix=fix)
    if "interpolation" in options:
        choice(options["interpolation"], "interpolation", _INTERP,
               fix="use 'nearest' for label maps and masks, 'linear' (default) or 'bspline' for images")
    return dict(options)


class RegisterToReferenced(MapTransform):
    """Register each of ``keys`` onto ``data[reference_key]`` and put it on the reference grid.

    The registration report (a dict: metric before/after, suspect, ...) is stored under
    ``f"{key}{report_postfix}"`` unless ``report_postfix`` is ``None``.

    Args:
        keys: the moving images.
        reference_key: the fixed image.
        kind, threads, **options: see :class:`RegisterToReference`.
        report_postfix: suffix of the report's key (default ``"_registration"``).
        label_keys: label maps (segmentations, masks) that move with a moving image: ``{moving key: label key or
            [label keys]}``, or, with one moving key, a label key or a list of them. Each is put on the reference
            grid through its image's registration transform with nearest neighbour interpolation (labels and
            their integer dtype kept, 0 outside), in the type and layout it came in (a Volume records it in its
            provenance history: ``resample`` and ``follow_registration``). A label map must lie in its image's
            world frame (it may be on another grid, e.g. the image's own). With ``kind=None`` it is resampled
            as placed, as the image is. Default None: no label moves; the item holds no transform object either,
            so torch's collate is unaffected.
        allow_missing_keys: skip absent keys (moving images, and label maps) instead of failing.

    Raises:
        InvalidInputError: when built, a ``reference_key`` that is no key (a list, None), an empty
            ``report_postfix``, or ``label_keys`` that name a key not in ``keys``, a label key that is not a
            non-empty str, or one that is a moving image, the reference, a report's key or listed twice; when
            called, ``reference_key`` or a label map is not in the data; or as :class:`RegisterToReference`.
        RegistrationError: as :class:`RegisterToReference`; the message names the moving image's file.

    Example (a segmentation drawn on the moving image, onto the fixed grid)::

        RegisterToReferenced(keys=["mov"], reference_key="img", kind="rigid", label_keys={"mov": ["mov_lab"]})
    """

    def __init__(self, keys: KeysCollection, reference_key: str, *, kind: Optional[str] = "rigid",
                 threads: Optional[int] = None, report_postfix: Optional[str] = "_registration",
                 label_keys: Union[None, str, Sequence[str], Mapping[Hashable, Union[str, Sequence[str]]]] = None,
                 allow_missing_keys: bool = False, **options: Any):
        super().__init__(keys, allow_missing_keys)
        self.reference_key = _checked_key(reference_key, "reference_key")
        if report_postfix is not None and (not isinstance(report_postfix, str) or not report_postfix):
            # "" stored the report under the image's own key: the registered image was replaced by a dict.
            raise InvalidInputError(f"report_postfix must be a non-empty str or None, got {label(report_postfix)}",
                                    fix="leave it out ('_registration'), or pass None to keep no report")
        self.report_postfix = report_postfix
        # Checked here: a wrong key would fail only at the first item, inside a DataLoader worker.
        self.label_keys = _checked_label_keys(label_keys, self.keys, self.reference_key, report_postfix)
        self.register = RegisterToReference(kind=kind, threads=threads, **options)

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        if self.reference_key not in d and self.allow_missing_keys and not list(self.key_iterator(d)):
            return d  # nothing to register, nothing to register onto: skipped, as MONAI's transforms skip
        if self.reference_key not in d:
            raise InvalidInputError(f"the reference key {self.reference_key!r} is not in the data "
                                    f"(keys: {', '.join(map(str, d))})", fix="load the reference image first")
        for key in self.key_iterator(d):
            if key == self.reference_key:
                continue
            # Looked for before the registration runs: a missing label map fails at once, not after it.
            labels = [k for k in self.label_keys.get(key, ()) if k in d or not self.allow_missing_keys]
            missing = [k for k in labels if k not in d]
            if missing:
                raise InvalidInputError(
                    f"label map key(s) {', '.join(map(repr, missing))} that follow {key!r} are not in the data "
                    f"(keys: {', '.join(map(str, d))})",
                    fix="load the label maps first (e.g. LoadVolumed(keys=[..., 'label key'])), or pass "
                        "allow_missing_keys=True to skip absent ones")
            try:
                d[key], report, moved = self.register._register(
                    d[key], d[self.reference_key], (f"'{key}'", f"'{self.reference_key}'"),
                    labels=[d[k] for k in labels], label_names=[f"'{k}'" for k in labels])
            except MedfuseError as e:
                _name_file(e, d[key])
                raise
            d.update(zip(labels, moved))
            if self.report_postfix is not None:
                d[f"{key}{self.report_postfix}"] = report
        return d

    def __repr__(self) -> str:
        r = self.register
        extra = {"label_keys": {k: list(v) for k, v in self.label_keys.items()}} if self.label_keys else {}
        return _repr(self, keys=self.keys, reference_key=self.reference_key, kind=r.kind, threads=r.threads,
                     **extra, **r.options)


def _checked_label_keys(label_keys: Any, keys: Sequence[Hashable], reference_key: Hashable,
                        report_postfix: Optional[str]) -> Dict[Hashable, tuple]:
    """``label_keys`` of :class:`RegisterToReferenced` as ``{moving key: (label key, ...)}`` (``{}`` for None).

    Raises:
        InvalidInputError: a mapping key not in ``keys``, a list form with several moving keys, a label key that
            is not a non-empty str, or one that is a moving key, the reference key, a report's key or listed twice.
    """
    if label_keys is None:
        return {}
    example = (f"label_keys={{{keys[0]!r}: [{str(keys[0]) + '_label'!r}]}}" if keys
               else "label_keys={'mov': ['mov_lab']}")
    if isinstance(label_keys, Mapping):
        if reference_key in label_keys:
            raise InvalidInputError(
                f"label_keys names the reference key {reference_key!r}: its label maps are on the reference already",
                fix="leave them out of label_keys; to put one on the reference grid use "
                    "RegisterToReferenced(keys=['label'], reference_key=..., kind=None, interpolation='nearest')")
        stray = [k for k in label_keys if k not in keys]
        if stray:
            raise InvalidInputError(
                f"label_keys names moving key(s) {', '.join(map(repr, stray))} that RegisterToReferenced does not "
                f"register (its keys: {', '.join(map(repr, keys))})",
                fix=f"map each label map to the key of the image it was drawn on, listed in keys=, e.g. {example}")
        pairs = list(label_keys.items())
    elif len(keys) != 1:
        raise InvalidInputError(
            f"label_keys={label_keys!r} does not say which of the {len(keys)} moving images each label map follows",
            fix=f"pass a mapping {{moving key: [label keys]}}, e.g. {example}")
    else:
        pairs = [(keys[0], label_keys)]
    out: Dict[Hashable, tuple] = {}
    seen: Dict[str, Hashable] = {}
    reports = {f"{k}{report_postfix}" for k in keys} if report_postfix is not None else set()
    for image, labs in pairs:
        labs = [labs] if isinstance(labs, str) else labs
        if not isinstance(labs, (list, tuple)):
            raise InvalidInputError(f"the label keys that follow {image!r} must be a str or a list of str, got "
                                    f"{describe(labs)}", fix=f"pass e.g. {example}")
        for lab in labs:
            if not isinstance(lab, str) or not lab:
                raise InvalidInputError(f"a label key must be a non-empty str (a key of the data dict), got "
                                        f"{describe(lab)}", fix=f"pass e.g. {example}")
            if lab in keys or lab == reference_key:
                what = "the reference key" if lab == reference_key else "a moving image key"
                raise InvalidInputError(
                    f"label_keys lists {lab!r}, which is {what}: a label map follows its image's registration "
                    "and is not registered itself",
                    fix=f"list the label map only in label_keys (not in keys= nor as reference_key), e.g. {example}; "
                        "a label map drawn on the reference needs no moving")
            if lab in reports:
                raise InvalidInputError(f"label_keys lists {lab!r}, the key a registration report is stored under",
                                        fix="rename the label map's key, or pass report_postfix=None")
            if lab in seen:
                raise InvalidInputError(f"label_keys lists {lab!r} twice (after {seen[lab]!r} and {image!r})",
                                        fix="list each label map once, under the image it was drawn on")
            seen[lab] = image
        out[image] = tuple(labs)
    return out


# ----------------------------------------------------------------------------- fuse
class FuseModalities(Transform):
    """Fuse two or three aligned images (Volumes or MetaTensors on one grid) with :func:`medfuse.fuse`.

    Args:
        method: ``"network"`` or a classical rule (``"mean"``, ``"max"``, ``"laplacian"``, ``"wavelet"``,
            ``"gff"``).
        device: ``"cpu"`` or ``"cuda"`` for the network.
        normalise: passed to :func:`medfuse.fuse` (``"auto"``: CT window, PET SUV range, MR percentiles).
        fallback: classical method used, with a warning, when the network cannot run here (torch or the
            inference module missing, the shipped weights missing or broken, a failure of the network itself);
            never for the caller's mistakes (an unknown option, a missing or corrupt ``weights=`` file of
            theirs, a bad input). The output records what ran: meta ``medfuse_method`` and
            ``medfuse_fallback_reason`` (``""`` when none), or a Volume's ``provenance["method"]`` and
            ``provenance["fallback"]``.
        resample: put every image on the first image's grid first (no registration).
        as_tensor: return a channel-first float32 MetaTensor (default) instead of a Volume. Channel-first
            whatever the inputs' layout (``(I, J, K)`` MetaTensors included): it is a network's input, and
            MONAI's array transforms after it want the channel; its meta says "no channel"
            (``original_channel_dim`` NaN) as ``LoadImage(ensure_channel_first=True)``'s does.
        **options: passed to :func:`medfuse.fusion.fuse` for ``method`` (e.g. ``weights=[0.7, 0.3]`` for
            ``"mean"``, ``levels=3`` for ``"laplacian"``, a ``weights=`` file for ``"network"``), checked when
            the transform is built (names, a rule's values, the weights file); the ``fallback`` rule runs with
            its defaults. They are part of the transform's state, so MONAI's
            ``PersistentDataset(hash_transform=pickle_hashing)`` gives other options another cache key.

    Raises:
        InvalidInputError: when built, an unknown method, fallback (a classical rule), device or normalisation
            name, ``resample``/``as_tensor`` not True or False, or an option the method does not take (or a
            bad value of a rule's option); when called, not a list of two or three images, or an input that is
            not a Volume or MetaTensor.
        WeightsError: when built, a ``weights=`` file that is missing, unreadable or not a whole safetensors
            file; when called, one whose tensors do not fit the model (whatever ``fallback`` says).
        GeometryError: an image is not on the first one's grid (and ``resample`` is False).
    """

    def __init__(self, *, method: str = "network", device: str = "cpu", normalise: Any = "auto",
                 fallback: Optional[str] = None, resample: bool = False, as_tensor: bool = True, **options: Any):
        from .fusion.device import check_device_name, check_network_device
        from .pipeline import _fusion_method

        # Checked here: a typo would fail only at the first item (inside a DataLoader worker), and a fallback typo
        # only on the day the network could not run. A fallback is a classical rule ("network" reran the network
        # with the shipped weights in place of the caller's).
        method = _fusion_method(method)
        fallback = None if fallback is None else _fusion_method(fallback, what="fallback method", classical=True)
        check_device_name(device)
        check_network_device(method, device)
        if isinstance(normalise, str):
            choice(normalise, "normalisation", ("auto", *_NORMALISE_METHODS))
        self.method, self.device, self.normalise = method, device, normalise
        self.output_version = OUTPUT_VERSION  # part of a PersistentDataset cache key
        self.fallback, self.resample, self.as_tensor = fallback, flag(resample, "resample"), flag(as_tensor, "as_tensor")
        # Checked here too: a misspelt option (wieghts=) or a missing weights file was taken for "the network
        # cannot run", and the fallback rule ran silently under a network cache key.
        self.options = _checked_fusion_options(method, options)

    def __call__(self, images: Sequence[Any]) -> Any:
        return self._fuse(images)

    def _fuse(self, images: Sequence[Any], names: Optional[Sequence[str]] = None) -> Any:
        """Fuse ``images``; ``names`` (the dictionary keys) name them in errors (default "image 1", ...)."""
        from .pipeline import _fuse, _fusion_unavailable, _itk_threads

        if not isinstance(images, (list, tuple)) or not 2 <= len(images) <= 3:
            # A Volume, a str, None, an int or a generator: len() of them failed bare, or read a path's letters.
            what = f"{len(images)} image(s)" if isinstance(images, (list, tuple)) else describe(images)
            raise InvalidInputError(f"fusion needs a list of two or three images, got {what}",
                                    fix="pass [reference, other] or [reference, other, third], on one grid")
        keyed = names is not None
        names = list(names) if keyed else [f"image {i + 1}" for i in range(len(images))]
        vols = [as_volume(x, name=n) for x, n in zip(images, names)]
        for x, v, n in zip(images, vols, names):
            # Named by its key and its own file: the fusion's check said "volume 2" and the reference's file.
            try:
                require_finite(v.array, f"'{n}'" if keyed else n, before="fusing")
            except MedfuseError as e:
                _name_file(e, x)
                raise
        if self.resample:
            from .registration import resample
            from .registration.resample import not_for_measuring

            shown = [f"'{n}'" for n in names] if keyed else names
            for v, n in zip(vols[1:], shown[1:]):
                if not v.same_grid(vols[0]):
                    _warn_coverage(v, vols[0], (n, shown[0]), tail=f"elsewhere only {shown[0]} contributes (rules that average, "
                                   "such as mean, show it darker there: a step at the border)",
                                   fix="check that the images belong together; if they show the same anatomy in "
                                       "unrelated scanner coordinates, register them before fusing: "
                                       "RegisterToReferenced(keys=..., reference_key=..., kind='rigid', "
                                       "initialise='geometry'), then FuseModalitiesd without resample")
            with _itk_threads(_threads(None)), not_for_measuring():
                vols = [vols[0]] + [v if v.same_grid(vols[0]) else resample(v, vols[0]) for v in vols[1:]]
        else:
            _check_grids(vols, names, dict_keys=keyed)
        method_used, reason = self.method, ""
        try:
            fused = _fuse(vols, method=self.method, device=self.device, normalise=self.normalise, **self.options)
        except Exception as e:  # noqa: BLE001 - only the documented fallback is swallowed
            if not (self.method == "network" and self.fallback
                    and _fusion_unavailable(e, user_weights=self.options.get("weights") is not None)):
                raise
            reason = e.one_line() if isinstance(e, MedfuseError) else f"{e.__class__.__name__}: {e}"
            warnings.warn(f"the fusion network is not available ({reason}); using '{self.fallback}'",
                          MedfuseWarning, stacklevel=3)
            # The rule's defaults: the options were the network's (its weights= file means nothing to a rule).
            method_used = self.fallback
            fused = _fuse(vols, method=self.fallback, device=self.device, normalise=self.normalise)
        if not isinstance(fused, Volume):
            fused = vols[0].with_array(fused, modality="unknown", unit="arbitrary")
        # What ran, as fuse_files' sidecar records it: a fallback result must not pass for the network's.
        fused.provenance["method"] = method_used
        if reason:
            fused.provenance["fallback"] = {"requested": self.method, "used": method_used, "reason": reason}
        if not self.as_tensor:
            return fused
        # On the reference's grid: its loading grid (original_affine, spatial_shape), header fields and transform
        # history go with it, as MONAI's ConcatItemsd keeps the first key's; they were the fusion's own grid, so
        # SaveImaged(resample=True) wrote the fused image on the resampled grid.
        out = _keep_meta(fused.with_array(np.asarray(fused.array, dtype=np.float32)).to_metatensor(), images[0],
                         same_grid=True)
        # Always both keys (MONAI's collate keeps only the meta keys every item of a batch has).
        out.meta["medfuse_method"] = method_used
        out.meta["medfuse_fallback_reason"] = reason
        src = _source(images[0])
        if src is not None:  # on the reference's grid: named after it, as MONAI's loaders and SaveImage do
            out.meta["filename_or_obj"] = os.fspath(src)
        return out

    def __repr__(self) -> str:
        return _repr(self, method=self.method, device=self.device, normalise=self.normalise,
                     fallback=self.fallback, resample=self.resample, as_tensor=self.as_tensor, **self.options)


#: The network's options when :mod:`medfuse.fusion.infer` cannot be imported to read them (keep in step with
#: ``infer.fuse_arrays``).
_NETWORK_OPTIONS = ("weights", "batch_size", "mode", "functional", "refine")


def _network_option_names() -> set:
    """The options :func:`medfuse.fusion.infer.fuse_arrays` takes (its signature), besides the images and device."""
    try:
        import inspect

        from .fusion import infer
    except ImportError:  # the network cannot run here; its options are still known
        return set(_NETWORK_OPTIONS)
    return set(inspect.signature(infer.fuse_arrays).parameters) - {"arrays", "device", "progress", "cancel"}


def _checked_fusion_options(method: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` when ``method`` takes them all (and a network ``weights=`` file is there and readable).

    Raises:
        InvalidInputError: an option ``method`` does not take (a typo such as ``wieghts=``), a bad value for a
            classical rule's option, or ``weights`` that is not a path.
        WeightsError: the network's ``weights=`` file is missing, unreadable or not a safetensors file.
    """
    from .fusion.classical import _OPTIONS, _check_options, _unknown_options

    allowed = _network_option_names() if method == "network" else set(_OPTIONS[method])
    unknown = sorted(set(options) - allowed - {"progress", "cancel"})
    if unknown and method != "network":
        raise _unknown_options(method, unknown)  # with the near name of a typo, as medfuse.fuse says it
    if unknown:
        raise InvalidInputError(f"option(s) {', '.join(unknown)} not understood by method {method!r}",
                                fix=f"{method} takes {', '.join(sorted(allowed)) or 'no options'}; check the spelling")
    if method != "network":
        _check_options(method, options)
        return dict(options)
    try:
        from .fusion import infer
    except ImportError:  # no torch: the network's own error comes at the first item (or the fallback runs)
        return dict(options)
    infer.check_options(**{k: v for k, v in options.items() if k in ("mode", "batch_size", "functional", "refine")})
    if options.get("weights") is not None:
        infer.check_weights_file(options["weights"])
    return dict(options)


def _check_grids(vols: Sequence[Volume], names: Sequence[str], *, dict_keys: bool) -> None:
    """Refuse images off the reference's grid, naming them and the transform that puts them on it.

    :func:`medfuse.fuse` refuses them too, but says "volume 2" and points to ``medfuse.register``; inside a
    ``Compose`` the user thinks in keys and mends it with a transform.
    """
    for v, name in zip(vols[1:], names[1:]):
        if v.same_grid(vols[0]):
            continue
        if dict_keys:
            fix = (f"register it onto the reference first: RegisterToReferenced(keys=[{name!r}], "
                   f"reference_key={names[0]!r}) before the fusion; if the two already share one world frame "
                   "(e.g. BraTS sequences, a PET/CT), FuseModalitiesd(..., resample=True) or "
                   "RegisterToReferenced(..., kind=None) only resamples")
        else:
            fix = ("register it onto the reference first (RegisterToReference, medfuse.register); if the two "
                   "already share one world frame, FuseModalities(resample=True) only resamples")
        raise GeometryError(f"{name!r} is on a different grid than the reference {names[0]!r}: "
                            f"{vols[0].grid_difference(v)}", fix=fix)


class FuseModalitiesd(MapTransform):
    """Fuse ``data[k] for k in keys`` (in that order; the first is the reference grid) into ``output_key``.

    Args:
        keys: two or three aligned images (see :class:`RegisterToReferenced`).
        output_key: where the fused image goes (default ``"fused"``).
        delete_keys: drop the input images afterwards (saves memory in cached datasets).
        method, device, normalise, fallback, resample, as_tensor, **options: see :class:`FuseModalities`.
        allow_missing_keys: fuse the keys present (a subject without its third image gets the other two
            fused); with fewer than two present the item passes through unchanged, without ``output_key``.

    Raises:
        GeometryError: an image is not on the first key's grid; the message names both keys, how the grids
            differ and the transform that mends it (``RegisterToReferenced``, or ``resample=True``).
        InvalidInputError: when built, ``keys`` that are not two or three different keys, an ``output_key`` that is
            no key (None, a list) or as :class:`FuseModalities`; when called, fewer than two of the keys present
            (without ``allow_missing_keys``), an input that is not an image or holds NaN or infinite values (named
            by its key and file), an option the method lacks.
    """

    def __init__(self, keys: KeysCollection, *, output_key: str = "fused", method: str = "network",
                 device: str = "cpu", normalise: Any = "auto", fallback: Optional[str] = None,
                 resample: bool = False, as_tensor: bool = True, delete_keys: bool = False,
                 allow_missing_keys: bool = False, **options: Any):
        super().__init__(keys, allow_missing_keys)
        # When built, not at the first item inside a DataLoader worker; the same key twice fused an image with itself.
        # More than three with allow_missing_keys: the modalities a subject may have, two or three of them present.
        most = len(self.keys) if allow_missing_keys else 3
        if not 2 <= len(self.keys) <= most or len(set(self.keys)) != len(self.keys):
            raise InvalidInputError(f"fusion needs two or three different image keys, got {list(self.keys)}",
                                    fix="list the image keys to fuse, reference first, e.g. keys=['t1c', 't2f'] "
                                        "(more with allow_missing_keys=True, two or three present per item)")
        self.output_key, self.delete_keys = _checked_key(output_key, "output_key"), flag(delete_keys, "delete_keys")
        self.fuse = FuseModalities(method=method, device=device, normalise=normalise, fallback=fallback,
                                   resample=resample, as_tensor=as_tensor, **options)

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if len(keys) < 2:
            if self.allow_missing_keys and len(self.keys) >= 2:
                return d
            raise InvalidInputError(f"fusion needs two or three images, got keys {keys}",
                                    fix="list the image keys to fuse, reference first")
        try:
            d[self.output_key] = self.fuse._fuse([d[k] for k in keys], names=[str(k) for k in keys])
        except MedfuseError as e:
            _name_file(e, d[keys[0]])
            raise
        if self.delete_keys:
            for k in keys:
                if k != self.output_key:
                    d.pop(k, None)
        return d

    def __repr__(self) -> str:
        f = self.fuse
        return _repr(self, keys=self.keys, output_key=self.output_key, method=f.method, device=f.device,
                     normalise=f.normalise, fallback=f.fallback, resample=f.resample, as_tensor=f.as_tensor,
                     delete_keys=self.delete_keys, allow_missing_keys=self.allow_missing_keys, **f.options)
