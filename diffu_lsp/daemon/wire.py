"""The daemon's wire format: length-prefixed msgspec MessagePack frames of typed messages.

A frame is a 4-byte big-endian body length, then the body: one message of the :data:`Message`
union, tagged by its class name. The first message on a connection is the client's
:class:`Hello`; the daemon answers :class:`Welcome`, or :class:`Error` and closes when the
protocol or the package version differ (an old daemon and a new server refuse each other).

Client -> daemon: Hello, Load, Submit, Cancel, Ping, StatusQuery, Stop.
Daemon -> client: Welcome, Loaded, Progress, Result, Failed, Pong, Status, Error.
Every Load and Submit is answered exactly once (Loaded/Failed, Result/Failed), cancelled or not;
every Ping is answered by a Pong from the daemon's event loop (a frozen daemon answers nothing).
"""

from __future__ import annotations

import struct
from typing import Literal, Union

import msgspec

from ..errors import FrameInvalid
from ..job import Answer, ModelInfo, ModelKey, Request

# 7: JobSettings.candidates, Suggestion.alternatives; 6: Progress.text (the streamed draft); 5: JobSettings.warmStart; 4: a Request carries JobSettings,
# not the whole Settings (3: Ping/Pong; 2: compile, reuseKeys)
PROTOCOL = 7
MAX_FRAME = 64 * 1024 * 1024  # what a client reads: an answer holds at most a document's worth of text
MAX_CLIENT_FRAME = 16 * 1024 * 1024  # what the daemon reads: a Submit holds one document (clipped
                                     # over maxDocumentBytes, 4 MB by default) and its settings
HEADER = struct.Struct(">I")


class Hello(msgspec.Struct, tag=True, frozen=True):
    protocol: int
    version: str  # diffu-lsp package version
    pid: int
    name: str = "diffu-lsp"


class Welcome(msgspec.Struct, tag=True, frozen=True):
    protocol: int
    version: str
    pid: int
    client: int  # the id the daemon gave this connection


class Load(msgspec.Struct, tag=True, frozen=True):
    id: int
    model: ModelKey


class Loaded(msgspec.Struct, tag=True, frozen=True):
    id: int
    info: ModelInfo


class Submit(msgspec.Struct, tag=True, frozen=True):
    id: int
    key: str  # latest-wins key within this client (a document URI, "uri#command")
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


class Failed(msgspec.Struct, tag=True, frozen=True):
    """A Load or Submit that did not succeed: cancelled (superseded, cancelled, queue full),
    out of memory, or an error (the message says which)."""

    id: int
    kind: Literal["cancelled", "oom", "error"]
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


class Error(msgspec.Struct, tag=True, frozen=True):
    """A connection-level problem (bad frame, wrong version); the daemon closes after it."""

    message: str


Message = Union[Hello, Welcome, Load, Loaded, Submit, Cancel, Ping, Pong, Progress, Result, Failed, StatusQuery,
                Status, Stop, Error]

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


def read_frame(sock) -> Message | None:
    """One message from a blocking socket; None at a clean end of stream."""
    header = _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    body = _read_exactly(sock, body_length(header))
    if body is None:
        raise FrameInvalid("connection closed inside a frame")
    return decode(body)


def _read_exactly(sock, n: int) -> bytes | None:
    chunks, remaining = [], n
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            if remaining == n:
                return None
            raise FrameInvalid("connection closed inside a frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
