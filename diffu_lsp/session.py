"""One editor window's state and the non-protocol part of its work: no pygls, no lsprotocol.

A :class:`Session` holds the window's settings, its engine (and the choice and fallback between
engines), the model's state, the scheduler of its jobs, the suggestion cache (typed-through
reuse) and the counters behind ``diffu/stats``. The LSP layer (server.py) turns positions into
character offsets, calls in here, and turns the answers back into LSP values and messages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

from . import infill
from .engine import Engine, LocalEngine
from .errors import JobCancelled
from .job import ModelInfo, ModelKey, Request, Step, Suggestion
from .scheduler import Scheduler
from .settings import Settings

log = logging.getLogger("diffu_lsp.session")

COUNTERS = ("typed_through_hits", "repeat_hits", "model_loads", "model_load_failures", "oom_retries", "oom_failures",
            "daemon_lost", "daemon_stuck", "documents_clipped")
PROGRESS_DRAFT_CHARS = 100  # of a command's streamed draft, in one progress line


def utf8_size_over(text: str, limit: int) -> bool:
    if len(text) * 4 <= limit:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


def clip(text: str, start: int, end: int, settings: Settings) -> tuple[str, int]:
    """(text, base): a document over ``max_document_bytes`` is cut to whole lines around
    [start, end) as wide as the context budgets, so nothing scans or encodes all of it."""
    if not utf8_size_over(text, settings.max_document_bytes):
        return text, 0
    lo = max(0, start - settings.prefix_tokens * infill.MAX_CHARS_PER_TOKEN)
    hi = min(len(text), end + settings.suffix_tokens * infill.MAX_CHARS_PER_TOKEN)
    if lo > 0 and (newline := text.find("\n", lo, start)) >= 0:
        lo = newline + 1
    if hi < len(text) and (newline := text.rfind("\n", end, hi)) >= 0:
        hi = newline
    return text[lo:hi], lo


def find_holes(text: str, start: int, end: int, settings: Settings) -> list[infill.Hole]:
    """The holes ``fill holes`` would fill in [start, end) of ``text`` (the enclosing def/class
    when the range is empty), found in the clipped text as the job finds them."""
    clipped, base = clip(text, start, end, settings)
    return infill.holes_in_range(clipped, start - base, end - base, settings.hole_markers)


def refine_verdict(selected: str, new_text: str) -> str:
    """Why a refinement is not applied ("" when it is): the model kept the selection as it was,
    or produced nothing for a selection that had something."""
    if new_text == selected:
        return "the model kept the selection as it was"
    if not new_text.strip() and selected.strip():
        return "the model produced nothing; keeping the selection"
    return ""


def progress_message(step: Step, width: int = PROGRESS_DRAFT_CHARS) -> str:
    """A command's progress line: the step, the tokens left, and the draft so far on one line
    (its lines joined by " ⏎ ", cut at `width` characters)."""
    head = f"step {step.step}: {step.masked} tokens left"
    draft = " ⏎ ".join(line.strip() for line in step.text.splitlines() if line.strip())
    if len(draft) > width:
        draft = draft[:width - 1] + "…"
    return f"{head} · {draft}" if draft else head


def timeline(uri: str, version: int | None, started: float, job: Any, result: Suggestion, debounce_ms: int) -> str:
    """Where a suggestion's time went, for the debug log: the debounce, the wait for the model
    thread, the engine's round trip (the daemon's socket and queue) and the model's own time
    (forwards and post-processing), of the time since the request reached the session."""
    ms = lambda seconds: seconds * 1000  # noqa: E731
    queued, run = ms(job.started_at - job.submitted_at), ms(job.finished_at - job.started_at)
    return (f"timeline {uri} v{version}: debounce {debounce_ms} ms, queue {max(queued - debounce_ms, 0.0):.1f} ms, "
            f"engine {run:.1f} ms (round trip {max(run - ms(result.seconds), 0.0):.1f} ms, model {ms(result.seconds):.1f} ms "
            f"in {result.forwards} forwards, {1 + len(result.alternatives) if result.text else 0} candidates), "
            f"{ms(time.monotonic() - started):.1f} ms in all")


@dataclasses.dataclass
class Shown:
    """The last suggestion shown in a document, for typed-through reuse."""

    prefix: str  # document text before the cursor
    suffix: str  # document text after the cursor
    text: str
    replace_after: int
    alternatives: tuple[tuple[str, int], ...] = ()  # the other candidates: (text, replace_after)

    def candidates(self) -> list[tuple[str, int]]:
        return [(self.text, self.replace_after), *self.alternatives]


@dataclasses.dataclass
class Target:
    """A command's starting point (offsets into ``text``; ``clipped`` starts at offset ``base``).
    ``doc`` is the LSP layer's document object, carried for its answer; never looked into here."""

    doc: Any
    text: str
    version: int | None
    start: int
    end: int
    settings: Settings
    clipped: str
    base: int

    def request(self, kind: str) -> Request:
        return Request(kind, self.clipped, self.start - self.base, self.end - self.base, self.settings)


class Session:
    """One window: settings, engine, model state, jobs, suggestion cache and counters.

    ``make_engine(choice)`` builds the engine for the setting ``engine`` ("daemon", "local" or a
    cluster URL)."""

    def __init__(self, engine: Engine, make_engine: Callable[[str], Engine]):
        self.settings = Settings()
        self.sched = Scheduler(debounce_s=self.settings.debounce_ms / 1000)
        self.engine = engine
        self.make_engine = make_engine
        self.engine_setting = "daemon"  # the setting `engine` the current engine was chosen for
        self.model_info: ModelInfo | None = None
        self.model_state = "loading"
        self.model_message = "waiting for the client"
        self.ready_message = ""
        self.model_spec: tuple | None = None
        self.load_generation = 0
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.shown: dict[str, Shown] = {}

    # ------------------------------------------------------------ settings and engine

    def use_settings(self, settings: Settings) -> bool:
        """Take ``settings``; True if they differ from the previous ones (the cache is dropped:
        its suggestions were made under the old settings)."""
        changed = settings != self.settings
        self.sched.debounce_s = settings.debounce_ms / 1000
        if settings.engine != self.engine_setting:
            self.switch_engine(settings.engine)
        self.engine.configure(settings)
        if changed:
            self.shown.clear()
        self.settings = settings
        return changed

    def switch_engine(self, choice: str) -> None:
        """The model is loaded again through the engine for ``choice``."""
        old, self.engine = self.engine, self.make_engine(choice)
        self.engine_setting = choice
        self.model_spec = None  # the next load_needed() says yes
        old.close()

    def fall_back_to_local(self) -> None:
        """No daemon to be had: this window holds the model itself."""
        self.engine.close()
        self.engine = LocalEngine()

    # ------------------------------------------------------------ model state

    def load_needed(self) -> tuple[ModelKey, int] | None:
        """(key, generation) when the settings name another model than the last load did."""
        s = self.settings
        spec = (s.model, s.device, s.dtype)
        if spec == self.model_spec:
            return None
        self.model_spec = spec
        self.load_generation += 1
        return ModelKey(*spec), self.load_generation

    def load_failed(self, generation: int) -> bool:
        """Record a failed load; False if a newer load has started meanwhile (nothing to say)."""
        if generation != self.load_generation:
            return False
        self.counters["model_load_failures"] += 1
        self.model_info = None
        return True

    def loaded(self, info: ModelInfo, generation: int) -> bool:
        """Record a finished load; False if the settings changed again while it loaded."""
        if generation != self.load_generation:
            return False
        self.model_info = info
        self.counters["model_loads"] += 1
        self.shown.clear()
        self.ready_message = f"{info.family} model {info.label} on {info.device}"
        return True

    def set_state(self, state: str, message: str) -> None:
        self.model_state, self.model_message = state, message

    # ------------------------------------------------------------ suggestions

    def typed_through(self, uri: str, text: str, cursor: int) -> list[tuple[str, int]] | None:
        """The rest of each shown candidate the user typed a prefix of (or nothing)."""
        shown = self.shown.get(uri)
        if shown is None:
            return None
        n = len(shown.prefix)
        if cursor < n or len(text) - cursor != len(shown.suffix):
            return None
        typed = text[n:cursor]
        rests = [(candidate[len(typed):], tail) for candidate, tail in shown.candidates()
                 if len(typed) < len(candidate) and candidate.startswith(typed)]
        if not rests or not (text.startswith(shown.prefix) and text.endswith(shown.suffix)):
            return None
        self.counters["typed_through_hits" if typed else "repeat_hits"] += 1
        return rests

    def suggests_for(self, language: str | None) -> bool:
        """Whether a document of ``language`` gets suggestions as you type (settings
        ``inlineCompletion`` and ``disabledLanguages``)."""
        return self.settings.inline_completion and (language or "") not in self.settings.disabled_languages

    def forget(self, uri: str) -> None:
        self.shown.pop(uri, None)

    async def suggest(self, uri: str, text: str, cursor: int, version: int | None, *,
                      debounce: bool) -> list[tuple[str, int]] | None:
        """The candidates to show at ``cursor``, each (text, characters after the cursor it
        replaces), the model's first choice first; None when there is nothing to show: from the
        cache when the user typed through the last suggestion, else from the model (setting
        ``candidates``). Raises JobCancelled when superseded."""
        started = time.monotonic()
        reused = self.typed_through(uri, text, cursor)
        if reused is not None:
            log.debug("timeline %s v%s: from the cache (typed through) in %.1f ms", uri, version,
                      (time.monotonic() - started) * 1000)
            return reused
        if self.model_info is None:
            return None
        clipped, base = self.clip(text, cursor, cursor, self.settings)
        request = Request("suggest", clipped, cursor - base, cursor - base, self.settings)
        engine = self.engine
        job = self.sched.submit(uri, lambda token: engine.run(request, token, on_oom_retry=self.count_oom_retry, key=uri),
                                version=version, debounce=debounce)
        result: Suggestion = await job
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", timeline(uri, version, started, job, result, self.settings.debounce_ms if debounce else 0))
        if not self.sched.is_current(uri, version):  # a didChange may have run since the job ended
            raise JobCancelled("superseded: the document changed while the job ran")
        if not result.text:
            return None
        shown = self.shown[uri] = Shown(text[:cursor], text[cursor:], result.text, result.replace_after,
                                        result.alternatives)
        return shown.candidates()

    def clip(self, text: str, start: int, end: int, settings: Settings) -> tuple[str, int]:
        clipped, base = clip(text, start, end, settings)
        if len(clipped) < len(text):
            self.counters["documents_clipped"] += 1
        return clipped, base

    def count_oom_retry(self) -> None:
        self.counters["oom_retries"] += 1  # worker thread; a lost increment would only skew a counter

    # ------------------------------------------------------------ commands

    def target(self, doc: Any, text: str, version: int | None, start: int, end: int) -> Target:
        """What every command starts from: the text now, the range as offsets, the settings of
        this moment, and the text clipped around the range."""
        start, end = min(start, end), max(start, end)
        settings = self.settings
        clipped, base = self.clip(text, start, end, settings)
        return Target(doc, text, version, start, end, settings, clipped, base)

    def submit_command(self, uri: str, target: Target, kind: str, on_step: Callable[[Step], None] | None = None):
        """Run the target as the document's command job of ``kind`` (no debounce; the engine
        retries once with smaller holes after running out of memory)."""
        request, engine, key = target.request(kind), self.engine, f"{uri}#command"
        return self.sched.submit(key, lambda token: engine.run(request, token, on_step, self.count_oom_retry, key=key),
                                 debounce=False, version=target.version)

    def note_version(self, uri: str, version: int | None) -> None:
        """A didOpen/didChange: jobs for older versions of the document are stale (the cache
        stays: typing through a suggestion is a didChange)."""
        self.sched.note_version(uri, version)
        self.sched.note_version(f"{uri}#command", version)

    def closed(self, uri: str) -> None:
        self.sched.forget(uri)
        self.sched.forget(f"{uri}#command")
        self.forget(uri)

    # ------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        return {**self.sched.stats, **self.counters, **self.engine.describe(),
                "model_state": self.model_state, "model_message": self.model_message}

    async def close(self) -> None:
        await self.sched.close(timeout=5)
        self.engine.close()
