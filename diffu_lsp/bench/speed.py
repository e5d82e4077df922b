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

from . import common
from .decoding import AR, ONE_PER_STEP, SERVER, SETTINGS, decode

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


def run(options: common.Options, model=None) -> dict:
    started = time.perf_counter()
    model = model or common.load(options)
    sizes = tuple(options.sizes or (QUICK_SIZES if options.quick else SIZES))
    repeats = options.repeats or (1 if options.quick else 3)
    places = positions(model, options.seed, 1 if options.quick else 3, max(sizes))

    # warm-up: first calls pay for allocator growth and lazy initialisation
    name, ids, p = places[0]
    for setting in SETTINGS:
        decode(model, setting, ids[p - PREFIX_TOKENS:p], ids[p + sizes[0]:p + sizes[0] + SUFFIX_TOKENS], sizes[0])

    runs: dict[tuple[int, str], list] = {}
    for size in sizes:
        for _ in range(repeats):
            for name, ids, p in places:
                prefix, suffix = ids[p - PREFIX_TOKENS:p], ids[p + size:p + size + SUFFIX_TOKENS]
                for setting in SETTINGS:
                    out = decode(model, setting, prefix, suffix, size)
                    runs.setdefault((size, setting.key), []).append(out)
        common.progress(f"speed: block {size} done")

    rows, records = [], []
    for size in sizes:
        rate = {}
        for setting in SETTINGS:
            outs = runs[(size, setting.key)]
            rate[setting.key] = common.median(size / o.seconds for o in outs)
        for setting in SETTINGS:
            outs = runs[(size, setting.key)]
            forwards = common.median(o.forwards for o in outs)
            seconds = common.median(o.seconds for o in outs)
            record = {
                "block": size, "setting": setting.key, "forwards": forwards,
                "tokens_per_forward": common.median(size / o.forwards for o in outs),
                "ms_per_forward": common.median(1000 * o.seconds / o.forwards for o in outs),
                "refreshes": common.median(o.refreshes for o in outs),
                "ms": 1000 * seconds, "tokens_per_s": rate[setting.key],
                "vs_ar": common.ratio(rate[setting.key], rate[AR.key]),
                "vs_one_per_step": common.ratio(rate[setting.key], rate[ONE_PER_STEP.key]),
                "runs": len(outs),
            }
            records.append(record)
            rows.append([size, setting.key, forwards, record["refreshes"], record["tokens_per_forward"],
                         record["ms_per_forward"],
                         record["ms"], record["tokens_per_s"], record["vs_ar"], record["vs_one_per_step"]])
    columns = ["block", "setting", "forwards", "cache refreshes", "tokens/forward", "ms/forward", "ms/block", "tokens/s",
               "× AR", "× steps=L"]
    settings_table = common.table("Settings", ["setting", "what", "server default"],
                                  [[s.key, s.label, s.key == SERVER.key] for s in SETTINGS])
    default = {r["block"]: r for r in records if r["setting"] == SERVER.key}
    size = 64 if 64 in default else max(default)
    headline = (f"server default `{SERVER.key}` at {size}-token blocks: {default[size]['vs_ar']:.2f}× the tokens/s "
                f"of the autoregressive baseline, {default[size]['tokens_per_forward']:.2f} tokens/forward, "
                f"{default[size]['ms_per_forward']:.2f} ms/forward (AR: "
                f"{next(r['ms_per_forward'] for r in records if r['block'] == size and r['setting'] == AR.key):.2f}).")
    return {
        "suite": "speed",
        "title": "Decoding speed",
        "tables": [common.table(f"Infill block decoding at {PREFIX_TOKENS} prefix + {SUFFIX_TOKENS} suffix tokens "
                                f"(medians over {len(places)} position(s) x {repeats} repeat(s))", columns, rows),
                   settings_table],
        "records": records,
        "headline": headline,
        "summary": {"default": SERVER.key, "sizes": list(sizes), "settings": [s.key for s in SETTINGS], "repeats": repeats,
                    "positions": [f"{n}@{p}" for n, _, p in places]},
        "notes": [
            f"Context: {PREFIX_TOKENS} tokens of a held-out stdlib file before the block, the {SUFFIX_TOKENS} tokens "
            "after the block's true text as suffix; greedy (temperature 0) everywhere.",
            "Every block position is decoded, pad/EOS included, so `tokens/s` = block size / wall time of the "
            "whole fill, and `tokens/forward` = block size / `forwards`. `forwards` counts denoising steps, one "
            "forward pass each: without a cache over the whole canvas (prefix + block + suffix); with a K/V "
            "cache, `cache refreshes` of them are full-canvas forwards (the first step always is one: it fills "
            "the cache), the others run only the rows that changed or are still masked. `ms/forward` = wall "
            "time / `forwards`.",
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
        ],
        "seconds": time.perf_counter() - started,
    }
