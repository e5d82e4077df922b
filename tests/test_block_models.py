"""Block diffusion (SDAR, Fast-dLLM v2) on random tiny checkpoints of the real layouts.

The oracles. The network: transformers' stock Qwen3 / Qwen2 with the same weights under the
authors' block-causal mask (both families' modeling files are Qwen3 / Qwen2.5 at inference apart
from the mask); also the authors' own networks with their generate functions, each in a venv of
its transformers version: SDAR's modeling_sdar.py + generate.py (tests/sdar_oracle.py, `sdar_theirs`)
and Fast-dLLM v2's modeling.py (tests/fast_dllm_oracle.py, `fast_theirs`). The decoding: the
authors' own generate functions, read from files outside this repository and run on the stock
networks with the cache semantics of the authors' attention, greedy:
- SDAR: `block_diffusion_generate` of JetAstra/SDAR generate.py, at $SDAR_GENERATE_PY
  (default /tmp/oracles/sdar/generate.py);
- Fast-dLLM v2: `generate` of the checkpoint's modeling.py (Efficient-Large-Model/Fast_dLLM_v2_7B,
  mirrored in github.com/Satgoy152/DualDiffusion at commit d3a3470, FastDLLM_inferencing/
  Fast_dLLM_v2_7B/modeling.py), at $FAST_DLLM_MODELING_PY (default
  /tmp/oracles/fastdllm_modeling_first.py).
Where a file is absent those tests skip, and the same rule recomputed in full every step (no
cache), written here from the authors' math, stands in (`recompute`, `fast_recompute`).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from types import SimpleNamespace

from diffu_lsp.models import load_model
from diffu_lsp.models.block import BlockDiffusionModel
from tiny_checkpoints import write_sdar

GENERATE_PY = Path(os.environ.get("SDAR_GENERATE_PY", "/tmp/oracles/sdar/generate.py"))
B = 4


@pytest.fixture(scope="module")
def sdar_pair(tmp_path_factory):
    folder, reference = write_sdar(tmp_path_factory.mktemp("sdar"))
    return load_model(folder, device="cpu", dtype="float32"), reference, folder


def sdar_mask(length: int) -> torch.Tensor:
    """The authors' mask (generate.py): tril over blocks, repeated per token; additive [1, 1, L, L]."""
    blocks = -(-length // B)
    allowed = torch.tril(torch.ones(blocks, blocks)).repeat_interleave(B, 0).repeat_interleave(B, 1)[:length, :length]
    return torch.zeros(length, length).masked_fill(allowed == 0, torch.finfo(torch.float32).min)[None, None]


def cache_keyword(qwen3) -> str:
    return "cache" if "cache" in inspect.signature(qwen3.model.forward).parameters else "past_key_values"


class StoreKV:
    """SDAR's attention with a cache (modeling_sdar.py, eval path): store_kv=True appends this
    forward's keys/values; otherwise they are attended to with the stored ones and dropped."""

    def __init__(self):
        self.keys, self.values, self.store = [], [], False

    def update(self, keys, values, layer, *args, **kwargs):
        if layer < len(self.keys):
            keys, values = torch.cat([self.keys[layer], keys], 2), torch.cat([self.values[layer], values], 2)
        if self.store:
            if layer < len(self.keys):
                self.keys[layer], self.values[layer] = keys, values
            else:
                self.keys.append(keys)
                self.values.append(values)
        return keys, values

    def get_seq_length(self, layer=0):
        return self.keys[0].shape[2] if self.keys else 0


class SdarOnQwen3:
    """What generate.py calls `model`: (ids, bool mask [1, q, k], position ids, cache, store_kv)."""

    def __init__(self, qwen3):
        self.qwen3, self.device, self.caches = qwen3, torch.device("cpu"), {}

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, store_kv):
        cache = self.caches.setdefault(id(past_key_values), StoreKV())
        cache.store = store_kv
        mask = torch.zeros(attention_mask.shape).masked_fill(~attention_mask.bool(), torch.finfo(torch.float32).min)
        return self.qwen3(input_ids=input_ids, attention_mask=mask[:, None], position_ids=position_ids,
                          use_cache=True, **{cache_keyword(self.qwen3): cache})


def greedy(logits, temperature=1.0, top_k=0, top_p=1.0):
    probs = F.softmax(logits.float(), dim=-1)
    token_prob, token = probs.max(-1)
    return token, token_prob


def authors_generate(qwen3, prompt: list[int], gen_length: int, threshold: float, stop_ids):
    spec = importlib.util.spec_from_file_location("sdar_generate_oracle", GENERATE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.sample_with_temperature_topk_topp = greedy  # the README's "greedy decoding"
    with torch.no_grad():
        out = module.block_diffusion_generate(
            SdarOnQwen3(qwen3), {"input_ids": torch.tensor([prompt])}, mask_id=151669, gen_length=gen_length,
            block_length=B, denoising_steps=B, remasking_strategy="low_confidence_dynamic",
            confidence_threshold=threshold, stopping_criteria_idx=list(stop_ids))
    return out[0, len(prompt):len(prompt) + gen_length].tolist()


def recompute(qwen3, prompt: list[int], gen_length: int, threshold: float, stop_ids):
    """The same rule without a cache: every step a full forward under the block-causal mask."""
    length = -(-(len(prompt) + gen_length) // B) * B
    x = torch.full((length,), 151669)
    x[:len(prompt)] = torch.tensor(prompt)
    with torch.no_grad():
        for block in range(len(prompt) // B, length // B):
            low, high = block * B, block * B + B
            while (x[low:high] == 151669).any():
                logits = qwen3(input_ids=x[None, :high], attention_mask=sdar_mask(high)).logits[0, low:high]
                token, p = greedy(logits)
                p = torch.where(x[low:high] == 151669, p, -torch.inf)
                reveal = p > threshold if (p > threshold).any() else F.one_hot(p.argmax(), B).bool()
                x[low:high][reveal] = token[reveal]
            if torch.isin(x[len(prompt):high], torch.tensor(stop_ids)).any():
                break
    return x[len(prompt):len(prompt) + gen_length].tolist()


ORACLES = {"authors": authors_generate, "recompute": recompute}


def run_oracle(script: str, code: Path, python: Path, folder: Path, tmp_path: Path, request: dict) -> dict:
    """tests/`script` run by the oracle venv's `python` with the authors' code at `code` on the
    checkpoint `folder` (the request on its stdin); what it saved."""
    out = tmp_path / "oracle.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(python), str(Path(__file__).parent / script), str(code), str(folder), str(out)],
                         input=json.dumps(request), capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


# SDAR's own network and generate together (tests/sdar_oracle.py): modeling_sdar.py and
# configuration_sdar.py of JetAstra/SDAR at commit c2041a8 (training/model/SDAR-4B-Chat/; the
# SDAR-8B-Chat copy is the same file) and generate.py of the same commit, in $SDAR_MODELING_DIR
# (default /tmp/oracles/sdar), run by $SDAR_ORACLE_PYTHON (default /tmp/sdar-oracle-venv/bin/python);
# skipped when either is absent (CI). To set it up:
#     python3 -m venv /tmp/sdar-oracle-venv
#     /tmp/sdar-oracle-venv/bin/pip install torch==2.13.0 transformers==4.52.4 einops safetensors
#     git -C <JetAstra/SDAR clone> show HEAD:generate.py > /tmp/oracles/sdar/generate.py, and the same
#     for training/model/SDAR-4B-Chat/{modeling_sdar,configuration_sdar}.py
SDAR_CODE = Path(os.environ.get("SDAR_MODELING_DIR", "/tmp/oracles/sdar"))
SDAR_PYTHON = Path(os.environ.get("SDAR_ORACLE_PYTHON", "/tmp/sdar-oracle-venv/bin/python"))
SDAR_LOGIT_IDS = list(range(11, 25))  # 14 tokens: blocks 0..3, the last one partial
# (block size, threshold, prefix, hole): SDAR-*-Chat's blocks of 4 with 10-token holes after FIM prompts of 12, 8,
# 7, 6 and 9 tokens (the first block decoded holds 0 to 3 of the prompt's tokens), and blocks of 32 (a checkpoint
# whose config says block_size 32, as the -b32 variants) across 2 blocks
SDAR_PREFIXES = ("def f(x):\n    return ", "x = 1\n", "y = x\n", "import os\n", "print(1)\n")
SDAR_CASES = ([(B, threshold, prefix, 10) for threshold in (0.9, 1.07e-5) for prefix in SDAR_PREFIXES]
              + [(32, threshold, "def f(x):\n    return ", 40) for threshold in (0.9, 1.07e-5)])


@pytest.fixture(scope="module")
def sdar_theirs(sdar_pair, tmp_path_factory):
    """Their network's logits for SDAR_LOGIT_IDS under generate.py's mask; their generate (greedy) for
    each SDAR_CASES case (their block_length the case's block size; their network reads no block
    size) and for a 12-token hole in blocks of 4 whose 6th free token is made the stop token; one run."""
    if not ((SDAR_CODE / "modeling_sdar.py").is_file() and (SDAR_CODE / "generate.py").is_file()
            and SDAR_PYTHON.is_file()):
        pytest.skip(f"SDAR's code ({SDAR_CODE}) or its environment ({SDAR_PYTHON}) is absent")
    model = sdar_pair[0]

    def case(block: int, prefix: str, n: int, threshold: float, stop_ids) -> dict:
        return dict(prompt=model.prompt_ids(model.encode(prefix), []), gen_length=n, block_length=block,
                    threshold=threshold, stop_ids=list(stop_ids), mask_id=model.mask_token_id)

    stop_prefix = model.encode("x = 1\n")
    stop = model.fill(stop_prefix + [model.mask_token_id] * 12).canvas[len(stop_prefix) + 5].item()
    cases = [case(block, prefix, n, threshold, model.eos_token_ids) for block, threshold, prefix, n in SDAR_CASES]
    out = run_oracle("sdar_oracle.py", SDAR_CODE, SDAR_PYTHON, sdar_pair[2], tmp_path_factory.mktemp("sdar-oracle"),
                     {"logits": [SDAR_LOGIT_IDS, B], "generate": cases + [case(B, "x = 1\n", 12, 0.9, (stop,))]})
    return out["logits"], dict(zip(SDAR_CASES, out["generate"])), (stop, out["generate"][-1])


@pytest.fixture(scope="module")
def sdar_b32(sdar_pair, tmp_path_factory):
    """The same checkpoint with `block_size: 32` in its config.json."""
    import shutil

    folder = tmp_path_factory.mktemp("sdar-b32") / "SDAR-tiny-b32"
    shutil.copytree(sdar_pair[2], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_size": 32}))
    return load_model(folder, device="cpu", dtype="float32")


def test_sdar_layout_loads_as_a_block_model_without_its_code(sdar_pair):
    model, reference, folder = sdar_pair
    assert isinstance(model, BlockDiffusionModel) and model.family == "sdar" and not model.shift_logits
    assert model.mask_token_id == 151669 == model.tokenizer.convert_tokens_to_ids("<|MASK|>")
    assert model.eos_token_ids == (151643, 151645)  # <|endoftext|>, then generation_config's <|im_end|>
    assert model.fim_ids == (151659, 151661, 151660) and model.block_size == 4
    assert model.default_sampling == {"alg": "threshold", "threshold": 0.9}
    for key, tensor in reference.state_dict().items():
        assert torch.equal(model.network.state_dict()[key], tensor), key
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] and config["attn_implementation"] == "flex_attention"  # present, not used


def test_sdar_logits_equal_qwen3_under_the_block_causal_mask(sdar_pair):
    model, reference, _ = sdar_pair
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=sdar_mask(10)).logits
    ours = model.logits(ids)
    assert (ours - expected).abs().max() < 1e-5
    later = ids.clone()
    later[0, 9] = 99  # block 2: blocks 0 and 1 do not see it, position 8 (its own block) does
    changed = model.logits(later)
    assert torch.equal(changed[0, :8], ours[0, :8])
    assert (changed[0, 8] - ours[0, 8]).abs().max() > 1e-4
    positions = torch.tensor([1, 5, 9])
    assert (model.position_logits(ids[0], positions) - expected[0, positions]).abs().max() < 1e-5


@pytest.mark.parametrize("oracle", ["authors", "recompute"])
@pytest.mark.parametrize("threshold", [0.9, 1.07e-5])  # random weights: p ~ 1e-5, so the second reveals several at once
@pytest.mark.parametrize("prefix", ["def f(x):\n    return ", "x = 1\n"])  # FIM prompts of 12 and 8 tokens
def test_sdar_greedy_tokens_equal_the_reference(sdar_pair, oracle, threshold, prefix):
    if oracle == "authors" and not GENERATE_PY.is_file():
        pytest.skip(f"the authors' generate.py is not at {GENERATE_PY} (set SDAR_GENERATE_PY)")
    model, reference, _ = sdar_pair
    prefix_ids, hole = model.encode(prefix), 10
    prompt = model.prompt_ids(prefix_ids, [])
    result = model.fill(prefix_ids + [model.mask_token_id] * hole, threshold=threshold)
    ours = result.canvas[len(prefix_ids):].tolist()
    assert ours == ORACLES[oracle](reference, prompt, hole, threshold, model.eos_token_ids)
    if threshold < 0.5:
        assert result.forwards < hole  # some forward revealed more than one token


def test_sdar_logits_equal_the_authors_modeling_code(sdar_pair, sdar_theirs):
    ours = sdar_pair[0].logits(torch.tensor([SDAR_LOGIT_IDS]))[0]
    assert ours.shape == sdar_theirs[0].shape and (ours - sdar_theirs[0]).abs().max() < 1e-5


@pytest.mark.parametrize("block, threshold, prefix, hole", SDAR_CASES)
def test_sdar_greedy_tokens_equal_the_authors_modeling_and_generate(sdar_pair, sdar_b32, sdar_theirs, block, threshold,
                                                                    prefix, hole):
    model = sdar_pair[0] if block == B else sdar_b32
    assert model.block_size == block  # read from config.json
    prefix_ids = model.encode(prefix)
    P = len(model.prompt_ids(prefix_ids, []))
    ours = model.fill(prefix_ids + [model.mask_token_id] * hole, threshold=threshold).canvas[len(prefix_ids):].tolist()
    theirs = sdar_theirs[1][(block, threshold, prefix, hole)]
    assert len(theirs) == -(-(P + hole) // block) * block  # whole blocks, nothing stopped early (no stop token drawn)
    assert P // block < (P + hole - 1) // block and ours == theirs[P:P + hole]  # the hole crosses a block boundary


def test_sdar_stop_rule_equals_the_authors_generate(sdar_pair, sdar_theirs):
    model = sdar_pair[0]
    stop, theirs = sdar_theirs[2]
    prefix_ids = model.encode("x = 1\n")
    ours = replace(model, eos_token_ids=(stop,)).fill(prefix_ids + [model.mask_token_id] * 12).canvas[len(prefix_ids):]
    P = len(model.prompt_ids(prefix_ids, []))
    end_of_block = (P + ours.tolist().index(stop)) // B * B + B - P
    assert end_of_block < 12  # their loop broke after that block: the rest of their sequence is still masked
    assert theirs[P:P + end_of_block] == ours[:end_of_block].tolist()
    assert theirs[P + end_of_block:P + 12] == [model.mask_token_id] * (12 - end_of_block)


# SDAR-30B-A3B (`sdar_moe`): loaded onto transformers' Qwen3-MoE. No copy of its modeling file could be
# fetched; the reference is stock Qwen3 attention with each MLP replaced by the sparse block as
# JetEngine's SDAR-MoE computes it (softmax router, top k, weights renormalised, SiLU-gated experts),
# written here from the checkpoint's per-expert tensors; the decoding is the dense SDAR's.
class EngineMoE(torch.nn.Module):
    def __init__(self, state: dict, at: str, top_k: int):
        super().__init__()
        self.router, self.top_k = state[at + "mlp.gate.weight"], top_k
        self.experts = [tuple(state[f"{at}mlp.experts.{j}.{name}_proj.weight"] for name in ("gate", "up", "down"))
                        for j in range(self.router.shape[0])]

    def forward(self, x):
        p, chosen = torch.softmax(x @ self.router.T, -1, dtype=torch.float).topk(self.top_k, -1)
        p = p / p.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for k in range(self.top_k):
            for j, (gate, up, down) in enumerate(self.experts):
                rows = chosen[..., k] == j
                out[rows] += p[..., k][rows, None] * ((F.silu(x[rows] @ gate.T) * (x[rows] @ up.T)) @ down.T)
        return out


@pytest.fixture(scope="module")
def sdar_moe(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tiny_checkpoints import write_sdar_moe

    folder, state = write_sdar_moe(tmp_path_factory.mktemp("sdar-moe") / "SDAR-30B-A3B-tiny")
    reference = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=1000000, rms_norm_eps=1e-6,
        tie_word_embeddings=False))
    missing, unexpected = reference.load_state_dict({k: v for k, v in state.items() if ".mlp." not in k}, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing)
    for i, layer in enumerate(reference.model.layers):
        layer.mlp = EngineMoE(state, f"model.layers.{i}.", top_k=2)
    return load_model(folder, device="cpu", dtype="float32"), reference.eval(), folder


def test_sdar_moe_loads_onto_qwen3_moe_and_its_logits_are_the_engine_s(sdar_moe):
    from transformers import Qwen3MoeForCausalLM

    model, reference, _ = sdar_moe
    assert isinstance(model, BlockDiffusionModel) and model.family == "sdar" and not model.shift_logits
    assert isinstance(model.network, Qwen3MoeForCausalLM) and model.network.config.num_experts == 8
    assert (model.block_size, model.mask_token_id, model.eos_token_ids) == (B, 151669, (151643, 151645))
    ids = torch.tensor([SDAR_LOGIT_IDS])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=sdar_mask(len(SDAR_LOGIT_IDS))).logits
    assert (model.logits(ids) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("oracle", ["authors", "recompute"])
@pytest.mark.parametrize("threshold", [0.9, 1.09e-5])  # random weights: p ~ 1.1e-5, several at once
def test_sdar_moe_greedy_tokens_equal_the_reference(sdar_moe, oracle, threshold):
    if oracle == "authors" and not GENERATE_PY.is_file():
        pytest.skip(f"the authors' generate.py is not at {GENERATE_PY} (set SDAR_GENERATE_PY)")
    model, reference, _ = sdar_moe
    prefix_ids, hole = model.encode("y = x\n"), 10  # a FIM prompt of 7 tokens: the first block holds 3 of them
    result = model.fill(prefix_ids + [model.mask_token_id] * hole, threshold=threshold)
    ours = result.canvas[len(prefix_ids):].tolist()
    assert ours == ORACLES[oracle](reference, model.prompt_ids(prefix_ids, []), hole, threshold, model.eos_token_ids)
    assert result.forwards < hole if threshold < 0.5 else result.forwards == hole


@pytest.mark.asyncio
async def test_the_language_server_completes_fills_and_refines_with_sdar_moe(sdar_moe, tmp_path):
    assert await inline_through_the_server(sdar_moe[2], tmp_path) is not None


def test_a_mixture_of_experts_config_describing_more_experts_than_its_weights_hold_is_refused(sdar_moe, tmp_path):
    import shutil

    from diffu_lsp.errors import ModelLoadFailed
    from diffu_lsp.models.loading import check_checkpoint

    assert check_checkpoint(str(sdar_moe[2])).family == "sdar"
    folder = tmp_path / "many-experts"
    shutil.copytree(sdar_moe[2], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_experts": 65536, "moe_intermediate_size": 4096}))
    with pytest.raises(ModelLoadFailed, match="describes about"):  # checked before anything is built
        check_checkpoint(str(folder))


def test_sdar_stops_after_the_block_with_a_stop_token(sdar_pair):
    model, reference, _ = sdar_pair
    prefix_ids = model.encode("x = 1\n")
    canvas = prefix_ids + [model.mask_token_id] * 12
    free = model.fill(canvas).canvas[len(prefix_ids):].tolist()
    stop = free[5]  # the 6th token (2nd block of the middle) counts as a stop token from now on
    stopping = replace(model, eos_token_ids=(stop,))
    ours = stopping.fill(canvas).canvas[len(prefix_ids):].tolist()
    P, first = len(model.prompt_ids(prefix_ids, [])), ours.index(stop)
    end_of_block = (P + first) // B * B + B - P
    assert end_of_block < 12 and ours[end_of_block:] == [stop] * (12 - end_of_block)  # the rest: the stop token
    expected = recompute(reference, model.prompt_ids(prefix_ids, []), 12, 0.9, (stop,))
    assert ours[:end_of_block] == expected[:end_of_block]
    if GENERATE_PY.is_file():
        authors = authors_generate(reference, model.prompt_ids(prefix_ids, []), 12, 0.9, (stop,))
        assert authors[:end_of_block] == ours[:end_of_block] and authors[end_of_block:] == [151669] * (12 - end_of_block)


def test_block_cache_gives_the_tokens_of_recomputation_and_stores_each_block_once(sdar_pair):
    model, _, _ = sdar_pair
    prefix_ids, hole = model.encode("def f(x):\n    return "), 14
    canvas = prefix_ids + [model.mask_token_id] * hole
    cached = model.fill(canvas, threshold=1.07e-5)
    recomputed = replace(model, block_cache=False).fill(canvas, threshold=1.07e-5)
    assert cached.canvas.tolist() == recomputed.canvas.tolist()
    assert cached.forwards == recomputed.forwards
    P = len(model.prompt_ids(prefix_ids, []))
    blocks = -(-(P + hole) // B) - P // B
    # the prompt's whole blocks once, B rows per denoising forward, each finished block but the last once
    assert cached.rows == P // B * B + cached.forwards * B + (blocks - 1) * B
    assert recomputed.rows > 2 * cached.rows


def test_the_middle_is_decoded_after_the_suffix(sdar_pair):
    model, _, _ = sdar_pair
    assert model.prompt_ids([1, 2], [3]) == [151659, 1, 2, 151661, 3, 151660]
    prefix, masks = model.encode("def f(x):\n    return "), [model.mask_token_id] * 4

    def first_logits(suffix):
        prompt = model.prompt_ids(prefix, suffix)
        return model.position_logits(torch.tensor(prompt + masks), torch.tensor([len(prompt)]))

    assert (first_logits(model.encode("\n")) - first_logits(model.encode("\nprint(1)\n"))).abs().max() > 1e-4


def test_several_holes_are_one_job_each_left_to_right(sdar_pair):
    model, _, _ = sdar_pair
    a, b, c = model.encode("def f(x):\n    y = "), model.encode("\n    return "), model.encode("\n")
    m = model.mask_token_id
    both = model.fill(a + [m] * 5 + b + [m] * 6 + c).canvas.tolist()
    assert m not in both
    first_only = model.fill(a + [m] * 5 + b).canvas.tolist()  # hole 1's suffix runs to hole 2
    assert both[:len(a) + 5] == first_only[:len(a) + 5]
    second = model.fill(both[:len(a) + 5] + b + [m] * 6 + c).canvas.tolist()  # hole 2 after hole 1's text
    assert both == second


def test_token_probabilities_score_each_token_masked_in_its_block(sdar_pair):
    model, _, _ = sdar_pair
    prefix, ids, suffix = model.encode("def f(x):\n"), model.encode("    return x + 1"), model.encode("\n")
    scores = model.token_probabilities(prefix, ids, suffix)
    prompt = model.prompt_ids(prefix, suffix)
    P = len(prompt)
    for i in range(len(ids)):  # recomputed directly: its block's same-parity tokens masked, later blocks absent
        end = (P + i) // B * B + B
        seq = torch.tensor(prompt + ids + [model.mask_token_id] * B)[:end].clone()
        for j in range((P + i) // B * B, end):
            if j >= P and (j - P) % 2 == i % 2 and j - P < len(ids):
                seq[j] = model.mask_token_id
        probs = torch.softmax(model.logits(seq[None])[0, P + i], -1)
        assert abs(float(probs[ids[i]]) - scores[i]) < 1e-5


def test_suggest_fill_holes_and_refine_run_on_sdar(sdar_pair):
    from diffu_lsp.features import answer
    from diffu_lsp.job import Request
    from diffu_lsp.settings import Settings

    model = sdar_pair[0]
    text = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return \n"
    cursor = text.rindex("return ") + len("return ")
    settings = Settings(single_line_tokens=8, multi_line_tokens=12, block_tokens=12)
    suggestion = answer(model, Request("suggest", text, cursor, cursor, settings))
    assert suggestion.text and suggestion.forwards >= 1 and suggestion.hole_tokens == 8
    holed = "def f(x):\n    ...\n    # TODO: fill\n"
    replacements = answer(model, Request("fill_holes", holed, 0, len(holed), settings))
    assert len(replacements) == 2 and all(r.text for r in replacements)
    start, end = text.index("a + b"), text.index("a + b") + len("a + b")
    assert answer(model, Request("refine", text, start, end, settings)).strip()
    low = Settings(refine_mode="low_confidence", refine_confidence=0.5)  # random weights doubt every token
    assert answer(model, Request("refine", text, start, end, low)).strip()


def test_diffu_lsp_complete_runs_sdar(sdar_pair, tmp_path):
    source = tmp_path / "a.py"
    source.write_text("def add(a, b):\n    return \n")
    out = subprocess.run([sys.executable, "-m", "diffu_lsp", "complete", f"{source}:2:12", "--model", str(sdar_pair[2]),
                          "--device", "cpu", "--max-tokens", "8", "--json"],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["model"] == str(sdar_pair[2]) and answer["hole_tokens"] == 8 and answer["forwards"] >= 1


async def inline_through_the_server(model_dir, tmp_path) -> str | None:
    """A real server (in-process engine) with the checkpoint at `model_dir` answers an inline
    completion after `return `, from one completed job (its text is returned); its fill holes and
    refine commands each apply one edit, over the `...` and over the selection."""
    from diffu_lsp import server as server_mod
    from test_server import (execute, inline, inline_text, jobs_of, open_doc, position_of, rng, start_server, stats,
                             stop_server, wait_status)

    client = await start_server(tmp_path, "--model", str(model_dir), "--no-daemon", encodings=["utf-16"],
                                init_options={"singleLineTokens": 8, "multiLineTokens": 8, "blockTokens": 8})
    try:
        await wait_status(client, "ready")
        text = "def add(a, b):\n    return \n"
        uri = open_doc(client, text)
        result = await inline(client, uri, position_of(text, text.index("\n    return ") + len("\n    return ")))
        (job,) = jobs_of(await stats(client), uri)
        assert job["outcome"] == "completed" and job["forwards"] >= 1
        holed = "def f(x):\n    ...\n\n\ndef g(y):\n    return y * 2\n"
        holed_uri = open_doc(client, holed)
        for command, selection in ((server_mod.CMD_FILL_HOLES, rng(0, 0, 1, 7)), (server_mod.CMD_REFINE, rng(5, 4, 5, 16))):
            client.edits.clear()
            answer = await execute(client, command, textDocument={"uri": holed_uri}, range={
                "start": {"line": selection.start.line, "character": selection.start.character},
                "end": {"line": selection.end.line, "character": selection.end.character}})
            assert answer == {"applied": True}, command
            (edit,) = client.edits[0].edit.document_changes[0].edits
            assert edit.range == (rng(1, 4, 1, 7) if command == server_mod.CMD_FILL_HOLES else selection)
            assert edit.new_text, command
        return inline_text(result)
    finally:
        await stop_server(client)


@pytest.mark.asyncio
async def test_the_language_server_completes_inline_with_sdar(sdar_pair, tmp_path):
    assert (await inline_through_the_server(sdar_pair[2], tmp_path)).strip()


# SDAR-4B-Chat's index: 8,822,848,512 bytes of bf16; SDAR-30B-A3B: Qwen3-30B-A3B's 30.5 B, 3.3 B active
@pytest.mark.parametrize("shape, billions, active", [("sdar-4b", 4.411, 4.411), ("sdar-8b", 8.191, 8.191),
                                                     ("sdar-30b-a3b", 30.532, 3.353)])
def test_sdar_shapes_are_the_real_checkpoints(shape, billions, active):
    from diffu_lsp.bench import shapes
    from diffu_lsp.models.block import network_for

    config, mask_id, _ = shapes.SHAPES[shape]
    family, net_config = shapes.network_config(config)
    assert family == "sdar" and mask_id == 151669 and config["block_size"] == 4
    with torch.device("meta"):
        network = network_for(family, config)[0](net_config)
    count = sum(p.numel() for p in network.parameters())
    experts = sum(p.numel() for name, p in network.named_parameters() if ".experts." in name)
    per_token = count - experts + experts * getattr(net_config, "num_experts_per_tok", 0) // max(
        getattr(net_config, "num_experts", 0) or 1, 1)
    assert abs(count / 1e9 - billions) < 0.001 and abs(per_token / 1e9 - active) < 0.001


def test_bench_shapes_measures_the_block_cache_against_recomputation():
    from diffu_lsp.bench import common, shapes

    options = common.Options(quick=True, device="cpu", dtype="float32",
                             extra={"shapes": ("tiny-sdar",), "contexts": (128,), "per_forward": (1, 4, 8), "layers": 1})
    summary = shapes.run(options)["summary"]["shapes"]["tiny-sdar"]
    jobs = {(j["cache"], j["per_forward"]): j for j in summary["jobs"]}
    assert set(jobs) == {(cache, k) for cache in ("none", "block") for k in (1, 4)}  # at most a block per forward
    for k in (1, 4):
        assert jobs[("none", k)]["forwards"] == jobs[("block", k)]["forwards"] <= shapes.BLOCK // k + 4
    model = shapes.build("tiny-sdar", "cpu", "float32", layers=1)
    assert model.network.config.num_hidden_layers == 1 and model.block_size == 4


def test_progress_sees_the_caller_s_canvas_and_can_stop_or_cancel_the_job(sdar_pair):
    from types import SimpleNamespace

    model = sdar_pair[0]
    prefix_ids, m = model.encode("def f(x):\n    return "), model.mask_token_id
    canvas = prefix_ids + [m] * 10
    seen = []
    result = model.fill(canvas, on_step=lambda draft: seen.append((len(draft.canvas), draft.step, draft.masked)))
    assert [s[0] for s in seen] == [len(canvas)] * len(seen)  # the caller's layout, not the FIM prompt
    assert [s[1] for s in seen] == list(range(1, result.forwards + 1))  # one report per forward (one token each)
    masked = [s[2] for s in seen]
    assert masked[0] == 9 and masked[-1] == 0 and masked == sorted(masked, reverse=True)
    assert masked.count(0) == 1  # no forward once the hole is done (the last block's tail is past the hole)
    stopped = model.fill(canvas, on_step=lambda draft: draft.step == 2)
    assert stopped.stopped_early and stopped.forwards == 2
    assert (stopped.canvas == m).sum() > 0  # later blocks stay masked
    cancelled = model.fill(canvas, cancel=SimpleNamespace(cancelled=True))
    assert cancelled.cancelled and cancelled.forwards == 0


def test_draft_tokens_are_rechecked_block_by_block(sdar_pair):
    model = sdar_pair[0]
    prefix_ids, m = model.encode("x = 1\n"), model.mask_token_id
    P = len(model.prompt_ids(prefix_ids, []))
    n = 3 * B - P % B  # the hole ends with a block: no positions past it
    fresh = model.fill(prefix_ids + [m] * n)
    hole = fresh.canvas[len(prefix_ids):].tolist()
    provisional = [False] * len(prefix_ids) + [True] * n
    kept = model.fill(prefix_ids + hole, provisional=provisional, remask=0.0)  # every draft supported
    assert kept.canvas.tolist() == fresh.canvas.tolist() and kept.drafted == n and kept.remasked == 0
    assert kept.forwards == 3  # one checking forward per block
    redone = model.fill(prefix_ids + hole, provisional=provisional, remask=1.0)  # every draft doubted: masked again
    assert redone.remasked == n and redone.canvas.tolist() == fresh.canvas.tolist()
    assert redone.forwards == fresh.forwards + 3


def test_a_typing_user_s_next_request_starts_from_the_shared_blocks_exactly(sdar_pair):
    model, m = sdar_pair[0], sdar_pair[0].mask_token_id
    head = model.encode("import os\nimport sys\n\n\ndef main(argv):\n    for name in argv:\n        print(name)\n")
    suffix = model.encode("\n\nmain(sys.argv)\n")
    model.last_blocks = None
    first = model.fill(head + model.encode("    return") + [m] * 8 + suffix, reuse_prefix=True)
    assert first.reused == 0
    typed = head + model.encode("    return 0") + [m] * 8 + suffix  # the user typed on
    again = model.fill(typed, reuse_prefix=True)
    fresh = model.fill(typed)
    assert again.reused >= len(head) // B * B - B and again.reused % B == 0  # the shared prompt's whole blocks
    assert again.canvas.tolist() == fresh.canvas.tolist()
    assert (again.confidence - fresh.confidence).abs().max() < 1e-5
    assert again.rows == fresh.rows - again.reused


# ------------------------------------------------------------------ Fast-dLLM v2
# The oracle: `generate` (and its `sample_with_top_p`) of the checkpoint's own modeling.py
# (Efficient-Large-Model/Fast_dLLM_v2_7B, as mirrored in github.com/Satgoy152/DualDiffusion, first
# commit d3a3470), read from $FAST_DLLM_MODELING_PY (default /tmp/oracles/fastdllm_modeling_first.py;
# never part of this repository), run on stock Qwen2 with the same weights and the attention of
# that file at inference: block-causal over the cache and the input (`eval_mask`), the cache
# extended only when `update_past_key_values`.

FAST_DLLM_PY = Path(os.environ.get("FAST_DLLM_MODELING_PY", "/tmp/oracles/fastdllm_modeling_first.py"))
FB = 32


@pytest.fixture(scope="module")
def fast_pair(tmp_path_factory):
    from tiny_checkpoints import write_fast_dllm_v2

    folder, reference = write_fast_dllm_v2(tmp_path_factory.mktemp("fast"))
    return load_model(folder, device="cpu", dtype="float32"), reference, folder


def authors_fast_dllm_generate():
    """The `generate` and `sample_with_top_p` methods of the fetched modeling.py, as functions."""
    import ast

    tree = ast.parse(FAST_DLLM_PY.read_text())
    wanted = [f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "Fast_dLLM_QwenForCausalLM"
              for f in c.body if isinstance(f, ast.FunctionDef) and f.name in ("generate", "sample_with_top_p")]
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(FAST_DLLM_PY), "exec"), namespace)
    return namespace["generate"], namespace["sample_with_top_p"]


class FastDllmOnQwen2:
    def __init__(self, qwen2):
        self.qwen2, self.device = qwen2, torch.device("cpu")
        self.generate_fn, self.sample_with_top_p_fn = authors_fast_dllm_generate()

    def sample_with_top_p(self, logits, top_p=0.95, temperature=1.0):
        return self.sample_with_top_p_fn(self, logits, top_p=top_p, temperature=temperature)

    def forward(self, input_ids, use_cache=True, past_key_values=None, update_past_key_values=False, block_size=FB,
                **ignored):
        cache = past_key_values if past_key_values is not None else StoreKV()
        cache.store = update_past_key_values
        past = cache.get_seq_length()
        q = torch.arange(input_ids.shape[1]) + past
        allowed = (q[:, None] // block_size) >= (torch.arange(past + input_ids.shape[1])[None, :] // block_size)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        out = self.qwen2(input_ids=input_ids, attention_mask=mask, position_ids=q[None], use_cache=True,
                         **{cache_keyword(self.qwen2): cache})
        return SimpleNamespace(logits=out.logits, past_key_values=cache)

    def generate(self, input_ids, max_new_tokens, **options):
        with torch.no_grad():
            return self.generate_fn(self, input_ids, max_new_tokens, **options)[0][0].tolist()


def fast_recompute(qwen2, prompt: list[int], n: int, threshold: float, stop: int):
    """The same rule, written from the modeling file's math, recomputing the whole sequence every forward."""
    P, m = len(prompt), 151665
    length = -(-(P + n) // FB) * FB
    x = torch.full((length + 1,), m)
    x[:P] = torch.tensor(prompt)
    with torch.no_grad():
        def rows(upto):  # network rows 0..upto-1 under the block-causal mask
            return qwen2(input_ids=x[None, :upto], attention_mask=sdar_mask_for(upto, FB)).logits[0]
        if P % FB == 0:
            x[P] = rows(P)[-1].argmax()
        for low in range(P // FB * FB, length, FB):
            for sub in range(low, low + FB, 8):
                while (x[sub:sub + 8] == m).any():
                    if stop in x[P:low + FB].tolist() and m not in x[P:P + x[P:].tolist().index(stop)].tolist():
                        return x[P:P + n].tolist()
                    p_all = torch.softmax(rows(low + FB)[sub - 1:sub + 7], -1)  # row i-1 scores position i
                    p, token = p_all.max(-1)
                    p = torch.where(x[sub:sub + 8] == m, p, -torch.inf)
                    reveal = p > threshold
                    reveal[p.argmax()] = True
                    x[sub:sub + 8][reveal] = token[reveal]
            if stop in x[P:low + FB].tolist():
                break
            x[low + FB] = rows(low + FB)[-1].argmax()
    return x[P:P + n].tolist()


def sdar_mask_for(length: int, block: int) -> torch.Tensor:
    blocks = torch.arange(length) // block
    return torch.zeros(length, length).masked_fill(blocks[None, :] > blocks[:, None], torch.finfo(torch.float32).min)[None, None]


# The checkpoint's own network with its generate (tests/fast_dllm_oracle.py): the same modeling.py
# ($FAST_DLLM_MODELING_PY) imported whole, run by $FAST_DLLM_ORACLE_PYTHON (default
# /tmp/fast-dllm-oracle-venv/bin/python); skipped when either is absent (CI). To set it up:
#     python3 -m venv /tmp/fast-dllm-oracle-venv
#     /tmp/fast-dllm-oracle-venv/bin/pip install torch==2.13.0 transformers==4.53.1 einops safetensors
#     (transformers 4.53.1: NVlabs/Fast-dLLM v2/requirements.txt), and modeling.py as above
FAST_DLLM_PYTHON = Path(os.environ.get("FAST_DLLM_ORACLE_PYTHON", "/tmp/fast-dllm-oracle-venv/bin/python"))
FAST_CASES = [(threshold, prefix_length) for threshold in (0.9, 1.06e-5) for prefix_length in (10, 42, 61)]


def fast_case(model, prefix_length: int) -> tuple[list[int], list[int], int]:
    """Prefix ids, the FIM prompt, and a hole to the end of the second block after the prompt's."""
    prefix_ids = list(range(100, 100 + prefix_length))
    prompt = model.prompt_ids(prefix_ids, [])
    return prefix_ids, prompt, (len(prompt) // FB + 2) * FB - len(prompt)


@pytest.fixture(scope="module")
def fast_theirs(fast_pair, tmp_path_factory):
    """Their network's rows for ids 100..139; their generate for each FAST_CASES case and for a
    40-token hole after 42 prefix tokens whose 7th free token is made the stop token; one run."""
    if not (FAST_DLLM_PY.is_file() and FAST_DLLM_PYTHON.is_file()):
        pytest.skip(f"the checkpoint's modeling.py ({FAST_DLLM_PY}) or its environment ({FAST_DLLM_PYTHON}) is absent")
    model = fast_pair[0]

    def case(prompt, blocks, threshold, stop):
        return dict(prompt=prompt, max_new_tokens=blocks * FB, threshold=threshold, small_block_size=8, block_size=FB,
                    stop_token=stop, mask_id=model.mask_token_id)

    cases = []
    for threshold, prefix_length in FAST_CASES:
        _, prompt, n = fast_case(model, prefix_length)
        cases.append(case(prompt, -(-(len(prompt) + n) // FB) - len(prompt) // FB, threshold, 151645))
    prefix_ids = list(range(100, 142))
    stop = model.fill(prefix_ids + [model.mask_token_id] * 40).canvas[len(prefix_ids) + 6].item()
    cases.append(case(model.prompt_ids(prefix_ids, []), 2, 0.9, stop))
    out = run_oracle("fast_dllm_oracle.py", FAST_DLLM_PY, FAST_DLLM_PYTHON, fast_pair[2],
                     tmp_path_factory.mktemp("fast-oracle"), {"logits": [list(range(100, 140)), FB], "generate": cases})
    return out["logits"], dict(zip(FAST_CASES, out["generate"])), (stop, out["generate"][-1])


def test_fast_dllm_v2_logits_equal_the_checkpoint_s_network(fast_pair, fast_theirs):
    ours = fast_pair[0].logits(torch.arange(100, 140)[None])[0]  # row i scores position i: their row i-1
    assert (ours[1:] - fast_theirs[0][:-1]).abs().max() < 1e-5 and (ours[0] - fast_theirs[0][0]).abs().max() < 1e-5


@pytest.mark.parametrize("threshold, prefix_length", FAST_CASES)
def test_fast_dllm_v2_greedy_tokens_equal_the_checkpoint_s_network_and_generate(fast_pair, fast_theirs, threshold,
                                                                                prefix_length):
    model = fast_pair[0]
    prefix_ids, prompt, n = fast_case(model, prefix_length)
    ours = model.fill(prefix_ids + [model.mask_token_id] * n, threshold=threshold).canvas[len(prefix_ids):].tolist()
    theirs = fast_theirs[1][(threshold, prefix_length)]
    assert len(theirs) == len(prompt) + n + 1  # the whole blocks, then the next block's first token; no stop
    assert ours == theirs[len(prompt):len(prompt) + n]


def test_fast_dllm_v2_stop_rule_equals_the_checkpoint_s_generate(fast_pair, fast_theirs):
    model = fast_pair[0]
    stop, theirs = fast_theirs[2]
    prefix_ids = list(range(100, 142))
    ours = replace(model, eos_token_ids=(stop,)).fill(prefix_ids + [model.mask_token_id] * 40).canvas[42:].tolist()
    P, first = len(model.prompt_ids(prefix_ids, [])), ours.index(stop)
    assert first < 39 and theirs[P:] == ours[:first + 1] and len(theirs) == P + first + 1  # theirs cut after the stop


def test_fast_dllm_v2_layout_loads_as_a_shifted_block_model(fast_pair):
    model, reference, _ = fast_pair
    assert isinstance(model, BlockDiffusionModel) and model.family == "fast-dllm-v2"
    assert model.mask_token_id == 151665 == model.tokenizer.convert_tokens_to_ids("|<MASK>|")
    assert model.eos_token_ids == (151645, 151643) and model.fim_ids == (151659, 151661, 151660)
    assert (model.block_size, model.sub_block, model.shift_logits, model.stop_inside_block) == (32, 8, True, True)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(model.network.state_dict()[key], tensor), key
    ids = torch.arange(100, 140)[None]
    with torch.no_grad():
        raw = reference(input_ids=ids, attention_mask=sdar_mask_for(40, FB)).logits
    ours = model.logits(ids)  # row i scores position i: the network's row i-1
    assert (ours[:, 1:] - raw[:, :-1]).abs().max() < 1e-5 and (ours[:, 0] - raw[:, 0]).abs().max() < 1e-5


@pytest.mark.parametrize("oracle", ["authors", "recompute"])
@pytest.mark.parametrize("threshold", [0.9, 1.06e-5])
@pytest.mark.parametrize("prefix_length", [10, 42, 61])  # FIM prompts of 13 (inside block 0), 45, and 64 (= 2 blocks)
def test_fast_dllm_v2_greedy_tokens_equal_the_reference(fast_pair, oracle, threshold, prefix_length):
    if oracle == "authors" and not FAST_DLLM_PY.is_file():
        pytest.skip(f"the checkpoint's modeling.py is not at {FAST_DLLM_PY} (set FAST_DLLM_MODELING_PY)")
    model, reference, _ = fast_pair
    prefix_ids = list(range(100, 100 + prefix_length))
    prompt = model.prompt_ids(prefix_ids, [])
    P = len(prompt)
    n = (P // FB + 2) * FB - P  # to the end of the second block after the prompt's
    result = model.fill(prefix_ids + [model.mask_token_id] * n, threshold=threshold)
    ours = result.canvas[len(prefix_ids):].tolist()
    if oracle == "authors":
        blocks = -(-(P + n) // FB) - P // FB
        generated = FastDllmOnQwen2(reference).generate(
            torch.tensor([prompt]), blocks * FB, mask_id=151665, threshold=threshold, small_block_size=8,
            block_size=FB, stop_token=151645, temperature=0)
        assert ours == generated[P:P + n]
    else:
        assert ours == fast_recompute(reference, prompt, n, threshold, 151645)
    assert model.mask_token_id not in ours
    if threshold < 0.5 and prefix_length == 10:  # (random weights: after the others, one confident token at a time)
        assert result.forwards < n
    first_of_block = (P // FB + 1) * FB - P  # decided by the row before it, with its own confidence
    assert result.confidence[len(prefix_ids) + first_of_block] < 1 and result.reveal_step[len(prefix_ids) + first_of_block] > 0


def test_fast_dllm_v2_stops_at_a_stop_token_with_nothing_masked_before_it(fast_pair):
    model, reference, _ = fast_pair
    prefix_ids = list(range(100, 142))
    canvas = prefix_ids + [model.mask_token_id] * 40
    free = model.fill(canvas).canvas[len(prefix_ids):].tolist()
    stop = free[6]
    stopping = replace(model, eos_token_ids=(stop,))
    ours = stopping.fill(canvas).canvas[len(prefix_ids):].tolist()
    first = ours.index(stop)
    assert model.mask_token_id not in ours and ours[-8:] == [stop] * 8  # the rest of the hole: the stop token
    expected = fast_recompute(reference, model.prompt_ids(prefix_ids, []), 40, 0.9, stop)
    assert ours[:first + 1] == expected[:first + 1]
    if FAST_DLLM_PY.is_file():
        P = len(model.prompt_ids(prefix_ids, []))
        generated = FastDllmOnQwen2(reference).generate(
            torch.tensor([model.prompt_ids(prefix_ids, [])]), 2 * FB, mask_id=151665, threshold=0.9,
            small_block_size=8, block_size=FB, stop_token=stop, temperature=0)
        assert generated[P:P + first + 1] == ours[:first + 1] and len(generated) == P + first + 1  # cut after the stop


def test_fast_dllm_v2_block_cache_equals_recomputation_and_features_answer(fast_pair):
    from diffu_lsp.features import answer
    from diffu_lsp.job import Request
    from diffu_lsp.settings import Settings

    model = fast_pair[0]
    canvas = list(range(100, 150)) + [model.mask_token_id] * 40 + list(range(200, 210))
    cached = model.fill(canvas, threshold=1.07e-5)
    recomputed = replace(model, block_cache=False).fill(canvas, threshold=1.07e-5)
    assert cached.canvas.tolist() == recomputed.canvas.tolist() and cached.forwards == recomputed.forwards
    assert cached.rows < recomputed.rows
    prefix, ids, suffix = model.encode("def f(x):\n"), list(range(300, 340)), model.encode("\n")
    scores = model.token_probabilities(prefix, ids, suffix)
    prompt = model.prompt_ids(prefix, suffix)
    for i in (0, 1, FB - len(prompt) % FB, FB - len(prompt) % FB + 1):  # a block's first token: scored by the row before
        end = (len(prompt) + i) // FB * FB + FB
        seq = torch.tensor(prompt + ids + [model.mask_token_id] * FB)[:end].clone()
        for j in range((len(prompt) + i) // FB * FB, end):
            if j >= len(prompt) and (j - len(prompt)) % 2 == i % 2 and j != (len(prompt) + i) // FB * FB:
                seq[j] = model.mask_token_id
        if (len(prompt) + i) % FB == 0:
            seq[len(prompt) + i:] = torch.tensor(prompt + ids + [0] * FB)[len(prompt) + i:end]
        probs = torch.softmax(model.logits(seq[None])[0, len(prompt) + i], -1)
        assert abs(float(probs[ids[i]]) - scores[i]) < 1e-5, i
    text = "def add(a, b):\n    return \n"
    cursor = text.index("return ") + len("return ")
    settings = Settings(single_line_tokens=8, multi_line_tokens=12, block_tokens=12)
    assert answer(model, Request("suggest", text, cursor, cursor, settings)).forwards >= 1
    holed = "def f(x):\n    ...\n    # TODO: fill\n"
    assert len(answer(model, Request("fill_holes", holed, 0, len(holed), settings))) == 2
    low = Settings(refine_mode="low_confidence", refine_confidence=0.5)
    assert answer(model, Request("refine", text, 0, 14, low)).strip()


@pytest.mark.asyncio
async def test_the_language_server_completes_fills_and_refines_with_fast_dllm_v2(fast_pair, tmp_path):
    assert await inline_through_the_server(fast_pair[2], tmp_path) is not None


def test_fast_dllm_v2_shape_is_the_real_checkpoint():
    from transformers import Qwen2ForCausalLM

    from diffu_lsp.bench import shapes

    config, mask_id, _ = shapes.SHAPES["fast-dllm-v2-7b"]
    family, net_config = shapes.network_config(config)
    assert family == "fast-dllm-v2" and mask_id == 151665 and config["bd_size"] == 32
    with torch.device("meta"):
        count = sum(p.numel() for p in Qwen2ForCausalLM(net_config).parameters())
    assert abs(count / 1e9 - 7.6156) < 0.001  # the checkpoint's index: 15,231,233,024 bytes of bf16


# ------------------------------------------------------------------ LLaDA 2.x
# The oracle: the checkpoint's own modeling_llada2_moe.py and configuration_llada2_moe.py (inclusionAI
# LLaDA2.0-mini's, as mirrored in github.com/yks23/Information-Gain-Sampler at commit f1cb636,
# dllm/dllm/pipelines/llada2/models/), read from $LLADA2_MODELING_DIR (default /tmp/oracles/llada2;
# never part of this repository) and run by tests/llada2_oracle.py with $LLADA2_ORACLE_PYTHON
# (default /tmp/llada2-oracle-venv/bin/python: a venv with transformers 4.57, the version that
# code was written for): their network's logits and their `generate` (full recomputation every
# forward, blocks of 32, threshold rule, stop after the block with the EOS).

LLADA2_DIR = Path(os.environ.get("LLADA2_MODELING_DIR", "/tmp/oracles/llada2"))
LLADA2_PYTHON = Path(os.environ.get("LLADA2_ORACLE_PYTHON", "/tmp/llada2-oracle-venv/bin/python"))
LB, LLADA2_MASK, LLADA2_EOS = 32, 156895, 156892


def llada2_oracle(folder: Path, tmp_path: Path, logits=None, generate=()) -> dict:
    if not ((LLADA2_DIR / "modeling_llada2_moe.py").is_file() and LLADA2_PYTHON.is_file()):
        pytest.skip(f"LLaDA2's modeling code ({LLADA2_DIR}) or its environment ({LLADA2_PYTHON}) is absent")
    return run_oracle("llada2_oracle.py", LLADA2_DIR, LLADA2_PYTHON, folder, tmp_path,
                      {"logits": logits, "generate": list(generate)})


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    from tiny_checkpoints import write_llada2

    folder = write_llada2(tmp_path_factory.mktemp("llada2") / "LLaDA2.0-mini-tiny")
    return load_model(folder, device="cpu", dtype="float32"), folder


LLADA2_CASES = [(threshold, prompt_length) for threshold in (0.95, 6.4e-6) for prompt_length in (10, 45, 64)]


def llada2_case(prompt_length: int) -> tuple[list[int], int]:
    """A prompt and a hole to the end of the second block after the prompt's."""
    return list(range(100, 100 + prompt_length)), (prompt_length // LB + 2) * LB - prompt_length


@pytest.fixture(scope="module")
def llada2_theirs(llada2, tmp_path_factory):
    """The checkpoint code's logits for ids 100..139 and its generate for every LLADA2_CASES case (one run)."""
    cases = []
    for threshold, prompt_length in LLADA2_CASES:
        prompt, n = llada2_case(prompt_length)
        cases.append(dict(prompt=prompt, gen_length=n, threshold=threshold, block_length=LB, eos_id=LLADA2_EOS,
                          mask_id=LLADA2_MASK))
    out = llada2_oracle(llada2[1], tmp_path_factory.mktemp("oracle"), logits=[list(range(100, 140)), LB], generate=cases)
    return out["logits"], dict(zip(LLADA2_CASES, out["generate"]))


def llada2_recompute(network, prompt: list[int], n: int, threshold: float, stop: int, block: int = LB):
    """LLaDA2.0's rule, cache-free: every forward recomputes the whole sequence under the block-causal mask."""
    length = -(-(len(prompt) + n) // block) * block
    x = torch.full((length,), LLADA2_MASK)
    x[:len(prompt)] = torch.tensor(prompt)
    with torch.no_grad():
        for low in range(len(prompt) // block * block, length, block):
            high = low + block
            while (x[low:high] == LLADA2_MASK).any():
                logits = network(input_ids=x[None, :high], attention_mask=sdar_mask_for(high, block)).logits[0, low:high]
                token, p = greedy(logits)
                p = torch.where(x[low:high] == LLADA2_MASK, p, -torch.inf)
                reveal = p >= threshold if (p >= threshold).any() else F.one_hot(p.argmax(), block).bool()
                x[low:high][reveal] = token[reveal]
            if stop in x[len(prompt):high].tolist():
                break
    return x[len(prompt):len(prompt) + n].tolist()


def test_llada2_layout_loads_onto_our_network_without_its_code(llada2, tmp_path):
    from diffu_lsp.models.llada2 import LLaDA2ForDiffusion

    model, folder = llada2
    assert isinstance(model, BlockDiffusionModel) and model.family == "llada2" and not model.shift_logits
    assert isinstance(model.network, LLaDA2ForDiffusion) and model.network.model.layers[1].mlp.experts[7] is not None
    assert (model.mask_token_id, model.eos_token_ids, model.block_size) == (LLADA2_MASK, (LLADA2_EOS,), LB)
    assert model.fim_ids is None and model.prompt_ids([5, 6], [7]) == [5, 6]  # no FIM tokens: the prefix alone
    assert model.default_sampling == {"alg": "threshold", "threshold": 0.95}
    from safetensors.torch import load_file
    stored = {}
    for shard in folder.glob("*.safetensors"):
        stored.update(load_file(str(shard)))
    assert set(stored) == set(model.network.state_dict())
    assert all(torch.equal(model.network.state_dict()[k], v.float()) for k, v in stored.items())
    import shutil
    named = tmp_path / "LLaDA2.1-mini-tiny"
    shutil.copytree(folder, named)
    assert load_model(named, device="cpu", dtype="float32").default_sampling == {
        "alg": "threshold", "threshold": 0.7, "edit_threshold": 0.5}  # 2.1: joint M2T / T2T thresholds


def test_llada2_logits_follow_the_block_causal_mask(llada2):
    model, folder = llada2
    ids = list(range(100, 140))  # two blocks: the second sees the first, not the reverse
    ours = model.logits(torch.tensor([ids]))
    later = torch.tensor([ids]).clone()
    later[0, 35] = 99
    changed = model.logits(later)
    assert torch.equal(changed[0, :32], ours[0, :32]) and (changed[0, 32] - ours[0, 32]).abs().max() > 1e-4
    positions = torch.tensor([1, 31, 33])
    assert (model.position_logits(torch.tensor(ids), positions) - ours[0, positions]).abs().max() < 1e-5


def test_llada2_logits_equal_the_checkpoint_s_code(llada2, llada2_theirs):
    ours = llada2[0].logits(torch.arange(100, 140)[None])[0]
    assert (ours - llada2_theirs[0]).abs().max() < 1e-5


# thresholds: random weights give p ~ 6e-6, so 6.4e-6 reveals several at once; prompts inside block 0,
# across a block boundary, and exactly two blocks
@pytest.mark.parametrize("threshold, prompt_length", LLADA2_CASES)
def test_llada2_greedy_tokens_equal_a_cache_free_recomputation(llada2, threshold, prompt_length):
    model = llada2[0]
    prompt, n = llada2_case(prompt_length)
    result = model.fill(prompt + [model.mask_token_id] * n, threshold=threshold)
    ours = result.canvas[prompt_length:].tolist()
    assert model.mask_token_id not in ours
    assert ours == llada2_recompute(model.network, prompt, n, threshold, LLADA2_EOS)
    if threshold < 0.5:
        assert result.forwards < n


@pytest.mark.parametrize("threshold, prompt_length", LLADA2_CASES)
def test_llada2_greedy_tokens_equal_the_checkpoint_s_generate(llada2, llada2_theirs, threshold, prompt_length):
    model = llada2[0]
    prompt, n = llada2_case(prompt_length)
    ours = model.fill(prompt + [model.mask_token_id] * n, threshold=threshold).canvas[prompt_length:].tolist()
    theirs = llada2_theirs[1][(threshold, prompt_length)]
    assert len(theirs) >= 8 and ours[:len(theirs)] == theirs  # theirs ends at the first EOS, if any


def test_llada2_stops_after_the_block_with_the_eos_and_2_1_edits_tokens(llada2):
    model, _ = llada2
    prompt = list(range(100, 110))
    canvas = prompt + [model.mask_token_id] * 60
    free = model.fill(canvas).canvas[10:].tolist()
    stop = free[5]
    ours = replace(model, eos_token_ids=(stop,)).fill(canvas).canvas[10:].tolist()
    end_of_block = LB - 10
    assert ours[end_of_block:] == [stop] * (60 - end_of_block)  # the blocks after the EOS's are not decoded
    assert ours[:end_of_block] == llada2_recompute(model.network, prompt, 60, 0.95, stop)[:end_of_block]
    # LLaDA 2.1's token editing (the sampler's T2T) in the block path: draft tokens the model would not
    # choose are replaced (random weights' choices barely move, so the edits come from drafts), and the
    # block cache gives what recomputing every forward gives
    drafted = prompt + list(range(500, 530)) + [model.mask_token_id] * 30
    provisional = [False] * 10 + [True] * 30 + [False] * 30
    edited = model.fill(drafted, provisional=provisional, threshold=0.7, edit_threshold=6.5e-6)
    again = replace(model, block_cache=False).fill(drafted, provisional=provisional, threshold=0.7, edit_threshold=6.5e-6)
    assert edited.edits > 0 and edited.canvas.tolist() == again.canvas.tolist() and edited.forwards == again.forwards
    assert model.mask_token_id not in edited.canvas.tolist() and edited.canvas[10:40].tolist() != list(range(500, 530))


# ------------------------------------------------------------------ Stable-DiffCoder
# Its modeling file (ByteDance-Seed/Stable-DiffCoder-8B-*, modeling_stable_diffcoder.py) is on the hub
# only and could not be fetched here; it subclasses transformers' LlamaForCausalLM and adds `generate`.
# So: stock Llama under the authors' block mask (kron of a lower-triangular block matrix, as that
# file builds it) is the network oracle, and the README's decoding (block_length 4, steps = gen_length:
# one token per forward, low_confidence, no threshold, no shift) recomputed in full is the decoding oracle.

SB = 4


@pytest.fixture(scope="module")
def diffcoder(tmp_path_factory):
    from tiny_checkpoints import write_stable_diffcoder

    folder, reference = write_stable_diffcoder(tmp_path_factory.mktemp("sdc"))
    return load_model(folder, device="cpu", dtype="float32"), reference, folder


def kron_block_mask(length: int, block: int) -> torch.Tensor:
    blocks = -(-length // block)
    allowed = torch.tril(torch.ones(blocks, blocks, dtype=torch.bool)).kron(torch.ones(block, block, dtype=torch.bool))
    return torch.zeros(length, length).masked_fill(~allowed[:length, :length], float("-inf"))[None, None]


def diffcoder_recompute(llama, prompt: list[int], n: int, mask_id: int, stops) -> list[int]:
    length = -(-(len(prompt) + n) // SB) * SB
    x = torch.full((length,), mask_id)
    x[:len(prompt)] = torch.tensor(prompt)
    with torch.no_grad():
        for low in range(len(prompt) // SB * SB, length, SB):
            high = low + SB
            while (x[low:high] == mask_id).any():
                logits = llama(input_ids=x[None, :high], attention_mask=kron_block_mask(high, SB)).logits[0, low:high]
                token, p = greedy(logits)
                best = torch.where(x[low:high] == mask_id, p, -torch.inf).argmax()
                x[low + best] = token[best]
            if torch.isin(x[len(prompt):high], torch.tensor(stops)).any():
                break
    return x[len(prompt):len(prompt) + n].tolist()


def test_stable_diffcoder_loads_onto_llama_and_its_logits_are_llama_s_under_the_block_mask(diffcoder):
    from transformers import LlamaForCausalLM

    model, reference, folder = diffcoder
    assert isinstance(model.network, LlamaForCausalLM) and model.family == "stable-diffcoder"
    assert (model.block_size, model.shift_logits, model.default_sampling) == (4, False, {"alg": "threshold", "threshold": 1.0})
    vocab = model.tokenizer.get_vocab()
    assert model.mask_token_id == vocab["<[MASK]>"] and model.eos_token_ids[0] == 2
    assert model.fim_ids == (vocab["<[fim-prefix]>"], vocab["<[fim-suffix]>"], vocab["<[fim-middle]>"])
    assert model.prompt_ids([5, 6], [7]) == [vocab["<[fim-suffix]>"], 7, vocab["<[fim-prefix]>"], 5, 6,
                                             vocab["<[fim-middle]>"]]  # Seed-Coder's order: suffix first
    ids = torch.arange(300, 310)[None]
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=kron_block_mask(10, SB)).logits
    assert (model.logits(ids) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("prefix", ["def f(x):\n    return ", "x = 1\n"])
def test_stable_diffcoder_greedy_tokens_equal_the_recomputed_rule(diffcoder, prefix):
    model, reference, _ = diffcoder
    prefix_ids, n = model.encode(prefix), 11
    result = model.fill(prefix_ids + [model.mask_token_id] * n)
    ours = result.canvas[len(prefix_ids):].tolist()
    assert ours == diffcoder_recompute(reference, model.prompt_ids(prefix_ids, []), n, model.mask_token_id,
                                       model.eos_token_ids)
    assert result.forwards == n  # one token per forward
    stop = ours[2]
    stopped = replace(model, eos_token_ids=(stop,)).fill(prefix_ids + [model.mask_token_id] * n)
    expected = diffcoder_recompute(reference, model.prompt_ids(prefix_ids, []), n, model.mask_token_id, (stop,))
    P = len(model.prompt_ids(prefix_ids, []))
    end_of_block = (P + 2) // SB * SB + SB - P
    assert stopped.canvas[len(prefix_ids):].tolist()[:end_of_block] == expected[:end_of_block]


# ------------------------------------------------------------------ both: features, CLI, server

@pytest.fixture(params=["llada2", "stable-diffcoder"])
def new_family(request, llada2, diffcoder):
    return (llada2[0], llada2[1]) if request.param == "llada2" else (diffcoder[0], diffcoder[2])


def test_suggest_fill_holes_refine_and_the_block_cache_on_llada2_and_stable_diffcoder(new_family):
    from diffu_lsp.features import answer
    from diffu_lsp.job import Request
    from diffu_lsp.settings import Settings

    model, _ = new_family
    canvas = model.encode("def f(x):\n    return ") + [model.mask_token_id] * 40 + model.encode("\n\nprint(f(1))\n")
    cached, recomputed = model.fill(canvas), replace(model, block_cache=False).fill(canvas)  # over 2 blocks
    assert cached.canvas.tolist() == recomputed.canvas.tolist() and cached.rows < recomputed.rows
    text = "def add(a, b):\n    return \n"
    cursor = text.index("return ") + len("return ")
    settings = Settings(single_line_tokens=8, multi_line_tokens=12, block_tokens=12)
    suggestion = answer(model, Request("suggest", text, cursor, cursor, settings))
    assert suggestion.forwards >= 1 and suggestion.hole_tokens == 8
    holed = "def f(x):\n    ...\n    # TODO: fill\n"
    assert len(answer(model, Request("fill_holes", holed, 0, len(holed), settings))) == 2
    low = Settings(refine_mode="low_confidence", refine_confidence=0.5)
    assert answer(model, Request("refine", text, 0, 14, low)).strip()


def test_diffu_lsp_complete_runs_llada2_and_stable_diffcoder(new_family, tmp_path):
    source = tmp_path / "a.py"
    source.write_text("def add(a, b):\n    return \n")
    out = subprocess.run([sys.executable, "-m", "diffu_lsp", "complete", f"{source}:2:12", "--model",
                          str(new_family[1]), "--device", "cpu", "--max-tokens", "8", "--json"],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["hole_tokens"] == 8 and answer["forwards"] >= 1


@pytest.mark.asyncio
async def test_the_language_server_completes_inline_with_llada2_and_stable_diffcoder(new_family, tmp_path):
    assert await inline_through_the_server(new_family[1], tmp_path) is not None


@pytest.mark.parametrize("shape, family, billions", [("llada2-mini", "llada2", 16.2556), ("stable-diffcoder-8b", "stable-diffcoder", 8.2505)])
def test_llada2_and_stable_diffcoder_shapes_are_the_real_checkpoints(shape, family, billions):
    from diffu_lsp.bench import shapes
    from diffu_lsp.models.block import network_for

    config, _, _ = shapes.SHAPES[shape]
    found, net_config = shapes.network_config(config)
    assert found == family
    with torch.device("meta"):
        network = network_for(family, config)[0](net_config)
    count = sum(p.numel() for p in network.parameters())
    assert abs(count / 1e9 - billions) < 0.001  # LLaDA2.0-mini: "16B total"; Seed-Coder-8B's Llama shapes
    if family == "llada2":  # "1.4B activated": all but 248 of the 256 routed experts' weights, per token
        experts = sum(p.numel() for name, p in network.named_parameters() if ".experts." in name)
        assert abs((count - experts * (1 - 8 / 256)) / 1e9 - 1.433) < 0.001
