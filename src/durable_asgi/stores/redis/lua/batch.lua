-- Many streams' starts and appends in one call (RedisStore.write_many): a flush of a few
-- hundred streams is a few calls, where a script per stream cost redis-py's encoding and
-- parsing of a command per stream. KEYS: what each stream's key names start with (the
-- call's streams are named here, not three keys each: this script is never sent to a
-- cluster). ARGV: orphan, then per stream one string (`_codec.batch_entry`):
-- "<expected offset> <chunks> <status> <token length> <headers length>\n", the token, the
-- headers, the data (status '': no head; no data: no append). Returns one line per write, in
-- order (a stream's start, then its append), each what start.lua or append.lua returns
-- joined by spaces ("ok 7 120", "lost <why>"), or "err <message>" for a write that raised
-- (OOM...): each stream's writes stand alone, as they did as scripts of their own. (One
-- argument per stream, and one string for a reply: redis-py packs each argument of a command
-- and parses each element of a reply in Python, and per stream that cost the worker more
-- than the scripts cost Redis.)
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
for s = 1, #KEYS do
  local base, entry = KEYS[s], ARGV[s + 1]
  meta, body, ev = base .. 'meta', base .. 'body', base .. 'ev'
  local nl = string.find(entry, '\n', 1, true)
  local want, chunks, status, tlen, hlen =
    string.match(string.sub(entry, 1, nl - 1), '^(%S+) (%S+) (%S*) (%d+) (%d+)$')
  tlen, hlen = tonumber(tlen), tonumber(hlen)
  local at = nl + tlen
  local token = string.sub(entry, nl + 1, at)
  if status ~= '' then run(start, token, orphan, status, string.sub(entry, at + 1, at + hlen)) end
  at = at + hlen
  if at < #entry then
    run(append, token, tonumber(want), orphan, string.sub(entry, at + 1), tonumber(chunks))
  end
end
return table.concat(lines, '\n')
