-- diffu.nvim: the Neovim side of diffu-lsp.
--
--   require('diffu').setup{}        -- with editors/nvim on 'runtimepath'
--
-- Enables the `diffu_lsp` config (lsp/diffu_lsp.lua), turns on native inline completion (ghost
-- text, Neovim 0.12+), maps <Tab> to accept (falling back to a literal Tab or your previous <Tab>
-- mapping), <M-Right> / <M-C-Right> to accept one word / one line of it, <M-]>/<M-[> to cycle,
-- and adds :DiffuToggle [buffer|filetype], :DiffuRefine, :DiffuFill, :DiffuComplete, :DiffuCancel,
-- :DiffuStatus, :DiffuRestart, a code-action keymap limited to diffu's actions, and its state
-- (require('diffu').statusline()) to the default 'statusline'. Next edits (the server's hints
-- after an edit): <leader>dn / :DiffuNextEdit jumps to the next one and previews it as virtual
-- text; <Tab> there accepts it.

local M = {}

local NAME = 'diffu_lsp'
local ACTION_KIND = 'refactor.rewrite.diffu'
local COMMANDS = {
  complete = 'diffu.completeBlock',
  fill = 'diffu.fillHoles',
  refine = 'diffu.refineSelection',
  next_edit = 'diffu.nextEdit',
}
local REQUEST_CANCELLED = -32800

---@class diffu.Keymaps
---@field accept string|false  insert mode: accept the shown suggestion (else fall back)
---@field accept_word string|false insert mode: accept its next word (else fall back)
---@field accept_line string|false insert mode: accept its next line (else fall back)
---@field next string|false    insert mode: next suggestion
---@field prev string|false    insert mode: previous suggestion
---@field code_action string|false normal/visual: diffu code actions
---@field next_edit string|false normal: jump to the next predicted edit and preview it (<Tab> accepts)
---@field refine string|false  visual: :DiffuRefine on the selection

---@class diffu.Config
local defaults = {
  --- Overrides for `vim.lsp.config('diffu_lsp', ...)`: e.g. `cmd = { '/path/to/diffu-lsp' }`.
  cmd = nil, ---@type string[]?
  filetypes = nil, ---@type string[]?
  root_markers = nil, ---@type string[]?
  --- Server settings (the `diffu` section, camelCase keys: model, device, debounceMs, ...).
  settings = {},
  --- Show suggestions as ghost text (needs vim.lsp.inline_completion, Neovim 0.12+).
  inline_completion = true,
  --- Ask for a suggestion this many ms after the last change in insert mode. Neovim 0.12 itself
  --- asks a fixed 200 ms after the last key; with a number here the server's own debounce
  --- (settings.debounceMs) is 0 unless you set it. false: Neovim's timing and the server's debounce.
  debounce_ms = 20, ---@type integer|false
  --- Cancel inline-completion requests in flight when the text changes, and let <Tab> accept a
  --- suggestion only at the position it was computed for, or, typed into since, the rest of it
  --- as the server answers it for the cursor now.
  drop_stale = true,
  --- Echo the server's work-done progress in the command line: the model loading, and a command's
  --- draft as it firms up (cut to one screen line).
  progress = true,
  --- Add require('diffu').statusline() (diffu:ready, diffu:busy while a request is in flight,
  --- diffu:off, diffu:loading, diffu:stuck ...) to 'statusline' when that is Neovim's default.
  statusline = true,
  ---@type diffu.Keymaps
  keymaps = {
    accept = '<Tab>',
    accept_word = '<M-Right>',
    accept_line = '<M-C-Right>',
    next = '<M-]>',
    prev = '<M-[>',
    code_action = '<leader>da',
    refine = '<leader>dr',
    next_edit = '<leader>dn',
  },
}

M.config = vim.deepcopy(defaults)

---@type table<integer, {state: string, model?: string, message?: string}>
local statuses = {}

-- Per client: the cancellable work-done progress tokens in flight (for :DiffuCancel).
---@type table<integer, table<string|integer, true>>
local progress_tokens = {}

local augroup = vim.api.nvim_create_augroup('diffu', { clear = true })

-- ------------------------------------------------------------------ helpers

local function resolve_bufnr(bufnr)
  if bufnr == nil or bufnr == 0 then
    return vim.api.nvim_get_current_buf()
  end
  return bufnr
end

local function notify(msg, level)
  vim.notify('diffu: ' .. msg, level or vim.log.levels.INFO)
end

--- The diffu client attached to `bufnr` (or any diffu client).
---@param bufnr? integer
---@return vim.lsp.Client?
function M.client(bufnr)
  local clients = vim.lsp.get_clients({ name = NAME, bufnr = bufnr })
  return clients[1]
end

local function get_client(bufnr)
  local client = M.client(bufnr)
  if not client then
    notify('no diffu_lsp client attached to this buffer', vim.log.levels.WARN)
  end
  return client
end

--- Last `diffu/status` of the client attached to `bufnr` (or of any client).
---@param bufnr? integer
---@return {state: string, model?: string, message?: string}?
function M.status(bufnr)
  local client = M.client(bufnr)
  if client then
    return statuses[client.id]
  end
  return vim.g.diffu_status
end

-- ------------------------------------------------------------------ on/off, in flight

-- What :DiffuToggle (global, filetype) set this session: the server settings it sends every
-- diffu client, also ones that start later.
---@type {inlineCompletion?: boolean, disabledLanguages?: string[]}
local toggled = {}

--- The server settings (the `diffu` section) the client sends.
local function client_settings(client)
  local settings = client and client.settings and client.settings.diffu
  return type(settings) == 'table' and settings or M.config.settings or {}
end

--- Whether `bufnr` gets suggestions as you type: not turned off for the buffer (:DiffuToggle
--- buffer), nor for its filetype or everywhere (the server settings disabledLanguages and
--- inlineCompletion: the server decides by them, also when your diffu-lsp.toml sets them).
---@param bufnr? integer
function M.enabled(bufnr)
  bufnr = resolve_bufnr(bufnr)
  if vim.b[bufnr].diffu_enabled == false then
    return false
  end
  local s = client_settings(M.client(bufnr))
  return s.inlineCompletion ~= false and not vim.tbl_contains(s.disabledLanguages or {}, vim.bo[bufnr].filetype)
end

-- Ghost text on in `bufnr` when it is the current buffer and suggestions are on for it.
local function follow_enabled(bufnr)
  if vim.lsp.inline_completion and M.config.inline_completion and vim.api.nvim_buf_is_valid(bufnr)
      and M.client(bufnr) then
    local on = bufnr == vim.api.nvim_get_current_buf() and M.enabled(bufnr)
    vim.lsp.inline_completion.enable(on, { bufnr = bufnr })
  end
end

-- Send `toggled` to `client` when its settings differ (the server then pulls them).
local function send_toggled(client)
  if next(toggled) == nil then
    return
  end
  client.settings.diffu = client.settings.diffu or vim.empty_dict()
  local settings = client.settings.diffu
  local changed = false
  for key, value in pairs(toggled) do
    if not vim.deep_equal(settings[key], value) then
      settings[key] = value
      changed = true
    end
  end
  if changed then
    client:notify('workspace/didChangeConfiguration', { settings = client.settings })
  end
end

--- Turn suggestions as you type off or on (`enable` nil: the other way round) everywhere (`scope`
--- 'global', the default), in the current buffer ('buffer'), or for its filetype ('filetype').
--- 'global' and 'filetype' set the server settings inlineCompletion and disabledLanguages for this
--- Neovim session; 'buffer' only stops this client asking.
---@param scope? 'global'|'buffer'|'filetype'
---@param enable? boolean
function M.toggle(scope, enable)
  scope = scope or 'global'
  local bufnr = vim.api.nvim_get_current_buf()
  local settings = client_settings(M.client(bufnr))
  local what
  if scope == 'buffer' then
    if enable == nil then
      enable = vim.b[bufnr].diffu_enabled == false
    end
    vim.b[bufnr].diffu_enabled = enable
    what = 'in this buffer'
  elseif scope == 'filetype' then
    local filetype = vim.bo[bufnr].filetype
    local languages = vim.tbl_filter(function(l)
      return l ~= filetype
    end, settings.disabledLanguages or {})
    if enable == nil then
      enable = #languages < #(settings.disabledLanguages or {})
    end
    if not enable then
      table.insert(languages, filetype)
    end
    toggled.disabledLanguages = languages
    what = ('for %s files'):format(filetype ~= '' and filetype or 'unnamed')
  elseif scope == 'global' then
    if enable == nil then
      enable = settings.inlineCompletion == false
    end
    toggled.inlineCompletion = enable
    what = 'everywhere'
  else
    return notify(('unknown scope %q: global, buffer or filetype'):format(scope), vim.log.levels.ERROR)
  end
  M.config.settings = vim.tbl_extend('force', M.config.settings or {}, toggled)
  for _, client in ipairs(vim.lsp.get_clients({ name = NAME })) do
    send_toggled(client)
  end
  follow_enabled(bufnr)
  notify(('suggestions %s %s%s'):format(enable and 'on' or 'off', what,
    enable and not M.enabled(bufnr) and ' (still off here: see :DiffuStatus)' or ''))
  vim.cmd.redrawstatus()
end

-- Whether one of diffu's requests for `bufnr` (a suggestion, a command) is in flight.
local function in_flight(bufnr)
  for _, client in ipairs(vim.lsp.get_clients({ name = NAME, bufnr = bufnr })) do
    for _, req in pairs(client.requests) do
      if req.type == 'pending' and req.bufnr == bufnr
          and (req.method == 'textDocument/inlineCompletion' or req.method == 'workspace/executeCommand') then
        return true
      end
    end
  end
  return false
end

--- A short string for 'statusline', for the current buffer: "diffu:ready", "diffu:busy" (a
--- request in flight), "diffu:off" (suggestions off here), "diffu:loading", "diffu:stuck",
--- "diffu:restarting", "diffu:error"; "" without a diffu client.
function M.statusline()
  local bufnr = vim.api.nvim_get_current_buf()
  local client = M.client(bufnr)
  if not client then
    return ''
  end
  local s = statuses[client.id]
  local state = s and s.state or 'starting'
  if state == 'ready' and not M.enabled(bufnr) then
    state = 'off'
  elseif state == 'ready' and in_flight(bufnr) then
    state = 'busy'
  end
  return 'diffu:' .. state
end

-- The default 'statusline' with M.statusline() before the ruler (nothing when it is empty).
local function add_to_statusline()
  local default = vim.api.nvim_get_option_info2('statusline', {}).default
  if vim.go.statusline ~= default then
    return -- yours: add %{v:lua.require'diffu'.statusline()} where you like
  end
  local component = "%(%{v:lua.require'diffu'.statusline()} %)"
  local at = default:find('%{% &ruler', 1, true)
  vim.go.statusline = at and (default:sub(1, at - 1) .. component .. default:sub(at)) or (default .. component)
end

-- Accepting goes through the public vim.lsp.inline_completion.get(). Its own accept replaces the
-- range the server answered, so characters typed after the request but before <Tab> would stay
-- behind the inserted text (neovim/neovim#36529, fixed upstream by #41434, later than the 0.12
-- builds we test). The client does no range arithmetic of its own: it applies an item only at the
-- position the server computed it for (its range starts at the cursor). <Tab> on an older one,
-- typed into since (Neovim asks again only 200 ms after the last key), asks the server for the
-- cursor now: a suggestion typed through comes from its cache at once.

--- What accepting `part` of a suggestion's `text` inserts: 'word': any characters that are not
--- keyword characters ('iskeyword'), then the keyword characters after them ("(path" of
--- "(path)"); 'line': any line breaks, then the rest of that line; nil: all of it.
---@param text string
---@param part? 'word'|'line'
---@return string
function M.part_of(text, part)
  if part == 'word' then
    return vim.fn.matchstr(text, [[^\%(\k\@!\_.\)*\k*]])
  elseif part == 'line' then
    return text:match('^\n*[^\n]*')
  end
  return text
end

-- Apply (`part` of) an item the server answered for the cursor (its range starts there). A part
-- only inserts: the characters after the cursor that the item replaces stay until the rest is
-- accepted.
local function apply_fresh(bufnr, win, client, fresh, part)
  local cursor = vim.api.nvim_win_get_cursor(win)
  local at = vim.lsp.util.make_position_params(win, client.offset_encoding).position
  local text = M.part_of(fresh.insertText, part)
  local range = fresh.range or { start = at, ['end'] = at }
  if text ~= fresh.insertText then
    range = { start = range.start, ['end'] = range.start }
  end
  vim.lsp.util.apply_text_edits({ { range = range, newText = text } }, bufnr, client.offset_encoding)
  local lines = vim.split(text, '\n', { plain = true })
  vim.api.nvim_win_set_cursor(win, { cursor[1] + #lines - 1, (#lines == 1 and cursor[2] or 0) + #lines[#lines] })
end

-- <Tab> after typing the first characters of the shown item: accept the rest, as the server
-- answers it for the cursor now, if it is exactly the rest of what was shown and nothing moved
-- meanwhile. Typed text that differs from the item: nothing to accept (no request).
local function accept_typed_through(bufnr, win, item, part)
  local client = vim.lsp.get_client_by_id(item.client_id)
  local cursor = vim.api.nvim_win_get_cursor(win)
  local start = item.range.start
  if not client or type(item.insert_text) ~= 'string' or start.row ~= cursor[1] - 1 or start.col > cursor[2] then
    return
  end
  local typed = vim.api.nvim_buf_get_text(bufnr, start.row, start.col, start.row, cursor[2], {})[1]
  if item.insert_text:sub(1, #typed) ~= typed then
    return
  end
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  params.context = { triggerKind = vim.lsp.protocol.InlineCompletionTriggerKind.Invoked }
  client:request('textDocument/inlineCompletion', params, function(err, result)
    local fresh -- the candidate (setting candidates) that is the rest of the one shown
    for _, candidate in ipairs(not err and result and (result.items or result) or {}) do
      if type(candidate.insertText) == 'string' and typed .. candidate.insertText == item.insert_text then
        fresh = fresh or candidate
      end
    end
    if fresh and vim.api.nvim_buf_get_changedtick(bufnr) == tick
        and vim.deep_equal(vim.api.nvim_win_get_cursor(win), cursor) then
      apply_fresh(bufnr, win, client, fresh, part)
    end
  end, bufnr)
end

local function apply_item(bufnr, item, part)
  local win = vim.fn.bufwinid(bufnr)
  local text = item.insert_text
  if type(text) == 'table' then
    if text.kind == 'snippet' then
      vim.snippet.expand(text.value)
    end
  elseif item.range then
    local cur = vim.api.nvim_win_get_cursor(win)
    local start = item.range.start
    if M.config.drop_stale and (start.row ~= cur[1] - 1 or start.col ~= cur[2]) then
      return accept_typed_through(bufnr, win, item, part) -- computed for another position
    end
    local end_ = item.range.end_
    if part then
      text = M.part_of(text, part)
      if text ~= item.insert_text then
        end_ = start -- only insert (see apply_fresh)
      end
    end
    local lines = vim.split(text, '\n', { plain = true })
    vim.api.nvim_buf_set_text(bufnr, start.row, start.col, end_.row, end_.col, lines)
    vim.api.nvim_win_set_cursor(win, { start.row + #lines, (#lines == 1 and start.col or 0) + #lines[#lines] })
  else
    vim.api.nvim_paste(M.part_of(text, part), false, -1)
  end
  if item.command and (not part or M.part_of(item.insert_text, part) == item.insert_text) then
    local client = vim.lsp.get_client_by_id(item.client_id)
    if client then
      client:exec_cmd(item.command, { bufnr = bufnr })
    end
  end
end

--- Accept the suggestion shown in the current buffer, or its next word (`part` 'word') or line
--- ('line'): the rest is then shown again (the server answers it from its cache). Returns false
--- if there is none.
---@param part? 'word'|'line'
function M.accept(part)
  if not (vim.lsp.inline_completion and vim.lsp.inline_completion.get) then
    return false
  end
  local bufnr = vim.api.nvim_get_current_buf()
  return vim.lsp.inline_completion.get({
    bufnr = bufnr,
    on_accept = function(item)
      apply_item(bufnr, item, part)
    end,
  })
end

-- Replay a mapping saved with maparg(..., true) (used when there is nothing to accept).
local function replay(prev, lhs)
  if not prev or vim.tbl_isempty(prev) then
    return vim.keycode(lhs)
  end
  local mode = prev.noremap == 1 and 'n' or 'm'
  local keys
  if prev.callback then
    if prev.expr == 1 then
      keys = prev.callback() or ''
    else
      vim.schedule(prev.callback)
      return ''
    end
  else
    keys = prev.rhs or ''
    if prev.expr == 1 then
      keys = vim.api.nvim_eval(keys)
    end
  end
  if prev.expr ~= 1 or prev.replace_keycodes == 1 or not prev.callback then
    keys = vim.api.nvim_replace_termcodes(keys, true, true, true)
  end
  vim.api.nvim_feedkeys(keys, 'i' .. mode, false)
  return ''
end

-- ------------------------------------------------------------------ ranges

--- LSP range from (1-based row, 0-based byte col) marks with an *inclusive* end, as visual marks
--- are. Linewise (or past-the-end) end columns mean "to the end of that line".
---@return lsp.Range
function M.range_from_marks(bufnr, client, srow, scol, erow, ecol, linewise)
  local enc = client.offset_encoding
  local function getline(r)
    return vim.api.nvim_buf_get_lines(bufnr, r - 1, r, false)[1] or ''
  end
  if linewise then
    scol = 0
  end
  local eline = getline(erow)
  -- end (exclusive) in bytes: past the last selected character
  local end_byte
  if linewise or ecol >= #eline then
    end_byte = #eline
  elseif vim.o.selection == 'exclusive' then
    end_byte = ecol
  else
    local char_len = vim.str_utf_end(eline, ecol + 1) + 1
    end_byte = ecol + char_len
  end
  scol = math.min(scol, #getline(srow))
  local start_col = scol
  local params = vim.lsp.util.make_given_range_params(
    { srow, start_col },
    { erow, math.max(end_byte - 1, 0) },
    bufnr,
    enc
  )
  -- make_given_range_params adds one code unit to the end; recompute it exactly for multibyte
  -- characters, empty lines and line ends.
  params.range['end'].character = vim.str_utfindex(eline, enc, end_byte, false)
  return params.range
end

--- The range a `:command` was given: the visual selection (charwise) when the command was run
--- from visual mode, else the lines line1..line2.
local function command_range(opts, bufnr, client)
  local vs = vim.api.nvim_buf_get_mark(bufnr, '<')
  local ve = vim.api.nvim_buf_get_mark(bufnr, '>')
  local vmode = vim.fn.visualmode()
  if vs[1] == opts.line1 and ve[1] == opts.line2 and vmode ~= '' then
    return M.range_from_marks(bufnr, client, vs[1], vs[2], ve[1], ve[2], vmode == 'V')
  end
  return M.range_from_marks(bufnr, client, opts.line1, 0, opts.line2, 0, true)
end

-- ------------------------------------------------------------------ server commands

-- Commands in flight: { client_id, id, command, title, bufnr, cancelled }
local running = {}

local function command_done(entry, result, err)
  for k, e in ipairs(running) do
    if e == entry then
      table.remove(running, k)
      break
    end
  end
  -- for scripts and tests: data = { command, result?, err?, bufnr }
  vim.api.nvim_exec_autocmds('User', {
    pattern = 'DiffuCommandDone',
    modeline = false,
    data = { command = entry.command, result = result, err = err, bufnr = entry.bufnr },
  })
end

local function exec(bufnr, client, command, args, title)
  local params = vim.tbl_extend('force', { textDocument = { uri = vim.uri_from_bufnr(bufnr) } }, args)
  local entry = { client_id = client.id, command = command, title = title, bufnr = bufnr }
  local before = {}
  for id in pairs(client.requests) do
    before[id] = true
  end
  client:exec_cmd({ title = title, command = command, arguments = { params } }, { bufnr = bufnr }, function(err, result)
    if entry.cancelled then
      return -- already reported by M.cancel()
    end
    if err then -- a command that changes nothing: the server has said why (window/showMessage)
      vim.notify(('%s failed: %s'):format(title, err.message or vim.inspect(err)), vim.log.levels.ERROR)
    end
    command_done(entry, result, err)
  end)
  for id, req in pairs(client.requests) do
    if not before[id] and req.method == 'workspace/executeCommand' then
      entry.id = id
    end
  end
  if entry.id then
    table.insert(running, entry)
  end
end

-- Run a server command on `bufnr`: its one argument `arg` is `value`, else `default(bufnr, client)`.
local function run_command(bufnr, command, title, arg, value, default)
  bufnr = resolve_bufnr(bufnr)
  local client = get_client(bufnr)
  if client then
    exec(bufnr, client, command, { [arg] = value or default(bufnr, client) }, title)
  end
end

--- The cursor as an empty LSP range: the server decides what it means for a command.
local function cursor_range(_, client)
  local position = vim.lsp.util.make_position_params(0, client.offset_encoding).position
  return { start = position, ['end'] = position }
end

--- Refine (regenerate) a range: `range` is an LSP range; default the cursor as an empty range,
--- which the server takes as the line it is on (it decides, for every editor alike).
function M.refine(range, bufnr)
  run_command(bufnr, COMMANDS.refine, 'Diffu: Refine Selection', 'range', range, cursor_range)
end

--- Fill holes in `range` (LSP range); default the cursor as an empty range, which the server
--- takes as the enclosing function (it decides what that is, for every editor alike).
function M.fill(range, bufnr)
  run_command(bufnr, COMMANDS.fill, 'Diffu: Fill Holes', 'range', range, cursor_range)
end

--- Complete a block at `position` (LSP position); default the cursor (after the last character
--- of the line when the cursor is on it in normal mode).
function M.complete(position, bufnr)
  run_command(bufnr, COMMANDS.complete, 'Diffu: Complete Block', 'position', position, function(_, client)
    local at = vim.lsp.util.make_position_params(0, client.offset_encoding).position
    local mode = vim.api.nvim_get_mode().mode
    local line = vim.api.nvim_get_current_line()
    local col = vim.api.nvim_win_get_cursor(0)[2]
    if mode:sub(1, 1) == 'n' and #line > 0 and col + vim.str_utf_end(line, col + 1) + 1 >= #line then
      at.character = vim.str_utfindex(line, client.offset_encoding, #line, false)
    end
    return at
  end)
end

--- Cancel diffu commands (refine, fill, complete) still running for `bufnr`.
function M.cancel(bufnr)
  bufnr = resolve_bufnr(bufnr)
  local n = 0
  for _, entry in ipairs({ unpack(running) }) do
    if entry.bufnr == bufnr and not entry.cancelled then
      local client = vim.lsp.get_client_by_id(entry.client_id)
      if client then
        -- the server stops the job on either: the request's $/cancelRequest, or the progress'
        -- window/workDoneProgress/cancel
        for token in pairs(progress_tokens[client.id] or {}) do
          client:notify('window/workDoneProgress/cancel', { token = token })
        end
        local req = client.requests[entry.id]
        if req and req.type == 'pending' then
          client:cancel_request(entry.id)
        end
      end
      entry.cancelled = true
      n = n + 1
      vim.notify(entry.title .. ': cancelled', vim.log.levels.INFO)
      command_done(entry, nil, { code = REQUEST_CANCELLED, message = 'cancelled' })
    end
  end
  if n == 0 then
    notify('nothing to cancel')
  end
end

-- ------------------------------------------------------------------ next edits

local next_ns = vim.api.nvim_create_namespace('diffu_next_edit')
-- Per buffer: the previewed prediction { range, newText, row, col, tick } while shown.
local previews = {}

local function clear_preview(bufnr)
  if not previews[bufnr] then
    return
  end
  previews[bufnr] = nil
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.api.nvim_buf_clear_namespace(bufnr, next_ns, 0, -1)
    pcall(vim.keymap.del, 'n', '<Tab>', { buffer = bufnr })
  end
end

--- Accept the previewed next edit (<Tab> on it); false if none is shown here.
function M.accept_next_edit(bufnr)
  bufnr = resolve_bufnr(bufnr)
  local p = previews[bufnr]
  local client = get_client(bufnr)
  if not p or not client or vim.api.nvim_buf_get_changedtick(bufnr) ~= p.tick then
    clear_preview(bufnr)
    return false
  end
  clear_preview(bufnr)
  vim.lsp.util.apply_text_edits({ { range = p.range, newText = p.newText } }, bufnr, client.offset_encoding)
  return true
end

--- Jump to the next predicted edit after the cursor (wrapping around) and preview it as virtual
--- text; <Tab> there accepts it, moving or typing drops the preview.
function M.next_edit(bufnr)
  bufnr = resolve_bufnr(bufnr)
  local client = get_client(bufnr)
  if not client then
    return
  end
  clear_preview(bufnr)
  local position = vim.lsp.util.make_position_params(0, client.offset_encoding).position
  local args = { textDocument = { uri = vim.uri_from_bufnr(bufnr) }, position = position }
  client:exec_cmd({ title = 'Diffu: Next Edit', command = COMMANDS.next_edit, arguments = { args } }, { bufnr = bufnr },
    function(err, result)
      vim.api.nvim_exec_autocmds('User', { pattern = 'DiffuNextEdit', modeline = false,
        data = { result = result, err = err, bufnr = bufnr } })
      if err or type(result) ~= 'table' or not vim.api.nvim_buf_is_valid(bufnr) then
        if not err then
          vim.notify('diffu: no next edit predicted', vim.log.levels.INFO)
        end
        return
      end
      local start = result.range.start
      local line = vim.api.nvim_buf_get_lines(bufnr, start.line, start.line + 1, false)[1] or ''
      local col = vim.str_byteindex(line, client.offset_encoding, start.character, false)
      local stop = result.range['end']
      local end_col = stop.line == start.line and vim.str_byteindex(line, client.offset_encoding, stop.character, false)
        or #line
      if vim.api.nvim_get_current_buf() == bufnr then
        vim.api.nvim_win_set_cursor(0, { start.line + 1, col })
      end
      vim.api.nvim_buf_set_extmark(bufnr, next_ns, start.line, col, {
        end_col = end_col, hl_group = 'DiagnosticUnnecessary',
        virt_text = { { result.newText, 'DiagnosticHint' } }, virt_text_pos = 'inline',
      })
      previews[bufnr] = { range = result.range, newText = result.newText, row = start.line, col = col,
        tick = vim.api.nvim_buf_get_changedtick(bufnr) }
      vim.keymap.set('n', '<Tab>', function()
        M.accept_next_edit(bufnr)
      end, { buffer = bufnr, desc = 'diffu: accept the previewed next edit', silent = true })
      vim.api.nvim_create_autocmd({ 'CursorMoved', 'TextChanged', 'TextChangedI', 'InsertEnter' }, {
        group = augroup, buffer = bufnr, callback = function()
          local q = previews[bufnr]
          if not q then
            return true
          end
          local cursor = vim.api.nvim_win_get_cursor(0)
          if vim.api.nvim_buf_get_changedtick(bufnr) ~= q.tick or cursor[1] - 1 ~= q.row then
            clear_preview(bufnr)
            return true
          end
        end })
    end)
end

--- Code actions of diffu's kinds only.
function M.code_action()
  vim.lsp.buf.code_action({ context = { only = { ACTION_KIND } } })
end

--- Restart the diffu_lsp client(s).
function M.restart()
  local clients = vim.lsp.get_clients({ name = NAME })
  vim.lsp.enable(NAME, false)
  vim.wait(5000, function()
    for _, c in ipairs(clients) do
      if not c:is_stopped() then
        return false
      end
    end
    return true
  end, 50)
  for _, c in ipairs(clients) do
    if not c:is_stopped() then
      c:stop(true)
    end
  end
  vim.lsp.enable(NAME)
end

-- ------------------------------------------------------------------ attach

-- Neovim 0.12 asks for an inline completion a fixed 200 ms after the last key (the timer of its
-- private Completor:automatic_request; no option). With `debounce_ms` diffu asks sooner through
-- that same Completor's request(), so Neovim's own drawing, accepting and cycling work on the
-- answer as before. A Neovim without those private functions keeps its own timing.
---@type table<integer, uv.uv_timer_t>
local request_timers = {}

local function native_completor(bufnr)
  local ok, capability = pcall(require, 'vim.lsp._capability')
  local class = ok and type(capability) == 'table' and capability.all and capability.all.inline_completion
  local completor = type(class) == 'table' and class.active and class.active[bufnr]
  if completor and type(completor.request) == 'function' and type(completor.reset_timer) == 'function' then
    return completor
  end
end

-- Ask for a suggestion `debounce_ms` after the last change of `bufnr` (a newer change restarts
-- the wait; the server drops the job of a request that a newer one supersedes). Neovim's own timer,
-- started by the key's CursorMovedI just before this TextChangedI, is stopped: it would ask again
-- for the same text (or first, with a debounce_ms over 200).
local function request_soon(bufnr)
  local native = native_completor(bufnr)
  if native then
    native:reset_timer()
  end
  local timer = request_timers[bufnr]
  if not timer or timer:is_closing() then
    timer = assert(vim.uv.new_timer())
    request_timers[bufnr] = timer
  end
  timer:stop()
  timer:start(M.config.debounce_ms, 0, vim.schedule_wrap(function()
    local completor = native_completor(bufnr)
    if not completor or bufnr ~= vim.api.nvim_get_current_buf() or not vim.api.nvim_get_mode().mode:match('^i') then
      return
    end
    completor:reset_timer() -- restarted meanwhile by a cursor move without a change
    completor:request(vim.lsp.protocol.InlineCompletionTriggerKind.Automatic)
  end))
end

local function stop_request_timer(bufnr)
  local timer = request_timers[bufnr]
  request_timers[bufnr] = nil
  if timer and not timer:is_closing() then
    timer:stop()
    timer:close()
  end
end

local function cancel_inline_requests(client, bufnr)
  for id, req in pairs(client.requests) do
    if req.type == 'pending' and req.method == 'textDocument/inlineCompletion' and req.bufnr == bufnr then
      client:cancel_request(id)
    end
  end
end

local function set_buffer_keymaps(bufnr)
  local km = M.config.keymaps or {}
  local function map(mode, lhs, rhs, desc, opts)
    if not lhs or lhs == '' then
      return
    end
    vim.keymap.set(mode, lhs, rhs, vim.tbl_extend('force', { buffer = bufnr, desc = desc, silent = true }, opts or {}))
  end
  local function unmapped(mode, lhs)
    return lhs and vim.fn.maparg(lhs, mode) == ''
  end

  -- an accept key does its own thing (a literal Tab, your mapping) when there is nothing to accept
  local function map_accept(lhs, part, desc)
    local mapped = vim.b[bufnr].diffu_accept_mapped or {}
    if not lhs or lhs == '' or mapped[lhs] then
      return
    end
    local prev = vim.fn.maparg(lhs, 'i', false, true)
    if prev.buffer == 1 and vim.startswith(prev.desc or '', 'diffu: accept') then
      prev = {}
    end
    map('i', lhs, function()
      if M.accept(part) then
        return ''
      end
      return replay(prev, lhs)
    end, desc, { expr = true, replace_keycodes = false })
    mapped[lhs] = true
    vim.b[bufnr].diffu_accept_mapped = mapped
  end

  if vim.lsp.inline_completion and M.config.inline_completion then
    map_accept(km.accept, nil, 'diffu: accept suggestion')
    map_accept(km.accept_word, 'word', 'diffu: accept the next word of the suggestion')
    map_accept(km.accept_line, 'line', 'diffu: accept the next line of the suggestion')
    map('i', km.next, function()
      vim.lsp.inline_completion.select({ bufnr = bufnr, count = 1 })
    end, 'diffu: next suggestion')
    map('i', km.prev, function()
      vim.lsp.inline_completion.select({ bufnr = bufnr, count = -1 })
    end, 'diffu: previous suggestion')
  end
  if km.code_action and unmapped('n', km.code_action) then
    map({ 'n', 'x' }, km.code_action, M.code_action, 'diffu: code actions')
  end
  if km.next_edit and unmapped('n', km.next_edit) then
    map('n', km.next_edit, function()
      M.next_edit(bufnr)
    end, 'diffu: jump to the next predicted edit')
  end
  if km.refine and unmapped('x', km.refine) then
    map('x', km.refine, ':DiffuRefine<CR>', 'diffu: refine selection')
  end
end

-- Inline completion on in the current buffer only. Neovim builds before neovim/neovim#35965
-- (0.12-dev) registered the inline-completion autocmds for every buffer, so each attached buffer
-- asked for a suggestion at the current window's cursor ("Index out of bounds" in a shorter one);
-- enabling it per buffer as the buffer is entered is the public way round that.
local function follow_current_buffer(bufnr)
  follow_enabled(bufnr)
  vim.api.nvim_create_autocmd('BufEnter', { group = augroup, buffer = bufnr, callback = function()
    follow_enabled(bufnr)
  end })
  vim.api.nvim_create_autocmd('BufLeave', { group = augroup, buffer = bufnr, callback = function()
    if vim.api.nvim_buf_is_valid(bufnr) then
      vim.lsp.inline_completion.enable(false, { bufnr = bufnr })
    end
  end })
  vim.api.nvim_create_autocmd('FileType', { group = augroup, buffer = bufnr, callback = function()
    follow_enabled(bufnr)
  end })
end

local function on_attach(client, bufnr)
  vim.api.nvim_clear_autocmds({ group = augroup, buffer = bufnr })
  send_toggled(client)
  if vim.lsp.inline_completion and M.config.inline_completion then
    follow_current_buffer(bufnr)
  end
  set_buffer_keymaps(bufnr)

  if M.config.drop_stale and vim.lsp.inline_completion then
    -- A request for text that has changed since is of no use: cancel it (the server stops its
    -- job). Neovim 0.12 has no public way to drop the suggestion already shown: the native
    -- handler keeps an expired item until the next answer (on purpose upstream, see
    -- neovim/neovim#35990 and #35992); accepting checks its position instead.
    vim.api.nvim_create_autocmd('TextChangedI', {
      group = augroup,
      buffer = bufnr,
      callback = function()
        cancel_inline_requests(client, bufnr)
      end,
    })
  end
  if M.config.debounce_ms and vim.lsp.inline_completion and M.config.inline_completion then
    vim.api.nvim_create_autocmd('TextChangedI', {
      group = augroup,
      buffer = bufnr,
      callback = function()
        request_soon(bufnr)
      end,
    })
    vim.api.nvim_create_autocmd({ 'InsertLeave', 'BufUnload' }, {
      group = augroup,
      buffer = bufnr,
      callback = function()
        stop_request_timer(bufnr)
      end,
    })
  end
end

-- ------------------------------------------------------------------ user commands

local function create_commands()
  local cmd = vim.api.nvim_create_user_command
  cmd('DiffuRefine', function(opts)
    local bufnr = vim.api.nvim_get_current_buf()
    local client = get_client(bufnr)
    if client then
      M.refine(opts.range > 0 and command_range(opts, bufnr, client) or nil, bufnr)
    end
  end, { range = true, desc = 'diffu: refine (regenerate) the selected code, else the line at the cursor' })

  cmd('DiffuFill', function(opts)
    local bufnr = vim.api.nvim_get_current_buf()
    local client = get_client(bufnr)
    if not client then
      return
    end
    M.fill(opts.range > 0 and command_range(opts, bufnr, client) or nil, bufnr)
  end, { range = true, desc = 'diffu: fill holes in the range, else the enclosing function' })

  cmd('DiffuComplete', function()
    M.complete(nil, vim.api.nvim_get_current_buf())
  end, { desc = 'diffu: complete a block at the cursor' })

  cmd('DiffuNextEdit', function()
    M.next_edit(0)
  end, { desc = 'diffu: jump to the next predicted edit and preview it (<Tab> accepts)' })

  cmd('DiffuCancel', function()
    M.cancel(0)
  end, { desc = 'diffu: cancel running diffu commands' })

  cmd('DiffuCodeAction', function()
    M.code_action()
  end, { range = true, desc = 'diffu: code actions' })

  cmd('DiffuToggle', function(opts)
    M.toggle(opts.args ~= '' and opts.args or nil)
  end, {
    nargs = '?',
    complete = function()
      return { 'global', 'buffer', 'filetype' }
    end,
    desc = 'diffu: suggestions as you type off/on (everywhere, in this buffer, or for its filetype)',
  })

  cmd('DiffuRestart', function()
    M.restart()
  end, { desc = 'diffu: restart the server' })

  cmd('DiffuStatus', function()
    local s = M.status(0)
    local c = M.client(0)
    local settings = client_settings(c)
    local off = not c and '' or vim.b.diffu_enabled == false and '; suggestions off in this buffer (:DiffuToggle buffer)'
      or settings.inlineCompletion == false and '; suggestions off everywhere (:DiffuToggle)'
      or vim.tbl_contains(settings.disabledLanguages or {}, vim.bo.filetype)
        and ('; suggestions off for %s files (:DiffuToggle filetype)'):format(vim.bo.filetype)
      or ''
    if not c then
      print('diffu: no client attached to this buffer')
    elseif not s then
      print(('diffu: client %d running, no status yet%s'):format(c.id, off))
    else
      print(('diffu: %s%s%s%s'):format(
        s.state,
        s.model and (' (' .. s.model .. ')') or '',
        s.message and s.message ~= '' and (': ' .. s.message) or '',
        off
      ))
    end
  end, { desc = 'diffu: show the model status' })
end

-- ------------------------------------------------------------------ setup

---@param opts? diffu.Config
function M.setup(opts)
  opts = opts or {}
  M.config = vim.tbl_deep_extend('force', vim.deepcopy(defaults), opts)
  if opts.keymaps == false then
    M.config.keymaps = {}
  end

  local overrides = {}
  for _, k in ipairs({ 'cmd', 'filetypes', 'root_markers' }) do
    if opts[k] ~= nil then
      overrides[k] = opts[k]
    end
  end
  if type(opts.settings) == 'table' and next(opts.settings) ~= nil then
    overrides.settings = { diffu = opts.settings }
  end
  local configured = overrides.settings or (vim.lsp.config[NAME] or {}).settings or {}
  local diffu = type(configured.diffu) == 'table' and configured.diffu or {}
  if M.config.debounce_ms and M.config.inline_completion and diffu.debounceMs == nil then
    -- the client waits for typing to pause (debounce_ms): the server need not wait again
    overrides.settings = { diffu = vim.tbl_extend('force', diffu, { debounceMs = 0 }) }
  end
  if next(overrides) then
    vim.lsp.config(NAME, overrides)
  end

  vim.api.nvim_clear_autocmds({ group = augroup })
  vim.api.nvim_create_autocmd('LspAttach', {
    group = augroup,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == NAME then
        on_attach(client, args.buf)
      end
    end,
  })
  vim.api.nvim_create_autocmd('User', {
    group = augroup,
    pattern = 'DiffuStatus',
    callback = function(args)
      local d = args.data or {}
      if d.client_id then
        statuses[d.client_id] = { state = d.state, model = d.model, message = d.message }
        vim.cmd.redrawstatus()
      end
    end,
  })
  vim.api.nvim_create_autocmd('LspRequest', { -- the statusline's diffu:busy
    group = augroup,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == NAME then
        vim.schedule(function()
          vim.cmd.redrawstatus()
        end)
      end
    end,
  })
  vim.api.nvim_create_autocmd('LspProgress', {
    group = augroup,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if not client or client.name ~= NAME then
        return
      end
      local params = args.data.params or {}
      local value = params.value or {}
      local tokens = progress_tokens[client.id] or {}
      progress_tokens[client.id] = tokens
      if value.kind == 'end' then
        tokens[params.token] = nil
      elseif value.kind == 'begin' and value.cancellable then
        tokens[params.token] = true
      end
      if M.config.progress then
        local msg = value.kind == 'end' and (value.message or 'done')
          or table.concat(vim.tbl_filter(function(s)
            return s ~= nil and s ~= ''
          end, {
            value.title and value.message and (value.title .. ':') or value.title,
            value.percentage and (value.percentage .. '%') or nil,
            value.message,
          }), ' ')
        msg = 'diffu: ' .. msg
        -- a command's progress streams its draft: keep it to one screen line (no hit-enter prompt)
        local room = math.max(vim.v.echospace, 10)
        if vim.fn.strdisplaywidth(msg) > room then
          msg = vim.fn.strcharpart(msg, 0, room - 1) .. '…'
        end
        vim.api.nvim_echo({ { msg } }, false, {})
      end
    end,
  })

  create_commands()
  if M.config.statusline then
    add_to_statusline()
  end
  vim.lsp.enable(NAME)

  -- Buffers that already have the client (setup() called late).
  for _, client in ipairs(vim.lsp.get_clients({ name = NAME })) do
    for bufnr in pairs(client.attached_buffers) do
      on_attach(client, bufnr)
    end
  end
end

return M
