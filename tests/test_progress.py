"""A command's progress (issue #31): the first report at once, drafts at a pace a person can follow."""

from __future__ import annotations

import asyncio

from diffu_lsp.job import Step
from diffu_lsp.session import PROGRESS_INTERVAL_S, DraftPace


def test_draft_pace_sends_the_first_step_then_one_per_interval_and_always_the_last():
    now = [0.0]
    pace = DraftPace(interval=0.25, clock=lambda: now[0])
    sent = []
    for i, masked in enumerate([20, 19, 18, 17, 16, 15, 14, 13, 12, 0]):
        now[0] = i * 0.1
        if pace.due(Step(i + 1, masked)):
            sent.append(i + 1)
    # steps at 0.0 s (the first), 0.3, 0.6 s (0.25 s or more after the one before), and the last at 0.9 s
    assert sent == [1, 4, 7, 10]
    assert PROGRESS_INTERVAL_S >= 0.2  # a pace a person can follow


def test_a_command_s_steps_reach_on_step_paced():
    """Session.submit_command hands the engine an on_step that drops the steps DraftPace says are
    not due (the engine here reports 30 steps in a few milliseconds: the first and the last go through)."""
    from test_session import RecordingEngine, _ready_session

    class Stepping(RecordingEngine):
        def run(self, request, cancel, on_step=None, on_oom_retry=None, *, key=""):
            for i in range(30):
                on_step(Step(i + 1, 29 - i, "x"))
            return super().run(request, cancel, on_step, on_oom_retry, key=key)

    session = _ready_session(Stepping())
    seen = []

    async def go():
        target = session.target(None, "def f():\n    \n", 1, 13, 13)
        await session.submit_command("file:///a.py", target, "block", seen.append)
        await session.close()

    asyncio.run(go())
    assert [s.step for s in seen] == [1, 30], seen


def test_the_caller_s_true_on_step_value_does_not_reach_the_engine():
    """The server's on_step is loop.call_soon_threadsafe(...), which returns a Handle (true); the
    sampler takes a true value as "stop now and fill the rest": with the in-process engine every
    command stopped after its first forward. The engine sees None."""
    from test_session import RecordingEngine, _ready_session

    class Stepping(RecordingEngine):
        def run(self, request, cancel, on_step=None, on_oom_retry=None, *, key=""):
            self.stops = [on_step(Step(i + 1, 2 - i, "x")) for i in range(3)]
            return super().run(request, cancel, on_step, on_oom_retry, key=key)

    engine = Stepping()
    session = _ready_session(engine)

    async def go():
        target = session.target(None, "def f():\n    \n", 1, 13, 13)
        await session.submit_command("file:///a.py", target, "block", lambda step: object())  # like a Handle
        await session.close()

    asyncio.run(go())
    assert engine.stops == [None, None, None]
