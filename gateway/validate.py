"""Request checks: the body is parsed once and every documented range is checked before upstream.

The parsed body is only read, never rebuilt: what goes upstream is the caller's own bytes, except
on a stream without `stream_options`, where `"stream_options":{"include_usage":true}` is spliced in
so usage can be booked (SPEC §3, Relay).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.config import ModelConfig
from gateway.errors import InvalidRequest, ModelNotFound

ROLES = frozenset({"system", "user", "assistant", "tool"})
TOOL_CHOICES = ("none", "auto")
_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'

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
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = _parse_leniently(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object.", code="invalid_json")
    return body


def _parse_leniently(raw: bytes) -> Any:
    """orjson rejects some valid JSON (lone surrogates in strings); retry with the standard parser."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest("Request body is not valid JSON.", code="invalid_json") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _upstream_body(raw: bytes, body: dict[str, Any], stream: bool, caller_wants_usage: bool) -> bytes:
    if not stream or caller_wants_usage:
        return raw
    if "stream_options" not in body:
        # Splice before the closing brace: the caller's bytes stay as they are.
        end = raw.rfind(b"}")
        return raw[:end] + _INCLUDE_USAGE
    # Rare: the caller sent stream_options without include_usage. Rebuild the body with the standard
    # library, which keeps integers of any size and escapes what orjson would refuse.
    exact = json.loads(raw.decode("utf-8"))
    options = exact.get("stream_options")
    exact["stream_options"] = (
        {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    )
    return json.dumps(exact, separators=(",", ":")).encode()


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
        if not is_kind(value):
            raise _wrong_type(field, kind, value)
        if value < low or (low_open and value == low):
            raise _out_of_range(field, ">" if low_open else "≥", low, value)
        if value > high or (high_open and value == high):
            raise _out_of_range(field, "<" if high_open else "≤", high, value)

    return check


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
    "presence_penalty": _number_in(-2, 2),
    "frequency_penalty": _number_in(-2, 2),
    "repetition_penalty": _number_in(0.01, 5),
    "seed": _integer_in(0, 2**63, high_open=True),
    "tool_choice": _check_tool_choice,
    "user": _check_string,
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
    if url.startswith(("https://", "http://")) and len(url) > url.index("//") + 2:
        return
    if url.startswith("data:image/"):
        header, comma, data = url.partition(",")
        if comma and header.endswith(";base64") and len(header) > len("data:image/;base64") and data:
            return
    raise InvalidRequest(
        f"{where} must be an http(s) URL or a data:image/...;base64, URI, got {_show(url)}", param=where
    )


# --- messages of the errors ------------------------------------------------------------------------


def _wrong_type(field: str, kind: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"{field} must be {kind}, got {_json_type(value)} {_show(value)}", param=field, code="invalid_type"
    )


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
    try:
        return _clip(orjson.dumps(value).decode())
    except TypeError:
        return _clip(repr(value))


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
