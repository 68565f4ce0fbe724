"""/metrics: Prometheus' text format, parsed with prometheus_client's own parser, equal to the ledger."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BOB_KEY, auth_headers, chat
from tests.eventually import eventually
from tests.ledgers import all_rows
from tests.servers import CALLER_KEY, MODEL, UPSTREAM_TOKEN, GatewayProcess, ScriptedUpstream, gateway_config

CHAT_PATH = "/v1/openai/chat/completions"
METRICS_TOKEN = "metrics-token-5c1e"
GRAFANA_DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def metered(upstream: ScriptedUpstream, tmp_path: Path) -> Iterator[GatewayProcess]:
    """A gateway with a fresh ledger of its own, so that every count below is exact."""
    config = gateway_config(
        upstream.base_url,
        upstream={"read_timeout_s": 1.5},
        auth={"keys": [{"name": "alice", "key": CALLER_KEY}, {"name": "bob", "key": BOB_KEY}]},
    )
    process = GatewayProcess(config, tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}).start()
    yield process
    process.stop()


def scrape(gateway: GatewayProcess, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(gateway.url + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, found), value in samples.items() if sample == name and wanted <= found)


def test_counters_equal_the_ledger_after_a_known_mix(metered: GatewayProcess) -> None:
    alice = openai.OpenAI(base_url=metered.url + "/v1/openai", api_key=CALLER_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    for _ in range(3):
        alice.chat.completions.create(model=MODEL, messages=messages, user="u-ann")
    for _ in range(2):
        list(alice.chat.completions.create(model=MODEL, messages=messages, user="u-ben", stream=True))
    with httpx.Client(base_url=metered.url, headers=auth_headers(BOB_KEY), timeout=10) as bob:
        assert bob.post(CHAT_PATH, json=chat("scenario:rate_limited")).status_code == 429
        assert bob.post(CHAT_PATH, json=chat("scenario:server_error_json")).status_code >= 500
        assert bob.post(CHAT_PATH, json=chat("scenario:garbage")).status_code == 502
        assert bob.post(CHAT_PATH, json=chat(temperature=5)).status_code == 400
        assert bob.post(CHAT_PATH, json={**chat(), "model": "acme/not-served"}).status_code == 404
        cut = bob.post(CHAT_PATH, json=chat("scenario:stream_cut", stream=True))
        assert b"upstream_bad_response" in cut.content
    expected_rows = 11

    eventually(
        lambda: len(all_rows(metered.ledger_url)),
        until=lambda count: count == expected_rows,
        waiting_for="every row booked",
    )
    eventually(
        lambda: total(scrape(metered), "gateway_requests_total"),
        until=lambda count: count == expected_rows,
        waiting_for="every row counted in /metrics",
    )
    rows = all_rows(metered.ledger_url)
    samples = scrape(metered)

    # A model the gateway does not serve is "other": callers cannot create series of their own.
    label = {MODEL: MODEL, None: ""}
    by_outcome = Counter(
        (label.get(row["model"], "other"), row["key_name"], row["outcome"], str(row["status"]))
        for row in rows
    )
    assert by_outcome[("other", "bob", "rejected", "404")] == 1
    for (model, key, outcome, status), count in by_outcome.items():
        labels = {"model": model, "key": key, "outcome": outcome, "status": status}
        assert total(samples, "gateway_requests_total", **labels) == count, labels
    assert not any(("user", "u-ann") in labels for _, labels in samples)  # no user labels unless asked
    for key in ("alice", "bob"):
        mine = [row for row in rows if row["key_name"] == key]
        assert total(samples, "gateway_prompt_tokens_total", key=key) == sum(r["prompt_tokens"] for r in mine)
        completion = sum(r["completion_tokens"] for r in mine)
        assert total(samples, "gateway_completion_tokens_total", key=key) == completion
        assert total(samples, "gateway_cost_nanodollars_total", key=key) == sum(r["cost_nanos"] for r in mine)
    assert total(samples, "gateway_cost_nanodollars_total") > 0
    assert total(samples, "gateway_request_duration_seconds_count") == expected_rows
    streamed = [row for row in rows if row["ttfb_us"] is not None]
    assert total(samples, "gateway_time_to_first_byte_seconds_count") == len(streamed) >= 2
    assert total(samples, "gateway_upstream_errors_total", kind="http_4xx") == 1
    assert total(samples, "gateway_upstream_errors_total", kind="http_5xx") == 1
    assert total(samples, "gateway_upstream_errors_total", kind="bad_response") == 2  # garbage, the cut
    assert total(samples, "gateway_streams_in_flight") == 0
    eventually(  # set just after a write
        lambda: total(scrape(metered), "gateway_ledger_queue_depth"),
        until=lambda depth: depth == 0,
        waiting_for="an empty ledger queue in /metrics",
    )
    assert total(samples, "gateway_ledger_write_errors_total") == 0


def test_every_series_the_grafana_dashboard_queries_exists(metered: GatewayProcess) -> None:
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"\bgateway_[a-z_]+", expr)}
    assert (
        httpx.post(metered.url + CHAT_PATH, json=chat(stream=True), headers=auth_headers()).status_code == 200
    )
    eventually(
        lambda: total(scrape(metered), "gateway_requests_total"),
        until=lambda count: count == 1,
        waiting_for="the request counted in /metrics",
    )
    exposed = {name for name, _ in scrape(metered)}
    assert len(queried) >= 8 and queried <= exposed, queried - exposed
    labels_used = {label for expr in exprs for label in re.findall(r"by \(([a-z_]+)\)", expr)}
    assert labels_used <= {"key", "model", "outcome", "kind", "le"}


def test_metrics_token_and_user_labels(upstream: ScriptedUpstream, tmp_path: Path) -> None:
    config = gateway_config(upstream.base_url, metrics={"token_env": "METRICS_TOKEN", "user_labels": True})
    env = {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN, "METRICS_TOKEN": METRICS_TOKEN}
    gateway = GatewayProcess(config, tmp_path, env).start()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {CALLER_KEY}"}):
            refused = httpx.get(gateway.url + "/metrics", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["message"].startswith("Invalid metrics token")
        response = httpx.post(gateway.url + CHAT_PATH, json=chat(user="u-zoe"), headers=auth_headers())
        assert response.status_code == 200
        eventually(
            lambda: total(scrape(gateway, METRICS_TOKEN), "gateway_requests_total", user="u-zoe"),
            until=lambda count: count == 1,
            waiting_for="u-zoe's request counted in /metrics",
        )
    finally:
        gateway.stop()
    assert METRICS_TOKEN not in gateway.logs()


def test_metrics_add_up_across_workers(tmp_path: Path) -> None:
    """Any worker answers /metrics with the total of all of them."""
    gateway = GatewayProcess(gateway_config(server={"workers": 2}), tmp_path).start()
    try:
        requests = 24
        with httpx.Client(base_url=gateway.url, headers=auth_headers(), timeout=10) as client:
            for _ in range(requests):  # new connections: the kernel spreads them over both workers
                assert client.post(CHAT_PATH, json=chat(), headers={"Connection": "close"}).status_code == 200
        eventually(
            lambda: total(scrape(gateway), "gateway_requests_total"),
            until=lambda count: count == requests,
            waiting_for="every request counted in /metrics",
        )
        for _ in range(6):  # whichever worker answers
            assert total(scrape(gateway), "gateway_requests_total", outcome="ok") == requests
    finally:
        gateway.stop()
    workers = {row["request_id"] for row in all_rows(gateway.ledger_url)}
    assert len(workers) == requests


def test_streams_of_a_worker_that_died_leave_the_in_flight_gauge(
    upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """A worker killed mid-stream is replaced; the streams it held stop counting as in flight."""
    config = gateway_config(upstream.base_url, server={"workers": 2})
    gateway = GatewayProcess(config, tmp_path, {"DEEPINFRA_TOKEN": UPSTREAM_TOKEN}).start()
    streams = 6
    gates = [f"in-flight-{uuid.uuid4().hex[:8]}-{n}" for n in range(streams)]
    readers = []  # kept: a dropped half-read iterator would close its stream's connection
    try:
        with contextlib.ExitStack() as open_streams:
            for gate in gates:  # new connections: the kernel spreads them over both workers
                response = open_streams.enter_context(
                    httpx.stream(
                        "POST",
                        gateway.url + CHAT_PATH,
                        json=chat("scenario:stream_gated", stream=True),
                        headers=auth_headers(request_id=gate),
                        timeout=10,
                    )
                )
                assert response.status_code == 200
                readers.append(response.iter_raw())
                assert next(readers[-1]).startswith(b"data: ")  # the stream is open
            assert total(scrape(gateway), "gateway_streams_in_flight") == streams
            workers = gateway.worker_pids()
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            # uvicorn's supervisor notices within a second and starts replacements.
            eventually(
                lambda: httpx.get(gateway.url + "/metrics").status_code,
                until=lambda status: status == 200,
                ignoring=(httpx.TransportError,),
                within_s=20,
                waiting_for="replacement workers serving /metrics",
            )
            eventually(
                lambda: total(scrape(gateway), "gateway_streams_in_flight"),
                until=lambda streams: streams == 0,
                within_s=5,
                waiting_for="no stream in flight in /metrics",
            )
            assert not set(workers) & set(gateway.worker_pids())
    finally:
        for gate in gates:
            upstream.gate(gate).set()
        gateway.stop()
