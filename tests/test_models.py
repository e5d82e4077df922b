"""load_model on random tiny checkpoints written in each real format, and on the bundled model."""

from __future__ import annotations

import json

import pytest
import torch

from diffu_lsp.models import BUNDLED_MODEL, load_model
from diffu_lsp.errors import ModelLoadFailed
from diffu_lsp.models.loading import detect_family
from tiny_checkpoints import write_dream, write_llada, write_qwen2_diffusion


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return load_model(write_dream(tmp_path_factory.mktemp("dream")), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def llada_pair(tmp_path_factory):
    folder, reference = write_llada(tmp_path_factory.mktemp("llada"))
    return load_model(folder, device="cpu", dtype="float32"), reference.float().eval()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return load_model(write_qwen2_diffusion(tmp_path_factory.mktemp("qwen2")), device="cpu", dtype="float32")


def raw_logits(model, ids):
    with torch.no_grad():
        n = ids.shape[1]
        return model.network(input_ids=ids, attention_mask=torch.zeros(1, 1, n, n)).logits.float()


def test_dream_format_loads_with_real_ids_and_tokenizer(dream):
    assert dream.family == "dream"
    assert dream.mask_token_id == 151666
    assert dream.eos_token_ids == (151643,)
    assert dream.tokenizer.convert_tokens_to_ids("<|mask|>") == 151666
    assert dream.tokenizer.convert_tokens_to_ids("<|dlm_pad|>") == 151667
    assert dream.tokenizer.convert_tokens_to_ids("<|beginoftext|>") == 151665
    code = "def add(a, b):\n    return a + b\n"
    assert dream.decode(dream.encode(code)) == code
    assert dream.dtype == torch.float32 and dream.device.type == "cpu"


def test_auto_dtype_is_bfloat16_on_a_gpu_and_on_a_cpu_with_bf16_matrix_hardware(monkeypatch):
    from diffu_lsp.models import loading

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loading.resolve_dtype("auto", cuda) == torch.bfloat16
    assert loading.resolve_dtype("float32", cuda) == torch.float32
    for has_amx, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        assert loading.resolve_dtype("auto", cpu) == expected
        assert loading.resolve_dtype(None, cpu) == expected
        assert loading.resolve_dtype("float32", cpu) == torch.float32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert loading.resolve_dtype("auto", cpu) == torch.float32  # a torch without the probe


def test_dream_logits_are_shifted(dream):
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    aligned = dream.logits(ids)
    raw = raw_logits(dream, ids)
    assert torch.allclose(aligned[:, 1:], raw[:, :-1], atol=1e-5)
    assert torch.allclose(aligned[:, 0], raw[:, 0], atol=1e-5)


@pytest.mark.parametrize("which", ["dream", "llada", "qwen2"])
def test_attention_is_bidirectional(which, dream, llada_pair, qwen2):
    model = {"dream": dream, "llada": llada_pair[0], "qwen2": qwen2}[which]
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18]])
    later_changed = ids.clone()
    later_changed[0, 7] = 99
    before, after = model.logits(ids), model.logits(later_changed)
    # positions well before the change see it: the attention is not causal
    assert (before[0, :5] - after[0, :5]).abs().max() > 1e-4


def test_llada_keys_map_onto_llama_without_shift(llada_pair):
    model, reference = llada_pair
    assert model.family == "llada" and model.mask_token_id == 126336 and not model.shift_logits
    assert model.eos_token_ids == (126081,)
    assert model.tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == 126336
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=torch.zeros(1, 1, 5, 5)).logits
    assert torch.allclose(model.logits(ids), expected, atol=1e-4)


def test_qwen2_diffusion_takes_mask_from_tokenizer(qwen2):
    assert qwen2.family == "qwen2-diffusion"
    assert qwen2.mask_token_id == qwen2.tokenizer.convert_tokens_to_ids("<M>") == 1001
    assert qwen2.shift_logits


@pytest.mark.parametrize("which", ["dream", "llada", "qwen2"])
def test_infill_ids_returns_exactly_length_ids(which, dream, llada_pair, qwen2):
    model = {"dream": dream, "llada": llada_pair[0], "qwen2": qwen2}[which]
    prefix, suffix = model.encode("def f(x):\n    return "), model.encode("\n")
    filled = model.infill_ids(prefix, suffix, 7)
    assert len(filled) == 7
    assert model.mask_token_id not in filled
    assert filled == model.infill_ids(prefix, suffix, 7)  # greedy is deterministic


def test_empty_prefix_gets_a_bos_and_still_fills(dream):
    filled = dream.infill_ids([], dream.encode("x = 1\n"), 4)
    assert len(filled) == 4 and dream.mask_token_id not in filled


def test_sharded_weights_are_all_loaded(tmp_path):
    folder = write_dream(tmp_path / "d", seed=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    model = load_model(folder, device="cpu")
    from safetensors.torch import load_file
    shard = sorted(set(index["weight_map"].values()))[-1]
    for key, tensor in load_file(str(folder / shard)).items():
        assert torch.equal(model.network.state_dict()[key], tensor.float()), key


def test_remote_code_is_never_run(tmp_path):
    folder = write_qwen2_diffusion(tmp_path / "q")
    (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(folder, device="cpu").family == "qwen2-diffusion"


def test_load_errors_are_one_line_and_name_the_formats(tmp_path):
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadFailed, match="supported formats: Dream"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadFailed):
        detect_family({"model_type": "gpt2"})
    folder = write_qwen2_diffusion(tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadFailed, match="cannot load the weights"):
        load_model(folder)


def test_cuda_requested_but_absent_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadFailed, match="CUDA was requested"):
        load_model(None, device="cuda")


def test_bundled_model_is_a_dream_checkpoint():
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert config["model_type"] == "Dream"
    model = load_model()
    assert model.family == "dream" and model.shift_logits
    assert model.parameter_count < 25_000_000  # ships in the package, fills fast on 2 cores
    assert model.tokenizer.convert_tokens_to_ids("<|mask|>") == model.mask_token_id


def test_default_settings_decode_as_each_model_chose(dream, tmp_path):
    from diffu_lsp.features import sampling_for
    from diffu_lsp.models.loading import generation_defaults
    from diffu_lsp.settings import Settings

    bundled = load_model()  # ships the rule `diffu-lsp bench quality` chose for it, and its EOS penalty
    assert bundled.default_sampling == {"eos_penalty": 3.0, "alg": "factor", "factor": 8.0}
    chosen = sampling_for(bundled, Settings())
    assert (chosen.alg, chosen.factor, chosen.eos_penalty) == ("factor", 8.0, 3.0)
    assert sampling_for(bundled, Settings(algorithm="threshold")).threshold == 0.9  # the user's word wins
    plain = sampling_for(dream, Settings())  # no generation_config.json: the sampler's defaults
    assert (plain.alg, plain.threshold, plain.eos_penalty) == ("threshold", 0.9, 0.0)
    # Values our sampler does not know (Dream's own algorithm names) are skipped, not fatal.
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"alg": "origin", "steps": 512, "temperature": 0.2, "top_p": 0.95, "mask_token_id": 151666}))
    assert generation_defaults(lambda name: str(tmp_path / name)) == {"steps": 512, "temperature": 0.2, "top_p": 0.95}


def test_llada_cached_path_matches_uncached(llada_pair):
    model = llada_pair[0]
    canvas = model.encode("def f(x):\n    return ") + [model.mask_token_id] * 6 + model.encode("\n")
    uncached = model.fill(canvas, alg="entropy", steps=6)
    for cache in ("prefix", "dual", "delayed"):
        assert model.fill(canvas, alg="entropy", steps=6, cache=cache, refresh_every=1).canvas.tolist() \
            == uncached.canvas.tolist()


def test_token_probabilities_score_each_token_while_masked(dream):
    prefix, ids, suffix = dream.encode("def f(x):\n"), dream.encode("    return x"), dream.encode("\n")
    scores = dream.token_probabilities(prefix, ids, suffix)
    assert len(scores) == len(ids) and all(0.0 < s <= 1.0 for s in scores)
    even_masked = [dream.mask_token_id if i % 2 == 0 else t for i, t in enumerate(ids)]
    probs = torch.softmax(dream.logits(torch.tensor([prefix + even_masked + suffix]))[0], -1)
    for i in range(0, len(ids), 2):  # the even tokens are scored on the canvas with them masked
        assert abs(float(probs[len(prefix) + i, ids[i]]) - scores[i]) < 1e-5


def test_compiled_network_gives_the_eager_tokens(tmp_path):
    model = load_model(write_dream(tmp_path / "dream"), device="cpu", dtype="float32")
    canvas = [10, 11, 12, 13] + [model.mask_token_id] * 8 + [20, 21, 22]
    for cache in ("none", "delayed"):
        eager = model.fill(canvas, alg="threshold", threshold=0.5, cache=cache)
        compiled = model.fill(canvas, alg="threshold", threshold=0.5, cache=cache, compiled=True)
        assert model.compile_error is None and model.compiled_network is not None
        assert compiled.canvas.tolist() == eager.canvas.tolist()
        assert compiled.forwards == eager.forwards


def test_a_compile_failure_falls_back_to_the_eager_network(tmp_path, monkeypatch, caplog):
    model = load_model(write_dream(tmp_path / "dream"), device="cpu", dtype="float32")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda network, **options: broken)
    canvas = [10, 11, 12, 13] + [model.mask_token_id] * 8 + [20, 21, 22]
    eager = model.fill(canvas, alg="threshold", threshold=0.5, cache="dual")
    with caplog.at_level("WARNING", logger="diffu_lsp.models"):
        compiled = model.fill(canvas, alg="threshold", threshold=0.5, cache="dual", compiled=True)
        model.fill(canvas, alg="threshold", threshold=0.5, cache="dual", compiled=True)
    assert compiled.canvas.tolist() == eager.canvas.tolist()
    assert model.compile_error == "RuntimeError: InductorError: no working C++ compiler found"
    assert len(calls) == 1  # tried once, then the eager network for good
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1
