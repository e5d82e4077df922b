"""`diffu-lsp bench editor` (issue #31): two real Neovims typed into, one asking as Neovim 0.12 does
by itself (200 ms after a key, server debounce 60 ms), one as the plugin does now (debounce_ms 20,
server debounce 0), and one with debounce_ms 150. What the suite records is checked, not how fast it was."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("pynvim", reason="pynvim is not installed (pip install pynvim)")
pytestmark = pytest.mark.skipif(shutil.which("nvim") is None, reason="nvim is not installed")


def test_editor_bench_times_each_key_and_splits_the_server_s_part():
    from diffu_lsp.bench import common, editor

    result = editor.run(common.Options(quick=True, points=1, chars=4, threads=1))
    keys = result["keys"]
    assert set(keys) == {"before", "after", "after, 150 ms"} and all(len(rows) == 4 for rows in keys.values())
    assert [r["pause"] for r in keys["after"]] == [False, False, False, True]  # one burst, then a pause
    for name, debounce in (("before", 60), ("after", 0), ("after, 150 ms", 0)):
        probe = keys[name][-1]
        assert probe["sent_ms"] is not None and probe["answered_ms"] >= probe["sent_ms"], (name, probe)
        assert probe["timeline"] is not None, (name, probe)  # the server's timeline of that request
        if not probe["timeline"]["cached"]:
            assert probe["timeline"]["debounce"] == debounce and probe["timeline"]["forwards"] >= 1, (name, probe)
    # Neovim's own timer cannot ask sooner than 200 ms after the key; the plugin asks after 20 ms
    assert keys["before"][-1]["sent_ms"] >= 199
    assert keys["after"][-1]["sent_ms"] < keys["before"][-1]["sent_ms"]
    latency = common.find_table(result, "Keystroke -> ghost text")
    assert [row[1] for row in latency["rows"]] == [1, 1, 1]  # one probe each
    assert common.find_table(result, "Where the time went")["columns"][3] == "key -> request sent"
