"""SECURITY.md names a test next to each claim of "What is defended"; those tests must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def defined_tests(path: Path) -> set[str]:
    return set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))


def named_tests(text: str) -> list[tuple[str | None, str | None]]:
    """(file, test) for each test reference in text's code spans, in order: `tests/test_x.py`,
    `test_x.py::test_y`, `::test_y` (in the file named last) and a bare `test_y`."""
    found, current = [], None
    for span in re.findall(r"`([^`]+)`", text):
        match = re.fullmatch(r"(?:tests/)?(test_\w+\.py)?(?:::)?(test_\w+)?", span.strip())
        if not match or not any(match.groups()):
            continue
        file, test = match.groups()
        if span.strip().startswith("::"):
            file = current
        current = file or current
        found.append((file, test))
    return found


def claims(text: str) -> list[str]:
    """The bullets of "What is defended" (with their sub-bullets), and its paragraphs that are no
    bullets' lead-ins."""
    section = text.split("## What is defended", 1)[1].split("\n## ", 1)[0]
    blocks = [block.strip() for block in re.split(r"\n(?=- |\*\*)", section)]
    return [block for block in blocks if block.startswith(("- ", "**")) and not block.endswith(":")]


def test_every_test_named_in_security_md_exists():
    text = (ROOT / "SECURITY.md").read_text()
    missing = []
    for file, test in named_tests(text):
        if file is not None and not (TESTS / file).exists():
            missing.append(file)
        elif test is not None:
            where = [TESTS / file] if file else sorted(TESTS.glob("test_*.py"))
            if not any(test in defined_tests(path) for path in where):
                missing.append(f"{file or '?'}::{test}")
    assert named_tests(text) and missing == []


def test_every_claim_in_security_md_names_its_test_or_says_it_has_none():
    text = (ROOT / "SECURITY.md").read_text()
    bare = [block.strip().splitlines()[0] for block in claims(text)
            if not named_tests(block) and not re.search(r"[Nn]ot tested|not a test", block)]
    assert bare == []


def test_the_checker_finds_a_test_that_does_not_exist():
    text = "- a claim (`test_runtime_security.py::test_that_was_never_written`)"
    (file, test), = named_tests(text)
    assert (file, test) == ("test_runtime_security.py", "test_that_was_never_written")
    assert test not in defined_tests(TESTS / file)
    assert claims("## What is defended\n**Lead-in**:\n- a claim with no test\n## Fixed\n") == ["- a claim with no test"]
