"""soak: type through daemon faults for a long time and check that nothing hangs.

Real `diffu-lsp` servers over stdio (one per simulated editor window, `--windows`), the real model
daemon in a private runtime folder (XDG_RUNTIME_DIR of the run's own), the chosen model.

Each window types into copies of held-out stdlib modules at human speed with seeded random pauses:
at a random code line it deletes the line after its indentation (one range edit) and types it back
one character at a time. Per key, as VS Code and Neovim 0.12 drive inline completion: `didChange`
(incremental), `$/cancelRequest` for the previous inline request if still unanswered, a new
`textDocument/inlineCompletion`, and a `textDocument/codeAction` over the whole document whose
"Refine selection" action echoes the end of the document as the server sees it (the document
check: it must equal the reference's end after every edit). Now and then a window runs one of the
three commands (completeBlock / fillHoles / refineSelection, via workspace/executeCommand; the
client declines the resulting workspace/applyEdit so the reference stays exact), opens a second
buffer, or closes one.

A fault injector meanwhile freezes the daemon (SIGSTOP, SIGCONT a few seconds later), kills it
(SIGKILL), restarts it (`diffu-lsp daemon stop`) and deletes its runtime folder, in a seeded
shuffled cycle of the four kinds, at random intervals after every window recovered from the last
fault (at most RECOVERY_LIMIT s); none in the last RECOVERY_TAIL seconds.

Checked: every request answered exactly once and none later than the bound; after every fault,
inline suggestions with items come back in every window (recovery time: fault -> first answer
with items to a request sent after it, the slowest window); the document check; never two daemon
processes of this run alive for more than 2 s; server threads and RSS at start and end.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..daemon.standby import NAME as STANDBY_NAME
from . import common
from .lsp_client import LspClient, server_command
from .replay import end_position, items_of, wait_ready

FAULT_KINDS = ("freeze", "kill", "restart", "delete-folder")
AUTOMATIC = 2  # InlineCompletionTriggerKind.Automatic
REFINE_KIND = "refactor.rewrite.diffu.refine"
COMMANDS = ("diffu.completeBlock", "diffu.fillHoles", "diffu.refineSelection")
RECOVERY_TAIL = 20.0  # no fault in the run's last seconds: typing goes on to show the recovery
RECOVERY_LIMIT = 60.0  # the next fault waits this long at most for every window to recover from the last
SLACK_SECONDS = 30.0  # bound = daemon deadline + hello + this (a fresh daemon starting and loading on a busy CPU)


@dataclass
class Sent:
    window: int
    id: int
    method: str
    sent: float
    future: asyncio.Future
    expected_end: dict | None = None  # codeAction document checks: the reference's end position
    canary: bool = False


@dataclass
class Buffer:
    uri: str
    text: str
    version: int = 1


@dataclass
class Run:
    folder: Path
    began: float
    stop_at: float
    bound: float
    windows: int
    sent: list[Sent] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    keystrokes: int = 0
    opens: int = 0
    closes: int = 0
    daemon_counts: list[tuple[float, int]] = field(default_factory=list)
    engines: list[tuple[float, int, str]] = field(default_factory=list)  # (when, window, the server's engine)
    two_daemons_s: float = 0.0  # longest stretch with more than one daemon alive
    server_exits: list[str] = field(default_factory=list)
    rss: list[tuple[float, list[int | None]]] = field(default_factory=list)  # (when, each server's VmRSS KiB)


# ---------------------------------------------------------------- processes

def daemons_of(folder: Path, standbys: bool = False) -> list[int]:
    """Live (not zombie) `diffu_lsp daemon run` processes whose XDG_RUNTIME_DIR is `folder`; a
    daemon's standby (a fork waiting to take its place, daemon/standby.py) only with `standbys`.
    A standby is named so in /proc/PID/comm, or (just forked, not yet renamed) is the child of a
    live daemon of the folder: a standby that took over is an orphan, so its parent is no daemon."""
    marker = b"XDG_RUNTIME_DIR=" + str(folder).encode()
    found: dict[int, tuple[int, bool]] = {}  # pid: (parent pid, named a standby)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"diffu_lsp" not in argv or b"daemon\0run" not in argv:
                continue
            if marker not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            named = Path(f"/proc/{entry}/comm").read_text().strip() == STANDBY_NAME
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            found[int(entry)] = (int(fields[1]), named)
    return sorted(pid for pid, (parent, named) in found.items() if standbys or not (named or parent in found))


def proc_status(pid: int, key: str) -> int | None:
    """One number from /proc/PID/status (VmRSS in KiB, Threads)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


async def thread_names(client: LspClient, timeout: float) -> list[str]:
    """The server's Python threads by name (``diffu/stats``); empty if it does not say."""
    try:
        return (await client.request("diffu/stats", timeout=timeout)).get("threads", [])
    except Exception:  # noqa: BLE001 - a diagnostic only
        return []


# ---------------------------------------------------------------- the simulated editor

def position_of(text: str, offset: int) -> dict:
    return end_position(text[:offset])


def choose_line(rng: random.Random, text: str) -> tuple[int, int] | None:
    """(start, end) offsets of a random code line's text after its indentation."""
    lines = [(o, line) for o, line in common.code_lines(text) if 3 <= len(line.strip()) <= 70]
    if not lines:
        return None
    offset, line = rng.choice(lines)
    indent = len(line) - len(line.lstrip())
    return offset + indent, offset + len(line)


CANARY_BODY = "def add(a, b):\n    return "
CANARY_SECONDS = 2.0


def canary_uri(folder: Path, index: int) -> str:
    return (folder / "work" / f"canary{index}.py").as_uri()


def canary_text(n: int) -> str:
    return f"# canary {n}\n" + CANARY_BODY


async def canary_warm_up(client: LspClient, uri: str) -> int:
    """Open the canary buffer and ask at its end until the model suggests something; the number of
    suggestions with items among the first 4 texts (a model that never suggests there makes the
    recovery check meaningless)."""
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                            "text": CANARY_BODY}})
    shown = 0
    for n in range(4):
        text = canary_text(-1 - n)
        client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2 + n},
                                                 "contentChanges": [{"text": text}]})
        answer = await client.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": end_position(text),
            "context": {"triggerKind": 1, "selectedCompletionInfo": None}}, timeout=600)
        shown += bool(items_of(answer))
    return shown


async def canary(run: Run, index: int, client: LspClient, rng: random.Random) -> None:
    """Every ~2 s an inline request at the end of the canary buffer, whose first line changes every
    time (one full-text didChange): the server cannot answer it from its cache of the suggestion last
    shown (a repeat or a typed-through prefix), so an answer with items is the model's. Recovery
    shows even where the typed line gets no suggestion, as in a second buffer. Never cancelled."""
    uri, version = canary_uri(run.folder, index), 1000
    while time.perf_counter() < run.stop_at and client.process.returncode is None:
        await asyncio.sleep(rng.uniform(0.5, 1.5) * CANARY_SECONDS)
        version += 1
        text = canary_text(version)
        client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version},
                                                 "contentChanges": [{"text": text}]})
        request_id, future = client.send_request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": end_position(text),
            "context": {"triggerKind": AUTOMATIC, "selectedCompletionInfo": None}})
        run.sent.append(Sent(index, request_id, "textDocument/inlineCompletion", time.perf_counter(), future,
                             canary=True))
        await client.drain()
        try:  # the server's engine as it says (diffu/stats): the timeline shows its changes
            stats = await client.request("diffu/stats", timeout=run.bound)
            run.engines.append((time.perf_counter(), index, " ".join(
                f"{k}={stats.get(k)}" for k in ("engine", "daemon_pid", "daemon_state") if k in stats)))
        except Exception as error:  # noqa: BLE001 - a diagnostic only
            run.engines.append((time.perf_counter(), index, f"diffu/stats failed: {error}"))


async def window(run: Run, index: int, client: LspClient, files: list[Path], rng: random.Random, cps: float) -> None:
    buffers: list[Buffer] = []
    inline: Sent | None = None
    uri_of = lambda path: (run.folder / "work" / f"w{index}" / path.name).as_uri()  # noqa: E731

    def track(method: str, params: Any, expected_end: dict | None = None) -> Sent:
        request_id, future = client.send_request(method, params)
        sent = Sent(index, request_id, method, time.perf_counter(), future, expected_end)
        run.sent.append(sent)
        return sent

    def open_buffer() -> Buffer:
        path = rng.choice(files)
        buffer = Buffer(uri_of(path), common.read_text(path))
        if any(b.uri == buffer.uri for b in buffers):
            return next(b for b in buffers if b.uri == buffer.uri)
        local = Path(buffer.uri[len("file://"):])
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(buffer.text)
        client.notify("textDocument/didOpen", {"textDocument": {"uri": buffer.uri, "languageId": "python",
                                                                "version": 1, "text": buffer.text}})
        buffers.append(buffer)
        run.opens += 1
        return buffer

    def change(buffer: Buffer, start: int, end: int, new: str) -> None:
        rng_ = {"start": position_of(buffer.text, start), "end": position_of(buffer.text, end)}
        buffer.text = buffer.text[:start] + new + buffer.text[end:]
        buffer.version += 1
        client.notify("textDocument/didChange", {"textDocument": {"uri": buffer.uri, "version": buffer.version},
                                                 "contentChanges": [{"range": rng_, "text": new}]})

    def check_document(buffer: Buffer) -> None:
        end = end_position(buffer.text)
        track("textDocument/codeAction", {
            "textDocument": {"uri": buffer.uri}, "range": {"start": {"line": 0, "character": 0}, "end": end},
            "context": {"diagnostics": [], "only": [REFINE_KIND]}}, expected_end=end)

    def command(buffer: Buffer, cursor: int) -> None:
        name = rng.choice(COMMANDS)
        document = {"uri": buffer.uri}
        line_start = buffer.text.rfind("\n", 0, cursor) + 1
        line_end = buffer.text.find("\n", cursor)
        line_end = len(buffer.text) if line_end < 0 else line_end
        if name == "diffu.completeBlock":
            arg = {"textDocument": document, "position": position_of(buffer.text, cursor)}
        else:
            arg = {"textDocument": document, "range": {"start": position_of(buffer.text, line_start),
                                                       "end": position_of(buffer.text, line_end)}}
        track("workspace/executeCommand", {"command": name, "arguments": [arg]})

    while time.perf_counter() < run.stop_at and client.process.returncode is None:
        # buffers: open one (two at once sometimes), close one now and then
        if not buffers or (len(buffers) < 2 and rng.random() < 0.25):
            open_buffer()
        elif len(buffers) == 2 and rng.random() < 0.4:
            closed = buffers.pop(rng.randrange(2))
            client.notify("textDocument/didClose", {"textDocument": {"uri": closed.uri}})
            run.closes += 1
        buffer = rng.choice(buffers)
        span = choose_line(rng, buffer.text)
        if span is None:
            continue
        start, end = span
        line = buffer.text[start:end]
        change(buffer, start, end, "")
        check_document(buffer)
        await client.drain()
        cursor = start
        for ch in line:
            if time.perf_counter() >= run.stop_at or client.process.returncode is not None:
                break
            await asyncio.sleep(min(rng.expovariate(cps), 1.0) + (rng.uniform(0.5, 4.0) if rng.random() < 0.04 else 0))
            change(buffer, cursor, cursor, ch)
            cursor += 1
            run.keystrokes += 1
            if inline is not None and not inline.future.done():
                client.cancel(inline.id)
            inline = track("textDocument/inlineCompletion", {
                "textDocument": {"uri": buffer.uri}, "position": position_of(buffer.text, cursor),
                "context": {"triggerKind": AUTOMATIC, "selectedCompletionInfo": None}})
            check_document(buffer)
            if rng.random() < 0.01:
                command(buffer, cursor)
            await client.drain()
        await asyncio.sleep(rng.uniform(0.3, 2.0))


# ---------------------------------------------------------------- faults and the monitor

async def inject_faults(run: Run, rng: random.Random, every: float, deadline: float, env: dict) -> None:
    from ..daemon import Paths, daemon_pid

    paths = Paths(run.folder / "diffu-lsp")
    kinds: list[str] = []
    while True:
        if run.faults:  # the next fault comes only once every window has recovered (or given up on)
            await until_recovered(run, run.faults[-1]["at"])
        wait = rng.uniform(0.6, 1.4) * every
        if time.perf_counter() + wait > run.stop_at - RECOVERY_TAIL:
            return
        await asyncio.sleep(wait)
        if not kinds:
            kinds = list(FAULT_KINDS)
            rng.shuffle(kinds)
        kind = kinds.pop()
        pid = daemon_pid(paths) if paths.folder.is_dir() else None
        fault = {"kind": kind, "at": time.perf_counter(), "pid": pid}
        if kind in ("freeze", "kill") and pid is None:
            fault["skipped"] = "no daemon running"
            kinds.append(kind)  # tried again at the next slot
        elif kind == "freeze":
            os.kill(pid, signal.SIGSTOP)
            held = rng.uniform(2.0, 2.0 * deadline)
            fault["held_s"] = held
            common.progress(f"soak: fault freeze for {held:.1f} s (daemon pid {pid})")
            run.faults.append(fault)
            await asyncio.sleep(held)
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                fault["replaced"] = True  # the server killed the frozen daemon itself
            continue
        elif kind == "kill":
            os.kill(pid, signal.SIGKILL)
        elif kind == "restart":
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "diffu_lsp", "daemon", "stop", env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            try:
                fault["status"] = await asyncio.wait_for(process.wait(), 60)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
                fault["status"] = "timed out after 60 s"
        elif kind == "delete-folder":
            shutil.rmtree(paths.folder, ignore_errors=True)
        common.progress(f"soak: fault {kind} (daemon pid {pid})" + (f": skipped, {fault['skipped']}"
                                                                   if fault.get("skipped") else ""))
        run.faults.append(fault)


RSS_EVERY = 60.0  # seconds between samples of the servers' RSS


async def monitor(run: Run, clients: list[LspClient]) -> None:
    several_since = None
    while time.perf_counter() < run.stop_at + run.bound:
        now = time.perf_counter()
        if not run.rss or now - run.rss[-1][0] >= RSS_EVERY:
            run.rss.append((now, [proc_status(c.pid, "VmRSS") for c in clients]))
        count = len(daemons_of(run.folder))
        run.daemon_counts.append((now, count))
        if count > 1:
            several_since = several_since or now
            run.two_daemons_s = max(run.two_daemons_s, now - several_since)
        else:
            several_since = None
        for index, client in enumerate(clients):
            code = client.process.returncode
            if code is not None and not any(e.startswith(f"window {index}") for e in run.server_exits):
                run.server_exits.append(f"window {index}: server exited with {code}: "
                                        + " | ".join(list(client.stderr_tail)[-5:]))
        await asyncio.sleep(0.5)


# ---------------------------------------------------------------- the run

async def soak(options: common.Options, minutes: float, windows: int, every: float, deadline: float | None,
               folder: Path) -> dict:
    from ..settings import Settings

    deadline = deadline or Settings().daemon_deadline_seconds
    from ..daemon.client import HELLO_SECONDS

    bound = deadline + HELLO_SECONDS + SLACK_SECONDS
    common.progress(f"soak: {minutes:g} min, {windows} window(s), a fault every ~{every:g} s, "
                    f"daemon deadline {deadline:g} s, answer bound {bound:g} s")
    env = {**common.subprocess_env(options), "XDG_RUNTIME_DIR": str(folder)}
    settings = {"daemonDeadlineSeconds": deadline}
    files = common.sample_files(options.seed, 12, min_chars=3000)
    clients = [LspClient(server_command(options.model, options.device, options.dtype), env=env)
               for _ in range(windows)]
    rngs = [random.Random(f"soak:{options.seed}:{i}") for i in range(windows)]
    started_at = time.perf_counter()
    try:
        for client in clients:
            await client.start()
            await client.initialize((folder / "work").as_uri(), settings)
        for client in clients:
            await wait_ready(client, timeout=600)
        # warm-up: the canary buffer of each window, which also finds the canary's two texts
        canaries = [await canary_warm_up(client, canary_uri(folder, i)) for i, client in enumerate(clients)]
        if not all(canaries):
            raise RuntimeError("soak: the model suggested nothing at the canary's place at warm-up")
        start = {"rss": [proc_status(c.pid, "VmRSS") for c in clients],
                 "threads": [proc_status(c.pid, "Threads") for c in clients],
                 "thread_names": [await thread_names(c, bound) for c in clients]}
        daemon_pids = daemons_of(folder)
        start["daemon_rss"] = proc_status(daemon_pids[0], "VmRSS") if daemon_pids else None
        began = time.perf_counter()
        run = Run(folder, began, began + 60 * minutes, bound, windows)
        tasks = [asyncio.ensure_future(window(run, i, c, files, rngs[i], options.cps)) for i, c in enumerate(clients)]
        tasks += [asyncio.ensure_future(canary(run, i, c, random.Random(f"canary:{options.seed}:{i}")))
                  for i, c in enumerate(clients)]
        tasks += [asyncio.ensure_future(inject_faults(run, random.Random(f"faults:{options.seed}"), every,
                                                      deadline, env)),
                  asyncio.ensure_future(monitor(run, clients))]
        await asyncio.wait_for(asyncio.gather(*tasks[:-1]), 60 * minutes + 2 * bound + 120)
        # every request gets up to the bound after the typing stopped
        pending = [s.future for s in run.sent if not s.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=bound)
        await asyncio.wait_for(tasks[-1], 2 * bound)
        end = {"rss": [proc_status(c.pid, "VmRSS") for c in clients],
               "threads": [proc_status(c.pid, "Threads") for c in clients],
               "thread_names": [await thread_names(c, bound) for c in clients]}
        daemon_pids = daemons_of(folder)
        end["daemon_rss"] = proc_status(daemon_pids[0], "VmRSS") if daemon_pids else None
        duplicates = sum(c.unexpected_responses for c in clients)
    finally:
        for client in clients:
            await client.close()
        from ..daemon import Paths, terminate
        for pid in set(daemons_of(folder, standbys=True)) - set(daemons_of(folder)):
            try:
                os.kill(pid, signal.SIGKILL)  # first: a standby would take the killed daemon's place
            except ProcessLookupError:
                pass
        try:
            terminate(Paths(folder / "diffu-lsp"), timeout=20, sig=signal.SIGKILL)
        except Exception:  # noqa: BLE001 - the folder may be gone; the process scan below still counts
            pass
    left = daemons_of(folder, standbys=True)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    result = summarise(run, start, end, duplicates, time.perf_counter() - began, deadline)
    result["summary"]["daemons_left_after_stop"] = len(left)
    result["timeline"] = timeline(run, clients)
    result["server_logs"] = [list(client.stderr_tail) for client in clients]
    result["seconds"] = time.perf_counter() - started_at
    return result


def recovered_windows(run: Run, since: float, until: float = float("inf")) -> list[float | None]:
    """Per window: seconds from `since` to its first canary answer with items to a request sent
    in [since, until), or None."""
    per_window = []
    for w in range(run.windows):
        firsts = [s.future.result().received - since for s in run.sent
                  if s.window == w and s.canary and since <= s.sent < until
                  and s.future.done() and not s.future.cancelled() and items_of(s.future.result().result)]
        per_window.append(min(firsts) if firsts else None)
    return per_window


async def until_recovered(run: Run, since: float) -> None:
    """Wait until every window has had a canary suggestion since `since`, at most RECOVERY_LIMIT s
    (a window that has not recovered by then shows up as a failure of that fault)."""
    give_up = since + RECOVERY_LIMIT
    while time.perf_counter() < give_up and None in recovered_windows(run, since):
        await asyncio.sleep(0.5)


def recoveries(run: Run) -> list[dict]:
    """Per fault: seconds from the fault to the first canary answer with items, in every window (typed
    lines may be answered from the server's cache of the suggestion shown, without the model)."""
    out = []
    for i, fault in enumerate(run.faults):
        until = run.faults[i + 1]["at"] if i + 1 < len(run.faults) else float("inf")
        per_window = recovered_windows(run, fault["at"], until)
        recovered = None if None in per_window else max(per_window)
        out.append({**fault, "recovery_s": recovered, "per_window_s": per_window})
    return out


def summarise(run: Run, start: dict, end: dict, duplicates: int, seconds: float, deadline: float) -> dict:
    answered = [s for s in run.sent if s.future.done() and not s.future.cancelled()]
    unanswered = [s for s in run.sent if not s.future.done()]
    times = [s.future.result().received - s.sent for s in answered]
    late = [s for s in answered if s.future.result().received - s.sent > run.bound]
    errors = [s for s in answered if s.future.result().error
              and s.future.result().error.get("code") != -32800]  # RequestCancelled is an answer
    inline = [s for s in answered if s.method == "textDocument/inlineCompletion" and not s.canary]
    with_items = [s for s in inline if items_of(s.future.result().result)]
    canaries = [s for s in answered if s.canary]
    canary_items = [s for s in canaries if items_of(s.future.result().result)]
    checks = [s for s in answered if s.expected_end is not None]
    mismatched = [s for s in checks if document_end(s.future.result().result) not in (None, s.expected_end)]
    unchecked = [s for s in checks if document_end(s.future.result().result) is None]
    faults = recoveries(run)
    worst = max(times, default=0.0)

    failures = []
    if unanswered:
        methods = sorted({s.method for s in unanswered})
        failures.append(f"{len(unanswered)} request(s) never answered ({', '.join(methods)})")
    if duplicates:
        failures.append(f"{duplicates} response(s) to no pending request (answered twice, or unknown id)")
    if late:
        failures.append(f"{len(late)} answer(s) later than the bound {run.bound:g} s (worst {worst:.1f} s)")
    if mismatched:
        failures.append(f"{len(mismatched)} document check(s): the server's document end differs from the reference")
    for fault in faults:
        if fault.get("skipped") is None and fault["recovery_s"] is None:
            failures.append(f"no canary suggestion with items in every window after the {fault['kind']} fault at "
                            f"{fault['at'] - run.began:.0f} s")
    if run.two_daemons_s > 2.0:
        failures.append(f"two daemons alive at once for {run.two_daemons_s:.1f} s")
    failures += run.server_exits
    for i, (a, b) in enumerate(zip(start["threads"], end["threads"])):
        if a is not None and b is not None and b > a + 3:
            added = collections.Counter(end["thread_names"][i]) - collections.Counter(start["thread_names"][i])
            failures.append(f"window {i}: server threads {a} -> {b} (more: {dict(added)})")
    for i, (a, b) in enumerate(zip(start["rss"], end["rss"])):
        if a is not None and b is not None and b > 1.3 * a + 64 * 1024:
            failures.append(f"window {i}: server RSS {a / 1024:.0f} -> {b / 1024:.0f} MiB")

    ms = lambda values, q: common.percentile(values, q) if values else None  # noqa: E731
    fault_rows = []
    for kind in FAULT_KINDS:
        done = [f for f in faults if f["kind"] == kind and f.get("skipped") is None]
        rec = [f["recovery_s"] for f in done if f["recovery_s"] is not None]
        fault_rows.append([kind, len(done), sum(1 for f in faults if f["kind"] == kind and f.get("skipped")),
                           len(rec), ms(rec, 50), ms(rec, 95), max(rec, default=None)])
    by_method = {}
    for s in run.sent:
        by_method.setdefault(s.method + (" (canary)" if s.canary else ""), []).append(s)
    request_rows = []
    for method, sent in sorted(by_method.items()):
        done = [s for s in sent if s.future.done()]
        t = [s.future.result().received - s.sent for s in done]
        request_rows.append([method, len(sent), len(done), ms(t, 50), ms(t, 95), max(t, default=None)])
    mib = lambda kib: None if kib is None else kib / 1024  # noqa: E731
    memory_rows = [[f"server {i}", mib(a), mib(b), ta, tb] for i, (a, b, ta, tb)
                   in enumerate(zip(start["rss"], end["rss"], start["threads"], end["threads"]))]
    memory_rows.append(["daemon (the one alive)", mib(start["daemon_rss"]), mib(end["daemon_rss"]), "", ""])
    rss_rows = [[f"{(when - run.began) / 60:.0f}"] + [mib(kib) for kib in values]
                for when, values in run.rss[::max(1, len(run.rss) // 12)]]
    summary = {
        "minutes": seconds / 60, "windows": run.windows, "keystrokes": run.keystrokes, "requests": len(run.sent),
        "answered": len(answered), "unanswered": len(unanswered), "duplicates": duplicates,
        "errors": len(errors), "late": len(late), "worst_answer_s": worst, "bound_s": run.bound,
        "daemon_deadline_s": deadline, "inline_with_items": len(with_items), "inline": len(inline),
        "canary_with_items": len(canary_items), "canary": len(canaries),
        "document_checks": len(checks), "document_mismatches": len(mismatched), "document_unchecked": len(unchecked),
        "faults": len([f for f in faults if not f.get("skipped")]), "opens": run.opens, "closes": run.closes,
        "max_daemons": max((c for _, c in run.daemon_counts), default=0), "two_daemons_s": run.two_daemons_s,
        "failures": failures,
        "server_threads": {"start": start["thread_names"], "end": end["thread_names"]},
        "rss_mib": [[round(when - run.began), [mib(kib) for kib in values]] for when, values in run.rss],
        "error_messages": sorted({f"{s.method}: {s.future.result().error.get('code')} "
                                  f"{s.future.result().error.get('message')}" for s in errors})[:10],
    }
    return {
        "suite": "soak",
        "headline": "Failures: " + ("; ".join(failures) if failures else "none"),
        "title": "Reliability: typing through daemon faults",
        "tables": [
            common.table("Requests (answer time in s; cancelled requests count as answered)",
                         ["method", "sent", "answered", "p50", "p95", "worst"], request_rows),
            common.table("Faults (recovery: fault -> first canary suggestion with items in every window, s)",
                         ["kind", "injected", "skipped", "recovered", "p50", "p95", "worst"], fault_rows),
            common.table("Servers and daemon at start and end (RSS MiB, threads)",
                         ["process", "RSS start", "RSS end", "threads start", "threads end"], memory_rows),
            common.table("Servers' RSS during the run (MiB, sampled every minute)",
                         ["minute"] + [f"server {i}" for i in range(run.windows)], rss_rows),
        ],
        "summary": summary,
        "faults": [{k: (v - run.began if k == "at" else v) for k, v in f.items()}
                   for f in faults],
        "notes": [
            "Each window is a `diffu-lsp` server over stdio; all share the real model daemon in a private runtime "
            "folder. Typing: at a random code line of a held-out stdlib module the line is deleted after its "
            "indentation and typed back at ~8 characters/s with random pauses; per key didChange, $/cancelRequest "
            "of the previous unanswered inline request, inlineCompletion, and a codeAction whose refine action "
            "echoes the end of the server's document (checked against the reference). Now and then a command "
            "(completeBlock / fillHoles / refineSelection; the edit it asks for is declined), a second buffer "
            "opened, one closed.",
            "Faults, at seeded random intervals after every window recovered from the previous fault (waiting "
            f"at most {RECOVERY_LIMIT:g} s), the four kinds in shuffled turns: freeze (SIGSTOP, SIGCONT 2-20 s "
            "later), kill (SIGKILL), restart (`diffu-lsp daemon stop`), delete-folder (the runtime folder "
            "removed). Recovery: from the fault to the first canary suggestion with items in every window (a "
            "buffer whose first line changes at each request, every ~2 s, so the server's cache of the last "
            "suggestion cannot answer it).",
            f"{summary['minutes']:.1f} min, {run.windows} window(s): {run.keystrokes} keystrokes, {len(run.sent)} "
            f"requests, {len(answered)} answered, {len(unanswered)} unanswered, {duplicates} answered twice, "
            f"{len(errors)} errors; worst answer {worst:.1f} s (bound {run.bound:g} s = daemon deadline "
            f"{deadline:g} s + hello + {SLACK_SECONDS:g} s).",
            f"{len(with_items)} of {len(inline)} inline answers to typing had items, {len(canary_items)} of "
            f"{len(canaries)} canary answers. Document checks: {len(checks)} "
            f"({len(mismatched)} mismatched, {len(unchecked)} without the refine action to check). "
            f"Buffers opened {run.opens}, closed {run.closes}. Most daemons alive at once: {summary['max_daemons']}.",
            "Failures: " + ("; ".join(failures) if failures else "none"),
        ],
    }


def timeline(run: Run, clients: list[LspClient]) -> list[str]:
    """What happened when (s since typing began): faults, daemon count changes, diffu/status changes."""
    events = [(f["at"], f"fault {f['kind']}" + (f" ({f['skipped']})" if f.get("skipped") else "")) for f in run.faults]
    last = None
    for at, count in run.daemon_counts:
        if count != last:
            events.append((at, f"daemons alive: {count}"))
            last = count
    seen = {}
    for at, index, engine in run.engines:
        if seen.get(index) != engine:
            events.append((at, f"window {index} engine: {engine}"))
            seen[index] = engine
    for index, client in enumerate(clients):
        for at, method, params in client.notifications:
            if method == "diffu/status" and isinstance(params, dict):
                events.append((at, f"window {index} status {params.get('state')}: {params.get('message') or ''}"[:160]))
    shown = {}
    for sent in run.sent:  # answers with items, one line per window per 5 s
        if sent.canary and sent.future.done() and not sent.future.cancelled():
            response = sent.future.result()
            if items_of(response.result):
                shown.setdefault((sent.window, int((response.received - run.began) // 5)), response.received)
    events += [(at, f"window {w}: canary suggestion with items") for (w, _), at in shown.items()]
    return [f"{at - run.began:8.1f}  {what}" for at, what in sorted(events) if at >= run.began - 1]


def document_end(result: Any) -> dict | None:
    """The end of the document as the server saw it: the refine action's range end."""
    for action in result or []:
        command = action.get("command") if isinstance(action, dict) else None
        if isinstance(command, dict) and command.get("command") == "diffu.refineSelection":
            for arg in command.get("arguments") or []:
                if isinstance(arg, dict) and isinstance(arg.get("range"), dict):
                    return arg["range"].get("end")
    return None


def run(options: common.Options) -> dict:
    minutes = float(options.extra.get("minutes") or (1.0 if options.quick else 10.0))
    windows = int(options.extra.get("windows") or 2)
    every = float(options.extra.get("fault_every") or 30.0)
    with tempfile.TemporaryDirectory(prefix="diffu-soak-") as folder:
        os.chmod(folder, 0o700)
        return asyncio.run(soak(options, minutes, windows, every, options.extra.get("deadline"), Path(folder)))
