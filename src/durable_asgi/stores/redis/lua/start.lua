-- Record the response head. ARGV: token, -, orphan, status, headers
return start(ARGV[1], tonumber(ARGV[3]), ARGV[4], ARGV[5])
