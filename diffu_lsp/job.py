"""The job types: what a window asks of a model and what it gets back, as plain data.

These travel to the daemon and the cluster (msgspec structs). No imports from the package, so
every room can import this module without pulling in any other.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import msgspec

Kind = Literal["suggest", "block", "fill_holes", "refine", "next_edit"]


class JobSettings(msgspec.Struct, kw_only=True, rename="camel", frozen=True):
    """The settings a job needs (decoding, context budgets, hole sizes, post-processing), taken
    from the window's validated :class:`~diffu_lsp.settings.Settings` by :func:`job_settings`.
    Editor and process settings (model, engine, debounce, daemon, downloads, ...) stay in the
    window: adding one does not change what travels to the daemon or the cluster."""

    algorithm: Literal["threshold", "factor", "entropy", "maskgit_plus", "topk_margin"] | None
    steps: int | None
    threshold: float | None
    factor: float | None
    temperature: float
    top_p: float | None
    top_k: int | None
    block_length: int | None
    eos_penalty: float | None
    early_exit: bool
    edit_threshold: float | None
    kv_cache: Literal["none", "prefix", "dual", "delayed"]
    cache_refresh_steps: int | None
    compile: bool
    reuse_keys: bool
    warm_start: bool
    prefix_tokens: int
    suffix_tokens: int
    single_line_tokens: int
    multi_line_tokens: int
    block_tokens: int
    tail_confidence: float
    hole_markers: tuple[str, ...]
    refine_mode: Literal["all", "low_confidence"]
    refine_confidence: float
    candidates: int = 1
    next_edit_confidence: float = 0.5


def job_settings(settings: Any) -> JobSettings:
    """The job's part of ``settings`` (a Settings, or a JobSettings already)."""
    if isinstance(settings, JobSettings):
        return settings
    return JobSettings(**{name: getattr(settings, name) for name in JobSettings.__struct_fields__})


class Request(msgspec.Struct, frozen=True):
    """One job: ``text`` is the (possibly clipped) document, ``start``/``end`` offsets into it
    (the cursor twice for ``suggest``/``block``). ``settings`` may be given as the window's
    Settings: only its :class:`JobSettings` part is kept. ``spans``: for ``next_edit``, the
    candidate spans (start, end, plain replacement, how sure the edit alone makes it), sorted and disjoint."""

    kind: Kind
    text: str
    start: int
    end: int
    settings: JobSettings
    spans: tuple[tuple[int, int, str, float], ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end <= len(self.text):  # from a daemon or cluster client too
            raise ValueError(f"offsets {self.start}..{self.end} are not a range of the text's "
                             f"{len(self.text)} characters")
        last = 0
        for start, end, *_ in self.spans:
            if not last <= start <= end <= len(self.text):
                raise ValueError(f"span {start}..{end} is not after the last one ({last}) within the text")
            last = end
        if not isinstance(self.settings, JobSettings):
            msgspec.structs.force_setattr(self, "settings", job_settings(self.settings))


class Suggestion(msgspec.Struct, frozen=True):
    text: str              # inserted at the cursor ("" when the model had nothing worth showing)
    replace_after: int     # characters after the cursor, on its line, that the text already closes
    multiline: bool
    forwards: int
    hole_tokens: int
    seconds: float
    drafted: int = 0       # warm start: draft tokens the hole started with (provisional)
    remasked: int = 0      # of those, the ones masked again because the model no longer agreed
    alternatives: tuple[tuple[str, int], ...] = ()  # other candidates: (text, replace_after), distinct


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
    """Progress of a running job, after each denoising step."""

    step: int       # forwards so far
    masked: int     # positions still masked
    text: str = ""  # the draft so far: the holes' text, each run of masked positions shown as "…"
