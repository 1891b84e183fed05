"""Memory of the default path's steps, one saving per test, each with the result it must keep to the bit.

Bounds are in bytes a voxel of NumPy buffers (tracemalloc traces NumPy's allocations; SimpleITK's and torch's are
not traced). The slab-by-slab paths work on slabs of a fixed number of values (a 512x512 CT slice); on these small
test volumes that would be the whole volume, so the tests make the slabs small, as they are beside a clinical
volume.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

import medfuse
from medfuse.fusion import classical, infer
from medfuse.fusion import normalise as norm_mod
from medfuse.fusion.normalise import normalise
from medfuse.pipeline import RegisterStep, _itk_threads
from medfuse.volume import Volume, affine_from_geometry


def _numpy_peak(fn):
    """(result, peak bytes of NumPy buffers allocated while ``fn`` ran and beyond those alive before)."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def small_slabs(monkeypatch):
    monkeypatch.setattr(norm_mod, "SLAB_ELEMENTS", 1024, raising=False)
    monkeypatch.setattr(infer, "CHUNK_ELEMENTS", 1024, raising=False)


def _ct_pet(shape=(48, 40, 36), seed=0):
    rng = np.random.default_rng(seed)
    ct = np.clip(rng.normal(40, 400, shape), -1024, 3000).astype(np.int16)
    pet = rng.gamma(2.0, 2.0, shape).astype(np.float32)
    return ct, pet


# ----------------------------------------------------------------------------- normalisation into float32
@pytest.mark.parametrize("kind", ["CT", "PT", "MR", "minmax", "range", "none"])
def test_normalise_into_float32_is_the_float64_result_rounded_once(kind, small_slabs):
    # Reference: the scaling written out in float64 with NumPy (percentiles of the float64 values), then rounded.
    ct, pet = _ct_pet()
    x, kw = {"CT": (ct, dict(modality="CT", unit="HU")), "PT": (pet, dict(modality="PT", unit="SUVbw")),
             "MR": (pet * 7, dict(modality="MR")), "minmax": (ct, dict(method="minmax")),
             "range": (pet, dict(method="range", low=1.0, high=5.0)), "none": (pet / 20, dict(method="none"))}[kind]
    x64 = x.astype(np.float64)
    lo, hi = {"CT": (-160.0, 240.0), "PT": (0.0, 10.0), "MR": tuple(np.percentile(x64, [0.5, 99.5])),
              "minmax": (x64.min(), x64.max()), "range": (1.0, 5.0), "none": (0.0, 1.0)}[kind]
    y = (x64 - lo) / (hi - lo)
    want = (y if kind == "none" else np.clip(y, 0, 1)).astype(np.float32)
    before = x.copy()
    got, rec = normalise(x, dtype=np.float32, **kw)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.array_equal(x, before)  # the input is never written to
    ref = normalise(x, **kw)[1]
    # "none" scales nothing, but its record still counts what lies outside 0..1 (a fusion clips that).
    assert rec == ref and rec["clipped_fraction"] == float(np.mean((y < 0) | (y > 1)))


def test_normalise_into_float32_makes_no_float64_copy_of_the_volume(small_slabs):
    # float64 then a cast: 8 + 4 bytes a voxel; into float32 a slab at a time: the 4 of the result.
    ct, _ = _ct_pet((64, 64, 48))
    n = ct.size
    (got, _), peak = _numpy_peak(lambda: normalise(ct, modality="CT", unit="HU", dtype=np.float32))
    assert peak < 4.5 * n, f"{peak / n:.1f} bytes a voxel"
    assert np.array_equal(got, normalise(ct, modality="CT", unit="HU")[0].astype(np.float32))


# ----------------------------------------------------------------------------- the network's 3-D input
def _blobs(shape, seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random(shape), 2)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def test_tri_plane_fusion_reads_its_inputs_slab_by_slab(small_slabs):
    # The inputs were stacked into one float32 copy (4 bytes a voxel and input) held through the whole fusion,
    # beside the output (4): 12 bytes a voxel for two inputs. Now the output and one slab at a time.
    shape = (96, 16, 18)  # slabs of 8 + 2 x 16 halo slices out of 96; 18 is padded to 20 by the network
    a, b = _blobs(shape, 1), _blobs(shape, 2) * 1.2  # b beyond 1 at places: clipped, as before
    a0, b0 = a.copy(), b.copy()
    infer.fuse_3d([a[:16, :16, :16], b[:16, :16, :16]])  # the model loaded outside the measurement
    with pytest.warns(medfuse.errors.MedfuseWarning, match="clipping"):
        out, peak = _numpy_peak(lambda: infer.fuse_3d([a, b], batch_size=8))
    n = a.size
    assert peak < 10.0 * n, f"{peak / n:.1f} bytes a voxel"  # 8.2 now; 13 with the stack
    assert np.array_equal(a, a0) and np.array_equal(b, b0)
    # Slab-independent (the documented property), whatever the input type (each slab is cast as the whole was).
    again = infer.fuse_3d([a.astype(np.float64), np.clip(b, 0, 1)], batch_size=8)
    assert out.dtype == np.float32 and out.shape == shape and np.array_equal(out, again)


def test_tri_plane_combination_runs_a_few_slices_at_a_time(monkeypatch):
    # The last pass combined a whole slab (32 slices) at once: its upsampled logits and softmax weights, a dozen
    # full-resolution channels, for 32 slices of a 512x512 CT (about 1 GB). Now COMBINE_SLICES (8) at a time,
    # with the same voxels as combining whole slabs.
    from medfuse.fusion.network import FusionNet

    a, b = _blobs((80, 20, 24), 4), _blobs((80, 20, 24), 5)
    b[20:60, 4:12] = 0.0  # the empty-input guard acts across the sub-slab borders
    seen = []
    real = FusionNet.combine

    def spy(self, x, *args, **kw):
        seen.append(x.shape[2])
        return real(self, x, *args, **kw)

    monkeypatch.setattr(FusionNet, "combine", spy)
    out = infer.fuse_3d([a, b], batch_size=32)
    assert seen and max(seen) <= getattr(infer, "COMBINE_SLICES", 8), f"{max(seen)} slices combined at once"
    monkeypatch.setattr(infer, "COMBINE_SLICES", 32, raising=False)
    seen.clear()
    whole = infer.fuse_3d([a, b], batch_size=32)
    assert max(seen) == 32 and np.array_equal(out, whole)


def test_tri_plane_fusion_still_refuses_what_the_stacked_check_refused():
    a = _blobs((16, 16, 16), 3).astype(np.float64)
    b = a.copy()
    b[3, 4, 5] = 1e39  # finite in float64, infinite as float32
    with pytest.raises(medfuse.errors.InvalidInputError, match="beyond float32's range"):
        infer.fuse_3d([a, b])
    b[3, 4, 5] = np.nan
    with pytest.raises(medfuse.errors.InvalidInputError, match="NaN or infinite"):
        infer.fuse_3d([a, b])


# ----------------------------------------------------------------------------- classical rules
@pytest.mark.parametrize("method", classical.METHODS)
@pytest.mark.parametrize("shape", [(40, 36), (20, 18, 16)])
def test_classical_rules_leave_float64_inputs_alone(method, shape):
    # _check no longer copies float64 inputs: safe only as long as no rule writes to its inputs or returns one.
    rng = np.random.default_rng(4)
    a, b = rng.random(shape), rng.random(shape) * 2
    a0, b0 = a.copy(), b.copy()
    out = classical.fuse_arrays([a, b], method=method)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)
    assert not np.shares_memory(out, a) and not np.shares_memory(out, b)
    assert np.array_equal(out, classical.fuse_arrays([a0.copy(), b0.copy()], method=method))


def test_classical_rules_copy_no_float64_input():
    # max of two float64 volumes: the result (8 bytes a voxel); before, float64 copies of both inputs (16) and
    # the stack np.maximum.reduce makes of a list (16 more).
    rng = np.random.default_rng(5)
    a, b = rng.random((64, 64, 32)), rng.random((64, 64, 32))
    out, peak = _numpy_peak(lambda: classical.fuse_arrays([a, b], method="max"))
    assert np.array_equal(out, np.maximum(a, b))
    assert peak < 10.0 * a.size, f"{peak / a.size:.1f} bytes a voxel"


# ----------------------------------------------------------------------------- registration in the pipeline
@pytest.fixture(scope="module")
def shifted_pair():
    """A CT-like volume (1.5 mm) and a PET-like one (3 mm) of one smooth scene, the PET shifted by 3 mm."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    scene = ndimage.gaussian_filter(rng.random((24, 24, 20)), 1.5)
    big = ndimage.zoom(scene, 2, order=1)
    eye = np.eye(3)
    ct = Volume((big * 2000 - 1000).astype(np.int16), affine_from_geometry((1.5, 1.5, 1.5), (0, 0, 0), eye),
                modality="CT", unit="HU")
    pet = Volume((scene * 10).astype(np.float32), affine_from_geometry((3.0, 3.0, 3.0), (0.75 + 3.0, 0.75, 0.75), eye),
                 modality="PT", unit="SUVbw")
    return ct, pet


def test_pipeline_registration_builds_no_resampled_volume_it_throws_away(shifted_pair, monkeypatch):
    # register() resampled the moving image onto the fixed grid, and the pipeline's register step dropped it
    # (the resample step resamples the original once, through the transform): one resampling too many.
    import importlib

    reg_mod = importlib.import_module("medfuse.registration.register")
    package = importlib.import_module("medfuse.registration")  # where the pipeline's resample step finds it

    ct, pet = shifted_pair
    calls = []
    real = package.resample

    def counted(*a, **k):
        if a[0].array.dtype != bool:  # the field-of-view mask (1 byte a voxel) is kept, not thrown away
            calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(reg_mod, "resample", counted)
    monkeypatch.setattr(package, "resample", counted)
    step = RegisterStep("rigid", threads=1, initialise="none")  # one ITK thread: bit-identical runs
    res = medfuse.Pipeline(method="mean").replace("register", step).run([ct, pet])
    assert len(calls) == 1, f"{len(calls)} resamplings of the moving image"
    # The same transform and result as register() (which still resamples, for its API users) + resample().
    with _itk_threads(1):
        full = medfuse.register(ct, pet, kind="rigid", initialise="none")
    assert np.array_equal(full.transform.matrix, res.transforms[0].matrix)
    assert full.resampled is not None and full.resampled.shape == ct.shape
    assert full.report.to_dict()["metric_after"] == res.registrations[0]["metric_after"]
    again = medfuse.Pipeline(method="mean").run([ct, medfuse.resample(pet, ct, transform=full.transform)]).fused
    assert np.array_equal(again.array, res.fused.array)


def test_resample_without_a_reference_image_gives_simpleitks_result(shifted_pair):
    # The output grid is given by its geometry (no byte-a-voxel reference image): SimpleITK's own resampling
    # onto a reference image of that grid is the reference.
    import SimpleITK as sitk

    ct, pet = shifted_pair
    got = medfuse.resample(pet, ct)
    ref = sitk.Image(list(ct.shape), sitk.sitkUInt8)
    ref.SetSpacing(ct.spacing)
    ref.SetOrigin(ct.origin)
    ref.SetDirection(tuple(float(x) for x in ct.direction.ravel()))
    want = sitk.Resample(sitk.Cast(pet.to_sitk(), sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32)
    assert np.array_equal(got.array, np.transpose(sitk.GetArrayFromImage(want), (2, 1, 0)))
    assert np.allclose(got.affine, ct.affine)


# ----------------------------------------------------------------------------- medfuse.fuse on Volumes, network
def _fused_by_hand(arrays32, **kw):
    """The network's fusion of float32 0..1 arrays as the committed fuse() finished it: float64, clipped, float32."""
    return np.clip(np.asarray(infer.fuse_3d(arrays32, **kw), dtype=np.float64), 0.0, 1.0).astype(np.float32)


def test_network_fuse_copies_no_volume_already_normalised(small_slabs):
    # Volumes as the pipeline hands them over (float32, 0..1, unit "arbitrary") were normalised again into
    # float64 copies (8 bytes a voxel each), cast to float32 copies (4 each); the network's float32 result went
    # to float64 (8), a clipped copy (8) and a float32 copy (4): 24 bytes a voxel. Now the inputs are read as
    # they are, and the result is clipped in place: the network's own 10.
    shape = (96, 16, 20)
    a, b = _blobs(shape, 1), _blobs(shape, 2)
    a0, b0 = a.copy(), b.copy()
    # With the record the pipeline's normalise step leaves (what makes a volume count as normalised).
    done = {"normalisation": {"method": "percentile"}}
    va = Volume(a, np.eye(4), modality="CT", unit="arbitrary", provenance=dict(done))
    vb = Volume(b, np.eye(4), modality="PT", unit="arbitrary", provenance=dict(done))
    infer.fuse_3d([a[:16, :16, :16], b[:16, :16, :16]])  # the model loaded outside the measurement
    out, peak = _numpy_peak(lambda: medfuse.fuse(va, vb, batch_size=8))
    n = a.size
    assert peak < 11.5 * n, f"{peak / n:.1f} bytes a voxel"  # 9.9 now; 24.5 before
    assert np.array_equal(a, a0) and np.array_equal(b, b0)  # read, never written to
    assert out.array.dtype == np.float32 and np.array_equal(out.array, _fused_by_hand([a0, b0], batch_size=8,
                                                                                     functional=True))
    want = [normalise(x.astype(np.float64), method="range", low=0.0, high=1.0, modality=m, unit="arbitrary")[1]
            for x, m in ((a0, "CT"), (b0, "PT"))]
    assert out.provenance["normalisation"] == want


def test_network_fuse_normalises_volumes_into_float32(small_slabs):
    # A CT in HU (int16) and a PET in SUV: normalised into float32 slab by slab (4 bytes a voxel each) instead
    # of float64 volumes (8 each) cast to float32 copies (4 each) beside them; the result as above.
    shape = (96, 16, 20)
    a, b = _blobs(shape, 3), _blobs(shape, 4)
    ct = Volume((a * 2000 - 1000).astype(np.int16), np.eye(4), modality="CT", unit="HU")
    pet = Volume(b * 8.0, np.eye(4), modality="PT", unit="SUVbw")
    infer.fuse_3d([a[:16, :16, :16], b[:16, :16, :16]])
    out, peak = _numpy_peak(lambda: medfuse.fuse(ct, pet, batch_size=8))
    n = a.size
    assert peak < 19.5 * n, f"{peak / n:.1f} bytes a voxel"  # 18.1 now; 24.4 before
    s = [normalise(v.array, modality=v.modality, unit=v.unit) for v in (ct, pet)]
    assert np.array_equal(out.array, _fused_by_hand([x.astype(np.float32) for x, _ in s], batch_size=8,
                                                    functional=True))
    assert out.provenance["normalisation"] == [r for _, r in s]


def test_normalise_volumes_for_the_network():
    # float32 for the network: the float64 values rounded once; an already normalised float32 volume is itself.
    from medfuse.fusion import _normalise_volumes

    ct, pet = _ct_pet((20, 18, 16))
    done = _blobs((20, 18, 16), 6)
    rec = {"normalisation": {"method": "percentile"}}  # as the pipeline's normalise step leaves it
    vols = [Volume(ct, np.eye(4), modality="CT", unit="HU"), Volume(pet, np.eye(4), modality="PT", unit="SUVbw"),
            Volume(done, np.eye(4), modality="MR", unit="arbitrary", provenance=dict(rec)),
            Volume(done.astype(np.float64), np.eye(4), modality="MR", unit="arbitrary", provenance=dict(rec))]
    ref, ref_recs = _normalise_volumes(vols, "auto")
    got, recs = _normalise_volumes(vols, "auto", dtype=np.float32)
    assert recs == ref_recs
    assert [g.dtype for g in got] == [np.float32] * 4 and [r.dtype for r in ref] == [np.float64] * 4
    assert all(np.array_equal(g, r.astype(np.float32)) for g, r in zip(got, ref))
    assert got[2] is done and got[3] is not vols[3].array  # no copy of the float32 one; the float64 one is cast


# ----------------------------------------------------------------------------- the tri-plane step
@pytest.mark.parametrize("n_inputs, shape", [(2, (44, 36, 29)), (3, (37, 41, 48))])
def test_tri_plane_step_encodes_and_merges_a_few_slices_at_a_time(monkeypatch, n_inputs, shape):
    # The step encoded 64 low-resolution slices at a time and merged the three planes' logits in one 3-D
    # convolution over the whole (maps, 3, d, h, w) stack and its padded copy: about 1.6 GB beside the volumes
    # at clinical size (torch memory, which tracemalloc does not see: counted here in slices). Now PLANE_BATCH
    # slices and MERGE_SLICES slices at a time, with the same result to the bit.
    from medfuse.fusion.network import FusionNet

    arrays = [_blobs(shape, 10 + i) for i in range(n_inputs)]
    seen = {"encoded": [], "merged": []}
    lowres, merge = FusionNet.lowres_logits, FusionNet._merge_padded

    def spy_lowres(self, feats):
        seen["encoded"].append(feats.shape[0])
        return lowres(self, feats)

    def spy_merge(self, padded):
        seen["merged"].append(padded.shape[2] - 2)
        return merge(self, padded)

    monkeypatch.setattr(FusionNet, "lowres_logits", spy_lowres)
    monkeypatch.setattr(FusionNet, "_merge_padded", spy_merge)
    monkeypatch.setattr(infer, "PLANE_BATCH", 4)  # a few slices of these small volumes, as 8 of a clinical one
    monkeypatch.setattr(infer, "MERGE_SLICES", 3)
    out = infer.fuse_3d(arrays, functional=True)
    assert max(seen["encoded"]) <= 4 and max(seen["merged"]) <= 3
    assert sum(seen["merged"]) == -(-shape[0] // 4)  # every low-resolution slice merged once
    monkeypatch.setattr(infer, "MERGE_SLICES", 10 ** 6)  # one merge call for the whole volume: the same to the bit
    seen["merged"].clear()
    assert np.array_equal(out, infer.fuse_3d(arrays, functional=True)) and not seen["merged"]
    # The former encoder batch (64 slices): oneDNN may take another kernel for it, the last bit apart on some CPUs
    # (6e-8 on an AMD EPYC with AVX2; identical on Intel ones).
    monkeypatch.setattr(infer, "PLANE_BATCH", 64)
    np.testing.assert_allclose(infer.fuse_3d(arrays, functional=True), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("merge", ["convex", "conv"])
def test_tri_plane_merge_by_slices_is_the_whole_merge(merge):
    import torch

    from medfuse.fusion.network import FusionNet

    torch.manual_seed(0)
    model = FusionNet(merge=merge).eval()
    with torch.no_grad():
        for p in model.agg.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # an uneven kernel (and bias): every tap counts
    for n, d in ((2, 12), (3, 9)):
        feats = torch.rand(n, 4, d, 10, 7, generator=torch.Generator().manual_seed(d))
        with torch.inference_mode():
            whole = model.planes_logits(feats)
            for depth in (1, 2, 5, d - 1):
                assert torch.equal(model.planes_logits(feats, merge_depth=depth), whole), depth
