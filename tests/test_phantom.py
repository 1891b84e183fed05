"""Tests of the synthetic head phantom and the bundled sample volumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

import medfuse
from medfuse import phantom
from medfuse.errors import InvalidInputError, OutputExistsError, UnreadableFileError

L = phantom.LABELS


@pytest.fixture(scope="module")
def ph():
    return phantom.make_phantom()


@pytest.fixture(scope="module")
def clean():
    """The same subject without noise: for geometry checks that must be exact to a fraction of a voxel."""
    return phantom.make_phantom(noise=False)


def _sample(vol, world_pts, order=1):
    idx = vol.world_to_index(world_pts)
    return ndimage.map_coordinates(vol.array.astype(np.float32), idx.T, order=order, mode="constant")


def _hot_centroid(vol, frac=0.6):
    """World centroid of the connected hot blob around the hottest voxel."""
    a = ndimage.gaussian_filter(vol.array.astype(np.float32), 0.7)
    peak = np.unravel_index(np.argmax(a), a.shape)
    lab, _ = ndimage.label(a > frac * a[peak])
    mask = lab == lab[peak]
    w = np.where(mask, a, 0)
    return vol.index_to_world(np.array(ndimage.center_of_mass(w)))


# ---------------------------------------------------------------------------- determinism
def test_deterministic_rebuild(ph):
    phantom._build_cached.cache_clear()
    again = phantom.make_phantom()
    for name, vol in ph.volumes.items():
        np.testing.assert_array_equal(vol.array, again.volumes[name].array, err_msg=name)
        np.testing.assert_array_equal(vol.affine, again.volumes[name].affine, err_msg=name)
    np.testing.assert_array_equal(ph.transforms["pet"], again.transforms["pet"])


def test_seed_varies_subject(ph):
    other = phantom.make_phantom(seed=3)
    assert not np.array_equal(other.labels.array, ph.labels.array)
    assert np.linalg.norm(other.lesion_center - ph.lesion_center) > 0.5
    assert other.ct.same_grid(ph.ct)  # grids are fixed; anatomy changes
    # brain volume changes by a few percent, not wildly
    brain = lambda p: np.isin(p.labels.array, [L["grey_matter"], L["white_matter"]]).sum()
    assert 0.8 < brain(other) / brain(ph) < 1.2


def test_caller_cannot_corrupt_cache(ph):
    a = phantom.make_phantom()
    a.ct.array[:] = 0
    b = phantom.make_phantom()
    assert b.ct.array.max() > 1000


def test_bad_arguments():
    with pytest.raises(InvalidInputError):
        phantom.make_phantom(seed=-1)
    with pytest.raises(InvalidInputError):
        phantom.make_phantom(misalign={"mri": None})
    with pytest.raises(InvalidInputError):
        phantom.make_phantom(misalign={"pet": np.diag([2.0, 1, 1, 1])})  # not rigid


# ---------------------------------------------------------------------------- volumes and values
def test_volume_metadata(ph):
    expect = {"ct": ("CT", "HU"), "t1": ("MR", "arbitrary"), "t2": ("MR", "arbitrary"),
              "pet": ("PT", "SUVbw"), "spect": ("NM", "counts")}
    for name, (mod, unit) in expect.items():
        v = ph.volumes[name]
        assert (v.modality, v.unit) == (mod, unit), name
        assert v.orientation == "LPS"
    assert ph.t1.spacing == (1.0, 1.0, 1.0)
    assert ph.ct.spacing[:2] == (1.0, 1.0)
    assert ph.pet.spacing[0] > ph.t1.spacing[0] and ph.spect.spacing[0] > ph.pet.spacing[0]
    # the head is centred in the MR grid, which sits at the LPS origin
    np.testing.assert_allclose(ph.t1.center, 0.0, atol=1e-9)
    # CT slices are the mean of 4 MR slices: CT slice centres coincide with the MR slab centres
    np.testing.assert_allclose(ph.ct.index_to_world([0, 0, 0])[2], np.mean(ph.t1.index_to_world([[0, 0, k] for k in range(4)])[:, 2]))


def _ct_pure_labels(ph):
    """MR labels reduced to the CT grid where all 4 MR slices of a CT slab agree (no partial volume)."""
    lab = ph.labels.array.reshape(ph.labels.shape[0], ph.labels.shape[1], -1, 4)
    pure = (lab.min(axis=3) == lab.max(axis=3))
    return np.where(pure, lab[..., 0], 255)


@pytest.mark.parametrize("tissue,lo,hi", [
    ("air", -1001, -999), ("scalp", 30, 50), ("bone", 1000, 1500), ("csf", -5, 15), ("ventricle", -5, 15),
    ("grey_matter", 35, 45), ("white_matter", 25, 35), ("lesion_rim", 45, 65),
])
def test_ct_hu_by_tissue(ph, tissue, lo, hi):
    lab = _ct_pure_labels(ph)
    vals = ph.ct.array[lab == L[tissue]]
    assert vals.size > 20
    assert lo <= np.median(vals) <= hi
    assert ph.ct.array.dtype == np.int16


def test_mr_contrasts(ph):
    lab = ph.labels.array
    med = lambda v, t: np.median(v.array[ndimage.binary_erosion(lab == L[t], iterations=1)])
    assert med(ph.t1, "white_matter") > med(ph.t1, "grey_matter") > med(ph.t1, "csf")
    assert med(ph.t2, "csf") > med(ph.t2, "grey_matter") > med(ph.t2, "white_matter")


def test_pet_uptake_order(ph):
    lab = ph.labels.array
    m = ph.transforms["pet"]

    def mean_in(tissue, erode):
        mask = ndimage.binary_erosion(lab == L[tissue], iterations=erode) if erode else lab == L[tissue]
        pts = ph.labels.index_to_world(np.argwhere(mask)[::7])
        pts_pet = pts @ m[:3, :3].T + m[:3, 3]
        return float(np.mean(_sample(ph.pet, pts_pet)))

    lesion_peak = float(ph.pet.array.max())
    assert 12.0 <= lesion_peak <= 17.0
    gm, deep, wm = mean_in("grey_matter", 0), mean_in("deep_grey", 2), mean_in("white_matter", 4)
    assert lesion_peak > deep > wm
    assert gm > wm
    assert 2.0 < wm < 4.0
    assert float(ph.pet.array[0].max()) == 0.0  # background is exactly 0 at the field-of-view edge
    assert ph.pet.array.min() >= 0


def test_lesion_free_subject(ph):
    free = phantom.make_phantom(lesion=False)
    assert free.lesion_center is None and free.lesion_radius_mm == 0
    assert not np.isin(free.labels.array, [L["lesion_rim"], L["lesion_core"]]).any()
    assert free.ground_truth()["lesion"] is None
    # without the tumour nothing in the PET reaches the lesion's uptake
    assert free.pet.array.max() < 0.8 * ph.pet.array.max()
    # the rest of the anatomy is the same subject
    same = ~np.isin(ph.labels.array, [L["lesion_rim"], L["lesion_core"]])
    np.testing.assert_array_equal(free.labels.array[same], ph.labels.array[same])


def test_lesion_is_left_and_in_brain(ph):
    c = ph.lesion_center
    assert c[0] > 10  # LPS +x is the patient's left
    assert 5.0 <= ph.lesion_radius_mm <= 6.0
    ijk = np.rint(ph.labels.world_to_index(c)).astype(int)
    assert ph.labels.array[tuple(ijk)] == L["lesion_core"]


# ---------------------------------------------------------------------------- geometry / ground truth
def test_ground_truth_maps_lesion_to_pet_hot_blob(ph, clean):
    m = ph.transforms["pet"]
    expected = m[:3, :3] @ ph.lesion_center + m[:3, 3]
    assert np.linalg.norm(expected - ph.lesion_center) > 5  # really misaligned
    for vol in (clean.pet, ph.pet):
        got = _hot_centroid(vol)
        assert np.linalg.norm(got - expected) < vol.spacing[0], (got, expected)


def test_ground_truth_maps_spect_activity_centroid(clean):
    m = clean.transforms["spect"]
    # centroid of the nominal SPECT activity in MR space, carried by the ground truth ...
    act = phantom._SPECT[clean.labels.array]
    c_mr = clean.labels.index_to_world(np.array(ndimage.center_of_mass(act)))
    expected = m[:3, :3] @ c_mr + m[:3, 3]
    # ... lands on the SPECT's own activity centroid (blur and rigid motion keep centroids)
    got = clean.spect.index_to_world(np.array(ndimage.center_of_mass(clean.spect.array)))
    assert np.linalg.norm(got - expected) < 1.0
    angle = np.degrees(np.arccos((np.trace(m[:3, :3]) - 1) / 2))
    assert 5 <= angle <= 12 and 5 <= np.linalg.norm(m[:3, 3]) <= 16


def test_sitk_resample_with_ground_truth_realigns_pet(clean):
    """ITK convention check with SimpleITK itself: Resample(moving=PET, ref=MR, T) puts the lesion on the MR's."""
    import SimpleITK as sitk

    m = clean.transforms["pet"]
    t = sitk.AffineTransform(3)
    t.SetMatrix(m[:3, :3].ravel().tolist())
    t.SetTranslation(m[:3, 3].tolist())
    res = sitk.Resample(clean.pet.to_sitk(), clean.t1.to_sitk(), t, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    back = medfuse.Volume.from_sitk(res, modality="PT", unit="SUVbw")
    assert np.linalg.norm(_hot_centroid(back) - clean.lesion_center) < 1.5


def test_misalign_override(ph):
    aligned = phantom.make_phantom(misalign={"pet": None}, noise=False)
    np.testing.assert_array_equal(aligned.transforms["pet"], np.eye(4))
    np.testing.assert_array_equal(aligned.transforms["spect"], ph.transforms["spect"])  # default kept
    assert np.linalg.norm(_hot_centroid(aligned.pet) - aligned.lesion_center) < aligned.pet.spacing[0]
    custom = phantom.make_phantom(misalign={"pet": {"rotation_deg": (0, 0, 10), "translation_mm": (5, 0, 0)}})
    m = custom.transforms["pet"]
    np.testing.assert_allclose(m[:3, 3], [5, 0, 0])
    np.testing.assert_allclose(np.degrees(np.arctan2(m[1, 0], m[0, 0])), 10.0)


def test_rigid_matrix_matches_sitk():
    import SimpleITK as sitk

    m = phantom.rigid_matrix((4, -7, 9), (3, 2, -1), center=(10, -5, 2))
    t = sitk.Euler3DTransform((10, -5, 2), *np.deg2rad([4, -7, 9]), (3, 2, -1))
    for p in ([0, 0, 0], [30, -40, 12.5]):
        np.testing.assert_allclose(m[:3, :3] @ p + m[:3, 3], t.TransformPoint(p), atol=1e-9)


# ---------------------------------------------------------------------------- files on disk
def _samples_or_fail(samples_dir):
    if not (samples_dir / "ground_truth.json").is_file():
        pytest.fail("sample_volumes/ is missing its files; run `make samples`")
    return samples_dir


def test_bundled_samples_match_phantom(samples_dir, ph):
    folder = _samples_or_fail(samples_dir)
    loaded = phantom.load_samples(folder)
    assert set(loaded) == {"ct", "t1", "t2", "pet", "spect"}
    for name, vol in loaded.items():
        ref = ph.volumes[name]
        assert vol.shape == ref.shape, name
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-3, err_msg=name)
        assert (vol.modality, vol.unit) == (ref.modality, ref.unit), name
    np.testing.assert_array_equal(loaded["ct"].array, ph.ct.array)  # HU exactly
    for name in ("t1", "t2"):
        # MR is stored as integers: a value that lands on a .5 rounding boundary can round
        # either way across NumPy/SciPy builds, so allow 1 unit on a handful of voxels.
        diff = np.abs(loaded[name].array.astype(np.int64) - ph.volumes[name].array.astype(np.int64))
        assert diff.max() <= 1, name
        assert np.count_nonzero(diff) <= 1e-4 * diff.size, name
    np.testing.assert_allclose(loaded["spect"].array, ph.spect.array, rtol=1e-6)
    # PET: SUVbw recovered from Bq/mL + radiopharmaceutical tags, within the int16 quantisation
    step = float(ph.pet.array.max()) / 30000
    np.testing.assert_allclose(loaded["pet"].array, ph.pet.array, atol=max(step, 1e-3), rtol=1e-3)


def test_bundled_ground_truth_and_tfm(samples_dir, ph):
    import SimpleITK as sitk

    folder = _samples_or_fail(samples_dir)
    gt = phantom.load_ground_truth(folder)
    np.testing.assert_allclose(gt["mr_to_pet"], ph.transforms["pet"], atol=1e-9)
    np.testing.assert_allclose(gt["mr_to_spect"], ph.transforms["spect"], atol=1e-9)
    np.testing.assert_allclose(gt["lesion"]["center_lps_mm"], ph.lesion_center, atol=1e-6)
    for key, fname in (("mr_to_pet", "pet_to_mr.tfm"), ("mr_to_spect", "spect_to_mr.tfm")):
        t = sitk.ReadTransform(str(folder / fname))
        p = np.array([12.0, -30.0, 25.0])
        np.testing.assert_allclose(t.TransformPoint(p.tolist()), gt[key][:3, :3] @ p + gt[key][:3, 3], atol=1e-6)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 15e6


#: Header elements that differ on every `make samples` run (new UIDs, the time of writing, a series number drawn
#: from it) or with every release (the version that wrote them).
_PER_RUN = {"SoftwareVersions", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StudyDate", "SeriesDate",
            "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
            "SeriesNumber", "InstanceCreationDate", "InstanceCreationTime",
            "PatientID", "PatientName"}  # the pseudonymous patient: a keyed hash under the run's key


def _stable_header(path):
    import pydicom

    ds = pydicom.dcmread(path)
    return {e.keyword or str(e.tag): str(e.value) for e in ds
            if e.keyword not in _PER_RUN and e.tag != 0x7FE00010}, ds.pixel_array


@pytest.mark.parametrize("series", ["ct", "pet"])
def test_bundled_dicom_samples_are_what_the_writer_writes_now(samples_dir, tmp_path, series):
    """The bundled series carry the current writer's header (a stale one said Manufacturer "medfuse", which
    dcm2niix reads as the vendor Mediso): regenerate them with `make samples` when the writer changes."""
    folder = _samples_or_fail(samples_dir)
    phantom.write_samples(tmp_path)
    bundled, fresh = sorted((folder / series).iterdir()), sorted((tmp_path / series).iterdir())
    assert [f.name for f in bundled] == [f.name for f in fresh]
    for old, new in ((bundled[0], fresh[0]), (bundled[-1], fresh[-1])):
        (h_old, px_old), (h_new, px_new) = _stable_header(old), _stable_header(new)
        changed = sorted(k for k in h_old.keys() | h_new.keys() if h_old.get(k) != h_new.get(k))
        assert not changed, f"{series}/{old.name}: {changed} differ from a fresh write; run `make samples`"
        np.testing.assert_array_equal(px_old, px_new)


def test_load_samples_without_files_builds_in_memory(monkeypatch, ph):
    monkeypatch.delenv("MEDFUSE_SAMPLES", raising=False)
    monkeypatch.setattr(phantom, "default_samples_folder", lambda: None)
    vols = phantom.load_samples()
    np.testing.assert_array_equal(vols["ct"].array, ph.ct.array)
    gt = phantom.load_ground_truth()
    np.testing.assert_allclose(gt["mr_to_pet"], ph.transforms["pet"])


def test_default_folder_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDFUSE_SAMPLES", str(tmp_path))
    assert phantom.default_samples_folder() == tmp_path
    with pytest.raises(UnreadableFileError):
        phantom.load_samples()
    with pytest.raises(UnreadableFileError):
        phantom.load_ground_truth()


@pytest.mark.slow
def test_write_samples_roundtrip_and_refuse_overwrite(tmp_path, ph):
    pytest.importorskip("medfuse.io.writers")
    out = tmp_path / "s"
    assert phantom.main(["--write", str(out)]) == 0
    ct = medfuse.load(out / "ct")
    np.testing.assert_array_equal(ct.array, ph.ct.array)
    np.testing.assert_allclose(ct.affine, ph.ct.affine, atol=1e-3)
    pet = medfuse.load(out / "pet")
    assert pet.unit == "SUVbw"
    gt = json.loads((out / "ground_truth.json").read_text())
    assert gt["regenerate"].startswith("python -m medfuse.phantom")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError):
        phantom.write_samples(out)
    assert phantom.main(["--write", str(out)]) == 2
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}  # nothing touched


def test_lesion_contrast_sees_the_hot_spot_on_pet_and_the_dark_core_on_t1():
    """``lesion_contrast``: core minus shell around the ground-truth lesion, on any grid via the affine."""
    from medfuse.phantom import lesion_contrast, make_phantom

    ph = make_phantom(seed=0, misalign={"pet": None})  # the PET in MR space, on its own 3 mm grid
    c, r = ph.lesion_center, ph.lesion_radius_mm
    assert lesion_contrast(ph.pet.array, ph.pet.affine, c, r) > 0  # uptake
    assert lesion_contrast(ph.t1.array, ph.t1.affine, c, r) < 0  # the MR's darker core
    assert lesion_contrast(np.ones(ph.t1.shape), ph.t1.affine, c, r) == 0.0


def test_write_samples_into_a_folder_it_cannot_make_is_a_typed_write_error(tmp_path):
    """A file where a parent folder should be raised a raw NotADirectoryError from mkdir."""
    import errno

    from medfuse.errors import OutputWriteError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputWriteError, match="cannot make the samples' folder") as info:
        phantom.write_samples(tmp_path / "afile" / "samples")
    assert info.value.errno == errno.ENOTDIR and not isinstance(info.value, OutputExistsError)
