"""Streams reach the caller byte for byte, as they arrive, and end cleanly even when upstream fails."""

from __future__ import annotations

import contextlib
import itertools
import uuid

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import StreamTap
from tests.conftest import auth_headers, chat
from tests.scenarios import (
    CUT_WRITES,
    DONE,
    FIRST,
    LAST_WITH_USAGE,
    OPENAI_STYLE_WRITES,
    TRICKY_STREAM,
    USAGE_ONLY,
)
from tests.servers import GatewayProcess, ScriptedUpstream

OPENAI_STYLE_STREAM = b"".join(OPENAI_STYLE_WRITES)
CHAT_PATH = "/v1/openai/chat/completions"


def stream_bytes(client: httpx.Client, body: dict[str, object]) -> tuple[httpx.Response, bytes]:
    with client.stream("POST", CHAT_PATH, json=body) as response:
        return response, b"".join(response.iter_raw())


def error_event(received: bytes) -> dict[str, object]:
    last = received.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ")
    return orjson.loads(last[len(b"data: ") :])["error"]  # type: ignore[no-any-return]


def test_awkward_writes_arrive_byte_identical(client: httpx.Client) -> None:
    """Split events, several events per write, a split UTF-8 character, comments, CRLF events."""
    for extra in ({}, {"stream_options": {"include_usage": True}}, {"stream_options": None}):
        response, received = stream_bytes(client, chat("tricky", stream=True, **extra))
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert received == TRICKY_STREAM, extra


def test_gateway_asks_for_usage_and_withholds_only_that_chunk(
    client: httpx.Client, upstream: ScriptedUpstream
) -> None:
    request_id = str(uuid.uuid4())
    body = chat("scenario:openai_usage", stream=True, temperature=0.5)
    with client.stream("POST", CHAT_PATH, json=body, headers={"x-request-id": request_id}) as response:
        received = b"".join(response.iter_raw())

    assert received == OPENAI_STYLE_STREAM.replace(USAGE_ONLY, b"")
    (sent,) = upstream.find(request_id)
    assert sent.json == {**body, "stream_options": {"include_usage": True}}


def test_caller_that_asked_for_usage_gets_every_byte(client: httpx.Client) -> None:
    body = chat("scenario:openai_usage", stream=True, stream_options={"include_usage": True})
    assert stream_bytes(client, body)[1] == OPENAI_STYLE_STREAM


def test_include_usage_false_is_overridden_upstream_and_honoured_for_the_caller(
    client: httpx.Client, upstream: ScriptedUpstream
) -> None:
    request_id = str(uuid.uuid4())
    body = chat("scenario:openai_usage", stream=True, stream_options={"include_usage": False, "x": 1})
    with client.stream("POST", CHAT_PATH, json=body, headers={"x-request-id": request_id}) as response:
        received = b"".join(response.iter_raw())
    assert received == OPENAI_STYLE_STREAM.replace(USAGE_ONLY, b"")
    (sent,) = upstream.find(request_id)
    assert sent.json["stream_options"] == {"include_usage": True, "x": 1}


def test_each_event_is_relayed_as_it_arrives(client: httpx.Client, upstream: ScriptedUpstream) -> None:
    """Upstream sends nothing more until the caller has the first event: buffering would deadlock."""
    request_id = str(uuid.uuid4())
    body = chat("scenario:stream_gated", stream=True)
    with client.stream("POST", CHAT_PATH, json=body, headers={"x-request-id": request_id}) as response:
        chunks = response.iter_raw()
        received = b""
        while len(received) < len(FIRST):
            received += next(chunks)
        assert received == FIRST
        upstream.gate(request_id).set()
        received += b"".join(chunks)
    assert received == FIRST + LAST_WITH_USAGE + DONE


def test_upstream_dropping_mid_event_ends_the_stream_with_an_error_event(client: httpx.Client) -> None:
    response, received = stream_bytes(client, chat("scenario:stream_cut", stream=True))
    complete, _cut = CUT_WRITES
    assert response.status_code == 200
    # Every complete event, then one clean error event; the half event is never sent.
    assert received == complete + b"data: " + orjson.dumps({"error": error_event(received)}) + b"\n\n"
    assert DONE not in received
    assert error_event(received)["code"] == "upstream_bad_response"


def test_a_failure_after_done_is_not_an_error(client: httpx.Client) -> None:
    _, received = stream_bytes(client, chat("scenario:done_then_drop", stream=True))
    assert received == FIRST + LAST_WITH_USAGE + DONE


def test_upstream_silent_mid_stream_times_out_as_an_error_event(client: httpx.Client) -> None:
    _response, received = stream_bytes(client, chat("scenario:stream_stall", stream=True))
    assert received.startswith(FIRST)
    assert DONE not in received
    error = error_event(received)
    assert error["code"] == "upstream_timeout"
    assert error["type"] == "upstream_error"


def test_upstream_error_on_a_stream_request_is_relayed_as_json(client: httpx.Client) -> None:
    response = client.post(CHAT_PATH, json=chat("scenario:rate_limited", stream=True))
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "7"


def test_caller_hanging_up_closes_the_upstream_request(
    gateway: GatewayProcess, upstream: ScriptedUpstream
) -> None:
    request_id = str(uuid.uuid4())
    headers = auth_headers(request_id=request_id)
    with (
        httpx.Client(base_url=gateway.url, headers=headers, timeout=10) as caller,
        caller.stream("POST", CHAT_PATH, json=chat("scenario:stream_hold", stream=True)) as response,
    ):
        assert next(response.iter_raw()).startswith(b"data: ")
    # The caller's connection is closed here; upstream must see its own close well under a second.
    assert upstream.closed(request_id).wait(timeout=1.0)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_caller_giving_up_before_upstream_answers_closes_it_upstream(
    gateway: GatewayProcess, upstream: ScriptedUpstream, stream: bool
) -> None:
    request_id = str(uuid.uuid4())
    with (
        httpx.Client(base_url=gateway.url, headers=auth_headers(request_id=request_id)) as caller,
        contextlib.suppress(httpx.ReadTimeout),
    ):
        caller.post(CHAT_PATH, json=chat("scenario:slow_headers", stream=stream), timeout=0.3)
    assert upstream.closed(request_id).wait(timeout=1.0)


# --- the tap itself, over every way a stream can be cut into reads ----------------------------------


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0), max_size=40), withhold=st.booleans())
def test_tap_output_is_independent_of_how_reads_are_cut(cuts: list[int], withhold: bool) -> None:
    for stream in (TRICKY_STREAM, OPENAI_STYLE_STREAM):
        whole = StreamTap(withhold_usage_only=withhold, max_event_bytes=1 << 20)
        whole.feed(stream)
        tap = StreamTap(withhold_usage_only=withhold, max_event_bytes=1 << 20)
        sent = [tap.feed(piece) for piece in _split(stream, cuts)]
        out = b"".join(sent) + tap.rest()
        expected = stream.replace(USAGE_ONLY, b"") if withhold else stream
        assert out == expected
        # Only whole events go out (a stream cut later can still end cleanly), counted alike.
        assert all(not piece or piece.endswith((b"\n\n", b"\r\n\r\n")) for piece in sent)
        assert tap.content_chunks == whole.content_chunks > 0
        assert tap.done
        assert tap.usage is not None and tap.usage["total_tokens"] == 31


# The SSE standard lets a line end with \n, \r\n or \r; an event ends with a blank line. A line
# ending in \r followed by a blank line ending in \n would read as one \r\n: not a combination.
LINE_ENDS = [(line, blank) for line in (b"\n", b"\r\n", b"\r") for blank in (b"\n", b"\r\n", b"\r")]
LINE_ENDS = [(line, blank) for line, blank in LINE_ENDS if not (line == b"\r" and blank.startswith(b"\n"))]


@settings(max_examples=300, deadline=None)
@given(
    ends=st.lists(
        st.sampled_from(LINE_ENDS), min_size=len(OPENAI_STYLE_WRITES), max_size=len(OPENAI_STYLE_WRITES)
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    withhold=st.booleans(),
)
def test_tap_reads_events_with_any_line_ends(
    ends: list[tuple[bytes, bytes]], cuts: list[int], withhold: bool
) -> None:
    """Each event with its own line ends, the stream cut anywhere: every event goes out whole, as it
    came (the usage-only one left out when withheld), usage and [DONE] are seen."""
    events = [
        event.removesuffix(b"\n\n") + line + blank
        for event, (line, blank) in zip(OPENAI_STYLE_WRITES, ends, strict=True)
    ]
    stream = b"".join(events)
    tap = StreamTap(withhold_usage_only=withhold, max_event_bytes=1 << 20)
    sent = [tap.feed(piece) for piece in _split(stream, cuts)]
    kept = [event for event in events if not (withhold and event.startswith(USAGE_ONLY[:-2]))]
    assert b"".join(sent) + tap.rest() == b"".join(kept)
    boundaries = set(itertools.accumulate(len(event) for event in kept)) | {0}
    assert set(itertools.accumulate(len(piece) for piece in sent)) <= boundaries
    assert tap.usage is not None and tap.usage["total_tokens"] == 31
    assert tap.content_chunks == 2 and tap.done
