"""README.md and docs/*.md: every relative link reaches a file (and a heading), every documented command parses.

Commands are read from ```bash blocks (each line a whole command: parsed in full) and from inline code spans
(often a fragment of a command: only its verb and options are checked). A ``bild <verb>`` command is checked
against the ``bild`` parser, a ``scripts/<name>.py`` command against that script's own ``parse_args``.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from functools import cache
from pathlib import Path
from unittest import mock

import pytest

from bild.bench.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)  # list items indent theirs
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
VERBS = ("generate", "bench", "sweep", "calibrate", "align")
COMMAND = re.compile(rf"(^|\s)bild ({'|'.join(VERBS)})\b|scripts/\w+\.py")


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The page without its fenced code blocks (links and inline code in them are not Markdown)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", prose(path.read_text(encoding="utf-8")), re.M)}


def test_the_docs_are_there():
    names = {path.name for path in PAGES}
    assert {"README.md", "index.md", "usage.md", "how-it-works.md", "command-line.md", "measured.md"} <= names
    assert {"calibration-and-alignment.md", "offline-models-and-data.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_point_to_existing_files(page):
    broken = []
    for match in LINK.finditer(prose(page.read_text(encoding="utf-8"))):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of this repository
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, f"{page_id(page)}: {broken}"


# ---------------------------------------------------------------- commands


def commands(text: str) -> list[tuple[list[str], bool]]:
    """``(argv from the program on, whole)`` for each ``bild``/script command of a page; whole: from a bash block."""
    found = []
    for match in FENCE.finditer(text):
        if match.group(1) in ("bash", "sh", "console", ""):
            found += [(line.strip(), True) for line in match.group(2).splitlines()]
    found += [(" ".join(span.split()), False) for span in re.findall(r"`([^`]+)`", prose(text))]
    result = []
    for line, whole in found:
        line = line.split(" #", 1)[0].strip()  # a trailing shell comment
        if not COMMAND.search(line):
            continue
        words = shlex.split(line)
        starts = [i for i, w in enumerate(words) if w == "bild" or re.fullmatch(r"(\S*/)?scripts/\w+\.py", w)]
        result.append((words[starts[0] :], whole))
    return result


@cache
def script_parser(name: str) -> argparse.ArgumentParser:
    """The parser a script's ``parse_args`` builds (caught before it parses anything)."""
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", lambda self, *args, **kwargs: self):
        return module.parse_args([])


def verb_parser(verb: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[verb]


def check_command(argv: list[str], whole: bool) -> str | None:
    """None when ``argv`` is a valid command (a fragment: valid verb and options), else what is wrong."""
    program, args = argv[0], argv[1:]
    if program == "bild":
        if not args or args[0] not in VERBS:
            return f"no verb {args[:1]}"
        options, parser = verb_parser(args[0]), build_parser()
    else:
        name = Path(program).stem
        if not (ROOT / "scripts" / f"{name}.py").exists():
            return f"no script {program}"
        options = parser = script_parser(name)
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in options._option_string_actions]
    if unknown:
        return f"unknown options {unknown}"
    for word in args:
        if word.startswith("configs/") and not (ROOT / word).exists():
            return f"no config {word}"
    if whole:
        try:
            parser.parse_args(args)
        except SystemExit as err:
            return f"argparse refused it (exit {err.code})"
    return None


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_documented_commands_parse(page, capsys):
    found = commands(page.read_text(encoding="utf-8"))
    bad = {" ".join(argv): problem for argv, whole in found if (problem := check_command(argv, whole))}
    assert not bad, f"{page_id(page)}: {bad}\n{capsys.readouterr().err}"


def test_the_command_check_refuses_bad_commands():
    assert check_command(["bild", "bench", "--config", "configs/qwen-coder-de-en.yaml", "--limit", "2"], True) is None
    assert "unknown options" in check_command(["bild", "bench", "--nope"], False)
    assert "no verb" in check_command(["bild", "serve"], False)
    assert "no config" in check_command(["bild", "bench", "--config", "configs/missing.yaml"], True)
    assert "refused" in check_command(["bild", "calibrate", "--config", "configs/qwen-coder-de-en.yaml"], True)
    assert "refused" in check_command(["scripts/profile_pair.py", "--compress", "int3"], True)
    assert "unknown options" in check_command(["scripts/profile_pair.py", "--compres", "int4"], False)
    assert check_command(["scripts/profile_pair.py", "--compress", "int4", "--save", "costs.json"], False) is None
