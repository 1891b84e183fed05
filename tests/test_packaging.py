"""What a user gets from ``pip install``: the sdist and wheel built from this checkout, their contents and metadata,
the wheel run from outside the repository, and the base install's refusals that name the extra to install.

The build runs once per session, offline (``--no-isolation``: setuptools and build come from the dev extra), on a
copy of the checkout, so nothing is written into the repository.
"""

from __future__ import annotations

import configparser
import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"medfuse": ROOT / "medfuse", "medfuse_napari": ROOT / "napari_plugin" / "medfuse_napari"}
# What may sit inside the shipped packages: code, the plugin manifest, the weights and their model card.
# (py.typed: the marker that lets mypy and pyright read medfuse's annotations once installed)
SHIPPED_SUFFIXES = {".py", ".yaml", ".safetensors", ".json", ".md", ".typed"}

# Releases that install but break medfuse: each floor in pyproject.toml must exclude them.
KNOWN_BROKEN = {
    "simpleitk": [("2.5.5", "mirrors left-anterior-superior NRRD files left-right (ITK issue 5207)"),
                  ("2.3.1", "CenteredTransformInitializer returns a bare Transform: registration fails")],
    "pydicom": [("3.0.0", "import pydicom downloads example files, retrying for minutes offline")],
    "pillow": [("9.1.1", "ImageDraw.textbbox refuses the built-in bitmap font: medfuse demo fails")],
}


def _need(module: str) -> None:
    """Skip without ``module``; in CI (where the Makefile installs the dev and all extras) fail instead."""
    if importlib.util.find_spec(module) is None:
        msg = f"needs {module} (pip install -e '.[all,dev]')"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI must have it")
        pytest.skip(msg)


def _sources(pkg: str) -> dict:
    """Source files of a package, as wheel paths -> repository paths (caches left out)."""
    base = PACKAGES[pkg]
    return {f"{pkg}/{p.relative_to(base).as_posix()}": p for p in base.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in SHIPPED_SUFFIXES}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="session")
def dists(tmp_path_factory) -> dict:
    """Build the sdist, then the wheel from it, out of a copy of the checkout (git-ignored paths left out)."""
    _need("build")
    tmp = tmp_path_factory.mktemp("packaging")
    ignored = [ln.strip().rstrip("/") for ln in (ROOT / ".gitignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", *ignored), symlinks=True)
    out = tmp / "dist"
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                         capture_output=True, text=True, cwd=tmp)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    with zipfile.ZipFile(wheels[0]) as z:
        wheel = {n: z.read(n) for n in z.namelist() if not n.endswith("/")}
    with tarfile.open(sdists[0]) as t:
        sdist = [m.name for m in t.getmembers() if m.isfile()]
    meta = next(v for k, v in wheel.items() if k.endswith(".dist-info/METADATA"))
    return {"wheel_path": wheels[0], "wheel": wheel, "sdist": sdist,
            "metadata": Parser().parsestr(meta.decode()), "tmp": tmp}


def test_wheel_ships_every_module_the_weights_and_the_plugin_manifest(dists):
    wheel = dists["wheel"]
    for pkg in PACKAGES:
        expected = _sources(pkg)
        missing = sorted(set(expected) - set(wheel))
        assert not missing, f"the wheel lacks {missing}"
        # the weights, their model card and napari.yaml byte for byte: the network fuses with what ships
        for name in expected:
            if not name.endswith(".py"):
                assert _sha(wheel[name]) == _sha(expected[name].read_bytes()), name
    assert "medfuse/fusion/weights/medfuse_fusion.safetensors" in wheel
    assert "medfuse_napari/napari.yaml" in wheel


def test_wheel_ships_nothing_else(dists):
    """No tests, sample volumes, caches or virtualenvs: only the two packages and their metadata."""
    names = list(dists["wheel"])
    tops = {n.split("/")[0] for n in names}
    assert tops - set(PACKAGES) == {next(t for t in tops if t.endswith(".dist-info"))}, sorted(tops)
    stray = [n for n in names if not n.split("/")[0].endswith(".dist-info")
             and (Path(n).suffix not in SHIPPED_SUFFIXES or "__pycache__" in n)]
    assert not stray, stray


def test_wheel_entry_points_and_metadata(dists):
    ep_text = next(v for k, v in dists["wheel"].items() if k.endswith(".dist-info/entry_points.txt")).decode()
    eps = configparser.ConfigParser()
    eps.read_string(ep_text)
    assert eps["console_scripts"]["medfuse"] == "medfuse.cli:main"
    # npe2 finds the plugin through this entry point: module medfuse_napari, file napari.yaml beside it
    assert eps["napari.manifest"]["medfuse-napari"] == "medfuse_napari:napari.yaml"
    meta = dists["metadata"]
    manifest = yaml.safe_load(dists["wheel"]["medfuse_napari/napari.yaml"])
    assert manifest["name"] == meta["Name"], "npe2 wants the manifest's name to be the distribution's"
    assert meta["Requires-Python"] and meta["License-Expression"]
    assert "Framework :: napari" in meta.get_all("Classifier")


def test_wheel_and_sdist_ship_the_licence_text_and_the_typing_marker(dists):
    """Apache-2.0 (section 4a) asks that users get a copy of the licence: it was declared, and shipped nowhere."""
    wheel, meta = dists["wheel"], dists["metadata"]
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    licence = next(v for k, v in wheel.items() if k.endswith(".dist-info/licenses/LICENSE"))
    assert licence == (ROOT / "LICENSE").read_bytes() and b"Apache License" in licence[:200]
    assert "medfuse/py.typed" in wheel
    root = dists["sdist"][0].split("/")[0]
    assert f"{root}/LICENSE" in dists["sdist"]


def test_sdist_holds_the_sources_and_no_partial_test_suite(dists):
    root = dists["sdist"][0].split("/")[0]
    names = {n[len(root) + 1:] for n in dists["sdist"]}
    for pkg, base in PACKAGES.items():
        rel = base.relative_to(ROOT).as_posix()
        missing = sorted(f"{rel}/{n[len(pkg) + 1:]}" for n in _sources(pkg)
                         if f"{rel}/{n[len(pkg) + 1:]}" not in names)
        assert not missing, f"the sdist lacks {missing}"
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= names
    # the test suite needs the repository (conftest.py, sample_volumes/, ../shared): none of it ships
    stray = sorted(n for n in names if n.split("/")[0] in ("tests", "sample_volumes", ".venv", "build", "dist")
                   or "__pycache__" in n or n.endswith(".pyc"))
    assert not stray, stray


def test_dependency_floors_exclude_known_broken_releases(dists):
    reqs = {}
    for line in dists["metadata"].get_all("Requires-Dist"):
        r = Requirement(line)
        if r.marker is None:
            reqs[r.name.lower()] = r
    admitted = [f"{reqs[name]} admits {name} {version}: {why}" for name, broken in KNOWN_BROKEN.items()
                for version, why in broken if reqs[name].specifier.contains(version)]
    assert not admitted, admitted
    # and the releases this suite runs with are inside the declared ranges
    from importlib.metadata import version
    outside = [f"{r} (installed {version(n)})" for n, r in reqs.items() if not r.specifier.contains(version(n))]
    assert not outside, outside


def _run_from_wheel(dists, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` with the unpacked wheel first on sys.path, from a folder outside the repository."""
    site = dists["tmp"] / "site"
    if not site.exists():
        with zipfile.ZipFile(dists["wheel_path"]) as z:
            z.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "MEDFUSE_WHEEL_SITE": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=dists["tmp"],
                          env=env)


def test_unpacked_wheel_finds_its_weights_and_entry_points(dists):
    run = _run_from_wheel(dists, """
import os, sys
from importlib.metadata import entry_points
from pathlib import Path
import medfuse, medfuse_napari
from medfuse.fusion.infer import default_weights_path
site = Path(os.environ["MEDFUSE_WHEEL_SITE"]).resolve()
assert Path(medfuse.__file__).resolve().is_relative_to(site), medfuse.__file__
assert Path(medfuse_napari.__file__).resolve().is_relative_to(site), medfuse_napari.__file__
w = default_weights_path()
assert w.is_file() and w.resolve().is_relative_to(site), w
(ep,) = entry_points(group="console_scripts", name="medfuse")
assert callable(ep.load())
(ep,) = entry_points(group="napari.manifest", name="medfuse-napari")
mod, _, fname = ep.value.partition(":")
assert (Path(sys.modules[mod].__file__).parent / fname).is_file()
print("ok")
""")
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_napari_manifest_from_the_wheel_resolves_to_importable_callables(dists):
    """npe2 reads the manifest through the wheel's entry point; every contribution's python_name imports."""
    _need("npe2")
    run = _run_from_wheel(dists, """
import importlib, os
from pathlib import Path
import npe2
import medfuse_napari
pm = npe2.PluginManifest.from_distribution("medfuse")
site = Path(os.environ["MEDFUSE_WHEEL_SITE"]).resolve()
assert Path(medfuse_napari.__file__).resolve().is_relative_to(site), medfuse_napari.__file__
c = pm.contributions
for cmd in c.commands:
    mod, _, attr = cmd.python_name.partition(":")
    assert callable(getattr(importlib.import_module(mod), attr)), cmd.python_name
ids = {cmd.id for cmd in c.commands}
used = [r.command for r in c.readers] + [w.command for w in c.writers] + [w.command for w in c.widgets]
used += [s.command for s in c.sample_data]
assert c.readers and c.writers and c.widgets and c.sample_data
assert set(used) <= ids, set(used) - ids
print("ok")
""")
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.parametrize("blocked, extra, command", [
    (("torch",), "ml", ["fuse", "{a}", "{b}", "-o", "{out}"]),
    (("dask", "distributed"), "batch", ["batch", "{manifest}", "--method", "max"]),
])
def test_base_install_refusal_names_the_extra_that_ships_the_package(dists, tmp_path, blocked, extra, command):
    """Without the optional package: one line, exit 2, and the pip command for an extra that really has it."""
    import nibabel as nib
    import numpy as np

    arr = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
    a, b, out = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "out.nii.gz"
    for p in (a, b):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"subject,fixed,moving,output\ns01,{a},{b},{out}\n")
    argv = [x.format(a=a, b=b, out=out, manifest=manifest) for x in command]
    block = "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)  # import of it raises ImportError
    run = _run_from_wheel(dists, f"import sys\n{block}from medfuse.cli import main\nsys.exit(main({argv!r}))")
    err = run.stderr.strip()
    assert run.returncode == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"pip install 'medfuse[{extra}]'" in err, err
    assert not out.exists()
    shipped = {Requirement(r).name.lower() for r in dists["metadata"].get_all("Requires-Dist")
               if f'extra == "{extra}"' in r}
    assert blocked[0] in shipped, f"extra {extra} ships {sorted(shipped)}, not {blocked[0]}"
