"""Denoising a token canvas: pure functions over tensors.

A canvas is a 1-D LongTensor in which every position equal to `mask_id` is to be filled. Each step
runs one forward pass over the whole canvas (bidirectional: the model sees both sides of every
hole), scores the masked positions and reveals some of them, until none is left.

Algorithms
- Dream's schedule (`alg` = "maskgit_plus" | "topk_margin" | "entropy"): timesteps
  `linspace(1, eps, steps + 1)`; at step i reveal `int(n_masked * (1 - t[i+1] / t[i]))` of the
  most confident masked positions, and all that remain at the last step. Confidence is p(x0),
  p1 - p2, or negative entropy. With the same logits, settings and temperature 0 this reveals the
  same tokens in the same order as Dream's `diffusion_generate`. One difference that changes no
  token at temperature 0: a step whose schedule reveals nothing skips its forward pass.
- Confidence threshold ("threshold", Fast-dLLM): reveal every masked position whose p(x0) >= tau,
  at least the single most confident one per forward.
- Confidence factor ("factor", Fast-dLLM's factor rule): with c_(1) >= c_(2) >= ... the sorted
  p(x0) of the masked positions, reveal the n most confident for the largest n with
  c_(n) >= 1 - f / (n + 1), at least one per forward. The bar drops as fewer positions are taken:
  one needs c >= 1 - f/2, two need both >= 1 - f/3, and so on.

Defaults, all explicit: temperature 0 (greedy), no top_p, no top_k. Dream's `diffusion_generate`
called without `top_k` inherits `top_k=50` from transformers' GenerationConfig; pass `top_k=50`
to reproduce such a call.

`block_length` splits the masked positions (in canvas order) into semi-autoregressive blocks: block
k is finished before block k+1 is touched, and Dream's `steps` are shared evenly between blocks.

Cancellation is cooperative: `cancel.cancelled` is read before every forward pass, so a
cancelled job returns within one forward. `on_step(draft)` sees the canvas after every step and may
return True to stop early: the current block's remaining positions take the last forward's best
guesses, later blocks stay masked.

Warm start (`provisional`): the canvas may arrive with draft tokens in its holes (the previous
job's, diffu_lsp/warm_start.py). Each forward scores them with the masked positions, and a draft token
whose p(token) under the current canvas is below `remask` is masked again, to be decoded like any
other (ReMDM's remasking, LLaDA 2.1's token editing): a stale draft does not survive just because
it was there. A block ends when no mask is left and its last forward re-masked nothing (a draft
with no masks takes one forward to check it). Without provisional tokens nothing changes.

Token editing (`edit_threshold`, LLaDA 2.1's joint thresholds; for models trained to judge the
tokens they see, such as LLaDA 2.1 or a tiny-dream trained with `--edit-rate`): each forward also scores the visible
tokens of the job's holes (draft tokens, and tokens revealed earlier in this job; never a position
outside the holes), and replaces one when the model's top token there differs from it with
p >= edit_threshold (token-to-token, T2T), beside revealing masked positions (mask-to-token, M2T,
as above). Edits are judged on the model's own distribution (no EOS penalty). Draft tokens are then
replaced where the model is sure of another token, and masked again where it only doubts them
(p(token) < `remask`, ReMDM's remasking; `remask` 0 leaves T2T alone); tokens revealed in this job
are only ever replaced, so decoding ends. A block ends when no mask is left and its last forward
edited nothing, or after EDIT_ROUNDS forwards with no mask left: the
forward that reveals the last masks judges the other tokens too, and if it edits nothing no extra
forward re-checks what it revealed (a job costs what it did without editing unless an edit fires).
Unset (None, for masked-only models), decoding is exactly as without it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F

DREAM_ALGS = ("maskgit_plus", "topk_margin", "entropy")
ALGS = DREAM_ALGS + ("threshold", "factor")
EPS = 1e-3
EDIT_ROUNDS = 4  # token editing: forwards a block may take once no mask is left (edits that keep firing)


@dataclass(frozen=True)
class Sampling:
    alg: str = "threshold"
    steps: Optional[int] = None          # Dream schedule: None = one step per masked position
    threshold: float = 0.9               # "threshold": reveal every position at least this confident
    factor: float = 1.0                  # "factor": reveal the top n while c_(n) >= 1 - factor / (n + 1)
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    alg_temp: Optional[float] = None     # > 0: sample which positions to reveal instead of top-k
    block_length: Optional[int] = None   # semi-autoregressive blocks over the masked positions
    eos_penalty: float = 0.0             # subtracted from the logits of `stop_ids`
    early_exit: bool = False             # a revealed EOS/pad ends its hole: later slots become pad
    remask: float = 0.5                  # warm start: a draft token scored below this is masked again
    edit_threshold: Optional[float] = None  # token editing (T2T): replace a visible job token at p >= this

    def __post_init__(self):
        if self.alg not in ALGS:
            raise ValueError(f"unknown sampling algorithm {self.alg!r}; expected one of {', '.join(ALGS)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be >= 1")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if not self.factor > 0:
            raise ValueError("factor must be > 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError("block_length must be >= 1")
        if not 0.0 <= self.remask <= 1.0:
            raise ValueError("remask must be in [0, 1]")
        if self.edit_threshold is not None and not 0.0 < self.edit_threshold <= 1.0:
            raise ValueError("edit_threshold must be in (0, 1]")

    def with_options(self, **options) -> "Sampling":
        """A copy with the given fields replaced; None values are ignored."""
        return replace(self, **{k: v for k, v in options.items() if v is not None})


class CancelFlag(Protocol):
    cancelled: bool


@dataclass
class DenoiseStep:
    """One denoising step, as the per-step callback sees it."""
    canvas: torch.Tensor       # [L] current tokens, mask_id where still masked
    step: int                  # forwards so far
    masked: int                # positions still masked


@dataclass
class Denoised:
    canvas: torch.Tensor       # [L] filled canvas (masks remain only where cancelled)
    confidence: torch.Tensor   # [L] p(token) when each position was revealed; 1.0 outside the holes
    reveal_step: torch.Tensor  # [L] forward pass (1-based) that revealed each position; 0 outside
    forwards: int              # denoising steps, each one forward pass over the active positions
    cancelled: bool = False
    stopped_early: bool = False
    refreshes: int = 0         # of the forwards, those over the whole canvas that (re)filled a K/V cache
    reused: int = 0            # canvas rows whose keys/values came from the previous job (reuse_prefix)
    rows: int = 0              # canvas rows run through the network, over all forwards
    drafted: int = 0           # warm start: provisional (draft) tokens the canvas arrived with
    remasked: int = 0          # of those, the ones masked again (their confidence dropped)
    edits: int = 0             # token editing: visible tokens replaced (T2T)


# (canvas [L], positions [N]) -> [N, V]: logits scoring the tokens at those positions (on any device)
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- token choice

def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (the top token always)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop_sorted = cumulative > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_best, torch.finfo(logits.dtype).min)


def choose_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None):
    """For each row of logits [N, V]: (token, p(token), confidence score used for ranking)."""
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = top_p_filter(logits, sampling.top_p)
    if sampling.top_k is not None:
        logits = top_k_filter(logits, sampling.top_k)
    probs = torch.softmax(logits.float(), dim=-1)
    if sampling.temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token_prob = probs.gather(-1, tokens[:, None]).squeeze(-1)
    else:
        token_prob, tokens = probs.max(dim=-1)
    if sampling.alg == "topk_margin":
        best_two = probs.topk(2, dim=-1).values
        score = best_two[:, 0] - best_two[:, 1]
    elif sampling.alg == "entropy":
        score = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    else:
        score = token_prob
    return tokens, token_prob, score


def dream_reveal_count(n_masked: int, step: int, steps: int) -> int:
    """How many positions Dream's schedule reveals at `step` (0-based) of `steps`."""
    if step >= steps - 1:
        return n_masked
    timesteps = torch.linspace(1, EPS, steps + 1)
    t, s = timesteps[step], timesteps[step + 1]
    return int(n_masked * (1 - s / t))


def above_threshold(token_prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the positions with p >= threshold; the single most confident one if none is."""
    reveal = (token_prob >= threshold).nonzero().squeeze(-1)
    return reveal if len(reveal) else token_prob.argmax().reshape(1)


def by_factor(token_prob: torch.Tensor, factor: float) -> torch.Tensor:
    """Indices of the n most confident positions, for the largest n whose n-th highest p is at least
    1 - factor / (n + 1) (at least one). The test holds for every n up to the largest, so it is a count."""
    ranked = token_prob.sort(descending=True)
    n = torch.arange(1, len(token_prob) + 1, dtype=token_prob.dtype)
    count = max(1, int((ranked.values >= 1 - factor / (n + 1)).sum()))
    return ranked.indices[:count]


def pick_positions(score: torch.Tensor, count: int, sampling: Sampling, generator=None) -> torch.Tensor:
    """Indices (into score) of the `count` positions to reveal."""
    if sampling.alg_temp:
        weights = torch.softmax(score / sampling.alg_temp, dim=-1)
        return torch.multinomial(weights, count, generator=generator)
    return torch.topk(score, count).indices


# ---------------------------------------------------------------- the loop

def blocks_of(positions: torch.Tensor, block_length: int | None) -> list[torch.Tensor]:
    if not block_length:
        return [positions]
    return list(torch.split(positions, block_length))


def contiguous_runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """Split sorted positions into runs of consecutive ones (one run per hole)."""
    if len(positions) == 0:
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(-1) + 1
    return list(torch.tensor_split(positions, breaks))


def pad_after_stops(canvas, confidence, reveal_step, hole_runs, mask_id: int, stop_ids, provisional=None) -> None:
    """Early exit: in each hole, every still-masked slot after a revealed EOS/pad becomes that
    token, as the model was trained to leave a hole's unused tail (saves the steps to get there).
    After a provisional (draft) EOS the slots are provisional too."""
    stops = torch.tensor(stop_ids)
    for run in hole_runs:
        tokens = canvas[run]
        is_stop = torch.isin(tokens, stops)
        if not is_stop.any():
            continue
        first = int(is_stop.nonzero()[0])
        tail = run[first + 1:][tokens[first + 1:] == mask_id]
        canvas[tail] = int(tokens[first])
        confidence[tail] = float(confidence[run[first]])
        reveal_step[tail] = int(reveal_step[run[first]])
        if provisional is not None:
            provisional[tail] = bool(provisional[run[first]])


def edit_tokens(canvas, positions, logits, sampling: Sampling, mask_id: int, confidence, reveal_step, provisional,
                forward: int) -> tuple[int, int]:
    """Token editing at `positions` (visible tokens) under `logits`: where the top token differs from
    the canvas's with p >= edit_threshold, put it in (T2T); a draft token not replaced whose own p is
    below `remask` is masked again (T2M). Returns (edited, masked)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_prob, top = (t.cpu() for t in probs.max(dim=-1))
    current = canvas[positions]
    current_prob = probs.gather(1, current.to(probs.device)[:, None]).squeeze(1).cpu()
    change = (top != current) & (top_prob >= sampling.edit_threshold)
    doubted = provisional[positions] & ~change & (current_prob < sampling.remask)
    at = positions[change]
    canvas[at] = top[change]
    confidence[at] = top_prob[change]
    reveal_step[at] = forward
    drafts = provisional[positions] & ~change & ~doubted
    confidence[positions[drafts]] = current_prob[drafts]
    provisional[at] = False
    canvas[positions[doubted]] = mask_id
    provisional[positions[doubted]] = False
    return int(change.sum()), int(doubted.sum())


def denoise(
    logits_fn: LogitsFn,
    canvas: torch.Tensor,
    mask_id: int,
    sampling: Sampling = Sampling(),
    *,
    cancel: CancelFlag | None = None,
    on_step: Callable[[DenoiseStep], bool | None] | None = None,
    stop_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    provisional: torch.Tensor | None = None,
) -> Denoised:
    """Fill every `mask_id` position of `canvas` ([L] ids) by iterative denoising; `provisional`
    ([L] bool) marks draft tokens to check each forward and mask again if they lost confidence."""
    canvas = canvas.clone()
    length = canvas.shape[0]
    confidence = torch.ones(length)
    reveal_step = torch.zeros(length, dtype=torch.long)
    if provisional is None:
        provisional = torch.zeros(length, dtype=torch.bool)
    provisional = provisional.clone() & (canvas != mask_id)
    hole_positions = ((canvas == mask_id) | provisional).nonzero().squeeze(-1)
    blocks = blocks_of(hole_positions, sampling.block_length)
    hole_runs = contiguous_runs(hole_positions)
    forwards = 0
    dream = sampling.alg in DREAM_ALGS
    total_steps = sampling.steps or len(hole_positions)
    steps_per_block = max(1, total_steps // len(blocks)) if dream else None

    if sampling.early_exit and stop_ids and provisional.any():  # masks after a draft EOS/pad: provisional pad
        pad_after_stops(canvas, confidence, reveal_step, hole_runs, mask_id, stop_ids, provisional)
    drafted, remasked, edits = int(provisional.sum()), 0, 0
    editing = sampling.edit_threshold is not None

    def result(**flags) -> Denoised:
        return Denoised(canvas, confidence, reveal_step, forwards, drafted=drafted, remasked=remasked, edits=edits,
                        **flags)

    for block in blocks:
        step = 0
        remasked_last: int | None = None  # draft tokens the block's last forward masked again (or edited)
        rounds = 0  # token editing: forwards with no mask left in the block
        while True:
            still_masked = block[canvas[block] == mask_id]
            # the tokens each forward checks: drafts; with token editing every visible token of the block
            draft = block[canvas[block] != mask_id] if editing else block[provisional[block]]
            if len(still_masked) == 0 and (len(draft) == 0 or remasked_last == 0):
                break
            if editing and len(still_masked) == 0:
                if rounds == EDIT_ROUNDS:
                    break
                rounds += 1
            if dream and len(still_masked):
                count = dream_reveal_count(len(still_masked), step, steps_per_block)
                step += 1
                if count == 0:
                    continue
            if cancel is not None and cancel.cancelled:
                return result(cancelled=True)
            scored = torch.cat([still_masked, draft]) if len(draft) else still_masked
            logits = logits_fn(canvas, scored)
            forwards += 1
            if cancel is not None and hasattr(cancel, "forwards"):
                cancel.forwards += 1
            logits[:, mask_id] = float("-inf")  # a revealed position must not stay a mask
            if editing:  # T2T, judged on the model's own distribution (before the EOS penalty)
                remasked_last = 0
                if len(draft):
                    logits, draft_logits = logits[:len(still_masked)], logits[len(still_masked):]
                    edited, doubted = edit_tokens(canvas, draft, draft_logits, sampling, mask_id, confidence,
                                                  reveal_step, provisional, forwards)
                    edits, remasked, remasked_last = edits + edited, remasked + doubted, edited + doubted
                    if len(still_masked) == 0:
                        continue
            if sampling.eos_penalty and stop_ids:
                logits[:, list(stop_ids)] -= sampling.eos_penalty
            if not editing and len(draft):  # warm start: p(draft token) under the current canvas; below `remask`: masked
                logits, draft_logits = logits[:len(still_masked)], logits[len(still_masked):]
                now = canvas[draft].to(draft_logits.device)
                draft_prob = torch.softmax(draft_logits.float(), dim=-1).gather(1, now[:, None]).squeeze(1).cpu()
                drop = draft_prob < sampling.remask
                canvas[draft[drop]] = mask_id
                provisional[draft[drop]] = False
                confidence[draft] = draft_prob.masked_fill(drop, 1.0)
                remasked_last = int(drop.sum())
                remasked += remasked_last
                if len(still_masked) == 0:
                    continue
            elif not editing:
                remasked_last = 0
            if generator is not None and generator.device != logits.device:
                logits = logits.to(generator.device)  # sampling draws from the caller's generator
            # logits stay where the network left them; only these [N] results come to the host
            tokens, token_prob, score = (t.cpu() for t in choose_tokens(logits, sampling, generator))
            if sampling.alg == "threshold":
                reveal = above_threshold(token_prob, sampling.threshold)
            elif sampling.alg == "factor":
                reveal = by_factor(token_prob, sampling.factor)
            else:
                reveal = pick_positions(score, count, sampling, generator)
            positions = still_masked[reveal]
            canvas[positions] = tokens[reveal]
            confidence[positions] = token_prob[reveal]
            reveal_step[positions] = forwards
            if sampling.early_exit and stop_ids:
                pad_after_stops(canvas, confidence, reveal_step, hole_runs, mask_id, stop_ids, provisional)
            if on_step is not None:
                masked_left = int((canvas == mask_id).sum())
                if on_step(DenoiseStep(canvas, forwards, masked_left)):
                    unrevealed = canvas[still_masked] == mask_id
                    rest = still_masked[unrevealed]
                    canvas[rest] = tokens[unrevealed]
                    confidence[rest] = token_prob[unrevealed]
                    reveal_step[rest] = forwards
                    return result(stopped_early=True)
    return result()
