"""Which epoch ``medfuse train`` keeps: the selection score with metrics undefined on a validation set."""
import math

import numpy as np
import pytest

from medfuse.fusion.train import selection_score


def _table(ct, pet):
    """A validation table of two pair types; ``ct``/``pet`` are the network's (Qabf, VIF, SSIM)."""
    def row(q, v, s):
        return {"Qabf": q, "VIF": v, "SSIM": s, "SSIM_r2": 1.0, "MI": 2.0}
    return {"CT-MRI": {"network": row(*ct), "max": row(0.5, 0.6, 1.4)},
            "PET-MRI": {"network": row(*pet), "max": row(0.7, 0.9, 1.4)}}


def test_score_is_the_mean_of_qabf_plus_half_vif_and_ssim_over_pair_types():
    table = _table((0.68, 0.80, 1.44), (0.80, 1.00, 1.41))
    want = np.mean([0.68 + 0.5 * (0.80 + 1.44), 0.80 + 0.5 * (1.00 + 1.41)])
    assert selection_score(table) == pytest.approx(want, abs=1e-12)
    assert selection_score(table, ct_qabf=2.0, ct_ssim=1.0) == pytest.approx(want + 2 * 0.68 + 1.44, abs=1e-12)


def test_a_metric_undefined_for_one_pair_type_does_not_make_every_epoch_equal():
    """VIF NaN on every PET-MRI validation pair (a constant PET) made the score NaN, so no later epoch could be
    'better' and the run exported its first epoch."""
    first = _table((0.60, 0.70, 1.40), (0.70, float("nan"), 1.38))
    better = _table((0.68, 0.80, 1.44), (0.80, float("nan"), 1.41))
    s1, s2 = selection_score(first), selection_score(better)
    assert math.isfinite(s1) and math.isfinite(s2) and s2 > s1
    # VIF is averaged over the types that define it (CT-MRI only here).
    assert s2 == pytest.approx(np.mean([0.68, 0.80]) + 0.5 * (0.80 + np.mean([1.44, 1.41])), abs=1e-12)


def test_an_undefined_ct_metric_with_an_extra_weight_stays_finite():
    table = _table((float("nan"), 0.80, 1.44), (0.80, 1.00, 1.41))
    assert math.isfinite(selection_score(table, ct_qabf=2.0))
    assert selection_score(table, ct_qabf=2.0) == selection_score(table)
