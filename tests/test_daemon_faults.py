"""The daemon under faults, against real processes: a Cancel that overtakes its job, a frozen
daemon, a deleted runtime folder, floods and stalls on the socket. Each bound here failed (hung,
or was missing) before the never-hang work."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from diffu_lsp import __version__, protocol
from diffu_lsp.daemon import client as daemon_client
from diffu_lsp.daemon import daemon_pid
from diffu_lsp.daemon.client import DaemonEngine, connect, connect_or_start
from diffu_lsp.daemon.host import MAX_CONNECTIONS, RateLimit
from diffu_lsp.errors import DaemonStuck
from diffu_lsp.job import Suggestion
from diffu_lsp.scheduler import CancelToken

from test_daemon import BUNDLED, SLOW, alive, in_thread, runtime, suggest_request, wait_for  # noqa: F401

HELLO = protocol.encode(protocol.Hello(protocol.PROTOCOL, __version__, os.getpid()))


def raw_window(paths) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(60)
    raw.connect(str(paths.socket))
    raw.sendall(HELLO)
    assert isinstance(protocol.read_frame(raw), protocol.Welcome)
    return raw


def test_a_cancel_that_overtakes_its_job_still_gets_the_job_answered(runtime):
    warm = connect_or_start(runtime)
    warm.load(BUNDLED)  # loaded: a Submit's task starts without waiting, a Cancel right behind it overtakes it
    with raw_window(runtime) as raw:
        frames = b"".join(protocol.encode(protocol.Submit(i, f"doc{i}", BUNDLED, suggest_request()))
                          + protocol.encode(protocol.Cancel(i, "typed on")) for i in range(1, 11))
        raw.sendall(frames)
        answers = {}
        while len(answers) < 10:
            msg = protocol.read_frame(raw)  # each read is bounded by the socket timeout
            assert isinstance(msg, (protocol.Result, protocol.Failed)), msg
            assert msg.id not in answers, "answered twice"
            answers[msg.id] = msg
    assert sorted(answers) == list(range(1, 11))
    assert any(isinstance(a, protocol.Failed) and a.kind == "cancelled" for a in answers.values())
    # the window's worker is free: the next job is served
    assert isinstance(warm.submit("after", BUNDLED, suggest_request(), CancelToken()), Suggestion)
    warm.close()


@contextlib.contextmanager
def frozen_mid_job(engine, runtime):
    """The engine's daemon stopped (SIGSTOP) while it runs a slow job: yields (its pid, the job);
    afterwards a daemon still there is killed (and resumed, so that it dies) and the engine closed."""
    frozen = daemon_pid(runtime)
    started = threading.Event()
    job = in_thread(lambda: engine.run(suggest_request(**SLOW), CancelToken(), lambda step: started.set(), key="k"))
    assert started.wait(120)
    os.kill(frozen, signal.SIGSTOP)
    try:
        yield frozen, job
    finally:
        if alive(frozen):
            os.kill(frozen, signal.SIGKILL)
            os.kill(frozen, signal.SIGCONT)
        engine.close()


def test_a_frozen_daemon_is_reported_stuck_then_replaced(runtime, monkeypatch):
    monkeypatch.setattr(daemon_client, "PING_SECONDS", 0.5)
    states = []
    engine = DaemonEngine(paths=runtime, on_state=lambda state, message: states.append(state))
    engine.deadline = 2.0
    engine.load(BUNDLED)
    with frozen_mid_job(engine, runtime) as (frozen, job):
        t0 = time.monotonic()
        job["thread"].join(30)
        assert isinstance(job.get("error"), DaemonStuck), job  # answered (empty), not hung
        assert time.monotonic() - t0 < 2.0 + 2 * 0.5 + 2  # the deadline, a ping interval, slack
        assert states[0] == "stuck"
        answer = engine.run(suggest_request(), CancelToken(), key="k")
        assert isinstance(answer, Suggestion)
        assert states == ["stuck", "restarting", "ready"]
        wait_for(lambda: not alive(frozen), "the frozen daemon to be gone", 30)
        assert daemon_pid(runtime) not in (None, frozen)


def test_a_frozen_daemon_is_found_by_its_pings_and_killed_at_once_whatever_the_deadline(runtime):
    """#31: with the default deadline (10 s) a frozen daemon cost 20-28 s of ghost text: the job
    waited out the deadline, the next one the Hello's 5 s, then the kill and a new daemon. Pings
    are answered by the daemon's event loop, never behind a job, so a job that hears no Pong for
    LIVENESS_SECONDS gives up, and the frozen daemon is killed before the next keystroke."""
    engine = DaemonEngine(paths=runtime)
    assert engine.deadline == 10.0 > daemon_client.LIVENESS_SECONDS  # the setting's default
    engine.load(BUNDLED)
    engine.start_seconds = 0.0  # a new daemon answers at once here: a freeze is not waited out
    with frozen_mid_job(engine, runtime) as (frozen, job):
        t0 = time.monotonic()
        job["thread"].join(30)
        assert isinstance(job.get("error"), DaemonStuck), job
        assert time.monotonic() - t0 < daemon_client.LIVENESS_SECONDS + 2 * daemon_client.PING_SECONDS + 1
        wait_for(lambda: not alive(frozen), "the frozen daemon to be reaped", 5)  # killed with the answer
        assert isinstance(engine.run(suggest_request(), CancelToken(), key="k"), Suggestion)  # by a new daemon
        assert daemon_pid(runtime) not in (None, frozen)


def test_a_freeze_shorter_than_a_new_daemon_takes_is_waited_out(runtime):
    """Killing a daemon that resumes before a new one could answer only makes the outage longer:
    the frozen daemon is killed only once frozen for as long as a new daemon took here."""
    engine = DaemonEngine(paths=runtime)
    engine.load(BUNDLED)
    engine.start_seconds = engine.load_seconds = 60.0  # as on a machine where starting and loading are slow
    with frozen_mid_job(engine, runtime) as (frozen, job):
        job["thread"].join(30)
        assert isinstance(job.get("error"), DaemonStuck) and job["error"].frozen, job
        os.kill(frozen, signal.SIGCONT)
        assert isinstance(engine.run(suggest_request(), CancelToken(), key="k"), Suggestion)
        assert daemon_pid(runtime) == frozen and alive(frozen)  # the same daemon answers again


def test_no_lock_is_held_while_connecting(runtime, monkeypatch):
    engine = DaemonEngine(paths=runtime)
    seen = []

    def connecting(*args, **kwargs):
        seen.append(engine._lock.locked())
        return connect_or_start(*args, **kwargs)

    monkeypatch.setattr(daemon_client, "connect_or_start", connecting)
    engine.connection()
    engine.close()
    assert seen == [False]


def test_a_deleted_runtime_folder_does_not_lead_to_a_second_daemon(runtime):
    first = connect_or_start(runtime)
    pid = first.pid
    first.close()
    for path in runtime.folder.iterdir():
        path.unlink()
    runtime.folder.rmdir()
    # A window starting now makes the folder anew and starts a daemon; the old daemon notices
    # within a second that its socket is gone and either takes the folder back first (the new one
    # then bows out) or exits: one daemon either way, and the one the CLI finds.
    again = connect_or_start(runtime)
    try:
        wait_for(lambda: again.pid == pid or not alive(pid), "the old daemon to take over or exit", 15)
        assert daemon_pid(runtime) == again.pid and again.status().pid == again.pid
    finally:
        again.close()


def test_floods_and_stalls_do_not_take_the_daemon_down(runtime):
    good = connect_or_start(runtime)
    try:
        with socket.socket(socket.AF_UNIX) as big:  # a frame over the daemon's limit is refused at its header
            big.settimeout(30)
            big.connect(str(runtime.socket))
            big.sendall(HELLO + protocol.HEADER.pack(protocol.MAX_CLIENT_FRAME + 1))
            assert isinstance(protocol.read_frame(big), protocol.Welcome)
            assert "over the" in protocol.read_frame(big).message
        with socket.socket(socket.AF_UNIX) as silent:  # no Hello: dropped after the handshake deadline
            silent.settimeout(30)
            silent.connect(str(runtime.socket))
            t0 = time.monotonic()
            error = protocol.read_frame(silent)
            assert "no Hello" in error.message and time.monotonic() - t0 < 15
        flood = []
        try:
            refused = 0
            for _ in range(MAX_CONNECTIONS + 6):
                raw = socket.socket(socket.AF_UNIX)
                raw.settimeout(30)
                raw.connect(str(runtime.socket))
                raw.sendall(HELLO)
                flood.append(raw)
            for raw in flood:
                msg = protocol.read_frame(raw)
                refused += isinstance(msg, protocol.Error) and "too many connections" in msg.message
            assert refused >= 6
        finally:
            for raw in flood:
                raw.close()
        assert good.status().pid == good.pid  # still answering the windows it had
        good.load(BUNDLED)
        assert isinstance(good.submit("doc", BUNDLED, suggest_request(), CancelToken()), Suggestion)
    finally:
        good.close()


def test_log_lines_are_rate_limited():
    limit = RateLimit(per_minute=5)
    records = [logging.LogRecord("d", logging.WARNING, __file__, 1, "line %d", (i,), None) for i in range(50)]
    for record in records:
        record.created = 600.0  # one minute
    kept = [r for r in records if limit.filter(r)]
    assert len(kept) == 5 and limit.dropped == 45
    later = logging.LogRecord("d", logging.WARNING, __file__, 1, "next minute", (), None)
    later.created = 660.0
    assert limit.filter(later) and "45 log lines dropped" in later.getMessage()


def test_connect_returns_none_without_a_daemon_and_never_blocks(runtime):
    t0 = time.monotonic()
    assert connect(runtime) is None
    assert time.monotonic() - t0 < 1


def resetting_listener(paths) -> tuple[socket.socket, threading.Thread]:
    """A socket at the daemon's path that resets every connection: what a just-killed daemon's
    listener does for a moment (the kernel accepts into its backlog, then resets)."""
    paths.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(paths.socket))
    listener.listen(8)
    listener.settimeout(10)

    def reset_one():
        with contextlib.suppress(OSError):
            peer, _ = listener.accept()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            peer.recv(1)  # the hello has arrived: reset now, before the Welcome
            peer.close()
    thread = threading.Thread(target=reset_one, daemon=True)
    thread.start()
    return listener, thread


def test_a_dying_daemons_reset_is_no_daemon_and_a_new_one_starts(runtime):
    # Killing the daemon mid-job and typing on: the next connect could meet the dead daemon's
    # listener, which resets. That was a DaemonUnavailable, so the keystroke failed with a traceback in
    # the log and no new daemon started (test_daemon's kill test failed this way, now and then).
    listener, thread = resetting_listener(runtime)
    try:
        assert daemon_pid(runtime) is None  # no live daemon holds the lock
        assert connect(runtime) is None
    finally:
        thread.join(10)
        listener.close()


def test_a_reset_from_a_live_daemon_is_still_an_error(runtime):
    # the process that resets holds the daemon's lock: a live daemon that fails, not a dying one
    listener, thread = resetting_listener(runtime)
    lock = os.open(runtime.lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.write(lock, str(os.getpid()).encode())
    try:
        with pytest.raises(daemon_client.DaemonUnavailable, match="did not answer"):
            connect(runtime)
    finally:
        os.close(lock)
        thread.join(10)
        listener.close()


def test_a_reset_while_the_standby_holds_the_lock_is_no_daemon(runtime):
    """A window that says Hello to a daemon as it is killed gets a reset. The client used to wait
    for the lock's holder to go, taking it for that daemon; with a standby the holder is the
    standby, which took the lock at once and never goes, so the window gave up ("did not answer")
    instead of connecting to it. A reset by a process that does not hold the lock is no daemon.
    (Seen in the full suite: the standby test's reconnect after a kill failed this way.)"""
    listener, thread = resetting_listener(runtime)
    standby = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(runtime.lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, str(os.getpid()).encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert standby.stdout.readline().strip() == "held"
        assert connect(runtime) is None  # no daemon answers: the caller goes on to the standby (or starts one)
    finally:
        standby.kill()
        standby.wait()
        thread.join(10)
        listener.close()


def test_a_start_while_the_old_daemon_is_stopping_ends_with_a_daemon(runtime):
    # The old daemon (played by a process holding daemon.lock for 3 s) still holds the lock when the
    # new one starts: the new one bows out, the lock comes free, and the starter starts another
    # (it waited its whole 60 s start timeout for nobody before).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(runtime.lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(3)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        conn = connect_or_start(runtime)
        assert time.monotonic() - t0 < 30 and daemon_pid(runtime) == conn.pid
        conn.close()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.asyncio
async def test_out_of_memory_retries_in_the_daemon_reach_the_window(tmp_path, monkeypatch):
    # A daemon in this process whose job path runs out of memory once and retries: the window's
    # on_oom_retry hears it (the daemon client dropped it, so the counter was 0 in daemon mode).
    import asyncio

    from diffu_lsp import features

    def run_with_one_retry(model, request, *, cancel=None, on_step=None, on_oom_retry=lambda: None, **_job_options):
        on_oom_retry()
        return Suggestion("x", 0, False, 1, 16, 0.0)

    monkeypatch.setattr(features, "answer", run_with_one_retry)
    async with daemon_in_this_process(tmp_path) as (_daemon, paths):
        conn = await asyncio.to_thread(connect, paths)
        retries = []
        answer = await asyncio.to_thread(conn.submit, "doc", BUNDLED, suggest_request(), CancelToken(), None,
                                         lambda: retries.append(1))
        conn.close()
        assert answer.text == "x" and retries == [1]


class Panic(BaseException):
    """What the tokenizers library raises on some inputs (pyo3's PanicException): no Exception."""


@contextlib.asynccontextmanager
async def daemon_in_this_process(tmp_path):
    """A daemon serving on its own runtime folder from this test's event loop, holding a stand-in
    for the bundled model (the tests patch features.answer, the one job path)."""
    import asyncio
    from types import SimpleNamespace

    from diffu_lsp.daemon import Paths, private_folder
    from diffu_lsp.daemon.host import Daemon
    from diffu_lsp.job_host import HeldModel

    paths = Paths(tmp_path / "run")
    private_folder(paths.folder)
    daemon = Daemon(paths, idle_seconds=0)
    fake = SimpleNamespace(family="dream", device="cpu", max_length=512, parameter_count=1, load_seconds=0.0)
    daemon.models[BUNDLED] = HeldModel(BUNDLED, fake, 0)
    serving = asyncio.ensure_future(daemon.serve())
    try:
        await asyncio.to_thread(wait_for, lambda: paths.socket.exists(), "the socket", 10)
        yield daemon, paths
    finally:
        daemon._stop.set()
        await asyncio.wait_for(serving, 10)
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().remove_signal_handler(sig)


@pytest.mark.asyncio
async def test_a_job_raising_a_base_exception_is_answered_and_the_daemon_goes_on(tmp_path, monkeypatch):
    # Before: run_job caught Exception only, so a Panic left the Submit unanswered for ever (and
    # the window's pings, still answered, kept its deadline from firing).
    import asyncio

    from diffu_lsp import features

    calls = []

    def run(model, request, **job_options):
        calls.append(1)
        if len(calls) == 1:
            raise Panic("called `Option::unwrap()` on a `None` value")
        return Suggestion("x", 0, False, 1, 16, 0.0)

    monkeypatch.setattr(features, "answer", run)

    def window(paths) -> list:
        with raw_window(paths) as raw:
            raw.settimeout(10)
            raw.sendall(protocol.encode(protocol.Submit(1, "doc", BUNDLED, suggest_request())))
            first = protocol.read_frame(raw)
            raw.sendall(protocol.encode(protocol.Submit(2, "doc", BUNDLED, suggest_request())))
            return [first, protocol.read_frame(raw)]

    async with daemon_in_this_process(tmp_path) as (daemon, paths):
        first, second = await asyncio.to_thread(window, paths)
    assert isinstance(first, protocol.Failed) and first.id == 1 and first.kind == "error", first
    assert "Option::unwrap()" in first.message
    assert isinstance(second, protocol.Result) and second.id == 2 and second.value.text == "x", second


@pytest.mark.asyncio
async def test_a_window_that_reads_nothing_is_dropped_at_the_write_deadline(tmp_path, monkeypatch):
    # Before: the deadline queued an Error frame and closed the writer, which waits for its buffer
    # to flush: the socket stayed open (and the connection counted) for as long as the window did.
    import asyncio
    import select

    from diffu_lsp.daemon import host

    monkeypatch.setattr(host, "WRITE_SECONDS", 1.0)

    def stall(paths) -> tuple[bool, float]:
        raw = raw_window(paths)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(0.2)
        query = protocol.encode(protocol.StatusQuery())
        t0 = time.monotonic()
        try:  # ask and never read, until the daemon stops reading from us
            while time.monotonic() - t0 < 30:
                raw.sendall(query * 64)
        except (socket.timeout, BrokenPipeError, ConnectionResetError):
            pass
        poll = select.poll()
        poll.register(raw, select.POLLRDHUP)
        hung_up = bool(poll.poll(10_000))  # the daemon closed its end (nothing read here meanwhile)
        raw.close()
        return hung_up, time.monotonic() - t0

    async with daemon_in_this_process(tmp_path) as (daemon, paths):
        hung_up, seconds = await asyncio.to_thread(stall, paths)
        assert hung_up, "the daemon kept the stalled window's socket open"
        await asyncio.to_thread(wait_for, lambda: daemon._connections == 0 and not daemon.clients,
                                "the connection to be counted out", 10)
        assert seconds < 30


@pytest.mark.asyncio
async def test_a_frame_that_never_finishes_is_refused_at_the_frame_deadline(tmp_path, monkeypatch):
    """SECURITY.md: a window gets FRAME_SECONDS (30 s) from a frame's header to its last byte; one
    that sends a header and then a trickle is answered with an Error and dropped."""
    import asyncio

    from diffu_lsp.daemon import host

    monkeypatch.setattr(host, "FRAME_SECONDS", 0.5)

    def trickle(paths) -> tuple[str, float]:
        raw = raw_window(paths)
        raw.sendall(protocol.HEADER.pack(100) + b"x" * 10)  # 90 bytes never come
        t0 = time.monotonic()
        error = protocol.read_frame(raw)
        closed = raw.recv(1) == b""
        raw.close()
        return (error.message if isinstance(error, protocol.Error) and closed else repr(error)), time.monotonic() - t0

    async with daemon_in_this_process(tmp_path) as (daemon, paths):
        message, seconds = await asyncio.to_thread(trickle, paths)
        assert "did not arrive within" in message and seconds < 10
        await asyncio.to_thread(wait_for, lambda: daemon._connections == 0, "the connection to be counted out", 10)
