"""What the scripted upstream answers: one scenario per name, chosen by the request's last message.

A test sends `{"role": "user", "content": "scenario:NAME"}` and the upstream plays NAME. Every
byte a scenario writes is a constant here, so the tests can compare what the caller received.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import zlib
from typing import Any

import orjson

from tests.servers import MODEL, Connection, ScriptedUpstream, UpstreamRequest, _head

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


# --- a hostile upstream (tests/test_hostile_upstream.py) --------------------------------------------

HOSTILE_ANSWER_BYTES = 200_000  # what the oversized answers below send; that gateway keeps 64 KiB
DRIP_INTERVAL_S = 0.3  # a byte this often: well inside the dripping tests' read_timeout_s of 1 s
_PLAIN_HEAD = (
    b'{"id": "chatcmpl-hostile", "object": "chat.completion", "created": 1694623155, "model": "'
    + MODEL.encode()
    + b'", "choices": [{"index": 0, "message": {"role": "assistant", "content": " Hello! It\'s nice'
    b' to meet you."}, "finish_reason": "stop"}]'
)
_LAST_CHUNK_HEAD = (
    b'data: {"id": "Rc5hsIPHOSfMP3rNSFUw9tfR", "object": "chat.completion.chunk", "created": 1694623354,'
    b' "model": "' + MODEL.encode() + b'", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]'
)


def spliced(request: UpstreamRequest) -> bytes:
    """The raw JSON members a test put in its first (system) message, to splice into an answer."""
    return str(request.json["messages"][0]["content"]).encode()


def spliced_answer(fields: bytes) -> bytes:
    return _PLAIN_HEAD + b", " + fields + b"}"


def spliced_stream(fields: bytes) -> list[bytes]:
    return [FIRST, chunk(" there"), _LAST_CHUNK_HEAD + b", " + fields + b"}\n\n", DONE]


async def _splice(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    """An answer (plain or streamed) carrying whatever usage, service_tier... the test wrote."""
    if request.json.get("stream") is True:
        await _writes(connection, spliced_stream(spliced(request)))
    else:
        await connection.json(200, spliced_answer(spliced(request)))


def _padded_answer(size: int) -> bytes:
    """A valid completion of `size` bytes: the bytes are what is too large, not their syntax."""
    start = orjson.dumps({**COMPLETION, "pad": ""})[:-2]
    return start + b" " * (size - len(start) - 2) + b'"}'


async def _huge_json(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await connection.json(200, _padded_answer(HOSTILE_ANSWER_BYTES))


async def _huge_json_chunked(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    await connection.start_chunked(200, "application/json")
    body = _padded_answer(HOSTILE_ANSWER_BYTES)
    for at in range(0, len(body), 16_384):
        await connection.chunk(body[at : at + 16_384])
    await connection.end_chunked()


async def _huge_sse_event(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    """One event, then an "event" that never ends: 200 kB without a blank line."""
    await connection.start_chunked()
    await connection.chunk(FIRST)
    await connection.chunk(b'data: {"choices": [{"delta": {"content": "')
    for _ in range(HOSTILE_ANSWER_BYTES // 16_384 + 1):
        await connection.chunk(b"x" * 16_384)
    await connection.end_chunked()


async def _encoded(
    connection: Connection, body: bytes, coding: str, content_type: str = "application/json"
) -> None:
    await connection.plain(200, body, content_type, {"Content-Encoding": coding})


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


@functools.cache
def gzip_bomb() -> bytes:
    return gzipped(_padded_answer(10 * 1024 * 1024))  # 10 MiB inflated, about 10 kB sent


async def _gzip_bomb(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await _encoded(connection, gzip_bomb(), "gzip")


async def _gzip_json(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await _encoded(connection, gzipped(COMPLETION_BYTES), "gzip")


async def _deflate_json(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await _encoded(connection, zlib.compress(COMPLETION_BYTES), "deflate")


async def _brotli_json(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await _encoded(connection, b"\x1b\x00\x00\x00 not decodable here", "br")


async def _gzip_stream(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await _encoded(connection, gzipped(TRICKY_STREAM), "gzip", "text/event-stream")


def _escaped(text: str) -> str:
    """Every character as a JSON \\u escape: the same string to any JSON reader."""
    return "".join(f"\\u{ord(character):04x}" for character in text)


async def _echo_token_upper(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    """An error in OpenAI's shape, quoting the token in capitals (plain ASCII, no escapes)."""
    token = request.headers["authorization"].removeprefix("Bearer ").upper().encode()
    body = b'{"error": {"message": "Key %s refused", "type": "auth", "param": null, "code": null}}' % token
    await connection.json(401, body)


async def _echo_token_escaped(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    """The token in JSON escapes, in mixed case, as a key, in a list and beside non-ASCII text; and
    in every header (the gateway passes retry-after on)."""
    token = request.headers["authorization"].removeprefix("Bearer ")
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(token))
    body = (
        b'{"error": {"message": "Incorrect API key: %s", "type": "auth", "param": null, "code": null,'
        b' "seen": ["%s", "caf\xc3\xa9 %s"], "%s": 1}}'
        % (_escaped(token).encode(), mixed.encode(), token.encode(), token.upper().encode())
    )
    headers = {"Retry-After": token, "X-Echo": token.upper()}
    await connection.json(429, body, headers)


async def _stream_token_header(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    """A stream whose Content-Type quotes the token."""
    token = request.headers["authorization"].removeprefix("Bearer ")
    await connection.raw(
        _head(200, {"Content-Type": f"text/event-stream; x={token}", "Transfer-Encoding": "chunked"})
    )
    for piece in (FIRST, LAST_WITH_USAGE, DONE):
        await connection.chunk(piece)
    await connection.end_chunked()


async def _stream_redirect(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    head = {"Location": f"http://127.0.0.1:{upstream.port}/elsewhere", "Content-Type": "text/event-stream"}
    await connection.raw(_head(302, {**head, "Content-Length": str(len(TRICKY_STREAM))}) + TRICKY_STREAM)


async def _stream_no_content(
    upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection
) -> None:
    await connection.raw(_head(204, {"Content-Type": "text/event-stream"}))


ERROR_BODIES: dict[str, tuple[int, bytes]] = {  # name: (status, body) of upstream errors, as sent
    "error_message_only": (429, b'{"error": {"message": "Model busy, retry later"}}'),  # DeepInfra's 429
    "error_text": (400, b'{"error": "bad things happened"}'),
    "error_detail": (404, b'{"detail": "Not Found"}'),
    "error_detail_list": (422, b'{"detail": [{"loc": ["body", "x"], "msg": "field required"}]}'),
    "error_in_shape": (
        400,
        b'{"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": null}}',
    ),
}


async def _error_body(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    status, body = ERROR_BODIES[_scenario_name(request)]
    await connection.json(status, body)


async def _drip_json(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    """A byte at a time, each well within the read timeout: only a deadline on the whole ends it."""
    await connection.raw(_head(200, {"Content-Type": "application/json", "Content-Length": "1000"}))
    await _drip(connection)


async def _drip_stream(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    await connection.start_chunked()
    await connection.chunk(FIRST)
    await _drip(connection, framed=True)


async def _drip(connection: Connection, *, framed: bool = False) -> None:
    for _ in range(200):  # a minute at most, should the gateway never give up
        await asyncio.sleep(DRIP_INTERVAL_S)
        await connection.raw(b"1\r\n:\r\n" if framed else b" ")  # a chunk of one byte, or one byte


async def _close_after(upstream: ScriptedUpstream, request: UpstreamRequest, connection: Connection) -> None:
    """A complete answer, then the connection closed: each request needs a new upstream socket."""
    await connection.json(200, COMPLETION_BYTES, {"Connection": "close"})
    connection.keep_alive = False


SCENARIOS.update(
    {
        "splice": _splice,
        "huge_json": _huge_json,
        "huge_json_chunked": _huge_json_chunked,
        "huge_sse_event": _huge_sse_event,
        "gzip_bomb": _gzip_bomb,
        "gzip_json": _gzip_json,
        "deflate_json": _deflate_json,
        "brotli_json": _brotli_json,
        "gzip_stream": _gzip_stream,
        "echo_token_upper": _echo_token_upper,
        "echo_token_escaped": _echo_token_escaped,
        "stream_token_header": _stream_token_header,
        "stream_redirect": _stream_redirect,
        "stream_no_content": _stream_no_content,
        "drip_json": _drip_json,
        "drip_stream": _drip_stream,
        "close_after": _close_after,
        **{name: _error_body for name in ERROR_BODIES},
    }
)
