"""What the server asks of a model, as plain data, and who runs it.

A :class:`Request` is one model job (suggest at a cursor, complete a block, fill the holes of a
range, refine a selection) over a snapshot of the document text. The server hands it to an
engine on the scheduler's worker thread:

- :class:`LocalEngine` holds the model in this process (``--no-daemon``);
- :class:`diffu_lsp.daemon.client.DaemonEngine` sends it to the machine's model daemon.

Both answer with the same values (:class:`Suggestion`, a list of :class:`Replacement`, or the
refined text) and raise :class:`~diffu_lsp.jobs.JobCancelled` when the job is cancelled. This
module is light on purpose: the server imports it, and torch is only imported by the local
engine's ``load``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import msgspec

from .settings import Settings

Kind = Literal["suggest", "block", "fill_holes", "refine"]


class Request(msgspec.Struct, frozen=True):
    """One job: ``text`` is the (possibly clipped) document, ``start``/``end`` offsets into it
    (the cursor twice for ``suggest``/``block``)."""

    kind: Kind
    text: str
    start: int
    end: int
    settings: Settings


class Suggestion(msgspec.Struct, frozen=True):
    text: str              # inserted at the cursor ("" when the model had nothing worth showing)
    replace_after: int     # characters after the cursor, on its line, that the text already closes
    multiline: bool
    forwards: int
    hole_tokens: int
    seconds: float


class Replacement(msgspec.Struct, frozen=True):
    start: int
    end: int
    text: str


Answer = Suggestion | list[Replacement] | str


class ModelKey(msgspec.Struct, frozen=True):
    """Which model: two windows asking for the same key share one loaded copy."""

    model: str | None  # None: the bundled tiny model
    device: str = "auto"
    dtype: str = "auto"

    @property
    def label(self) -> str:
        return self.model or "bundled tiny model"


class ModelInfo(msgspec.Struct, frozen=True):
    """What the server needs to know about a loaded model."""

    label: str
    family: str
    device: str
    max_length: int
    parameters: int
    load_seconds: float
    shared: bool = False            # the daemon had it loaded already (another window asked first)
    evicted: tuple[str, ...] = ()   # models the daemon unloaded to stay within its memory budget


class Step(NamedTuple):
    """Progress of a running job (the sampler's Draft carries the same two fields)."""

    step: int     # forwards so far
    masked: int   # positions still masked


def is_oom(error: BaseException) -> bool:
    """torch.OutOfMemoryError (and its cuda alias, and the daemon's report of one), by name:
    recognised without importing torch."""
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__)


def first_line(error: BaseException) -> str:
    """An error in one line for the user: its message's first line, else its type's name."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def model_info(model, key: ModelKey, **extra) -> ModelInfo:
    return ModelInfo(label=key.label, family=model.family, device=str(model.device), max_length=model.max_length,
                     parameters=model.parameter_count, load_seconds=model.load_seconds, **extra)


class LocalEngine:
    """The model in this process; ``load`` and ``run`` block (call them off the event loop)."""

    name = "in-process"

    def __init__(self) -> None:
        self.model = None

    def load(self, key: ModelKey) -> ModelInfo:
        from .models import load_model  # torch is imported here, on the loading thread

        self.model = None  # let the previous model go before the next one loads
        self.model = load_model(key.model, device=key.device, dtype=key.dtype)
        return model_info(self.model, key)

    def run(self, request: Request, cancel, on_step: Callable[[Any], None] | None = None,
            on_oom_retry: Callable[[], None] = lambda: None, *, key: str = "") -> Answer:
        from . import features

        if self.model is None:
            raise RuntimeError("no model is loaded")
        return features.run(self.model, request, cancel=cancel, on_step=on_step, on_oom_retry=on_oom_retry)

    def configure(self, settings: Settings) -> None:
        pass

    def describe(self) -> dict:
        return {"engine": self.name}

    def close(self) -> None:
        self.model = None
