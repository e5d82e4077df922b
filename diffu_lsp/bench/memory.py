"""memory: peak memory, model load time and time to the first suggestion.

- In a fresh interpreter: wall time of `import diffu_lsp.models` + `load_model`, the model's own
  `load_seconds`, peak RSS after loading and after one suggestion (`ru_maxrss`), peak CUDA memory
  (`torch.cuda.max_memory_allocated`) when on a GPU.
- The real server as a subprocess (`--no-daemon`, so it holds the model itself): time from spawn to the `initialize` response, and from sending
  `initialize` to the first inline completion with items (the client asks at a few cursor points
  in turn until one is non-empty); the server's peak RSS (VmHWM) at the end.
Each is repeated (fresh processes) and the medians reported.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from . import common
from .lsp_client import LspClient, peak_rss_kib, server_command

PROBE = r"""
import json, resource, sys, time
started = time.perf_counter()
import torch
from diffu_lsp.models import load_model
model = load_model(sys.argv[1] or None, device=sys.argv[2] or None, dtype=sys.argv[3] or None)
loaded = time.perf_counter() - started
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from diffu_lsp.job import Request
from diffu_lsp.features import answer
from diffu_lsp.settings import Settings
text = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        return "
t = time.perf_counter()
s = answer(model, Request("suggest", text, len(text), len(text), Settings()))
first = time.perf_counter() - t
cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and model.device.type == "cuda" else None
print(json.dumps({"import_and_load_s": loaded, "load_seconds": model.load_seconds, "rss_loaded_kib": rss_loaded,
                  "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "first_suggest_s": first,
                  "cuda_peak_bytes": cuda, "parameters": model.parameter_count, "device": str(model.device),
                  "dtype": str(model.dtype).replace("torch.", ""),
                  "weights_bytes": sum(p.numel() * p.element_size() for p in model.network.parameters())}))
"""

# cursor points tried in turn until the server suggests something
PROBES = [
    "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        return ",
    "def add(a, b):\n    return ",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        ",
    "for i in range(10):\n    ",
    "import sys\n\nif __name__ == '__main__':\n    ",
]


def probe_in_process(options: common.Options) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, options.model or "", options.device or "", options.dtype or ""],
                         capture_output=True, text=True, env=common.subprocess_env(options), timeout=1800)
    if out.returncode != 0:
        raise RuntimeError("memory probe failed:\n" + out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


async def probe_server(options: common.Options, limit_s: float = 900.0) -> dict:
    # --no-daemon: the model lives in the server, so its memory is the whole footprint (the daemon
    # suite compares that with windows sharing the model daemon)
    client = LspClient(server_command(options.model, options.device, options.dtype) + ["--no-daemon"],
                       env=common.subprocess_env(options))
    await client.start()
    try:
        sent = time.perf_counter()
        await client.initialize()
        initialized = time.perf_counter()
        first, answered, attempts = None, None, 0
        ready = None
        # ask until the model is ready and then at most 3 rounds over the probes: a weak model may
        # have nothing to suggest anywhere, which is reported as such
        rounds_left = 3 * len(PROBES)
        while first is None and rounds_left > 0 and time.perf_counter() - sent < limit_s:
            if ready is None:
                ready = _ready_at(client, sent)
            text = PROBES[attempts % len(PROBES)]
            uri = f"file:///diffu-bench/memory/probe{attempts}.py"
            client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python",
                                                                    "version": 1, "text": text}})
            result = await client.request("textDocument/inlineCompletion", {
                "textDocument": {"uri": uri}, "position": {"line": text.count("\n"),
                                                           "character": len(text.split("\n")[-1])},
                "context": {"triggerKind": 1, "selectedCompletionInfo": None}}, timeout=limit_s)
            attempts += 1
            client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
            items = result.get("items") if isinstance(result, dict) else result
            if ready is not None:
                rounds_left -= 1
                if answered is None:
                    answered = time.perf_counter() - sent
            if items:
                first = time.perf_counter() - sent
            elif ready is None:
                await asyncio.sleep(0.05)  # still loading
        if ready is None:
            ready = _ready_at(client, sent)
        peak = peak_rss_kib(client.pid)
    finally:
        await client.close()
    return {"spawn_to_initialize_s": initialized - client.started_at, "initialize_to_first_suggestion_s": first,
            "initialize_to_model_ready_s": ready, "initialize_to_first_answer_after_ready_s": answered,
            "attempts": attempts, "server_peak_rss_kib": peak}


def _ready_at(client: LspClient, since: float) -> float | None:
    """When the server announced its model ready (`diffu/status`), seconds after `since`."""
    for received, method, params in client.notifications:
        if method == "diffu/status" and isinstance(params, dict):
            if params.get("state") == "ready":
                return received - since
            if params.get("state") == "error":
                raise RuntimeError(f"the server could not load the model: {params.get('message')}")
    return None


def run(options: common.Options) -> dict:
    started = time.perf_counter()
    repeats = options.repeats or (1 if options.quick else 3)
    probes = [probe_in_process(options) for _ in range(repeats)]
    servers = [asyncio.run(probe_server(options)) for _ in range(repeats)]
    first = probes[0]
    mib = 1 / 1024

    def med(items, key, scale=1.0):
        values = [i[key] * scale for i in items if i.get(key) is not None]
        return common.median(values) if values else None

    cuda = med(probes, "cuda_peak_bytes", 1 / 2**20)
    rows = [
        ["parameters", first["parameters"]],
        ["weights in memory (MiB)", first["weights_bytes"] / 2**20],
        ["model load: `load_model` (s)", med(probes, "load_seconds")],
        ["model load incl. importing torch/transformers (s)", med(probes, "import_and_load_s")],
        ["peak RSS after loading (MiB)", med(probes, "rss_loaded_kib", mib)],
        ["peak RSS after one suggestion (MiB)", med(probes, "rss_peak_kib", mib)],
        ["first suggestion in that process (s)", med(probes, "first_suggest_s")],
        ["peak CUDA memory allocated (MiB)", cuda],
        ["server: spawn -> `initialize` answered (s)", med(servers, "spawn_to_initialize_s")],
        ["server: `initialize` sent -> model ready (`diffu/status`) (s)", med(servers, "initialize_to_model_ready_s")],
        ["server: `initialize` sent -> first answer after the model is ready (s)",
         med(servers, "initialize_to_first_answer_after_ready_s")],
        ["server: `initialize` sent -> first non-empty suggestion (s)", med(servers, "initialize_to_first_suggestion_s")],
        ["server: peak RSS (MiB)", med(servers, "server_peak_rss_kib", mib)],
    ]
    return {
        "suite": "memory",
        "title": "Memory and start-up",
        "tables": [common.table(f"Medians over {repeats} fresh process(es) each, device {first['device']} "
                                f"{first['dtype']}", ["measure", "value"], rows)],
        "probes": probes,
        "servers": servers,
        "summary": {"repeats": repeats, "parameters": first["parameters"],
                    "first_suggestion_found": all(s["initialize_to_first_suggestion_s"] is not None for s in servers)},
        "notes": [
            "RSS is the process's peak resident set (`ru_maxrss`; the server's VmHWM from /proc), so it includes "
            "Python, torch and transformers themselves.",
            "The server figure counts everything from sending `initialize` (model loading included, wherever the "
            "server does it) to the first inline completion with items; the client asks (Invoked) at the cursor "
            "points of `bench/memory.py` in turn, again and again, until one gets a suggestion (attempts: "
            f"{', '.join(str(s['attempts']) for s in servers)}).",
        ],
        "seconds": time.perf_counter() - started,
    }
