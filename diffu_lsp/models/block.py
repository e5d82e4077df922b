"""Block diffusion models (SDAR, dense and SDAR-30B-A3B's mixture of experts; Fast-dLLM v2, LLaDA 2.x,
Stable-DiffCoder): denoised a block at a time, the finished blocks an exact K/V cache.

Attention is bidirectional inside a block of `block_size` tokens and causal across blocks (block
k sees blocks 0..k). Blocks sit at fixed positions of the sequence: block k is [k*B, (k+1)*B), as
in the authors' generate functions, so the first block to decode may start with the prompt's last
few tokens, which stay as they are.

Schedule: the prompt's whole blocks are run once and their keys/values kept; then each block (or
each sub-block of it, left to right) is denoised by the sampler (sampler.denoise: one forward per
step over the block's B rows, attending to the kept keys/values and to the block itself). Once
no mask is left the block's final tokens go through the network once more to store its
keys/values (exactly once per block): for SDAR riding along with the next block's first forward
(2B rows; the finished rows do not see the new block), for Fast-dLLM v2 a forward of its own whose
last row chooses the next block's first token. Across requests (`reuse_prefix`), the whole blocks
a new prompt shares with the last one keep their keys/values: exact, as a block's keys/values
depend on it and the blocks before it only.

Each family's rule (`family_options`): SDAR as its `block_diffusion_generate` (JetAstra/SDAR
generate.py), Fast-dLLM v2 as its checkpoint's `generate` (modeling.py): both reveal every masked
position above a confidence threshold and at least the most confident one per forward, which is
the sampler's "threshold" rule (tau 0.9, the authors' examples); the user's algorithm settings
apply inside each block as for any model. Stop tokens: the checkpoint's EOS/pad and its
generation_config.json's eos list.

Infill: a block model cannot see text after the block, so a hole is decoded as the middle of a
fill-in-the-middle prompt: `<|fim_prefix|>` prefix `<|fim_suffix|>` suffix `<|fim_middle|>`
middle (Qwen's format; SDAR keeps Qwen3's tokenizer and Fast-dLLM v2 Qwen2.5's, both with these
tokens; neither family's authors document an infill format), or Seed-Coder's, suffix first
(Stable-DiffCoder): `<[fim-suffix]>` suffix `<[fim-prefix]>` prefix `<[fim-middle]>` middle. A
tokenizer without FIM tokens (LLaDA 2.x's) gets the prefix alone. Several holes in one canvas are filled one job each, left to right, each hole's
suffix running to the next hole.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

from ..sampler import Denoised, DenoiseStep, Sampling, denoise
from .backend import DiffusionModel

# (prefix, suffix, middle) token names, and whether the suffix comes first (SPM order)
FIM_FORMATS = ((("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), False),  # Qwen (SDAR, Fast-dLLM v2)
               (("<[fim-prefix]>", "<[fim-suffix]>", "<[fim-middle]>"), True))   # Seed-Coder (Stable-DiffCoder)
SDAR_BLOCK_SIZE = 4          # config.json "block_size" of every SDAR checkpoint; the authors decode with it
THRESHOLD_0_9 = {"alg": "threshold", "threshold": 0.9}
LLADA2_BLOCK_SIZE = 32       # LLaDA 2.x's generate: block_length 32
LLADA2_0 = {"alg": "threshold", "threshold": 0.95}                       # LLaDA2.0's generate defaults
LLADA2_1 = {"alg": "threshold", "threshold": 0.7, "edit_threshold": 0.5}  # LLaDA2.1's: joint M2T / T2T thresholds
STABLE_DIFFCODER_BLOCK_SIZE = 4  # its README's generate: block_length 4, steps = gen_length, low_confidence
ONE_PER_FORWARD = {"alg": "threshold", "threshold": 1.0}  # the most confident masked position per forward
# model_type (lower case) -> family; each family's rule is in `family_options`
BLOCK_FAMILIES = {"sdar": "sdar", "sdar_moe": "sdar", "fast_dllm_qwen": "fast-dllm-v2", "llada2_moe": "llada2",
                  "llama": "stable-diffcoder"}  # llama: only with Stable-DiffCoder's architecture (block_family)

# SDAR's config.json fields that mean the same in Qwen3Config (the rest name the authors' training setup).
QWEN3_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "tie_word_embeddings",
    "use_sliding_window", "sliding_window", "max_window_layers", "bos_token_id", "eos_token_id", "pad_token_id",
)


# and those of SDAR-30B-A3B's (`sdar_moe`) that mean the same in Qwen3MoeConfig
QWEN3_MOE_FIELDS = QWEN3_FIELDS + (
    "moe_intermediate_size", "num_experts", "num_experts_per_tok", "decoder_sparse_step", "mlp_only_layers",
    "norm_topk_prob", "router_aux_loss_coef",
)


def qwen3_config_for_sdar(config: dict) -> Qwen3Config | Qwen3MoeConfig:
    """SDAR is Qwen3 at inference (same weight names, q/k norms, GQA, RoPE); only the mask differs.
    SDAR-30B-A3B (`sdar_moe`) is Qwen3-MoE: a softmax router picks the top `num_experts_per_tok`
    experts, their weights renormalised to sum to 1 (as Qwen3-30B-A3B's `norm_topk_prob`, the
    default when config.json does not say)."""
    if str(config.get("model_type", "")).lower() == "sdar_moe":
        return Qwen3MoeConfig(**{"norm_topk_prob": True, **{k: config[k] for k in QWEN3_MOE_FIELDS if k in config}},
                              use_cache=False)
    return Qwen3Config(**{k: config[k] for k in QWEN3_FIELDS if k in config}, use_cache=False)


def qwen2_config_for_fast_dllm(config: dict) -> Qwen2Config:
    """Fast-dLLM v2 is Qwen2.5 at inference (same weight names, q/k/v biases); only the mask differs."""
    return Qwen2Config(**{k: v for k, v in config.items() if k not in (
        "model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "bd_size",
        "conplemenrary_mask", "use_cache")}, use_cache=False)


def block_family(config: dict) -> str | None:
    """The block family of a config.json, or None. Stable-DiffCoder says `model_type "llama"`
    (it is Seed-Coder's Llama layout); its architecture or auto_map names it."""
    model_type = str(config.get("model_type", "")).lower()
    if model_type == "llama":
        named = json.dumps([config.get("architectures"), config.get("auto_map")]).lower()
        return "stable-diffcoder" if "stable_diffcoder" in named or "stablediffcoder" in named else None
    return BLOCK_FAMILIES.get(model_type)


def llama_config_for_stable_diffcoder(config: dict) -> LlamaConfig:
    """Stable-DiffCoder is stock Llama at inference (its modeling file subclasses LlamaForCausalLM
    and adds only generate); only the mask differs."""
    return LlamaConfig(**{k: v for k, v in config.items() if k not in (
        "model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
        "layer_norm_eps", "resid_pdrop")}, use_cache=False)


def network_for(family: str, config: dict):
    """(network class, its config) a block family's checkpoint loads into (LLaDA 2.x: our own, llada2.py)."""
    if family == "sdar":
        network_config = qwen3_config_for_sdar(config)
        return (Qwen3MoeForCausalLM if isinstance(network_config, Qwen3MoeConfig) else Qwen3ForCausalLM), network_config
    if family == "llada2":
        from .llada2 import LLaDA2Config, LLaDA2ForDiffusion
        return LLaDA2ForDiffusion, LLaDA2Config(config)
    if family == "stable-diffcoder":
        return LlamaForCausalLM, llama_config_for_stable_diffcoder(config)
    return Qwen2ForCausalLM, qwen2_config_for_fast_dllm(config)


def family_options(family: str, config: dict, name: str = "") -> dict:
    """A block family's decoding, as the authors' generate does it:
    - SDAR (JetAstra/SDAR generate.py): blocks of `block_size` (4), denoising steps = block tokens
      with `low_confidence_dynamic` (the threshold rule, tau 0.9 as in the README's JetEngine
      example), logits not shifted, stop after the block in which a stop token appears.
    - Fast-dLLM v2 (the checkpoint's modeling.py `generate`): blocks of `bd_size` (32) decoded in
      sub-blocks of 8, left to right, each with the threshold rule (tau 0.9 as in its README),
      logits shifted inside the block (row i-1 scores position i) and each block's first token the
      greedy choice of the row before it, stop as soon as a stop token has nothing masked before it.
    - LLaDA 2.0 (modeling_llada2_moe.py `generate`): blocks of 32, each revealing every masked position
      above 0.95 and at least the most confident one per forward, logits not shifted, stop after the
      block in which the EOS appears. LLaDA 2.1 (the checkpoint named so): the same with M2T at 0.7
      and token editing (T2T) at 0.5, the sampler's edit_threshold: a visible token of the block
      that is not the prompt's is replaced where the model's top token differs at p above it.
    - Stable-DiffCoder (its README's `generate(steps=gen_length, block_length=4,
      remasking='low_confidence', threshold=None, shift=False)`): blocks of 4, one token per forward
      (the most confident masked one: the threshold rule at 1.0), not shifted, stop after the block
      with the EOS."""
    if family == "sdar":
        return dict(block_size=int(config.get("block_size") or SDAR_BLOCK_SIZE), shift_logits=False,
                    default_sampling=dict(THRESHOLD_0_9))
    if family == "llada2":
        return dict(block_size=LLADA2_BLOCK_SIZE, shift_logits=False,
                    default_sampling=dict(LLADA2_1 if re.search(r"llada-?2\.1", name.lower()) else LLADA2_0))
    if family == "stable-diffcoder":
        return dict(block_size=STABLE_DIFFCODER_BLOCK_SIZE, shift_logits=False, default_sampling=dict(ONE_PER_FORWARD))
    return dict(block_size=int(config.get("bd_size") or 32), sub_block=8, shift_logits=True, stop_inside_block=True,
                default_sampling=dict(THRESHOLD_0_9))


def block_causal_mask(length: int, block_size: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[1, 1, L, L] additive mask: position i sees position j when j's block is not after i's."""
    block = torch.arange(length, device=device) // block_size
    allowed = block[None, :] <= block[:, None]
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def generation_eos(generation_config: str | None) -> list[int]:
    """generation_config.json's eos ids (the chat models' `<|im_end|>`): stop tokens too."""
    if not generation_config:
        return []
    with open(generation_config, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos]


def fim_of(tokenizer) -> tuple[tuple[int, int, int] | None, bool]:
    """(prefix, suffix, middle) ids of the tokenizer's fill-in-the-middle format, and whether the
    suffix goes first; (None, False) when it has none (the hole is decoded after the prefix)."""
    vocab = tokenizer.get_vocab()
    for names, suffix_first in FIM_FORMATS:
        if all(t in vocab for t in names):
            return tuple(vocab[t] for t in names), suffix_first
    return None, False


class BlockKV:
    """Keys/values of the finished blocks in one buffer per layer, sized for the whole sequence.
    A forward writes its rows' keys/values right after the `done` rows and attends over all of
    them; `keep(n)` makes the last n rows written part of the cache (a finished block), else the
    next forward overwrites them (the block being denoised). No copy of the context per step."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.done = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args, **kwargs):
        if layer == len(self.layers):
            shape = (*keys.shape[:2], self.capacity, keys.shape[3])
            self.layers.append((keys.new_empty(shape), values.new_empty(shape)))
        all_keys, all_values = self.layers[layer]
        end = self.done + keys.shape[2]
        all_keys[:, :, self.done:end] = keys
        all_values[:, :, self.done:end] = values
        return all_keys[:, :, :end], all_values[:, :, :end]

    def get_seq_length(self, layer: int = 0) -> int:
        return self.done

    def keep(self, rows: int) -> None:
        self.done += rows

    def start_from(self, previous: "BlockKV", rows: int) -> None:
        """Begin with the first `rows` kept rows of `previous` (a job whose sequence starts the same)."""
        for keys, values in previous.layers:
            shape = (*keys.shape[:2], self.capacity, keys.shape[3])
            self.layers.append((keys.new_empty(shape), values.new_empty(shape)))
            self.layers[-1][0][:, :, :rows] = keys[:, :, :rows]
            self.layers[-1][1][:, :, :rows] = values[:, :, :rows]
        self.done = rows


def _holes(canvas: torch.Tensor, mask_id: int, provisional: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of masked or provisional positions."""
    hole = ((canvas == mask_id) | provisional).tolist()
    runs, start = [], None
    for i, inside in enumerate(hole + [False]):
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            runs.append((start, i))
            start = None
    return runs


@dataclass
class BlockDiffusionModel(DiffusionModel):
    """A DiffusionModel whose fill decodes block by block behind a fill-in-the-middle prompt."""

    block_size: int = SDAR_BLOCK_SIZE
    fim_ids: tuple[int, int, int] | None = None  # <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>
    fim_suffix_first: bool = False                # SPM order: suffix, then prefix, then middle (Seed-Coder)
    block_cache: bool = True                      # False: recompute the whole sequence every forward
    sub_block: int | None = None                  # decode the block in parts of this many tokens, left to right
    stop_inside_block: bool = False               # a stop token ends the hole at once (not after its block)
    last_blocks: tuple[torch.Tensor, BlockKV] | None = field(default=None, repr=False)  # last hole's tokens, K/V

    def prompt_ids(self, prefix: list[int], suffix: list[int]) -> list[int]:
        if self.fim_ids is None:
            return list(prefix)
        start, middle_of_suffix, middle = self.fim_ids
        if self.fim_suffix_first:
            return [middle_of_suffix, *suffix, start, *prefix, middle]
        return [start, *prefix, middle_of_suffix, *suffix, middle]

    # ---------------------------------------------------------------- forward

    def _cache_keyword(self) -> str:
        """transformers 5.17 calls the cache `past_key_values`, later versions `cache`."""
        return "cache" if "cache" in inspect.signature(self.network.model.forward).parameters else "past_key_values"

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, start: int, kv: BlockKV | None, compiled: bool,
             rows: torch.Tensor | None = None):
        """One forward of `ids` at positions start.. (attending per `mask`); logits of `rows` or none."""
        device = self.device
        inputs = dict(input_ids=ids[None].to(device), attention_mask=mask,
                      position_ids=torch.arange(start, start + len(ids), device=device)[None],
                      logits_to_keep=rows.to(device) if rows is not None else 1)
        if kv is not None:
            inputs.update({self._cache_keyword(): kv, "use_cache": True})
        else:
            inputs["use_cache"] = False
        return self.forward(compiled, **inputs).logits[0].float()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> float [B, L, V] logits under the block-causal mask (blocks from position 0);
        row i scores position i (shifted families: the network's row i-1, as in the base class)."""
        input_ids = input_ids.to(self.device)
        mask = block_causal_mask(input_ids.shape[1], self.block_size, self.dtype, self.device)
        logits = self.network(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits.float()

    @torch.no_grad()
    def position_logits(self, canvas: torch.Tensor, positions: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        mask = block_causal_mask(len(canvas), self.block_size, self.dtype, self.device)
        return self._run(canvas, mask, 0, None, compiled, self._rows(positions))

    # ---------------------------------------------------------------- decoding

    def fill(self, canvas_ids, sampling: Sampling | None = None, *, cancel=None,
             on_step: Callable[[DenoiseStep], bool | None] | None = None, generator=None, cache: str = "none",
             refresh_every=None, reuse_prefix: bool = False, compiled: bool = False, provisional=None,
             **options) -> Denoised:
        """Every hole (run of masks / provisional tokens) of the canvas, one job each, left to right:
        the text before it as the prefix, the text up to the next hole as the suffix. The
        bidirectional K/V cache modes (cache, refresh_every) do not apply: the block cache is exact.
        `reuse_prefix`: start from the last hole's keys/values of the whole blocks this prompt shares
        with its sequence (exact too: a block's keys/values depend on it and the blocks before it
        only), as a typing user's next request does. Runs alone (a `batcher` is not used). The
        result is canvas-aligned."""
        canvas = torch.as_tensor(canvas_ids, dtype=torch.long).clone()
        provisional = (torch.zeros(len(canvas), dtype=torch.bool) if provisional is None
                       else torch.as_tensor(provisional, dtype=torch.bool).clone())
        sampling = replace(self.sampling(sampling, **options), block_length=None)
        holes = _holes(canvas, self.mask_token_id, provisional)
        total = Denoised(canvas, torch.ones(len(canvas)), torch.zeros(len(canvas), dtype=torch.long), 0)
        with self.lock:
            for index, (start, end) in enumerate(holes):
                stop = holes[index + 1][0] if index + 1 < len(holes) else len(canvas)
                prompt = self.prompt_ids(canvas[:start].tolist(), canvas[end:stop].tolist())
                self._fill_hole(total, prompt, start, end, provisional, sampling, cancel, on_step, generator, compiled,
                                reuse_prefix)
                if total.cancelled or total.stopped_early:
                    break
        return total

    def _fill_hole(self, total: Denoised, prompt: list[int], start: int, end: int, provisional: torch.Tensor,
                   sampling: Sampling, cancel, on_step, generator, compiled: bool, reuse_prefix: bool) -> None:
        """Decode canvas[start:end] of `total` (in place) after `prompt`, block by block."""
        B, P, n = self.block_size, len(prompt), end - start
        S, shift, mask_id = self.sub_block or B, self.shift_logits, self.mask_token_id
        length = -(-(P + n) // B) * B  # whole blocks, as the authors' generate
        if length > self.max_length:
            raise ValueError(f"prompt and hole of {length} tokens exceed the model's {self.max_length}")
        seq = torch.full((length,), mask_id, dtype=torch.long)
        seq[:P] = torch.tensor(prompt, dtype=torch.long)
        seq[P:P + n] = total.canvas[start:end]
        draft = torch.zeros(length, dtype=torch.bool)
        draft[P:P + n] = provisional[start:end]
        kv = BlockKV(length) if self.block_cache else None
        first, to_store = P // B, []  # to_store: the finished block whose keys/values the next forward stores
        # with shifted logits a block's first token comes from the row before it: the prompt's last block runs apart
        prefill = first * B - (B if shift and first and P % B == 0 else 0)
        try:
            if kv is not None and reuse_prefix and self.last_blocks is not None:
                tokens, previous = self.last_blocks
                same = min(prefill, previous.done, len(tokens))
                same = int((tokens[:same] == seq[:same]).long().cumprod(0).sum()) // B * B  # whole shared blocks
                if same:
                    kv.start_from(previous, same)
                    total.reused += same
            if kv is not None and kv.done < prefill:  # the prompt's whole blocks (those not reused), once
                mask = block_causal_mask(prefill, B, self.dtype, self.device)[:, :, kv.done:]
                total.rows += prefill - kv.done
                self._run(seq[kv.done:prefill], mask, kv.done, kv, compiled)
                kv.keep(prefill - kv.done)
                total.refreshes += 1
            if prefill < first * B and self._next_token(total, seq, draft, first * B, kv, compiled, start, P, end):
                return
            for low in range(first * B, length, B):
                high = low + B
                past_the_hole = high > P + n and not draft[low:high].any()  # with drafts the sampler ends it
                for sub in range(low, high, S):
                    if self._denoise_part(total, seq, draft, low, sub, sub + S, P, start, end, kv, to_store,
                                          past_the_hole, sampling, cancel, on_step, generator, compiled):
                        return
                if not self.stop_inside_block and self._stop_at(total, start, end, min(high, P + n) - P + start,
                                                                 anywhere=True):
                    return
                if high >= P + n:
                    return
                if shift:  # store the block; its last row gives the next block's first token
                    if self._next_token(total, seq, draft, high, kv, compiled, start, P, end):
                        return
                elif kv is not None:
                    to_store.append(low)  # stored (once) by the next block's first forward
        finally:  # what the next request's prompt may start from
            if kv is not None and reuse_prefix:
                self.last_blocks = (seq.clone(), kv)

    def _denoise_part(self, total, seq, draft, low, part_low, part_high, P, start, end, kv, to_store,
                      past_the_hole, sampling, cancel, on_step, generator, compiled) -> bool:
        """Denoise seq[part_low:part_high] of the block [low, low + B) (a sub-block, or the block);
        True when the hole is finished early (cancelled, stopped, or a stop token ended it)."""
        B, n, mask_id = self.block_size, end - start, self.mask_token_id
        high = low + B
        here = slice(max(part_low, P) - P + start, min(part_high, P + n) - P + start)  # this part's share of the hole
        where = slice(max(part_low, P) - part_low, min(part_high, P + n) - part_low)
        if here.start >= here.stop:
            return False
        offset = part_low - low - (1 if self.shift_logits else 0)  # the block input's row scoring the part's first

        def logits_fn(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            block = seq[low:high].clone()
            block[part_low - low:part_high - low] = ids
            rows = positions + offset
            if kv is None:  # recompute everything before the block, and the block
                total.rows += high
                return self._run(torch.cat([seq[:low], block]), block_causal_mask(high, B, self.dtype, self.device),
                                 0, None, compiled, rows + low)
            see = torch.zeros(1, 1, B, high, dtype=self.dtype, device=self.device)
            if to_store:  # the last finished block rides along: its keys/values, from its final tokens, kept
                done = to_store.pop()
                see = torch.zeros(1, 1, 2 * B, high, dtype=self.dtype, device=self.device)
                see[:, :, :B, low:] = torch.finfo(self.dtype).min  # it does not see the block after it
                logits = self._run(torch.cat([seq[done:low], block]), see, done, kv, compiled, rows + B)
                kv.keep(B)
                total.rows += 2 * B
                return logits
            total.rows += B
            return self._run(block, see, low, kv, compiled, rows)

        caller_stopped = []

        def step(state: DenoiseStep, forwards_before=total.forwards) -> bool:
            total.canvas[here] = state.canvas[where]
            if on_step is not None and on_step(DenoiseStep(total.canvas, forwards_before + state.step,
                                                     int((total.canvas == mask_id).sum()))):
                caller_stopped.append(True)
                return True
            if self.stop_inside_block and self._stop_at(total, start, end, here.stop, anywhere=False, dry=True):
                return True  # a stop token with nothing masked before it: the generation is over
            # the hole's part is done: the positions after it (there for whole blocks) need no more forwards
            return past_the_hole and not bool((state.canvas[where] == mask_id).any())

        decided = ((seq[part_low:part_high] == mask_id) | draft[part_low:part_high])[where]  # by this part's forwards
        result = denoise(logits_fn, seq[part_low:part_high], mask_id, sampling, cancel=cancel, on_step=step,
                         stop_ids=self.eos_token_ids, generator=generator, provisional=draft[part_low:part_high])
        seq[part_low:part_high] = result.canvas
        total.canvas[here] = result.canvas[where]
        total.confidence[here] = torch.where(decided, result.confidence[where], total.confidence[here])
        revealed = result.reveal_step[where] + total.forwards
        total.reveal_step[here] = torch.where(decided, revealed, total.reveal_step[here])
        total.forwards += result.forwards
        total.drafted += result.drafted
        total.remasked += result.remasked
        total.edits += result.edits
        if result.cancelled or caller_stopped:
            total.cancelled, total.stopped_early = result.cancelled, bool(caller_stopped)
            return True
        return self.stop_inside_block and self._stop_at(total, start, end, here.stop, anywhere=False)

    def _stop_at(self, total: Denoised, start: int, end: int, decoded: int, anywhere: bool, dry: bool = False) -> bool:
        """Whether the hole's decoded part canvas[start:decoded] holds a stop token (`anywhere`), or
        one with no mask before it; if so (and not `dry`) the hole's masked rest becomes that token."""
        part = total.canvas[start:decoded]
        stops = torch.isin(part, torch.tensor(self.eos_token_ids)).nonzero()
        if not len(stops):
            return False
        first = int(stops[0])
        if not anywhere and bool((part[:first] == self.mask_token_id).any()):
            return False
        if not dry:
            rest = total.canvas[start + first + 1:end]
            fill = rest == self.mask_token_id
            rest[fill] = total.canvas[start + first]
            total.confidence[start + first + 1:end][fill] = total.confidence[start + first]
            total.reveal_step[start + first + 1:end][fill] = total.forwards
        return True

    def _next_token(self, total: Denoised, seq: torch.Tensor, draft: torch.Tensor, high: int, kv, compiled: bool,
                    start: int, P: int, end: int) -> bool:
        """Shifted logits (Fast-dLLM v2): run the finished block [high - B, high) once more from its final
        tokens (storing its keys/values) and take its last row's greedy token as the next block's first,
        as the authors' generate does. True when that token ends the hole (a stop token)."""
        B = self.block_size
        if kv is not None:
            logits = self._run(seq[high - B:high], torch.zeros(1, 1, B, high, dtype=self.dtype, device=self.device),
                               high - B, kv, compiled)
            kv.keep(B)
            total.rows += B
        else:
            logits = self._run(seq[:high], block_causal_mask(high, B, self.dtype, self.device), 0, None, compiled)
            total.rows += high
        total.forwards += 1
        probs = torch.softmax(logits[-1], -1)
        p, token = (float(x) for x in probs.max(-1))
        if high >= len(seq):
            return False
        seq[high], draft[high] = int(token), False  # decided here, not a draft to re-check
        at = high - P + start
        if start <= at < end:
            total.canvas[at], total.confidence[at], total.reveal_step[at] = int(token), p, total.forwards
            return self._stop_at(total, start, end, at + 1, anywhere=False)
        return False

    def token_probabilities(self, prefix_ids: list[int], ids: list[int], suffix_ids: list[int]) -> list[float]:
        """p(token) for each of `ids` as the middle of the FIM prompt, scored while it is masked: in
        each block, the even positions masked, then the odd ones, the blocks before it clean (as
        the model sees a block while decoding it); 2 forwards per block through the block cache.
        With shifted logits a block's first token is scored as it is decided: by the last row of the
        block before it (the forward that stores that block)."""
        prompt = self.prompt_ids(prefix_ids, suffix_ids)
        B, P, shift = self.block_size, len(prompt), int(self.shift_logits)
        seq = torch.tensor(prompt + list(ids), dtype=torch.long)
        length = -(-len(seq) // B) * B
        seq = torch.cat([seq, torch.full((length - len(seq),), self.mask_token_id, dtype=torch.long)])
        if length > self.max_length:
            raise ValueError(f"prompt and selection of {length} tokens exceed the model's {self.max_length}")
        scores = [1.0] * len(ids)

        def score(position: int, logits_row: torch.Tensor) -> None:
            if P <= position < P + len(ids):
                scores[position - P] = float(torch.softmax(logits_row, -1)[seq[position]])

        kv, first = BlockKV(length), P // B
        with self.lock:
            if first:
                last = self._run(seq[:first * B], block_causal_mask(first * B, B, self.dtype, self.device), 0, kv, False)
                kv.keep(first * B)
                if shift:
                    score(first * B, last[-1])
            for low in range(first * B, length, B):
                high = low + B
                see = torch.zeros(1, 1, B, high, dtype=self.dtype, device=self.device)
                inside = [i for i in range(max(low + shift, P), min(high, P + len(ids)))]
                for parity in (0, 1):
                    chosen = [i for i in inside if (i - P) % 2 == parity]
                    if not chosen:
                        continue
                    masked = seq[low:high].clone()
                    masked[torch.tensor(chosen) - low] = self.mask_token_id
                    logits = self._run(masked, see, low, kv, False, torch.tensor(chosen) - low - shift)
                    for i, row in zip(chosen, logits):
                        score(i, row)
                last = self._run(seq[low:high], see, low, kv, False)
                kv.keep(B)
                if shift and high < length:
                    score(high, last[-1])
        return scores
