"""ITK-convention spatial transforms: fixed-space physical point -> moving-space point (LPS mm).

A :class:`Transform` wraps a ``SimpleITK.Transform``. It is saved and loaded in ITK formats
(``.tfm``/``.txt``/``.h5``) that 3D Slicer, ANTs and SimpleITK read, composes with others,
and is applied to volumes (resampling) and to points.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from .. import _checks
from ..errors import InvalidInputError, RegistrationError, UnreadableFileError

if TYPE_CHECKING:  # imported where used at run time
    from ..volume import Volume

__all__ = ["Transform", "load_transform", "TRANSFORM_SUFFIXES"]

#: File endings SimpleITK reads and writes as transforms.
TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat")


def _suffix_ok(path: Path) -> bool:
    return path.name.lower().endswith(TRANSFORM_SUFFIXES)


def refuse_upper_case_ending(path: Path) -> None:
    """Refuse writing a transform whose ending is not lower case (``x.TFM``): medfuse reads it back, but SimpleITK,
    3D Slicer and ANTs choose the format by the lower-case ending and cannot read it.

    Raises:
        InvalidInputError: the ending is a transform ending in another letter case.
    """
    ending = next((e for e in TRANSFORM_SUFFIXES if path.name.lower().endswith(e)), None)
    if ending is not None and not path.name.endswith(ending):
        raise InvalidInputError(f"the transform file's ending {path.name[-len(ending):]!r} is not lower case: "
                                "SimpleITK, 3D Slicer and ANTs read a transform by its lower-case ending and cannot "
                                "open this one", fix=f"name it {path.name[:-len(ending)] + ending!r}", path=path)


def _transform_path(value: Any) -> Path:
    """``value`` as a transform file's Path, or an InvalidInputError whose fix fits transforms (not images)."""
    from ..volume import Volume

    try:
        return _checks.as_path(value, what="a transform file's path")
    except InvalidInputError as e:
        if isinstance(value, (list, tuple, set)):
            fix = "pass one path at a time, e.g. [medfuse.load_transform(p) for p in paths]"
        elif isinstance(value, Volume):
            fix = "a Volume is an image, not a transform: pass the transform file's path (.tfm, .txt, .h5, .mat)"
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            fix = "a matrix is not a file: build the transform with Transform.from_matrix(m4x4)"
        elif isinstance(value, str):  # an empty string
            fix = "give the transform file's path (.tfm, .txt, .h5, .mat)"
        else:
            fix = "pass the transform file's path as a str or pathlib.Path"
        problem = e.problem if isinstance(value, str) else \
            f"path must be a transform file's path (a str or pathlib.Path), got {_checks.describe(value)}"
        raise InvalidInputError(problem, fix=fix) from None


def _matrix_4x4(matrix: Any) -> np.ndarray:
    """``matrix`` as a finite homogeneous 4x4 float array, or an InvalidInputError describing it by its type."""
    want = "expected a finite homogeneous 4x4 matrix (last row 0 0 0 1)"
    if isinstance(matrix, (str, bytes, os.PathLike)):
        raise InvalidInputError(f"{want}, got {_checks.describe(matrix)}",
                                fix="read a transform file with medfuse.load_transform(path); from_matrix takes a "
                                    "4x4 LPS matrix (a NumPy array or nested lists of numbers)")
    try:
        m = np.asarray(matrix)
        if m.dtype.kind not in "biuf":  # strings, complex numbers, objects (ragged or mixed lists)
            m = None if m.dtype.kind in "USc" else np.asarray(m.tolist(), dtype=float)
    except (TypeError, ValueError, RuntimeError):  # ragged lists; a tensor on a GPU or needing grad
        m = None
    if m is not None and m.dtype.kind in "biuf":
        m = m.astype(float)
        if m.shape == (4, 4) and np.all(np.isfinite(m)) and np.allclose(m[3], [0, 0, 0, 1]):
            return m
    raise InvalidInputError(f"{want}, got {_checks.describe(matrix)}",
                            fix="pass a 4x4 LPS matrix of numbers: a NumPy array or nested lists (a torch tensor as "
                                "t.detach().cpu().numpy())")


class Transform:
    """A spatial transform in the ITK convention: it maps **fixed** physical points to **moving** ones.

    Args:
        sitk_transform: a ``SimpleITK.Transform`` (any kind; it is copied), or a medfuse Transform.

    Raises:
        InvalidInputError: ``sitk_transform`` is not a SimpleITK or medfuse transform, or is not 3-D.

    Build one from a 4x4 LPS matrix with :meth:`from_matrix`, or get one from ``register``.
    """

    def __init__(self, sitk_transform: Any):
        import SimpleITK as sitk

        if isinstance(sitk_transform, Transform):
            sitk_transform = sitk_transform.sitk
        if not isinstance(sitk_transform, sitk.Transform):
            raise InvalidInputError(
                f"expected a medfuse Transform or a SimpleITK.Transform, got {type(sitk_transform).__name__}",
                fix="for a 4x4 LPS matrix use medfuse.Transform.from_matrix(m); for a file, "
                    "medfuse.load_transform(path); or pass what medfuse.register returned (.transform)")
        if sitk_transform.GetDimension() != 3:
            raise InvalidInputError("only 3-D transforms are supported", fix="pass a 3-D transform")
        try:  # copy, so that later edits of the caller's object cannot move ours
            self._t = sitk_transform.__class__(sitk_transform)
        except (TypeError, RuntimeError, NotImplementedError):
            self._t = sitk_transform

    # ---------------------------------------------------------------- construction
    @classmethod
    def identity(cls) -> "Transform":
        """The identity transform (every point maps to itself), as an ITK affine transform.

        Returns:
            The :class:`Transform`.
        """
        import SimpleITK as sitk

        return cls(sitk.AffineTransform(3))

    @classmethod
    def from_matrix(cls, matrix: Any) -> "Transform":
        """A linear transform from a 4x4 LPS matrix (fixed point -> moving point).

        Args:
            matrix: a finite homogeneous 4x4 matrix of numbers (last row 0 0 0 1): a NumPy array, nested lists
                or a CPU tensor.

        Returns:
            The :class:`Transform` (an ITK affine transform).

        Raises:
            InvalidInputError: ``matrix`` is not a finite homogeneous 4x4 matrix of real numbers (a path, a
                string, complex numbers, another shape, NaN).
        """
        import SimpleITK as sitk

        m = _matrix_4x4(matrix)
        t = sitk.AffineTransform(3)
        t.SetMatrix(tuple(float(x) for x in m[:3, :3].ravel()))
        t.SetTranslation(tuple(float(x) for x in m[:3, 3]))
        return cls(t)

    # ---------------------------------------------------------------- properties
    @property
    def sitk(self):
        """The wrapped ``SimpleITK.Transform`` (do not mutate)."""
        return self._t

    @property
    def is_linear(self) -> bool:
        """True when the transform is a single matrix + translation."""
        return bool(self._t.IsLinear())

    @property
    def matrix(self) -> np.ndarray:
        """4x4 LPS matrix (fixed point -> moving point); linear transforms only."""
        if not self.is_linear:
            raise RegistrationError("a deformable transform has no 4x4 matrix",
                                    fix="use transform_points() or apply() instead")
        # Probe the transform: exact for any linear transform, whatever its parameterisation.
        pts = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
        out = self.transform_points(pts)
        m = np.eye(4)
        m[:3, 3] = out[0]
        m[:3, :3] = (out[1:] - out[0]).T
        return m

    def __repr__(self) -> str:
        return f"Transform({self._t.GetName()}, linear={self.is_linear})"

    # ---------------------------------------------------------------- algebra
    def compose(self, other: "Transform") -> "Transform":
        """``self.compose(other)`` maps ``p -> self(other(p))``: ``other`` is applied first.

        Args:
            other: the transform applied first: a :class:`Transform` or a 3-D ``SimpleITK.Transform``.

        Returns:
            A new :class:`Transform` (a composite of the parts of both).

        Raises:
            InvalidInputError: ``other`` is not a medfuse or SimpleITK transform, or is not 3-D.
        """
        import SimpleITK as sitk

        if not isinstance(other, Transform):
            other = Transform(other)
        c = sitk.CompositeTransform(3)
        # CompositeTransform applies the last added first. Composites are added by their parts: ITK's files hold
        # one level only ("Composite Transform can only be 1st transform in a file"), so a deformable result
        # composed with a template's affine could not be saved.
        for t in (*_parts(self._t), *_parts(other._t)):
            c.AddTransform(t)
        return Transform(c)

    def inverse(self) -> "Transform":
        """The inverse transform (moving -> fixed).

        Linear transforms are inverted exactly; others only where SimpleITK has an inverse for them (a
        :class:`RegistrationError` says what to do otherwise).
        """
        if self.is_linear:
            return Transform.from_matrix(np.linalg.inv(self.matrix))
        try:
            t = self._t.GetInverse()
            return Transform(t)
        except RuntimeError:
            raise RegistrationError(
                "this deformable transform has no closed-form inverse",
                fix="register in the other direction, or invert its displacement field with "
                    "SimpleITK.InvertDisplacementField") from None

    def transform_points(self, points: Any) -> np.ndarray:
        """Map (N, 3) or (3,) LPS mm fixed-space points to moving space.

        Args:
            points: fixed-space points, LPS x, y, z in mm: an array or nested lists of numbers of shape (N, 3) or
                (3,) (any shape ending in 3).

        Returns:
            The moving-space points, float64, of the shape given.

        Raises:
            InvalidInputError: ``points`` are not real numbers (text, bools, complex numbers, ragged lists) or
                their last axis is not 3.
        """
        try:
            p = None if isinstance(points, (str, bytes)) else np.asarray(points)
            # Complex points would lose their imaginary part with only NumPy's warning; bools are no coordinates.
            p = None if p is None or p.dtype.kind not in "iuf" else p.astype(float)
        except (TypeError, ValueError, RuntimeError):  # ragged lists, strings, a tensor on a GPU
            p = None
        if p is None or p.ndim == 0:
            raise InvalidInputError(f"points must be numbers of shape (N, 3), got {_checks.describe(points)}",
                                    fix="pass LPS x, y, z in mm")
        if p.shape[-1] != 3:
            raise InvalidInputError(f"points must have shape (N, 3), got {p.shape}", fix="pass LPS x, y, z in mm")
        flat = p.reshape(-1, 3)
        out = np.array([self._t.TransformPoint(tuple(map(float, q))) for q in flat], dtype=float)
        return out.reshape(p.shape)

    def apply(self, volume: Volume, *, reference: Optional[Volume] = None, interpolation: Optional[str] = None,
              default: Optional[float] = None) -> Volume:
        """Resample ``volume`` (in moving space) onto ``reference``'s grid through this transform.

        Args:
            volume: the Volume to resample (moving space).
            reference: the grid to sample on (fixed space); None: ``volume``'s own grid.
            interpolation: as in :func:`medfuse.resample` (None: linear).
            default: the value outside ``volume``, as in :func:`medfuse.resample`.

        Returns:
            The resampled Volume, as :func:`medfuse.resample` returns it.

        Raises:
            InvalidInputError: as :func:`medfuse.resample` (``volume`` or ``reference`` not a Volume, an unknown
                ``interpolation``, a ``default`` that is not a number...).
        """
        from .resample import resample

        return resample(volume, volume if reference is None else reference, transform=self,
                        interpolation=interpolation, default=default)

    # ---------------------------------------------------------------- files
    def save(self, path: Union[str, os.PathLike], *, overwrite: bool = False, inputs=()) -> Path:
        """Write in an ITK format chosen by suffix (``.tfm``, ``.txt``, ``.h5``; ``.mat`` for linear ones); atomic.

        Args:
            path: the transform file.
            overwrite: replace an existing file (never one of ``inputs``).
            inputs: the images (files or DICOM folders) the transform was computed from: the file is never written
                over them, and gets no wider permissions than they have (a ``chmod 600`` input gives a 0600 file),
                as every other output does.

        Returns:
            The path written.

        Raises:
            InvalidInputError: ``path`` is not a path (a str or pathlib.Path), its ending is not a transform ending
                (or not in lower case, ``x.TFM``), or a deformable transform is to go into a ``.mat`` file.
            OutputExistsError: the file exists (without ``overwrite``) or is one of ``inputs``.
            OutputWriteError: the file cannot be written (permission, read-only or full disk); ``errno`` says which.
        """
        import SimpleITK as sitk

        from ..io._atomic import atomic_path
        from ..io.nifti import itk_path

        p = _transform_path(path)
        overwrite = _checks.flag(overwrite, "overwrite")  # "no" is truthy: it overwrote
        if not _suffix_ok(p):
            raise InvalidInputError(f"unknown transform file ending {p.suffix!r}",
                                    fix="use .tfm, .txt, .h5, .hdf5 or .mat", path=p)
        refuse_upper_case_ending(p)
        t = self._t
        if p.name.lower().endswith(".mat"):
            # ITK's .mat (MATLAB, as ANTs writes it) holds one matrix transform: SimpleITK writes a composite or a
            # B-spline there without complaint, and nothing (SimpleITK included) can read the file back.
            if not self.is_linear:
                raise InvalidInputError("a deformable transform cannot be stored in a .mat file (it holds one matrix)",
                                        fix="save it as .h5 or .tfm", path=p)
            # Every linear transform as AffineTransform_double_3_3, the one field ANTs writes: scripts that parse
            # .mat files (Lead-DBS, MATLAB loaders, wb_command pipelines) look it up by that name.
            if t.GetName() != "AffineTransform" or tuple(t.GetFixedParameters()) != (0.0, 0.0, 0.0):
                t = Transform.from_matrix(self.matrix).sitk
        elif t.GetName() == "CompositeTransform":  # one level, as ITK's files need (a composite built elsewhere)
            t = sitk.CompositeTransform(3)
            for part in _parts(self._t):
                t.AddTransform(part)
        # No folder is made (as medfuse.save makes none): atomic_path says a missing one is missing, and a file in
        # the folder's place is no bare FileExistsError from mkdir.
        with atomic_path(p, overwrite=overwrite, inputs=[x for x in inputs or () if x is not None]) as tmp:
            sitk.WriteTransform(t, itk_path(tmp, writing=True))
        return p


def load_transform(path: Union[str, os.PathLike]) -> Transform:
    """Read an ITK transform file (``.tfm``/``.txt``/``.h5``) written by medfuse, Slicer, ANTs or SimpleITK.

    Args:
        path: the transform file.

    Returns:
        The :class:`Transform` (fixed point -> moving point); a file holding one transform in a composite gives that
        transform itself, so that a linear one has its :attr:`Transform.matrix`.

    Raises:
        UnreadableFileError: no such file, a folder, a file SimpleITK cannot read as a transform (an image file
            included), one listing several transforms outside a composite, a file that holds a transform that is
            not 3-D (a 2-D ``.tfm``), or (on Windows) a path with no ASCII form.
        InvalidInputError: ``path`` is not a path (a str or pathlib.Path) or is empty.
    """
    import SimpleITK as sitk

    from ..io.nifti import itk_path

    p = _transform_path(path)
    if p.is_dir():
        raise UnreadableFileError("this is a folder, not a transform file", fix="give the transform file's path "
                                  "(.tfm, .txt, .h5, .mat)", path=p)
    if not p.is_file():
        raise UnreadableFileError("no such transform file", errno=_errno.ENOENT, fix="check the path", path=p)
    _check_transform_file(p)
    try:
        with _lower_case_ending(p) as readable:
            t = sitk.ReadTransform(itk_path(readable))
    except RuntimeError:
        raise _unreadable_transform(p) from None
    # A file holding one transform comes back as a composite of one; unwrap for a usable matrix.
    if t.GetName() == "CompositeTransform":
        c = sitk.CompositeTransform(t)
        if c.GetNumberOfTransforms() == 1:
            t = c.GetNthTransform(0)
    t = _downcast(t)
    if t.GetDimension() != 3:  # Transform() refuses it too, without the file's name
        raise UnreadableFileError(f"the file holds a {t.GetDimension()}-D transform; medfuse registers and resamples "
                                  "3-D volumes", fix="export the 3-D transform of the volumes", path=p)
    return Transform(t)


@contextlib.contextmanager
def _lower_case_ending(p: Path) -> Iterator[Path]:
    """``p``, or a copy of it named with its ending in lower case: ITK picks a transform reader from the ending
    as written, so ``A.TFM`` (which :meth:`Transform.save` writes, as image writers take any case) was unreadable."""
    lower = next((e for e in TRANSFORM_SUFFIXES if p.name.lower().endswith(e)), None)
    if lower is None or p.name.endswith(lower):
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="medfuse-transform-") as d:
        copy = Path(d) / ("transform" + lower)
        shutil.copyfile(p, copy)
        yield copy


def _check_transform_file(p: Path) -> None:
    """Refuse, before SimpleITK reads it, a transform file that it would read wrongly.

    - A text file that lists several transforms outside a composite (ITK's older layout): SimpleITK reads only the
      first of them and says so on stderr alone, so the rest of the transform was dropped.
    - A text file cut short, or with the wrong number of parameters for its kind: SimpleITK read a file cut
      inside its ``Parameters`` line as the identity, with no error, and one with too few parameters (two for an
      Euler transform) read past them, so that the process later died of a corrupted heap.
    - A ``.h5`` file that is not HDF5: HDF5 printed some forty lines of its own traces before the error.
    """
    name = p.name.lower()
    hdf5 = name.endswith((".h5", ".hdf5"))
    if not hdf5 and not name.endswith((".tfm", ".txt")):
        return
    try:
        with open(p, "rb") as f:
            head = f.read(_HDF5_HEAD) if hdf5 else b""
            lines = [] if hdf5 else [line.rstrip(b"\r\n") for line in f]
    except OSError as e:
        raise UnreadableFileError(f"the transform file cannot be read ({type(e).__name__})",
                                  fix="check its permissions", path=p) from None
    if hdf5:
        # The HDF5 signature lies at byte 0, 512, 1024, 2048, ... (a user block may come first).
        if not any(head[k:k + 8] == b"\x89HDF\r\n\x1a\n" for k in (0, 512, 1024, 2048, 4096)):
            raise UnreadableFileError("this is not an HDF5 file, so not an ITK .h5 transform file",
                                      fix="check the file: it may be incomplete, or a text transform (.tfm) or "
                                          "an image given a .h5 name", path=p)
        return
    blocks: List[dict] = []
    for line in lines:
        key, sep, value = line.partition(b":")
        if not sep or key.strip() not in (b"Transform", b"Parameters", b"FixedParameters"):
            continue
        key = key.strip().decode()
        if key == "Transform":
            blocks.append({"kind": value.strip().decode("ascii", "replace")})
        elif blocks:
            blocks[-1][key] = value.split()
    kinds = [b["kind"] for b in blocks]
    if len(kinds) > 1 and not kinds[0].startswith("CompositeTransform"):
        raise UnreadableFileError(
            f"the file lists {len(kinds)} transforms one after another ({', '.join(kinds)}), not in a composite: "
            "SimpleITK would read only the first and drop the rest",
            fix="save it from the tool that wrote it as one composite transform (a .h5 file), or split it into one "
                "file per transform and combine them with Transform.compose in the order that tool applies them",
            path=p)
    again = "write the transform again from the tool that made it (the file is incomplete or was edited)"
    for number, block in enumerate(blocks):
        kind = block["kind"]
        if kind.startswith("CompositeTransform"):
            continue
        which = f"transform {number} ({kind})" if len(blocks) > 1 else f"its {kind}"
        expected = _parameter_counts().get(kind.split("_", 1)[0]) if kind.endswith("_3_3") else None
        if "Parameters" not in block:
            raise UnreadableFileError(f"the file is cut short: {which} has no Parameters line", fix=again, path=p)
        if "FixedParameters" not in block:
            # Without it SimpleITK reads the transform as the identity, its Parameters dropped (a translation's
            # too, whose line is empty).
            raise UnreadableFileError(
                f"{which} has no FixedParameters line: the file may be cut short, and SimpleITK would read it as "
                "the identity, dropping its parameters",
                fix="write the transform again from the tool that made it; in a hand-written file add the line "
                    "'FixedParameters: 0 0 0' (a linear transform centred at the origin; a translation's is "
                    "'FixedParameters:' alone)", path=p)
        if expected is None:  # another kind or dimension (a field's millions of values): ITK checks those itself
            continue
        for key in ("Parameters", "FixedParameters"):
            try:
                [float(v) for v in block[key]]
            except ValueError:
                raise UnreadableFileError(f"{which} has a {key} value that is not a number", fix=again,
                                          path=p) from None
        n_params, min_fixed = expected
        if len(block["Parameters"]) != n_params or len(block["FixedParameters"]) < min_fixed:
            raise UnreadableFileError(
                f"{which} has {len(block['Parameters'])} parameters and {len(block['FixedParameters'])} fixed "
                f"parameters; that kind has {n_params} and at least {min_fixed}", fix=again, path=p)


#: Bytes of a .h5 file read to find the HDF5 signature (its furthest usual place, 4096, and its 8 bytes).
_HDF5_HEAD = 4104


@functools.lru_cache(maxsize=None)
def _parameter_counts() -> Dict[str, Tuple[int, int]]:
    """(parameters, least fixed parameters) of the 3-D transform kinds whose count is fixed, as ITK names them in
    files; taken from SimpleITK's own classes. An Euler transform's fourth fixed parameter (the ZYX flag) is
    optional in ITK's files."""
    import SimpleITK as sitk

    counts = {"Euler3DTransform": (sitk.Euler3DTransform().GetNumberOfParameters(), 3),
              "MatrixOffsetTransformBase": (12, 3)}
    for name, make in (("AffineTransform", lambda: sitk.AffineTransform(3)),
                       ("VersorRigid3DTransform", sitk.VersorRigid3DTransform),
                       ("Similarity3DTransform", sitk.Similarity3DTransform),
                       ("ScaleVersor3DTransform", sitk.ScaleVersor3DTransform),
                       ("ScaleSkewVersor3DTransform", sitk.ScaleSkewVersor3DTransform),
                       ("VersorTransform", sitk.VersorTransform),
                       ("TranslationTransform", lambda: sitk.TranslationTransform(3)),
                       ("ScaleTransform", lambda: sitk.ScaleTransform(3))):
        t = make()
        counts[name] = (t.GetNumberOfParameters(), len(t.GetFixedParameters()))
    return counts


def _unreadable_transform(p: Path) -> UnreadableFileError:
    """The error for a file SimpleITK cannot read as a transform, naming an image given in its place."""
    from ..io import is_image_file

    if is_image_file(p):
        return UnreadableFileError(
            "this is an image file, not a transform file (a displacement field stored as an image, as ANTs "
            "writes its warps, is not read as a transform)",
            fix="give an ITK transform file (.tfm, .txt, .h5, .hdf5, .mat); a displacement-field image can be "
                "wrapped with SimpleITK: sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(path), "
                "sitk.sitkVectorFloat64)), then medfuse.Transform(...)", path=p)
    return UnreadableFileError("this is not an ITK transform file SimpleITK can read",
                               fix="export the transform as .tfm/.txt/.h5 from Slicer, ANTs or SimpleITK", path=p)


def _parts(t) -> list:
    """The transforms a (possibly nested) composite applies, in its own order (first added first); else ``[t]``."""
    import SimpleITK as sitk

    if t.GetName() != "CompositeTransform":
        return [t]
    c = sitk.CompositeTransform(t)
    return [leaf for i in range(c.GetNumberOfTransforms()) for leaf in _parts(_downcast(c.GetNthTransform(i)))]


def _downcast(t):
    try:
        return t.Downcast()
    except Exception:  # noqa: BLE001 - older SimpleITK: keep the generic transform
        return t
