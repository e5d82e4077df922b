"""Benchmarks: `diffu-lsp bench <suite> [--model M] [--device D] [--quick] [--write] [--out BENCHMARKS.md]`.

Suites: replay (typing replay over LSP), speed (decoding speed per setting), quality (HumanEval
infilling and held-out stdlib exact match and edit similarity per setting, with a quality-vs-speed
plot), memory (peak memory, load time, time to first suggestion), daemon (the shared model daemon vs
a model in every server: added latency, replay, memory for 1 and 3 windows), shapes (random-weight
networks of the real checkpoints' shapes: ms per step and per block, cache modes, the sampler's own
overhead, memory), gpu (everything that needs a GPU, in one run), cluster (simulated editors against a
Ray Serve cluster of 1 and 2 replicas and against the local daemon), soak
(real servers and daemon typed into through daemon faults: every request answered in bounded time), edit
(held-out lines with corrupted tokens refined in place: restored, detected, controls untouched; and
held-out single-line infill, for --model and each --compare model), next-edit (one edit each in held-out files:
the edits it implies predicted against plain text replacement and no prediction, plus a typing replay
with nextEdit off and on), editor (keystroke -> ghost text in a real Neovim, Neovim's own request timing
against the plugin's, the time split into its parts), all. `python -m diffu_lsp.bench` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from .common import Options, machine, machine_line, progress, render

SUITES = ("replay", "speed", "quality", "memory", "daemon")
MODEL_SUITES = ("speed", "quality")  # run in this process on a model loaded once for both
STANDALONE = ("shapes", "gpu", "soak", "cluster", "edit", "next-edit", "editor")  # build their own networks or services; not part of `all`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffu-lsp bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=SUITES + STANDALONE + ("all",))
    parser.add_argument("--model", help="model folder or hub id (default: the bundled tiny model)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, mps")
    parser.add_argument("--dtype", help="auto (default), float32, bfloat16, float16")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (CI)")
    parser.add_argument("--write", action="store_true", help="update the suite's section of --out (and the plot)")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="markdown file (default BENCHMARKS.md)")
    parser.add_argument("--plot", type=Path, help="quality plot PNG (default with --write: bench-quality.png next to --out)")
    parser.add_argument("--json", type=Path, help="also dump the raw results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    group = parser.add_argument_group("replay")
    group.add_argument("--cps", type=float, default=8.0, help="typing speed, characters per second (default 8)")
    group.add_argument("--chars", type=int, help="characters typed per point (default 40, quick 12)")
    group.add_argument("--points", type=int, help="typing points (default 8, quick 1)")
    group.add_argument("--warm-start", action="store_true", help="replay with warmStart off, then on, and compare")
    group.add_argument("--baseline", metavar="JSON", help='replay first under these settings too and compare, '
                       'e.g. \'{"kvCache": "none", "earlyExit": false}\'')
    group = parser.add_argument_group("cluster")
    group.add_argument("--batching", choices=("both", "on", "off"), default="both",
                       help="cluster: replicas with forward batching, without, or both (default)")
    group = parser.add_argument_group("speed / memory")
    group.add_argument("--sizes", help="comma-separated block sizes (default 16,32,64,128; quick 16)")
    group.add_argument("--repeats", type=int, help="timed repeats (default 3, quick 1)")
    group = parser.add_argument_group("shapes / gpu")
    group.add_argument("--shapes", help="comma-separated shapes: dream-7b, llada-8b, open-dcoder-0.5b, tiny "
                       "(default: open-dcoder-0.5b on a CPU, dream-7b,llada-8b on CUDA; quick: tiny)")
    group.add_argument("--contexts", help="comma-separated context lengths (default 256,1024,4096; CPU 256,1024)")
    group.add_argument("--per-forward", help="comma-separated tokens revealed per forward (default 1,2,4,8)")
    group.add_argument("--layers", type=int, help="shapes: build only this many transformer layers of each shape")
    group = parser.add_argument_group("soak")
    group.add_argument("--minutes", type=float, help="soak: minutes of typing through faults (default 10, quick 1)")
    group.add_argument("--windows", type=int, help="soak: editor windows, one server each (default 2)")
    group.add_argument("--fault-every", type=float, help="soak: mean seconds between daemon faults (default 30)")
    group.add_argument("--deadline", type=float, help="soak: the servers' daemonDeadlineSeconds (default: the setting's)")
    group = parser.add_argument_group("edit")
    group.add_argument("--compare", help="edit: comma-separated further models to run in the same run")
    group.add_argument("--edit-lines", type=int, help="edit: corrupted lines, and as many controls (default 60, quick 6); "
                       "next-edit: edits per kind (default 40, quick 3)")
    group = parser.add_argument_group("quality")
    group.add_argument("--problems", type=int, help="HumanEval problems (default all 164, quick 4)")
    group.add_argument("--lines", type=int, help="held-out stdlib lines (default 200, quick 6)")
    group.add_argument("--exec-timeout", type=float, default=5.0, help="seconds per test program (default 5)")
    return parser


def options_from(args, argv: list[str]) -> Options:
    plot = args.plot
    if plot is None and args.write:
        plot = args.out.parent / "bench-quality.png"
    return Options(
        model=args.model, device=args.device, dtype=args.dtype, quick=args.quick, seed=args.seed,
        threads=args.threads, cps=args.cps, chars=args.chars, points=args.points, problems=args.problems,
        stdlib_lines=args.lines, repeats=args.repeats, exec_timeout=args.exec_timeout, plot=plot,
        sizes=tuple(int(s) for s in args.sizes.split(",")) if args.sizes else None,
        command="diffu-lsp bench " + shlex.join(argv),
    )


def run_suite(name: str, options: Options, model=None) -> dict:
    """One suite -> its result dict (tables, summary, notes, machine, command)."""
    load_before = _load_average()
    if name not in SUITES + STANDALONE:
        raise ValueError(name)
    suite = importlib.import_module(f"{__package__}.{name.replace('-', '')}")
    result = suite.run(options, model) if name in MODEL_SUITES else suite.run(options)
    result["command"] = options.command
    result["machine"] = machine(model, options) if model is not None else machine(None, options)
    if result.get("machine_extra"):  # suites that build their own networks name them
        result["machine"].update(result.pop("machine_extra"))
    result["machine"]["load_average"] = [load_before, _load_average()]  # other work on the machine shows here
    if name == "quality" and options.plot:
        from . import quality
        result["plot"] = quality.plot(result, options.plot)
    if result.get("plot") and options.extra.get("out"):
        result["plot_link"] = os.path.relpath(result["plot"], Path(options.extra["out"]).resolve().parent)
    return result


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # `kill` cleans up like Ctrl-C: no daemon left behind
        signal.signal(signal.SIGTERM, _interrupt)
    options = options_from(args, argv)
    options.extra["out"] = str(args.out.resolve())
    options.extra["batching"] = args.batching
    options.extra.update(write=args.write, json=str(args.json) if args.json else None)  # gpu: saved after each shape
    if args.shapes:
        options.extra["shapes"] = tuple(args.shapes.split(","))
    if args.contexts:
        options.extra["contexts"] = tuple(int(c) for c in args.contexts.split(","))
    if args.per_forward:
        options.extra["per_forward"] = tuple(int(k) for k in args.per_forward.split(","))
    if args.layers:
        options.extra["layers"] = args.layers
    if args.warm_start:
        options.extra["warm_start"] = True
    if args.compare:
        options.extra["compare"] = tuple(args.compare.split(","))
    if args.edit_lines:
        options.extra["edit_lines"] = args.edit_lines
    for name in ("minutes", "windows", "fault_every", "deadline"):
        if getattr(args, name) is not None:
            options.extra[name] = getattr(args, name)
    if args.baseline:
        try:
            options.extra["baseline"] = json.loads(args.baseline)
        except ValueError as error:
            print(f"diffu-lsp bench: --baseline is not JSON: {error}", file=sys.stderr)
            return 2
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    # server subprocesses first, so the in-process model is not held in memory beside theirs
    order = [s for s in ("replay", "memory", "daemon", "speed", "quality") + STANDALONE if s in suites]
    from .. import models

    results, model = [], None
    try:
        for name in order:
            if name in ("speed", "quality") and model is None:
                from .common import load
                model = load(options)
            started = time.perf_counter()
            progress(f"{name}: starting")
            result = run_suite(name, options, model)
            results.append(result)
            print(f"\n## {result['title']}  ({time.perf_counter() - started:.0f} s)\n")
            print(machine_line(result["machine"]) + (f"; model {result['machine']['model']}" if result["machine"].get("model") else ""))
            print()
            print(render(result))
            if result.get("plot"):
                print(f"plot: {result['plot']}")
            if args.write:
                from . import report
                report.write(args.out, [result])
                print(f"updated the {name} section of {args.out}")
    except models.ModelLoadFailed as error:
        print(f"diffu-lsp bench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        args.json.write_text(json.dumps(_finite(results), indent=1, default=str))
    failed = [r["suite"] for r in results if r.get("summary", {}).get("failures")]
    if failed:
        print(f"diffu-lsp bench: {', '.join(failed)}: failures above", file=sys.stderr)
    return 1 if failed else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _finite(value):
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
