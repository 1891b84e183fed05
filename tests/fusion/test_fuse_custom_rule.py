"""``medfuse.fuse(a, b, method=my_rule)``: a fusion rule of the caller's, with its contract (what it gets, what it
must return), its checks and its provenance; and the near-name hints of misspelt methods and normalisations.

Found teaching with the Python API: ``method=lambda a, b: ...`` was "unknown fusion method a function", so a
student's rule could not be compared with the built-in ones; ``method="lapacian"`` listed the choices without
the near one, and ``normalise="minmx"`` did not repeat the value at all.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import medfuse
from medfuse import Volume
from medfuse.errors import InvalidInputError
from medfuse.fusion import fuse


def _pair(shape=(32, 40), seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(shape), rng.random(shape)


def test_a_function_equal_to_a_built_in_rule_gives_its_result_on_arrays():
    a, b = _pair()
    assert np.array_equal(fuse(a, b, method=np.maximum), fuse(a, b, method="max"))
    assert np.allclose(fuse(a, b, method=lambda x, y: (x + y) / 2), fuse(a, b, method="mean"))
    c = np.random.default_rng(1).random(a.shape)
    assert np.allclose(fuse(a, b, c, method=lambda *xs: np.max(xs, axis=0)), fuse(a, b, c, method="max"))


def test_the_function_gets_the_normalised_inputs_and_its_options():
    seen = {}

    def rule(x, y, *, weight):
        seen.update(dtypes=(x.dtype, y.dtype), ranges=((x.min(), x.max()), (y.min(), y.max())), weight=weight)
        return weight * x + (1 - weight) * y

    mr = np.linspace(0, 150, 64 * 64).reshape(64, 64)       # an MR in 0..150 beside ...
    pet = np.linspace(8, 0, 64 * 64).reshape(64, 64)        # ... a PET in SUV 0..8: each scaled by min/max
    out = fuse(mr, pet, method=rule, weight=1.0)
    assert seen["dtypes"] == (np.float64, np.float64) and seen["weight"] == 1.0
    assert seen["ranges"] == ((0.0, 1.0), (0.0, 1.0))
    assert np.allclose(out, mr)  # weight 1: the first input, mapped back to its own scale


def test_a_function_on_volumes_records_its_name_not_its_code():
    rng = np.random.default_rng(2)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    ct = Volume(rng.normal(40, 300, (24, 20, 12)).astype(np.float32), aff, modality="CT", unit="HU")
    mr = Volume(rng.random((24, 20, 12)).astype(np.float32) * 900, aff, modality="MR")

    def brighter(x, y):
        return np.maximum(x, y)

    mine, builtin = fuse(ct, mr, method=brighter), fuse(ct, mr, method="max")
    assert np.array_equal(mine.array, builtin.array)
    assert np.array_equal(mine.affine, ct.affine)  # geometry kept
    assert mine.provenance["method"] == "custom"
    step = mine.provenance["history"][-1]
    assert step["step"] == "fuse" and step["method"] == "custom"
    assert step["custom_rule"] == f"{__name__}.test_a_function_on_volumes_records_its_name_not_its_code.<locals>.brighter"
    # A result beyond 0..1 is clipped into it, as for the built-in rules: a fused Volume is on 0..1.
    over = fuse(ct, mr, method=lambda x, y: x + y + 5)
    assert float(over.array.min()) == 1.0 and float(over.array.max()) == 1.0


def test_a_function_on_a_grey_and_a_colour_image_fuses_the_luma():
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = fuse(grey, rgb, method=np.maximum)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.array_equal(out, fuse(grey, rgb, method="max"))


@pytest.mark.parametrize("rule,options,message", [
    (lambda x: x, {}, r"cannot be called with the 2 images as positional arguments \(too many"),
    (lambda x, y: x, {"alpha": 0.2}, "and the options alpha"),
    (lambda x, y: 0.5, {}, r"returned a float; it must return one real array of the inputs' shape \(16, 16\)"),
    (lambda x, y: np.max([x, y]), {}, r"returned an array of shape \(\)"),
    (lambda x, y: None, {}, "returned None"),
    (lambda x, y: x + 1j * y, {}, "returned an ndarray of shape"),
    (lambda x, y: x / (y * 0), {}, "returned 256 NaN or infinite value"),
])
def test_a_function_that_breaks_the_contract_is_a_typed_error(rule, options, message):
    a, b = _pair((16, 16))
    with np.errstate(divide="ignore", invalid="ignore"), pytest.raises(InvalidInputError, match=message) as err:
        fuse(a, b, method=rule, **options)
    assert "def my_rule" in err.value.fix or "numpy." in err.value.fix


def test_an_error_of_the_function_itself_passes_through():
    def broken(x, y):
        raise ZeroDivisionError("the student's own bug")

    a, b = _pair((16, 16))
    with pytest.raises(ZeroDivisionError, match="the student's own bug"):
        fuse(a, b, method=broken)


def test_a_class_or_a_non_callable_is_still_an_unknown_method():
    a, b = _pair((16, 16))
    for bad in (int, 3, ["max"]):
        with pytest.raises(InvalidInputError, match="unknown fusion method"):
            fuse(a, b, method=bad)


@pytest.mark.parametrize("call,message", [
    (lambda a, b: fuse(a, b, method="lapacian"), "unknown fusion method 'lapacian'; did you mean 'laplacian'?"),
    (lambda a, b: fuse(a, b, method="MAXX"), "did you mean 'max'?"),
    (lambda a, b: fuse(a, b, method="max", normalise="minmx"),
     "unknown normalisation method 'minmx'; did you mean 'minmax'?"),
    (lambda a, b: fuse(a, b, method="max", normalise=[{"method": "percentil"}, None]),
     "normalise entry 1: unknown normalisation method 'percentil'; did you mean 'percentile'?"),
])
def test_a_misspelt_name_names_the_near_one(call, message):
    a, b = _pair((16, 16))
    with pytest.raises(InvalidInputError, match=message.replace("?", r"\?").replace("[", r"\[")):
        call(a, b)


def test_a_name_far_from_every_choice_gets_no_guess_and_a_path_is_not_shown():
    a, b = _pair((16, 16))
    with pytest.raises(InvalidInputError) as err:
        fuse(a, b, method="zzz")
    assert "did you mean" not in str(err.value)
    with pytest.raises(InvalidInputError) as err:
        fuse(a, b, method="max", normalise="/data/DOE^JOHN/minmax")
    assert "DOE" not in str(err.value) and "did you mean" not in str(err.value)


def test_the_examples_in_help_fuse_run():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(medfuse.fuse, "fuse", globs={})
    assert sum(len(t.examples) for t in tests) >= 8  # the Examples section is there
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
