"""``python -m diffu_lsp``: the same as the ``diffu-lsp`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
