"""The decoding settings compared by the speed and quality suites, and the autoregressive baseline.

Every setting decodes one hole of `length` positions between prefix and suffix ids and returns the
`length` ids, the number of forward passes and the wall seconds. The diffusion settings go through
`DiffusionModel.fill` (the same path the server uses, without post-processing); the baseline runs
the same weights (`model.network`) left to right with a causal mask and a KV cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from ..sampler import Sampling
from .baseline import Decoded, autoregressive, sync as _sync  # noqa: F401 (autoregressive: used by the suites as decoding.autoregressive)


@dataclass(frozen=True)
class Setting:
    key: str            # short name used in tables and the plot
    label: str          # what it is
    kind: str           # "diffusion" | "ar"
    alg: str = "entropy"
    steps_div: int | None = None       # Dream schedule: steps = length // steps_div
    threshold: float | None = None     # confidence threshold (alg "threshold")
    factor: float | None = None        # factor rule (alg "factor")
    early_exit: bool = False           # a revealed EOS/pad ends the hole
    cache: str = "none"                # K/V cache between steps: "none" | "prefix" | "dual" | "delayed"
    refresh_every: int | None = None
    block_length: int | None = None    # semi-autoregressive blocks (None: the whole hole at once)

    def sampling(self, model, length: int) -> Sampling:
        """The setting over the checkpoint's own generation defaults (its EOS penalty), as the server does."""
        shared = dict(early_exit=self.early_exit, block_length=self.block_length)
        if self.threshold is not None:
            return model.sampling(alg="threshold", threshold=self.threshold, **shared)
        if self.factor is not None:
            return model.sampling(alg="factor", factor=self.factor, **shared)
        return model.sampling(alg=self.alg, steps=max(1, length // (self.steps_div or 1)), **shared)


def rule_setting(algorithm: str, value: float, early_exit: bool, cache: str, refresh_every: int | None = None,
                 server: bool = False) -> Setting:
    """A parallel-decoding rule (confidence threshold or factor) with the server's exit/cache options."""
    if algorithm == "threshold":
        key, label = f"τ={value:g}", f"confidence threshold {value:g}"
    else:
        key, label = f"f={value:g}", f"factor rule f={value:g}"
    if early_exit:
        key, label = key + "+exit", label + ", early exit at EOS/pad"
    if cache != "none":
        key, label = key + f"+{cache}", label + f", {cache} K/V cache"
    return Setting(key, ("server defaults: " if server else "") + label, "diffusion",
                   threshold=value if algorithm == "threshold" else None,
                   factor=value if algorithm == "factor" else None,
                   early_exit=early_exit, cache=cache, refresh_every=refresh_every)


def server_setting(model_defaults: dict | None = None) -> Setting:
    """The decoding the server uses with default settings for a model with these generation
    defaults (None: the bundled model's generation_config.json)."""
    from ..settings import Settings, sampling_options

    if model_defaults is None:
        from ..models.loading import BUNDLED_MODEL, _fetcher, generation_defaults
        model_defaults = generation_defaults(_fetcher(str(BUNDLED_MODEL)))
    s = Settings()
    sampling = Sampling(**model_defaults).with_options(**sampling_options(s))
    if sampling.alg in ("threshold", "factor"):
        value = sampling.threshold if sampling.alg == "threshold" else sampling.factor
        return rule_setting(sampling.alg, value, s.early_exit, s.kv_cache, s.cache_refresh_steps, server=True)
    return Setting(sampling.alg, f"server defaults: {sampling.alg}", "diffusion", alg=sampling.alg,
                   early_exit=s.early_exit, cache=s.kv_cache, refresh_every=s.cache_refresh_steps)


def cache_variants(server: Setting) -> tuple[Setting, ...]:
    """The server's decoding rule with each K/V cache mode (the server's own left out): what the
    cache's approximation costs and saves, with everything else as the server decodes."""
    if server.threshold is None and server.factor is None:
        return ()
    algorithm, value = ("threshold", server.threshold) if server.threshold is not None else ("factor", server.factor)
    return tuple(rule_setting(algorithm, value, server.early_exit, cache, server.refresh_every)
                 for cache in CACHE_VARIANTS if cache != server.cache)


def block_variants(server: Setting) -> tuple[Setting, ...]:
    """The server default in semi-autoregressive blocks of `BLOCK_LENGTHS` (each block finished, and
    the cache refreshed, before the next): what blocks cost in speed for long holes."""
    return tuple(replace(server, key=f"{server.key}+b{n}", label=f"{server.label}, blocks of {n}", block_length=n)
                 for n in BLOCK_LENGTHS)


def settings_with(server: Setting) -> tuple[Setting, ...]:
    """Every compared setting: the fixed ones, the server default, and its rule with the other caches."""
    compared = SETTINGS if any(s.key == server.key for s in SETTINGS) else SETTINGS + (server,)
    known = {s.key for s in compared}
    return compared + tuple(s for s in cache_variants(server) if s.key not in known)


def candidates() -> tuple[Setting, ...]:
    """The parallel-decoding rules the quality suite chooses the default from, each with the
    server's default early exit and K/V cache, so each is measured as the server would run it."""
    from ..settings import Settings

    s = Settings()
    rules = [("threshold", t) for t in THRESHOLDS] + [("factor", f) for f in FACTORS]
    return tuple(rule_setting(alg, value, s.early_exit, s.kv_cache, s.cache_refresh_steps) for alg, value in rules)


THRESHOLDS = (0.9, 0.7, 0.5)
CACHE_VARIANTS = ("none", "dual", "delayed")  # the server rule's cache ablation (prefix: dual's weaker sibling)
BLOCK_LENGTHS = (16, 32)  # speed only: the quality tasks' holes are mostly shorter than a block
FACTORS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
AR = Setting("ar", "autoregressive: causal mask + KV cache, 1 token/forward", "ar")
ONE_PER_STEP = Setting("steps=L", "Dream schedule (entropy), steps = length", "diffusion", steps_div=1)
CANDIDATES = candidates()
SERVER = server_setting()
SETTINGS: tuple[Setting, ...] = (
    AR,
    ONE_PER_STEP,
    Setting("steps=L/2", "Dream schedule (entropy), steps = length/2", "diffusion", steps_div=2),
    Setting("steps=L/4", "Dream schedule (entropy), steps = length/4", "diffusion", steps_div=4),
    *CANDIDATES,
    *((SERVER,) if SERVER.key not in {c.key for c in CANDIDATES} else ()),
)


def by_key(key: str) -> Setting:
    for s in SETTINGS:
        if s.key == key:
            return s
    raise KeyError(key)


def decode(model, setting: Setting, prefix_ids: list[int], suffix_ids: list[int], length: int) -> Decoded:
    if setting.kind == "ar":
        return autoregressive(model, prefix_ids, suffix_ids, length)
    canvas = list(prefix_ids) + [model.mask_token_id] * length + list(suffix_ids)
    _sync(model)
    started = time.perf_counter()
    result = model.fill(canvas, setting.sampling(model, length), cache=setting.cache, refresh_every=setting.refresh_every)
    _sync(model)
    seconds = time.perf_counter() - started
    start = len(prefix_ids)
    return Decoded(result.canvas[start:start + length].tolist(), result.forwards, seconds, result.refreshes, result.rows)
