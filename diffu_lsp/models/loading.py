"""load_model: a local folder or hub id -> a warm DiffusionModel on the best device.

Families are told apart by `config.json` alone and never by running a checkpoint's own code
(`trust_remote_code` stays off even where `auto_map` names custom classes):
- Dream / DiffuCoder / Dream-Coder: `model_type "Dream"`, Qwen2 weight keys, shifted logits.
- plain `qwen2` diffusion checkpoints (Open-dCoder style): mask token from the tokenizer, shifted.
- LLaDA: `model_type "llada"`, OLMo-style keys remapped onto Llama, no shift.
- Block diffusion (models/block.py), decoded block by block behind a fill-in-the-middle prompt:
  SDAR (`model_type "sdar"`, Qwen3 weight keys, no shift; `"sdar_moe"`, SDAR-30B-A3B: Qwen3-MoE's) and
  Fast-dLLM v2 (`model_type "Fast_dLLM_Qwen"`, Qwen2 weight keys, shifted inside a block), LLaDA 2.x (`model_type
  "llada2_moe"`, a mixture of experts: our own network, models/llada2.py) and Stable-DiffCoder
  (`model_type "llama"` with architecture StableDiffcoderForCausalLM: stock Llama).
The bundled tiny model is a Dream-format folder inside the package.

Before anything is built (:func:`check_checkpoint`, cheap and outside any load lock): weights must be
safetensors (a pickle can run code when it is loaded) unless pickled weights are allowed
explicitly (:data:`ALLOW_PICKLED_WEIGHTS`), and config.json's sizes must be within
:data:`CONFIG_BOUNDS` and describe no more parameters than the safetensors headers hold.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import struct
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import cached_file, logging as transformers_logging

from ..errors import ModelLoadFailed
from ..sampler import Sampling
from .backend import DiffusionModel
from .block import BLOCK_FAMILIES, BlockDiffusionModel, block_family, family_options, fim_of, generation_eos, network_for
from .tokenizer import load_tokenizer

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-dream"
SUPPORTED = "Dream/DiffuCoder/Dream-Coder (model_type 'Dream'), qwen2 diffusion (model_type 'qwen2'), LLaDA (model_type 'llada'), SDAR (model_type 'sdar' or 'sdar_moe'), Fast-dLLM v2 (model_type 'Fast_dLLM_Qwen'), LLaDA 2.x (model_type 'llada2_moe'), Stable-DiffCoder (model_type 'llama', StableDiffcoderForCausalLM)"
MASK_TOKEN_NAMES = ("<|mask|>", "<M>", "<mask>", "[MASK]", "<|MASK|>", "|<MASK>|")

# LLaDA's weight names -> Llama's (regex, replacement), for from_pretrained's key_mapping.
LLADA_KEY_MAPPING = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
    r"^model\.transformer\.blocks\.(\d+)\.q_proj\.": r"model.layers.\1.self_attn.q_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.k_proj\.": r"model.layers.\1.self_attn.k_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.v_proj\.": r"model.layers.\1.self_attn.v_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_out\.": r"model.layers.\1.self_attn.o_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.up_proj\.": r"model.layers.\1.mlp.up_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_out\.": r"model.layers.\1.mlp.down_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.": r"model.layers.\1.input_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
}


transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto": CUDA, else MPS, else CPU. An explicit device that is absent is an error."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadFailed("CUDA was requested but torch sees no CUDA device (is this a CPU build of torch?)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadFailed("MPS was requested but is not available on this machine")
    return device


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX with AVX-512 BF16, as
    on Xeon Sapphire Rapids and later), where oneDNN runs bf16 linear layers faster than float32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported()
                    and torch.backends.mkldnn.is_available())
    except AttributeError:  # a torch without these probes
        return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/"auto": bfloat16 on a GPU and on a CPU with bf16 matrix hardware (AMX), else float32.
    On such a CPU a denoising job at the default budgets takes about 0.55x the time in bfloat16
    (BENCHMARKS.md, speed: dtype); elsewhere bfloat16 is emulated and slower."""
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadFailed(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16") from None


def _fetcher(name_or_path: str):
    """file name -> local path (None when the checkpoint has no such file)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return lambda name: str(folder / name) if (folder / name).is_file() else None
    if folder.exists() or name_or_path.startswith((".", "/", "~")):
        raise ModelLoadFailed(f"model folder {name_or_path!r} does not exist or is not a folder")
    return lambda name: cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False)


ALLOW_PICKLED_WEIGHTS = "DIFFU_LSP_ALLOW_PICKLED_WEIGHTS"  # "1": load pickled weights (CLI --allow-pickled-weights)
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own limit
# Far above every supported checkpoint (Dream 7B: 28 layers, hidden 3584, vocab 152064, 131072 positions).
CONFIG_BOUNDS = {"num_hidden_layers": 1024, "hidden_size": 65536, "intermediate_size": 1 << 20,
                 "num_attention_heads": 1024, "num_key_value_heads": 1024, "vocab_size": 1 << 22,
                 "max_position_embeddings": 1 << 24}
_LAYER_INDEX = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")


def pickled_weights_allowed() -> bool:
    """Whoever starts diffu-lsp says so (``--allow-pickled-weights``, or the environment variable
    :data:`ALLOW_PICKLED_WEIGHTS` set to 1); no settings layer can, a workspace's least of all."""
    return os.environ.get(ALLOW_PICKLED_WEIGHTS) == "1"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint checked before anything is built: its config, family and weight files."""

    name: str
    config: dict
    family: str
    safetensors: tuple[str, ...]  # local paths; empty when pickled weights are allowed and used

    @property
    def load_options(self) -> dict:
        """from_pretrained's options for the weights: safetensors only, or (allowed) pickles
        through torch's restricted unpickler, pinned here rather than left to a default."""
        return {"use_safetensors": True} if self.safetensors else {"use_safetensors": False, "weights_only": True}


def safetensors_files(name: str, fetch) -> tuple[str, ...]:
    """The checkpoint's safetensors files (one, or the shards of its index); () when it has none."""
    index = fetch("model.safetensors.index.json")
    if index:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        paths = tuple(fetch(shard) for shard in shards)
        if not shards or not all(paths):
            raise ModelLoadFailed(f"cannot load the weights of {name!r}: model.safetensors.index.json names "
                                  "shards that are not there")
        return paths
    single = fetch("model.safetensors")
    return (single,) if single else ()


def refuse_pickled_weights(name: str) -> None:
    """The error for a checkpoint without safetensors weights, naming its pickled file if it is a folder."""
    folder = Path(name).expanduser()
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES) if folder.is_dir() else []
    found = f"its weights are pickled ({pickled[0]}), and a pickle can run code when it is loaded. " if pickled else ""
    where = "" if folder.is_dir() else " in the local cache (`diffu-lsp pull` fetches a hub checkpoint)"
    raise ModelLoadFailed(
        f"{name!r} has no safetensors weights{where} (model.safetensors); {found}diffu-lsp loads pickled weights "
        f"only when started with --allow-pickled-weights (or {ALLOW_PICKLED_WEIGHTS}=1): convert the checkpoint "
        "to safetensors, or pass that flag if you trust it")


def safetensors_shapes(name: str, path: str) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header alone (no tensor is read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size <= MAX_SAFETENSORS_HEADER:
            raise ModelLoadFailed(f"cannot load the weights of {name!r}: {Path(path).name} is not a safetensors file")
        try:
            header = json.loads(f.read(size))
            return {key: [int(n) for n in entry["shape"]] for key, entry in header.items() if key != "__metadata__"}
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ModelLoadFailed(f"cannot load the weights of {name!r}: {Path(path).name} has a malformed "
                                  "safetensors header") from None


def check_sizes(name: str, network_config, shapes: dict[str, list[int]]) -> None:
    """config.json's sizes within :data:`CONFIG_BOUNDS`, its layers those the weights have, and the
    parameters it describes not many more than they hold: nothing is built from a config that
    would take minutes and gigabytes to make what the weights cannot fill."""
    sizes = {}
    for field, bound in CONFIG_BOUNDS.items():
        value = getattr(network_config, field, None)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= bound:
            raise ModelLoadFailed(f"{name!r}: config.json's {field} is {value!r}; expected a whole number from 1 "
                                  f"to {bound:,}")
        sizes[field] = value
    if not shapes:
        return  # pickled weights (allowed): nothing to compare with before loading them
    layers = {int(m.group(1)) for key in shapes if (m := _LAYER_INDEX.search(key))}
    if layers and sizes["num_hidden_layers"] > len(layers):
        raise ModelLoadFailed(f"{name!r}: config.json's num_hidden_layers is {sizes['num_hidden_layers']:,} but its "
                              f"weights have {len(layers)} layers")
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    head_dim = getattr(network_config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * 2 * (heads + sizes["num_key_value_heads"])
    per_layer = attention + 3 * hidden * sizes["intermediate_size"]
    experts = getattr(network_config, "num_experts", None)  # a mixture of experts (LLaDA 2.x, SDAR-30B-A3B)
    if isinstance(experts, int) and experts > 0:
        per_layer += 3 * hidden * experts * int(getattr(network_config, "moe_intermediate_size", None) or 0)
    tied = bool(getattr(network_config, "tie_word_embeddings", False))
    described = sizes["num_hidden_layers"] * per_layer + sizes["vocab_size"] * hidden * (1 if tied else 2)
    stored = sum(_product(shape) for shape in shapes.values())
    if described > 1.5 * stored + 1_000_000:
        raise ModelLoadFailed(f"{name!r}: config.json describes about {described:,} parameters, its weights hold "
                              f"{stored:,}: check hidden_size, intermediate_size, vocab_size and the layer count")


def _product(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def check_checkpoint(name_or_path: str | Path | None) -> Checkpoint:
    """Read and check a checkpoint before loading it: config.json, its family, its weight files
    (safetensors unless pickles are allowed) and their headers against the config. Cheap: no
    weights are read, so the daemon does it outside its load lock."""
    name = str(name_or_path) if name_or_path is not None else str(BUNDLED_MODEL)
    config = read_config(name)
    family = detect_family(config)
    fetch = _fetcher(name)
    files = safetensors_files(name, fetch)
    if not files and not pickled_weights_allowed():
        refuse_pickled_weights(name)
    shapes: dict[str, list[int]] = {}
    for path in files:
        shapes.update(safetensors_shapes(name, path))
    try:
        network_config = (network_for(family, config)[1] if family in BLOCK_FAMILIES.values()
                          else llama_config_for_llada(config) if family == "llada" else qwen2_config_for_dream(config))
    except Exception as error:  # noqa: BLE001 - missing keys, wrong types (transformers' strict dataclasses), ...
        raise ModelLoadFailed(f"{name!r}: config.json does not describe a {family} network: "
                              f"{type(error).__name__}: {error}".splitlines()[0]) from None
    check_sizes(name, network_config, shapes)
    return Checkpoint(name, config, family, files)


def read_config(name_or_path: str) -> dict:
    try:
        path = _fetcher(name_or_path)("config.json")
    except ModelLoadFailed:
        raise
    except Exception as error:  # hub unreachable, unknown repo id, ...
        raise ModelLoadFailed(f"cannot fetch {name_or_path!r}: {error.__class__.__name__}: {error}".splitlines()[0]) from error
    if not path:
        raise ModelLoadFailed(f"{name_or_path!r} has no config.json; supported formats: {SUPPORTED}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def detect_family(config: dict) -> str:
    model_type = str(config.get("model_type", "")).lower()
    if model_type == "dream":
        return "dream"
    if model_type == "qwen2":
        return "qwen2-diffusion"
    if model_type == "llada":
        return "llada"
    if block_family(config):
        return block_family(config)
    raise ModelLoadFailed(f"unsupported model_type {config.get('model_type')!r}; supported formats: {SUPPORTED}")


def qwen2_config_for_dream(config: dict) -> Qwen2Config:
    """Dream's config carries Qwen2's field names; drop what names Dream's own classes."""
    fields = {k: v for k, v in config.items()
              if k not in ("model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype")}
    return Qwen2Config(**fields)


def llama_config_for_llada(config: dict) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=config["d_model"],
        num_attention_heads=config["n_heads"],
        num_key_value_heads=config.get("n_kv_heads") or config["n_heads"],
        num_hidden_layers=config["n_layers"],
        intermediate_size=config["mlp_hidden_size"],
        vocab_size=config.get("embedding_size") or config["vocab_size"],
        max_position_embeddings=config.get("max_sequence_length", 4096),
        rms_norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=config.get("rope_theta", 10000.0),
        attention_bias=bool(config.get("include_qkv_bias") or config.get("include_bias")),
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        hidden_act=config.get("activation_type", "silu"),
        eos_token_id=config.get("eos_token_id"), pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"), use_cache=False,
    )


def _mask_token_id(config: dict, tokenizer) -> int:
    if isinstance(config.get("mask_token_id"), int):
        return config["mask_token_id"]
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return tokenizer.mask_token_id
    vocab = tokenizer.get_vocab()
    for name in MASK_TOKEN_NAMES:
        if name in vocab:
            return vocab[name]
    raise ModelLoadFailed("cannot find the mask token: no mask_token_id in config.json and no mask token in the tokenizer")


def _ids(*values) -> tuple[int, ...]:
    found = []
    for value in values:
        for token_id in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(token_id, int) and token_id not in found:
                found.append(token_id)
    return tuple(found)


def generation_defaults(fetch) -> dict:
    """Sampling defaults the checkpoint ships in generation_config.json (only fields we know)."""
    path = fetch("generation_config.json")
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    known = {f.name for f in dataclasses.fields(Sampling)}
    defaults = {}
    for key, value in config.items():
        if key not in known or value is None:
            continue
        try:
            Sampling(**{key: value})
        except (TypeError, ValueError):  # e.g. Dream's own "alg" names that our sampler does not have
            continue
        defaults[key] = value
    return defaults


def load_model(name_or_path: str | Path | None = None, device=None, dtype=None, *,
               checkpoint: Checkpoint | None = None) -> DiffusionModel:
    """Load a diffusion code model. None = the bundled tiny model; else a local folder or hub id.

    device: None/"auto" (CUDA, else MPS, else CPU), "cpu", "cuda", "cuda:1", "mps".
    dtype: None/"auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16".
    checkpoint: :func:`check_checkpoint`'s result when the caller checked it already.
    Raises ModelLoadFailed with a one-line reason on any failure.
    """
    started = time.perf_counter()
    name = str(name_or_path) if name_or_path is not None else str(BUNDLED_MODEL)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    checkpoint = checkpoint if checkpoint is not None and checkpoint.name == name else check_checkpoint(name)
    config, family = checkpoint.config, checkpoint.family
    try:
        tokenizer = load_tokenizer(_fetcher(name))
    except Exception as error:
        raise ModelLoadFailed(f"cannot build the tokenizer of {name!r}: {error}") from error
    load = dict(dtype=dtype, trust_remote_code=False, output_loading_info=True, **checkpoint.load_options)
    if device.type != "cpu" and importlib.util.find_spec("accelerate"):  # transformers needs it for device_map
        load["device_map"] = device  # weights straight to the device, not through the CPU's memory
    try:
        if family == "dream":
            network, info = Qwen2ForCausalLM.from_pretrained(name, config=qwen2_config_for_dream(config), **load)
        elif family == "qwen2-diffusion":
            network, info = Qwen2ForCausalLM.from_pretrained(name, **load)
        elif family == "llada2":  # no transformers class: our own network, the safetensors loaded as they are
            if not checkpoint.safetensors:
                raise ModelLoadFailed(f"{name!r}: LLaDA 2.x loads from safetensors only")
            from .llada2 import load_llada2
            network, info = load_llada2(checkpoint.safetensors, config, dtype, device), {}
        elif family in BLOCK_FAMILIES.values():
            network_class, network_config = network_for(family, config)
            network, info = network_class.from_pretrained(name, config=network_config, **load)
        else:
            network, info = LlamaForCausalLM.from_pretrained(
                name, config=llama_config_for_llada(config), key_mapping=LLADA_KEY_MAPPING, **load)
    except torch.OutOfMemoryError as error:
        raise ModelLoadFailed(f"out of memory loading {name!r} on {device}: {error}".splitlines()[0]) from error
    except Exception as error:
        raise ModelLoadFailed(f"cannot load the weights of {name!r}: {error}".splitlines()[0]) from error
    missing = sorted(set(info.get("missing_keys", ())) - {"lm_head.weight"} if network.config.tie_word_embeddings
                     else set(info.get("missing_keys", ())))
    if missing:
        raise ModelLoadFailed(f"{name!r} lacks weights the {family} layout needs, e.g. {missing[0]}")
    network = network.to(device).eval()
    network.requires_grad_(False)

    mask_id = _mask_token_id(config, tokenizer)
    eos_ids = _ids(config.get("eos_token_id"), config.get("pad_token_id"), tokenizer.eos_token_id, tokenizer.pad_token_id)
    if not eos_ids:
        raise ModelLoadFailed("the checkpoint names no eos_token_id / pad_token_id")
    max_length = config.get("max_position_embeddings") or config.get("max_sequence_length") or 4096
    if family in BLOCK_FAMILIES.values():
        model = BlockDiffusionModel(
            network=network, tokenizer=tokenizer, family=family, name=name, mask_token_id=mask_id,
            eos_token_ids=_ids(eos_ids, generation_eos(_fetcher(name)("generation_config.json"))), bos_token_id=None,
            max_length=int(max_length), load_seconds=time.perf_counter() - started, fim_ids=fim_of(tokenizer)[0],
            fim_suffix_first=fim_of(tokenizer)[1], **family_options(family, config, name))
    else:
        model = DiffusionModel(
            network=network, tokenizer=tokenizer, family=family, name=name, mask_token_id=mask_id,
            eos_token_ids=eos_ids,
            bos_token_id=config.get("bos_token_id") if isinstance(config.get("bos_token_id"), int) else None,
            shift_logits=family != "llada", max_length=int(max_length),
            load_seconds=time.perf_counter() - started, default_sampling=generation_defaults(_fetcher(name)),
        )
    model.warm_up()  # the first request does not pay for CUDA/cuBLAS initialisation
    model.load_seconds = time.perf_counter() - started
    return model
