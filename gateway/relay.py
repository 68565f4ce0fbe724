"""Relay: an upstream answer to the caller, recording in `Facts` what the caller was given.

A `JsonAnswer` goes out with upstream's status and body (with `usage.estimated_cost` filled in from
the price table when upstream gave none, and usage the gateway does not believe replaced by what it
books). An `EventStream` is relayed byte for byte as its events arrive; once the caller has the
headers, a failure becomes one SSE error event and the stream ends (`relay_error` does the same for
a failure met outside the relay: a shutdown, a bug).
"""

from __future__ import annotations

import time
from typing import Any

from gateway.accounting import (
    Facts,
    believed_cost,
    believed_tokens,
    billed_usd,
    completion_text,
    estimate_prompt_tokens,
    estimate_tokens,
)
from gateway.asgi import REQUEST_ID_HEADER, ResponseSend, send_error, send_json
from gateway.errors import GatewayError, UpstreamUnavailable
from gateway.sse import StreamTap, StreamTooLarge
from gateway.upstream import Answer, EventStream, JsonAnswer, NestedTooDeeply, json_bytes
from gateway.validate import ChatRequest

_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


async def relay(
    answer: Answer, request: ChatRequest, request_id: bytes, send: ResponseSend, facts: Facts
) -> None:
    if isinstance(answer, JsonAnswer):
        await _relay_json(answer, request, request_id, send, facts)
    else:
        await _relay_events(answer, request, request_id, send, facts)


async def relay_error(
    send: ResponseSend, error: GatewayError, request_id: bytes, *, in_stream: GatewayError | None = None
) -> None:
    """Tell the caller of a failure as far as its response allows: `error` as JSON if nothing was
    sent yet; an SSE error event (`in_stream`, else `error`) ending a stream begun; else nothing (a
    JSON answer begun cannot change, and a complete response is the caller's)."""
    if not send.started:
        await send_error(send, error, request_id)
    elif send.event_stream and not send.complete:
        await send({"type": "http.response.body", "body": _error_event(in_stream or error)})


async def _relay_json(
    answer: JsonAnswer, request: ChatRequest, request_id: bytes, send: ResponseSend, facts: Facts
) -> None:
    facts.upstream_status = answer.status
    body = answer.body
    if answer.status < 400 and isinstance(answer.payload, dict):
        facts.upstream_answered = True
        facts.service_tier = answer.payload.get("service_tier")
        body = _with_estimated_cost(answer.payload, body, request, facts)
    await send_json(send, answer.status, body, request_id, answer.headers)


def _with_estimated_cost(payload: dict[str, Any], body: bytes, request: ChatRequest, facts: Facts) -> bytes:
    """Usage with `estimated_cost`, as booked. Upstream's bytes go out as they came when it gave
    believable tokens and cost (the usual); else the usage is rewritten: tokens believed but no
    believable cost, the price table's cost; no believable tokens, the gateway's estimate of them."""
    usage: Any = payload.get("usage")
    tokens = believed_tokens(usage)
    if tokens is not None and believed_cost(usage.get("estimated_cost")):
        facts.usage = usage
        return body
    if tokens is None:
        facts.usage_estimated = True
        tokens = estimate_prompt_tokens(request.body), estimate_tokens(completion_text(payload))
        usage = {}  # upstream's figures are not relayed beside the gateway's own
    prompt, completion = tokens
    usage = {
        **usage,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated_cost": float(billed_usd(request.model, prompt, completion)),
    }
    facts.cost_added = True
    facts.usage = usage
    try:
        return json_bytes({**payload, "usage": usage})  # the answer itself stays as upstream gave it
    except NestedTooDeeply:
        raise UpstreamUnavailable(
            "The upstream's answer is nested too deeply to relay.", code="upstream_bad_response"
        ) from None


async def _relay_events(
    stream: EventStream, request: ChatRequest, request_id: bytes, send: ResponseSend, facts: Facts
) -> None:
    tap = StreamTap(
        withhold_usage_only=not request.caller_wants_usage, max_event_bytes=stream.max_event_bytes
    )
    reusable = False
    try:
        await _send_events(stream, tap, request_id, send, facts)
        # The caller's response ended with [DONE]; upstream's own end (normally right behind it) is
        # read now, so that its connection can go back to the pool. Any other is closed at once.
        reusable = tap.done and await stream.read_to_end()
    finally:
        stream.close(reusable=reusable)


async def _send_events(
    stream: EventStream, tap: StreamTap, request_id: bytes, send: ResponseSend, facts: Facts
) -> None:
    """The caller's whole response: the headers, each event as it comes, and the last bytes (the
    events ending with [DONE], or an error event)."""
    headers = [(b"content-type", stream.content_type), (REQUEST_ID_HEADER, request_id), *_SSE_HEADERS]
    stream.in_flight.inc()
    try:
        await send.start_event_stream(headers)
        facts.upstream_status, facts.upstream_answered = 200, True
        last = await _pump_events(stream, tap, send, facts)
        await send({"type": "http.response.body", "body": last})
    finally:
        stream.in_flight.dec()
        facts.usage = tap.usage
        facts.content_chunks = tap.content_chunks
        facts.service_tier = tap.service_tier
        facts.stream_done = tap.done


async def _pump_events(stream: EventStream, tap: StreamTap, send: ResponseSend, facts: Facts) -> bytes:
    """Relay events until [DONE] or upstream's end; return the last bytes to send (an error event on
    failure). The read that carries [DONE] is returned rather than sent, to go out with the end."""
    failure: GatewayError | None = None
    last = b""
    try:
        while chunk := await stream.read():
            out = tap.feed(chunk)
            if out and facts.first_byte_at is None:
                facts.first_byte_at = time.monotonic()
            if tap.done:  # these events end with [DONE]: they are the caller's last bytes
                last = out
                break
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
    except GatewayError as error:  # what reading upstream raised, mapped
        failure = error
    except StreamTooLarge:
        failure = stream.event_too_large()
    if failure is None and not tap.done:
        last = tap.rest()  # upstream ended: a final [DONE] may lack its blank line
    if tap.done:
        return last
    facts.error = failure = failure or stream.ended_before_done()
    return _error_event(failure)


def _error_event(error: GatewayError) -> bytes:
    """What ends a failed stream: one SSE error event (a cut event's partial bytes were never sent)."""
    return b"data: " + error.to_json() + b"\n\n"
