"""Runs Fast-dLLM v2's own modeling code (the checkpoint's modeling.py: its network and its
`generate`, read from a file outside this repository) on a checkpoint folder, in an environment of
its own (a venv with transformers 4.53.1, the version NVlabs/Fast-dLLM v2/requirements.txt pins):
the parity oracle of test_block_models.

    python fast_dllm_oracle.py MODELING_PY CHECKPOINT OUT.pt < request.json

Setup (what test_block_models expects by default; $FAST_DLLM_MODELING_PY and $FAST_DLLM_ORACLE_PYTHON
say otherwise):
    python3 -m venv /tmp/fast-dllm-oracle-venv
    /tmp/fast-dllm-oracle-venv/bin/pip install torch==2.13.0 transformers==4.53.1 einops safetensors
    # the checkpoint's modeling.py (Efficient-Large-Model/Fast_dLLM_v2_7B), as mirrored in
    # github.com/Satgoy152/DualDiffusion at commit d3a3470:
    git show d3a3470:FastDLLM_inferencing/Fast_dLLM_v2_7B/modeling.py > /tmp/oracles/fastdllm_modeling_first.py

request: {"logits": [[ids...], block_size] | null, "generate": [{prompt, max_new_tokens, threshold,
small_block_size, block_size, stop_token, mask_id}, ...]}. OUT.pt gets {"logits": float32 [L, V] (the
network's rows, unshifted), "generate": [[ids...], ...]} (what their generate returns, prompt first).

One adaptation: modeling.py imports `Fast_dLLM_QwenConfig` from the checkpoint's configuration.py,
which no mirror here holds; its stand-in is transformers' Qwen2Config under that name (the
config.json's other fields, bd_size among them, pass through as attributes). Their generate is
greedy at temperature 0 (argmax, with the softmax probability as confidence): nothing replaced.
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from transformers import Qwen2Config

from oracle_checkpoint import float_network


def main(modeling_py: str, checkpoint: str, out: str) -> None:
    package = types.ModuleType("fast_dllm_oracle_code")
    package.__path__ = [str(Path(modeling_py).parent)]
    sys.modules[package.__name__] = package
    configuration = types.ModuleType("fast_dllm_oracle_code.configuration")
    configuration.Fast_dLLM_QwenConfig = type("Fast_dLLM_QwenConfig", (Qwen2Config,), {"model_type": "Fast_dLLM_Qwen"})
    sys.modules[configuration.__name__] = configuration
    spec = importlib.util.spec_from_file_location("fast_dllm_oracle_code.modeling", modeling_py)
    modeling = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = modeling
    spec.loader.exec_module(modeling)

    network = float_network(configuration.Fast_dLLM_QwenConfig, modeling.Fast_dLLM_QwenForCausalLM, checkpoint)

    request = json.load(sys.stdin)
    result = {}
    with torch.no_grad():
        if request.get("logits"):
            ids, block = request["logits"]
            result["logits"] = network(input_ids=torch.tensor([ids]), block_size=block).logits[0].float()
        result["generate"] = [
            network.generate(torch.tensor([case["prompt"]]), case["max_new_tokens"], mask_id=case["mask_id"],
                             threshold=case["threshold"], small_block_size=case["small_block_size"],
                             block_size=case["block_size"], stop_token=case["stop_token"], temperature=0)[0][0].tolist()
            for case in request.get("generate", [])]
    torch.save(result, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
