"""Every ``--option`` that medfuse's messages, help and docstrings tell a user to type exists.

Error fixes say things like "pass --overwrite" or "use --series"; an option renamed or removed later would leave
a fix that fails with argparse's "unrecognized arguments". This reads every ``--name`` in the package's source and
checks it against the real parsers of ``medfuse``, ``medfuse evaluate``, ``medfuse train`` and the phantom writer.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tests.conftest import ROOT

#: Options of other programs that medfuse's messages name.
OTHER_TOOLS = {"--raw": "gdcmconv --raw (decompress DICOM)", "--stack": "napari --stack (open paths as one stack)",
               "--force-reinstall": "pip install --force-reinstall (a package that is installed but broken)"}

# An option as written in text; not a prefix an f-string or a shorthand completes ("--select-min-{name}",
# "--select-min/max", "--select-min-*").
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w{/*-])")


def _options() -> set:
    import medfuse.evaluate as evaluate
    import medfuse.fusion.train as train
    from medfuse.cli import build_parser

    found: set = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            found.update(s for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    for module in (evaluate, train):  # their options are added when the command runs
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        walk(parser)
    # python -m medfuse.phantom builds its parser inside main(): read its add_argument calls.
    phantom = (ROOT / "medfuse" / "phantom.py").read_text(encoding="utf-8")
    found.update(re.findall(r'add_argument\("(--[a-z0-9-]+)"', phantom))
    return found


def test_every_option_a_message_names_exists():
    known = _options() | set(OTHER_TOOLS)
    unknown = []
    for path in sorted([*(ROOT / "medfuse").rglob("*.py"), *(ROOT / "napari_plugin").rglob("*.py")]):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            unknown += [f"{path.relative_to(ROOT)}:{n}: {m}" for m in _OPTION.findall(line) if m not in known]
    assert not unknown, "options named in the source that no parser has:\n" + "\n".join(unknown)


def test_the_check_sees_a_wrong_option():
    assert _OPTION.findall('fix="pass --overwrite, or --select-min-{name} and --no-such-thing"') == [
        "--overwrite", "--no-such-thing"]
    assert "--no-such-thing" not in _options()
