"""`diffu-lsp bench shapes`: the real checkpoints' shapes, and a smoke run of the tiny one (timings never asserted)."""

from __future__ import annotations

import json
import math

import pytest

from diffu_lsp.bench import common, shapes


@pytest.mark.parametrize("shape, layers, hidden, heads, kv_heads, mlp, vocab, billions", [
    ("dream-7b", 28, 3584, 28, 4, 18944, 152064, 7.6),
    ("open-dcoder-0.5b", 24, 896, 14, 2, 4864, 151936, 0.49),
    ("llada-8b", 32, 4096, 32, 32, 12288, 126464, 8.0),
])
def test_shapes_are_the_real_checkpoints(shape, layers, hidden, heads, kv_heads, mlp, vocab, billions):
    import torch
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    config, mask_id, _ = shapes.SHAPES[shape]
    family, net_config = shapes.network_config(config)
    assert (net_config.num_hidden_layers, net_config.hidden_size, net_config.num_attention_heads,
            net_config.num_key_value_heads, net_config.intermediate_size, net_config.vocab_size) == \
        (layers, hidden, heads, kv_heads, mlp, vocab)
    with torch.device("meta"):  # parameter count without allocating a byte
        network = (LlamaForCausalLM if family == "llada" else Qwen2ForCausalLM)(net_config)
    count = sum(p.numel() for p in network.parameters())
    assert abs(count / 1e9 - billions) / billions < 0.05
    assert mask_id == {"dream-7b": 151666, "llada-8b": 126336}.get(shape, mask_id)


def test_quick_run_measures_every_cache_mode(tmp_path):
    options = common.Options(quick=True, device="cpu", dtype="float32", extra={"contexts": (128,)})
    result = shapes.run(options)
    summary = result["summary"]["shapes"]["tiny"]
    jobs = summary["jobs"]
    assert {j["cache"] for j in jobs} == set(shapes.CACHE_MODES)
    for job in jobs:  # a fixed schedule: 64 / k forwards, the network inside the job's time
        assert job["forwards"] == shapes.BLOCK // job["per_forward"]
        assert 0 < job["network_ms"] <= job["ms"]
    assert all(math.isfinite(v) and v > 0 for v in summary["ar_ms_per_token"].values())
    assert summary["peak_mb"] >= summary["weights_mb"] > 0
    text = common.render(result)
    assert "overhead % of forward" in text and "AR ms/token" in text
    json.dumps(result, default=str)


def test_built_model_decodes_through_the_server_path():
    model = shapes.build("tiny", "cpu", "float32")
    canvas = shapes.canvas_for(model, 160)
    result = model.fill(canvas, model.sampling(alg="maskgit_plus", steps=8), cache="delayed")
    assert result.forwards == 8 and not (result.canvas == model.mask_token_id).any()


def test_gpu_suite_runs_on_cpu_and_writes_its_section(tmp_path):
    from diffu_lsp.bench import gpu, report

    result = gpu.run(common.Options(quick=True, device="cpu", dtype="float32"))
    assert result["suite"] == "gpu" and result["summary"]["shapes"]["tiny"]["max_overhead_percent"] > 0
    compile_table = common.find_table(result, "torch.compile")
    assert compile_table["rows"][0][-1] == "not run: no CUDA device"
    result["machine"] = common.machine(None, common.Options())
    out = report.write(tmp_path / "BENCHMARKS.md", [result])
    text = out.read_text()
    assert text.count("<!-- bench:gpu -->") == 1 and "## On a GPU" in text and "bench gpu --write" in text


def test_cli_lists_the_suites():
    from diffu_lsp.bench import build_parser

    args = build_parser().parse_args(["shapes", "--quick", "--shapes", "tiny", "--contexts", "128", "--per-forward", "8"])
    assert (args.suite, args.shapes, args.contexts, args.per_forward) == ("shapes", "tiny", "128", "8")
