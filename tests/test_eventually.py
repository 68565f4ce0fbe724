"""The polling helper the other tests wait with: it returns the first value that passes, and on
timeout fails saying what it waited for and what it saw last."""

from __future__ import annotations

import re

import pytest

from tests.eventually import eventually, eventually_async


def test_the_first_value_that_passes_is_returned() -> None:
    calls: list[int] = []

    def probe() -> int:
        calls.append(len(calls))
        return len(calls)

    assert eventually(probe, until=lambda n: n >= 3, every_s=0, waiting_for="three calls") == 3
    assert len(calls) == 3


def test_a_timeout_names_what_was_awaited_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=re.escape("waited 0.05 s for the row of r-1; last: []")):
        eventually(list, within_s=0.05, waiting_for="the row of r-1")


def test_ignored_errors_mean_not_yet_and_the_last_one_is_told() -> None:
    with pytest.raises(AssertionError, match="last: the probe raised ConnectionError: refused"):
        eventually(_refused, within_s=0.05, ignoring=(ConnectionError,), waiting_for="a server")
    with pytest.raises(ConnectionError):  # an error not listed goes up at once
        eventually(_refused, within_s=10, waiting_for="a server")


def test_a_long_last_value_is_shown_by_its_end() -> None:
    with pytest.raises(AssertionError) as failed:
        eventually(lambda: "x" * 10_000 + "the end", until=lambda _: False, within_s=0.01, waiting_for="it")
    message = str(failed.value)
    assert message.endswith("the end'") and len(message) < 2100


async def test_the_async_form_takes_coroutine_and_plain_probes() -> None:
    seen: list[str] = []

    async def coroutine_probe() -> int:
        seen.append("coroutine")
        return len(seen)

    assert await eventually_async(coroutine_probe, until=lambda n: n == 2, every_s=0, waiting_for="two") == 2
    assert await eventually_async(lambda: seen, waiting_for="anything seen") == ["coroutine"] * 2
    with pytest.raises(AssertionError, match=re.escape("waited 0.05 s for nothing; last: 0")):
        await eventually_async(lambda: 0, within_s=0.05, waiting_for="nothing")


def _refused() -> None:
    raise ConnectionError("refused")
