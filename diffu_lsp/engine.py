"""What the server asks of a model, as plain data, and who runs it.

A :class:`~diffu_lsp.job.Request` is one model job (suggest at a cursor, complete a block, fill the holes of a
range, refine a selection) over a snapshot of the document text. The server hands it to an
engine on the scheduler's worker thread:

- :class:`LocalEngine` holds the model in this process (``--no-daemon``);
- :class:`diffu_lsp.daemon.client.DaemonEngine` sends it to the machine's model daemon;
- :class:`diffu_lsp.cluster.client.ClusterEngine` sends it to a Ray Serve cluster.

All three implement :class:`Engine` and answer with the same values (:class:`Suggestion`, a list of :class:`Replacement`, or the
refined text) and raise :class:`~diffu_lsp.errors.JobCancelled` when the job is cancelled. This
module is light on purpose: the server imports it, and torch is only imported by the local
engine's ``load``.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from .errors import ModelLoadFailed
from .job import Answer, ModelInfo, ModelKey, Request, Step
from .settings import Settings


@runtime_checkable
class Engine(Protocol):
    """The engine contract: what a window asks of whoever runs its jobs. Implemented by
    :class:`LocalEngine`, :class:`diffu_lsp.daemon.client.DaemonEngine` and
    :class:`diffu_lsp.cluster.client.ClusterEngine`. ``load`` and ``run`` block: call them off the
    event loop. ``run`` raises :class:`~diffu_lsp.errors.JobCancelled` (or a subclass) when the job
    is cancelled or the engine went away, :class:`~diffu_lsp.errors.OutOfMemory` (or torch's) when
    even the smaller retry ran out of memory; ``on_oom_retry`` is called once per such retry."""

    name: str

    def load(self, key: ModelKey) -> ModelInfo: ...

    def run(self, request: Request, cancel, on_step: Callable[[Step], None] | None = None,
            on_oom_retry: Callable[[], None] | None = None, *, key: str = "") -> Answer: ...

    def configure(self, settings: Settings) -> None: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


def model_info(model, key: ModelKey, **extra) -> ModelInfo:
    return ModelInfo(label=key.label, family=model.family, device=str(model.device), max_length=model.max_length,
                     parameters=model.parameter_count, load_seconds=model.load_seconds, **extra)


class LocalEngine:
    """The model in this process; ``load`` and ``run`` block (call them off the event loop). Jobs
    run on the window's own scheduler thread, through the same :func:`~diffu_lsp.job_host.run_job`
    as in the daemon and the cluster's replicas."""

    name = "in-process"

    def __init__(self) -> None:
        self.held = None  # a job_host.HeldModel: the model and its last suggestion canvas per document

    @property
    def model(self):
        return None if self.held is None else self.held.model

    def load(self, key: ModelKey) -> ModelInfo:
        from .job_host import HeldModel
        from .models import load_model  # torch is imported here, on the loading thread

        self.held = None  # let the previous model (and its canvases) go before the next one loads
        self.held = HeldModel(key, load_model(key.model, device=key.device, dtype=key.dtype))
        return model_info(self.held.model, key)

    def run(self, request: Request, cancel, on_step: Callable[[Step], None] | None = None,
            on_oom_retry: Callable[[], None] | None = None, *, key: str = "") -> Answer:
        from .job_host import run_job

        if self.held is None:
            raise ModelLoadFailed("no model is loaded")
        return run_job(self.held, request, cancel=cancel, on_step=on_step, on_oom_retry=on_oom_retry or (lambda: None),
                       key=key)

    def configure(self, settings: Settings) -> None:
        pass

    def describe(self) -> dict:
        return {"engine": self.name}

    def close(self) -> None:
        self.held = None
