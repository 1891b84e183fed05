"""The network model cache in a long-running process: bounded, and without side effects on torch's generator."""

from __future__ import annotations

import os
import shutil

import pytest

torch = pytest.importorskip("torch")

from medfuse.fusion import infer  # noqa: E402


@pytest.fixture
def empty_cache():
    saved = dict(infer._CACHE)
    infer._CACHE.clear()
    yield infer._CACHE
    infer._CACHE.clear()
    infer._CACHE.update(saved)


def _models(cache):
    return [k for k in cache if k[0] == "model"]


def test_loading_the_network_leaves_torchs_generator_alone(empty_cache):
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    infer.load_model()  # built, so its layers' initial weights were drawn, before the file's are loaded
    assert torch.equal(torch.rand(4), want)


def test_a_replaced_file_and_many_files_do_not_pile_up_models(empty_cache, tmp_path):
    shipped = infer.default_weights_path()
    card = shipped.with_name("medfuse_fusion.json")
    first = tmp_path / "w0" / "medfuse_fusion.safetensors"
    first.parent.mkdir()
    shutil.copy(shipped, first)
    if card.exists():
        shutil.copy(card, first.with_name(card.name))
    a = infer.load_model(first)
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a deployment replaced it in place
    b = infer.load_model(first)
    assert a is not b and _models(empty_cache) == [k for k in _models(empty_cache) if k[1] == str(first)]
    assert len(_models(empty_cache)) == 1
    for i in range(1, 7):
        other = tmp_path / f"w{i}" / "medfuse_fusion.safetensors"
        other.parent.mkdir()
        shutil.copy(first, other)
        infer.load_model(other)
    kept = _models(empty_cache)
    assert len(kept) == infer._MAX_MODELS and kept[-1][1].endswith(os.path.join("w6", "medfuse_fusion.safetensors"))
    assert infer.load_model(tmp_path / "w6" / "medfuse_fusion.safetensors") is infer.load_model(
        tmp_path / "w6" / "medfuse_fusion.safetensors")  # the newest is still shared


def test_a_model_on_another_device_and_the_model_in_use_are_kept(empty_cache, tmp_path):
    """Loading the shipped weights on the CPU dropped the same file's GPU model, and a cache hit did not count as
    use: the model a service kept using could be the one evicted."""
    shipped = str(infer.default_weights_path())
    st = infer.default_weights_path().stat()
    gpu_key = ("model", shipped, st.st_mtime_ns, st.st_size, "cuda:0")
    empty_cache[gpu_key] = object()  # stands for a model on a GPU this machine may not have
    mine = infer.load_model()
    assert gpu_key in empty_cache
    for i in range(infer._MAX_MODELS - 2):
        other = tmp_path / f"w{i}" / "medfuse_fusion.safetensors"
        other.parent.mkdir()
        shutil.copy(shipped, other)
        infer.load_model(other)
        assert infer.load_model() is mine  # used between the others
    newest = tmp_path / "new" / "medfuse_fusion.safetensors"
    newest.parent.mkdir()
    shutil.copy(shipped, newest)
    infer.load_model(newest)  # one too many: the least recently used goes, which is the GPU one, not mine
    assert gpu_key not in empty_cache and infer.load_model() is mine
