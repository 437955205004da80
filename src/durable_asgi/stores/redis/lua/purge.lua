-- Remove the stream if it has expired. Returns 1 if it did.
local exp = redis.call('HGET', meta, 'exp')
if exp and tonumber(exp) <= now then
  redis.call('DEL', meta, body)
  return 1
end
return 0
