"""Request checks: the body is parsed once and every documented range is checked before upstream.

The parsed body is only read, never rebuilt: what goes upstream is the caller's own bytes, except
on a stream whose caller did not ask for usage, where `stream_options.include_usage: true` is
spliced into those bytes so usage can be booked (SPEC §3, Relay): everything else stays byte for byte.
A key given twice in one object is refused: the gateway would check one value and upstream might
use the other. Every scan of the caller's bytes here is linear in their size, so that no body up to
`server.max_body_bytes` can hold the event loop for long.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.accounting import UNSTORABLE
from gateway.config import ModelConfig
from gateway.errors import InvalidRequest, ModelNotFound

ROLES = frozenset({"system", "user", "assistant", "tool"})
TOOL_CHOICES = ("none", "auto")
_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'
# Every key is a string followed by a colon: counting these bounds the keys written from above, at the
# speed of a byte scan (`":` counted by bytes.count, the rare `" :` by a regex). An escaped quote and
# a colon inside a string (`\":`, common in tool calls' JSON arguments) is taken off; `\\":` (an
# escaped backslash ending a key) is put back, so the count never falls below the keys written.
_SPACED_KEY = re.compile(rb'"[ \t\r\n]+:')
# `user` is booked: at most 256 characters (SPEC's bound, well inside the ledger's column), and
# nothing a text column cannot store. Other control characters are kept: they are stored as they are,
# and the CSV export defuses them.
USER_MAX_CHARS = 256
_JSON_SCANNER = json.JSONDecoder()
_JSON_SPACE = re.compile(r"[ \t\r\n]*")

FieldCheck = Callable[[str, Any], None]


@dataclass(slots=True, frozen=True)
class ChatRequest:
    """A checked request: what the relay needs, and the exact bytes to send upstream."""

    model: ModelConfig
    stream: bool
    caller_wants_usage: bool
    upstream_body: bytes
    body: dict[str, Any]


def check_chat_request(body: dict[str, Any], raw: bytes, models: Mapping[str, ModelConfig]) -> ChatRequest:
    """Check a parsed body (from `parse_json_object(raw)`) against every documented rule."""
    model = _check_model(body.get("model"), models)
    _check_messages(body.get("messages"))
    for field, value in body.items():
        check = FIELD_CHECKS.get(field)
        if check is not None and value is not None:
            check(field, value)
    stream = body.get("stream") is True
    stream_options = body.get("stream_options")
    caller_wants_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    return ChatRequest(
        model=model,
        stream=stream,
        caller_wants_usage=caller_wants_usage,
        upstream_body=_upstream_body(raw, body, stream, caller_wants_usage),
        body=body,
    )


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = parse_json(raw)
    except ValueError:
        raise InvalidRequest("Request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object.", code="invalid_json")
    try:
        written = raw.count(b'":') + len(_SPACED_KEY.findall(raw)) - raw.count(b'\\":') + raw.count(b'\\\\":')
        if written > _count_keys(body):  # a key twice (or, rarely, a quote-colon the count kept)
            _refuse_duplicate_keys(raw)
    except RecursionError:
        raise InvalidRequest("Request body is nested too deeply.", code="invalid_json") from None
    return body


def parse_json(raw: bytes) -> Any:
    """JSON with orjson; what orjson refuses but is valid JSON (a lone surrogate escaped in a
    string, an integer over 64 bits) with the standard parser. ValueError if it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except RecursionError:
            raise ValueError("nested too deeply") from None


def _count_keys(body: dict[str, Any]) -> int:
    """Keys in the parsed body, at every depth (a loop, not recursion: any depth orjson takes). Only
    containers go on the stack: a long array of numbers or strings is one pass in a comprehension."""
    count = 0
    stack: list[Any] = [body]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            count += len(item)
            item = item.values()
        stack += [value for value in item if type(value) is dict or type(value) is list]
    return count


def _refuse_duplicate_keys(raw: bytes) -> None:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found = dict(pairs)
        if len(found) < len(pairs):
            twice = _first_repeated(name for name, _ in pairs)
            raise InvalidRequest(
                f"The key {_show(twice)} appears twice in one object of the request body; keys must be "
                "unique (upstream might use a value other than the one checked).",
                param=_clip(twice),
                code="duplicate_key",
            )
        return found

    json.loads(raw.decode("utf-8"), object_pairs_hook=unique)


def _first_repeated(names: Iterator[str]) -> str:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    raise AssertionError("no name repeats")  # not reached: the caller counted one twice


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _upstream_body(raw: bytes, body: dict[str, Any], stream: bool, caller_wants_usage: bool) -> bytes:
    if not stream or caller_wants_usage:
        return raw
    if "stream_options" not in body:
        # Splice before the closing brace: the caller's bytes stay as they are.
        end = raw.rfind(b"}")
        return raw[:end] + _INCLUDE_USAGE
    # Rare: the caller sent stream_options without include_usage: true. Only that value changes,
    # read again from its own bytes by the standard library (integers of any size stay exact).
    try:
        start, end = _top_level_value_span(raw, "stream_options")
        options = json.loads(raw[start:end])
        ours = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
        value = json.dumps(ours, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, RecursionError):  # 1e400 (no JSON for infinity), or nested past the stack
        raise InvalidRequest(
            "stream_options holds a value the gateway cannot pass on (a number beyond a double, or "
            "nesting too deep).",
            param="stream_options",
        ) from None
    return raw[:start] + value + raw[end:]


def _top_level_value_span(raw: bytes, key: str) -> tuple[int, int]:
    """Where the value of `key` lies in the bytes of a valid JSON object without duplicate keys.

    The standard library's scanner (C) reads each top-level key and skips each value, so the walk is
    linear in the body. It reads the bytes as Latin-1, one character a byte: its indexes are byte
    offsets, and JSON's structure is all ASCII, which no byte of a UTF-8 sequence is."""
    text = raw.decode("latin-1")
    index = _after_space(text, 0) + 1  # past "{"
    while True:
        name, index = _JSON_SCANNER.raw_decode(text, _after_space(text, index))
        start = _after_space(text, _after_space(text, index) + 1)  # past ":"
        _, end = _JSON_SCANNER.raw_decode(text, start)
        if name == key:
            return start, end
        index = _after_space(text, end) + 1  # past ","


def _after_space(text: str, index: int) -> int:
    match = _JSON_SPACE.match(text, index)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _check_model(model: Any, models: Mapping[str, ModelConfig]) -> ModelConfig:
    if model is None:
        raise InvalidRequest("model is required.", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    found = models.get(model)
    if found is None:
        raise ModelNotFound(
            f"The model {_show(model)} does not exist or is not served by this gateway.", param="model"
        )
    return found


# --- scalar fields ---------------------------------------------------------------------------------


def _number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> FieldCheck:
    return _range_check("a number", _is_number, low, high, low_open, high_open)


def _integer_in(low: int, high: int, *, high_open: bool = False) -> FieldCheck:
    return _range_check("an integer", _is_integer, low, high, False, high_open)


def _range_check(
    kind: str, is_kind: Callable[[Any], bool], low: float, high: float, low_open: bool, high_open: bool
) -> FieldCheck:
    def check(field: str, value: Any) -> None:
        if not is_kind(value) and not (_is_whole_float(value) and not low <= value <= high):
            raise _wrong_type(field, kind, value)
        if value < low or (low_open and value == low):
            raise _out_of_range(field, ">" if low_open else "≥", low, value)
        if value > high or (high_open and value == high):
            raise _out_of_range(field, "<" if high_open else "≤", high, value)

    return check


def _is_whole_float(value: Any) -> bool:
    """An integer written beyond 64 bits reaches us as a float (orjson): its range is what is wrong."""
    return type(value) is float and math.isfinite(value) and value.is_integer()


def _is_number(value: Any) -> bool:
    return (type(value) is float and math.isfinite(value)) or type(value) is int


def _is_integer(value: Any) -> bool:
    return type(value) is int


def _check_bool(field: str, value: Any) -> None:
    if type(value) is not bool:
        raise _wrong_type(field, "a boolean", value)


def _check_string(field: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _wrong_type(field, "a string", value)


def _check_user(field: str, value: Any) -> None:
    _check_string(field, value)
    if len(value) > USER_MAX_CHARS:
        raise InvalidRequest(
            f"{field} must be at most {USER_MAX_CHARS} characters, got {len(value)}", param=field
        )
    if UNSTORABLE.search(value):
        raise InvalidRequest(
            f"{field} must not hold a NUL character or an unpaired UTF-16 surrogate, got {_show(value)}",
            param=field,
        )


def _check_tool_choice(field: str, value: Any) -> None:
    if isinstance(value, dict):
        raise InvalidRequest(
            "tool_choice: choosing a specific function is not supported upstream; use 'none' or 'auto'.",
            param=field,
            code="unsupported_value",
        )
    if not isinstance(value, str) or value not in TOOL_CHOICES:
        raise InvalidRequest(f"tool_choice must be 'none' or 'auto', got {_show(value)}", param=field)


def _check_stream_options(field: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _wrong_type(field, "an object", value)
    include_usage = value.get("include_usage")
    if include_usage is not None:
        _check_bool("stream_options.include_usage", include_usage)


FIELD_CHECKS: dict[str, FieldCheck] = {
    "temperature": _number_in(0, 2),
    "top_p": _number_in(0, 1, low_open=True),
    "min_p": _number_in(0, 1),
    "top_k": _integer_in(0, 1000, high_open=True),
    "max_tokens": _integer_in(0, 1_000_000),
    # OpenAI's newer name for max_tokens, which current SDKs and LangChain send: the same range.
    "max_completion_tokens": _integer_in(0, 1_000_000),
    "presence_penalty": _number_in(-2, 2),
    "frequency_penalty": _number_in(-2, 2),
    "repetition_penalty": _number_in(0.01, 5),
    "seed": _integer_in(0, 2**63, high_open=True),
    "tool_choice": _check_tool_choice,
    "user": _check_user,
    "stream": _check_bool,
    "stream_options": _check_stream_options,
}


# --- messages --------------------------------------------------------------------------------------


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise InvalidRequest("messages is required.", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise InvalidRequest("messages must be a non-empty array.", param="messages")
    system_seen = False
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _wrong_type(where, "an object", message)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequest(
                f"{where}.role must be one of system, user, assistant, tool; got {_show(role)}",
                param=f"{where}.role",
            )
        if role == "system":
            if system_seen:
                raise InvalidRequest("At most one system message is allowed.", param=f"{where}.role")
            system_seen = True
        _check_content(where, role, message.get("content"))


def _check_content(where: str, role: str, content: Any) -> None:
    if content is None:
        if role == "assistant":  # an assistant turn that only calls tools has no content
            return
        raise InvalidRequest(
            f"{where}.content is required for a {role} message.",
            param=f"{where}.content",
            code="missing_required_parameter",
        )
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _wrong_type(f"{where}.content", "a string or an array of content parts", content)
    for index, part in enumerate(content):
        _check_part(f"{where}.content[{index}]", part)


def _check_part(where: str, part: Any) -> None:
    if not isinstance(part, dict):
        raise _wrong_type(where, "an object", part)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _wrong_type(f"{where}.text", "a string", part.get("text"))
    elif kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict):
            raise _wrong_type(f"{where}.image_url", "an object with a url", image)
        _check_image_url(f"{where}.image_url.url", image.get("url"))
    else:
        raise InvalidRequest(
            f"{where}.type must be 'text' or 'image_url', got {_show(kind)}", param=f"{where}.type"
        )


def _check_image_url(where: str, url: Any) -> None:
    if not isinstance(url, str):
        raise _wrong_type(where, "a string", url)
    scheme = url[:11].lower()  # schemes and media types are case-insensitive
    if scheme.startswith(("https://", "http://")) and len(url) > url.index("//") + 2:
        return
    if scheme.startswith("data:image/"):
        header, comma, data = url.partition(",")
        if comma and header.lower().endswith(";base64") and len(header) > len("data:image/;base64") and data:
            return
    raise InvalidRequest(
        f"{where} must be an http(s) URL or a data:image/...;base64, URI, got {_show(url)}", param=where
    )


# --- messages of the errors ------------------------------------------------------------------------


def _wrong_type(field: str, kind: str, value: Any) -> InvalidRequest:
    if isinstance(value, float) and not math.isfinite(value):  # 1e400 in the body
        got = "a number too large for a double"
    elif value is None or isinstance(value, bool):
        got = _show(value)
    else:
        got = f"{_json_type(value)} {_show(value)}"
    return InvalidRequest(f"{field} must be {kind}, got {got}", param=field, code="invalid_type")


def _out_of_range(field: str, relation: str, bound: float, value: Any) -> InvalidRequest:
    return InvalidRequest(f"{field} must be {relation} {bound}, got {_show(value)}", param=field)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "integer" if isinstance(value, int) else "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _show(value: Any) -> str:
    if isinstance(value, dict | list):
        return "(…)"
    if isinstance(value, str):
        value = value[:81]  # no need to write out more of a long string than is shown
    try:
        return _clip(orjson.dumps(value).decode())
    except TypeError:
        return _clip(repr(value))


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
