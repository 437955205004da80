-- The fenced writes a flush is made of, each a function of one stream's fence and data
-- returning its reply: start.lua and append.lua run one, batch.lua one per stream.

-- Record the response head. Returns {'ok', version}.
local function start(token, orphan, status, headers)
  local m, why = owned(token, -1, orphan)
  if not m then return {'lost', why} end
  local v = bump(token)
  redis.call('HSET', meta, 'status', status, 'headers', headers, 'ver', v, 'updated', int(now))
  return {'ok', v}
end

-- Append `data` (holding `chunks` messages) to the body, split into PIECE-sized entries.
-- Returns {'ok', version, body size}.
local function append(token, want, orphan, data, chunks)
  local m = load() or false
  if m and m.gen == token and m.state == 'running' and want >= 0 and #data > 0
      and tonumber(m.off) == want + #data then
    local last = redis.call('XREVRANGE', body, '+', '-', 'COUNT', 1)
    local last_piece = want + math.floor((#data - 1) / PIECE) * PIECE
    if last[1] and last[1][1] == int(last_piece) .. '-1' then
      return {'ok', tonumber(m.ver), tonumber(m.off)}  -- redis-py retried an append that landed
    end
  end
  local m, why = owned(token, want, orphan, m)
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
    if off == 0 then redis.call('PEXPIREAT', body, int(tonumber(m.lease) + orphan)) end
  end
  local v = bump(token)
  redis.call('HSET', meta, 'off', int(off + #data), 'chunks', int(tonumber(m.chunks) + chunks),
             'ver', v, 'updated', int(now))
  return {'ok', v, off + #data}
end
