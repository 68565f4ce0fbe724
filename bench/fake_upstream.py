"""The fake upstream: an nginx config (with the echo module) that answers like DeepInfra, fast.

One nginx server, one worker, three path prefixes; each serves `<prefix>/v1/openai/chat/completions`:

- `/instant`: a fixed `chat.completion` JSON reply (usage with `estimated_cost`), at once;
- `/slow`: the same reply after 50 ms (`echo_sleep 0.05`);
- `/sse`: a `text/event-stream` of 32 `chat.completion.chunk` events 2 ms apart, the last content chunk
  (`finish_reason: stop`, empty delta) carrying `usage`, then `data: [DONE]`;
- `/trickle`: the same 32 events 0.5 s apart (16 s a stream): slow streams, for the memory benchmark;
- `/mixed`: `/sse` for a request whose `X-Request-Id` starts with `sse-` (the gateway passes the
  caller's on), `/slow` for any other: one upstream for the soak's mix of plain requests and streams.

The request body is read (`echo_read_request_body`) and ignored. `/healthz` answers 200.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

MODEL = "meta-llama/Llama-3.2-11B-Vision-Instruct"
REPLY_ID = "chatcmpl-bench"
STREAM_EVENTS = 32
STREAM_GAP_S = 0.002
SLOW_DELAY_S = 0.05
TRICKLE_GAP_S = 0.5
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"

REPLY_CONTENT = "Hello there, this is a fixed reply from the fake upstream used by the gateway benchmark."
_WORDS = REPLY_CONTENT.split()


def completion() -> dict[str, object]:
    """The non-streamed reply, shaped like DeepInfra's documented sample."""
    return {
        "id": REPLY_ID,
        "object": "chat.completion",
        "created": 1694623155,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(_WORDS)},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 15,
            "completion_tokens": 16,
            "total_tokens": 31,
            "estimated_cost": 0.0000268,
        },
    }


def stream_chunks() -> list[dict[str, object]]:
    """The streamed reply: content chunks, then the final chunk with `finish_reason` and `usage`."""
    contents = STREAM_EVENTS - 1
    chunks = [_chunk({"content": " " + _WORDS[i % len(_WORDS)]}, None) for i in range(contents)]
    chunks[0] = _chunk({"role": "assistant", "content": _WORDS[0]}, None)
    last = _chunk({}, "stop")
    last["usage"] = {
        "prompt_tokens": 15,
        "completion_tokens": contents,
        "total_tokens": 15 + contents,
        "estimated_cost": 0.00000225,
    }
    chunks.append(last)
    return chunks


def _chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, object]:
    return {
        "id": REPLY_ID,
        "object": "chat.completion.chunk",
        "created": 1694623354,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


_CONF = """\
load_module {echo_module};
{user}worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {workdir}/nginx-body;
  server {{
    listen 127.0.0.1:{port};
    location = /healthz {{ return 200 "ok\\n"; }}
{locations}  }}
}}
"""


def nginx_conf(port: int, workdir: Path) -> str:
    """The whole nginx.conf: one worker, no access log, temp files kept inside `workdir`."""
    json_reply = [_echo(orjson.dumps(completion()).decode())]
    locations = (
        _location("instant", "application/json", json_reply)
        + _location("slow", "application/json", [f"echo_sleep {SLOW_DELAY_S};", *json_reply])
        + _location("sse", "text/event-stream", _sse_lines(STREAM_GAP_S))
        + _location("trickle", "text/event-stream", _sse_lines(TRICKLE_GAP_S))
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would drop to `nobody`
    locations += (
        "    location = /mixed/v1/openai/chat/completions {\n"
        '      if ($http_x_request_id ~ "^sse-") { rewrite ^ /sse/v1/openai/chat/completions last; }\n'
        "      rewrite ^ /slow/v1/openai/chat/completions last;\n"
        "    }\n"
    )
    return _CONF.format(echo_module=ECHO_MODULE, user=user, workdir=workdir, port=port, locations=locations)


def _sse_lines(gap_s: float) -> list[str]:
    """Each event is written and flushed on its own, `gap_s` after the one before."""
    lines: list[str] = []
    for index, chunk in enumerate(stream_chunks()):
        if index > 0:
            lines.append(f"echo_sleep {gap_s};")
        lines += [_echo("data: " + orjson.dumps(chunk).decode(), event=True), "echo_flush;"]
    lines.append(_echo("data: [DONE]", event=True))
    return lines


def _location(prefix: str, content_type: str, body_lines: list[str]) -> str:
    lines = [f"default_type {content_type};", "echo_read_request_body;", *body_lines]
    inner = "".join(f"      {line}\n" for line in lines)
    return f"    location = /{prefix}/v1/openai/chat/completions {{\n{inner}    }}\n"


def _echo(text: str, event: bool = False) -> str:
    """An `echo -n` directive for `text`; `event` ends it with the blank line that ends an SSE event."""
    if any(char in text for char in "'\\$\n"):
        raise ValueError(f"cannot quote for nginx: {text!r}")
    end = "\\n\\n" if event else ""  # nginx turns the two characters \n into a newline
    return f"echo -n '{text}{end}';"
