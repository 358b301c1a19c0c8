-- wrk script: the command half of scripts/load. Each request picks an organization, one of
-- its users (who takes part in every conversation of the organization) and a conversation:
--   70% post a message (20 to 400 characters) as that user
--   12% react to a recent message of the conversation (one of 10 emoji; a repeat is a 409)
--   10% mark the conversation read up to its newest message this thread knows of
--    4% invite a new user (the organization's service key; a fresh e-mail address)
--    4% update a user's name (the service key; PATCH)
-- "Recent messages" are the seed messages plus the ones this thread's posts created (taken
-- from the 201 answers), the last 20 per conversation.

dofile(os.getenv("LEDGERLINE_LOAD_DIR") .. "/load-common.lua")

local EMOJI = { "👍", "🎉", "❤", "😂", "🚀", "👀", "🙏", "🔥", "✅", "💯" }
local WORDS = { "ledger", "audit", "deploy", "review", "coffee", "invoice", "release",
  "on call", "ship it", "lunch", "metrics", "rollback", "looks good", "thanks", "tomorrow" }

local recent = {}  -- conversation id -> { message ids }, newest last
local serial = 0

local function urlencode(s)
  return (s:gsub("[^%w%-_%.~]", function(c) return string.format("%%%02X", c:byte()) end))
end

local function remember(conversation, id)
  local list = recent[conversation]
  if not list then
    list = {}
    recent[conversation] = list
  end
  table.insert(list, id)
  if #list > 20 then
    table.remove(list, 1)
  end
end

function init(args)
  math.randomseed(os.time() * 1000 + thread_id * 7919)
  for _, org in ipairs(orgs) do
    for conversation, ids in pairs(org.messages) do
      for _, id in ipairs(ids) do
        remember(conversation, id)
      end
    end
  end
end

local function text()
  local parts, n = {}, math.random(3, 60)
  for i = 1, n do
    parts[i] = pick(WORDS)
  end
  return table.concat(parts, " ")
end

function request()
  serial = serial + 1
  local org = pick(orgs)
  local user = pick(org.users)
  local conversation = pick(org.conversations)
  local base = "/v1/organizations/" .. org.id
  local conv = base .. "/conversations/" .. conversation
  local r = math.random(100)
  local known = recent[conversation]
  if r <= 70 or not known or #known == 0 then
    count_sent("post")
    return request_with("POST", conv .. "/messages", user.key,
      string.format('{"content":"%s (%d/%d)"}', text(), thread_id, serial))
  elseif r <= 82 then
    count_sent("react")
    return request_with("PUT",
      conv .. "/messages/" .. pick(known) .. "/reactions/" .. urlencode(pick(EMOJI)), user.key)
  elseif r <= 92 then
    count_sent("read_mark")
    return request_with("POST", conv .. "/read", user.key,
      string.format('{"message_id":"%s"}', known[#known]))
  elseif r <= 96 then
    count_sent("invite")
    return request_with("POST", base .. "/users", org.admin,
      string.format('{"email":"load-%d-%d-%d@example.com","full_name":"Load Invitee %d"}',
        thread_id, serial, math.random(1e9), serial))
  else
    count_sent("user_update")
    return request_with("PATCH", base .. "/users/" .. pick(org.users).id, org.admin,
      -- A random part too: the warm-up's run counts serials from 1 as well, and a name a
      -- user already has is a 422 ("nothing to change").
      string.format('{"full_name":"Load User %d-%d-%d"}', thread_id, serial, math.random(1e9)))
  end
end

function response(status, headers, body)
  count_response(status, body)
  if status == 201 and body then
    local conversation = body:match('"conversation_id":"([%x%-]+)"')
    local id = body:match('^{"id":"([%x%-]+)"')
    if conversation and id then
      remember(conversation, id)
    end
  end
end
