"""Model backend: loading checkpoints and running their forward pass. The only layer that imports transformers."""

from .backend import DiffusionModel, trim_at_stop
from .batching import ForwardBatcher
from .loading import BUNDLED_MODEL, SUPPORTED, load_model, resolve_device

__all__ = ["BUNDLED_MODEL", "SUPPORTED", "ForwardBatcher", "DiffusionModel",
           "load_model", "resolve_device", "trim_at_stop"]
