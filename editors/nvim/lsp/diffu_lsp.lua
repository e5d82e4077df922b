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

--- Whether the user trusted the workspace's diffu-lsp.toml with `:trust` (Neovim's vim.secure
--- database: the file's real path with the SHA-256 of its current content). Read only, never
--- prompts. Only a trusted workspace file may choose the model, device, engine or downloads.
local function workspace_trusted(root)
  local real = root and vim.uv.fs_realpath(root .. '/diffu-lsp.toml')
  if not real then
    return false
  end
  local function read(path)
    local f = io.open(path, 'rb')
    if not f then
      return nil
    end
    local contents = f:read('*a')
    f:close()
    return contents
  end
  local contents, db = read(real), read(vim.fn.stdpath('state') .. '/trust')
  if not contents or not db then
    return false
  end
  local hash = vim.fn.sha256(contents)
  for line in vim.gsplit(db, '\n') do
    local h, file = line:match('^(%S+) (.+)$')
    if file == real and h == hash then
      return true
    end
  end
  return false
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
    params.initializationOptions =
      vim.tbl_extend('force', {}, config.settings.diffu, { workspaceTrusted = workspace_trusted(config.root_dir) })
  end,
  on_init = function(client)
    -- Keep `settings.diffu` an object when the server pulls workspace/configuration.
    client.settings = client.settings or {}
    client.settings.diffu = as_object(client.settings.diffu)
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
