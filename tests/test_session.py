"""The rooms below the LSP layer, without a server: errors, the engine contract, the session."""

from __future__ import annotations

import pytest

from diffu_lsp import errors, features
from diffu_lsp.settings import Settings


# ------------------------------------------------------------------ errors

def test_every_cancellation_is_a_job_cancelled():
    for cls in (errors.DaemonLost, errors.DaemonStuck, errors.ClusterLost):
        assert issubclass(cls, errors.JobCancelled), cls
        assert issubclass(cls, errors.EngineLost) and issubclass(cls, errors.EngineUnavailable), cls


def test_errors_are_recognised_by_type_not_by_name_or_text():
    import torch

    from diffu_lsp import protocol

    remote_oom = protocol.error_of(protocol.Failed(1, "oom", "CUDA out of memory"))  # from the daemon or a replica
    for error in (torch.OutOfMemoryError("CUDA out of memory"), remote_oom, errors.OutOfMemory("the daemon ran out")):
        assert errors.is_out_of_memory(error), error

    class OutOfMemoryError(RuntimeError):  # the same name, another type
        pass

    assert not errors.is_out_of_memory(OutOfMemoryError("out of memory"))
    assert not errors.is_out_of_memory(RuntimeError("CUDA out of memory"))
    for cls in (errors.DaemonUnavailable, errors.ClusterUnavailable):
        assert issubclass(cls, errors.EngineUnavailable)


def test_out_of_memory_from_any_engine_is_retried_once():
    calls = []

    def run(settings):
        calls.append(settings)
        if len(calls) == 1:
            raise errors.OutOfMemory("the daemon ran out of memory")
        return "ok"

    assert features.retry_on_oom(run, Settings()) == "ok" and len(calls) == 2


def _fake_daemon(answer):
    """A Connection over a socketpair whose far end answers each call with ``answer(id)``."""
    import socket
    import threading

    from diffu_lsp import protocol
    from diffu_lsp.daemon.client import Connection

    near, far = socket.socketpair()
    far.settimeout(10)

    def serve():
        with far:
            while (msg := protocol.read_frame(far)) is not None:
                far.sendall(protocol.encode(answer(msg.id)))

    threading.Thread(target=serve, daemon=True).start()
    return Connection(near, protocol.Welcome(protocol.PROTOCOL, "test", 0, 1), on_lost=lambda reason, stopped: None)


@pytest.mark.parametrize("kind", ["error", "oom"])
def test_the_daemon_client_turns_a_failed_load_into_model_load_failed(kind):
    from diffu_lsp import protocol
    from diffu_lsp.job import ModelKey

    conn = _fake_daemon(lambda id: protocol.Failed(id, kind, "unsupported model_type 'gpt2'"))
    try:
        with pytest.raises(errors.ModelLoadFailed, match="unsupported model_type"):
            conn.load(ModelKey("some/model"))
    finally:
        conn.close()


@pytest.mark.parametrize("kind, expected", [("oom", errors.OutOfMemory), ("cancelled", errors.JobCancelled),
                                            ("error", errors.JobFailed)])
def test_the_daemon_client_turns_a_failed_job_into_its_type(kind, expected):
    from diffu_lsp import protocol
    from diffu_lsp.job import ModelKey, Request
    from diffu_lsp.scheduler import CancelToken

    conn = _fake_daemon(lambda id: protocol.Failed(id, kind, "no"))
    try:
        with pytest.raises(expected):
            conn.submit("file:///a.py", ModelKey(None), Request("suggest", "x", 1, 1, Settings()), CancelToken())
    finally:
        conn.close()


@pytest.mark.parametrize("oom, expected", [(True, errors.OutOfMemory), (False, errors.JobFailed)])
def test_the_cluster_client_turns_a_failed_job_into_its_type(tmp_path, oom, expected):
    """A replica's failed job arrives as a JobFailed (it was a bare RuntimeError), out of memory as
    the one OutOfMemory, whichever engine ran it."""
    import http.server
    import os
    import threading

    import msgspec

    from diffu_lsp import __version__, protocol
    from diffu_lsp.cluster.client import ClusterEngine
    from diffu_lsp.job import Request
    from diffu_lsp.scheduler import CancelToken

    class Replica(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = (protocol.encode(protocol.Welcome(protocol.PROTOCOL, __version__, os.getpid(), 0))
                    + protocol.encode(protocol.Failed(1, "oom" if oom else "error", "the replica's tokenizer panicked")))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replica)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o600)
    engine = ClusterEngine(f"http://127.0.0.1:{server.server_address[1]}", token_file=str(token))
    engine.configure(msgspec.convert({"daemonDeadlineSeconds": 5.0, "engineTokenFile": str(token)}, Settings))
    try:
        with pytest.raises(expected, match="panicked"):
            engine.run(Request("suggest", "x", 1, 1, Settings()), CancelToken(), key="k")
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ the engine contract

def _engines():
    from diffu_lsp.cluster.client import ClusterEngine
    from diffu_lsp.daemon.client import DaemonEngine
    from diffu_lsp.engine import LocalEngine

    return [LocalEngine(), DaemonEngine(), ClusterEngine("http://127.0.0.1:9")]


@pytest.mark.parametrize("engine", _engines(), ids=lambda e: type(e).__name__)
def test_each_runner_implements_the_engine_contract(engine):
    import inspect

    from diffu_lsp.engine import Engine

    assert isinstance(engine, Engine) and isinstance(engine.name, str)
    for method in ("load", "run", "configure", "describe", "close"):
        wanted = inspect.signature(getattr(Engine, method))
        got = inspect.signature(getattr(type(engine), method))
        assert list(got.parameters) == list(wanted.parameters), (method, got)
        for name, parameter in wanted.parameters.items():
            assert got.parameters[name].kind == parameter.kind, (method, name)
            if parameter.default is not inspect.Parameter.empty:
                assert got.parameters[name].default == parameter.default, (method, name)
    engine.close()


def test_only_the_job_settings_travel_to_the_daemon():
    import msgspec

    from diffu_lsp import protocol
    from diffu_lsp.job import JobSettings, Request

    window = Settings(model="org/m", engine="local", debounce_ms=5, log_level="debug", single_line_tokens=20,
                      hole_markers=("<FILL>",))
    request = Request("suggest", "x = ", 4, 4, window)
    assert isinstance(request.settings, JobSettings)
    assert request.settings.single_line_tokens == 20 and request.settings.hole_markers == ("<FILL>",)
    frame = protocol.decode(protocol.encode(protocol.Submit(1, "file:///a.py", protocol.ModelKey(None), request))[protocol.HEADER.size:])
    assert frame.request == request
    sent = msgspec.to_builtins(request)["settings"]
    for editor_only in ("model", "engine", "debounceMs", "logLevel", "daemonIdleSeconds", "maxDocumentBytes",
                        "allowDownload", "engineTokenFile"):
        assert editor_only not in sent, editor_only
    assert set(JobSettings.__struct_fields__) <= set(Settings.__struct_fields__)


# ------------------------------------------------------------------ the window's session

class RecordingEngine:
    """An engine that answers every suggest with ``text`` and keeps the requests it was given."""

    name = "recording"

    def __init__(self, text: str = "value"):
        self.text, self.requests, self.closed = text, [], False

    def load(self, key):
        from diffu_lsp.job import ModelInfo

        return ModelInfo(key.label, "test", "cpu", 4096, 1, 0.0)

    def run(self, request, cancel, on_step=None, on_oom_retry=None, *, key=""):
        from diffu_lsp.job import Suggestion

        self.requests.append(request)
        return Suggestion(self.text, 0, False, 1, 1, 0.0)

    def configure(self, settings):
        pass

    def describe(self):
        return {"engine": self.name}

    def close(self):
        self.closed = True


def _ready_session(engine):
    from diffu_lsp.session import Session

    session = Session(engine, make_engine=lambda choice: RecordingEngine())
    key, generation = session.load_needed()
    assert session.loaded(engine.load(key), generation)
    return session


def test_session_suggests_then_reuses_what_the_user_typed_through():
    import asyncio

    from diffu_lsp.engine import Engine

    engine = RecordingEngine("value + 1")
    assert isinstance(engine, Engine)
    session = _ready_session(engine)
    text = "def f(value):\n    return \n"
    cursor = text.index("return ") + len("return ")

    async def go():
        first = await session.suggest("file:///a.py", text, cursor, 1, debounce=False)
        typed = text[:cursor] + "val" + text[cursor:]
        second = await session.suggest("file:///a.py", typed, cursor + 3, 2, debounce=False)
        await session.close()
        return first, second

    first, second = asyncio.run(go())
    assert first == [("value + 1", 0)] and second == [("ue + 1", 0)]
    assert len(engine.requests) == 1 and session.counters["typed_through_hits"] == 1 and engine.closed


def test_a_huge_document_reaches_the_engine_clipped():
    import asyncio

    engine = RecordingEngine()
    session = _ready_session(engine)
    body = "def f{0}(x):\n    return x + {0}\n\n\n"
    text = "".join(body.format(i) for i in range(40_000)) + "def last(x):\n    return "
    session.use_settings(Settings(max_document_bytes=100_000))
    asyncio.run(session.suggest("file:///big.py", text, len(text), 1, debounce=False))
    (request,) = engine.requests
    assert len(text.encode()) > 1_000_000 and len(request.text) < 100_000
    assert text.endswith(request.text) and request.start == request.end == len(request.text)


def test_clip_keeps_whole_lines_around_the_range():
    from diffu_lsp.session import clip

    text = "".join(f"line {i}\n" for i in range(10_000))
    settings = Settings(max_document_bytes=1_000, prefix_tokens=10, suffix_tokens=10)
    at = text.index("line 5000\n")
    clipped, base = clip(text, at, at, settings)
    assert text[base:base + len(clipped)] == clipped and base <= at < base + len(clipped)
    assert base == 0 or text[base - 1] == "\n"
    assert clip("small", 0, 0, Settings()) == ("small", 0)


def test_switching_engines_closes_the_old_one_and_asks_for_a_load():
    engine = RecordingEngine()
    session = _ready_session(engine)
    assert session.load_needed() is None
    session.use_settings(Settings(engine="local"))
    assert engine.closed and session.engine is not engine and session.engine_setting == "local"
    assert session.load_needed() is not None


def test_refine_verdict():
    from diffu_lsp.session import refine_verdict

    assert refine_verdict("x = 1", "x = 1") == "the model kept the selection as it was"
    assert refine_verdict("x = 1", "  \n") == "the model produced nothing; keeping the selection"
    assert refine_verdict("x = 1", "x = 2") == ""


def test_find_holes_is_the_job_s_own_rule():
    from diffu_lsp import infill
    from diffu_lsp.session import find_holes

    text = "def f(x):\n    ...\n    return x\n"
    settings = Settings()
    assert find_holes(text, 12, 12, settings) == infill.holes_in_range(text, 12, 12, settings.hole_markers)
    assert find_holes(text, 12, 12, settings)


def test_a_progress_line_puts_the_draft_on_one_line_and_cuts_it():
    from diffu_lsp.job import Step
    from diffu_lsp.session import progress_message

    assert progress_message(Step(3, 12)) == "step 3: 12 tokens left"
    assert progress_message(Step(3, 12, "    total = …\n\n    return total\n")) == \
        "step 3: 12 tokens left · total = … ⏎ return total"
    cut = progress_message(Step(1, 40, "x" * 300), width=20)
    assert cut == "step 1: 40 tokens left · " + "x" * 19 + "…"


def test_an_empty_refine_range_is_the_line_it_is_on():
    """What an empty refine selection means is the server's decision (the clients send the cursor):
    the line's text around the cursor, without its line break (LSP's: \\n, \\r\\n, \\r)."""
    from diffu_lsp.session import Session

    session = Session(RecordingEngine(), make_engine=lambda choice: RecordingEngine())
    text = "def f(x):\r\n    return x\rpass\n"
    inside = text.index("return") + 2
    target = session.target(None, text, 1, inside, inside, empty_is_line=True)
    assert text[target.start:target.end] == "    return x"
    assert session.target(None, text, 1, 0, 0, empty_is_line=True).end == len("def f(x):")
    last = text.index("pass")
    assert text[slice(*_span(session.target(None, text, 1, last, last, empty_is_line=True)))] == "pass"
    assert _span(session.target(None, text, 1, inside, inside)) == (inside, inside)  # other commands: as sent
    assert _span(session.target(None, text, 1, 3, 7, empty_is_line=True)) == (3, 7)  # a selection: as sent


def _span(target) -> tuple[int, int]:
    return target.start, target.end
