"""Wrong argument types in the registration functions: a typed medfuse error with a fix, never a bare
TypeError/ValueError/RuntimeError from NumPy, torch, SimpleITK or pathlib, and never a str argument's text.

All of these fail before any optimisation starts, so the module runs in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from medfuse import Volume
from medfuse.errors import InvalidInputError, UnreadableFileError
from medfuse.registration import Transform, common_grid, load_transform, register, resample, resample_to_common_grid
from medfuse.registration.presets import get_preset

torch = pytest.importorskip("torch")

#: A str argument that may be a patient's path: no message may carry it.
PATIENT_PATH = "/data/DOE^JOHN/scan.nii"


def _vol(seed: int = 0) -> Volume:
    return Volume(np.random.default_rng(seed).random((16, 16, 16)).astype(np.float32), np.eye(4), modality="MR")


def _wrong(v: Volume) -> dict:
    """The wrong values an exploratory run passed, by name."""
    return {"tensor": torch.zeros(2, 16, 16, 16), "array4d": np.zeros((2, 16, 16, 16)), "int": 3, "None": None,
            "list": [1, 2], "volume": v, "path": PATIENT_PATH}


def _typed(exc_info, cls=InvalidInputError) -> None:
    e = exc_info.value
    assert type(e) is cls, repr(e)
    assert e.fix and e.fix.strip(), f"no fix: {e}"
    assert PATIENT_PATH not in str(e) and "DOE^JOHN" not in str(e), str(e)


# --------------------------------------------------------------------------- register's str choices
@pytest.mark.parametrize("option", ["kind", "metric", "initialise", "preset"])
@pytest.mark.parametrize("which", ["tensor", "array4d", "int", "list", "volume"])
def test_register_refuses_a_non_str_choice_by_its_type(option, which):
    v = _vol()
    bad = _wrong(v)[which]
    with pytest.raises(InvalidInputError) as ei:
        register(v, v, **{option: bad})
    _typed(ei)
    assert option in str(ei.value)
    assert "tensor(" not in str(ei.value) and "array(" not in str(ei.value)  # described by type, not printed


@pytest.mark.parametrize("option", ["kind", "metric", "initialise"])
def test_register_refuses_none_for_a_choice_that_has_no_none(option):
    v = _vol()
    with pytest.raises(InvalidInputError) as ei:
        register(v, v, **{option: None})
    _typed(ei)


def test_get_preset_refuses_a_non_str_name():
    for bad in (np.zeros((2, 16, 16, 16)), torch.zeros(3), 3, ["MR-CT"], PATIENT_PATH):
        with pytest.raises(InvalidInputError) as ei:
            get_preset(bad)
        _typed(ei)


def test_register_bspline_grid_and_masks_of_the_wrong_type():
    v = _vol()
    for bad in ("forty", [40.0], PATIENT_PATH):
        with pytest.raises(InvalidInputError) as ei:
            register(v, v, kind="deformable", bspline_grid_mm=bad)
        _typed(ei)
    for bad in (PATIENT_PATH, [[1], [2, 3]], 3):
        with pytest.raises(InvalidInputError) as ei:
            register(v, v, fixed_mask=bad)
        _typed(ei)


def test_register_setting_of_the_wrong_type_is_described_by_its_type():
    v = _vol()
    with pytest.raises(InvalidInputError, match="registration setting samples") as ei:
        register(v, v, samples=PATIENT_PATH)
    _typed(ei)


# --------------------------------------------------------------------------- common grids
@pytest.mark.parametrize("fn", [common_grid, resample_to_common_grid], ids=lambda f: f.__name__)
@pytest.mark.parametrize("which", ["tensor", "array4d", "int", "None", "volume", "path"])
def test_common_grid_takes_a_list_of_volumes(fn, which):
    with pytest.raises(InvalidInputError) as ei:
        fn(_wrong(_vol())[which])
    _typed(ei)
    assert "list" in str(ei.value) or "list" in ei.value.fix


@pytest.mark.parametrize("fn", [common_grid, resample_to_common_grid], ids=lambda f: f.__name__)
def test_common_grid_items_and_reference_index(fn):
    v = _vol()
    for bad in ([v, np.zeros((16, 16, 16))], [v, PATIENT_PATH], []):
        with pytest.raises(InvalidInputError) as ei:
            fn(bad)
        _typed(ei)
    for bad in ("0", 0.5, None):
        with pytest.raises(InvalidInputError) as ei:
            fn([v], reference_index=bad)
        _typed(ei)


def test_resample_to_common_grid_reads_a_generator_once():
    a, b = _vol(0), _vol(1)
    out = resample_to_common_grid(x for x in (a, b))
    assert len(out) == 2 and all(o.same_grid(a) for o in out)


def test_resample_interpolation_and_default_of_the_wrong_type():
    v = _vol()
    for bad in (np.zeros(3), ["linear"], torch.zeros(2), 1):
        with pytest.raises(InvalidInputError) as ei:
            resample(v, v, interpolation=bad)
        _typed(ei)
    for bad in (PATIENT_PATH, [0.0]):
        with pytest.raises(InvalidInputError) as ei:
            resample(v, v, default=bad)
        _typed(ei)
    # Still fine: a mask's False, a number, NaN.
    mask = v.with_array(v.array > 0.5)
    assert resample(mask, v, default=False).array.dtype == bool
    assert np.isfinite(resample(v, v, default=np.float32(2)).array).all()
    resample(v, v, default=float("nan"))


# --------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("which", ["path", "tensor", "array4d", "int", "None", "list", "volume"])
def test_from_matrix_takes_only_a_4x4_matrix_of_numbers(which):
    with pytest.raises(InvalidInputError) as ei:
        Transform.from_matrix(_wrong(_vol())[which])
    _typed(ei)


def test_from_matrix_refuses_strings_complex_ragged_and_objects():
    eye = np.eye(4)
    for bad in ([["a"] * 4] * 4, eye.astype(str), eye + 1j, [[1, 2], [3]], np.array([object()] * 16).reshape(4, 4),
                torch.eye(4, requires_grad=True), b"\x00" * 16):
        with pytest.raises(InvalidInputError) as ei:
            Transform.from_matrix(bad)
        _typed(ei)
    with pytest.raises(InvalidInputError) as ei:
        Transform.from_matrix(PATIENT_PATH)
    assert "load_transform" in ei.value.fix
    # Valid ones, unchanged: an array, nested lists, ints, a CPU tensor.
    for ok in (eye, eye.tolist(), np.eye(4, dtype=int), torch.eye(4, dtype=torch.float64)):
        np.testing.assert_allclose(Transform.from_matrix(ok).matrix, eye, atol=1e-12)


@pytest.mark.parametrize("which", ["list", "None", "tensor", "array4d", "int", "volume"])
def test_load_transform_takes_a_path(which):
    with pytest.raises(InvalidInputError) as ei:
        load_transform(_wrong(_vol())[which])
    _typed(ei)


def test_load_transform_empty_and_missing_paths(tmp_path):
    with pytest.raises(InvalidInputError) as ei:
        load_transform("")
    _typed(ei)
    missing = tmp_path / "nowhere.tfm"
    with pytest.raises(UnreadableFileError, match="nowhere.tfm") as ei:  # the user's own file is named
        load_transform(missing)
    assert ei.value.fix


def test_transform_save_and_points_of_the_wrong_type():
    t = Transform.identity()
    for bad in (None, 3, ["a.tfm"], np.zeros(3)):
        with pytest.raises(InvalidInputError) as ei:
            t.save(bad)
        _typed(ei)
    for bad in (PATIENT_PATH, [[1, 2, 3], [4]], 3.0, np.array([[1 + 2j, 0, 0]]), [["1", "2", "3"]],
                np.ones((1, 3), bool)):
        with pytest.raises(InvalidInputError) as ei:
            t.transform_points(bad)
        _typed(ei)
    assert t.transform_points([[1, 2, 3]]).tolist() == [[1.0, 2.0, 3.0]]  # ints are coordinates


def test_resample_refuses_a_complex_volume_with_a_fix():
    """SimpleITK's cast raised a bare RuntimeError ("does not support casting from complex")."""
    v = _vol()
    z = Volume(v.array.astype(np.complex64) * (1 + 1j), v.affine, modality="MR")
    with pytest.raises(InvalidInputError, match="complex") as ei:
        resample(z, v)
    _typed(ei)
    assert "np.abs" in ei.value.fix


def test_resample_refuses_a_mask_default_that_is_no_truth_value():
    """``default=7`` for a boolean volume became True: everything outside the mask was marked inside."""
    v = _vol()
    mask = Volume(v.array > 0.5, v.affine)
    with pytest.raises(InvalidInputError, match="must be False or True, got 7") as ei:
        resample(mask, v, default=7)
    _typed(ei)
    for ok in (False, True, 0, 1.0):
        assert resample(mask, v, default=ok).array.dtype == bool
