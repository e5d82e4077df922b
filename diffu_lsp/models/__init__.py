"""Model backend: loading checkpoints and running their forward pass. The only layer that imports transformers."""

from .backend import DenoiseCancelled, DiffusionModel, trim_at_stop
from .batching import BatchCancelled, ForwardBatcher
from .loading import BUNDLED_MODEL, SUPPORTED, ModelLoadError, load_model, resolve_device

__all__ = ["BUNDLED_MODEL", "SUPPORTED", "BatchCancelled", "DenoiseCancelled", "ForwardBatcher", "DiffusionModel", "ModelLoadError",
           "load_model", "resolve_device", "trim_at_stop"]
