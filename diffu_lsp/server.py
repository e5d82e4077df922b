"""The language server: LSP messages <-> the window's session. This module only speaks LSP.

- :class:`DiffuServer`: pygls's server over one :class:`~diffu_lsp.session.Session`, whose settings
  come from a :class:`~diffu_lsp.configuration.Configuration`; it is the session's ``Editor``
  (status, messages, progress as LSP) and holds the open documents and the edits sent back.
- Handlers (bottom): module-level functions of a few lines, registered by :func:`create_server`;
  the work behind them is in plain functions (:func:`suggest_at`, the commands) that turn LSP
  positions into character offsets, call the session, and turn its answers back into LSP.
- :func:`guarded`: the one place where an error becomes an answer (and a message).
- pygls's private state is reached only from :mod:`diffu_lsp.pygls_adapter`.

The features (``diffu_lsp.features``) and the model (``diffu_lsp.models``) are imported lazily,
off the event loop, so ``initialize`` is answered before torch is even imported; this module never
uses torch itself.

Custom messages: notification ``diffu/status`` ``{"state": "loading"|"ready"|"error",
"model", "message"}``; request ``diffu/stats`` (scheduler counters, reuse hits, model loads,
effective settings, the last job records); notification ``diffu/workspaceTrust``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import os
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote

import msgspec
from lsprotocol import types as lsp
from pygls.capabilities import get_capability
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.protocol import default_converter
from pygls.uris import to_fs_path
from pygls.workspace import TextDocument

from . import __version__, nextedit_lsp
from .configuration import SECTION, Configuration
from .documents import model_text, offset_at, position_at
from .engine import LocalEngine
from .errors import EXITS, PASS_THROUGH, EngineLost, JobCancelled, is_out_of_memory
from .job import Step
from .pygls_adapter import (COMMAND_PROGRESS_TOKEN, BoundedInput, DiffuProtocol, answer_parse_error, pending_handlers,
                            use_lsp_line_breaks)
from .session import PROGRESS_STARTING, Session, Target, find_holes, progress_message, refine_verdict
from .settings import Settings  # noqa: F401 - importable from here (tests use server.Settings)

log = logging.getLogger("diffu_lsp.server")

CMD_COMPLETE_BLOCK = "diffu.completeBlock"
CMD_FILL_HOLES = "diffu.fillHoles"
CMD_REFINE = "diffu.refineSelection"
KIND_REFINE = "refactor.rewrite.diffu.refine"
KIND_FILL_HOLES = "refactor.rewrite.diffu.fillHoles"
KIND_COMPLETE_BLOCK = "refactor.rewrite.diffu.completeBlock"
STATUS = "diffu/status"
STATS = "diffu/stats"
WORKSPACE_TRUST = "diffu/workspaceTrust"  # the editor's trust changed: {"workspaceTrusted": true | SHA-256 | false}

CONVERTER = default_converter()  # what pygls structures messages with: command arguments the same way


# ------------------------------------------------------------------ the server: the window as LSP sees it

MESSAGE_TYPES = {"error": lsp.MessageType.Error, "warning": lsp.MessageType.Warning, "info": lsp.MessageType.Info}
# what a message to the user is in the server's log: an info is no warning (Neovim files every
# stderr line as [ERROR], and the server writes only warnings and errors there by default)
LOG_LEVELS = {lsp.MessageType.Error: logging.ERROR, lsp.MessageType.Warning: logging.WARNING}


def to_plain(value: Any) -> Any:
    """Command arguments and settings may arrive as dicts or as pygls's namedtuples."""
    if hasattr(value, "_asdict"):
        value = value._asdict()
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


class DiffuServer(LanguageServer):
    """pygls's server over one window's :class:`Session` (its settings from a :class:`Configuration`),
    and the session's :class:`~diffu_lsp.session.Editor`: what it tells the user, as LSP."""

    def __init__(self, *, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 daemon: bool = True):
        # pygls's thread pool only reads stdin (no handler runs on it: the model has its own
        # threads). One worker: with more, each readline may start a new thread while the last
        # one is still going idle, so the pool grows to its default of cpu+4 threads.
        super().__init__("diffu-lsp", __version__, protocol_cls=DiffuProtocol, max_workers=1,
                         text_document_sync_kind=lsp.TextDocumentSyncKind.Incremental)
        self.session = Session(None if daemon else LocalEngine(), editor=self)
        self.config = Configuration(warn=lambda message: self.show(message, "warning"),
                                    cli={"model": model, "device": device, "dtype": dtype},
                                    on_change=self.session.apply_settings)
        self.init_options: Any = None

    def report_server_error(self, error: Exception, source) -> None:
        if not answer_parse_error(self, error):
            super().report_server_error(error, source)

    # ------------------------------------------------------------ what the session tells the user

    def status(self, state: str, label: str, message: str = "") -> None:
        self.protocol.notify(STATUS, {"state": state, "model": label, "message": message})

    def log_client(self, message: str, kind: lsp.MessageType | str = lsp.MessageType.Info) -> None:
        kind = MESSAGE_TYPES.get(kind, kind)
        log.log(LOG_LEVELS.get(kind, logging.INFO), "%s", message)
        self.window_log_message(lsp.LogMessageParams(type=kind, message=message))

    def show(self, message: str, kind: lsp.MessageType | str) -> None:
        kind = MESSAGE_TYPES.get(kind, kind)
        log.log(LOG_LEVELS.get(kind, logging.INFO), "%s", message)
        self.window_show_message(lsp.ShowMessageParams(type=kind, message=message))

    async def begin_progress(self, title: str, *, cancellable: bool, client_token: int | str | None = None
                             ) -> int | str | None:
        """A progress token: the client's own (``client_token``, the request's workDoneToken),
        else one this server creates if the client supports that."""
        if client_token is not None:
            token = client_token
        elif not self.client_has("window.work_done_progress"):
            return None
        else:
            token = f"diffu-{uuid.uuid4().hex[:12]}"
            try:
                await asyncio.wait_for(self.work_done_progress.create_async(token), 10)
            except Exception as error:  # noqa: BLE001
                log.info("work done progress refused: %r", error)
                return None
        self.work_done_progress.begin(token, lsp.WorkDoneProgressBegin(
            title=title, cancellable=cancellable, percentage=0))
        return token

    def report_progress(self, token: str | None, message: str, percentage: int | None = None) -> None:
        if token is not None and token in self.work_done_progress.tokens:
            self.work_done_progress.report(token, lsp.WorkDoneProgressReport(message=message, percentage=percentage))

    def end_progress(self, token: str | None, message: str) -> None:
        if token is not None:
            self.work_done_progress.tokens.pop(token, None)  # pygls keeps them (openlawlibrary/pygls#607)
            self.work_done_progress.end(token, lsp.WorkDoneProgressEnd(message=message))

    def client_has(self, path: str) -> bool:
        try:
            return bool(get_capability(self.client_capabilities, path, False))
        except Exception:  # noqa: BLE001 - no capabilities before initialize
            return False

    # ------------------------------------------------------------ documents and edits

    def document(self, uri: str) -> TextDocument | None:
        """The open document, or None (unknown URIs are not read from disk)."""
        try:
            return self.workspace.text_documents.get(unquote(uri))
        except RuntimeError:  # before initialize
            return None

    def snapshot(self, uri: str) -> tuple[TextDocument, str] | None:
        """(document, text) if the document is open and is text (no NUL bytes)."""
        doc = self.document(uri)
        if doc is None:
            log.info("request for unknown document %s", uri)
            return None
        text = model_text(doc.source)
        if text is None:
            log.info("binary content in %s; not completing", uri)
            return None
        return doc, text

    async def apply_edits(self, uri: str, doc: TextDocument, version: int | None,
                          replacements: list[tuple[int, int, str]], label: str) -> bool:
        """Send one workspace/applyEdit for ``replacements`` (offsets into the document at
        ``version``); False if the document moved on meanwhile or the client refused."""
        if not replacements:
            return False
        if self.document(uri) is not doc or doc.version != version:
            self.show(f"diffu-lsp: {label}: the document changed while the model worked; nothing was applied "
                      "(run it again)", "info")
            return False
        positions = position_at(doc, [o for start, end, _ in replacements for o in (start, end)])
        edits = [lsp.TextEdit(range=lsp.Range(start=positions[2 * i], end=positions[2 * i + 1]), new_text=new)
                 for i, (_, _, new) in enumerate(replacements)]
        if self.client_has("workspace.workspace_edit.document_changes"):
            edit = lsp.WorkspaceEdit(document_changes=[lsp.TextDocumentEdit(
                text_document=lsp.OptionalVersionedTextDocumentIdentifier(uri=uri, version=version), edits=edits)])
        else:
            edit = lsp.WorkspaceEdit(changes={uri: edits})
        result = await self.workspace_apply_edit_async(lsp.ApplyWorkspaceEditParams(edit=edit, label=label))
        applied = bool(getattr(result, "applied", False))
        if not applied:
            self.show(f"diffu-lsp: {label}: the editor did not apply the edit "
                      f"({getattr(result, 'failure_reason', None) or 'no reason given'})", "warning")
        return applied

    # ------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        """After ``initialized``: settings from every layer, then the model, then the file watcher."""
        self.session.loop = asyncio.get_running_loop()
        self.config.start(to_plain(self.init_options))
        await self.pull_configuration()
        self.session.started = True
        self.session.ensure_model()
        self.session.spawn(self.config.watch())

    async def pull_configuration(self) -> None:
        if not self.client_has("workspace.configuration"):
            return
        try:
            result = await asyncio.wait_for(self.workspace_configuration_async(
                lsp.ConfigurationParams(items=[lsp.ConfigurationItem(section=SECTION)])), 10)
        except Exception as error:  # noqa: BLE001
            log.warning("workspace/configuration failed: %r", error)
            return
        value = to_plain(result[0]) if result else None
        self.config.update("configuration", value, f"workspace/configuration section {SECTION!r}")

    def workspace_root(self) -> Path | None:
        try:
            root = self.workspace.root_path
            if root is None and self.workspace.folders:
                root = to_fs_path(next(iter(self.workspace.folders.values())).uri)
        except RuntimeError:
            return None
        return Path(root) if root else None

    async def stop(self) -> None:
        self.config.stop()
        await self.session.close()

    def stats(self) -> dict[str, Any]:
        return {
            **self.session.stats(),
            "settings": msgspec.to_builtins(self.session.settings),
            "records": [dataclasses.asdict(r) for r in list(self.session.sched.records)[-50:]],
            "handlers_pending": pending_handlers(self),  # requests and notifications not finished
            "threads": sorted(thread.name for thread in threading.enumerate()),
        }


# ------------------------------------------------------------------ the work behind the handlers: LSP <-> session

@dataclasses.dataclass
class PlacedSuggestion:
    """A suggestion as the client places it."""

    text: str
    start: lsp.Position
    end: lsp.Position


async def suggest_at(ls: DiffuServer, uri: str, position: lsp.Position, *, debounce: bool
                     ) -> list[PlacedSuggestion] | None:
    snap = ls.snapshot(uri)
    if snap is None:
        return None
    doc, text = snap
    if not ls.session.suggests_for(doc.language_id):
        return None
    at = offset_at(doc, position)
    if at is None:
        log.info("position %s is past the end of %s", position, uri)
        return None
    cursor, pos = at
    candidates = await ls.session.suggest(uri, text, cursor, doc.version, debounce=debounce)
    if candidates is None:
        return None
    units = doc.position_codec.client_num_units
    return [PlacedSuggestion(suggestion, pos, lsp.Position(line=pos.line, character=pos.character + units(
        text[cursor:cursor + replace_after]))) for suggestion, replace_after in candidates]


def command_argument(args: tuple, key: str) -> tuple[str, Any]:
    """(uri, Position or Range) from ``[{"textDocument": {"uri"}, key: {...}}]``."""
    try:
        (arg,) = args
        arg = to_plain(arg)
        uri = arg["textDocument"]["uri"]
        if not isinstance(uri, str):
            raise TypeError("textDocument.uri must be a string")
        target = CONVERTER.structure(arg[key], lsp.Range if key == "range" else lsp.Position)
    except Exception as error:  # noqa: BLE001
        raise JsonRpcInvalidParams(
            f'expected [{{"textDocument": {{"uri": ...}}, "{key}": ...}}]: {type(error).__name__}: {error}') from None
    return uri, target


def command_target(ls: DiffuServer, uri: str, label: str, start: lsp.Position, end: lsp.Position, *,
                   empty_is_line: bool = False) -> Target | None:
    """What every command starts from (see Session.target), or None (told why)."""
    session = ls.session
    if session.model_info is None:
        ls.show(f"diffu-lsp: {label}: the model is not ready ({session.model_state}: {session.model_message})", "info")
        return None
    snap = ls.snapshot(uri)
    if snap is None:
        ls.show(f"diffu-lsp: {label}: the document is not open in the server, or is not text", "info")
        return None
    doc, text = snap
    first, last = offset_at(doc, start, end_of_range=start != end), offset_at(doc, end, end_of_range=True)
    if first is None:
        ls.show(f"diffu-lsp: {label}: line {start.line + 1} is past the end of the document", "info")
        return None
    (start_offset, _), (end_offset, _) = first, last
    return session.target(doc, text, doc.version, start_offset, end_offset, empty_is_line=empty_is_line)


async def command_job(ls: DiffuServer, title: str, uri: str, target: Target, kind: str):
    """The command's job, under a cancellable progress (the client's workDoneToken when it sent
    one) that streams the draft as it firms up; the final edit then replaces it."""
    loop = asyncio.get_running_loop()
    token = await ls.begin_progress(title, cancellable=True, client_token=COMMAND_PROGRESS_TOKEN.get())
    first_masked = None

    def report(step: Step) -> None:
        nonlocal first_masked
        if first_masked is None:
            first_masked = step.masked + 1
        done = first_masked - step.masked
        ls.report_progress(token, progress_message(step), int(100 * done / max(first_masked, 1)))

    job = ls.session.submit_command(uri, target, kind, lambda step: loop.call_soon_threadsafe(report, step))
    ls.report_progress(token, PROGRESS_STARTING, 0)
    cancelled_by_client = ls.work_done_progress.tokens.get(token) if token is not None else None
    if cancelled_by_client is not None:
        cancelled_by_client.add_done_callback(lambda f: f.cancelled() and job.cancel("cancelled from the progress UI"))
    outcome = "failed"
    try:
        answer = await job
        outcome = "done"
    except JobCancelled as error:
        outcome = f"cancelled ({error.reason})"
        raise
    except asyncio.CancelledError:
        outcome = "cancelled (the request was cancelled)"
        raise
    finally:
        ls.end_progress(token, outcome)
    return answer


async def complete_block(ls: DiffuServer, uri: str, position: lsp.Position) -> bool:
    target = command_target(ls, uri, "complete block", position, position)
    if target is None:
        return False
    result = await command_job(ls, "Completing block", uri, target, "block")
    if not result.text:
        ls.show("diffu-lsp: complete block: the model produced nothing; nothing was changed", "info")
        return False
    cursor = target.start
    return await ls.apply_edits(uri, target.doc, target.version,
                                [(cursor, cursor + result.replace_after, result.text)], "diffu: complete block")


async def fill_holes(ls: DiffuServer, uri: str, rng: lsp.Range) -> bool:
    target = command_target(ls, uri, "fill holes", rng.start, rng.end)
    if target is None:
        return False
    holes = find_holes(target.text, target.start, target.end, target.settings)
    if not holes:
        markers = ", ".join(repr(m) for m in target.settings.hole_markers)
        where = "in the selection" if target.start != target.end else "in the enclosing def/class"
        ls.show(f"diffu-lsp: fill holes: no hole marker {where}. Markers (setting holeMarkers): {markers}; "
                "'...' counts only as a whole statement, not inside an expression", "info")
        return False
    replacements = await command_job(ls, "Filling holes", uri, target, "fill_holes")
    if not replacements:
        ls.show(f"diffu-lsp: fill holes: the model produced nothing for the {len(holes)} hole(s) found; "
                "nothing was changed", "info")
        return False
    base = target.base
    return await ls.apply_edits(uri, target.doc, target.version,
                                [(base + r.start, base + r.end, r.text) for r in replacements], "diffu: fill holes")


async def refine_selection(ls: DiffuServer, uri: str, rng: lsp.Range) -> bool:
    """Refine the selection; an empty one is the line it is on (for every editor alike)."""
    target = command_target(ls, uri, "refine", rng.start, rng.end, empty_is_line=True)
    if target is None:
        return False
    if target.start == target.end:
        ls.show("diffu-lsp: refine: the line is empty; nothing to refine", "info")
        return False
    new_text = await command_job(ls, "Refining selection", uri, target, "refine")
    verdict = refine_verdict(target.text[target.start:target.end], new_text)
    if verdict:
        ls.show(f"diffu-lsp: refine: {verdict}", "info")
        return False
    return await ls.apply_edits(uri, target.doc, target.version, [(target.start, target.end, new_text)],
                                "diffu: refine selection")


# ------------------------------------------------------------------ handlers

_EMPTY = object()


def guarded(empty: Any = None, *, user_facing: bool = False, superseded: Any = _EMPTY):
    """An exception never escapes a handler: log it, tell the user if it is worth it, answer
    ``empty`` (a value, or a factory). That holds for any ``BaseException`` but interpreter exit
    (errors.PASS_THROUGH), e.g. the tokenizers library's PanicException. Superseded jobs answer
    ``superseded`` where given, else ``empty`` (a lost engine is a failure, not a newer request);
    protocol errors and $/cancelRequest pass through. ``user_facing`` (commands): failures are
    shown, not just logged."""

    def answer_empty():
        return empty() if callable(empty) else empty

    def failed(ls: DiffuServer, name: str, error: BaseException):
        if is_out_of_memory(error):
            ls.session.counters["oom_failures"] += 1
            ls.show("diffu-lsp: out of memory even with a smaller hole; try a smaller model, "
                    "dtype, or context (prefixTokens/suffixTokens)", "error")
            return answer_empty()
        log.exception("%s failed", name)
        message = f"diffu-lsp: {name} failed: {type(error).__name__}: {error}"
        if user_facing:
            ls.show(message, "error")
        else:
            ls.log_client(message, "error")
        return answer_empty()

    def decorate(fn):
        if asyncio.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def handler(ls: DiffuServer, *args):
                try:
                    return await fn(ls, *args)
                except (JsonRpcException, *PASS_THROUGH):
                    raise
                except JobCancelled as cancelled:
                    log.debug("%s: %s", fn.__name__, cancelled.reason)
                    if superseded is not _EMPTY and not isinstance(cancelled, EngineLost):
                        return superseded
                    return answer_empty()
                except BaseException as error:  # noqa: BLE001 - e.g. tokenizers' PanicException: still answered
                    return failed(ls, fn.__name__, error)
        else:
            @functools.wraps(fn)
            def handler(ls: DiffuServer, *args):
                try:
                    return fn(ls, *args)
                except (JsonRpcException, *EXITS):
                    raise
                except BaseException as error:  # noqa: BLE001
                    return failed(ls, fn.__name__, error)

        return handler  # functools.wraps keeps fn's signature: pygls sees "ls" first

    return decorate


def _command(method, key: str):
    """The handler of a command whose one argument is ``{"textDocument": ..., key: ...}``."""
    async def handler(ls: DiffuServer, *args):
        uri, target = command_argument(args, key)
        return {"applied": await method(ls, uri, target)}

    handler.__name__ = handler.__qualname__ = method.__name__  # for the guard's messages
    return handler


def _only(context: lsp.CodeActionContext, kind: str) -> bool:
    if not context.only:
        return True
    return any(kind == want or kind.startswith(f"{want}.") for want in context.only)


# ------------------------------------------------------------------ handlers: each a few lines over the session

FEATURES: list[tuple[str, Any, Callable]] = []  # (method, options, handler), registered by create_server


def feature(method: str, options: Any = None):
    def register(handler):
        FEATURES.append((method, options, handler))
        return handler
    return register


@feature(lsp.INITIALIZE)
def initialize(ls: DiffuServer, params: lsp.InitializeParams):
    use_lsp_line_breaks(ls)  # before any document exists
    ls.init_options = params.initialization_options
    ls.config.root = ls.workspace_root()


@feature(lsp.INITIALIZED)
async def initialized(ls: DiffuServer, params: lsp.InitializedParams):
    try:
        await ls.startup()
    except Exception:  # noqa: BLE001
        log.exception("start-up failed")
        ls.session.started = True
        ls.session.ensure_model()


@feature(lsp.SHUTDOWN)
async def shutdown(ls: DiffuServer, params):
    await ls.stop()


@feature(lsp.TEXT_DOCUMENT_DID_OPEN)
@guarded(None)
def did_open(ls: DiffuServer, params: lsp.DidOpenTextDocumentParams):
    uri, version = params.text_document.uri, params.text_document.version
    ls.session.note_version(uri, version)
    ls.session.forget(uri)
    nextedit_lsp.opened(ls, uri)


@feature(lsp.TEXT_DOCUMENT_DID_CHANGE)
@guarded(None)
def did_change(ls: DiffuServer, params: lsp.DidChangeTextDocumentParams):
    uri, version = params.text_document.uri, params.text_document.version
    ls.session.note_version(uri, version)
    nextedit_lsp.changed(ls, uri)


@feature(lsp.TEXT_DOCUMENT_DID_CLOSE)
@guarded(None)
def did_close(ls: DiffuServer, params: lsp.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    nextedit_lsp.closed(ls, uri)
    ls.session.closed(uri)


@feature(lsp.WORKSPACE_DID_CHANGE_CONFIGURATION)
@guarded(None)
async def did_change_configuration(ls: DiffuServer, params: lsp.DidChangeConfigurationParams):
    if ls.client_has("workspace.configuration"):
        await ls.pull_configuration()
    else:
        ls.config.pushed(to_plain(params.settings))


@feature(WORKSPACE_TRUST)
@guarded(None)
def workspace_trust(ls: DiffuServer, params: Any):
    """The editor's workspace trust changed (Neovim: :trust on the workspace's diffu-lsp.toml):
    decide the workspace file's trust again."""
    params = to_plain(params)
    ls.config.set_editor_trust(params.get("workspaceTrusted") if isinstance(params, Mapping) else None)
    ls.config.reload()


def nothing_here() -> lsp.InlineCompletionList:
    """No suggestion here: an empty list, so that a client drops the ghost text it shows (Neovim
    0.12 keeps it on null). Null answers a superseded request: the newer one's answer replaces it."""
    return lsp.InlineCompletionList(items=[])


@feature(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.InlineCompletionOptions())
@guarded(nothing_here, superseded=None)
async def inline_completion(ls: DiffuServer, params: lsp.InlineCompletionParams):
    explicit = params.context.trigger_kind == lsp.InlineCompletionTriggerKind.Invoked
    answers = await suggest_at(ls, params.text_document.uri, params.position, debounce=not explicit)
    if answers is None:
        return nothing_here()
    return lsp.InlineCompletionList(items=[lsp.InlineCompletionItem(
        insert_text=answer.text, range=lsp.Range(start=answer.start, end=answer.end)) for answer in answers])


@feature(lsp.TEXT_DOCUMENT_COMPLETION, lsp.CompletionOptions())
@guarded(None)
async def completion(ls: DiffuServer, params: lsp.CompletionParams):
    explicit = params.context is not None and params.context.trigger_kind == lsp.CompletionTriggerKind.Invoked
    answers = await suggest_at(ls, params.text_document.uri, params.position, debounce=not explicit)
    if answers is None:
        return None
    answer = answers[0]
    first = next((line.strip() for line in answer.text.splitlines() if line.strip()), answer.text.strip())
    doc = ls.document(params.text_document.uri)
    language = (doc.language_id if doc is not None else None) or ""
    item = lsp.CompletionItem(
        label=f"⟡ diffu: {first[:60]}", kind=lsp.CompletionItemKind.Snippet, detail="diffusion model",
        documentation=lsp.MarkupContent(kind=lsp.MarkupKind.Markdown,
                                        value=f"```{language}\n{answer.text}\n```"),
        sort_text="0", filter_text=answer.text, insert_text_format=lsp.InsertTextFormat.PlainText,
        text_edit=lsp.TextEdit(range=lsp.Range(start=answer.start, end=answer.end), new_text=answer.text))
    return lsp.CompletionList(is_incomplete=True, items=[item])


@feature(lsp.TEXT_DOCUMENT_CODE_ACTION, lsp.CodeActionOptions(
    code_action_kinds=[KIND_REFINE, KIND_FILL_HOLES, KIND_COMPLETE_BLOCK, lsp.CodeActionKind.QuickFix]))
@guarded(list)
async def code_action(ls: DiffuServer, params: lsp.CodeActionParams):
    uri = params.text_document.uri
    snap = ls.snapshot(uri)
    if snap is None:
        return []
    doc, text = snap
    first = offset_at(doc, params.range.start)
    if first is None:
        return []
    (start, start_pos), (end, end_pos) = first, offset_at(doc, params.range.end, end_of_range=True)
    if start > end:
        (start, start_pos), (end, end_pos) = (end, end_pos), (start, start_pos)
    document = {"uri": uri}
    as_json = lambda p: {"line": p.line, "character": p.character}  # noqa: E731
    selection = {"start": as_json(start_pos), "end": as_json(end_pos)}
    actions = []

    def offer(kind: str, title: str, command: str, arg: dict) -> None:
        if _only(params.context, kind):
            actions.append(lsp.CodeAction(title=title, kind=kind, command=lsp.Command(
                title=title, command=command, arguments=[{"textDocument": document, **arg}])))

    if start < end:
        offer(KIND_REFINE, "Diffu: Refine selection", CMD_REFINE, {"range": selection})
    if _only(params.context, KIND_FILL_HOLES) and find_holes(text, start, end, ls.session.settings):
        offer(KIND_FILL_HOLES, "Diffu: Fill holes", CMD_FILL_HOLES, {"range": selection})
    offer(KIND_COMPLETE_BLOCK, "Diffu: Complete block", CMD_COMPLETE_BLOCK,
          {"position": as_json(start_pos)})
    if _only(params.context, lsp.CodeActionKind.QuickFix):
        actions[:0] = nextedit_lsp.quick_fixes(ls, uri, start, end)
    return actions


@feature(STATS)
@guarded(None)
def stats(ls: DiffuServer, params):
    return ls.stats()


async def next_edit(ls: DiffuServer, *args):
    return await nextedit_lsp.next_edit_command(ls, *command_argument(args, "position"))


async def reject_next_edit(ls: DiffuServer, *args):
    return await nextedit_lsp.reject_command(ls, *command_argument(args, "range"))


COMMANDS = ((CMD_COMPLETE_BLOCK, "position", complete_block),
            (CMD_FILL_HOLES, "range", fill_holes),
            (CMD_REFINE, "range", refine_selection))


def create_server(*, model: str | None = None, device: str | None = None, dtype: str | None = None,
                  daemon: bool = True) -> DiffuServer:
    server = DiffuServer(model=model, device=device, dtype=dtype, daemon=daemon)
    for method, options, handler in FEATURES:
        server.feature(method, options)(handler)
    for name, key, method in COMMANDS:
        server.command(name)(guarded(lambda: {"applied": False}, user_facing=True)(_command(method, key)))
    server.command(nextedit_lsp.CMD_NEXT_EDIT)(guarded(None, user_facing=True)(next_edit))
    server.command(nextedit_lsp.CMD_REJECT_NEXT_EDIT)(guarded(dict, user_facing=True)(reject_next_edit))
    return server


# ------------------------------------------------------------------ entry point

def parse_tcp(tcp: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) on a loopback host; ValueError otherwise."""
    host, sep, port_text = tcp.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {tcp!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port {port_text!r} in {tcp!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ValueError(f"bad host {host!r}: use 127.0.0.1, ::1 or localhost") from None
        if not loopback:
            raise ValueError(f"refusing to listen on {host!r}: the server has no authentication, "
                             "so it only listens on loopback (127.0.0.1, ::1, localhost)")
    return host, port


def _enable_stack_dumps() -> None:
    """``kill -USR1 <pid>`` writes every thread's Python stack to stderr (the log)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    logging.getLogger("diffu_lsp").setLevel(logging.WARNING)  # until the settings say (logLevel)
    logging.getLogger("pygls").setLevel(logging.WARNING)  # it logs every message at INFO


def serve(*, model: str | None = None, device: str | None = None, dtype: str | None = None,
          tcp: str | None = None, daemon: bool = True) -> int:
    """Run the server over stdio (default) or TCP on loopback. Returns the exit status."""
    _configure_logging()
    address = None
    if tcp is not None:
        try:
            address = parse_tcp(tcp)
        except ValueError as error:
            log.error("--tcp: %s", error)
            return 2
    server = create_server(model=model, device=device, dtype=dtype, daemon=daemon)
    _enable_stack_dumps()
    if address is not None:
        log.info("diffu-lsp %s listening on %s:%d", __version__, *address)
        server.start_tcp(*address)
    else:
        # The protocol owns fd 1; anything else that writes to stdout (a library's print,
        # native code) goes to stderr instead of corrupting the message stream.
        protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stdout = sys.stderr
        log.info("diffu-lsp %s on stdio", __version__)
        server.start_io(BoundedInput(sys.stdin.buffer), protocol_out)
    return 0 if server.protocol.shut_down else 1
