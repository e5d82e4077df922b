"""`diffu-lsp bench next-edit`: its scenarios are what they claim, its scoring counts right."""

from __future__ import annotations

import ast

from diffu_lsp.bench import nextedit as bench
from diffu_lsp.bench.common import Options

SOURCE = '''def helper(a, b):
    return a + b


def main(items):
    count = 0
    for item in items:
        count += helper(item, 1)
    check(count, 1)
    check(count, 2)
    check(count, 3)
    return count + helper(2, 3)
'''


def test_rename_cases_rename_the_binding_and_expect_the_other_uses():
    cases = bench.rename_cases("x.py", SOURCE, ast.parse(SOURCE), __import__("random").Random(0))
    (case,) = [c for c in cases if "count" not in c.after.split("\n")[5]]
    new = case.after.split("\n")[5].split("=")[0].strip()
    assert case.before.split("\n")[5] == "    count = 0" and new in bench.NEW_NAMES
    assert [case.after[s:e] for s, e, _ in case.truth] == ["count"] * 5
    assert all(text == new for _, _, text in case.truth)


def test_call_and_parameter_cases_expect_the_insertion_at_each_sibling_and_call():
    (call,) = bench.call_cases("x.py", SOURCE)
    assert "check(count, 1, strict=True)" in call.after
    assert [call.after[:s + 1].rsplit("\n", 1)[1] for s, _, _ in call.truth] == ["    check(count, 2)",
                                                                                   "    check(count, 3)"]
    params = bench.parameter_cases("x.py", SOURCE, ast.parse(SOURCE))
    helper = next(c for c in params if "def helper(a, b, extra):" in c.after)
    assert [helper.after[:s + 1].rsplit("helper", 1)[1] for s, _, _ in helper.truth] == ["(item, 1)", "(2, 3)"]
    assert all(text is None for _, _, text in helper.truth)


def test_scoring_needs_the_exact_span_and_text():
    case = bench.Case("rename", "x.py", "", "", ((10, 15, "total"), (20, 25, "total")))
    assert bench.score(case, [(10, 15, "total"), (20, 25, "totals"), (30, 35, "total")]) == (1, 1)
    anything = bench.Case("parameter", "x.py", "", "", ((7, 7, None),))
    assert bench.score(anything, [(7, 7, ", 1")]) == (1, 1) and bench.score(anything, [(7, 7, " ")]) == (0, 0)


def test_quick_suite_reports_every_kind_and_method():
    result = bench.run(Options(quick=True, threads=1))
    (table,) = result["tables"]
    assert {(row[0], row[1]) for row in table["rows"]} == {
        (k, m) for k in bench.KINDS for m in ("next edit", "plain text replacement", "no prediction")}
    assert result["suite"] == "next-edit" and "renames: recall" in result["headline"]
