-- Shared by scripts/load-commands.lua and scripts/load-reads.lua (wrk 4 scripts, LuaJIT).
-- scripts/load writes the fixtures (organizations, users with keys, conversations, seed
-- messages) as a Lua table to $LEDGERLINE_LOAD_FIXTURES before it starts wrk.

local fixtures = dofile(os.getenv("LEDGERLINE_LOAD_FIXTURES"))
orgs = fixtures.orgs

-- Main state: keep every thread so that done() can add up their counters.
local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("thread_id", next_id)
  table.insert(threads, thread)
end

-- Per thread (each wrk thread has a Lua state of its own).
counts = {}  -- status code -> responses
sent = {}    -- request kind -> requests made
errors = {}  -- "status message" -> responses, for every answer that is not 2xx

function pick(list)
  return list[math.random(#list)]
end

function count_sent(kind)
  sent[kind] = (sent[kind] or 0) + 1
end

function request_with(method, path, key, body)
  local headers = { ["Authorization"] = "Bearer " .. key }
  if body then
    headers["Content-Type"] = "application/json"
  end
  return wrk.format(method, path, headers, body)
end

function count_response(status, body)
  counts[status] = (counts[status] or 0) + 1
  if status >= 300 and body then
    local message = body:match('"message":"([^"]*)"') or "?"
    local key = status .. " " .. message:sub(1, 90)
    errors[key] = (errors[key] or 0) + 1
  end
end

local function merge(total, part)
  for k, v in pairs(part or {}) do
    total[k] = (total[k] or 0) + v
  end
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do
    table.insert(keys, k)
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- One machine-readable block, parsed by scripts/load.
function done(summary, latency, requests)
  local name = os.getenv("LEDGERLINE_LOAD_KIND") or "?"
  local status, kinds, errs = {}, {}, {}
  for _, t in ipairs(threads) do
    merge(status, t:get("counts"))
    merge(kinds, t:get("sent"))
    merge(errs, t:get("errors"))
  end
  local ms = function(us) return us / 1000.0 end
  io.write(string.format(
    "LOAD %s requests=%d seconds=%.3f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f p999_ms=%.2f max_ms=%.2f mean_ms=%.2f\n",
    name, summary.requests, summary.duration / 1e6,
    ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
    ms(latency:percentile(99.9)), ms(latency.max), ms(latency.mean)))
  io.write(string.format("LOAD_SOCKET %s connect=%d read=%d write=%d timeout=%d\n", name,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
  for _, k in ipairs(sorted_keys(status)) do
    io.write(string.format("LOAD_STATUS %s %s %d\n", name, tostring(k), status[k]))
  end
  for _, k in ipairs(sorted_keys(kinds)) do
    io.write(string.format("LOAD_SENT %s %s %d\n", name, k, kinds[k]))
  end
  for _, k in ipairs(sorted_keys(errs)) do
    io.write(string.format("LOAD_ERROR %s %d %s\n", name, errs[k], k))
  end
end
