"""Command line: `diffu-lsp` (serve LSP over stdio), `complete`, `doctor`, `pull`, `daemon`, `bench`.

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import CommandFailed

MAX_FILE_BYTES = 8_000_000


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder or hub id (default: the bundled tiny model)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, mps")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU and on a CPU with AMX, else float32), float32, bfloat16, float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffu-lsp", description="Diffusion code models behind your editor. With no command: serve LSP over stdio.")
    parser.add_argument("--version", action="version", version=f"diffu-lsp {__version__}")
    _model_options(parser)
    parser.add_argument("--tcp", metavar="HOST:PORT", help="serve over TCP on a loopback address (debugging)")
    parser.add_argument("--no-daemon", action="store_true",
                        help="hold the model in this process instead of sharing the machine's model daemon")
    parser.add_argument("--allow-pickled-weights", action="store_true",
                        help="also load checkpoints whose weights are pickled (.bin/.pt), which can run code when "
                             "loaded: only for checkpoints you trust (default: safetensors only)")
    commands = parser.add_subparsers(dest="command")

    complete = commands.add_parser("complete", help="print the block that would be suggested at FILE:LINE:COL")
    complete.add_argument("location", metavar="FILE:LINE:COL", help="1-based line and column")
    _model_options(complete)
    complete.add_argument("--max-tokens", type=int, help="hole size in tokens (default: by context, from settings)")
    complete.add_argument("--steps", type=int, help="denoising steps for the Dream schedule algorithms")
    complete.add_argument("--alg", choices=["threshold", "factor", "entropy", "maskgit_plus", "topk_margin"],
                          help="decoding algorithm (default: the model's own, else threshold)")
    complete.add_argument("--threshold", type=float, help="confidence threshold for --alg threshold")
    complete.add_argument("--factor", type=float, help="f of the factor rule for --alg factor")
    complete.add_argument("--temperature", type=float)
    complete.add_argument("--block", action="store_true", help="complete a whole block (larger hole)")
    complete.add_argument("--json", action="store_true", help="print a JSON object instead of the text")

    doctor = commands.add_parser("doctor", help="versions, device, model and one timed job")
    _model_options(doctor)

    pull = commands.add_parser("pull", help="download a checkpoint from the Hugging Face hub and check that it loads")
    pull.add_argument("hub_id", metavar="HUB_ID", help="e.g. apple/DiffuCoder-7B-cpGRPO (see README: Choosing a model)")
    pull.add_argument("--device", default="auto", help="where to check that it loads (auto, cpu, cuda, mps)")
    pull.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    pull.add_argument("--no-check", action="store_true", help="download only, do not load it")

    daemon = commands.add_parser("daemon", help="the shared model daemon: status, stop, run")
    daemon.add_argument("action", choices=["status", "stop", "run"])
    daemon.add_argument("--json", action="store_true", help="status as a JSON object")
    daemon.add_argument("--idle-seconds", type=int, default=900, help="run: exit this long after the last window")
    daemon.add_argument("--memory-mb", type=int, default=0, help="run: memory budget for loaded models (0: none)")

    from .cluster.cli import add_parser as add_cluster_parser

    add_cluster_parser(commands)
    commands.add_parser("bench", help="benchmarks (see `diffu-lsp bench --help`)", add_help=False)
    return parser


def parse_location(location: str) -> tuple[Path, int, int]:
    path, sep, rest = location.rpartition(":")
    path2, sep2, line = path.rpartition(":")
    if not (sep and sep2):
        raise CommandFailed(f"expected FILE:LINE:COL, got {location!r}")
    try:
        return Path(path2), int(line), int(rest)
    except ValueError:
        raise CommandFailed(f"LINE and COL must be numbers in {location!r}") from None


def read_source(path: Path) -> str:
    if not path.exists():
        raise CommandFailed(f"no such file: {path}")
    if not path.is_file():
        raise CommandFailed(f"not a file: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise CommandFailed(f"{path} is larger than {MAX_FILE_BYTES // 1_000_000} MB")
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise CommandFailed(f"{path} looks like a binary file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandFailed(f"{path} is not UTF-8 text") from None


def offset_of(text: str, line: int, col: int) -> int:
    """Character offset of 1-based line/column; the column may be one past the line's end."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise CommandFailed(f"line {line} is out of range (the file has {len(lines)} lines)")
    if not 1 <= col <= len(lines[line - 1]) + 1:
        raise CommandFailed(f"column {col} is out of range (line {line} has {len(lines[line - 1])} characters)")
    return sum(len(l) + 1 for l in lines[:line - 1]) + col - 1


def load(args):
    from .models import load_model
    from .errors import ModelLoadFailed

    try:
        return load_model(args.model, device=args.device, dtype=args.dtype)
    except ModelLoadFailed as error:
        raise CommandFailed(str(error)) from None


def cmd_complete(args) -> int:
    from .job import Request
    from .features import answer
    from .settings import Settings, apply
    from .errors import SettingsInvalid

    path, line, col = parse_location(args.location)
    text = read_source(path)
    cursor = offset_of(text, line, col)
    overrides = {"algorithm": args.alg, "steps": args.steps, "threshold": args.threshold, "factor": args.factor,
                 "temperature": args.temperature}
    if args.max_tokens is not None:
        overrides.update(single_line_tokens=args.max_tokens, multi_line_tokens=args.max_tokens,
                         block_tokens=args.max_tokens)
    try:
        settings = apply(Settings(), {k: v for k, v in overrides.items() if v is not None})
    except SettingsInvalid as error:
        raise CommandFailed(str(error)) from None
    model = load(args)
    suggestion = answer(model, Request("block" if args.block else "suggest", text, cursor, cursor, settings))
    if args.json:
        print(json.dumps({"file": str(path), "line": line, "column": col,
                          "text": suggestion.text, "multiline": suggestion.multiline,
                          "replace_after": suggestion.replace_after, "hole_tokens": suggestion.hole_tokens,
                          "forwards": suggestion.forwards, "seconds": round(suggestion.seconds, 4),
                          "model": model.name}))
    else:
        print(suggestion.text)
    return 0


def cmd_doctor(args) -> int:
    import platform

    import torch
    import transformers

    from .job import Request
    from .features import answer
    from .settings import Settings

    print(f"diffu-lsp     {__version__}")
    print(f"python        {platform.python_version()} ({sys.executable})")
    print(f"torch         {torch.__version__}  cuda={torch.cuda.is_available()}  mps={torch.backends.mps.is_available()}")
    print(f"transformers  {transformers.__version__}")
    model = load(args)
    print(f"model         {model.name}")
    print(f"family        {model.family}  (mask id {model.mask_token_id}, eos/pad {list(model.eos_token_ids)}, "
          f"{'shifted' if model.shift_logits else 'unshifted'} logits)")
    print(f"parameters    {model.parameter_count / 1e6:.2f} M")
    print(f"device        {model.device}  dtype {str(model.dtype).replace('torch.', '')}")
    print(f"load time     {model.load_seconds:.2f} s")
    # a context whose answer anyone can judge: the line after `return ` should be `a - b`
    text = "def add(a, b):\n    return a + b\n\n\ndef subtract(a, b):\n    return \n"
    cursor = text.rindex("return ") + len("return ")
    started = time.perf_counter()
    suggestion = answer(model, Request("suggest", text, cursor, cursor, Settings()))
    print(f"one job       {time.perf_counter() - started:.3f} s, {suggestion.forwards} forwards for {suggestion.hole_tokens} hole tokens")
    print("  asked       after `def add(a, b): return a + b`, complete `def subtract(a, b): return |` (a good answer: `a - b`)")
    print(f"  came back   {suggestion.text!r}")
    from .models import BUNDLED_MODEL

    if Path(model.name).resolve() == BUNDLED_MODEL.resolve():
        print("note          the bundled model (5.8 M parameters, trained on the Python standard library) is there to try "
              "every mechanism offline, not for real suggestions: on held-out code it scores below copying the previous "
              "line. Pick a real model in README.md, 'Choosing a model' (e.g. `diffu-lsp pull apple/DiffuCoder-7B-cpGRPO`, "
              "then `--model apple/DiffuCoder-7B-cpGRPO`).")
    return 0


PULL_FILES = ["*.json", "*.safetensors", "merges.txt", "*.model", "*.tiktoken"]  # no code: it is never run


def cmd_pull(args) -> int:
    """Download the files a checkpoint needs (weights, config, tokenizer) with a progress bar, then load it."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import enable_progress_bars
    except ImportError:
        raise CommandFailed("`pull` needs the huggingface_hub package (pip install huggingface_hub); "
                            "or copy a checkpoint folder here and pass --model FOLDER") from None
    enable_progress_bars()
    try:
        folder = snapshot_download(args.hub_id, allow_patterns=PULL_FILES, etag_timeout=15)
    except KeyboardInterrupt:
        raise
    except Exception as error:
        reason = f"{error.__class__.__name__}: {error}".splitlines()[0][:200]
        raise CommandFailed(f"cannot download {args.hub_id!r} from the hub (offline, HF_HUB_OFFLINE set, or an "
                       f"unknown id?): {reason}") from None
    print(f"downloaded    {args.hub_id} -> {folder}")
    if args.no_check:
        return 0
    args.model = folder
    model = load(args)
    print(f"loads         {model.family}, {model.parameter_count / 1e9:.2f} B parameters on {model.device} "
          f"({str(model.dtype).replace('torch.', '')}) in {model.load_seconds:.1f} s")
    print(f"use it        diffu-lsp --model {args.hub_id}   (or the folder above)")
    return 0


def cmd_daemon(args) -> int:
    from .daemon import runtime_paths, terminate, wait_until_gone
    from .errors import DaemonUnavailable

    if args.action == "run":
        from .daemon.host import main

        return main(idle_seconds=args.idle_seconds, memory_mb=args.memory_mb)
    from .daemon.client import connect

    try:
        paths = runtime_paths()
    except DaemonUnavailable as error:
        raise CommandFailed(str(error)) from None
    try:
        conn = connect(paths)
    except DaemonUnavailable as error:  # e.g. a daemon of another version: it can still be stopped
        pid = terminate(paths) if args.action == "stop" else None
        if pid is None:
            raise CommandFailed(str(error)) from None
        print(f"stopped the model daemon (pid {pid}) with SIGTERM")
        return 0
    if conn is None:
        print(f"no model daemon is running (socket {paths.socket})", file=sys.stderr)
        return 1
    try:
        if args.action == "stop":
            pid = conn.pid
            conn.stop()
            wait_until_gone(paths, pid, 15)
            print(f"stopped the model daemon (pid {pid})")
            return 0
        status = conn.status()
    finally:
        conn.close()
    if args.json:
        import msgspec

        print(msgspec.json.encode(status).decode())
        return 0
    print(f"model daemon  pid {status.pid}, diffu-lsp {status.version} (protocol {status.protocol}), "
          f"up {status.uptime_seconds:.0f} s")
    print(f"socket        {status.socket}")
    print(f"log           {status.log}")
    print(f"windows       {status.clients} connected")
    print(f"memory        {status.rss_bytes / 2**20:.0f} MiB resident")
    print(f"loads         {status.loads} ({status.evictions} evicted)")
    for m in status.models:
        print(f"model         {m.label}: {m.family} on {m.device} ({m.dtype}), {m.bytes / 2**20:.1f} MiB, "
              f"{m.jobs} jobs, idle {m.idle_seconds:.0f} s")
    jobs = status.jobs
    print(f"jobs          {jobs.get('submitted', 0)} submitted, {jobs.get('completed', 0)} completed, "
          f"{jobs.get('cancelled', 0) + jobs.get('superseded', 0)} cancelled")
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    return serve(model=args.model, device=None if args.device == "auto" else args.device,
                 dtype=None if args.dtype == "auto" else args.dtype, tcp=args.tcp, daemon=not args.no_daemon)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `diffu-lsp daemon status | head -1`: the reader left, so say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail too
        return 141  # what a shell reports for a program ended by SIGPIPE


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.allow_pickled_weights:  # read by models/loading.py, here and in the daemon this process starts
        os.environ["DIFFU_LSP_ALLOW_PICKLED_WEIGHTS"] = "1"
    try:
        if args.command == "complete":
            return cmd_complete(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        if args.command == "pull":
            return cmd_pull(args)
        if args.command == "daemon":
            return cmd_daemon(args)
        if args.command == "cluster":
            from .cluster.cli import main as cluster_main

            return cluster_main(args)
        return cmd_serve(args)
    except CommandFailed as error:
        print(f"diffu-lsp: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
