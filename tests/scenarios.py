"""What the scripted upstream answers: one scenario per name, chosen by the request's last message.

A test sends `{"role": "user", "content": "scenario:NAME"}` and the upstream plays NAME. Every
byte a scenario writes is a constant here, so the tests can compare what the caller received.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from tests.servers import MODEL, Connection, ScriptedUpstream, UpstreamRequest

USAGE = {"prompt_tokens": 15, "completion_tokens": 16, "total_tokens": 31, "estimated_cost": 0.0000268}

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-guMTxWgpFf",
    "object": "chat.completion",
    "created": 1694623155,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " Hello! It's nice to meet you."},
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
}
# Spacing and key order as a Python upstream writes them: the gateway must relay these bytes as they are.
COMPLETION_BYTES = orjson.dumps(COMPLETION).replace(b'":', b'": ').replace(b',"', b', "')


def chunk(
    content: str | None, *, finish: str | None = None, usage: Any = None, choices: bool = True
) -> bytes:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    event: dict[str, Any] = {
        "id": "Rc5hsIPHOSfMP3rNSFUw9tfR",
        "object": "chat.completion.chunk",
        "created": 1694623354,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
    }
    if usage is not None:
        event["usage"] = usage
    return b"data: " + orjson.dumps(event) + b"\n\n"


DONE = b"data: [DONE]\n\n"
ACCENTED = chunk(" café")  # "é" is two bytes in UTF-8: c3 a9
_SPLIT_AT = ACCENTED.index("é".encode()) + 1  # between the two bytes of "é"
FIRST = chunk(" Hi")
LAST_WITH_USAGE = chunk(None, finish="stop", usage=USAGE)

# DeepInfra's shape, in awkward writes: a comment, an event split in two, two events in one write,
# a UTF-8 character split across writes, an event ended by CRLF, usage on the last content chunk.
TRICKY_WRITES = [
    b": keep-alive\n\n",
    FIRST[:20],
    FIRST[20:],
    chunk("!") + chunk(" How"),
    ACCENTED[:_SPLIT_AT],
    ACCENTED[_SPLIT_AT:],
    chunk(" ok").replace(b"\n\n", b"\r\n\r\n"),
    LAST_WITH_USAGE,
    DONE,
]
TRICKY_STREAM = b"".join(TRICKY_WRITES)

# OpenAI's shape: usage on a separate chunk with empty choices (sent because the gateway asked).
USAGE_ONLY = chunk(None, usage=USAGE, choices=False)
OPENAI_STYLE_WRITES = [FIRST, chunk(" there"), chunk(None, finish="stop"), USAGE_ONLY, DONE]

# A stream cut in the middle of an event.
CUT_WRITES = [FIRST, chunk(" there")[:25]]


async def play(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    name = _scenario_name(request)
    scenario = SCENARIOS.get(name, _complete)
    await scenario(upstream, request, connection)


def _scenario_name(request: UpstreamRequest) -> str:
    try:
        content = request.json["messages"][-1]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return content.removeprefix("scenario:") if isinstance(content, str) else ""


async def _complete(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    if request.json.get("stream") is True:
        await _writes(connection, TRICKY_WRITES)
    else:
        await connection.json(200, COMPLETION_BYTES)


async def _writes(connection: Connection, writes: list[bytes], *, end: bool = True) -> None:
    """Each piece in its own chunk and its own TCP write, paced so each arrives on its own."""
    await connection.start_chunked()
    for piece in writes:
        await connection.chunk(piece)
        await asyncio.sleep(0.005)  # pacing only: what is asserted holds however the pieces arrive
    if end:
        await connection.end_chunked()


async def _no_cost(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    usage = {key: value for key, value in USAGE.items() if key != "estimated_cost"}
    await connection.json(200, orjson.dumps({**COMPLETION, "usage": usage}))


async def _rate_limited(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    body = b'{"error": {"message": "Rate limited", "type": "rate_limit_error", "code": "rate_limited"}}'
    await connection.json(429, body, {"Retry-After": "7"})


async def _server_error_json(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    await connection.json(500, b'{"error": {"message": "model crashed", "type": "server_error"}}')


async def _server_error_html(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    await connection.plain(503, b"<html>Service Unavailable</html>", "text/html")


async def _error_only_stdlib_reads(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    """Valid JSON that orjson refuses: a lone surrogate escaped in a string."""
    await connection.json(400, b'{"error": {"message": "bad \\ud800", "type": "invalid_request_error"}}')


async def _echo_token(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    """An upstream that quotes the credentials it was sent in its error (some do)."""
    quoted = request.headers.get("authorization", "").encode()
    await connection.json(401, b'{"error": {"message": "Incorrect API key: %s", "type": "auth"}}' % quoted)


async def _garbage(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await connection.plain(200, b"this is not json {", "application/json")


async def _drop(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    connection.drop()


async def _stall(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await connection.wait_closed_by_peer()


async def _openai_usage(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await _writes(connection, OPENAI_STYLE_WRITES)


async def _stream_cut(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await _writes(connection, CUT_WRITES, end=False)
    connection.drop()


async def _stream_stall(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await _writes(connection, [FIRST], end=False)
    await connection.wait_closed_by_peer()


async def _stream_gated(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    """First event, then nothing until the test, having received that event, opens the gate."""
    gate = request.headers["x-request-id"]
    await _writes(connection, [FIRST], end=False)
    await upstream.wait_gate(gate)
    for piece in (LAST_WITH_USAGE, DONE):
        await connection.chunk(piece)
    await connection.end_chunked()


async def _stream_hold(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    """First event, then wait for the gateway to close the connection, and tell the test."""
    await _writes(connection, [FIRST], end=False)
    await connection.wait_closed_by_peer()
    upstream.closed(request.headers["x-request-id"]).set()


async def _slow_headers(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    """No answer at all until the gateway gives up on this request and closes the connection."""
    await connection.wait_closed_by_peer()
    upstream.closed(request.headers["x-request-id"]).set()


async def _done_then_drop(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    """A complete stream, then the connection dies before the chunked body's terminator."""
    await _writes(connection, [FIRST, LAST_WITH_USAGE, DONE], end=False)
    connection.drop()


async def _redirect(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await connection.json(
        307, b'{"moved": true}', {"Location": f"http://127.0.0.1:{upstream.port}/elsewhere"}
    )


SCENARIOS = {
    "done_then_drop": _done_then_drop,
    "redirect": _redirect,
    "no_cost": _no_cost,
    "rate_limited": _rate_limited,
    "server_error_json": _server_error_json,
    "server_error_html": _server_error_html,
    "garbage": _garbage,
    "echo_token": _echo_token,
    "error_only_stdlib_reads": _error_only_stdlib_reads,
    "drop": _drop,
    "stall": _stall,
    "openai_usage": _openai_usage,
    "stream_cut": _stream_cut,
    "stream_stall": _stream_stall,
    "stream_gated": _stream_gated,
    "stream_hold": _stream_hold,
    "slow_headers": _slow_headers,
}
