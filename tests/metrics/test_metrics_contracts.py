"""medfuse.metrics contracts: the fix offered for a 2-D mask on a volume, ``axes`` values, and the documented
effect of a constant source on Qabf."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from medfuse import metrics as M
from medfuse.errors import InvalidInputError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "fusion.md"
SLICE = {0: lambda v, k: v[k, :, :], 1: lambda v, k: v[:, k, :], 2: lambda v, k: v[:, :, k]}


def _volumes(shape, seed=0):
    rng = np.random.default_rng(seed)
    a, b = (rng.integers(0, 256, shape).astype(float) for _ in range(2))
    return np.maximum(a, b), a, b


def _suggestions(fix: str):
    """The mask expressions of the fix, in order: ``np.broadcast_to(<expr>, volume.shape)``."""
    return re.findall(r"across axis (\d) \(slices [^)]*\): np\.broadcast_to\((mask\[[^\]]*\]), volume\.shape\)", fix)


def _follow(expr: str, mask: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """The 3-D mask the fix's expression builds (its text, evaluated as the user would type it)."""
    return np.broadcast_to(eval(expr, {"np": np}, {"mask": mask}), volume.shape)  # noqa: S307 - our own fix text


def test_the_fix_for_a_2d_mask_on_a_cube_puts_it_on_the_axial_slices():
    """Before: "np.broadcast_to(mask, volume.shape)" lined the mask up with the (y, z) plane; on a cube, following
    it scored another region silently (SD 60.21 instead of 60.02 on the probe's volume)."""
    f, a, b = _volumes((24, 24, 24))
    axial = np.zeros((24, 24), bool)
    axial[:9, :] = True  # not symmetric: a mask in the wrong plane selects other pixels
    with pytest.raises(InvalidInputError) as e:
        M.score(f, a, b, mode="native", mask=axial, metrics=["SD", "CC"])
    found = _suggestions(e.value.fix)
    assert [int(ax) for ax, _ in found] == [2, 1, 0]  # every plane of the cube fits; axial first
    m3 = _follow(found[0][1], axial, f)
    assert all((m3[:, :, k] == axial).all() for k in range(f.shape[2]))
    want = M.score(f, a, b, mode="native", mask=np.repeat(axial[:, :, None], f.shape[2], axis=2), metrics=["SD", "CC"])
    got = M.score(f, a, b, mode="native", mask=m3, metrics=["SD", "CC"])
    assert got["SD"] == want["SD"] and got["CC"] == want["CC"]
    assert "np.broadcast_to(mask, volume.shape)" not in e.value.fix


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_2d_mask_of_any_slice_shape_gets_the_fix_for_that_axis(axis):
    """Before: only a mask of shape volume.shape[1:] got the broadcast hint; an axial (x, y) mask on an (x, y, z)
    volume was told to "resample the mask onto the images' grid"."""
    f, a, b = _volumes((30, 20, 10))
    plane = tuple(n for i, n in enumerate(f.shape) if i != axis)
    mask = np.zeros(plane, bool)
    mask[2:plane[0] - 1, 1:plane[1] - 2] = True
    with pytest.raises(InvalidInputError) as e:
        M.score(f, a, b, mode="native", mask=mask, metrics=["SD"])
    found = _suggestions(e.value.fix)
    assert [int(ax) for ax, _ in found] == [axis]
    m3 = _follow(found[0][1], mask, f)
    assert all((SLICE[axis](m3, k) == mask).all() for k in range(f.shape[axis]))
    assert M.score(f, a, b, mode="native", mask=m3, metrics=["SD"])["SD"] == pytest.approx(
        float(np.std(f[m3])), rel=1e-12)


def test_slicewise_fix_names_the_planes_being_scored_first():
    f, a, b = _volumes((16, 16, 16))
    with pytest.raises(InvalidInputError) as e:
        M.score(f, a, b, mode="slicewise", axes=1, mask=np.ones((16, 16), bool), metrics=["SD"])
    assert [int(ax) for ax, _ in _suggestions(e.value.fix)][0] == 1


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), 2.0, 1.5, (1.0,), [0, True], "1", [], [0, 3], None])
def test_axes_must_be_whole_numbers_0_to_2(bad):
    """Before: axes=True was axis 1 and axes=2.0 axis 2 (int(axes))."""
    f, a, b = _volumes((12, 12, 12))
    with pytest.raises(InvalidInputError, match="axes must be an axis"):
        M.score(f, a, b, mode="slicewise", axes=bad, metrics=["SD"])


def test_axes_accept_numpy_integers_and_arrays():
    f, a, b = _volumes((12, 12, 12))
    assert M.score(f, a, b, mode="slicewise", axes=np.int64(2), metrics=["SD"])["axes"] == [2]
    got = M.score(f, a, b, mode="slicewise", axes=np.array([2, 0, 2]), metrics=["SD"])
    assert got["axes"] == [2, 0] and got["SD"] == pytest.approx((got["per_axis"][2]["SD"] + got["per_axis"][0]["SD"]) / 2)


def test_axes_with_a_mode_that_has_no_slices_is_refused_not_ignored():
    """Before: score(F, A, B, axes=1) on 2-D images ran as if axes were not given."""
    f, a, b = _volumes((16, 16, 16))
    with pytest.raises(InvalidInputError, match="axes=1 picks the planes.*mode is '2d'"):
        M.score(f[:, :, 3], a[:, :, 3], b[:, :, 3], axes=1, metrics=["SD"])
    with pytest.raises(InvalidInputError, match="mode is 'native'"):
        M.score(f, a, b, mode="native", axes=(0, 2), metrics=["SD"])
    # All three planes is what the default says: nothing is being picked, so nothing is ignored.
    whole = M.score(f[:, :, 3], a[:, :, 3], b[:, :, 3], metrics=["SD"])
    assert M.score(f[:, :, 3], a[:, :, 3], b[:, :, 3], axes=(2, 1, 0), metrics=["SD"]) == whole
    assert M.score(f, a, b, mode="native", axes=[0, 1, 2], metrics=["SD"])["SD"] == pytest.approx(float(np.std(f)))


def test_docs_state_what_a_constant_source_does_to_qabf(shared):
    """docs/fusion.md said a constant source "adds nothing to Qabf (no edges to preserve)": false for a non-zero
    constant, whose zero-padded Sobel border has strong edges. The figures the docs quote are recomputed here."""
    from medfuse.harvard import load_gray

    text = " ".join(DOCS.read_text(encoding="utf-8").split())
    assert "adds nothing to Qabf (no edges to preserve)" not in text
    m = re.search(r"Qabf of F = B is ([\d.]+) for c = 0, ([\d.]+) for c = 100 and ([\d.]+) for c = 200; "
                  r"of F = max\(A, B\), ([\d.]+), ([\d.]+) and ([\d.]+)", text)
    assert m, "the Degenerate images section quotes the measured Qabf figures"
    quoted = [float(x) for x in m.groups()]
    b = load_gray(shared("data", "harvard-pairs", "CT-MRI", "MRI", "2013.png"))
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fused in (lambda a: b, lambda a: np.maximum(a, b)):
            got += [M.qabf(fused(np.full_like(b, c)), np.full_like(b, c), b) for c in (0, 100, 200)]
    assert quoted == [round(x, 3) for x in got]
    assert got[2] < got[1] < got[0] and got[5] < got[4] < got[3]  # a non-zero constant does weigh in
