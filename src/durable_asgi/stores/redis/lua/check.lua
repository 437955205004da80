-- A fenced no-op: fails a lost lease. ARGV: token, -, orphan
local m, why = owned(false)
if not m then return {'lost', why} end
return {'ok', tonumber(m.ver)}
