"""The warm model: one transformers network run bidirectionally, with its tokenizer and mask token."""

from __future__ import annotations

import inspect
import logging
import os
import threading
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import torch
from transformers import AttentionInterface

from ..errors import JobCancelled, is_out_of_memory
from ..sampler import Denoised, DenoiseStep, Sampling, denoise
from .batching import ForwardBatcher


log = logging.getLogger("diffu_lsp.models")

# torch's CPU matrix multiplies in bfloat16 (oneDNN's AMX kernels) keep a compiled kernel for every
# input shape in two caches, oneDNN's primitive cache and ideep's, of 1,024 entries each by default,
# 0.7-1.8 MiB an entry for the bundled model's shapes (1.4-4.5 MiB for a 7B model's). Every canvas
# length, and in a cached job every step's count of rows, is a new shape: a daemon serving two typing
# windows grew by 500 MiB of kernels in 3 minutes while its Python objects and tensors stayed flat.
# torch reads the sizes at its first multiply, not at import: set before any. A value in the
# environment wins. 64 entries a cache: at most about 2 x 64 x 1.8 = 230 MiB for the bundled model
# (2 x 64 x 4.5 = 580 MiB for a 7B one, against 9 GiB at 1,024), at no measurable cost in time.
KERNEL_CACHE_ENTRIES = 64
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, str(KERNEL_CACHE_ENTRIES))


@dataclass
class DiffusionModel:
    """A masked-diffusion LM. Everything above this class talks to it through these methods."""

    network: torch.nn.Module
    tokenizer: object
    family: str                       # "dream" | "qwen2-diffusion" | "llada"
    name: str
    mask_token_id: int
    eos_token_ids: tuple[int, ...]    # EOS and pad: what a hole's unused tail fills with
    bos_token_id: int | None
    shift_logits: bool                # Dream-style: hidden state i-1 scores position i
    max_length: int
    load_seconds: float = 0.0
    default_sampling: dict = field(default_factory=dict)  # the checkpoint's generation_config.json
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    last_keys: "KeptKeys | None" = field(default=None, repr=False)  # the last reuse_prefix job's keys/values
    compiled_network: Callable | None = field(default=None, repr=False)  # torch.compile(network), made on first use
    compile_error: str | None = None  # why compiling failed; the eager network serves from then on
    batcher: "ForwardBatcher | None" = field(default=None, repr=False)  # set: concurrent jobs share forwards (batching.py)
    cache_keyword: str = field(init=False, repr=False)  # the network's name for its K/V cache argument

    def __post_init__(self):
        self.cache_keyword = cache_keyword(self.network)
        self.network.config._attn_implementation = ATTENTION  # see sdpa_attention

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    # ---------------------------------------------------------------- text <-> ids

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ---------------------------------------------------------------- forward

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> float [B, L, V] logits; row i scores the token at position i (the LM head
        reads the rows in that order: no second [B, L, V] copy to shift them)."""
        input_ids = input_ids.to(self.device)
        rows = self._rows(torch.arange(input_ids.shape[1], device=self.device))
        return self.forward(input_ids=input_ids, use_cache=False, logits_to_keep=rows).logits.float()

    def forward(self, compiled: bool = False, **inputs):
        """One bidirectional forward of the network (every query sees every key; no mask unless
        `attention_mask` is given: see sdpa_attention); `compiled`: through torch.compile (dynamic
        shapes), made on first use. If compiling or running the compiled forward fails (no C++ compiler, an op the
        compiler cannot lower), the error is logged once and the eager network serves from then on."""
        inputs["is_causal"] = False
        if compiled and self.compile_error is None:
            if self.compiled_network is None:
                self.compiled_network = torch.compile(self.network, dynamic=True)
            try:
                return self.compiled_network(**inputs)
            except Exception as error:
                if is_out_of_memory(error):
                    raise  # the caller's OOM handling, as for the eager network
                self.compile_error = f"{error.__class__.__name__}: {error}".splitlines()[0]
                log.warning("torch.compile failed, running the network eagerly from now on: %s", self.compile_error)
        return self.network(**inputs)

    def to_device(self, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """1-D long host tensors on the model's device in one copy (one transfer per step, not one
        per tensor: on a GPU each is a synchronising copy)."""
        return torch.cat(parts).to(self.device).split([len(part) for part in parts])

    def _rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Output rows that score `positions` (Dream: row i-1 scores position i; row 0 scores 0)."""
        return (positions - 1).clamp(min=0) if self.shift_logits else positions

    @torch.no_grad()
    def position_logits(self, canvas: torch.Tensor, positions: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """Float [N, V] logits scoring the tokens at `positions` of the [L] canvas (one forward;
        the LM head runs on those rows only), left on the model's device: the sampler picks tokens
        there and copies only [N] results to the host."""
        keep, count = _at_least_two(self._rows(positions))
        ids, keep = self.to_device(canvas, keep)
        out = self.forward(compiled, input_ids=ids[None], use_cache=False, logits_to_keep=keep)
        return out.logits[0, :count].float()

    @torch.no_grad()
    def batch_position_logits(self, canvases: list[torch.Tensor], positions: list[torch.Tensor],
                              compiled: bool = False) -> list[torch.Tensor]:
        """One padded forward for several canvases: for each, float [N_i, V] logits scoring its
        `positions`, as position_logits gives alone (within float tolerance). Each canvas is
        right-padded to the longest; the pad keys are masked out of every row's attention (with no
        padding, no mask) and the position ids count from 0 in every row, so a real token sees exactly
        what it sees alone.
        The body runs on the whole batch; the LM head only on the rows each canvas scores (N_1 + ...
        + N_B of them, not B times their union). `compiled` is not used: the batch's shapes change
        with every step."""
        lengths = [len(c) for c in canvases]
        batch, length = len(canvases), max(lengths)
        ids = torch.full((batch, length), self.mask_token_id, dtype=torch.long)
        for row, canvas in enumerate(canvases):
            ids[row, :len(canvas)] = canvas
        wanted = [self._rows(p) for p in positions]
        flat_ids, pads, which, rows = self.to_device(
            ids.flatten(), torch.tensor(lengths),
            torch.cat([torch.full((len(r),), b, dtype=torch.long) for b, r in enumerate(wanted)]), torch.cat(wanted))
        attention = None
        if min(lengths) < length:  # made on the device: the pad keys masked out of every query
            key_is_pad = torch.arange(length, device=self.device)[None, :] >= pads[:, None]     # [B, L]
            attention = torch.zeros(batch, 1, length, length, dtype=self.dtype, device=self.device)
            attention = attention.masked_fill(key_is_pad[:, None, None, :], torch.finfo(self.dtype).min)
        with self.lock:
            hidden = self.network.model(input_ids=flat_ids.view(batch, length), attention_mask=attention,
                                        position_ids=torch.arange(length, device=self.device).expand(batch, length),
                                        use_cache=False, is_causal=False).last_hidden_state
            logits = self.network.lm_head(hidden[which, rows]).float()                        # [sum N_i, V]
        return list(logits.split([len(r) for r in wanted]))

    @torch.no_grad()
    def warm_up(self, length: int = 16) -> None:
        """One short forward, so that the first request does not pay for the device's lazy
        initialisation (CUDA context, cuBLAS handles, kernel loading: seconds on a GPU)."""
        canvas = torch.full((length,), self.mask_token_id, dtype=torch.long)
        self.position_logits(canvas, torch.arange(length))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- denoising

    def sampling(self, sampling: Sampling | None = None, **options) -> Sampling:
        """Explicit options over `sampling` over the checkpoint's own defaults (None = unset)."""
        return (sampling or Sampling(**self.default_sampling)).with_options(**options)

    def fill(
        self,
        canvas_ids: list[int] | torch.Tensor,
        sampling: Sampling | None = None,
        *,
        cancel=None,
        on_step: Callable[[DenoiseStep], bool | None] | None = None,
        generator: torch.Generator | None = None,
        cache: str = "none",
        refresh_every: int | None = None,
        reuse_prefix: bool = False,
        compiled: bool = False,
        provisional: list[bool] | torch.Tensor | None = None,
        **options,
    ) -> Denoised:
        """Denoise every mask position of the canvas. The result is on the CPU, canvas-aligned.

        cache: "none" (every step a full forward), "prefix", "dual" or "delayed" (see CachedForward);
        refresh_every: with a cache, every N-th step is a full forward (1 = exact, as uncached);
        reuse_prefix: with a cache, start from the previous cached job's keys/values of the tokens
        this canvas shares with it at its start (the previous request of a typing user) instead of a
        full forward (see CachedForward); compiled: run the network through torch.compile (see forward);
        provisional: warm start, the canvas positions holding draft tokens (see sampler.denoise).
        With a `batcher` (models/batching.py) the job runs concurrently with others, its forwards
        batched with theirs, and uncached: cache, refresh_every, reuse_prefix and compiled are not used."""
        canvas = torch.as_tensor(canvas_ids, dtype=torch.long)
        if provisional is not None:
            provisional = torch.as_tensor(provisional, dtype=torch.bool)
        needs_bos = self.shift_logits and len(canvas) > 0 and (
            int(canvas[0]) == self.mask_token_id or (provisional is not None and bool(provisional[0])))
        if needs_bos:  # with shifted logits position 0 has nothing to its left to be scored from
            canvas = torch.cat([torch.tensor([self._bos_id()]), canvas])
            if provisional is not None:
                provisional = torch.cat([torch.tensor([False]), provisional])
            if on_step is not None:  # the callback sees the caller's canvas, as the result does
                caller_on_step = on_step
                on_step = lambda draft: caller_on_step(replace(draft, canvas=draft.canvas[1:]))  # noqa: E731
        if len(canvas) > self.max_length:
            raise ValueError(f"canvas of {len(canvas)} tokens exceeds the model's {self.max_length}")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        if self.batcher is not None:  # batched jobs run uncached and concurrently (see batching.py)
            with self.batcher.job():
                result = denoise(self.batcher.logits_fn(cancel), canvas, self.mask_token_id,
                                 self.sampling(sampling, **options), cancel=cancel, on_step=on_step,
                                 stop_ids=self.eos_token_ids, generator=generator, provisional=provisional)
            result.rows = result.forwards * len(canvas)
        else:
            result = self._fill_alone(canvas, sampling, options, cancel, on_step, generator, cache, refresh_every,
                                      reuse_prefix, compiled, provisional)
        if needs_bos:
            result.canvas, result.confidence = result.canvas[1:], result.confidence[1:]
            result.reveal_step = result.reveal_step[1:]
        return result

    def _fill_alone(self, canvas, sampling, options, cancel, on_step, generator, cache, refresh_every,
                    reuse_prefix, compiled, provisional) -> Denoised:
        """One job on the model, holding its lock: uncached, or with its K/V cache."""
        with self.lock:
            if cache == "none":
                logits_fn = partial(self.position_logits, compiled=compiled)
            else:
                logits_fn = CachedForward(self, cache, refresh_every, self.last_keys if reuse_prefix else None, compiled)
            result = denoise(
                logits_fn, canvas, self.mask_token_id, self.sampling(sampling, **options),
                cancel=cancel, on_step=on_step, stop_ids=self.eos_token_ids, generator=generator,
                provisional=provisional,
            )
            if reuse_prefix and cache != "none" and logits_fn.kv.layers:
                self.last_keys = logits_fn.kept()  # kept only for callers that reuse (it holds a canvas of K/V)
        result.refreshes = getattr(logits_fn, "refreshes", 0)
        result.reused = getattr(logits_fn, "reused", 0)
        result.rows = getattr(logits_fn, "rows", result.forwards * len(canvas))
        return result

    def infill_ids(self, prefix_ids: list[int], suffix_ids: list[int], length: int, **sampling) -> list[int]:
        """Exactly `length` ids for the hole between prefix and suffix (EOS/pad included)."""
        cancel, on_step = sampling.pop("cancel", None), sampling.pop("on_step", None)
        canvas = list(prefix_ids) + [self.mask_token_id] * length + list(suffix_ids)
        result = self.fill(canvas, cancel=cancel, on_step=on_step, **sampling)
        if result.cancelled:
            raise JobCancelled("cancelled while denoising")
        start = len(prefix_ids)
        return result.canvas[start:start + length].tolist()

    def infill(self, prefix: str, suffix: str = "", length: int | None = None, **sampling) -> str:
        """Text for the hole between prefix and suffix, trailing EOS/pad removed."""
        ids = self.infill_ids(self.encode(prefix), self.encode(suffix), length or 32, **sampling)
        return self.decode(trim_at_stop(ids, self.eos_token_ids))

    def _bos_id(self) -> int:
        return self.bos_token_id if self.bos_token_id is not None else self.eos_token_ids[0]

    def token_probabilities(self, prefix_ids: list[int], ids: list[int], suffix_ids: list[int]) -> list[float]:
        """p(token) for each of `ids` in context, scored while it is masked (two forwards: the even
        positions masked, then the odd ones), since a model that sees a token just copies it."""
        scores = [1.0] * len(ids)
        for parity in (0, 1):
            positions = [i for i in range(len(ids)) if i % 2 == parity]
            if not positions:
                continue
            hole = [self.mask_token_id if i % 2 == parity else t for i, t in enumerate(ids)]
            canvas = torch.tensor(list(prefix_ids) + hole + list(suffix_ids))
            at = torch.tensor(positions) + len(prefix_ids)
            probs = torch.softmax(self.position_logits(canvas, at), dim=-1)
            wanted = torch.tensor([ids[i] for i in positions], device=probs.device)
            picked = probs.gather(1, wanted[:, None]).squeeze(1).tolist()  # one copy to the host
            for i, p in zip(positions, picked):
                scores[i] = p
        return scores


ATTENTION = "diffu_lsp_sdpa"  # the networks' attention implementation (transformers' AttentionInterface)
SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    """Attention of a diffusion model's network: torch's SDPA, bidirectional (DiffusionModel's
    forwards pass is_causal=False), with no mask unless one is given (a padded batch), and keys and
    values left at their own head count (enable_gqa) when there is no mask. That is what lets SDPA
    pick flash attention on a GPU; transformers' own "sdpa" gets a 4D mask for a bidirectional
    forward and then repeats K/V per head. transformers makes no mask for an implementation it has
    no mask function for, so an unmasked forward reaches here with None.

    Without is_causal (a plain call of the network, as the autoregressive baseline makes) it is
    causal as transformers' own: a prefill (queries = keys) or one query at a time."""
    queries, keys = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = attention_mask is None and queries > 1
        if is_causal and queries != keys:
            raise ValueError(f"causal attention of {queries} queries over {keys} keys needs a mask")
    if attention_mask is None and not is_causal and query.device.type == "cpu" and query.dtype in BUCKETED_DTYPES:
        return _bucketed_cpu_attention(query, key, value, scaling)
    # masked (no flash kernel either way): the kernels that take a mask want equal heads
    key, value, options = _heads_for_sdpa(query, key, value, may_group=attention_mask is None)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0,
        scale=scaling, is_causal=bool(is_causal), **options)
    return out.transpose(1, 2).contiguous(), None


def _heads_for_sdpa(query, key, value, *, may_group: bool):
    """Keys and values with fewer heads than the queries (grouped-query attention): left at their
    own head count for SDPA's enable_gqa where ``may_group`` and torch has it, else repeated per
    query head. (key, value, SDPA's extra options)."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value, {}
    if may_group and SDPA_HAS_GQA:
        return key, value, {"enable_gqa": True}
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), {}


AttentionInterface.register(ATTENTION, sdpa_attention)

# torch's CPU flash attention keeps a compiled kernel for every (query rows, key rows) pair it meets,
# in a per-thread map that nothing empties: 0.015-0.04 MiB a pair and thread for the bundled model, and
# a server meets thousands (every canvas length; every cached step's count of recomputed rows over
# it). Its math kernel, the only other one on a CPU, takes 5-15 times as long. So an unmasked CPU
# attention runs at bucket sizes: query rows padded (a row's output depends on its own query alone:
# the extra rows are dropped) and key rows padded with masked keys (weight exp(-inf) = 0: the same
# output; flash takes the mask). Sizes round up to 8 a doubling (at most 1/8 more rows; multiples of
# 16 below 128): 56 sizes up to 8,192 rows, so at most 56 x 57 / 2 = 1,596 pairs a thread. The cost,
# measured: 1-11% more time a forward (padding, and the masked kernel). In float32 the kernel keeps
# no such map (500 new pairs: +4 MiB, once): exact sizes.
BUCKETED_DTYPES = (torch.bfloat16, torch.float16)


def attention_bucket(rows: int) -> int:
    """`rows` rounded up to the next of 16, 32, ..., 128, 144, ..., 256, 288, ...: 8 sizes a doubling."""
    step = max(16, 1 << max(0, rows.bit_length() - 4))
    return -(-rows // step) * step


def _bucketed_cpu_attention(query, key, value, scaling):
    """Bidirectional unmasked SDPA (flash) at attention_bucket sizes: the same output as at the real
    sizes, through one of a few kernels (see BUCKETED_DTYPES)."""
    queries, keys = query.shape[2], key.shape[2]
    padded_queries, padded_keys = attention_bucket(queries), attention_bucket(keys)
    mask = None
    if padded_queries != queries:
        query = torch.nn.functional.pad(query, (0, 0, 0, padded_queries - queries))
    if padded_keys != keys:
        key = torch.nn.functional.pad(key, (0, 0, 0, padded_keys - keys))
        value = torch.nn.functional.pad(value, (0, 0, 0, padded_keys - keys))
        mask = query.new_zeros(1, padded_keys)  # added to the scores: the padded keys' weights are exp(-inf) = 0
        mask[:, keys:] = float("-inf")
    key, value, options = _heads_for_sdpa(query, key, value, may_group=True)  # CPU flash takes grouped heads and a mask
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, **options)
    return out[:, :, :queries].transpose(1, 2).contiguous(), None


def cache_keyword(network) -> str:
    """What the network's forward calls its K/V cache argument: `cache` from transformers 5.24 on
    (where `past_key_values` is a deprecated alias), `past_key_values` in 5.0 to 5.23. A cache under
    a name the forward does not know is no error there: it lands in **kwargs, the network makes a
    cache of its own and the buffer is ignored (the step then fails on a shape mismatch)."""
    return "cache" if "cache" in inspect.signature(network.forward).parameters else "past_key_values"


class KVBuffer:
    """Keys and values of every canvas position, one [1, heads, L, dim] pair per layer, overwritten
    in place: the part of a transformers Cache that the attention layers use. A forward over the
    whole canvas (`rows` None) fills it; a forward over some `rows` writes their fresh keys/values
    at those positions and attends over the whole canvas. No per-step copy of the context, as
    rebuilding a DynamicCache (and its concatenation in every layer) would make."""

    def __init__(self):
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rows: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args, **kwargs):
        if self.rows is None:  # contiguous: one layout for every buffer (see _grown)
            keys, values = keys.contiguous(), values.contiguous()
            del self.layers[layer:]
            self.layers.append((keys, values))
            return keys, values
        all_keys, all_values = self.layers[layer]
        all_keys.index_copy_(2, self.rows, keys)
        all_values.index_copy_(2, self.rows, values)
        return all_keys, all_values

    def get_seq_length(self, layer: int = 0) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0


@dataclass
class KeptKeys:
    """What a cached job leaves for the next one: the keys/values of its last full (or reusing)
    forward, valid for the rows before `valid`, computed from `tokens`; `age` counts the reusing
    forwards in a row behind them (0: from a full forward)."""

    tokens: torch.Tensor
    valid: int
    kv: KVBuffer
    age: int


REUSE_LIMIT = 4  # reusing jobs in a row before a full forward again (the reused rows grow staler)


CACHE_MODES = ("none", "prefix", "dual", "delayed")


class CachedForward:
    """Fast-dLLM-style approximate K/V cache for one denoising job.

    A full forward over the canvas fills a buffer with the keys/values of every position, and
    scores that step's positions (it is the step's forward, not an extra pass). Its active span
    starts at the row scoring the first masked position; "prefix" runs to the end of the canvas,
    "dual" and "delayed" only to the last masked position (of the block). Each later step
    recomputes rows of that span, writing their keys/values into the buffer, and attends over the
    whole buffer; everything else keeps the keys/values it had, which do not see the tokens
    revealed since: that is the approximation. "prefix" and "dual" recompute the whole span every
    step. "delayed" (dKV-Cache's delayed caching) recomputes only the rows that can still change
    what is decoded: the masked positions, the rows scoring them, and the positions whose token
    changed since the last forward (revealed one step late: their keys/values are computed once
    from the real token, then kept). A new full forward comes when a step needs a position outside
    the span (the next semi-autoregressive block) or every `refresh_every` steps (1: exact, as
    uncached).

    With `previous` (the last job's KeptKeys), the first step may instead reuse the previous
    job's keys/values of the tokens both canvases share at their start (before the first scored
    row) and run only the rows from there to the end: a typing user's next request. Those reused
    rows saw the previous document after them: a further approximation, bounded by REUSE_LIMIT.
    """

    def __init__(self, model: DiffusionModel, mode: str, refresh_every: int | None, previous: KeptKeys | None = None,
                 compiled: bool = False):
        if mode not in CACHE_MODES[1:]:
            raise ValueError(f"cache mode must be one of {', '.join(CACHE_MODES[1:])}, not {mode!r}")
        self.model, self.mode, self.refresh_every, self.previous = model, mode, refresh_every, previous
        self.compiled = compiled
        self.kv = KVBuffer()
        self.span: tuple[int, int] | None = None
        self.steps_since_refresh = 0
        self.refreshes = 0
        self.reused = 0          # rows whose keys/values came from the previous job
        self.rows = 0            # canvas rows run, over all forwards (a full forward runs them all)
        self.first: tuple[torch.Tensor, int, int] | None = None  # tokens, valid rows, age of the latest start
        self.seen: torch.Tensor | None = None  # the canvas as the last forward saw it

    @torch.no_grad()
    def __call__(self, canvas: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = self.model._rows(positions)
        low, high = int(rows.min()), int(positions.max()) + 1
        stale = self.refresh_every is not None and self.steps_since_refresh >= self.refresh_every
        if self.span is None and self.previous is not None:
            shared = self._shared(canvas, low)
            if shared:
                return self._start(canvas, rows, low, high, shared, self.previous.age + 1)
        if self.span is None or stale or low < self.span[0] or high > self.span[1]:
            return self._full(canvas, rows, low, high)
        if self.mode == "delayed":
            changed = (canvas != self.seen).nonzero().squeeze(-1)
            run = torch.unique(torch.cat([rows, positions, changed]))  # sorted
        else:
            run = torch.arange(*self.span)
        keep, count = _at_least_two(torch.searchsorted(run, rows))
        ids, self.kv.rows, keep = self.model.to_device(canvas[run], run, keep)
        out = self.model.forward(
            self.compiled, input_ids=ids[None], position_ids=self.kv.rows[None],
            use_cache=True, logits_to_keep=keep, **{self.model.cache_keyword: self.kv},
        )
        self.steps_since_refresh += 1
        self.rows += len(run)
        self.seen = canvas.clone()
        return out.logits[0, :count].float()

    def _full(self, canvas: torch.Tensor, rows: torch.Tensor, low: int, high: int) -> torch.Tensor:
        model, length = self.model, len(canvas)
        self.kv.rows = None
        # position ids always given: left out, transformers counts them on from the buffer's length
        keep, count = _at_least_two(rows)
        ids, positions, keep = model.to_device(canvas, torch.arange(length), keep)
        out = model.forward(self.compiled, input_ids=ids[None], position_ids=positions[None],
                            use_cache=True, logits_to_keep=keep, **{model.cache_keyword: self.kv})
        self.span = (low, length if self.mode == "prefix" else high)
        self.steps_since_refresh = 1
        self.refreshes += 1
        self.rows += length
        self.first = (canvas.clone(), low, 0)
        self.seen = self.first[0]  # neither is written in place
        return out.logits[0, :count].float()

    def _shared(self, canvas: torch.Tensor, low: int) -> int:
        """How many leading rows of the previous job's keys/values this canvas can reuse (0: none):
        its tokens before `low` that equal the previous canvas's, if that is at least half of them."""
        previous = self.previous
        n = min(previous.valid, low, len(previous.tokens))
        same = int((previous.tokens[:n] == canvas[:n]).long().cumprod(0).sum())
        return same if previous.age < REUSE_LIMIT and same >= max(1, low // 2) else 0

    def _start(self, canvas: torch.Tensor, rows: torch.Tensor, low: int, high: int, shared: int, age: int):
        """The first step from the previous job's keys/values of rows [0, shared): run the rest."""
        model, length, device = self.model, len(canvas), self.model.device
        self.kv.layers = [(_grown(keys, shared, length), _grown(values, shared, length))
                          for keys, values in self.previous.kv.layers]
        keep, count = _at_least_two(rows - shared)
        ids, self.kv.rows, keep = model.to_device(canvas[shared:], torch.arange(shared, length), keep)
        out = model.forward(self.compiled, input_ids=ids[None], position_ids=self.kv.rows[None],
                            use_cache=True, logits_to_keep=keep, **{model.cache_keyword: self.kv})
        self.span = (low, length if self.mode == "prefix" else high)
        self.steps_since_refresh = 1
        self.reused = shared
        self.rows += length - shared
        self.first = (canvas.clone(), low, age)
        self.seen = self.first[0]
        return out.logits[0, :count].float()

    def kept(self) -> KeptKeys:
        """For the next job: the keys/values of the rows this job's start computed or reused, and
        that no later step rewrote (those before the start's first scored row)."""
        tokens, valid, age = self.first
        return KeptKeys(tokens, min(valid, self.span[0]), self.kv, age)


def _grown(keys: torch.Tensor, shared: int, length: int) -> torch.Tensor:
    """A contiguous [1, heads, length, dim] buffer holding `keys`' first `shared` rows (contiguous
    as a full forward leaves them: torch.compile makes no second graph for other strides)."""
    return torch.cat([keys[:, :, :shared], keys.new_empty(*keys.shape[:2], length - shared, keys.shape[3])], 2)


def _at_least_two(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows for the LM head, repeated to two when there is one (torch.compile makes a graph of
    its own for each size-1 dimension), and how many of its outputs to use."""
    return (rows.repeat(2) if len(rows) == 1 else rows), len(rows)


def trim_at_stop(ids: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """ids up to the first EOS/pad."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids
