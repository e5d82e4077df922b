"""diffu-lsp: a language server for diffusion code models.

Public API::

    from diffu_lsp import load_model
    model = load_model()                      # the bundled tiny model; or a folder / hub id
    model.infill("def add(a, b):\n    return ", "\n", length=16)
"""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import diffu_lsp` light: torch loads on first use of the model API
    if name == "load_model":
        from . import models
        return models.load_model
    if name == "denoise":
        from . import sampler
        return sampler.denoise
    raise AttributeError(name)


__all__ = ["load_model", "denoise", "__version__"]
