"""#31: how soon ghost text comes back after the daemon froze, with its standby waiting
(daemon/standby.py): the frozen daemon is replaced as soon as loading the model in the standby
would answer, not after as long as a whole new daemon took to start."""

from __future__ import annotations

import sys

import pytest

from diffu_lsp.daemon import daemon_pid, standby_pid
from diffu_lsp.daemon.client import DaemonEngine
from diffu_lsp.errors import DaemonStuck
from diffu_lsp.job import Suggestion
from diffu_lsp.scheduler import CancelToken

from test_daemon import BUNDLED, alive, runtime, suggest_request, wait_for  # noqa: F401
from test_daemon_faults import frozen_mid_job


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the standby is a Linux fork")
def test_a_frozen_daemon_with_a_standby_is_replaced_as_soon_as_the_standby_can_answer(runtime):
    engine = DaemonEngine(paths=runtime)
    engine.load(BUNDLED)
    engine.start_seconds = 60.0  # a whole new daemon would take this long here: without a standby, waited out
    assert engine.load_seconds < 30  # what the standby must do: load the model
    waiting = wait_for(lambda: standby_pid(runtime), "a standby")
    with frozen_mid_job(engine, runtime) as (frozen, job):
        job["thread"].join(30)
        assert isinstance(job.get("error"), DaemonStuck) and job["error"].frozen, job
        wait_for(lambda: not alive(frozen), "the frozen daemon to be killed", 30)
        assert isinstance(engine.run(suggest_request(), CancelToken(), key="k"), Suggestion)
        assert daemon_pid(runtime) == waiting  # the standby answers in its place

