"""Every exception class of diffu_lsp, one hierarchy, recognised by type everywhere.

    DiffuError
    ├── JobCancelled          superseded, cancelled, stale, scheduler closed: answered empty
    │   └── EngineLost        the daemon or a cluster replica went away (or went silent) mid-job
    │       ├── DaemonLost    the daemon went away while a job was pending
    │       │   └── DaemonStuck     it gave no sign of life within the deadline
    │       └── ClusterLost   the replica went away, or the cluster said nothing past the deadline
    ├── EngineUnavailable     no daemon or cluster to be had (cannot start, reach or use it)
    │   ├── DaemonUnavailable       the daemon cannot be reached, started or used
    │   │   └── DaemonUnresponsive  it accepted the connection but did not answer the Hello
    │   └── ClusterUnavailable      the cluster cannot be started, reached or used
    │       ├── ClusterUnreachable  nothing answers at the cluster's URL
    │       └── ReplicaFailed       a replica answered HTTP 5xx (dying or being replaced)
    ├── JobFailed             a job or load failed inside the daemon or on a replica (message: why)
    ├── OutOfMemory           the model ran out of memory (torch's own error is recognised too)
    ├── ModelLoadFailed       a model could not be loaded; the message says why in one line
    ├── RequestTooLarge       a request over a bound (canvas, holes, selection): refused before any work
    ├── SettingsInvalid       one bad setting (``key``, ``problem``)
    ├── FrameInvalid          a job-protocol frame (daemon or cluster) that cannot be a message
    ├── CommandFailed         a ``diffu-lsp`` command that cannot do what it was asked (bad arguments)
    └── LspRequestFailed      the benchmarks' LSP client: the server answered an error, or exited

Every request is answered: a guard catches any ``BaseException`` but :data:`PASS_THROUGH`
(asyncio's ``CancelledError`` and interpreter exit), so that e.g. the tokenizers library's
``PanicException`` (a ``BaseException``) fails its request instead of leaving it unanswered.

Errors that arrive over the wire (daemon, cluster) are turned back into these types by the
clients; the LSP handler guard (server.py) turns them into answers and messages. Each type has
one import path: this module. No imports from the package, and no torch: torch's out-of-memory
error is recognised only if torch is loaded.
"""

from __future__ import annotations

import asyncio
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


class DaemonLost(EngineLost):
    """The daemon went away while a job was pending: the request is answered empty."""


class DaemonStuck(DaemonLost):
    """The daemon gave no sign of life within the deadline (``frozen``: nor ran at all, see
    :meth:`diffu_lsp.daemon.client.Connection._check_alive`): the request is answered empty."""

    def __init__(self, reason: str, *, frozen: bool = False) -> None:
        super().__init__(reason)
        self.frozen = frozen


class ClusterLost(EngineLost):
    """The replica running the job went away (or the cluster was silent past the deadline): the
    request is answered empty."""


class DaemonUnavailable(EngineUnavailable):
    """The daemon cannot be reached, started or used; the message says why, for the user."""


class DaemonUnresponsive(DaemonUnavailable):
    """A daemon accepted the connection but did not answer the Hello in time (frozen or wedged)."""


class ClusterUnavailable(EngineUnavailable):
    """The cluster cannot be started, reached or used; the message says why, for the user."""


class ClusterUnreachable(ClusterUnavailable):
    """Nothing answers at the cluster's URL."""


class ReplicaFailed(ClusterUnavailable):
    """Serve answered 5xx: the replica died or is being replaced."""


class OutOfMemory(DiffuError):
    """The model ran out of memory on a job (here, in the daemon, or on a replica)."""


class ModelLoadFailed(DiffuError):
    """A model could not be loaded; the message says why in one line."""


class JobFailed(DiffuError, RuntimeError):
    """A job that failed inside the daemon or a cluster replica with an error of no other type
    here; the message is the error's first line (the engine itself is fine)."""


class RequestTooLarge(DiffuError, ValueError):
    """A request over one of the job path's bounds, refused before tokenizing; the message names
    the bound."""


class SettingsInvalid(DiffuError, ValueError):
    """One bad setting: ``key`` is the camelCase key (or a file path), ``problem`` a sentence."""

    def __init__(self, key: str, problem: str, *, section: str = "diffu"):
        self.key = key
        self.problem = problem
        self.section = section
        where = ".".join(part for part in (section, key) if part)
        super().__init__(f"{where}: {problem}")


class FrameInvalid(DiffuError, ValueError):
    """A frame of the job protocol (:mod:`diffu_lsp.protocol`) that cannot be a message: too long,
    truncated, or not one of ours."""


class CommandFailed(DiffuError):
    """A ``diffu-lsp`` command that cannot do what it was asked: printed as ``diffu-lsp: <message>``,
    exit status 2."""


class LspRequestFailed(DiffuError):
    """The benchmarks' LSP client: the server answered a request with an error, or exited."""


#: Interpreter exit: passes through every guard (anything else fails only its own request).
EXITS = (SystemExit, KeyboardInterrupt, GeneratorExit)

#: What a guard that answers every request never catches: asyncio's cancellation and interpreter
#: exit (``except PASS_THROUGH: raise`` before ``except BaseException``).
PASS_THROUGH = (asyncio.CancelledError, *EXITS)


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
