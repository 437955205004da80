-- Extend the lease. ARGV: token, -, orphan, lease ms
local m, why = owned(ARGV[1], -1, tonumber(ARGV[3]))
if not m then return {'lost', why} end
local lease = now + tonumber(ARGV[4])
redis.call('HSET', meta, 'lease', int(lease))
keep_until(lease + tonumber(ARGV[3]))
return {'ok', tonumber(m.ver)}
