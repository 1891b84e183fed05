"""An output made by an earlier medfuse whose results differ is redone: an upgrade kept outputs made by rules
since changed as up to date, while the version (0.1.0 throughout) could not tell them apart."""

import json

from medfuse import provenance
from medfuse.batch import read_manifest, run_batch, write_phantom_subjects


def test_an_output_without_the_current_results_version_is_redone_once(tmp_path):
    manifest = write_phantom_subjects(tmp_path, 1, first_seed=1, method="max", register=None, downsample=4)
    first = run_batch(manifest, scheduler="synchronous")
    (row,) = first.results
    assert row.status == "done"
    side = provenance.sidecar_path(read_manifest(manifest)[0].output)
    rec = json.loads(side.read_text())
    assert rec["results_version"] == provenance.RESULTS_VERSION
    del rec["results_version"]  # as a sidecar written before December 2026
    side.write_text(json.dumps(rec))
    (again,) = run_batch(manifest, scheduler="synchronous").results
    assert again.status == "done"
    assert again.note == (f"redone: made by an earlier medfuse, whose results may differ (results version none "
                          f"recorded, now {provenance.RESULTS_VERSION})")
    (third,) = run_batch(manifest, scheduler="synchronous").results
    assert third.status == "skipped"
