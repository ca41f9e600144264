-- wrk script for bench/run: send one fixed POST request on every connection
-- and print the run's totals and latency percentiles as one JSON line.
--
-- Script arguments, after "--" on the wrk command line:
--   1. path of a file whose bytes are sent as the request body
--   2. Content-Type of the body
--   3. Authorization header value (optional; omitted when empty)
--
-- wrk (4.1) counts a response with a status of 400 or more in
-- summary.errors.status, so 3xx responses are not counted as errors.

local function read_file(path)
  local file = assert(io.open(path, "rb"))
  local data = file:read("*a")
  file:close()
  return data
end

-- Called once in each wrk thread, before wrk formats the request that the
-- thread then sends unchanged. args[0] is the URL, args[1] the first script
-- argument.
function init(args)
  if args[1] == nil or args[2] == nil then
    error("usage: wrk ... -s post.lua URL -- BODY_FILE CONTENT_TYPE [AUTHORIZATION]")
  end
  wrk.method = "POST"
  wrk.body = read_file(args[1])
  wrk.headers["Content-Type"] = args[2]
  if args[3] ~= nil and args[3] ~= "" then
    wrk.headers["Authorization"] = args[3]
  end
end

-- NaN (the mean of an empty histogram) and infinities are not valid JSON.
local function finite(value)
  if value ~= value or value == math.huge or value == -math.huge then
    return 0
  end
  return value
end

-- Latencies are in microseconds, as wrk records them; duration too.
function done(summary, latency, requests)
  local errors = summary.errors
  -- An empty histogram reports the largest 64-bit value as its minimum.
  local min = 0
  if summary.requests > 0 then
    min = latency.min
  end
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,'
      .. '"p50":%d,"p90":%d,"p99":%d,"p99.9":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    min, finite(latency.mean), finite(latency.stdev),
    finite(latency.max),
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)
  ))
end
