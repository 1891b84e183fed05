"""The optional four-direction selective scan (``FusionNet(scan=N)``, ``medfuse train --scan N``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from medfuse.errors import InvalidInputError  # noqa: E402
from medfuse.fusion import infer  # noqa: E402
from medfuse.fusion.network import FusionNet, SelectiveScan2d, _ssd_scan  # noqa: E402


def _sequential(x, log_a, b, c):
    """The recurrence h_t = a_t h_(t-1) + B_t x_t, y_t = C_t · h_t, one step at a time."""
    g, h, p, t = x.shape
    state = torch.zeros(g, h, p, b.shape[1], dtype=x.dtype)
    out = []
    for i in range(t):
        state = state * log_a[:, :, i].exp()[:, :, None, None] + x[:, :, :, i, None] * b[:, None, None, :, i]
        out.append((state * c[:, None, None, :, i]).sum(-1))
    return torch.stack(out, -1)


@pytest.mark.parametrize("length,chunk", [(37, 8), (64, 16), (5, 16)])
def test_chunked_scan_equals_the_recurrence(length, chunk):
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(3, 2, 3, length, generator=gen, dtype=torch.float64)
    log_a = -torch.rand(3, 2, length, generator=gen, dtype=torch.float64) * 2.0
    b = torch.randn(3, 4, length, generator=gen, dtype=torch.float64)
    c = torch.randn(3, 4, length, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(_ssd_scan(x, log_a, b, c, chunk), _sequential(x, log_a, b, c), rtol=1e-9, atol=1e-9)


def test_every_output_of_the_scan_sees_the_whole_map():
    torch.manual_seed(0)
    block = SelectiveScan2d(8, state=4, heads=2).double()
    with torch.no_grad():
        block.out.weight.normal_()
        block.dt_bias.fill_(0.0)  # step sizes near 0.7: long enough memory that the far corners are reached
        block.log_neg_a.fill_(-3.0)
    m = torch.zeros(1, 8, 12, 10, dtype=torch.float64, requires_grad=True)
    for (i, j) in [(0, 0), (11, 9), (0, 9), (11, 0)]:
        y = block(m + 0.1)
        (g,) = torch.autograd.grad(y[0, :, i, j].sum(), m)
        # Every position of the map influences every output: the receptive field is global.
        assert (g[0].abs().sum(0) > 0).all(), f"output ({i}, {j}) does not see the whole map"


def test_a_new_scan_starts_as_the_identity_on_trained_weights():
    shipped = infer.load_model()
    scan = FusionNet(**shipped.config(), scan=8).channels_last_()  # as load_model keeps them: bit-exact sums
    missing, unexpected = scan.load_state_dict(shipped.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("scan.") for k in missing)
    gen = np.random.default_rng(0)
    x = torch.from_numpy(gen.random((1, 2, 64, 48), dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(scan(x), shipped(x), atol=0, rtol=0)
        # Once trained away from zero the scan changes the output, and order equivariance still holds.
        scan.scan.out.weight.normal_(std=0.5)
        assert (scan(x) - shipped(x)).abs().max() > 1e-3
        torch.testing.assert_close(scan(x), scan(x.flip(1)), atol=1e-5, rtol=0)


def test_scan_weights_round_trip_and_fuse_in_2d_and_3d(tmp_path):
    from medfuse.fusion.train import _load_init, export_weights

    torch.manual_seed(0)
    model = FusionNet(scan=4)
    with torch.no_grad():
        model.scan.out.weight.normal_(std=0.3)
    path = export_weights(model, tmp_path, {"note": "test"})
    loaded = infer.load_model(path)
    assert loaded.config()["scan"] == 4
    gen = np.random.default_rng(1)
    a2, b2 = gen.random((2, 40, 36), dtype=np.float32)
    x = torch.from_numpy(np.stack([a2, b2]))[None]
    model.channels_last_()  # as load_model keeps them, so that the sums are bit-exact
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    a3, b3 = gen.random((2, 20, 24, 16), dtype=np.float32)
    o1 = infer.fuse_arrays([a3, b3], weights=path)
    o2 = infer.fuse_3d([a3, b3], weights=path, batch_size=8)
    assert o1.shape == a3.shape and np.isfinite(o1).all()
    np.testing.assert_allclose(o1, o2, atol=1e-5)  # the scan runs on whole planes, so slabs do not matter
    # Scan weights cannot start a model without a scan: a clear error, not a silent partial load.
    with pytest.raises(InvalidInputError, match="--scan"):
        _load_init(FusionNet(), path)
    with pytest.raises(InvalidInputError, match="size mismatch for encoder"):
        _load_init(FusionNet(width=8, scan=4), path)
