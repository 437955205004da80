-- Append to the body (split into PIECE-sized entries).
-- ARGV: token, expected offset, orphan, data, chunks
local data = ARGV[4]
local want = tonumber(ARGV[2])
local m = load() or false
if m and m.gen == ARGV[1] and m.state == 'running' and want >= 0 and #data > 0
    and tonumber(m.off) == want + #data then
  local last = redis.call('XREVRANGE', body, '+', '-', 'COUNT', 1)
  local last_piece = want + math.floor((#data - 1) / PIECE) * PIECE
  if last[1] and last[1][1] == int(last_piece) .. '-1' then
    return {'ok', tonumber(m.ver), tonumber(m.off)}  -- redis-py retried an append that landed
  end
end
local m, why = owned(true, m)
if not m then return {'lost', why} end
local off = tonumber(m.off)
if #data > 0 then
  if #data <= PIECE then
    redis.call('XADD', body, int(off) .. '-1', 'd', data)
  else
    for at = 0, #data - 1, PIECE do
      redis.call('XADD', body, int(off + at) .. '-1', 'd', string.sub(data, at + 1, at + PIECE))
    end
  end
  if off == 0 then redis.call('PEXPIREAT', body, int(tonumber(m.lease) + tonumber(ARGV[3]))) end
end
local v = bump(ARGV[1])
redis.call('HSET', meta, 'off', int(off + #data), 'chunks', int(tonumber(m.chunks) + ARGV[5]),
           'ver', v, 'updated', int(now))
return {'ok', v, off + #data}
