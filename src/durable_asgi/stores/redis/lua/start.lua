-- Record the response head. ARGV: token, -, orphan, status, headers
local m, why = owned(false)
if not m then return {'lost', why} end
local v = bump(ARGV[1])
redis.call('HSET', meta, 'status', ARGV[4], 'headers', ARGV[5], 'ver', v, 'updated', int(now))
return {'ok', v}
