"""JSON-RPC and LSP edge cases (issue #12), by raw frames to a real `python -m diffu_lsp` process
over stdio: every request gets exactly one answer (an InvalidRequest error where it is not a valid
request, or arrives after shutdown), positions are answered where they are, lone surrogates do not
break the model, and cancelling an answered request is not logged as a problem."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

WAIT_S = 120
INVALID_REQUEST = -32600


class RawServer:
    """A server process and the messages it sent, read on a thread (every wait is bounded)."""

    def __init__(self, tmp: Path):
        (tmp / "xdg").mkdir(exist_ok=True)
        (tmp / "ws").mkdir(exist_ok=True)
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp / "xdg"), "OMP_NUM_THREADS": "1"}
        self.stderr_path = tmp / "stderr.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "diffu_lsp", "--no-daemon"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr_path.open("wb"), env=env)
        self.inbox: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.root = tmp / "ws"

    def _read(self) -> None:
        out = self.proc.stdout
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    return
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                if line in (b"\r\n", b"\n") and length is not None:
                    break
            self.inbox.put(json.loads(out.read(length)))

    def send_bytes(self, body: bytes) -> None:
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def send(self, message) -> None:
        self.send_bytes(json.dumps(message).encode())

    def request(self, msg_id, method: str, params=None) -> None:
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})

    def notify(self, method: str, params=None) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def next(self, predicate, what: str, timeout: float = WAIT_S) -> dict:
        for message in self.seen:
            if predicate(message):
                self.seen.remove(message)
                return message
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                message = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            if message.get("method") in ("workspace/configuration", "window/workDoneProgress/create",
                                         "client/registerCapability"):
                self.send({"jsonrpc": "2.0", "id": message["id"], "result": [None] if message["method"] ==
                           "workspace/configuration" else None})
                continue
            if predicate(message):
                return message
            self.seen.append(message)

    def answer(self, msg_id, timeout: float = WAIT_S) -> dict:
        return self.next(lambda m: "method" not in m and m.get("id") == msg_id, f"the answer to {msg_id!r}", timeout)

    def answers_to(self, msg_id, within: float) -> list[dict]:
        """Every answer carrying `msg_id` that arrives within `within` seconds."""
        found = []
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                found.append(self.next(lambda m: "method" not in m and m.get("id") == msg_id, "", left))
            except AssertionError:
                break
        return found

    def initialize(self, ready: bool = False) -> None:
        self.request(0, "initialize", {"processId": None, "rootUri": self.root.as_uri(), "capabilities": {
            "workspace": {"configuration": True}, "window": {"workDoneProgress": False}}})
        assert "capabilities" in self.answer(0)["result"]
        self.notify("initialized", {})
        if ready:
            status = self.next(lambda m: m.get("method") == "diffu/status" and m["params"]["state"] in ("ready", "error"),
                               "the model to load")
            assert status["params"]["state"] == "ready", status

    def open(self, uri: str, text: str) -> None:
        self.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                              "text": text}})

    def close(self) -> int:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
def raw(tmp_path):
    server = RawServer(tmp_path)
    yield server
    if server.proc.poll() is None:
        server.close()


def assert_invalid_request(answer: dict, msg_id) -> None:
    assert answer["id"] == msg_id and answer["error"]["code"] == INVALID_REQUEST, answer


def test_invalid_envelopes_get_invalid_request(raw):
    raw.initialize()
    raw.send([{"jsonrpc": "2.0", "id": 7, "method": "diffu/stats"}])  # a batch
    assert_invalid_request(raw.answer(None), None)
    for bad_id in (True, {"a": 1}, [1]):
        raw.send({"jsonrpc": "2.0", "id": bad_id, "method": "diffu/stats"})
        assert_invalid_request(raw.answer(None), None)
    raw.send({"jsonrpc": "1.0", "id": 8, "method": "diffu/stats"})
    assert_invalid_request(raw.answer(8), 8)
    raw.send({"id": 9, "method": "diffu/stats"})  # no "jsonrpc"
    assert_invalid_request(raw.answer(9), 9)
    raw.send_bytes(b"42")
    assert_invalid_request(raw.answer(None), None)
    raw.request(10, "diffu/stats")  # and the server still answers
    assert "model_state" in raw.answer(10)["result"]


def test_requests_after_shutdown_are_invalid_and_exit_is_clean(raw):
    raw.initialize()
    raw.request(1, "shutdown")
    raw.request(2, "shutdown")  # while the first may still be pending
    raw.request(3, "diffu/stats")
    first, second = raw.answer(1), raw.answer(2)
    assert first.get("error") is None, first
    assert_invalid_request(second, 2)
    third = raw.answer(3)
    assert third.get("error", {}).get("code") != -32603, third
    raw.request(4, "textDocument/inlineCompletion", {"textDocument": {"uri": "file:///x.py"},
                                                      "position": {"line": 0, "character": 0},
                                                      "context": {"triggerKind": 1}})
    assert_invalid_request(raw.answer(4), 4)
    assert len(raw.answers_to(1, 0.5)) == 0  # exactly one answer each
    raw.notify("exit")
    assert raw.proc.wait(timeout=30) == 0
    assert "dictionary changed size" not in raw.stderr()


def inline(raw: RawServer, msg_id: int, uri: str, line: int, character: int) -> dict:
    raw.request(msg_id, "textDocument/inlineCompletion", {
        "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
        "context": {"triggerKind": 1}})
    return raw.answer(msg_id)


def test_positions_surrogates_and_quiet_cancels(raw):
    raw.initialize(ready=True)
    # A position inside the emoji's surrogate pair is answered at the pair's end, where the
    # suggestion was computed (the same place completeBlock uses).
    emoji = "x = ['😀', "
    raw.open("file:///e.py", emoji)
    answer = inline(raw, 1, "file:///e.py", 0, 7)  # between the two UTF-16 units of 😀
    items = (answer["result"] or {}).get("items") or []
    for item in items:
        assert item["range"]["start"] == {"line": 0, "character": 8}
    # The same cursor written after the pair gives the same suggestion.
    after = inline(raw, 2, "file:///e.py", 0, 8)
    assert [i["insertText"] for i in items] == [i["insertText"] for i in ((after["result"] or {}).get("items") or [])]

    # A line past the end of the document: an empty answer, never an item on another line.
    raw.open("file:///p.py", "def f(x):\n    return ")
    assert inline(raw, 3, "file:///p.py", 5, 0)["result"] == {"items": []}
    assert inline(raw, 4, "file:///p.py", 2, 0)["result"] == {"items": []}
    assert "error" not in inline(raw, 5, "file:///p.py", 1, 999)  # past a line's end: clamped, answered

    # A lone surrogate in the document does not break the tokenizer: the model still answers.
    lone = json.dumps("def g(y):\n    s = '\ud800'\n    return ")
    raw.send_bytes(b'{"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": '
                   b'{"uri": "file:///s.py", "languageId": "python", "version": 1, "text": ' + lone.encode() + b'}}}')
    answer = inline(raw, 6, "file:///s.py", 2, 11)
    assert "error" not in answer, answer
    for item in (answer["result"] or {}).get("items") or []:
        assert item["range"]["start"] == {"line": 2, "character": 11}
    raw.request(7, "diffu/stats")
    records = raw.answer(7)["result"]["records"]
    assert [r["outcome"] for r in records if r["key"] == "file:///s.py"] == ["completed"], records
    assert not [r for r in records if r["outcome"] == "failed"], records

    # Cancelling requests already answered is normal: nothing in the editor's log or on stderr.
    for msg_id in range(1, 7):
        raw.notify("$/cancelRequest", {"id": msg_id})
    raw.request(8, "diffu/stats")
    raw.answer(8)
    logged = [m for m in raw.seen if m.get("method") in ("window/logMessage", "window/showMessage")
              and ("cancel" in m["params"]["message"].lower())]
    assert not logged, logged
    assert "cancel" not in raw.stderr().lower()


def test_offsets_and_positions_agree():
    """In-process: the offset a position maps to and the position answered are the same place."""
    from lsprotocol import types as lsp

    from diffu_lsp.documents import LspTextDocument
    from diffu_lsp.server import DiffuServer

    doc = LspTextDocument("file:///e.py", source="x = ['😀', \n")
    at = lambda line, character: DiffuServer.offset_at(doc, lsp.Position(line=line, character=character))  # noqa: E731
    assert at(0, 7) == (7, lsp.Position(line=0, character=8))  # inside the pair -> after it
    assert at(0, 8) == (7, lsp.Position(line=0, character=8))
    assert at(0, 99) == (10, lsp.Position(line=0, character=11))  # past the line's end -> its end
    assert at(1, 0) == (11, lsp.Position(line=1, character=0))  # the empty last line exists
    assert at(2, 0) is None  # past the end of the document
    doc = LspTextDocument("file:///p.py", source="a\nbc")
    assert DiffuServer.offset_at(doc, lsp.Position(line=2, character=0)) is None
    assert DiffuServer.offset_at(doc, lsp.Position(line=2, character=0), end_of_range=True) == (
        4, lsp.Position(line=1, character=2))


def test_reading_stdin_keeps_one_thread(raw):
    """pygls reads stdin on its thread pool; with more than one worker the pool grew a thread at a
    time over a long session (the soak saw 6 -> 10 threads). Messages one by one, then bursts."""
    raw.initialize()
    raw.open("file:///t.py", "x = 1\n")
    for msg_id in range(1, 101):
        raw.request(msg_id, "diffu/stats")
        raw.answer(msg_id)
    for burst in range(20):
        for version in range(2, 12):
            raw.notify("textDocument/didChange", {"textDocument": {"uri": "file:///t.py", "version": 10 * burst + version},
                                                  "contentChanges": [{"text": f"x = {version}\n"}]})
        raw.request(1000 + burst, "diffu/stats")
        raw.answer(1000 + burst)
    raw.request(2000, "diffu/stats")
    threads = raw.answer(2000)["result"]["threads"]
    assert len([name for name in threads if name.startswith("ThreadPoolExecutor")]) == 1, threads


PARSE_ERROR = -32700


def test_malformed_json_gets_a_parse_error(raw):
    """Before: pygls logged the error, showed 'Error in server' and answered nothing."""
    raw.initialize()
    for body in (b'{"jsonrpc": "2.0", "id": 1, "method": ', b'\xff\xfe{"a": 1}', b"[" * 100_000):
        raw.send_bytes(body)
        answer = raw.answer(None, timeout=30)
        assert answer["error"]["code"] == PARSE_ERROR and answer["error"]["message"].startswith("Parse error"), answer
    raw.request(2, "diffu/stats")
    assert "model_state" in raw.answer(2)["result"]
    assert not [m for m in raw.seen if m.get("method") == "window/showMessage"], raw.seen


def test_oversized_headers_and_bodies_are_refused_and_the_server_stays_up(raw):
    """Before: a body over the limit was read whole (a Content-Length of 50e9 ended the server
    with MemoryError), and a header line was read whole however long it was."""
    from diffu_lsp.server import MAX_HEADER_BYTES, MAX_MESSAGE_BYTES

    stdin = raw.proc.stdin
    raw.initialize()
    size = MAX_MESSAGE_BYTES + 1  # really sent: skipped in bounded reads, and the next message is read
    stdin.write(b"Content-Length: %d\r\n\r\n" % size + b" " * size)
    stdin.flush()
    error = raw.answer(None, timeout=30)["error"]
    assert error["code"] == INVALID_REQUEST and f"over the {MAX_MESSAGE_BYTES:,}-byte limit" in error["message"], error
    raw.request(1, "diffu/stats")
    assert "model_state" in raw.answer(1)["result"]

    body = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "diffu/stats"}).encode()
    stdin.write(b"X-Padding: " + b"x" * (4 * MAX_HEADER_BYTES) + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    stdin.flush()
    error = raw.answer(None, timeout=30)["error"]
    assert error["code"] == INVALID_REQUEST and "header line of" in error["message"], error
    raw.request(3, "diffu/stats")
    assert "model_state" in raw.answer(3)["result"]
    assert raw.answers_to(2, 0.5) == []  # the message with the dropped header was not run

    stdin.write(b"Content-Length: 50000000000\r\n\r\n{}")  # claimed, never sent
    stdin.flush()
    error = raw.answer(None, timeout=30)["error"]
    assert "a message of 50,000,000,000 bytes" in error["message"], error
    assert raw.proc.poll() is None
    raw.close()  # the end of the input, inside the skipped body: the server exits
    assert "MemoryError" not in raw.stderr()


def test_incremental_edits_agree_with_pygls_and_cost_nothing_per_character(monkeypatch):
    """didChange: the edit lands where pygls's own algorithm puts it (in every position encoding,
    with LSP's line breaks, wide characters, columns inside a surrogate pair), a column past its
    line's end is that end (LSP; pygls put it before the line's last character), and no Python
    step is taken per character of the line: before, a 20 MB single-line file took seconds per
    keystroke, a call per character to count code units."""
    import random

    from lsprotocol import types as lsp
    from pygls.workspace import TextDocument
    from pygls.workspace.position_codec import PositionCodec, Utf8, Utf16

    from diffu_lsp.documents import LspTextDocument

    def change(l1, c1, l2, c2, text):
        return lsp.TextDocumentContentChangePartial(
            range=lsp.Range(start=lsp.Position(line=l1, character=c1), end=lsp.Position(line=l2, character=c2)),
            text=text)

    pieces = ["ab", "😀", "é", "\r\n", "\n", "\r", "\x0c", "xyz", "中", " "]
    rng = random.Random(24)
    for encoding in ("utf-16", "utf-8", "utf-32"):
        codec = PositionCodec(encoding)
        for _ in range(300):
            source = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
            doc = LspTextDocument("file:///t.py", source=source, position_codec=codec)
            ref = LspTextDocument("file:///t.py", source=source, position_codec=codec)
            lines = doc.lines
            if not lines:
                continue
            spots = []
            for _ in range(2):
                line = rng.randrange(len(lines))
                width = codec.client_num_units(lines[line].rstrip("\r\n"))
                spots.append((line, rng.randint(0, width)))
            (l1, c1), (l2, c2) = sorted(spots)
            edit = change(l1, c1, l2, c2, rng.choice(["", "Q", "😀\n", "\r\nzz"]))
            doc.apply_change(edit)
            TextDocument._apply_incremental_change(ref, edit)  # pygls's own, on LSP lines
            assert doc.source == ref.source, (encoding, source, edit)

    doc = LspTextDocument("file:///p.py", source="abc\ndef")
    doc.apply_change(change(0, 99, 0, 99, "!"))  # past the line's end: at its end
    doc.apply_change(change(7, 0, 9, 3, "?"))  # past the document's end: at its end
    assert doc.source == "abc!\ndef?"

    calls = []
    for unit in (Utf8, Utf16):
        counted = unit.code_units_for_char
        monkeypatch.setattr(unit, "code_units_for_char",
                            lambda self, char, counted=counted: calls.append(1) or counted(self, char))
    doc = LspTextDocument("file:///big.py", source="😀" + "x" * 1_000_000)
    for column in (900_000, 900_001, 900_002):
        doc.apply_change(change(0, column, 0, column + 1, "y"))
    assert doc.source.count("y") == 3 and len(calls) < 20, len(calls)
