"""The registration report states the scale factor a small field of view put on the preset's mm settings."""

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from medfuse.phantom import rigid_matrix
from medfuse.registration import register
from medfuse.volume import Volume


def _pair(n: int, spacing: float):
    """A smooth random n^3 volume and a copy turned and shifted by a fraction of a voxel's worth per axis."""
    x = gaussian_filter(np.random.default_rng(0).random((n, n, n)), 1.5).astype(np.float32)
    A = np.diag([spacing] * 3 + [1.0])
    f = Volume(x, A, modality="MR")
    M = rigid_matrix((3, -2, 2), (0.2 * spacing, -0.1 * spacing, 0.15 * spacing), center=f.center)
    return f, Volume(x.copy(), M @ A, modality="MR")


@pytest.mark.parametrize("n, spacing", [(24, 0.5), (32, 0.3)])
def test_a_small_field_of_view_reports_the_scale_it_put_on_the_preset(n, spacing):
    """A 12 mm image ran with the preset's mm settings scaled by 0.15, and the report did not say so: the settings
    a result was made with could not be told from it (or from the sidecar that records the report)."""
    from medfuse.registration.presets import get_preset

    f, m = _pair(n, spacing)
    rep = register(f, m, kind="rigid").report
    extent = n * spacing  # the largest extent of the smaller image (both are one size here)
    assert rep.fov_scale == pytest.approx(extent / 80.0), rep.to_dict()
    assert json.loads(json.dumps(rep.to_dict()))["fov_scale"] == pytest.approx(rep.fov_scale)
    # It is the factor the settings were scaled by: the finest step and the pyramid, for two.
    from medfuse.registration.register import _fit_to_field_of_view

    preset = get_preset(None, "MR", "MR")
    used = _fit_to_field_of_view(preset, f, m, set())
    assert used["final_mm"] == pytest.approx(preset["final_mm"] * rep.fov_scale)
    assert used["levels_mm"] == pytest.approx([x * rep.fov_scale for x in preset["levels_mm"]])


def test_human_sized_images_report_no_scale():
    """Images of 80 mm or more run with the preset as it is: fov_scale None."""
    f, m = _pair(24, 4.0)  # 96 mm
    assert register(f, m, kind="rigid").report.fov_scale is None


def test_cli_register_records_the_scale_in_its_sidecar(tmp_path, capsys):
    """``medfuse register`` keeps the report in the output's provenance sidecar: the scale is there too."""
    from medfuse.cli import main
    from medfuse.io import save

    f, m = _pair(24, 0.5)
    a, b, out = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", tmp_path / "out.nii.gz"
    save(f, a)
    save(m, b)
    assert main(["register", str(a), str(b), "-o", str(out), "--kind", "rigid", "--no-progress"]) == 0, \
        capsys.readouterr().err
    rec = json.loads((tmp_path / "out.json").read_text())
    assert rec["registration"][0]["fov_scale"] == pytest.approx(24 * 0.5 / 80.0), rec["registration"][0]
    assert "small field of view" in capsys.readouterr().err  # said where the user reads the run
