-- Many streams' starts and appends in one call (RedisStore.write_many): a flush of a few
-- hundred streams is a few calls, where a script per stream cost redis-py's encoding and
-- parsing of a command per stream. KEYS: each stream's meta, body, ev. ARGV: orphan, then per
-- stream its token, expected offset, status ('': no head), headers, data ('': no append),
-- chunks. Returns one line per write, in order (a stream's start, then its append), each what
-- start.lua or append.lua returns, joined by spaces ("ok 7 120", "lost <why>"), or
-- "err <message>" for a write that raised (OOM...): each stream's writes stand alone, as they
-- did as scripts of their own. (One string, not a reply per write: redis-py parses each
-- element of a reply in Python, and that cost more than the scripts.)
local orphan, lines = tonumber(ARGV[1]), {}
local function run(write, ...)
  local ok, reply = pcall(write, ...)
  if not ok then  -- redis.call raises a table {err = message}, Lua itself a string
    reply = {'err', type(reply) == 'table' and reply.err or tostring(reply)}
  end
  for i = 2, #reply do
    if type(reply[i]) == 'number' then reply[i] = int(reply[i]) end
  end
  lines[#lines + 1] = string.gsub(table.concat(reply, ' '), '\n', ' ')
end
for s = 0, #KEYS / 3 - 1 do
  on(3 * s + 1)
  local a = 1 + 6 * s
  local token, status, data = ARGV[a + 1], ARGV[a + 3], ARGV[a + 5]
  if status ~= '' then run(start, token, orphan, status, ARGV[a + 4]) end
  if data ~= '' then
    run(append, token, tonumber(ARGV[a + 2]), orphan, data, tonumber(ARGV[a + 6]))
  end
end
return table.concat(lines, '\n')
