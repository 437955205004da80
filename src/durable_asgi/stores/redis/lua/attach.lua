-- Count readers in or out. ARGV: delta. Returns 0 if the stream is absent.
if redis.call('EXISTS', meta) == 0 then return 0 end
if redis.call('HINCRBY', meta, 'readers', ARGV[1]) < 0 then
  redis.call('HSET', meta, 'readers', 0)
end
return 1
