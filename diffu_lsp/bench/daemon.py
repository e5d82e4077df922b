"""daemon: what sharing one model daemon between editor windows costs and saves.

- Added latency per request: the same suggestion job run by the engine inside this process
  (`LocalEngine`, what `--no-daemon` does) and through the daemon (`DaemonEngine`: the Unix socket
  and MessagePack both ways, the daemon's scheduler), alternating, on the same weights; medians and
  p95 of each and of the paired difference.
- The typing replay (`bench replay`, same points) against a `--no-daemon` server and against a
  server that uses the daemon, in the same run.
- Memory: 1 and 3 windows (servers), each with an answered suggestion, with and without the daemon:
  resident memory (VmRSS) summed over every process involved.
The daemon runs in a private runtime folder and is stopped between measurements.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time

from . import common, replay
from .lsp_client import LspClient, server_command

TEXT = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        return \n"
CURSOR = TEXT.index("return ") + len("return ")


def request_overhead(options: common.Options) -> dict:
    """Paired timings of one suggestion job in-process and through the daemon."""
    from ..daemon import runtime_paths
    from ..daemon.client import DaemonEngine
    from ..engine import LocalEngine
    from ..job import ModelKey, Request
    from ..scheduler import CancelToken
    from ..settings import Settings

    key = ModelKey(options.model, options.device or "auto", options.dtype or "auto")
    local, remote = LocalEngine(), DaemonEngine(paths=runtime_paths())
    if options.threads:
        import torch
        torch.set_num_threads(options.threads)
    local.load(key)
    remote.load(key)
    request = Request("suggest", TEXT, CURSOR, CURSOR, Settings())
    repeats = 3 if options.quick else max(20, options.repeats or 0)
    timings: dict[str, list[float]] = {"in-process": [], "daemon": []}
    try:
        for _ in range(2):  # warm-up, not counted
            local.run(request, CancelToken())
            remote.run(request, CancelToken(), key="bench")
        for _ in range(repeats):
            for name, engine in (("in-process", local), ("daemon", remote)):
                started = time.perf_counter()
                engine.run(request, CancelToken(), key="bench")
                timings[name].append(time.perf_counter() - started)
    finally:
        remote.close()
        local.close()
    added = [d - i for i, d in zip(timings["in-process"], timings["daemon"])]
    return {"repeats": repeats, "timings": timings, "added": added}


async def windows_rss(options: common.Options, windows: int, daemon: bool) -> dict:
    """Start `windows` servers, get one suggestion from each, sum the resident memory."""
    from ..daemon import daemon_pid, runtime_paths
    from ..daemon.host import rss_bytes

    args = [] if daemon else ["--no-daemon"]
    clients = []
    try:
        for index in range(windows):
            client = LspClient(server_command(options.model, options.device, options.dtype) + args,
                               env=common.subprocess_env(options))
            await client.start()
            await client.initialize()
            await replay.wait_ready(client)
            uri = f"file:///diffu-bench/daemon/w{index}.py"
            client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                    "text": TEXT}})
            line = TEXT[:CURSOR].count("\n")
            await client.request("textDocument/inlineCompletion", {
                "textDocument": {"uri": uri}, "position": {"line": line, "character": len("        return ")},
                "context": {"triggerKind": 1, "selectedCompletionInfo": None}}, timeout=900)
            clients.append(client)
        servers = [rss_bytes(c.pid) for c in clients]
        pid = daemon_pid(runtime_paths()) if daemon else None
        held = rss_bytes(pid) if pid else 0
    finally:
        for client in clients:
            await client.close()
    if daemon:
        stop_daemon()
    mib = 2 ** 20
    return {"windows": windows, "mode": "daemon" if daemon else "in-process", "servers_mib": sum(servers) / mib,
            "per_server_mib": statistics.median(servers) / mib, "daemon_mib": held / mib,
            "total_mib": (sum(servers) + held) / mib}


def stop_daemon() -> None:
    from ..daemon import runtime_paths, terminate

    terminate(runtime_paths())


def run(options: common.Options) -> dict:
    started = time.perf_counter()
    previous = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="diffu-bench-run-") as folder:
        # A daemon of this run's own (inherited by the servers), with the run's thread count.
        os.environ.update(common.subprocess_env(options), XDG_RUNTIME_DIR=folder)
        try:
            overhead = request_overhead(options)
            stop_daemon()
            replays = {"in-process": asyncio.run(replay.replay(options, ("--no-daemon",)))}
            replays["daemon"] = asyncio.run(replay.replay(options))
            stop_daemon()
            memory = [asyncio.run(windows_rss(options, n, daemon)) for daemon in (False, True) for n in (1, 3)]
        finally:
            stop_daemon()
            os.environ.clear()
            os.environ.update(previous)
    result = summarise(overhead, replays, memory)
    result["seconds"] = time.perf_counter() - started
    return result


def summarise(overhead: dict, replays: dict, memory: list[dict]) -> dict:
    ms = lambda values, q: 1000 * common.percentile(values, q)  # noqa: E731
    t = overhead["timings"]
    latency_rows = [
        [name, overhead["repeats"], ms(t[name], 50), ms(t[name], 95)] for name in ("in-process", "daemon")
    ] + [["added by the daemon (paired difference)", overhead["repeats"], ms(overhead["added"], 50),
          ms(overhead["added"], 95)]]
    replay_rows = []
    for name, result in replays.items():
        s = result["summary"]
        replay_rows.append([name, s["requests"], s["answered"], s["stale"], s["answer_p50_ms"], s["answer_p95_ms"],
                            s["latency_p50_ms"], s["latency_p95_ms"], s["shown"]])
    a, b = replays["in-process"]["summary"], replays["daemon"]["summary"]
    replay_rows.append(["daemon - in-process", "", "", "", b["answer_p50_ms"] - a["answer_p50_ms"],
                        b["answer_p95_ms"] - a["answer_p95_ms"], b["latency_p50_ms"] - a["latency_p50_ms"],
                        b["latency_p95_ms"] - a["latency_p95_ms"], ""])
    memory_rows = [[m["mode"], m["windows"], m["servers_mib"], m["per_server_mib"], m["daemon_mib"] or "",
                    m["total_mib"]] for m in memory]
    total = {(m["mode"], m["windows"]): m["total_mib"] for m in memory}
    summary = {
        "added_p50_ms": ms(overhead["added"], 50), "added_p95_ms": ms(overhead["added"], 95),
        "replay_answer_p95_delta_ms": b["answer_p95_ms"] - a["answer_p95_ms"],
        "stale": a["stale"] + b["stale"],
        "three_windows_daemon_vs_in_process": total[("daemon", 3)] / total[("in-process", 3)],
    }
    return {
        "suite": "daemon",
        "title": "Model daemon vs in-process",
        "tables": [
            common.table("One suggestion job, same request, alternating (ms)",
                         ["path", "repeats", "p50", "p95"], latency_rows),
            common.table("Typing replay, same points (ms; answers = any answer for the current version, "
                         "shown = answers with items)",
                         ["server", "requests", "answered", "stale", "answer p50", "answer p95", "shown p50",
                          "shown p95", "shown"], replay_rows),
            common.table("Resident memory with 1 and 3 windows, each after one answered suggestion (MiB)",
                         ["mode", "windows", "servers", "per server", "daemon", "total"], memory_rows),
        ],
        "summary": summary,
        "notes": [
            "In-process: `diffu-lsp --no-daemon`, the model in every server. Daemon: the default; each server "
            "sends its jobs to the one daemon, which holds the model once.",
            "The first table times the engines directly (no LSP), so the difference is the socket, MessagePack "
            "and the daemon's scheduler; the replay adds the server's own scheduler and JSON-RPC on top.",
            f"Three windows take {summary['three_windows_daemon_vs_in_process']:.2f}x the memory of three "
            "in-process servers.",
        ],
    }
