"""A resampled (and then fused) Volume's history holds everything that set its voxels: a probe found two
resamplings with different fill values, or onto grids 7 mm apart, with equal records."""

import numpy as np

import medfuse


def _pair():
    rng = np.random.default_rng(0)
    moving = medfuse.Volume(rng.random((20, 22, 18)).astype(np.float32) * 100, np.diag([2.0, 2.0, 2.0, 1.0]),
                            modality="MR")
    ref = medfuse.Volume(np.zeros((16, 16, 16), np.float32), np.diag([2.5, 2.5, 2.5, 1.0]), modality="MR")
    return moving, ref


def test_the_fill_value_the_reference_grid_and_a_linear_transform_are_recorded():
    moving, ref = _pair()
    shifted = ref.with_array(ref.array)
    shifted.affine = shifted.affine @ np.array([[1, 0, 0, 2.8], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    m = np.eye(4)
    m[:3, 3] = [3.0, -1.5, 0.25]
    t = medfuse.Transform.from_matrix(m)
    a = medfuse.resample(moving, ref, default=5.0).provenance["history"][-1]
    b = medfuse.resample(moving, ref).provenance["history"][-1]
    c = medfuse.resample(moving, shifted, default=5.0).provenance["history"][-1]
    d = medfuse.resample(moving, ref, transform=t, default=5.0).provenance["history"][-1]
    assert a["fill"] == 5.0 and b["fill"] == 0.0
    assert a != c and c["reference_affine"][0][3] == 7.0  # 2.8 voxels of 2.5 mm
    np.testing.assert_allclose(d["transform_matrix"], m, atol=1e-9)
    assert "transform_matrix" not in a


def test_a_fused_volume_keeps_each_inputs_history():
    moving, ref = _pair()
    fixed = ref.with_array(np.random.default_rng(1).random(ref.shape).astype(np.float32))
    moved = medfuse.resample(moving, ref, default=5.0)
    (step,) = medfuse.fuse(fixed, moved, method="mean").provenance["history"]
    assert step["step"] == "fuse" and step["input_histories"] == [[], moved.provenance["history"]]
