"""4-D inputs in a MONAI pipeline: LoadVolume(d) picks a volume (a 4-D file was refused with "pass
volume_index=", which the transforms did not take), and a channel-first 4-D MetaTensor is not called
channel-last."""

import numpy as np
import pytest

pytest.importorskip("monai")

import medfuse  # noqa: E402
from medfuse.errors import InvalidInputError, MultipleSeriesError  # noqa: E402
from medfuse.transforms import LoadVolume, LoadVolumed  # noqa: E402


@pytest.fixture
def four_d(tmp_path):
    import nibabel as nib

    arr = np.stack([np.full((6, 7, 5), 10.0 * (k + 1), np.float32) for k in range(4)], axis=-1)
    path = tmp_path / "d4.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    return path


def test_load_volume_takes_a_volume_index(four_d, tmp_path):
    with pytest.raises(MultipleSeriesError, match="volume_index"):
        LoadVolume()(four_d)
    vol = LoadVolume(volume_index=2)(four_d)
    expected = medfuse.load(four_d, volume_index=2)
    np.testing.assert_array_equal(vol.array, expected.array)
    assert vol.provenance["volume_index"] == 2 and float(vol.array.max()) == 30.0
    out = LoadVolumed(keys=["a", "b"], volume_index={"a": -1, "b": 0})({"a": four_d, "b": four_d})
    assert float(out["a"].array.max()) == 40.0 and float(out["b"].array.max()) == 10.0
    assert "volume_index" in repr(LoadVolume(volume_index=1)) and "volume_index" not in repr(LoadVolume())


def test_volume_index_is_checked_when_built():
    with pytest.raises(InvalidInputError, match="volume_index"):
        LoadVolume(volume_index=True)
    with pytest.raises(InvalidInputError, match="volume_index names key"):
        LoadVolumed(keys=["a"], volume_index={"A": 0})


def test_a_channel_first_4d_metatensor_is_told_to_pick_a_channel(four_d):
    from monai.transforms import EnsureChannelFirst, LoadImage

    raw = LoadImage(image_only=True)(str(four_d))  # (6, 7, 5, 4): channel-last
    with pytest.raises(InvalidInputError, match="looks channel-last"):
        medfuse.Volume.from_metatensor(raw)
    first = EnsureChannelFirst()(raw)  # (4, 6, 7, 5); MONAI keeps original_channel_dim -1
    with pytest.raises(InvalidInputError) as ei:
        medfuse.Volume.from_metatensor(first)
    assert "channel-last" not in str(ei.value) and "holds 4 channels" in str(ei.value)
