"""An RT dose (unit Gy) opens in napari as a dose wash over the anatomy: medfuse.display's colour map (magma, one
of the plugin's colour-blind-safe maps, black at 0 Gy) and contrast 0 Gy .. its largest dose, blended additively.

Before: a dose opened grey, with percentile contrast and as an opaque base layer that hid the CT below it.
"""

import numpy as np
import pytest

pytest.importorskip("napari")

from medfuse.display import DOSE_COLORMAP  # noqa: E402
from medfuse.volume import Volume  # noqa: E402
from medfuse_napari import napari_get_reader  # noqa: E402
from medfuse_napari._layers import volume_to_layer  # noqa: E402
from medfuse_napari._overlay import CVD_SAFE  # noqa: E402

pytestmark = pytest.mark.napari


def _dose() -> Volume:
    d = np.zeros((12, 10, 8), np.float32)
    d[2:10, 2:8, 2:6] = 50.0
    d[5, 5, 3] = 54.5  # the hot spot: the top of the contrast
    return Volume(d, np.diag([2.0, 2.5, 3.0, 1.0]), modality="unknown", unit="Gy")


def test_dose_layer_is_a_colour_blind_safe_wash_from_0_gy_to_its_largest_dose():
    from napari.utils.colormaps import ensure_colormap

    _, kwargs, kind = volume_to_layer(_dose(), name="dose")  # overlay not asked for: a dose is one anyway
    assert kind == "image"
    assert kwargs["colormap"] == DOSE_COLORMAP and DOSE_COLORMAP in CVD_SAFE
    assert kwargs["contrast_limits"] == [0.0, 54.5]
    assert (kwargs["blending"], kwargs["opacity"]) == ("additive", 0.6)
    # Black at 0 Gy (within 4 of 255 levels): under additive blending the CT outside the beams stays as it is.
    assert np.allclose(ensure_colormap(DOSE_COLORMAP).colors[0][:3], 0.0, atol=4 / 255)
    assert kwargs["metadata"]["medfuse"]["unit"] == "Gy"


def test_reader_opens_a_saved_dose_as_a_wash(tmp_path):
    import medfuse

    path = tmp_path / "dose.nii.gz"
    medfuse.save(_dose(), path)
    layers = napari_get_reader(str(path))(str(path))
    (_, kwargs, _), = layers
    assert kwargs["colormap"] == DOSE_COLORMAP and kwargs["contrast_limits"] == [0.0, 54.5]
    assert kwargs["blending"] == "additive"
