-- wrk script: the read half of scripts/load. Each request picks an organization and one of
-- its users, and reads with that user's key:
--   50% the newest page of 50 messages of a conversation
--   20% the user's conversation list (with unread counts)
--   15% one conversation (participants, the caller's unread count)
--   10% one user of the organization
--    5% GET /v1/me

dofile(os.getenv("LEDGERLINE_LOAD_DIR") .. "/load-common.lua")

function init(args)
  math.randomseed(os.time() * 1000 + thread_id * 104729)
end

function request()
  local org = pick(orgs)
  local user = pick(org.users)
  local base = "/v1/organizations/" .. org.id
  local r = math.random(100)
  if r <= 50 then
    count_sent("message_page")
    return request_with("GET",
      base .. "/conversations/" .. pick(org.conversations) .. "/messages?limit=50", user.key)
  elseif r <= 70 then
    count_sent("conversation_list")
    return request_with("GET", base .. "/conversations", user.key)
  elseif r <= 85 then
    count_sent("conversation")
    return request_with("GET", base .. "/conversations/" .. pick(org.conversations), user.key)
  elseif r <= 95 then
    count_sent("user")
    return request_with("GET", base .. "/users/" .. pick(org.users).id, user.key)
  else
    count_sent("me")
    return request_with("GET", "/v1/me", user.key)
  end
end

function response(status, headers, body)
  count_response(status, body)
end
