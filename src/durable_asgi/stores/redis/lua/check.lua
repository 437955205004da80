-- A fenced no-op: fails a lost lease. ARGV: token, -, orphan
local m, why = owned(ARGV[1], -1, tonumber(ARGV[3]))
if not m then return {'lost', why} end
return {'ok', tonumber(m.ver)}
