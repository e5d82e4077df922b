"""Model backend: loading checkpoints and running their forward pass. The only layer that imports transformers."""

from .backend import trim_at_stop
from .loading import BUNDLED_MODEL, SUPPORTED, load_model, resolve_device

__all__ = ["BUNDLED_MODEL", "SUPPORTED", "load_model", "resolve_device", "trim_at_stop"]
