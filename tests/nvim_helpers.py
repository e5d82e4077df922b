"""Drive a real headless Neovim (via pynvim) loading editors/nvim the way a user would.

The editor is started as `nvim --embed --headless --clean -u <init.lua>`, where init.lua only
prepends editors/nvim to 'runtimepath' and calls `require('diffu').setup{...}`; the server is the
`diffu-lsp` found on PATH (the virtualenv's bin directory is added when it is not already there).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from diffu_lsp.bench.common import wait_for  # noqa: F401 - the tests' poll loop, imported from here

REPO = Path(__file__).resolve().parent.parent
EDITORS_NVIM = REPO / "editors" / "nvim"
VENV_BIN = Path(sys.executable).parent

# Start-up loads a model on CPU: be generous.
READY_TIMEOUT = float(os.environ.get("DIFFU_NVIM_READY_TIMEOUT", "300"))
REQUEST_TIMEOUT = float(os.environ.get("DIFFU_NVIM_REQUEST_TIMEOUT", "240"))

INIT_LUA = """\
vim.opt.runtimepath:prepend({editors_nvim})
vim.o.swapfile = false
vim.o.expandtab = true
vim.o.shiftwidth = 4
-- the test records every workspace/applyEdit the server sends (then applies it as usual)
_G.diffu_test = {{ apply_edits = {{}}, done = {{}} }}
local default_apply = vim.lsp.handlers['workspace/applyEdit']
vim.lsp.handlers['workspace/applyEdit'] = function(err, params, ctx, config)
  local result = default_apply(err, params, ctx, config)
  table.insert(_G.diffu_test.apply_edits, {{ params = params, result = result, t = vim.uv.hrtime() }})
  return result
end
-- and counts inline-completion requests by state (with when each was sent, by Neovim's clock),
-- and keeps the executeCommand params sent
_G.diffu_test.inline = {{ pending = 0, complete = 0, cancel = 0 }}
_G.diffu_test.inline_sent_at = {{}}
_G.diffu_test.commands = {{}}
vim.api.nvim_create_autocmd('LspRequest', {{
  callback = function(args)
    local r = args.data.request
    if r.method == 'textDocument/inlineCompletion' then
      _G.diffu_test.inline[r.type] = (_G.diffu_test.inline[r.type] or 0) + 1
      if r.type == 'pending' then table.insert(_G.diffu_test.inline_sent_at, vim.uv.hrtime()) end
    end
  end,
}})
vim.api.nvim_create_autocmd('LspAttach', {{
  callback = function(args)
    local client = vim.lsp.get_client_by_id(args.data.client_id)
    if not client or client._test_wrapped then return end
    client._test_wrapped = true
    vim.schedule(function() -- after diffu's own wrapper
      local request = client.request
      client.request = function(self, method, params, handler, ...)
        if method == 'workspace/executeCommand' then
          table.insert(_G.diffu_test.commands, vim.deepcopy(params))
        end
        if method == 'textDocument/inlineCompletion' and type(handler) == 'function' then
          local inner = handler
          handler = function(err, result, ...) -- count the answers that carry items
            local items = type(result) == 'table' and (result.items or result) or {{}}
            if not err and #items > 0 then
              _G.diffu_test.inline_items = (_G.diffu_test.inline_items or 0) + 1
            end
            return inner(err, result, ...)
          end
        end
        return request(self, method, params, handler, ...)
      end
    end)
  end,
}})
-- and what diffu echoes (progress), with the room the command line had for it
_G.diffu_test.echoed = {{}}
local echo = vim.api.nvim_echo
vim.api.nvim_echo = function(chunks, history, opts)
  local text = table.concat(vim.tbl_map(function(chunk) return chunk[1] end, chunks))
  table.insert(_G.diffu_test.echoed, {{ text = text, width = vim.fn.strdisplaywidth(text), room = vim.v.echospace,
                                       t = vim.uv.hrtime() }})
  return echo(chunks, history, opts)
end
-- and every diffu/status state received, in order (one sampled now and then misses a short one)
_G.diffu_test.states = {{}}
vim.api.nvim_create_autocmd('User', {{
  pattern = 'DiffuStatus',
  callback = function(args) table.insert(_G.diffu_test.states, (args.data or {{}}).state) end,
}})
vim.api.nvim_create_autocmd('User', {{
  pattern = 'DiffuCommandDone',
  callback = function(args) table.insert(_G.diffu_test.done, args.data) end,
}})
local opts = os.getenv('DIFFU_NVIM_SETUP')
require('diffu').setup(opts and opts ~= '' and vim.json.decode(opts) or {{}})
"""


def search_path() -> str:
    path = os.environ.get("PATH", "")
    if shutil.which("diffu-lsp", path=path) is None or shutil.which("nvim", path=path) is None:
        path = os.pathsep.join([str(VENV_BIN), path])
    return path


def find_nvim() -> str | None:
    return shutil.which("nvim", path=search_path())


def find_server() -> str | None:
    return shutil.which("diffu-lsp", path=search_path())


def write_init(directory: Path) -> Path:
    init = directory / "init.lua"
    init.write_text(INIT_LUA.format(editors_nvim=json.dumps(str(EDITORS_NVIM))))
    return init


def start_nvim(init: Path, cwd: Path, setup: dict | None = None):
    import pynvim

    setup = dict(setup or {})
    test_model = os.environ.get("DIFFU_LSP_TEST_MODEL")  # as tests/test_server.py: another model
    if test_model and "cmd" not in setup:
        setup["cmd"] = ["diffu-lsp", "--model", test_model]
    env = dict(os.environ)
    env["PATH"] = search_path()
    env["DIFFU_NVIM_SETUP"] = json.dumps(setup)
    # keep the editor's own state out of the user's home
    for var, sub in (("XDG_STATE_HOME", "state"), ("XDG_DATA_HOME", "data"), ("XDG_CACHE_HOME", "cache")):
        env[var] = str(cwd / ".xdg" / sub)
    argv = [find_nvim() or "nvim", "--embed", "--headless", "--clean", "-u", str(init)]
    old_cwd = os.getcwd()
    old_env = dict(os.environ)
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        return pynvim.attach("child", argv=argv)
    finally:
        os.environ.clear()
        os.environ.update(old_env)
        os.chdir(old_cwd)


class Editor:
    """Thin convenience layer over a pynvim session."""

    def __init__(self, nvim):
        self.nvim = nvim

    def lua(self, code: str, *args):
        return self.nvim.exec_lua(code, *args)

    def input(self, keys: str) -> None:
        self.nvim.input(keys)

    def mode(self) -> str:
        return self.nvim.api.get_mode()["mode"]

    def lines(self) -> list[str]:
        return self.nvim.current.buffer[:]

    def cursor(self) -> tuple[int, int]:
        row, col = self.nvim.current.window.cursor
        return row, col

    def client_info(self):
        return self.lua(
            """
            local c = vim.lsp.get_clients({ name = 'diffu_lsp', bufnr = 0 })[1]
            if not c then return nil end
            return { id = c.id, initialized = c.initialized == true,
                     stopped = c:is_stopped(), encoding = c.offset_encoding }
            """
        )

    def status(self):
        return self.lua("return require('diffu').status(0)")

    def wait_ready(self, timeout: float = READY_TIMEOUT):
        """Wait for the diffu client to attach and the server to report `ready` (diffu/status).
        A server that never sends diffu/status counts as ready once a request round-trips."""
        def attached():
            info = self.client_info()
            return info if info and info["initialized"] else None

        wait_for(attached, timeout, what="the diffu_lsp client to attach")
        t0 = time.monotonic()

        def ready():
            status = self.status() or {}
            if status.get("state") == "error":
                raise AssertionError(f"server reported an error: {status}")
            if status.get("state") == "ready":
                return status
            if status.get("state") is None and time.monotonic() - t0 > 10:
                # no diffu/status at all: fall back to a successful round trip
                ok = self.lua(
                    """
                    local params = vim.lsp.util.make_position_params(0, 'utf-16')
                    params.context = { triggerKind = 1 }
                    local res = vim.lsp.buf_request_sync(0, 'textDocument/inlineCompletion', params, 20000)
                    if not res then return false end
                    for _, r in pairs(res) do if r.err == nil then return true end end
                    return false
                    """
                )
                return {"state": "ready?", "note": "no diffu/status notification"} if ok else None
            return None

        return wait_for(ready, timeout, interval=0.2, what="diffu/status ready")

    def suggestion(self):
        """The suggestion native inline completion currently offers, plus what is drawn:
        {text, anchor=(row0, col), drawn=[virtual lines], mark=(row0, col)} or None."""
        return self.lua(
            """
            local bufnr = vim.api.nvim_get_current_buf()
            -- the test peeks at Neovim's private inline-completion state (the plugin does not):
            -- 0.12 has no public way to read the item on offer
            local cap = require('vim.lsp._capability').all.inline_completion
            local c = cap and cap.active and cap.active[bufnr]
            local item = c and c.current
            local s = nil
            if item then
              local t = item.insert_text
              if type(t) == 'table' then t = t.value end
              s = { text = t, range = item.range }
            end
            local ns = vim.api.nvim_get_namespaces()['nvim.lsp.inline_completion']
            if not s or not ns then return nil end
            local marks = vim.api.nvim_buf_get_extmarks(bufnr, ns, 0, -1, { details = true })
            if #marks == 0 then return nil end
            local m = marks[1]
            local drawn = {}
            local first = {}
            for _, chunk in ipairs(m[4].virt_text or {}) do table.insert(first, chunk[1]) end
            table.insert(drawn, table.concat(first))
            for _, vl in ipairs(m[4].virt_lines or {}) do
              local parts = {}
              for _, chunk in ipairs(vl) do table.insert(parts, chunk[1]) end
              table.insert(drawn, table.concat(parts))
            end
            local anchor = nil
            if s.range then anchor = { s.range.start.row, s.range.start.col } end
            return { text = s.text, anchor = anchor, drawn = drawn, mark = { m[2], m[3] },
                     tick = vim.api.nvim_buf_get_changedtick(bufnr) }
            """
        )

    def fresh_inline_completion(self, timeout_ms: int = 60000):
        """Ask the server directly for the inline completion at the cursor (what the final text
        should yield); returns the first item's insertText (or None)."""
        return self.lua(
            """
            local client = vim.lsp.get_clients({ name = 'diffu_lsp', bufnr = 0 })[1]
            local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
            params.context = { triggerKind = 1 }
            local res, err = client:request_sync('textDocument/inlineCompletion', params, ...,
                                                 vim.api.nvim_get_current_buf())
            if not res then return { error = tostring(err) } end
            if res.err then return { error = vim.inspect(res.err) } end
            local items = res.result and (res.result.items or res.result) or {}
            local first = items[1]
            if not first then return { text = vim.NIL } end
            local t = first.insertText
            if type(t) == 'table' then t = t.value end
            return { text = t }
            """,
            timeout_ms,
        )


def apply_suggestion(lines: list[str], row0: int, start_col: int, end_col: int, text: str) -> list[str]:
    """`lines` with [start_col, end_col) of line `row0` (byte columns) replaced by `text`."""
    line = lines[row0].encode()
    new = line[:start_col].decode() + text + line[end_col:].decode()
    return lines[:row0] + new.split("\n") + lines[row0 + 1:]
