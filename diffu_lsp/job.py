"""The job types: what a window asks of a model and what it gets back, as plain data.

These travel to the daemon and the cluster (msgspec structs). No imports from the package
but :mod:`diffu_lsp.settings` (itself a leaf: stdlib and msgspec only), so every room can
import this module without pulling in any other.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

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
