"""Batch fusion over many subjects on Dask: ``medfuse batch MANIFEST``.

* The manifest is a CSV (header ``subject,fixed,moving,output`` plus optional ``register`` and
  ``method``; several moving images separated by ``;`` or in extra ``moving*`` columns) or a YAML
  list of such mappings (or ``{defaults: {...}, subjects: [...]}``). Relative paths are relative
  to the manifest's folder.
* Subjects run in parallel on a local Dask cluster of worker *processes* by default, or on an
  existing cluster (``scheduler="tcp://host:8786"``).
* Re-runs are idempotent: a subject is skipped when its output's hash, its inputs' hashes and
  the pipeline parameters all match its provenance sidecar.
* A failing subject is caught in its worker and reported; it never stops the others.
* Outputs are written atomically (temporary file, sidecar, rename), so an interrupted run leaves
  no half-written output.
* Each worker's ITK, torch and BLAS/OpenMP threads are capped (default 1) so N workers use N cores.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .errors import InvalidInputError, MedfuseError, MissingDependencyError, OutputExistsError, UnreadableFileError
from .progress import CancelToken

__all__ = ["Subject", "SubjectResult", "BatchSummary", "read_manifest", "run_batch", "run_subject", "write_phantom_subjects",
           "cap_threads", "THREAD_ENV_VARS"]

PathLike = Union[str, os.PathLike]

#: Environment variables that bound the thread pools of OpenMP, BLAS libraries, ITK and torch.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                   "NUMEXPR_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
_KINDS = (None, "rigid", "affine", "deformable")


@dataclass
class Subject:
    """One manifest row, with absolute paths."""

    subject: str
    fixed: str
    moving: List[str]
    output: str
    register: Optional[str] = None
    method: Optional[str] = None


@dataclass
class SubjectResult:
    """What happened to one subject. ``status``: ``done``, ``skipped`` (up to date), ``failed`` or ``cancelled``."""

    subject: str
    status: str
    seconds: float = 0.0
    output: Optional[str] = None
    error: Optional[str] = None
    method_used: Optional[str] = None
    registration_suspect: Optional[bool] = None
    worker: Optional[str] = None


@dataclass
class BatchSummary:
    """All subjects' results plus where the report went."""

    results: List[SubjectResult]
    report_path: Optional[Path]
    wall_seconds: float
    workers: int
    cancelled: bool = False

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def n_done(self) -> int:
        return self.count("done")

    @property
    def n_skipped(self) -> int:
        return self.count("skipped")

    @property
    def n_failed(self) -> int:
        return self.count("failed") + self.count("cancelled")

    @property
    def subjects_per_minute(self) -> float:
        return 60.0 * self.n_done / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def table(self) -> str:
        """A plain-text summary table, one row per subject, failures with their one-line reason."""
        w = max([7] + [len(r.subject) for r in self.results])
        lines = [f"{'subject':<{w}}  {'status':<9} {'seconds':>8}  output / error"]
        for r in self.results:
            status = r.status.upper() if r.status in ("failed", "cancelled") else r.status
            detail = r.error if r.error else (r.output or "")
            if r.registration_suspect:
                detail += "  (registration suspect: check it)"
            lines.append(f"{r.subject:<{w}}  {status:<9} {r.seconds:>8.1f}  {detail}")
        lines.append(f"{len(self.results)} subjects: {self.n_done} done, {self.n_skipped} skipped (up to date), "
                     f"{self.count('failed')} failed" + (f", {self.count('cancelled')} cancelled"
                                                          if self.count('cancelled') else "")
                     + f"; {self.wall_seconds:.1f} s on {self.workers} worker(s)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- manifest
def _row_error(path: Path, row: int, problem: str, fix: str) -> InvalidInputError:
    return InvalidInputError(f"manifest row {row}: {problem}", fix=fix, path=path)


def _subject_from(raw: Mapping[str, Any], *, base: Path, path: Path, row: int,
                  defaults: Mapping[str, Any]) -> Subject:
    d = {**defaults, **{str(k).strip().lower(): v for k, v in raw.items() if k is not None}}
    for key in ("subject", "fixed", "output"):
        if not d.get(key) or not str(d[key]).strip():
            raise _row_error(path, row, f"'{key}' is missing or empty",
                             "give every row subject, fixed, moving and output")
    moving: List[str] = []
    for key in sorted((k for k in d if k.startswith("moving")), key=lambda k: (k != "moving", k)):
        v = d[key]
        if v is None or v == "":
            continue
        if isinstance(v, (list, tuple)):
            moving += [str(x).strip() for x in v if str(x).strip()]
        else:
            moving += [x.strip() for x in str(v).split(";") if x.strip()]
    if not moving:
        raise _row_error(path, row, "'moving' is missing or empty", "give at least one moving image")

    def absolute(p: str) -> str:
        q = Path(os.path.expanduser(str(p).strip()))
        return os.fspath(q if q.is_absolute() else base / q)

    reg = d.get("register")
    reg = None if reg in (None, "", "none", "None") else str(reg).strip().lower()
    if reg not in _KINDS:
        raise _row_error(path, row, f"unknown register value {reg!r}", "use none, rigid, affine or deformable")
    method = d.get("method")
    method = None if method in (None, "") else str(method).strip().lower()
    return Subject(subject=str(d["subject"]).strip(), fixed=absolute(d["fixed"]), moving=[absolute(m) for m in moving],
                   output=absolute(d["output"]), register=reg, method=method)


def read_manifest(path: PathLike) -> List[Subject]:
    """Read a CSV or YAML manifest into :class:`Subject` rows (paths made absolute).

    Raises:
        UnreadableFileError: the manifest is missing or not valid CSV/YAML.
        InvalidInputError: a row lacks a column, or subjects/outputs repeat.
    """
    p = Path(path)
    if not p.is_file():
        raise UnreadableFileError("the manifest does not exist", fix="check the path", path=p)
    base = p.resolve().parent
    rows: List[Mapping[str, Any]]
    defaults: Mapping[str, Any] = {}
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UnreadableFileError(f"cannot read the manifest ({e.__class__.__name__})",
                                  fix="save it as UTF-8 text", path=p) from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise UnreadableFileError(f"the manifest is not valid YAML{where}",
                                      fix="check the indentation and quoting", path=p) from None
        if isinstance(data, Mapping):
            defaults = {str(k).lower(): v for k, v in (data.get("defaults") or {}).items()}
            data = data.get("subjects")
        if not isinstance(data, list) or not all(isinstance(r, Mapping) for r in data):
            raise InvalidInputError("a YAML manifest must be a list of subjects (or {defaults:, subjects: [...]})",
                                    fix="see 'medfuse batch --help' for an example", path=p)
        rows = data
    else:
        try:
            reader = csv.DictReader(text.splitlines())
            rows = list(reader)
        except csv.Error as e:
            raise UnreadableFileError(f"the manifest is not valid CSV ({e})", fix="check the quoting", path=p) from None
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        missing = [c for c in ("subject", "fixed", "output") if c not in header]
        if missing or not any(h.startswith("moving") for h in header):
            raise InvalidInputError(
                f"the CSV header lacks {', '.join(missing + ([] if any(h.startswith('moving') for h in header) else ['moving']))}",
                fix="the first line must be: subject,fixed,moving,output", path=p)
    if not rows:
        raise InvalidInputError("the manifest lists no subjects", fix="add one row per subject", path=p)
    subjects = [_subject_from(r, base=base, path=p, row=i + 2 if p.suffix.lower() not in (".yaml", ".yml") else i + 1,
                              defaults=defaults) for i, r in enumerate(rows)]
    for attr in ("subject", "output"):
        seen: Dict[str, int] = {}
        for s in subjects:
            key = getattr(s, attr)
            if key in seen:
                raise InvalidInputError(f"{attr} {key!r} appears twice in the manifest",
                                        fix=f"give every subject its own {attr}", path=p)
            seen[key] = 1
    return subjects


# ----------------------------------------------------------------------------- worker side
def cap_threads(n: int) -> None:
    """Bound this process's ITK, torch and OpenMP/BLAS thread pools to ``n`` threads.

    Environment variables cover libraries loaded later; SimpleITK and an already-imported torch are
    set directly.
    """
    n = max(1, int(n))
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    except ImportError:  # pragma: no cover - SimpleITK is a core dependency
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch.set_num_threads(n)
        except Exception:  # noqa: BLE001 - an exotic torch build must not fail the subject
            pass


def _one_line(e: BaseException) -> str:
    if isinstance(e, MedfuseError):
        return e.one_line()
    return f"internal error {e.__class__.__name__}: {' '.join(str(e).split())[:300]}"


def _scrubbed(text: str, inputs: Sequence[Any]) -> str:
    """``text`` with the subject's patient identifiers (from its readable DICOM inputs) blanked: an error
    may quote a path whose folder is named after the patient."""
    from .provenance import patient_identifiers, scrub

    return scrub(text, patient_identifiers([p for p in inputs if p and Path(p).exists()]))


def run_subject(subject: Union[Subject, Mapping[str, Any]], options: Mapping[str, Any]) -> Dict[str, Any]:
    """Fuse one subject (runs on a Dask worker, or in-process). Never raises: failures are returned.

    Args:
        subject: a :class:`Subject` (or its dict).
        options: ``register``, ``method``, ``device``, ``fallback``, ``threads``, ``overwrite`` defaults.

    Returns:
        A :class:`SubjectResult` as a dict.
    """
    s = subject if isinstance(subject, Subject) else Subject(**dict(subject))
    t0 = time.perf_counter()
    res = SubjectResult(subject=s.subject, status="failed", output=s.output, worker=f"pid {os.getpid()}")
    try:
        threads = int(options.get("threads") or 1)
        if options.get("cap_process_threads", True):
            cap_threads(threads)  # a worker process: bound every pool, not just registration's
        from .pipeline import _weights_sha256, fuse_files, pipeline_parameters
        from .provenance import is_up_to_date

        register = s.register if s.register is not None else options.get("register")
        method = s.method or options.get("method") or "network"
        kw = dict(register=register, method=method, device=options.get("device", "cpu"),
                  fallback=options.get("fallback"), threads=threads)
        inputs = [s.fixed, *s.moving]
        # What the output must have been made with: a fallback's output, or other weights', is redone.
        expect = {"method_used": method, **({"weights_sha256": _weights_sha256()} if method == "network" else {})}
        if Path(s.output).exists() and is_up_to_date(s.output, input_paths=inputs, parameters=pipeline_parameters(**kw),
                                                     expect=expect):
            res.status = "skipped"
            return asdict(res)
        Path(s.output).parent.mkdir(parents=True, exist_ok=True)
        out = fuse_files(s.fixed, s.moving, s.output, overwrite=bool(options.get("overwrite")), **kw)
        res.status = "done"
        res.method_used = out.provenance.get("method_used")
        res.registration_suspect = any(bool(r and r.get("suspect")) for r in out.registrations) or None
    except MedfuseError as e:
        res.error = e.one_line()
        if e.__class__.__name__ == "OutputExistsError":
            res.error += " (the output is not verified by its sidecar; rerun with --overwrite to redo it)"
    except Exception as e:  # noqa: BLE001 - isolate the subject; the batch goes on
        res.error = _one_line(e)
    finally:
        if res.error:
            res.error = _scrubbed(res.error, [s.fixed, *s.moving])
        res.seconds = round(time.perf_counter() - t0, 3)
    return asdict(res)


# ----------------------------------------------------------------------------- driver
def _is_batch_report(path: Path) -> bool:
    """True when ``path`` holds a report an earlier run wrote (its header or keys are ours)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix.lower() == ".json":
        return head.lstrip().startswith("[") and ('"subject"' in head or head.strip() == "[]")
    return head.split("\n", 1)[0].startswith("subject,status")


def _check_report_path(path: Path) -> None:
    """Refuse, before any work, a report path that holds someone else's file (a re-run's own is replaced)."""
    if path.is_dir():
        raise InvalidInputError(f"the report path {path} is a folder",
                                fix="pass report= (--report) a file path ending .csv or .json")
    if path.exists() and not _is_batch_report(path):
        raise OutputExistsError(
            f"{path} exists and is not a medfuse batch report; it would be replaced",
            fix="move that file, or pass report= (--report) another path")


def _write_report(path: Path, results: Sequence[SubjectResult]) -> Path:
    from .io._atomic import atomic_write_text

    if path.suffix.lower() == ".json":
        text = json.dumps([asdict(r) for r in results], indent=2) + "\n"
    else:
        import io

        buf = io.StringIO()
        cols = list(asdict(results[0]).keys()) if results else ["subject", "status"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))
        text = buf.getvalue()
    return atomic_write_text(path, text, overwrite=True)


def _client(scheduler: str, workers: int, threads: int):
    """Return (client, cluster_or_None)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise MissingDependencyError.for_package("dask[distributed]", "medfuse batch", "batch") from None
    if scheduler == "local":
        if workers < 1:
            raise InvalidInputError(f"--workers must be at least 1, got {workers}", fix="e.g. --workers 2")
        env = {var: str(threads) for var in THREAD_ENV_VARS}
        # Processes, one task each: ITK/NumPy work holds the GIL often enough that threads would not scale.
        # No dashboard: its periodic updates took ~10 % of a core (2-worker scaling 1.79x with it, 1.89x without).
        try:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.ERROR, env=env)
        except RuntimeError as e:
            raise MedfuseError(f"the local Dask cluster did not start ({' '.join(str(e).split())[:200]})",
                               fix="in a script, call run_batch under 'if __name__ == \"__main__\":' (workers are "
                                   "spawned processes that re-import the script); or use scheduler='synchronous'") from None
        return Client(cluster), cluster
    if not scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise InvalidInputError(f"unknown scheduler {scheduler!r}",
                                fix="use 'local', 'synchronous' or a scheduler address such as tcp://host:8786")
    try:
        return Client(scheduler, timeout="20s"), None
    except (OSError, TimeoutError) as e:
        raise MedfuseError(f"cannot reach the Dask scheduler at {scheduler} ({e.__class__.__name__})",
                           fix="start it with 'dask scheduler' and workers with 'dask worker ADDRESS', "
                               "or drop --scheduler to use a local cluster") from None


def _report_beside_outputs(subjects: Sequence[Subject]) -> Path:
    """``batch-report.csv`` in the common parent folder of the subjects' outputs (the default for a list).

    Raises:
        InvalidInputError: no subjects, or their outputs share no folder but the filesystem root (or none at all).
    """
    fix = "pass report= with the report's path (.csv or .json)"
    if not subjects:
        raise InvalidInputError("no subjects, so no outputs' folder to put the batch report in", fix=fix)
    # Relative outputs are relative to the working folder, as run_subject writes them.
    folders = [os.path.dirname(os.path.abspath(os.fspath(s.output))) for s in subjects]
    try:
        common = Path(os.path.commonpath(folders))
    except ValueError:  # different drives (Windows)
        common = None
    if common is None or common == Path(common.anchor):
        shown = " and ".join(sorted(set(folders))[:2])
        raise InvalidInputError(f"the subjects' outputs share no folder to put the batch report in ({shown})", fix=fix)
    return common / "batch-report.csv"


def run_batch(manifest: Union[PathLike, Sequence[Subject]], *, workers: int = 2, scheduler: str = "local",
              threads_per_worker: int = 1, register: Optional[str] = None, method: str = "network",
              device: str = "cpu", fallback: Optional[str] = None, overwrite: bool = False,
              report: Optional[PathLike] = None, progress: bool = False,
              cancel: Optional[CancelToken] = None) -> BatchSummary:
    """Fuse every subject of a manifest in parallel and write a report.

    Args:
        manifest: CSV/YAML path, or a list of :class:`Subject`.
        workers: local worker processes (``scheduler="local"``).
        scheduler: ``"local"``, ``"synchronous"`` (this process, no Dask) or a scheduler address.
        threads_per_worker: threads each worker's ITK/torch/BLAS may use.
        register, method, device, fallback: defaults for rows that do not set them.
        overwrite: redo subjects whose output exists but is not verified by its sidecar.
        report: report path (``.csv`` or ``.json``); default ``<manifest stem>-report.csv`` beside the
            manifest, or for a list ``batch-report.csv`` in the folder holding the subjects' outputs (the
            common parent of their folders; relative outputs count from the working folder). Never the
            working folder just because it is one.
        progress: show a tqdm bar of finished subjects.
        cancel: stop submitting/waiting; unfinished subjects are reported as cancelled.

    Returns:
        :class:`BatchSummary`. Failures are in it, not raised.

    Raises:
        InvalidInputError: a list without ``report`` whose outputs share no folder but the filesystem
            root (or a different drive), or an empty list without ``report``; checked before any work.
    """
    if isinstance(manifest, (str, os.PathLike)):
        subjects = read_manifest(manifest)
        mpath = Path(manifest)
        default_report = mpath.with_name(mpath.stem + "-report.csv")
    else:
        subjects = [s if isinstance(s, Subject) else Subject(**dict(s)) for s in manifest]
        default_report = None if report else _report_beside_outputs(subjects)
    if register not in _KINDS:
        raise InvalidInputError(f"unknown registration kind {register!r}", fix="use none, rigid, affine or deformable")
    report_path = Path(report) if report else default_report
    _check_report_path(report_path)
    options = dict(register=register, method=method, device=device, fallback=fallback,
                   threads=max(1, int(threads_per_worker)), overwrite=overwrite)
    results: Dict[str, SubjectResult] = {}
    cancelled = False
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(subjects), desc="batch", unit="subject", file=sys.stderr, disable=None)

    def finished(d: Dict[str, Any]) -> None:
        results[d["subject"]] = SubjectResult(**d)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{d['subject']}: {d['status']}", refresh=True)

    n_workers = 1
    try:
        if scheduler == "synchronous":
            for s in subjects:
                if cancel is not None and cancel.cancelled:
                    cancelled = True
                    break
                # In the caller's own process: registration still uses `threads` (the pipeline sets it
                # per call), but the process-wide pools are left alone.
                finished(run_subject(s, {**options, "cap_process_threads": False}))
        else:
            client, cluster = _client(scheduler, workers, options["threads"])
            try:
                from dask.distributed import as_completed

                n_workers = max(1, len(client.scheduler_info().get("workers", {})))
                tag = uuid.uuid4().hex[:8]
                futures = {client.submit(run_subject, asdict(s), options, key=f"medfuse-{tag}-{i}",
                                         pure=False): s for i, s in enumerate(subjects)}
                pending = as_completed(list(futures))
                for fut in pending:
                    s = futures[fut]
                    try:
                        finished(fut.result())
                    except Exception as e:  # noqa: BLE001 - a worker died (segfault, OOM): isolate it
                        finished(asdict(SubjectResult(subject=s.subject, status="failed", output=s.output,
                                                      error=f"the worker running it died ({_one_line(e)})")))
                    if cancel is not None and cancel.cancelled:
                        cancelled = True
                        client.cancel([f for f in futures if not f.done()])
                        break
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    except KeyboardInterrupt:
        cancelled = True
    finally:
        if bar is not None:
            bar.close()
    ordered = [results.get(s.subject) or SubjectResult(subject=s.subject, status="cancelled", output=s.output,
                                                        error="not run: the batch was cancelled")
               for s in subjects]
    wall = time.perf_counter() - t0
    try:
        if not report and not isinstance(manifest, (str, os.PathLike)):
            report_path.parent.mkdir(parents=True, exist_ok=True)  # the outputs' folder; absent if none got that far
        written: Optional[Path] = _write_report(report_path, ordered)
    except (OSError, MedfuseError) as e:  # the work is done; do not lose the summary over the report file
        import warnings

        from .errors import MedfuseWarning

        warnings.warn(f"could not write the batch report {report_path} ({e.__class__.__name__}); "
                      f"pass report= (--report) to choose another place", MedfuseWarning, stacklevel=2)
        written = None
    return BatchSummary(results=ordered, report_path=written, wall_seconds=wall,
                        workers=n_workers if scheduler != "synchronous" else 1, cancelled=cancelled)


# ----------------------------------------------------------------------------- phantom subjects
def write_phantom_subjects(folder: PathLike, n: int, *, first_seed: int = 1, lesion: Union[bool, Sequence[bool]] = True,
                           downsample: int = 2, register: Optional[str] = "rigid",
                           method: Optional[str] = None) -> Path:
    """Write ``n`` synthetic subjects (MR T1 + PET NIfTI, from :mod:`medfuse.phantom`) and a ``manifest.csv``.

    Handy to try ``medfuse batch`` and for tests and benchmarks. The MR is block-averaged by ``downsample``
    (2 -> 2 mm) to keep runs short.

    Returns:
        The manifest's path (``folder/manifest.csv``), with outputs under ``folder/out/``.
    """
    import numpy as np

    from .io import save
    from .phantom import make_phantom

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    lesions = list(lesion) if isinstance(lesion, (list, tuple)) else [bool(lesion)] * n
    rows = []
    for i in range(n):
        sid = f"sub-{i + 1:02d}"
        sdir = root / sid
        sdir.mkdir(exist_ok=True)
        ph = make_phantom(seed=first_seed + i, lesion=lesions[i])
        t1 = ph.t1
        if downsample > 1:
            f = int(downsample)
            a = np.asarray(t1.array, dtype=np.float32)
            shp = [s // f * f for s in a.shape]
            a = a[: shp[0], : shp[1], : shp[2]].reshape(shp[0] // f, f, shp[1] // f, f, shp[2] // f, f).mean(axis=(1, 3, 5))
            aff = t1.affine.copy()
            aff[:3, :3] = t1.affine[:3, :3] * f
            aff[:3, 3] = t1.index_to_world(np.full(3, (f - 1) / 2.0))
            from .volume import Volume

            t1 = Volume(a.astype(np.float32), aff, modality="MR", unit="arbitrary")
        save(t1, sdir / "mr_t1.nii.gz", overwrite=True)
        save(ph.pet, sdir / "pet.nii.gz", overwrite=True)
        rows.append({"subject": sid, "fixed": f"{sid}/mr_t1.nii.gz", "moving": f"{sid}/pet.nii.gz",
                     "output": f"out/{sid}_fused.nii.gz", "register": register or "none",
                     **({"method": method} if method else {})})
    from .io._atomic import atomic_write_text
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    manifest = root / "manifest.csv"
    atomic_write_text(manifest, buf.getvalue(), overwrite=True)
    return manifest
