"""Forward batching: concurrent jobs, each running its own sampler in its own thread, share forwards.

A job's sampler calls ``logits_fn(canvas, positions)`` once per step, as it does alone. With a
:class:`ForwardBatcher` on the model, that call puts the request in a queue and waits; one batcher
thread gathers the requests of the jobs running now and runs them as ONE padded forward
(:meth:`DiffusionModel.batch_position_logits`), then hands each job its own logits. The sampler is
unchanged: holes, thresholds, early exit and cancellation stay per job.

Gathering: the batch runs as soon as every running job has a request in (so a lone job never
waits), or `batch_size` requests are in, or `wait_s` has passed since the first one came (a job
still busy between its forwards is not waited for longer: bounded). A job cancelled while its
request waits leaves the queue at once (its sampler gets JobCancelled, no forward counted); one
cancelled while its batch runs gets that forward's logits and stops before its next forward, as
alone. The other jobs of the batch are not disturbed.

K/V cache: batched jobs run uncached (every step a full forward over its canvas). A cached job's
steps run over its own span of rows against its own K/V buffer; stacking those would need equal
spans across jobs, which typing users never have. On a GPU a padded batch of 8 full forwards costs
about one forward; on a CPU it costs about 8 (the bench measures this).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import JobCancelled

RESULT_WAIT_S = 600.0  # the longest a job waits for its batch's forward (a forward, not a queue)


@dataclass
class _Request:
    canvas: torch.Tensor
    positions: torch.Tensor
    cancel: object
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class ForwardBatcher:
    """Gathers the forwards of concurrent jobs on one model into padded batched forwards."""

    def __init__(self, model, batch_size: int = 8, wait_s: float = 0.005):
        if batch_size < 1 or not 0 <= wait_s <= 1:
            raise ValueError("batch_size must be >= 1 and wait_s in [0, 1] seconds")
        self.model, self.batch_size, self.wait_s = model, batch_size, wait_s
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._jobs = 0            # jobs inside job(): the ones a batch may wait for
        self._thread: threading.Thread | None = None
        self.batches = 0          # forwards run
        self.rows = 0             # requests served by them (rows / batches: the mean batch size)
        self.largest = 0
        self.left = 0             # requests withdrawn by cancellation while waiting

    @contextmanager
    def job(self):
        """Around one job's denoising: the batcher knows how many jobs may send a request."""
        with self._cond:
            self._jobs += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="diffu-batcher", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._cond:
                self._jobs -= 1
                self._cond.notify_all()  # the jobs still running may be all that a batch waits for

    def logits_fn(self, cancel=None):
        """A sampler LogitsFn for one job whose forwards go through this batcher."""
        return lambda canvas, positions: self.position_logits(canvas, positions, cancel)

    def position_logits(self, canvas: torch.Tensor, positions: torch.Tensor, cancel=None) -> torch.Tensor:
        request = _Request(canvas.clone(), positions.clone(), cancel)
        with self._cond:
            self._queue.append(request)
            self._cond.notify_all()
        deadline = time.monotonic() + RESULT_WAIT_S
        while not request.done.wait(0.01):
            if cancel is not None and cancel.cancelled:
                with self._cond:
                    if request in self._queue:  # not taken into a batch yet: leave
                        self._queue.remove(request)
                        self.left += 1
                        self._cond.notify_all()
                        raise JobCancelled("cancelled while waiting for a batched forward")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no batched forward within {RESULT_WAIT_S:.0f} s")
        if request.error is not None:
            raise request.error
        return request.logits

    # ------------------------------------------------------------ the batcher thread

    def _take(self) -> list[_Request]:
        """Wait for requests, then gather (bounded by wait_s) and take up to batch_size (under _cond)."""
        while not self._queue:
            self._cond.wait(1.0)
        first_at = time.monotonic()
        while len(self._queue) < min(self._jobs, self.batch_size):
            left = first_at + self.wait_s - time.monotonic()
            if left <= 0 or not self._queue:
                break
            self._cond.wait(left)
        taken, self._queue = self._queue[:self.batch_size], self._queue[self.batch_size:]
        return taken

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._take()
            if not batch:
                continue
            try:
                logits = self.model.batch_position_logits([r.canvas for r in batch], [r.positions for r in batch])
            except BaseException as error:  # noqa: BLE001 - every job of the batch gets the error; we go on
                for request in batch:
                    request.error = error
                    request.done.set()
                continue
            self.batches += 1
            self.rows += len(batch)
            self.largest = max(self.largest, len(batch))
            for request, rows in zip(batch, logits):
                request.logits = rows
                request.done.set()

    @property
    def stats(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "largest": self.largest, "left": self.left,
                "mean_batch": self.rows / self.batches if self.batches else 0.0}
