"""``python -m diffu_lsp``: the same as the ``diffu-lsp`` command."""

from __future__ import annotations


def _main() -> int:
    try:
        from .cli import main
    except ImportError as error:  # the CLI module is not there: serve with the bare flags
        if getattr(error, "name", None) not in ("diffu_lsp.cli", None):
            raise
        import argparse

        from .server import serve

        parser = argparse.ArgumentParser(prog="diffu-lsp", description="diffusion code model language server")
        parser.add_argument("--model")
        parser.add_argument("--device")
        parser.add_argument("--dtype")
        parser.add_argument("--tcp", metavar="HOST:PORT")
        args = parser.parse_args()
        return serve(model=args.model, device=args.device, dtype=args.dtype, tcp=args.tcp)
    return main()


if __name__ == "__main__":
    raise SystemExit(_main())
