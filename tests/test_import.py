"""`import medfuse` must stay light: no torch, MONAI, Qt or napari."""

import subprocess
import sys


def _imported_after(code: str) -> set:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True,
    ).stdout
    return set(out.split())


def test_import_medfuse_is_light():
    mods = _imported_after("import medfuse")
    heavy = {"torch", "monai", "napari", "PyQt5", "qtpy", "SimpleITK", "pydicom", "dask"}
    assert not (heavy & mods), f"import medfuse pulled in {sorted(heavy & mods)}"


def test_classical_fusion_path_needs_no_torch():
    mods = _imported_after(
        "import numpy as np, medfuse\n"
        "a = np.random.default_rng(0).random((32, 32)); b = a[::-1].copy()\n"
        "f = medfuse.fuse(a, b, method='max')\n"
        "assert f.shape == a.shape"
    )
    assert "torch" not in mods and "napari" not in mods


def test_public_api_names_resolve():
    import medfuse

    for name in ("load", "load_volumes", "scan", "save", "register", "resample", "fuse", "Volume"):
        assert callable(getattr(medfuse, name)), name


def test_the_sub_packages_the_docs_name_are_attributes_after_a_bare_import():
    """``medfuse.registration.PRESETS`` raised AttributeError until something had imported the package."""
    mods = _imported_after(
        "import medfuse\n"
        "assert 'MR-PT' in medfuse.registration.PRESETS\n"
        "assert callable(medfuse.fusion.classical.fuse_arrays) and callable(medfuse.io.load)\n"
        "ns = {}\n"
        "exec('from medfuse import *', ns)\n"
        "assert not {'registration', 'fusion', 'io'} & set(ns)"
    )
    assert "torch" not in mods and "napari" not in mods
