"""speed: tokens/s and tokens per forward of each decoding setting at a fixed context.

For each block size L, at a few positions of held-out stdlib files: prefix = the 256 tokens before
the position, hole = L masks, suffix = the 64 tokens after the L true tokens. Every setting of
`decoding.SETTINGS` decodes the same hole with the same weights in the same process; repeats are
interleaved (repeat -> position -> setting) so drift hits all settings alike. Figures are medians
over positions x repeats; ratios are taken between those medians.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

from . import common
from .decoding import AR, ONE_PER_STEP, block_variants, decode, rule_setting, server_setting, settings_with

PREFIX_TOKENS = 256
SUFFIX_TOKENS = 64
SIZES = (16, 32, 64, 128)
QUICK_SIZES = (16,)


def positions(model, seed: int, count: int, max_length: int) -> list[tuple[str, list[int], int]]:
    """(file name, ids, position) with room for the prefix, the largest block and the suffix."""
    found = []
    for path in common.sample_files(seed, 40, min_chars=6000):
        ids = model.encode(common.read_text(path))
        low, high = PREFIX_TOKENS, len(ids) - max_length - SUFFIX_TOKENS
        if high <= low:
            continue
        found.append((path.name, ids, random.Random(f"speed:{seed}:{path.name}").randrange(low, high)))
        if len(found) == count:
            break
    if not found:
        raise RuntimeError("no held-out file is long enough for the speed benchmark")
    return found


LONG_CONTEXT = 1024  # tokens on the canvas: 896 before the block, 64 masks, 64 after


def long_context_steps(model, seed: int, repeats: int) -> dict:
    """ms per denoising step on a 1,024-token canvas, the same rule (τ=0.9, no early exit) without
    and with the dual and the delayed K/V cache, interleaved; medians. The cached figures include
    their one full forward that fills the cache (a step of its own)."""
    block, after = 64, 64
    before = LONG_CONTEXT - block - after
    for path in common.sample_files(seed + 2, 40, min_chars=12000):
        ids = model.encode(common.read_text(path))
        if len(ids) >= LONG_CONTEXT:
            break
    else:
        raise RuntimeError(f"no held-out file has {LONG_CONTEXT} tokens")
    prefix, suffix = ids[:before], ids[before + block:before + block + after]
    rules = {cache: rule_setting("threshold", 0.9, False, cache) for cache in ("none", "dual", "delayed")}
    per_step: dict[str, list[float]] = {cache: [] for cache in rules}
    forwards: dict[str, list[int]] = {cache: [] for cache in rules}
    for _ in range(repeats + 1):
        for cache, setting in rules.items():
            out = decode(model, setting, prefix, suffix, block)
            per_step[cache].append(1000 * out.seconds / out.forwards)
            forwards[cache].append(out.forwards)
    ms = {cache: common.median(values[1:]) for cache, values in per_step.items()}  # the first round warms up
    return {"file": path.name, "tokens": len(prefix) + block + len(suffix), "ms_uncached": ms["none"],
            "ms_cached": ms["dual"], "speedup": common.ratio(ms["none"], ms["dual"]),
            "ms_delayed": ms["delayed"], "speedup_delayed": common.ratio(ms["none"], ms["delayed"]),
            "forwards_uncached": common.median(forwards["none"][1:]), "forwards_cached": common.median(forwards["dual"][1:]),
            "forwards_delayed": common.median(forwards["delayed"][1:])}


DTYPES = ("float32", "bfloat16")


def dtype_comparison(options: common.Options, places, size: int, repeats: int, server) -> dict:
    """The server default and the AR baseline at `size`-token blocks with the weights in each of
    `DTYPES`, interleaved (repeat -> position -> dtype -> setting); medians of tokens/s. The AR
    baseline is compared both at the same dtype and at its own fastest one."""
    from ..models.loading import resolve_device, resolve_dtype

    auto = str(resolve_dtype("auto", resolve_device(options.device))).replace("torch.", "")
    models = {dtype: common.load(replace(options, dtype=dtype)) for dtype in DTYPES}
    rates: dict[tuple[str, str], list[float]] = {}
    for round_ in range(repeats + 1):  # round 0 warms up
        for _, ids, p in places:
            prefix, suffix = ids[p - PREFIX_TOKENS:p], ids[p + size:p + size + SUFFIX_TOKENS]
            for dtype, model in models.items():
                for setting in (server, AR):
                    out = decode(model, setting, prefix, suffix, size)
                    if round_:
                        rates.setdefault((dtype, setting.key), []).append(size / out.seconds)
    rate = {key: common.median(values) for key, values in rates.items()}
    fastest_ar = max(DTYPES, key=lambda dtype: rate[(dtype, AR.key)])
    rows = [[dtype + (" (auto here)" if dtype == auto else ""), setting.key, rate[(dtype, setting.key)],
             common.ratio(rate[(dtype, setting.key)], rate[(dtype, AR.key)]),
             common.ratio(rate[(dtype, setting.key)], rate[(fastest_ar, AR.key)])]
            for dtype in DTYPES for setting in (server, AR)]
    return {"size": size, "auto": auto, "fastest_ar": fastest_ar, "rows": rows,
            "default_vs_ar_same": common.ratio(rate[(auto, server.key)], rate[(auto, AR.key)]),
            "default_vs_fastest_ar": common.ratio(rate[(auto, server.key)], rate[(fastest_ar, AR.key)]),
            "tokens_per_s": {f"{dtype} {key}": value for (dtype, key), value in rate.items()}}


def keystrokes(model, seed: int, files: int, keys: int) -> dict:
    """Typing at the middle of held-out files, one server-default single-line fill per keystroke
    (with default budgets), decoded twice in turn: from scratch, and with `reuse_prefix` (the
    previous keystroke's keys/values of the shared canvas start). Medians and shares over keystrokes."""
    from ..settings import Settings, sampling_options

    from ..models import trim_at_stop

    s = Settings()
    sampling = model.sampling(**sampling_options(s))
    ratios, reused, same_tokens, same_text = [], [], [], []
    similarity: dict[str, list[float]] = {"plain": [], "reuse": []}

    def first_line(result, hole) -> str:
        return model.decode(trim_at_stop(result.canvas[hole].tolist(), model.eos_token_ids)).split("\n")[0]

    for path in common.sample_files(seed + 1, files, min_chars=20000):
        text = common.read_text(path)
        middle = len(text) // 2
        model.last_keys = None
        for k in range(keys + 1):
            prefix = model.encode(text[:middle + k])[-s.prefix_tokens:]
            suffix = model.encode(text[middle + k:])[:s.suffix_tokens]
            canvas = prefix + [model.mask_token_id] * s.single_line_tokens + suffix
            started = time.perf_counter()
            plain = model.fill(canvas, sampling, cache=s.kv_cache)
            plain_seconds = time.perf_counter() - started
            started = time.perf_counter()
            reusing = model.fill(canvas, sampling, cache=s.kv_cache, reuse_prefix=True)
            reuse_seconds = time.perf_counter() - started
            if k == 0:  # the first keystroke has nothing to reuse
                continue
            hole = slice(len(prefix), len(prefix) + s.single_line_tokens)
            agree = (plain.canvas[hole] == reusing.canvas[hole]).float().mean().item()
            typed_next = text[middle + k:].split("\n")[0]  # what the user goes on to type on this line
            similarity["plain"].append(common.edit_similarity(first_line(plain, hole), typed_next))
            similarity["reuse"].append(common.edit_similarity(first_line(reusing, hole), typed_next))
            ratios.append(reuse_seconds / plain_seconds)
            reused.append(reusing.reused / len(canvas))
            same_tokens.append(agree)
            same_text.append(agree == 1.0)
    model.last_keys = None
    return {"keystrokes": len(ratios), "latency_ratio": common.median(ratios), "rows_reused": common.median(reused),
            "same_tokens": 100 * sum(same_tokens) / len(same_tokens), "same_suggestion": 100 * sum(same_text) / len(same_text),
            "similarity_plain": sum(similarity["plain"]) / len(ratios),
            "similarity_reuse": sum(similarity["reuse"]) / len(ratios)}


def warm_keystrokes(model, seed: int, files: int, keys: int) -> dict:
    """Typing the rest of the line at the middle of held-out files, each keystroke suggested through
    the job path twice: cold (warmStart off) and warm (warmStart on, the previous warm suggestion's
    canvas as its draft). Forwards, seconds, and the suggestion against what is typed next and
    against the cold suggestion."""
    from .. import features
    from ..warm_start import CanvasStore
    from ..settings import Settings

    cold_settings, warm_settings = Settings(), Settings(warm_start=True)
    rows: dict[str, list] = {"cold_forwards": [], "warm_forwards": [], "ratio": [], "drafted": [], "remasked": [],
                             "cold_similarity": [], "warm_similarity": [], "cold_exact": [], "warm_exact": [],
                             "same_similarity": [], "same": []}
    for path in common.sample_files(seed + 1, files, min_chars=20000):
        text = common.read_text(path)
        middle, drafts = len(text) // 2, CanvasStore()
        line_end = text.find("\n", middle) if "\n" in text[middle:] else len(text)
        for k in range(keys + 1):  # the rest of the line is typed, not there yet; the lines after it are
            document, cursor = text[:middle + k] + text[line_end:], middle + k
            started = time.perf_counter()
            cold = features.suggest(model, document, cursor, cold_settings)
            cold_seconds = time.perf_counter() - started
            started = time.perf_counter()
            warm = features.suggest(model, document, cursor, warm_settings, drafts=drafts, key=path.name)
            warm_seconds = time.perf_counter() - started
            if k == 0:  # the first keystroke has no draft
                continue
            typed_next = text[cursor:line_end]
            for name, suggestion in (("cold", cold), ("warm", warm)):
                first = suggestion.text.split("\n")[0]
                rows[f"{name}_forwards"].append(suggestion.forwards)
                rows[f"{name}_similarity"].append(common.edit_similarity(first, typed_next))
                rows[f"{name}_exact"].append(bool(first.strip()) and first == typed_next[:len(first)])
            rows["ratio"].append(warm_seconds / cold_seconds)
            rows["drafted"].append(warm.drafted)
            rows["remasked"].append(warm.remasked)
            rows["same_similarity"].append(common.edit_similarity(warm.text, cold.text))
            rows["same"].append(warm.text == cold.text)
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    n = len(rows["ratio"])
    return {"keystrokes": n, "latency_ratio": common.median(rows["ratio"]),
            **{key: 100 * mean(values) if key.endswith(("exact", "same")) else mean(values)
               for key, values in rows.items() if key != "ratio"}}


def run(options: common.Options, model=None) -> dict:
    started = time.perf_counter()
    model = model or common.load(options)
    sizes = tuple(options.sizes or (QUICK_SIZES if options.quick else SIZES))
    repeats = options.repeats or (1 if options.quick else 3)
    places = positions(model, options.seed, 1 if options.quick else 3, max(sizes))
    server = server_setting(model.default_sampling)  # this model's default decoding in the server
    compared = settings_with(server) + block_variants(server)

    # warm-up: first calls pay for allocator growth and lazy initialisation
    name, ids, p = places[0]
    for setting in compared:
        decode(model, setting, ids[p - PREFIX_TOKENS:p], ids[p + sizes[0]:p + sizes[0] + SUFFIX_TOKENS], sizes[0])

    runs: dict[tuple[int, str], list] = {}
    for size in sizes:
        for _ in range(repeats):
            for name, ids, p in places:
                prefix, suffix = ids[p - PREFIX_TOKENS:p], ids[p + size:p + size + SUFFIX_TOKENS]
                for setting in compared:
                    out = decode(model, setting, prefix, suffix, size)
                    runs.setdefault((size, setting.key), []).append(out)
        common.progress(f"speed: block {size} done")

    rows, records = [], []
    for size in sizes:
        rate = {}
        for setting in compared:
            outs = runs[(size, setting.key)]
            rate[setting.key] = common.median(size / o.seconds for o in outs)
        for setting in compared:
            outs = runs[(size, setting.key)]
            forwards = common.median(o.forwards for o in outs)
            seconds = common.median(o.seconds for o in outs)
            record = {
                "block": size, "setting": setting.key, "forwards": forwards,
                "tokens_per_forward": common.median(size / o.forwards for o in outs),
                "ms_per_forward": common.median(1000 * o.seconds / o.forwards for o in outs),
                "refreshes": common.median(o.refreshes for o in outs),
                "rows_per_forward": common.median(o.rows / o.forwards for o in outs),
                "ms": 1000 * seconds, "tokens_per_s": rate[setting.key],
                "vs_ar": common.ratio(rate[setting.key], rate[AR.key]),
                "vs_one_per_step": common.ratio(rate[setting.key], rate[ONE_PER_STEP.key]),
                "runs": len(outs),
            }
            records.append(record)
            rows.append([size, setting.key, forwards, record["refreshes"], record["tokens_per_forward"],
                         record["rows_per_forward"], record["ms_per_forward"],
                         record["ms"], record["tokens_per_s"], record["vs_ar"], record["vs_one_per_step"]])
    columns = ["block", "setting", "forwards", "cache refreshes", "tokens/forward", "rows/forward", "ms/forward",
               "ms/block", "tokens/s",
               "× AR", "× steps=L"]
    long = long_context_steps(model, options.seed, repeats)
    common.progress("speed: long context done")
    long_table = common.table(
        f"One denoising step at {long['tokens']:,} tokens of context ({long['file']}; 64-token block, τ=0.9, "
        "no early exit)", ["K/V cache", "forwards", "ms/step"],
        [["none (every step runs the whole canvas)", long["forwards_uncached"], long["ms_uncached"]],
         ["dual (prefix and suffix keys/values reused)", long["forwards_cached"], long["ms_cached"]],
         ["delayed (dual, and decoded tokens' keys/values kept a step after they are revealed)",
          long["forwards_delayed"], long["ms_delayed"]],
         ["uncached / dual", "", long["speedup"]],
         ["uncached / delayed", "", long["speedup_delayed"]]])
    size = 64 if 64 in sizes else max(sizes)
    dtypes = dtype_comparison(options, places, size, repeats, server)
    common.progress("speed: dtypes done")
    dtype_table = common.table(
        f"Weights dtype: the server default and the AR baseline at {size}-token blocks (same positions, "
        f"interleaved; auto = {dtypes['auto']} on this machine)",
        ["dtype", "setting", "tokens/s", "× AR, same dtype", f"× AR in {dtypes['fastest_ar']} (its fastest)"],
        dtypes["rows"])
    typing = keystrokes(model, options.seed, 1 if options.quick else 6, 3 if options.quick else 10)
    common.progress("speed: keystrokes done")
    typing_table = common.table(
        f"Across keystrokes: reusing the previous request's prefix keys/values ({typing['keystrokes']} keystrokes, "
        "server defaults)", ["measure", "value"],
        [["latency with reuse / without (median)", typing["latency_ratio"]],
         ["canvas rows reused (median share)", typing["rows_reused"]],
         ["hole tokens identical to the fill without reuse (%)", typing["same_tokens"]],
         ["suggestions identical to the fill without reuse (%)", typing["same_suggestion"]],
         ["edit similarity to the line typed next, without reuse (mean %)", typing["similarity_plain"]],
         ["edit similarity to the line typed next, with reuse (mean %)", typing["similarity_reuse"]]])
    warm = warm_keystrokes(model, options.seed, 1 if options.quick else 6, 3 if options.quick else 10)
    common.progress("speed: warm start done")
    warm_table = common.table(
        f"Across keystrokes: warm start (`warmStart`) against a cold start ({warm['keystrokes']} keystrokes, "
        "server defaults otherwise, suggestions run to completion)", ["measure", "warmStart off", "warmStart on"],
        [["forward passes per suggestion (mean)", warm["cold_forwards"], warm["warm_forwards"]],
         ["latency on / off (median)", "", warm["latency_ratio"]],
         ["draft tokens per suggestion / re-masked (mean)", "", f"{common.fmt(warm['drafted'])} / "
                                                                 f"{common.fmt(warm['remasked'])}"],
         ["edit similarity of the first line to the line typed next (mean %)", warm["cold_similarity"],
          warm["warm_similarity"]],
         ["first line typed next exactly (%)", warm["cold_exact"], warm["warm_exact"]],
         ["against the cold suggestion: edit similarity / identical (%)", "",
          f"{common.fmt(warm['same_similarity'])} / {common.fmt(warm['same'])}"]])
    settings_table = common.table("Settings", ["setting", "what", "server default"],
                                  [[s.key, s.label, s.key == server.key] for s in compared])
    default = {r["block"]: r for r in records if r["setting"] == server.key}
    headline = (f"server default `{server.key}` at {size}-token blocks: {default[size]['tokens_per_forward']:.2f} "
                f"tokens/forward; {dtypes['default_vs_ar_same']:.2f}× the tokens/s of the autoregressive baseline "
                f"with both in {dtypes['auto']} (the default dtype here), {dtypes['default_vs_fastest_ar']:.2f}× the "
                f"baseline in its fastest dtype ({dtypes['fastest_ar']}).")
    return {
        "suite": "speed",
        "title": "Decoding speed",
        "tables": [common.table(f"Infill block decoding at {PREFIX_TOKENS} prefix + {SUFFIX_TOKENS} suffix tokens, "
                                f"weights in {str(model.dtype).replace('torch.', '')}, AR in the same dtype "
                                f"(medians over {len(places)} position(s) x {repeats} repeat(s))", columns, rows),
                   settings_table, dtype_table, long_table, typing_table, warm_table],
        "records": records,
        "headline": headline,
        "summary": {"default": server.key, "keystrokes": typing, "warm_start": warm, "long_context": long, "dtypes": dtypes, "sizes": list(sizes), "settings": [s.key for s in compared], "repeats": repeats,
                    "positions": [f"{n}@{p}" for n, _, p in places]},
        "notes": [
            f"Context: {PREFIX_TOKENS} tokens of a held-out stdlib file before the block, the {SUFFIX_TOKENS} tokens "
            "after the block's true text as suffix; greedy (temperature 0) everywhere.",
            "Every block position is decoded, pad/EOS included, so `tokens/s` = block size / wall time of the "
            "whole fill, and `tokens/forward` = block size / `forwards`. `forwards` counts denoising steps, one "
            "forward pass each: without a cache over the whole canvas (prefix + block + suffix); with a K/V "
            "cache, `cache refreshes` of them are full-canvas forwards (the first step always is one: it fills "
            "the cache), the others run only part of the canvas (see the cache modes below). `rows/forward`: canvas "
            "rows run through the network per forward, the work a step does (AR: the prompt once, then one row "
            "per token). `ms/forward` = wall time / `forwards`.",
            "Rows: `steps=L` (one token per step), `steps=L/2`, `steps=L/4`: Dream's schedule without cache or "
            "early exit; `τ=…` (confidence threshold) and `f=…` (Fast-dLLM factor rule) with the server's early "
            "exit and K/V cache: the candidates the quality suite picks the default from. The `server default` "
            "row decodes exactly as the server does with default settings. Every diffusion row uses the "
            "checkpoint's own generation defaults (the bundled model's EOS penalty), as the server does.",
            "AR baseline: the same weights run causally with a KV cache (transformers `DynamicCache`), prompt = "
            "suffix + prefix (same context length), prefill + one forward per further token; it always decodes "
            "the whole block (no early stop at EOS). It is a *speed* baseline: the bundled model was trained "
            "only bidirectionally.",
            "`× AR` and `× steps=L` are ratios of tokens/s measured in the same run.",
            "Weights dtype: the same positions decoded by the server default and the AR baseline with the weights "
            "loaded in float32 and in bfloat16, interleaved. `auto` is what the server loads on this machine "
            "(bfloat16 on a GPU and on a CPU with AMX bf16 matrix hardware, else float32). An AR step runs one "
            "row, where bfloat16's per-call overhead outweighs its cheaper arithmetic on a CPU; a diffusion step "
            "runs many rows; so the headline also states the ratio against AR in its own fastest dtype.",
            "`+b16`, `+b32`: the server default in semi-autoregressive blocks of that many positions (block k "
            "finished before block k+1 is touched; each block starts with a full forward that refreshes the cache).",
            "With a K/V cache, `dual` reruns the hole's whole span at every step; `delayed` reruns only the "
            "still-masked positions, the rows that score them and the positions revealed by the step before "
            "(dKV-Cache's delayed caching), so its steps shrink as the hole fills.",
            "Across keystrokes: at the middle of held-out files the file's next characters are typed one by one; "
            "each keystroke's document is filled at the cursor as a server-default single-line request (default "
            "prefix/suffix budgets and hole), once from scratch and once with `fill(reuse_prefix=True)`, which starts "
            "from the previous keystroke's keys/values of the canvas start both share and runs only the rest "
            "(the server's `reuseKeys` setting, on by default). Identical = the same hole tokens as the fill without reuse. "
            "Edit similarity (as in the quality suite) compares the first line of each fill with the rest of the "
            "line the user goes on to type: the quality that reuse's approximation costs.",
            "Warm start: the same typing, each keystroke suggested through the job path (features.suggest) "
            "with `warmStart` off and on; on, the hole starts from the previous keystroke's canvas (what was typed "
            "consumed, the rest provisional and re-checked every forward; see README, Sampling).",
        ],
        "seconds": time.perf_counter() - started,
    }
