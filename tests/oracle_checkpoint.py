"""What every parity oracle script (tests/*_oracle.py) does first: build the authors' network from a
checkpoint folder, in float32, with the checkpoint's weights. Imported by those scripts, which run in
their own venvs (the authors' transformers release), from this folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def float_network(config_class, network_class, checkpoint: str, dropped=("auto_map", "architectures")):
    """network_class(config_class(config.json less `dropped`)), SDPA attention, every safetensors
    shard's weights in float32 (strict: a name missing or extra fails), in eval mode."""
    fields = json.loads((Path(checkpoint) / "config.json").read_text())
    config = config_class(**{k: v for k, v in fields.items() if k not in dropped})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    network = network_class(config).float().eval()
    state = {}
    for shard in sorted(Path(checkpoint).glob("*.safetensors")):
        state.update({k: v.float() for k, v in load_file(str(shard)).items()})
    network.load_state_dict(state, strict=True)
    return network
