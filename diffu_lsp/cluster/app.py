"""The Ray Serve application: replicas that each hold a warm model and run our own job path.

Every replica loads the model once (``__init__``) and runs jobs through the daemon's
:class:`~diffu_lsp.job_host.JobHost` (latest-wins per editor document, :func:`diffu_lsp.features.answer`,
the outcome as a :mod:`~diffu_lsp.protocol` frame): infill canvases, both sides of the cursor, a
cancel token read before every forward, out-of-memory retries counted. With ``batch_size`` > 1 the scheduler runs up to
that many jobs at once, each in its own worker thread, and the model's
:class:`~diffu_lsp.models.batching.ForwardBatcher` runs their forwards as one padded batched
forward (uncached); with 1, one job at a time, with the K/V cache the settings ask for. Each replica
keeps its own last canvas per window and document, so with ``warmStart`` a suggestion starts from
the last one's draft when the same replica served that one (else it starts cold).

HTTP (Ray Serve's proxy, one route prefix ``/``), every route behind ``Authorization: Bearer``:

- ``POST /job``: the body is one :class:`~diffu_lsp.protocol.Submit` frame; the answer streams
  frames of the same protocol as the daemon's socket: a Welcome (the replica's pid), a Progress
  per forward (if asked), a Pong every second while the job waits (the heartbeat), then one
  Result or Failed. When the caller disconnects, Serve cancels the request; the replica turns that
  into our cancel token, so the sampler stops at its next forward.
- ``GET /info``: the loaded model (:class:`~diffu_lsp.engine.ModelInfo`).
- ``GET /status``: jobs served, cancelled, forwards after cancel, per replica (from the stats actor).

A missing or wrong token gets 401 and runs nothing; a body that is not a job gets 400, one that does
not arrive within ``gate.BODY_SECONDS`` 408. On a cluster that ``cluster start`` started, the proxy's
:mod:`.gate` has already turned such requests away before they reach a replica; these checks are
for a Ray cluster whose proxy runs without it.
"""

from __future__ import annotations

import asyncio
import logging
import io
import os
import time

import msgspec
from ray import serve
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import __version__, protocol
from ..engine import model_info
from ..errors import FrameInvalid
from ..job import ModelKey
from ..job_host import HeldModel, JobHost
from . import authorized
from .gate import BODY_SECONDS

log = logging.getLogger("diffu_lsp.cluster")

APP_NAME = "diffu-lsp"
STATS_ACTOR = "diffu-lsp-stats"
NAMESPACE = "diffu-lsp"
BEAT_SECONDS = 1.0
STATUS_WAIT_SECONDS = 5.0  # GET /status: how long to wait for the stats actor
GPU_BATCH_SIZE = 8  # batch_size 0 (auto): this on a GPU; 1 on a CPU, where 8 canvases cost ~7x one (BENCHMARKS.md)


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, token: str, model: str | None, device: str, dtype: str, threads: int,
                 batch_size: int, batch_wait_ms: float):  # defaults: cluster/cli.py
        import torch

        from ..models import load_model
        from ..models.batching import ForwardBatcher

        bind_serve_grpc_to_node()
        if threads:
            torch.set_num_threads(threads)
        self.token = token
        self.model = load_model(model, device=device, dtype=dtype)
        if batch_size == 0:
            batch_size = GPU_BATCH_SIZE if self.model.device.type == "cuda" else 1
        if batch_size > 1:
            self.model.batcher = ForwardBatcher(self.model, batch_size, batch_wait_ms / 1000)
        self.held = HeldModel(ModelKey(model, device, dtype), self.model)  # and its canvases per window and document
        self.info = model_info(self.model, self.held.key)
        self.host = JobHost(thread_name="diffu-cluster-model", workers=batch_size)
        self.stats = dict(pid=os.getpid(), jobs=0, answered=0, cancelled=0, failed=0, forwards=0,
                          forwards_after_cancel_max=0, started=time.time())
        self.stats_actor = stats_actor()  # looked up here: ray.get_actor blocks, so never on the event loop

    async def __call__(self, request: HttpRequest) -> Response:
        if not authorized(request.headers.get("authorization", ""), self.token):
            return JSONResponse({"error": "missing or wrong token"}, status_code=401)
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("/info"):
            return Response(msgspec.json.encode(self.info), media_type="application/json")
        if request.method == "GET" and path.endswith("/status"):
            return JSONResponse(await self.summary())
        if request.method == "POST" and path.endswith("/job"):
            try:
                body = await asyncio.wait_for(request.body(), BODY_SECONDS)
            except asyncio.TimeoutError:
                return JSONResponse({"error": f"the body did not arrive within {BODY_SECONDS:g} s"}, status_code=408)
            try:
                job = protocol.read_frame(io.BytesIO(body), protocol.MAX_CLIENT_FRAME)
                if not isinstance(job, protocol.Submit):
                    raise FrameInvalid(f"expected a Submit frame, got {type(job).__name__}")
            except FrameInvalid as error:  # not a frame, or not a job
                return JSONResponse({"error": f"not a job: {error}"}, status_code=400)
            return StreamingResponse(self.run(job), media_type="application/octet-stream")
        return JSONResponse({"error": "no such route"}, status_code=404)

    async def run(self, message: protocol.Submit):
        frames: asyncio.Queue = asyncio.Queue()
        self.stats["jobs"] += 1
        job, answer = self.host.submit(self.held, message, frames.put_nowait, key=message.key)
        answered = asyncio.ensure_future(answer)
        answered.add_done_callback(lambda done: done.cancelled() or frames.put_nowait(self._count(done.result())))
        try:
            yield protocol.encode(protocol.Welcome(protocol.PROTOCOL, __version__, self.stats["pid"], 0))
            while True:
                getter = asyncio.ensure_future(frames.get())  # not wait_for: 3.11's may drop a frame at the timeout
                await asyncio.wait({getter}, timeout=BEAT_SECONDS)
                if getter.done():
                    frame = getter.result()
                else:
                    getter.cancel()
                    frame = protocol.Pong(message.id)  # the heartbeat
                yield protocol.encode(frame)
                if isinstance(frame, (protocol.Result, protocol.Failed)):
                    return
        finally:  # the caller went away (Serve cancelled us) or the stream ended
            if not answered.done():
                job.cancel("the client disconnected")
                await asyncio.wait({answered}, timeout=30)
            self.stats["forwards"] += job.token.forwards
            if job.token.cancelled:
                self.stats["forwards_after_cancel_max"] = max(self.stats["forwards_after_cancel_max"],
                                                              job.token.forwards_after_cancel)
            self._report()

    def _count(self, answer: protocol.Result | protocol.Failed) -> protocol.Result | protocol.Failed:
        outcome = "answered" if isinstance(answer, protocol.Result) else \
            "cancelled" if answer.kind == "cancelled" else "failed"
        self.stats[outcome] += 1
        return answer

    def _report(self) -> None:
        if self.model.batcher is not None:  # network forwards run, and the requests they served
            self.stats.update(batches=self.model.batcher.batches, batched_rows=self.model.batcher.rows)
        self.stats["seq"] = self.stats.get("seq", 0) + 1  # reports may arrive out of order: the newest wins

        if self.stats_actor is not None:  # stats are best effort; .remote() does not wait
            try:
                self.stats_actor.report.remote(self.stats["pid"], dict(self.stats))
            except Exception:  # noqa: BLE001
                pass

    async def summary(self) -> dict:
        self._report()
        replicas = {str(self.stats["pid"]): self.stats}
        if self.stats_actor is not None:
            try:
                replicas = await asyncio.wait_for(self.stats_actor.summary.remote(), STATUS_WAIT_SECONDS)
            except Exception:  # noqa: BLE001 - an actor gone or slow: this replica's own figures
                log.warning("the stats actor did not answer within %.0f s", STATUS_WAIT_SECONDS)
        return {"model": self.info.label, "family": self.info.family, "device": self.info.device,
                "replicas": replicas}


def bind_serve_grpc_to_node() -> None:
    """Have Serve bind this replica's inter-deployment gRPC server to the node's address, as Ray
    binds its own servers, instead of every interface: Serve 2.60 asks for ``[::]:0`` whatever
    the node's address (ray/serve/_private/replica.py, ``_on_initialized``, which runs after this
    constructor). The server asks for Ray's token either way; this keeps a loopback-only head
    loopback-only (tests/test_cluster_security.py). A Serve without that helper is left alone."""
    import ray
    from ray.serve._private import replica

    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "diffu_lsp", False):
        return
    node = ray.util.get_node_ip_address()
    host = f"[{node}]" if ":" in node else node

    def on_node(server, address: str):
        return add_port(server, address.replace("[::]", host, 1) if address.startswith("[::]:") else address)

    on_node.diffu_lsp = True
    replica.add_port_to_grpc_server = on_node


def stats_actor():
    """The cluster's stats actor (made by ``cluster start``), or None where there is none."""
    import ray

    try:
        return ray.get_actor(STATS_ACTOR, namespace=NAMESPACE)
    except Exception:  # noqa: BLE001
        return None


def stats_actor_class():
    import ray

    # Out of order: Ray cancels the tasks a cancelled request submitted (recursive cancel), so a
    # report sent while a job's stream was being cancelled never arrives, and an ordered actor
    # waited 30 s for its sequence number before running anything after it (GET /status hung).
    # Reports carry their own order ("seq": the newest wins).
    @ray.remote(num_cpus=0, allow_out_of_order_execution=True)
    class Stats:
        def __init__(self):
            self.replicas: dict[str, dict] = {}

        def report(self, pid: int, stats: dict) -> None:
            if stats.get("seq", 0) >= self.replicas.get(str(pid), {}).get("seq", 0):
                self.replicas[str(pid)] = stats

        def summary(self) -> dict:
            return self.replicas

    return Stats


def build(token: str, *, model: str | None, device: str, dtype: str, replicas: int, gpus_per_replica: float,
          cpus_per_replica: float, threads: int, batch_size: int, batch_wait_ms: float):
    return ModelReplica.options(
        num_replicas=replicas, max_ongoing_requests=32,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
    ).bind(token, model, device, dtype, threads, batch_size, batch_wait_ms)
