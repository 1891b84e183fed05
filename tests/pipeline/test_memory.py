"""Peak memory of the pipeline (fuse_files / Pipeline.run) on a CT + PET pair.

A CT on a fine grid (int16) and a PET on a coarser one (float32), as a radiologist's study: the PET is resampled
onto the CT's grid, both are normalised to float32 0..1, then fused. Sizes are small (N voxels on the CT grid);
the bounds are in units of N bytes, measured with tracemalloc (NumPy's allocations are traced).
"""

from __future__ import annotations

import gc
import json
import tracemalloc

import numpy as np
import pytest

import medfuse
from medfuse import pipeline as pl
from medfuse.pipeline import NormaliseStep, Pipeline
from medfuse.volume import Volume, affine_from_geometry

CT_SHAPE = (64, 64, 48)
PET_SHAPE = (24, 24, 48)
N = int(np.prod(CT_SHAPE))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A CT (int16, HU, 1 x 1 x 2 mm) and a PET (float32, SUV, 2.67 mm) over one field of view, as files."""
    from scipy import ndimage

    folder = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(3)

    def smooth(shape):
        return ndimage.zoom(rng.standard_normal((8, 8, 6)), [n / m for n, m in zip(shape, (8, 8, 6))], order=1)

    ct = np.clip(smooth(CT_SHAPE) * 400 + 40, -1024, 2000).astype(np.int16)
    pet = np.clip(smooth(PET_SHAPE) * 3 + 2, 0, 20).astype(np.float32)
    eye = np.eye(3)
    ct_vol = Volume(ct, affine_from_geometry((1.0, 1.0, 2.0), (-32.0, -32.0, -48.0), eye), modality="CT", unit="HU")
    pet_vol = Volume(pet, affine_from_geometry((64 / 24, 64 / 24, 2.0), (-31.0, -31.5, -47.0), eye),
                     modality="PT", unit="SUVbw")
    paths = folder / "ct.nii.gz", folder / "pet.nii.gz"
    medfuse.save(ct_vol, paths[0])
    medfuse.save(pet_vol, paths[1])
    return paths


def _numpy_bytes() -> int:
    """Bytes of NumPy array data allocated since tracemalloc started and still alive (imports and other
    Python objects left out)."""
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
    return sum(t.size for t in snap.traces)


def _traced_at_fuse(monkeypatch, pipe, inputs):
    """NumPy/Python memory alive when the fuse step starts, and the fused result."""
    seen = {}
    real = pl._fuse

    def spy(volumes, **kw):
        gc.collect()
        seen["current"] = _numpy_bytes()
        return real(volumes, **kw)

    monkeypatch.setattr(pl, "_fuse", spy)
    gc.collect()
    tracemalloc.start()
    try:
        res = pipe.run(list(inputs))
    finally:
        tracemalloc.stop()
    return seen["current"], res


def test_inputs_as_loaded_are_not_held_through_the_fusion(study, monkeypatch):
    # When fusion starts, the two normalised float32 volumes (8 bytes a voxel of the CT grid) are what must be
    # alive. The CT as loaded (int16: 2 more) and the PET as loaded were held too, in state.originals, for nothing.
    current, res = _traced_at_fuse(monkeypatch, Pipeline(method="mean"), study)
    assert res.fused.shape == CT_SHAPE
    assert current < 9.0 * N, f"{current / N:.2f} bytes a voxel alive at fusion (the minimum is 8)"


def test_released_originals_change_neither_the_result_nor_the_provenance(study, monkeypatch):
    # A later step that is not built in may read state.originals: they are then kept (as before). Both runs
    # give the same voxels, geometry and provenance facts about the inputs.
    class Keep(NormaliseStep):
        pass  # not the built-in type itself: the pipeline cannot know it leaves the originals alone

    kept_at_fuse, kept = _traced_at_fuse(monkeypatch, Pipeline(method="laplacian").replace("normalise", Keep()), study)
    freed_at_fuse, freed = _traced_at_fuse(monkeypatch, Pipeline(method="laplacian"), study)
    assert np.array_equal(kept.fused.array, freed.fused.array)
    assert kept.fused.same_grid(freed.fused) and np.array_equal(kept.fused.affine, freed.fused.affine)
    facts = [json.dumps(r.provenance["inputs"], sort_keys=True) for r in (kept, freed)]
    assert facts[0] == facts[1]
    inputs = json.loads(facts[1])
    assert [f["modality"] for f in inputs] == ["CT", "PT"] and inputs[0]["shape"] == list(CT_SHAPE)
    assert inputs[1]["shape"] == list(PET_SHAPE) and inputs[0]["unit"] == "HU"
    assert kept_at_fuse - freed_at_fuse > 1.9 * N  # the int16 CT as loaded, kept by the custom step's run


def test_normalise_step_peak(study, monkeypatch):
    # What the step allocates (its inputs exist already): the two float32 results, 8 bytes a voxel. normalise()'s
    # float64 copy of each whole volume, then cast to float32, added 8 more (16-19 measured); now the float64
    # arithmetic runs a slab at a time (slabs made small here, as a CT slice is beside a clinical volume).
    from medfuse.fusion import normalise as norm_mod

    monkeypatch.setattr(norm_mod, "SLAB_ELEMENTS", 2048, raising=False)
    vols = [medfuse.load(p) for p in study]
    vols[1] = medfuse.resample(vols[1], vols[0])
    state = pl.PipelineState(inputs=list(study), volumes=vols)
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        NormaliseStep()(state)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert [v.array.dtype for v in state.volumes] == [np.float32, np.float32]
    assert peak < 9.0 * N, f"normalise peaked at {peak / N:.1f} bytes a voxel (the minimum is 8)"
    # The same values as the float64 scaling rounded once to float32.
    for v, got in zip(vols, state.volumes):
        want = norm_mod.normalise(v.array, modality=v.modality, unit=v.unit)[0].astype(np.float32)
        assert np.array_equal(got.array, want)
