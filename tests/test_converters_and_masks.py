"""Labels stored in converted images, evaluate's mask names, and the
loaders' size check against a legitimately highly compressed file."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from medfuse import Volume
from medfuse import evaluate as E
from medfuse.errors import InvalidInputError


# ---------------------------------------------------------------------- Volume.from_sitk / from_nibabel
def test_from_sitk_unknown_stored_unit_names_the_metadata_and_the_option():
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))
    img.SetMetaData("medfuse_unit", "SUV")  # a file saved before fields were checked
    with pytest.raises(InvalidInputError) as info:
        Volume.from_sitk(img)
    assert "medfuse_unit" in info.value.problem and "unit=" in info.value.fix
    assert Volume.from_sitk(img, unit="SUVbw").unit == "SUVbw"  # the fix it gives works
    img.SetMetaData("medfuse_unit", " ")  # an empty value is no unit, as before
    assert Volume.from_sitk(img).unit == "arbitrary"


def test_from_nibabel_unknown_stored_modality_names_the_descrip_and_the_option():
    nib = pytest.importorskip("nibabel")
    img = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), np.eye(4))
    img.header["descrip"] = b"medfuse modality=XR unit=HU"
    with pytest.raises(InvalidInputError) as info:
        Volume.from_nibabel(img)
    assert "descrip" in info.value.problem and "modality=" in info.value.fix
    v = Volume.from_nibabel(img, modality="CT")
    assert (v.modality, v.unit) == ("CT", "HU")


# ---------------------------------------------------------------------- evaluate's mask names
def _files(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for name in ("a", "b"):
        arr = np.zeros((20, 20, 12))
        arr[3:17, 3:17, 2:10] = 100 + 300 * rng.random((14, 14, 8))
        p = tmp_path / f"{name}.nii.gz"
        from medfuse.io import save

        save(Volume(arr, np.eye(4), modality="MR"), p)
        paths.append(str(p))
    return paths


def test_a_pairs_mask_auto_in_any_case_is_the_foreground_not_a_file(tmp_path):
    a, b = _files(tmp_path)
    items = E._volume_items([{"name": "s", "inputs": (a, b), "mask": "auto"}])
    assert "auto" not in items[0].inputs  # not guarded as an input file named 'auto'
    r = E.evaluate([{"name": "s", "inputs": (a, b), "mask": " AUTO"}], methods=["mean"], out_dir=tmp_path / "ev",
                   metrics=["EN", "SD"], save_outputs=False)
    assert not r.failures and r.rows[0]["mask"]["kind"] == "auto"


@pytest.mark.parametrize("where", ["evaluate", "pair"])
def test_an_empty_mask_name_is_refused_as_such(tmp_path, where):
    a, b = _files(tmp_path)
    source = [{"name": "s", "inputs": (a, b), "mask": ""}] if where == "pair" else [(a, b)]
    kw = {"mask": ""} if where == "evaluate" else {}
    with pytest.raises(InvalidInputError, match="empty name"):
        E.evaluate(source, methods=["mean"], out_dir=tmp_path / "ev", metrics=["EN"], save_outputs=False, **kw)
    assert not (tmp_path / "ev").exists()


# ---------------------------------------------------------------------- loaders' size check
def test_an_all_zero_mask_gzipped_at_the_highest_level_loads(tmp_path):
    """Zeros deflate at up to ~1030:1; the loaders' impossible-size bound (1100:1) must let them through."""
    nib = pytest.importorskip("nibabel")
    import medfuse

    img = nib.Nifti1Image(np.zeros((256, 256, 160), np.uint8), np.eye(4))
    p = tmp_path / "mask.nii.gz"
    p.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9))
    assert 256 * 256 * 160 / p.stat().st_size > 1000  # as compressible as deflate gets
    v = medfuse.load(p)
    assert v.shape == (256, 256, 160) and not v.array.any()


def test_an_analyze_pair_header_without_its_data_file_is_refused_typed(tmp_path):
    nib = pytest.importorskip("nibabel")
    import medfuse
    from medfuse.errors import UnreadableFileError

    nib.save(nib.Nifti1Pair(np.zeros((6, 5, 4), np.int16), np.eye(4)), tmp_path / "pet.img")
    (tmp_path / "pet.img").unlink()  # the header was copied without its data file
    with pytest.raises(UnreadableFileError) as info:
        medfuse.load(tmp_path / "pet.hdr")
    assert "pet.img" in info.value.problem and "missing" in info.value.problem
