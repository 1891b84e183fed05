"""Wrong types given to the fusion modules' public functions: a typed medfuse error with a fix, never a bare
TypeError/ValueError/IndexError from deep inside NumPy, torch or pathlib, and never a str argument's text (it
may be a patient's path) in the message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfuse.errors import InvalidInputError, WeightsError
from medfuse.fusion import classical as C
from medfuse.fusion import infer as I
from medfuse.fusion import normalise as N

#: A str that must never come back in a message.
SECRET = "/data/DOE^JOHN/w.safetensors"

torch = pytest.importorskip("torch")


def _img():
    return np.random.default_rng(0).random((16, 16)).astype(np.float32)


def _raises(error, call):
    """Run ``call``; it must raise exactly the typed ``error`` with a fix, and no secret in the message."""
    with pytest.raises(error) as ei:
        call()
    assert isinstance(ei.value, error)
    assert ei.value.fix and ei.value.fix.strip()
    assert "DOE" not in str(ei.value) and "DOE" not in ei.value.fix
    return ei.value


def _val(v):
    if isinstance(v, str) and v == "SECRET":
        return SECRET
    if isinstance(v, str) and v == "TENSOR":
        return torch.zeros(3)
    return v



# ---------------------------------------------------------------------- normalise
@pytest.mark.parametrize("method", [np.zeros((2, 16, 16, 16)), None, 3, ["window"], b"window", "TENSOR", "SECRET"],
                         ids=["ndarray4d", "None", "int", "list", "bytes", "tensor", "str"])
def test_normalise_method_of_a_wrong_type(method):
    _raises(InvalidInputError, lambda: N.normalise(_img(), method=_val(method)))


@pytest.mark.parametrize("name", ["modality", "unit"])
@pytest.mark.parametrize("value", [np.zeros(3), 3, ["CT"]], ids=["ndarray", "int", "list"])
def test_normalise_modality_and_unit_of_a_wrong_type(name, value):
    _raises(InvalidInputError, lambda: N.normalise(_img(), **{name: value}))


def test_auto_method_takes_an_array_unit_without_numpy_error():
    assert N.auto_method(np.zeros(3), np.zeros(3)) == "percentile"


@pytest.mark.parametrize("dtype", ["SECRET", 3, np.zeros(3)], ids=["str", "int", "ndarray"])
def test_normalise_dtype_of_a_wrong_type(dtype):
    _raises(InvalidInputError, lambda: N.normalise(_img(), dtype=_val(dtype)))


@pytest.mark.parametrize("percentiles", ["SECRET", ("1", SECRET)], ids=["str", "tuple-with-str"])
def test_normalise_percentiles_never_echo_text(percentiles):
    _raises(InvalidInputError, lambda: N.normalise(_img(), method="percentile", percentiles=_val(percentiles)))


@pytest.mark.parametrize("record", [np.zeros((2, 16, 16, 16)), "TENSOR", None, 3, "SECRET", [0, 1],
                                    {"low": SECRET, "high": 1.0}, {"low": None, "high": 1.0}, {"low": 0.0},
                                    {"low": np.zeros(3), "high": 1.0}, {"low": True, "high": 1.0},
                                    {"low": float("nan"), "high": 1.0}],
                         ids=["ndarray4d", "tensor", "None", "int", "str", "list", "low-str", "low-None",
                              "no-high", "low-array", "low-bool", "low-nan"])
def test_denormalise_record_that_is_not_a_normalise_record(record):
    _raises(InvalidInputError, lambda: N.denormalise(_img(), _val(record)))


def test_denormalise_record_method_of_a_wrong_type_is_read_as_linear():
    out = N.denormalise(np.array([0.0, 1.0]), {"low": 2.0, "high": 4.0, "method": np.zeros(3)})
    np.testing.assert_array_equal(out, [2.0, 4.0])


@pytest.mark.parametrize("array01", ["SECRET", np.array(["a"])], ids=["str", "str-array"])
def test_denormalise_array_of_a_wrong_type(array01):
    _raises(InvalidInputError, lambda: N.denormalise(_val(array01), {"low": 0.0, "high": 1.0}))


def test_denormalise_valid_records_unchanged():
    y, rec = N.normalise(np.linspace(-100, 300, 50), method="window")
    np.testing.assert_array_equal(N.denormalise(y, rec), rec["low"] + y * (rec["high"] - rec["low"]))
    np.testing.assert_array_equal(N.denormalise([0.5], {"low": 0, "high": 2, "method": "none"}), [0.5])


# ---------------------------------------------------------------------- weights paths
WEIGHTS_WRONG = [[SECRET], "TENSOR", np.zeros(3), 3, 2.5, True, {"a": 1}, b"w", ""]
WEIGHTS_IDS = ["list", "tensor", "ndarray", "int", "float", "bool", "dict", "bytes", "empty-str"]


@pytest.mark.parametrize("weights", WEIGHTS_WRONG, ids=WEIGHTS_IDS)
def test_load_model_weights_of_a_wrong_type(weights):
    e = _raises(InvalidInputError, lambda: I.load_model(_val(weights)))
    assert "weights" in str(e)


@pytest.mark.parametrize("weights", WEIGHTS_WRONG, ids=WEIGHTS_IDS)
def test_weights_sha256_weights_of_a_wrong_type(weights):
    _raises(InvalidInputError, lambda: I.weights_sha256(_val(weights)))


def test_missing_weights_file_stays_a_weights_error(tmp_path):
    missing = tmp_path / "none.safetensors"
    for call in (lambda: I.weights_sha256(str(missing)), lambda: I.load_model(missing),
                 lambda: I.weights_sha256("/nonexistent")):
        with pytest.raises(WeightsError) as ei:
            call()
        assert ei.value.fix


def test_shipped_weights_still_the_default():
    assert I.weights_sha256() == I.weights_sha256(I.default_weights_path())
    assert I.weights_sha256(str(I.default_weights_path())) == I.weights_sha256(None)


def test_network_fusion_weights_of_a_wrong_type():
    _raises(InvalidInputError, lambda: I.fuse_2d([_img(), _img()], weights=[SECRET]))


# ---------------------------------------------------------------------- classical fusion
@pytest.mark.parametrize("arrays", [None, 3, 2.5, SECRET, b"abcd", {"a": 1, "b": 2},
                                    (a for a in [np.zeros((4, 4)), np.ones((4, 4))])],
                         ids=["None", "int", "float", "str", "bytes", "dict", "generator"])
def test_classical_fuse_arrays_not_a_list(arrays):
    e = _raises(InvalidInputError, lambda: C.fuse_arrays(arrays, method="max"))
    assert "list of 2 or 3 arrays" in str(e)


def test_classical_fuse_arrays_accepted_inputs_unchanged():
    a, b = _img(), _img() * 0.5
    want = np.maximum(a, b).astype(np.float64)
    np.testing.assert_array_equal(C.fuse_arrays([a, b], method="max"), want)
    np.testing.assert_array_equal(C.fuse_arrays(torch.from_numpy(np.stack([a, b])), method="max"), want)


@pytest.mark.parametrize("method", [np.zeros(3), None, 3, SECRET], ids=["ndarray", "None", "int", "str"])
def test_classical_method_of_a_wrong_type(method):
    _raises(InvalidInputError, lambda: C.fuse_arrays([_img(), _img()], method=method))


@pytest.mark.parametrize("weights", [SECRET, {"a": 1}, ["a", "b"]], ids=["str", "dict", "list-of-text"])
def test_classical_weights_of_a_wrong_type(weights):
    _raises(InvalidInputError, lambda: C.fuse_arrays([_img(), _img()], method="mean", weights=weights))


@pytest.mark.parametrize("wavelet", [SECRET, 3, None, np.zeros(3)], ids=["str", "int", "None", "ndarray"])
def test_classical_wavelet_of_a_wrong_type(wavelet):
    _raises(InvalidInputError, lambda: C.fuse_arrays([_img(), _img()], method="wavelet", wavelet=wavelet))


@pytest.mark.parametrize("method, option", [("laplacian", {"levels": SECRET}), ("gff", {"eps1": SECRET})])
def test_classical_option_never_echoes_text(method, option):
    _raises(InvalidInputError, lambda: C.fuse_arrays([_img(), _img()], method=method, **option))


@pytest.mark.parametrize("method", ["max", "gff"])
def test_classical_cancel_of_a_wrong_type(method):
    _raises(InvalidInputError, lambda: C.fuse_arrays([_img(), _img()], method=method, cancel=3))


# ---------------------------------------------------------------------- guided filter
GF_IMAGES = [None, 3, SECRET, [[1.0, 2.0]], "TENSOR", np.zeros(()), np.array(["a"]), np.zeros((2, 2), complex),
             np.zeros((16, 16), bool), np.zeros((8, 8)), np.zeros((0, 16))]
GF_IMAGE_IDS = ["None", "int", "str", "list-other-shape", "tensor", "0-d", "str-array", "complex", "bool",
                "other-shape", "empty"]


@pytest.mark.parametrize("bad", GF_IMAGES, ids=GF_IMAGE_IDS)
def test_guided_filter_guide_of_a_wrong_type(bad):
    img = _img()
    _raises(InvalidInputError, lambda: C.guided_filter(_val(bad), img, radius=2, eps=0.1))


@pytest.mark.parametrize("bad", GF_IMAGES, ids=GF_IMAGE_IDS)
def test_guided_filter_src_of_a_wrong_type(bad):
    img = _img()
    _raises(InvalidInputError, lambda: C.guided_filter(img, _val(bad), radius=2, eps=0.1))


@pytest.mark.parametrize("radius", [None, "2", SECRET, 2.5, np.zeros(3), True, float("nan"), float("inf")],
                         ids=["None", "str-number", "str", "fraction", "ndarray", "bool", "nan", "inf"])
def test_guided_filter_radius_of_a_wrong_type(radius):
    img = _img()
    _raises(InvalidInputError, lambda: C.guided_filter(img, img, radius=radius, eps=0.1))


@pytest.mark.parametrize("eps", [None, "0.1", SECRET, np.zeros(3), True, float("nan"), -1.0],
                         ids=["None", "str-number", "str", "ndarray", "bool", "nan", "negative"])
def test_guided_filter_eps_of_a_wrong_type(eps):
    img = _img()
    _raises(InvalidInputError, lambda: C.guided_filter(img, img, radius=2, eps=eps))


def test_guided_filter_poll_of_a_wrong_type():
    img = _img()
    _raises(InvalidInputError, lambda: C.guided_filter(img, img, radius=2, eps=0.1, poll=3))


def test_guided_filter_valid_input_unchanged():
    img = _img()
    a = C.guided_filter(img, img, radius=2, eps=0.1)
    assert a.dtype == np.float32 and a.shape == img.shape
    # The documented capping: a radius under 1 is 1, a whole float is a whole number.
    np.testing.assert_array_equal(C.guided_filter(img, img, radius=0, eps=0.1),
                                  C.guided_filter(img, img, radius=1, eps=0.1))
    np.testing.assert_array_equal(C.guided_filter(img, img, radius=2.0, eps=np.float32(0.1)), a)


# ---------------------------------------------------------------------- network fusion
@pytest.mark.parametrize("fn", [I.fuse_arrays, I.fuse_2d, I.fuse_3d], ids=["fuse_arrays", "fuse_2d", "fuse_3d"])
@pytest.mark.parametrize("arrays", [None, 3, 2.5, Path(SECRET), SECRET],
                         ids=["None", "int", "float", "Path", "str"])
def test_network_fusion_not_a_list(fn, arrays):
    _raises(InvalidInputError, lambda: fn(arrays))


@pytest.mark.parametrize("mode", [np.zeros(3), None, 3, SECRET], ids=["ndarray", "None", "int", "str"])
def test_network_mode_of_a_wrong_type(mode):
    _raises(InvalidInputError, lambda: I.fuse_arrays([_img(), _img()], mode=mode))


def test_network_refine_and_cancel_of_a_wrong_type():
    img = _img()
    _raises(InvalidInputError, lambda: I.fuse_2d([img, img], refine=np.zeros(3)))
    _raises(InvalidInputError, lambda: I.fuse_2d([img, img], refine=SECRET))
    _raises(InvalidInputError, lambda: I.fuse_2d([img, img], cancel=3))
    vol = np.zeros((8, 8, 8), np.float32)
    _raises(InvalidInputError, lambda: I.fuse_3d([vol, vol], cancel=3))


# ---------------------------------------------------------------------- choices named by a str
def test_a_path_given_as_the_fusion_method_or_device_is_never_echoed():
    import medfuse

    a = _img()
    err = _raises(InvalidInputError, lambda: medfuse.fuse(a, a, method=SECRET))
    assert "unknown fusion method (a str of" in str(err)
    err = _raises(InvalidInputError, lambda: medfuse.fuse(a, a, method="max", device=SECRET))
    assert "unknown device (a str of" in str(err)
    # A short typo is shown as written, so the user sees what to mend.
    assert "'lapalcian'" in str(_raises(InvalidInputError, lambda: medfuse.fuse(a, a, method="lapalcian")))
    assert "'cdua'" in str(_raises(InvalidInputError, lambda: medfuse.fuse(a, a, method="max", device="cdua")))


@pytest.mark.parametrize("device", [np.zeros(3), 0, Path("cpu")], ids=["ndarray", "int", "Path"])
def test_a_device_that_is_no_name_is_refused(device):
    from medfuse.fusion.device import check_device_name

    _raises(InvalidInputError, lambda: check_device_name(device))


def test_a_torch_device_is_a_device_name():
    from medfuse.fusion.device import check_device_name

    assert check_device_name(torch.device("cpu")) == "cpu"
    assert check_device_name(torch.device("cuda", 1)) == "cuda:1"


def test_small_messages_found_by_a_probe():
    import medfuse
    from medfuse.fusion.device import check_device_name

    assert check_device_name("cpu:0") == "cpu"  # torch's spelling; it was refused
    tiny = np.random.default_rng(0).random((4, 4, 4))
    err = _raises(InvalidInputError, lambda: medfuse.fuse(tiny, tiny))
    assert "colour" not in err.fix  # a 4x4x4 volume is no RGBA image
    nan = np.full((8, 8), np.nan)
    assert "(100 % of it)" in str(_raises(InvalidInputError, lambda: medfuse.fuse(nan, nan, method="max")))
