"""The 2-D path's full-resolution refinement head (``FusionNet(refine=W)``, ``medfuse train --refine-head``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from medfuse.fusion import infer  # noqa: E402
from medfuse.fusion.network import FusionNet  # noqa: E402


def _blobs(shape, seed):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    return np.clip(ndi.gaussian_filter(rng.random(shape), 2.0) * 4.0 - 1.5, 0, 1).astype(np.float32)


def _models(width=8, seed=0):
    """The shipped low-resolution part without a head, and the same with a head whose output is not zero."""
    cfg = {k: v for k, v in infer.load_model().config().items() if k != "refine"}
    tensors = {k: v for k, v in infer.load_model().state_dict().items() if not k.startswith("refine.")}
    plain = FusionNet(**cfg).eval()
    plain.load_state_dict(tensors, strict=True)
    headed = FusionNet(**cfg, refine=width).eval()
    missing, unexpected = headed.load_state_dict(tensors, strict=False)
    assert not unexpected and missing and all(k.startswith("refine.") for k in missing)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in headed.refine.parameters():
            p.copy_(torch.randn_like(p))
    return plain, headed


def _x(n, shape=(64, 64)):
    return torch.from_numpy(np.stack([_blobs(shape, i) for i in range(n)]))[None]


def test_a_new_head_starts_as_exactly_the_weights_it_is_added_to():
    plain, headed = _models()
    with torch.no_grad():
        for p in headed.refine.parameters():
            p.zero_()  # a fresh head's output layer is zero, whatever the rest
    fresh = FusionNet(**{k: v for k, v in plain.config().items()}, refine=8)
    assert not fresh.refine.out.weight.detach().any() and not fresh.refine.out.bias.detach().any()
    with torch.inference_mode():
        for n in (2, 3):
            assert torch.equal(plain(_x(n)), headed(_x(n)))


def test_the_head_acts_in_2d_and_is_free_of_input_order():
    plain, headed = _models()
    with torch.inference_mode():
        for n in (2, 3):
            x = _x(n)
            out = headed(x)
            assert out.shape == (1, 64, 64) and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
            assert (out - plain(x)).abs().max() > 1e-2  # it changes the selection
            # Float sums only (random weights amplify them); an order bug moves pixels by far more.
            np.testing.assert_allclose(out.numpy(), headed(x.flip(1)).numpy(), atol=1e-3)


def test_the_tri_plane_path_does_not_use_the_head_and_exports_keep_it(tmp_path):
    """3-D fusion with and without a head is the same; the export stores the head's width and tensors."""
    from medfuse.fusion.train import export_weights

    plain, headed = _models()
    p_plain = export_weights(plain, tmp_path / "plain", {})
    p_head = export_weights(headed, tmp_path / "head", {})
    loaded = infer.load_model(p_head)
    assert loaded.config()["refine"] == 8 and "refine" not in infer.load_model(p_plain).config()
    for k, v in headed.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    a, b = _blobs((24, 28, 20), 5), _blobs((24, 28, 20), 6)
    np.testing.assert_array_equal(infer.fuse_3d([a, b], weights=p_head), infer.fuse_3d([a, b], weights=p_plain))
    a2, b2 = a[12], b[12]
    # The 2-D path uses it.
    assert np.abs(infer.fuse_2d([a2, b2], weights=p_head) - infer.fuse_2d([a2, b2], weights=p_plain)).max() > 1e-4


def test_a_negative_width_is_refused():
    with pytest.raises(ValueError, match="refine"):
        FusionNet(refine=-1)


def test_refine_false_gives_the_low_resolution_choice_alone():
    """``medfuse.fuse(..., refine=False)`` on 2-D arrays skips the shipped head: the output is that of the same
    weights without it; volumes never run it, so the option changes nothing there."""
    import medfuse

    shipped = infer.load_model()
    assert shipped.refine is not None, "the shipped weights have a refinement head"
    plain, _ = _models()
    plain.channels_last_()  # as load_model keeps the low-resolution weights
    a, b = _blobs((64, 64), 7), _blobs((64, 64), 8)
    fast = medfuse.fuse(a, b, refine=False)
    with torch.inference_mode():
        want = plain(torch.from_numpy(np.stack([a, b]))[None])[0].numpy()
    np.testing.assert_allclose(fast, want, atol=1e-6)
    assert np.abs(medfuse.fuse(a, b) - fast).max() > 1e-3  # the default runs the head
    v1, v2 = _blobs((20, 24, 16), 9), _blobs((20, 24, 16), 10)
    np.testing.assert_array_equal(medfuse.fuse(v1, v2, refine=False), medfuse.fuse(v1, v2))


@pytest.mark.parametrize("levels", [1, 2, 4])
def test_a_head_is_built_for_any_number_of_levels(tmp_path, monkeypatch, levels):
    """The head reads one map per detail level, so a network of 1, 2 or 4 levels with a head runs, exports and
    fuses in strips (its input width was fixed at 3 levels' count: a channel-count error at the first pass)."""
    from medfuse.fusion.train import export_weights

    torch.manual_seed(levels)
    net = FusionNet(levels=levels, refine=4).eval()
    with torch.no_grad():
        for p in net.refine.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        out = net(_x(2))
    assert out.shape == (1, 64, 64) and torch.isfinite(out).all()
    path = export_weights(net, tmp_path / "w", {})
    a, b = _blobs((40, 36), 1), _blobs((40, 36), 2)
    whole = infer.fuse_2d([a, b], weights=path)
    monkeypatch.setattr(infer, "STRIP_PIXELS", 36 * 12)
    np.testing.assert_allclose(infer.fuse_2d([a, b], weights=path), whole, atol=1e-5)
