"""The model daemon: owns the loaded models and the one worker that runs jobs for every window.

``diffu-lsp daemon run`` (started by the first server that needs a model) listens on the runtime
folder's socket and speaks :mod:`diffu_lsp.protocol`; each connection is one window. Jobs from all
of them go through one :class:`~diffu_lsp.job_host.JobHost`, as on a cluster replica: latest-wins
per (window, document), the newest keystroke first, none starved, at most
:data:`MAX_PENDING_PER_CLIENT` unanswered per window (the oldest is cancelled). Models are keyed by
(model, device, dtype) and shared; past the memory budget the least recently used are unloaded.
With no window connected for ``idle_seconds`` the daemon exits. Its standby (``standby.py``), a
fork with torch imported, takes its place if it dies; a daemon that stops stops its standby.

Bad frames, wrong versions and huge lengths get an Error frame and a closed connection; the others
are untouched. Every wait on a client is bounded: a peer of another uid is refused, the Hello must
come within :data:`HANDSHAKE_SECONDS`, a frame's body within :data:`FRAME_SECONDS` of its header,
at most :data:`MAX_CONNECTIONS` are open, and a window that reads no answers is dropped (aborted)
after :data:`WRITE_SECONDS`, or at once past :data:`MAX_WRITE_BUFFER` bytes. Log lines are
rate-limited. If the socket vanishes (the runtime folder was deleted) the daemon takes the folder
back within :data:`WATCH_SECONDS`, or exits if another daemon took it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import importlib
import itertools
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import msgspec

from .. import __version__
from .. import protocol
from ..engine import model_info
from ..errors import EXITS, DaemonUnavailable, FrameInvalid, ModelLoadFailed, first_line
from ..job import ModelInfo, ModelKey
from ..job_host import HeldModel, JobHost
from ..scheduler import Job
from . import Paths, open_private, peer_uid, private_folder, runtime_paths, standby

log = logging.getLogger("diffu_lsp.daemon")

MAX_PENDING_PER_CLIENT = 8
MAX_CONNECTIONS = 64            # windows of one user; more is a runaway client
HANDSHAKE_SECONDS = 5.0         # from connect to Hello
FRAME_SECONDS = 30.0            # from a frame's header to the end of its body
WRITE_SECONDS = 30.0            # a window that reads nothing for this long is dropped
MAX_WRITE_BUFFER = 32 * 2**20   # bytes of answers waiting for one window
WATCH_SECONDS = 1.0             # how often the daemon checks that its socket is still there
LOG_LINES_PER_MINUTE = 120


@dataclass
class Client:
    id: int
    writer: asyncio.StreamWriter
    jobs: dict[int, Job] = field(default_factory=dict)  # request id -> scheduler job, oldest first
    tasks: dict[int, asyncio.Task] = field(default_factory=dict)
    write_watch: asyncio.Task | None = None  # waits for answers stuck in the buffer to go out

    def send(self, message) -> None:
        if self.writer.is_closing():
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("window %d reads none of its answers (%d MiB waiting): dropping it", self.id,
                        MAX_WRITE_BUFFER // 2**20)
            transport.abort()
            return
        self.writer.write(protocol.encode(message))
        if self.write_watch is None and transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            self.write_watch = asyncio.ensure_future(self.drained_in_time())

    async def drained_in_time(self) -> bool:
        """Wait (at most :data:`WRITE_SECONDS`) for the answers to go out; a window that reads
        none of them in that time is dropped: its transport is aborted at once, buffer and all
        (closing it would wait for the buffer to flush, for ever), so its socket and its slot
        among :data:`MAX_CONNECTIONS` are freed."""
        try:
            await asyncio.wait_for(self.writer.drain(), WRITE_SECONDS)
            return True
        except asyncio.TimeoutError:
            log.warning("window %d: read none of its answers for %.0f s: dropping it", self.id, WRITE_SECONDS)
            self.writer.transport.abort()
            return False
        except (ConnectionError, OSError):
            return False
        finally:
            if self.write_watch is asyncio.current_task():
                self.write_watch = None


class Daemon:
    def __init__(self, paths: Paths, *, idle_seconds: float = 900, memory_budget_bytes: int = 0,
                 standby_pid: int | None = None, first_idle_seconds: float | None = None):
        self.paths = paths
        self.idle_seconds = idle_seconds if first_idle_seconds is None else first_idle_seconds  # until a window came
        self._idle_setting = idle_seconds
        self.standby_pid = standby_pid  # our standby (standby.py), stopped when we stop
        self.memory_budget_bytes = memory_budget_bytes
        self.host = JobHost(thread_name="diffu-daemon-model")
        self.models: collections.OrderedDict[ModelKey, HeldModel] = collections.OrderedDict()  # LRU first
        self.loading: dict[ModelKey, asyncio.Future] = {}
        self.clients: dict[int, Client] = {}
        self.loads = 0
        self.evictions = 0
        self.started = time.monotonic()
        self._client_ids = itertools.count(1)
        self._load_lock = threading.Lock()
        self._stop = asyncio.Event()
        self.stop_reason = ""
        self._idle: asyncio.TimerHandle | None = None
        self._connections = 0  # open, handshaken or not
        self._socket_inode = 0
        self._lock_fds: list[int] = []  # daemon.lock descriptors held (a retaken folder adds one)

    # ------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        await self._listen()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
        log.info("diffu-lsp %s daemon (pid %d) listening on %s", __version__, os.getpid(), self.paths.socket)
        self._arm_idle_timer()
        watch = asyncio.ensure_future(self._watch_socket())
        await self._stop.wait()
        log.info("stopping")
        standby.stop(self.standby_pid)  # a daemon stopped on purpose is not replaced
        watch.cancel()
        self.server.close()
        for client in list(self.clients.values()):
            client.send(protocol.Stopping(self.stop_reason))
            client.writer.close()
        await self.host.sched.close(timeout=5)
        with contextlib.suppress(OSError):
            if os.lstat(self.paths.socket).st_ino == self._socket_inode:
                self.paths.socket.unlink()

    def stop(self, reason: str) -> None:
        """Stop on purpose: the windows are told why (protocol.Stopping) and start no new daemon by themselves."""
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    async def _listen(self) -> asyncio.AbstractServer:
        old_umask = os.umask(0o177)  # the socket is created 0600: no window for another user
        try:
            with contextlib.suppress(FileNotFoundError):
                self.paths.socket.unlink()  # stale: we hold the daemon lock, nobody else serves it
            self.server = await asyncio.start_unix_server(self.connection, path=str(self.paths.socket))
        finally:
            os.umask(old_umask)
        self._socket_inode = os.lstat(self.paths.socket).st_ino
        return self.server

    async def _watch_socket(self) -> None:
        """Take the runtime folder back if it vanished, so that the next window finds this daemon
        instead of starting a second one; exit if another daemon holds it by now."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            with contextlib.suppress(OSError):
                if os.lstat(self.paths.socket).st_ino == self._socket_inode:
                    continue
            log.warning("the socket %s is gone (runtime folder deleted?): taking it back", self.paths.socket)
            try:
                private_folder(self.paths.folder)
                fd = hold_lock(self.paths)
            except DaemonUnavailable as error:
                fd, reason = None, str(error)
            else:
                reason = "another daemon holds the new lock"
            if fd is None:
                log.warning("cannot take the runtime folder back (%s): exiting", reason)
                self.stop(f"its runtime folder was taken: {reason}")
                return
            self._lock_fds.append(fd)
            old = self.server
            await self._listen()
            old.close()

    def _arm_idle_timer(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not self.clients and self.idle_seconds > 0:
            def idle() -> None:
                if not self.clients:
                    log.info("no window for %.0f s: exiting", self.idle_seconds)
                    self.stop("idle")
            self._idle = asyncio.get_running_loop().call_later(self.idle_seconds, idle)

    # ------------------------------------------------------------ connections

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(next(self._client_ids), writer)
        self._connections += 1
        try:
            pid, uid = peer_uid(writer.get_extra_info("socket"))
            if uid != os.getuid():
                log.warning("refused a connection from uid %d (pid %d): not this daemon's user", uid, pid)
                return
            if self._connections > MAX_CONNECTIONS:
                raise FrameInvalid(f"too many connections (over {MAX_CONNECTIONS})")
            try:
                hello = await asyncio.wait_for(read_message(reader), HANDSHAKE_SECONDS)
            except asyncio.TimeoutError:
                raise FrameInvalid(f"no Hello within {HANDSHAKE_SECONDS:.0f} s") from None
            if not isinstance(hello, protocol.Hello):
                raise FrameInvalid(f"expected Hello first, got {type(hello).__name__}")
            if (hello.protocol, hello.version) != (protocol.PROTOCOL, __version__):
                raise FrameInvalid(
                    f"version mismatch: this daemon is diffu-lsp {__version__} (protocol {protocol.PROTOCOL}), the "
                    f"client is {hello.version} (protocol {hello.protocol}); stop the daemon with "
                    "`diffu-lsp daemon stop` and the next request starts a matching one")
            self.clients[client.id] = client
            self.idle_seconds = self._idle_setting  # a window came: the setting from now on
            self._arm_idle_timer()
            client.send(protocol.Welcome(protocol.PROTOCOL, __version__, os.getpid(), client.id))
            log.info("window %d connected (pid %d); %d connected", client.id, hello.pid, len(self.clients))
            while True:
                self.dispatch(client, await read_message(reader))
                if not await client.drained_in_time():  # no more requests from a window that reads no answers
                    return
        except FrameInvalid as error:
            log.warning("window %d: %s", client.id, error)
            client.send(protocol.Error(str(error)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the window went away
        except (asyncio.CancelledError, *EXITS):
            raise
        except BaseException:  # noqa: BLE001 - one connection's failure never takes the daemon down
            log.exception("window %d: unexpected error", client.id)
        finally:
            try:
                await self.disconnect(client)
            finally:
                self._connections -= 1  # counted until its socket is closed

    async def disconnect(self, client: Client) -> None:
        for job in list(client.jobs.values()):
            job.cancel("the window disconnected")
        for task in list(client.tasks.values()):
            task.cancel()
        if self.clients.pop(client.id, None) is not None:
            log.info("window %d disconnected; %d connected", client.id, len(self.clients))
        self._arm_idle_timer()
        if client.write_watch is not None:
            client.write_watch.cancel()
        try:
            client.writer.close()  # flushes what is buffered first: bounded, then aborted
            await asyncio.wait_for(client.writer.wait_closed(), WRITE_SECONDS)
        except asyncio.TimeoutError:
            client.writer.transport.abort()
        except (ConnectionError, OSError):
            pass

    def dispatch(self, client: Client, message: protocol.Message) -> None:
        if isinstance(message, protocol.Submit):
            self._spawn(client, message.id, self.run_job(client, message))
        elif isinstance(message, protocol.Cancel):
            job = client.jobs.get(message.id)
            if job is not None:
                job.cancel(message.reason)
            elif message.id in client.tasks:  # still waiting for its model
                client.tasks[message.id].cancel()
        elif isinstance(message, protocol.Ping):
            client.send(protocol.Pong(message.id))
        elif isinstance(message, protocol.Load):
            self._spawn(client, message.id, self.load_for(client, message))
        elif isinstance(message, protocol.StatusQuery):
            client.send(self.status(asking=client))
        elif isinstance(message, protocol.Stop):
            log.info("stop requested by window %d", client.id)
            self.stop("diffu-lsp daemon stop")
        else:
            raise FrameInvalid(f"unexpected {type(message).__name__} from a client")

    def _spawn(self, client: Client, id: int, coro) -> None:
        task = asyncio.ensure_future(coro)
        client.tasks[id] = task

        def done(task: asyncio.Task) -> None:  # every Load and Submit is answered, cancelled or failed too
            client.tasks.pop(id, None)
            if task.cancelled():  # a Cancel overtook it, or the window went away (then nobody hears this)
                client.send(protocol.Failed(id, "cancelled", "cancelled before it ran"))
            elif task.exception() is not None:
                client.send(protocol.failed(id, task.exception()))

        task.add_done_callback(done)

    # ------------------------------------------------------------ jobs

    async def load_for(self, client: Client, message: protocol.Load) -> None:
        client.send(protocol.Loaded(message.id, await self.model(message.model)))

    async def run_job(self, client: Client, message: protocol.Submit) -> None:
        try:
            await self.model(message.model)
        except Exception as error:  # noqa: BLE001 - said by the Failed frame
            raise ModelLoadFailed(f"loading the model failed: {first_line(error)}") from None
        pending = [job for job in client.jobs.values() if not job.done()]  # oldest first
        for oldest in pending[:max(0, len(pending) + 1 - MAX_PENDING_PER_CLIENT)]:
            oldest.cancel(f"queue full: over {MAX_PENDING_PER_CLIENT} pending jobs from this window")
        # the window's document: latest-wins, and its warm-start canvas
        job, answer = self.host.submit(self.models[message.model], message, client.send,
                                       key=f"{client.id}:{message.key}")
        client.jobs[message.id] = job
        try:
            client.send(await answer)
        finally:
            client.jobs.pop(message.id, None)

    # ------------------------------------------------------------ models

    async def model(self, key: ModelKey) -> ModelInfo:
        """The model for ``key``, loaded once and shared; loading may evict others (budget)."""
        held = self.models.get(key)
        if held is not None:
            self.models.move_to_end(key)
            held.last_used = time.monotonic()
            return model_info(held.model, key, shared=True)
        pending = self.loading.get(key)
        if pending is None:
            pending = self.loading[key] = asyncio.ensure_future(asyncio.to_thread(self._load, key))
            pending.add_done_callback(lambda _: self.loading.pop(key, None))
        held = await asyncio.shield(pending)
        if key not in self.models:
            self.models[key] = held
            self.loads += 1
            evicted = self._evict(keep=key)
            log.info("loaded %s on %s (%.1f MiB) in %.1f s", key.label, held.model.device, held.bytes / 2**20,
                     held.model.load_seconds)
            return model_info(held.model, key, evicted=tuple(evicted))
        return model_info(held.model, key, shared=True)

    def _load(self, key: ModelKey) -> HeldModel:
        from ..models import load_model  # torch is imported here, on the first load
        from ..models.loading import check_checkpoint

        checkpoint = check_checkpoint(key.model)  # config, weight files, sizes: a bad one fails here, lock-free
        with self._load_lock:  # held only while the weights load
            model = load_model(key.model, device=key.device, dtype=key.dtype, checkpoint=checkpoint)
        size = sum(t.numel() * t.element_size() for t in (*model.network.parameters(), *model.network.buffers()))
        return HeldModel(key, model, size)

    def _evict(self, keep: ModelKey) -> list[str]:
        evicted = []
        while self.memory_budget_bytes and sum(h.bytes for h in self.models.values()) > self.memory_budget_bytes:
            victim = next((k for k in self.models if k != keep), None)
            if victim is None:
                break
            self.models.pop(victim)
            self.evictions += 1
            evicted.append(f"{victim.label} ({victim.device}, {victim.dtype})")
            log.info("unloaded %s: over the %d MiB budget", victim.label, self.memory_budget_bytes // 2**20)
        return evicted

    def status(self, asking: Client | None = None) -> protocol.Status:
        now = time.monotonic()
        return protocol.Status(
            pid=os.getpid(), version=__version__, protocol=protocol.PROTOCOL, socket=str(self.paths.socket),
            log=str(self.paths.log), uptime_seconds=now - self.started,
            clients=len([c for c in self.clients.values() if c is not asking]),
            models=[protocol.LoadedModel(h.key.label, str(h.model.device), h.key.dtype, h.model.family, h.bytes,
                                     now - h.last_used, h.jobs) for h in self.models.values()],
            loads=self.loads, evictions=self.evictions, rss_bytes=rss_bytes(),
            idle_timeout_seconds=self.idle_seconds, memory_budget_bytes=self.memory_budget_bytes,
            jobs=msgspec.to_builtins(self.host.sched.stats))


async def read_message(reader: asyncio.StreamReader) -> protocol.Message:
    header = await reader.readexactly(protocol.HEADER.size)
    length = protocol.body_length(header, protocol.MAX_CLIENT_FRAME)
    try:
        return protocol.decode(await asyncio.wait_for(reader.readexactly(length), FRAME_SECONDS))
    except asyncio.TimeoutError:
        raise FrameInvalid(f"a frame of {length:,} bytes did not arrive within {FRAME_SECONDS:.0f} s") from None


def hold_lock(paths: Paths) -> int | None:
    """Take ``daemon.lock`` and write our pid in it; None if another daemon holds it."""
    fd = open_private(paths.lock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class RateLimit(logging.Filter):
    """At most ``per_minute`` log records a minute; then one line saying how many were dropped."""

    def __init__(self, per_minute: int) -> None:
        super().__init__()
        self.per_minute, self.window, self.count, self.dropped = per_minute, 0, 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        window = int(record.created // 60)
        if window != self.window:
            if self.dropped:
                record.msg = f"({self.dropped} log lines dropped in the last minute) {record.msg}"
            self.window, self.count, self.dropped = window, 0, 0
        self.count += 1
        if self.count > self.per_minute:
            self.dropped += 1
            return False
        return True


def rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(*, idle_seconds: float, memory_mb: int) -> int:
    """``diffu-lsp daemon run``: serve until stopped, idle, or another daemon holds the lock."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RateLimit(LOG_LINES_PER_MINUTE))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    try:
        paths = runtime_paths()
        lock = hold_lock(paths)
    except DaemonUnavailable as error:
        log.error("%s", error)
        return 2
    if lock is None:
        log.info("another daemon holds %s; exiting", paths.lock)
        return 0
    # torch and the model code, before any thread starts: the standby forked here has them, and
    # takes this daemon's place the moment it dies (standby.py, #31)
    importlib.import_module("diffu_lsp.models")
    first = os.getpid()
    lock, standby_pid = standby.fork(paths, lock)
    promoted = os.getpid() != first  # a standby that took over: windows come back at once, or none will
    daemon = Daemon(paths, idle_seconds=idle_seconds, memory_budget_bytes=memory_mb * 2**20, standby_pid=standby_pid,
                    first_idle_seconds=min(idle_seconds, standby.IDLE_SECONDS) if promoted else None)
    daemon._lock_fds.append(lock)
    asyncio.run(daemon.serve())
    return 0
