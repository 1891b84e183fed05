"""The report records the seed and every setting a registration used (a sidecar named the preset alone; the
caller's overrides, the field-of-view scaling and the seed change the result)."""

import json

import numpy as np

import medfuse


def _pair():
    g = np.mgrid[:41, :45, :37].astype(np.float32)
    blob = 100 * np.exp(-((g[0] - 20) ** 2 + (g[1] - 22) ** 2 + (g[2] - 18) ** 2) / 150)
    return (medfuse.Volume(blob + 10, np.eye(4), modality="MR"),
            medfuse.Volume(np.roll(blob, 1, axis=2) + 10, np.eye(4), modality="MR"))


def test_the_seed_overrides_and_scaled_settings_are_in_the_report_and_rerun_it():
    import SimpleITK as sitk

    fixed, moving = _pair()
    # One ITK thread: with more, reruns differ in the last digits (6.6e-13 seen with two under load), as the
    # command line's --threads help says; one thread repeats a registration bit for bit.
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        _rerun_from_the_record(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _rerun_from_the_record(fixed, moving):
    r = medfuse.register(fixed, moving, kind="rigid", seed=3, samples=5000)
    d = json.loads(json.dumps(r.report.to_dict()))  # as a sidecar holds it
    assert d["seed"] == 3 and d["settings"]["samples"] == 5000
    assert d["fov_scale"] is not None and d["settings"]["levels_mm"][-1] < 2.0  # a 41 mm image: scaled down
    # The record alone reruns it: the settings as overrides (already scaled: no second scaling), the same seed.
    assert "metric" not in d["settings"]  # the run's metric is d["metric"]: a rerun passes both without a clash
    again = medfuse.register(fixed, moving, kind=d["kind"], metric=d["metric"], seed=d["seed"], preset=d["preset"],
                             **d["settings"])
    np.testing.assert_array_equal(again.transform.matrix, r.transform.matrix)
