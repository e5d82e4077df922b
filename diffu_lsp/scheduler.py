"""Job scheduler: one model, one worker thread, latest-wins per document.

Generic: it runs plain functions and knows nothing of models or LSP; the session, the
daemon and the cluster replicas use it. Pure asyncio + threading + stdlib (the rooms'
rules, tests/test_architecture.py, keep it so).

Model
-----
* All work runs in ONE dedicated daemon thread (``diffu-model``), so only one
  job ever touches the model, and the asyncio event loop stays free (torch
  releases the GIL during forward passes).  ``workers=N`` runs up to N jobs
  of different keys at once (a replica whose model batches their forwards,
  diffu_lsp/models/batching.py); latest-wins and cancellation are unchanged.
* Every job has a *key* (normally the document URI; use ``f"{uri}#kind"`` if
  two kinds of request on one document must not supersede each other).  At
  most one unanswered job exists per key: submitting a new one **supersedes**
  the previous one (latest-wins).  A superseded job that is still debouncing
  or queued never runs; a running one has its :class:`CancelToken` cancelled
  and stops at the sampler's next check (before the next forward pass).
* The awaiting caller of a cancelled job gets :class:`JobCancelled`
  *immediately*; the worker, however, does not start the next job until the
  cancelled work function has actually returned (there is one model).
* ``debounce=True`` jobs wait ``debounce_s`` before they become runnable, so
  a burst of keystrokes costs one model run.  Explicit commands pass
  ``debounce=False``.
* Runnable jobs are served **newest-first** (the latest keystroke of any
  document first).  Latest-wins bounds the queue to one job per key, and a
  job passed over ``starvation_limit`` times is served before newer ones
  (oldest such first), so nothing starves.  ``starvation_limit=0`` is FIFO.
* Every submission is answered exactly once: the work's return value,
  :class:`JobCancelled`, or the exception the work raised (for that caller
  only; the worker survives any exception, ``BaseException`` included).
* Version guard: call :meth:`Scheduler.note_version` on ``didOpen`` /
  ``didChange``.  A job submitted with ``version=v`` is rejected with
  ``JobCancelled("stale ...")`` if the key's latest noted version is not
  ``v`` -- at submission, when the version changes while it is pending or
  running (the model is freed early), and once more on the event loop right
  before its result would be handed over.  So no result computed for an old
  document version is ever returned.  :meth:`Scheduler.is_current` lets a
  handler re-check after further awaits of its own.
* Cancelling the task that awaits a job (pygls does this for
  ``$/cancelRequest``) cancels the job too.  ``job.cancel()`` /
  ``sched.cancel_job(job_id)`` cancel one job (e.g. the client cancelled a
  work-done progress); ``sched.cancel(key)`` cancels the key's job.

Forward-pass accounting: the sampler does ``token.forwards += 1`` per
forward pass and checks ``token.cancelled`` before each one.  When a token is
cancelled its forward count is snapshotted, so ``forwards_after_cancel``
proves "a superseded job performs at most one further forward pass".  The
last ``history`` finished jobs are kept as :class:`JobRecord` in
``sched.records``; ``sched.stats`` has the counters.

Threading rules: :class:`CancelToken` is thread-safe.  :class:`Scheduler` and
:class:`Job` methods must be called on the event loop thread the scheduler
was first used from (pygls handlers, sync or async, run there); the worker
hands results back with ``loop.call_soon_threadsafe``.

Usage from a pygls handler::

    sched = Scheduler(debounce_s=0.06)

    @server.feature(TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls, params):
        sched.note_version(params.text_document.uri, params.text_document.version)

    @server.feature(TEXT_DOCUMENT_COMPLETION)
    async def completion(ls, params):
        doc = ls.workspace.get_text_document(params.text_document.uri)
        src, pos = doc.source, params.position  # snapshot on the loop thread
        try:
            text = await sched.submit(doc.uri, lambda tok: infill(src, pos, tok),
                                      version=doc.version)
        except JobCancelled:  # superseded, stale, or $/cancelRequest'ed
            return None
        return make_items(text)
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Generator, Generic, List, Optional, TypeVar

from .errors import JobCancelled

log = logging.getLogger(__name__)

__all__ = ["OUTCOMES", "CancelToken", "Job", "JobCancelled", "JobRecord", "Scheduler"]

T = TypeVar("T")

# Job.state values (transitions under Scheduler._lock).
_WAITING = "waiting"  # debouncing (or just created)
_READY = "ready"  # runnable, in Scheduler._ready
_RUNNING = "running"  # picked by the worker
_DONE = "done"  # worker finished with it, or it never ran

#: Outcomes (mutually exclusive; ``stats`` counts each).
OUTCOMES = ("completed", "failed", "cancelled", "superseded", "stale")


class CancelToken:
    """Thread-safe, cheap cancellation flag handed to a job's work function.

    The sampler reads ``token.cancelled`` (a plain attribute read behind a
    property) before every forward pass and does ``token.forwards += 1``
    after deciding to run one.  ``forwards`` is only ever written by the work
    thread.
    """

    __slots__ = ("_cancelled", "_reason", "_lock", "_forwards_at_cancel", "_callbacks", "forwards")

    def __init__(self) -> None:
        self._cancelled = False
        self._reason = ""
        self._lock = threading.Lock()
        self._forwards_at_cancel: Optional[int] = None
        self._callbacks: list = []
        self.forwards = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def reason(self) -> str:
        return self._reason

    def cancel(self, reason: str = "") -> bool:
        """Cancel; returns True if this call did it (False if already cancelled)."""
        with self._lock:
            if self._cancelled:
                return False
            self._reason = reason or "cancelled"
            self._forwards_at_cancel = self.forwards
            self._cancelled = True  # last: a reader seeing True sees the reason
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()
        return True

    def on_cancel(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` when the token is cancelled (at once if it already is), on the
        cancelling thread: e.g. forward the cancel to the model daemon. Keep it quick."""
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)
                return
        callback()

    def report(self, forwards: int, forwards_after_cancel: int = 0) -> None:
        """Forward counts measured elsewhere (the model daemon ran the job), kept as if counted here."""
        with self._lock:
            self.forwards = forwards
            if self._cancelled:
                self._forwards_at_cancel = forwards - forwards_after_cancel

    def raise_if_cancelled(self) -> None:
        """Raise :class:`JobCancelled` if cancelled (convenience for work code)."""
        if self._cancelled:
            raise JobCancelled(self._reason)

    @property
    def forwards_after_cancel(self) -> int:
        """Forward passes counted after :meth:`cancel` (0 if not cancelled)."""
        at = self._forwards_at_cancel
        return 0 if at is None else self.forwards - at

    def __repr__(self) -> str:
        state = f"cancelled={self._reason!r}" if self._cancelled else "live"
        return f"<CancelToken {state} forwards={self.forwards}>"


@dataclass(frozen=True)
class JobRecord:
    """What happened to one finished job (see ``Scheduler.records``)."""

    id: int
    key: str
    version: Optional[int]
    outcome: str  # one of OUTCOMES
    reason: str  # cancel reason or repr of the exception; "" when completed
    ran: bool  # whether the work function was called
    forwards: int
    forwards_after_cancel: int
    queued_s: Optional[float]  # submit -> work started (None if it never ran)
    run_s: Optional[float]  # work started -> work returned
    wall_s: float  # submit -> record written (caller may have been answered earlier)


class Job(Generic[T]):
    """Handle for one submission.  ``await job`` gives the result or raises.

    Attributes: ``id``, ``key``, ``version``, ``token``, ``outcome`` (None
    until answered).  Use on the event loop thread only.
    """

    __slots__ = ("id", "key", "version", "work", "token", "future", "state", "outcome",
                 "reason", "skips", "timer", "ran", "submitted_at", "started_at",
                 "finished_at", "priority", "_sched")

    def __init__(self, sched: "Scheduler", job_id: int, key: str, work: Callable[[CancelToken], T],
                 version: Optional[int], future: "asyncio.Future[T]") -> None:
        self._sched = sched
        self.id = job_id
        self.key = key
        self.version = version
        self.work: Optional[Callable[[CancelToken], T]] = work
        self.token = CancelToken()
        self.future = future
        self.state = _WAITING
        self.outcome: Optional[str] = None
        self.reason = ""
        self.skips = 0
        self.timer: Optional[asyncio.TimerHandle] = None
        self.ran = False
        self.submitted_at = time.monotonic()
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.priority = 0

    def __await__(self) -> Generator[Any, None, T]:
        return self.future.__await__()

    def done(self) -> bool:
        """True once the caller has been answered."""
        return self.future.done()

    def cancel(self, reason: str = "cancelled") -> bool:
        """Cancel this job; False if it was already answered."""
        return self._sched.cancel_job(self.id, reason)

    def __repr__(self) -> str:
        return f"<Job {self.id} key={self.key!r} v={self.version} {self.state} {self.outcome}>"


class Ledger:
    """What a scheduler has done (loop thread only): a counter per outcome, the forwards its jobs
    ran (and ran after being cancelled), and the last ``history`` finished jobs as
    :class:`JobRecord`."""

    def __init__(self, history: int) -> None:
        self.records: Deque[JobRecord] = collections.deque(maxlen=history)
        self.counts = dict.fromkeys(("submitted", "never_ran") + OUTCOMES, 0)
        self.forwards = 0
        self.forwards_after_cancel = 0
        self.max_forwards_after_cancel = 0

    def counters(self) -> Dict[str, Any]:
        return {**self.counts, "forwards": self.forwards, "forwards_after_cancel": self.forwards_after_cancel,
                "max_forwards_after_cancel": self.max_forwards_after_cancel}

    def record(self, job_id: int) -> Optional[JobRecord]:
        for r in reversed(self.records):
            if r.id == job_id:
                return r
        return None

    def retire(self, job: Job[Any]) -> None:
        """Count and record a job that is answered and that the worker is done with."""
        tok = job.token
        after = tok.forwards_after_cancel
        outcome = job.outcome or "cancelled"
        self.counts[outcome] += 1
        if not job.ran:
            self.counts["never_ran"] += 1
        self.forwards += tok.forwards
        self.forwards_after_cancel += after
        self.max_forwards_after_cancel = max(self.max_forwards_after_cancel, after)
        now = time.monotonic()
        started, finished = job.started_at, job.finished_at
        self.records.append(JobRecord(
            id=job.id, key=job.key, version=job.version, outcome=outcome, reason=job.reason,
            ran=job.ran, forwards=tok.forwards, forwards_after_cancel=after,
            queued_s=(started - job.submitted_at) if job.ran and started is not None else None,
            run_s=(finished - started) if job.ran and started and finished else None,
            wall_s=now - job.submitted_at))
        job.work = None


def _call(work: Callable[..., Any], *args: Any) -> tuple[Any, Optional[BaseException]]:
    """``work(*args)`` on a worker: (its result, None) or (None, what it raised); the worker must
    survive anything."""
    try:
        return work(*args), None
    except BaseException as error:  # noqa: BLE001
        return None, error


class Scheduler:
    """Serialises model work onto one thread with latest-wins per key.

    ``debounce_s``: delay before a ``debounce=True`` job becomes runnable.
    ``starvation_limit``: a runnable job passed over this many times is served
    before newer ones (0 = FIFO).  ``history``: number of :class:`JobRecord`
    kept.  The worker thread starts on the first :meth:`submit`, which also
    binds the scheduler to the running event loop.  ``after_job()`` runs on the worker after each
    job that ran, once its answer is handed over (housekeeping, e.g. ``job_host.trim_heap``).
    """

    def __init__(self, debounce_s: float = 0.06, *, starvation_limit: int = 4,
                 history: int = 200, thread_name: str = "diffu-model", workers: int = 1,
                 after_job: Callable[[], Any] = lambda: None) -> None:
        if debounce_s < 0 or starvation_limit < 0 or workers < 1:
            raise ValueError("debounce_s and starvation_limit must be >= 0, workers >= 1")
        self.workers = workers  # > 1: jobs of different keys run at once (a replica batching their forwards)
        self.debounce_s = debounce_s
        self.starvation_limit = starvation_limit
        self.thread_name = thread_name
        self.after_job = after_job
        self._ids = itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[int] = None
        self._thread: Optional[threading.Thread] = None  # the first worker
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # under _lock (shared with the worker):
        self._ready: Dict[int, Job[Any]] = {}
        self._running: Dict[int, Job[Any]] = {}
        self._stopping = False
        self._started = 0
        # loop thread only:
        self._by_id: Dict[int, Job[Any]] = {}  # unanswered jobs
        self._by_key: Dict[str, Job[Any]] = {}  # the unanswered job of each key
        self._latest: Dict[str, int] = {}  # note_version()
        self._closed = False
        self.ledger = Ledger(history)

    # ------------------------------------------------------------------ API

    def submit(self, key: str, work: Callable[[CancelToken], T], *, debounce: bool = True,
               version: Optional[int] = None, priority: int = 0) -> Job[T]:
        """Queue ``work(token)`` for ``key``, superseding the key's previous job.
        A runnable job of lower ``priority`` runs only when no job of a higher one is runnable
        (next-edit predictions: -1, behind every keystroke's suggestion).

        Returns a :class:`Job`; ``await`` it for the result.  Must be called
        with the event loop running (from a handler).
        """
        loop = self._bind()
        job: Job[T] = Job(self, next(self._ids), key, work, version, loop.create_future())
        job.priority = priority
        job.future.add_done_callback(lambda f, job=job: self._on_future_done(job))
        self.ledger.counts["submitted"] += 1
        if self._closed:
            self._cancel(job, "scheduler closed", "cancelled")
            return job
        if not self.is_current(key, version):
            # A request for an old version does not displace the current job.
            self._cancel(job, f"stale: version {version} != {self._latest.get(key)}", "stale")
            return job
        prev = self._by_key.get(key)
        if prev is not None:
            self._cancel(prev, f"superseded by job {job.id}", "superseded")
        self._by_id[job.id] = job
        self._by_key[key] = job
        if debounce and self.debounce_s > 0:
            job.timer = loop.call_later(self.debounce_s, self._make_ready, job)
        else:
            self._make_ready(job)
        return job

    def cancel(self, key: str, reason: str = "document changed") -> bool:
        """Cancel the key's pending or running job; False if there is none."""
        self._check_thread()
        job = self._by_key.get(key)
        return job is not None and self._cancel(job, reason, "cancelled")

    def cancel_below(self, priority: int, reason: str = "preempted") -> int:
        """Cancel every unanswered job of lower ``priority`` (a running one stops before its next
        forward): the model is free for the job about to be submitted. Returns how many."""
        self._check_thread()
        low = [job for job in self._by_id.values() if job.priority < priority]
        return sum(self._cancel(job, reason, "cancelled") for job in low)

    def cancel_job(self, job_id: int, reason: str = "cancelled") -> bool:
        """Cancel one job by id; False if unknown or already answered."""
        self._check_thread()
        job = self._by_id.get(job_id)
        return job is not None and self._cancel(job, reason, "cancelled")

    def note_version(self, key: str, version: int) -> None:
        """Record the document's current version (didOpen/didChange).

        The key's job, if it was submitted for another version, is cancelled
        as stale right away.
        """
        self._check_thread()
        self._latest[key] = version
        job = self._by_key.get(key)
        if job is not None and job.version is not None and job.version != version:
            self._cancel(job, f"stale: version {job.version} != {version}", "stale")

    def is_current(self, key: str, version: Optional[int]) -> bool:
        """True if ``version`` is None, unknown for ``key``, or the latest noted."""
        if version is None:
            return True
        latest = self._latest.get(key)
        return latest is None or latest == version

    def forget(self, key: str, reason: str = "document closed") -> None:
        """didClose: cancel the key's job and drop its version."""
        self._check_thread()
        self.cancel(key, reason)
        self._latest.pop(key, None)

    @property
    def stats(self) -> Dict[str, Any]:
        """Counters: submitted, started, never_ran, one per outcome, forwards,
        forwards_after_cancel (total), max_forwards_after_cancel, plus the
        current ``running`` job id, ``ready`` and ``pending`` (unanswered) counts."""
        with self._lock:
            started = self._started
            running = max(self._running) if self._running else None
            running_jobs = len(self._running)
            ready = len(self._ready)
        return {**self.ledger.counters(), "started": started, "running": running, "running_jobs": running_jobs,
                "ready": ready, "pending": len(self._by_id)}

    @property
    def records(self) -> Deque[JobRecord]:
        return self.ledger.records

    def record(self, job_id: int) -> Optional[JobRecord]:
        """The :class:`JobRecord` of a finished job, if still in history."""
        return self.ledger.record(job_id)

    async def close(self, timeout: Optional[float] = 10.0) -> None:
        """Cancel every job, stop and join the worker (waiting for the running work function to
        return, up to ``timeout`` seconds).  Later submissions get ``JobCancelled("scheduler closed")``."""
        self._check_thread()
        self._closed = True
        for job in list(self._by_id.values()):
            self._cancel(job, "scheduler closed", "cancelled")
        with self._cond:
            self._stopping = True
            running = list(self._running.values())
            self._cond.notify_all()
        for job in running:  # e.g. cancelled earlier but still returning
            job.token.cancel("scheduler closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        # Poll rather than use an executor: works during loop shutdown too.
        while any(t.is_alive() for t in self._threads) and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.002)
        await asyncio.sleep(0)  # let the worker's last call_soon_threadsafe run

    # ------------------------------------------------------------ internals

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._loop_thread = threading.get_ident()
        elif self._loop is not loop:
            raise RuntimeError("Scheduler is bound to another event loop")
        if self._thread is None and not self._closed:
            for index in range(self.workers):
                name = self.thread_name if index == 0 else f"{self.thread_name}-{index}"
                thread = threading.Thread(target=self._worker, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
            self._thread = self._threads[0]
        return loop

    def _check_thread(self) -> None:
        if self._loop_thread is not None and threading.get_ident() != self._loop_thread:
            raise RuntimeError("Scheduler methods must be called on its event loop thread "
                               "(CancelToken.cancel is thread-safe)")

    def _make_ready(self, job: Job[Any]) -> None:
        job.timer = None
        with self._cond:
            if job.state != _WAITING or self._stopping:
                return
            job.state = _READY
            self._ready[job.id] = job
            self._cond.notify()

    def _cancel(self, job: Job[Any], reason: str, outcome: str) -> bool:
        """Answer ``job`` with JobCancelled (loop thread).  False if already answered."""
        if job.outcome is not None:
            return False
        job.outcome = outcome
        job.reason = reason
        job.token.cancel(reason)
        if not job.future.done():
            job.future.set_exception(JobCancelled(reason, job_id=job.id, key=job.key))
        self._forget_job(job)
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        with self._lock:
            never_ran = job.state in (_WAITING, _READY)
            if never_ran:
                self._ready.pop(job.id, None)
                job.state = _DONE
        if never_ran:
            self.ledger.retire(job)
        return True

    def _on_future_done(self, job: Job[Any]) -> None:
        fut = job.future
        if fut.cancelled():  # the awaiting task was cancelled ($/cancelRequest)
            self._cancel(job, "request cancelled", "cancelled")
        elif isinstance(fut.exception(), JobCancelled):
            pass  # fut.exception() marked it retrieved: no "never retrieved" noise

    def _forget_job(self, job: Job[Any]) -> None:
        self._by_id.pop(job.id, None)
        if self._by_key.get(job.key) is job:
            del self._by_key[job.key]

    def _pick(self) -> Job[Any]:
        """Newest runnable job of the highest priority, unless one of those has starved (under _lock)."""
        newest = starving = None
        top = max(j.priority for j in self._ready.values())
        for j in self._ready.values():
            if j.priority < top:
                continue
            if newest is None or j.id > newest.id:
                newest = j
            if j.skips >= self.starvation_limit and (starving is None or j.id < starving.id):
                starving = j
        job = starving if starving is not None else newest
        assert job is not None
        del self._ready[job.id]
        for j in self._ready.values():
            j.skips += 1
        return job

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if not self._ready:
                    return
                job = self._pick()
                job.state = _RUNNING
                self._running[job.id] = job
            job.started_at = time.monotonic()
            work, job.work = job.work, None
            if job.token.cancelled:
                result, exc = None, JobCancelled(job.token.reason, job_id=job.id, key=job.key)
            else:
                job.ran = True
                with self._lock:
                    self._started += 1
                result, exc = _call(work, job.token)  # type: ignore[arg-type]
            job.finished_at = time.monotonic()
            with self._lock:
                job.state = _DONE
                self._running.pop(job.id, None)
            ran = job.ran
            try:
                self._loop.call_soon_threadsafe(self._on_worker_done, job, result, exc)  # type: ignore[union-attr]
            except RuntimeError:  # event loop already closed
                pass
            del job, work, result, exc  # before after_job: this thread holds nothing of the job
            if ran and (failure := _call(self.after_job)[1]) is not None:
                log.warning("after_job failed: %r", failure)

    def _on_worker_done(self, job: Job[Any], result: Any, exc: Optional[BaseException]) -> None:
        if job.outcome is None:
            fut = job.future
            if job.token.cancelled:  # cancelled directly through the token
                outcome, reason = "cancelled", job.token.reason
                fut.set_exception(JobCancelled(reason, job_id=job.id, key=job.key))
            elif exc is not None:
                if isinstance(exc, (JobCancelled, asyncio.CancelledError)):
                    outcome, reason = "cancelled", str(exc) or "cancelled"
                    if isinstance(exc, JobCancelled):  # its type says why (a lost engine is EngineLost)
                        exc.job_id, exc.key = job.id, job.key
                    else:
                        exc = JobCancelled(reason, job_id=job.id, key=job.key)
                else:
                    outcome, reason = "failed", repr(exc)
                fut.set_exception(exc)
            elif not self.is_current(job.key, job.version):
                outcome = "stale"
                reason = f"stale: version {job.version} != {self._latest.get(job.key)}"
                fut.set_exception(JobCancelled(reason, job_id=job.id, key=job.key))
            else:
                outcome, reason = "completed", ""
                fut.set_result(result)
            job.outcome, job.reason = outcome, reason
            self._forget_job(job)
        self.ledger.retire(job)
