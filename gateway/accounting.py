"""Money and tokens: exact costs from the price table, and token estimates where upstream gave none.

Costs are `Decimal` USD, computed from integer token counts and decimal prices: never a float
until the moment a number is written into a JSON answer for the caller.

Upstream's usage is checked before it is believed: token counts must be JSON integers from 0 to
MAX_TOKENS, a cost a finite number from 0 to MAX_COST_USD. What fails is not booked; the gateway
estimates the tokens (or prices upstream's tokens from the table) and the row says so. Every text a
row takes from a caller or an upstream is clipped to its column and made storable (`storable`).

Booking is the last stage of the request path: the stages record what happened in `Facts` as they
go, and `outcome_of` decides from those, once, how the request ended.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal, TypeGuard

from gateway.asgi import ResponseSend
from gateway.config import ModelConfig
from gateway.errors import GatewayError, Overloaded, UpstreamTimeout
from gateway.ids import new_id
from gateway.ledger.schema import (
    KEY_NAME_CHARS,
    MODEL_CHARS,
    REQUEST_ID_CHARS,
    SERVICE_TIER_CHARS,
    USER_CHARS,
)
from gateway.ledger.store import NANOS_PER_USD, LedgerRow, usd

# How a request ended: the ledger's `outcome` column.
Outcome = Literal["ok", "rejected", "upstream_error", "timeout", "client_disconnected", "shutdown", "error"]
CALLER_LEFT_STATUS = 499  # booked for a caller that hung up (nginx's code; nobody receives it)

MILLION = Decimal(1_000_000)
CHARS_PER_TOKEN = 4  # the usual rule of thumb for Llama-family tokenizers on English text
# Ceilings on what one request can be believed to have used: far above any real answer (the largest
# context windows are ~10^7 tokens), far below what overflows a 64-bit column or a budget.
MAX_TOKENS = 10**9
MAX_COST_USD = 10
UNKNOWN_MODEL = "unknown"  # what a row books for a model the gateway does not serve

# What no text column takes: NUL (PostgreSQL refuses it) and lone UTF-16 surrogates (no UTF-8 for them).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def cost_usd(model: ModelConfig, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """Exact price-table cost of a request."""
    return (
        prompt_tokens * model.input_usd_per_mtok + completion_tokens * model.output_usd_per_mtok
    ) / MILLION


def billed_usd(model: ModelConfig, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """The price-table cost as the ledger books it, to the nano-dollar: the figure a caller is told,
    so that what callers were told adds up to the reports exactly."""
    return usd(nanos(cost_usd(model, prompt_tokens, completion_tokens)))


def estimate_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)  # ceiling division


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens estimated from the text of the request's messages."""
    total = 0
    for message in body.get("messages") or ():
        total += 4  # role and framing tokens per message
        content = message.get("content")
        if isinstance(content, str):
            total += estimate_tokens(content)
        elif isinstance(content, list):
            total += sum(
                estimate_tokens(part.get("text") or "") for part in content if part.get("type") == "text"
            )
    return total


def completion_text(payload: dict[str, Any]) -> str:
    """The generated text of a non-streamed chat.completion (whatever upstream put in `choices`)."""
    choices = payload.get("choices")
    texts = []
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
    return "".join(texts)


def nanos(usd_amount: Decimal) -> int:
    """USD as whole nano-dollars (half-even: a price table with sub-nano prices rounds fairly)."""
    return int((usd_amount * NANOS_PER_USD).to_integral_value(ROUND_HALF_EVEN))


def upstream_cost_nanos(estimated_cost: Any) -> int | None:
    """Upstream's `estimated_cost` (a JSON number, read as float) in nano-dollars, exactly as written;
    None if it is not to be believed (not a number, not finite, negative, over MAX_COST_USD).

    `repr` of a float is the shortest text that reads back as it, which is the upstream's own
    literal for any number it wrote with up to 15 significant digits (0.0000268 -> "2.68e-05").
    """
    return nanos(Decimal(repr(estimated_cost))) if believed_cost(estimated_cost) else None


def believed_cost(estimated_cost: Any) -> bool:
    """A JSON number, finite, from 0 to MAX_COST_USD: what a cost for one request can be."""
    if isinstance(estimated_cost, bool) or not isinstance(estimated_cost, int | float):
        return False
    if isinstance(estimated_cost, float) and not math.isfinite(estimated_cost):
        return False
    return 0 <= estimated_cost <= MAX_COST_USD


def believed_tokens(usage: Any) -> tuple[int, int] | None:
    """Upstream's prompt and completion tokens, if `usage` holds counts that can be believed."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if _is_count(prompt) and _is_count(completion):
        return prompt, completion
    return None


def storable(text: str, max_chars: int) -> str:
    """`text` as a column takes it: at most `max_chars` characters, with NUL and lone surrogates
    replaced by U+FFFD. The last line of defence: the edge refuses or replaces such texts first."""
    if len(text) > max_chars:
        text = text[:max_chars]
    if text.isascii():  # the usual case: one scan in C, and no copy
        return text.replace("\x00", "\ufffd") if "\x00" in text else text
    return UNSTORABLE.sub("\ufffd", text)


@dataclass(slots=True)
class Facts:
    """What the stages of one request recorded as it went: how it ended is decided from these
    (`outcome_of`), and what it used is booked from them."""

    error: Exception | None = None  # the gateway's own error answer (or ending a stream), or a bug
    caller_left: bool = False  # the caller hung up before its response was complete
    shutdown: bool = False  # the server's cancel (its shutdown grace ran out) cut the response short
    upstream_status: int | None = None  # upstream's answer was relayed with this status
    stream_done: bool = False  # the stream reached [DONE]
    upstream_answered: bool = False  # upstream began an answer that may be billed
    usage: dict[str, Any] | None = None
    usage_estimated: bool = False
    cost_added: bool = False  # the gateway filled in estimated_cost from the price table
    content_chunks: int = 0
    first_byte_at: float | None = None
    service_tier: Any = None


def outcome_of(facts: Facts) -> Outcome:
    """How a request ended, from what happened (the first that applies, in this order)."""
    if facts.caller_left:  # a stream the caller had whole, [DONE] included, is a success all the same
        return "ok" if facts.stream_done else "client_disconnected"
    if facts.shutdown:
        return "shutdown"
    if facts.error is not None:
        return _outcome_of_error(facts.error)
    if facts.stream_done:
        return "ok"
    if facts.upstream_status is not None:
        return "ok" if facts.upstream_status < 400 else "upstream_error"
    return "error"


def _outcome_of_error(error: Exception) -> Outcome:
    if not isinstance(error, GatewayError):
        return "error"  # a bug, not a request problem
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, Overloaded) or error.status < 500:  # refused: nothing billable went upstream
        return "rejected"
    return "upstream_error"


def booked_status(outcome: Outcome, facts: Facts, sent: ResponseSend) -> int:
    """The status the caller got (499 if it hung up first)."""
    if outcome == "client_disconnected":
        return CALLER_LEFT_STATUS
    if sent.started:
        return sent.status
    if isinstance(facts.error, GatewayError):  # its answer could not be sent
        return facts.error.status
    return 503 if outcome == "shutdown" else 500


@dataclass(slots=True)
class Booking:
    """Who sent a request and what it asked for, made into its ledger row when it ends."""

    request_id: str
    key_name: str
    started: float = field(default_factory=time.monotonic)
    wall_us: int = field(default_factory=lambda: time.time_ns() // 1000)
    body: dict[str, Any] | None = None
    model: ModelConfig | None = None

    def row(self, facts: Facts, sent: ResponseSend) -> LedgerRow:
        outcome = outcome_of(facts)
        status = booked_status(outcome, facts, sent)
        prompt, completion, usage_source = self._tokens(facts)
        cost, cost_source = self._cost(facts, usage_source, prompt, completion)
        body = self.body or {}
        user = body.get("user")
        tier = facts.service_tier
        finished = sent.finished_at or time.monotonic()  # not counting a drain after the answer
        return LedgerRow(
            row_id=new_id(self.wall_us),
            request_id=storable(self.request_id, REQUEST_ID_CHARS),
            ts_us=self.wall_us,
            day=utc_day(self.wall_us),
            key_name=storable(self.key_name, KEY_NAME_CHARS),
            user=storable(user, USER_CHARS) if isinstance(user, str) else None,
            model=self._model_name(body.get("model"), status),
            stream=body.get("stream") is True,
            outcome=outcome,
            status=status,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,  # upstream's own total is not booked: rows add up
            cost_nanos=cost,
            usage_source=usage_source,
            cost_source=cost_source,
            latency_us=int((finished - self.started) * 1_000_000),
            ttfb_us=None
            if facts.first_byte_at is None
            else int((facts.first_byte_at - self.started) * 1_000_000),
            service_tier=storable(tier, SERVICE_TIER_CHARS) if isinstance(tier, str) else None,
        )

    def _model_name(self, named: Any, status: int) -> str | None:
        """The served model; for a request refused before it was checked, the name it gave, unless
        that was the refusal (404 model_not_found: the model is checked first, nothing else is 404)."""
        if self.model is not None:
            return self.model.name
        if not isinstance(named, str):
            return None
        return UNKNOWN_MODEL if status == 404 else storable(named, MODEL_CHARS)

    def _tokens(self, facts: Facts) -> tuple[int, int, str]:
        tokens = believed_tokens(facts.usage)
        if tokens is not None:
            return *tokens, "estimated" if facts.usage_estimated else "upstream"
        if facts.upstream_answered and self.body is not None:
            # Upstream never said, or not believably (a stream cut or left, absurd counts): what the
            # caller was sent, one token a chunk.
            return estimate_prompt_tokens(self.body), facts.content_chunks, "estimated"
        return 0, 0, "none"

    def _cost(self, facts: Facts, usage_source: str, prompt: int, completion: int) -> tuple[int, str]:
        if usage_source == "none" or self.model is None:
            return 0, "none"
        if usage_source == "upstream" and facts.usage is not None and not facts.cost_added:
            upstream = upstream_cost_nanos(facts.usage.get("estimated_cost"))
            if upstream is not None:
                return upstream, "upstream"
        return nanos(cost_usd(self.model, prompt, completion)), "price_table"


@functools.lru_cache(maxsize=4)
def _utc_day_of(day_number: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day_number * 86_400))


def utc_day(wall_us: int) -> str:
    """The UTC date of a time in epoch microseconds, as YYYY-MM-DD (formatted once a day)."""
    return _utc_day_of(wall_us // 86_400_000_000)


def _is_count(value: Any) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= MAX_TOKENS  # not a bool, not 5.0, not "5"
