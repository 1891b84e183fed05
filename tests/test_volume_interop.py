"""Volume as a nibabel, SimpleITK or MONAI user meets it: fields set after construction, slicing, reorienting,
modality and unit through the bridges, the wrong object given to a bridge. Expected geometry comes from the
libraries themselves (SimpleITK's slicing and DICOMOrient, nibabel's as_closest_canonical), never from medfuse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

import medfuse
from medfuse.errors import GeometryError, InvalidInputError, MedfuseWarning
from medfuse.volume import Volume, affine_from_geometry

#: Oblique, left-handed (as a NIfTI LAS file is in LPS), anisotropic.
OBLIQUE = affine_from_geometry((0.7, 1.3, 3.0), (12.5, -40.0, 77.0),
                               Rotation.from_euler("zyx", [25, -10, 40], degrees=True).as_matrix()
                               @ np.diag([-1.0, 1.0, 1.0]))


def _vol(**kw) -> Volume:
    return Volume(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), OBLIQUE, **kw)


# ----------------------------------------------------------------------------- fields set after construction
def test_fields_set_after_construction_are_checked(tmp_path):
    """``v.unit = "SUV"`` was accepted; medfuse.save then wrote a file that medfuse.load refused."""
    v = _vol(modality="PT", unit="SUVbw")
    with pytest.raises(InvalidInputError, match="'SUVbw'"):
        v.unit = "SUV"
    with pytest.raises(GeometryError, match="singular"):
        v.affine = np.diag([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(InvalidInputError, match="3-D"):
        v.array = np.zeros((4, 4))
    assert v.unit == "SUVbw" and np.array_equal(v.affine, OBLIQUE) and v.shape == (6, 7, 8)
    v.unit, v.modality = "arbitrary", "PET"  # the constructor's aliases and copies apply too
    m = np.eye(4)
    v.affine = m
    m[0, 0] = 5.0
    assert v.modality == "PT" and v.spacing == (1.0, 1.0, 1.0)
    v.provenance = {"series_uid": "1.2", "PatientName": "Doe^Jane"}
    assert v.provenance == {"series_uid": "1.2"}
    back = medfuse.load(medfuse.save(v, tmp_path / "v.nii.gz"))
    assert (back.modality, back.unit) == ("PT", "arbitrary")


def test_provenance_must_be_a_mapping():
    with pytest.raises(InvalidInputError, match="provenance must be a dict, got list"):
        Volume(np.zeros((2, 2, 2)), np.eye(4), provenance=["source", "x"])


# ----------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("index", [
    np.s_[1:5, ::-1, 7:0:-3], np.s_[-4:], np.s_[..., ::2], np.s_[2:3, 1:-1], np.s_[::-2, ..., 3:],
], ids=["crop-flip-stride", "negative-start", "ellipsis-stride", "one-voxel-slab", "flip-ellipsis"])
def test_slicing_moves_the_affine_as_simpleitk_does(index):
    """``vol[...]`` keeps every kept voxel at its world point: the same voxels and affine as SimpleITK's own
    slicing of the same image. (Not nibabel's ``img.slicer``: it shifts the origin by ``slice.start or 0``, which
    is wrong for negative starts and steps; ``[::-1]`` leaves the origin at the old first voxel.)"""
    v = _vol(modality="CT", unit="HU")
    expected = Volume.from_sitk(v.to_sitk()[index])
    got = v[index]
    assert np.array_equal(got.array, expected.array)
    assert float(np.max(np.abs(got.affine - expected.affine))) < 1e-9
    assert (got.modality, got.unit) == ("CT", "HU")
    # and, index by index, the world point of the original voxel
    idx = np.stack([axis[index] for axis in np.indices(v.shape)], axis=-1).reshape(-1, 3)
    sub = np.stack(list(np.indices(got.shape)), axis=-1).reshape(-1, 3)
    assert np.allclose(got.index_to_world(sub), v.index_to_world(idx), atol=1e-9)


@pytest.mark.parametrize("index,words", [
    (5, "vol\\[5:6\\]"), (np.s_[:, 3], "int on axis 1"), (np.zeros((6, 7, 8), bool), "ndarray"),
    (np.s_[9:], "no voxel along axis 0"), (np.s_[::0], "step"), (np.s_[:, :, :, :], "3 axes"),
    (np.s_[..., 1:, ...], "single ellipsis"),
])
def test_indexes_a_grid_cannot_follow_are_refused(index, words):
    with pytest.raises(InvalidInputError, match=words):
        _vol()[index]


def test_a_volume_is_not_iterable():
    """With ``__getitem__`` defined, ``for plane in vol`` would index with integers; it says so instead."""
    with pytest.raises(TypeError, match="not iterable"):
        iter(_vol())


# ----------------------------------------------------------------------------- reorienting
@pytest.mark.parametrize("code", ["RAS", "LPS", "PIR", "SLA"])
def test_reorient_matches_simpleitk_dicomorient(code):
    """Permute/flip only, as SimpleITK's DICOMOrient does it, on an oblique left-handed grid."""
    v = _vol(modality="MR")
    got = v.reorient(code)
    expected = Volume.from_sitk(sitk.DICOMOrient(v.to_sitk(), code))
    assert got.orientation == code
    assert np.array_equal(got.array, expected.array)
    assert float(np.max(np.abs(got.affine - expected.affine))) < 1e-9
    # every voxel value sits at the same world point as before
    ijk = np.array([[0, 0, 0], [1, 2, 3], [s - 1 for s in got.shape]])
    src = np.rint(v.world_to_index(got.index_to_world(ijk))).astype(int)
    assert [got.array[tuple(p)] for p in ijk] == [v.array[tuple(p)] for p in src]


@pytest.mark.parametrize("name", ["T1.nii", "SPECT.nii"])
def test_reorient_ras_is_nibabels_closest_canonical(shared, name):
    """The LAS T1 template and the RAS-order, big-endian SPECT template: ``reorient("RAS")`` gives the voxels
    and affine nibabel's as_closest_canonical gives."""
    path = str(shared("data", "spm12-templates", name))
    canonical = nib.as_closest_canonical(nib.load(path))
    got = medfuse.load(path).reorient("ras")
    assert np.array_equal(got.array, np.asanyarray(canonical.dataobj))
    assert np.allclose(got.affine_ras, canonical.affine, atol=1e-6)


def test_reorient_refuses_what_is_not_a_code():
    for bad in ("LLS", "RA", "XYZ", "RASS"):
        with pytest.raises(InvalidInputError, match="one of L/R, one of P/A and one of S/I"):
            _vol().reorient(bad)


# ----------------------------------------------------------------------------- modality and unit in the bridges
def test_nibabel_bridge_keeps_modality_and_unit(tmp_path):
    """nibabel.save(vol.to_nibabel()) lost PT/SUVbw (medfuse.load read unknown/arbitrary), and
    Volume.from_nibabel(nibabel.load(f)) of a file medfuse saved did too."""
    v = _vol(modality="PT", unit="SUVbw")
    nib.save(v.to_nibabel(), str(tmp_path / "a.nii.gz"))
    loaded = medfuse.load(tmp_path / "a.nii.gz")
    assert (loaded.modality, loaded.unit) == ("PT", "SUVbw") and loaded.same_grid(v)
    medfuse.save(v, tmp_path / "b.nii.gz")
    back = Volume.from_nibabel(nib.load(str(tmp_path / "b.nii.gz")))
    assert (back.modality, back.unit) == ("PT", "SUVbw")
    assert Volume.from_nibabel(v.to_nibabel(), modality="NM", unit="counts").unit == "counts"  # explicit wins
    plain = Volume.from_nibabel(nib.Nifti1Image(np.zeros((2, 3, 4), np.float32), np.eye(4)))
    assert (plain.modality, plain.unit) == ("unknown", "arbitrary")


def test_simpleitk_bridge_keeps_modality_and_unit(tmp_path):
    v = _vol(modality="CT", unit="HU")
    sitk.WriteImage(v.to_sitk(), str(tmp_path / "a.mha"))
    loaded = medfuse.load(tmp_path / "a.mha")
    assert (loaded.modality, loaded.unit) == ("CT", "HU") and loaded.same_grid(v)
    assert (Volume.from_sitk(v.to_sitk()).modality, Volume.from_sitk(v.to_sitk()).unit) == ("CT", "HU")
    medfuse.save(v, tmp_path / "b.nrrd")
    assert Volume.from_sitk(sitk.ReadImage(str(tmp_path / "b.nrrd"))).unit == "HU"
    assert Volume.from_sitk(v.to_sitk(), unit="arbitrary").unit == "arbitrary"  # explicit wins
    assert Volume.from_sitk(sitk.Image([2, 3, 4], sitk.sitkFloat32)).modality == "unknown"


def test_from_nibabel_converts_micron_and_metre_units_to_mm(tmp_path):
    """A header in microns gave a Volume 1000 times too large, where medfuse.load of the file converts."""
    for unit, to_mm in (("micron", 1e-3), ("meter", 1e3)):
        aff = np.diag([50.0, 60.0, 70.0, 1.0])
        aff[:3, 3] = (-100.0, 20.0, 5.0)
        img = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), aff)
        img.header.set_xyzt_units(unit)
        v = Volume.from_nibabel(img)
        assert np.allclose(v.spacing, np.array([50.0, 60.0, 70.0]) * to_mm)
        assert np.allclose(v.origin, np.array([100.0, -20.0, 5.0]) * to_mm)
        nib.save(img, str(tmp_path / f"{unit}.nii"))
        assert v.same_grid(medfuse.load(tmp_path / f"{unit}.nii"), atol=1e-6)


# ----------------------------------------------------------------------------- the wrong object
#: Objects a bridge may be handed by mistake, made on demand.
WRONG = {"path": lambda: "/data/t1.nii", "ndarray": lambda: np.zeros((2, 2, 2)),
         "sitk": lambda: sitk.Image([2, 2, 2], sitk.sitkUInt8),
         "nibabel": lambda: nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))}


@pytest.mark.parametrize("bridge,given,words", [
    ("nibabel", "path", "takes a nibabel image, got str.*medfuse.load"),
    ("nibabel", "ndarray", "got ndarray.*Volume\\(array, affine_lps\\)"),
    ("nibabel", "sitk", "got Image.*from_sitk"),
    ("sitk", "ndarray", "takes a SimpleITK.Image, got ndarray"),
    ("sitk", "nibabel", "got Nifti1Image.*from_nibabel"),
])
def test_bridges_name_the_object_they_expected(bridge, given, words):
    """They raised AttributeError ('str' object has no attribute 'dataobj')."""
    with pytest.raises(InvalidInputError, match=words):
        (Volume.from_nibabel if bridge == "nibabel" else Volume.from_sitk)(WRONG[given]())


def test_from_nibabel_without_an_affine_is_a_geometry_error():
    with pytest.raises(GeometryError, match="no affine"):
        Volume.from_nibabel(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), None))


def test_a_simpleitk_label_map_is_refused_not_a_crash():
    """SimpleITK's GetArrayFromImage aborts the interpreter on a label map (C++ terminate), so the check runs
    in a child process: without it the child dies with SIGABRT."""
    code = "\n".join([
        "import SimpleITK as sitk", "from medfuse.volume import Volume", "from medfuse.errors import InvalidInputError",
        "lm = sitk.BinaryImageToLabelMap(sitk.Image([3, 3, 3], sitk.sitkUInt8) + 1)",
        "try:", "    Volume.from_sitk(lm)", "except InvalidInputError as e:", "    print('refused:', e)", ""])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-500:]
    assert "refused: the SimpleITK image is a label map" in run.stdout and "LabelMapToLabel" in run.stdout


# ----------------------------------------------------------------------------- real files, every representation
@pytest.mark.filterwarnings("ignore")  # loaders' notes (template space, ...): geometry is what is checked here
@pytest.mark.parametrize("parts", [
    ("spm12-templates", "SPECT.nii"), ("spm12-templates", "T1.nii"), ("brats-gli-00001", "t1c.nii.gz"),
    ("dicom", "qa-transfer-syntaxes", "In", "1.dcm"),
], ids=["SPECT-big-endian-RAS", "T1-LAS", "BraTS-LPS", "DICOM-oblique"])
def test_real_files_put_each_voxel_at_one_world_point_in_every_library(shared, parts):
    """medfuse, SimpleITK (LPS, its own TransformIndexToPhysicalPoint), nibabel and MONAI (RAS, their affines):
    the same voxel values, and voxel (i, j, k) at the same world point, for the converted Volume; and where the
    library reads the file itself, for its own reading."""
    pytest.importorskip("monai")
    path = shared("data", *parts)
    v = medfuse.load(path)
    corners = [(0, 0, 0), tuple(s - 1 for s in v.shape), (3, v.shape[1] - 2, 1)]
    readers = [("sitk", v.to_sitk()), ("nibabel", v.to_nibabel()), ("monai", v.to_metatensor())]
    if path.suffix != ".dcm":
        readers += [("nibabel", nib.load(str(path)))]
    for kind, obj in readers:
        for ijk in corners:
            if kind == "sitk":
                value, lps = obj[ijk], np.asarray(obj.TransformIndexToPhysicalPoint(ijk))
            elif kind == "nibabel":
                value = np.asanyarray(obj.dataobj)[ijk]
                lps = nib.affines.apply_affine(obj.affine, ijk) * [-1, -1, 1]
            else:
                value = obj[(0, *ijk)].item()
                lps = nib.affines.apply_affine(np.asarray(obj.affine), ijk) * [-1, -1, 1]
            assert value == v.array[ijk], (kind, ijk)
            assert np.allclose(lps, v.index_to_world(ijk), atol=1e-4), (kind, ijk)
    for back in (Volume.from_sitk(v.to_sitk()), Volume.from_nibabel(v.to_nibabel()),
                 Volume.from_metatensor(v.to_metatensor())):
        assert np.array_equal(back.array, v.array) and float(np.max(np.abs(back.affine - v.affine))) < 1e-9


@pytest.mark.filterwarnings("ignore")
def test_reorient_turns_an_oblique_dicom_into_dcm2niix_nifti(shared):
    """dcm2niix stores the oblique Siemens EPI with its rows flipped (LAS); medfuse keeps DICOM order (LPS).
    ``reorient`` to the reference's code gives its voxels exactly, at its grid (float32 header round-off)."""
    folder = shared("data", "dicom", "qa-transfer-syntaxes")
    v = medfuse.load(folder / "In" / "1.dcm")
    ref = Volume.from_nibabel(nib.load(str(folder / "Ref" / "1.nii")))
    assert v.is_oblique and v.orientation != ref.orientation
    got = v.reorient(ref.orientation)
    assert np.array_equal(got.array, ref.array) and got.same_grid(ref, atol=1e-4)



def test_pickle_and_deepcopy_keep_everything_and_stay_checked():
    """Multiprocessing pickles Volumes: the copy has the same voxels, geometry and labels, and its fields are
    still checked when set."""
    import copy
    import pickle

    v = _vol(modality="PT", unit="SUVbw", provenance={"series_uid": "1.2"})
    for w in (pickle.loads(pickle.dumps(v)), copy.deepcopy(v)):
        assert np.array_equal(w.array, v.array) and np.array_equal(w.affine, v.affine)
        assert (w.modality, w.unit, w.provenance) == ("PT", "SUVbw", {"series_uid": "1.2"})
        assert not np.shares_memory(w.array, v.array)
        with pytest.raises(InvalidInputError, match="unknown unit"):
            w.unit = "mCi"


def test_a_volume_given_as_voxels_is_named():
    """``ct.with_array(pet)`` said "the new array has shape ()" (NumPy's 0-d object array of a Volume)."""
    v = _vol()
    for call in (lambda: v.with_array(v.copy()), lambda: Volume(v, v.affine)):
        with pytest.raises(InvalidInputError, match="a Volume was given.*vol.array"):
            call()


def test_a_2d_simpleitk_image_is_told_how_to_become_3d():
    """The fix the message gives works: the slab keeps SimpleITK's voxels at SimpleITK's points."""
    im = sitk.GetImageFromArray(np.arange(12.0).reshape(3, 4))
    im.SetSpacing((0.5, 0.7))
    im.SetOrigin((3.0, 4.0))
    with pytest.raises(InvalidInputError, match=r"2-D.*SimpleITK\.JoinSeries\(image\)"):
        Volume.from_sitk(im)
    v = Volume.from_sitk(sitk.JoinSeries(im))
    assert v.shape == (4, 3, 1) and v.array[2, 1, 0] == im[2, 1]
    assert np.allclose(v.index_to_world([2, 1, 0])[:2], im.TransformIndexToPhysicalPoint((2, 1)))


def test_to_nibabel_of_an_axis_longer_than_nifti1_holds_is_nifti2():
    """NIfTI-1 keeps each size as int16: to_nibabel gave nibabel's raw HeaderDataError for a 40000-voxel strip."""
    import nibabel as nib

    arr = np.arange(40000 * 2, dtype=np.uint16).reshape(40000, 2, 1)
    v = Volume(arr, np.diag([0.1, 0.2, 0.3, 1.0]), modality="MR")
    img = v.to_nibabel()
    assert isinstance(img, nib.Nifti2Image)
    back = Volume.from_nibabel(img)
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.affine, v.affine, atol=1e-6)
    assert type(Volume(arr[:100], v.affine, modality="MR").to_nibabel()) is nib.Nifti1Image


def test_a_ct_without_a_stored_unit_gets_one_unit_however_it_is_made():
    """Volume(a, aff, modality="CT") and medfuse.load(..., modality="CT") gave HU for a CT holding air, while
    from_sitk, from_nibabel and from_metatensor gave "arbitrary": the same image fused differently (up to 0.25)."""
    import nibabel as nib
    import SimpleITK as sitk

    arr = np.full((6, 7, 5), 40, np.int16)
    arr[:2] = -1000
    plain = nib.Nifti1Image(arr, np.eye(4))  # no medfuse tag: no unit stored
    img = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)))
    made = [Volume(arr, np.eye(4), modality="CT"), Volume.from_nibabel(plain, modality="CT"),
            Volume.from_sitk(img, modality="CT")]
    pytest.importorskip("monai")
    from monai.data import MetaTensor

    made.append(Volume.from_metatensor(MetaTensor(torch_tensor(arr), affine=np.diag([-1.0, -1.0, 1.0, 1.0])),
                                       modality="CT"))
    assert [v.unit for v in made] == ["HU"] * 4
    no_air = Volume.from_nibabel(nib.Nifti1Image(arr + 1100, np.eye(4)), modality="CT")
    assert no_air.unit == "arbitrary"
    assert Volume.from_nibabel(plain, modality="CT", unit="arbitrary").unit == "arbitrary"  # a unit given is kept
    assert Volume.from_nibabel(plain).unit == "arbitrary"  # not a CT


def torch_tensor(arr):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(arr.astype(np.float32))


def test_from_nibabel_says_of_a_header_what_load_says(tmp_path):
    """``Volume.from_nibabel(nibabel.load(f))`` used a guessed or an ambiguous geometry without a word, where
    ``medfuse.load(f)`` warns (docs/io.md: geometry is never used silently)."""
    import warnings

    from medfuse.errors import MedfuseWarning

    data = np.zeros((3, 4, 5), np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [1, 2, 3]
    bare = nib.Nifti1Image(data, aff)
    bare.header.set_sform(aff, code=0)
    bare.header.set_qform(aff, code=0)
    nib.save(nib.Nifti1Image(data, None, header=bare.header), tmp_path / "codes0.nii")
    apart = nib.Nifti1Image(data, aff)
    moved = aff.copy()
    moved[0, 3] += 3.74
    apart.header.set_qform(moved, code=1)
    apart.header.set_sform(aff, code=2)
    nib.save(apart, tmp_path / "apart.nii")
    for name, said in (("codes0.nii", r"neither a qform nor an sform \(both codes 0\)"),
                       ("apart.nii", r"sform \(code 2\) and qform \(code 1\) place the grid up to 3.74 mm apart")):
        with pytest.warns(MedfuseWarning, match=said) as loaded:
            via_load = medfuse.load(tmp_path / name)
        with pytest.warns(MedfuseWarning, match=said) as bridged:
            via_nib = Volume.from_nibabel(nib.load(tmp_path / name))
        np.testing.assert_allclose(via_nib.affine, via_load.affine)
        assert all(w.filename == __file__ for w in [*loaded, *bridged])  # the caller's line, not medfuse's
    nib.save(nib.AnalyzeImage(data, aff), tmp_path / "old.img")
    with pytest.warns(MedfuseWarning, match=r"Analyze 7.5 file \(no NIfTI header\) stores no orientation"):
        medfuse.load(tmp_path / "old.img")
    with pytest.warns(MedfuseWarning, match=r"Analyze 7.5 nibabel image \(no NIfTI header\) stores no orientation"):
        Volume.from_nibabel(nib.load(tmp_path / "old.img"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        Volume.from_nibabel(nib.Nifti1Image(data, aff))  # a plain image: one geometry, nothing to say
        Volume.from_nibabel(nib.MGHImage(data, aff))  # no Analyze header, no form codes: nothing to say either


def test_a_metatensor_given_as_plain_voxels_is_refused_not_stripped_of_its_affine():
    """``Volume(metatensor[0], affine)`` kept the voxels and dropped the MetaTensor's own affine silently."""
    torch = pytest.importorskip("torch")
    monai_data = pytest.importorskip("monai.data")
    t = monai_data.MetaTensor(torch.zeros(1, 4, 5, 6), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    with pytest.raises(InvalidInputError, match="MONAI MetaTensor, which carries its own affine") as ei:
        Volume(t[0], np.eye(4))
    assert "Volume.from_metatensor(t)" in ei.value.fix
    assert Volume.from_metatensor(t[0]).spacing == (2.0, 2.0, 2.0)
    assert Volume(t[0].as_tensor(), np.eye(4)).spacing == (1.0, 1.0, 1.0)  # another affine, on purpose
    # A MONAI array transform on plain voxels gives a MetaTensor with only MONAI's identity placeholder: the
    # affine given is the geometry then (the reviewer's GaussianSmooth case).
    from monai.transforms import GaussianSmooth

    smoothed = GaussianSmooth(1.0)(np.zeros((1, 6, 6, 6), np.float32))[0]
    assert isinstance(smoothed, monai_data.MetaTensor)
    assert Volume(smoothed, np.diag([2.0, 2.0, 3.0, 1.0])).spacing == (2.0, 2.0, 3.0)
    named = monai_data.MetaTensor(torch.zeros(4, 5, 6), meta={"filename_or_obj": "ct.nii.gz"})
    with pytest.raises(InvalidInputError, match="MetaTensor"):
        Volume(named, np.eye(4))  # read from a file: its identity affine is real


def test_a_2d_metatensor_is_refused_not_read_as_a_volume_with_its_channel_as_an_axis(tmp_path):
    """MONAI's channel-first 2-D image (1, H, W) became a (1, H, W) Volume: every voxel in the wrong place."""
    pytest.importorskip("torch")
    monai_transforms = pytest.importorskip("monai.transforms")
    import torch
    from monai.data import MetaTensor

    data = np.arange(6 * 7, dtype=np.float32).reshape(6, 7)
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 1.0, 1.0])), path)
    t = monai_transforms.LoadImage(image_only=True, ensure_channel_first=True)(path)
    assert tuple(t.shape) == (1, 6, 7)
    with pytest.raises(InvalidInputError, match="2-D image") as ei:
        Volume.from_metatensor(t)
    assert "unsqueeze(-1)" in ei.value.fix
    # The fix it gives places every voxel where medfuse.load does.
    fixed, loaded = Volume.from_metatensor(t.unsqueeze(-1)), medfuse.load(path)
    assert fixed.shape == loaded.shape == (6, 7, 1)
    np.testing.assert_allclose(fixed.affine, loaded.affine, atol=1e-6)
    np.testing.assert_array_equal(fixed.array, loaded.array)
    with pytest.raises(InvalidInputError, match="2-D image"):
        medfuse.transforms.as_volume(t)
    # Without a channel, (H, W) with a slice axis added: taken (its spatial_shape still says 2 axes).
    plain = monai_transforms.LoadImage(image_only=True)(path)
    assert Volume.from_metatensor(plain.unsqueeze(-1)).shape == (6, 7, 1)
    # A 3x3 (2-D) affine was a raw NumPy matmul error.
    with pytest.raises(InvalidInputError, match="2-D image"):
        Volume.from_metatensor(MetaTensor(torch.zeros(1, 4, 5, 6), affine=torch.eye(3)))
    with pytest.raises(InvalidInputError, match="affine has shape"):
        Volume.from_metatensor(MetaTensor(torch.zeros(1, 4, 5, 6), affine=torch.eye(4)[:, :3]))


def test_from_nibabel_reads_a_sheared_sform_through_its_valid_qform_as_load_does(tmp_path):
    """load read such a file through its qform (with a warning); from_nibabel refused it as sheared."""
    sform = np.array([[2, 0.3, 0, 10], [0, 2, 0, -5], [0, 0, 3, 7], [0, 0, 0, 1.0]])
    qform = np.diag([2.0, 2.0, 3.0, 1.0])
    qform[:3, 3] = [10, -5, 7]
    img = nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(4, 5, 6), sform)
    img.set_sform(sform, code=2)
    img.set_qform(qform, code=1)
    nib.save(img, tmp_path / "shear.nii")
    with pytest.warns(MedfuseWarning, match="uses the qform"):
        loaded = medfuse.load(tmp_path / "shear.nii")
    with pytest.warns(MedfuseWarning, match="the nibabel image: the NIfTI sform .* sheared.*uses the qform"):
        bridged = Volume.from_nibabel(nib.load(tmp_path / "shear.nii"))
    np.testing.assert_array_equal(bridged.affine, loaded.affine)
    np.testing.assert_array_equal(bridged.array, loaded.array)
    assert bridged.provenance["nifti_space"] == loaded.provenance["nifti_space"] == "scanner"
