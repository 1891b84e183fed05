"""MONAI transforms check their settings when built and their inputs when called (found by a probe).

A typo used to pass the constructor and fail at the first item, inside a DataLoader worker; a fallback typo only
on the day the network could not run; ``as_tensor="no"`` meant yes.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("monai")

from medfuse import Volume  # noqa: E402
from medfuse.errors import InvalidInputError  # noqa: E402
from medfuse.transforms import (FuseModalities, FuseModalitiesd, LoadVolume, LoadVolumed,  # noqa: E402
                                RegisterToReference, RegisterToReferenced)

PATIENT = "/data/DOE^JOHN/scan.nii"


def _vol(seed: int = 0) -> Volume:
    return Volume(np.random.default_rng(seed).random((16, 16, 16)).astype(np.float32), np.eye(4), modality="MR")


@pytest.mark.parametrize("build, says", [
    (lambda: RegisterToReference(kind="bogus"), "unknown registration kind 'bogus'"),
    (lambda: RegisterToReferenced(keys=["pet"], reference_key="mr", kind="rigd"), "unknown registration kind"),
    (lambda: FuseModalities(method="bogus"), "unknown fusion method 'bogus'"),
    (lambda: FuseModalities(method=PATIENT), "unknown fusion method (a str of"),
    (lambda: FuseModalities(device="gpu"), "unknown device 'gpu'"),
    (lambda: FuseModalities(normalise="bogus"), "unknown normalisation 'bogus'"),
    (lambda: FuseModalities(fallback="bogus"), "unknown fallback method 'bogus'"),
    # The network as its own fallback reran it with the shipped weights in place of the caller's file.
    (lambda: FuseModalitiesd(keys=["a", "b"], fallback="network"), "unknown fallback method 'network'"),
    (lambda: LoadVolume(as_tensor="no"), "as_tensor must be True or False"),
    (lambda: LoadVolumed(keys=["a"], as_tensor="false"), "as_tensor must be True or False"),
    (lambda: FuseModalities(as_tensor="false"), "as_tensor must be True or False"),
    (lambda: FuseModalities(resample="yes"), "resample must be True or False"),
    (lambda: LoadVolume(modality="XX"), "unknown modality 'XX'"),
    (lambda: LoadVolumed(keys=["a"], modality={"a": 3}), "modality of 'a' must be a modality name"),
    # "" stored the report under the image's own key: the registered image became a dict (or None).
    (lambda: RegisterToReferenced(keys=["pet"], reference_key="mr", report_postfix=""), "report_postfix"),
    (lambda: RegisterToReferenced(keys=["pet"], reference_key=["mr"]), "reference_key must be one key"),
    (lambda: FuseModalitiesd(keys=["a", "b"], output_key=None), "output_key must be one key"),
    (lambda: FuseModalitiesd(keys=["a", "b"], output_key=["x"]), "output_key must be one key"),
])
def test_a_wrong_setting_fails_when_the_transform_is_built(build, says):
    with pytest.raises(InvalidInputError) as ei:
        build()
    assert says in str(ei.value) and ei.value.fix and "DOE" not in str(ei.value)


@pytest.mark.parametrize("images", [None, 3, "SECRET", "GEN"], ids=["None", "int", "path", "generator"])
def test_fuse_modalities_called_with_no_list_is_a_typed_error(images):
    v = _vol()
    images = {"SECRET": PATIENT, "GEN": (x for x in [v, v])}.get(images, images)
    with pytest.raises(InvalidInputError, match="fusion needs a list of two or three images") as ei:
        FuseModalities(method="max")(images)
    assert "DOE" not in str(ei.value)


def test_settings_in_any_letter_case_and_a_modality_override_of_a_loaded_volume():
    v = _vol()
    assert LoadVolume(modality="CT")(v).modality == "CT" and v.modality == "MR"  # it was ignored for a Volume
    assert LoadVolume(modality="PET").modality == "PT"
    assert FuseModalities(method="MAX", fallback="Mean").method == "max"
    assert tuple(FuseModalities(method="max")([v, _vol(1)]).shape) == (1, 16, 16, 16)
    assert LoadVolume(as_tensor=np.True_).as_tensor is True


def test_register_to_referenced_skips_an_item_with_none_of_its_keys_when_missing_keys_are_allowed():
    t = RegisterToReferenced(keys=["pet"], reference_key="mr", allow_missing_keys=True)
    assert t({"label": 1}) == {"label": 1}
    with pytest.raises(InvalidInputError, match="reference key 'mr' is not in the data"):
        t({"pet": _vol()})  # a moving image without its reference is still an error


@pytest.mark.parametrize("options, says", [
    (dict(batch_size=0), "batch_size must be a whole number of slices of 1 or more, got 0"),
    (dict(batch_size=2.5), "batch_size must be a whole number"),
    (dict(functional="yes"), "functional must be True, False or None"),
    (dict(mode="bogus"), "unknown mode 'bogus'"),
    (dict(refine=3), "refine must be True or False"),
])
def test_the_network_options_values_are_checked_when_the_transform_is_built(options, says):
    """Only their names were: each of these built, then failed at the first item, inside a DataLoader worker."""
    for build in (lambda: FuseModalitiesd(keys=["a", "b"], **options), lambda: FuseModalities(**options)):
        with pytest.raises(InvalidInputError, match=says):
            build()
    FuseModalitiesd(keys=["a", "b"], batch_size=4, functional=True, mode="3d", refine=False)  # good values build


def test_refine_is_refused_on_volumes_as_on_slices():
    """refine=3 was refused on 2-D images and taken without a word on 3-D ones (where the head never runs)."""
    import medfuse

    volume = np.random.default_rng(0).random((32, 32, 32))
    with pytest.raises(InvalidInputError, match="refine must be True or False"):
        medfuse.fuse(volume, volume, refine=3)
