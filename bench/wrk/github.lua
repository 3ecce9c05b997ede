-- wrk script: real GitHub issue_comment deliveries, each with a unique comment ID, request ID
-- and delivery ID, signed per request with HMAC-SHA256 (LuaJIT FFI to the libcrypto wrk links).
-- The relay names a comment delivery by its signed `comment.id`, `action` and
-- `comment.updated_at` (mappings/github.yaml `dedup`), so the comment ID must change per
-- request, not only the delivery header, or every request after the first is a duplicate.
-- Environment: BENCH_SECRET (signing secret), BENCH_RATE (requests/s per connection, 0 = as
-- fast as possible), BENCH_PAYLOAD (the payload template file), BENCH_COMMENT_ID (the
-- template's `comment.id`, replaced per request), BENCH_SALT (distinguishes the IDs of several
-- wrk processes run at once).
local ffi = require("ffi")
ffi.cdef[[
  typedef struct evp_md_st EVP_MD;
  const EVP_MD *EVP_sha256(void);
  unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len,
                      const unsigned char *d, size_t n, unsigned char *md, unsigned int *md_len);
]]
local ok, crypto = pcall(ffi.load, "crypto")
if not ok then crypto = ffi.C end

local secret = os.getenv("BENCH_SECRET") or "bench-secret"
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local path = os.getenv("BENCH_PATH") or "/webhooks/github"
local comment_id = os.getenv("BENCH_COMMENT_ID") or "492700400"
local f = assert(io.open(os.getenv("BENCH_PAYLOAD"), "rb"))
local template = f:read("*a")
f:close()
-- The template is cut once around the two values replaced per request (no pattern matching
-- over the whole body per request, so wrk itself stays far from being the limit).
local rs, re = template:find("req-123 2h", 1, true)
assert(rs, "the template has no `/p0 approve req-123 2h` command")
local _, ie = template:find('"id":%s*' .. comment_id .. '[,}%s]')
assert(ie, "BENCH_COMMENT_ID " .. comment_id .. " is not the template's comment.id")
local ds, de = ie - #comment_id, ie - 1
local cuts = { { ds, de, "id" }, { rs, re, "req" } }
table.sort(cuts, function(a, b) return a[1] < b[1] end)
local parts = {
  template:sub(1, cuts[1][1] - 1),
  template:sub(cuts[1][2] + 1, cuts[2][1] - 1),
  template:sub(cuts[2][2] + 1),
}

local hex = {}
for i = 0, 255 do hex[i] = string.format("%02x", i) end
local md = ffi.new("unsigned char[32]")
local md_len = ffi.new("unsigned int[1]")
local out = {}
local function hmac_hex(body)
  crypto.HMAC(crypto.EVP_sha256(), secret, #secret, body, #body, md, md_len)
  for i = 0, 31 do out[i + 1] = hex[md[i]] end
  return table.concat(out)
end

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  s202 = 0
  s200 = 0
  other = 0
  local r = math.random(1, 999999999)
  local salt = os.getenv("BENCH_SALT") or ""
  prefix = string.format("%st%d-%d-", salt, tid, r)
  -- LuaJIT seeds math.random the same in every process: the salt's number (`r2-` -> 3) keeps
  -- the comment IDs of wrk processes run side by side apart, or their deliveries would be
  -- duplicates of each other.
  local lane = salt:match("%d+")
  lane = lane and tostring(tonumber(lane) + 1) or ""
  numeric = string.format("%s%d%09d", lane, tid, r)
end

function request()
  n = n + 1
  local id = prefix .. n
  local values = { id = numeric .. string.format("%07d", n), req = "req-" .. id .. " 2h" }
  local body = parts[1] .. values[cuts[1][3]] .. parts[2] .. values[cuts[2][3]] .. parts[3]
  local headers = {
    ["Content-Type"] = "application/json",
    ["X-GitHub-Event"] = "issue_comment",
    ["X-GitHub-Delivery"] = "d-" .. id,
    ["X-Hub-Signature-256"] = "sha256=" .. hmac_hex(body),
  }
  return wrk.format("POST", path, headers, body)
end

function response(status, headers, body)
  if status == 202 then s202 = s202 + 1 elseif status == 200 then s200 = s200 + 1 else other = other + 1 end
end

function delay()
  if rate > 0 then return 1000 / rate end
  return 0
end

function done(summary, latency, requests)
  local a202, a200, oth = 0, 0, 0
  for _, t in ipairs(threads) do
    a202 = a202 + t:get("s202")
    a200 = a200 + t:get("s200")
    oth = oth + t:get("other")
  end
  io.write(string.format("RESULT s202=%d s200=%d other=%d seconds=%.3f p50_ms=%.3f p99_ms=%.3f errors=%d\n",
    a202, a200, oth, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
