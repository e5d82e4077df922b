"""Tests for diffu_lsp.scheduler: real worker thread, simulated denoising loops.

Synchronisation uses threading.Events wherever possible; the only timing
assumptions are in the safe direction (a 10 s debounce does not elapse
within a test).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from diffu_lsp import scheduler as scheduler_mod
from diffu_lsp.errors import JobCancelled
from diffu_lsp.scheduler import CancelToken, Scheduler

STEP_S = 0.01


def denoise(steps: int, result=None, *, started: threading.Event | None = None,
            on_cancel: threading.Event | None = None, hold: threading.Event | None = None,
            log: list | None = None, tag=None):
    """What the sampler does: check the token before every forward pass.

    ``started`` is set after the first forward; ``on_cancel`` when the loop
    notices cancellation; ``hold`` (if given) keeps the "model" busy after
    noticing, before returning; ``log`` gets ``tag`` appended on entry.
    """

    def work(token: CancelToken):
        if log is not None:
            log.append(tag)
        for _ in range(steps):
            if token.cancelled:
                if on_cancel is not None:
                    on_cancel.set()
                if hold is not None:
                    assert hold.wait(5)
                raise JobCancelled(token.reason)
            token.forwards += 1
            if started is not None:
                started.set()
            time.sleep(STEP_S)
        return result

    return work


def gate_work(gate: threading.Event, started: threading.Event, result="gate"):
    """Occupies the worker until ``gate`` is set."""

    def work(token: CancelToken):
        started.set()
        assert gate.wait(5)
        return result

    return work


async def wait_event(ev: threading.Event, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not ev.is_set():
        assert time.monotonic() < deadline, "timed out waiting for event"
        await asyncio.sleep(0.001)


async def settle(sched: Scheduler) -> None:
    """Wait until the worker is idle and every record is written."""
    deadline = time.monotonic() + 5
    while sched.stats["running"] is not None or sched.stats["ready"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.01)


@pytest.fixture
async def make_sched():
    made: list[Scheduler] = []

    def make(**kw) -> Scheduler:
        s = Scheduler(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close(timeout=5)


# --------------------------------------------------------------- CancelToken


def test_cancel_token_basics():
    tok = CancelToken()
    assert not tok.cancelled and tok.reason == "" and tok.forwards == 0
    tok.raise_if_cancelled()
    tok.forwards += 3
    assert tok.forwards_after_cancel == 0
    assert tok.cancel("document changed") is True
    assert tok.cancel("again") is False
    assert tok.cancelled and tok.reason == "document changed"
    tok.forwards += 1
    assert tok.forwards_after_cancel == 1
    with pytest.raises(JobCancelled, match="document changed"):
        tok.raise_if_cancelled()
    fresh = CancelToken()
    assert fresh.cancel() and fresh.reason == "cancelled" and "cancelled" in repr(fresh)


def test_cancel_token_thread_safe_single_winner():
    tok = CancelToken()
    barrier = threading.Barrier(8)
    wins: list[bool] = []

    def racer(i):
        barrier.wait()
        wins.append(tok.cancel(f"r{i}"))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1 and tok.cancelled and tok.reason.startswith("r")


# -------------------------------------------------------------- latest-wins


async def test_latest_wins_supersedes_running_job_promptly(make_sched):
    sched = make_sched(debounce_s=0)
    started1, noticed1, hold1 = threading.Event(), threading.Event(), threading.Event()
    started2 = threading.Event()
    j1 = sched.submit("file:///a.py", denoise(500, "old", started=started1, on_cancel=noticed1,
                                              hold=hold1))
    await wait_event(started1)
    j2 = sched.submit("file:///a.py", denoise(2, "new", started=started2))

    # The superseded caller is answered at once, while work 1 is still running.
    assert j1.done() and not hold1.is_set()
    with pytest.raises(JobCancelled) as ei:
        await j1
    assert "superseded" in ei.value.reason and ei.value.job_id == j1.id

    # One model: job 2 must not start before work 1 has returned.
    await wait_event(noticed1)
    await asyncio.sleep(0.03)
    assert not started2.is_set() and sched.stats["running"] == j1.id
    hold1.set()
    assert await asyncio.wait_for(j2.future, 5) == "new"

    await settle(sched)
    r1, r2 = sched.record(j1.id), sched.record(j2.id)
    assert r1.outcome == "superseded" and r1.ran and r1.forwards >= 1
    assert r1.forwards_after_cancel <= 1
    assert r2.outcome == "completed" and r2.forwards == 2
    st = sched.stats
    assert st["superseded"] == 1 and st["completed"] == 1 and st["started"] == 2
    assert st["max_forwards_after_cancel"] <= 1


async def test_superseded_running_job_does_at_most_one_forward_after_cancel(make_sched):
    sched = make_sched(debounce_s=0)
    ids = []
    for _ in range(5):
        started = threading.Event()
        ids.append(sched.submit("k", denoise(300, "x", started=started)).id)
        await wait_event(started)
    last = sched.submit("k", denoise(1, "done"))
    assert await asyncio.wait_for(last.future, 5) == "done"
    await settle(sched)
    recs = [sched.record(i) for i in ids]
    assert all(r.outcome == "superseded" and r.ran for r in recs)
    assert all(r.forwards_after_cancel <= 1 for r in recs)


# ----------------------------------------------------------------- debounce


async def test_debounce_collapses_burst_into_one_run(make_sched):
    sched = make_sched(debounce_s=0.05)
    log: list[int] = []
    burst = []
    for i in range(10):  # ten keystrokes, yielding to the loop in between
        burst.append(sched.submit("doc", denoise(2, i, log=log, tag=i)))
        await asyncio.sleep(0)
    results = await asyncio.wait_for(asyncio.gather(*burst, return_exceptions=True), 5)
    assert results[-1] == 9
    assert all(isinstance(r, JobCancelled) for r in results[:-1])
    assert log == [9]
    await settle(sched)
    st = sched.stats
    assert st["started"] == 1 and st["superseded"] == 9 and st["never_ran"] == 9
    assert all(not sched.record(j.id).ran for j in burst[:-1])


async def test_debounce_false_runs_immediately_and_debounced_waits(make_sched):
    sched = make_sched(debounce_s=10.0)
    log: list[str] = []
    slow = sched.submit("a", denoise(1, "debounced", log=log, tag="a"))
    fast = sched.submit("b", denoise(1, "explicit", log=log, tag="b"), debounce=False)
    assert await asyncio.wait_for(fast.future, 5) == "explicit"
    await asyncio.sleep(0.05)
    assert not slow.done() and log == ["b"]
    assert sched.cancel("a") is True
    with pytest.raises(JobCancelled, match="document changed"):
        await slow
    assert log == ["b"]


# ------------------------------------------------ answers, errors, survival


class Boom(BaseException):
    pass


def raising(exc):
    def work(token):
        token.forwards += 1
        raise exc

    return work


async def test_exceptions_propagate_to_their_caller_and_worker_survives(make_sched):
    sched = make_sched(debounce_s=0)
    j1 = sched.submit("a", raising(ValueError("bad infill")))
    j2 = sched.submit("b", raising(Boom("base exception")))
    j3 = sched.submit("c", denoise(2, 42))
    with pytest.raises(ValueError, match="bad infill"):
        await j1
    with pytest.raises(Boom):
        await j2
    assert await j3 == 42
    assert await sched.submit("a", denoise(1, "still alive")) == "still alive"
    await settle(sched)
    st = sched.stats
    assert st["failed"] == 2 and st["completed"] == 2
    assert sched.record(j1.id).outcome == "failed" and "bad infill" in sched.record(j1.id).reason
    assert sched._thread.is_alive()


async def test_every_submission_is_answered(make_sched):
    sched = make_sched(debounce_s=0.01)
    submitted, explicitly_cancelled = [], set()
    for i in range(30):
        key = f"file:///doc{i % 4}.py"
        work = raising(ValueError(i)) if i % 5 == 3 else denoise(3, i)
        submitted.append(sched.submit(key, work, debounce=i % 2 == 0))
        if i % 7 == 0:
            assert submitted[-1].cancel()
            explicitly_cancelled.add(submitted[-1].id)
        if i % 3 == 0:
            await asyncio.sleep(0.004)
    results = await asyncio.wait_for(asyncio.gather(*submitted, return_exceptions=True), 5)
    assert all(j.done() for j in submitted)
    for i, (job, res) in enumerate(zip(submitted, results)):
        assert isinstance(res, (JobCancelled, ValueError)) or res == i, (i, res)
        assert job.outcome in scheduler_mod.OUTCOMES
    # The last job of each key was not superseded (or cancelled, unless we did).
    for key in {j.key for j in submitted}:
        last = [j for j in submitted if j.key == key][-1]
        expected = ("cancelled",) if last.id in explicitly_cancelled else ("completed", "failed")
        assert last.outcome in expected, last
    await sched.close()
    st = sched.stats
    assert st["pending"] == 0 and st["submitted"] == 30
    assert sum(st[o] for o in scheduler_mod.OUTCOMES) == 30
    assert len(sched.records) == 30 and st["max_forwards_after_cancel"] <= 1


async def test_one_job_at_a_time_on_the_model_thread(make_sched):
    sched = make_sched(debounce_s=0.003)
    lock = threading.Lock()
    active = [0, 0]  # current, max
    threads = set()
    loop_thread = threading.get_ident()

    def work(token):
        threads.add((threading.current_thread().name, threading.get_ident()))
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        try:
            return denoise(3, "ok")(token)
        finally:
            with lock:
                active[0] -= 1

    submitted = []
    for i in range(40):
        submitted.append(sched.submit(f"k{i % 3}", work, debounce=i % 4 != 0))
        if i % 5 == 0:
            await asyncio.sleep(0.006)
    await asyncio.wait_for(asyncio.gather(*submitted, return_exceptions=True), 5)
    await settle(sched)
    assert active[1] == 1
    assert len(threads) == 1
    (name, ident), = threads
    assert name == "diffu-model" and ident != loop_thread


# ------------------------------------------------------------- versions


async def test_stale_versions_are_never_returned(make_sched):
    sched = make_sched(debounce_s=0)
    uri = "file:///v.py"
    sched.note_version(uri, 1)
    assert sched.is_current(uri, 1) and not sched.is_current(uri, 0)
    assert sched.is_current(uri, None) and sched.is_current("unknown", 7)

    # Running job for v1, document changes to v2: stale, answered at once.
    started, noticed = threading.Event(), threading.Event()
    j1 = sched.submit(uri, denoise(300, "v1 result", started=started, on_cancel=noticed),
                      version=1)
    await wait_event(started)
    sched.note_version(uri, 2)
    assert j1.done()
    with pytest.raises(JobCancelled, match="stale"):
        await j1
    await wait_event(noticed)

    # A request for an old version is rejected without displacing the current job.
    cur = sched.submit(uri, denoise(1, "v2 result"), version=2)
    old = sched.submit(uri, denoise(1, "v1 again"), version=1)
    with pytest.raises(JobCancelled, match="stale"):
        await old
    assert await cur == "v2 result"
    await settle(sched)
    assert sched.record(j1.id).outcome == "stale"
    assert sched.record(j1.id).forwards_after_cancel <= 1
    assert sched.record(old.id).outcome == "stale" and not sched.record(old.id).ran


async def test_result_finished_but_not_delivered_is_rejected_if_version_moved(make_sched):
    sched = make_sched(debounce_s=0)
    uri = "file:///race.py"
    sched.note_version(uri, 5)
    finished = threading.Event()

    def work(token):
        token.forwards += 1
        finished.set()
        return "computed for v5"

    job = sched.submit(uri, work, version=5)
    # Block the event loop (deliberately) until the worker has finished the work,
    # so the hand-over callback is pending when the document changes.
    assert finished.wait(5)
    deadline = time.monotonic() + 5
    while job.state != "done":
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert not job.done()
    sched.note_version(uri, 6)
    with pytest.raises(JobCancelled, match="stale"):
        await job
    await settle(sched)
    rec = sched.record(job.id)
    assert rec.outcome == "stale" and rec.ran and rec.forwards == 1


async def test_forget_drops_version_and_cancels(make_sched):
    sched = make_sched(debounce_s=10)
    sched.note_version("u", 3)
    j = sched.submit("u", denoise(1, "x"), version=3)
    sched.forget("u")
    with pytest.raises(JobCancelled, match="document closed"):
        await j
    assert sched.is_current("u", 1)


# ---------------------------------------------------- explicit cancellation


async def test_cancel_specific_jobs(make_sched):
    sched = make_sched(debounce_s=0)
    gate, gate_started = threading.Event(), threading.Event()
    g = sched.submit("gate", gate_work(gate, gate_started))
    await wait_event(gate_started)
    a = sched.submit("a", denoise(1, "a"))
    b = sched.submit("b", denoise(1, "b"))
    assert sched.cancel_job(a.id, "$/cancelRequest") is True
    assert sched.cancel_job(a.id) is False and sched.cancel_job(10_000) is False
    with pytest.raises(JobCancelled, match=r"\$/cancelRequest"):
        await a
    gate.set()
    assert await g == "gate" and await b == "b"
    assert sched.cancel_job(b.id) is False  # already answered
    assert not sched.record(a.id).ran

    # Cancel a running job through its handle (e.g. progress cancelled).
    started = threading.Event()
    c = sched.submit("c", denoise(300, "c", started=started))
    await wait_event(started)
    assert c.cancel("progress cancelled") is True
    with pytest.raises(JobCancelled, match="progress cancelled"):
        await c
    assert await sched.submit("c", denoise(1, "next")) == "next"
    await settle(sched)
    rec = sched.record(c.id)
    assert rec.outcome == "cancelled" and rec.ran and rec.forwards_after_cancel <= 1
    assert sched.cancel("nothing-here") is False


async def test_cancelling_awaiting_task_cancels_job(make_sched):
    """pygls answers $/cancelRequest by cancelling the handler's task."""
    sched = make_sched(debounce_s=0)
    started = threading.Event()

    async def handler():
        return await sched.submit("h", denoise(300, "never", started=started))

    task = asyncio.create_task(handler())
    await wait_event(started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.wait_for(sched.submit("h2", denoise(1, "ok")).future, 5) == "ok"
    await settle(sched)
    rec = [r for r in sched.records if r.key == "h"][0]
    assert rec.outcome == "cancelled" and rec.reason == "request cancelled"
    assert rec.forwards_after_cancel <= 1


# ------------------------------------------------------------- ordering


async def _run_order(sched: Scheduler, keys: list[str]) -> list[str]:
    gate, gate_started = threading.Event(), threading.Event()
    g = sched.submit("gate", gate_work(gate, gate_started))
    await wait_event(gate_started)
    order: list[str] = []
    queued = [sched.submit(k, denoise(1, k, log=order, tag=k)) for k in keys]
    gate.set()
    await asyncio.wait_for(asyncio.gather(g, *queued), 5)
    return order


async def test_newest_first_across_keys(make_sched):
    sched = make_sched(debounce_s=0)
    assert await _run_order(sched, ["a", "b", "c", "d"]) == ["d", "c", "b", "a"]


async def test_starvation_limit_serves_passed_over_jobs(make_sched):
    sched = make_sched(debounce_s=0, starvation_limit=1)
    assert await _run_order(sched, ["a", "b", "c"]) == ["c", "a", "b"]
    fifo = make_sched(debounce_s=0, starvation_limit=0)
    assert await _run_order(fifo, ["a", "b", "c"]) == ["a", "b", "c"]


async def test_a_lower_priority_job_runs_only_when_nothing_else_is_runnable(make_sched):
    sched = make_sched(debounce_s=0, starvation_limit=1)
    gate, gate_started = threading.Event(), threading.Event()
    g = sched.submit("gate", gate_work(gate, gate_started))
    await wait_event(gate_started)
    order: list[str] = []
    queued = [sched.submit(k, denoise(1, k, log=order, tag=k)) for k in ("a", "b")]
    queued.append(sched.submit("low", denoise(1, "low", log=order, tag="low"), priority=-1))  # newest, and last
    gate.set()
    await asyncio.wait_for(asyncio.gather(g, *queued), 5)
    assert order == ["b", "a", "low"]


async def test_cancel_below_stops_the_running_low_priority_job_and_leaves_the_others(make_sched):
    sched = make_sched(debounce_s=0)
    started = threading.Event()
    low = sched.submit("low", denoise(500, "low", started=started), priority=-1)
    await wait_event(started)
    normal = sched.submit("normal", denoise(1, "n"))
    assert sched.cancel_below(0, "preempted") == 1
    with pytest.raises(JobCancelled, match="preempted"):
        await low
    assert await asyncio.wait_for(normal, 5) == "n"
    assert low.token.forwards_after_cancel <= 1


# ------------------------------------------------------------------ close


async def test_close_with_jobs_in_flight(make_sched):
    sched = make_sched(debounce_s=10)
    started = threading.Event()
    running = sched.submit("run", denoise(500, "x", started=started), debounce=False)
    await wait_event(started)
    queued = [sched.submit(f"q{i}", denoise(1, i), debounce=False) for i in range(3)]
    debouncing = [sched.submit(f"d{i}", denoise(1, i)) for i in range(3)]
    t0 = time.monotonic()
    await sched.close()
    assert time.monotonic() - t0 < 2
    for job in [running, *queued, *debouncing]:
        with pytest.raises(JobCancelled, match="scheduler closed"):
            await job
    assert not sched._thread.is_alive()
    late = sched.submit("late", denoise(1, "late"))
    with pytest.raises(JobCancelled, match="scheduler closed"):
        await late
    st = sched.stats
    assert st["pending"] == 0 and st["started"] == 1 and st["never_ran"] == 7
    assert sched.record(running.id).forwards_after_cancel <= 1
    await sched.close()  # idempotent


async def test_the_handler_guard_answers_a_base_exception_but_lets_exit_through(make_sched):
    """A job raising a BaseException that is not an Exception (the tokenizers library's
    PanicException) reaches the handler through the scheduler; the guard answers the request
    (before: it escaped, and pygls never answered). Cancellation and interpreter exit pass."""
    from types import SimpleNamespace

    from diffu_lsp.server import guarded

    sched = make_sched(debounce_s=0)
    shown = []
    ls = SimpleNamespace(show=lambda message, kind: shown.append(message),
                         log_client=lambda message, kind=None: shown.append(message),
                         session=SimpleNamespace(counters={"oom_failures": 0}))

    @guarded(lambda: {"applied": False}, user_facing=True)
    async def command(ls, exc):
        return await sched.submit("doc", raising(exc))

    assert await command(ls, Boom("called `Option::unwrap()` on a `None` value")) == {"applied": False}
    assert len(shown) == 1 and "Boom" in shown[0] and "Option::unwrap()" in shown[0], shown
    with pytest.raises(SystemExit):
        await command(ls, SystemExit(3))
    with pytest.raises(KeyboardInterrupt):
        await command(ls, KeyboardInterrupt())
    assert await command(ls, JobCancelled("superseded")) == {"applied": False}
    assert len(shown) == 1  # neither the exits nor the cancel were reported as failures
    assert await sched.submit("doc", denoise(1, "still serving")) == "still serving"


# ------------------------------------------------------------ after_job


async def test_after_job_runs_once_the_answer_is_handed_over(make_sched):
    """Housekeeping after a job (the daemon's heap trim) never delays its answer: the answer
    arrives while after_job is still running; a job cancelled before it ran has none; an after_job
    that raises leaves the worker serving."""
    gate, calls = threading.Event(), []

    def after_job():
        calls.append(threading.current_thread().name)
        assert gate.wait(5)
        if len(calls) == 2:
            raise RuntimeError("housekeeping failed")

    sched = make_sched(debounce_s=0, after_job=after_job)
    assert await asyncio.wait_for(sched.submit("a", lambda token: "first"), 2) == "first"
    assert calls == [sched.thread_name]  # ran on the worker, still blocked: the answer came anyway
    never_ran = sched.submit("a", lambda token: "superseded")  # waits behind after_job, then is superseded
    second = sched.submit("a", lambda token: "second")
    gate.set()
    with pytest.raises(JobCancelled):
        await never_ran
    assert await asyncio.wait_for(second, 5) == "second"
    assert await asyncio.wait_for(sched.submit("a", lambda token: "third"), 5) == "third"
    await settle(sched)
    assert len(calls) == 3  # first, second (raised), third: none for the superseded one
