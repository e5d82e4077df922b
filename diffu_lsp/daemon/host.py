"""The model daemon: owns the loaded models and the one worker that runs jobs for every window.

``diffu-lsp daemon run`` (started by the first server that needs a model) listens on the
runtime folder's socket. Each connection is one server (editor window). Jobs from all of them
go through one :class:`~diffu_lsp.jobs.Scheduler`: latest-wins per (window, document), the
newest keystroke of any window first, a job passed over too often served before newer ones, and
at most :data:`MAX_PENDING_PER_CLIENT` unanswered jobs per window (the oldest is cancelled).
Models are keyed by (model, device, dtype) and shared; past the memory budget the least recently
used ones are unloaded. With no window connected for ``idle_seconds`` the daemon exits.

Bad frames, wrong versions and huge lengths get an :class:`~wire.Error` frame and a closed
connection; other connections are untouched.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import itertools
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import __version__
from ..engine import ModelInfo, ModelKey, first_line, is_oom, model_info
from ..jobs import Job, JobCancelled, Scheduler
from . import DaemonError, Paths, runtime_paths
from . import wire

log = logging.getLogger("diffu_lsp.daemon")

MAX_PENDING_PER_CLIENT = 8


@dataclass
class HeldModel:
    key: ModelKey
    model: Any
    bytes: int
    last_used: float = field(default_factory=time.monotonic)
    jobs: int = 0


@dataclass
class Client:
    id: int
    writer: asyncio.StreamWriter
    jobs: dict[int, Job] = field(default_factory=dict)  # request id -> scheduler job, oldest first
    tasks: dict[int, asyncio.Task] = field(default_factory=dict)

    def send(self, message) -> None:
        if not self.writer.is_closing():
            self.writer.write(wire.encode(message))


class Daemon:
    def __init__(self, paths: Paths, *, idle_seconds: float = 900, memory_budget_bytes: int = 0):
        self.paths = paths
        self.idle_seconds = idle_seconds
        self.memory_budget_bytes = memory_budget_bytes
        self.sched = Scheduler(debounce_s=0, thread_name="diffu-daemon-model")
        self.models: collections.OrderedDict[ModelKey, HeldModel] = collections.OrderedDict()  # LRU first
        self.loading: dict[ModelKey, asyncio.Future] = {}
        self.clients: dict[int, Client] = {}
        self.loads = 0
        self.evictions = 0
        self.started = time.monotonic()
        self._client_ids = itertools.count(1)
        self._load_lock = threading.Lock()
        self._stop = asyncio.Event()
        self._idle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        old_umask = os.umask(0o177)  # the socket is created 0600: no window for another user
        try:
            if self.paths.socket.exists():
                self.paths.socket.unlink()  # stale: we hold the daemon lock, nobody else serves it
            server = await asyncio.start_unix_server(self.connection, path=str(self.paths.socket))
        finally:
            os.umask(old_umask)
        os.chmod(self.paths.socket, 0o600)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("diffu-lsp %s daemon (pid %d) listening on %s", __version__, os.getpid(), self.paths.socket)
        self._arm_idle_timer()
        async with server:
            await self._stop.wait()
            log.info("stopping")
            server.close()
            for client in list(self.clients.values()):
                client.writer.close()
            await self.sched.close(timeout=5)
        try:
            self.paths.socket.unlink()
        except FileNotFoundError:
            pass

    def _arm_idle_timer(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not self.clients and self.idle_seconds > 0:
            def idle() -> None:
                if not self.clients:
                    log.info("no window for %.0f s: exiting", self.idle_seconds)
                    self._stop.set()
            self._idle = asyncio.get_running_loop().call_later(self.idle_seconds, idle)

    # ------------------------------------------------------------ connections

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(next(self._client_ids), writer)
        try:
            hello = await read_message(reader)
            if not isinstance(hello, wire.Hello):
                raise wire.FrameError(f"expected Hello first, got {type(hello).__name__}")
            if (hello.protocol, hello.version) != (wire.PROTOCOL, __version__):
                raise wire.FrameError(
                    f"version mismatch: this daemon is diffu-lsp {__version__} (protocol {wire.PROTOCOL}), the "
                    f"client is {hello.version} (protocol {hello.protocol}); stop the daemon with "
                    "`diffu-lsp daemon stop` and the next request starts a matching one")
            self.clients[client.id] = client
            self._arm_idle_timer()
            client.send(wire.Welcome(wire.PROTOCOL, __version__, os.getpid(), client.id))
            log.info("window %d connected (pid %d); %d connected", client.id, hello.pid, len(self.clients))
            while True:
                self.dispatch(client, await read_message(reader))
                await writer.drain()
        except wire.FrameError as error:
            log.warning("window %d: %s", client.id, error)
            client.send(wire.Error(str(error)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the window went away
        except Exception:  # noqa: BLE001 - one connection's failure never takes the daemon down
            log.exception("window %d: unexpected error", client.id)
        finally:
            await self.disconnect(client)

    async def disconnect(self, client: Client) -> None:
        for job in list(client.jobs.values()):
            job.cancel("the window disconnected")
        for task in list(client.tasks.values()):
            task.cancel()
        if self.clients.pop(client.id, None) is not None:
            log.info("window %d disconnected; %d connected", client.id, len(self.clients))
        self._arm_idle_timer()
        try:
            client.writer.close()
            await client.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    def dispatch(self, client: Client, message: wire.Message) -> None:
        if isinstance(message, wire.Submit):
            self._spawn(client, message.id, self.run_job(client, message))
        elif isinstance(message, wire.Cancel):
            job = client.jobs.get(message.id)
            if job is not None:
                job.cancel(message.reason)
            elif message.id in client.tasks:  # still waiting for its model
                client.tasks[message.id].cancel()
        elif isinstance(message, wire.Load):
            self._spawn(client, message.id, self.load_for(client, message))
        elif isinstance(message, wire.StatusQuery):
            client.send(self.status(asking=client))
        elif isinstance(message, wire.Stop):
            log.info("stop requested by window %d", client.id)
            self._stop.set()
        else:
            raise wire.FrameError(f"unexpected {type(message).__name__} from a client")

    def _spawn(self, client: Client, id: int, coro) -> None:
        task = asyncio.ensure_future(coro)
        client.tasks[id] = task
        task.add_done_callback(lambda _: client.tasks.pop(id, None))

    # ------------------------------------------------------------ jobs

    async def load_for(self, client: Client, message: wire.Load) -> None:
        try:
            info = await self.model(message.model)
        except asyncio.CancelledError:
            client.send(wire.Failed(message.id, "cancelled", "cancelled while loading"))
            return
        except Exception as error:  # noqa: BLE001 - ModelLoadError and friends: the window shows it
            client.send(wire.Failed(message.id, "oom" if is_oom(error) else "error", first_line(error)))
            return
        client.send(wire.Loaded(message.id, info))

    async def run_job(self, client: Client, message: wire.Submit) -> None:
        try:
            await self.model(message.model)
            held = self.models[message.model]
        except asyncio.CancelledError:
            client.send(wire.Failed(message.id, "cancelled", "cancelled while its model loaded"))
            return
        except Exception as error:  # noqa: BLE001
            client.send(wire.Failed(message.id, "error", f"loading the model failed: {first_line(error)}"))
            return
        pending = [job for job in client.jobs.values() if not job.done()]  # oldest first
        for oldest in pending[:max(0, len(pending) + 1 - MAX_PENDING_PER_CLIENT)]:
            oldest.cancel(f"queue full: over {MAX_PENDING_PER_CLIENT} pending jobs from this window")
        loop = asyncio.get_running_loop()

        def progress(draft) -> None:  # worker thread
            loop.call_soon_threadsafe(client.send, wire.Progress(message.id, draft.step, draft.masked))

        def work(token):
            from .. import features

            held.last_used = time.monotonic()
            held.jobs += 1
            return features.run(held.model, message.request, cancel=token,
                                on_step=progress if message.progress else None)

        job = self.sched.submit(f"{client.id}:{message.key}", work, debounce=False)
        client.jobs[message.id] = job
        try:
            value = await job
            client.send(wire.Result(message.id, value, job.token.forwards))
        except JobCancelled as cancelled:
            client.send(wire.Failed(message.id, "cancelled", cancelled.reason, job.token.forwards,
                                    job.token.forwards_after_cancel))
        except asyncio.CancelledError:
            job.cancel("the window disconnected")
        except Exception as error:  # noqa: BLE001 - the job failed; the daemon goes on
            log.warning("job %d of window %d failed: %r", message.id, client.id, error)
            client.send(wire.Failed(message.id, "oom" if is_oom(error) else "error", first_line(error),
                                    job.token.forwards))
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

        with self._load_lock:
            model = load_model(key.model, device=key.device, dtype=key.dtype)
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

    def status(self, asking: Client | None = None) -> wire.Status:
        now = time.monotonic()
        return wire.Status(
            pid=os.getpid(), version=__version__, protocol=wire.PROTOCOL, socket=str(self.paths.socket),
            log=str(self.paths.log), uptime_seconds=now - self.started,
            clients=len([c for c in self.clients.values() if c is not asking]),
            models=[wire.LoadedModel(h.key.label, str(h.model.device), h.key.dtype, h.model.family, h.bytes,
                                     now - h.last_used, h.jobs) for h in self.models.values()],
            loads=self.loads, evictions=self.evictions, rss_bytes=rss_bytes(),
            idle_timeout_seconds=self.idle_seconds, memory_budget_bytes=self.memory_budget_bytes,
            jobs=msgspec.to_builtins(self.sched.stats))


async def read_message(reader: asyncio.StreamReader) -> wire.Message:
    header = await reader.readexactly(wire.HEADER.size)
    return wire.decode(await reader.readexactly(wire.body_length(header)))


def rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(*, idle_seconds: float, memory_mb: int) -> int:
    """``diffu-lsp daemon run``: serve until stopped, idle, or another daemon holds the lock."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    try:
        paths = runtime_paths()
    except DaemonError as error:
        log.error("%s", error)
        return 2
    lock = open(paths.lock, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("another daemon holds %s; exiting", paths.lock)
        return 0
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    daemon = Daemon(paths, idle_seconds=idle_seconds, memory_budget_bytes=memory_mb * 2**20)
    asyncio.run(daemon.serve())
    return 0
