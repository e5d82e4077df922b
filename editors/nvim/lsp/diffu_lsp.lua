-- diffu-lsp: diffusion code models (DiffuCoder, Dream, LLaDA) as a language server.
--
-- Neovim 0.11+ picks this file up from 'runtimepath' (lsp/diffu_lsp.lua), so with this folder on
-- the runtimepath all a user needs is:
--
--     vim.lsp.enable('diffu_lsp')
--
-- Settings go under `settings.diffu` (camelCase keys, e.g. { model = '/path', device = 'cpu',
-- debounceMs = 60 }); they are sent as initializationOptions and answered to the server's
-- workspace/configuration requests:
--
--     vim.lsp.config('diffu_lsp', { settings = { diffu = { device = 'cpu' } } })
--
-- `require('diffu').setup{}` (lua/diffu/init.lua) adds ghost text, keymaps and commands on top.

--- JSON-encode empty tables as {} (not []): the server expects objects for these.
local function as_object(t)
  if type(t) ~= 'table' or next(t) == nil then
    return vim.empty_dict()
  end
  return t
end

local WORKSPACE_FILE = 'diffu-lsp.toml'
local MAX_FILE_BYTES = 1024 * 1024 -- as the server: a settings file is a few lines

--- The workspace's diffu-lsp.toml with symlinks resolved, when that is a regular file inside the
--- workspace (a link to a file elsewhere would carry that file's trust); else nil: never trusted.
local function workspace_file(root)
  local real_root = root and vim.uv.fs_realpath(root)
  local real = real_root and vim.uv.fs_realpath(root .. '/' .. WORKSPACE_FILE)
  local stat = real and vim.uv.fs_stat(real)
  if stat and stat.type == 'file' and stat.size <= MAX_FILE_BYTES
      and vim.startswith(vim.fs.normalize(real), vim.fs.normalize(real_root) .. '/') then
    return real
  end
end

--- Your trust in the workspace's diffu-lsp.toml, as the server takes it: the SHA-256 of the content
--- you trusted with `:trust` (Neovim's vim.secure), or false. The server compares it with the
--- content it reads, each time it reads the file: a changed file is ignored until you `:trust` it
--- again. vim.secure.read asks about an untrusted file, as for 'exrc'.
local function workspace_trust(root)
  local file = workspace_file(root)
  local contents = file and vim.secure.read(file)
  return type(contents) == 'string' and vim.fn.sha256(contents) or false
end

-- Per client: the watcher of Neovim's trust database and its timer.
---@type table<integer, uv.uv_handle_t[]>
local trust_watchers = {}

--- Follow `:trust`: Neovim writes its trust database (stdpath('state')/trust, `:help trust`) each
--- time a file is trusted, denied or removed. The client then works out its trust again and, when
--- it changed, tells the server (diffu/workspaceTrust), which reads the file again under it.
local function follow_trust(client)
  local folder = vim.fn.stdpath('state')
  vim.fn.mkdir(folder, 'p')
  local watcher, timer = vim.uv.new_fs_event(), vim.uv.new_timer()
  if not watcher or not timer then
    return
  end
  local sent = client.config.diffu_workspace_trust
  local function recheck()
    if client:is_stopped() then
      return
    end
    local trust = workspace_trust(client.root_dir)
    if trust ~= sent then
      sent = trust
      client:notify('diffu/workspaceTrust', { workspaceTrusted = trust })
    end
  end
  watcher:start(folder, {}, function(err, filename)
    if not err and vim.fs.basename(filename or '') == 'trust' then
      timer:start(100, 0, vim.schedule_wrap(recheck)) -- the database is written in more than one step
    end
  end)
  trust_watchers[client.id] = { watcher, timer }
end

local function stop_following_trust(client_id)
  for _, handle in ipairs(trust_watchers[client_id] or {}) do
    if not handle:is_closing() then
      handle:close()
    end
  end
  trust_watchers[client_id] = nil
end

---@type vim.lsp.Config
return {
  cmd = { 'diffu-lsp' },
  filetypes = {
    'python',
    'lua',
    'javascript',
    'javascriptreact',
    'typescript',
    'typescriptreact',
    'rust',
    'go',
    'c',
    'cpp',
    'java',
    'sh',
    'bash',
    'zsh',
    'ruby',
  },
  root_markers = { 'diffu-lsp.toml', 'pyproject.toml', '.git' },
  settings = { diffu = vim.empty_dict() },
  before_init = function(params, config)
    config.settings = config.settings or {}
    config.settings.diffu = as_object(config.settings.diffu)
    config.diffu_workspace_trust = workspace_trust(config.root_dir)
    params.initializationOptions =
      vim.tbl_extend('force', {}, config.settings.diffu, { workspaceTrusted = config.diffu_workspace_trust })
  end,
  on_init = function(client)
    -- Keep `settings.diffu` an object when the server pulls workspace/configuration.
    client.settings = client.settings or {}
    client.settings.diffu = as_object(client.settings.diffu)
    if client.root_dir then
      follow_trust(client)
    end
  end,
  on_exit = function(_, _, client_id)
    stop_following_trust(client_id)
  end,
  handlers = {
    -- The server reports the model's state: { state = 'loading'|'ready'|'error', model, message }.
    ['diffu/status'] = function(_, params, ctx)
      if type(params) ~= 'table' then
        return
      end
      vim.g.diffu_status = { state = params.state, model = params.model, message = params.message }
      if params.state == 'error' then
        vim.schedule(function()
          vim.notify(
            ('diffu-lsp: %s'):format(params.message or 'model failed to load'),
            vim.log.levels.ERROR
          )
        end)
      end
      vim.schedule(function()
        vim.api.nvim_exec_autocmds('User', {
          pattern = 'DiffuStatus',
          modeline = false,
          data = {
            client_id = ctx.client_id,
            state = params.state,
            model = params.model,
            message = params.message,
          },
        })
      end)
    end,
  },
}
