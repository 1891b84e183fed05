"""Files sharing one SeriesInstanceUID under different SeriesNumbers are several series; volumes without a time
order are said to be so; the transfer syntax is each volume's own; the "loaded alone" warning points at the
caller.

The 9 files of ``qa-transfer-syntaxes`` share one SeriesInstanceUID under SeriesNumbers 1..9 (dcm2niix writes 9
series). They were read as one 4-D series of 9 identical "volumes" whose time keys were all equal, each recorded
with the first file's transfer syntax.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import medfuse
from medfuse.errors import MedfuseWarning, MultipleSeriesError


def _ts_folder(shared) -> Path:
    return shared("data", "dicom", "qa-transfer-syntaxes", "In")


def _ts_files(shared):
    return sorted(_ts_folder(shared).glob("*.dcm"), key=lambda f: int(f.stem))


def _header(f: Path):
    return pydicom.dcmread(f, stop_before_pixels=True)


def _said(w, text: str):
    return [x for x in w if issubclass(x.category, MedfuseWarning) and text in str(x.message)]


def test_scan_lists_one_series_per_series_number(shared):
    files = _ts_files(shared)
    headers = [_header(f) for f in files]
    uids = {str(h.SeriesInstanceUID) for h in headers}
    numbers = sorted(int(h.SeriesNumber) for h in headers)
    assert len(uids) == 1 and len(set(numbers)) == len(files)  # the premise: one UID, a number per file
    series = medfuse.scan(_ts_folder(shared))
    assert len(series) == len(files)
    uid = uids.pop()
    assert [s.series_uid for s in series] == [f"{uid}#{n}" for n in numbers]
    assert all(s.n_volumes == 1 and s.n_files == 1 and s.shape == series[0].shape for s in series)


def test_whole_series_of_one_file_is_that_files_own_series(shared):
    for f in _ts_files(shared):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            whole = medfuse.load_volumes(f, whole_series=True)
            alone = medfuse.load(f)
        assert len(whole) == 1, f.name
        assert np.array_equal(whole[0].array, alone.array) and np.allclose(whole[0].affine, alone.affine)
        own = str(_header(f).file_meta.TransferSyntaxUID)
        assert whole[0].provenance["transfer_syntax"] == own == alone.provenance["transfer_syntax"], f.name
        assert whole[0].provenance["series_uid"] == str(_header(f).SeriesInstanceUID)  # the real UID
        assert not _said(w, "was loaded alone"), f.name  # no other file has its SeriesNumber


def test_a_series_picked_in_the_folder_records_its_own_transfer_syntax(shared):
    folder = _ts_folder(shared)
    files = _ts_files(shared)
    syntaxes = {int(_header(f).SeriesNumber): str(_header(f).file_meta.TransferSyntaxUID) for f in files}
    assert len(set(syntaxes.values())) > 1
    with pytest.raises(MultipleSeriesError) as e:
        medfuse.load(folder)
    assert len(e.value.choices) == len(files)
    for key in e.value.choices:
        v = medfuse.load(folder, series_uid=key)
        assert v.provenance["transfer_syntax"] == syntaxes[int(key.split("#")[1])]


def test_the_shared_uid_itself_names_the_series_it_is_split_into(shared):
    folder = _ts_folder(shared)
    uid = str(_header(_ts_files(shared)[0]).SeriesInstanceUID)
    with pytest.raises(MultipleSeriesError) as e:
        medfuse.load(folder, series_uid=uid)
    assert e.value.choices == [s.series_uid for s in medfuse.scan(folder)]
    assert uid not in str(e.value)  # UIDs stay out of messages
    # A file's own UID with whole_series is not "another series".
    f = _ts_files(shared)[-1]
    assert medfuse.load(f, whole_series=True, series_uid=uid).provenance["series_uid"] == uid


def _copy_as(src: Path, dst: Path, **values) -> Path:
    ds = pydicom.dcmread(src)
    for k, v in values.items():
        setattr(ds, k, v)
    ds.save_as(dst)
    return dst


def test_a_series_split_by_number_keeps_its_other_files_together(shared, tmp_path):
    """Two numbers under one UID, two files each: whole_series brings the file's own number only, and loading
    one file alone counts the files of its own number."""
    one, two = _ts_files(shared)[:2]
    n1, n2 = int(_header(one).SeriesNumber), int(_header(two).SeriesNumber)
    a = _copy_as(one, tmp_path / "a.dcm")
    b = _copy_as(one, tmp_path / "b.dcm", SOPInstanceUID=generate_uid(), AcquisitionTime="235959", InstanceNumber=2)
    _copy_as(two, tmp_path / "c.dcm")
    _copy_as(two, tmp_path / "d.dcm", SOPInstanceUID=generate_uid(), AcquisitionTime="235959", InstanceNumber=2)
    assert sorted(s.series_uid.split("#")[1] for s in medfuse.scan(tmp_path)) == sorted([str(n1), str(n2)])
    vols = medfuse.load_volumes(b, whole_series=True)
    assert len(vols) == 2 and {v.provenance["transfer_syntax"] for v in vols} == {
        str(_header(one).file_meta.TransferSyntaxUID)}
    with pytest.warns(MedfuseWarning, match="one of 2 files of its series"):
        medfuse.load(a)


def test_volumes_without_a_time_order_are_warned_about(shared, tmp_path):
    """Two files of one series and number at the same positions with the same time key: a 4-D series whose
    order is only the files' order, said in a warning kept in provenance."""
    src = _ts_files(shared)[0]
    _copy_as(src, tmp_path / "a.dcm")
    _copy_as(src, tmp_path / "b.dcm", SOPInstanceUID=generate_uid())
    with pytest.warns(MedfuseWarning, match="no time order") as w:
        vols = medfuse.load_volumes(tmp_path)
    assert len(vols) == 2 and all(any("no time order" in n for n in v.provenance["warnings"]) for v in vols)
    assert _said(w, "no time order")[0].filename == __file__  # at the caller's line


def test_each_volume_records_the_transfer_syntax_of_its_own_files(shared, tmp_path):
    """A 4-D series whose volumes were stored in two syntaxes (same number, time points apart)."""
    first, second = _ts_files(shared)[:2]
    ts = [str(_header(f).file_meta.TransferSyntaxUID) for f in (first, second)]
    assert ts[0] != ts[1]
    number = _header(first).SeriesNumber
    _copy_as(first, tmp_path / "a.dcm", AcquisitionTime="100000")
    _copy_as(second, tmp_path / "b.dcm", AcquisitionTime="100010", SeriesNumber=number)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)  # ordered by time: nothing to say
        vols = medfuse.load_volumes(tmp_path)
    assert [v.provenance["transfer_syntax"] for v in vols] == ts


def test_the_real_4d_series_load_as_before_without_a_time_order_warning(shared):
    ge = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE", "mr_0005")
    mosaic = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918Si", "mr_0003")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        g = medfuse.load_volumes(ge)
        m = medfuse.load_volumes(mosaic)
    assert not _said(w, "no time order") and not _said(w, "frame types")
    assert len(g) == 10 and g[0].shape == (64, 64, 15) and len(m) == 2 and m[0].shape == (72, 72, 5)
    assert not np.array_equal(g[0].array, g[-1].array)  # time points, not one volume repeated
    assert [s.n_volumes for s in medfuse.scan(ge)] == [10]


def test_magnitude_and_field_map_of_one_file_are_said_to_be_different_images(shared):
    f = shared("data", "dicom", "qa-enhanced-multiframe", "In", "Philips", "IM_0027_fMAP.dcm")
    with pytest.warns(MedfuseWarning, match=r"frame types \(M, FIELD_MAP") as w:
        vols = medfuse.load_volumes(f)
    assert len(vols) == 2 and any("FIELD_MAP" in n for n in vols[1].provenance["warnings"])
    assert _said(w, "frame types")[0].filename == __file__


@pytest.mark.parametrize("how", ["load", "load_volumes"])
def test_loaded_alone_warning_points_at_the_callers_line(samples_dir, how):
    one = samples_dir / "ct" / "IM00020.dcm"
    with pytest.warns(MedfuseWarning, match="was loaded alone") as w:
        getattr(medfuse, how)(one)
    assert [x.filename for x in _said(w, "was loaded alone")] == [__file__]


def test_one_file_without_a_series_number_does_not_split_its_series(samples_dir, tmp_path):
    """An empty SeriesNumber is no sign of another series: one such file among the sample CT's 40 made the folder
    two series (39 files and 1), and neither loaded."""
    files = sorted((samples_dir / "ct").glob("*.dcm"))
    for i, f in enumerate(files):
        _copy_as(f, tmp_path / f.name, **({"SeriesNumber": None} if i in (0, 7) else {}))
    assert _header(tmp_path / files[7].name).get("SeriesNumber") in (None, "")
    series = medfuse.scan(tmp_path)
    assert len(series) == 1 and "#" not in series[0].series_uid and series[0].n_files == len(files)
    whole = medfuse.load(tmp_path)
    assert whole.shape == medfuse.load(samples_dir / "ct").shape
    assert whole.provenance["series_number"] == str(int(_header(files[0]).SeriesNumber))
    # the file without a number is one of the series' files, and its series has the others' number
    with pytest.warns(MedfuseWarning, match=f"one of {len(files)} files of its series"):
        medfuse.load(tmp_path / files[7].name)
    own = medfuse.load(tmp_path / files[7].name, whole_series=True)
    assert own.shape == whole.shape and own.provenance["series_number"] == whole.provenance["series_number"]


def test_a_listed_uid_number_key_loads_from_the_sub_folder_holding_that_number_alone(shared, tmp_path):
    """A study folder with one of these series per sub-folder lists them as UID#3 and UID#4; loading a listed
    key from its sub-folder (which holds the UID unsplit) matched nothing, so napari's reader opened nothing."""
    import shutil

    files = _ts_files(shared)
    for number in (3, 4):
        (tmp_path / f"s{number}").mkdir()
        shutil.copy(files[number - 1], tmp_path / f"s{number}" / f"{number}.dcm")
    listed = {Path(s.folder).name: s.series_uid for s in medfuse.scan(tmp_path)}
    assert sorted(listed) == ["s3", "s4"] and all("#" in k for k in listed.values())
    for name, key in listed.items():
        vol = medfuse.load(tmp_path / name, series_uid=key)
        assert vol.provenance["series_number"] == name[1:]
    with pytest.raises(medfuse.InvalidInputError, match="no series in this folder matches"):
        medfuse.load(tmp_path / "s3", series_uid=listed["s4"])  # another number: not this series
