"""shapes: decoding figures of the real checkpoints' shapes, with random weights.

Speed does not depend on the weights: a network of a checkpoint's shape runs as fast as the real
one. Each shape here is the real `config.json` (field names, model_type, special-token ids) of
DiffuCoder-7B / Dream-7B, LLaDA-8B or Open-dCoder-0.5B; the network is built from it by the same
config converters and transformers classes `load_model` uses, directly on the target device in the
target dtype (nothing touches the disk, nothing is downloaded), randomly initialised, and wrapped in
the same DiffusionModel the server runs.

Random weights have no confidence to threshold on, so the reveal schedule is fixed: Dream's
schedule with steps = 64 / k reveals about k tokens per forward (k = 1, 2, 4, 8). For each context
length (the 64-token block sits before a 64-token suffix) and each K/V cache mode, one job decodes
the block; the time spent inside the network (forward hooks, synchronised on CUDA) is measured
apart from the rest: the sampler's and backend's own overhead per step. The autoregressive baseline
is the same network, causal, with a K/V cache, one token per forward.
"""

from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass

import torch

from . import common

BLOCK = 64          # tokens decoded per job
SUFFIX = 64         # tokens after the block
PER_FORWARD = (1, 2, 4, 8)
CONTEXTS = (256, 1024, 4096)
CPU_CONTEXTS = (256, 1024)   # 4,096 tokens: several seconds per full forward of the 0.5B shape here
CPU_PER_FORWARD = (4, 8)     # all four took 27 min for the 0.5B shape on 2 shared cores (1/forward at 1,024: 7 min)
CACHE_MODES = ("none", "prefix", "dual", "delayed")

# The real config.json of each checkpoint (fields the loader reads; ids are the real ones).
DREAM_7B = {
    "architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643,
    "mask_token_id": 151666, "use_sliding_window": False, "sliding_window": None, "torch_dtype": "bfloat16",
}
LLADA_8B = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 4096, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "mlp_hidden_size": 12288, "embedding_size": 126464, "vocab_size": 126464,
    "max_sequence_length": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "activation_type": "silu",
    "include_bias": False, "include_qkv_bias": False, "weight_tying": False, "eos_token_id": 126081,
    "pad_token_id": 126081, "mask_token_id": 126336, "torch_dtype": "bfloat16",
}
OPEN_DCODER_05B = {  # stock qwen2 (Qwen2.5-Coder-0.5B); the mask id comes from its tokenizer's added <M>
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
}
SDAR_4B = {  # JetLM/SDAR-4B-Chat (Qwen3-4B shapes, untied): a block diffusion model, blocks of 4
    "architectures": ["SDARForCausalLM"], "model_type": "sdar", "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 151643,
    "eos_token_id": 151643, "mask_token_id": 151669, "block_size": 4, "use_sliding_window": False,
    "sliding_window": None, "torch_dtype": "bfloat16",
}
SDAR_8B = {**SDAR_4B, "hidden_size": 4096, "intermediate_size": 12288}  # JetLM/SDAR-8B-Chat (Qwen3-8B shapes)
SDAR_30B_A3B = {  # JetLM/SDAR-30B-A3B-Chat: Qwen3-30B-A3B's shapes (its own config.json not read here), 128 experts, 8 per token
    **SDAR_4B, "architectures": ["SDARMoeForCausalLM"], "model_type": "sdar_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [],
}
FAST_DLLM_V2_7B = {  # Efficient-Large-Model/Fast_dLLM_v2_7B (Qwen2.5-7B-Instruct shapes): blocks of 32, sub-blocks of 8
    "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "bd_size": 32, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "pad_token_id": 151645, "use_sliding_window": False, "sliding_window": None, "torch_dtype": "bfloat16",
}
LLADA2_MINI = {  # inclusionAI/LLaDA2.0-mini and LLaDA2.1-mini (same network): 16 B parameters, about 1.4 B active
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "hidden_size": 2048, "intermediate_size": 5120,
    "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
    "vocab_size": 157184, "max_position_embeddings": 32768, "rope_theta": 600000, "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "first_k_dense_replace": 1, "moe_intermediate_size": 512,
    "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "score_function": "sigmoid", "norm_topk_prob": True, "use_qk_norm": True,
    "use_qkv_bias": False, "use_bias": False, "tie_word_embeddings": False, "eos_token_id": 156892,
    "pad_token_id": 156892, "torch_dtype": "bfloat16",
}
STABLE_DIFFCODER_8B = {  # ByteDance-Seed/Stable-DiffCoder-8B-{Base,Instruct} (Seed-Coder-8B shapes, Llama layout)
    "architectures": ["StableDiffcoderForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 155136, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
TINY = {**DREAM_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192}

SHAPES = {  # name -> (config.json, mask id, what it stands for)
    "dream-7b": (DREAM_7B, 151666, "DiffuCoder-7B-{Base,Instruct,cpGRPO}, Dream-v0-7B, Dream-Coder-v0-7B"),
    "llada-8b": (LLADA_8B, 126336, "LLaDA-8B-{Base,Instruct}"),
    "open-dcoder-0.5b": (OPEN_DCODER_05B, 151665, "Open-dCoder-0.5B"),
    "sdar-4b": (SDAR_4B, 151669, "SDAR-4B-Chat (block diffusion)"),
    "sdar-8b": (SDAR_8B, 151669, "SDAR-8B-Chat (block diffusion)"),
    "sdar-30b-a3b": (SDAR_30B_A3B, 151669, "SDAR-30B-A3B-Chat (block diffusion, mixture of experts; Qwen3-30B-A3B's "
                     "shape)"),
    "fast-dllm-v2-7b": (FAST_DLLM_V2_7B, 151665, "Fast_dLLM_v2_7B (block diffusion)"),
    "llada2-mini": (LLADA2_MINI, 156895, "LLaDA2.0-mini, LLaDA2.1-mini (block diffusion, mixture of experts)"),
    "stable-diffcoder-8b": (STABLE_DIFFCODER_8B, 155103, "Stable-DiffCoder-8B-{Base,Instruct} (block diffusion; "
                            "mask id assumed)"),
    "tiny": (TINY, 151666, "Dream layout, 2 layers of width 64 (smoke test)"),
    "tiny-sdar": ({**SDAR_4B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 8192},
                  151669, "SDAR layout, 2 layers of width 64 (smoke test)"),
}
BLOCK_CACHE_MODES = ("none", "block")  # block models: recompute everything every forward, or the exact block cache
CPU_SHAPES = ("open-dcoder-0.5b",)
GPU_SHAPES = ("dream-7b", "llada-8b")


def network_config(config: dict):
    """config.json -> the transformers config load_model builds for it (same converters)."""
    from transformers import Qwen2Config

    from ..models.block import BLOCK_FAMILIES, network_for
    from ..models.loading import detect_family, llama_config_for_llada, qwen2_config_for_dream

    family = detect_family(config)
    if family in BLOCK_FAMILIES.values():
        return family, network_for(family, config)[1]
    if family == "dream":
        return family, qwen2_config_for_dream(config)
    if family == "qwen2-diffusion":
        return family, Qwen2Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")})
    return family, llama_config_for_llada(config)


def build(shape: str, device=None, dtype=None, layers: int | None = None):
    """A DiffusionModel of `shape` with random weights, made on `device` in `dtype`; `layers`: only
    that many of its transformer layers (a forward costs about that share, plus the LM head)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    from ..models.backend import DiffusionModel
    from ..models.block import BLOCK_FAMILIES, BlockDiffusionModel, family_options, network_for
    from ..models.loading import resolve_device, resolve_dtype

    config, mask_id, _ = SHAPES[shape]
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    family, net_config = network_config(config)
    if layers:
        net_config.num_hidden_layers = layers
        net_config.layer_types = net_config.layer_types[:layers] if getattr(net_config, "layer_types", None) else None
    net_config._attn_implementation = "sdpa"  # what from_pretrained picks
    started = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # parameters are created (and initialised) on the device
            network = (network_for(family, config)[0] if family in BLOCK_FAMILIES.values()
                       else LlamaForCausalLM if family == "llada" else Qwen2ForCausalLM)(net_config)
    finally:
        torch.set_default_dtype(default_dtype)
    network.eval().requires_grad_(False)
    eos = config["eos_token_id"]
    if family in BLOCK_FAMILIES.values():  # Qwen's tokenizers: <|endoftext|>, <|im_end|>, FIM tokens
        qwen = family in ("sdar", "fast-dllm-v2")
        return BlockDiffusionModel(
            network=network, tokenizer=None, family=family, name=f"random {shape}", mask_token_id=mask_id,
            eos_token_ids=(151643, 151645) if qwen else (eos,), bos_token_id=None,
            max_length=net_config.max_position_embeddings, load_seconds=time.perf_counter() - started,
            fim_ids=(151659, 151661, 151660) if qwen else None, **family_options(family, config))
    return DiffusionModel(
        network=network, tokenizer=None, family=family, name=f"random {shape}", mask_token_id=mask_id,
        eos_token_ids=(eos,), bos_token_id=config.get("bos_token_id"), shift_logits=family != "llada",
        max_length=net_config.max_position_embeddings, load_seconds=time.perf_counter() - started)


class NetworkClock:
    """Seconds spent inside the network's forwards (hooks; synchronised on CUDA)."""

    def __init__(self, model):
        self.cuda = model.device.type == "cuda"
        self.seconds, self.calls, self._started = 0.0, 0, 0.0
        self.handles = [model.network.register_forward_pre_hook(self._before),
                        model.network.register_forward_hook(self._after)]

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _before(self, *_):
        self._sync()
        self._started = time.perf_counter()

    def _after(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self._started
        self.calls += 1

    def close(self):
        for handle in self.handles:
            handle.remove()


@dataclass
class Job:
    context: int
    cache: str
    per_forward: int
    forwards: int
    ms: float            # the whole job (one 64-token block)
    network_ms: float    # of which inside the network

    @property
    def overhead_ms_per_step(self) -> float:
        return (self.ms - self.network_ms) / self.forwards

    @property
    def network_ms_per_forward(self) -> float:
        return self.network_ms / self.forwards


def canvas_for(model, context: int, seed: int = 0) -> list[int]:
    """`context` random ordinary token ids with a BLOCK-token hole before the last SUFFIX tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(model.eos_token_ids[0], model.mask_token_id) - 1, (context,), generator=generator).tolist()
    start = context - SUFFIX - BLOCK
    ids[start:start + BLOCK] = [model.mask_token_id] * BLOCK
    return ids


def sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def run_job(model, context: int, cache: str, per_forward: int, compiled: bool = False) -> Job:
    from ..sampler import Sampling

    canvas = canvas_for(model, context)
    block_size = getattr(model, "block_size", None)
    part = getattr(model, "sub_block", None) or block_size  # a block model decodes a block (or sub-block) at a time
    sampling = Sampling(alg="maskgit_plus", steps=(part or BLOCK) // per_forward)
    if block_size:
        model.block_cache = cache != "none"  # a bidirectional mode named (bench gpu's compile run): the block cache
    clock = NetworkClock(model)
    try:
        sync(model)
        started = time.perf_counter()
        result = model.fill(canvas, sampling, cache=cache, compiled=compiled)
        sync(model)
        seconds = time.perf_counter() - started
    finally:
        clock.close()
    return Job(context, cache, per_forward, result.forwards, 1000 * seconds, 1000 * clock.seconds)


def autoregressive_ms_per_token(model, context: int) -> tuple[float, float]:
    """(prefill ms, ms per generated token) of greedy KV-cached causal decoding of BLOCK tokens
    after a `context - BLOCK`-token prompt (the same context as the diffusion canvas)."""
    from .baseline import autoregressive

    ids = canvas_for(model, context)
    prompt = [t for t in ids if t != model.mask_token_id]
    first = autoregressive(model, prompt, [], 1)
    out = autoregressive(model, prompt, [], BLOCK)
    return 1000 * first.seconds, 1000 * max(out.seconds - first.seconds, 0.0) / (BLOCK - 1)


def peak_memory_mb(model) -> float:
    if model.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (KiB on Linux)


def weights_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.network.parameters()) / 2**20


def measure(model, contexts, per_forward, caches, quick: bool = False, warm_up: bool = True) -> dict:
    """Every (context, cache mode, tokens per forward) job once after one warm-up job, and the AR
    baseline per context."""
    if getattr(model, "block_size", None):  # a block model: its exact cache against recomputation
        part = getattr(model, "sub_block", None) or model.block_size
        caches, per_forward = BLOCK_CACHE_MODES, tuple(k for k in per_forward if k <= part) or (1,)
    if warm_up:
        run_job(model, contexts[0], caches[-1], per_forward[-1])  # warm-up: allocator, lazy init
    jobs = []
    for context in contexts:
        for cache in caches:
            for k in per_forward:
                jobs.append(run_job(model, context, cache, k))
        common.progress(f"shapes: {model.name}, {context} tokens done")
    ar = {context: autoregressive_ms_per_token(model, context) for context in contexts}
    return {"jobs": jobs, "ar": ar}


def shape_tables(model, shape: str, figures: dict, seconds_built: float) -> list[dict]:
    jobs, ar = figures["jobs"], figures["ar"]
    contexts = sorted({j.context for j in jobs})
    caches = list(dict.fromkeys(j.cache for j in jobs))
    ks = sorted({j.per_forward for j in jobs})
    by = {(j.context, j.cache, j.per_forward): j for j in jobs}
    config = SHAPES[shape][0]
    layers, full = model.network.config.num_hidden_layers, config.get("num_hidden_layers") or config.get("n_layers")
    part = f", {layers} of its {full} layers" if layers != full else ""
    label = (f"{shape} ({model.parameter_count / 1e9:.2f} B params{part}, {str(model.dtype).replace('torch.', '')}, "
             f"{model.device.type})")
    step_rows = []
    for context in contexts:
        for cache in caches:
            k = ks[-1]
            job = by[(context, cache, k)]
            step_rows.append([context, cache, job.forwards, job.ms / job.forwards, job.network_ms_per_forward,
                              job.overhead_ms_per_step,
                              100 * common.ratio(job.overhead_ms_per_step, job.network_ms_per_forward)])
    block_columns = ["context", "K/V cache"] + [f"ms/block, {k}/forward" for k in ks] + ["AR ms/token", "AR ms/block"]
    block_rows = []
    for context in contexts:
        prefill, per_token = ar[context]
        for cache in caches:
            block_rows.append([context, cache] + [by[(context, cache, k)].ms for k in ks]
                              + [per_token, prefill + (BLOCK - 1) * per_token])
    memory = [[label, weights_mb(model), peak_memory_mb(model), seconds_built]]
    return [
        common.table(f"{label}: one denoising step ({BLOCK}-token block, {ks[-1]} tokens/forward)",
                     ["context", "K/V cache", "forwards", "ms/step", "network ms/forward", "overhead ms/step",
                      "overhead % of forward"], step_rows),
        common.table(f"{label}: ms per {BLOCK}-token block by tokens revealed per forward, and the KV-cached "
                     "autoregressive baseline", block_columns, block_rows),
        common.table(f"{label}: memory", ["shape", "weights MiB", "peak MiB", "build s"], memory),
    ]


def options_lists(options: common.Options, device: torch.device):
    extra = options.extra
    quick = options.quick
    shapes = extra.get("shapes") or (("tiny",) if quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES))
    contexts = extra.get("contexts") or ((128, 256) if quick else (CONTEXTS if device.type == "cuda" else CPU_CONTEXTS))
    per_forward = extra.get("per_forward") or ((4, 8) if quick else (PER_FORWARD if device.type == "cuda" else CPU_PER_FORWARD))
    return tuple(shapes), tuple(contexts), tuple(per_forward)


def run(options: common.Options, model=None) -> dict:
    from ..models.loading import resolve_device

    started = time.perf_counter()
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    shapes, contexts, per_forward = options_lists(options, device)
    tables, summary = [], {"shapes": {}}
    for shape in shapes:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = build(shape, device, options.dtype, options.extra.get("layers"))
        common.progress(f"shapes: built {shape} in {model.load_seconds:.1f} s")
        figures = measure(model, contexts, per_forward, CACHE_MODES, options.quick)
        tables += shape_tables(model, shape, figures, model.load_seconds)
        summary["shapes"][shape] = {
            "parameters": model.parameter_count, "dtype": str(model.dtype).replace("torch.", ""),
            "jobs": [dict(vars(j), overhead_ms_per_step=j.overhead_ms_per_step) for j in figures["jobs"]],
            "ar_ms_per_token": {c: v[1] for c, v in figures["ar"].items()},
            "weights_mb": weights_mb(model), "peak_mb": peak_memory_mb(model),
        }
        summary["device"] = str(model.device)
        del model, figures
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    notes = [
        "Random weights in each checkpoint's real shape (config.json fields and special ids), built on the device in "
        "the dtype by the converters and transformers classes `load_model` uses, run through the server's "
        "DiffusionModel.fill: a real checkpoint of the shape runs as fast.",
        f"Each job decodes a {BLOCK}-token block that ends {SUFFIX} tokens before the end of a canvas of random "
        "ordinary tokens; Dream's schedule with steps = 64/k fixes about k tokens revealed per forward (random "
        "weights have no confidence to threshold on). One warm-up job, then each job once.",
        "network ms: inside the network's forward (forward hooks; CUDA synchronised); overhead: everything else "
        "in the job (sampler, masks, logits to the CPU), per step. Cached modes' first step is a full forward.",
        "AR: the same network with its causal mask and a K/V cache, greedy, one token per forward after a prefill "
        "of the same context; ms/block = prefill + 63 tokens.",
        "peak MiB: CUDA max allocated, or on a CPU the process's peak resident memory.",
        "Block models (sdar-*, fast-dllm-v2-*): the FIM prompt holds the context (the suffix before the middle), the "
        "64 tokens are decoded block by block (SDAR: blocks of 4; Fast-dLLM v2: blocks of 32 in sub-blocks of 8) "
        "with Dream's schedule at (block or sub-block)/k steps each; K/V cache 'block' is the exact cache (the "
        "prompt's and each finished block's keys/values computed once), 'none' recomputes the whole sequence every "
        "forward. Fast-dLLM v2 also spends one forward per block storing it and choosing the next block's first token.",
    ]
    if options.extra.get("layers"):
        notes.append(f"Only {options.extra['layers']} transformer layers of each shape were built (`--layers`): a "
                     "forward costs about that share of the whole network's, plus the embedding and LM head.")
    if device.type == "cpu" and not options.extra.get("contexts"):
        notes.append(f"On this CPU the contexts are {', '.join(map(str, contexts))} tokens (4,096: several seconds "
                     "per full forward of the 0.5B shape; `--contexts 4096` runs it).")
    extra = {"model": f"random weights in the shapes {', '.join(shapes)}", "device": summary.get("device", str(device)),
             "dtype": next(iter(summary["shapes"].values()))["dtype"]}
    return {"suite": "shapes", "title": "Model shapes (random weights, real sizes)", "tables": tables,
            "summary": summary, "notes": notes, "seconds": time.perf_counter() - started, "machine_extra": extra}
