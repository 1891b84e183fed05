"""What replaced load and register steps must set, colour fusion's ``peak``, the Harvard case splits,
the seed in written samples, and ``fuse_files(weights=)``."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

import medfuse
from medfuse import phantom
from medfuse.errors import InvalidInputError
from medfuse.registration import resample
from medfuse.registration.transforms import Transform


@pytest.fixture(scope="module")
def ph():
    return phantom.make_phantom(noise=False)


def _grab(state):
    """A fuse step that hands back the resampled, normalised moving image: what the fusion would get."""
    state.fused = state.volumes[1]
    return state


def _run(pipe, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unregistered runs warn about their coverage
        return pipe.replace("fuse", _grab).run(inputs)


# ----------------------------------------------------------------------------- 1: a replaced register step
def test_register_step_handing_back_volumes_is_used(ph):
    """A replaced register step that returns the registered image in state.volumes: the fusion gets that image
    (it used to get the moving image unregistered, from state.originals, silently)."""
    matrix = Transform.from_matrix(ph.transforms["pet"])

    def by_volume(state):
        f, m = state.volumes
        state.volumes = [f, resample(m, f, transform=matrix)]
        return state

    def by_transform(state):
        state.transforms[0] = matrix
        return state

    pipe = medfuse.Pipeline(method="mean")
    got = _run(pipe.replace("register", by_volume), [ph.t1, ph.pet]).fused
    want = _run(pipe.replace("register", by_transform), [ph.t1, ph.pet]).fused
    unregistered = _run(pipe, [ph.t1, ph.pet]).fused
    np.testing.assert_allclose(got.array, want.array, atol=1e-6)
    contrast = [phantom.lesion_contrast(v.array, v.affine, ph.lesion_center, ph.lesion_radius_mm)
                for v in (got, unregistered)]
    assert contrast[0] > contrast[1] + 0.1, contrast  # the lesion is where the MR says it is only once registered


def test_register_step_setting_both_volume_and_transform_is_refused(ph):
    def both(state):
        f, m = state.volumes
        t = Transform.from_matrix(ph.transforms["pet"])
        state.volumes, state.transforms[0] = [f, resample(m, f, transform=t)], t
        return state

    with pytest.raises(InvalidInputError, match="state.transforms") as ei:
        medfuse.Pipeline(method="mean").replace("register", both).run([ph.t1, ph.pet])
    assert "None" in ei.value.fix


# ----------------------------------------------------------------------------- 2: a replaced load step
def test_replaced_load_step_with_registration(ph, samples_dir):
    """A load step that sets only state.volumes, then the built-in register step (a bare IndexError before)."""
    def my_load(state):
        state.volumes = [ph.t1, ph.pet]
        return state

    r = medfuse.Pipeline(register="rigid", method="mean", threads=1).replace("load", my_load).run(
        [samples_dir / "mr_t1.nii.gz", samples_dir / "pet"])
    assert r.transforms[0] is not None and r.registrations[0] is not None
    assert r.fused.shape == ph.t1.shape
    assert r.provenance["inputs"][1]["modality"] == ph.pet.modality  # the facts of what the step loaded


def test_replaced_load_step_that_sets_nothing_is_refused(ph, samples_dir):
    with pytest.raises(InvalidInputError, match="no volumes") as ei:
        medfuse.Pipeline(register="rigid", method="mean").replace("load", lambda state: state).run(
            [samples_dir / "mr_t1.nii.gz", samples_dir / "pet"])
    assert "state.volumes" in ei.value.fix


# ----------------------------------------------------------------------------- 3: colour fusion's peak
def _colour_pair(dtype=np.uint8, scale=1):
    rng = np.random.default_rng(30)
    gray = rng.integers(0, 256, (24, 24)).astype(np.int64)
    rgb = rng.integers(0, 256, (24, 24, 3)).astype(np.int64)
    return (gray * scale).astype(dtype), (rgb * scale).astype(dtype)


def test_fuse_rgb_infers_the_peak_of_16_bit_data():
    """A uint16 colour image fuses on its own scale (the default 255 clipped it to 255 everywhere)."""
    from medfuse.fusion.color import fuse_rgb

    g8, c8 = _colour_pair()
    g16, c16 = _colour_pair(np.uint16, 257)  # the same images, 0..65535
    out8, out16 = fuse_rgb(g8, c8), fuse_rgb(g16, c16)
    assert out16.dtype == np.uint16
    np.testing.assert_allclose(out16.astype(float), out8.astype(float) * 257, atol=257)
    np.testing.assert_array_equal(out16, fuse_rgb(g16, c16, peak=65535))


@pytest.mark.parametrize("peak", [1.0, -1, 0, "255", float("nan"), float("inf"), True, 65535])
def test_fuse_rgb_refuses_a_peak_that_does_not_fit(peak):
    from medfuse.fusion.color import fuse_rgb, rgb_to_ycbcr

    gray, rgb = _colour_pair()
    with pytest.raises(InvalidInputError, match="peak") as ei:
        fuse_rgb(gray, rgb, peak=peak)
    assert "peak" in ei.value.fix
    with pytest.raises(InvalidInputError, match="peak"):
        rgb_to_ycbcr(rgb, peak=peak)


@pytest.mark.parametrize("scale, dtype", [(1 / 255, np.float64), (1, np.uint8), (257, np.uint16)])
def test_ycbcr_round_trip_infers_the_same_peak(scale, dtype):
    """rgb_to_ycbcr and ycbcr_to_rgb with no peak agree (a 0..1 image used to be read as 0..255 by both, so its
    chroma sat on 128 instead of 128/255, and the fusion of its luma with a 0..1 grey image was off scale)."""
    from medfuse.fusion.color import rgb_to_ycbcr, ycbcr_to_rgb

    _, rgb = _colour_pair(np.int64)
    rgb = (rgb * scale).astype(dtype)
    ycc = rgb_to_ycbcr(rgb)
    np.testing.assert_allclose(ycbcr_to_rgb(ycc), rgb, atol=1e-6 * float(rgb.max()))
    grey = np.repeat(rgb[..., :1], 3, axis=-1)  # no chroma: Cb and Cr on the peak's middle
    peak = {np.float64: 1.0, np.uint8: 255.0, np.uint16: 65535.0}[dtype]
    np.testing.assert_allclose(rgb_to_ycbcr(grey)[..., 1:], peak * 128 / 255, atol=1e-9 * peak)


# ----------------------------------------------------------------------------- 4: Harvard case splits
def _harvard(cases, slices=2):
    """HarvardPair records (no files: the splits read names only) of CT-MRI slices of ``cases``."""
    from pathlib import Path

    from medfuse.harvard import HarvardPair

    names = [f"{c}{s:03d}.png" for c in cases for s in range(10, 10 + slices)]
    return [HarvardPair("CT-MRI", "CT", n, Path("CT-MRI/MRI") / n, Path("CT-MRI/CT") / n) for n in names]


def test_split_cases_takes_str_paths():
    from medfuse.harvard import split_cases

    pairs = _harvard(range(1, 11))
    as_path = {"CT-MRI": [(p.mri, p.other) for p in pairs]}
    as_str = {"CT-MRI": [(str(p.mri), str(p.other)) for p in pairs]}
    want, got = split_cases(as_path, seed=3), split_cases(as_str, seed=3)
    for w, g in zip(want, got):  # the same pairs on each side, in their own type
        assert [tuple(map(str, p)) for p in w["CT-MRI"]] == g["CT-MRI"]
    with pytest.raises(InvalidInputError, match="CT-MRI"):
        split_cases({"CT-MRI": [str(pairs[0].mri)]})  # not (mri, other) pairs


def test_a_pair_type_of_one_case_keeps_its_training_data():
    """One case: all training, as split_by_case does (training_split and split_cases put it all in validation)."""
    from medfuse.harvard import split_by_case, split_cases, training_split

    one = _harvard([7], slices=3)
    for split in (split_by_case, training_split):
        train, val = split(one, val_fraction=0.2, seed=0)
        assert train == one and val == []
    train, val = split_cases({"CT-MRI": [(p.mri, p.other) for p in one]})
    assert train["CT-MRI"] == [(p.mri, p.other) for p in one] and val["CT-MRI"] == []
    # Two cases or more: one on each side at least, whatever the fraction.
    two = _harvard([7, 8])
    train, val = training_split(two, val_fraction=0.9, seed=0)
    assert {p.case for p in train} and {p.case for p in val} and not {p.case for p in train} & {p.case for p in val}


# ----------------------------------------------------------------------------- 5: the seed of written samples
def test_written_samples_name_their_seed(tmp_path, monkeypatch):
    """A README and ground_truth.json of seed 2 said "seed 0" and named a command without --seed: that command,
    run, now writes the same subject again."""
    import json
    import shlex

    seed = 2
    phantom.write_samples(tmp_path / "a", seed=seed)
    readme = (tmp_path / "a" / "README.md").read_text(encoding="utf-8")
    gt = json.loads((tmp_path / "a" / "ground_truth.json").read_text(encoding="utf-8"))
    assert f"(seed {seed})" in readme and gt["regenerate"] in readme
    args = shlex.split(gt["regenerate"])
    assert args[:3] == ["python", "-m", "medfuse.phantom"]
    called = {}
    monkeypatch.setattr(phantom, "write_samples", lambda folder, **kw: called.update(kw) or {})
    args[args.index("--write") + 1] = str(tmp_path / "b")
    assert phantom.main(args[3:]) == 0
    assert called["seed"] == gt["seed"] == seed


# ----------------------------------------------------------------------------- 6: fuse_files(weights=)
@pytest.fixture(scope="module")
def small_pair():
    rng = np.random.default_rng(30)
    shape, affine = (24, 24, 24), np.diag([2.0, 2.0, 2.0, 1.0])
    return (medfuse.Volume(rng.random(shape).astype(np.float32), affine, modality="MR"),
            medfuse.Volume(rng.random(shape).astype(np.float32), affine, modality="CT"))


def test_fuse_files_weights_reach_the_network(tmp_path, small_pair):
    """Other weights give another fused image, and their hash and path are what the provenance records."""
    import hashlib

    pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    from medfuse.fusion.infer import default_weights_path

    shipped = default_weights_path()
    with safe_open(str(shipped), "np") as f:
        meta = f.metadata()
    tensors = {k: v * np.float32(0.5) if k.endswith("bias") else v for k, v in st.load_file(str(shipped)).items()}
    other = tmp_path / "other.safetensors"
    st.save_file(tensors, str(other), metadata=meta)

    kw = dict(method="network", normalise="minmax")
    base = medfuse.fuse_files(*small_pair, None, **kw)
    got = medfuse.fuse_files(*small_pair, None, weights=other, **kw)
    assert got.provenance["weights_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert got.provenance["weights_sha256"] != base.provenance["weights_sha256"]
    assert got.provenance["parameters"]["fuse"]["weights"] == str(other)
    assert not np.allclose(got.fused.array, base.fused.array)
    np.testing.assert_array_equal(base.fused.array, medfuse.fuse_files(*small_pair, None, weights=shipped, **kw).fused.array)


def test_fuse_files_weights_refused_before_any_work(tmp_path, small_pair):
    from medfuse.errors import WeightsError

    with pytest.raises(InvalidInputError, match="classical rule") as ei:
        medfuse.fuse_files(*small_pair, None, method="mean", weights=tmp_path / "w.safetensors")
    assert "method='network'" in ei.value.fix
    with pytest.raises(WeightsError):  # named, but missing: not hidden by the fallback
        medfuse.fuse_files(*small_pair, None, method="network", fallback="mean", weights=tmp_path / "w.safetensors")
    with pytest.raises(InvalidInputError, match="weights"):
        medfuse.fuse_files(*small_pair, None, method="network", weights=["not", "a", "path"])


def test_a_failed_overwrite_of_an_output_without_sidecar_leaves_no_sidecar(tmp_path, monkeypatch):
    """The in-progress sidecar of a failed --overwrite was left beside the user's own file (which had none),
    under a message saying that nothing was written."""
    import errno

    import nibabel as nib

    from medfuse.errors import OutputWriteError
    from medfuse.pipeline import fuse_files

    out = tmp_path / "scan.nii.gz"
    out.write_bytes(b"mine")
    a = medfuse.Volume(np.random.default_rng(0).random((12, 12, 12)).astype(np.float32), np.eye(4), modality="MR")
    b = a.with_array(a.array[::-1].copy())

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    with pytest.raises(OutputWriteError, match="disk is full"):
        fuse_files(a, b, out, method="mean", overwrite=True)
    assert out.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_a_failed_or_refused_overwrite_keeps_a_file_at_the_sidecar_path_that_is_not_utf8(tmp_path, monkeypatch):
    """The earlier sidecar was read as UTF-8 text to be put back after a failure; a file there that was not
    (Latin-1 notes, an image hard-linked under the name) read as "none", and was deleted."""
    import errno

    import nibabel as nib

    from medfuse.errors import OutputExistsError, OutputWriteError
    from medfuse.pipeline import fuse_files

    a = medfuse.Volume(np.random.default_rng(0).random((12, 12, 12)).astype(np.float32), np.eye(4), modality="MR")
    b = a.with_array(a.array[::-1].copy())
    # Refused: the sidecar's name is a hard link to an input.
    src = tmp_path / "mr.nii.gz"
    medfuse.save(a, src)
    os.link(src, tmp_path / "h.json")
    with pytest.raises(OutputExistsError, match="own source"):
        fuse_files(src, b, tmp_path / "h.nii.gz", method="mean", overwrite=True)
    assert (tmp_path / "h.json").read_bytes() == src.read_bytes()
    # Failed: a full disk.
    (tmp_path / "r.nii.gz").write_bytes(b"mine")
    (tmp_path / "r.json").write_bytes("café notes\n".encode("latin-1"))

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    with pytest.raises(OutputWriteError, match="disk is full"):
        fuse_files(a, b, tmp_path / "r.nii.gz", method="mean", overwrite=True)
    assert (tmp_path / "r.json").read_bytes() == "café notes\n".encode("latin-1")
    assert (tmp_path / "r.nii.gz").read_bytes() == b"mine"


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint16])
def test_a_default_ycbcr_round_trip_of_wide_integer_colour_is_exact(dtype):
    from medfuse.fusion import color

    a = (np.random.default_rng(0).random((8, 8, 3)) * 4095).astype(dtype)
    assert np.abs(color.ycbcr_to_rgb(color.rgb_to_ycbcr(a)) - a).max() < 1e-6


def test_the_fusions_own_warnings_reach_the_sidecar(tmp_path):
    """The anisotropic-voxels warning of the network went to stderr only: fused.json (and so a batch report read
    later) did not say that the fusion mixed detail over 4x more millimetres through-plane."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    a = medfuse.Volume(rng.random((24, 24, 12)).astype(np.float32), aff, modality="MR")
    b = medfuse.Volume(rng.random((24, 24, 12)).astype(np.float32), aff, modality="MR")
    with pytest.warns(medfuse.MedfuseWarning, match="anisotropic"):
        res = medfuse.fuse_files(a, b, tmp_path / "f.nii.gz", method="network")
    said = json.loads(res.sidecar.read_text()).get("warnings") or []
    assert sum("anisotropic" in w for w in said) == 1


def test_a_network_fusion_without_torch_is_refused_before_loading_and_registering(monkeypatch, tmp_path):
    """Without torch, `medfuse fuse ... --register rigid` loaded and registered (20 s) before it said so. Refused
    when the run starts, before any input is read; a pipeline whose fuse step is replaced needs no torch."""
    import importlib.util

    from medfuse.errors import MissingDependencyError
    from medfuse.pipeline import FuseStep, Pipeline

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "torch" else real(name, *a, **k))
    missing = [str(tmp_path / "not_read.nii.gz"), str(tmp_path / "nor_this.nii.gz")]  # never opened
    with pytest.raises(MissingDependencyError, match="the fusion network needs the optional package 'torch'"):
        Pipeline(register="rigid").run(missing)
    with pytest.raises(MissingDependencyError):
        Pipeline(steps={"fuse": FuseStep("network")}).run(missing)
    # Built without torch, and run when the fuse step needs none: a fallback rule, a rule, a step of one's own.
    Pipeline().replace("fuse", FuseStep("max"))
    for pipeline in (Pipeline(steps={"fuse": FuseStep("network", fallback="laplacian")}),
                     Pipeline(method="max")):
        with pytest.raises(Exception) as ei:
            pipeline.run(missing)
        assert not isinstance(ei.value, MissingDependencyError)  # it went on to read the inputs


def test_itk_thread_counts_of_concurrent_calls_do_not_mix():
    """SimpleITK's thread count is process-wide: a threads=1 registration ran with 4 threads beside a threads=4
    call (no longer bit for bit, its provenance saying 1). Another count now waits; the same count shares."""
    import threading
    import time

    import SimpleITK as sitk

    from medfuse.pipeline import _itk_threads

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    seen, inside = [], threading.Event()

    def first():
        with _itk_threads(1):
            inside.set()
            for _ in range(5):
                seen.append(("first", sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))
                time.sleep(0.05)

    def second():
        inside.wait()
        with _itk_threads(4):
            seen.append(("second", sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [c for who, c in seen if who == "first"] == [1] * 5 and ("second", 4) in seen
    assert seen.index(("second", 4)) == 5  # after every step of the first
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before
    with _itk_threads(2):  # nested in one thread: no wait (it would never end)
        with _itk_threads(3):
            assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 3
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before


def test_percentiles_of_a_resampled_image_are_taken_over_its_own_field_of_view(samples_dir):
    """A SPECT fused on a large grid (a whole-body CT's) had its percentiles taken over the whole grid, mostly the
    fill outside it: the top of its scale fell from ~70 counts to ~20 and its grey matter was all 1.0."""
    from medfuse.fusion.normalise import normalise
    from medfuse.pipeline import fuse_files

    mr = medfuse.load(samples_dir / "mr_t1.nii.gz")
    spect = medfuse.load(samples_dir / "spect.nii.gz")
    own_high = normalise(spect)[1]["high"]
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    shape = (125, 125, 250)  # 500 x 500 x 1000 mm around the head
    centre = mr.affine[:3, :3] @ (np.array(mr.shape) / 2.0) + mr.affine[:3, 3]
    aff[:3, 3] = centre - 4.0 * np.array(shape) / 2.0
    big = medfuse.Volume(np.zeros(shape, np.float32), aff, modality="MR")
    big = big.with_array(medfuse.resample(mr, big).array)
    with pytest.warns(medfuse.MedfuseWarning, match="covers only"):
        rec = fuse_files(big, spect, None, method="max").provenance["normalisation"][1]
    assert rec["method"] == "percentile" and rec["over"].startswith("its own field of view (3.")
    assert abs(rec["high"] - own_high) < 0.1 * own_high, (rec["high"], own_high)  # was 0.03 x own_high
    # An image that covers the whole grid is normalised as before, over all of it.
    rec = fuse_files(mr, spect, None, method="max").provenance["normalisation"][1]
    assert "over" not in rec and rec["method"] == "percentile"


@pytest.mark.parametrize("method", ["max", "mean"])
def test_fuse_and_the_monai_transform_normalise_a_resampled_slab_as_the_pipeline_does(samples_dir, tmp_path, method):
    """medfuse.fuse on a volume medfuse.resample made, and FuseModalitiesd(resample=True), took the percentiles over
    the whole grid, mostly fill: the same pair fused up to 0.08 apart from fuse_files (a BraTS slab on 31 % of the
    grid: 0.083). Now all three take them over the image's own field of view."""
    from medfuse.pipeline import fuse_files
    from medfuse.transforms import FuseModalitiesd

    mr = medfuse.load(samples_dir / "mr_t1.nii.gz")
    spect = medfuse.load(samples_dir / "spect.nii.gz")
    k = spect.shape[2]
    shift = np.eye(4)
    shift[2, 3] = k // 3
    slab = medfuse.Volume(np.ascontiguousarray(spect.array[:, :, k // 3:k // 3 + k // 4]), spect.affine @ shift,
                          modality=spect.modality, unit=spect.unit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", medfuse.MedfuseWarning)  # its low coverage, said by every face
        piped = fuse_files(mr, slab, None, method=method)
        on_grid = medfuse.resample(slab, mr)
        api = medfuse.fuse(mr, on_grid, method=method)
        item = FuseModalitiesd(keys=["mr", "nm"], output_key="fused", method=method, resample=True,
                               as_tensor=False)({"mr": mr, "nm": slab})
        whole_grid = medfuse.fuse(mr, on_grid.with_array(on_grid.array), method=method)  # with_array: no view
    assert piped.provenance["normalisation"][1]["over"].startswith("its own field of view")
    np.testing.assert_allclose(api.array, piped.fused.array, rtol=0, atol=1e-6)
    np.testing.assert_allclose(item["fused"].array, piped.fused.array, rtol=0, atol=1e-6)
    assert float(np.abs(whole_grid.array - piped.fused.array).max()) > 0.02  # what both faces gave before
    # A copy fuses alike (copy() dropped the field of view); new voxels set on it drop it.
    np.testing.assert_array_equal(medfuse.fuse(mr, on_grid.copy(), method=method).array, api.array)
    replaced = on_grid.copy()
    replaced.array = on_grid.array.copy()
    np.testing.assert_array_equal(medfuse.fuse(mr, replaced, method=method).array, whole_grid.array)


def test_the_progress_bar_gives_no_share_to_a_registration_that_does_not_run(samples_dir):
    """With register=None the bar jumped from 5 % to 65 % at once (the registration's share), then sat at 80 %
    through a long fusion."""
    from medfuse.pipeline import fuse_files

    seen = []
    fuse_files(samples_dir / "mr_t1.nii.gz", samples_dir / "spect.nii.gz", None, method="max",
               progress=lambda f, m="": seen.append((f, m)))
    after_register = next(f for f, m in seen if m == "register done")
    fused = next(f for f, m in seen if m == "fuse done")
    assert after_register < 0.15 and fused > 0.8, seen


def test_the_field_of_view_mask_is_made_only_for_an_image_normalised_by_percentiles(samples_dir, monkeypatch):
    """The mask costs as much as resampling the image (0.10 s against 0.095 s on the demo's grid); a PET in SUV
    (a fixed window) needs none, and the demo's fusion made one for nothing."""
    import medfuse.pipeline as P
    from medfuse.registration.resample import FieldOfView

    made = []
    real = FieldOfView.mask
    monkeypatch.setattr(FieldOfView, "mask", lambda self: made.append(self.shape) or real(self))
    P.fuse_files(samples_dir / "mr_t1.nii.gz", samples_dir / "pet", None, method="max")
    assert made == []
    P.fuse_files(samples_dir / "mr_t1.nii.gz", samples_dir / "spect.nii.gz", None, method="max")
    assert len(made) == 1  # the SPECT, in counts: percentiles
