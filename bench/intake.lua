-- wrk script for bench/intake.py: POST /leads, 70 % new people and 30 % repeats of an earlier one (the dedupe
-- path), each thread with its own people. The key comes in the BENCH_KEY environment variable.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  made = 0
  repeats = 0
  math.randomseed(1000 + tid)
  headers = {["Content-Type"] = "application/json", ["X-API-Key"] = os.getenv("BENCH_KEY")}
end

function request()
  local person
  if made > 0 and math.random() < 0.30 then
    person = math.random(1, made)
    repeats = repeats + 1
  else
    made = made + 1
    person = made
  end
  local phone = ""
  if person <= 4000 then
    phone = string.format(',"phone":"+1415555%04d"', tid * 4000 + person)
  end
  local body = string.format('{"first_name":"Bench%d","last_name":"Person","email":"bench.%d.%d@example.com"%s,'
    .. '"address":{"city":"San Francisco","country":"US"},"current_credit":2500,"utm_source":"bench"}',
    person, tid, person, phone)
  return wrk.format("POST", "/leads", headers, body)
end

function done(summary, latency, requests)
  local people = 0
  for _, thread in ipairs(threads) do
    people = people + thread:get("made")
  end
  io.write(string.format('BENCH {"people": %d, "requests": %d, "non_2xx": %d, "errors": %d, "p50_us": %d, '
    .. '"p90_us": %d, "p99_us": %d}\n', people, summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
