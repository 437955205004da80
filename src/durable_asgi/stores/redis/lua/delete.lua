-- Remove the stream (ev stays EV_MARGIN ms, so versions keep rising). Returns {1, version}
-- if it existed, else {0}.
local m = load()
redis.call('DEL', meta, body)
if not m then return {0} end
local v = bump('')
redis.call('PEXPIRE', ev, EV_MARGIN)
return {1, v}
