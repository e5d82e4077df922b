"""The model daemon, tested against real processes: `diffu-lsp` servers driven by a real LSP
client over stdio, the daemon they start, and raw sockets speaking (and garbling) its wire format.

Each test gets a runtime folder of its own (XDG_RUNTIME_DIR), so each starts its own daemon,
which is stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from diffu_lsp import __version__, protocol
from diffu_lsp.bench import common
from diffu_lsp.bench.lsp_client import LspClient
from diffu_lsp.bench.soak import proc_status
from diffu_lsp.daemon import Paths, daemon_pid, runtime_paths, standby_pid
from diffu_lsp.daemon.client import DaemonEngine, connect, connect_or_start
from diffu_lsp.daemon.host import rss_bytes
from diffu_lsp.daemon.standby import NAME as STANDBY_NAME
from diffu_lsp.job import ModelKey, Request, Suggestion
from diffu_lsp.errors import FrameInvalid, JobCancelled
from diffu_lsp.scheduler import CancelToken
from diffu_lsp.settings import Settings

BUNDLED = ModelKey(None, "cpu", "float32")
SAMPLE = "import os\n\n\ndef read_config(path):\n    with open(path) as f:\n        return \n"
CURSOR = SAMPLE.index("return ") + len("return ")
# Jobs long enough to be caught running: a big hole decoded one token per forward, no cache.
SLOW = {"algorithm": "entropy", "kvCache": "none", "singleLineTokens": 400, "multiLineTokens": 400,
        "earlyExit": False, "debounceMs": 0}


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    """A runtime folder for this test only; whatever daemon it starts is stopped afterwards (its
    standby first, which would take the killed daemon's place)."""
    folder = tmp_path / "run"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    paths = runtime_paths()
    yield paths
    for pid in (standby_pid(paths), daemon_pid(paths)):
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def wait_for(predicate, what: str, timeout: float = 120.0):
    return common.wait_for(predicate, timeout, what)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def status(paths: Paths) -> protocol.Status:
    conn = connect(paths)
    assert conn is not None, "no daemon answers"
    try:
        return conn.status()
    finally:
        conn.close()


def suggest_request(**settings) -> Request:
    return Request("suggest", SAMPLE, CURSOR, CURSOR, msgspec.convert(settings, Settings))


def in_thread(fn):
    """Run fn() on a thread; returns a dict that gets "value" or "error" when it ends."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as error:  # noqa: BLE001
            out["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    out["thread"] = thread
    return out


# ------------------------------------------------------------------ wire format

def test_every_message_survives_the_wire_and_bad_frames_are_refused():
    messages = [
        protocol.Hello(protocol.PROTOCOL, __version__, 12), protocol.Welcome(protocol.PROTOCOL, __version__, 34, 1),
        protocol.Load(1, BUNDLED), protocol.Submit(2, "file:///a.py", BUNDLED, suggest_request(), progress=True),
        protocol.Cancel(2, "superseded"), protocol.Progress(2, 3, 10), protocol.Progress(2, 4, 9, "def f(…\n"),
        protocol.Result(2, Suggestion("x", 0, False, 3, 16, 0.1), 3), protocol.Result(3, "refined", 1),
        protocol.Failed(4, "oom", "CUDA out of memory", 2, 1), protocol.StatusQuery(), protocol.Stop(), protocol.Error("no"),
    ]
    for message in messages:
        frame = protocol.encode(message)
        assert protocol.body_length(frame[:4]) == len(frame) - 4
        assert protocol.decode(frame[4:]) == message
    with pytest.raises(FrameInvalid, match="over the"):
        protocol.body_length(protocol.HEADER.pack(protocol.MAX_FRAME + 1))
    for garbage in (b"", b"\xc1", msgspec.msgpack.encode({"type": "Nope"}), msgspec.msgpack.encode([1, 2])):
        with pytest.raises(FrameInvalid):
            protocol.decode(garbage)


# ------------------------------------------------------------------ through real servers

async def open_window(paths: Paths, tmp: Path, name: str, *args: str, options: dict | None = None) -> LspClient:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(paths.folder.parent), "XDG_CONFIG_HOME": str(tmp / "xdg"),
           "OMP_NUM_THREADS": "1"}
    client = LspClient([sys.executable, "-m", "diffu_lsp", "--device", "cpu", "--dtype", "float32", *args], env=env)
    await client.start()
    await client.initialize((tmp / name).as_uri(), options)
    return client


async def until_ready(client: LspClient, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, method, params in client.notifications:
            if method == "diffu/status" and params["state"] in ("ready", "error"):
                assert params["state"] == "ready", params
                return params
        await asyncio.sleep(0.05)
    raise AssertionError("the model did not become ready:\n" + "\n".join(client.stderr_tail))


def open_doc(client: LspClient, uri: str, text: str = SAMPLE) -> None:
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                            "text": text}})


def inline_params(uri: str) -> dict:
    line = SAMPLE[:CURSOR].count("\n")
    return {"textDocument": {"uri": uri}, "position": {"line": line, "character": CURSOR - SAMPLE.rindex("\n", 0, CURSOR) - 1},
            "context": {"triggerKind": 1}}  # Invoked: no debounce


async def suggestion(client: LspClient, uri: str) -> list:
    result = await client.request("textDocument/inlineCompletion", inline_params(uri), timeout=300)
    return (result or {}).get("items", []) if isinstance(result, dict) else result or []


def shown_messages(client: LspClient) -> list[str]:
    return [p["message"] for _, method, p in client.notifications if method == "window/showMessage"]


@pytest.mark.asyncio
async def test_two_windows_share_one_loaded_model(runtime, tmp_path):
    first = await open_window(runtime, tmp_path, "a")
    try:
        await until_ready(first)
        open_doc(first, "file:///a.py")
        assert await suggestion(first, "file:///a.py")
        one_window = status(runtime)
        assert (one_window.loads, one_window.clients) == (1, 1)  # (the status query is not a window)

        second = await open_window(runtime, tmp_path, "b")
        try:
            ready = await until_ready(second)
            open_doc(second, "file:///b.py")
            assert await suggestion(second, "file:///b.py")
            two_windows = status(runtime)
            assert two_windows.pid == one_window.pid
            assert (two_windows.loads, two_windows.clients) == (1, 2)  # loaded once, shared
            assert [m.jobs for m in two_windows.models] == [2]
            assert two_windows.rss_bytes < 1.3 * one_window.rss_bytes  # not doubled
            # The windows' own processes never load torch or the weights.
            for window in (first, second):
                assert rss_bytes(window.pid) < two_windows.rss_bytes / 2
                stats = await window.request("diffu/stats")
                assert stats["engine"] == "daemon" and stats["daemon_pid"] == two_windows.pid
            assert "already loaded" in " ".join(str(p) for _, m, p in second.notifications if m == "window/logMessage")
            assert ready["state"] == "ready"
        finally:
            await second.close()
    finally:
        await first.close()
    assert wait_for(lambda: status(runtime).clients == 0, "both windows to disconnect", timeout=30)


@pytest.mark.asyncio
async def test_killing_the_daemon_mid_job_answers_and_the_next_request_starts_a_new_one(runtime, tmp_path):
    window = await open_window(runtime, tmp_path, "w", options=SLOW)
    try:
        await until_ready(window)
        open_doc(window, "file:///k.py")
        old_pid = daemon_pid(runtime)
        request_id, pending = window.send_request("textDocument/inlineCompletion", inline_params("file:///k.py"))
        await window.drain()
        await asyncio.to_thread(wait_for, lambda: status(runtime).jobs["running"] is not None, "the job to run")
        os.kill(old_pid, signal.SIGKILL)
        answer = await asyncio.wait_for(pending, 30)
        # answered with an empty list, not null: a client drops the suggestion it shows (Neovim keeps it on null)
        assert answer.error is None and answer.result == {"items": []}, answer
        await asyncio.to_thread(wait_for, lambda: any("daemon stopped" in m for m in shown_messages(window)),
                                "the user to be told", 30)

        items = await suggestion(window, "file:///k.py")  # from the daemon's standby, which took its place
        new = status(runtime)
        assert new.pid != old_pid and new.loads == 1 and new.jobs["completed"] == 1
        assert items and items[0]["insertText"]
        assert len([m for m in shown_messages(window) if "daemon stopped" in m]) == 1  # told once
    finally:
        await window.close()


@pytest.mark.asyncio
async def test_no_daemon_keeps_the_model_in_the_server(runtime, tmp_path):
    window = await open_window(runtime, tmp_path, "solo", "--no-daemon")
    try:
        await until_ready(window)
        open_doc(window, "file:///s.py")
        assert await suggestion(window, "file:///s.py")
        assert (await window.request("diffu/stats"))["engine"] == "in-process"
        assert not runtime.socket.exists() and daemon_pid(runtime) is None
    finally:
        await window.close()


@pytest.mark.asyncio
async def test_a_window_that_cannot_have_a_daemon_holds_the_model_itself(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "diffu-lsp").write_text("a file where the runtime folder should be")
    window = await open_window(Paths(folder / "diffu-lsp"), tmp_path, "f")
    try:
        await until_ready(window)
        open_doc(window, "file:///f.py")
        assert await suggestion(window, "file:///f.py")
        assert (await window.request("diffu/stats"))["engine"] == "in-process"
        assert any("daemon is unavailable" in m and "not a folder" in m for m in shown_messages(window))
    finally:
        await window.close()


# ------------------------------------------------------------------ the socket, directly

def test_cancellation_crosses_the_socket_within_one_forward(runtime):
    conn = connect_or_start(runtime)
    try:
        conn.load(BUNDLED)
        slow = suggest_request(**SLOW)
        first_step = threading.Event()
        superseded = CancelToken()
        old = in_thread(lambda: conn.submit("doc", BUNDLED, slow, superseded, lambda step: first_step.set()))
        assert first_step.wait(120), "the first job never ran"
        superseded.cancel("superseded by a keystroke")
        newer = CancelToken()
        new_answer = conn.submit("doc", BUNDLED, suggest_request(), newer)  # the same document, newest wins
        old["thread"].join(30)
        assert isinstance(old.get("error"), JobCancelled)
        assert superseded.forwards_after_cancel <= 1
        assert isinstance(new_answer, Suggestion) and newer.forwards >= 1

        # A second submission for the same key supersedes the first in the daemon too, without a Cancel.
        started = threading.Event()
        a = in_thread(lambda: conn.submit("doc2", BUNDLED, slow, CancelToken(), lambda step: started.set()))
        assert started.wait(120)
        conn.submit("doc2", BUNDLED, suggest_request(), CancelToken())
        a["thread"].join(30)
        assert isinstance(a.get("error"), JobCancelled) and "superseded" in str(a["error"])
        jobs = status(runtime).jobs
        assert jobs["max_forwards_after_cancel"] <= 1 and jobs["superseded"] >= 1
    finally:
        conn.close()


def test_one_window_cannot_fill_the_queue(runtime):
    busy, flood = connect_or_start(runtime), connect_or_start(runtime)
    try:
        busy.load(BUNDLED)
        started = threading.Event()
        blocker = CancelToken()
        hold = in_thread(lambda: busy.submit("busy", BUNDLED, suggest_request(**SLOW), blocker,
                                             lambda step: started.set()))
        assert started.wait(120)
        answers = [in_thread(lambda i=i: flood.submit(f"doc{i}", BUNDLED, suggest_request(), CancelToken()))
                   for i in range(12)]
        full = wait_for(lambda: [a for a in answers if "error" in a] if sum("error" in a for a in answers) == 4 else None,
                        "the 4 oldest to be cancelled", 60)
        assert all("queue full" in str(a["error"]) for a in full)
        blocker.cancel()
        for a in answers:
            a["thread"].join(120)
        done = [a for a in answers if "value" in a]
        assert len(done) == 8 and len(answers) - len(done) == 4  # the 8 newest were served
        hold["thread"].join(30)
    finally:
        busy.close()
        flood.close()


def test_socket_is_owner_only_and_garbage_does_not_take_the_daemon_down(runtime):
    good = connect_or_start(runtime)
    try:
        assert stat.S_IMODE(os.stat(runtime.folder).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(runtime.socket).st_mode) == 0o600

        def raw_exchange(payload: bytes) -> protocol.Message | None:
            with socket.socket(socket.AF_UNIX) as raw:
                raw.settimeout(30)
                raw.connect(str(runtime.socket))
                raw.sendall(payload)
                answer = protocol.read_frame(raw)
                assert protocol.read_frame(raw) is None  # then the daemon closes the connection
                return answer

        assert "bad frame" in raw_exchange(protocol.HEADER.pack(5) + b"hello").message
        assert "over the" in raw_exchange(protocol.HEADER.pack(2**31)).message
        assert "expected Hello" in raw_exchange(protocol.encode(protocol.StatusQuery())).message
        mismatch = raw_exchange(protocol.encode(protocol.Hello(protocol.PROTOCOL + 1, "9.9", 1)))
        assert "version mismatch" in mismatch.message and "daemon stop" in mismatch.message
        welcome_then_junk = protocol.encode(protocol.Hello(protocol.PROTOCOL, __version__, 1)) + protocol.HEADER.pack(3) + b"\xc1\xc1\xc1"
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(runtime.socket))
            raw.sendall(welcome_then_junk)
            assert isinstance(protocol.read_frame(raw), protocol.Welcome)
            assert isinstance(protocol.read_frame(raw), protocol.Error)
        with socket.socket(socket.AF_UNIX) as raw:  # a client that vanishes mid-frame
            raw.connect(str(runtime.socket))
            raw.sendall(protocol.HEADER.pack(100) + b"abc")
        assert good.status().clients == 0  # the garbage connections are gone; this one is fine
        good.load(BUNDLED)
        assert isinstance(good.submit("doc", BUNDLED, suggest_request(), CancelToken()), Suggestion)
    finally:
        good.close()


def test_racing_starters_end_with_exactly_one_daemon(runtime):
    starter = ("import sys; from diffu_lsp.daemon import runtime_paths; "
               "from diffu_lsp.daemon.client import connect_or_start; "
               "c = connect_or_start(runtime_paths()); print(c.pid); c.close()")
    racers = [subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    pids = {int(p.communicate(timeout=120)[0]) for p in racers}
    assert len(pids) == 1 and pids == {daemon_pid(runtime)}
    # A daemon started by hand while one runs bows out.
    late = subprocess.run([sys.executable, "-m", "diffu_lsp", "daemon", "run"], capture_output=True, text=True,
                          timeout=60)
    assert late.returncode == 0 and "another daemon holds" in late.stderr
    assert status(runtime).pid in pids


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the standby is a Linux fork")
def test_a_killed_daemon_is_replaced_by_its_standby_not_by_a_new_process(runtime):
    """#31: a kill cost 3.7 s of ghost text, 85-90 % of it a new daemon importing torch and
    transformers. A daemon forks a standby with them imported, which takes the daemon's lock and
    serves the moment the daemon dies: the replacement is that process, and it forks the next
    standby, also after the runtime folder was deleted and taken back. A daemon stopped on purpose
    takes its standby along."""
    conn = connect_or_start(runtime)
    conn.load(BUNDLED)
    conn.close()
    first = daemon_pid(runtime)
    waiting = wait_for(lambda: standby_pid(runtime), "a standby")
    assert proc_status(waiting, "PPid") == first and comm(waiting) == STANDBY_NAME  # a fork of the daemon, not serving
    for round in range(2):
        if round == 1:  # the runtime folder deleted (and taken back by the daemon) before the kill
            daemon = daemon_pid(runtime)
            shutil.rmtree(runtime.folder)
            wait_for(lambda: daemon_pid(runtime) == daemon and runtime.socket.exists(), "the folder taken back", 30)
        os.kill(daemon_pid(runtime), signal.SIGKILL)
        conn = connect_or_start(runtime)
        try:
            assert conn.pid == waiting  # no new process: the standby answers in the killed daemon's place
            assert comm(waiting) != STANDBY_NAME
            assert not conn.load(BUNDLED).shared  # it holds no model until asked (no second copy)
            assert isinstance(conn.submit("doc", BUNDLED, suggest_request(), CancelToken()), Suggestion)
        finally:
            conn.close()
        waiting = wait_for(lambda: standby_pid(runtime) not in (None, conn.pid) and standby_pid(runtime),
                           "the next standby")
        assert proc_status(waiting, "PPid") == conn.pid
    stopped = subprocess.run([sys.executable, "-m", "diffu_lsp", "daemon", "stop"], capture_output=True, text=True,
                             timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not alive(waiting), "the standby to stop with its daemon", 10)
    assert daemon_pid(runtime) is None and standby_pid(runtime) is None


def test_a_lost_daemon_s_replacement_loads_the_model_before_the_next_job(runtime):
    """#31: after a kill nothing happened until the next keystroke's job, which then waited for the
    replacement to start and load. The engine reconnects at once, and loads the model there."""
    states = []
    engine = DaemonEngine(paths=runtime, on_state=lambda state, message: states.append(state))
    try:
        engine.load(BUNDLED)
        old = daemon_pid(runtime)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: states[-2:] == ["restarting", "ready"], "the engine to reconnect by itself", 120)
        now = status(runtime)
        assert now.pid != old and [m.label for m in now.models] == [BUNDLED.label]  # loaded, no job asked for it
        assert now.jobs["completed"] == 0
        assert isinstance(engine.run(suggest_request(), CancelToken(), key="k"), Suggestion)
    finally:
        engine.close()


def test_a_daemon_stopped_on_purpose_stays_stopped_until_a_job_needs_it(runtime):
    """`diffu-lsp daemon stop` with a window open: the window reconnected and loaded the model at
    once, as after a crash, so the daemon (and its model's memory) was back within seconds. The
    daemon now says it stops on purpose (protocol.Stopping): the window starts nothing by itself,
    and its next job starts a new daemon."""
    lost, states = [], []
    engine = DaemonEngine(paths=runtime, on_lost=lambda reason, stopped: lost.append((reason, stopped)),
                          on_state=lambda state, message: states.append(state))
    try:
        engine.load(BUNDLED)
        stopped = subprocess.run([sys.executable, "-m", "diffu_lsp", "daemon", "stop"], capture_output=True,
                                 text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        wait_for(lambda: lost, "the window to hear of it", 30)
        assert lost == [("diffu-lsp daemon stop", True)]
        with pytest.raises(TimeoutError):  # a restart would show within a second (its standby: none, stopped too)
            wait_for(lambda: states or daemon_pid(runtime), "nothing to happen", 5)
        assert isinstance(engine.run(suggest_request(), CancelToken(), key="k"), Suggestion)
        assert daemon_pid(runtime) is not None and states == ["restarting", "ready"]
    finally:
        engine.close()


def test_idle_daemon_exits_and_cli_reports_it(runtime):
    conn = connect_or_start(runtime, idle_seconds=1)
    pid = conn.pid
    conn.close()
    wait_for(lambda: daemon_pid(runtime) is None, "the idle daemon to exit", 30)
    assert not runtime.socket.exists()
    wait_for(lambda: not alive(pid), "the daemon process to be gone (and reaped)", 30)
    none = subprocess.run([sys.executable, "-m", "diffu_lsp", "daemon", "status"], capture_output=True, text=True)
    assert none.returncode == 1 and "no model daemon" in none.stderr

    conn = connect_or_start(runtime)
    conn.close()
    shown = subprocess.run([sys.executable, "-m", "diffu_lsp", "daemon", "status", "--json"], capture_output=True,
                           text=True, check=True)
    assert msgspec.json.decode(shown.stdout)["pid"] == daemon_pid(runtime)
    stopped = subprocess.run([sys.executable, "-m", "diffu_lsp", "daemon", "stop"], capture_output=True, text=True,
                             check=True)
    assert "stopped" in stopped.stdout and daemon_pid(runtime) is None


def test_models_are_shared_by_key_and_evicted_past_the_memory_budget(runtime, random_dream):
    conn = connect_or_start(runtime, memory_mb=30)  # the bundled model is 22 MiB in float32
    try:
        bundled = conn.load(BUNDLED)
        assert not bundled.shared and bundled.evicted == ()
        assert conn.load(BUNDLED).shared
        other = conn.load(ModelKey(str(random_dream), "cpu", "float32"))
        assert other.evicted == ("bundled tiny model (cpu, float32)",)
        now = status(runtime)
        assert (now.loads, now.evictions, [m.label for m in now.models]) == (2, 1, [str(random_dream)])
        again = conn.load(BUNDLED)  # comes back, and pushes the other one out
        assert not again.shared and status(runtime).loads == 3
        broken = ModelKey(str(runtime.folder / "missing"), "cpu", "float32")
        with pytest.raises(Exception, match="missing"):
            conn.load(broken)
        assert isinstance(conn.submit("doc", BUNDLED, suggest_request(), CancelToken()), Suggestion)
    finally:
        conn.close()


def test_the_daemon_keeps_each_documents_last_canvas_for_warm_start(runtime):
    conn = connect_or_start(runtime)
    try:
        conn.load(BUNDLED)
        first = conn.submit("doc", BUNDLED, suggest_request(warmStart=True), CancelToken())
        assert first.drafted == 0 and first.text
        typed = first.text[:2]  # the user types two characters of the suggestion
        text, cursor = SAMPLE[:CURSOR] + typed + SAMPLE[CURSOR:], CURSOR + len(typed)

        def after_typing(key: str, warm: bool) -> Suggestion:
            request = Request("suggest", text, cursor, cursor, Settings(warm_start=warm))
            return conn.submit(key, BUNDLED, request, CancelToken())

        assert after_typing("other", True).drafted == 0  # another document has no canvas of its own
        assert after_typing("doc", False).drafted == 0   # the setting off: a cold start
        assert after_typing("doc", True).drafted > 0     # the hole starts from the last canvas
    finally:
        conn.close()


def test_a_command_s_draft_streams_from_the_daemon_step_by_step(runtime):
    conn = connect_or_start(runtime)
    try:
        conn.load(BUNDLED)
        start, end = SAMPLE.index("def "), SAMPLE.index("\n", SAMPLE.index("def "))
        refine = Request("refine", SAMPLE, start, end, Settings(algorithm="entropy", steps=6, early_exit=False))
        steps = []
        answer = conn.submit("doc", BUNDLED, refine, CancelToken(), steps.append)
        assert [step.step for step in steps] == list(range(1, 7)) and steps[-1].masked == 0
        assert "…" in steps[0].text and steps[-1].text == answer  # the final draft is the answer
    finally:
        conn.close()
