-- Dovecot passdb for the sandbox: every login (XOAUTH2 token or password) is decided by the
-- identity side's verify endpoint, which knows which mailbox is being opened and by whom.
-- Dovecot's own oauth2 passdb cannot tell an introspection endpoint the mailbox, and Exchange's
-- rules (FullAccess for delegates and apps, per-protocol scopes) need it.
local http = require("socket.http")
local ltn12 = require("ltn12")

local VERIFY_URL = "@VERIFY_URL@"

local function form_encode(value)
  return (string.gsub(value or "", "[^%w%-%._~]", function(c)
    return string.format("%%%02X", string.byte(c))
  end))
end

function auth_password_verify(req, password)
  local body = "user=" .. form_encode(req.user) .. "&service=" .. form_encode(req.service)
    .. "&mech=" .. form_encode(req.mech) .. "&secret=" .. form_encode(password)
  local answer = {}
  local ok, status = http.request {
    url = VERIFY_URL,
    method = "POST",
    headers = {
      ["Content-Type"] = "application/x-www-form-urlencoded",
      ["Content-Length"] = tostring(#body),
    },
    source = ltn12.source.string(body),
    sink = ltn12.sink.table(answer),
  }
  if not ok then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "verify endpoint unreachable: " .. tostring(status)
  end
  if status == 200 then
    return dovecot.auth.PASSDB_RESULT_OK, ""
  end
  if status == 409 then
    -- Exchange accepted the token but refuses the session, with its own words ("User is
    -- authenticated but not connected.", "Request is throttled. ..."): Dovecot answers
    -- "NO [CONTACTADMIN] <reason>".
    return dovecot.auth.PASSDB_RESULT_OK, { nologin = "y", reason = table.concat(answer) }
  end
  return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, table.concat(answer)
end
