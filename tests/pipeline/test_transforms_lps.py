"""MetaTensors in LPS space (``ITKReader(affine_lps_to_ras=False)``) come back from medfuse's transforms in LPS,
so that their ``original_affine`` and transform history (LPS) still match the affine."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")

from monai.data import MetaTensor  # noqa: E402
from monai.transforms import Compose, Spacing  # noqa: E402

from medfuse.transforms import FuseModalities, LoadVolume, RegisterToReference  # noqa: E402

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_AFFINE = np.array([[-1.0, 0, 0, -30.0], [0, -1.0, 0, 40.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])


def _tensor(space, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random((16, 18, 12)).astype(np.float32)
    aff = RAS_AFFINE if space is None else FLIP @ RAS_AFFINE
    meta = {"original_affine": aff.copy(), "spatial_shape": np.array(a.shape), "filename_or_obj": "t1.nii.gz"}
    if space:
        meta["space"] = space
    return MetaTensor(torch.from_numpy(a[None].copy()), affine=torch.tensor(aff), meta=meta)


def test_pass_through_keeps_the_lps_affine_beside_its_lps_original_affine():
    t = _tensor("LPS")
    out = LoadVolume(as_tensor=True)(t)
    assert str(out.meta["space"]).upper().endswith("LPS")
    np.testing.assert_allclose(out.affine.numpy(), FLIP @ RAS_AFFINE)
    np.testing.assert_allclose(np.asarray(out.meta["original_affine"]), out.affine.numpy())
    np.testing.assert_array_equal(out.numpy(), t.numpy())


def test_lps_chain_gives_the_ras_chains_voxels_and_inverts_to_its_own_grid():
    """After Spacing, a pass-through and Compose.inverse came back with x and y mirrored (an LPS matrix under
    space "RAS"); a registered LPS tensor held a RAS affine beside its LPS original_affine."""
    results = {}
    for space in (None, "LPS"):
        ref = LoadVolume(as_tensor=True)(_tensor(space))
        moved = RegisterToReference(kind=None)(Spacing(pixdim=(2, 2, 2))(_tensor(space, seed=1)), ref)
        results[space] = moved
        chain = Compose([Spacing(pixdim=(2, 2, 2)), LoadVolume(as_tensor=True)])
        back = chain.inverse(chain(_tensor(space)))
        np.testing.assert_allclose(back.affine.numpy(), _tensor(space).affine.numpy(), atol=1e-6)
    np.testing.assert_array_equal(results["LPS"].numpy(), results[None].numpy())
    np.testing.assert_allclose(results["LPS"].affine.numpy(), FLIP @ results[None].affine.numpy())
    assert str(results["LPS"].meta["space"]).upper().endswith("LPS")


def test_fused_lps_tensors_come_back_in_lps():
    a, b = _tensor("LPS"), _tensor("LPS", seed=2)
    fused = FuseModalities(method="mean")([a, b])
    np.testing.assert_allclose(fused.affine.numpy(), a.affine.numpy())
    np.testing.assert_allclose(np.asarray(fused.meta["original_affine"]), a.affine.numpy())
    assert str(fused.meta["space"]).upper().endswith("LPS")
    ras = FuseModalities(method="mean")([_tensor(None), _tensor(None, seed=2)])
    np.testing.assert_array_equal(fused.numpy(), ras.numpy())


def test_register_to_reference_pickles_the_same_before_and_after_a_call():
    """last_report was pickled with the transform, so PersistentDataset's pickle_hashing key changed after each
    call (a needless cache miss, keyed on whichever subject ran last)."""
    from monai.data.utils import pickle_hashing

    t = RegisterToReference(kind="rigid", threads=1)
    key = pickle_hashing(t)
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    import medfuse

    a = gaussian_filter(rng.random((24, 24, 24)), 2).astype(np.float32)
    ref = medfuse.Volume(a, np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR")
    t(ref.with_array(np.roll(a, 1, axis=0)), ref)
    assert t.last_report is not None
    assert pickle_hashing(t) == key
