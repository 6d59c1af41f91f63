-- ponder for Neovim: ghost-text completions from a ponder server's llama.cpp-compatible /infill.
--
-- Design. One buffer is one ponder session: its absolute path is both the
-- session id and the document id, so the server's fast weights keep learning
-- that file across requests and never mix two files. While in insert mode,
-- every text change or cursor move clears the suggestion, stops the request
-- in flight (its curl job) and restarts a debounce timer; when the timer
-- fires, the text around the cursor goes to /infill and the answer is drawn
-- with extmarks. Every request carries a sequence number, and an answer is
-- drawn only if it belongs to the newest request and the buffer, its change
-- tick and the cursor are where they were when it was sent: a late answer can
-- never paint over newer text. On BufEnter and BufWritePost the buffer is sent
-- with n_predict 0 (ingest only), so the session is warm before the first
-- completion.
--
-- The prefix is capped at n_prefix_lines lines, but its first line moves in
-- steps of half that cap rather than with every line typed: the server's
-- session reuses its state only while the prompt's start stays the same.
--
-- Only Neovim (0.7 or later) and curl are needed. HTTP goes through curl jobs
-- (vim.fn.jobstart); the body is written to curl's stdin and the API key to a
-- curl config file in Neovim's private temp directory, so neither shows in
-- the process list. Suggestions are extmarks: the first line as inline
-- virtual text on 0.10+, on older versions overlaid at the end of the line
-- (or after it when text follows the cursor); further lines as virt_lines.
-- Errors are reported once through vim.notify (again only after a success or
-- a different error), never as a Lua error.

local M = {}

local defaults = {
  url = "http://127.0.0.1:8080",
  api_key = nil, -- nil: $PONDER_API_KEY, if set
  debounce_ms = 150,
  n_prefix_lines = 256,
  n_suffix_lines = 64,
  n_predict = 64,
  t_max_predict_ms = 1000, -- llama.cpp's generation limit (from the first token, ends at a newline); 0 or nil: none
  timeout_ms = 10000, -- curl's limit on one completion request
  ingest_timeout_ms = 120000, -- curl's limit on one ingestion (a whole window of a big file)
  accept_key = "<Tab>", -- false: no mapping (call require("ponder").accept() yourself)
  auto = true, -- request suggestions while typing; false: only :PonderComplete
  ingest = true, -- send the buffer (n_predict 0) on BufEnter and BufWritePost
  highlight = "PonderSuggestion",
}

local ns = vim.api.nvim_create_namespace("ponder")
local has_inline = vim.fn.has("nvim-0.10") == 1
local uv = vim.uv or vim.loop -- vim.loop before 0.10

-- Plugin state. `generation` numbers requests; only the answer of the newest one is shown.
local state = {
  config = vim.deepcopy(defaults),
  configured = false,
  enabled = true,
  generation = 0,
  job = nil, -- the completion request in flight
  pending = nil, -- {buf, row, col, tick} of that request
  stopped_jobs = {}, -- curl jobs stopped on purpose: their exit is not an error
  ingest_jobs = {}, -- buffer -> its ingestion in flight
  timer = nil,
  suggestion = nil, -- {buf, row, col, tick, text, lines}
  drawn = nil, -- the buffer holding the ghost text
  curl_config = nil, -- path of the curl config file holding the Authorization header
  last = {}, -- latency_ms, error, timings, session, at: what :PonderStatus shows
  notified = nil, -- the error last shown with vim.notify
  stats = { requests = 0, answers = 0, cancelled = 0, stale = 0, errors = 0, ingested = 0, accepted = 0 },
}

-- --- Helpers.

local function notify(message, level)
  vim.schedule(function()
    vim.notify("ponder: " .. message, level or vim.log.levels.WARN)
  end)
end

--- Records an error ({kind, message}) and shows it once: until a request succeeds, another error
--- of the same kind (the server still down, the key still refused) stays quiet.
local function report_error(err)
  state.stats.errors = state.stats.errors + 1
  state.last.error = err.message
  if state.notified ~= err.kind then
    state.notified = err.kind
    notify(err.message, vim.log.levels.ERROR)
  end
end

local function report_success()
  state.last.error = nil
  state.notified = nil
end

local function json_encode(value)
  local ok, text = pcall(vim.json.encode, value)
  return ok and text or nil
end

local function json_decode(text)
  local ok, value = pcall(vim.json.decode, text)
  if ok and type(value) == "table" then
    return value
  end
  return nil
end

--- The session id (= document id) of buffer `buf`: its absolute path, or a name unique to this editor.
function M.session_id(buf)
  buf = (buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf
  local name = vim.api.nvim_buf_get_name(buf)
  if name == "" then
    return string.format("nvim-%d-buffer-%d", vim.fn.getpid(), buf)
  end
  return vim.fn.fnamemodify(name, ":p")
end

local function api_key()
  local key = state.config.api_key
  if key == nil or key == "" then
    key = vim.env.PONDER_API_KEY
  end
  if key == nil or key == "" then
    return nil
  end
  return key
end

--- A curl config file carrying the Authorization header (nil without an API key).
local function curl_config()
  local key = api_key()
  if key == nil then
    return nil
  end
  if state.curl_config == nil or state.curl_config.key ~= key then
    local path = vim.fn.tempname() -- inside Neovim's own temp directory, readable by this user only
    local quoted = key:gsub("\\", "\\\\"):gsub('"', '\\"')
    vim.fn.writefile({ 'header = "Authorization: Bearer ' .. quoted .. '"' }, path)
    uv.fs_chmod(path, 384) -- 0600
    state.curl_config = { key = key, path = path }
  end
  return state.curl_config.path
end

--- The curl command line for a request to `path` (a POST when `post`), its answer followed by a line with the status.
--- `session` also goes in the X-Session-Id header, which a router in front of several replicas hashes on.
local function curl_command(path, timeout_ms, post, session)
  local command = {
    "curl", "--silent", "--show-error", "--no-buffer",
    "--connect-timeout", "2", "--max-time", tostring(math.max(1, math.ceil(timeout_ms / 1000))),
    "--write-out", "\n%{http_code}",
  }
  local config = curl_config()
  if config ~= nil then
    vim.list_extend(command, { "--config", config })
  end
  if post then
    vim.list_extend(command, { "--header", "Content-Type: application/json", "--data-binary", "@-" })
  end
  if session ~= nil then
    vim.list_extend(command, { "--header", "X-Session-Id: " .. session })
  end
  command[#command + 1] = state.config.url:gsub("/+$", "") .. path
  return command
end

--- Reads curl's output (answer, then the status line) into (status, body).
local function split_answer(lines)
  while #lines > 0 and lines[#lines] == "" do
    table.remove(lines)
  end
  local status = tonumber(table.remove(lines) or "") or 0
  return status, table.concat(lines, "\n")
end

--- A failed request as {kind, message}, the message telling the user what to do.
local function failure(exit_code, status, body, stderr)
  if exit_code ~= 0 or status == 0 then
    local reason = vim.trim(table.concat(stderr, " "))
    if reason == "" then
      reason = "curl exited with " .. exit_code
    end
    local message = string.format("no answer from %s (%s): is `ponder serve` running? (:PonderStatus)", state.config.url, reason)
    return { kind = "curl " .. exit_code, message = message }
  end
  local answer = json_decode(body)
  local detail = answer and type(answer.error) == "table" and answer.error.message or vim.trim(body):sub(1, 200)
  local message = string.format("HTTP %d from %s: %s", status, state.config.url, detail)
  if status == 401 then
    message = "the server refused the API key (401): set api_key in setup() or $PONDER_API_KEY. " .. detail
  elseif status == 503 then
    message = "the server is not ready yet (503): " .. detail
  end
  return { kind = "http " .. status, message = message }
end

--- POSTs `body` to `path` with curl; calls `on_done(ok, answer_or_error)` on the main loop unless the job is stopped.
--- Returns the job id (0 or less when curl could not start).
local function post(path, body, timeout_ms, on_done)
  local stdout, stderr = {}, {}
  local ok, job = pcall(vim.fn.jobstart, curl_command(path, timeout_ms, true, body.session_id), {
    stdout_buffered = true,
    stderr_buffered = true,
    on_stdout = function(_, data)
      stdout = data
    end,
    on_stderr = function(_, data)
      stderr = data
    end,
    on_exit = function(id, exit_code)
      if state.stopped_jobs[id] then
        state.stopped_jobs[id] = nil
        return
      end
      local status, text = split_answer(stdout)
      if exit_code == 0 and status == 200 then
        local answer = json_decode(text)
        if answer == nil then
          on_done(false, { kind = "not json", message = "the server's answer is not JSON: " .. text:sub(1, 200) })
        else
          on_done(true, answer)
        end
      else
        on_done(false, failure(exit_code, status, text, stderr))
      end
    end,
  })
  if not ok or job <= 0 then
    report_error({ kind = "no curl", message = "cannot run curl: is it installed and on $PATH?" })
    return 0
  end
  vim.fn.chansend(job, body)
  vim.fn.chanclose(job, "stdin")
  return job
end

local function stop_job(job)
  if job ~= nil and job > 0 then
    state.stopped_jobs[job] = true
    vim.fn.jobstop(job)
  end
end

-- --- The text around the cursor.

--- The first line (1-based) of the prefix window for a cursor on `row`: the start moves in steps of
--- half the cap, so the prompt's start (and the server's session) survives typing.
local function window_start(row)
  local cap = state.config.n_prefix_lines
  if cap == nil or cap <= 0 or row <= cap then
    return 1
  end
  local step = math.max(1, math.floor(cap / 2))
  return math.ceil((row - cap) / step) * step + 1 -- the earliest step boundary with at most `cap` lines to the cursor
end

--- The request's text: everything in the window before (`row`, `col`) and the capped suffix after it.
--- `row` is 1-based, `col` a 0-based byte offset (Neovim's cursor).
local function context(buf, row, col)
  local first = window_start(row)
  local last_line = vim.api.nvim_buf_line_count(buf)
  local suffix_end = math.min(last_line, row + math.max(0, state.config.n_suffix_lines))
  local before = vim.api.nvim_buf_get_lines(buf, first - 1, row - 1, false)
  local lines = vim.api.nvim_buf_get_lines(buf, row - 1, suffix_end, false)
  local line = lines[1] or ""
  before[#before + 1] = line:sub(1, col)
  lines[1] = line:sub(col + 1)
  return {
    prefix = table.concat(before, "\n"),
    suffix = table.concat(lines, "\n") .. "\n",
    indent = #(line:match("^[ \t]*")),
  }
end

-- --- Suggestions.

local function clear()
  state.suggestion = nil
  if state.drawn ~= nil and vim.api.nvim_buf_is_valid(state.drawn) then
    vim.api.nvim_buf_clear_namespace(state.drawn, ns, 0, -1)
  end
  state.drawn = nil
end

local function display(text)
  return (text:gsub("\t", string.rep(" ", vim.bo.tabstop)))
end

--- Draws `lines` as ghost text at (row 1-based, col 0-based) of `buf`.
local function draw(buf, row, col, lines)
  local hl = state.config.highlight
  local line = vim.api.nvim_buf_get_lines(buf, row - 1, row, false)[1] or ""
  local mark = { hl_mode = "combine" }
  if lines[1] ~= "" then
    if has_inline then
      mark.virt_text, mark.virt_text_pos = { { lines[1], hl } }, "inline"
    elseif col >= #line then
      mark.virt_text, mark.virt_text_pos = { { display(lines[1]), hl } }, "overlay"
    else -- text follows the cursor and 0.7-0.9 cannot insert virtual text: show the line after it
      mark.virt_text, mark.virt_text_pos = { { " " .. display(lines[1]), hl } }, "eol"
    end
  end
  if #lines > 1 then
    local more = {}
    for i = 2, #lines do
      more[#more + 1] = { { display(lines[i]), hl } }
    end
    if col < #line then -- what follows the cursor ends up after the last inserted line
      local tail = more[#more][1]
      tail[1] = tail[1] .. display(line:sub(col + 1))
    end
    mark.virt_lines = more
  end
  if mark.virt_text ~= nil or mark.virt_lines ~= nil then
    vim.api.nvim_buf_set_extmark(buf, ns, row - 1, math.min(col, #line), mark)
    state.drawn = buf
  end
end

local function cursor_matches(s)
  if s == nil or not vim.api.nvim_buf_is_valid(s.buf) or vim.api.nvim_get_current_buf() ~= s.buf then
    return false
  end
  local cursor = vim.api.nvim_win_get_cursor(0)
  return cursor[1] == s.row and cursor[2] == s.col and vim.api.nvim_buf_get_changedtick(s.buf) == s.tick
end

--- The suggestion on screen: {buf, row, col, text, lines}, or nil.
function M.suggestion()
  if state.suggestion ~= nil and not cursor_matches(state.suggestion) then
    clear()
  end
  return state.suggestion
end

--- Inserts the suggestion at the cursor and moves the cursor to its end.
--- Returns false (and changes nothing) when there is no current suggestion.
function M.accept()
  local s = M.suggestion()
  if s == nil then
    return false
  end
  clear()
  vim.api.nvim_buf_set_text(s.buf, s.row - 1, s.col, s.row - 1, s.col, s.lines)
  local row = s.row + #s.lines - 1
  local col = #s.lines == 1 and s.col + #s.lines[1] or #s.lines[#s.lines]
  vim.api.nvim_win_set_cursor(0, { row, col })
  state.stats.accepted = state.stats.accepted + 1
  return true
end

--- Hides the suggestion and stops the request in flight.
function M.dismiss()
  if state.timer ~= nil then
    state.timer:stop()
  end
  state.generation = state.generation + 1 -- whatever is still on its way is stale now
  if state.job ~= nil then
    stop_job(state.job)
    state.job = nil
    state.stats.cancelled = state.stats.cancelled + 1
  end
  clear()
end

-- --- Requests.

local function request_body(buf, ctx, n_predict)
  local session = M.session_id(buf)
  local body = {
    input_prefix = ctx.prefix,
    input_suffix = ctx.suffix,
    n_predict = n_predict,
    n_indent = ctx.indent,
    session_id = session,
    document_id = session,
    cache_prompt = true,
  }
  local budget = state.config.t_max_predict_ms
  if n_predict > 0 and budget ~= nil and budget > 0 then
    body.t_max_predict_ms = budget
  end
  return json_encode(body)
end

--- Asks the server for a suggestion at the cursor now, superseding any request in flight.
function M.complete()
  M.dismiss()
  local buf = vim.api.nvim_get_current_buf()
  if vim.bo[buf].buftype ~= "" then
    return
  end
  local cursor = vim.api.nvim_win_get_cursor(0)
  local row, col = cursor[1], cursor[2]
  local tick = vim.api.nvim_buf_get_changedtick(buf)
  local ctx = context(buf, row, col)
  local body = request_body(buf, ctx, state.config.n_predict)
  if body == nil then
    return
  end
  local generation = state.generation
  local started = uv.hrtime()
  state.stats.requests = state.stats.requests + 1
  local job
  job = post("/infill", body, state.config.timeout_ms, function(ok, answer)
    if state.job == job then
      state.job = nil
    end
    if generation ~= state.generation then -- superseded while on the way
      state.stats.stale = state.stats.stale + 1
      return
    end
    if not ok then
      report_error(answer)
      return
    end
    report_success()
    state.stats.answers = state.stats.answers + 1
    state.last.latency_ms = (uv.hrtime() - started) / 1e6
    state.last.timings = answer.timings
    state.last.session = type(answer.ponder) == "table" and answer.ponder.session_id or nil
    local text = type(answer.content) == "string" and answer.content or ""
    local s = { buf = buf, row = row, col = col, tick = tick, text = text }
    if text == "" or not cursor_matches(s) then
      return
    end
    s.lines = vim.split(text, "\n", { plain = true })
    state.suggestion = s
    draw(buf, row, col, s.lines)
  end)
  state.job = job > 0 and job or nil
  state.pending = { buf = buf, row = row, col = col, tick = tick }
end

--- Sends buffer `buf` to its session without generating (n_predict 0): the window around the cursor.
function M.ingest(buf)
  buf = (buf == nil or buf == 0) and vim.api.nvim_get_current_buf() or buf
  if not vim.api.nvim_buf_is_loaded(buf) or vim.bo[buf].buftype ~= "" then
    return
  end
  local row = buf == vim.api.nvim_get_current_buf() and vim.api.nvim_win_get_cursor(0)[1] or 1
  local first = window_start(row)
  local cap = state.config.n_prefix_lines
  local last = (cap == nil or cap <= 0) and -1 or first - 1 + cap
  local lines = vim.api.nvim_buf_get_lines(buf, first - 1, last, false)
  local body = request_body(buf, { prefix = table.concat(lines, "\n") .. "\n", suffix = "", indent = 0 }, 0)
  if body == nil then
    return
  end
  stop_job(state.ingest_jobs[buf])
  local job
  job = post("/infill", body, state.config.ingest_timeout_ms, function(ok, answer)
    if state.ingest_jobs[buf] == job then
      state.ingest_jobs[buf] = nil
    end
    if not ok then
      report_error(answer)
      return
    end
    report_success()
    state.stats.ingested = state.stats.ingested + 1
  end)
  state.ingest_jobs[buf] = job > 0 and job or nil
end

-- --- Events.

local function schedule()
  M.dismiss()
  if not (state.enabled and state.config.auto) or vim.bo.buftype ~= "" then
    return
  end
  if state.timer == nil then
    state.timer = uv.new_timer()
  end
  state.timer:start(math.max(0, state.config.debounce_ms), 0, vim.schedule_wrap(function()
    if vim.api.nvim_get_mode().mode:sub(1, 1) == "i" then
      M.complete()
    end
  end))
end

local function on_cursor_moved()
  -- Neovim reports a move when it next checks the cursor, which can be after a request for the new
  -- position went out (:PonderComplete from a mapping): only a cursor away from both the suggestion
  -- and the request in flight makes them stale.
  if cursor_matches(state.suggestion) or (state.job ~= nil and cursor_matches(state.pending)) then
    return
  end
  schedule()
end

local function on_accept_key(key)
  return function()
    if not M.accept() then -- no suggestion: the key does what it does without the plug-in
      vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(key, true, false, true), "ni", false)
    end
  end
end

local function ingest_if_enabled(args)
  if state.enabled and state.config.ingest then
    M.ingest(args.buf)
  end
end

-- --- Status and setup.

local function health()
  local command = curl_command("/health", 2000, false)
  local output = vim.fn.systemlist(command)
  local status, body = split_answer(output)
  if vim.v.shell_error ~= 0 or status == 0 then
    return "unreachable (" .. vim.trim(body) .. ")"
  end
  local answer = json_decode(body)
  return string.format("%s (HTTP %d)", answer and answer.status or vim.trim(body), status)
end

--- What :PonderStatus prints, as a list of lines.
function M.status_lines()
  local last, stats = state.last, state.stats
  local lines = {
    "ponder " .. (state.enabled and "enabled" or "disabled") .. (state.config.auto and "" or " (manual: :PonderComplete)"),
    "server:   " .. state.config.url .. " — " .. health() .. (api_key() and ", with API key" or ""),
    "session:  " .. M.session_id(0),
    "last:     " .. (last.latency_ms and string.format("%.0f ms", last.latency_ms) or "no answer yet")
      .. (last.timings and string.format(" (prompt %d tokens, %d cached, %d generated)",
        last.timings.prompt_n or 0, last.timings.cache_n or 0, last.timings.predicted_n or 0) or ""),
    "error:    " .. (last.error or "none"),
    string.format("requests: %d sent, %d answered, %d cancelled, %d stale, %d errors, %d ingested, %d accepted",
      stats.requests, stats.answers, stats.cancelled, stats.stale, stats.errors, stats.ingested, stats.accepted),
  }
  return lines
end

--- Counters and the last result, for scripts and tests.
function M.state()
  return { enabled = state.enabled, stats = vim.deepcopy(state.stats), last = vim.deepcopy(state.last), config = vim.deepcopy(state.config) }
end

function M.enable()
  state.enabled = true
end

function M.disable()
  state.enabled = false
  M.dismiss()
  for buf, job in pairs(state.ingest_jobs) do
    stop_job(job)
    state.ingest_jobs[buf] = nil
  end
end

--- Configures the plug-in (every key optional; see :help ponder) and installs its autocommands and mapping.
function M.setup(opts)
  opts = opts or {}
  for key in pairs(opts) do
    if defaults[key] == nil and key ~= "api_key" then
      notify("setup(): unknown option '" .. tostring(key) .. "' (see :help ponder-setup)", vim.log.levels.ERROR)
    end
  end
  if state.configured and state.config.accept_key then
    pcall(vim.keymap.del, "i", state.config.accept_key)
  end
  state.config = vim.tbl_extend("force", vim.deepcopy(defaults), opts)
  state.configured = true
  local function link_highlight()
    vim.cmd("highlight default link PonderSuggestion Comment")
  end
  link_highlight()

  local group = vim.api.nvim_create_augroup("ponder", { clear = true })
  vim.api.nvim_create_autocmd("ColorScheme", { group = group, callback = link_highlight })
  vim.api.nvim_create_autocmd({ "InsertEnter", "TextChangedI" }, { group = group, callback = schedule })
  vim.api.nvim_create_autocmd("CursorMovedI", { group = group, callback = on_cursor_moved })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, { group = group, callback = M.dismiss })
  vim.api.nvim_create_autocmd({ "BufEnter", "BufWritePost" }, { group = group, callback = ingest_if_enabled })
  vim.api.nvim_create_autocmd("BufDelete", {
    group = group,
    callback = function(args)
      stop_job(state.ingest_jobs[args.buf])
      state.ingest_jobs[args.buf] = nil
    end,
  })
  if state.config.accept_key then
    vim.keymap.set("i", state.config.accept_key, on_accept_key(state.config.accept_key),
      { silent = true, desc = "ponder: accept the suggestion" })
  end
end

--- Ensures setup() ran (with defaults) before a command is used.
function M.ensure_setup()
  if not state.configured then
    M.setup({})
  end
end

return M
