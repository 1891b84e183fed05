"""One near-name hint ("did you mean ...?") wherever a name is chosen from a list: _checks.choice and
unknown_choice, and through them the registration kind, the metrics and the fusion method; and the order of the
fixes when a volume is scored without mode=.

Found teaching with the Python API: evaluate(methods=["lapacian"]) named 'laplacian', but fuse, metrics.score and
register only listed the choices.
"""

from __future__ import annotations

import numpy as np
import pytest

import medfuse
from medfuse import Volume, _checks
from medfuse.errors import InvalidInputError
from medfuse.metrics import score


def test_choice_names_the_near_choice_of_a_typo():
    with pytest.raises(InvalidInputError) as err:
        _checks.choice("rigd", "registration kind", ("rigid", "affine", "bspline"))
    assert str(err.value).startswith("unknown registration kind 'rigd'; did you mean 'rigid'?")
    assert err.value.fix == "use one of rigid, affine, bspline"
    # None among the choices is no word to suggest; a word near none gets no guess.
    with pytest.raises(InvalidInputError) as err:
        _checks.choice("brian", "CT window", (None, "brain", "bone"))
    assert "did you mean 'brain'?" in str(err.value) and "use one of None, brain, bone" in err.value.fix
    with pytest.raises(InvalidInputError) as err:
        _checks.choice("xyz", "kind", ("rigid", "affine"))
    assert "did you mean" not in str(err.value)


def test_unknown_choice_is_the_error_choice_raises():
    e = _checks.unknown_choice("Laplacain", "fusion method", ["mean", "laplacian"], fix="pick one")
    assert isinstance(e, InvalidInputError)
    assert e.problem == "unknown fusion method 'Laplacain'; did you mean 'laplacian'?" and e.fix == "pick one"
    path = _checks.unknown_choice("/data/DOE^JOHN/laplacian", "fusion method", ["laplacian"])
    assert "DOE" not in str(path) and "did you mean" not in str(path)


def test_register_kind_typo_names_the_near_kind():
    vol = Volume(np.random.default_rng(0).random((24, 24, 24)).astype(np.float32), np.eye(4))
    with pytest.raises(InvalidInputError, match=r"unknown registration kind 'rigd'; did you mean 'rigid'\?"):
        medfuse.register(vol, vol, kind="rigd")


@pytest.mark.parametrize("name,near", [("Qab", "Qabf"), ("SSMI", "SSIM"), ("ms_ssim", "MS-SSIM"), ("psrn", "PSNR")])
def test_a_misspelt_metric_names_the_near_one(name, near):
    img = np.random.default_rng(1).integers(0, 256, (32, 32)).astype(np.float64)
    with pytest.raises(InvalidInputError) as err:
        score(img, img, img, metrics=[name])
    assert str(err.value).startswith(f"unknown metric '{name}'; did you mean '{near}'?")


def test_scoring_a_volume_without_mode_first_says_how_to_score_volumes():
    vol = np.random.default_rng(2).integers(0, 256, (20, 20, 20)).astype(np.float64)
    with pytest.raises(InvalidInputError, match="expected 2-D images") as err:
        score(vol, vol, vol)
    assert err.value.fix.startswith("score volumes with mode='slicewise'")
    assert err.value.fix.index("mode='native'") < err.value.fix.index("rgb_to_gray")  # RGB comes after
    from medfuse.metrics import sf

    with pytest.raises(InvalidInputError) as err:
        sf(vol)
    assert err.value.fix.startswith("score volumes with score(..., mode='slicewise')")
