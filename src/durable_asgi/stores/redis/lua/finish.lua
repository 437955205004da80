-- End the stream. ARGV: token, expected offset, orphan, state, ttl ms, retain, call id
local m = load() or false
if m and m.gen == ARGV[1] and redis.call('HGET', meta, 'fin') == ARGV[7] then
  return {'ok', tonumber(m.ver)}  -- redis-py retried this very call, which had landed
end
local m, why = owned(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), m)
if not m then return {'lost', why} end
redis.call('HSET', meta, 'fin', ARGV[7])
return {'ok', settle(m, ARGV[4], tonumber(ARGV[5]), ARGV[6])}
