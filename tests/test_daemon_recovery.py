"""#31: how soon ghost text comes back after the daemon froze, with its standby waiting
(daemon/standby.py): the frozen daemon is replaced as soon as loading the model in the standby
would answer, not after as long as a whole new daemon took to start."""

from __future__ import annotations

import os
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


def test_a_hello_reset_by_a_killed_daemon_whose_standby_holds_the_lock_counts_as_no_daemon(runtime):
    """A window that says Hello to a daemon as it is killed gets a reset. The client used to wait
    for the lock's holder to go, taking it for that daemon; with a standby the holder is the
    standby, which took the lock at once and never goes, so the window gave up ("did not answer")
    instead of connecting to it. A reset by a process that does not hold the lock is no daemon.
    (Seen in the full suite: the standby test's reconnect after a kill failed this way.)"""
    import fcntl
    import subprocess

    from diffu_lsp.daemon import open_private, private_folder
    from diffu_lsp.daemon.client import connect

    private_folder(runtime.folder)
    lock = open_private(runtime.lock)  # the standby that took over: it holds the lock, with its pid
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
    dying = subprocess.Popen([sys.executable, "-c", (  # the killed daemon's listener: it resets the Hello
        "import socket, struct, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); print('ready', flush=True)\n"
        "c, _ = s.accept(); c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n"
        "c.recv(1); c.close()\n"), str(runtime.socket)], stdout=subprocess.PIPE, text=True)
    try:
        assert dying.stdout.readline().strip() == "ready"
        assert connect(runtime) is None  # no daemon answers: the caller goes on to the standby (or starts one)
    finally:
        dying.kill()
        dying.wait(10)
        os.close(lock)
