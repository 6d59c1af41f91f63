-- Drives the ponder plug-in inside a headless Neovim for tests/test_nvim.py.
--
-- The plan (a JSON file named by $PONDER_NVIM_PLAN) says which file to open, where
-- to put the cursor, the setup() options and the scenario; what happened is written
-- as JSON to plan.out, then Neovim quits (exit code 1 if the scenario failed). Steps
-- run in a coroutine resumed by timers, so that keys fed with nvim_feedkeys (insert
-- mode, the accept key) are processed by Neovim's main loop between steps, as typed keys are.

local plan = vim.json.decode(table.concat(vim.fn.readfile(vim.env.PONDER_NVIM_PLAN), "\n"))
local result = { notifications = {} }

vim.notify = function(message, level)
  table.insert(result.notifications, { message = message, level = level })
end

local function finish(err)
  result.error = err
  result.errmsg = vim.v.errmsg
  vim.fn.writefile({ vim.json.encode(result) }, plan.out)
  vim.cmd(err and "cquit 1" or "qall!")
end

local steps
local function resume()
  local ok, err = coroutine.resume(steps)
  if not ok then
    finish(debug.traceback(steps, tostring(err)))
  end
end

local function sleep(ms)
  vim.defer_fn(resume, ms)
  coroutine.yield()
end

local function wait_until(what, condition, timeout_ms)
  local waited = 0
  while not condition() do
    if waited > (timeout_ms or 60000) then
      error("timed out waiting for " .. what)
    end
    sleep(20)
    waited = waited + 20
  end
end

local function keys(text)
  vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(text, true, false, true), "m", false)
end

local ponder = require("ponder")
local function stats()
  return ponder.state().stats
end

local function insert_at(row, col)
  keys("i")
  wait_until("insert mode", function()
    return vim.api.nvim_get_mode().mode == "i"
  end)
  vim.api.nvim_win_set_cursor(0, { row, col })
end

local scenarios = {}

-- Ingest on open, type nothing, wait for the suggestion, accept it with the key, write the file.
function scenarios.accept()
  wait_until("the ingestion on BufEnter", function()
    return stats().ingested >= 1
  end)
  insert_at(plan.row, plan.col)
  wait_until("a suggestion", function()
    return ponder.suggestion() ~= nil
  end)
  local s = ponder.suggestion()
  result.suggestion = s.text
  result.extmarks = #vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_create_namespace("ponder"), 0, -1, {})
  keys(plan.accept_key or "<Tab>")
  wait_until("the accept key", function()
    return stats().accepted == 1
  end)
  result.cursor = vim.api.nvim_win_get_cursor(0)
  result.mode = vim.api.nvim_get_mode().mode
  keys("<Esc>")
  wait_until("normal mode", function()
    return vim.api.nvim_get_mode().mode == "n"
  end)
  result.extmarks_after = #vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_create_namespace("ponder"), 0, -1, {})
  vim.cmd("PonderStatus")
  result.status = ponder.status_lines()
  vim.cmd("write")
  wait_until("the ingestion on BufWritePost", function()
    return stats().ingested >= 2
  end)
end

-- A cursor move takes the suggestion away; after :PonderDisable typing asks for nothing.
function scenarios.dismiss()
  local marks = function()
    return #vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_create_namespace("ponder"), 0, -1, {})
  end
  insert_at(plan.row, plan.col)
  wait_until("a suggestion", function()
    return ponder.suggestion() ~= nil
  end)
  result.extmarks = marks()
  local requests = stats().requests
  keys("<Left>")
  wait_until("the move", function()
    return vim.api.nvim_win_get_cursor(0)[2] == plan.col - 1
  end)
  result.after_move = { suggestion = ponder.suggestion() ~= nil, extmarks = marks() }
  vim.cmd("PonderDisable")
  requests = stats().requests
  keys("x")
  sleep(3 * plan.setup.debounce_ms)
  result.disabled = { requests = stats().requests - requests, extmarks = marks(), line = vim.api.nvim_get_current_line() }
  vim.cmd("PonderEnable")
  keys("y")
  wait_until("a request after :PonderEnable", function()
    return stats().requests > requests
  end)
end

-- Two requests back to back: the first is stopped, only the second's answer is shown.
function scenarios.supersede()
  insert_at(plan.row, plan.col)
  sleep(100) -- let Neovim report the cursor move first
  ponder.complete()
  ponder.complete()
  wait_until("the second answer", function()
    return stats().answers + stats().errors >= 1
  end)
  sleep(500) -- room for a (wrong) late answer of the first request
  result.suggestion = ponder.suggestion() and ponder.suggestion().text
end

-- Deep in a long file with a cold session: a suggestion under the predict budget; then the cursor
-- goes three lines down (plan.moved) and a second request is answered.
function scenarios.midfile()
  insert_at(plan.row, plan.col)
  wait_until("a suggestion", function()
    return ponder.suggestion() ~= nil
  end, 120000)
  result.suggestion = ponder.suggestion().text
  result.first = ponder.state().last.timings
  vim.api.nvim_win_set_cursor(0, plan.moved)
  wait_until("the answer three lines down", function()
    return stats().answers + stats().errors >= 2
  end, 120000)
  result.moved = ponder.state().last.timings
end

-- The server is down or refuses the key: one notification however often it fails; the
-- accept key, without a suggestion, does what it does without the plug-in.
function scenarios.errors()
  wait_until("the ingestion's error", function()
    return stats().errors >= 1
  end)
  insert_at(plan.row, plan.col)
  sleep(100)
  for i = 1, 3 do
    ponder.complete()
    wait_until("error " .. i, function()
      return stats().errors >= 1 + i
    end)
  end
  keys("<Tab>")
  sleep(200)
  result.line = vim.api.nvim_get_current_line()
  result.status = ponder.status_lines()
end

steps = coroutine.create(function()
  vim.cmd("edit " .. vim.fn.fnameescape(plan.file))
  scenarios[plan.scenario]()
  result.stats = stats()
  result.last = ponder.state().last
  finish(nil)
end)

ponder.setup(plan.setup)
vim.defer_fn(resume, 0)
