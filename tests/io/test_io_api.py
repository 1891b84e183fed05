"""The loaders' and writers' public API as a notebook meets it: wrong types and values get a typed error with a fix.

Before this review a wrong path type reached pathlib (``TypeError: expected str, bytes or os.PathLike object``),
``suv=5`` on a NIfTI was accepted silently, ``volume_index="a"`` raised ``'<=' not supported``, ``overwrite="no"``
overwrote (a non-empty string is true), and ``load("")`` searched the working folder for DICOM files.
Docstrings (Args matching the signature, Returns, Raises) are checked in ``tests/test_api_surface.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medfuse
from medfuse import Volume
from medfuse import harvard, phantom
from medfuse.errors import InvalidInputError, MedfuseError, UnreadableFileError
from medfuse.io import SUV_CHOICES, dicom, dicom_writer, nifti, suv, writers

SAMPLES = Path(__file__).resolve().parents[2] / "sample_volumes"
NII = SAMPLES / "mr_t1.nii.gz"
PET = SAMPLES / "pet"


def _vol() -> Volume:
    return Volume(np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.diag([2.0, 2.0, 3.0, 1.0]), modality="MR")


def _not_paths():
    """Values that are not paths, each a mistake seen in notebooks (a Volume: loading what is loaded already)."""
    torch = pytest.importorskip("torch")
    return {"None": None, "list": [str(NII)], "int": 5, "tensor": torch.zeros(3), "array": np.zeros(3),
            "Volume": _vol(), "bytes": bytes(str(NII), "ascii")}


def _path_calls(tmp_path):
    v = _vol()
    return {
        "load": medfuse.load,
        "load_volumes": medfuse.load_volumes,
        "scan": medfuse.scan,
        "select_series": lambda x: medfuse.select_series(x, "1"),
        "save(vol, x)": lambda x: medfuse.save(v, x),
        "check_save_target": writers.check_save_target,
        "write_dicom_series(vol, x)": lambda x: dicom_writer.write_dicom_series(v, x),
        "nifti.load_image": nifti.load_image,
        "nifti.load_image_volumes": nifti.load_image_volumes,
        "dicom.load_dicom": dicom.load_dicom,
        "dicom.load_dicom_volumes": dicom.load_dicom_volumes,
        "dicom.scan": dicom.scan,
        "is_image_file": medfuse.io.is_image_file,
        "check_readable": medfuse.io.check_readable,
        "harvard.list_pairs": harvard.list_pairs,
        "harvard.load_png": harvard.load_png,
        "harvard.case_id": harvard.case_id,
        "phantom.write_samples": phantom.write_samples,
        "phantom.load_samples": lambda x: phantom.load_samples(x) if x is not None else phantom.load_samples([]),
        "phantom.load_ground_truth": lambda x: phantom.load_ground_truth(x) if x is not None
        else phantom.load_ground_truth(7),
    }


@pytest.mark.parametrize("call", list(_path_calls(None)))
def test_a_path_of_the_wrong_type_gets_a_typed_error_with_a_fix(call, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the working folder is empty and must stay so
    fn = _path_calls(tmp_path)[call]
    for label, bad in _not_paths().items():
        with pytest.raises(InvalidInputError, match="path|folder|filename|name|root") as info:
            fn(bad)
        assert info.value.fix, f"{call} with a {label}: no fix"
    assert list(tmp_path.iterdir()) == []


def test_the_fix_fits_the_mistake():
    """A Volume is loaded already; a list wants one path at a time; an array wants medfuse.Volume."""
    with pytest.raises(InvalidInputError, match="got a medfuse Volume") as info:
        medfuse.load(_vol())
    assert "loaded already" in info.value.fix
    with pytest.raises(InvalidInputError) as info:
        medfuse.load([NII, NII])
    assert "one path at a time" in info.value.fix
    with pytest.raises(InvalidInputError, match=r"ndarray of shape \(4, 4\)") as info:
        medfuse.load(np.zeros((4, 4)))
    assert "medfuse.Volume(array, affine)" in info.value.fix
    with pytest.raises(InvalidInputError) as info:
        medfuse.save(str(NII), _vol())  # arguments swapped
    assert "save(volume, path)" in info.value.fix


def test_an_empty_path_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch):
    """``Path("")`` is ``"."``: ``load("")`` used to read the working folder as a DICOM folder."""
    monkeypatch.chdir(SAMPLES / "pet")  # a DICOM folder: "" used to load it
    for fn in (medfuse.load, medfuse.load_volumes, medfuse.scan):
        with pytest.raises(InvalidInputError, match="empty"):
            fn("")
    assert medfuse.io.is_image_file("") is False  # a name test: an empty name is no image name


def test_suv_accepts_its_choices_only_and_names_them():
    """``suv=`` is checked for every input, NIfTI included (it was ignored there, whatever it was)."""
    ref = np.asanyarray(nib.load(NII).dataobj)  # nibabel is the reference for the voxels
    for choice in SUV_CHOICES:
        got = medfuse.load(NII, suv=choice)
        np.testing.assert_array_equal(got.array, ref)
    for bad in (5, None, "BW", "suvbw", "bw ", ["bw"], np.array(["bw"])):
        for fn in (medfuse.load, medfuse.load_volumes, dicom.load_dicom_volumes):
            with pytest.raises(InvalidInputError, match="suv must be one of 'auto', 'bw', 'lbm', 'lbm_janma', "
                                                        "'bsa', 'none'") as info:
                fn(NII if fn is not dicom.load_dicom_volumes else PET, suv=bad)
            assert info.value.fix


def test_volume_index_must_be_a_whole_number():
    ref = np.asanyarray(nib.load(NII).dataobj)
    for ok in (0, -1, np.int64(0)):
        np.testing.assert_array_equal(medfuse.load(NII, volume_index=ok).array, ref)
    for bad in ("a", "0", 0.0, True, [0], np.zeros(2), _vol()):
        for path in (NII, PET):
            with pytest.raises(InvalidInputError, match="volume_index must be a whole number") as info:
                medfuse.load(path, volume_index=bad)
            assert info.value.fix


def test_series_choice_modality_and_unit_types(tmp_path):
    """A number is a series' number as ``scan`` lists it; other types are refused before any header is read."""
    first = medfuse.load(PET, series_uid="1")
    np.testing.assert_array_equal(medfuse.load(PET, series_uid=1).array, first.array)
    assert medfuse.select_series(PET, 1) == medfuse.scan(PET)[0].series_uid
    # A folder that is not there is missing, as load and scan say (it was "this is a file", an InvalidInputError).
    with pytest.raises(UnreadableFileError, match="no such file or folder"):
        medfuse.select_series(tmp_path / "nope", "1")
    for bad in ([1], np.zeros(2), 1.5, True):
        with pytest.raises(InvalidInputError, match="series_uid must be text or a series number"):
            medfuse.load(PET, series_uid=bad)
    with pytest.raises(InvalidInputError, match="unit must be text"):
        medfuse.load(PET, unit=np.zeros(2))  # was NumPy's "truth value of an array is ambiguous"
    with pytest.raises(InvalidInputError, match="modality must be text"):
        medfuse.load(NII, modality=["MR"])


def test_yes_no_options_must_be_bools(tmp_path):
    """``overwrite="no"`` is a true value in Python and replaced the file; now nothing is written."""
    out = tmp_path / "out.nii.gz"
    medfuse.save(_vol(), out)
    before = out.read_bytes()
    for bad in ("no", "False", 0.0, None, [], _vol()):
        with pytest.raises(InvalidInputError, match="overwrite must be True or False"):
            medfuse.save(_vol().with_array(np.zeros((4, 4, 4), np.float32)), out, overwrite=bad)
        with pytest.raises(InvalidInputError, match="overwrite must be True or False"):
            writers.check_save_target(out, overwrite=bad)
    assert out.read_bytes() == before
    medfuse.save(_vol(), out, overwrite=np.bool_(True))  # NumPy's bool is a bool
    with pytest.raises(InvalidInputError, match="whole_series must be True or False"):
        medfuse.load(PET / "IM00001.dcm", whole_series="yes")
    with pytest.raises(InvalidInputError, match="deidentify must be True or False"):
        medfuse.save(_vol(), tmp_path / "series", deidentify="no")
    with pytest.raises(InvalidInputError, match="lesion must be True or False"):
        phantom.make_phantom(lesion="no")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_save_options_of_the_wrong_type(tmp_path):
    v = _vol()
    for bad in (5, ["nifti"], b"nifti"):
        with pytest.raises(InvalidInputError, match="format must be text"):
            medfuse.save(v, tmp_path / "a.nii.gz", format=bad)
    with pytest.raises(InvalidInputError, match="series_description must be text"):
        medfuse.save(v, tmp_path / "series", series_description=5)
    for bad in (v, 5, [str(PET)]):
        with pytest.raises(InvalidInputError, match="template must be a pydicom Dataset or the path"):
            medfuse.save(v, tmp_path / "series", template=bad)
    assert list(tmp_path.iterdir()) == []


def test_check_save_target_takes_a_list_of_inputs(tmp_path, monkeypatch):
    """One path as ``inputs`` was read letter by letter; its "." made any output in the working folder "the
    volume's own source"."""
    monkeypatch.chdir(tmp_path)
    assert writers.check_save_target("out.nii.gz", inputs=[str(NII)]) == tmp_path.joinpath("out.nii.gz").relative_to(
        tmp_path)
    with pytest.raises(InvalidInputError, match="inputs takes a list of paths"):
        writers.check_save_target("out.nii.gz", inputs=str(NII))
    with pytest.raises(MedfuseError, match="own source"):  # a real input is still refused
        writers.check_save_target(NII, inputs=[str(NII)], overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_suv_functions_take_header_dicts():
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.dcmread(next(iter(sorted(PET.iterdir()))), stop_before_pixels=True)
    h = suv.header_from_dataset(ds)
    # The reference: the sample PET's weight and dose, as pydicom reads them (weight x 1000 / decayed dose).
    assert h["PatientWeight"] == pytest.approx(float(ds.PatientWeight))
    assert suv.suv_factor(h) == pytest.approx(suv.series_suv_factors([h])[0])
    for fn, bad in ((suv.header_from_dataset, str(PET)), (suv.header_from_dataset, h), (suv.suv_factor, None),
                    (suv.suv_factor, [h]), (suv.series_suv_factors, h), (suv.series_suv_factors, "abc"),
                    (suv.series_suv_factors, [ds]), (suv.check_header, None), (suv.stored_unit, ds),
                    (suv.factor_source, None), (suv.suv_problem, 5)):
        with pytest.raises(InvalidInputError) as info:
            fn(bad)
        assert info.value.fix


def test_nifti_helpers_refuse_wrong_types():
    assert nifti.parse_tag(nifti.format_tag("PT", "SUVbw")) == ("PT", "SUVbw")
    for call in (lambda: nifti.format_tag(5, "HU"), lambda: nifti.parse_tag(b"medfuse modality=PT unit=SUVbw"),
                 lambda: nifti.nifti_space_code(None), lambda: nifti.nifti_space_code(str(NII))):
        with pytest.raises(InvalidInputError):
            call()


def test_dicom_writer_helpers_do_not_take_a_volume_for_a_slice():
    v = _vol()
    with pytest.raises(InvalidInputError, match="one slice"):
        dicom_writer.quantise_slice(v, exact_int=False)
    with pytest.raises(InvalidInputError, match="3-D"):
        dicom_writer.series_slopes(v.array[:, :, 0], signed=False)
    # A Volume's voxels are what NumPy reads of it: the same slopes as its array's.
    assert dicom_writer.series_slopes(v, signed=False) == dicom_writer.series_slopes(v.array, signed=False)


def test_lesion_contrast_keeps_a_volume_with_its_own_geometry():
    """NumPy reads a Volume as its voxels: given with another affine, the lesion would be measured elsewhere."""
    ph = phantom.make_phantom(noise=False, misalign={"pet": None})  # the lesion centre is in MR space
    pet, c, r = ph.pet, ph.lesion_center, ph.lesion_radius_mm
    got = phantom.lesion_contrast(pet, pet.affine, c, r)
    assert got == phantom.lesion_contrast(pet.array, pet.affine, c, r) and got > 0  # a hot lesion shows
    with pytest.raises(InvalidInputError, match="affine differs"):
        phantom.lesion_contrast(pet, ph.t1.affine, c, r)
    for bad in (lambda: phantom.lesion_contrast(pet.array, pet.affine[:3], c, r),
                lambda: phantom.lesion_contrast(pet.array, pet.affine, c[:2], r),
                lambda: phantom.lesion_contrast(pet.array, pet.affine, c, "12"),
                lambda: phantom.lesion_contrast(pet.array, pet.affine, c, -1.0),
                lambda: phantom.rigid_matrix((0, 0), (0, 0, 0)),
                lambda: phantom.rigid_matrix((0, 0, 0), "abc"),
                lambda: phantom.rigid_matrix((0, 0, 0), (0, 0, 0), center=None)):
        with pytest.raises(InvalidInputError):
            bad()


def test_write_samples_refuses_bad_options_before_making_the_folder(tmp_path):
    for kw in ({"seed": "a"}, {"seed": -1}, {"seed": True}, {"overwrite": "no"}):
        with pytest.raises(InvalidInputError):
            phantom.write_samples(tmp_path / "samples", **kw)
    assert list(tmp_path.iterdir()) == []  # the folder was made before the seed was looked at


def _pairs(tmp_path):
    from PIL import Image

    for ptype, mod in (("CT-MRI", "CT"), ("PET-MRI", "PET")):
        for folder in ("MRI", mod):
            (tmp_path / ptype / folder).mkdir(parents=True)
            for case in range(1, 6):
                Image.fromarray(np.full((4, 4), case, np.uint8)).save(tmp_path / ptype / folder / f"{case}010.png")
    return harvard.list_pairs(tmp_path)


def test_harvard_options_of_the_wrong_type(tmp_path):
    pairs = _pairs(tmp_path)
    assert len(pairs) == 10
    # A list of names filters; a bare name used to be read letter by letter ("no image pairs found").
    assert {p.pair_type for p in harvard.list_pairs(tmp_path, pair_types=["CT-MRI"])} == {"CT-MRI"}
    with pytest.raises(InvalidInputError, match="pair_types takes a list"):
        harvard.list_pairs(tmp_path, pair_types="CT-MRI")
    for split in (harvard.split_by_case, harvard.training_split):
        train, val = split(pairs, val_fraction=0.4, seed=0)
        # By case, never by slice (training_split: within each pair type).
        assert not {(p.pair_type, p.case) for p in train} & {(p.pair_type, p.case) for p in val}
        assert len(train) + len(val) == 10 and val
        with pytest.raises(InvalidInputError, match="list of HarvardPair"):
            split(str(tmp_path))  # a folder: was split character by character
        for kw in ({"seed": "a"}, {"seed": None}, {"seed": 1.5}, {"val_fraction": "0.2"}, {"val_fraction": 1.0}):
            with pytest.raises(InvalidInputError):
                split(pairs, **kw)
    by_type = {t: [(p.mri, p.other) for p in pairs if p.pair_type == t] for t in ("CT-MRI", "PET-MRI")}
    with pytest.raises(InvalidInputError, match="seed must be a whole number"):
        harvard.split_cases(by_type, seed=None)  # was seeded by the text "None-CT-MRI", silently
    with pytest.raises(InvalidInputError, match="split_cases takes"):
        harvard.split_cases(pairs)
    with pytest.raises(InvalidInputError, match="takes a HarvardPair"):
        harvard.load_pair(str(pairs[0].mri))
    mri, other = harvard.load_pair(pairs[0])
    assert mri.dtype == np.uint8 and (mri == 1).all() and (other == 1).all()


def test_every_wrong_type_error_is_a_medfuse_error_not_a_library_one():
    """The catch-all a notebook relies on: ``except medfuse.MedfuseError`` (or ValueError) catches all of these."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the way to the refusal
        for call in (lambda: medfuse.load(None), lambda: medfuse.load(NII, suv=5),
                     lambda: medfuse.load(NII, volume_index="a"), lambda: medfuse.save(_vol(), None)):
            with pytest.raises(MedfuseError):
                call()
            with pytest.raises(ValueError):  # InvalidInputError is a ValueError too
                call()
