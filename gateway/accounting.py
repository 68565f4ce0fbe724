"""Money and tokens: exact costs from the price table, and token estimates where upstream gave none.

Costs are `Decimal` USD, computed from integer token counts and decimal prices: never a float
until the moment a number is written into a JSON answer for the caller.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from gateway.config import ModelConfig

MILLION = Decimal(1_000_000)
CHARS_PER_TOKEN = 4  # the usual rule of thumb for Llama-family tokenizers on English text


def cost_usd(model: ModelConfig, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """Exact price-table cost of a request."""
    return (
        prompt_tokens * model.input_usd_per_mtok + completion_tokens * model.output_usd_per_mtok
    ) / MILLION


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
    """The generated text of a non-streamed chat.completion."""
    texts = []
    for choice in payload.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
    return "".join(texts)
