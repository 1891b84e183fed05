"""The pipeline's fuse step: the run's progress and cancel reach the fusion, and the fallback gets only the
options its rule understands."""

import numpy as np
import pytest

import medfuse
from medfuse.errors import CancelledError, InvalidInputError
from medfuse.pipeline import FuseStep, Pipeline
from medfuse.progress import CancelToken


def _pair(n=40, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)

    def smooth():
        x = gaussian_filter(rng.random((n, n, n)), 2)
        return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)
    return (medfuse.Volume(smooth(), np.eye(4), modality="MR"),
            medfuse.Volume(smooth(), np.eye(4), modality="PT", unit="arbitrary"))


def test_cancel_during_the_network_fusion_stops_it_inside_the_step():
    """The fuse step called medfuse.fuse without the run's cancel: a cancel set as fusion began was seen only
    after the whole fusion, by the save step."""
    a, b = _pair()
    token, seen = CancelToken(), []

    def progress(f, msg=""):
        seen.append(msg)
        if "fusing" in msg:
            token.cancel()

    with pytest.raises(CancelledError) as err:
        medfuse.fuse_files(a, b, None, method="network", progress=progress, cancel=token)
    assert "fusion" in str(err.value)  # raised by the fusion itself, not by a later step
    assert not any(m == "fused" or m.startswith("fuse done") for m in seen)


def test_the_fusion_reports_its_own_progress_through_the_step():
    a, b = _pair()
    seen = []
    medfuse.fuse_files(a, b, None, method="network", progress=lambda f, msg="": seen.append((f, msg)))
    inner = [m for _, m in seen if m.startswith("fuse: fusing (network): ")]
    assert len(inner) >= 2, seen  # the network's per-slab reports, not only "fusing" then "fused"
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions)


@pytest.mark.parametrize("extra", [{}, {"batch_size": 8}, {"functional": True, "refine": False}])
def test_fallback_for_missing_weights_gets_only_its_rules_options(tmp_path, extra, network_fails):
    """weights= (the network's file) reached the Laplacian rule as its blend weights: 'weights must be 2
    non-negative numbers'; batch_size: 'not understood by method laplacian'. The network is made unavailable
    (torch missing): a weights file the caller names that is missing is an error, never a fallback."""
    from medfuse.errors import MissingDependencyError
    from medfuse.fusion.infer import default_weights_path

    network_fails(MissingDependencyError("the fusion network needs torch", fix="pip install torch"))
    a, b = _pair(16)
    step = FuseStep("network", fallback="laplacian", weights=str(default_weights_path()), levels=3, **extra)
    pipe = Pipeline(method="network", fallback="laplacian").replace("fuse", step)
    with pytest.warns(medfuse.MedfuseWarning, match="fell back to method 'laplacian'"):
        res = pipe.run([a, b])
    want = Pipeline(method="laplacian").replace("fuse", FuseStep("laplacian", levels=3)).run([a, b])
    assert res.provenance["method_used"] == "laplacian" and res.fused.provenance["method"] == "laplacian"
    np.testing.assert_array_equal(res.fused.array, want.fused.array)


def test_fuse_step_refuses_its_own_callbacks():
    with pytest.raises(InvalidInputError, match="Pipeline.run"):
        FuseStep("mean", cancel=CancelToken())


def test_normalise_none_reaches_the_fusion():
    """Pipeline(normalise="none") skipped only its own step; medfuse.fuse then scaled by modality anyway, so a
    CT already scaled to 0..1 upstream (still labelled HU) got the soft-tissue window a second time."""
    rng = np.random.default_rng(3)
    ct = medfuse.Volume(rng.random((12, 12, 12)).astype(np.float32), np.eye(4), modality="CT", unit="HU")
    mr = medfuse.Volume(rng.random((12, 12, 12)).astype(np.float32), np.eye(4), modality="MR")
    res = Pipeline(method="mean", normalise="none").run([ct, mr])
    np.testing.assert_allclose(res.fused.array, (ct.array + mr.array) / 2, atol=1e-6)
    raw = ct.with_array(ct.array * 1000.0)
    with pytest.raises(InvalidInputError, match="normalis"):
        Pipeline(method="mean", normalise="none").run([raw, mr])


@pytest.mark.parametrize("content", [None, b"not a safetensors file"])
def test_a_weights_file_the_caller_names_is_never_covered_by_the_fallback(tmp_path, content):
    """Before: a missing or corrupt weights= file of the caller's fell back to the rule, with a warning only, and the
    result was the rule's image where the caller asked for their own trained network."""
    from medfuse.errors import WeightsError

    path = tmp_path / "mine.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError):
        FuseStep("network", fallback="laplacian", weights=str(path))
    a, b = _pair(16)
    with pytest.raises(WeightsError):
        medfuse.fuse_files(a, b, None, method="network", fallback="laplacian", weights=str(path))
