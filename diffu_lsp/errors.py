"""The package's errors, one hierarchy, recognised by type everywhere.

    DiffuError
    ├── JobCancelled        superseded, cancelled, stale, scheduler closed: answered empty
    │   └── EngineLost      the daemon or a cluster replica went away (or went silent) mid-job
    ├── OutOfMemory         the model ran out of memory (torch's own error is recognised too)
    ├── ModelLoadFailed     a model could not be loaded; the message says why in one line
    ├── JobFailed           a job failed inside the daemon or a replica (any other error, by its message)
    ├── FrameError          a daemon or cluster frame that cannot be a message (too long, truncated, not ours)
    ├── EngineUnavailable   no daemon or cluster to be had (cannot start, reach or use it)
    └── RequestTooLarge     a request over a bound (canvas, holes, selection): refused before any work

Every request is answered: a guard catches any ``BaseException`` but cancellation (asyncio's
``CancelledError``, :class:`JobCancelled`) and :data:`EXITS`, so that e.g. the tokenizers
library's ``PanicException`` (a ``BaseException``) fails its request instead of leaving it unanswered.

Errors that arrive over the wire (daemon, cluster) are turned back into these types by the
clients; the LSP handler guard (server.py) turns them into answers and messages. No imports from
the package, and no torch: torch's out-of-memory error is recognised only if torch is loaded.
"""

from __future__ import annotations

import sys
from typing import Optional


class DiffuError(Exception):
    """Anything this package raises on purpose."""


class JobCancelled(DiffuError):
    """The job was superseded, cancelled, stale, or the scheduler closed.

    ``reason`` is a short human-readable string; ``job_id`` / ``key`` identify
    the job when the scheduler raised it (``None`` when raised by a sampler).
    """

    def __init__(self, reason: str = "cancelled", *, job_id: Optional[int] = None,
                 key: Optional[str] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id
        self.key = key


class EngineUnavailable(DiffuError):
    """No engine to be had: the daemon or cluster cannot be started, reached or used."""


class EngineLost(JobCancelled, EngineUnavailable):
    """The engine running the job went away or stayed silent past the deadline: the request is
    answered empty, like a cancelled one."""


class OutOfMemory(DiffuError):
    """The model ran out of memory on a job (here, in the daemon, or on a replica)."""


class ModelLoadFailed(DiffuError):
    """A model could not be loaded; the message says why in one line."""


class JobFailed(DiffuError, RuntimeError):
    """A job that failed inside the daemon or a cluster replica with an error of no other type
    here; the message is the error's first line (the engine itself is fine)."""


class FrameError(DiffuError, ValueError):
    """A frame of the job protocol (:mod:`diffu_lsp.protocol`) that cannot be a message: too long,
    truncated, or not one of ours."""


class RequestTooLarge(DiffuError, ValueError):
    """A request over one of the job path's bounds, refused before tokenizing; the message names
    the bound."""


#: Interpreter exit: passes through every guard (anything else fails only its own request).
EXITS = (SystemExit, KeyboardInterrupt, GeneratorExit)


def is_out_of_memory(error: BaseException) -> bool:
    """:class:`OutOfMemory`, or torch's ``OutOfMemoryError`` (checked only if torch is loaded)."""
    if isinstance(error, OutOfMemory):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None)
    return oom is not None and isinstance(error, oom)


def first_line(error: BaseException) -> str:
    """An error in one line for the user: its message's first line, else its type's name."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__
