"""Random tiny checkpoints written in the exact on-disk formats of the real ones.

Same config field names, model_type, architectures/auto_map, special-token ids and weight key
names as DiffuCoder/Dream (Qwen2 keys, vocab.json + merges.txt + added_tokens.json, sharded
safetensors), Open-dCoder (stock qwen2, `<M>` mask token), LLaDA (OLMo-style keys) and SDAR
(block diffusion: `model_type "sdar"`, Qwen3 keys with q/k norms, `<|MASK|>` 151669, block_size 4).
Only the widths are tiny; the vocabularies are full size so the special ids are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

SAMPLE_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
] * 4

DREAM_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<|beginoftext|>", "<|mask|>", "<|dlm_pad|>",
]  # ids 151643 .. 151667 in DiffuCoder


def _small_bpe(vocab_size: int = 400) -> tuple[dict[str, int], list[str]]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SAMPLE_TEXT, trainer=trainer)
    data = json.loads(tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return data["model"]["vocab"], merges


def _padded_vocab(size: int) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary with filler entries up to `size` (real merges for the rest).
    A filler decodes to " filler<id>" ("\u0120" is the space byte): printable garbage, which the
    post-processing keeps (its first byte was NUL, and suggestions are cut at a control character)."""
    vocab, merges = _small_bpe()
    next_id = len(vocab)
    while next_id < size:
        vocab[f"\u0120filler{next_id}"] = next_id
        next_id += 1
    return vocab, merges


def _tokenizer_json(vocab: dict[str, int], merges: list[str], added: dict[str, int]) -> str:
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(sorted(added, key=added.get))
    for content, token_id in added.items():
        assert tokenizer.token_to_id(content) == token_id, (content, token_id)
    return tokenizer.to_str()


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    keys = sorted(state)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[index * per_shard:(index + 1) * per_shard]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_dream(folder: Path, seed: int = 0) -> Path:
    """DiffuCoder-7B-Base's layout at toy width: vocab/merges/added_tokens, 2 shards, bf16."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _padded_vocab(151643)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {token: 151643 + i for i, token in enumerate(DREAM_ADDED_TOKENS)}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "tokenizer_class": "DreamTokenizer", "bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "model_max_length": 131072,
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in added.items()},
    }, indent=2))
    config = {
        "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "model_type": "Dream", "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "pad_token_id": 151643, "mask_token_id": 151666, "hidden_act": "silu", "hidden_size": 32,
        "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 512,
        "max_window_layers": 2, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.2",
        "use_cache": False, "use_sliding_window": False, "vocab_size": 152064,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    network = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in config.items()
                                             if k not in ("architectures", "auto_map", "model_type")}))
    state = {k: v.to(torch.bfloat16) for k, v in network.state_dict().items()}
    assert "model.layers.0.self_attn.q_proj.bias" in state and "lm_head.weight" in state
    _save_sharded(state, folder, shards=2)
    return folder


def write_qwen2_diffusion(folder: Path, seed: int = 0) -> Path:
    """Open-dCoder's layout: a stock qwen2 checkpoint whose tokenizer adds the `<M>` mask token."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _padded_vocab(1000)
    added = {"<|endoftext|>": 1000, "<M>": 1001}
    (folder / "tokenizer.json").write_text(_tokenizer_json(vocab, merges, added))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "mask_token": "<M>"}, indent=2))
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=1000, pad_token_id=1000, bos_token_id=None)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    return folder


def write_llada(folder: Path, seed: int = 0) -> tuple[Path, LlamaForCausalLM]:
    """LLaDA-8B's layout at toy width; also returns the same weights as a Llama model, for checks."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _padded_vocab(126081)
    added = {"<|endoftext|>": 126081, "<|mdm_mask|>": 126336}
    for token_id in range(126082, 126336):
        added[f"<|reserved_token_{token_id}|>"] = token_id
    (folder / "tokenizer.json").write_text(_tokenizer_json(vocab, merges, added))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    config = {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "model_type": "llada", "activation_type": "silu", "alibi": False, "block_type": "llama",
        "d_model": 32, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 64, "mlp_ratio": 4,
        "embedding_size": 126464, "vocab_size": 126464, "max_sequence_length": 512, "rope": True,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "layer_norm_type": "rms", "include_bias": False,
        "include_qkv_bias": False, "weight_tying": False, "eos_token_id": 126081, "pad_token_id": 126081,
        "mask_token_id": 126336, "scale_logits": False, "use_cache": False, "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
        intermediate_size=64, vocab_size=126464, max_position_embeddings=512, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False)).to(torch.bfloat16)
    names = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
             "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
             "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
    state = {}
    for key, tensor in llama.state_dict().items():
        if key == "model.embed_tokens.weight":
            state["model.transformer.wte.weight"] = tensor
        elif key == "model.norm.weight":
            state["model.transformer.ln_f.weight"] = tensor
        elif key == "lm_head.weight":
            state["model.transformer.ff_out.weight"] = tensor
        else:
            _, _, layer, rest = key.split(".", 3)
            module, param = rest.rsplit(".", 1)
            state[f"model.transformer.blocks.{layer}.{names[module]}.{param}"] = tensor
    _save_sharded(state, folder, shards=1)
    return folder, llama


SDAR_ADDED_TOKENS = [  # Qwen3's added tokens, ids 151643 .. 151668, then SDAR's mask at 151669
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|MASK|>",
]


def write_sdar(folder: Path, seed: int = 0) -> tuple[Path, Qwen3ForCausalLM]:
    """SDAR-4B-Chat's layout at toy width (JetLM/SDAR-*-Chat: config.json with the authors' extra
    fields, Qwen3 keys, untied lm_head, 2 bf16 shards, tokenizer.json + vocab/merges/added_tokens,
    generation_config.json); also returns the same weights as a stock Qwen3 model, for checks."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _padded_vocab(151643)
    added = {token: 151643 + i for i, token in enumerate(SDAR_ADDED_TOKENS)}
    (folder / "tokenizer.json").write_text(_tokenizer_json(vocab, merges, added))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # as published (JetAstra/SDAR training/model/SDAR-4B-Chat/): added_tokens.json and special_tokens_map.json
    # name the mask `<MASK>`, tokenizer.json and tokenizer_config.json `<|MASK|>`, all at 151669
    (folder / "added_tokens.json").write_text(json.dumps(
        {("<MASK>" if t == "<|MASK|>" else t): i for t, i in added.items()}, indent=2))
    roles = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
             "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
             "<|video_pad|>"]
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": roles + ["<MASK>"], "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "additional_special_tokens": roles + ["<|MASK|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_qwen2.Qwen2Tokenizer", None]},
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|MASK|>",
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, "model_max_length": 131072,
        "added_tokens_decoder": {str(i): {"content": t, "special": t != "<|MASK|>"} for t, i in added.items()},
    }, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
        "temperature": 0.6, "top_k": 20, "top_p": 0.95}, indent=2))
    config = {
        "architectures": ["SDARForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                     "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
        "bos_token_id": 151643, "debug": False, "eos_token_id": 151643, "block_size": 4, "mask_token_id": 151669,
        "ep_size": 1, "fuse_cross_entropy": True, "head_dim": 16, "hidden_act": "silu", "hidden_size": 32,
        "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 512, "max_window_layers": 2,
        "micro_forward": False, "model_type": "sdar", "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "skip_checkpoint": False, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.52.4", "use_cache": False, "use_deepep": False, "use_sliding_window": False,
        "vocab_size": 151936,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=1000000, rms_norm_eps=1e-6,
        tie_word_embeddings=False))
    state = {k: v.to(torch.bfloat16) for k, v in qwen3.state_dict().items()}
    assert "model.layers.0.self_attn.q_norm.weight" in state and "model.layers.0.self_attn.q_proj.bias" not in state
    _save_sharded(state, folder, shards=2)
    qwen3.load_state_dict({k: v.float() for k, v in state.items()})  # float32 with the saved values (and rotary
    return folder, qwen3.eval()                                        # frequencies never rounded to bf16)


def write_sdar_moe(folder: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """SDAR-30B-A3B-Chat's layout at toy width (`model_type "sdar_moe"`, SDARMoeForCausalLM): SDAR's
    tokenizer files and Qwen3 attention keys, and in every layer (decoder_sparse_step 1, no
    mlp_only_layers, as Qwen3-30B-A3B) a router `mlp.gate` and per-expert
    `mlp.experts.{j}.{gate,up,down}_proj` weights, as the hub stores them; 8 experts, 2 per token,
    untied lm_head, bf16 shards. Random weights by name (the router's wider, so the top-2 choice is
    clear); also returns them in float32 for checks."""
    write_sdar(folder, seed)
    for shard in folder.glob("model-*.safetensors"):
        shard.unlink()
    config = json.loads((folder / "config.json").read_text())
    config.update({
        "architectures": ["SDARMoeForCausalLM"], "model_type": "sdar_moe",
        "auto_map": {"AutoConfig": "configuration_sdar_moe.SDARMoeConfig", "AutoModel": "modeling_sdar_moe.SDARMoeModel",
                     "AutoModelForCausalLM": "modeling_sdar_moe.SDARMoeForCausalLM"},
        "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 16, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "output_router_logits": False, "router_aux_loss_coef": 0.001,
    })
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=generator) * std

    H, I, E, V, D = 32, 16, 8, 151936, 16
    state = {"model.embed_tokens.weight": normal(V, H), "lm_head.weight": normal(V, H),
             "model.norm.weight": 1 + normal(H, std=0.1)}
    for layer in range(2):
        at = f"model.layers.{layer}."
        state.update({at + "self_attn.q_proj.weight": normal(4 * D, H), at + "self_attn.k_proj.weight": normal(2 * D, H),
                      at + "self_attn.v_proj.weight": normal(2 * D, H), at + "self_attn.o_proj.weight": normal(H, 4 * D),
                      at + "self_attn.q_norm.weight": 1 + normal(D, std=0.1),
                      at + "self_attn.k_norm.weight": 1 + normal(D, std=0.1),
                      at + "input_layernorm.weight": 1 + normal(H, std=0.1),
                      at + "post_attention_layernorm.weight": 1 + normal(H, std=0.1),
                      at + "mlp.gate.weight": normal(E, H, std=0.5)})
        for expert in range(E):
            state.update({at + f"mlp.experts.{expert}.gate_proj.weight": normal(I, H, std=0.2),
                          at + f"mlp.experts.{expert}.up_proj.weight": normal(I, H, std=0.2),
                          at + f"mlp.experts.{expert}.down_proj.weight": normal(H, I, std=0.2)})
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    _save_sharded(state, folder, shards=2)
    return folder, {k: v.float() for k, v in state.items()}


FAST_DLLM_ADDED_TOKENS = SDAR_ADDED_TOKENS[:22] + ["|<MASK>|"]  # Qwen2.5's 151643 .. 151664, then the mask at 151665


def write_fast_dllm_v2(folder: Path, seed: int = 0) -> tuple[Path, Qwen2ForCausalLM]:
    """Fast_dLLM_v2_7B's layout at toy width (Efficient-Large-Model/Fast_dLLM_v2_7B: config.json with
    bd_size 32 and the authors' fields, Qwen2 keys with q/k/v biases, untied lm_head, bf16 shards,
    vocab.json + merges.txt + added_tokens.json with `|<MASK>|` 151665 and no tokenizer.json,
    generation_config.json); also returns the same weights as a stock Qwen2 model, for checks."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _padded_vocab(151643)
    added = {token: 151643 + i for i, token in enumerate(FAST_DLLM_ADDED_TOKENS)}
    assert added["|<MASK>|"] == 151665 and added["<|fim_prefix|>"] == 151659
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "additional_special_tokens": ["|<MASK>|"], "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in added.items()},
    }, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
        "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}, indent=2))
    config = {
        "architectures": ["Fast_dLLM_QwenForCausalLM"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig", "AutoModel": "modeling.Fast_dLLM_QwenModel",
                     "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
        "bd_size": 32, "bos_token_id": 151643, "conplemenrary_mask": True, "eos_token_id": 151645, "hidden_act": "silu",
        "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64, "layer_types": ["full_attention"] * 2,
        "max_position_embeddings": 512, "max_window_layers": 2, "model_type": "Fast_dLLM_Qwen", "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": 151645, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.53.1", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 152064,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False))
    state = {k: v.to(torch.bfloat16) for k, v in qwen2.state_dict().items()}
    assert "model.layers.0.self_attn.q_proj.bias" in state and "lm_head.weight" in state
    _save_sharded(state, folder, shards=2)
    qwen2.load_state_dict({k: v.float() for k, v in state.items()})
    return folder, qwen2.eval()


def write_llada2(folder: Path, seed: int = 0) -> Path:
    """LLaDA2.0-mini's layout at toy width (inclusionAI/LLaDA2.0-mini: `model_type "llada2_moe"`,
    LLaDA2MoeModelLM, its config keys, fused query_key_value, q/k norms, partial rotary 0.5, layer 0
    dense and the rest a mixture of experts with a shared expert and sigmoid group routing with
    expert_bias, untied lm_head, tokenizer.json with `<|endoftext|>` 156892 and `<|mask|>` 156895,
    vocabulary 157184, bf16 shards). Weights are made by our own network class with random values."""
    from diffu_lsp.models.llada2 import LLaDA2Config, LLaDA2ForDiffusion

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _padded_vocab(156891)
    added = {"<|startoftext|>": 156891, "<|endoftext|>": 156892, "<|mask|>": 156895}
    for token_id in (156893, 156894):
        added[f"<|reserved_token_{token_id}|>"] = token_id
    (folder / "tokenizer.json").write_text(_tokenizer_json(vocab, merges, added))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "model_max_length": 32768}, indent=2))
    config = {
        "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "model_type": "llada2_moe", "dtype": "bfloat16", "embedding_dropout": 0.0, "first_k_dense_replace": 1,
        "head_dim": 16, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
        "max_position_embeddings": 512, "max_window_layers": 2, "moe_intermediate_size": 16,
        "moe_router_enable_expert_bias": True, "n_group": 4, "norm_head": False, "norm_softmax": False,
        "norm_topk_prob": True, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "num_shared_experts": 1, "output_dropout": 0.0,
        "output_router_logits": False, "pad_token_id": 156892, "eos_token_id": 156892, "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 600000, "rotary_dim": 8,
        "routed_scaling_factor": 2.5, "router_dtype": "fp32", "score_function": "sigmoid", "tie_word_embeddings": False,
        "topk_group": 2, "transformers_version": "4.56.2", "use_bias": False, "use_cache": False,
        "use_qk_norm": True, "use_qkv_bias": False, "use_rmsnorm": True, "using_split_qkv_in_self_attention": False,
        "vocab_size": 157184,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    network = LLaDA2ForDiffusion(LLaDA2Config(config))
    state = {}
    for key, tensor in network.state_dict().items():
        if key.endswith("gate.weight") or key.endswith("word_embeddings.weight"):
            tensor = torch.randn(tensor.shape)
        elif key.endswith("expert_bias"):
            tensor = 0.1 * torch.randn(tensor.shape)
        elif key.endswith("layernorm.weight") or key.endswith("norm.weight"):
            tensor = 1 + 0.1 * torch.randn(tensor.shape)
        state[key] = tensor.to(torch.bfloat16)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in state and "model.layers.0.mlp.gate_proj.weight" in state
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in state and "model.layers.1.mlp.gate.expert_bias" in state
    _save_sharded(state, folder, shards=2)
    return folder


SEED_CODER_SPECIAL = {  # assumed names (Seed-Coder's documented FIM tokens; a mask token we name); ids assumed too
    "<[begin▁of▁sentence]>": 0, "<[PAD▁TOKEN]>": 1, "<[end▁of▁sentence]>": 2,
    "<[fim-suffix]>": 155100, "<[fim-prefix]>": 155101, "<[fim-middle]>": 155102, "<[MASK]>": 155103,
}


def write_stable_diffcoder(folder: Path, seed: int = 0) -> tuple[Path, LlamaForCausalLM]:
    """Stable-DiffCoder-8B-Instruct's layout at toy width (ByteDance-Seed/Stable-DiffCoder-8B-*:
    config.json `model_type "llama"`, architectures StableDiffcoderForCausalLM with auto_map to
    modeling_stable_diffcoder.py, bos 0 / eos 2, vocabulary 155136, untied, 4 bf16 shards,
    tokenizer.json). Assumed (the tokenizer is not readable here): the special tokens' ids, and the
    mask token's name, given as tokenizer_config's mask_token. Also returns stock Llama with the
    same weights, for checks."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _padded_vocab(155097)
    vocab = {token: token_id + 3 for token, token_id in vocab.items()}  # ids 0, 1, 2: bos, pad, eos
    vocab.update(SEED_CODER_SPECIAL)  # in the vocabulary, so the special tokens keep these ids
    (folder / "tokenizer.json").write_text(_tokenizer_json(vocab, merges, SEED_CODER_SPECIAL))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<[begin▁of▁sentence]>",
        "eos_token": "<[end▁of▁sentence]>", "pad_token": "<[PAD▁TOKEN]>", "mask_token": "<[MASK]>",
        "model_max_length": 8192}, indent=2))
    config = {
        "architectures": ["StableDiffcoderForCausalLM"],
        "auto_map": {"AutoModel": "modeling_stable_diffcoder.StableDiffcoderForCausalLM",
                     "AutoModelForCausalLM": "modeling_stable_diffcoder.StableDiffcoderForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.1, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 32, "initializer_range": 0.009882118, "intermediate_size": 64, "layer_norm_eps": None,
        "max_position_embeddings": 512, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "resid_pdrop": 0.1, "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "5.3.0",
        "use_cache": True, "vocab_size": 155136,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=155136, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, initializer_range=0.5))
    state = {k: v.to(torch.bfloat16) for k, v in llama.state_dict().items()}
    _save_sharded(state, folder, shards=4)
    llama.load_state_dict({k: v.float() for k, v in state.items()})
    return folder, llama.eval()
