-- Many streams' starts and appends in one call (RedisStore.write_many): a flush of a few
-- hundred streams is a few calls, where a script per stream cost redis-py's encoding and
-- parsing of a command per stream. KEYS: each stream's meta, body, ev. ARGV: orphan, then per
-- stream "<expected offset> <chunks> <status> <token>" (status '': no head; the token last,
-- whatever it holds), headers, data ('': no append). Returns one line per write, in order (a
-- stream's start, then its append), each what start.lua or append.lua returns joined by spaces
-- ("ok 7 120", "lost <why>"), or
-- "err <message>" for a write that raised (OOM...): each stream's writes stand alone, as they
-- did as scripts of their own. (The small fields in one argument, and one string for a reply:
-- redis-py encodes each argument and parses each element of a reply in Python, and per stream
-- that cost the worker more than the scripts cost Redis.)
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
  local a = 2 + 3 * s
  local want, chunks, status, token = string.match(ARGV[a], '^(%S+) (%S+) (%S*) (.*)$')
  if status ~= '' then run(start, token, orphan, status, ARGV[a + 1]) end
  if ARGV[a + 2] ~= '' then
    run(append, token, tonumber(want), orphan, ARGV[a + 2], tonumber(chunks))
  end
end
return table.concat(lines, '\n')
