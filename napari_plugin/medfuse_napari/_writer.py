"""napari writer: save an image layer as NIfTI / MetaImage / NRRD with its true geometry.

napari's own writers save the pixels only (``.tif``, ``.npy``): a fused or registered volume saved that way
loses where it lies in the patient. This writer rebuilds the medfuse ``Volume`` from the layer (the file's
voxel order and affine kept in the layer metadata, plus any placement a registration gave the layer in napari)
and writes it with :func:`medfuse.save` (atomic; never onto the file the layer was read from, nor onto a file
another open layer was read from). A layer that medfuse made or moved (fused, registered, resampled) also gets
a provenance sidecar (``fused.nii.gz`` -> ``fused.json``), as the CLI writes one.

The sidecar records the inputs' SHA-256. napari's writer contract is synchronous (it returns the paths written)
and runs on the GUI thread, where hashing a large DICOM series froze napari for seconds. So hashes are kept:
:func:`prehash_inputs` hashes a layer's input files ahead of time (call it in the worker that loads or fuses the
layer), and the writer takes a kept hash when the files' names, sizes and modification times are unchanged since;
otherwise (or the first time a file is saved from without that call) it hashes them then.

Errors are :class:`LayerSaveError` (or :class:`~medfuse.errors.OutputExistsError`, or
:class:`~medfuse.errors.OutputWriteError` for a full disk, a forbidden or missing folder), never a ``ValueError``:
napari 0.9.2 (``napari.plugins._npe2.write_layers``) reads any ``ValueError`` from a writer it picked by the
file's ending as "no writer found", drops it and only warns "No data written! A plugin could not be found ..."
(``layer.save(path)``, ``viewer.layers.save(path)`` and ``plugin="medfuse"`` alike), so the reason would never
reach the user.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from medfuse.errors import MedfuseError, OutputExistsError

from ._layers import layer_array, meta, native_volume, units_to_mm, volume_digest, world_matrix

#: The endings this writer writes (the manifest's ``filename_extensions``; ``.mhd``/``.nhdr`` add a ``.raw``).
SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
#: Endings of other formats: a name ending so is refused, not given ``.nii.gz`` on top.
_OTHER_FORMATS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".svg", ".npy", ".npz", ".zarr",
                  ".csv", ".json", ".dcm", ".img", ".hdr", ".h5", ".tfm", ".txt", ".mat")
#: What a layer's provenance holds when medfuse made it (fusion, resampling) rather than read it as is.
_DERIVED_KEYS = ("fusion", "method", "sources", "history", "weights_sha256", "warnings")


#: Input hashes kept for the session: resolved path -> (what the files looked like on disk, sha256).
_HASHES: Dict[str, Tuple[tuple, str]] = {}
_HASHES_LOCK = threading.Lock()  # prehash_inputs runs in workers, the writer on the GUI thread


def _disk_signature(p: Path) -> Optional[tuple]:
    """Names, sizes and modification times of the files :func:`medfuse.provenance.hash_path` reads for ``p`` (a
    file, with the data file a .mhd/.nhdr header names; or a folder's files, hidden ones left out); None when
    they cannot be read. Stat calls only: milliseconds for a thousand-file series."""
    from medfuse.provenance import _detached_data_file

    try:
        if p.is_file():
            files = [p] + [d for d in [_detached_data_file(p)] if d is not None]
        elif p.is_dir():
            files = sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith("."))
        else:
            return None
        out = []
        for f in files:
            st = f.stat()
            out.append((os.fspath(f), st.st_size, st.st_mtime_ns))
        return tuple(out)
    except (OSError, ValueError, MedfuseError):
        return None


def input_hash(path: Union[str, os.PathLike]) -> Optional[str]:
    """SHA-256 of an input file or folder (:func:`medfuse.provenance.hash_path`), kept for the session.

    A kept hash is used while the files' names, sizes and modification times are unchanged; otherwise the files
    are hashed (and the hash kept when they did not change meanwhile).

    Args:
        path: the file or folder a layer was read from.

    Returns:
        The hex digest, or None when the path is missing or unreadable.
    """
    from medfuse import provenance as prov

    p = Path(path)
    sig = _disk_signature(p)
    if sig is None:
        return None
    key = os.path.realpath(p)
    with _HASHES_LOCK:
        kept = _HASHES.get(key)
    if kept is not None and kept[0] == sig:
        return kept[1]
    try:
        digest = prov.hash_path(p)
    except (OSError, MedfuseError):
        return None
    if _disk_signature(p) == sig:  # not changed while it was read: safe to keep
        with _HASHES_LOCK:
            _HASHES[key] = (sig, digest)
    return digest


def prehash_inputs(sources: Union[Mapping[str, Any], Iterable[Union[str, os.PathLike]]]) -> Dict[str, Optional[str]]:
    """Hash a layer's input files now, so that saving the layer later does not hash them on the GUI thread.

    Call it from a worker thread (napari's ``thread_worker``) when a layer is read or made: the reader's
    load, the fusion, the registration. Cheap when the hashes are kept already.

    Args:
        sources: a layer's metadata (``layer.metadata``, or its ``"medfuse"`` part) or the input paths.

    Returns:
        ``{path: sha256 or None}`` for the inputs found.
    """
    if isinstance(sources, Mapping):
        md = sources.get("medfuse", sources)
        paths = _sources(dict(md) if isinstance(md, Mapping) else {})
    else:
        paths = [os.fspath(s) for s in sources if isinstance(s, (str, os.PathLike))]
    return {p: input_hash(p) for p in paths}


class LayerSaveError(MedfuseError):
    """The medfuse writer cannot save this layer (or not to this name).

    Why its own class, not ``InvalidInputError``: that is a ``ValueError``, which napari 0.9.2 swallows (see the
    module docstring).
    """


def _layer_like(data: Any, attributes: Dict[str, Any]) -> SimpleNamespace:
    """The parts of a napari Image layer that :mod:`._layers` reads, from a writer's ``(data, attributes)``."""
    ndim = np.ndim(data[0] if attributes.get("multiscale") else data)
    return SimpleNamespace(
        data=data, name=attributes.get("name", "layer"), metadata=attributes.get("metadata") or {},
        multiscale=bool(attributes.get("multiscale", False)), rgb=bool(attributes.get("rgb", False)),
        scale=tuple(attributes.get("scale", (1.0,) * ndim)), translate=tuple(attributes.get("translate", (0.0,) * ndim)),
        rotate=np.asarray(attributes.get("rotate", np.eye(ndim))), shear=np.asarray(attributes.get("shear", ())),
        affine=SimpleNamespace(affine_matrix=np.asarray(attributes.get("affine", np.eye(ndim + 1)))))


def _mm_factors(units: Any, name: str) -> Optional[np.ndarray]:
    """Millimetres per world unit of each axis of a layer's ``units``; None when they are napari's default (pixel).

    Raises:
        LayerSaveError: a unit that is not a length (seconds, say), or one pint does not know.
    """
    # One conversion for the writer and the widget (:func:`._layers.units_to_mm`), with the writer's error and fix.
    return units_to_mm(units, name, error=LayerSaveError,
                       fix=("give the layer length units (nm, um, mm, cm or m) in napari, or save it with napari's "
                            "own writers (.tif: pixels only)"))


def _attributes_in_mm(attributes: Dict[str, Any], ndim: int) -> Dict[str, Any]:
    """``attributes`` with ``scale`` and ``translate`` in mm (medfuse files store mm), converted from ``units``.

    Why: a layer from another plugin in micrometres with scale 2 was saved with 2 mm spacing, without a word.

    Raises:
        LayerSaveError: units that are not lengths, or mixed units on a rotated/sheared/affine-placed layer.
    """
    name = str(attributes.get("name", "layer"))
    factors = _mm_factors(attributes.get("units"), name)
    if factors is None or np.allclose(factors, 1.0):
        return attributes
    if factors.size != ndim:
        factors = np.resize(factors[-ndim:], ndim)
    out = dict(attributes)
    out["scale"] = tuple(np.asarray(attributes.get("scale", (1.0,) * ndim), float) * factors)
    out["translate"] = tuple(np.asarray(attributes.get("translate", (0.0,) * ndim), float) * factors)
    affine = np.asarray(attributes.get("affine", np.eye(ndim + 1)), float)
    rotate = np.asarray(attributes.get("rotate", np.eye(ndim)), float)
    shear = np.asarray(attributes.get("shear", ()), float)
    placed = not (np.allclose(affine, np.eye(ndim + 1)) and np.allclose(rotate, np.eye(ndim))
                  and (shear.size == 0 or np.allclose(shear, 0)))
    if placed:
        if not np.allclose(factors, factors[0]):
            raise LayerSaveError(f"layer '{name}' mixes axis units ({', '.join(map(str, attributes['units']))}) and "
                                 f"is rotated, sheared or placed by an affine, so medfuse cannot convert its placement "
                                 f"to mm",
                                 fix="give every axis the same length unit in napari, then save again")
        # One factor: rotation and shear commute with it; only the affine's translation is in the layer's units.
        affine = affine.copy()
        affine[:ndim, ndim] *= factors[0]
        out["affine"] = affine
    return out


def layer_volume(data: Any, attributes: Dict[str, Any]):
    """The Volume a layer shows: the file's grid (or the display grid) placed where napari draws it.

    Raises:
        LayerSaveError: not a 3-D greyscale layer.
    """
    from medfuse.volume import Volume

    attributes = _attributes_in_mm(attributes, np.ndim(data[0] if attributes.get("multiscale") else data))
    layer = _layer_like(data, attributes)
    arr = data[0] if layer.multiscale else data
    if np.ndim(arr) != 3 or layer.rgb:
        series = np.ndim(arr) == 4 and not layer.rgb  # a 4-D series from the reader (fMRI, multi-echo, gated)
        raise LayerSaveError(f"layer '{layer.name}' is not a 3-D greyscale volume (shape {np.shape(arr)}); "
                             "medfuse writes volumes",
                             fix=("split it into volumes (right-click it in the layer list › Split Stack) and "
                                  "save those" if series else "save a 3-D image layer") +
                             ", or use napari's own writers (.tif, .png) for other layers (pixels only, no geometry)")
    vol = native_volume(layer)
    placed = world_matrix(layer)  # a registration applied in napari moves the grid, not the voxels
    if not np.allclose(placed, np.eye(4), atol=1e-9):
        vol = Volume(vol.array, placed @ vol.affine, modality=vol.modality, unit=vol.unit,
                     provenance=vol.provenance)
    return vol


def _target(path: str) -> tuple[Path, bool]:
    """The file to write and whether an existing one may be replaced.

    A name without one of :data:`SUFFIXES` (napari's save dialog passes the name as typed, e.g. the layer name
    ``fused (mean)`` or ``pet.ac``) gets ``.nii.gz``, as napari itself adds for ``layer.save("fused")``; without
    this, :func:`medfuse.save` would write a DICOM series folder of that name. napari's dialog asked about the
    name typed, not that one, so an existing file there is not replaced.
    """
    p = Path(path)
    low = p.name.lower()
    if low.endswith(SUFFIXES):
        return p, True
    if low.endswith(_OTHER_FORMATS):
        raise LayerSaveError(f"the medfuse writer writes {', '.join(SUFFIXES)} files, not {p.suffix}",
                             fix="end the name in .nii.gz (NIfTI: 3D Slicer, ITK-SNAP, FSL), .mha or .nrrd; for "
                                 "pixels only choose napari's own writer; for a DICOM series use "
                                 "medfuse.save(volume, folder) or the medfuse CLI", path=p)
    return p.with_name(p.name + ".nii.gz"), False


def _open_inputs() -> List[str]:
    """The files the layers open in napari, in any of its viewers, were read from: never written over (napari or
    medfuse layers)."""
    found: List[Any] = []
    for layer in _open_layers():
        own = _sources(meta(layer))
        # napari's source path only for a layer medfuse did not read: for a study folder opened whole it is the
        # study, and saving `study/fused.nii.gz` beside its series folders was refused, although no file of any
        # series is touched; the layer's own source is the series' folder (or the file) it was read from.
        found += own or [getattr(getattr(layer, "source", None), "path", None)]
    return [os.fspath(s) for s in found if isinstance(s, (str, os.PathLike)) and os.fspath(s)]


def _open_layers() -> List[Any]:
    """The layers of every open napari viewer.

    Why not only ``napari.current_viewer()``: with two viewers, a layer saved from one was written over a file open
    in the other. napari 0.9 has no public list of viewers: ``Viewer._instances`` (a WeakSet it keeps and empties on
    close) is read when it exists, the current viewer always.
    """
    try:
        import napari

        viewers = [napari.current_viewer(), *list(getattr(napari.Viewer, "_instances", ()))]
    except Exception:  # no Qt / no window: nothing is open
        return []
    layers: List[Any] = []
    seen = set()
    for viewer in viewers:
        if viewer is None or id(viewer) in seen:
            continue
        seen.add(id(viewer))
        try:
            layers.extend(getattr(viewer, "layers", ()))
        except Exception:  # a viewer being closed: its layers are gone  # noqa: BLE001
            continue
    return layers


def _refuse_open_inputs(target: Path) -> None:
    from medfuse.io._atomic import input_files, same_file

    for src in input_files(_open_inputs()):
        if same_file(target, src):
            raise OutputExistsError("refusing to write onto a file (or into a folder) that a layer open in napari "
                                    "was read from: inputs are never modified",
                                    fix="choose another name, or close that layer first", path=target)


def _resolve_volume(md: Dict[str, Any], layer: Any) -> Dict[str, Any]:
    """``md`` with the provenance's ``volume_index`` of a volume split from a 4-D layer (napari's *Split Stack*).

    The parts carry the 4-D layer's metadata, which cannot say which volume each is; the reader kept each volume's
    digest, so the part's voxels tell. A part whose voxels match no volume (edited since) or several (identical
    volumes) records no index, and a warning in its sidecar says why, rather than a wrong one.
    """
    digests = md.get("volume_digests")
    if not isinstance(digests, list):
        return md
    out = {k: v for k, v in md.items() if k != "volume_digests"}
    prov = {k: v for k, v in dict(md.get("provenance") or {}).items() if k != "volume_index"}
    data = layer_array(layer)
    digest = volume_digest(data) if data.ndim == 3 else None
    matches = [i for i, d in enumerate(digests) if d == digest]
    if len(matches) == 1:
        prov["volume_index"] = matches[0]
    else:
        why = "its voxels differ from every volume read (edited)" if not matches else \
            f"its voxels are those of volumes {', '.join(map(str, matches))}"
        prov["warnings"] = [*list(prov.get("warnings") or []),
                            f"a volume of a 4-D series of {len(digests)} volumes: volume_index not recorded, since "
                            f"{why}"]
    out["provenance"] = prov
    return out


def _is_derived(md: Dict[str, Any], placed: bool) -> bool:
    """Whether the layer gets a sidecar: made or moved by medfuse, or one volume of a 4-D series.

    Why a volume of a series counts (a *Split Stack* part, or a volume the reader opened as its own layer): its
    file alone cannot say which volume it is (a part of the GE EPI series saved unmoved had no record of it); the
    ``volume_index`` (:func:`_resolve_volume` finds a part's) is kept in the sidecar.
    """
    prov = md.get("provenance") or {}
    volumes = max(_count(prov.get("n_volumes")), _count(md.get("n_volumes")))
    split = prov.get("volume_index") is not None and volumes > 1
    return placed or split or bool(md.get("registration")) or any(prov.get(k) for k in _DERIVED_KEYS)


def _count(value: Any) -> int:
    """A volume count from metadata as an int (0 when missing or not a number)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _sources(md: Dict[str, Any]) -> List[str]:
    prov = md.get("provenance") or {}
    found = [prov.get("source"), *(prov.get("sources") or [])]
    return list(dict.fromkeys(os.fspath(s) for s in found if isinstance(s, (str, os.PathLike)) and os.fspath(s)))


def identity_sources(md: Dict[str, Any]) -> List[str]:
    """The files whose patient identifiers a layer's sidecar must blank: its own sources, and those of the layers
    it was registered onto (``identity_sources``, kept in memory only).

    Why: a PET read from ``DOE^JOHN_pet.nii.gz`` (a NIfTI holds no patient module) registered onto that patient's
    DICOM CT was saved with a sidecar quoting the file name verbatim: only the CT's headers name the patient.
    """
    extra = [os.fspath(s) for s in md.get("identity_sources") or [] if isinstance(s, (str, os.PathLike))]
    return list(dict.fromkeys([*_sources(md), *extra]))


def _check_sidecar(target: Path) -> Optional[Path]:
    """The sidecar path; refused when someone's own JSON (not a medfuse record) holds it, or when it is the
    record of another output sharing the name (``fused.json`` of ``fused.nii.gz`` when saving ``fused.mha``).

    napari's dialog asked before replacing the image, never about its sidecar: a medfuse record there is replaced
    only when it is this output's own (or a stale one whose output is gone); the core's
    :func:`medfuse.provenance.check_sidecar` tells which, and refuses another output's record even with
    ``overwrite`` (as the CLI does).
    """
    from medfuse import provenance as prov

    side = prov.sidecar_path(target)
    if (side.is_file() or side.is_symlink()) and not prov.is_medfuse_record(prov.read_sidecar(target)):
        raise OutputExistsError("the provenance sidecar of this output would replace a JSON file medfuse did not "
                                "write", fix="choose another output name, or move that file away", path=side)
    # overwrite=True: the user's own JSON was refused above; what is left is a folder (refused) or a medfuse
    # record, this output's (replaced with the image) or another output's (refused even so).
    return prov.check_sidecar(target, overwrite=True)


def _own_record(target: Path) -> Optional[Path]:
    """The medfuse sidecar that describes ``target`` itself (its record names it), before ``target`` is replaced
    by a layer that gets no record; else None (no sidecar, a link, someone's own JSON, another output's record).

    A record whose output name was blanked (a name quoting the patient) is ``target``'s when the output hash it
    holds is that of the file now at ``target``.
    """
    from medfuse import provenance as prov

    side = prov.sidecar_path(target)
    if side.is_symlink() or not side.is_file():
        return None
    rec = prov.read_sidecar(target)
    if not prov.is_medfuse_record(rec):
        return None
    recorded = rec.get("output") if isinstance(rec.get("output"), Mapping) else {}
    name = os.path.basename(str(recorded.get("path") or ""))
    if name.casefold() == target.name.casefold():
        return side
    if "[removed]" in name and recorded.get("sha256") and (target.is_file() or target.is_dir()):
        try:
            return side if prov.hash_path(target) == recorded.get("sha256") else None
        except (OSError, MedfuseError):
            return None
    return None


def _remove_stale_record(side: Path, written: Path) -> None:
    """Remove the sidecar that described the file just replaced: it would claim a fusion or registration, with an
    output hash that no longer matches, for an image that had neither."""
    from medfuse.errors import OutputWriteError
    from medfuse.io._atomic import input_files, same_file

    if any(same_file(side, src) for src in input_files(_open_inputs())):
        return  # never an input, whatever it holds
    try:
        side.unlink()  # one atomic step, after the new image is in place
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OutputWriteError(f"{written.name} was written, but the provenance sidecar {side.name} of the file it "
                               f"replaced could not be removed ({exc.strerror or exc}): it no longer describes "
                               f"{written.name}", errno=exc.errno, fix=f"delete {side.name}", path=side) from exc


#: Files of an input folder whose header is read for its series descriptions (group 0008, as
#: :func:`medfuse.provenance.patient_identifiers` reads it: about 0.2 ms a file).
_DESCRIPTION_FILES = 256


def _descriptions_in(md: Mapping[str, Any]) -> List[str]:
    desc = (md.get("provenance") or {}).get("series_description") if isinstance(md, Mapping) else None
    return [str(desc)] if desc else []


def _series_descriptions(md: Dict[str, Any], names: Iterable[Any]) -> List[str]:
    """The series descriptions a layer name in this layer's record may hold: the layer's own, those of the layers
    open in napari (the fusion's or registration's other layers, named ``MR ax_t1`` by the reader when their
    folder name held a patient identifier), and, when one of ``names`` is no open layer's (closed or renamed
    before saving), those in the DICOM headers of the layer's source files.

    Args:
        md: the layer's ``metadata["medfuse"]``.
        names: the layer names the record holds.

    Returns:
        The descriptions, as stored and with their whitespace collapsed (as the reader puts them in names).
    """
    from medfuse import provenance as prov

    found = _descriptions_in(md)
    open_names = set()
    for layer in _open_layers():
        found += _descriptions_in(meta(layer))
        open_names.add(str(getattr(layer, "name", "")))
    # The headers only then: reading them is on napari's GUI thread (0.23 s for 600 files in the page cache).
    unknown = any(isinstance(n, str) and n not in open_names for n in names)
    for src in _sources(md) if unknown else ():
        p = Path(src)
        try:
            files = [p] if p.is_file() else prov._candidate_files(p, _DESCRIPTION_FILES) if p.is_dir() else []
        except OSError:
            files = []
        for f in files:
            ds = prov._read_ids(f)  # None for an image file or a file that is not DICOM
            desc = ds.get("SeriesDescription") if ds is not None else None
            if desc:
                found.append(str(desc))
    out = {d.strip(): None for d in found if d.strip()}
    out.update({" ".join(d.split()): None for d in list(out)})
    return sorted(out, key=len, reverse=True)


def _blank_names(value: Any, descriptions: List[str]) -> Any:
    """``value`` (a layer name, or a list or mapping of them) with any series description in it blanked."""
    from medfuse import provenance as prov

    return prov.scrub(value, descriptions) if descriptions and value is not None else value


def _sidecar_record(target: Path, vol: Any, md: Dict[str, Any], name: str, placed: np.ndarray) -> Dict[str, Any]:
    """A provenance record as the CLI writes one: the inputs' files, how the layer was made, where it was put."""
    from medfuse import provenance as prov

    # UIDs stay out: they tie the record to a study (names and IDs are blanked by write_sidecar); so does a series
    # description, free text that may name the patient or a physician (the README: never in sidecars).
    # patient_key: salted in this session only (medfuse._patient), never written.
    layer_prov = {k: v for k, v in prov.for_sidecar(md.get("provenance") or {}).items()
                  if "uid" not in k.lower() and "description" not in k.lower() and k != "patient_key"}
    # Layer names are recorded (the fusion's inputs and grid, the registration's fixed layer, this layer), but the
    # reader names a DICOM layer by modality + series description when its folder name holds an identifier
    # (`MR ax_asc_35sl`), and a user may type one: that part is blanked, the rest of the name kept.
    registration = md.get("registration")
    recorded = dict(layer_prov.get("fusion") or {})
    named = [*(recorded.get("inputs") or []), recorded.get("grid"),
             *([registration.get("to"), registration.get("resampled_onto")] if isinstance(registration, Mapping)
               else [])]
    descriptions = _series_descriptions(md, named)
    fusion = {k: (_blank_names(v, descriptions) if k in ("inputs", "grid") else v)
              for k, v in recorded.items()}
    if "fusion" in layer_prov:
        layer_prov["fusion"] = fusion
    if isinstance(registration, Mapping):
        registration = {k: (_blank_names(v, descriptions) if k in ("to", "resampled_onto") else v)
                        for k, v in registration.items()}
    # Kept hashes where the files are unchanged (prehash_inputs): hashing a large series here froze napari.
    inputs = [{"role": "source", "path": src, "sha256": input_hash(src)} for src in _sources(md)]
    return prov.build(
        inputs=inputs, output=target, output_sha256=prov.hash_path(target),
        parameters={k: fusion[k] for k in ("method", "inputs", "grid") if k in fusion},
        registration=registration, weights_sha256=layer_prov.get("weights_sha256"),
        extra={"written_by": "medfuse napari writer", "layer": _blank_names(name, descriptions),
               "modality": vol.modality, "unit": vol.unit,
               "placement_lps": None if np.allclose(placed, np.eye(4), atol=1e-9) else placed.tolist(),
               "warnings": list(layer_prov.get("warnings") or []), "layer_provenance": layer_prov})


def write_image(path: str, data: Any, attributes: Dict[str, Any]) -> List[str]:
    """npe2 single-layer writer: ``path`` ends in .nii.gz, .nii, .mha, .mhd, .nrrd or .nhdr (else ``.nii.gz`` is added).

    napari's save dialog has already asked before replacing an existing file, so an existing output is
    replaced; the file the layer was read from, or any open layer was read from, never is. A layer medfuse made
    or moved, or one volume of a 4-D series, also gets its provenance sidecar (``x.json``); a layer saved as read
    over an output removes that output's own medfuse record, which would describe it falsely.

    Returns:
        The paths written: the image, then the sidecar if any.

    Raises:
        LayerSaveError: the layer is not a 3-D greyscale volume, the name is another format's, or the volume
            cannot be stored (why and the fix in the message).
        OutputExistsError: the output is an input, or a JSON of the user's, a folder or another output's
            record (``fused.json`` of ``fused.nii.gz`` when saving ``fused.mha``) is where the sidecar goes.
        OutputWriteError: its folder is missing or not writable, the disk is full, the name is too long
            (``errno`` says which); or the record of the file replaced by a layer saved as read could not be
            removed.
    """
    import medfuse
    from medfuse import provenance as prov

    name = str(attributes.get("name", "layer"))
    try:
        target, replace = _target(path)
        vol = layer_volume(data, attributes)
        # In mm, as layer_volume placed the volume (a layer in um from another plugin).
        layer = _layer_like(data, _attributes_in_mm(attributes, vol.array.ndim))
        md = _resolve_volume(dict((attributes.get("metadata") or {}).get("medfuse") or {}), layer)
        placed = world_matrix(layer)
        derived = _is_derived(md, not np.allclose(placed, np.eye(4), atol=1e-9))
        _refuse_open_inputs(target)
        if derived:
            _check_sidecar(target)  # before the image: never an image without its record
        # A layer as read gets no record: one left by an earlier output of this name would describe it falsely.
        stale = None if derived else _own_record(target)
        try:
            written = medfuse.save(vol, target, overwrite=replace)
        except OutputExistsError as exc:
            if replace or "overwrite=True" not in (exc.fix or ""):
                raise
            # The Python fix (overwrite=True) means nothing in a dialog: say how to replace it there.
            raise OutputExistsError(
                f"{target.name} exists: the dialog asked about the name typed, '{Path(path).name}', not about it",
                fix=f"type the whole name, '{target.name}', to replace it (the dialog then asks first), or choose "
                    "another name", path=target) from None
        out = [str(written)]
        if derived:
            out.append(str(prov.write_sidecar(written, _sidecar_record(written, vol, md, name, placed),
                                              input_paths=identity_sources(md))))
        elif stale is not None:
            _remove_stale_record(stale, Path(written))
    except ValueError as exc:  # InvalidInputError, GeometryError or a library's: napari would hide it
        if isinstance(exc, MedfuseError):
            raise LayerSaveError(exc.problem, fix=exc.fix, path=exc.path) from exc
        raise LayerSaveError(f"layer '{name}' could not be saved: {exc}",
                             fix="check the layer's data (a 3-D greyscale volume) and the output name") from exc
    return out


def write_labels(path: str, data: Any, attributes: Dict[str, Any]) -> List[str]:
    """npe2 single-layer writer for a Labels layer (a mask drawn on a CT, say), through :func:`write_image`.

    The label values are written exactly, as integers (never interpolated: the voxels are written as they are, with
    the layer's geometry in the affine), so a mask reopens on the image it was drawn on. A mask made with an image
    layer's metadata (``metadata=ct.metadata``) is saved in that file's voxel order; its modality and unit are not
    the image's (``unknown``, ``arbitrary``).

    Returns:
        The paths written: the image, then a provenance sidecar when the mask was moved in napari.

    Raises:
        LayerSaveError: the mask is not 3-D or its values are not integers; as :func:`write_image` otherwise.
    """
    name = str(attributes.get("name", "labels"))
    arr = data[0] if attributes.get("multiscale") else data
    dtype = np.dtype(getattr(arr, "dtype", None) or np.asarray(arr).dtype)
    if dtype == bool:
        data = [np.asarray(d, dtype=np.uint8) for d in data] if attributes.get("multiscale") else \
            np.asarray(data, dtype=np.uint8)
    elif not np.issubdtype(dtype, np.integer):
        raise LayerSaveError(f"labels layer '{name}' holds {dtype} values, not integer labels",
                             fix="convert it to integers in napari (layer.data = layer.data.astype('uint16')), "
                                 "then save again")
    attributes = dict(attributes)
    attributes["rgb"] = False
    md = dict((attributes.get("metadata") or {}).get("medfuse") or {})
    if not md:
        md = _grid_of_open_image(data, attributes)
    if md:  # a mask is neither a CT in HU nor a PET in SUV, whatever image it was made from
        md.update(modality="unknown", unit="arbitrary")
        attributes["metadata"] = {**dict(attributes.get("metadata") or {}), "medfuse": md}
    return write_image(path, data, attributes)


def _grid_of_open_image(data: Any, attributes: Dict[str, Any]) -> Dict[str, Any]:
    """The file geometry (true affine, display grid) of an open medfuse image whose grid the mask has; else {}.

    Why: a mask drawn on a CT (``add_labels(..., scale=ct.scale, translate=ct.translate)``, napari's *new labels*)
    carries no metadata and would be saved in napari's display order; on the CT's grid it is saved in the CT file's
    own voxel order, so it lines up voxel for voxel with the file. No provenance is borrowed.
    """
    from ._layers import _file_grid, layer_matrix

    layer = _layer_like(data, _attributes_in_mm(attributes, np.ndim(data[0] if attributes.get("multiscale")
                                                                     else data)))
    shape = np.shape(layer_array(layer))
    if len(shape) != 3:
        return {}
    own = layer_matrix(layer.scale, layer.translate)
    for image in _open_layers():
        md = meta(image)
        if type(image).__name__ != "Image" or md.get("display_grid") not in ("native", "reordered"):
            continue
        try:
            grid = _file_grid(image)
            same = np.shape(layer_array(image)) == shape and grid is not None and np.allclose(grid, own, atol=1e-6)
        except Exception:  # noqa: BLE001 - a layer being closed: not a match
            same = False
        if same:
            return {"affine": md["affine"], "display_grid": md["display_grid"]}
    return {}
