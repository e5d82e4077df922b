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
    params.initializationOptions = config.settings.diffu
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
