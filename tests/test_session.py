"""The rooms below the LSP layer, without a server: errors, the engine contract, the session."""

from __future__ import annotations

import pytest

from diffu_lsp import errors, features
from diffu_lsp.settings import Settings


# ------------------------------------------------------------------ errors

def test_every_cancellation_is_a_job_cancelled():
    from diffu_lsp.cluster.client import ClusterLost
    from diffu_lsp.daemon.client import DaemonLost, DaemonStuck
    from diffu_lsp.jobs import JobCancelled
    from diffu_lsp.models import DenoiseCancelled

    assert JobCancelled is errors.JobCancelled  # still importable from jobs
    for cls in (DenoiseCancelled, DaemonLost, DaemonStuck, ClusterLost):
        assert issubclass(cls, errors.JobCancelled), cls
    for cls in (DaemonLost, DaemonStuck, ClusterLost):
        assert issubclass(cls, errors.EngineLost) and issubclass(cls, errors.EngineUnavailable), cls


def test_errors_are_recognised_by_type_not_by_name_or_text():
    import torch

    from diffu_lsp import protocol
    from diffu_lsp.cluster import ClusterError
    from diffu_lsp.daemon import DaemonError
    from diffu_lsp.models import ModelLoadError

    remote_oom = protocol.error_of(protocol.Failed(1, "oom", "CUDA out of memory"))  # from the daemon or a replica
    for error in (torch.OutOfMemoryError("CUDA out of memory"), remote_oom, errors.OutOfMemory()):
        assert errors.is_out_of_memory(error), error

    class OutOfMemoryError(RuntimeError):  # the same name, another type
        pass

    assert not errors.is_out_of_memory(OutOfMemoryError("out of memory"))
    assert not errors.is_out_of_memory(RuntimeError("CUDA out of memory"))
    assert issubclass(ModelLoadError, errors.ModelLoadFailed)
    assert issubclass(DaemonError, errors.EngineUnavailable) and issubclass(ClusterError, errors.EngineUnavailable)
    assert all(issubclass(cls, errors.DiffuError) for cls in (ModelLoadError, DaemonError, ClusterError))


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
    return Connection(near, protocol.Welcome(protocol.PROTOCOL, "test", 0, 1), on_lost=lambda reason: None)


@pytest.mark.parametrize("kind", ["error", "oom"])
def test_the_daemon_client_turns_a_failed_load_into_model_load_failed(kind):
    from diffu_lsp import protocol
    from diffu_lsp.engine import ModelKey

    conn = _fake_daemon(lambda id: protocol.Failed(id, kind, "unsupported model_type 'gpt2'"))
    try:
        with pytest.raises(errors.ModelLoadFailed, match="unsupported model_type"):
            conn.load(ModelKey("some/model"))
    finally:
        conn.close()


@pytest.mark.parametrize("kind, expected", [("oom", errors.OutOfMemory), ("cancelled", errors.JobCancelled)])
def test_the_daemon_client_turns_a_failed_job_into_its_type(kind, expected):
    from diffu_lsp import protocol
    from diffu_lsp.engine import ModelKey, Request
    from diffu_lsp.jobs import CancelToken

    conn = _fake_daemon(lambda id: protocol.Failed(id, kind, "no"))
    try:
        with pytest.raises(expected):
            conn.submit("file:///a.py", ModelKey(None), Request("suggest", "x", 1, 1, Settings()), CancelToken())
    finally:
        conn.close()


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


def test_features_does_not_import_the_engine():
    import ast
    from pathlib import Path

    import diffu_lsp.features as features_module

    tree = ast.parse(Path(features_module.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert "engine" not in modules and "job" in modules


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
