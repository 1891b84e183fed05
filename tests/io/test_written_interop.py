"""Every file ``medfuse.save`` writes, opened by the tools the field uses instead of medfuse.

* DICOM series -> dcm2niix (the converter whose NIfTIs are in ``../shared/data/dicom/*/Ref``): its NIfTI's voxels
  and affine against the Volume written, and every warning it prints about our files.
* NIfTI -> nibabel and SimpleITK, plus the raw header bytes; NRRD -> pynrrd and SimpleITK; MetaImage -> the header
  text and SimpleITK.

Geometry is compared through world positions (RAS for NIfTI, LPS for NRRD/MetaImage), never through medfuse's
own readers, so a reader's flips and permutations (dcm2niix's row flip, its RAS) do not matter.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import medfuse
from medfuse.errors import MedfuseWarning
from medfuse.io.writers import save
from medfuse.volume import Volume

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_volumes"
_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _needed(what: str) -> str:
    """Skip without ``what`` (a dev extra); fail under CI=true, where a missing tool must not pass by skipping."""
    msg = f"needs {what} (pip install the 'dev' extra)"
    if _CI:
        pytest.fail(msg + "; CI must have it")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def dcm2niix() -> str:
    exe = shutil.which("dcm2niix") or shutil.which("dcm2niix", path=str(Path(sys.executable).parent))
    if exe is None:
        _needed("the dcm2niix converter (PyPI: dcm2niix)")
    return exe


@pytest.fixture(scope="module")
def nrrd():
    try:
        import nrrd as module
    except ImportError:
        _needed("pynrrd")
    return module


# ------------------------------------------------------------------------------------------------ dcm2niix
#: What dcm2niix says about every medfuse series, and why it is right to say it:
#: - Manufacturer (0008,0070) is empty on purpose (General Equipment, type 2): medfuse is not a scanner vendor, so
#:   no vendor-specific handling may apply; "medfuse" was read as Mediso (dcm2niix matches the first two letters).
_ALWAYS = ("Unable to determine manufacturer (0008,0070)",)
#: - PatientPosition (0018,5100) is type 2C, empty when unknown (PS3.3 C.7.3.1): a volume from NIfTI, or a
#:   template without it, does not say how the patient lay. dcm2niix's geometry does not use it (IPP/IOP are
#:   patient-based): the voxel and affine checks below pass with the warning.
_NO_POSITION = "Patient Position (0018,5100) not specified"


def _convert(exe: str, folder: Path, out: Path):
    """(the NIfTI dcm2niix made of ``folder``, its JSON sidecar, its warning lines)."""
    out.mkdir()
    r = subprocess.run([exe, "-b", "y", "-z", "n", "-f", "%s", "-o", str(out), str(folder)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    niis = sorted(out.glob("*.nii"))
    assert len(niis) == 1, (r.stdout, [p.name for p in out.iterdir()])  # one series, one 3-D volume
    said = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if "warning" in ln.lower() or "error" in ln.lower()]
    return niis[0], json.loads(niis[0].with_suffix(".json").read_text()), said


def _unexplained(said, *, position_known: bool):
    explained = _ALWAYS + (() if position_known else (_NO_POSITION,))
    return [ln for ln in said if not any(e in ln for e in explained)]


def _quantisation_bound(vol: Volume) -> np.ndarray:
    """Per slice k: the documented bound (max|slice| / 65534 signed, / 131070 non-negative; slopes raised by at
    most 4.8e-7 + 4 float32 steps when the series shares one) plus float32 rounding of dcm2niix's output."""
    a = np.nan_to_num(vol.array.astype(float))
    if np.issubdtype(vol.array.dtype, np.integer) and -32768 <= a.min() and a.max() <= 65535:
        return np.zeros(vol.shape[2])
    peak = np.abs(a).max(axis=(0, 1))
    top = 32767 if a.min() < 0 else 65535
    slope = peak.max() / top
    raised = 4.8e-7 + 4 * float(np.spacing(np.float32(slope)))
    return (peak / top + raised) / 2 * (1 + 1e-6) + np.abs(a).max() * 2 * float(np.finfo(np.float32).eps)


def _same_as_written(vol: Volume, nii: Path) -> None:
    """dcm2niix's NIfTI holds ``vol``: every sampled voxel at the same RAS position (< 1e-3 mm, through its sform)
    with its value within the quantisation bound of its slice."""
    img = nib.load(nii)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1  # scanner space
    data = np.asanyarray(img.dataobj).astype(float)
    assert sorted(data.shape[:3]) == sorted(vol.shape)  # its axes may be permuted and flipped
    rng = np.random.default_rng(0)
    ijk = np.vstack([np.stack([rng.integers(0, s, 3000) for s in vol.shape], 1), [0, 0, 0],
                     np.array(vol.shape) - 1])
    world = nib.affines.apply_affine(vol.affine_ras, ijk)
    theirs = nib.affines.apply_affine(np.linalg.inv(img.affine), world)
    near = np.rint(theirs).astype(int)
    assert np.all((near >= 0) & (near < np.array(data.shape[:3])))
    assert np.abs(nib.affines.apply_affine(img.affine, near) - world).max() < 1e-3
    got, want = data[tuple(near.T)], vol.array[tuple(ijk.T)].astype(float)
    bound = _quantisation_bound(vol)[ijk[:, 2]]
    assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()


def _write_and_convert(vol, tmp_path, exe, name="s", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)
        folder = save(vol, tmp_path / name, **kw)
    return _convert(exe, folder, tmp_path / f"{name}_nii")


@pytest.mark.parametrize("case", ["ct_hu", "pet_suv", "pet_bqml"])
def test_dcm2niix_reads_ct_and_pet_series_as_written(case, dcm2niix, tmp_path):
    """CT in HU (exact int16) and PET in SUVbw and Bq/mL (per-slice slopes), with the bundled series as templates."""
    series = SAMPLES / ("ct" if case == "ct_hu" else "pet")
    vol = medfuse.load(series, **({"suv": "none"} if case == "pet_bqml" else {}))
    assert vol.unit == {"ct_hu": "HU", "pet_suv": "SUVbw", "pet_bqml": "Bq/mL"}[case]
    nii, sidecar, said = _write_and_convert(vol, tmp_path, dcm2niix, template=series)
    assert _unexplained(said, position_known=False) == []
    _same_as_written(vol, nii)
    assert sidecar["Modality"] == vol.modality and sidecar["ManufacturersModelName"] == "medfuse"
    if case != "ct_hu":
        assert sidecar["Units"] == ("GML" if case == "pet_suv" else "Bq/mL")  # dcm2niix spells BQML as BIDS does


def test_dcm2niix_reads_oblique_mr_from_a_real_scanner_template(shared, dcm2niix, tmp_path):
    """Philips' oblique EPI (float after its private scaling), written with its own series as template: the
    PatientPosition (HFS) comes from it, so dcm2niix warns about nothing but the (empty) manufacturer."""
    src = shared("data", "dicom", "qa-philips-scaling", "In", "Magdeburg_2014", "fmri")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)
        vol = medfuse.load_volumes(src)[0]
    assert vol.is_oblique and vol.array.dtype.kind == "f"
    nii, sidecar, said = _write_and_convert(vol, tmp_path, dcm2niix, template=src)
    assert _unexplained(said, position_known=True) == [] and not any(_NO_POSITION in s for s in said)
    _same_as_written(vol, nii)
    assert sidecar["PatientPosition"] == "HFS"


def test_dcm2niix_reads_sagittal_signed_series(dcm2niix, tmp_path):
    """A sagittal grid (rows along A, columns towards I, slices towards L: 'AIL') of signed float MR."""
    aff = np.array([[0, 0, 1.2, -50], [-0.9, 0, 0, 80], [0, -1.1, 0, 60], [0, 0, 0, 1.0]])
    arr = np.random.default_rng(1).normal(0, 100, (30, 25, 12)).astype(np.float32)
    vol = Volume(arr, aff, modality="MR", unit="arbitrary")
    assert vol.orientation == "AIL"
    nii, _, said = _write_and_convert(vol, tmp_path, dcm2niix)
    assert _unexplained(said, position_known=False) == []
    _same_as_written(vol, nii)


def test_dcm2niix_reads_left_handed_volume(shared, dcm2niix, tmp_path):
    """SPM's LAS template (k runs against row x column: readers reverse it) as a Secondary Capture."""
    vol = medfuse.load(shared("data", "spm12-templates", "single_subj_T1.nii"))
    assert vol.orientation == "LAS"
    nii, _, said = _write_and_convert(vol, tmp_path, dcm2niix)
    assert _unexplained(said, position_known=False) == []
    _same_as_written(vol, nii)


def _fused_like(seed: int = 2) -> Volume:
    """A fused 0..1 volume whose slices all peak near 1 (a Secondary Capture: modality unknown)."""
    arr = np.random.default_rng(seed).random((40, 30, 10)).astype(np.float32)
    return Volume(arr, np.diag([1.5, 1.5, 4.0, 1.0]), modality="unknown", unit="arbitrary")


def test_dcm2niix_keeps_fractions_of_a_series_whose_slopes_nearly_agree(dcm2niix, tmp_path):
    """Per-slice RescaleSlopes about 1e-8 apart (slices peaking at 0.9990..0.9999).

    The standard gives each image its own Rescale Slope (PS3.3 C.11.1.1.2, Modality LUT), so the series was
    valid; but dcm2niix takes slopes within float32's epsilon (1.19e-7) of the first slice's as equal and then
    applies the first one to all, which put voxels 0.0019 off (bound 7.6e-6). medfuse gives such a series one
    slope.
    """
    vol = _fused_like()
    nii, _, said = _write_and_convert(vol, tmp_path, dcm2niix, series_description="fused")
    assert _unexplained(said, position_known=False) == []
    _same_as_written(vol, nii)


def test_secondary_capture_keeps_the_templates_patient_position(shared, dcm2niix, tmp_path):
    """A fused result written with the fixed image's series (a real Philips MR) as template is in that series'
    patient coordinates, so it keeps its PatientPosition (HFS) whatever its own modality (General Series; "may
    be present" for a Secondary Capture): dcm2niix warned it was missing and reported none."""
    src = shared("data", "dicom", "qa-philips-scaling", "In", "Magdeburg_2014", "fmri")
    vol = _fused_like(3)
    nii, sidecar, said = _write_and_convert(vol, tmp_path, dcm2niix, template=src, series_description="fused")
    assert _unexplained(said, position_known=True) == [] and not any(_NO_POSITION in s for s in said)
    _same_as_written(vol, nii)
    assert sidecar["SeriesDescription"] == "fused" and sidecar["PatientPosition"] == "HFS"


def test_dcm2niix_does_not_take_medfuse_for_a_scanner_vendor(dcm2niix, tmp_path):
    """dcm2niix names the vendor from the first two letters of Manufacturer (0008,0070): "medfuse" was reported
    as Mediso (a PET/SPECT maker) in the BIDS sidecar, and its Mediso handling applied. The software is named in
    ManufacturerModelName and SoftwareVersions (General Equipment, PS3.3 C.7.5.1)."""
    vol = Volume(np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3), np.eye(4), modality="CT", unit="HU")
    _, sidecar, said = _write_and_convert(vol, tmp_path, dcm2niix)
    assert "Manufacturer" not in sidecar
    assert sidecar["ManufacturersModelName"] == "medfuse"
    assert sidecar["SoftwareVersions"] == f"medfuse {medfuse.__version__}"
    assert any(_ALWAYS[0] in s for s in said)


def test_quadruped_template_keeps_its_anatomical_orientation(dcm2niix, tmp_path):
    """A template with AnatomicalOrientationType QUADRUPED defines the x, y, z of its patient coordinates
    differently (PS3.3 C.7.6.2.1.1); the output's IPP/IOP are in those coordinates, so it must carry the type
    (General Series, 1C). dcm2niix recognises it and warns that the axes need rotating."""
    tpl = pydicom.Dataset()
    tpl.StudyInstanceUID = pydicom.uid.generate_uid()
    tpl.Modality, tpl.AnatomicalOrientationType, tpl.PatientPosition = "CT", "QUADRUPED", "HFS"
    vol = Volume(np.zeros((4, 5, 3), np.int16), np.eye(4), modality="CT", unit="HU")
    folder = save(vol, tmp_path / "s", template=tpl)
    ds = pydicom.dcmread(next(folder.iterdir()))
    assert ds.AnatomicalOrientationType == "QUADRUPED" and ds.PatientPosition == "HFS"
    _, _, said = _convert(dcm2niix, folder, tmp_path / "n")
    assert any("QUADRUPED" in s for s in said)


# ------------------------------------------------------------------------------------------------ NIfTI
def _oblique_las() -> Volume:
    """A left-handed (LAS-like), oblique grid with different spacings: every geometry field matters."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    d = rot @ np.diag([-1.0, 1.0, 1.0])  # i flipped: left-handed
    aff = np.eye(4)
    aff[:3, :3] = d * np.array([0.8, 1.1, 2.5])
    aff[:3, 3] = [-120.5, 80.25, -40.0]
    arr = np.random.default_rng(3).normal(0, 50, (17, 13, 9)).astype(np.float32)
    return Volume(arr, aff, modality="PT", unit="SUVbw",
                  provenance={"source": "/data/Doe^John_12345/pet.nii.gz"})


def _nifti_header_bytes(path: Path) -> bytes:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        return fh.read(540)


@pytest.mark.parametrize("name,fmt", [("v.nii.gz", None), ("v.nii", None), ("v2.nii.gz", "nifti2")])
def test_nifti_header_as_the_standard_defines_it(name, fmt, tmp_path):
    """Read by nibabel and SimpleITK (niftilib; NIfTI-1 only) and as raw bytes (header layouts of nifti1.h and
    nifti2.h): sform = qform = the Volume's RAS affine, codes 1, units mm, scl_slope 1 / scl_inter 0 (nifti1.h:
    "if scl_slope is nonzero" the voxels are scaled: NaN, nibabel's 'unset', is nonzero), no intent, descrip only
    medfuse's modality/unit tag, aux_file empty: nothing from the source path (a patient name there)."""
    vol = _oblique_las()
    out = save(vol, tmp_path / name, format=fmt)
    img = nib.load(out)
    h = img.header
    assert isinstance(img, nib.Nifti2Image if fmt else nib.Nifti1Image)
    assert int(h["sform_code"]) == 1 and int(h["qform_code"]) == 1
    np.testing.assert_allclose(h.get_sform(), vol.affine_ras, atol=1e-4)
    np.testing.assert_allclose(h.get_qform(), vol.affine_ras, atol=1e-4)
    assert h.get_xyzt_units() == ("mm", "sec")
    assert int(h["intent_code"]) == 0 and bytes(h["intent_name"]).strip(b"\0") == b""
    assert bytes(h["descrip"]).rstrip(b"\0") == b"medfuse modality=PT unit=SUVbw"
    assert bytes(h["aux_file"]).rstrip(b"\0") == b""
    raw = _nifti_header_bytes(out)
    slope_inter = (np.frombuffer(raw[176:192], "<f8") if fmt else np.frombuffer(raw[112:120], "<f4"))
    assert slope_inter.tolist() == [1.0, 0.0]
    for secret in (b"Doe", b"John", b"12345", b"/data"):
        assert secret not in raw
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), vol.array)
    if fmt == "nifti2":
        return  # ITK 5.4 (SimpleITK 2.5) reads NIfTI-1 only: "bad datatype" (docs/io.md says so)
    itk = sitk.ReadImage(str(out))
    _same_lps_geometry(vol, itk)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), vol.array)


def test_nifti_template_space_is_read_by_itk_from_the_qform(tmp_path):
    """A volume in MNI space is written with codes 4; ITK then takes the geometry from the qform (its rule for
    sform codes other than 1), so the qform must hold the same affine as the sform."""
    vol = _oblique_las()
    vol = Volume(vol.array, vol.affine, modality="MR", unit="arbitrary", provenance={"nifti_space": "mni"})
    out = save(vol, tmp_path / "mni.nii.gz")
    h = nib.load(out).header
    assert int(h["sform_code"]) == 4 and int(h["qform_code"]) == 4
    _same_lps_geometry(vol, sitk.ReadImage(str(out)))


# ------------------------------------------------------------------------------------------------ NRRD, MetaImage
def _same_lps_geometry(vol: Volume, img) -> None:
    """SimpleITK's image has the Volume's LPS grid: voxel corners within 1e-4 mm (NIfTI-1 stores float32)."""
    ijk = np.array([[0, 0, 0], np.array(vol.shape) - 1, [vol.shape[0] - 1, 0, 0], [0, vol.shape[1] - 1, 0]])
    theirs = np.array([img.TransformContinuousIndexToPhysicalPoint([float(x) for x in p]) for p in ijk])
    np.testing.assert_allclose(theirs, vol.index_to_world(ijk), atol=1e-4)
    assert img.GetSize() == vol.shape


@pytest.mark.parametrize("name", ["v.nrrd", "v.nhdr"])
def test_nrrd_read_by_pynrrd_and_itk(name, nrrd, tmp_path):
    """NRRD (teem's format spec): 'space: left-posterior-superior' (Slicer's and ITK's LPS), 'space directions' the
    columns of the affine (spacing included), 'space origin' the first voxel's centre, three domain axes."""
    vol = _oblique_las()
    out = save(vol, tmp_path / name)
    data, header = nrrd.read(str(out))
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(np.asarray(header["space directions"], float), vol.affine[:3, :3].T, atol=1e-12)
    np.testing.assert_allclose(np.asarray(header["space origin"], float), vol.affine[:3, 3], atol=1e-12)
    assert list(header["kinds"]) == ["domain"] * 3
    assert header["medfuse_modality"] == "PT" and header["medfuse_unit"] == "SUVbw"
    np.testing.assert_array_equal(data, vol.array)
    _same_lps_geometry(vol, sitk.ReadImage(str(out)))
    assert b"Doe" not in out.read_bytes()[:2000]


def _metaimage_header(path: Path) -> dict:
    fields = {}
    with open(path, "rb") as fh:
        for line in fh:
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    return fields


@pytest.mark.parametrize("name", ["v.mha", "v.mhd"])
def test_metaimage_header_and_geometry(name, tmp_path):
    """MetaImage (MetaIO): TransformMatrix, Offset and ElementSpacing hold the Volume's LPS grid, and
    AnatomicalOrientation, a label ITK writes and readers ignore, names the side each axis comes FROM in ITK's
    convention (an identity grid is 'RAI'): the opposite of nibabel's axis codes for the same grid."""
    vol = _oblique_las()
    out = save(vol, tmp_path / name)
    f = _metaimage_header(out)
    matrix = np.array(f["TransformMatrix"].split(), float).reshape(3, 3)
    direction = vol.affine[:3, :3] / np.array(vol.spacing)
    np.testing.assert_allclose(matrix, direction.T, atol=1e-12)  # one axis (a column of the affine) a row
    np.testing.assert_allclose(np.array(f["Offset"].split(), float), vol.affine[:3, 3], atol=1e-12)
    np.testing.assert_allclose(np.array(f["ElementSpacing"].split(), float), vol.spacing, atol=1e-12)
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
    to = nib.orientations.aff2axcodes(vol.affine_ras)
    assert f["AnatomicalOrientation"] == "".join(opposite[c] for c in to)
    assert f["medfuse_modality"] == "PT" and f["medfuse_unit"] == "SUVbw"
    _same_lps_geometry(vol, sitk.ReadImage(str(out)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))).transpose(2, 1, 0), vol.array)


def test_metaimage_identity_grid_is_labelled_rai(tmp_path):
    """The anchor of the convention above: ITK labels an identity (LPS) grid 'RAI'."""
    vol = Volume(np.zeros((3, 4, 5), np.int16), np.eye(4), modality="CT", unit="HU")
    assert _metaimage_header(save(vol, tmp_path / "i.mha"))["AnatomicalOrientation"] == "RAI"
