"""API contracts: wrong-typed arguments to the display helpers and ``phantom.lesion_contrast`` get
typed errors, ``LoadVolume(suv=...)`` refuses a loaded PET it cannot convert, and the training validation table
leaves undefined metrics (VIF with a constant source, Qabf without edges) out of its means as medfuse.metrics does.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from medfuse import Volume, display, phantom
from medfuse.errors import InvalidInputError


# ---------------------------------------------------------------------------------------------- display
@pytest.mark.parametrize("modality, unit", [
    (np.zeros(3), np.zeros(3)), ("CT", np.zeros(3)), (np.zeros(3), "HU"), ("CT", 5), (7, None), (["CT"], "HU"),
])
def test_check_ct_window_refuses_labels_that_are_not_strings(modality, unit):
    """Arrays failed with NumPy's "truth value is ambiguous"; a number passed as the unit was judged as a unit."""
    with pytest.raises(InvalidInputError, match="strings \\(or None\\)") as e:
        display.check_ct_window(modality, unit)
    assert e.value.fix and "check_ct_window(" in e.value.fix


def test_check_ct_window_still_judges_string_labels():
    display.check_ct_window("CT", "HU")
    display.check_ct_window(None, None)
    display.check_ct_window(np.str_("CT"), None)  # a NumPy string is a str
    with pytest.raises(InvalidInputError, match="HU"):
        display.check_ct_window("PT", "SUVbw")


@pytest.mark.parametrize("bad", [["bone"], np.array(["bone"]), {"bone": 1}, 3])
def test_display_settings_refuses_a_window_that_is_not_a_name(bad):
    """A list, array or dict failed inside ``in`` with "unhashable type"."""
    vol = Volume(np.zeros((4, 4, 4), np.int16) - 1000, np.eye(4), modality="CT", unit="HU")
    with pytest.raises(InvalidInputError, match="unknown CT window"):
        display.display_settings(vol, window=bad)
    assert display.display_settings(vol, window="bone").contrast_limits == display.window_to_limits(
        *display.CT_WINDOWS["bone"])


@pytest.mark.parametrize("bad", [["linear"], np.array(["nearest"]), {"linear": 1}, 1])
def test_orthogonal_slices_refuses_an_interpolation_that_is_not_a_name(bad):
    vol = Volume(np.random.default_rng(0).random((6, 6, 6)).astype(np.float32), np.eye(4))
    with pytest.raises(InvalidInputError, match="unknown interpolation"):
        display.orthogonal_slices(vol, interpolation=bad)


# ---------------------------------------------------------------------------------------------- phantom
def _lesion_grid():
    arr = np.random.default_rng(1).random((12, 12, 12))
    return arr, np.eye(4), (6.0, 6.0, 6.0)


@pytest.mark.parametrize("radius", ["x", "2", b"2", None, True, False, np.bool_(True), float("nan"), float("inf"),
                                    -float("inf"), np.float64("nan"), np.float32("inf"), -1.0, 0, [2.0], {"r": 2},
                                    complex(2, 0), object()])
def test_lesion_contrast_refuses_a_radius_that_is_not_a_finite_positive_number(radius):
    arr, aff, c = _lesion_grid()
    with pytest.raises(InvalidInputError, match="radius_mm"):
        phantom.lesion_contrast(arr, aff, c, radius_mm=radius)


@pytest.mark.parametrize("radius", [2, 2.0, np.float64(2.0), np.float32(2.0), np.int64(2), np.array(2.0)])
def test_lesion_contrast_takes_numpy_scalars_as_the_radius(radius):
    arr, aff, c = _lesion_grid()
    assert phantom.lesion_contrast(arr, aff, c, radius) == phantom.lesion_contrast(arr, aff, c, 2.0)


@pytest.mark.parametrize("radius, centre", [(1e308, (6, 6, 6)), (1e-300, (6.3, 6.3, 6.3)), (2.0, (500, 6, 6))])
def test_lesion_contrast_refuses_an_empty_core_or_shell_instead_of_nan(radius, centre):
    """A radius beyond float range (2.5 r overflowed to inf), far below the voxel size, or a lesion outside the
    array gave NaN with NumPy's "Mean of empty slice"."""
    arr, aff, _ = _lesion_grid()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning on the way
        with pytest.raises(InvalidInputError, match="holds no voxel"):
            phantom.lesion_contrast(arr, aff, centre, radius)


@pytest.mark.parametrize("bad", ["x", b"x", {"a": 1}, object(), complex(1, 1), None])
def test_lesion_contrast_refuses_an_affine_or_array_that_is_not_numeric(bad):
    arr, aff, c = _lesion_grid()
    with pytest.raises(InvalidInputError, match="affine"):
        phantom.lesion_contrast(arr, bad, c, 2.0)
    with pytest.raises(InvalidInputError, match="array"):
        phantom.lesion_contrast(bad, aff, c, 2.0)


def test_lesion_contrast_refuses_complex_voxels_rather_than_dropping_their_imaginary_part():
    arr, aff, c = _lesion_grid()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's ComplexWarning was all there was
        with pytest.raises(InvalidInputError, match="real numeric array"):
            phantom.lesion_contrast(arr + 1j, aff, c, 2.0)


@pytest.mark.parametrize("centre", [(np.nan, 6, 6), (np.inf, 6, 6), (6, 6), "abc", None, (True, 6, 6, 6)])
def test_lesion_contrast_refuses_a_centre_that_is_not_three_finite_numbers(centre):
    arr, aff, _ = _lesion_grid()
    with pytest.raises(InvalidInputError, match="centre"):
        phantom.lesion_contrast(arr, aff, centre, 2.0)


# ---------------------------------------------------------------------------------------------- LoadVolume(suv=)
def _pet(unit: str = "SUVbw", kind=None) -> Volume:
    arr = np.random.default_rng(2).random((6, 6, 6)).astype(np.float32)
    prov = {"reader": "medfuse.dicom", **({} if kind is None else {"suv": kind})}  # as medfuse.load records a series
    return Volume(arr, np.eye(4), modality="PT", unit=unit, provenance=prov)


@pytest.mark.parametrize("suv, unit, kind", [
    ("lbm", "SUVbw", "bw"), ("bsa", "SUVbw", "bw"), ("bw", "Bq/mL", None), ("lbm", "Bq/mL", None),
    ("none", "SUVbw", "bw"), ("lbm_janma", "SUVlbm", "lbm"), ("lbm", "SUVlbm", "lbm_janma"), ("bw", "arbitrary", None),
])
def test_load_volume_refuses_a_loaded_pet_in_another_suv_than_asked(suv, unit, kind):
    """``LoadVolume(suv="lbm")`` passed a loaded PET in SUVbw (or Bq/mL) through unchanged, unsaid: a loaded image
    keeps no dose, body size or times, so it cannot be converted."""
    pytest.importorskip("monai")
    from medfuse.transforms import LoadVolume, LoadVolumed

    pet = _pet(unit, kind)
    with pytest.raises(InvalidInputError, match="suv= applies only when LoadVolume reads the file") as e:
        LoadVolume(suv=suv)(pet)
    assert "medfuse.load(path, suv=" in e.value.fix
    with pytest.raises(InvalidInputError, match="suv= applies only"):
        LoadVolumed(keys=["pet"], suv=suv)({"pet": pet})


def test_load_volume_passes_a_nifti_pet_as_its_path_route_gives_it(tmp_path):
    """A NIfTI PET cannot be converted by either route: the path gives it as stored (with a warning now), and
    passing that output through LoadVolumed again must not fail (a review probe: it did, with a fix that named
    the path route, which gives the same image). A MetaTensor keeps no reader: it passes as well."""
    pytest.importorskip("monai")
    import json

    import medfuse
    from medfuse.errors import MedfuseWarning
    from medfuse.transforms import LoadVolume, LoadVolumed

    path = tmp_path / "sub-01_pet.nii.gz"
    medfuse.save(_pet("Bq/mL").with_array(_pet().array), path)
    (tmp_path / "sub-01_pet.json").write_text(json.dumps({"Modality": "PT", "Units": "Bq/mL"}))
    t = LoadVolumed(keys=["pet"], suv="bw")
    with pytest.warns(MedfuseWarning, match="suv='bw' was not applied"):
        once = t({"pet": str(path)})["pet"]
    assert once.modality == "PT" and once.unit == "Bq/mL"
    assert t({"pet": once})["pet"] is not None  # its own output: passes
    assert LoadVolume(suv="bw", as_tensor=True)(once.to_metatensor()) is not None


@pytest.mark.parametrize("suv, unit, kind", [
    ("auto", "SUVbw", "bw"), ("auto", "Bq/mL", None), ("bw", "SUVbw", "bw"), ("bw", "SUVbw", None),
    ("lbm", "SUVlbm", "lbm"), ("lbm_janma", "SUVlbm", "lbm_janma"), ("bsa", "SUVbsa", None), ("none", "Bq/mL", None),
    ("none", "SUVbw", None),
])
def test_load_volume_passes_a_loaded_pet_already_in_the_suv_asked(suv, unit, kind):
    pytest.importorskip("monai")
    from medfuse.transforms import LoadVolume, LoadVolumed

    pet = _pet(unit, kind)
    out = LoadVolume(suv=suv)(pet)
    assert out.unit == unit and np.array_equal(out.array, pet.array)
    assert LoadVolumed(keys=["pet"], suv=suv)({"pet": pet})["pet"].unit == unit


def test_load_volume_suv_ignores_loaded_images_that_are_not_pet():
    """As medfuse.load ignores suv= for them: one LoadVolumed(keys=["mr", "pet"], suv=...) serves both keys."""
    pytest.importorskip("monai")
    from medfuse.transforms import LoadVolumed

    rng = np.random.default_rng(3)
    mr = Volume(rng.random((5, 5, 5)), np.eye(4))  # a NIfTI MR: unknown modality, arbitrary unit
    ct = Volume(rng.integers(-1000, 1000, (5, 5, 5)).astype(np.int16), np.eye(4), modality="CT", unit="HU")
    out = LoadVolumed(keys=["mr", "ct"], suv="lbm")({"mr": mr, "ct": ct})
    assert np.array_equal(out["mr"].array, mr.array) and out["ct"].unit == "HU"


def test_load_volume_refuses_the_sample_pet_loaded_in_suvbw_when_asked_for_suvlbm():
    pytest.importorskip("monai")
    import medfuse
    from medfuse.phantom import default_samples_folder
    from medfuse.transforms import LoadVolume

    folder = default_samples_folder()
    if folder is None or not (folder / "pet").is_dir():
        pytest.skip("no sample_volumes/pet beside the package")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pet = medfuse.load(folder / "pet")
    assert pet.unit == "SUVbw"
    assert LoadVolume(suv="bw")(pet) is pet  # what it is already
    with pytest.raises(InvalidInputError, match="in SUVbw"):
        LoadVolume(suv="lbm")(pet)


# ---------------------------------------------------------------------------------------------- validation metrics
def _png(path, arr):
    from PIL import Image

    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


class _MaxModel:
    """Stand-in for the network: the max rule, with the ``eval``/``train`` calls and the ``factor`` (the size
    multiple validation pads to) that validate() uses."""

    factor = 1

    def eval(self):
        return self

    def train(self):
        return self

    def __call__(self, x):
        return x.max(dim=1).values


def test_validation_leaves_undefined_vif_and_qabf_out_of_its_means(tmp_path):
    """A constant source counted VIF's term as 0 (and no edge at all gave Qabf about 0.97) in the per-epoch table,
    where medfuse.metrics gives NaN with an UndefinedMetricWarning and its means leave them out."""
    torch = pytest.importorskip("torch")
    from medfuse import metrics
    from medfuse.fusion import train as tr

    rng = np.random.default_rng(4)
    mri = rng.integers(0, 256, (64, 64))
    other = rng.integers(0, 256, (64, 64))
    pairs = {
        "X": [(_png(tmp_path / "a1.png", mri), _png(tmp_path / "b1.png", other)),
              (_png(tmp_path / "a2.png", mri), _png(tmp_path / "b2.png", np.full((64, 64), 128))),   # constant
              (_png(tmp_path / "a3.png", np.zeros((64, 64))), _png(tmp_path / "b3.png", np.zeros((64, 64))))],
        "Z": [(_png(tmp_path / "a4.png", np.zeros((64, 64))), _png(tmp_path / "b4.png", np.zeros((64, 64))))],
    }
    with pytest.warns(metrics.UndefinedMetricWarning) as rec:
        table = tr.validate(_MaxModel(), pairs, rules=("max",))
    said = " ".join(str(w.message) for w in rec)
    assert "VIF on 2 of 3 X pairs" in said and "Qabf on 1 of 3 X pairs" in said and "left out" in said

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_pair = []
        for a, b in pairs["X"]:
            x = tr.load_pair(a, b)
            f8 = np.round(np.maximum(x[0], x[1]) * 255)
            per_pair.append((metrics.vif(f8, x[0] * 255, x[1] * 255), metrics.qabf(f8, x[0] * 255, x[1] * 255)))
    vifs = [v for v, _ in per_pair if np.isfinite(v)]
    qabfs = [q for _, q in per_pair if np.isfinite(q)]
    assert len(vifs) == 1 and len(qabfs) == 2  # the reference metrics agree on which are undefined
    for method in ("network", "max"):
        row = table["X"][method]
        assert row["VIF"] == pytest.approx(np.mean(vifs), abs=1e-3)
        assert row["Qabf"] == pytest.approx(np.mean(qabfs), abs=1e-3)
        assert np.isnan(table["Z"][method]["VIF"]) and np.isnan(table["Z"][method]["Qabf"])
        assert np.isfinite(table["Z"][method]["SSIM"])  # defined metrics are kept
    assert "nan" in tr.format_table(table)
    del torch


def test_validation_warns_nothing_on_pairs_where_every_metric_is_defined(tmp_path):
    pytest.importorskip("torch")
    from medfuse.fusion import train as tr

    rng = np.random.default_rng(5)
    pairs = {"X": [(_png(tmp_path / "a.png", rng.integers(0, 256, (48, 48))),
                    _png(tmp_path / "b.png", rng.integers(0, 256, (48, 48))))]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = tr.validate(_MaxModel(), pairs, rules=())
    assert all(np.isfinite(v) for v in table["X"]["network"].values())


def test_the_loss_on_a_constant_source_batch_stays_finite_and_unchanged():
    """The validation NaNs must not reach the training loss: it keeps the clamped 0/0 (finite values and
    gradients), equal to the formula on torch_metrics' values."""
    torch = pytest.importorskip("torch")
    from medfuse.fusion import train as tr

    g = torch.Generator().manual_seed(6)
    src = torch.rand(2, 1, 48, 48, generator=g)
    x = torch.cat([src, torch.full_like(src, 0.5)], dim=1)  # the second source constant
    x[1, 1] = 0.0  # and one item with an all-zero second source
    fused = torch.rand(2, 48, 48, generator=g).requires_grad_(True)
    loss_fn = tr.MetricLoss()
    loss, parts = loss_fn(fused, x)
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in parts.values())
    loss.backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all() and fused.grad.abs().sum() > 0
    with torch.no_grad():
        m = tr.torch_metrics(fused, [x[:, 0], x[:, 1]])
        expected = (-(loss_fn.qabf_weight * m["Qabf"] + loss_fn.vif_weight * m["VIF"] / 2)
                    + loss_fn.ssim_weight * (1 - m["SSIM"] / 2)).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6, abs=1e-6)


def test_rule_margins_leave_out_a_metric_undefined_on_every_pair_of_a_type():
    """A NaN column (VIF on a type whose validation pairs all have a constant source) made max() and min() depend
    on the order of the rows; the other metrics still decide the margin."""
    pytest.importorskip("torch")
    from medfuse.fusion import train as tr

    nan = float("nan")
    table = {"A": {"network": {"Qabf": 0.6, "VIF": nan, "SSIM": 1.0}, "max": {"Qabf": 0.5, "VIF": nan, "SSIM": 0.8},
                   "gff": {"Qabf": 0.4, "VIF": nan, "SSIM": 1.25}},
             "B": {"network": {"Qabf": nan, "VIF": nan, "SSIM": nan}, "max": {"Qabf": nan, "VIF": nan, "SSIM": nan}}}
    m = tr.rule_margins(table)
    assert m["A"] == pytest.approx(min(0.6 / 0.5 - 1, 1.0 / 1.25 - 1)) and np.isnan(m["B"])
    assert tr.rule_margins(table, ("VIF", "Qabf", "SSIM"))["A"] == m["A"]  # the NaN first: min() kept it
    assert tr.rule_margin(table) == pytest.approx(m["A"])


@pytest.mark.parametrize("bad", ["x", object(), (1, 2, "x"), np.eye(4) * (1 + 0j)])
def test_make_phantom_refuses_a_misalignment_that_is_not_a_real_matrix(bad):
    """A str or an object failed inside NumPy ("could not convert string to float")."""
    with pytest.raises(InvalidInputError, match="misalign\\['pet'\\]"):
        phantom.make_phantom(misalign={"pet": bad})


def test_a_missing_input_is_an_oserror_with_errno_enoent_and_its_filename(tmp_path):
    """``except OSError as e: if e.errno == errno.ENOENT`` missed medfuse's missing-file error (errno None)."""
    import errno

    import medfuse

    for call in (lambda p: medfuse.load(p), lambda p: medfuse.scan(p), lambda p: medfuse.load_transform(p)):
        missing = tmp_path / "nope.tfm"
        with pytest.raises(medfuse.UnreadableFileError) as ei:
            call(missing)
        assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOENT
        assert ei.value.filename == str(missing) and str(ei.value).startswith(f"{missing}: no such")
        import pickle  # across a worker pool (batch) too: OSError pickled as type(*args) and lost them

        back = pickle.loads(pickle.dumps(ei.value))
        assert (back.errno, back.filename, str(back)) == (errno.ENOENT, str(missing), str(ei.value))
