"""What the MONAI transforms promise (docs/pipeline.md), found broken by two probes.

* A network fusion fell back to a classical rule, with only a warning and nothing in the output, when the caller's
  ``weights=`` file was missing or corrupt, or an option was misspelt (``fuse_files`` refuses the same).
* ``RegisterToReference(kind=None)`` dropped every option: ``interpolation="nearest"`` did not reach the
  resampling, so a label map came back with fractional labels; typos passed.
* ``LoadVolumed(modality={...})`` ignored a mapping key it does not load (``"CT"`` for ``"ct"``).
* ``LoadVolume(d)`` had no ``whole_series`` (one file of a DICOM series gave a one-slice volume).
* ``to_metatensor`` said ``original_channel_dim`` 0, so MONAI's ``SaveImage`` took coronal and sagittal volumes for
  2-D ones and could not write them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monai")

import medfuse  # noqa: E402
from medfuse import Volume  # noqa: E402
from medfuse.errors import InvalidInputError, MedfuseWarning, MissingDependencyError, WeightsError  # noqa: E402
from medfuse.transforms import (FuseModalities, FuseModalitiesd, LoadVolume, LoadVolumed,  # noqa: E402
                                RegisterToReference, RegisterToReferenced)

SAMPLES = Path(__file__).resolve().parents[2] / "sample_volumes"


def _pair(shape=(12, 14, 10), affine=None):
    rng = np.random.default_rng(3)
    aff = np.diag([2.0, 2.0, 2.5, 1.0]) if affine is None else affine
    mr = Volume(rng.random(shape).astype(np.float32) * 100, aff, modality="MR")
    pet = Volume(rng.random(shape).astype(np.float32) * 5, aff, modality="PT", unit="SUVbw")
    return mr, pet


# ----------------------------------------------------------------------------- 1. network fallback
@pytest.mark.parametrize("build", [
    lambda w: FuseModalities(method="network", fallback="laplacian", weights=w),
    lambda w: FuseModalitiesd(keys=["a", "b"], method="network", fallback="laplacian", weights=w),
])
def test_a_missing_weights_file_is_refused_when_built_whatever_the_fallback(tmp_path, build):
    with pytest.raises(WeightsError):
        build(tmp_path / "my_finetuned_typo.safetensors")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", "truncated"])
def test_a_corrupt_weights_file_is_refused_when_built(tmp_path, content):
    from medfuse.fusion.infer import default_weights_path

    bad = tmp_path / "bad.safetensors"
    shipped = default_weights_path().read_bytes()
    bad.write_bytes(shipped[: len(shipped) // 2] if content == "truncated" else content)
    with pytest.raises(WeightsError, match="not a whole safetensors file|missing or unreadable"):
        FuseModalities(method="network", fallback="laplacian", weights=bad)
    FuseModalities(method="network", fallback="laplacian", weights=default_weights_path())  # the real one passes


def test_weights_that_do_not_fit_the_model_fail_at_the_fusion_instead_of_falling_back(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")

    foreign = tmp_path / "foreign.safetensors"  # a whole safetensors file, of another model
    st.save_file({"x": torch.zeros(3)}, str(foreign))
    fuse = FuseModalities(method="network", fallback="laplacian", weights=foreign)
    with pytest.raises(WeightsError):
        fuse(list(_pair()))


@pytest.mark.parametrize("method, options", [
    ("network", {"wieghts": "x.safetensors"}), ("network", {"levels": 3}),
    ("laplacian", {"levles": 3}), ("laplacian", {"levels": 0}), ("max", {"weights": [0.5, 0.5]}),
])
def test_options_the_method_does_not_take_are_refused_when_built(method, options):
    with pytest.raises(InvalidInputError) as e:
        FuseModalities(method=method, fallback="laplacian" if method == "network" else None, **options)
    assert next(iter(options)) in str(e.value)
    if options == {"levles": 3}:  # a classical rule's typo gets medfuse.fuse's near name
        assert "did you mean 'levels'?" in str(e.value)
    with pytest.raises(InvalidInputError):
        FuseModalitiesd(keys=["a", "b"], method=method, **options)


def test_a_fallback_runs_only_when_the_network_cannot_and_the_output_says_which_method_ran(monkeypatch):
    import medfuse.pipeline as pipeline

    real = pipeline._fuse

    def no_torch(volumes, *, method, **kw):  # the network cannot run here (torch missing)
        if method == "network":
            raise MissingDependencyError("torch is not installed", fix="pip install 'medfuse[ml]'")
        return real(volumes, method=method, **kw)

    monkeypatch.setattr(pipeline, "_fuse", no_torch)
    mr, pet = _pair()
    with pytest.warns(medfuse.errors.MedfuseWarning, match="not available"):
        out = FuseModalities(method="network", fallback="laplacian")([mr.to_metatensor(), pet.to_metatensor()])
    assert out.meta["medfuse_method"] == "laplacian" and "torch" in out.meta["medfuse_fallback_reason"]
    rule = FuseModalities(method="laplacian")([mr.to_metatensor(), pet.to_metatensor()])
    assert rule.meta["medfuse_method"] == "laplacian" and rule.meta["medfuse_fallback_reason"] == ""
    np.testing.assert_array_equal(out.numpy(), rule.numpy())
    with pytest.warns(medfuse.errors.MedfuseWarning):
        vol = FuseModalities(method="network", fallback="mean", as_tensor=False)([mr, pet])
    assert vol.provenance["method"] == "mean"
    assert vol.provenance["fallback"]["requested"] == "network" and vol.provenance["fallback"]["used"] == "mean"
    # A caller's mistake is not "the network cannot run": an input problem passes through.
    monkeypatch.setattr(pipeline, "_fuse", lambda *a, **k: (_ for _ in ()).throw(InvalidInputError("bad input")))
    with pytest.raises(InvalidInputError):
        FuseModalities(method="network", fallback="laplacian")([mr, pet])


# ----------------------------------------------------------------------------- 2. kind=None options
def _labels_and_coarse_grid():
    shape = (24, 22, 20)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [-5.0, 3.0, 7.0]
    lab = np.zeros(shape, np.uint8)
    lab[4:14, 5:15, 3:12] = 1
    lab[8:12, 8:12, 5:9] = 2
    lab[14:20, 3:9, 10:17] = 4
    seg = Volume(lab, aff, modality="MR", unit="arbitrary")
    coarse_aff = np.diag([1.7, 1.7, 1.7, 1.0])
    coarse_aff[:3, 3] = [-4.6, 3.3, 7.2]
    coarse = Volume(np.zeros((13, 12, 11), np.float32), coarse_aff, modality="MR")
    return seg, coarse


def test_kind_none_passes_interpolation_nearest_through_and_keeps_the_label_dtype():
    seg, coarse = _labels_and_coarse_grid()
    want = medfuse.resample(seg, coarse, interpolation="nearest")
    out = RegisterToReference(kind=None, interpolation="nearest")(seg, coarse)
    assert out.dtype == np.uint8 and set(np.unique(out.array)) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(out.array, want.array)
    # MetaTensors too, and the dictionary version
    mt = RegisterToReference(kind=None, interpolation="nearest")(seg.to_metatensor(), coarse.to_metatensor())
    assert set(np.unique(mt.numpy()).tolist()) <= {0, 1, 2, 4}
    d = RegisterToReferenced(keys=["seg"], reference_key="ref", kind=None, interpolation="nearest")(
        {"seg": seg, "ref": coarse})
    np.testing.assert_array_equal(d["seg"].array, want.array)
    # default stays linear: fractional values, as medfuse.resample gives
    lin = RegisterToReference(kind=None)(seg, coarse)
    np.testing.assert_array_equal(lin.array, medfuse.resample(seg, coarse).array)


@pytest.mark.parametrize("build, says", [
    (lambda: RegisterToReference(kind=None, interpolaton="nearest"), "interpolaton"),
    (lambda: RegisterToReference(kind=None, interpolation="cubic"), "interpolation"),
    (lambda: RegisterToReference(kind=None, metric="mattes"), "metric"),
    (lambda: RegisterToReference(kind="rigid", interpolation="nearest"), "kind=None"),
    (lambda: RegisterToReference(kind="rigid", metirc="mattes"), "metirc"),
    (lambda: RegisterToReferenced(keys=["pet"], reference_key="mr", kind=None, interpolaton="nearest"),
     "interpolaton"),
])
def test_registration_options_are_checked_when_built(build, says):
    with pytest.raises(InvalidInputError) as e:
        build()
    assert says in str(e.value)


def test_registration_options_that_exist_are_accepted():
    from medfuse.registration.presets import PRESETS

    preset_key = next(k for k in PRESETS["MR-MR"] if k not in ("metric", "seed"))
    r = RegisterToReference(kind="rigid", metric="correlation", seed=1, **{preset_key: PRESETS["MR-MR"][preset_key]})
    assert r.options["metric"] == "correlation"
    assert RegisterToReference(kind=None, interpolation="bspline", default=0).options["default"] == 0


# ----------------------------------------------------------------------------- 3. modality mapping keys
def test_a_modality_mapping_key_that_is_not_loaded_is_refused_when_built():
    with pytest.raises(InvalidInputError) as e:
        LoadVolumed(keys=["mr", "ct"], modality={"mr": "MR", "CT": "CT"})
    assert "'CT'" in str(e.value) and "'ct'" in str(e.value)
    LoadVolumed(keys=["mr", "ct"], modality={"mr": "MR", "ct": "CT"})  # exact keys pass


# ----------------------------------------------------------------------------- 4. whole_series
def test_load_volume_whole_series_loads_the_series_of_one_dicom_file():
    one = SAMPLES / "ct" / "IM00001.dcm"
    if not one.is_file():
        pytest.skip("the bundled sample CT series is absent")
    series = medfuse.load(SAMPLES / "ct")
    d = LoadVolumed(keys=["ct"], whole_series=True)({"ct": str(one)})
    assert d["ct"].shape == series.shape and series.shape[2] > 1
    np.testing.assert_array_equal(d["ct"].array, series.array)
    assert LoadVolume(whole_series=True, as_tensor=True)(str(one)).shape[1:] == series.shape
    with pytest.raises(InvalidInputError):
        LoadVolume(whole_series="yes")


# ----------------------------------------------------------------------------- 5. SaveImage of coronal/sagittal
def _save_chain(tmp_path, vol: Volume, name: str):
    """LoadVolumed -> FuseModalitiesd -> SaveImaged over two copies of ``vol``; returns (fused tensor, file)."""
    from monai.transforms import Compose, SaveImaged

    a, b = tmp_path / f"{name}_a.nii.gz", tmp_path / f"{name}_b.nii.gz"
    medfuse.save(vol, a)
    medfuse.save(vol.with_array(vol.array[::-1].copy()), b)
    out_dir = tmp_path / "out"
    d = Compose([LoadVolumed(keys=["a", "b"]), FuseModalitiesd(keys=["a", "b"], output_key="fused", method="mean"),
                 SaveImaged(keys=["fused"], output_dir=str(out_dir), output_postfix="fused", separate_folder=False,
                            print_log=False)])({"a": str(a), "b": str(b)})
    return d["fused"], out_dir / f"{name}_a_fused.nii.gz"


def _assert_written_exactly(fused, written: Path, reference: Volume):
    assert written.is_file()
    back = medfuse.load(written)
    np.testing.assert_allclose(back.affine, reference.affine, atol=1e-4)
    assert back.shape == reference.shape
    np.testing.assert_array_equal(back.array, fused.numpy()[0])


@pytest.mark.parametrize("code", ["PIL", "LIP", "SPL"])  # sagittal, coronal, and i along z
def test_monai_saveimaged_writes_coronal_and_sagittal_fusions_with_their_geometry(tmp_path, code):
    rng = np.random.default_rng(5)
    aff = np.diag([1.5, 2.0, 2.5, 1.0])
    aff[:3, 3] = [-20.0, 15.0, -7.0]
    vol = Volume(rng.random((10, 12, 8)).astype(np.float32) * 50, aff, modality="MR").reorient(code)
    fused, written = _save_chain(tmp_path, vol, code)
    _assert_written_exactly(fused, written, vol)


@pytest.mark.parametrize("code", ["LIP", "PIL"])
def test_a_reoriented_spm_t1_goes_through_the_chain_into_saveimaged(tmp_path, shared, code):
    t1 = medfuse.load(shared("data", "spm12-templates", "T1.nii")).reorient(code)
    fused, written = _save_chain(tmp_path, t1, "t1" + code)
    _assert_written_exactly(fused, written, t1)


def test_to_metatensor_says_no_channel_as_monais_readers_do():
    from monai.data import list_data_collate
    from monai.data.utils import is_no_channel
    from monai.transforms import EnsureChannelFirst

    vol = Volume(np.ones((4, 5, 6), np.float32), np.eye(4))
    mt = vol.to_metatensor()
    assert tuple(mt.shape) == (1, 4, 5, 6) and is_no_channel(mt.meta["original_channel_dim"])
    batch = list_data_collate([{"img": mt}, {"img": vol.to_metatensor()}])
    assert tuple(batch["img"].shape) == (2, 1, 4, 5, 6)
    # A redundant EnsureChannelFirst adds an axis, as after MONAI's LoadImage(ensure_channel_first=True): said so.
    with pytest.raises(InvalidInputError, match="channel axis was added"):
        Volume.from_metatensor(EnsureChannelFirst()(mt))


# ----------------------------------------------------------------------------- 6. layout of the fused tensor
def test_the_fused_tensor_is_channel_first_and_says_no_channel_for_3d_inputs_too():
    """Deliberate (docs/pipeline.md): the fused image is a network's input; MONAI's array transforms after it
    want channel-first. Its meta says "no channel" as MONAI's LoadImage(ensure_channel_first=True) does."""
    from monai.data.utils import is_no_channel

    mr, pet = _pair()
    out = FuseModalities(method="mean")([mr.to_metatensor()[0], pet.to_metatensor()[0]])
    assert tuple(out.shape) == (1, *mr.shape) and is_no_channel(out.meta["original_channel_dim"])


def test_fuse_modalitiesd_keys_are_checked_when_built():
    """One key was refused only at the first item, inside a DataLoader worker; the same key twice fused an image
    with itself without a word."""
    for keys in ("t1c", ["t1c"], ["t1c", "t1c"], ["a", "b", "c", "d"]):
        with pytest.raises(InvalidInputError, match="two or three different image keys"):
            FuseModalitiesd(keys=keys, method="mean")
    FuseModalitiesd(keys=["t1c", "t2f"], method="mean")  # and three, and missing keys allowed, still build
    FuseModalitiesd(keys=["t1c", "t2f", "pet"], method="mean", allow_missing_keys=True)
    # The modalities a subject may have, two or three of them present per item.
    FuseModalitiesd(keys=["t1c", "t2f", "pet", "ct"], method="mean", allow_missing_keys=True)


def test_a_nan_is_named_by_its_key_and_its_own_file(tmp_path):
    """A NaN in the second key was reported as "volume 2" with the first key's file."""
    a, b = _pair()
    medfuse.save(a, tmp_path / "t1c.nii.gz")
    bad = b.array.copy()
    bad[0, 0, 0] = np.nan
    medfuse.save(b.with_array(bad), tmp_path / "t2f.nii.gz")
    d = LoadVolumed(keys=["t1c", "t2f"])({"t1c": str(tmp_path / "t1c.nii.gz"), "t2f": str(tmp_path / "t2f.nii.gz")})
    with pytest.raises(InvalidInputError) as e:
        FuseModalitiesd(keys=["t1c", "t2f"], method="mean")(d)
    assert "'t2f' has 1 NaN or infinite values" in str(e.value)
    assert str(e.value.path).endswith("t2f.nii.gz") and "t1c.nii.gz" not in str(e.value)


def test_a_constant_input_is_fused_with_a_warning():
    """A blank placeholder for a missing modality fused silently into the other input at half contrast."""
    a, b = _pair()
    with pytest.warns(MedfuseWarning, match="volume 2 is constant \\(every voxel is 0 SUVbw\\): it holds no image, and "
                                            "the fusion shows the other inputs alone"):
        FuseModalities(method="mean")([a, b.with_array(np.zeros_like(b.array))])
    with pytest.warns(MedfuseWarning, match="volume 1 is constant"):
        medfuse.fuse(a.with_array(np.full_like(a.array, 3.0)), b, method="max")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        FuseModalities(method="mean")([a, b])  # two real images: no warning


def test_the_fused_tensor_keeps_the_references_loading_grid_and_history(tmp_path):
    """After Spacingd, the fused tensor's original_affine and spatial_shape were the resampled grid's, and its
    transform history empty: SaveImaged(resample=True) wrote it on that grid, not the file's, unlike MONAI's own
    ConcatItemsd, which keeps the first key's."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, SaveImaged, Spacingd

    rng = np.random.default_rng(7)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    vol = Volume(rng.random((20, 18, 14)).astype(np.float32) * 50, aff, modality="MR")
    medfuse.save(vol, tmp_path / "t1c.nii.gz")
    medfuse.save(vol.with_array(vol.array[::-1].copy()), tmp_path / "t2f.nii.gz")
    keys = ["t1c", "t2f"]
    pre = Compose([LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys), Spacingd(keys=keys, pixdim=(3, 3, 3)),
                   FuseModalitiesd(keys=keys, output_key="image", method="mean")])
    d = pre({k: str(tmp_path / f"{k}.nii.gz") for k in keys})
    image, ref = d["image"], d["t1c"]
    assert tuple(image.shape[1:]) == tuple(ref.shape[1:]) != (20, 18, 14)  # fused on the resampled grid
    np.testing.assert_allclose(np.asarray(image.meta["original_affine"]), np.asarray(ref.meta["original_affine"]))
    assert [int(x) for x in image.meta["spatial_shape"]] == [20, 18, 14]
    assert len(image.applied_operations) == len(ref.applied_operations) == 1  # the Spacingd, to invert
    SaveImaged(keys="image", output_dir=str(tmp_path / "out"), output_postfix="fused", separate_folder=False,
               resample=True, print_log=False)(d)
    back = medfuse.load(tmp_path / "out" / "t1c_fused.nii.gz")
    assert back.shape == (20, 18, 14)  # written back on the file's grid, as ConcatItemsd's output would be
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    # The header fields LoadImaged keeps as NumPy arrays come as tensors: the fused tensor still reloads with
    # torch.load(weights_only=True). (Its history is MONAI's, TraceKeys and all, as any of its tensors': cleared.)
    import torch

    image.applied_operations = []
    torch.save(image, tmp_path / "image.pt")
    again = torch.load(tmp_path / "image.pt", weights_only=True)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(image))
