"""medfuse.fuse and medfuse.fusion.normalise at their edges: 'none' above 1 for the network, a negligible
undershoot beside a shared scale, unknown modality/unit names, spans beyond float64, mode= and bool weights."""
import warnings

import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError, MedfuseWarning
from medfuse.fusion import _shared_scale
from medfuse.fusion.normalise import denormalise, normalise


def _smooth(seed, shape=(48, 48)):
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(np.random.default_rng(seed).random(shape), 3)
    return (x - x.min()) / (x.max() - x.min())


# ---------------------------------------------------------------------- 1. "none" above 1 with the network
@pytest.mark.parametrize("spec", ["none", [{"method": "none"}, None]])
def test_network_refuses_arrays_above_1_given_normalise_none(spec):
    """The network clips to 0..1: an image in 0..255 given "none" came out almost all white (mean 0.9995) after a
    mere warning. Volumes were refused already; arrays now are too."""
    a, b = _smooth(0) * 255, _smooth(1) * 255
    with pytest.raises(InvalidInputError, match=r"input 1 is not on the 0\.\.1 scale.*span 0\.\.255") as ei:
        medfuse.fuse(a, b, normalise=spec)
    assert "minmax" in ei.value.fix and "method='max'" in ei.value.fix


def test_normalise_none_on_arrays_keeps_the_classical_rules_on_their_own_scale():
    a, b = _smooth(0) * 255, _smooth(1) * 255
    np.testing.assert_allclose(medfuse.fuse(a, b, method="mean", normalise="none"), (a + b) / 2)


# ---------------------------------------------------------------------- 2. a negligible undershoot/overshoot
@pytest.mark.parametrize("method", ["network", "max"])
def test_a_negligible_undershoot_or_overshoot_keeps_the_shared_scale(method):
    """One pixel at -1e-9 (a 0 before) switched the pair from the shared 0..1 scale to per-image min/max, and the
    output moved by up to 0.2 (0.77 on the reviewer's pair); so did one pixel at 255.001 on 0..255."""
    a, b = 0.2 + 0.6 * _smooth(0), 0.7 * _smooth(1)
    under = b.copy()
    under[np.unravel_index(b.argmin(), b.shape)] = -1e-9
    assert float(b.min()) == 0.0
    assert np.abs(medfuse.fuse(a, b, method=method) - medfuse.fuse(a, under, method=method)).max() < 1e-6
    c, d = a * 255, b * 255 / 0.7  # 51..204 beside 0..255
    over = d.copy()
    over[np.unravel_index(d.argmax(), d.shape)] = 255.001
    assert np.abs(medfuse.fuse(c, d, method=method) - medfuse.fuse(c, over, method=method)).max() < 0.01


def test_a_larger_departure_from_the_scale_still_gives_per_image_min_max():
    a, b = _smooth(0), _smooth(1)
    assert _shared_scale([a, b - 1e-9]) == (0.0, 1.0) and _shared_scale([a * 255, b * 255 + 1e-3]) == (0.0, 255.0)
    assert _shared_scale([a, b - 0.05]) is None
    assert _shared_scale([a * 255, b * 260]) is None
    assert _shared_scale([a * 3, b * 3 - 0.1]) is None  # 3 % of the joint range 0..3


# ---------------------------------------------------------------------- 3. unknown modality or unit
def test_an_unknown_modality_in_a_spec_is_refused_with_the_known_ones():
    """{"modality": "XR"} normalised with percentiles and was recorded as read."""
    ct, mr = _smooth(0) * 2000 - 1000, _smooth(1)
    with pytest.raises(InvalidInputError, match="unknown normalisation modality 'XR'") as ei:
        medfuse.fuse(ct, mr, method="max", normalise=[{"modality": "XR"}, None])
    assert "MR, CT, PT, NM, unknown" in ei.value.fix
    vol = medfuse.Volume(np.stack([mr] * 4, -1), np.eye(4), modality="MR")
    with pytest.raises(InvalidInputError, match="normalise entry 2: unknown normalisation unit 'hu'"):
        medfuse.fuse(vol, vol, method="max", normalise=[None, {"unit": "hu"}])  # taken as normalised upstream
    with pytest.raises(InvalidInputError, match="modality 'XR'"):
        medfuse.fuse(vol.with_array(vol.array * 1000), vol, method="max", normalise=[{"modality": "XR"}, None])


@pytest.mark.parametrize("unit, hint", [("suvbw", "'SUVbw'"), ("furlongs", None), ("SUV", "body-weight")])
def test_an_unknown_unit_is_refused_with_the_known_ones(unit, hint):
    """unit='suvbw' (or 'furlongs') silently took percentiles instead of the SUV range."""
    with pytest.raises(InvalidInputError, match="unknown normalisation unit") as ei:
        normalise(_smooth(1) * 20, modality="PT", unit=unit)
    assert "HU, SUVbw, SUVlbm" in ei.value.fix
    assert hint is None or hint in ei.value.fix


def test_names_a_volume_takes_are_still_taken():
    x = _smooth(1) * 20
    for modality in ("pet", "PT", "Spect", "MRI", "t1", "unknown", "", None):
        normalise(x, modality=modality)
    assert normalise(x, modality="pet", unit="SUVbw")[1]["method"] == "suv"
    assert normalise(x, modality="ct", unit=None)[1]["method"] == "window"
    with pytest.raises(InvalidInputError) as ei:
        normalise(x, modality="/data/DOE^JOHN/ct")
    assert "DOE" not in str(ei.value)


# ---------------------------------------------------------------------- 4. a span beyond float64
def test_finite_values_spanning_beyond_float64_are_scaled_without_overflow():
    """hi - lo overflowed to inf: "an input contains NaN or infinite values", after NumPy's overflow warning."""
    a, b = _smooth(0), _smooth(1)
    x = a * 1.7e308
    x[0, 0] = -1.7e308
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = medfuse.fuse(x, b, method="max")
        want = medfuse.fuse(x * 2.0 ** -1000, b, method="max") * 2.0 ** 1000  # exact rescaling by a power of 2
        ends = np.array([-1.7e308, 1.7e308])
        for method in ("minmax", "percentile"):
            y, rec = normalise(ends, method=method)
            np.testing.assert_allclose(y, [0.0, 1.0], atol=1e-12)
            np.testing.assert_allclose(denormalise(y, rec), [rec["low"], rec["high"]], rtol=1e-12)
            np.testing.assert_allclose(normalise(ends, method=method, dtype=np.float32)[0], [0.0, 1.0])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-9)


# ---------------------------------------------------------------------- 5. mode= in medfuse.fuse's terms
def test_a_mode_that_does_not_fit_the_arrays_says_which_mode_to_pass():
    pytest.importorskip("torch")
    with pytest.raises(InvalidInputError, match=r"3-D path \(mode='3d'\) was given 2-D arrays") as ei:
        medfuse.fuse(_smooth(0), _smooth(1), mode="3d")
    assert ei.value.fix.startswith("leave mode='auto'") and "mode='2d'" in ei.value.fix
    assert "fuse_arrays" not in ei.value.fix


# ---------------------------------------------------------------------- 6. bool weights
@pytest.mark.parametrize("method", ["mean", "laplacian", "wavelet"])
@pytest.mark.parametrize("weights", [[True, False], (1.0, False), np.array([True, False])],
                         ids=["list", "mix", "array"])
def test_bool_weights_are_refused(method, weights):
    """weights=[True, False] was read as [1, 0]: input 2 dropped without a word."""
    a, b = _smooth(0), _smooth(1)
    with pytest.raises(InvalidInputError, match="got bools") as ei:
        medfuse.fuse(a, b, method=method, weights=weights)
    assert "weights=[0.5, 0.5]" in ei.value.fix
    medfuse.fuse(a, b, method=method, weights=[1, 0])  # numbers are taken



@pytest.mark.parametrize("weights", [["1", "2"], np.array(["0.3", "0.7"]), (0.5, b"0.5")], ids=["list", "array", "mix"])
def test_weights_given_as_text_are_refused(weights):
    """weights=["1", "2"] (a CSV column read as str) was parsed by NumPy as numbers and fused without a word."""
    a, b = _smooth(0), _smooth(1)
    with pytest.raises(InvalidInputError, match="got text") as ei:
        medfuse.fuse(a, b, method="mean", weights=weights)
    assert "float(x)" in ei.value.fix

def test_a_modality_named_for_a_volume_normalised_already_is_reported_not_dropped():
    """A Volume normalised by medfuse is fused as it is; a modality or unit named for it in ``normalise``
    was dropped without a word (the user believed it was read as CT)."""
    mr = medfuse.Volume(np.stack([_smooth(1) * 300] * 8, -1), np.eye(4), modality="MR")
    done = normalise(mr)[0]
    assert "normalisation" in done.provenance and done.unit == "arbitrary"
    with pytest.warns(MedfuseWarning, match=r"volume 1 is already normalised by medfuse .*modality='CT' in "
                                            r"normalise entry 1 is not used") as rec:
        fused = medfuse.fuse(done, mr, method="max", normalise=[{"modality": "CT"}, None])
    assert all("patient" not in str(w.message).lower() for w in rec)
    # Fused as it is: the same result as without the entry.
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        plain = medfuse.fuse(done, mr, method="max", normalise=[None, None])
        medfuse.fuse(done, mr, method="max", normalise=[{"method": "auto"}, {"modality": "MR"}])
    np.testing.assert_array_equal(fused.array, plain.array)


def test_a_constant_input_is_warned_of_and_recorded():
    """A constant input (a failed export, a wrong series) was fused without a word: under the mean rule a flat
    level over the other image. An all-0 input stays the documented "no signal" case, without a warning."""
    from medfuse._checks import constant_value

    mr = _smooth(1) * 300
    with pytest.warns(MedfuseWarning, match=r"input 2 is constant \(every pixel is 5\): it holds no image") as rec:
        medfuse.fuse(mr, np.full_like(mr, 5.0), method="mean")
    assert all(w.filename == __file__ for w in rec)
    vol = medfuse.Volume(np.stack([mr] * 8, -1), np.eye(4), modality="CT", unit="HU")
    with pytest.warns(MedfuseWarning, match=r"volume 2 is constant \(every voxel is 7 HU\)"):
        fused = medfuse.fuse(vol, vol.with_array(np.full(vol.shape, 7.0)), method="max")
    assert [w for w in fused.provenance["warnings"] if "volume 2 is constant" in w]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        medfuse.fuse(mr, np.zeros_like(mr), method="mean")
        # A one-slice Volume (a 2-D file) is an image: an all-0 one is the quiet no-signal case too.
        one = medfuse.Volume(mr[..., None], np.eye(4), modality="MR")
        medfuse.fuse(one, one.with_array(np.zeros_like(one.array)), method="mean")
        medfuse.fuse(mr, mr[::-1] + 1, method="mean")
    # Any memory layout, without a copy of the whole: a resampled volume's array is Fortran-ordered.
    assert constant_value(np.asfortranarray(np.full((40, 30, 20), 2.5))) == 2.5
    late = np.full((40, 30, 20), 2.5)
    late[-1, -1, -1] = 3  # differs only where the sparse sample does not look
    assert constant_value(late) is None and constant_value(late.T) is None


def test_suvbsa_gets_a_window_on_its_own_scale():
    """SUVbsa (cm²/mL) is about a quarter of SUVbw for an adult: the SUVbw window [0, 10] put an SUVbsa PET peaking
    at 1.6 in a quarter of the grey range, and the fused image changed with the SUV kind chosen."""
    from medfuse.fusion.normalise import normalise

    bw = np.linspace(0.0, 6.0, 64).reshape(4, 4, 4)
    bsa = bw * 0.253  # the same PET, 1.9 m² and 75 kg
    a, rec_bw = normalise(bw, modality="PT", unit="SUVbw")
    b, rec_bsa = normalise(bsa, modality="PT", unit="SUVbsa")
    assert (rec_bw["suv_max"], rec_bsa["suv_max"]) == (10.0, 2.5)
    np.testing.assert_allclose(a, b, atol=0.01)
    assert normalise(bsa, modality="PT", unit="SUVbsa", suv_max=5)[1]["suv_max"] == 5.0


def test_a_named_window_or_suv_rule_on_another_quantity_is_warned_of():
    """normalise='window' for an MR + PET + CT fusion windowed the PET's SUV as HU (the lesion gone) and the MR
    too; 'suv' clipped most of a SPECT in counts; all without a word. The CT itself, or an unlabelled array,
    takes them quietly."""
    from medfuse.fusion.normalise import normalise

    a = _smooth(2) * 5
    for method, modality, unit in (("window", "PT", "SUVbw"), ("window", "MR", "arbitrary"),
                                   ("suv", "NM", "counts"), ("suv", "PT", "Bq/mL")):
        with pytest.warns(MedfuseWarning, match=f"normalisation '{method}' is for .* modality {modality}") as said:
            normalise(a, method=method, modality=modality, unit=unit)
        assert all(w.filename == __file__ for w in said)  # at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        for method, modality, unit in (("window", "CT", "HU"), ("window", None, None), ("suv", "PT", "SUVbw"),
                                       ("suv", None, None)):
            normalise(a, method=method, modality=modality, unit=unit)
    ct = medfuse.Volume(np.stack([a * 100] * 8, -1), np.eye(4), modality="CT", unit="HU")
    pet = ct.with_array(np.stack([a] * 8, -1), modality="PT", unit="SUVbw")
    with pytest.warns(MedfuseWarning, match="applied to an image of modality PT, in SUVbw"):
        medfuse.fuse(ct, pet, method="max", normalise="window")
