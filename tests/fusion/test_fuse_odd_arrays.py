"""medfuse.fuse with odd arrays: integer colour images of other dtypes than uint8/uint16, ragged lists, torch dtypes
NumPy lacks, a bool (H, W, 3) array beside a 2-D image, big-endian inputs."""

import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError
from medfuse.fusion.color import fuse_rgb, rgb_to_ycbcr

RNG = np.random.default_rng(7)
GREY = RNG.random((40, 48))
COLOUR = RNG.random((40, 48, 3))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.uint32, np.uint64])
def test_integer_colour_of_unknown_white_is_refused(dtype):
    """int32 0..1000 was read on 0..2**31 (a result up to 1e9), int16 on 0..32767; uint64 and int64 were refused
    for a peak=1.8e19 nobody gave."""
    rgb = (COLOUR * 1000).astype(dtype)
    with pytest.raises(InvalidInputError, match=f"input 2, a colour image, is {np.dtype(dtype)} with values up") as ei:
        medfuse.fuse(GREY, rgb, method="mean")
    assert "peak" not in str(ei.value)  # fuse takes no peak
    assert "uint8" in ei.value.fix and "0..1" in ei.value.fix
    # What the fix says works, and gives the 8-bit result.
    want = medfuse.fuse(GREY, (COLOUR * 255).astype(np.uint8), method="mean")
    got = medfuse.fuse(GREY, np.round(rgb.astype(np.float64) * 255 / 999).astype(np.uint8), method="mean")
    assert got.dtype == np.uint8 and abs(got.astype(int) - want.astype(int)).max() <= 2


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.uint32, np.uint64, np.uint16])
def test_integer_colour_up_to_255_is_on_the_8_bit_scale(dtype):
    rgb8 = (COLOUR * 255).astype(np.uint8)
    out = medfuse.fuse(GREY, rgb8.astype(dtype), method="mean")
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, medfuse.fuse(GREY, rgb8, method="mean"))


def test_uint16_colour_above_255_keeps_the_16_bit_white():
    out = medfuse.fuse(GREY, (COLOUR * 65535).astype(np.uint16), method="mean")
    want = medfuse.fuse(GREY, COLOUR, method="mean") * 65535
    assert out.dtype == np.uint16 and np.abs(out - want).max() < 100


def test_int8_colour_is_refused_for_what_it_is():
    """It was refused as "peak=255 is above what the colour image's dtype int8 holds. Fix: leave peak out", a
    peak the caller never gave."""
    rgb = (COLOUR * 100).astype(np.int8)
    with pytest.raises(InvalidInputError, match="input 2, a colour image, is int8, which holds only up to 127") as ei:
        medfuse.fuse(GREY, rgb, method="mean")
    assert "peak" not in str(ei.value) and "uint8" in ei.value.fix
    grey8 = (GREY * 100).astype(np.int8)
    with pytest.raises(InvalidInputError, match="int8") as ei:
        fuse_rgb(grey8, rgb)
    assert "peak=" in ei.value.fix  # fuse_rgb takes one
    out = fuse_rgb(grey8, rgb, peak=127)
    assert out.dtype == np.int8 and out.min() >= 0


def test_fuse_rgb_infers_no_peak_from_an_unknown_white():
    """fuse_rgb infers as fuse does: int32 above 255 needs peak= (it was read as 2**31 - 1)."""
    rgb = (COLOUR * 1000).astype(np.int32)
    with pytest.raises(InvalidInputError, match="int32 with values up to 999") as ei:
        fuse_rgb((GREY * 1000).astype(np.int32), rgb)
    assert "peak=" in ei.value.fix
    out = fuse_rgb((GREY * 1000).astype(np.int32), rgb, peak=1000)
    assert out.dtype == np.int32 and out.max() <= 1000


def test_default_ycbcr_round_trip_of_int8_colour():
    """rgb_to_ycbcr, a conversion, still infers a peak for int8 (255), which fuse and fuse_rgb now refuse to infer."""
    from medfuse.fusion.color import ycbcr_to_rgb

    rgb = (COLOUR * 127).astype(np.int8)
    np.testing.assert_allclose(ycbcr_to_rgb(rgb_to_ycbcr(rgb)), rgb, atol=1e-9)


def test_ragged_list_is_refused_with_a_typed_error():
    with pytest.raises(InvalidInputError, match="input 1 is not an array NumPy can read") as ei:
        medfuse.fuse([[1, 2], [3]], [[1, 2], [3, 4]], method="mean")
    assert "same length" in ei.value.fix


def test_float8_tensor_is_refused_with_a_typed_error():
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    t = torch.tensor(GREY).to(torch.float8_e4m3fn)
    with pytest.raises(InvalidInputError, match="float8_e4m3fn") as ei:
        medfuse.fuse(t, GREY, method="mean")
    assert "x.float()" in ei.value.fix
    # The fix works.
    assert medfuse.fuse(t.float(), GREY, method="mean").shape == GREY.shape


def test_bool_rgb_beside_a_2d_image_hints_at_colour():
    with pytest.raises(InvalidInputError, match="mix 2-D and 3-D") as ei:
        medfuse.fuse(GREY, COLOUR > 0.5, method="mean")
    assert "input 2 is a colour image" in ei.value.fix and "bool" in ei.value.fix
    with pytest.raises(InvalidInputError) as ei:  # negative values: slices, said so
        medfuse.fuse(GREY, COLOUR - 0.5, method="mean")
    assert "negative-valued" in ei.value.fix
    with pytest.raises(InvalidInputError) as ei:  # a plain volume beside a 2-D image: no colour hint
        medfuse.fuse(GREY, np.zeros((40, 48, 9)), method="mean")
    assert "colour" not in ei.value.fix


@pytest.mark.parametrize("dtype", [">f4", ">u2"])
def test_big_endian_colour_gives_native_byte_order(dtype):
    scale = {">f4": 1, ">u2": 65535}[dtype]
    rgb = (COLOUR * scale).astype(dtype)
    out = medfuse.fuse(GREY.astype(">f8"), rgb, method="mean")
    assert out.dtype.isnative and out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, medfuse.fuse(GREY, rgb.astype(rgb.dtype.newbyteorder("=")), method="mean"))
    grey = (GREY * scale).astype(dtype)
    out = fuse_rgb(grey, rgb)
    assert out.dtype.isnative


def test_big_endian_grey_gives_native_byte_order():
    out = medfuse.fuse(GREY.astype(">f4"), GREY[::-1].astype(">f4"), method="mean")
    assert out.dtype == np.float32 and out.dtype.isnative
