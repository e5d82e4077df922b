"""The host side of the job protocol, one copy for every engine. :func:`run_job`: features.answer on
a :class:`HeldModel` (its warm-start canvases, its use counted), also the in-process engine's.
:class:`JobHost` runs :class:`~diffu_lsp.protocol.Submit` frames for the daemon and each cluster
replica: one :class:`~diffu_lsp.scheduler.Scheduler` (latest-wins per window document, newest first,
``workers`` at once on a batching replica), Progress frames, and one Result or Failed frame.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .errors import JobCancelled
from .job import Answer, ModelKey, Request
from .protocol import Failed, Message, Progress, Result, Submit, failed
from .scheduler import Job, Scheduler
from .warm_start import CanvasStore

log = logging.getLogger("diffu_lsp.host")

TRIM_SECONDS = 5.0  # after a job, freed heap memory goes back to the system at most this often


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None under another C library."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()
_trim_lock = threading.Lock()
_trimmed_at = 0.0


def trim_heap() -> None:
    """Give the heap pages that jobs freed back to the system, at most every :data:`TRIM_SECONDS`
    (it takes about 10 ms). glibc keeps freed memory in its arenas wherever a live allocation sits
    above it, and a model's jobs free a lot of it in between torch's cached kernels (a new one per
    input shape, evicted as others come): in a 3-minute soak the daemon's arenas held 325 MiB free
    next to 212 MiB in use, all of it counted in its RSS."""
    global _trimmed_at
    if MALLOC_TRIM is None:
        return
    with _trim_lock:
        now = time.monotonic()
        if now - _trimmed_at < TRIM_SECONDS:
            return
        _trimmed_at = now
    MALLOC_TRIM(0)


@dataclass
class HeldModel:
    key: ModelKey
    model: Any
    bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)
    jobs: int = 0
    drafts: CanvasStore = field(default_factory=CanvasStore)  # the last suggestion canvas per window and document


def run_job(held: HeldModel, request: Request, *, cancel, on_step=None,
            on_oom_retry: Callable[[], Any] = lambda: None, key: str = "") -> Answer:
    """One job on ``held``'s model: :func:`diffu_lsp.features.answer` with its canvases for warm start."""
    from . import features  # torch: only once a job runs here

    held.last_used = time.monotonic()
    held.jobs += 1
    return features.answer(held.model, request, cancel=cancel, on_step=on_step, on_oom_retry=on_oom_retry,
                           drafts=held.drafts, key=key)


class JobHost:
    """Runs Submit frames on held models; use it from one event loop."""

    def __init__(self, *, workers: int = 1, thread_name: str = "diffu-host-model") -> None:
        self.sched = Scheduler(debounce_s=0, thread_name=thread_name, workers=workers, after_job=trim_heap)

    def submit(self, held: HeldModel, message: Submit, send: Callable[[Message], None], *,
               key: str) -> tuple[Job, Awaitable[Result | Failed]]:
        """Queue ``message`` (latest-wins per ``key``; Progress frames to ``send`` on the loop): the job,
        for Cancel frames, and the awaitable of its one answer (cancelling its task cancels the job)."""
        loop = asyncio.get_running_loop()
        oom_retries = 0

        def progress(step) -> None:  # worker thread
            loop.call_soon_threadsafe(send, Progress(message.id, step.step, step.masked, step.text))

        def count_oom_retry() -> None:
            nonlocal oom_retries
            oom_retries += 1

        job = self.sched.submit(key, lambda token: run_job(
            held, message.request, cancel=token, on_step=progress if message.progress else None,
            on_oom_retry=count_oom_retry, key=key), debounce=False)

        async def answer() -> Result | Failed:
            try:
                return Result(message.id, await job, job.token.forwards, oom_retries)
            except asyncio.CancelledError:
                job.cancel("the window disconnected")
                raise
            except BaseException as error:  # noqa: BLE001 - the job failed (a PanicException too); the host goes on
                if not isinstance(error, JobCancelled):
                    log.warning("job %d (%s) failed: %r", message.id, key, error)
                return failed(message.id, error, job.token.forwards, job.token.forwards_after_cancel)

        return job, answer()
