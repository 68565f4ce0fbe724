"""Prometheus metrics (prometheus_client), served at /metrics.

Requests, tokens, cost and the latency histograms are counted from the ledger's own rows, by the
writer thread once the database has taken them: off the event loop, and equal to the ledger by
construction (a row not yet written is not counted yet). Cost is counted in nano-dollars, as the
ledger keeps it: whole numbers, exact in a float up to 2^53 (nine million dollars).
What the ledger does not hold is counted where it happens: upstream failures by kind (in the relay,
on the error path only), streams in flight (the relay), the writer's queue depth and failed writes.

With `--workers N` every worker keeps its values in files under $PROMETHEUS_MULTIPROC_DIR (made by
`gateway serve`), and /metrics on any worker adds up all of them (prometheus_client's multiprocess
mode). A `user` label only with `metrics.user_labels: true`: one series per end user is a set that
grows without bound, which Prometheus handles badly.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.ledger.store import LedgerRow

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
UPSTREAM_ERROR_KINDS = (
    "unreachable",
    "connect_timeout",
    "read_timeout",
    "total_timeout",
    "bad_response",
    "http_4xx",
    "http_5xx",
)
AUTH_ROUTE_KINDS = ("chat", "api", "admin", "metrics")
TTFB_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, *, models: Iterable[str], user_labels: bool, multiprocess_mode: bool = False) -> None:
        self._models = frozenset(models)
        self._user_labels = user_labels
        self._multiprocess = multiprocess_mode
        self.registry = CollectorRegistry(auto_describe=True)
        who = ("model", "key", "user") if user_labels else ("model", "key")
        registry = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests booked in the ledger, by how they ended.",
            (*who, "outcome", "status"),
            registry=registry,
        )
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens booked.", who, registry=registry)
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Completion tokens booked.", who, registry=registry
        )
        self.cost = Counter(
            "gateway_cost_nanodollars", "Cost booked, in nano-dollars (USD x 1e9).", who, registry=registry
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "From the request's arrival to its last byte.",
            ("model", "stream"),
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.ttfb = Histogram(
            "gateway_time_to_first_byte_seconds",
            "Streams: from the request's arrival to the first event sent to the caller.",
            ("model",),
            buckets=TTFB_BUCKETS_S,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures: unreachable, connect_timeout, read_timeout, total_timeout, bad_response, "
            "http_4xx or http_5xx (an error status relayed from upstream).",
            ("kind",),
            registry=registry,
        )
        for kind in UPSTREAM_ERROR_KINDS:  # every kind at 0 from the start: rate() needs a first sample
            self.upstream_errors.labels(kind)
        self.streams_in_flight = Gauge(
            "gateway_streams_in_flight",
            "Streams being relayed now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.ledger_queue = Gauge(
            "gateway_ledger_queue_depth",
            "Rows booked but not yet written to the ledger.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.ledger_write_errors = Counter(
            "gateway_ledger_write_errors",
            "Ledger writes that failed (their rows are retried).",
            registry=registry,
        )
        self.ledger_dead_lettered = Counter(
            "gateway_ledger_rows_dead_lettered",
            "Rows the database refused for good, set aside in the dead-letter file (never retried).",
            registry=registry,
        )
        self.ledger_spilled = Counter(
            "gateway_ledger_rows_spilled",
            "Rows written to the local spill file while the database was unavailable.",
            registry=registry,
        )
        self.ledger_replayed = Counter(
            "gateway_ledger_rows_replayed",
            "Spilled rows written to the database once it was back.",
            registry=registry,
        )
        self.ledger_lost = Counter(
            "gateway_ledger_rows_lost",
            "Rows neither written nor spilled (database and spill file both failing, queue full).",
            registry=registry,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures",
            "Requests refused for a missing, unknown or revoked key, by route kind.",
            ("route",),
            registry=registry,
        )
        for route in AUTH_ROUTE_KINDS:
            self.auth_failures.labels(route)
        self.connections_closed = Counter(
            "gateway_connections_closed",
            "Caller connections the gateway closed to stay within its limits, by reason.",
            ("reason",),
            registry=registry,
        )
        self.overloaded = Counter(
            "gateway_overloaded",
            "Requests answered 503 overloaded, by the resource that ran out.",
            ("resource",),
            registry=registry,
        )

    # --- the writer's observer (see ledger.writer.WriterObserver) ---------------------------------

    def rows_written(self, rows: Sequence[LedgerRow]) -> None:
        """Count a written batch: sums per label set first, so that each series moves once a batch."""
        requests: Tally[tuple[str, ...]] = Tally()
        prompt: Tally[tuple[str, ...]] = Tally()
        completion: Tally[tuple[str, ...]] = Tally()
        cost: Tally[tuple[str, ...]] = Tally()
        for row in rows:
            model = self._model_label(row.model)
            who = (model, row.key_name, row.user or "") if self._user_labels else (model, row.key_name)
            requests[(*who, row.outcome, str(row.status))] += 1
            prompt[who] += row.prompt_tokens
            completion[who] += row.completion_tokens
            cost[who] += row.cost_nanos
            self.latency.labels(model, "true" if row.stream else "false").observe(row.latency_us / 1e6)
            if row.ttfb_us is not None:
                self.ttfb.labels(model).observe(row.ttfb_us / 1e6)
        for labels, count in requests.items():
            self.requests.labels(*labels).inc(count)
        for tally, counter in (
            (prompt, self.prompt_tokens),
            (completion, self.completion_tokens),
            (cost, self.cost),
        ):
            for labels, amount in tally.items():
                counter.labels(*labels).inc(amount)

    def write_failed(self) -> None:
        self.ledger_write_errors.inc()

    def rows_dead_lettered(self, count: int) -> None:
        self.ledger_dead_lettered.inc(count)

    def rows_spilled(self, count: int) -> None:
        self.ledger_spilled.inc(count)

    def rows_replayed(self, count: int) -> None:
        self.ledger_replayed.inc(count)

    def rows_lost(self, count: int) -> None:
        self.ledger_lost.inc(count)

    def queue_depth(self, depth: int) -> None:
        self.ledger_queue.set(depth)

    def _model_label(self, model: str | None) -> str:
        """A served model's name; any other name a caller sent (rejected) is "other": callers must not
        be able to create series."""
        if model is None:
            return ""
        return model if model in self._models else "other"

    # --- the rest ---------------------------------------------------------------------------------

    def upstream_error(self, kind: str) -> None:
        assert kind in UPSTREAM_ERROR_KINDS, kind
        self.upstream_errors.labels(kind).inc()

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format (all workers' values, in multiprocess mode)."""
        if not self._multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
