"""The shared option checks (medfuse._checks.whole / number) that every public function's numeric options go
through: one wording everywhere, bools and NaN refused, and a value's text never echoed (it may be a path)."""

import numpy as np
import pytest

from medfuse import _checks
from medfuse.errors import InvalidInputError


@pytest.mark.parametrize("value", [0, 7, np.int64(7), np.uint8(3)])
def test_whole_takes_python_and_numpy_integers(value):
    out = _checks.whole(value, "n", example="n=1")
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 1.0, 1.5, "1", None, [1]])
def test_whole_refuses_bools_floats_text_and_none(value):
    with pytest.raises(InvalidInputError, match="^n must be a whole number, got ") as info:
        _checks.whole(value, "n", example="n=1")
    assert info.value.fix == "pass e.g. n=1"


@pytest.mark.parametrize("kwargs, good, bad, words", [
    ({"minimum": 1}, 1, 0, "of 1 or more"),
    ({"maximum": 5}, 5, 6, "of 5 or less"),
    ({"minimum": 0, "maximum": 4294967294}, 4294967294, 4294967295, "from 0 to 4294967294"),
])
def test_whole_range_ends_are_inclusive_and_named(kwargs, good, bad, words):
    assert _checks.whole(good, "n", example="n=1", **kwargs) == good
    with pytest.raises(InvalidInputError, match=f"n must be a whole number {words}, got {bad}\\."):
        _checks.whole(bad, "n", example="n=1", **kwargs)


def test_whole_none_only_when_allowed():
    assert _checks.whole(None, "threads", example="threads=1", none_ok=True) is None
    with pytest.raises(InvalidInputError, match=r"of 1 or more \(or None\), got 0"):
        _checks.whole(0, "threads", minimum=1, example="threads=1", none_ok=True)


@pytest.mark.parametrize("value", [0, 0.5, np.float32(0.25), np.int16(1)])
def test_number_takes_ints_floats_and_numpy_scalars(value):
    out = _checks.number(value, "x", low=0, high=1, example="x=0.5")
    assert out == float(value) and type(out) is float


@pytest.mark.parametrize("value", [True, "0.5", b"0.5", None, [0.5], float("nan"), float("inf"), -np.inf])
def test_number_refuses_bools_text_none_sequences_and_non_finite(value):
    with pytest.raises(InvalidInputError, match="^x must be a number"):
        _checks.number(value, "x", example="x=0.5")


def test_number_open_and_closed_ends():
    assert _checks.number(0, "f", low=0, high=1, example="f=0.2") == 0.0
    for v in (0, 1):
        with pytest.raises(InvalidInputError, match=r"f must be a number in \(0, 1\), got "):
            _checks.number(v, "f", low=0, high=1, open_low=True, open_high=True, example="f=0.2")
    with pytest.raises(InvalidInputError, match="r must be a number above 0, got 0"):
        _checks.number(0, "r", low=0, open_low=True, example="r=3")
    with pytest.raises(InvalidInputError, match=r"atol must be a distance in mm of 0 or more, got -1\.0"):
        _checks.number(-1.0, "atol", low=0, what="a distance in mm", example="atol=1e-3")


def test_number_non_finite_only_when_asked():
    assert _checks.number(np.inf, "w", example="w=80", finite=False) == np.inf
    assert np.isnan(_checks.number(float("nan"), "w", example="w=80", finite=False))
    with pytest.raises(InvalidInputError, match="w must be a number, got nan"):
        _checks.number(float("nan"), "w", example="w=80")
    with pytest.raises(InvalidInputError, match="w must be a number, got a str"):
        _checks.number("80", "w", example="w=80", finite=False)


def test_a_text_value_is_described_by_its_type_never_echoed():
    secret = "/data/DOE^JOHN/1.2.840.113619.2.55.3/scan.dcm"
    for check in (lambda: _checks.whole(secret, "seed", example="seed=0"),
                  lambda: _checks.number(secret, "level", example="level=40")):
        with pytest.raises(InvalidInputError) as info:
            check()
        assert "DOE" not in str(info.value) and "got a str" in str(info.value)


def test_describe_names_the_type_with_its_article():
    assert _checks.describe(5) == "an int" and _checks.describe("x") == "a str" and _checks.describe(None) == "None"
    assert _checks.describe(np.zeros((2, 3))) == "an ndarray of shape (2, 3)"
    assert _checks.describe(np.uint8(3)) == "a uint8 of shape ()"


def test_a_class_given_for_a_value_is_a_typed_error():
    """medfuse.Volume itself (not an instance) for a number: describe read .shape off the class ('property')."""
    from medfuse import Volume

    assert _checks.describe(Volume) == "the class Volume"
    with pytest.raises(InvalidInputError, match="seed must be a whole number, got the class Volume"):
        _checks.whole(Volume, "seed", example="seed=0")


def test_choice_shows_a_typo_but_never_a_path_or_an_array():
    assert _checks.choice("rigid", "kind", ("rigid", "affine")) == "rigid"
    assert _checks.choice(None, "kind", (None, "rigid")) is None
    with pytest.raises(InvalidInputError, match="unknown kind 'rigd'") as info:
        _checks.choice("rigd", "kind", ("rigid", "affine"))
    assert info.value.fix == "use one of rigid, affine"
    for bad, shown in ((None, "None"), (np.zeros((2, 3)), "an ndarray of shape"), (["rigid"], "a list"),
                       ("/data/DOE^JOHN/scan.nii", r"\(a str of 23 characters, not shown\)")):
        with pytest.raises(InvalidInputError, match=f"unknown kind {shown}") as info:
            _checks.choice(bad, "kind", ("rigid", "affine"))
        assert "DOE" not in str(info.value)


def test_as_list_takes_iterables_and_refuses_what_would_be_taken_apart():
    assert _checks.as_list((1, 2), problem="p", fix="f") == [1, 2]
    assert _checks.as_list((x for x in "ab"), problem="p", fix="f") == ["a", "b"]  # a generator, read once
    for bad, shown in ((None, "None"), (5, "an int"), ("MR", "a str"), (b"MR", "a bytes"), ({"a": 1}, "a dict"),
                       (np.zeros((2, 3)), "an ndarray of shape")):
        with pytest.raises(InvalidInputError, match=f"^inputs must be a list, got {shown}") as info:
            _checks.as_list(bad, problem="inputs must be a list", fix="pass [a, b]")
        assert info.value.fix == "pass [a, b]"


def test_a_path_no_file_system_can_name_is_a_typed_error(tmp_path):
    """An unpaired surrogate ("\\ud800") reached the file system: a raw UnicodeEncodeError from medfuse.save."""
    import medfuse

    v = medfuse.Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(InvalidInputError, match="unpaired surrogate"):
        medfuse.save(v, str(tmp_path / "s\ud800.nii.gz"))
    with pytest.raises(InvalidInputError, match="unpaired surrogate"):
        medfuse.load(str(tmp_path / "s\ud800.nii.gz"))
    # A name os.fsdecode made of undecodable bytes (surrogateescape) is a real file name: written.
    assert medfuse.save(v, str(tmp_path / "s\udce9.nii.gz")).is_file()
