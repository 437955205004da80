-- ARGV: -, -, -, ttl ms. Returns {1, version, generation} if it was running, else {0}.
local m = load()
if not m or m.state ~= 'running' or tonumber(m.lease) < now then return {0} end
return {1, settle(m, 'aborted', tonumber(ARGV[4]), '1'), m.gen}
