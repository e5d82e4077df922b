"""LLaDA 2.x (inclusionAI LLaDA2.0-mini / LLaDA2.1-mini, `model_type "llada2_moe"`): our own network.

transformers has no class for it, and the checkpoints' own modeling file is not run (no
checkpoint code, as for every family). This is that network written out plainly, with the
checkpoint's weight names (so its safetensors load as they are) and config.json's keys:

- embeddings `model.word_embeddings`, final `model.norm`, untied `lm_head`;
- attention: one fused `query_key_value` projection (queries, then keys, then values, by heads),
  RMS norms on each head's queries and keys (`query_layernorm`, `key_layernorm`), rotary
  embeddings on the first `partial_rotary_factor` of each head's dimensions only, grouped
  key/value heads, output `dense`;
- the first `first_k_dense_replace` layers: a gated MLP; the others: a mixture of experts with
  `num_shared_experts` shared experts (one MLP of that many times the expert width, always on)
  and sigmoid routing over `num_experts` experts in `n_group` groups: the `topk_group` groups
  whose two best scores (plus the per-expert `expert_bias`) sum highest are eligible, the
  `num_experts_per_tok` best experts among them are chosen by score + bias, and weighted by their
  sigmoid scores (without the bias) normalised to sum to 1, times `routed_scaling_factor`.

Attention is torch SDPA through backend.sdpa_attention (the same function the transformers
networks run under); the caller's mask, position ids and K/V buffer (block.BlockKV) are used as
given, so block.py decodes it exactly like the transformers networks.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .backend import sdpa_attention


class LLaDA2Config:
    """config.json's keys the network reads (LLaDA2.0-mini's values as defaults where it has them)."""

    def __init__(self, config: dict):
        get = config.get
        self.vocab_size = get("vocab_size")
        self.hidden_size = get("hidden_size")
        self.intermediate_size = get("intermediate_size")
        self.num_hidden_layers = get("num_hidden_layers")
        self.num_attention_heads = get("num_attention_heads")
        self.num_key_value_heads = get("num_key_value_heads") or self.num_attention_heads
        self.head_dim = get("head_dim") or (self.hidden_size // self.num_attention_heads
                                            if self.hidden_size and self.num_attention_heads else None)
        self.max_position_embeddings = get("max_position_embeddings", 32768)
        self.rms_norm_eps = get("rms_norm_eps", 1e-6)
        self.rope_theta = get("rope_theta", 600000)
        self.partial_rotary_factor = get("partial_rotary_factor", 0.5)
        self.use_qkv_bias = bool(get("use_qkv_bias", False))
        self.use_bias = bool(get("use_bias", False))
        self.use_qk_norm = bool(get("use_qk_norm", True))
        self.num_experts = get("num_experts")
        self.num_shared_experts = get("num_shared_experts")
        self.num_experts_per_tok = get("num_experts_per_tok", 1)
        self.n_group = get("n_group", 1)
        self.topk_group = get("topk_group", 1)
        self.moe_intermediate_size = get("moe_intermediate_size")
        self.first_k_dense_replace = get("first_k_dense_replace", 0)
        self.routed_scaling_factor = get("routed_scaling_factor", 1.0)
        self.tie_word_embeddings = bool(get("tie_word_embeddings", False))
        self.hidden_act = get("hidden_act", "silu")
        self.eos_token_id, self.pad_token_id = get("eos_token_id"), get("pad_token_id")
        self._attn_implementation = "sdpa"
        for key in ("rope_scaling",):
            if get(key):
                raise ValueError(f"{key} is not supported for llada2_moe")
        if self.hidden_act != "silu" or get("score_function", "sigmoid") != "sigmoid":
            raise ValueError("llada2_moe: only silu experts with sigmoid routing are supported")
        self.sliding_window, self.layer_types = None, None

    def get_text_config(self, *args, **kwargs) -> "LLaDA2Config":
        """What transformers' DynamicCache asks a config for (the autoregressive baseline makes one)."""
        return self

    @property
    def per_layer_config(self) -> list["LLaDA2Config"]:
        return [self] * self.num_hidden_layers


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first cos.shape[-1] dimensions of each head; the rest pass."""
    dims = cos.shape[-1]
    turned, rest = x[..., :dims], x[..., dims:]
    half = torch.cat((-turned[..., dims // 2:], turned[..., :dims // 2]), dim=-1)
    return torch.cat((turned * cos + half * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: LLaDA2Config, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.query_key_value = nn.Linear(c.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim,
                                         bias=c.use_qkv_bias)
        self.dense = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=c.use_bias)
        if c.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, is_causal):
        batch, length, _ = x.shape
        qkv = self.query_key_value(x).view(batch, length, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2))
        if hasattr(self, "query_layernorm"):
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        out, _ = sdpa_attention(self, q, k, v, mask, scaling=self.head_dim ** -0.5, is_causal=is_causal)
        return self.dense(out.reshape(batch, length, -1))


class Gate(nn.Module):
    def __init__(self, c: LLaDA2Config):
        super().__init__()
        self.top_k, self.groups, self.top_groups, self.scale = (c.num_experts_per_tok, c.n_group, c.topk_group,
                                                                c.routed_scaling_factor)
        self.weight = nn.Parameter(torch.empty(c.num_experts, c.hidden_size).normal_(std=0.02))
        self.register_buffer("expert_bias", torch.zeros(c.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, H] -> (experts [T, k], weights [T, k] float32)."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        ranked = scores + self.expert_bias
        by_group = ranked.view(len(x), self.groups, -1)
        best_groups = by_group.topk(2, dim=-1).values.sum(-1).topk(self.top_groups, dim=-1, sorted=False).indices
        allowed = torch.zeros_like(by_group[..., 0]).scatter_(1, best_groups, 1).bool()
        ranked = ranked.masked_fill(~allowed.repeat_interleave(by_group.shape[-1], dim=1), float("-inf"))
        experts = ranked.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * self.scale


class MixtureOfExperts(nn.Module):
    def __init__(self, c: LLaDA2Config):
        super().__init__()
        self.experts = nn.ModuleList(MLP(c.hidden_size, c.moe_intermediate_size) for _ in range(c.num_experts))
        self.gate = Gate(c)
        if c.num_shared_experts:
            self.shared_experts = MLP(c.hidden_size, c.moe_intermediate_size * c.num_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        experts, weights = self.gate(flat)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        for expert in experts.unique().tolist():  # only the experts some token chose
            token, slot = (experts == expert).nonzero(as_tuple=True)
            out.index_add_(0, token, self.experts[expert](flat[token]).float() * weights[token, slot, None])
        out = out.to(x.dtype).view(shape)
        return out + self.shared_experts(x) if hasattr(self, "shared_experts") else out


class Layer(nn.Module):
    def __init__(self, c: LLaDA2Config, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attention = Attention(c, index)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = (MixtureOfExperts(c) if c.num_experts and index >= c.first_k_dense_replace
                    else MLP(c.hidden_size, c.intermediate_size))

    def forward(self, x, cos, sin, mask, cache, is_causal):
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask, cache, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2Model(nn.Module):
    def __init__(self, c: LLaDA2Config):
        super().__init__()
        self.config = c
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, L, rotary dims] in float32 then `dtype` (as the checkpoint's code)."""
        c = self.config
        dims = int(c.head_dim * c.partial_rotary_factor)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, dims, 2, dtype=torch.int64, device=positions.device).float()
                                           / dims))
        angles = positions[:, :, None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, is_causal=None):
        x = self.word_embeddings(input_ids)
        if position_ids is None:
            start = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rotary(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention_mask, cache, is_causal)
        return self.norm(x)


class LLaDA2ForDiffusion(nn.Module):
    """The whole network: called like a transformers causal LM (input_ids, attention_mask,
    position_ids, cache, logits_to_keep, is_causal), returning an object with `.logits`."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.config = config
        self.model = LLaDA2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=False, logits_to_keep=0, is_causal=None, **ignored):
        cache = cache if cache is not None else past_key_values
        hidden = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None, is_causal)
        rows = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return SimpleNamespace(logits=self.lm_head(hidden[:, rows]).float())


def load_llada2(paths, config: dict, dtype: torch.dtype, device) -> LLaDA2ForDiffusion:
    """The network with the checkpoint's safetensors weights (names as they are), made without
    first initialising parameters the weights replace. Raises KeyError naming a missing or
    unexpected weight."""
    from safetensors.torch import load_file

    with torch.device("meta"):
        network = LLaDA2ForDiffusion(LLaDA2Config(config))
    state = {}
    for path in paths:
        state.update(load_file(path, device=str(device)))
    expected = set(network.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"missing weight {missing[0]}" if missing else f"unexpected weight {unexpected[0]}")
    network.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return network.eval().requires_grad_(False)
