-- Prepended to every script (scripts.py). KEYS = meta, body, ev. Times are server
-- milliseconds.
if redis.replicate_commands then redis.replicate_commands() end
-- The functions below work on the stream whose keys these are: batch.lua moves them from
-- stream to stream, every other script has one.
local meta, body, ev = KEYS[1], KEYS[2], KEYS[3]
-- The store appends these to every script's own ARGV (scripts.py, CONSTANTS), so they
-- live in one place and the script text stays the same whatever they are.
local EV_MARGIN, PIECE = tonumber(ARGV[#ARGV - 1]), tonumber(ARGV[#ARGV])
local FIELDS = {'id', 'state', 'gen', 'ver', 'off', 'chunks', 'readers', 'status', 'headers',
                'created', 'updated', 'exp', 'lease', 'retain'}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function int(x) return string.format('%d', x) end

-- The stream's fields and the snapshot to return ({now, fields...}); nil when absent/expired.
local function load()
  local raw = redis.call('HMGET', meta, unpack(FIELDS))
  if not raw[1] then return nil end
  local m = {}
  for i, f in ipairs(FIELDS) do m[f] = raw[i] end
  if m.exp and tonumber(m.exp) <= now then
    redis.call('DEL', meta, body)
    return nil
  end
  local snap = {now}
  for i = 1, #FIELDS do snap[i + 1] = raw[i] end
  return m, snap
end

-- Record a change: the next version, as a (MAXLEN 1) entry of ev that wakes remote waiters.
local function bump(gen)
  local last = redis.call('XREVRANGE', ev, '+', '-', 'COUNT', 1)
  local v = 1
  if last[1] then v = tonumber(string.match(last[1][1], '^%d+')) + 1 end
  redis.call('XADD', ev, 'MAXLEN', '1', int(v) .. '-1', 'g', gen)
  return v
end

local function keep_until(ms)
  redis.call('PEXPIREAT', meta, int(ms))
  redis.call('PEXPIREAT', body, int(ms))
  redis.call('PEXPIREAT', ev, int(ms + EV_MARGIN))
end

-- End the stream in `state`, kept `keep` ms from now.
local function settle(m, state, keep, retain)
  local v = bump(m.gen)
  redis.call('HSET', meta, 'state', state, 'ver', v, 'updated', int(now),
             'exp', int(now + keep), 'retain', retain)
  redis.call('HDEL', meta, 'lease')
  keep_until(now + keep)
  return v
end

-- Fenced writes: the lease `token`, the body offset it expects (`want`; -1: unknown, or not
-- checked) and the orphan ttl (ms); a fenced script gets them as ARGV[1..3]. Returns the stream's
-- fields (`m`: already loaded, false if absent), or nil and why the lease is lost.
local function owned(token, want, orphan, m)
  if m == nil then m = load() end
  if not m or m.gen ~= token or m.state ~= 'running' then
    return nil, 'the stream was aborted, deleted or taken over'
  end
  if tonumber(m.lease) < now then
    settle(m, 'failed', orphan, '1')
    return nil, 'the lease ran out before it was renewed'
  end
  if want >= 0 and tonumber(m.off) ~= want then
    settle(m, 'failed', orphan, '1')
    return nil, 'the stored body is not where this producer left it (Redis lost writes?)'
  end
  return m
end
