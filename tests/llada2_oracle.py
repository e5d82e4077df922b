"""Runs LLaDA 2.x's own modeling code (modeling_llada2_moe.py + configuration_llada2_moe.py, read from
a folder outside this repository) on a checkpoint folder, in an environment of its own (a venv with
the transformers 4.x that code was written for): the parity oracle of test_block_models.

    python llada2_oracle.py MODELING_DIR CHECKPOINT OUT.pt < request.json

request: {"logits": [[ids...], block_length] | null, "generate": [{prompt, gen_length, threshold,
block_length, eos_id, mask_id}, ...]}. OUT.pt gets {"logits": float32 [L, V], "generate": [ids...]}.
Two adaptations. The float mask their generate builds in bfloat16 is given to SDPA in the
network's dtype (float32 here; SDPA wants the mask's dtype to match), its values unchanged (0 / -inf).
This revision's `_sample_with_temperature_topk_topp` samples even at temperature 0; it is replaced by
the greedy branch later revisions of the same file have (argmax, and its softmax probability), as
the SDAR test does for its generate.py.
"""

import importlib
import json
import sys
import types

import torch

from oracle_checkpoint import float_network


def main(modeling_dir: str, checkpoint: str, out: str) -> None:
    package = types.ModuleType("llada2_oracle_code")
    package.__path__ = [modeling_dir]
    sys.modules["llada2_oracle_code"] = package
    configuration = importlib.import_module("llada2_oracle_code.configuration_llada2_moe")
    modeling = importlib.import_module("llada2_oracle_code.modeling_llada2_moe")
    network = float_network(configuration.LLaDA2MoeConfig, modeling.LLaDA2MoeModelLM, checkpoint)
    forward = network.forward

    def float_mask_forward(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        return forward(*args, attention_mask=attention_mask, **kwargs)

    network.forward = float_mask_forward

    def greedy(logits, temperature=0.0, top_k=None, top_p=None):
        probs = torch.softmax(logits.float(), dim=-1)
        token = logits.argmax(dim=-1)
        return token, probs.gather(-1, token[..., None])[..., 0]

    network._sample_with_temperature_topk_topp = greedy
    request = json.load(sys.stdin)
    result = {}
    with torch.no_grad():
        if request.get("logits"):
            ids, block = request["logits"]
            blocks = -(-len(ids) // block)
            allowed = torch.tril(torch.ones(blocks, blocks)).repeat_interleave(block, 0).repeat_interleave(block, 1)
            mask = torch.where(allowed[:len(ids), :len(ids)].bool(), 0.0, float("-inf"))[None, None]
            result["logits"] = network(torch.tensor([ids]), attention_mask=mask).logits[0].float()
        result["generate"] = [
            network.generate(torch.tensor([case["prompt"]]), temperature=0.0, block_length=case["block_length"],
                             steps=case["block_length"], gen_length=case["gen_length"], threshold=case["threshold"],
                             eos_id=case["eos_id"], mask_id=case["mask_id"])[0].tolist()
            for case in request.get("generate", [])]
    torch.save(result, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
