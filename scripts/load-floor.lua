-- wrk script: the floor of scripts/load (LEDGERLINE_LOAD_FLOOR). One kind of request alone,
-- as cheap as this server answers: LEDGERLINE_LOAD_FLOOR_PATH=healthz (no key, no database)
-- or me (GET /v1/me: the key's authentication and its organization, two statements), with a
-- user's key picked at random for each request.

dofile(os.getenv("LEDGERLINE_LOAD_DIR") .. "/load-common.lua")

local path = os.getenv("LEDGERLINE_LOAD_FLOOR_PATH")

function init(args)
  math.randomseed(os.time() * 1000 + thread_id * 104729)
end

function request()
  count_sent(path)
  if path == "healthz" then
    return wrk.format("GET", "/healthz")
  end
  return request_with("GET", "/v1/me", pick(pick(orgs).users).key)
end

function response(status, headers, body)
  count_response(status, body)
end
