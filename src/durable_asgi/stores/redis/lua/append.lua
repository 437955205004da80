-- Append to the body. ARGV: token, expected offset, orphan, data, chunks
return append(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]))
