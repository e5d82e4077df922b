"""The language server: LSP messages <-> scheduler jobs <-> features.

Layering: this module speaks LSP (pygls + lsprotocol) and nothing else. A handler takes a
snapshot of the document, converts LSP positions to character offsets with the document's
own helpers, submits a plain function to the :class:`~diffu_lsp.scheduler.Scheduler` (one model
thread, latest-wins per document) and converts the result back. The features
(``diffu_lsp.features``) and the model (``diffu_lsp.models``) are imported lazily, off the
event loop, so ``initialize`` is answered before torch is even imported; this module never
uses torch itself.

Custom messages: notification ``diffu/status`` ``{"state": "loading"|"ready"|"error",
"model", "message"}``; request ``diffu/stats`` (scheduler counters, reuse hits, model loads,
effective settings, the last job records).
"""

from __future__ import annotations

import asyncio
import dataclasses
import contextvars
import functools
import ipaddress
import json
import logging
import os
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote

import attrs
import msgspec
from lsprotocol import types as lsp
from pygls.capabilities import get_capability
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import RPCError, RPCNotification, RPCRequest, RPCResponse
from pygls.protocol.language_server import lsp_method
from pygls.uris import to_fs_path
from pygls.workspace import TextDocument, Workspace

from . import __version__
from . import settings as config
from .configuration import Configuration, watch
from .documents import LspTextDocument, LspWorkspace, model_text, offset_at, position_at  # noqa: F401 - re-exported
from .errors import EXITS, PASS_THROUGH, DaemonUnavailable, EngineLost, JobCancelled, first_line, is_out_of_memory
from .engine import Engine, LocalEngine
from .job import ModelKey, Step
from .session import Session, Target, find_holes, progress_message, refine_verdict
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

CONFIG_SECTION = "diffu"


# ------------------------------------------------------------------ protocol layer

# The workDoneToken the client sent with the workspace/executeCommand being handled (or None).
COMMAND_PROGRESS_TOKEN: contextvars.ContextVar[int | str | None] = contextvars.ContextVar("diffu_command_progress",
                                                                                           default=None)


def _cancelled_with(request, handler):
    """`handler`, a coroutine function, as one whose task is cancelled when the `request`'s future is."""
    if request is None or not asyncio.iscoroutinefunction(handler):
        return handler

    @functools.wraps(handler)
    async def cancelled_with_the_request(*args, **kwargs):
        task = asyncio.current_task()
        request.add_done_callback(lambda future: future.cancelled() and task.cancel())
        return await handler(*args, **kwargs)

    return cancelled_with_the_request


@attrs.define
class _Unreadable:
    """A message whose params (or result) do not fit its method's types."""

    id: Any  # None when absent or not a valid JSON-RPC id
    has_id: bool
    method: str | None
    problem: str
    invalid_request: bool = False  # not valid JSON-RPC 2.0 (answered InvalidRequest, not InvalidParams)


MAX_HEADER_BYTES = 8 * 1024  # one header line of a message
MAX_MESSAGE_BYTES = 64 * 2**20  # a message's body (its Content-Length): a document over this is not opened
PARSE_ERROR = -32700
_REFUSED = "$diffu-lsp/refused"  # the key of what BoundedInput hands pygls in place of a refused message


class BoundedInput:
    """stdin as pygls reads it (``readline()`` for each header line, ``read(n)`` for a body of
    Content-Length ``n``), with the framing bounded before anything is buffered: pygls reads a line
    or a body whole, so a header line with no end, or a Content-Length of 50e9, ran the server out
    of memory. A header line over :data:`MAX_HEADER_BYTES` is dropped; a body over
    :data:`MAX_MESSAGE_BYTES`, or one after a dropped header line, is skipped in bounded reads. In
    its place pygls gets ``{_REFUSED: reason}``, which :class:`DiffuProtocol` answers with an
    InvalidRequest error (id null) at once, so the server stays up and says why."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.dropped = ""  # why the current message's header was dropped
        self.skip = 0  # bytes of a refused body still to read and drop

    def _drop(self, size: int) -> bool:
        """Read and forget ``size`` bytes; False at the end of the input."""
        while size > 0:
            chunk = self.stream.read(min(size, 1 << 20))
            if not chunk:
                return False
            size -= len(chunk)
        return True

    def readline(self) -> bytes:
        if self.skip:
            size, self.skip = self.skip, 0
            if not self._drop(size):
                return b""
        line = self.stream.readline(MAX_HEADER_BYTES)
        if len(line) < MAX_HEADER_BYTES or line.endswith(b"\n"):
            return line
        length = len(line)
        while line and not line.endswith(b"\n"):
            line = self.stream.readline(1 << 20)
            length += len(line)
        if not line:
            return b""
        self.dropped = f"a header line of {length:,} bytes is over the {MAX_HEADER_BYTES:,}-byte limit"
        return b"X-Diffu-Dropped: 1\r\n"  # a header pygls ignores

    def read(self, size: int) -> bytes:
        reason, self.dropped = self.dropped, ""
        if size > MAX_MESSAGE_BYTES:
            reason = f"a message of {size:,} bytes (Content-Length) is over the {MAX_MESSAGE_BYTES:,}-byte limit"
        if not reason:
            return self.stream.read(size)
        log.error("%s: the message is skipped", reason)
        self.skip = size  # dropped on the next readline: the error is answered first
        return json.dumps({_REFUSED: f"{reason}: the message was skipped"}).encode()


class DiffuProtocol(LanguageServerProtocol):
    """pygls's protocol, except that every request is answered.

    pygls logs "Unable to deserialize message" and drops a message whose params fail
    validation, so the client waits forever. Here such a request gets an InvalidParams
    error, such a notification is logged and ignored, and an unreadable response to one
    of our requests fails that request instead of leaving it pending.

    pygls has no public hooks for any of this: the overrides below use its protocol's private
    state (_shutdown, _request_futures, _send_data, _send_response, _handle_response)."""

    _shutdown_requested = False

    def structure_message(self, data):
        if isinstance(data, dict) and len(data) == 1 and isinstance(data.get(_REFUSED), str):  # BoundedInput's
            return _Unreadable(None, True, None, data[_REFUSED], invalid_request=True)
        if isinstance(data, dict) and "jsonrpc" in data and "method" in data:  # a request or notification
            problem = _envelope_problem(data)
            if problem:
                return _Unreadable(_echo_id(data.get("id")), "id" in data, str(data["method"]), problem,
                                   invalid_request=True)
        try:
            return super().structure_message(data)
        except JsonRpcException as error:
            if not isinstance(data, dict) or ("id" not in data and "method" not in data):
                raise
            msg_id = data.get("id")
            if not isinstance(msg_id, (int, str)) or isinstance(msg_id, bool):
                msg_id = None
            method = data.get("method")
            cause = error.__cause__ or error
            return _Unreadable(msg_id, "id" in data, str(method) if method is not None else None,
                               f"{type(cause).__name__}: {cause}".splitlines()[0])

    def handle_message(self, message):
        if not isinstance(message, (_Unreadable, RPCRequest, RPCNotification, RPCResponse, RPCError)):
            # a batch (JSON array), a message without "jsonrpc", or not an object at all
            is_object = isinstance(message, dict)
            if is_object and "method" in message and "id" not in message:
                log.warning("ignoring a notification without \"jsonrpc\": \"2.0\": %.200r", message)
                return
            problem = ("batches (JSON arrays) are not supported" if isinstance(message, list)
                       else "not a JSON-RPC 2.0 message" if is_object else "a message must be a JSON object")
            return self._invalid_request(_echo_id(message.get("id")) if is_object else None, problem)
        if isinstance(message, _Unreadable) and message.invalid_request:
            if message.has_id:
                return self._invalid_request(message.id, message.problem)
            log.warning("ignoring notification %s: %s", message.method, message.problem)
            return
        if isinstance(message, RPCRequest) and message.method != lsp.EXIT:
            if self._shutdown:  # LSP: every request after shutdown is an InvalidRequest error
                return self._invalid_request(message.id, f"{message.method}: the server is shut down")
            if message.method == lsp.SHUTDOWN:
                if self._shutdown_requested:
                    return self._invalid_request(message.id, "shutdown was already requested")
                self._shutdown_requested = True
        if not isinstance(message, _Unreadable):
            return super().handle_message(message)
        if message.method is None:  # a response to one of our requests
            if message.id is not None:
                self._handle_response(message.id, None, lsp.ResponseError(
                    code=JsonRpcInvalidParams.CODE, message=f"unreadable response: {message.problem}"))
        elif not message.has_id:
            log.warning("ignoring notification %s with invalid params: %s", message.method, message.problem)
        else:
            log.warning("request %s %s has invalid params: %s", message.id, message.method, message.problem)
            error = JsonRpcInvalidParams(f"Invalid params for {message.method}: {message.problem}")
            self._send_response(message.id, error=error.to_response_error())

    def _execute_handler(self, msg_id, handler, callback, args=None, kwargs=None):
        """pygls 2 files the future of every notification run by a generator, coroutine or thread
        handler (didOpen, didChange, didClose ...) in _request_futures under a fresh uuid and never
        takes it out: about 1 KiB per keystroke (the soak's servers grew ~30 MiB in 45 minutes).
        So does it with the handler a generator hands on to (an executeCommand's command). Such a
        future is dropped once it is done (requests answer via _send_response, which drops theirs)."""
        notification = callback == self._check_handler_result
        if notification or getattr(callback, "func", None) == self._run_generator:
            then = callback

            def callback(future, msg_id=msg_id):
                self._request_futures.pop(msg_id, None)
                then(future)
        return super()._execute_handler(msg_id, handler, callback, args, kwargs)

    def _handle_cancel_notification(self, msg_id):
        """A $/cancelRequest for a request already answered is normal (clients cancel on every
        keystroke): no warning on stderr, which editors show as their server log."""
        future = self._request_futures.pop(msg_id, None)
        if future is None:
            log.debug("$/cancelRequest for %r, already answered", msg_id)
        elif future.cancel():
            log.debug("cancelled request %r", msg_id)

    def _invalid_request(self, msg_id, problem: str, code: int = JsonRpcInvalidRequest.CODE) -> None:
        log.warning("invalid request (id %r): %s", msg_id, problem)
        error = {"code": code, "message": problem}
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": error})  # a dict: keeps "id": null

    @lsp_method(lsp.WORKSPACE_EXECUTE_COMMAND)
    def lsp_workspace__execute_command(self, params: lsp.ExecuteCommandParams):
        """pygls's, with two additions. The client's workDoneToken is kept for the command: pygls
        hands a command handler only its arguments (no public API for the rest of the params); the
        handler's task is created within this call, so it sees this value of the context variable.
        And a $/cancelRequest for the executeCommand cancels the command's task: pygls runs it as a
        task of its own, which cancelling the request's future does not reach."""
        COMMAND_PROGRESS_TOKEN.set(params.work_done_token)
        request = self._request_futures.get(self._ctx_msg_id.get())
        commands = super().lsp_workspace__execute_command(params)
        handler, args, kwargs = next(commands)
        commands.close()
        return (yield _cancelled_with(request, handler), args, kwargs)

    @lsp_method(lsp.SHUTDOWN)
    def lsp_shutdown(self, *args):
        """pygls's, except that it cancels the pending requests over a copy: a cancelled request's
        callback removes it from the dict ("dictionary changed size during iteration")."""
        if (user_handler := self.fm.features.get(lsp.SHUTDOWN)) is not None:
            yield user_handler, args, None
        current_id = self.msg_id
        for msg_id, future in list(self._request_futures.items()):
            if msg_id != current_id and not future.done():
                future.cancel()
        self._shutdown = True
        return None


def _echo_id(msg_id: Any) -> int | str | None:
    """The id to answer with: JSON-RPC ids are numbers or strings; anything else is answered null."""
    return msg_id if isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool) else None


def _envelope_problem(data: dict) -> str:
    """Why a request/notification object is not valid JSON-RPC 2.0 ('' when it is)."""
    if data.get("jsonrpc") != "2.0":
        return f'"jsonrpc" must be "2.0", got {data.get("jsonrpc")!r}'
    if not isinstance(data.get("method"), str):
        return '"method" must be a string'
    if "id" in data and _echo_id(data["id"]) is None:
        return f'"id" must be a number or a string, got {type(data["id"]).__name__}'
    return ""


# ------------------------------------------------------------------ helpers

@dataclasses.dataclass
class _Answer:
    text: str
    start: lsp.Position
    end: lsp.Position


def _to_plain(value: Any) -> Any:
    """Command arguments may arrive as dicts or as pygls's namedtuples."""
    if hasattr(value, "_asdict"):
        value = value._asdict()
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


class DiffuServer(LanguageServer):
    """State behind the handlers: settings layers, the model, the scheduler, reuse."""

    def __init__(self, *, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 daemon: bool = True):
        # pygls's thread pool only reads stdin (no handler runs on it: the model has its own
        # threads). One worker: with more, each readline may start a new thread while the last
        # one is still going idle, so the pool grows to its default of cpu+4 threads.
        super().__init__("diffu-lsp", __version__, protocol_cls=DiffuProtocol, max_workers=1,
                         text_document_sync_kind=lsp.TextDocumentSyncKind.Incremental)
        cli = {"model": model, "device": device, "dtype": dtype}
        self.cli_layer = {k: v for k, v in cli.items() if v is not None}
        self.config = Configuration(warn=lambda message: self.show(message, lsp.MessageType.Warning))
        self.session = Session(self.make_engine("daemon") if daemon else LocalEngine(), self.make_engine)
        self.started = False
        self._load_lock = threading.Lock()  # one load at a time
        self._tasks: set[asyncio.Task] = set()
        self._stop_watching: asyncio.Event | None = None
        self._init_options: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ messages

    def report_server_error(self, error: Exception, source) -> None:
        """pygls's reader hands us the error of a body that is not JSON (or not UTF-8, or nested
        past the parser's depth): JSON-RPC answers it with a Parse error (id null). pygls's own
        answer is a showMessage popup and no response."""
        if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, RecursionError)):
            self.protocol._invalid_request(None, f"Parse error: {first_line(error)}", PARSE_ERROR)
            return
        super().report_server_error(error, source)

    def status(self, state: str, label: str, message: str = "") -> None:
        self.session.set_state(state, message)
        self.protocol.notify(STATUS, {"state": state, "model": label, "message": message})

    def log_client(self, message: str, kind: lsp.MessageType = lsp.MessageType.Info) -> None:
        log.log({lsp.MessageType.Error: logging.ERROR, lsp.MessageType.Warning: logging.WARNING}.get(kind, logging.INFO),
                "%s", message)
        self.window_log_message(lsp.LogMessageParams(type=kind, message=message))

    def show(self, message: str, kind: lsp.MessageType) -> None:
        log.log(logging.ERROR if kind == lsp.MessageType.Error else logging.WARNING, "%s", message)
        self.window_show_message(lsp.ShowMessageParams(type=kind, message=message))

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def client_has(self, path: str) -> bool:
        try:
            return bool(get_capability(self.client_capabilities, path, False))
        except Exception:  # noqa: BLE001 - no capabilities before initialize
            return False

    # ------------------------------------------------------------ settings

    def set_layer(self, name: str, raw: Any, source: str) -> None:
        """Replace one settings layer (a bad key is reported and keeps its previous value)."""
        self.config.set_layer(name, raw, source)
        self.apply_settings()

    def apply_settings(self) -> None:
        settings = self.config.resolve()
        old = msgspec.to_builtins(self.session.settings)
        logging.getLogger("diffu_lsp").setLevel(settings.log_level.upper())
        if self.session.use_settings(settings):
            new = msgspec.to_builtins(settings)
            log.info("settings: %s", msgspec.json.encode(settings).decode())
            if self.started:
                keys = ", ".join(f"{k}={new[k]!r}" for k in new if new[k] != old.get(k))
                self.log_client(f"diffu-lsp: settings changed: {keys}")
        if self.started:
            self.ensure_model()

    def config_files(self) -> dict[str, Path]:
        files = {"user": config.user_config_file()}
        root = None
        try:
            root = self.workspace.root_path
            if root is None and self.workspace.folders:
                root = to_fs_path(next(iter(self.workspace.folders.values())).uri)
        except RuntimeError:
            pass
        if root:
            files["workspace"] = config.workspace_config_file(Path(root))
        return files

    def reload_files(self, *, force: bool = False) -> None:
        if self.config.reload_files(self.config_files(), force=force):
            self.apply_settings()

    async def pull_configuration(self) -> None:
        if not self.client_has("workspace.configuration"):
            return
        try:
            result = await asyncio.wait_for(self.workspace_configuration_async(
                lsp.ConfigurationParams(items=[lsp.ConfigurationItem(section=CONFIG_SECTION)])), 10)
        except Exception as error:  # noqa: BLE001
            log.warning("workspace/configuration failed: %r", error)
            return
        value = _to_plain(result[0]) if result else None
        self.set_layer("configuration", value, f"workspace/configuration section {CONFIG_SECTION!r}")

    async def watch_config_files(self) -> None:
        """Re-apply the TOML files when they change."""
        self._stop_watching = stop = asyncio.Event()
        await watch(list(self.config_files().values()), self.reload_files, stop)

    # ------------------------------------------------------------ model

    def ensure_model(self) -> None:
        load = self.session.load_needed()
        if load is not None:
            self.spawn(self.load_model(*load))

    async def load_model(self, key: ModelKey, generation: int) -> None:
        session = self.session
        label = key.label
        self.status("loading", label, f"loading {label} ({key.device}, {key.dtype})")
        token = await self.begin_progress(f"Loading model {label}", cancellable=False)
        loop = asyncio.get_running_loop()
        try:
            try:
                info = await _in_daemon_thread(loop, self._load_lock, session.engine.load, key)
            except DaemonUnavailable as error:  # no daemon to be had: this window holds the model itself
                self.show(f"diffu-lsp: the model daemon is unavailable ({error}); loading the model in this "
                          "window instead", lsp.MessageType.Warning)
                session.fall_back_to_local()
                info = await _in_daemon_thread(loop, self._load_lock, session.engine.load, key)
        except PASS_THROUGH:
            raise
        except BaseException as error:  # noqa: BLE001 - ModelLoadFailed (local, daemon, cluster), anything else
            reason = first_line(error)
            self.end_progress(token, "failed")
            if not session.load_failed(generation):
                return
            self.status("error", label, reason)
            self.show(f"diffu-lsp could not load the model {label}: {reason}", lsp.MessageType.Error)
            return
        self.end_progress(token, "ready")
        if not session.loaded(info, generation):
            return  # the settings changed again while this one loaded
        message = session.ready_message
        self.status("ready", label, message)
        where = f" in the {session.engine.name}" if session.engine.name != "in-process" else ""
        if info.shared:
            self.log_client(f"diffu-lsp: using {message}, already loaded{where}")
        else:
            self.log_client(f"diffu-lsp: loaded {message}{where} in {info.load_seconds:.1f} s")
        if info.evicted:
            self.show(f"diffu-lsp: the model daemon unloaded {', '.join(info.evicted)} to stay within its "
                      "memory budget (setting daemonMemoryMb)", lsp.MessageType.Info)

    def _daemon_state(self, state: str, message: str) -> None:
        """The daemon stopped answering (``stuck``), is being replaced (``restarting``) or answers
        again (``ready``); called on a worker thread. ``stuck`` is told once per episode."""
        def tell() -> None:
            session = self.session
            if session.model_info is None:
                return  # still loading: load_model reports how that ends
            label = session.model_info.label
            if state == "ready":
                self.status("ready", label, session.ready_message)
                return
            self.status(state, label, message)
            if state == "stuck":
                self.session.counters["daemon_stuck"] += 1
                self.show(f"diffu-lsp: the model daemon is not responding ({message})", lsp.MessageType.Warning)
        try:
            self._loop.call_soon_threadsafe(tell)
        except (AttributeError, RuntimeError):  # no loop yet, or closed: the server is exiting
            pass

    def make_engine(self, choice: str) -> Engine:
        """The runner for the setting ``engine`` ("daemon", "local" or a cluster URL), wired to
        this window's messages."""
        from .daemon.client import DaemonEngine

        def daemon() -> DaemonEngine:
            return DaemonEngine(on_lost=self._daemon_lost, on_state=self._daemon_state)

        if choice == "local":
            return LocalEngine()
        if choice == "daemon":
            return daemon()
        from .cluster.client import ClusterEngine

        return ClusterEngine(choice, on_message=self.warn_from_thread, fallback=daemon)

    def warn_from_thread(self, message: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self.show, message, lsp.MessageType.Warning)
        except (AttributeError, RuntimeError):  # no loop yet, or closed: the server is exiting
            log.warning("%s", message)

    def _daemon_lost(self, reason: str) -> None:
        """The daemon connection broke (called on the client's reader thread, once per connection)."""
        def tell() -> None:
            self.session.counters["daemon_lost"] += 1
            self.show(f"diffu-lsp: the model daemon stopped ({reason}); pending requests were answered "
                      "empty and the next one starts a new daemon", lsp.MessageType.Warning)
        try:
            self._loop.call_soon_threadsafe(tell)
        except (AttributeError, RuntimeError):  # no loop yet, or closed: the server is exiting  # the event loop is closed: the server is exiting
            pass

    # ------------------------------------------------------------ progress

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
            self.work_done_progress.tokens.pop(token, None)
            self.work_done_progress.end(token, lsp.WorkDoneProgressEnd(message=message))

    # ------------------------------------------------------------ documents

    def document(self, uri: str) -> TextDocument | None:
        """The open document, or None (unknown URIs are not read from disk)."""
        try:
            return self.workspace.text_documents.get(unquote(uri))
        except RuntimeError:  # before initialize
            return None

    offset_at = staticmethod(offset_at)  # kept reachable here (tests call DiffuServer.offset_at)
    position_at = staticmethod(position_at)

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

    # ------------------------------------------------------------ suggestions

    async def suggest_at(self, uri: str, position: lsp.Position, *, debounce: bool) -> list[_Answer] | None:
        snap = self.snapshot(uri)
        if snap is None:
            return None
        doc, text = snap
        if not self.session.suggests_for(doc.language_id):
            return None
        version = doc.version
        at = self.offset_at(doc, position)
        if at is None:
            log.info("position %s is past the end of %s", position, uri)
            return None
        cursor, pos = at
        candidates = await self.session.suggest(uri, text, cursor, version, debounce=debounce)
        if candidates is None:
            return None
        units = doc.position_codec.client_num_units
        return [_Answer(suggestion, pos, lsp.Position(line=pos.line, character=pos.character + units(
            text[cursor:cursor + replace_after]))) for suggestion, replace_after in candidates]

    # ------------------------------------------------------------ commands

    async def apply_edits(self, uri: str, doc: TextDocument, version: int | None,
                          replacements: list[tuple[int, int, str]], label: str) -> bool:
        """Send one workspace/applyEdit for ``replacements`` (offsets into the document at
        ``version``); False if the document moved on meanwhile or the client refused."""
        if not replacements:
            return False
        if self.document(uri) is not doc or doc.version != version:
            self.log_client(f"diffu-lsp: {label}: the document changed; not applying")
            return False
        positions = self.position_at(doc, [o for start, end, _ in replacements for o in (start, end)])
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
            self.log_client(f"diffu-lsp: {label}: the client did not apply the edit "
                            f"({getattr(result, 'failure_reason', None) or 'no reason given'})")
        return applied

    def command_target(self, args: tuple, key: str) -> tuple[str, Any]:
        """(uri, Position or Range) from ``[{"textDocument": {"uri"}, key: {...}}]``."""
        try:
            (arg,) = args
            arg = _to_plain(arg)
            uri = arg["textDocument"]["uri"]
            if not isinstance(uri, str):
                raise TypeError("textDocument.uri must be a string")
            # pygls 2.1 offers its cattrs converter only as the protocol's private _converter
            target = self.protocol._converter.structure(arg[key], lsp.Range if key == "range" else lsp.Position)
        except Exception as error:  # noqa: BLE001
            raise JsonRpcInvalidParams(
                f'expected [{{"textDocument": {{"uri": ...}}, "{key}": ...}}]: {type(error).__name__}: {error}') from None
        return uri, target

    def _command_target(self, uri: str, label: str, start: lsp.Position, end: lsp.Position) -> Target | None:
        """What every command starts from: the document now, the range as offsets, the model and
        settings of this moment, and the text clipped around the range."""
        session = self.session
        if session.model_info is None:
            self.show(f"diffu-lsp: {label}: the model is not ready ({session.model_state}: {session.model_message})",
                      lsp.MessageType.Info)
            return None
        snap = self.snapshot(uri)
        if snap is None:
            return None
        doc, text = snap
        first, last = self.offset_at(doc, start, end_of_range=start != end), self.offset_at(doc, end, end_of_range=True)
        if first is None:
            self.log_client(f"diffu-lsp: {label}: line {start.line + 1} is past the end of the document")
            return None
        (start_offset, _), (end_offset, _) = first, last
        return session.target(doc, text, doc.version, start_offset, end_offset)

    async def complete_block(self, uri: str, position: lsp.Position) -> bool:
        target = self._command_target(uri, "complete block", position, position)
        if target is None:
            return False
        result = await self._command_job("Completing block", uri, target, "block")
        if not result.text:
            self.log_client("diffu-lsp: complete block: the model produced nothing")
            return False
        cursor = target.start
        return await self.apply_edits(uri, target.doc, target.version,
                                      [(cursor, cursor + result.replace_after, result.text)], "diffu: complete block")

    async def fill_holes(self, uri: str, rng: lsp.Range) -> bool:
        target = self._command_target(uri, "fill holes", rng.start, rng.end)
        if target is None:
            return False
        holes = find_holes(target.text, target.start, target.end, target.settings)
        if not holes:
            markers = ", ".join(repr(m) for m in target.settings.hole_markers)
            where = "in the selection" if target.start != target.end else "in the enclosing def/class"
            self.show(f"diffu-lsp: fill holes: no hole marker {where}. Markers (setting holeMarkers): {markers}; "
                      "'...' counts only as a whole statement, not inside an expression", lsp.MessageType.Info)
            return False
        replacements = await self._command_job("Filling holes", uri, target, "fill_holes")
        if not replacements:
            self.show(f"diffu-lsp: fill holes: the model produced nothing for the {len(holes)} hole(s) found; "
                      "nothing was changed", lsp.MessageType.Info)
            return False
        base = target.base
        return await self.apply_edits(uri, target.doc, target.version,
                                      [(base + r.start, base + r.end, r.text) for r in replacements],
                                      "diffu: fill holes")

    async def refine_selection(self, uri: str, rng: lsp.Range) -> bool:
        target = self._command_target(uri, "refine", rng.start, rng.end)
        if target is None or target.start == target.end:
            return False
        new_text = await self._command_job("Refining selection", uri, target, "refine")
        verdict = refine_verdict(target.text[target.start:target.end], new_text)
        if verdict:
            self.log_client(f"diffu-lsp: refine: {verdict}")
            return False
        return await self.apply_edits(uri, target.doc, target.version, [(target.start, target.end, new_text)],
                                      "diffu: refine selection")

    async def _command_job(self, title: str, uri: str, target: Target, kind: str):
        """The command's job, under a cancellable progress (the client's workDoneToken when it sent
        one) that streams the draft as it firms up; the final edit then replaces it."""
        loop = asyncio.get_running_loop()
        token = await self.begin_progress(title, cancellable=True, client_token=COMMAND_PROGRESS_TOKEN.get())
        first_masked = None

        def report(step: Step) -> None:
            nonlocal first_masked
            if first_masked is None:
                first_masked = step.masked + 1
            done = first_masked - step.masked
            self.report_progress(token, progress_message(step), int(100 * done / max(first_masked, 1)))

        job = self.session.submit_command(uri, target, kind, lambda step: loop.call_soon_threadsafe(report, step))
        cancelled_by_client = self.work_done_progress.tokens.get(token) if token is not None else None
        if cancelled_by_client is not None:
            cancelled_by_client.add_done_callback(
                lambda f: f.cancelled() and job.cancel("cancelled from the progress UI"))
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
            self.end_progress(token, outcome)
        return answer

    # ------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        """After ``initialized``: settings from every layer, then the model, then the file watcher."""
        self._loop = asyncio.get_running_loop()
        options = self._init_options
        if isinstance(options, Mapping) and isinstance(options.get(CONFIG_SECTION), Mapping):
            options = options[CONFIG_SECTION]
        if isinstance(options, Mapping) and "workspaceTrusted" in options:  # the editor's workspace trust
            options = dict(options)
            self.config.set_editor_trust(options.pop("workspaceTrusted"))
        self.reload_files(force=True)
        if options is not None:
            self.set_layer("initializationOptions", _to_plain(options), "initializationOptions")
        self.set_layer("cli", self.cli_layer, "the command line")
        await self.pull_configuration()
        self.started = True
        self.ensure_model()
        self.spawn(self.watch_config_files())

    async def stop(self) -> None:
        if self._stop_watching is not None:
            self._stop_watching.set()
        await self.session.close()

    def stats(self) -> dict[str, Any]:
        return {
            **self.session.stats(),
            "settings": msgspec.to_builtins(self.session.settings),
            "records": [dataclasses.asdict(r) for r in list(self.session.sched.records)[-50:]],
            "handlers_pending": len(self.protocol._request_futures),  # requests and notifications not finished
            "threads": sorted(thread.name for thread in threading.enumerate()),
        }


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
                    "dtype, or context (prefixTokens/suffixTokens)", lsp.MessageType.Error)
            return answer_empty()
        log.exception("%s failed", name)
        message = f"diffu-lsp: {name} failed: {type(error).__name__}: {error}"
        if user_facing:
            ls.show(message, lsp.MessageType.Error)
        else:
            ls.log_client(message, lsp.MessageType.Error)
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
        uri, target = ls.command_target(args, key)
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
    ws = ls.workspace
    if type(ws) is Workspace:  # before any document exists: use LSP line breaks
        ws.__class__ = LspWorkspace
    ls._init_options = params.initialization_options


@feature(lsp.INITIALIZED)
async def initialized(ls: DiffuServer, params: lsp.InitializedParams):
    try:
        await ls.startup()
    except Exception:  # noqa: BLE001
        log.exception("start-up failed")
        ls.started = True
        ls.ensure_model()


@feature(lsp.SHUTDOWN)
async def shutdown(ls: DiffuServer, params):
    await ls.stop()


@feature(lsp.TEXT_DOCUMENT_DID_OPEN)
@guarded(None)
def did_open(ls: DiffuServer, params: lsp.DidOpenTextDocumentParams):
    uri, version = params.text_document.uri, params.text_document.version
    ls.session.note_version(uri, version)
    ls.session.forget(uri)


@feature(lsp.TEXT_DOCUMENT_DID_CHANGE)
@guarded(None)
def did_change(ls: DiffuServer, params: lsp.DidChangeTextDocumentParams):
    uri, version = params.text_document.uri, params.text_document.version
    ls.session.note_version(uri, version)


@feature(lsp.TEXT_DOCUMENT_DID_CLOSE)
@guarded(None)
def did_close(ls: DiffuServer, params: lsp.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    ls.session.closed(uri)


@feature(lsp.WORKSPACE_DID_CHANGE_CONFIGURATION)
@guarded(None)
async def did_change_configuration(ls: DiffuServer, params: lsp.DidChangeConfigurationParams):
    if ls.client_has("workspace.configuration"):
        await ls.pull_configuration()
    else:
        pushed = _to_plain(params.settings)
        if isinstance(pushed, Mapping) and CONFIG_SECTION in pushed:
            ls.set_layer("configuration", pushed[CONFIG_SECTION], "workspace/didChangeConfiguration")


@feature(WORKSPACE_TRUST)
@guarded(None)
def workspace_trust(ls: DiffuServer, params: Any):
    """The editor's workspace trust changed (Neovim: :trust on the workspace's diffu-lsp.toml):
    decide the workspace file's trust again."""
    params = _to_plain(params)
    ls.config.set_editor_trust(params.get("workspaceTrusted") if isinstance(params, Mapping) else None)
    ls.reload_files()


def nothing_here() -> lsp.InlineCompletionList:
    """No suggestion here: an empty list, so that a client drops the ghost text it shows (Neovim
    0.12 keeps it on null). Null answers a superseded request: the newer one's answer replaces it."""
    return lsp.InlineCompletionList(items=[])


@feature(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.InlineCompletionOptions())
@guarded(nothing_here, superseded=None)
async def inline_completion(ls: DiffuServer, params: lsp.InlineCompletionParams):
    explicit = params.context.trigger_kind == lsp.InlineCompletionTriggerKind.Invoked
    answers = await ls.suggest_at(params.text_document.uri, params.position, debounce=not explicit)
    if answers is None:
        return nothing_here()
    return lsp.InlineCompletionList(items=[lsp.InlineCompletionItem(
        insert_text=answer.text, range=lsp.Range(start=answer.start, end=answer.end)) for answer in answers])


@feature(lsp.TEXT_DOCUMENT_COMPLETION, lsp.CompletionOptions())
@guarded(None)
async def completion(ls: DiffuServer, params: lsp.CompletionParams):
    explicit = params.context is not None and params.context.trigger_kind == lsp.CompletionTriggerKind.Invoked
    answers = await ls.suggest_at(params.text_document.uri, params.position, debounce=not explicit)
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
    code_action_kinds=[KIND_REFINE, KIND_FILL_HOLES, KIND_COMPLETE_BLOCK]))
@guarded(list)
async def code_action(ls: DiffuServer, params: lsp.CodeActionParams):
    uri = params.text_document.uri
    snap = ls.snapshot(uri)
    if snap is None:
        return []
    doc, text = snap
    first = ls.offset_at(doc, params.range.start)
    if first is None:
        return []
    (start, start_pos), (end, end_pos) = first, ls.offset_at(doc, params.range.end, end_of_range=True)
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
    return actions


@feature(STATS)
@guarded(None)
def stats(ls: DiffuServer, params):
    return ls.stats()


COMMANDS = ((CMD_COMPLETE_BLOCK, "position", DiffuServer.complete_block),
            (CMD_FILL_HOLES, "range", DiffuServer.fill_holes),
            (CMD_REFINE, "range", DiffuServer.refine_selection))


def create_server(*, model: str | None = None, device: str | None = None, dtype: str | None = None,
                  daemon: bool = True) -> DiffuServer:
    server = DiffuServer(model=model, device=device, dtype=dtype, daemon=daemon)
    for method, options, handler in FEATURES:
        server.feature(method, options)(handler)
    for name, key, method in COMMANDS:
        server.command(name)(guarded(lambda: {"applied": False}, user_facing=True)(_command(method, key)))
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
    return 0 if server.protocol._shutdown else 1  # pygls exposes no public "shutdown was requested"
