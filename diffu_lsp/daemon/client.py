"""The server's side of the model daemon: connect (starting the daemon if none answers), send
jobs, wait for their answers on the scheduler's worker thread.

One :class:`Connection` per server process: a blocking socket, a reader thread that hands each
incoming frame to the waiter of its id, and a write lock. When the daemon goes away every waiter
is woken with :class:`DaemonLost` and ``on_lost`` is called once; the engine then connects again
at once, to the daemon's standby taking its place (``standby.py``; else a new daemon is started),
and loads the model there, without waiting for the next job. A daemon stopped on purpose (``daemon
stop``) says so first (:class:`~diffu_lsp.protocol.Stopping`): then the next job starts a new one.

No wait is unbounded. A waiting call pings the daemon after :data:`PING_SECONDS` without a word
from it. Pings are answered by the daemon's event loop, never behind a job (jobs run on its worker
thread): a job that hears nothing (no frame, no Pong) for :data:`LIVENESS_SECONDS` while the
daemon's process runs not at all faces a frozen daemon (a slow one, a load, and a job before the
daemon has its model get the setting ``daemonDeadlineSeconds``, which caps both). It raises
:class:`DaemonStuck` (answered empty), the window is told once, and the frozen daemon is killed (if
the pid is still our daemon's) once frozen for as long as replacing it takes (loading the model,
with a standby waiting; else as long as a new daemon took to answer here), and the model loaded in
the next one then, not at the next keystroke; one that does not answer a Hello
within :data:`HELLO_SECONDS` is replaced too. No lock is held across a socket read.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .. import __version__, protocol
from ..errors import (DaemonLost, DaemonStuck, DaemonUnavailable, DaemonUnresponsive, FrameInvalid,
                      JobFailed, ModelLoadFailed, OutOfMemory, RequestTooLarge)
from ..job import Answer, ModelInfo, ModelKey, Request
from ..settings import Settings
from . import (Paths, check_socket_file, cpu_seconds, daemon_pid, file_lock, log_tail, peer_uid,
               private_folder, runtime_paths, spawn, standby_pid, terminate, wait_until_gone)

log = logging.getLogger("diffu_lsp.daemon.client")

START_TIMEOUT = 60.0
HELLO_SECONDS = 5.0   # connect + Hello -> Welcome
PING_SECONDS = 0.5    # a waiting call pings the daemon after this long without a word from it
LIVENESS_SECONDS = 2.0  # a job that hears no Pong for this long faces a frozen daemon (#31: ghost text back soon)
JOB_LIMIT_SECONDS = 900.0  # even a daemon that answers pings gets no longer than this for one call
DEFAULT_DEADLINE = 10.0
RESET_GRACE_SECONDS = 2.0  # a reset Hello: how long a dying daemon may take to let go of its lock
STANDBY_SECONDS = 5.0  # no daemon answers but its standby waits: how long it may take to answer in its place


_LOST = object()


class Connection:
    """A handshaken connection to the daemon. Thread-safe."""

    def __init__(self, sock: socket.socket, welcome: protocol.Welcome, on_lost: Callable[[str, bool], None],
                 deadline: float = DEFAULT_DEADLINE):
        self.sock = sock
        self.pid = welcome.pid
        self.deadline = deadline
        self.last_heard = time.monotonic()
        self.loaded = False  # the daemon has loaded a model (answered a Load or a job) since we connected
        self._quiet: tuple = (0.0, None, 0.0)  # last_heard, the daemon's CPU seconds, since when it has not run
        self.closed = False
        self.stopped = False  # the daemon said it stops on purpose (protocol.Stopping)
        self._closing = False
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._waiters: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        threading.Thread(target=self._read, name="diffu-daemon-reader", daemon=True).start()

    # ------------------------------------------------------------ calls

    def load(self, key: ModelKey) -> ModelInfo:
        try:
            answer = self._call(lambda id: protocol.Load(id, key), quick=False)
        except (JobFailed, OutOfMemory, RequestTooLarge) as error:  # whatever stopped the load: the window says why
            raise ModelLoadFailed(str(error)) from error
        return answer.info

    def submit(self, key: str, model: ModelKey, request: Request, cancel,
               on_step: Callable[[Any], None] | None = None, on_oom_retry: Callable[[], None] = lambda: None) -> Answer:
        """Run one job in the daemon; ``cancel`` (a CancelToken) is forwarded as a Cancel frame;
        ``on_oom_retry`` is called for each out-of-memory retry the daemon made."""
        return self._call(lambda id: protocol.Submit(id, key, model, request, progress=on_step is not None),
                          cancel, on_step, on_oom_retry).value

    def status(self) -> protocol.Status:
        return self._call(lambda id: protocol.StatusQuery(), key=0)

    def stop(self) -> None:
        self._closing = True
        self.send(protocol.Stop())

    def _call(self, make: Callable[[int], Any], cancel=None, on_step=None, on_oom_retry=lambda: None, *,
              key: int | None = None, quick: bool = True):
        id = next(self._ids) if key is None else key
        waiter: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if self.closed:
                raise DaemonLost("the model daemon is gone")
            self._waiters[id] = waiter
        try:
            self.send(make(id))
            if cancel is not None:  # after the Submit, so the daemon knows the id it cancels
                cancel.on_cancel(lambda: self.send(protocol.Cancel(id, cancel.reason)))
            limit = time.monotonic() + JOB_LIMIT_SECONDS
            while True:
                try:
                    msg = waiter.get(timeout=PING_SECONDS)
                except queue.Empty:
                    self._check_alive(id, limit, quick and self.loaded)
                    continue
                if msg is _LOST:
                    raise DaemonLost("the model daemon stopped")
                msg = protocol.take(msg, cancel, on_step, on_oom_retry)
                if msg is not None and not isinstance(msg, protocol.Pong):
                    return msg
        finally:
            with self._lock:
                self._waiters.pop(id, None)

    def _check_alive(self, id: int, limit: float, quick: bool) -> None:
        """After a quiet spell: ping, or give up on a daemon silent for the deadline, or for
        :data:`LIVENESS_SECONDS` in which its process ran not at all (stopped or blocked: a daemon
        that is only slow, e.g. on a starved machine, uses CPU time and gets the deadline)."""
        now, cpu = time.monotonic(), cpu_seconds(self.pid)
        if self._quiet[:2] != (self.last_heard, cpu):  # a new quiet spell, or the daemon ran: restart the clock
            self._quiet = (self.last_heard, cpu, now)
        silent, still = now - self.last_heard, now - self._quiet[2]
        frozen = quick and cpu is not None and silent > LIVENESS_SECONDS and still >= LIVENESS_SECONDS - PING_SECONDS
        if frozen or silent > self.deadline or now > limit:
            what = (f"the model daemon (pid {self.pid}) did not answer for {silent:.1f} s" if now <= limit
                    else f"the job ran past {JOB_LIMIT_SECONDS:.0f} s")
            self.close(what)
            raise DaemonStuck(what, frozen=frozen)
        self.send(protocol.Ping(id))

    # ------------------------------------------------------------ plumbing

    def send(self, message) -> None:
        data = protocol.encode(message)
        try:
            with self._write_lock:
                self.sock.sendall(data)
        except OSError as error:
            self._lost(f"write failed: {error}")

    def _read(self) -> None:
        reason = "the connection closed"
        try:
            while True:
                msg = protocol.read_frame(self.sock)
                if msg is None:
                    break
                self.last_heard = time.monotonic()
                self.loaded = self.loaded or isinstance(msg, (protocol.Loaded, protocol.Result))
                if isinstance(msg, protocol.Error):
                    reason = f"the daemon closed the connection: {msg.message}"
                    log.warning("daemon: %s", msg.message)
                    continue
                if isinstance(msg, protocol.Stopping):
                    reason, self.stopped = msg.reason, True
                    continue
                id = 0 if isinstance(msg, protocol.Status) else msg.id
                with self._lock:
                    waiter = self._waiters.get(id)
                if waiter is not None:
                    waiter.put(msg)
        except (OSError, FrameInvalid) as error:
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
        with contextlib.suppress(OSError):
            self.sock.close()
        if not self._closing:
            log.log(logging.INFO if self.stopped else logging.WARNING, "model daemon connection lost: %s", reason)
            self._on_lost(reason, self.stopped)

    def close(self, reason: str = "closed by this server") -> None:
        """Drop the connection (pending calls get DaemonLost); ``on_lost`` is not called."""
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._lost(reason)


def connect(paths: Paths, on_lost: Callable[[str, bool], None] = lambda reason, stopped: None,
            deadline: float = DEFAULT_DEADLINE) -> Connection | None:
    """A handshaken connection to the running daemon, or None when none listens (or only a dead
    daemon's socket resets). Only a socket of ours with a peer of our uid is spoken to."""
    try:
        check_socket_file(paths.socket)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise DaemonUnavailable(f"cannot use {paths.socket}: {error.strerror or error}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HELLO_SECONDS)
    try:
        sock.connect(str(paths.socket))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as error:  # a full backlog: the daemon accepts nothing
        sock.close()
        raise DaemonUnresponsive(f"the model daemon at {paths.socket} does not accept connections: {error}") from None
    peer = None
    try:
        peer, uid = peer_uid(sock)
        if uid != os.getuid():
            sock.close()
            raise DaemonUnavailable(f"the process listening on {paths.socket} runs as uid {uid}, not as this user; "
                              "refusing to send it anything")
        sock.sendall(protocol.encode(protocol.Hello(protocol.PROTOCOL, __version__, os.getpid())))
        answer = protocol.read_frame(sock)
        sock.settimeout(None)
    except TimeoutError:
        sock.close()
        raise DaemonUnresponsive(f"the model daemon at {paths.socket} did not answer in {HELLO_SECONDS:.0f}s") from None
    except (ConnectionResetError, BrokenPipeError) as error:
        sock.close()
        # a daemon just killed resets its listener as it goes, and frees the lock soon after; its
        # standby may hold the lock already: then the process that reset us is gone
        pid = daemon_pid(paths)
        if pid is None or (peer and pid != peer) or wait_until_gone(paths, pid, RESET_GRACE_SECONDS):
            return None
        raise DaemonUnavailable(f"the model daemon at {paths.socket} did not answer: {error}") from None
    except (OSError, FrameInvalid) as error:
        sock.close()
        raise DaemonUnavailable(f"the model daemon at {paths.socket} did not answer: {error}") from None
    if isinstance(answer, protocol.Welcome):
        return Connection(sock, answer, on_lost, deadline)
    sock.close()
    if isinstance(answer, protocol.Error):
        raise DaemonUnavailable(answer.message)
    raise DaemonUnavailable(f"the model daemon at {paths.socket} answered {type(answer).__name__} to hello")


def connect_or_start(paths: Paths, *, idle_seconds: int = 900, memory_mb: int = 0,
                     on_lost: Callable[[str, bool], None] = lambda reason, stopped: None,
                     deadline: float = DEFAULT_DEADLINE,
                     on_restart: Callable[[str], None] = lambda reason: None) -> Connection:
    """Connect to the daemon, starting it first if none answers (one starter at a time); a
    daemon that does not answer the Hello is killed and replaced."""
    private_folder(paths.folder)  # it may have been deleted since the last connection
    try:
        conn = connect(paths, on_lost, deadline)
    except DaemonUnresponsive:
        conn = None
    if conn is not None:
        return conn
    with file_lock(paths.start_lock, START_TIMEOUT):
        try:
            conn = connect(paths, on_lost, deadline)  # another starter may have won the race
        except DaemonUnresponsive as error:
            on_restart(f"{error}; starting a new one")
            pid = terminate(paths, timeout=10, sig=signal.SIGKILL)
            log.warning("%s; killed it (pid %s)", error, pid)
        if conn is not None:
            return conn
        conn = standby_answers(paths, on_lost, deadline)
        if conn is not None:
            return conn
        process = spawn(paths, idle_seconds=idle_seconds, memory_mb=memory_mb)
        threading.Thread(target=process.wait, name="diffu-daemon-reaper", daemon=True).start()  # no zombie
        give_up = time.monotonic() + START_TIMEOUT
        while time.monotonic() < give_up:
            conn = connect(paths, on_lost, deadline)
            if conn is not None:
                return conn
            code = process.poll()
            if code not in (None, 0):
                raise DaemonUnavailable(f"the model daemon exited at start (status {code}): {log_tail(paths)}")
            if code == 0 and daemon_pid(paths) is None:
                # it bowed out to a daemon that held the lock, but that one was stopping: start again
                process = spawn(paths, idle_seconds=idle_seconds, memory_mb=memory_mb)
                threading.Thread(target=process.wait, name="diffu-daemon-reaper", daemon=True).start()
            time.sleep(0.05)
    raise DaemonUnavailable(f"the model daemon did not answer within {START_TIMEOUT:.0f} s; see {paths.log}")


def standby_answers(paths: Paths, on_lost: Callable[[str, bool], None], deadline: float) -> Connection | None:
    """The daemon's standby (standby.py), answering in the gone daemon's place: no new process is
    started while one waits, for up to :data:`STANDBY_SECONDS`; None when none waits (any more)."""
    give_up = time.monotonic() + STANDBY_SECONDS
    while time.monotonic() < give_up and (standby_pid(paths) is not None or daemon_pid(paths) is not None):
        with contextlib.suppress(DaemonUnresponsive):
            conn = connect(paths, on_lost, deadline)
            if conn is not None:
                return conn
        time.sleep(0.02)
    return None


class DaemonEngine:
    """Runs jobs in the machine's model daemon (see ``engine.LocalEngine`` for the contract).

    ``on_state(state, message)`` hears ``stuck`` (a job was answered empty: the daemon did not
    answer), ``restarting`` (the daemon is gone or being replaced) and ``ready`` (the first job
    answered after either), on the calling thread. ``on_lost(reason, stopped)`` hears of each lost
    connection, ``stopped`` when the daemon said it stops on purpose (then nothing is restarted
    until the next job)."""

    name = "model daemon"

    def __init__(self, on_lost: Callable[[str, bool], None] = lambda reason, stopped: None, paths: Paths | None = None,
                 on_state: Callable[[str, str], None] = lambda state, message: None):
        self.on_lost = on_lost
        self.on_state = on_state
        self._paths = paths
        self.key: ModelKey | None = None
        self.idle_seconds, self.memory_mb, self.deadline = 900, 0, DEFAULT_DEADLINE
        self.start_seconds = 0.0  # measured: from no connection to the first answer of a daemon
        self.load_seconds = 0.0  # measured in the daemon: loading the model (all a standby taking over must do)
        self.state = "ready"
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # guards _conn; never held across a socket read

    @property
    def paths(self) -> Paths:
        if self._paths is None:
            self._paths = runtime_paths()
        return self._paths

    def connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self.state == "ready" and conn is not None:
            self._set_state("restarting", "the model daemon stopped; replacing it")
        conn = connect_or_start(self.paths, idle_seconds=self.idle_seconds, memory_mb=self.memory_mb,
                                on_lost=self._lost, deadline=self.deadline,
                                on_restart=lambda reason: self._set_state("restarting", reason))
        with self._lock:
            if self._conn is not None and not self._conn.closed:  # another thread connected meanwhile
                conn.close()
                return self._conn
            self._conn = conn
        return conn

    def _lost(self, reason: str, stopped: bool) -> None:
        if stopped:  # on purpose (daemon stop): the next job starts a new one, not this window now
            self.on_lost(reason, stopped)
            return
        was_ready = self.state == "ready"
        if was_ready:
            self._set_state("restarting", f"the model daemon stopped ({reason})")
        self.on_lost(reason, stopped)
        if was_ready and self.key is not None:  # its standby (or a new daemon) loads the model now, not at the
            # next keystroke; once per outage (a daemon that dies again is restarted by the next job)
            threading.Thread(target=self._reload, daemon=True, name="diffu-daemon-restart").start()

    def _set_state(self, state: str, message: str) -> None:
        if state != self.state:
            self.state = state
            self.on_state(state, message)

    def _call(self, call: Callable[[Connection], Any]):
        started, fresh = time.monotonic(), self._conn is None or self._conn.closed
        try:
            answer = call(self.connection())
        except DaemonStuck as stuck:
            self._set_state("stuck", f"{stuck}; the next request tries a fresh connection")
            if stuck.frozen and self._conn is not None:
                frozen_since = time.monotonic() - LIVENESS_SECONDS
                threading.Thread(target=self._replace_frozen, args=(self._conn.pid, frozen_since), daemon=True,
                                 name="diffu-daemon-restart").start()
            raise
        if fresh:  # what a new daemon costs here: starting (or finding) one, and its first answer
            self.start_seconds = time.monotonic() - started
        self._set_state("ready", "the model daemon answers again")
        return answer

    def _replace_frozen(self, pid: int, since: float) -> None:
        """Kill a frozen daemon once it has been frozen for as long as a new one takes to answer (a
        shorter freeze is waited out: the daemon answers sooner than a new one would): with a
        standby waiting, as long as loading the model takes, else as long as a new daemon took
        here; then load the model in the next one now, off the job's thread."""
        cpu = cpu_seconds(pid)
        replacing = self.load_seconds if standby_pid(self.paths) is not None else self.start_seconds
        while time.monotonic() - since < replacing:
            time.sleep(0.1)
            if cpu_seconds(pid) != cpu:  # it runs again (or is gone): the next job connects to it
                return
        if terminate(self.paths, timeout=5, sig=signal.SIGKILL, pid=pid) != pid:
            return
        log.warning("killed the frozen model daemon (pid %d); replacing it", pid)
        self._set_state("restarting", f"the model daemon (pid {pid}) froze; replacing it")
        self._reload()

    def _reload(self) -> None:
        """Connect (to the standby that took the daemon's place, or a new daemon) and load the
        model, off any job's thread: the next keystroke finds it loaded."""
        try:
            self._call(lambda conn: conn.load(self.key))
        except Exception as error:  # noqa: BLE001 - the next job tries again and says why
            log.warning("could not restart the model daemon: %s", error)

    def configure(self, settings: Settings) -> None:
        self.idle_seconds, self.memory_mb = settings.daemon_idle_seconds, settings.daemon_memory_mb
        self.deadline = settings.daemon_deadline_seconds

    def load(self, key: ModelKey) -> ModelInfo:
        if key.model and Path(key.model).exists():  # the daemon runs elsewhere (cwd "/")
            key = ModelKey(str(Path(key.model).resolve()), key.device, key.dtype)
        try:
            info = self._call(lambda conn: conn.load(key))
        except DaemonLost:  # it died (or froze) while loading: once more, with a new daemon
            info = self._call(lambda conn: conn.load(key))
        self.key, self.load_seconds = key, info.load_seconds
        return info

    def run(self, request: Request, cancel, on_step=None, on_oom_retry=None, *, key: str = "") -> Answer:
        if self.key is None:
            raise ModelLoadFailed("no model is loaded")
        model, on_oom_retry = self.key, on_oom_retry or (lambda: None)
        return self._call(lambda conn: conn.submit(key, model, request, cancel, on_step, on_oom_retry))

    def describe(self) -> dict:
        conn = self._conn
        live = conn is not None and not conn.closed
        return {"engine": "daemon", "daemon_pid": conn.pid if live else None, "daemon_state": self.state,
                "daemon_socket": str(self._paths.socket) if self._paths else None}

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
