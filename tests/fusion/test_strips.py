"""Bounded memory without seams: large 2-D images are fused in strips of rows, 3-D volumes in slabs.

Both must give the whole image's result: every strip or slab carries a halo of real neighbours as wide as the
network reads, which depends on the weights (their number of detail levels, the refinement head, the empty-input
guard).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from medfuse.errors import CancelledError  # noqa: E402
from medfuse.fusion import infer  # noqa: E402
from medfuse.fusion.network import FusionNet, _blur_reach, decompose  # noqa: E402
from medfuse.progress import CancelToken  # noqa: E402


def _pair(shape, seed=0):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    out = []
    for k in range(2):
        x = ndi.gaussian_filter(rng.random(shape), 1.5 + k)
        x = (x - x.min()) / (x.max() - x.min())
        out.append((x * (x > 0.25)).astype(np.float32))
    out[1][30:70, 20:60] = 0.0  # an input exactly 0 across a strip border: the empty-input guard acts there
    return out


def _whole(monkeypatch, arrays, **options):
    monkeypatch.setattr(infer, "STRIP_PIXELS", 2 ** 40)
    out = infer.fuse_2d(arrays, **options)
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("functional,refine", [(None, True), (True, True), (None, False)])
def test_strips_give_the_whole_images_result(monkeypatch, functional, refine):
    a, b = _pair((101, 66))  # neither side a multiple of the factor
    whole = _whole(monkeypatch, [a, b], functional=functional, refine=refine)
    seen = []
    # The network reads the image padded to a multiple of its factor (4): 104 x 68. 8 rows a strip: 13 strips,
    # each thinner than its halo.
    monkeypatch.setattr(infer, "STRIP_PIXELS", 68 * 8)
    strips = infer.fuse_2d([a, b], functional=functional, refine=refine, progress=lambda f, m: seen.append(f))
    assert strips.shape == a.shape and strips.dtype == np.float32
    np.testing.assert_allclose(strips, whole, atol=1e-5, rtol=0)
    assert len(seen) == 2 * 13 + 2 and seen == sorted(seen) and seen[-1] == 1.0


def test_a_strip_halo_that_misses_the_refinement_head_would_show(monkeypatch):
    """The check above can fail: strips with the blur's halo only (no room for the head's field) differ."""
    a, b = _pair((101, 66))
    whole = _whole(monkeypatch, [a, b])
    monkeypatch.setattr(infer, "STRIP_PIXELS", 68 * 8)
    monkeypatch.setattr(FusionNet, "halo_2d", lambda self, refine=True: self.halo)
    assert np.abs(infer.fuse_2d([a, b]) - whole).max() > 1e-4  # 30x the tolerance above


def test_a_large_image_is_fused_in_strips_and_cancel_acts_between_them(monkeypatch):
    a, b = _pair((64, 64))
    monkeypatch.setattr(infer, "STRIP_PIXELS", 64 * 16)
    rendered = []
    render = FusionNet.render_upsampled
    monkeypatch.setattr(FusionNet, "render_upsampled", lambda self, x, *r, **k: rendered.append(x.shape[2])
                        or render(self, x, *r, **k))
    token = CancelToken()

    def progress(fraction, message):
        if "combining" in message:
            token.cancel()

    with pytest.raises(CancelledError):
        infer.fuse_2d([a, b], progress=progress, cancel=token)
    assert len(rendered) == 1 and rendered[0] < 64  # one strip (with its halo), then the cancel


def test_the_halo_follows_the_weights_levels():
    """A fixed 14-voxel halo (3 levels) left seams of up to 0.06 between slabs for weights with 5 levels."""
    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, 200), dtype=np.float32))
    for levels in (1, 3, 5):
        model = FusionNet(levels=levels, empty_guard=3)
        assert model.halo == _blur_reach(levels) + 1
        # The reach is exact: a change just outside it leaves the centre's decomposition alone, one inside not.
        reach, c = _blur_reach(levels), 100
        for dist, moves in ((reach + 1, False), (reach, True)):
            y = x.clone()
            y[..., c + dist] += 1.0
            base_x, det_x = decompose(x, levels)
            base_y, det_y = decompose(y, levels)
            assert bool(base_x[..., c] != base_y[..., c]) == moves


def test_3d_slabs_of_weights_with_more_levels_have_no_seams(tmp_path):
    from medfuse.fusion.train import export_weights

    torch.manual_seed(0)
    model = FusionNet(levels=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = export_weights(model, tmp_path, {"note": "test"})
    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[:48, :40, :36]
    a = (0.5 + 0.4 * np.sin(z / 3.0) * np.cos(x / 4.0)).astype(np.float32)
    b = (((z - 24) ** 2 + (y - 20) ** 2 + (x - 18) ** 2 < 150) * 0.8 + 0.1 * rng.random(a.shape)).astype(np.float32)
    whole = infer.fuse_3d([a, b], weights=path, batch_size=64)
    np.testing.assert_allclose(infer.fuse_3d([a, b], weights=path, batch_size=4), whole, atol=1e-5, rtol=0)


def test_an_image_of_at_most_strip_pixels_takes_the_single_pass(monkeypatch):
    """Decided on the image's own size: a 101 x 66 image padded to 104 x 68 went into strips at 6666 pixels."""
    a, b = _pair((101, 66))
    whole = infer.fuse_2d([a, b])
    monkeypatch.setattr(infer, "STRIP_PIXELS", 101 * 66)

    def refuse(*args, **kwargs):
        raise AssertionError("strips for an image of STRIP_PIXELS pixels")

    monkeypatch.setattr(infer, "_fuse_2d_strips", refuse)
    assert np.array_equal(infer.fuse_2d([a, b]), whole)  # bit for bit: the same single pass
    monkeypatch.setattr(infer, "STRIP_PIXELS", 101 * 66 - 1)
    with pytest.raises(AssertionError, match="strips"):
        infer.fuse_2d([a, b])
