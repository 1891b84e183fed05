"""Benchmark: medfuse.load on a synthetic 512x512x300 CT series vs SimpleITK and a plain pydicom loop.

Run: ``.venv/bin/python benchmarks/load_dicom.py [--slices 300] [--repeat 3]``. Prints the best-of-N
seconds of each reader in the same run and the ratios (goal: medfuse <= 1.2x SimpleITK).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import medfuse


def write_series(folder: Path, n: int, size: int = 512) -> None:
    rng = np.random.default_rng(0)
    uid = generate_uid()
    names = list(range(n))
    random.Random(0).shuffle(names)  # file names unrelated to position
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.InstanceNumber = "CT", uid, "1.2.3", k + 1
        ds.ImagePositionPatient = [-250.0, -250.0, 1.25 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.977, 0.977], 1.25
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        ds.save_as(str(folder / f"IM{names[k]:05d}"), enforce_file_format=True)


def read_sitk(folder: Path) -> np.ndarray:
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(folder)))
    return np.transpose(sitk.GetArrayFromImage(r.Execute()), (2, 1, 0))


def read_pydicom(folder: Path) -> np.ndarray:
    dss = [pydicom.dcmread(p) for p in folder.iterdir()]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    arr = np.stack([d.pixel_array.astype(np.int16) * int(d.RescaleSlope) + int(d.RescaleIntercept) for d in dss], -1)
    return np.transpose(arr, (1, 0, 2))


def best(fn, folder, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(folder)
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_series(folder, a.slices)
        t_sitk, ref = best(read_sitk, folder, a.repeat)
        t_pyd, arr_pyd = best(read_pydicom, folder, a.repeat)
        t_mf, vol = best(lambda f: medfuse.load(f), folder, a.repeat)
        assert np.array_equal(vol.array, ref), "medfuse and SimpleITK voxels differ"
        assert np.array_equal(arr_pyd, ref), "pydicom loop and SimpleITK voxels differ"
        print(f"512x512x{a.slices} CT, best of {a.repeat}, {os.cpu_count()} CPUs")
        print(f"medfuse.load            {t_mf:7.3f} s")
        print(f"SimpleITK SeriesReader  {t_sitk:7.3f} s   ratio medfuse/SimpleITK = {t_mf / t_sitk:.2f} (goal <= 1.2)")
        print(f"pydicom loop            {t_pyd:7.3f} s   ratio medfuse/pydicom   = {t_mf / t_pyd:.2f}")


if __name__ == "__main__":
    main()
