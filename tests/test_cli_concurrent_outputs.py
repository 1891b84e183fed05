"""Two runs writing the same outputs: a run whose write fails takes back only the files it wrote itself."""
from pathlib import Path

import medfuse.registration
from medfuse.cli import EXIT_USAGE, main
from medfuse.errors import OutputExistsError

SAMPLES = Path(__file__).resolve().parents[1] / "sample_volumes"


def test_a_failed_register_keeps_the_outputs_another_run_wrote_meanwhile(tmp_path, monkeypatch, capsys):
    """Run B's save failed ("the output exists") because run A had just written the same outputs; B then removed
    A's finished image, transform and sidecar as "the outputs this run had written", while A reported success."""
    import medfuse.cli as cli

    out = tmp_path / "r.nii.gz"
    theirs = {out: b"image of run A", out.with_suffix("").with_suffix(".tfm"): b"transform of run A",
              out.with_suffix("").with_suffix(".json"): b"{}"}

    def other_run_wins(args, res, out_, tfm, seconds, **_):
        for path, data in theirs.items():  # run A finishes while this run registered
            path.write_bytes(data)
        raise OutputExistsError("the output exists", fix="choose another path", path=out_)

    monkeypatch.setattr(medfuse.registration, "register", lambda *a, **k: object())
    monkeypatch.setattr(cli, "_write_registration", other_run_wins)
    rc = main(["register", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", str(out),
               "--no-progress"])
    assert rc == EXIT_USAGE
    assert {p: p.read_bytes() for p in theirs} == theirs
    assert "removed" not in capsys.readouterr().err


def test_a_register_whose_own_write_fails_still_takes_back_what_it_wrote(tmp_path, monkeypatch):
    """The clean-up itself stays: an image this run wrote before its transform failed is removed."""
    import medfuse.cli as cli

    out = tmp_path / "r.nii.gz"

    def image_then_fail(args, res, out_, tfm, seconds, **_):
        out_.write_bytes(b"this run's image")
        args.outputs.mark(out_)
        raise OutputExistsError("the transform cannot be written", fix="choose another path", path=tfm)

    monkeypatch.setattr(medfuse.registration, "register", lambda *a, **k: object())
    monkeypatch.setattr(cli, "_write_registration", image_then_fail)
    assert main(["register", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", str(out),
                 "--no-progress"]) == EXIT_USAGE
    assert not out.exists()


def test_outputs_marks_are_what_the_run_wrote(tmp_path):
    from medfuse.cli import _Outputs

    a, b = tmp_path / "a", tmp_path / "b"
    outs = _Outputs(a, b)
    a.write_text("mine")
    outs.mark(a)
    b.write_text("someone else's")
    assert outs.own() == [a] and outs.written() == [a]
    a.write_text("replaced by another run")
    assert outs.own() == []
