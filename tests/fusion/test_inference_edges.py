"""Edge cases of the network's inference face (``medfuse.fuse(..., method="network")``): the review's fixes.

Small inputs only: every test here runs in well under a second or two on a CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import medfuse.fusion as fusion  # noqa: E402
from medfuse.errors import InvalidInputError  # noqa: E402
from medfuse.fusion import fuse, infer  # noqa: E402
from medfuse.volume import Volume  # noqa: E402


def _blobs(shape, seed):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    return np.clip(ndi.gaussian_filter(rng.random(shape), 2) * 3 - 1, 0, 1)


def _oblique_left_handed(spacing=(0.5, 0.5, 5.0)):
    th = np.deg2rad(17.0)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing) @ np.diag([1.0, -1.0, 1.0])  # det < 0: a left-handed grid
    aff[:3, 3] = [-91.123456789, 12.5, 7.000001]
    return aff


def test_min_size_mirror_matches_infer():
    assert fusion._MIN_SIZE_3D == infer.MIN_SIZE_3D


@pytest.mark.parametrize("shape, axis", [((36, 40, 3), 2), ((5, 36, 40), 0), ((36, 2, 40), 1)])
def test_volume_thin_along_one_axis_is_fused_slice_by_slice(shape, axis):
    """A volume of 2-7 slices was refused by the tri-plane path ("fuse slice by slice"; for 3 slices the hint
    even spoke of colour images); medfuse.fuse now does what the hint says, as it does for a single slice."""
    a, b = _blobs(shape, 1), _blobs(shape, 2)
    aff = _oblique_left_handed()
    seen = []
    out = fuse(Volume(a, aff, modality="MR"), Volume(b, aff, modality="PT", unit="SUVbw"), method="network",
               normalise=[{"method": "none"}, {"method": "none"}], progress=lambda f, m: seen.append(f))
    assert out.shape == shape and out.array.dtype == np.float32
    assert np.array_equal(out.affine, aff)
    assert out.provenance["network_functional"] is True
    for i in range(shape[axis]):
        want = infer.fuse_2d([np.take(a, i, axis=axis), np.take(b, i, axis=axis)], functional=True)
        np.testing.assert_array_equal(np.take(out.array, i, axis=axis), np.clip(want, 0, 1))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == shape[axis]
    assert out.provenance["network_path"] == f"2-D, slice by slice along axis {axis}"
    # Arrays too (they were refused, "too small for the network"), but for a first or last axis of 3 (colour?).
    if 3 not in (shape[0], shape[2]):
        # To float rounding: oneDNN may pick another kernel for a differently aligned buffer.
        np.testing.assert_allclose(fuse(a, b, method="network", normalise="none", functional=True), out.array,
                                   atol=1e-5)


@pytest.mark.parametrize("shape", [(36, 40, 3), (3, 36, 40), (4, 36, 40)])
def test_arrays_that_may_be_colour_are_not_fused_channel_by_channel(shape):
    """HWC and CHW (torch, PIL tensors) colour images look like 3- or 4-slice volumes."""
    a = (_blobs(shape, 1) * 255).astype(np.uint8)
    with pytest.raises(InvalidInputError, match="too small"):
        fuse(a, a, method="network")


def test_arrays_thin_along_two_axes_are_told_to_use_a_classical_rule():
    """The hint said "slice by slice, as medfuse.fuse does for Volumes", which refuses these too."""
    a = _blobs((4, 4, 80), 1)
    with pytest.raises(InvalidInputError, match="too small") as ei:
        fuse(a, a, method="network")
    assert "classical rule" in ei.value.fix and "slice by slice" not in ei.value.fix


def test_volume_thin_along_two_axes_is_a_clear_error():
    a = _blobs((40, 3, 3), 1)
    with pytest.raises(InvalidInputError, match="too thin along 2 axes") as ei:
        fuse(Volume(a, np.eye(4)), Volume(a, np.eye(4)), method="network")
    assert "colour" not in str(ei.value)
    # A classical rule still takes them.
    assert fuse(Volume(a, np.eye(4)), Volume(a, np.eye(4)), method="laplacian").shape == (40, 3, 3)


def test_thin_volume_slices_honour_cancel():
    from medfuse.errors import CancelledError
    from medfuse.progress import CancelToken

    a = _blobs((32, 32, 4), 3)
    token = CancelToken()

    def progress(frac, msg):
        if frac >= 0.5:
            token.cancel()

    with pytest.raises(CancelledError):
        fuse(Volume(a, np.eye(4)), Volume(a, np.eye(4)), method="network", progress=progress, cancel=token)


def test_single_slice_beside_a_thin_axis_still_takes_the_2d_path():
    a = _blobs((40, 5, 1), 4)
    out = fuse(Volume(a, np.eye(4)), Volume(a[::-1].copy(), np.eye(4)), method="network")
    assert out.shape == (40, 5, 1) and np.isfinite(out.array).all()


def _numpy_peak(fn):
    """Peak bytes NumPy allocated while ``fn`` ran (NumPy reports its buffers to tracemalloc; torch does not)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_input_check_clips_in_place():
    """The network's input check stacked the inputs and then clipped into a second copy of the stack."""
    rng = np.random.default_rng(5)
    a, b = rng.random((40, 48, 32), dtype=np.float32), rng.random((40, 48, 32), dtype=np.float32)
    x = infer._check_arrays([a, b], 3)
    assert x.dtype == np.float32 and np.array_equal(x, np.stack([a, b]))
    assert _numpy_peak(lambda: infer._check_arrays([a, b], 3)) < 3.2 * a.nbytes  # was 4.0x one input


def test_fuse_holds_no_float64_copies_through_the_network():
    """medfuse.fuse on float32 volumes peaked at 12x one input in NumPy buffers (float64 copies of the inputs
    made twice, kept through the fusion; 10x for Volumes); now about 5x (6x), with the same output to the bit."""
    from medfuse.fusion.normalise import denormalise, normalise

    rng = np.random.default_rng(6)
    a, b = rng.random((40, 48, 32), dtype=np.float32), rng.random((40, 48, 32), dtype=np.float32) * 0.9
    a0, b0 = a.copy(), b.copy()
    infer.fuse_3d([a[:16, :16, :16], b[:16, :16, :16]])  # load the model outside the measurement
    out = fuse(a, b, method="network")
    assert np.array_equal(a, a0) and np.array_equal(b, b0)  # the inputs are never written to
    s = [normalise(x.astype(np.float64), method="range", low=0.0, high=1.0) for x in (a, b)]
    want = denormalise(np.asarray(infer.fuse_arrays([s[0][0], s[1][0]]), np.float64), s[0][1]).astype(np.float32)
    assert out.dtype == np.float32 and np.array_equal(out, want)
    assert _numpy_peak(lambda: fuse(a, b, method="network")) < 8.0 * a.nbytes
    va, vb = Volume(a, np.eye(4), modality="MR"), Volume(b, np.eye(4), modality="MR")
    assert _numpy_peak(lambda: fuse(va, vb, method="network")) < 8.0 * a.nbytes  # was 10x


def test_normalise_leaves_its_input_alone_and_computes_as_before():
    from medfuse.fusion.normalise import normalise

    rng = np.random.default_rng(7)
    x = rng.normal(100.0, 40.0, (20, 30, 10))
    x0 = x.copy()
    for kw in ({"method": "minmax"}, {"method": "window", "level": 40, "width": 400},
               {"method": "percentile"}, {"method": "range", "low": 50.0, "high": 120.0}):
        y, rec = normalise(x, **kw)
        lo, hi = rec["low"], rec["high"]
        assert np.array_equal(y, np.clip((x0 - lo) / (hi - lo), 0.0, 1.0))
        assert rec["clipped_fraction"] == float(np.mean(((x0 - lo) / (hi - lo) < 0) | ((x0 - lo) / (hi - lo) > 1)))
        assert np.array_equal(x, x0)


def test_strongly_anisotropic_voxels_are_warned_about_and_recorded():
    # The tri-plane path counts voxels, not millimetres: on 1 x 1 x 4 mm data (the sample CT's grid) it mixed detail
    # over 4x more mm through-plane, silently. The output is unchanged; the warning says how to avoid it.
    import warnings

    from medfuse.errors import MedfuseWarning

    aniso = _noise_pair((20, 20, 12), (1.0, 1.0, 4.0))
    with pytest.warns(MedfuseWarning, match=r"anisotropic \(1 x 1 x 4 mm, ratio 4.0\).*resample"):
        out = fuse(*aniso, method="network")
    assert "anisotropic" in out.provenance["warnings"][0]
    iso = _noise_pair((20, 20, 12), (2.0, 2.0, 2.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        same = fuse(*iso, method="network")
        fuse(*aniso, method="laplacian")  # the warning is about the network's tri-plane path
    np.testing.assert_array_equal(out.array, same.array)  # a warning only: the voxels are fused as before
    assert "warnings" not in same.provenance


def test_a_thin_volume_with_uneven_pixels_is_warned_about_and_thick_slices_are_not():
    """Slice by slice, the 2-D path counts pixels: 5 x 1 mm pixels were fused unsaid, while the tri-plane path
    warned from a ratio of 3. Thick slices fused one at a time (5 mm apart, 1 x 1 mm pixels) mix nothing across
    them: no warning."""
    import warnings

    from medfuse.errors import MedfuseWarning

    with pytest.warns(MedfuseWarning, match=r"within the slices .*5 x 1 mm pixels, ratio 5.0"):
        out = fuse(*_noise_pair((5, 24, 20), (1.0, 5.0, 1.0)), method="network")
    assert "within the slices" in out.provenance["warnings"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        assert "warnings" not in fuse(*_noise_pair((5, 24, 20), (5.0, 1.0, 1.0)), method="network").provenance


def _noise_pair(shape, spacing):
    """Two MR Volumes of uniform noise (seed 0) on one axis-aligned grid of this spacing."""
    rng = np.random.default_rng(0)
    return [Volume(rng.random(shape).astype(np.float32), np.diag([*spacing, 1.0]), modality="MR") for _ in range(2)]


def test_weights_that_differ_from_their_recorded_hash_are_refused(tmp_path):
    """One changed byte in the tensor data still loaded (a different network, silently); its card records the hash."""
    import shutil

    from medfuse.errors import WeightsError

    for name in ("medfuse_fusion.safetensors", "medfuse_fusion.json"):
        shutil.copy(infer.default_weights_path().with_name(name), tmp_path / name)
    good = tmp_path / "medfuse_fusion.safetensors"
    a, b = _blobs((32, 32), 8), _blobs((32, 32), 9)
    np.testing.assert_array_equal(infer.fuse_2d([a, b], weights=good), infer.fuse_2d([a, b]))  # an intact copy
    bad = tmp_path / "flipped" / "medfuse_fusion.safetensors"
    bad.parent.mkdir()
    shutil.copy(tmp_path / "medfuse_fusion.json", bad.with_suffix(".json"))
    data = bytearray(good.read_bytes())
    data[-4] ^= 0x01  # the lowest mantissa byte of the last float32: a finite, plausible weight
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"flipped.*medfuse_fusion.safetensors.*SHA-256 recorded in "
                                           r"medfuse_fusion.json") as ei:
        fuse(a, b, weights=bad)
    # A copy of the user's own: reinstalling medfuse restores only the shipped file, so it is not advised here.
    assert "restore both files from where they came" in ei.value.fix and "reinstall" not in ei.value.fix


def test_auto_method_reads_modality_codes_and_anything_else_as_unknown():
    from medfuse.fusion.normalise import auto_method

    assert auto_method("ct") == auto_method("MR", "HU") == "window"
    assert auto_method("PET", "SUVbw") == auto_method("pt", "SUVlbm") == "suv"
    assert auto_method("PT", "BQML") == auto_method("MR") == "percentile"
    # Not a str (an int code, a list): unknown, as None is; it was an AttributeError from .upper().
    for odd in (None, 3, ["CT"]):
        assert auto_method(odd) == "percentile" and auto_method(odd, "HU") == "window"


def test_weights_naming_the_card_or_a_folder_say_which_file_to_pass(tmp_path):
    """Before: the model card was refused as "does not match the SHA-256 ... reinstall medfuse", and a folder as
    "corrupt (OSError)"; both sent the user the wrong way."""
    import shutil

    from medfuse.errors import WeightsError

    shipped = infer.default_weights_path()
    run = tmp_path / "export"
    run.mkdir()
    shutil.copy(shipped, run / shipped.name)
    shutil.copy(shipped.with_suffix(".json"), run / shipped.with_suffix(".json").name)
    img = _blobs((40, 40), 1)
    with pytest.raises(WeightsError, match="model card") as card:
        fuse(img, img[::-1], weights=run / shipped.with_suffix(".json").name)
    assert str(run / shipped.name) in str(card.value)
    with pytest.raises(WeightsError, match="names a folder") as folder:
        fuse(img, img[::-1], weights=run)
    assert str(run / shipped.name) in str(folder.value)
    out = fuse(img, img[::-1], weights=run / shipped.name)  # the file itself is what it takes
    np.testing.assert_array_equal(out, fuse(img, img[::-1]))


def test_a_pytorch_file_given_as_weights_is_named_as_one_and_never_unpickled(tmp_path):
    """A torch.save'd state dict, or a pickle with a payload, was "corrupt or does not fit the model ... reinstall
    medfuse": it is now named as a PyTorch file, with the conversion that reads it safely; the payload never runs."""
    import pickle

    from safetensors.torch import load_file

    from medfuse.errors import WeightsError

    sd = tmp_path / "sd.pt"
    torch.save(load_file(str(infer.default_weights_path())), sd)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload(), protocol=2))
    a = np.random.default_rng(0).random((32, 32))
    for path in (sd, evil):
        with pytest.raises(WeightsError) as e:
            fuse(a, a, weights=path)
        text = str(e.value)
        assert "PyTorch" in text and "medfuse train --init" in text and "reinstall" not in text, text
    assert not marker.exists()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00" * 64)
    with pytest.raises(WeightsError) as e:
        fuse(a, a, weights=junk)
    assert "corrupt" in str(e.value) and "reinstall" not in str(e.value)
