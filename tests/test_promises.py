"""docs/testing.md maps every promise of the README to the tests that check it.

These tests keep that table true: each quoted promise is still in the README,
each named test exists, and whatever the README enumerates (settings, REST
endpoints, events, CLI commands, sections) has a row.
"""

from __future__ import annotations

import ast
import os
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TABLE = ROOT / "docs" / "testing.md"
# Figures, the source tree and how the project tests itself (docs/testing.md): not promises to users.
NOT_PROMISES = {
    "Benchmarks",
    "Hibernation figures",
    "Cost against size, and a training loop",
    "Soak",
    "Layout",
    "Tests",
}


@cache
def readme_lines() -> list[str]:
    return README.read_text().splitlines()


@cache
def rows() -> list[dict[str, str]]:
    found = []
    for line in TABLE.read_text().splitlines():
        if not line.startswith("| ") or line.startswith(("| README section", "| ---")):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 4, f"docs/testing.md: not a row of four cells: {line}"
        found.append(dict(zip(("section", "promise", "tests", "notes"), cells, strict=True)))
    return found


def quoted(promise: str) -> str:
    return promise.replace("\\|", "|")


@cache
def defined_tests(path: str) -> set[str]:
    """The tests a file defines: ``name`` and ``Class::name``."""
    tree = ast.parse((ROOT / path).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}::{item.name}")
    return names


def sections() -> list[str]:
    """The README's sections (## and ###), those that promise something."""
    names = [re.sub(r"^#+ ", "", line) for line in readme_lines() if re.match(r"^#{2,3} ", line)]
    return [n for n in names if n not in NOT_PROMISES]


def promised_text() -> str:
    return "\n".join(r["promise"] for r in rows())


def test_the_table_has_rows():
    assert len(rows()) > 100


def test_every_quoted_promise_is_in_the_readme():
    missing = [r["promise"] for r in rows() if not any(quoted(r["promise"]) in line for line in readme_lines())]
    assert not missing, f"no longer in README.md (update docs/testing.md): {missing}"


def test_every_named_test_exists():
    wrong = []
    for r in rows():
        if r["tests"] == "NONE":
            continue
        for ref in (t.strip() for t in r["tests"].split(",")):
            if ref.startswith("jest: "):
                if not (ROOT / ref.removeprefix("jest: ")).is_file():
                    wrong.append(ref)
                continue
            if ref.startswith("script: "):  # a check too long for make test, run on its own
                script = ROOT / ref.removeprefix("script: ").strip("`")
                if not (script.is_file() and os.access(script, os.X_OK)):
                    wrong.append(ref)
                continue
            match = re.fullmatch(r"`(tests/[\w/]+\.py)::([\w:]+)`", ref)
            if not match or not (ROOT / match[1]).is_file() or match[2] not in defined_tests(match[1]):
                wrong.append(ref)
    assert not wrong, f"docs/testing.md names tests that do not exist: {wrong}"


def test_every_section_has_a_row():
    covered = {r["section"] for r in rows()}
    assert not [s for s in sections() if s not in covered]


def test_the_count_of_untested_promises_is_kept():
    untested = sum(r["tests"] == "NONE" for r in rows())
    stated = re.search(r"Promises without a test: (\d+)\.", TABLE.read_text())
    assert stated and int(stated[1]) == untested, f"docs/testing.md: {untested} rows say NONE"


def enumerated_lines() -> list[str]:
    """The README's table rows and command lines outside the figures: each one
    a setting, an endpoint, an option or a command."""
    out, top, figures = [], "", False
    lines = readme_lines()
    for n, line in enumerate(lines):
        if line.startswith("## "):
            top = line[3:]
        if top in NOT_PROMISES:
            continue
        header = n + 1 < len(lines) and lines[n + 1].startswith("| ---")
        if header:
            figures = "median" in line  # a table of measurements, not of promises
        table_row = line.startswith("| ") and not header and not line.startswith("| ---") and not figures
        if table_row or line.startswith(("jupyter ckpt ", "jupyter-ckpt-helper ", "%checkpoint ")):
            out.append(line)
    return out


def test_every_setting_endpoint_option_and_command_has_a_row():
    promises = [quoted(r["promise"]) for r in rows()]
    lines = enumerated_lines()
    assert len(lines) > 40
    missing = [line for line in lines if not any(p in line for p in promises)]
    assert not missing, "lines of README.md whose promise has no row in docs/testing.md:\n" + "\n".join(missing)


def test_every_event_has_a_row():
    paragraph = " ".join(readme_lines()).split("/api/events/subscribe`")[1].split("A snapshot:")[0]
    events = re.findall(r"`(\w+)`", paragraph)
    assert "completed" in events and "wake_failed" in events
    text = "\n".join(r["promise"] for r in rows())
    assert not [e for e in events if f"`{e}`" not in text]
