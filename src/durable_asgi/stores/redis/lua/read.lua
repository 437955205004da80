-- A snapshot and body bytes from it, atomically. ARGV: offset, limit.
-- Returns {now, fields..., data}.
local m, snap = load()
if not m then return nil end
local offset, limit, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(m.off)
local data = ''
if offset < size and limit > 0 then
  local first = redis.call('XREVRANGE', body, int(offset) .. '-1', '-', 'COUNT', 1)
  local want = math.min(limit, size - offset)
  if first[1] then
    local start = tonumber(string.match(first[1][1], '^%d+'))
    local parts = {}
    local last = math.min(offset + limit, size) - 1
    for i, e in ipairs(redis.call('XRANGE', body, first[1][1], int(last) .. '-1')) do
      parts[i] = e[2][2]
    end
    data = string.sub(table.concat(parts), offset - start + 1, offset - start + want)
  end
  if #data ~= want then
    return redis.error_reply('DURABLE the stored body is missing bytes (evicted by Redis?)')
  end
end
snap[#snap + 1] = data
return snap
