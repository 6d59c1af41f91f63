-- ponder's commands. The plug-in does nothing until require("ponder").setup() runs (or a command is used).
if vim.g.loaded_ponder ~= nil then
  return
end
vim.g.loaded_ponder = 1

if vim.fn.has("nvim-0.7") == 0 then
  vim.api.nvim_echo({ { "ponder needs Neovim 0.7 or later", "WarningMsg" } }, true, {})
  return
end

local function command(name, run, desc)
  vim.api.nvim_create_user_command(name, function()
    local ponder = require("ponder")
    ponder.ensure_setup()
    run(ponder)
  end, { desc = desc })
end

command("PonderStatus", function(ponder)
  vim.api.nvim_echo({ { table.concat(ponder.status_lines(), "\n") } }, true, {})
end, "ponder: server health, this buffer's session, last latency and error")
command("PonderEnable", function(ponder)
  ponder.enable()
end, "ponder: suggest while typing")
command("PonderDisable", function(ponder)
  ponder.disable()
end, "ponder: stop suggesting and ingesting")
command("PonderComplete", function(ponder)
  ponder.complete()
end, "ponder: ask for a suggestion at the cursor now")
