"""Watching an SSE stream as it passes: usage is read, bytes are not changed.

`StreamTap.feed` takes each read from upstream and returns what to write to the caller. In
pass-through mode that is the read itself, unchanged. When the gateway asked upstream for usage
on the caller's behalf, the caller must not see the usage-only chunk (empty `choices`) that only
exists because of that; then complete events are released as they end and the one chunk is left
out. Nothing else is ever dropped or rewritten. Events end with a blank line, `\n\n` or `\r\n\r\n`.
"""

from __future__ import annotations

from typing import Any

import orjson

_USAGE = b'"usage"'
_DONE_PREFIXES = (b"data: [DONE]", b"data:[DONE]")


class StreamTap:
    __slots__ = ("_pending", "_withhold_usage_only", "done", "events", "usage")

    def __init__(self, *, withhold_usage_only: bool) -> None:
        self._withhold_usage_only = withhold_usage_only
        self._pending = b""  # the start of an event whose end has not arrived yet
        self.usage: dict[str, Any] | None = None
        self.events = 0
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """Take one read from upstream; return the bytes to send to the caller now."""
        data = self._pending + chunk
        start = 0
        dropped: list[tuple[int, int]] = []
        while (end := _event_end(data, start)) != -1:
            if self._inspect(data, start, end) and self._withhold_usage_only:
                dropped.append((start, end))
            start = end
        self._pending = data[start:]
        if not self._withhold_usage_only:
            return chunk
        if not dropped:
            return data[:start]
        return _without(data[:start], dropped)

    @property
    def mid_event(self) -> bool:
        """Upstream stopped inside an event: bytes of it have arrived, its end has not."""
        return bool(self._pending)

    def held(self) -> bytes:
        """Bytes that arrived but were held back (the start of an event), to send when upstream ends."""
        return self._pending if self._withhold_usage_only else b""

    def _inspect(self, data: bytes, start: int, end: int) -> bool:
        """Note what one complete event says; True if it is a usage-only chunk."""
        self.events += 1
        if data.startswith(_DONE_PREFIXES, start):
            self.done = True
            return False
        if data.find(_USAGE, start, end) == -1:
            return False
        chunk = _decode_data(data[start:end])
        if not isinstance(chunk, dict):
            return False
        usage = chunk.get("usage")
        if not isinstance(usage, dict):
            return False
        self.usage = usage
        return chunk.get("choices") == []


def _event_end(data: bytes, start: int) -> int:
    """Index just past the blank line that ends the event starting at `start`, or -1."""
    lf = data.find(b"\n\n", start)
    crlf = data.find(b"\r\n\r\n", start, lf + 2 if lf != -1 else len(data))
    if crlf != -1:
        return crlf + 4
    return lf + 2 if lf != -1 else -1


def _decode_data(event: bytes) -> Any:
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None


def _without(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    out = bytearray()
    position = 0
    for start, end in spans:
        out += data[position:start]
        position = end
    out += data[position:]
    return bytes(out)
