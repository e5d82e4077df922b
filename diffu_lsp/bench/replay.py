"""replay: a human typing into the real server, over LSP, as VS Code drives inline completions.

The server runs as a subprocess (`diffu-lsp --model M --device D`). For each typing point (a code
line of a held-out stdlib file, after its indentation) the client opens the file truncated at the
point and types the next N characters one at a time at `cps` characters per second. Per key, in
this order: `didChange` (incremental, one character), `$/cancelRequest` for the previous
inlineCompletion request if it is still unanswered, a new `textDocument/inlineCompletion`
(triggerKind Automatic), and a `diffu/stats` request used only as an ordering barrier.

Staleness: a response "arrives outdated" when it carries items but the document has moved past the
request's version by the time it is read. It is **stale** (the server's fault; must be 0) when the
barrier response of a later version arrived before it: the server had then already processed the
newer `didChange` when it wrote the items (it writes its responses in order). Otherwise it crossed
the keystroke in the pipe ("crossed"), which an editor discards as the request was cancelled.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from . import common
from .lsp_client import LspClient, peak_rss_kib, server_command

QUICK_POINTS, POINTS = 1, 8
QUICK_CHARS, CHARS = 12, 40
STATS_METHOD = "diffu/stats"
AUTOMATIC = 2  # InlineCompletionTriggerKind.Automatic


# ---------------------------------------------------------------- text positions (UTF-16, as LSP)

def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def end_position(doc: str) -> dict:
    line_start = doc.rfind("\n") + 1
    return {"line": doc.count("\n"), "character": utf16_len(doc[line_start:])}


def offset_at(doc: str, position: dict) -> int:
    """Character offset of an LSP position in doc (clamped to the line's end)."""
    offset = 0
    for _ in range(position["line"]):
        newline = doc.find("\n", offset)
        if newline < 0:
            return len(doc)
        offset = newline + 1
    line_end = doc.find("\n", offset)
    line = doc[offset:line_end if line_end >= 0 else len(doc)]
    units = 0
    for i, ch in enumerate(line):
        if units >= position["character"]:
            return offset + i
        units += 2 if ord(ch) > 0xFFFF else 1
    return offset + len(line)


def items_of(result: Any) -> list[dict]:
    if result is None:
        return []
    if isinstance(result, dict):
        return list(result.get("items") or [])
    return list(result)


def insert_text(item: dict) -> str:
    text = item.get("insertText", "")
    return text.get("value", "") if isinstance(text, dict) else str(text)


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------- one typing point

@dataclass
class Point:
    file: str
    text: str
    offset: int


@dataclass
class Sent:
    id: int
    version: int
    key_time: float
    cursor: int                     # offset in the original file
    future: asyncio.Future
    barrier: asyncio.Future
    response: Any = None
    barrier_received: float | None = None
    barrier_result: Any = None


@dataclass
class PointLog:
    point: Point
    sent: list[Sent] = field(default_factory=list)
    change_times: dict[int, float] = field(default_factory=dict)  # version -> when its didChange was written
    unanswered: int = 0


def choose_points(seed: int, count: int, chars: int) -> list[Point]:
    points = []
    files = common.sample_files(seed, max(count, 1) * 3, min_chars=4000)
    per_file = 2
    for path in files:
        text = common.read_text(path)
        rng = random.Random(f"replay:{seed}:{path.name}")
        lines = [(o, l) for o, l in common.code_lines(text) if o > 800 and o + len(l) + chars < len(text)]
        for offset, line in sorted(rng.sample(lines, min(per_file, len(lines)))):
            indent = len(line) - len(line.lstrip())
            points.append(Point(path.name, text, offset + indent))
            if len(points) == count:
                return points
    return points


async def type_point(client: LspClient, point: Point, index: int, chars: int, cps: float, grace: float) -> PointLog:
    uri = f"file:///diffu-bench/replay/{index:02d}_{point.file}"
    doc = point.text[:point.offset]
    version = 1
    log = PointLog(point)
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": version,
                                                            "text": doc}})
    await client.drain()
    typed = point.text[point.offset:point.offset + chars]
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    previous: Sent | None = None
    for i, ch in enumerate(typed):
        delay = start + i / cps - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        position = end_position(doc)
        doc += ch
        version += 1
        key_time = time.perf_counter()
        client.notify("textDocument/didChange", {
            "textDocument": {"uri": uri, "version": version},
            "contentChanges": [{"range": {"start": position, "end": position}, "text": ch}]})
        log.change_times[version] = key_time
        if previous is not None and not previous.future.done():
            client.cancel(previous.id)
        request_id, future = client.send_request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": end_position(doc),
            "context": {"triggerKind": AUTOMATIC, "selectedCompletionInfo": None}})
        _, barrier = client.send_request(STATS_METHOD, None)
        await client.drain()
        previous = Sent(request_id, version, key_time, point.offset + i + 1, future, barrier)
        log.sent.append(previous)
    # the last request is the one the user waits for; every cancelled one must still be answered
    pending = [s.future for s in log.sent] + [s.barrier for s in log.sent]
    done, not_done = await asyncio.wait(pending, timeout=grace)
    log.unanswered = sum(1 for s in log.sent if not s.future.done())
    for s in log.sent:
        s.response = s.future.result() if s.future.done() else None
        if s.barrier.done():
            s.barrier_received, s.barrier_result = s.barrier.result().received, s.barrier.result().result
    client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    await client.drain()
    return log


def analyse(log: PointLog) -> list[dict]:
    """One record per request: outcome, staleness, latency, consistency, acceptance."""
    point, records = log.point, []
    versions = sorted(log.change_times)
    barrier_by_version = {s.version: s.barrier_received for s in log.sent}
    for s in log.sent:
        record = {"file": point.file, "point": point.offset, "version": s.version, "answered": s.response is not None}
        response = s.response
        if response is None:
            records.append(record)
            continue
        items = [] if response.error else items_of(response.result)
        record.update(error=(response.error or {}).get("code"), items=len(items))
        current = max(v for v in versions if log.change_times[v] <= response.received)
        if current == s.version and not response.error:
            record["answer_latency"] = response.received - s.key_time
        if not items:
            records.append(record)
            continue
        outdated = current != s.version
        later_barriers = [t for v, t in barrier_by_version.items() if v > s.version and t is not None]
        record["outdated"] = outdated
        record["stale"] = outdated and any(t < response.received for t in later_barriers)
        record["crossed"] = outdated and not record["stale"]
        if outdated:
            records.append(record)
            continue
        # a suggestion the editor shows: check it against the document and what the user types next
        doc = point.text[:s.cursor]
        item = items[0]
        text = insert_text(item)
        start = offset_at(doc, item["range"]["start"]) if item.get("range") else s.cursor
        end = offset_at(doc, item["range"]["end"]) if item.get("range") else s.cursor
        typed_part = doc[start:s.cursor]
        record["consistent"] = start <= s.cursor <= max(end, s.cursor) and text.startswith(typed_part)
        shown = text[len(typed_part):] if record["consistent"] else ""
        actual = point.text[s.cursor:s.cursor + len(shown)]
        record.update(shown=True, latency=response.received - s.key_time, shown_chars=len(shown), text=shown,
                      matched=common_prefix(shown, actual), whole=bool(shown) and shown == actual,
                      similarity=common.edit_similarity(shown, actual))
        records.append(record)
    return records


def flatten(stats: Any, prefix: str = "") -> dict[str, float]:
    out = {}
    if isinstance(stats, dict):
        for key, value in stats.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(stats, (int, float)) and not isinstance(stats, bool):
        out[prefix[:-1]] = stats
    return out


def stat(delta: dict[str, float], *names: str) -> float | None:
    """The first counter whose key ends with one of names (servers nest them differently)."""
    for name in names:
        for key, value in delta.items():
            if key == name or key.endswith("." + name):
                return value
    return None


async def wait_ready(client: LspClient, timeout: float = 900.0) -> float:
    """Seconds until the server reports its model loaded (`diffu/status` ready, or `model_state` in
    `diffu/stats`); a server without either is taken as ready at once."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        for _, method, params in client.notifications:
            if method == "diffu/status" and isinstance(params, dict):
                if params.get("state") == "ready":
                    return time.perf_counter() - started
                if params.get("state") == "error":
                    raise RuntimeError(f"the server could not load the model: {params.get('message')}")
        try:
            stats = await client.request(STATS_METHOD)
        except Exception:  # noqa: BLE001 - no stats request: nothing to wait on
            return time.perf_counter() - started
        state = stats.get("model_state") if isinstance(stats, dict) else None
        if state is None or state == "ready":
            return time.perf_counter() - started
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the server did not load its model within {timeout:.0f} s")


def job_records(*stats_results: Any) -> dict[int, dict]:
    """Job records by id from any number of `diffu/stats` answers (each holds the latest few)."""
    out = {}
    for stats in stats_results:
        if isinstance(stats, dict):
            for record in stats.get("records") or []:
                if isinstance(record, dict) and "id" in record:
                    out[record["id"]] = record
    return out


async def replay(options: common.Options, server_args: tuple[str, ...] = (), settings: dict | None = None) -> dict:
    """Type at every point against a fresh server (`server_args` added to its command line,
    `settings` sent as its initializationOptions)."""
    points_n = options.points or (QUICK_POINTS if options.quick else POINTS)
    chars = options.chars or (QUICK_CHARS if options.quick else CHARS)
    points = choose_points(options.seed, points_n, chars)
    client = LspClient(server_command(options.model, options.device, options.dtype) + list(server_args),
                       env=common.subprocess_env(options))
    await client.start()
    try:
        await client.initialize(None, settings)
        ready_s = await wait_ready(client)
        # warm-up on a scratch document: the first job pays one-time costs; it is not counted
        warm_uri = "file:///diffu-bench/replay/warmup.py"
        warm = "def add(a, b):\n    return "
        client.notify("textDocument/didOpen", {"textDocument": {"uri": warm_uri, "languageId": "python", "version": 1,
                                                                "text": warm}})
        started = time.perf_counter()
        await client.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": warm_uri}, "position": end_position(warm),
            "context": {"triggerKind": 1, "selectedCompletionInfo": None}})
        warmup_s = time.perf_counter() - started
        client.notify("textDocument/didClose", {"textDocument": {"uri": warm_uri}})
        try:
            before_raw = await client.request(STATS_METHOD)
            before = flatten(before_raw)
        except Exception:  # noqa: BLE001 - a server without the stats request still gets replayed
            before_raw, before = None, None
        logs = []
        for index, point in enumerate(points):
            logs.append(await type_point(client, point, index, chars, options.cps, grace=60.0))
            await asyncio.sleep(0.3)
        after_raw = await client.request(STATS_METHOD) if before is not None else None
        peak = peak_rss_kib(client.pid)
    finally:
        await client.close()
    after = flatten(after_raw)
    delta = {k: v - (before or {}).get(k, 0) for k, v in after.items()}
    old = job_records(before_raw)
    jobs = {i: r for i, r in job_records(*(s.barrier_result for log in logs for s in log.sent), after_raw).items()
            if i not in old and i > max(old, default=0)}
    return summarise(options, points, chars, logs, delta, after_raw, warmup_s, peak, jobs, ready_s)


def summarise(options, points, chars, logs, delta, stats, warmup_s, peak_kib, jobs=None, ready_s=None) -> dict:
    records = [r for log in logs for r in analyse(log)]
    shown = [r for r in records if r.get("shown")]
    latencies = [r["latency"] for r in shown]
    answers = [r["answer_latency"] for r in records if "answer_latency" in r]
    requests = len(records)
    answered = sum(r["answered"] for r in records)
    with_items = sum(1 for r in records if r.get("items"))
    errors = sum(1 for r in records if r.get("error") is not None)
    empty = answered - with_items - errors
    stale = sum(1 for r in records if r.get("stale"))
    crossed = sum(1 for r in records if r.get("crossed"))
    inconsistent = sum(1 for r in shown if not r["consistent"])
    matched = [r["matched"] for r in shown]
    started = stat(delta, "started")
    cancelled_jobs = sum(v for v in (stat(delta, "cancelled"), stat(delta, "superseded"), stat(delta, "stale"))
                         if v is not None) if delta else None
    completed = stat(delta, "completed")
    forwards_cancelled = stat(delta, "forwards_cancelled", "cancelled_forwards", "forwards_in_cancelled")
    if forwards_cancelled is None and jobs:  # from the per-job records the barriers brought back
        forwards_cancelled = sum(r.get("forwards", 0) for r in jobs.values()
                                 if r.get("outcome") in ("cancelled", "superseded", "stale"))
    summary = {
        "points": len(points), "chars_per_point": chars, "cps": options.cps, "keystrokes": requests,
        "requests": requests, "answered": answered, "unanswered": requests - answered,
        "with_items": with_items, "empty": empty, "errors": errors,
        "shown": len(shown), "stale": stale, "crossed": crossed, "inconsistent": inconsistent,
        "latency_p50_ms": 1000 * common.percentile(latencies, 50),
        "latency_p95_ms": 1000 * common.percentile(latencies, 95),
        "answer_p50_ms": 1000 * common.percentile(answers, 50),
        "answer_p95_ms": 1000 * common.percentile(answers, 95),
        "current_answers": len(answers),
        "jobs_started": started, "jobs_cancelled": cancelled_jobs, "jobs_completed": completed,
        "forwards": stat(delta, "forwards"),
        "forwards_cancelled_jobs": forwards_cancelled,
        "job_records_seen": len(jobs or {}),
        "forwards_after_cancel": stat(delta, "forwards_after_cancel"),
        "typed_through": stat(delta, "typed_through", "typed_through_hits", "typedThrough", "typed_through.hits"),
        "mean_chars_matched": sum(matched) / len(matched) if matched else float("nan"),
        "pct_shown_with_match": 100.0 * sum(m >= 1 for m in matched) / len(matched) if matched else float("nan"),
        "pct_shown_whole_match": 100.0 * sum(r["whole"] for r in shown) / len(shown) if shown else float("nan"),
        "mean_shown_chars": sum(r["shown_chars"] for r in shown) / len(shown) if shown else float("nan"),
        "mean_similarity": sum(r["similarity"] for r in shown) / len(shown) if shown else float("nan"),
        "forwards_per_keystroke": stat(delta, "forwards") / requests if stat(delta, "forwards") and requests else None,
        "warmup_s": warmup_s, "model_ready_s": ready_s, "server_peak_rss_mib": peak_kib / 1024 if peak_kib else None,
    }
    s = summary
    rows = [
        ["typing", f"{s['points']} points x {s['chars_per_point']} chars at {s['cps']:g} chars/s "
                   f"({s['keystrokes']} keystrokes, one request each)"],
        ["responses: with items / empty / error / none", f"{s['with_items']} / {s['empty']} / {s['errors']} / "
                                                         f"{s['unanswered']}"],
        ["suggestions shown (items for the current version)", s["shown"]],
        ["**stale suggestions returned** (must be 0)", s["stale"]],
        ["outdated items that crossed a keystroke in the pipe", s["crossed"]],
        ["shown items inconsistent with the document", s["inconsistent"]],
        ["latency keystroke -> shown suggestion, p50 (ms)", s["latency_p50_ms"]],
        ["latency keystroke -> shown suggestion, p95 (ms)", s["latency_p95_ms"]],
        ["latency keystroke -> any answer for the current version, empty ones too, p50 / p95 (ms)",
         f"{common.fmt(s['answer_p50_ms'])} / {common.fmt(s['answer_p95_ms'])} ({s['current_answers']} answers)"],
        ["jobs started / cancelled / completed (server)", f"{common.fmt(s['jobs_started'])} / "
                                                          f"{common.fmt(s['jobs_cancelled'])} / "
                                                          f"{common.fmt(s['jobs_completed'])}"],
        ["forward passes, all jobs (server)", s["forwards"]],
        ["forward passes spent on cancelled jobs (server)", s["forwards_cancelled_jobs"]],
        ["forward passes after cancellation (server)", s["forwards_after_cancel"]],
        ["typed-through hits (server)", s["typed_through"]],
        ["acceptance proxy: mean chars matched per shown suggestion", s["mean_chars_matched"]],
        ["acceptance proxy: shown suggestions with >= 1 char matched (%)", s["pct_shown_with_match"]],
        ["acceptance proxy: shown suggestions matched entirely (%)", s["pct_shown_whole_match"]],
        ["mean length of shown suggestions (chars)", s["mean_shown_chars"]],
        ["server start-up: `initialized` -> model ready (s)", s["model_ready_s"]],
        ["first request after start (warm-up, not counted) (s)", s["warmup_s"]],
        ["server peak RSS (MiB)", s["server_peak_rss_mib"]],
    ]
    return {
        "suite": "replay",
        "title": "Typing replay over LSP",
        "tables": [common.table("", ["measure", "value"], rows)],
        "records": records,
        "summary": summary,
        "server_stats": stats,
        "notes": [
            "The real server runs as a subprocess; the benchmark is its editor (JSON-RPC over stdio). Typing points: "
            "code lines of held-out stdlib files (never trained on), after the indentation; the document is the "
            "file truncated there, and the next characters of the file are typed one per keystroke.",
            "Per keystroke: `didChange` (incremental), `$/cancelRequest` for the previous request if unanswered, "
            "`textDocument/inlineCompletion` (Automatic), and a `diffu/stats` request used as an ordering barrier.",
            "Latency: from sending the keystroke's `didChange` to reading a response with items for that same "
            "version (only such responses count as shown).",
            "Stale = items for an outdated version, written after the server had answered a barrier sent after "
            "the newer `didChange` (so it knew); crossed = outdated items already in flight when the key was sent.",
            "Consistency: the item's range starts at or before the cursor and the document text from the range "
            "start to the cursor is a prefix of its insertText.",
            "Acceptance proxy: common-prefix length between the shown text (past the cursor) and the file's "
            "actual continuation at that point (what the user goes on to type).",
            "Server counters are the `diffu/stats` deltas over the replay (warm-up excluded); `cancelled` "
            "includes superseded and stale jobs.",
        ],
    }


def run(options: common.Options) -> dict:
    """The replay; with `--baseline SETTINGS` first the same replay under those settings, and a table
    comparing the two (same points, same run)."""
    started = time.perf_counter()
    baseline = options.extra.get("baseline")
    if options.extra.get("warm_start"):  # the same points with warmStart off, then on (over --baseline, if any)
        # in-process engines: the machine's shared model daemon would time other windows' jobs into either run
        alone = ("--no-daemon",)
        cold = asyncio.run(replay(options, alone, settings={**(baseline or {}), "warmStart": False}))
        result = asyncio.run(replay(options, alone, settings={**(baseline or {}), "warmStart": True}))
        result["tables"].append(compare_warm(cold, result))
        result["cold_summary"] = cold["summary"]
        result["cold_records"] = cold["records"]
        result["seconds"] = time.perf_counter() - started
        return result
    before = asyncio.run(replay(options, settings=baseline)) if baseline else None
    result = asyncio.run(replay(options))
    if before is not None:
        result["tables"].append(compare(before["summary"], result["summary"], baseline))
        result["baseline_summary"] = before["summary"]
    result["seconds"] = time.perf_counter() - started
    return result


def side_by_side(before: dict, after: dict, measures) -> list[list]:
    """Rows [label, before, after, after / before] for each (label, summary key) of two replays."""
    rows = []
    for label, key in measures:
        a, b = before.get(key), after.get(key)
        ratio = b / a if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None
        rows.append([label, a, b, ratio])
    return rows


def compare_warm(cold: dict, warm: dict) -> dict:
    """warmStart off and on over the same points: speed, and the shown suggestions' quality against
    what the user typed next and against the cold start's suggestion at the same document version."""
    a, b = cold["summary"], warm["summary"]
    cold_shown = {(r["file"], r["point"], r["version"]): r["text"] for r in cold["records"] if r.get("shown")}
    both = [(cold_shown[key], r["text"]) for r in warm["records"] if r.get("shown")
            and (key := (r["file"], r["point"], r["version"])) in cold_shown]
    same_sim = sum(common.edit_similarity(c, w) for c, w in both) / len(both) if both else None
    same_exact = 100.0 * sum(c == w for c, w in both) / len(both) if both else None
    rows = side_by_side(a, b, (("stale suggestions (must be 0)", "stale"), ("suggestions shown", "shown"),
                               ("forward passes per keystroke", "forwards_per_keystroke"),
                               ("keystroke -> shown suggestion p50 (ms)", "latency_p50_ms"),
                               ("keystroke -> shown suggestion p95 (ms)", "latency_p95_ms"),
                               ("vs typed next: edit similarity (mean, 0-100)", "mean_similarity"),
                               ("vs typed next: exact match (%)", "pct_shown_whole_match"),
                               ("vs typed next: chars matched (mean)", "mean_chars_matched")))
    rows.append([f"vs the cold start's suggestion at the same version ({len(both)} versions shown by both): "
                 "edit similarity / exact match (%)", 100.0, f"{common.fmt(same_sim)} / {common.fmt(same_exact)}", None])
    return common.table("warmStart off (cold start) and on, same points, same run, each server with its "
                        "in-process engine (--no-daemon)",
                        ["measure", "warmStart off", "warmStart on", "on / off"], rows)


def compare(before: dict, after: dict, baseline: dict) -> dict:
    rows = side_by_side(before, after, (("stale suggestions", "stale"), ("suggestions shown", "shown"),
                                        ("keystroke -> shown suggestion p50 (ms)", "latency_p50_ms"),
                                        ("keystroke -> shown suggestion p95 (ms)", "latency_p95_ms"),
                                        ("keystroke -> any current answer p50 (ms)", "answer_p50_ms"),
                                        ("keystroke -> any current answer p95 (ms)", "answer_p95_ms"),
                                        ("forward passes, all jobs", "forwards")))
    settings = ", ".join(f"{k}={v!r}" for k, v in baseline.items())
    return common.table(f"Against the baseline settings ({settings}), same points, same run",
                        ["measure", "baseline", "defaults", "defaults / baseline"], rows)
