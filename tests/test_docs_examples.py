"""The examples a newcomer copies from the docs work as written.

1. Every fenced ```python block of the documents in ``DOCS`` runs. Each document's blocks run in order in one
   fresh interpreter (a later block may use names an earlier one defined, as a reader's session would), in a
   scratch folder laid out like the repository root: ``sample_volumes`` links to the bundled samples and
   ``../shared`` to the team's data, so the docs' relative paths resolve and their outputs land in the scratch
   folder, never in the repository. A failing block fails the test, with the document's line numbers in the
   traceback.

   A ``MedfuseWarning`` raised by a block is an error: a copied example should not warn unasked.

   Markers, HTML comments on the lines just above a block's opening fence (one per line, several allowed):

   - ``<!-- not-run: reason -->``: the block is not run (a GPU, hours of training, paths that stand for the
     reader's own data); the reason is required and stays visible in the rendered source.
   - ``<!-- needs-shared -->``: the block reads ``../shared``; without it the document's blocks are skipped, and
     in CI (``CI=true``) that is a failure, as for every real-data test (``tests/conftest.py``).
   - ``<!-- warns: reason -->``: the block shows a warning on purpose; its MedfuseWarnings are allowed.

   A misspelt marker fails ``test_markers_are_recognised`` rather than passing as "no marker".

2. Every ``medfuse ...`` line of the documents' ```bash blocks, and every example in ``medfuse <cmd> --help``,
   parses with the real command-line parser (option names, choices, required arguments).

3. Every option of every command appears in the command-line section of docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLES, SHARED, shared_path

DOCS = ["README.md", "docs/pipeline.md", "docs/phantom.md", "docs/dicom.md", "docs/io.md", "docs/architecture.md",
        "docs/registration.md", "docs/classifier.md", "docs/fusion.md"]

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"^<!--\s*(not-run|needs-shared|warns)\s*(?::\s*(.*?))?\s*-->\s*$")


def blocks(doc: str, lang: str):
    """``(first_line, code, marks)`` for each fenced block of ``lang`` in ``doc`` (1-based lines); ``marks`` maps
    each marker on the lines just above the opening fence to its reason."""
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if m.group(1) == lang:
            marks, k = {}, i - 1
            while k >= 0 and (mark := _MARK.match(lines[k].strip())):
                marks[mark.group(1)] = mark.group(2) or ""
                k -= 1
            out.append((i + 2, "\n".join(lines[i + 1:j]), marks))
        i = j + 1
    return out


# A MedfuseWarning is an error unless the block is marked "warns": a copied example should not warn unasked.
_RUNNER = textwrap.dedent('''
    import sys, json, warnings
    from medfuse.errors import MedfuseWarning
    blocks = json.load(open(sys.argv[1]))
    ns = {"__name__": "__main__"}
    for doc, line, code, may_warn in blocks:
        print(f"--- {doc}:{line}", file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("default" if may_warn else "error", MedfuseWarning)
            exec(compile("\\n" * (line - 1) + code, doc, "exec"), ns)
''')


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d, "python")])
def test_python_blocks_run(doc, tmp_path):
    import json

    found = blocks(doc, "python")
    for line, _code, marks in found:
        for mark in ("not-run", "warns"):
            if mark in marks:
                assert marks[mark], f"{doc}:{line}: a {mark} block must say why (<!-- {mark}: reason -->)"
    run = [(doc, line, code, "warns" in marks) for line, code, marks in found if "not-run" not in marks]
    if not run:
        pytest.skip(f"{doc}: every python block is marked not-run")
    if any("needs-shared" in marks for *_, marks in found if "not-run" not in marks):
        shared_path()  # skip (fail in CI) when ../shared is absent

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "sample_volumes").symlink_to(SAMPLES, target_is_directory=True)
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    (tmp_path / "blocks.json").write_text(json.dumps(run))
    (tmp_path / "runner.py").write_text(_RUNNER)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"a python block of {doc} failed:\n{proc.stderr[-6000:]}"


def test_markers_are_recognised():
    """A marker the test would not recognise (a typo) must not pass as 'no marker' silently."""
    for doc in DOCS:
        for n, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), start=1):
            if re.match(r"^<!--\s*(not[- ]?run|needs[- ]?shared|warns?\b)", line.strip(), re.I):
                assert _MARK.match(line.strip()), f"{doc}:{n}: malformed marker {line.strip()!r}"


# ----------------------------------------------------------------------------- command lines
def _parsers():
    """``{command: parser}`` for every medfuse command, evaluate's and train's own parsers included."""
    from medfuse import cli

    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {"": top, **sub.choices}
    for name, module in (("evaluate", "medfuse.evaluate"), ("train", "medfuse.fusion.train")):
        import importlib

        p = argparse.ArgumentParser(prog=f"medfuse {name}")
        importlib.import_module(module).add_arguments(p)
        parsers[name] = p
    return parsers


def _options(parser):
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def _doc_command_lines():
    """``(where, argv)`` for each ``medfuse ...`` line of the documents' bash blocks."""
    out = []
    for doc in DOCS:
        for line, code, marks in blocks(doc, "bash"):
            if "not-run" in marks:
                continue
            for k, text in enumerate(code.splitlines()):
                argv = shlex.split(text, comments=True)
                if argv[:1] == ["medfuse"]:
                    out.append((f"{doc}:{line + k}", argv[1:]))
                elif argv[1:3] == ["-m", "medfuse.fusion.train"]:  # the README's training recipe
                    out.append((f"{doc}:{line + k}", ["train", *argv[3:]]))
    return out


def _help_examples(parsers):
    """``(where, argv)`` for each ``medfuse ...`` example in a command's description or epilog."""
    out = []
    for name, p in parsers.items():
        for text in (p.description or "", p.epilog or ""):
            for ln in text.splitlines():
                ln = re.split(r"\s{2,}", ln.strip())[0]
                if ln.startswith("medfuse ") and not ln.startswith("medfuse COMMAND"):
                    out.append((f"medfuse {name} --help".replace("  ", " "), shlex.split(ln)[1:]))
    return out


def _parse(parsers, argv):
    cmd, rest = argv[0], argv[1:]
    if cmd in ("evaluate", "train"):
        return parsers[cmd].parse_args(rest)
    return parsers[""].parse_args(argv)


def test_documented_command_lines_parse(capsys):
    parsers = _parsers()
    cases = _doc_command_lines() + _help_examples(parsers)
    assert len(cases) >= 15, cases  # the README alone has more: the extraction must not silently find nothing
    bad = []
    for where, argv in cases:
        if argv[-1:] == ["--help"]:
            assert argv[0] in parsers, f"{where}: no command {argv[0]!r}"
            continue
        try:
            _parse(parsers, argv)
        except SystemExit:
            bad.append(f"{where}: medfuse {' '.join(argv)}\n    {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert not bad, "documented command lines the parser refuses:\n" + "\n".join(bad)


def test_every_option_is_in_the_pipeline_docs():
    text = (ROOT / "docs/pipeline.md").read_text(encoding="utf-8")
    section = text[text.index("## Command line"):text.index("## Batch runs")]
    missing = {name or "medfuse": sorted(o for o in _options(p) if not re.search(re.escape(o) + r"(?![\w-])", section))
               for name, p in _parsers().items()}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"options missing from docs/pipeline.md's command-line section: {missing}"
