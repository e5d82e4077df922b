"""The one job protocol and host (diffu_lsp/protocol.py, diffu_lsp/job_host.py) that the daemon and
the cluster both speak: errors that cross it come back as their errors.py type, and a job hosted
by JobHost reports what the window needs (progress, forwards, out-of-memory retries) on either."""

from __future__ import annotations

import asyncio
import io

import pytest

from diffu_lsp import errors, features, protocol
from diffu_lsp.job import ModelKey, Request, Step, Suggestion
from diffu_lsp.job_host import HeldModel, JobHost
from diffu_lsp.scheduler import CancelToken
from diffu_lsp.settings import Settings


class Panic(BaseException):
    """What the tokenizers library raises on some inputs: no Exception."""


def crossed(frame: protocol.Message) -> protocol.Message:
    """``frame`` through the codec, as the daemon's socket and the cluster's HTTP stream carry it."""
    return protocol.read_frame(io.BytesIO(protocol.encode(frame)))


@pytest.mark.parametrize("raised, expected", [
    (errors.JobCancelled("superseded by a keystroke"), errors.JobCancelled),
    (errors.OutOfMemory("CUDA out of memory"), errors.OutOfMemory),
    (errors.ModelLoadFailed("unsupported model_type 'gpt2'"), errors.ModelLoadFailed),
    (errors.RequestTooLarge("the selection is over 64 KiB"), errors.RequestTooLarge),
    (RuntimeError("index out of range"), errors.JobFailed),
    (Panic("tokenizer panicked"), errors.JobFailed),
])
def test_every_error_that_crosses_the_protocol_comes_back_as_its_errors_type(raised, expected):
    frame = crossed(protocol.failed(7, raised, forwards=3, forwards_after_cancel=1))
    assert isinstance(frame, protocol.Failed) and (frame.id, frame.forwards, frame.forwards_after_cancel) == (7, 3, 1)
    error = protocol.error_of(frame)
    assert type(error) is expected and isinstance(error, errors.DiffuError)
    assert str(error) == (raised.reason if isinstance(raised, errors.JobCancelled) else str(raised))
    with pytest.raises(expected):
        protocol.take(frame, CancelToken())


def test_an_interpreter_exit_is_never_turned_into_a_frame():
    with pytest.raises(SystemExit):
        protocol.failed(1, SystemExit(0))


def test_a_client_takes_progress_results_and_retries_from_any_host():
    token, steps, retries = CancelToken(), [], []
    assert protocol.take(crossed(protocol.Progress(1, 4, 9, "def f(")), token, steps.append) is None
    assert token.forwards == 4 and steps[0].text == "def f("
    result = protocol.take(crossed(protocol.Result(1, "refined", 6, oom_retries=2)), token, steps.append,
                           lambda: retries.append(1))
    assert result.value == "refined" and token.forwards == 6 and retries == [1, 1]
    assert isinstance(protocol.take(protocol.Pong(1), token), protocol.Pong)


def submit(**progress) -> protocol.Submit:
    return protocol.Submit(1, "file:///a.py", ModelKey(None), Request("suggest", "x = ", 4, 4, Settings()), **progress)


def test_the_host_reports_progress_forwards_and_out_of_memory_retries(monkeypatch):
    """The same JobHost runs the daemon's and each cluster replica's jobs: the cluster used to drop
    the out-of-memory retry count that the daemon reported."""
    def run(model, request, *, cancel=None, on_step=None, on_oom_retry=lambda: None, drafts=None, key=""):
        on_oom_retry()
        cancel.forwards += 2
        if on_step is not None:
            on_step(Step(2, 0, "x = 1"))
        return Suggestion("1", 0, False, 2, 16, 0.0)

    monkeypatch.setattr(features, "answer", run)
    held, sent = HeldModel(ModelKey(None), model=object()), []

    async def main():
        host = JobHost()
        job, answer = host.submit(held, submit(progress=True), sent.append, key="w1:file:///a.py")
        result = await answer
        await host.sched.close(5)
        return result

    result = asyncio.run(main())
    assert isinstance(result, protocol.Result) and result.value.text == "1"
    assert (result.forwards, result.oom_retries) == (2, 1)
    assert [type(frame) for frame in sent] == [protocol.Progress] and sent[0].text == "x = 1"
    assert held.jobs == 1


@pytest.mark.parametrize("raised, kind", [(errors.RequestTooLarge("too big"), "too_large"), (Panic("p"), "error"),
                                          (errors.OutOfMemory("oom"), "oom")])
def test_a_failed_or_cancelled_job_is_answered_once_with_its_kind(monkeypatch, raised, kind):
    def run(model, request, **_):
        raise raised

    monkeypatch.setattr(features, "answer", run)

    async def main():
        host = JobHost()
        failed = await host.submit(HeldModel(ModelKey(None), object()), submit(), lambda frame: None, key="k")[1]
        job, answer = host.submit(HeldModel(ModelKey(None), object()), submit(), lambda frame: None, key="k")
        job.cancel("typed on")
        cancelled = await answer
        await host.sched.close(5)
        return failed, cancelled

    failed, cancelled = asyncio.run(main())
    assert isinstance(failed, protocol.Failed) and failed.kind == kind
    assert isinstance(cancelled, protocol.Failed) and cancelled.kind == "cancelled" and cancelled.message == "typed on"
