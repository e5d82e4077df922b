"""The soak test (issue 12): real servers over stdio and the real model daemon, typed into for a
few minutes while the daemon is frozen, killed, restarted and its runtime folder deleted.
`diffu-lsp bench soak --minutes 60` is the same run for an hour."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from diffu_lsp.bench import common, soak


def test_soak_types_through_every_fault_kind():
    options = common.Options(seed=0, cps=8.0, extra={"minutes": 2.5, "windows": 2, "fault_every": 8.0})
    result = soak.run(options)
    s = result["summary"]
    print(common.render(result))
    print("\n".join(result["timeline"]))
    assert s["failures"] == [], s["failures"]
    # every request answered exactly once, within the bound
    assert s["requests"] > 200 and s["unanswered"] == 0 and s["duplicates"] == 0 and s["late"] == 0
    assert s["worst_answer_s"] <= s["bound_s"]
    assert s["errors"] == 0, s["error_messages"]  # faults answer empty, never with an error
    # every fault kind happened, and every fault was followed by suggestions in every window
    injected = {f["kind"] for f in result["faults"] if not f.get("skipped")}
    assert injected == set(soak.FAULT_KINDS), result["faults"]
    assert all(f["recovery_s"] is not None for f in result["faults"] if not f.get("skipped")), result["faults"]
    # the server's document matched the reference after every edit, and was checked
    assert s["document_checks"] > 100 and s["document_mismatches"] == 0 and s["document_unchecked"] == 0
    assert s["daemons_left_after_stop"] == 0 and s["two_daemons_s"] <= 2.0


def test_document_end_reads_the_refine_action():
    action = {"title": "Diffu: Refine selection", "command": {"command": "diffu.refineSelection", "arguments": [
        {"textDocument": {"uri": "file:///a.py"}, "range": {"start": {"line": 0, "character": 0},
                                                            "end": {"line": 3, "character": 7}}}]}}
    assert soak.document_end([action]) == {"line": 3, "character": 7}
    assert soak.document_end([]) is None and soak.document_end(None) is None


@pytest.mark.parametrize("text", ["x = 1\n    return value\n", "class A:\n    def f(self):\n        pass\n"])
def test_choose_line_spans_a_line_after_its_indentation(text):
    import random

    start, end = soak.choose_line(random.Random(1), text)
    line = text[start:end]
    assert line.strip() == line and "\n" not in line and line


def test_a_daemon_s_standby_is_not_counted_as_a_daemon_even_before_it_is_renamed(tmp_path):
    """The soak counts daemons (at most one at a time) and kills the one serving. A standby is
    forked by the daemon and renames itself (comm `diffu-standby`) a moment later: in between it
    looked like a second daemon, and test_nvim_faults froze it instead of the daemon (the full
    suite saw `ready` all through a freeze). A child of a live daemon is its standby; once the
    daemon is gone the orphan is the daemon."""
    forking = ("import os, sys, time\n"
               "child = os.fork()\n"
               "if child == 0:\n"
               "    time.sleep(60); os._exit(0)\n"
               "print(child, flush=True); time.sleep(60)\n")
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    daemon = subprocess.Popen([sys.executable, "-c", forking, "diffu_lsp", "daemon", "run"], env=env,
                              stdout=subprocess.PIPE, text=True)
    standby = int(daemon.stdout.readline())
    try:
        assert soak.daemons_of(tmp_path) == [daemon.pid]
        assert soak.daemons_of(tmp_path, standbys=True) == sorted([daemon.pid, standby])
        daemon.kill()
        daemon.wait(10)
        assert common.wait_for(lambda: soak.daemons_of(tmp_path) == [standby], 10, "the orphaned standby to count as the daemon")
    finally:
        for pid in (daemon.pid, standby):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
