-- wrk script for the benchmark: POST a small chat completion and print one machine-readable line.
-- The line starts with "BENCH " followed by JSON; bench/run.py parses it. Latencies are in microseconds.

wrk.method = "POST"
wrk.body = '{"model": "meta-llama/Llama-3.2-11B-Vision-Instruct", '
  .. '"messages": [{"role": "user", "content": "Hello!"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "mean": %.1f, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max
  ))
end
