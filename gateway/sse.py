"""Watching an SSE stream as it passes: usage is read, bytes are not changed.

`StreamTap.feed` takes each read from upstream and returns what to write to the caller now: every
event completed by that read, byte for byte. An event split across reads goes out the moment its
last byte arrives (in practice upstreams write whole events, and each read goes out as it came).
Holding back only the unfinished tail means that a stream cut mid-event can still end with a
clean error event: the caller never sees half an event it cannot parse. That tail is bounded
(`max_event_bytes`: an "event" larger than that is not SSE, and the stream is garbage), and it is
kept in a growing buffer, so that an event arriving in many reads is copied once, not once a read.

When the gateway asked upstream for usage on the caller's behalf, the caller must not see the
usage-only chunk (empty `choices`) that exists only because of that request: that one event is
left out. Nothing else is ever dropped or rewritten. Events end with a blank line; lines end with
`\n`, `\r\n` or `\r`, as the SSE standard allows (upstreams write `\n\n`; the rest is rare).
"""

from __future__ import annotations

import re
from typing import Any

from gateway.validate import parse_json

_USAGE = b'"usage":'
_CONTENT = b'"content":'
_DONE_PREFIXES = (b"data: [DONE]", b"data:[DONE]")
# A line end followed by another: a blank line. Atomic groups, so that a \r\n is never taken as two.
_BLANK_LINE = re.compile(rb"(?>\r\n|\n|\r)(?>\r\n|\n|\r)")


Buffer = bytes | bytearray  # a read as it came, or the tail held back with the reads after it


class StreamTooLarge(Exception):
    """Upstream sent more than `max_event_bytes` without ending an event."""


class StreamTap:
    __slots__ = (
        "_max_event_bytes",
        "_pending",
        "_withhold_usage_only",
        "content_chunks",
        "done",
        "service_tier",
        "usage",
    )

    def __init__(self, *, withhold_usage_only: bool, max_event_bytes: int) -> None:
        self._withhold_usage_only = withhold_usage_only
        self._max_event_bytes = max_event_bytes
        self._pending = bytearray()  # the start of an event whose end has not arrived yet
        self.usage: dict[str, Any] | None = None
        self.service_tier: Any = None
        self.content_chunks = 0  # events with non-empty content: the estimate if usage never comes
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """Take one read from upstream; return the complete events to send to the caller now."""
        pending = self._pending
        if not pending:
            if _is_one_plain_event(chunk):  # the usual read: a single content chunk
                if _has_string(chunk, _CONTENT, 0, len(chunk)):
                    self.content_chunks += 1
                return chunk
            return self._split(chunk, 0)
        # The end of an event may straddle the old tail and the new read: look 3 bytes back, not further.
        search_from = max(0, len(pending) - 3)
        pending += chunk
        return self._split(pending, search_from)

    def _split(self, data: Buffer, search_from: int) -> bytes:
        """Send the complete events of `data`, hold back the rest; only bytes from `search_from` on
        can end an event (what lies before was searched when it came)."""
        event_end = _event_end_any if data.find(b"\r", search_from) != -1 else _event_end_lf
        start = 0
        dropped: list[tuple[int, int]] = []
        while (end := event_end(data, search_from)) != -1:
            if self._inspect(data, start, end) and self._withhold_usage_only:
                dropped.append((start, end))
            start = search_from = end
        if start == 0:  # no event ended: all of it waits (a buffer that grows in place)
            self._pending = data if isinstance(data, bytearray) else bytearray(data)
        else:
            self._pending = bytearray(data[start:])
        if len(self._pending) > self._max_event_bytes:
            raise StreamTooLarge
        out = data[:start] if isinstance(data, bytes) else bytes(data[:start])  # a whole read: no copy
        return _without(out, dropped) if dropped else out

    def rest(self) -> bytes:
        """At a clean end of the stream: what is left after the last blank line (a final `[DONE]`
        written without its blank line counts as the end)."""
        if self._pending.startswith(_DONE_PREFIXES):
            self.done = True
        return bytes(self._pending)

    def _inspect(self, data: Buffer, start: int, end: int) -> bool:
        """Note what one complete event says; True if it is a usage-only chunk."""
        if data.startswith(_DONE_PREFIXES, start):
            self.done = True
            return False
        if _has_string(data, _CONTENT, start, end):
            self.content_chunks += 1
        if not _has_object(data, _USAGE, start, end):  # most chunks: no usage, or "usage": null
            return False
        chunk = _decode_data(data[start:end])
        if not isinstance(chunk, dict):
            return False
        usage = chunk.get("usage")
        if not isinstance(usage, dict):
            return False
        self.usage = usage
        self.service_tier = chunk.get("service_tier", self.service_tier)
        return chunk.get("choices") == []


def _is_one_plain_event(chunk: bytes) -> bool:
    """One whole event, not [DONE], without usage: nothing to find in it but its content (a few
    scans in C instead of the general loop, which gives the same answer). JSON escapes a carriage
    return in strings, so a \r is a line end: such reads take the general loop."""
    return (
        chunk.endswith(b"\n\n")
        and chunk.find(b"\n\n") == len(chunk) - 2
        and not chunk.startswith(_DONE_PREFIXES)
        and b"\r" not in chunk
        and _USAGE not in chunk
    )


def _event_end_lf(data: Buffer, search_from: int) -> int:
    """Index just past the first blank line at or after `search_from`, or -1 (no \r in `data`)."""
    end = data.find(b"\n\n", search_from)
    return end + 2 if end != -1 else -1


def _event_end_any(data: Buffer, search_from: int) -> int:
    """The same, for any line ends. A \r as the last byte read may be the first half of a \r\n:
    the event ends after the next byte arrives, so that no piece sent ends inside a line end."""
    blank = _BLANK_LINE.search(data, search_from)
    if blank is None or (blank.end() == len(data) and data.endswith(b"\r")):
        return -1
    return blank.end()


def _value_at(data: Buffer, key: bytes, start: int, end: int) -> int:
    """Index of the first byte of `key`'s value in data[start:end], or -1; found without parsing."""
    at = data.find(key, start, end)
    if at == -1:
        return -1
    at += len(key)
    while at < end and data[at] in b" \t":
        at += 1
    return at


def _has_string(data: Buffer, key: bytes, start: int, end: int) -> bool:
    at = _value_at(data, key, start, end)
    return at != -1 and data.startswith(b'"', at) and not data.startswith(b'""', at)


def _has_object(data: Buffer, key: bytes, start: int, end: int) -> bool:
    at = _value_at(data, key, start, end)
    return at != -1 and data.startswith(b"{", at)


def _decode_data(event: Buffer) -> Any:
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    try:
        return parse_json(b"\n".join(lines))
    except ValueError:
        return None


def _without(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    out = bytearray()
    position = 0
    for start, end in spans:
        out += data[position:start]
        position = end
    out += data[position:]
    return bytes(out)
