"""The server's side of the model daemon: connect (starting the daemon if none answers), send
jobs, wait for their answers on the scheduler's worker thread.

One :class:`Connection` per server process: a blocking socket, a reader thread that hands each
incoming frame to the waiter of its id, and a write lock. When the daemon goes away every waiter
is woken with :class:`DaemonLost` and ``on_lost`` is called once; the next job connects again,
which starts a new daemon.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..engine import Answer, ModelInfo, ModelKey, Request, Step
from ..jobs import JobCancelled
from ..settings import Settings
from . import DaemonError, Paths, file_lock, log_tail, runtime_paths, spawn
from . import wire

log = logging.getLogger("diffu_lsp.daemon.client")

START_TIMEOUT = 60.0


class DaemonLost(JobCancelled):
    """The daemon went away while a job was pending: the request is answered empty."""


class RemoteError(RuntimeError):
    """A load or job that failed inside the daemon (the daemon itself is fine)."""


class OutOfMemoryError(RemoteError):
    """The daemon ran out of memory on this job (named so that ``engine.is_oom`` knows it)."""


_LOST = object()


class Connection:
    """A handshaken connection to the daemon. Thread-safe."""

    def __init__(self, sock: socket.socket, welcome: wire.Welcome, on_lost: Callable[[str], None]):
        self.sock = sock
        self.pid = welcome.pid
        self.client_id = welcome.client
        self.closed = False
        self._closing = False
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._waiters: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        threading.Thread(target=self._read, name="diffu-daemon-reader", daemon=True).start()

    # ------------------------------------------------------------ calls

    def load(self, key: ModelKey) -> ModelInfo:
        answer = self._call(lambda id: wire.Load(id, key), lambda msg: None)
        return answer.info

    def submit(self, key: str, model: ModelKey, request: Request, cancel,
               on_step: Callable[[Any], None] | None = None) -> Answer:
        """Run one job in the daemon; ``cancel`` (a CancelToken) is forwarded as a Cancel frame."""
        def progress(msg: wire.Progress) -> None:
            cancel.forwards = msg.step
            if on_step is not None:
                on_step(Step(msg.step, msg.masked))

        answer = self._call(lambda id: wire.Submit(id, key, model, request, progress=on_step is not None),
                            progress, cancel)
        cancel.report(answer.forwards)
        return answer.value

    def status(self) -> wire.Status:
        return self._call(lambda id: wire.StatusQuery(), lambda msg: None, key=0)

    def stop(self) -> None:
        self._closing = True
        self.send(wire.Stop())

    def _call(self, make: Callable[[int], Any], on_progress: Callable[[Any], None], cancel=None, key: int | None = None):
        id = next(self._ids) if key is None else key
        waiter: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if self.closed:
                raise DaemonLost("the model daemon is gone")
            self._waiters[id] = waiter
        try:
            self.send(make(id))
            if cancel is not None:  # after the Submit, so the daemon knows the id it cancels
                cancel.on_cancel(lambda: self.send(wire.Cancel(id, cancel.reason)))
            while True:
                msg = waiter.get()
                if msg is _LOST:
                    raise DaemonLost("the model daemon stopped")
                if isinstance(msg, wire.Progress):
                    on_progress(msg)
                elif isinstance(msg, wire.Failed):
                    if cancel is not None:
                        cancel.report(msg.forwards, msg.forwards_after_cancel)
                    if msg.kind == "cancelled":
                        raise JobCancelled(msg.message)
                    raise (OutOfMemoryError if msg.kind == "oom" else RemoteError)(msg.message)
                elif isinstance(msg, wire.Error):
                    raise DaemonError(f"the model daemon refused: {msg.message}")
                else:
                    return msg
        finally:
            with self._lock:
                self._waiters.pop(id, None)

    # ------------------------------------------------------------ plumbing

    def send(self, message) -> None:
        data = wire.encode(message)
        try:
            with self._write_lock:
                self.sock.sendall(data)
        except OSError as error:
            self._lost(f"write failed: {error}")

    def _read(self) -> None:
        reason = "the connection closed"
        try:
            while True:
                msg = wire.read_frame(self.sock)
                if msg is None:
                    break
                if isinstance(msg, wire.Error):
                    reason = f"the daemon closed the connection: {msg.message}"
                    log.warning("daemon: %s", msg.message)
                    continue
                id = 0 if isinstance(msg, wire.Status) else msg.id
                with self._lock:
                    waiter = self._waiters.get(id)
                if waiter is not None:
                    waiter.put(msg)
        except (OSError, wire.FrameError) as error:
            reason = f"read failed: {error}"
        self._lost(reason)

    def _lost(self, reason: str) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            waiters = list(self._waiters.values())
        for waiter in waiters:
            waiter.put(_LOST)
        try:
            self.sock.close()
        except OSError:
            pass
        if not self._closing:
            log.warning("model daemon connection lost: %s", reason)
            self._on_lost(reason)

    def close(self) -> None:
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lost("closed by this server")


def connect(paths: Paths, on_lost: Callable[[str], None] = lambda reason: None) -> Connection | None:
    """A handshaken connection to the running daemon, or None when none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(paths.socket))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    try:
        sock.settimeout(30)
        sock.sendall(wire.encode(wire.Hello(wire.PROTOCOL, __version__, os.getpid())))
        answer = wire.read_frame(sock)
        sock.settimeout(None)
    except (OSError, wire.FrameError) as error:
        sock.close()
        raise DaemonError(f"the model daemon at {paths.socket} did not answer: {error}") from None
    if isinstance(answer, wire.Welcome):
        return Connection(sock, answer, on_lost)
    sock.close()
    if isinstance(answer, wire.Error):
        raise DaemonError(answer.message)
    raise DaemonError(f"the model daemon at {paths.socket} answered {type(answer).__name__} to hello")


def connect_or_start(paths: Paths, *, idle_seconds: int = 900, memory_mb: int = 0,
                     on_lost: Callable[[str], None] = lambda reason: None) -> Connection:
    """Connect to the daemon, starting it first if none answers (one starter at a time)."""
    conn = connect(paths, on_lost)
    if conn is not None:
        return conn
    with file_lock(paths.start_lock, START_TIMEOUT):
        conn = connect(paths, on_lost)  # another starter may have won the race
        if conn is not None:
            return conn
        process = spawn(paths, idle_seconds=idle_seconds, memory_mb=memory_mb)
        threading.Thread(target=process.wait, name="diffu-daemon-reaper", daemon=True).start()  # no zombie
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            conn = connect(paths, on_lost)
            if conn is not None:
                return conn
            code = process.poll()
            if code not in (None, 0):  # 0: another daemon held the lock; it will answer
                raise DaemonError(f"the model daemon exited at start (status {code}): {log_tail(paths)}")
            time.sleep(0.05)
    raise DaemonError(f"the model daemon did not answer within {START_TIMEOUT:.0f} s; see {paths.log}")


class DaemonEngine:
    """Runs jobs in the machine's model daemon (see ``engine.LocalEngine`` for the contract)."""

    name = "model daemon"

    def __init__(self, on_lost: Callable[[str], None] = lambda reason: None, paths: Paths | None = None):
        self.on_lost = on_lost
        self._paths = paths
        self.key: ModelKey | None = None
        self.idle_seconds, self.memory_mb = 900, 0
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    @property
    def paths(self) -> Paths:
        if self._paths is None:
            self._paths = runtime_paths()
        return self._paths

    def connection(self) -> Connection:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = connect_or_start(self.paths, idle_seconds=self.idle_seconds,
                                              memory_mb=self.memory_mb, on_lost=self.on_lost)
            return self._conn

    def configure(self, settings: Settings) -> None:
        self.idle_seconds, self.memory_mb = settings.daemon_idle_seconds, settings.daemon_memory_mb

    def load(self, key: ModelKey) -> ModelInfo:
        if key.model and Path(key.model).exists():  # the daemon runs elsewhere (cwd "/")
            key = ModelKey(str(Path(key.model).resolve()), key.device, key.dtype)
        try:
            info = self.connection().load(key)
        except DaemonLost:  # it died while loading: once more, with a new daemon
            info = self.connection().load(key)
        self.key = key
        return info

    def run(self, request: Request, cancel, on_step=None, on_oom_retry=None, *, key: str = "") -> Answer:
        if self.key is None:
            raise RuntimeError("no model is loaded")
        return self.connection().submit(key, self.key, request, cancel, on_step)

    def describe(self) -> dict:
        conn = self._conn
        live = conn is not None and not conn.closed
        return {"engine": "daemon", "daemon_pid": conn.pid if live else None,
                "daemon_socket": str(self._paths.socket) if self._paths else None}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
