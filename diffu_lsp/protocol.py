"""The job protocol of the daemon's socket and the cluster's HTTP stream: typed frames (a 4-byte
big-endian length, then one :data:`Message` as msgspec MessagePack tagged by its class name), and
outcomes to frames (:func:`failed`) and back to :mod:`~diffu_lsp.errors` types (:func:`error_of`,
:func:`take`). Daemon: Hello is answered Welcome (Error and closed when the versions differ), then
Load, Submit, Cancel, Ping, StatusQuery, Stop get Loaded, Progress, Result, Failed, Pong, Status.
Cluster: ``POST /job``'s body is a Submit, answered by a Welcome (the replica's pid), Progress, a
Pong a second while the job waits, then its Result or Failed. Every Load and Submit is answered
once; every Ping by the host's event loop, never behind a job. ``bench gpu`` never imports this.
"""

from __future__ import annotations

import struct
from typing import Callable, Literal, Union

import msgspec

from .errors import (EXITS, DiffuError, FrameInvalid, JobCancelled, JobFailed, ModelLoadFailed, OutOfMemory,
                     RequestTooLarge, first_line, is_out_of_memory)
from .job import Answer, ModelInfo, ModelKey, Request, Step

# 9: Stopping; 8: the cluster's too, Failed kinds load/too_large; 7: candidates; 6: Progress.text; 5: warmStart;
# 4: JobSettings
PROTOCOL = 9
MAX_FRAME = 64 * 1024 * 1024  # what a client reads: an answer holds at most a document's worth of text
MAX_CLIENT_FRAME = 16 * 1024 * 1024  # what a host reads: a Submit holds one document (clipped over
                                     # maxDocumentBytes, 4 MB by default) and its settings
HEADER = struct.Struct(">I")


class Hello(msgspec.Struct, tag=True, frozen=True):
    protocol: int
    version: str  # diffu-lsp package version
    pid: int
    name: str = "diffu-lsp"


class Welcome(msgspec.Struct, tag=True, frozen=True):
    protocol: int
    version: str
    pid: int     # the daemon's, or the replica's that runs the job
    client: int  # the id the daemon gave this connection (0 on the cluster)


class Load(msgspec.Struct, tag=True, frozen=True):
    id: int
    model: ModelKey


class Loaded(msgspec.Struct, tag=True, frozen=True):
    id: int
    info: ModelInfo


class Submit(msgspec.Struct, tag=True, frozen=True):
    id: int
    key: str  # latest-wins key within this window (a document URI, "uri#command")
    model: ModelKey  # loaded on demand if the daemon does not hold it (e.g. after a restart)
    request: Request
    progress: bool = False  # send a Progress frame per denoising step


class Cancel(msgspec.Struct, tag=True, frozen=True):
    id: int
    reason: str = "cancelled"


class Ping(msgspec.Struct, tag=True, frozen=True):
    id: int  # echoed in the Pong


class Pong(msgspec.Struct, tag=True, frozen=True):
    id: int


class Progress(msgspec.Struct, tag=True, frozen=True):
    id: int
    step: int
    masked: int
    text: str = ""  # the draft so far (diffu_lsp.job.Step.text)


class Result(msgspec.Struct, tag=True, frozen=True):
    id: int
    value: Answer
    forwards: int
    oom_retries: int = 0  # the job ran out of memory and was retried with smaller holes


FailedKind = Literal["cancelled", "oom", "load", "too_large", "error"]


class Failed(msgspec.Struct, tag=True, frozen=True):
    """A Load or Submit that did not succeed: cancelled (superseded, cancelled, queue full), out of
    memory, its model failed to load, a request over a bound, or another error (the message says)."""

    id: int
    kind: FailedKind
    message: str
    forwards: int = 0
    forwards_after_cancel: int = 0


class StatusQuery(msgspec.Struct, tag=True, frozen=True):
    pass


class LoadedModel(msgspec.Struct, frozen=True):
    label: str
    device: str
    dtype: str
    family: str
    bytes: int
    idle_seconds: float
    jobs: int


class Status(msgspec.Struct, tag=True, frozen=True):
    pid: int
    version: str
    protocol: int
    socket: str
    log: str
    uptime_seconds: float
    clients: int  # connected windows (not counting the connection that asked)
    models: list[LoadedModel]
    loads: int  # models loaded since start (a reload after eviction counts again)
    evictions: int
    rss_bytes: int
    idle_timeout_seconds: float
    memory_budget_bytes: int
    jobs: dict  # the scheduler's counters (submitted, completed, max_forwards_after_cancel, ...)


class Stop(msgspec.Struct, tag=True, frozen=True):
    pass


class Stopping(msgspec.Struct, tag=True, frozen=True):
    """The daemon stops on purpose (``daemon stop``, a signal, its folder taken): told to each
    window before it closes, so that none starts a new daemon until it next needs one."""

    reason: str


class Error(msgspec.Struct, tag=True, frozen=True):
    """A connection-level problem (bad frame, wrong version); the host closes after it."""

    message: str


Message = Union[Hello, Welcome, Load, Loaded, Submit, Cancel, Ping, Pong, Progress, Result, Failed, StatusQuery,
                Status, Stop, Stopping, Error]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


def body_length(header: bytes, limit: int = MAX_FRAME) -> int:
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise FrameInvalid(f"frame of {length:,} bytes is over the {limit:,}-byte limit")
    return length


def decode(body: bytes) -> Message:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as error:
        raise FrameInvalid(f"bad frame: {error}") from None


def read_frame(stream, limit: int = MAX_FRAME) -> Message | None:
    """One message from a blocking socket (``recv``) or file-like stream such as an HTTP response
    (``read``); None at a clean end of stream."""
    read: Callable[[int], bytes] = getattr(stream, "recv", None) or stream.read
    header = _read_exactly(read, HEADER.size)
    if header is None:
        return None
    body = _read_exactly(read, body_length(header, limit))
    if body is None:
        raise FrameInvalid("connection closed inside a frame")
    return decode(body)


def _read_exactly(read: Callable[[int], bytes], n: int) -> bytes | None:
    chunks, remaining = [], n
    while remaining:
        chunk = read(min(remaining, 1 << 20))
        if not chunk:
            if remaining == n:
                return None
            raise FrameInvalid("connection closed inside a frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------ outcomes <-> frames

_KIND_OF: tuple[tuple[type, FailedKind], ...] = (
    (JobCancelled, "cancelled"), (ModelLoadFailed, "load"), (RequestTooLarge, "too_large"))
_ERROR_OF: dict[str, type[DiffuError]] = {"cancelled": JobCancelled, "oom": OutOfMemory, "load": ModelLoadFailed,
                                          "too_large": RequestTooLarge, "error": JobFailed}


def failed(id: int, error: BaseException, forwards: int = 0, forwards_after_cancel: int = 0) -> Failed:
    """The Failed frame that reports ``error`` (raised by a load or a job) to the window."""
    if isinstance(error, EXITS):
        raise error
    kind: FailedKind = "oom" if is_out_of_memory(error) else next(
        (kind for cls, kind in _KIND_OF if isinstance(error, cls)), "error")
    message = error.reason if isinstance(error, JobCancelled) else first_line(error)
    return Failed(id, kind, message, forwards, forwards_after_cancel)


def error_of(frame: Failed) -> DiffuError:
    """The :mod:`~diffu_lsp.errors` type a Failed frame stands for, with its message."""
    return _ERROR_OF[frame.kind](frame.message)


def take(frame: Message, cancel=None, on_step=None, on_oom_retry: Callable[[], object] = lambda: None):
    """A client's use of an answer's frame: a Progress counted on ``cancel`` and handed to ``on_step``
    (None returned); a Failed raised as its error; a Result's forwards and retries reported; returned."""
    if isinstance(frame, Progress):
        if cancel is not None:
            cancel.forwards = frame.step
        if on_step is not None:
            on_step(Step(frame.step, frame.masked, frame.text))
        return None
    if isinstance(frame, (Failed, Result)) and cancel is not None:
        cancel.report(frame.forwards, getattr(frame, "forwards_after_cancel", 0))
    if isinstance(frame, Failed):
        raise error_of(frame)
    for _ in range(frame.oom_retries if isinstance(frame, Result) else 0):
        on_oom_retry()
    return frame
