-- The stream's snapshot {now, fields...}, or nil.
local m, snap = load()
if not m then return nil end
return snap
