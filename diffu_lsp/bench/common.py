"""Shared pieces of the benchmark suites: results, tables, machine description, held-out data.

A suite returns a plain dict (JSON-serialisable)::

    {"suite": "speed", "title": "...", "tables": [{"title", "columns", "rows"}], "summary": {...},
     "headline": "one sentence", "notes": ["how it was measured", ...], "machine": {...}, "seconds": 12.3}

`tables` (and the optional `headline` under them) are what gets printed and written to BENCHMARKS.md; `summary` holds the headline figures
that the tests check (counts, invariants). Timings are never asserted anywhere.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence


# ---------------------------------------------------------------- run options

@dataclass
class Options:
    """Everything a suite reads from the command line (tests build it directly)."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    quick: bool = False
    seed: int = 0
    threads: int | None = None
    cps: float = 8.0                   # replay: characters per second
    chars: int | None = None           # replay: characters typed per point
    points: int | None = None          # replay: typing points (over several held-out files)
    problems: int | None = None        # quality: HumanEval problems (None = all, or a handful with --quick)
    stdlib_lines: int | None = None    # quality: held-out stdlib lines
    sizes: tuple[int, ...] | None = None  # speed: block sizes
    repeats: int | None = None         # speed: timed repeats per position
    exec_timeout: float = 5.0          # quality: seconds per test program
    plot: Path | None = None           # quality: where the PNG goes (None = no plot)
    command: str = ""                  # the command line, for the report
    extra: dict = field(default_factory=dict)


def progress(message: str) -> None:
    """A line on stderr so a long run shows where it is (tables go to stdout)."""
    import sys

    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- numbers

def wait_for(predicate, timeout: float, what: str = "condition", interval: float = 0.05):
    """Poll `predicate` every `interval` s until it returns a truthy value, and return that value;
    TimeoutError (naming `what` and the last value) after `timeout` s. The benches' and the tests'
    one poll loop: a real editor or daemon is watched from outside its own event loop."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan for no values."""
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    rank = (len(values) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return values[low] + (values[high] - values[low]) * (rank - low)


def ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insertions, deletions, substitutions), two-row dynamic programming."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(a: str, b: str) -> float:
    """Line-completion edit similarity (CodeXGLUE, RepoBench): 100 * (1 - levenshtein / longer length)
    on the two strings with surrounding whitespace stripped; 100 when both are empty."""
    a, b = a.strip(), b.strip()
    longest = max(len(a), len(b))
    return 100.0 * (1 - levenshtein(a, b) / longest) if longest else 100.0


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


# ---------------------------------------------------------------- tables

def table(title: str, columns: list[str], rows: list[list[Any]]) -> dict:
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row {row!r} does not have the {len(columns)} columns {columns!r}")
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows]}


def markdown_table(t: dict, digits: int = 2) -> str:
    head = "| " + " | ".join(t["columns"]) + " |"
    numeric = [bool(t["rows"]) and all(isinstance(row[i], (int, float)) or row[i] is None for row in t["rows"])
               for i in range(len(t["columns"]))]
    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    body = ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in t["rows"]]
    return "\n".join([head, rule, *body])


def render(result: dict) -> str:
    """The suite's tables as markdown (what is printed and what goes into BENCHMARKS.md)."""
    parts = []
    for t in result["tables"]:
        if t.get("title"):
            parts.append(f"**{t['title']}**\n")
        parts.append(markdown_table(t) + "\n")
    if result.get("headline"):
        parts.append(f"**{result['headline']}**\n")
    return "\n".join(parts)


def column(t: dict, name: str) -> list:
    index = t["columns"].index(name)
    return [row[index] for row in t["rows"]]


def find_table(result: dict, title_start: str) -> dict:
    for t in result["tables"]:
        if t["title"].startswith(title_start):
            return t
    raise KeyError(title_start)


# ---------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(model=None, options: Options | None = None) -> dict:
    import torch
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if model is not None:
        info.update(device=str(model.device), dtype=str(model.dtype).replace("torch.", ""),
                    model=model_label(model.name), parameters=model.parameter_count)
    elif options is not None:
        info.update(device=options.device or "auto", model=model_label(options.model))
    if options is not None and options.threads:
        info["torch_threads"] = options.threads
    return info


def model_label(name: str | None) -> str:
    """The model's name; for the bundled model also the training step it was exported at."""
    import json

    from ..models import BUNDLED_MODEL

    name = str(name or BUNDLED_MODEL)
    try:
        if Path(name).resolve() == BUNDLED_MODEL.resolve():
            card = json.loads((BUNDLED_MODEL / "training.json").read_text())
            return f"bundled tiny-dream (step {card.get('steps')}, {card.get('parameters', 0) / 1e6:.1f} M params)"
    except (OSError, ValueError):
        pass
    return name


def machine_line(info: dict) -> str:
    parts = [f"{info['cpu']}, {info['cores']} cores"]
    if info.get("gpu"):
        parts.append(info["gpu"])
    parts.append(f"torch {info['torch']} ({info.get('torch_threads')} threads)")
    parts.append(f"transformers {info['transformers']}")
    if info.get("device"):
        parts.append(f"device {info['device']}" + (f" {info['dtype']}" if info.get("dtype") else ""))
    load = info.get("load_average")
    if load and None not in load:
        parts.append(f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (1 min; "
                     f"{info['cores']} cores)")
    return ", ".join(parts)


# ---------------------------------------------------------------- model

def load(options: Options):
    """The model for in-process suites (speed, quality)."""
    import torch

    from ..models import load_model

    if options.threads:
        torch.set_num_threads(options.threads)
    return load_model(options.model, device=options.device, dtype=options.dtype)


def subprocess_env(options: Options) -> dict:
    env = dict(os.environ)
    if options.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(options.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# ---------------------------------------------------------------- held-out data

def held_out_files() -> list[Path]:
    """The stdlib files the bundled model never trained on (the training split's complement)."""
    from ..train import stdlib_files

    return stdlib_files(held_out=True)


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def sample_files(seed: int, count: int, min_chars: int = 2000) -> list[Path]:
    files = [p for p in held_out_files() if p.stat().st_size >= min_chars]
    rng = random.Random(f"files:{seed}")
    rng.shuffle(files)
    return files[:count]


def code_lines(text: str) -> list[tuple[int, str]]:
    """(offset of line start, line without newline) for lines with code, comments excluded."""
    out, offset = [], 0
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append((offset, line))
        offset += len(line) + 1
    return out
