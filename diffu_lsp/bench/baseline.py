"""The autoregressive baseline: the same weights decoded left to right with a causal mask and a KV cache.

Apart from decoding.py (the compared settings) because that module reads the server's Settings at
import, and the GPU suite (`bench gpu`, shapes.py) must run where only torch and transformers are
installed (no msgspec: the GPU machine's image).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Decoded:
    ids: list[int]
    forwards: int        # denoising steps (AR: tokens), each one forward pass
    seconds: float
    refreshes: int = 0   # extra full forwards that rebuilt a K/V cache
    rows: int = 0        # canvas rows run through the network, over all forwards


def sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


@torch.inference_mode()
def autoregressive(model, prefix_ids: list[int], suffix_ids: list[int], length: int) -> Decoded:
    """Greedy left-to-right decoding of `length` tokens, as an autoregressive code server would.

    The prompt holds the same context as the diffusion canvas, suffix first (SPM order, as a
    fill-in-the-middle model would get it), so the prefill costs the same context length. One
    forward pass per token: the prefill yields the first token, each later forward feeds one token
    through the cached keys/values. Neither a mask nor is_causal is passed, so the attention is
    causal (models/backend.py, sdpa_attention). With shifted logits (Dream) the last position
    scores the next token; for an unshifted model (LLaDA) the tokens are meaningless but the cost
    per token is the same.
    """
    from transformers import DynamicCache

    network = model.network
    keyword = model.cache_keyword
    prompt = torch.tensor([list(suffix_ids) + list(prefix_ids)], dtype=torch.long, device=model.device)
    sync(model)
    started = time.perf_counter()
    cache = DynamicCache(config=network.config)
    # logits_to_keep=1: the LM head only on the last row, as generate() does
    logits = network(input_ids=prompt, use_cache=True, logits_to_keep=1, **{keyword: cache}).logits
    forwards = 1
    token = logits[:, -1].argmax(-1, keepdim=True)
    out = [int(token)]
    while len(out) < length:
        logits = network(input_ids=token, use_cache=True, logits_to_keep=1, **{keyword: cache}).logits
        forwards += 1
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
    sync(model)
    return Decoded(out, forwards, time.perf_counter() - started, rows=prompt.shape[1] + forwards - 1)
