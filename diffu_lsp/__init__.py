"""diffu-lsp: a language server for diffusion code models.

Public API::

    from diffu_lsp import load_model
    model = load_model()                      # the bundled tiny model; or a folder / hub id
    model.infill("def add(a, b):\n    return ", "\n", length=16)
"""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import diffu_lsp` light: torch loads on first use of the model API
    if name in ("load_model", "DiffusionModel"):
        from . import models
        return getattr(models, name)
    if name in ("Sampling", "denoise"):
        from . import sampler
        return getattr(sampler, name)
    raise AttributeError(name)


__all__ = ["load_model", "DiffusionModel", "Sampling", "denoise", "__version__"]
