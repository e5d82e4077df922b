"""gpu: everything that needs a GPU, in one command (`diffu-lsp bench gpu --write`).

No network and no checkpoint download: the networks are random weights in the real shapes (see
shapes.py), built on the GPU in bfloat16. In one run (a few minutes on one H200):
- the shapes benchmark of DiffuCoder/Dream-7B at 256/1,024/4,096 tokens, every K/V cache mode,
  1/2/4/8 tokens per forward, with the sampler's own overhead per step, and the AR baseline;
- LLaDA-8B at 8 tokens per forward;
- `compile: true` (torch.compile of the network) against eager on the same job, after a warm-up
  that pays for the compilation (its time is reported);
- peak GPU memory per shape.
It writes BENCHMARKS.md's "On a GPU" section (with --write) and the JSON (with --json) after
each shape, so a run cut short keeps what it measured. `--quick` / `--device cpu` runs the same
code on the tiny shape (what the tests do). Imports nothing but torch and transformers (no msgspec:
the GPU machine's image lacks it; tests/test_gpu_traps.py runs it in such an environment).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from . import common, shapes

COMPILE_CONTEXT = 1024
COMPILE_CACHE = "delayed"   # the server default
COMPILE_PER_FORWARD = 8
NAN = float("nan")


def compile_comparison(model, context: int) -> dict:
    """One job eager and compiled (after one compiled warm-up job: the compile time), medians of 3."""
    started = time.perf_counter()
    warm = shapes.run_job(model, context, COMPILE_CACHE, COMPILE_PER_FORWARD, compiled=True)
    compile_seconds = time.perf_counter() - started
    eager, compiled = [], []
    for _ in range(3):
        eager.append(shapes.run_job(model, context, COMPILE_CACHE, COMPILE_PER_FORWARD).ms)
        compiled.append(shapes.run_job(model, context, COMPILE_CACHE, COMPILE_PER_FORWARD, compiled=True).ms)
    return {"context": context, "eager_ms": common.median(eager), "compiled_ms": common.median(compiled),
            "first_compiled_ms": warm.ms, "compile_seconds": compile_seconds, "error": model.compile_error}


def run(options: common.Options) -> dict:
    from ..models.loading import resolve_device

    started = time.perf_counter()
    device = resolve_device(options.device)
    if device.type != "cuda" and not options.quick:  # never write CPU figures into "On a GPU"
        from ..errors import ModelLoadFailed

        raise ModelLoadFailed(f"bench gpu needs a CUDA device (found {device.type}); `--quick` runs it on the tiny shape here")
    quick = options.quick or device.type != "cuda"
    plan = [("tiny", (128, 256), (4, 8))] if quick else [
        ("dream-7b", shapes.CONTEXTS, shapes.PER_FORWARD), ("llada-8b", shapes.CONTEXTS, (8,))]
    if options.extra.get("shapes"):  # other shapes at the first shape's sizes
        plan = [(name, plan[0][1], plan[0][2]) for name in options.extra["shapes"]]
    plan = [(name, options.extra.get("contexts") or contexts, options.extra.get("per_forward") or per_forward)
            for name, contexts, per_forward in plan]
    unknown = [name for name, _, _ in plan if name not in shapes.SHAPES]
    if unknown:  # before building anything
        raise ValueError(f"unknown shape {unknown[0]!r}; expected one of {', '.join(shapes.SHAPES)}")
    tables, summary = [], {"shapes": {}}
    compile_rows = []
    for index, (shape, contexts, per_forward) in enumerate(plan):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = shapes.build(shape, device, options.dtype)
        common.progress(f"gpu: built {shape} in {model.load_seconds:.1f} s")
        summary["dtype"] = str(model.dtype).replace("torch.", "")
        summary["device"] = str(model.device)
        figures = {"jobs": [], "ar": {}}
        for position, context in enumerate(contexts):  # saved after each context: a 7B shape takes minutes
            part = shapes.measure(model, (context,), per_forward, shapes.CACHE_MODES, warm_up=position == 0)
            figures["jobs"] += part["jobs"]
            figures["ar"].update(part["ar"])
            shape_tables = shapes.shape_tables(model, shape, figures, model.load_seconds)
            jobs = figures["jobs"]
            overhead = [100 * common.ratio(j.overhead_ms_per_step, j.network_ms_per_forward) for j in jobs]
            summary["shapes"][shape] = {
                "parameters": model.parameter_count, "peak_mb": shapes.peak_memory_mb(model),
                "max_overhead_percent": max(overhead), "contexts": list(contexts[:position + 1]),
                "jobs": [dict(vars(j), overhead_ms_per_step=j.overhead_ms_per_step) for j in jobs]}
            summary["done"] = [name for name, _, _ in plan[:index + (position + 1 == len(contexts))]]
            save(options, result_of(tables + shape_tables, summary, compile_rows, plan, device, started))
        tables += shape_tables
        if index == 0 and device.type == "cuda":  # compile once, on the first shape (minutes of compiling on a CPU)
            context = min(COMPILE_CONTEXT, max(contexts))
            try:
                found = compile_comparison(model, context)
            except Exception as error:  # report, do not lose the rest of the run
                found = {"context": context, "error": f"{error.__class__.__name__}: {error}".splitlines()[0]}
            summary["compile"] = found
            compile_rows.append([shape, context, found.get("eager_ms"), found.get("compiled_ms"),
                                 common.ratio(found.get("eager_ms", NAN), found.get("compiled_ms", NAN)),
                                 found.get("compile_seconds"), found.get("error") or "–"])
            common.progress("gpu: compile comparison done")
            save(options, result_of(tables, summary, compile_rows, plan, device, started))
        common.progress(f"gpu: {shape} written")
        del model, figures
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result_of(tables, summary, compile_rows, plan, device, started)


def result_of(tables: list, summary: dict, compile_rows: list, plan: list, device, started: float) -> dict:
    """The suite's result from the shapes measured so far."""
    tables = list(tables)
    if not compile_rows:
        compile_rows = [["–", None, None, None, None, None, "not run: no CUDA device"]]
    tables.append(common.table(
        f"torch.compile (`compile: true`) against eager: one {shapes.BLOCK}-token block, {COMPILE_CACHE} cache, "
        f"{COMPILE_PER_FORWARD} tokens/forward (medians of 3, after a compiled warm-up)",
        ["shape", "context", "eager ms/block", "compiled ms/block", "× faster", "compile s", "error"], compile_rows))
    notes = [
        "Random weights in the real shapes, built on the device (nothing downloaded); see the Model shapes section "
        "for how each figure is measured.",
        "overhead: the time per step outside the network (sampler, masks, logits to the host); the target is "
        "under 5 % of a forward.",
        "compile s: the first compiled job (tracing and compiling the dynamic-shape graph) minus nothing: a server "
        "pays it once per process. CUDA graphs are not used.",
    ]
    command = "diffu-lsp bench gpu --write"
    notes.append(f"Rerun on a GPU machine: `{command}` (a few minutes on one H200; no network needed).")
    extra = {"model": "random weights in the shapes " + ", ".join(s for s, _, _ in plan),
             "device": summary.get("device", str(device)), "dtype": summary.get("dtype")}
    return {"suite": "gpu", "title": "On a GPU", "tables": tables, "summary": summary, "notes": notes,
            "seconds": time.perf_counter() - started, "machine_extra": extra}


def save(options: common.Options, result: dict) -> None:
    """The results so far, where `bench gpu --write --json` puts them at the end."""
    from . import _finite, report

    result = dict(result, command=options.command)
    result["machine"] = {**common.machine(None, options), **result.pop("machine_extra")}
    if options.extra.get("json"):
        Path(options.extra["json"]).write_text(json.dumps(_finite([result]), indent=1, default=str))
    if options.extra.get("write") and options.extra.get("out"):
        report.write(Path(options.extra["out"]), [result])
