-- Become the producer of a claimable (or absent) stream, or return its snapshot.
-- ARGV: token, -, orphan, id, lease ms, replace ("1": any stream that isn't running)
local m, snap = load()
if m then
  if m.gen == ARGV[1] and m.state == 'running' then return {'lease', m.ver} end  -- a retry
  local claimable = m.state == 'failed' or m.retain == '0'
    or (m.state == 'running' and tonumber(m.lease) < now)
    or (ARGV[6] == '1' and m.state ~= 'running')
  if not claimable then return {'info', unpack(snap)} end
end
local readers = m and m.readers or '0'
redis.call('DEL', meta, body)
local v = bump(ARGV[1])
local lease = now + tonumber(ARGV[5])
redis.call('HSET', meta, 'id', ARGV[4], 'state', 'running', 'gen', ARGV[1], 'ver', v,
           'off', 0, 'chunks', 0, 'readers', readers, 'created', int(now), 'updated', int(now),
           'lease', int(lease), 'retain', '1')
keep_until(lease + tonumber(ARGV[3]))
return {'lease', v}
