"""One editor window's state and the non-protocol part of its work: no pygls, no lsprotocol.

A :class:`Session` holds the window's settings, its engine (and the choice and fallback between
engines), the model's state and its loading, the scheduler of its jobs, the suggestion cache
(typed-through reuse) and the counters behind ``diffu/stats``. The LSP layer (server.py) turns
positions into character offsets, calls in here, and turns the answers back into LSP values; what
the session has to tell the user goes through its :class:`Editor` (which server.py implements).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Protocol

import msgspec

from . import infill, nextedit
from .engine import Engine, LocalEngine
from .errors import PASS_THROUGH, DaemonUnavailable, JobCancelled, first_line
from .job import ModelInfo, ModelKey, Request, Step, Suggestion
from .job_host import trim_heap
from .scheduler import Scheduler
from .settings import Settings

log = logging.getLogger("diffu_lsp.session")

COUNTERS = ("typed_through_hits", "repeat_hits", "model_loads", "model_load_failures", "oom_retries", "oom_failures",
            "daemon_lost", "daemon_stuck", "documents_clipped")
PREEMPTED = "preempted by a suggestion"  # why a next-edit job was cancelled when a suggestion was asked for
PROGRESS_DRAFT_CHARS = 100  # of a command's streamed draft, in one progress line
PROGRESS_INTERVAL_S = 0.25  # a command's drafts reach the editor at most this often: a pace a person can follow
PROGRESS_STARTING = "starting"  # the first progress report, as the command's job is submitted


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


def line_around(text: str, offset: int) -> tuple[int, int]:
    """[start, end) of the line ``offset`` is on, without its line break (LSP's: \\n, \\r\\n, \\r)."""
    start = max(text.rfind("\n", 0, offset), text.rfind("\r", 0, offset)) + 1
    ends = [at for at in (text.find("\n", offset), text.find("\r", offset)) if at >= 0]
    return start, min(ends, default=len(text))
def next_edit_request(text: str, edit: nextedit.Edit, found: list[nextedit.Candidate], settings: Settings
                      ) -> tuple[Request | None, int]:
    """The ``next_edit`` job for ``edit``'s candidates ``found`` (offsets in ``text``) over the text
    clipped around the edit, and the clipped text's offset in ``text``; (None, base) when no
    candidate lies in the clipped text."""
    clipped, base = clip(text, edit.start, edit.end, settings)
    spans = tuple((c.start - base, c.end - base, c.guess, c.prior) for c in found
                  if base <= c.start and c.end <= base + len(clipped))
    if not spans:
        return None, base
    return Request("next_edit", clipped, edit.start - base, edit.end - base, settings, spans=spans), base


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


class DraftPace:
    """Which of a command's steps go to the editor: the first, then at most one every
    ``interval`` seconds, and the last (nothing left to fill). The others are dropped, never held
    back: the final edit follows the last step at once."""

    def __init__(self, interval: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self.last: float | None = None

    def due(self, step: Step) -> bool:
        now = self.clock()
        if self.last is not None and step.masked > 0 and now - self.last < self.interval:
            return False
        self.last = now
        return True


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


class Editor(Protocol):
    """What a session tells its editor (server.py implements it over LSP). ``kind`` of a message:
    "error", "warning" or "info". Called on the event loop."""

    def status(self, state: str, label: str, message: str = "") -> None: ...

    def show(self, message: str, kind: str) -> None: ...

    def log_client(self, message: str) -> None: ...

    async def begin_progress(self, title: str, *, cancellable: bool) -> Any: ...

    def end_progress(self, token: Any, message: str) -> None: ...


class NoEditor:
    """An editor that hears nothing: a session on its own (tests, tools)."""

    def status(self, state: str, label: str, message: str = "") -> None:
        pass

    def show(self, message: str, kind: str) -> None:
        log.info("%s", message)

    def log_client(self, message: str) -> None:
        log.info("%s", message)

    async def begin_progress(self, title: str, *, cancellable: bool) -> None:
        return None

    def end_progress(self, token: Any, message: str) -> None:
        pass


class Session:
    """One window: settings, engine, model state, jobs, suggestion cache and counters.

    ``make_engine(choice)`` builds the engine for the setting ``engine`` ("daemon", "local" or a
    cluster URL); by default :func:`engine_for`. ``engine``: the first one (default: the daemon's)."""

    def __init__(self, engine: Engine | None = None, make_engine: Callable[[str], Engine] | None = None,
                 editor: Editor | None = None):
        self.editor: Editor = editor or NoEditor()
        self.settings = Settings()
        # after_job: the in-process model's jobs free much of the heap (job_host.trim_heap)
        self.sched = Scheduler(debounce_s=self.settings.debounce_ms / 1000, after_job=trim_heap)
        self.make_engine = make_engine or (lambda choice: engine_for(self, choice))
        self.engine = engine if engine is not None else self.make_engine("daemon")
        self.engine_setting = "daemon"  # the setting `engine` the current engine was chosen for
        self.model_info: ModelInfo | None = None
        self.model_state = "loading"
        self.model_message = "waiting for the client"
        self.ready_message = ""
        self.model_spec: tuple | None = None
        self.load_generation = 0
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.shown: dict[str, Shown] = {}
        self.started = False  # every settings layer is in: settings changes are told, models loaded
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop, for the engines' threads
        self.load_lock = threading.Lock()  # one load at a time
        self.tasks: set[asyncio.Task] = set()
        self.next_edits = nextedit.Tracker()  # each document's next-edit predictions

    # ------------------------------------------------------------ settings and engine

    def apply_settings(self, settings: Settings) -> None:
        """Take the resolved settings: the log level, the engine; once started, a line about what
        changed and the model they name."""
        old = msgspec.to_builtins(self.settings)
        logging.getLogger("diffu_lsp").setLevel(settings.log_level.upper())
        if self.use_settings(settings):
            new = msgspec.to_builtins(settings)
            log.info("settings: %s", msgspec.json.encode(settings).decode())
            if self.started:
                keys = ", ".join(f"{k}={new[k]!r}" for k in new if new[k] != old.get(k))
                self.editor.log_client(f"diffu-lsp: settings changed: {keys}")
        if self.started:
            self.ensure_model()

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

    def status(self, state: str, label: str, message: str = "") -> None:
        """The model's state, kept here and told to the editor."""
        self.set_state(state, message)
        self.editor.status(state, label, message)

    def ensure_model(self) -> None:
        """Load the model the settings name, unless it is the one loaded (or loading)."""
        load = self.load_needed()
        if load is not None:
            self.spawn(load_model(self, *load))

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def on_loop(self, fn: Callable[..., None], *args) -> bool:
        """Run ``fn(*args)`` on the event loop, from any thread; False when there is none (yet, or
        any more: the server is exiting)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except (AttributeError, RuntimeError):
            return False
        return True

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
        self.sched.cancel_below(0, PREEMPTED)  # a next-edit prediction (of any document) never delays a suggestion
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

    async def predict_next_edits(self, uri: str, text: str, version: int | None, *, again: bool = False
                                 ) -> list[nextedit.Prediction] | None:
        """After an edit settled (``again``: after a rejection, the last edit once more): the
        predictions it adds, denoised in one job at the lowest priority (``{uri}#next``, superseded
        by the next keystroke); None when there was nothing to predict."""
        tracker, settings = self.next_edits, self.settings
        settled = tracker.documents[uri].settled if uri in tracker.documents else text
        edit = tracker.settle(uri, text)
        if again:
            edit = tracker.last_edit(uri, text)
        if edit is None or self.model_info is None or settings.next_edit == "off":
            return None
        request, base = next_edit_request(text, edit, tracker.candidates(uri, text, edit), settings)
        if request is None:
            return None
        engine, key = self.engine, f"{uri}#next"
        job = self.sched.submit(key, lambda token: engine.run(request, token, on_oom_retry=self.count_oom_retry, key=key),
                                debounce=False, version=version, priority=-1)
        try:
            replacements = await job
        except JobCancelled as cancelled:
            if cancelled.reason == PREEMPTED and uri in tracker.documents:
                tracker.documents[uri].settled = settled  # the same edit is predicted again later
            raise
        if not self.sched.is_current(key, version):
            raise JobCancelled("superseded: the document changed while the job ran")
        new = [nextedit.Prediction(base + r.start, base + r.end, text[base + r.start:base + r.end], r.text)
               for r in replacements]
        new.sort(key=lambda p: min(abs(p.start - edit.end), abs(edit.start - p.end)))
        return tracker.put(uri, text, new[:nextedit.MAX_PREDICTIONS])

    def clip(self, text: str, start: int, end: int, settings: Settings) -> tuple[str, int]:
        clipped, base = clip(text, start, end, settings)
        if len(clipped) < len(text):
            self.counters["documents_clipped"] += 1
        return clipped, base

    def count_oom_retry(self) -> None:
        self.counters["oom_retries"] += 1  # worker thread; a lost increment would only skew a counter

    # ------------------------------------------------------------ commands

    def target(self, doc: Any, text: str, version: int | None, start: int, end: int, *,
               empty_is_line: bool = False) -> Target:
        """What every command starts from: the text now, the range as offsets, the settings of
        this moment, and the text clipped around the range. ``empty_is_line`` (refine): an empty
        range is the line it is on, without its line break."""
        start, end = min(start, end), max(start, end)
        if empty_is_line and start == end:
            start, end = line_around(text, start)
        settings = self.settings
        clipped, base = self.clip(text, start, end, settings)
        return Target(doc, text, version, start, end, settings, clipped, base)

    def submit_command(self, uri: str, target: Target, kind: str, on_step: Callable[[Step], None] | None = None):
        """Run the target as the document's command job of ``kind`` (no debounce; the engine
        retries once with smaller holes after running out of memory). Its steps go to ``on_step``
        at a pace a person can follow (:class:`DraftPace`); what ``on_step`` returns is dropped (a
        true value would tell the sampler to stop and fill the rest at once)."""
        request, engine, key = target.request(kind), self.engine, f"{uri}#command"
        if on_step is not None:
            pace, report = DraftPace(), on_step

            def on_step(step: Step) -> None:
                if pace.due(step):
                    report(step)
        return self.sched.submit(key, lambda token: engine.run(request, token, on_step, self.count_oom_retry, key=key),
                                 debounce=False, version=target.version)

    def note_version(self, uri: str, version: int | None) -> None:
        """A didOpen/didChange: jobs for older versions of the document are stale (the cache
        stays: typing through a suggestion is a didChange)."""
        self.sched.note_version(uri, version)
        self.sched.note_version(f"{uri}#command", version)
        self.sched.note_version(f"{uri}#next", version)

    def closed(self, uri: str) -> None:
        self.sched.forget(uri)
        self.sched.forget(f"{uri}#command")
        self.sched.forget(f"{uri}#next")
        self.forget(uri)
        self.next_edits.forget(uri)

    # ------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        return {**self.sched.stats, **self.counters, **self.engine.describe(),
                "model_state": self.model_state, "model_message": self.model_message}

    async def close(self) -> None:
        await self.sched.close(timeout=5)
        self.engine.close()


# ------------------------------------------------------------------ engines and model loading

def engine_for(session: Session, choice: str) -> Engine:
    """The engine for the setting ``engine`` ("daemon", "local" or a cluster URL), wired to tell
    ``session``'s editor when the daemon is lost, stuck or back."""
    from .daemon.client import DaemonEngine

    def lost(reason: str, stopped: bool) -> None:  # on the client's reader thread, once per connection
        def tell() -> None:
            if stopped:  # on purpose: it stays stopped until a request needs it
                session.editor.show(f"diffu-lsp: the model daemon was stopped ({reason}); the next request starts "
                                    "it again", "info")
                return
            session.counters["daemon_lost"] += 1
            session.editor.show(f"diffu-lsp: the model daemon stopped ({reason}); pending requests were answered "
                                "empty; reconnecting (to its standby, else a new daemon) and loading the model", "warning")
        session.on_loop(tell)

    def state(state: str, message: str) -> None:
        """The daemon stopped answering (``stuck``), is being replaced (``restarting``) or answers
        again (``ready``); on a worker thread. ``stuck`` is told once per episode."""
        def tell() -> None:
            if session.model_info is None:
                return  # still loading: load_model reports how that ends
            label = session.model_info.label
            if state == "ready":
                session.status("ready", label, session.ready_message)
                return
            session.status(state, label, message)
            if state == "stuck":
                session.counters["daemon_stuck"] += 1
                session.editor.show(f"diffu-lsp: the model daemon is not responding ({message})", "warning")
        session.on_loop(tell)

    def warn(message: str) -> None:
        if not session.on_loop(session.editor.show, message, "warning"):
            log.warning("%s", message)

    def daemon() -> DaemonEngine:
        return DaemonEngine(on_lost=lost, on_state=state)

    if choice == "local":
        return LocalEngine()
    if choice == "daemon":
        return daemon()
    from .cluster.client import ClusterEngine

    return ClusterEngine(choice, on_message=warn, fallback=daemon)


async def load_model(session: Session, key: ModelKey, generation: int) -> None:
    """Load ``key`` through the session's engine (the daemon unavailable: in this window instead),
    under a progress, telling the editor how it went; nothing when the settings changed meanwhile."""
    editor, label = session.editor, key.label
    session.status("loading", label, f"loading {label} ({key.device}, {key.dtype})")
    token = await editor.begin_progress(f"Loading model {label}", cancellable=False)
    loop = asyncio.get_running_loop()
    try:
        try:
            info = await _in_daemon_thread(loop, session.load_lock, session.engine.load, key)
        except DaemonUnavailable as error:  # no daemon to be had: this window holds the model itself
            editor.show(f"diffu-lsp: the model daemon is unavailable ({error}); loading the model in this "
                        "window instead", "warning")
            session.fall_back_to_local()
            info = await _in_daemon_thread(loop, session.load_lock, session.engine.load, key)
    except PASS_THROUGH:
        raise
    except BaseException as error:  # noqa: BLE001 - ModelLoadFailed (local, daemon, cluster), anything else
        reason = first_line(error)
        editor.end_progress(token, "failed")
        if not session.load_failed(generation):
            return
        session.status("error", label, reason)
        editor.show(f"diffu-lsp could not load the model {label}: {reason}", "error")
        return
    editor.end_progress(token, "ready")
    if not session.loaded(info, generation):
        return  # the settings changed again while this one loaded
    message = session.ready_message
    session.status("ready", label, message)
    where = f" in the {session.engine.name}" if session.engine.name != "in-process" else ""
    if info.shared:
        editor.log_client(f"diffu-lsp: using {message}, already loaded{where}")
    else:
        editor.log_client(f"diffu-lsp: loaded {message}{where} in {info.load_seconds:.1f} s")
    if info.evicted:
        editor.show(f"diffu-lsp: the model daemon unloaded {', '.join(info.evicted)} to stay within its "
                    "memory budget (setting daemonMemoryMb)", "info")


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, lock: threading.Lock, fn, *args) -> asyncio.Future:
    """``fn(*args)`` on a daemon thread (holding ``lock``): unlike an executor's threads, a
    model still loading does not keep the process alive after ``exit``."""
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        result = error = None
        try:
            with lock:
                result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name="diffu-load", daemon=True).start()
    return future
