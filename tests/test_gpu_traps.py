"""Traps a first GPU run would hit, caught on the CPU (issue #25): each test here failed on the
code before its fix. Timings are never asserted; counts and invariants are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffu_lsp.models import load_model
from test_models import dream  # noqa: F401 (fixture: the same tiny Dream model)
from tiny_checkpoints import write_dream, write_llada

ROOT = Path(__file__).resolve().parent.parent
CACHES = ("prefix", "dual", "delayed")


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    folder, _ = write_llada(tmp_path_factory.mktemp("llada"))
    return load_model(folder, device="cpu", dtype="float32")


def canvas_of(model, holes: int = 12) -> list[int]:
    return model.encode("def f(x):\n    return ") + [model.mask_token_id] * holes + model.encode("\n\nprint(f(2))\n")


# ---------------------------------------------------------------- 1. the K/V cache keyword

class PastKeyValuesNetwork(torch.nn.Module):
    """The network as transformers 5.0-5.23 present it: the cache argument is `past_key_values`
    (anything else lands in **kwargs and is ignored, as there)."""

    def __init__(self, network, keyword: str):
        super().__init__()
        self.inner, self.keyword, self.config = network, keyword, network.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, logits_to_keep=0, **kwargs):
        kwargs.pop("cache", None)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, logits_to_keep=logits_to_keep,
                          **{self.keyword: past_key_values}, **kwargs)


def test_cached_modes_use_the_buffer_under_the_older_cache_keyword(dream):
    from diffu_lsp.models.backend import DiffusionModel, cache_keyword

    inner_keyword = cache_keyword(dream.network)
    old = DiffusionModel(network=PastKeyValuesNetwork(dream.network, inner_keyword), tokenizer=dream.tokenizer,
                         family=dream.family, name="old keyword", mask_token_id=dream.mask_token_id,
                         eos_token_ids=dream.eos_token_ids, bos_token_id=dream.bos_token_id,
                         shift_logits=dream.shift_logits, max_length=dream.max_length)
    assert old.cache_keyword == "past_key_values"
    canvas = canvas_of(dream)
    uncached = old.fill(canvas, alg="entropy", steps=12)
    for cache in CACHES:
        cached = old.fill(canvas, alg="entropy", steps=12, cache=cache, refresh_every=1)
        assert cached.canvas.tolist() == uncached.canvas.tolist(), cache
        assert cached.refreshes == cached.forwards  # refresh_every=1: every step a full forward


MATRIX_CHECK = r"""
import sys, torch, transformers
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from diffu_lsp.models import load_model
from test_models import dream  # noqa: F401 (fixture: the same tiny Dream model)
from tiny_checkpoints import write_dream, write_llada
import tempfile, pathlib
folder = pathlib.Path(tempfile.mkdtemp())
for name, path in (("dream", write_dream(folder / "d")), ("llada", write_llada(folder / "l")[0])):
    model = load_model(path, device="cpu", dtype="float32")
    canvas = model.encode("def f(x):\n    return ") + [model.mask_token_id] * 12 + model.encode("\n")
    plain = model.fill(canvas, alg="entropy", steps=12).canvas.tolist()
    for cache in ("prefix", "dual", "delayed"):
        exact = model.fill(canvas, alg="entropy", steps=12, cache=cache, refresh_every=1)
        assert exact.canvas.tolist() == plain, (name, cache)
print("ok", transformers.__version__, model.cache_keyword)
"""


def matrix_pythons() -> list[str]:
    """This interpreter, and those named in DIFFU_LSP_MATRIX_PYTHONS (':'-separated; each a venv
    with torch and one transformers release, e.g. the oldest allowed and the GPU image's:
    scripts/transformers-matrix.sh makes them)."""
    return [sys.executable] + [p for p in os.environ.get("DIFFU_LSP_MATRIX_PYTHONS", "").split(":") if p]


@pytest.mark.parametrize("python", matrix_pythons())
def test_cached_modes_work_under_each_transformers_release(python):
    if not Path(python).exists():
        pytest.skip(f"{python} does not exist")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([python, "-c", MATRIX_CHECK, str(ROOT)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr[-3000:]


# ---------------------------------------------------------------- 2. rotary positions

def record_positions(model) -> tuple[list[torch.Tensor], object]:
    """Every position id the rotary embedding is asked for, forward by forward."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs["position_ids"] if "position_ids" in kwargs else args[1]).flatten().clone())

    return seen, model.network.model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("which", ["dream", "llada"])
@pytest.mark.parametrize("cache", CACHES)
def test_rotary_positions_stay_inside_the_canvas_through_blocks_and_refreshes(which, cache, dream, llada):
    model = {"dream": dream, "llada": llada}[which]
    canvas = canvas_of(model, holes=16)
    length = len(canvas) + (1 if model.shift_logits and canvas[0] == model.mask_token_id else 0)
    seen, handle = record_positions(model)
    try:
        blocks = model.fill(canvas, alg="entropy", steps=16, cache=cache, block_length=4)
        refreshed = model.fill(canvas, alg="entropy", steps=16, cache=cache, refresh_every=2)
    finally:
        handle.remove()
    # more than one full forward on one buffer (prefix mode's span runs to the end: no block refreshes it)
    assert refreshed.refreshes >= 2 and (cache == "prefix" or blocks.refreshes >= 2)
    for positions in seen:
        assert 0 <= int(positions.min()) and int(positions.max()) < length, positions.tolist()
    full = [p for p in seen if len(p) == length]
    assert len(full) >= 3 and all(torch.equal(p, torch.arange(length)) for p in full)


# ---------------------------------------------------------------- 4. attention without a mask

@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every call of torch's SDPA: (mask given, is_causal, enable_gqa, query heads, key heads)."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((attn_mask is not None, is_causal, enable_gqa, query.shape[1], key.shape[1]))
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The network under transformers' own SDPA with a 4D mask of zeros (what every forward ran before)."""
    network = model.network
    implementation, network.config._attn_implementation = network.config._attn_implementation, "sdpa"
    try:
        with torch.no_grad():
            n = ids.shape[1]
            return network(input_ids=ids, attention_mask=torch.zeros(1, 1, n, n)).logits.float()
    finally:
        network.config._attn_implementation = implementation


@pytest.mark.parametrize("which", ["dream", "llada"])
def test_unpadded_forwards_call_sdpa_without_a_mask_and_with_grouped_heads(which, dream, llada, sdpa_calls):
    model = {"dream": dream, "llada": llada}[which]
    canvas = canvas_of(model)
    for cache in ("none",) + CACHES:
        model.fill(canvas, alg="entropy", steps=12, cache=cache, block_length=6)
    model.token_probabilities(model.encode("x = "), model.encode("1 + 2"), model.encode("\n"))
    model.logits(torch.tensor([canvas]))
    model.batch_position_logits([torch.tensor(canvas)] * 2, [torch.tensor([5, 6])] * 2)  # equal lengths: no padding
    assert len(sdpa_calls) > 20
    for mask, causal, gqa, query_heads, key_heads in sdpa_calls:
        assert not mask and not causal
        assert key_heads == model.network.config.num_key_value_heads  # K/V never repeated per head
        assert gqa == (key_heads < query_heads)
    assert which == "llada" or all(k < q for *_, q, k in sdpa_calls)  # the Dream layout groups its heads


def test_only_a_padded_batch_gets_a_mask(dream, sdpa_calls):
    short, long = torch.tensor(canvas_of(dream, 4)), torch.tensor(canvas_of(dream, 9))
    batched = dream.batch_position_logits([short, long], [torch.tensor([8]), torch.tensor([8])])
    assert sdpa_calls and all(mask and not causal for mask, causal, *_ in sdpa_calls)
    alone = dream.position_logits(short, torch.tensor([8]))
    assert torch.allclose(batched[0], alone, atol=1e-4)


@pytest.mark.parametrize("which", ["dream", "llada"])
def test_mask_free_attention_gives_the_masked_logits(which, dream, llada):
    model = {"dream": dream, "llada": llada}[which]
    ids = torch.tensor([canvas_of(model)])
    expected = reference_logits(model, ids)
    if model.shift_logits:
        expected = torch.cat([expected[:, :1], expected[:, :-1]], dim=1)
    got = model.logits(ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    positions = torch.tensor([3, 7, 12])
    assert torch.allclose(model.position_logits(ids[0], positions), expected[0, positions], atol=1e-5, rtol=1e-5)


def test_a_plain_call_of_the_network_stays_causal(dream):
    """The autoregressive baseline calls the network with no mask and no is_causal: causal, as before."""
    from diffu_lsp.bench.baseline import autoregressive

    prefix, suffix = dream.encode("def add(a, b):\n    return "), dream.encode("\n")
    ids = list(suffix) + list(prefix)
    out = autoregressive(dream, prefix, suffix, 4)
    for _ in range(4):
        with torch.no_grad():
            n = len(ids)
            causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
            ids.append(int(dream.network(input_ids=torch.tensor([ids]), attention_mask=causal).logits[0, -1].argmax()))
    assert out.ids == ids[-4:]


# ---------------------------------------------------------------- 3. the one-shot GPU run

ABSENT_ON_THE_GPU_IMAGE = ("msgspec", "pygls", "lsprotocol", "watchfiles")  # device KINDS.md: its pip list


def gpu_image_pythons() -> list[str]:
    """This interpreter, with the packages the GPU image lacks made unimportable, and the one in
    DIFFU_LSP_GPU_IMAGE_PYTHON if set (a venv as the image is: torch, transformers 5.17, no msgspec)."""
    return [sys.executable] + [p for p in [os.environ.get("DIFFU_LSP_GPU_IMAGE_PYTHON")] if p]


def without_network() -> list[str]:
    try:
        subprocess.run(["unshare", "-rn", "true"], check=True, capture_output=True, timeout=10)
        return ["unshare", "-rn"]  # a new network namespace: no interface but loopback (down)
    except (OSError, subprocess.SubprocessError):
        return []  # HF_HUB_OFFLINE alone (the script sets it)


@pytest.mark.parametrize("python", gpu_image_pythons())
def test_the_gpu_script_runs_to_the_end_as_on_a_fresh_gpu_machine(python, tmp_path):
    if not Path(python).exists():
        pytest.skip(f"{python} does not exist")
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {ABSENT_ON_THE_GPU_IMAGE!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (not on the GPU image)', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n")
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(out), "PYTHON": python,
           "PYTHONPATH": str(blocker), "OMP_NUM_THREADS": "1"}
    script = [*without_network(), str(ROOT / "scripts" / "gpu-run.sh"), "--quick", "5", "--contexts", "128",
              "--per-forward", "8", "--shapes", "tiny,tiny"]
    run = subprocess.Popen(script, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the first shape's results are on disk while the second is measured
        first = None
        while run.poll() is None and first is None:
            found = out / "bench-gpu.json"
            first = found.read_text() if found.exists() else None
            time.sleep(0.1)
        log, _ = run.communicate(timeout=300)
    finally:
        run.kill()
        run.wait(10)
    assert run.returncode == 0, log[-3000:]
    assert first is not None and json.loads(first)[0]["summary"]["done"] == ["tiny"], log[-3000:]
    result = json.loads((out / "bench-gpu.json").read_text())[0]
    assert result["summary"]["done"] == ["tiny", "tiny"] and result["machine"]["device"] == "cpu"
    assert (out / "BENCHMARKS.md").read_text().count("<!-- bench:gpu -->") == 1
    assert "bench gpu: exit 0" in log and "gpu-run: exit 0" in log
    assert (out / "bench-gpu.log").read_text().count("shapes: random tiny, 128 tokens done") == 2

    failed = subprocess.run([*script[:-1], "no-such-shape"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert failed.returncode == 1, failed.stdout[-3000:]  # the benchmark's status, not tee's
    assert "unknown shape 'no-such-shape'" in failed.stdout and "gpu-run: exit 1" in failed.stdout


# ---------------------------------------------------------------- 8. warm-up, loading to the device

def test_load_model_warms_the_model_up_before_any_request(monkeypatch, tmp_path):
    import functools

    from transformers import Qwen2ForCausalLM

    calls, real = [], Qwen2ForCausalLM.forward

    @functools.wraps(real)
    def counting(self, *args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2ForCausalLM, "forward", counting)
    model = load_model(write_dream(tmp_path / "dream"), device="cpu", dtype="float32")
    assert calls == [(1, 16)]  # one short forward inside load_model
    result = model.fill(canvas_of(model, 4), alg="entropy", steps=4)
    assert len(calls) == 1 + result.forwards


def test_weights_go_straight_to_a_gpu_when_accelerate_is_there(monkeypatch, tmp_path):
    from transformers import Qwen2ForCausalLM

    from diffu_lsp.models import loading
    from diffu_lsp.errors import ModelLoadFailed

    seen = {}

    def from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(loading, "resolve_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(Qwen2ForCausalLM, "from_pretrained", from_pretrained)
    real_find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *args: object() if name == "accelerate" else real_find_spec(name, *args))
    with pytest.raises(ModelLoadFailed, match="stop here"):
        load_model(write_dream(tmp_path / "dream"), device="cuda", dtype="bfloat16")
    assert seen["device_map"] == torch.device("cuda", 0) and seen["dtype"] == torch.bfloat16


# ---------------------------------------------------------------- 5. the LM head on the scored rows only

def test_the_lm_head_runs_only_on_the_rows_each_job_scores(dream):
    from diffu_lsp.models.backend import CachedForward
    from diffu_lsp.sampler import Sampling, denoise

    head_rows, scored = [], []
    handle = dream.network.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[:-1].numel()))
    try:
        canvas = torch.tensor(canvas_of(dream, 12))
        for logits_fn in (dream.position_logits, CachedForward(dream, "delayed", None), CachedForward(dream, "dual", 3)):
            def counted(canvas, positions, logits_fn=logits_fn):
                scored.append(len(positions))
                return logits_fn(canvas, positions)
            denoise(counted, canvas, dream.mask_token_id, Sampling(alg="entropy", steps=6))
        assert head_rows == scored and len(scored) == 18
        head_rows.clear()
        short, long = torch.tensor(canvas_of(dream, 3)), torch.tensor(canvas_of(dream, 9))
        logits = dream.batch_position_logits([short, long, long], [torch.tensor([8, 9]), torch.tensor([11, 12, 13, 14, 15]),
                                                                   torch.tensor([8, 9])])
        assert head_rows == [2 + 5 + 2] and [len(x) for x in logits] == [2, 5, 2]  # not 3 x 7 (the union)
        assert torch.allclose(logits[2], dream.position_logits(long, torch.tensor([8, 9])), atol=1e-4)
    finally:
        handle.remove()


# ---------------------------------------------------------------- 7. budgets per step

class Crossings:
    """Calls that copy between host and device on a GPU: Tensor.to(<device>) and Tensor.cpu()."""

    def __init__(self, monkeypatch):
        self.to_device = self.to_host = 0
        real_to, real_cpu = torch.Tensor.to, torch.Tensor.cpu

        def ours() -> bool:  # called from diffu_lsp (transformers' own .to(x.device) calls are no copies)
            return sys._getframe(2).f_globals.get("__name__", "").startswith("diffu_lsp")

        def to(tensor, *args, **kwargs):
            if (any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs) and ours():
                self.to_device += 1
            return real_to(tensor, *args, **kwargs)

        def cpu(tensor, *args, **kwargs):
            self.to_host += ours()
            return real_cpu(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "cpu", cpu)


@pytest.mark.parametrize("cache", ("none",) + CACHES)
def test_host_device_crossings_per_step_stay_within_budget(cache, dream, monkeypatch):
    canvas = canvas_of(dream, 12)
    dream.fill(canvas, alg="entropy", steps=6, cache=cache)  # warm
    crossings = Crossings(monkeypatch)
    result = dream.fill(canvas, alg="entropy", steps=6, cache=cache)
    # one copy to the device per step (canvas, rows, run: concatenated); the sampler brings back its
    # three [N] results (token, p, score)
    assert crossings.to_device <= result.forwards
    assert crossings.to_host <= 3 * result.forwards


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """ATen ops dispatched, in all and inside one module's forwards."""

    def __init__(self, module):
        super().__init__()
        self.ops = self.inside = 0
        self.counting_inside = False
        self.handles = [module.register_forward_pre_hook(lambda *_: setattr(self, "counting_inside", True)),
                        module.register_forward_hook(lambda *_: setattr(self, "counting_inside", False))]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.inside += self.counting_inside
        return func(*args, **(kwargs or {}))


OPS_PER_LAYER = 72   # a Qwen2 decoder layer under transformers 5.25, mask-free with grouped K/V: 69-71
OPS_OUTSIDE_LAYERS = {"none": 70, "delayed": 80}  # embedding, rotary, norm, head, the sampler, the cache: 62 / 71


@pytest.mark.parametrize("cache", ("none", "delayed"))
def test_dispatched_ops_per_step_stay_within_budget(cache, dream):
    """ATen ops per denoising step: each is a kernel launch on a GPU, where a cached step of the
    7B shape is a few ms of work and launch overhead dominates (28 layers x the per-layer count).
    The budgets are today's counts with a margin: a dense mask per forward and K/V repeated per
    head (78-80 per layer, 61-70 outside) exceed them."""
    canvas = canvas_of(dream, 12)
    dream.fill(canvas, alg="entropy", steps=6, cache=cache)  # warm
    counter = OpCounter(dream.network.model.layers[0])
    try:
        with counter:
            result = dream.fill(canvas, alg="entropy", steps=6, cache=cache)
    finally:
        for handle in counter.handles:
            handle.remove()
    layers = dream.network.config.num_hidden_layers
    per_layer, outside = counter.inside / result.forwards, (counter.ops - layers * counter.inside) / result.forwards
    assert per_layer <= OPS_PER_LAYER and outside <= OPS_OUTSIDE_LAYERS[cache], (per_layer, outside)


# ---------------------------------------------------------------- 6. compiled graphs

def test_compiled_server_jobs_stay_within_a_graph_budget(monkeypatch, tmp_path):
    """torch.compile (dynamic shapes) makes a graph per distinct shape/stride/specialisation; past
    8 it silently runs eagerly. Server-like jobs (a user typing: the canvas grows, the hole moves;
    the server's delayed cache, with and without reuseKeys, and uncached) need three: the uncached
    forward, the cached full forward and the cached step (a grown buffer, a one-row LM head and the
    merged device copy once made more)."""
    graphs = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: real_compile(
        model, backend=counting, dynamic=options.get("dynamic")))
    torch._dynamo.reset()
    model = load_model(write_dream(tmp_path / "dream"), device="cpu", dtype="float32")
    text = "def f(x):\n    return x + 1\n\nprint(f(2))\n"
    jobs = [(cut, cache, reuse) for cache, reuse in (("delayed", False), ("delayed", True), ("none", False))
            for cut in (20, 23, 27, 30)]
    for cut, cache, reuse in jobs:
        prefix, suffix = model.encode(text[:cut]), model.encode(text[cut:])
        model.fill(prefix + [model.mask_token_id] * 8 + suffix, alg="threshold", threshold=0.5, cache=cache,
                   compiled=True, reuse_prefix=reuse)
    assert model.compile_error is None
    assert len(graphs) <= 3, f"{len(graphs)} graphs for {len(jobs)} jobs"
