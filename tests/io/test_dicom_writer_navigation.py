"""DICOM outputs as a navigation or planning system reads them: frame of reference, PET patient position, slice
spacing and the references to the series they were written into. Inputs are small synthetic DICOM series."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

import medfuse
from medfuse.cli import EXIT_USAGE, main
from medfuse.errors import InvalidInputError, MedfuseWarning
from medfuse.io.writers import save
from medfuse.registration import resample
from medfuse.registration.transforms import Transform
from medfuse.volume import Volume

NAME, MRN = "DOE^JANE", "MRN-4711"


def _files(folder: Path) -> list:
    return sorted(p for p in Path(folder).iterdir() if p.suffix == ".dcm")


def _first(folder: Path):
    return pydicom.dcmread(str(_files(folder)[0]), stop_before_pixels=True)


def _edit(folder: Path, **tags) -> None:
    """Set ``tags`` in every file of a series (a scanner's values in a synthetic series)."""
    for f in _files(folder):
        ds = pydicom.dcmread(str(f))
        for kw, value in tags.items():
            setattr(ds, kw, value)
        ds.save_as(str(f))


def _affine(spacing, origin=(-20.0, -15.0, -24.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _fixed(tmp_path: Path, *, position: str = "HFS", thickness: str = "6", spacing: float = 8.0) -> Path:
    """An MR series of a named patient: slices ``spacing`` mm apart, each ``thickness`` mm thick (a gap)."""
    rng = np.random.default_rng(0)
    mr = Volume(rng.uniform(0, 1000, (20, 16, 6)).astype(np.float32), _affine((2.0, 2.0, spacing)),
                modality="MR", unit="arbitrary")
    folder = save(mr, tmp_path / "mr")
    _edit(folder, PatientName=NAME, PatientID=MRN, PatientPosition=position, SliceThickness=thickness,
          SpacingBetweenSlices=f"{spacing:g}")
    return folder


def _pet(tmp_path: Path, template=None) -> Path:
    """A PET series: its own study and frame of reference, or (``template``) the fixed series' (a PET/CT)."""
    rng = np.random.default_rng(1)
    pet = Volume(rng.uniform(0, 20, (12, 10, 8)).astype(np.float32), _affine((3.5, 3.5, 5.0), (-19, -14, -23)),
                 modality="PT", unit="SUVbw")
    return save(pet, tmp_path / ("pet_same" if template else "pet"), template=template, deidentify=False)


def _identity() -> Transform:
    return Transform(sitk.Euler3DTransform())


def _on_fixed(pet: Path, mr: Path, transform=None) -> Volume:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)  # the frames' and the PET maximum's warnings
        return resample(medfuse.load(pet), medfuse.load(mr), transform=transform)


# ------------------------------------------------------------------------------------------- frame of reference
def test_an_unregistered_image_of_another_frame_is_not_written_into_the_fixed_frame(tmp_path):
    """With the identity kept, a PET of another session placed on the MR's grid with no registration went out with
    the MR's FrameOfReferenceUID: a navigation system took the misaligned PET as registered to the MR."""
    mr, pet = _fixed(tmp_path), _pet(tmp_path)
    src = _first(mr)
    assert _first(pet).FrameOfReferenceUID != src.FrameOfReferenceUID
    placed = _on_fixed(pet, mr)
    with pytest.raises(InvalidInputError, match="another DICOM frame of reference") as e:
        save(placed, tmp_path / "kept", template=mr, deidentify=False)
    assert "--transform" in str(e.value) and "--keep-identity" in str(e.value) and "DOE" not in str(e.value)
    assert not (tmp_path / "kept").exists()
    # De-identified: written as before (a pseudonymous frame).
    assert _first(save(placed, tmp_path / "anon", template=mr)).FrameOfReferenceUID != src.FrameOfReferenceUID
    # A transform puts it into the MR's frame: kept, as registration is meant to.
    moved = save(_on_fixed(pet, mr, _identity()), tmp_path / "moved", template=mr, deidentify=False)
    assert _first(moved).FrameOfReferenceUID == src.FrameOfReferenceUID
    # One frame of reference (a PET/CT): no transform needed.
    same = save(_on_fixed(_pet(tmp_path, template=mr), mr), tmp_path / "same", template=mr, deidentify=False)
    assert _first(same).FrameOfReferenceUID == src.FrameOfReferenceUID


def test_an_image_placed_across_frames_then_registered_is_written_into_the_fixed_frame(tmp_path):
    """resample() kept its 'different frames' warning through a later transform, so the writer refused an image
    that registration had put into the MR's frame."""
    mr, pet = _fixed(tmp_path), _pet(tmp_path)
    placed = _on_fixed(pet, mr)
    assert any("different DICOM frames of reference" in w for w in placed.provenance["warnings"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)
        moved = resample(placed, medfuse.load(mr), transform=_identity())
    assert not any("frames of reference" in w for w in moved.provenance.get("warnings", []))
    out = save(moved, tmp_path / "moved", template=_files(mr)[0], deidentify=False)
    assert _first(out).FrameOfReferenceUID == _first(mr).FrameOfReferenceUID
    # Placed as it lies once more, it is refused again.
    with pytest.raises(InvalidInputError, match="another DICOM frame of reference"):
        save(_on_fixed(pet, mr), tmp_path / "again", template=mr, deidentify=False)
    # A fusion with an unregistered input stays refused after a transform of the fused image: that does not
    # align its inputs with one another.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)
        fused = medfuse.fuse(medfuse.load(mr), placed, method="mean")
        fused_moved = resample(fused, medfuse.load(mr), transform=_identity())
    with pytest.raises(InvalidInputError, match="is a fusion with an input that comes from another DICOM frame"):
        save(fused_moved, tmp_path / "fused", template=mr, deidentify=False)
    assert not (tmp_path / "fused").exists()


def test_an_image_of_another_frame_never_resampled_is_refused_in_words_that_fit(tmp_path):
    """The PET written with the MR as template as it was loaded (never resampled): refused, without saying it was
    'placed on its grid'."""
    mr, pet = _fixed(tmp_path), _pet(tmp_path)
    with pytest.raises(InvalidInputError) as e:
        save(medfuse.load(pet), tmp_path / "out", template=mr, deidentify=False)
    text = str(e.value)
    assert "the image comes from another DICOM frame of reference" in text
    assert "no registration or transform placed it in that series' frame" in text and "placed on" not in text
    assert not (tmp_path / "out").exists()


def test_fusions_across_frames_are_refused_before_fusing_and_through_the_writer(tmp_path, monkeypatch):
    import medfuse.pipeline as P

    mr, pet = _fixed(tmp_path), _pet(tmp_path)
    calls = []
    real = P._fuse
    monkeypatch.setattr(P, "_fuse", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(InvalidInputError, match="input 2 comes from another DICOM frame of reference"):
        medfuse.fuse_files(mr, pet, tmp_path / "fused", method="mean", deidentify=False)
    assert not calls and not (tmp_path / "fused").exists()
    # A fused Volume made in Python keeps its inputs' warning: the writer refuses it too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)
        fused = medfuse.fuse(medfuse.load(mr), _on_fixed(pet, mr), method="mean")
    with pytest.raises(InvalidInputError, match="another DICOM frame of reference"):
        save(fused, tmp_path / "fused2", template=mr, deidentify=False)
    # Same frame: fused and filed into the MR's frame.
    res = medfuse.fuse_files(mr, _pet(tmp_path, template=mr), tmp_path / "fused3", method="mean", deidentify=False)
    assert calls and _first(res.output).FrameOfReferenceUID == _first(mr).FrameOfReferenceUID


def test_cli_resample_keep_identity_needs_a_transform_across_frames(tmp_path, capsys):
    mr, pet = _fixed(tmp_path), _pet(tmp_path)
    out = tmp_path / "out"
    assert main(["resample", str(mr), str(pet), "-o", str(out), "--keep-identity", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "another DICOM frame of reference" in err and "--keep-identity" in err and "DOE" not in err
    assert not out.exists()
    tfm = tmp_path / "identity.tfm"
    sitk.WriteTransform(sitk.Euler3DTransform(), str(tfm))
    assert main(["resample", str(mr), str(pet), "-o", str(out), "--transform", str(tfm), "--keep-identity",
                 "-q"]) == 0
    assert _first(out).FrameOfReferenceUID == _first(mr).FrameOfReferenceUID


# --------------------------------------------------------------------------------------- PET patient position
@pytest.mark.parametrize("position,modifier,first", [
    ("HFS", codes.cid20.Supine, codes.cid21.Headfirst),
    ("FFS", codes.cid20.Supine, codes.cid21.FeetFirst),
    ("HFP", codes.cid20.Prone, codes.cid21.Headfirst),
    ("FFDL", codes.cid20.LeftLateralDecubitus, codes.cid21.FeetFirst),
    ("HFDR", codes.cid20.RightLateralDecubitus, codes.cid21.Headfirst),
    ("LFP", codes.cid20.Prone, codes.cid21.LeftFirst),
])
def test_a_pet_carries_the_patient_position_as_codes(tmp_path, position, modifier, first):
    """A PET may not carry PatientPosition beside its PatientOrientationCodeSequence, and both code sequences were
    written empty: the PET said nothing of how the patient lay. Codes checked against pydicom's copy of PS3.16
    (CID 19, 20, 21)."""
    mr = _fixed(tmp_path, position=position)
    ds = _first(save(_on_fixed(_pet(tmp_path), mr, _identity()), tmp_path / "out", template=mr))
    assert "PatientPosition" not in ds
    (orientation,) = ds.PatientOrientationCodeSequence
    (mod,) = orientation.PatientOrientationModifierCodeSequence
    (gantry,) = ds.PatientGantryRelationshipCodeSequence
    for item, code in ((orientation, codes.cid19.Recumbent), (mod, modifier), (gantry, first)):
        assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == \
            (code.value, code.scheme_designator, code.meaning)
    assert medfuse.load(tmp_path / "out").unit == "SUVbw"


def test_a_pet_without_a_known_position_keeps_empty_codes(tmp_path):
    mr = _fixed(tmp_path, position="")
    ds = _first(save(_on_fixed(_pet(tmp_path), mr, _identity()), tmp_path / "out", template=mr))
    assert list(ds.PatientOrientationCodeSequence) == [] and list(ds.PatientGantryRelationshipCodeSequence) == []


# ------------------------------------------------------------------------------------------------ slice spacing
def test_on_the_template_grid_its_slice_thickness_and_spacing_are_kept_as_written(tmp_path):
    """A PET on the MR's grid said SliceThickness 7.99999980880457 where the MR said 8 (and lost its 6 mm thickness
    beside the 8 mm spacing)."""
    mr = _fixed(tmp_path)
    placed = _on_fixed(_pet(tmp_path), mr, _identity())
    out = save(placed, tmp_path / "out", template=mr)
    for f in _files(out):
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        assert (ds["SliceThickness"].value.original_string, ds["SpacingBetweenSlices"].value.original_string) == \
            ("6", "8")
    back = medfuse.load(out)
    np.testing.assert_allclose(back.affine, medfuse.load(mr).affine, atol=1e-4)


@pytest.mark.parametrize("one_file", [False, True])
def test_a_template_without_spacing_between_slices_keeps_its_thickness(tmp_path, one_file):
    """A CT without SpacingBetweenSlices, 8 mm slices every 4 mm: its thickness was taken for the step, the output
    never counted as on its slices, and 4/4 was written. The step is measured from the slice positions."""
    mr = _fixed(tmp_path, thickness="8", spacing=4.0)
    for f in _files(mr):
        ds = pydicom.dcmread(str(f))
        del ds.SpacingBetweenSlices
        ds.save_as(str(f))
    template = _files(mr)[0] if one_file else mr
    out = save(medfuse.load(mr), tmp_path / "out", template=template, deidentify=False)
    ds = _first(out)
    assert (ds["SliceThickness"].value.original_string, float(ds.SpacingBetweenSlices)) == ("8", 4.0)
    np.testing.assert_allclose(medfuse.load(out).affine, medfuse.load(mr).affine, atol=1e-4)
    # Every 2 mm in the same plane (through the template's slices): not its slices, the step as thickness.
    fine = Volume(np.zeros((20, 16, 11), np.float32), _affine((2.0, 2.0, 2.0)), modality="MR", unit="arbitrary")
    ds = _first(save(fine, tmp_path / "fine", template=mr))
    assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 2.0


@pytest.mark.parametrize("spacing,written", [(7.99999980880457, 8.0), (4 * np.cos(np.radians(15)), 3.863703)])
def test_off_the_template_grid_the_slice_spacing_is_rounded(tmp_path, spacing, written):
    """Noise from normalised orientation vectors (7.99999980880457 for 8) is rounded to 7 significant digits."""
    vol = Volume(np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3), _affine((1.0, 1.0, spacing)),
                 modality="MR", unit="arbitrary")
    out = save(vol, tmp_path / "out", template=_fixed(tmp_path))  # not the template's grid
    ds = _first(out)
    assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == written
    np.testing.assert_allclose(medfuse.load(out).affine, vol.affine, atol=1e-6)  # positions: full precision


# ----------------------------------------------------------------------------------- derivation and references
def _at_position(out: Path, mr: Path) -> set:
    """Check that each output slice's image reference names the MR instance at its position; the keywords used."""
    at = {}
    for f in _files(mr):
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        at[tuple(np.round(np.array(ds.ImagePositionPatient, float), 3))] = ds.SOPInstanceUID
    kws = set()
    for f in _files(out):
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        (kw,) = [k for k in ("SourceImageSequence", "ReferencedImageSequence") if k in ds]
        (ref,) = ds[kw].value
        assert ref.ReferencedSOPInstanceUID == at[tuple(np.round(np.array(ds.ImagePositionPatient, float), 3))]
        kws.add(kw)
    assert len(_files(out)) == len(at)
    return kws


def test_off_the_template_slices_every_slice_references_the_template_instance(tmp_path):
    mr = _fixed(tmp_path)
    tpl = _first(mr)
    vol = Volume(np.ones((4, 5, 3), np.float32), _affine((1.0, 1.0, 3.0)), modality="MR", unit="arbitrary")
    out = save(vol, tmp_path / "out", template=mr, deidentify=False)
    for f in _files(out):
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        assert [r.ReferencedSOPInstanceUID for r in ds.ReferencedImageSequence] == [tpl.SOPInstanceUID]
        assert [r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence] == \
            [tpl.SOPInstanceUID]


def test_kept_identity_references_the_template_series_and_de_identified_does_not(tmp_path):
    mr = _fixed(tmp_path)
    src_uids = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in _files(mr)}
    src = _first(mr)
    placed = _on_fixed(_pet(tmp_path), mr, _identity())
    kept = _first(save(placed, tmp_path / "kept", template=mr, deidentify=False))
    (series,) = kept.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    # On the MR's own slices: the series lists every MR instance, each output slice the one at its position.
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == src_uids
    assert {i.ReferencedSOPClassUID for i in series.ReferencedInstanceSequence} == {src.SOPClassUID}
    assert _at_position(tmp_path / "kept", mr) == {"ReferencedImageSequence"}
    # The PET was not made of the MR's voxels: the MR is a related image, not a source.
    assert "SourceImageSequence" not in kept
    assert kept.DerivationDescription == f"medfuse {medfuse.__version__}: resampled onto the reference grid with " \
                                         "transform Euler3DTransform (rigid)"
    # A fusion is made of the fixed series' voxels: its source.
    fused = _first(medfuse.fuse_files(mr, _pet(tmp_path, template=mr), tmp_path / "fused", method="mean",
                                      deidentify=False).output)
    assert _at_position(tmp_path / "fused", mr) == {"SourceImageSequence"}
    assert fused.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert "fused (mean) from 2 inputs" in fused.DerivationDescription
    # De-identified: no references (the pseudonymous UIDs name no series that exists), the description stays.
    anon = _first(save(placed, tmp_path / "anon", template=mr))
    for kw in ("ReferencedSeriesSequence", "SourceImageSequence", "ReferencedImageSequence"):
        assert kw not in anon
    assert anon.DerivationDescription == kept.DerivationDescription
    for ds in (kept, fused, anon):
        assert "DOE" not in ds.DerivationDescription and MRN not in ds.DerivationDescription
