"""Runs SDAR's own modeling code and generate function (modeling_sdar.py + configuration_sdar.py of
training/model/SDAR-4B-Chat/ and generate.py of github.com/JetAstra/SDAR, read from a folder outside
this repository) on a checkpoint folder, in an environment of its own (a venv with transformers
4.52.4, the version that code was written for): the parity oracle of test_block_models.

    python sdar_oracle.py CODE_DIR CHECKPOINT OUT.pt < request.json

Setup (what test_block_models expects by default; $SDAR_MODELING_DIR and $SDAR_ORACLE_PYTHON say otherwise):
    python3 -m venv /tmp/sdar-oracle-venv
    /tmp/sdar-oracle-venv/bin/pip install torch==2.13.0 transformers==4.52.4 einops safetensors
    mkdir -p /tmp/oracles/sdar   # then, from a clone of github.com/JetAstra/SDAR (commit c2041a8):
    git show HEAD:generate.py > /tmp/oracles/sdar/generate.py
    for f in modeling_sdar configuration_sdar; do
        git show HEAD:training/model/SDAR-4B-Chat/$f.py > /tmp/oracles/sdar/$f.py; done

request: {"logits": [[ids...], block_length] | null, "generate": [{prompt, gen_length, block_length,
threshold, stop_ids, mask_id}, ...]}. OUT.pt gets {"logits": float32 [L, V], "generate": [[ids...], ...]}
(generate: the whole sequence their function returns, prompt first).

Adaptations, none of them in the network's math or the decoding rule:
- modeling_sdar.py imports flash-attn (CUDA only) unconditionally for its RMSNorm and uses its
  `flash_attn_func` (non-causal) when the whole mask is ones (a block attending to the cache and
  itself). Stand-ins: `rms_norm_fn` is the RMSNorm the same file keeps commented out under it, and
  `flash_attn_func(q, k, v, causal=False, softmax_scale)` is SDPA over the same (batch, length,
  heads, dim) tensors with no mask, grouped-query as flash-attn does.
- its training loss (fused_linear_diffusion_cross_entropy.py, Triton) is never called at inference:
  a stand-in module gives the class name the import asks for.
- generate.py samples (`torch.multinomial`) even for "greedy"; its `sample_with_temperature_topk_topp`
  is replaced by argmax with the token's softmax probability (the README's greedy decoding), as the
  stock-network oracle of test_block_models does.
"""

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from oracle_checkpoint import float_network


def rms_norm_fn(x, weight, bias=None, eps=1e-6, **kwargs):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    assert not causal
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False,
                                         scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


def stand_ins() -> None:
    for probing in ("transformers.modeling_flash_attention_utils", "transformers.modeling_utils"):
        importlib.import_module(probing)  # they look for the real flash_attn (absent) when imported: before the stand-in

    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func = flash_attn_func
    for name in ("flash_attn", "flash_attn.ops", "flash_attn.ops.triton", "flash_attn.ops.triton.layer_norm"):
        sys.modules[name] = flash if name == "flash_attn" else types.ModuleType(name)
    sys.modules["flash_attn.ops.triton.layer_norm"].rms_norm_fn = rms_norm_fn
    loss = types.ModuleType("sdar_oracle_code.fused_linear_diffusion_cross_entropy")
    loss.FusedLinearDiffusionCrossEntropyLoss = type("FusedLinearDiffusionCrossEntropyLoss", (), {})
    sys.modules[loss.__name__] = loss


def greedy(logits, temperature=1.0, top_k=0, top_p=1.0):
    probs = torch.softmax(logits.float(), dim=-1)
    token_prob, token = probs.max(-1)
    return token, token_prob


def main(code_dir: str, checkpoint: str, out: str) -> None:
    package = types.ModuleType("sdar_oracle_code")
    package.__path__ = [code_dir]
    sys.modules["sdar_oracle_code"] = package
    stand_ins()
    configuration = importlib.import_module("sdar_oracle_code.configuration_sdar")
    modeling = importlib.import_module("sdar_oracle_code.modeling_sdar")
    spec = importlib.util.spec_from_file_location("sdar_oracle_code.generate", Path(code_dir) / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.sample_with_temperature_topk_topp = greedy

    network = float_network(configuration.SDARConfig, modeling.SDARForCausalLM, checkpoint,
                            dropped=("auto_map", "architectures", "attn_implementation"))

    request = json.load(sys.stdin)
    result = {}
    with torch.no_grad():
        if request.get("logits"):
            ids, block = request["logits"]
            blocks = -(-len(ids) // block)  # generate.py's mask: tril over blocks, repeated per token
            allowed = torch.tril(torch.ones(blocks, blocks)).repeat_interleave(block, 0).repeat_interleave(block, 1)
            mask = allowed[:len(ids), :len(ids)][None].bool()
            result["logits"] = network(torch.tensor([ids]), attention_mask=mask,
                                       position_ids=torch.arange(len(ids))[None]).logits[0].float()
        result["generate"] = [
            generate.block_diffusion_generate(
                network, {"input_ids": torch.tensor([case["prompt"]])}, mask_id=case["mask_id"],
                gen_length=case["gen_length"], block_length=case["block_length"],
                denoising_steps=case["block_length"], remasking_strategy="low_confidence_dynamic",
                confidence_threshold=case["threshold"], stopping_criteria_idx=case["stop_ids"])[0].tolist()
            for case in request.get("generate", [])]
    torch.save(result, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
