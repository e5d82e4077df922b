"""next-edit: after one edit, are the edits it implies predicted, and nothing else?

Scenarios cut from held-out stdlib files (the bundled model never trained on them), one edit each,
the rest of the file as it is:
- rename: a local with one binding (``name = ...`` first, at the start of its line) and further uses
  in its function is renamed at that binding; truth: its other uses in the function, renamed.
- call: in a run of 3 or more consecutive one-line calls of the same function at the same
  indentation, the first gets a new last argument ``, strict=True``; truth: the same insertion
  before the closing parenthesis of each sibling.
- parameter: a module-level ``def`` gets a new last parameter; truth: each call of it in the file
  gets an argument (any text) before its closing parenthesis.
- control: an integer literal changed (``n`` -> ``n + 1``) or a string's content changed; the edit
  implies nothing: any prediction is false.

Methods, in the same run: next edit (the server's path: diffu_lsp/nextedit.py candidates, one
``next_edit`` job through ``features.answer``), plain text replacement of the removed text by the
introduced one everywhere else in the file (what search-and-replace would do), and no prediction.
"""

from __future__ import annotations

import ast
import random
import re
import time
from dataclasses import dataclass

from . import common

CASES_PER_KIND = 40
QUICK_CASES = 3
NEW_NAMES = ("total", "result", "current", "entry", "value2", "item_count", "acc", "state")
NEW_ARGUMENT = ", strict=True"
NEW_PARAMETER = "extra"
KINDS = ("rename", "call", "parameter", "control")
TARGET_RENAME_RECALL, TARGET_RENAME_PRECISION, TARGET_CONTROLS = 0.8, 0.9, 5.0


@dataclass(frozen=True)
class Case:
    kind: str
    file: str
    before: str
    after: str
    truth: tuple[tuple[int, int, str | None], ...]  # (start, end, text) in `after`; text None: any non-empty insertion


def _line_offsets(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer("\n", text)]


def _offset(text: str, starts: list[int], lineno: int, col_bytes: int) -> int:
    line_start = starts[lineno - 1]
    line = text[line_start:text.find("\n", line_start) if "\n" in text[line_start:] else len(text)]
    return line_start + len(line.encode()[:col_bytes].decode(errors="ignore"))


def _shift(offset: int, at: int, delta: int) -> int:
    return offset + delta if offset >= at else offset


def rename_cases(name: str, text: str, tree: ast.AST, rng: random.Random) -> list[Case]:
    starts, out = _line_offsets(text), []
    words = set(re.findall(r"\w+", text))
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
        nested = {id(n) for inner in ast.walk(fn) if inner is not fn and isinstance(
            inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.comprehension))
            for n in ast.walk(inner)}
        declared = {n for node in ast.walk(fn) if isinstance(node, (ast.Global, ast.Nonlocal)) for n in node.names}
        augmented = {id(node.target) for node in ast.walk(fn) if isinstance(node, ast.AugAssign)}  # a use, not a binding
        uses: dict[str, list[ast.Name]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Name):
                uses.setdefault(node.id, []).append(node)
        for local, nodes in uses.items():
            if local in params or local in declared or any(id(n) in nested for n in nodes) or len(local) < 2:
                continue
            nodes.sort(key=lambda n: (n.lineno, n.col_offset))
            stores = [n for n in nodes if isinstance(n.ctx, ast.Store) and id(n) not in augmented]
            if len(stores) != 1 or stores[0] is not nodes[0] or len(nodes) < 2:
                continue
            first = nodes[0]
            at = _offset(text, starts, first.lineno, first.col_offset)
            if text[starts[first.lineno - 1]:at].strip() or not re.match(rf"{re.escape(local)}\s*=[^=]", text[at:at + len(local) + 4]):
                continue
            new = next((n for n in rng.sample(NEW_NAMES, len(NEW_NAMES)) if n not in words), None)
            if new is None:
                continue
            delta = len(new) - len(local)
            after = text[:at] + new + text[at + len(local):]
            truth = []
            for n in nodes[1:]:
                o = _shift(_offset(text, starts, n.lineno, n.col_offset), at, delta)
                truth.append((o, o + len(local), new))
            out.append(Case("rename", name, text, after, tuple(truth)))
    return out


_CALL_LINE = re.compile(r"^([ \t]*)([A-Za-z_][\w.]*)\((.*)\)[ \t]*$")


def call_cases(name: str, text: str) -> list[Case]:
    lines, starts, out = text.split("\n"), _line_offsets(text), []
    i = 0
    while i < len(lines):
        m = _CALL_LINE.match(lines[i])
        j = i + 1
        while m and j < len(lines):
            n = _CALL_LINE.match(lines[j])
            if not n or n.group(1) != m.group(1) or n.group(2) != m.group(2):
                break
            j += 1
        run = list(range(i, j))
        balanced = all(lines[k].count("(") == lines[k].count(")") and lines[k].strip().endswith(")") and m.group(3).strip()
                       for k in run) if m else False
        if m and len(run) >= 3 and balanced and "strict" not in "".join(lines[k] for k in run):
            close = starts[i] + len(lines[i].rstrip()) - 1
            after = text[:close] + NEW_ARGUMENT + text[close:]
            truth = [(p, p, NEW_ARGUMENT) for k in run[1:]
                     for p in [starts[k] + len(lines[k].rstrip()) - 1 + len(NEW_ARGUMENT)]]
            out.append(Case("call", name, text, after, tuple(truth)))
        i = max(j, i + 1)
    return out


def parameter_cases(name: str, text: str, tree: ast.Module) -> list[Case]:
    from ..nextedit import _closing_paren

    out, starts = [], _line_offsets(text)
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or not fn.args.args or fn.args.vararg or fn.args.kwarg or fn.args.kwonlyargs:
            continue
        line = text[starts[fn.lineno - 1]:text.find("\n", starts[fn.lineno - 1])]
        if not line.startswith(f"def {fn.name}(") or not line.rstrip().endswith("):") or fn.args.defaults:
            continue
        close = starts[fn.lineno - 1] + len(line.rstrip()) - 2
        after = text[:close] + ", " + NEW_PARAMETER + text[close:]
        truth = []
        for call in re.finditer(rf"(?<![\w.]){re.escape(fn.name)}\(", after):
            line_start = after.rfind("\n", 0, call.start()) + 1
            if after[line_start:call.start()].strip().startswith(("def", "#")):
                continue
            end = _closing_paren(after, call.end() - 1)
            if end is not None:
                truth.append((end, end, None))
        if truth:
            out.append(Case("parameter", name, text, after, tuple(truth)))
    return out


def control_cases(name: str, text: str, rng: random.Random) -> list[Case]:
    out = []
    for m in re.finditer(r"(?<![\w.])([2-9]|[1-9]\d)(?![\w.])", text):
        line = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
        if "#" in line or '"' in line or "'" in line:
            continue
        new = str(int(m.group(1)) + 1)
        out.append(Case("control", name, text, text[:m.start()] + new + text[m.end():], ()))
    for m in re.finditer(r"'([a-z]{3,12})'", text):
        new = m.group(1)[:-1] + ("x" if m.group(1)[-1] != "x" else "y")
        out.append(Case("control", name, text, text[:m.start(1)] + new + text[m.end(1):], ()))
    rng.shuffle(out)
    return out[:3]


def build_cases(per_kind: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    files = common.held_out_files()
    rng.shuffle(files)
    by_kind: dict[str, list[Case]] = {k: [] for k in KINDS}
    for path in files:
        if all(len(v) >= per_kind for v in by_kind.values()):
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 60_000:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        found = {"rename": rename_cases(path.name, text, tree, rng), "call": call_cases(path.name, text),
                 "parameter": parameter_cases(path.name, text, tree), "control": control_cases(path.name, text, rng)}
        for kind, cases in found.items():
            rng.shuffle(cases)
            by_kind[kind] += cases[:max(0, min(2, per_kind - len(by_kind[kind])))]  # at most 2 per file and kind
    return [c for k in KINDS for c in by_kind[k]]


def predict_model(model, case: Case, settings) -> tuple[list[tuple[int, int, str]], int]:
    """The server's path: the edit, its candidates, one next_edit job; (predictions, forwards)."""
    from .. import features, nextedit
    from ..scheduler import CancelToken
    from ..session import next_edit_request

    edit = nextedit.edit_between(case.before, case.after)
    if edit is None:
        return [], 0
    request, base = next_edit_request(case.after, edit, nextedit.candidates(case.after, edit), settings)
    if request is None:
        return [], 0
    token = CancelToken()
    replacements = features.answer(model, request, cancel=token)
    found = sorted(replacements, key=lambda r: min(abs(base + r.start - edit.end), abs(edit.start - base - r.end)))
    return [(base + r.start, base + r.end, r.text) for r in found[:nextedit.MAX_PREDICTIONS]], token.forwards


def predict_plain(case: Case) -> list[tuple[int, int, str]]:
    from .. import nextedit

    edit = nextedit.edit_between(case.before, case.after)
    return [] if edit is None else [(p.start, p.end, p.text) for p in nextedit.plain_replacements(case.after, edit)]


def score(case: Case, predictions: list[tuple[int, int, str]]) -> tuple[int, int]:
    """(correct predictions, truth spans hit)."""
    hit = set()
    for start, end, text in predictions:
        for i, (s, e, want) in enumerate(case.truth):
            if (s, e) == (start, end) and (text == want if want is not None else bool(text.strip())):
                hit.add(i)
                break
    return len(hit), len(hit)


def run(options: common.Options) -> dict:
    from ..settings import Settings

    started = time.perf_counter()
    model = common.load(options)
    per_kind = QUICK_CASES if options.quick else options.extra.get("edit_lines") or CASES_PER_KIND
    cases = build_cases(per_kind, options.seed)
    settings = Settings()
    stats: dict[tuple[str, str], dict] = {}
    for case in cases:
        t0 = time.perf_counter()
        ours, forwards = predict_model(model, case, settings)
        seconds = time.perf_counter() - t0
        for method, predictions, spent, fw in (("next edit", ours, seconds, forwards),
                                               ("plain text replacement", predict_plain(case), None, 0),
                                               ("no prediction", [], None, 0)):
            s = stats.setdefault((case.kind, method), {"edits": 0, "truth": 0, "predictions": 0, "correct": 0,
                                                       "edits_with_predictions": 0, "ms": [], "forwards": 0})
            correct, _ = score(case, predictions)
            s["edits"] += 1
            s["truth"] += len(case.truth)
            s["predictions"] += len(predictions)
            s["correct"] += correct
            s["edits_with_predictions"] += bool(predictions)
            s["forwards"] += fw
            if spent is not None:
                s["ms"].append(1000 * spent)
    common.progress(f"next-edit: {len(cases)} edits done")
    rows, records = [], []
    for kind in KINDS:
        for method in ("next edit", "plain text replacement", "no prediction"):
            s = stats.get((kind, method))
            if not s:
                continue
            precision = s["correct"] / s["predictions"] if s["predictions"] else None
            recall = s["correct"] / s["truth"] if s["truth"] else None
            ms = sorted(s["ms"])
            p50 = ms[len(ms) // 2] if ms else None
            with_predictions = 100.0 * s["edits_with_predictions"] / s["edits"]
            rows.append([kind, method, s["edits"], s["truth"], precision, recall, s["predictions"] / s["edits"],
                         with_predictions if kind == "control" else None, p50,
                         s["forwards"] / s["edits"] if method == "next edit" else None])
            records.append({"kind": kind, "method": method, **{k: v for k, v in s.items() if k != "ms"},
                            "precision": precision, "recall": recall, "ms_p50": p50})
    ours = {r["kind"]: r for r in records if r["method"] == "next edit"}
    rename, control = ours.get("rename", {}), ours.get("control", {})
    controls_pct = 100.0 * control.get("edits_with_predictions", 0) / max(1, control.get("edits", 0))
    headline = (f"renames: recall {rename.get('recall') or 0:.2f} at precision {rename.get('precision') or 0:.2f} "
                f"(targets >= {TARGET_RENAME_RECALL} at >= {TARGET_RENAME_PRECISION}); controls with a prediction: "
                f"{controls_pct:.1f} % of edits (target <= {TARGET_CONTROLS:g} %).")
    tables = [common.table(
        f"One edit each in held-out stdlib files ({len({c.file for c in cases})} files), three methods on the same edits",
        ["kind", "method", "edits", "truth spans", "precision", "recall", "predictions/edit",
         "controls with a prediction %", "ms edit->predictions (p50)", "forwards/edit"], rows)]
    result = {
        "suite": "next-edit",
        "title": "Next-edit predictions",
        "tables": tables,
        "headline": headline,
        "records": records,
        "summary": {"cases": len(cases), "controls_with_predictions_pct": controls_pct,
                    "rename_recall": rename.get("recall"), "rename_precision": rename.get("precision")},
        "notes": [
            "rename: a local with one binding, at the start of its line, renamed there; truth: its other uses in the "
            "function. call: the first of 3+ sibling one-line calls gets `, strict=True` as its last argument; "
            "truth: the same insertion in each sibling. parameter: a module-level def gets a last parameter "
            "`extra`; truth: an argument (any text) inserted before the closing parenthesis of each call in the "
            "file. control: an integer literal or a string's content changed; every prediction is false.",
            "next edit: the server's path (candidates from diffu_lsp/nextedit.py, masked and denoised in one "
            "`next_edit` job, default settings: nextEditConfidence 0.5, at most 5 predictions per edit). A "
            "candidate the edit alone makes sure of (a use of a renamed binding that no longer has one) is "
            "predicted with the plain replacement unless the model confidently keeps the text; every other "
            "candidate needs the model's own text at that confidence. The latency is the job's (in process, one "
            "thread); the server waits nextEditDelayMs (500 ms) after the last keystroke first.",
            "plain text replacement: every other whole-word occurrence of the removed text replaced by the "
            "introduced text, in the whole file (nothing for an insertion). no prediction: nothing, for scale.",
            "precision: correct predictions / predictions; recall: truth spans predicted exactly (parameter: any "
            "argument at the right place) / truth spans.",
            "Typing replay: the replay suite's points typed twice, nextEdit off then on; a next-edit job starts only "
            "after a 500 ms pause and only where the edit has candidates (typing the rest of a line has few), so "
            "the jobs started tell how many ran. With 8 points p95 is about the slowest suggestion: compare it "
            "with the load average of the machine.",
        ],
        "seconds": 0.0,
    }
    if not options.quick:
        result["tables"].append(replay_table(options))
    result["seconds"] = time.perf_counter() - started
    return result


def replay_table(options: common.Options) -> dict:
    """`bench replay` with nextEdit off, then on (the default), same points, one run."""
    import dataclasses

    from . import replay

    replayed = replay.run(dataclasses.replace(options, points=options.points or 8,
                                              extra={**options.extra, "baseline": {"nextEdit": "off"}}))
    table = replayed["tables"][-1]
    before, after = replayed["baseline_summary"], replayed["summary"]
    rows = table["rows"] + [["jobs started (server; on: suggestions and next edits)", before.get("jobs_started"),
                             after.get("jobs_started"), None]]
    return {**table, "rows": rows, "title": "Typing replay (bench replay, --points "
                                            f"{options.points or 8}) with nextEdit off (baseline) and on (defaults), one run"}
