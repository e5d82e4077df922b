"""Every use of pygls's private names, in one place, each with the limitation that forces it.

pygls 2.1.1 (the version pinned) offers no public hook for any of these. What they do:

- :class:`BoundedInput`: stdin with the framing bounded (a header line or Content-Length of any
  size was buffered whole);
- :class:`DiffuProtocol`: every request answered (malformed JSON-RPC, unreadable params, after
  shutdown), no leaked futures, cancelling reaches a command's task, the command's workDoneToken;
- :class:`LspTextDocument` / :class:`LspWorkspace`: LSP's line breaks, and edits applied without
  walking the whole document;
- :func:`use_lsp_line_breaks`, :func:`pending_handlers`, :func:`answer_parse_error`: the small
  reads and writes of pygls's state the server needs.

Nothing else in diffu_lsp reaches into pygls's private state (tests/test_architecture.py). When
pygls grows a public hook for one of these, its override goes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import re
from typing import Any

import attrs
from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import RPCError, RPCNotification, RPCRequest, RPCResponse
from pygls.protocol.language_server import lsp_method
from pygls.workspace import TextDocument, Workspace

log = logging.getLogger("diffu_lsp.server")

_LSP_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")  # two UTF-16 code units
_NON_ASCII = re.compile(r"[^\x00-\x7f]")  # more than one UTF-8 code unit

# ------------------------------------------------------------------ the protocol

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
    InvalidRequest error (id null) at once, so the server stays up and says why. Upstream: pygls
    2.1.1's io_.run reads ``readline()`` and ``read(Content-Length)`` unbounded and has no option
    for a limit; no pygls issue found. Public API only (what start_io reads)."""

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
    state (_shutdown, _request_futures, _send_data, _handle_response) and override three of its
    private methods (_execute_handler, _handle_cancel_notification; _check_handler_result and
    _run_generator are compared, not called). Upstream: pygls 2.1.1's JsonRPCProtocol.structure_message
    raises JsonRpcInternalError for unreadable params and its reader only logs it; no pygls issue
    was found for that (searched "Unable to deserialize message")."""

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
            return self.answer_error(_echo_id(message.get("id")) if is_object else None, problem)
        if isinstance(message, _Unreadable) and message.invalid_request:
            if message.has_id:
                return self.answer_error(message.id, message.problem)
            log.warning("ignoring notification %s: %s", message.method, message.problem)
            return
        if isinstance(message, RPCRequest) and message.method != lsp.EXIT:
            if self._shutdown:  # LSP: every request after shutdown is an InvalidRequest error
                return self.answer_error(message.id, f"{message.method}: the server is shut down")
            if message.method == lsp.SHUTDOWN:
                if self._shutdown_requested:
                    return self.answer_error(message.id, "shutdown was already requested")
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
            self.answer_error(message.id, f"Invalid params for {message.method}: {message.problem}",
                              JsonRpcInvalidParams.CODE, warn=False)

    def _execute_handler(self, msg_id, handler, callback, args=None, kwargs=None):
        """pygls 2 files the future of every notification run by a generator, coroutine or thread
        handler (didOpen, didChange, didClose ...) in _request_futures under a fresh uuid and never
        takes it out: about 1 KiB per keystroke (the soak's servers grew ~30 MiB in 45 minutes).
        So does it with the handler a generator hands on to (an executeCommand's command). Such a
        future is dropped once it is done (requests answer via _send_response, which drops theirs).
        Upstream: not reported for notifications; openlawlibrary/pygls#608 is the same kind of leak
        for the requests pygls sends (_result_types)."""
        notification = callback == self._check_handler_result
        if notification or getattr(callback, "func", None) == self._run_generator:
            then = callback

            def callback(future, msg_id=msg_id):
                self._request_futures.pop(msg_id, None)
                then(future)
        return super()._execute_handler(msg_id, handler, callback, args, kwargs)

    def _handle_cancel_notification(self, msg_id):
        """A $/cancelRequest for a request already answered is normal (clients cancel on every
        keystroke): no warning on stderr, which editors show as their server log. Upstream:
        openlawlibrary/pygls#517 (its "Cancel notification for unknown message id" warnings)."""
        future = self._request_futures.pop(msg_id, None)
        if future is None:
            log.debug("$/cancelRequest for %r, already answered", msg_id)
        elif future.cancel():
            log.debug("cancelled request %r", msg_id)

    def answer_error(self, msg_id, problem: str, code: int = JsonRpcInvalidRequest.CODE, *, warn: bool = True) -> None:
        """Answer ``msg_id`` (None: null) with a JSON-RPC error; pygls's _send_response would drop a
        null id (a dict keeps it)."""
        if warn:
            log.warning("invalid request (id %r): %s", msg_id, problem)
        error = {"code": code, "message": problem}
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": error})  # a dict: keeps "id": null

    @lsp_method(lsp.WORKSPACE_EXECUTE_COMMAND)
    def lsp_workspace__execute_command(self, params: lsp.ExecuteCommandParams):
        """pygls's, with two additions. The client's workDoneToken is kept for the command: pygls
        hands a command handler only its arguments (no public API for the rest of the params); the
        handler's task is created within this call, so it sees this value of the context variable.
        And a $/cancelRequest for the executeCommand cancels the command's task: pygls runs it as a
        task of its own, which cancelling the request's future does not reach. No upstream issue
        found for either (pygls 2.1.1: LanguageServerProtocol.lsp_workspace__execute_command)."""
        COMMAND_PROGRESS_TOKEN.set(params.work_done_token)
        request = self._request_futures.get(self.msg_id)
        commands = super().lsp_workspace__execute_command(params)
        handler, args, kwargs = next(commands)
        commands.close()
        return (yield _cancelled_with(request, handler), args, kwargs)

    @lsp_method(lsp.SHUTDOWN)
    def lsp_shutdown(self, *args):
        """pygls's, except that it cancels the pending requests over a copy: a cancelled request's
        callback removes it from the dict ("dictionary changed size during iteration"). No upstream
        issue found (pygls 2.1.1: LanguageServerProtocol.lsp_shutdown iterates the dict itself)."""
        if (user_handler := self.fm.features.get(lsp.SHUTDOWN)) is not None:
            yield user_handler, args, None
        current_id = self.msg_id
        for msg_id, future in list(self._request_futures.items()):
            if msg_id != current_id and not future.done():
                future.cancel()
        self._shutdown = True
        return None

    @property
    def shut_down(self) -> bool:
        """A shutdown request was answered (pygls keeps it in its private _shutdown)."""
        return self._shutdown


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


# ------------------------------------------------------------------ documents

class LspTextDocument(TextDocument):
    """pygls's TextDocument, with lines broken at LSP's line ends only (\\n, \\r\\n, \\r).

    pygls uses ``str.splitlines``, which also breaks at form feeds, \\x1c-\\x1e, \\x85 and
    U+2028/9: a position after such a character (the stdlib has form feeds) would land on
    the wrong line, and incremental edits there would corrupt the text (pygls 2.1.1
    TextDocument.lines, a public property; no upstream issue found)."""

    @property
    def lines(self):
        return tuple(_LSP_LINE.findall(self.source))

    # pygls has no public hook for applying an edit: this overrides its private method (and sets
    # its private _source). pygls's splits the whole document into lines, walks them all, and
    # converts columns by summing a Python call per character of the line: 11 s per keystroke on
    # a 20 MB single-line file (upstream: no pygls issue found; pygls 2.1.1
    # TextDocument._apply_incremental_change). Here the work in Python is one step per line break above the edit
    # and per wide character (astral in UTF-16, non-ASCII in UTF-8) before its column on its line.
    def _apply_incremental_change(self, change: lsp.TextDocumentContentChangePartial) -> None:
        source = self.source
        first, last = sorted((change.range.start, change.range.end), key=lambda p: (p.line, p.character))
        line_start = _line_start(source, first.line)
        start = self._offset(source, line_start, first.character)
        if last.line != first.line and line_start is not None:  # on from the first line
            line_start = _line_start(source, last.line - first.line, line_start)
        end = self._offset(source, line_start, last.character)
        self._source = source[:start] + change.text + source[end:]

    def _offset(self, source: str, start: int | None, units: int) -> int:
        """The character offset of a client column on the line starting at ``start`` (None: past
        the document's end, which is the answer), as LSP has it: a column past its line's end is
        that end; one inside a character of several code units is after it (as pygls has it)."""
        if start is None:
            return len(source)
        stop = start + units  # a code unit is never more than one character
        for line_break in "\r\n":
            if (at := source.find(line_break, start, stop)) >= 0:
                stop = at
        head = source[start:stop]
        encoding = self.position_codec.encoding
        if head.isascii() or encoding == lsp.PositionEncodingKind.Utf32:
            return start + len(head)
        wide = _NON_ASCII if encoding == lsp.PositionEncodingKind.Utf8 else _ASTRAL
        extra = 0  # code units beyond one per character, before the character at hand
        for char in wide.finditer(head):
            at = char.start()
            if at + extra >= units:
                break
            extra += self.position_codec.client_num_units(char.group()) - 1
            if at + 1 + extra >= units:
                return start + at + 1
        return start + min(units - extra, len(head))


class LspWorkspace(Workspace):
    # pygls has no public hook for the document class a workspace makes: this overrides its
    # private factory (and reads its private sync kind: no public property). Upstream:
    # openlawlibrary/pygls#131 (custom Document and Workspace classes; answered with a workaround).
    def _create_text_document(self, doc_uri, source=None, version=None, language_id=None):
        return LspTextDocument(doc_uri, source=source, version=version, language_id=language_id,
                               sync_kind=self._sync_kind, position_codec=self.position_codec)


def _line_start(source: str, lines: int, start: int = 0) -> int | None:
    """The offset of the line ``lines`` below the one starting at ``start`` (None: past the end)."""
    if lines <= 0:
        return start
    for number, line_break in enumerate(_LINE_BREAK.finditer(source, start), 1):
        if number == lines:
            return line_break.end()
    return None


# ------------------------------------------------------------------ small reads and writes

def use_lsp_line_breaks(server: LanguageServer) -> None:
    """Make the workspace pygls created at ``initialize`` one that makes LspTextDocuments.
    pygls builds its Workspace inside its own initialize handler, with no parameter for the class
    (openlawlibrary/pygls#131 asked for one; closed with "subclass the protocol" as the answer),
    so the instance's class is swapped before any document exists."""
    workspace = server.workspace
    if type(workspace) is Workspace:
        workspace.__class__ = LspWorkspace


def pending_handlers(server: LanguageServer) -> int:
    """Requests and notifications whose handlers have not finished (pygls's _request_futures)."""
    return len(server.protocol._request_futures)


def answer_parse_error(server: LanguageServer, error: Exception) -> bool:
    """pygls's reader hands report_server_error the error of a body that is not JSON (or not UTF-8,
    or nested past the parser's depth); JSON-RPC answers it with a Parse error (id null), where
    pygls's own answer is a showMessage popup and no response. True when answered so."""
    if not isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, RecursionError)):
        return False
    from .errors import first_line

    server.protocol.answer_error(None, f"Parse error: {first_line(error)}", PARSE_ERROR)
    return True
