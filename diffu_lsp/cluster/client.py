"""The server's side of the cluster: the third runner of the engine contract (see
``engine.LocalEngine``), over HTTP to Ray Serve's proxy. Light: no ray import.

One HTTP connection per job: the body is a :class:`~diffu_lsp.protocol.Submit` frame, the answer
streams frames of the daemon's protocol (progress, a Pong heartbeat, one Result or Failed, turned
back into the same :mod:`~diffu_lsp.errors` types). Cancelling the job's token closes the
connection: Serve cancels the request and the replica cancels our token there, so the sampler
stops at its next forward. Every read is bounded by the
setting ``daemonDeadlineSeconds`` (the replica sends a heartbeat every second while a job waits):
a silent cluster is answered empty in bounded time.

Faults: a replica that dies mid-job (HTTP 5xx or the stream cut) answers the job empty
(:class:`ClusterLost`) and says so once; the next job goes to the cluster again (Ray replaces the
replica). A cluster that cannot be reached at all makes this engine fall back to the machine's
model daemon for good, said once.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import time
import uuid
from typing import Any, Callable
from urllib.parse import urlsplit

import msgspec

from .. import __version__, protocol
from ..errors import (ClusterLost, ClusterUnavailable, ClusterUnreachable, EngineLost, FrameInvalid, JobCancelled,
                      ReplicaFailed)
from ..job import Answer, ModelInfo, ModelKey, Request
from ..settings import Settings
from . import read_state, read_token, same_url

log = logging.getLogger("diffu_lsp.cluster.client")

CONNECT_SECONDS = 5.0
LOAD_SECONDS = 30.0


class ClusterEngine:
    name = "cluster"

    def __init__(self, url: str, *, token_file: str = "", on_message: Callable[[str], None] = lambda m: None,
                 fallback: Callable[[], Any] | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClusterUnavailable(f"not a cluster URL: {url!r}")
        self.url, self.parts = url.rstrip("/"), parts
        self.token_file = token_file
        self.on_message = on_message
        self.make_fallback = fallback
        self.fallback = None          # the local daemon engine, once the cluster could not be reached
        self.deadline = 10.0
        self.settings: Settings | None = None
        self.key: ModelKey | None = None
        self.lost = False             # a replica-lost message was said; said again only after a success
        self.jobs = 0
        self.replica_pid = 0          # the replica that ran (or runs) the latest job
        # replicas supersede per key: prefixed with this window's own id, so that two users' file:///main.py
        # never cancel each other's jobs
        self.window_id = uuid.uuid4().hex
        self._lock = threading.Lock()

    # ------------------------------------------------------------ contract

    def configure(self, settings: Settings) -> None:
        self.deadline = settings.daemon_deadline_seconds
        self.token_file = settings.engine_token_file or self.token_file
        self.settings = settings
        if self.fallback is not None:
            self.fallback.configure(settings)

    def load(self, key: ModelKey) -> ModelInfo:
        self.key = key
        if self.fallback is None:
            try:
                status, body = self._get("/info", LOAD_SECONDS)
            except ClusterUnreachable as error:
                self._fall_back(str(error))
            else:
                info = msgspec.json.decode(body, type=ModelInfo)
                if key.model and key.model != info.label:
                    self.on_message(f"diffu-lsp: the cluster serves {info.label}, not {key.label}; using it")
                return msgspec.structs.replace(info, shared=True)
        return self.fallback.load(key)

    def run(self, request: Request, cancel, on_step=None, on_oom_retry=None, *, key: str = "") -> Answer:
        on_oom_retry = on_oom_retry or (lambda: None)
        if self.fallback is None:
            try:
                return self._run(request, cancel, on_step, on_oom_retry, key)
            except ClusterUnreachable as error:
                self._fall_back(str(error))
                self.fallback.load(self.key)
        return self.fallback.run(request, cancel, on_step, on_oom_retry, key=key)

    def describe(self) -> dict:
        if self.fallback is not None:
            return {**self.fallback.describe(), "engine": "daemon (cluster unreachable)", "cluster_url": self.url}
        return {"engine": "cluster", "cluster_url": self.url, "cluster_jobs": self.jobs}

    def close(self) -> None:
        if self.fallback is not None:
            self.fallback.close()

    # ------------------------------------------------------------ plumbing

    def _fall_back(self, reason: str) -> None:
        with self._lock:
            if self.fallback is not None:
                return
            if self.make_fallback is None:
                raise ClusterUnavailable(f"the cluster at {self.url} cannot be reached ({reason})")
            self.fallback = self.make_fallback()
            if self.settings is not None:
                self.fallback.configure(self.settings)
        log.warning("cluster %s unreachable (%s): using the local model daemon", self.url, reason)
        self.on_message(f"diffu-lsp: the cluster at {self.url} cannot be reached ({reason}); "
                        "using this machine's model daemon instead")

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self._token()}", "Content-Type": "application/octet-stream"}

    def _token(self) -> str:
        """The token for this URL: ``engineTokenFile``'s (an owner-only regular file, see
        :func:`.read_token`), else this machine's token file, but only for the URL of the cluster
        that ``cluster start`` started here: the default token never goes anywhere else."""
        if self.token_file:
            return read_token(self.token_file)
        started_here = read_state().get("url", "")
        if not started_here or not same_url(started_here, self.url):
            raise ClusterUnavailable(f"no token for {self.url}: this machine's cluster token goes only to the cluster "
                               f"started here ({started_here or 'none is'}); set engineTokenFile to that cluster's "
                               "token file")
        return read_token()

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.parts.hostname, self.parts.port or (443 if self.parts.scheme == "https" else 80),
                   timeout=CONNECT_SECONDS)
        try:
            conn.connect()
        except OSError as error:
            conn.close()
            raise ClusterUnreachable(error.strerror or str(error)) from None
        conn.sock.settimeout(timeout)
        return conn

    def _path(self, route: str) -> str:
        return (self.parts.path.rstrip("/") or "") + route

    def _get(self, route: str, timeout: float) -> tuple[int, bytes]:
        conn = self._connection(timeout)
        try:
            conn.request("GET", self._path(route), headers=self._headers())
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise ClusterUnavailable(f"the cluster at {self.url} did not answer: {error}") from None
        finally:
            conn.close()
        check_status(response.status, body)
        return response.status, body

    def _run(self, request: Request, cancel, on_step, on_oom_retry, key: str) -> Answer:
        conn = self._connection(self.deadline)
        cancel.on_cancel(lambda: _shut(conn))
        started = time.monotonic()
        try:
            model = self.key or ModelKey(None)  # the replica serves its own; the key says which the window asked for
            job = protocol.Submit(1, f"{self.window_id}:{key}", model, request, progress=on_step is not None)
            conn.request("POST", self._path("/job"), headers=self._headers(), body=protocol.encode(job))
            response = conn.getresponse()
            if response.status != 200:
                check_status(response.status, response.read())
            while True:
                message = protocol.read_frame(response)
                if message is None:
                    raise http.client.IncompleteRead(b"")
                message = protocol.take(message, cancel, on_step, on_oom_retry)
                if isinstance(message, protocol.Welcome):
                    if message.protocol != protocol.PROTOCOL:
                        raise ClusterUnavailable(f"the cluster runs diffu-lsp {message.version} (protocol "
                                           f"{message.protocol}), this window {__version__} ({protocol.PROTOCOL})")
                    self.replica_pid = message.pid
                elif isinstance(message, protocol.Result):
                    self.jobs += 1
                    self.lost = False
                    return message.value
        except TimeoutError:
            if cancel.cancelled:
                raise JobCancelled(cancel.reason) from None
            raise self._lost(f"the cluster said nothing for {self.deadline:.0f} s") from None
        except (OSError, http.client.HTTPException, FrameInvalid, ReplicaFailed) as error:
            if cancel.cancelled:
                raise JobCancelled(cancel.reason) from None
            raise self._lost(f"the replica went away after {time.monotonic() - started:.1f} s "
                             f"({error or type(error).__name__})") from None
        finally:
            conn.close()

    def _lost(self, reason: str) -> ClusterLost:
        if not self.lost:
            self.lost = True
            self.on_message(f"diffu-lsp: {reason}; the request was answered empty and the next one goes to "
                            "the cluster again")
        log.warning("cluster job lost: %s", reason)
        return ClusterLost(reason)


def check_status(status: int, body: bytes) -> None:
    if status == 200:
        return
    text = body.decode(errors="replace").strip()[:200]
    if status == 401:
        raise ClusterUnavailable("the cluster refused the token (401): set engineTokenFile to the token file written "
                           "by `diffu-lsp cluster start`")
    if status >= 500:
        raise ReplicaFailed(f"HTTP {status}: {text}")
    raise ClusterUnavailable(f"the cluster answered HTTP {status}: {text}")


def _shut(conn: http.client.HTTPConnection) -> None:
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not connected (sock None)
        conn.sock.shutdown(socket.SHUT_RDWR)
