"""The one owner of metric names: HTTP RED metrics, SLO results and the exporter's self-metrics.

Exchanges are aggregated into plain dicts on the capture thread; prometheus_client only sees
them when Prometheus scrapes (a custom collector). That keeps the per-request cost to a
dict lookup and a bisect instead of prometheus_client's locking per observation, the same
trade cloudflare/ebpf_exporter makes by reading kernel maps at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter.core.http1 import method_label
from exporter.core.http2 import GRPC_STATUS_MISSING, GRPC_STATUS_RESET
from exporter.core.model import Exchange
from exporter.identity.model import IDENTITY_LABEL_NAMES

# OpenTelemetry HTTP semantic conventions, as Beyla/OBI expose them to Prometheus.
HTTP_DURATION = "http_server_request_duration_seconds"
HTTP_REQUEST_BODY = "http_server_request_body_size_bytes"
HTTP_RESPONSE_BODY = "http_server_response_body_size_bytes"
HTTP_LABELS = (
    "http_request_method", "http_response_status_code", "http_route", "server_port",
    "url_scheme", "network_protocol_version",
    # Which server answered (identity/): OTel resource attributes service.name,
    # service.instance.id, k8s.namespace.name, k8s.pod.name, k8s.pod.uid, container.id.
    *IDENTITY_LABEL_NAMES,
)
# One label set of the HTTP histograms, in HTTP_LABELS' order.
HttpKey = tuple[str, ...]
# The identity labels of a server nothing is known about (a replay, a source without addresses).
NO_IDENTITY: tuple[str, ...] = ("",) * len(IDENTITY_LABEL_NAMES)
_INSTANCE_SLOT = HTTP_LABELS.index("service_instance_id")

# One sample per server identified, value 1: joins with kube-state-metrics' kube_pod_info on `uid`.
TARGET_INFO = "target_info"  # exported as ebpf_slo_exporter_target_info
TARGET_INFO_LABELS = (*IDENTITY_LABEL_NAMES, "uid")

# OpenTelemetry RPC conventions (rpc.server.duration), as Beyla/OBI expose them for gRPC.
RPC_DURATION = "rpc_server_duration_seconds"
RPC_LABELS = ("rpc_system", "rpc_service", "rpc_method", "rpc_grpc_status_code", "server_port")
RpcKey = tuple[str, str, str, str, str]
# gRPC status codes that are the server's fault (OTel's rpc.grpc.status_code semantics):
# UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
GRPC_SERVER_ERROR_CODES: tuple[str, ...] = ("2", "4", "12", "13", "14", "15")
# The exporter's own rpc_grpc_status_code values (named in core/http2): a stream reset with no
# grpc-status (how a client's deadline or cancel usually shows on the wire), and a response
# that ended without one. Both count as server errors wherever errors are counted.
GRPC_NON_NUMERIC: tuple[str, ...] = (GRPC_STATUS_RESET, GRPC_STATUS_MISSING)
GRPC_BAD_CODES: tuple[str, ...] = (*GRPC_SERVER_ERROR_CODES, *GRPC_NON_NUMERIC)

# OTel's default duration buckets plus 0.15 s, so the demo's 150 ms SLO lands on a bound.
DEFAULT_DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)
DEFAULT_SIZE_BUCKETS: tuple[float, ...] = (
    0, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000,
)

# SLO results (slo/ fills them; the names live here).
SLO_SLI = "slo_sli_ratio"
SLO_OBJECTIVE = "slo_objective_ratio"
SLO_BUDGET_REMAINING = "slo_error_budget_remaining_ratio"
SLO_BURN_RATE = "slo_burn_rate"
SLO_GOOD = "slo_good_events"
SLO_TOTAL = "slo_total_events"
SLO_WINDOW_COVERAGE = "slo_window_coverage_ratio"  # observed part of the window, 0..1
SLO_LABELS = ("slo", "service", "category", "window")

SELF = "ebpf_slo_exporter"

# Self-metric names, without the SELF prefix the collector adds (SelfSample.name). The
# collectors, the dashboards and the benchmarks all take them from here.
SELF_FILTER_ATTACHED = "filter_attached"
SELF_DEGRADED = "degraded"  # gauge by reason: exporter.health
SELF_CAPTURE_DETACHED_TOTAL = "capture_detached_total"
SELF_CAPTURE_REATTACHED_TOTAL = "capture_reattached_total"
SELF_PACKETS_RECEIVED_TOTAL = "packets_received_total"
SELF_KERNEL_DROPS_TOTAL = "kernel_drops_total"
SELF_DECODE_ERRORS_TOTAL = "decode_errors_total"
SELF_FILTER_PACKETS_TOTAL = "filter_packets_total"
SELF_EXCHANGES_TOTAL = "exchanges_total"
SELF_ROUTE_OVERFLOW_TOTAL = "route_overflow_total"
SELF_HTTP_SERIES = "http_series"
SELF_SEGMENTS_TOTAL = "segments_total"
SELF_PARSE_ERRORS_TOTAL = "parse_errors_total"
SELF_UNMATCHED_RESPONSES_TOTAL = "unmatched_responses_total"
SELF_REQUESTS_WITHOUT_RESPONSE_TOTAL = "requests_without_response_total"
SELF_FLOWS_ACTIVE = "flows_active"
SELF_FLOWS_EVICTED_TOTAL = "flows_evicted_total"
SELF_FLOWS_CLOSED_TOTAL = "flows_closed_total"
SELF_RETRANSMITTED_SEGMENTS_TOTAL = "retransmitted_segments_total"
SELF_OUT_OF_ORDER_SEGMENTS_TOTAL = "out_of_order_segments_total"
SELF_ENCRYPTED_FLOWS_TOTAL = "encrypted_flows_total"
SELF_HELD_BYTES = "held_bytes"
SELF_FAST_PATH_REQUESTS_TOTAL = "fast_path_requests_total"
SELF_FAST_PATH_EXCHANGES_TOTAL = "fast_path_exchanges_total"
SELF_FAST_PATH_RETRANSMITS_TOTAL = "fast_path_retransmits_total"
SELF_FAST_PATH_OVERTAKEN_SEGMENTS_TOTAL = "fast_path_overtaken_segments_total"
SELF_FAST_PATH_BUSY_TOTAL = "fast_path_busy_total"
SELF_FAST_PATH_TAIL_CALL_FAILED_TOTAL = "fast_path_tail_call_failed_total"
SELF_FAST_PATH_FLOW_STATES_CREATED_TOTAL = "fast_path_flow_states_created_total"
SELF_FAST_PATH_FLOW_STATES_DELETED_TOTAL = "fast_path_flow_states_deleted_total"
SELF_FAST_PATH_FLOW_STATES_CAPACITY = "fast_path_flow_states_capacity"
SELF_FAST_PATH_HANDOVER_MAP_FULL_TOTAL = "fast_path_handover_map_full_total"
SELF_FAST_PATH_AGGREGATES = "fast_path_aggregates"
SELF_FAST_PATH_AGGREGATES_CAPACITY = "fast_path_aggregates_capacity"
SELF_FAST_PATH_HANDOVERS_SEEDED_TOTAL = "fast_path_handovers_seeded_total"
SELF_FAST_PATH_HANDOVERS_TOTAL = "fast_path_handovers_total"
SELF_FAST_PATH_SPLIT_HEADS_TOTAL = "fast_path_split_heads_total"
SELF_FAST_PATH_HEAD_LOST_TOTAL = "fast_path_head_lost_total"
SELF_FAST_PATH_AGGREGATE_DRAINS_TOTAL = "fast_path_aggregate_drains_total"
# HTTP/2 decoding (core/http2) and TLS capture (capture/tls).
SELF_HTTP2_CAPS_HIT_TOTAL = "http2_caps_hit_total"
SELF_HTTP2_CONNECTIONS_TOTAL = "http2_connections_total"
SELF_HTTP2_FRAMES_TOTAL = "http2_frames_total"
SELF_HTTP2_PARSE_ERRORS_TOTAL = "http2_parse_errors_total"
SELF_HTTP2_PUSH_PROMISES_TOTAL = "http2_push_promises_total"
SELF_HTTP2_RESET_STREAMS_TOTAL = "http2_reset_streams_total"
SELF_HTTP2_STREAMS_DROPPED_TOTAL = "http2_streams_dropped_total"
SELF_HTTP2_UNDECODABLE_STREAMS_TOTAL = "http2_undecodable_streams_total"
SELF_TLS_CALLS_IGNORED_TOTAL = "tls_calls_ignored_total"
SELF_TLS_CALLS_SKIPPED_TOTAL = "tls_calls_skipped_total"
SELF_TLS_CALLS_TOTAL = "tls_calls_total"
SELF_TLS_CALLS_TRIMMED_TOTAL = "tls_calls_trimmed_total"
SELF_TLS_CALLS_TRUNCATED_TOTAL = "tls_calls_truncated_total"
SELF_TLS_CALLS_UNTRACKED_TOTAL = "tls_calls_untracked_total"
SELF_TLS_CALLS_WITHOUT_SOCKET_TOTAL = "tls_calls_without_socket_total"
SELF_TLS_CONNECTIONS_EVICTED_TOTAL = "tls_connections_evicted_total"
SELF_TLS_CONNECTIONS_TRACKED = "tls_connections_tracked"
SELF_TLS_DECODE_ERRORS_TOTAL = "tls_decode_errors_total"
SELF_TLS_EVENTS_FALLBACK_FOLLOWING_TOTAL = "tls_events_fallback_following_total"
SELF_TLS_EVENTS_FALLBACK_TOTAL = "tls_events_fallback_total"
SELF_TLS_EVENTS_LOST_TOTAL = "tls_events_lost_total"
SELF_TLS_EVENTS_LOST_WITH_ROOM_TOTAL = "tls_events_lost_with_room_total"
SELF_TLS_EVENTS_RETRIED_TOTAL = "tls_events_retried_total"
SELF_TLS_EVENTS_TOTAL = "tls_events_total"
# How an HTTPS exchange's ends were timed: from the encrypted segments on the wire, or from the
# probes (label reason: no_match, the wire's segments did not match the call exactly; no_wire, the
# socket filter has no wire times for the connection). Label end: start (a request's) or end.
SELF_TLS_EXCHANGE_ENDS_PROBE_TIMED_TOTAL = "tls_exchange_ends_probe_timed_total"
SELF_TLS_EXCHANGE_ENDS_WIRE_TIMED_TOTAL = "tls_exchange_ends_wire_timed_total"
SELF_TLS_LIBRARIES_PROBED = "tls_libraries_probed"
SELF_TLS_LOSS_GAPS_TOTAL = "tls_loss_gaps_total"
SELF_TLS_READ_ERRORS_TOTAL = "tls_read_errors_total"
SELF_TLS_UNRESOLVED_SOCKETS_TOTAL = "tls_unresolved_sockets_total"
SELF_SLO_EVALUATIONS_TOTAL = "slo_evaluations_total"
SELF_SLO_QUERY_RETRIES_TOTAL = "slo_query_retries_total"
SELF_SLO_LOOP_ERRORS_TOTAL = "slo_loop_errors_total"
SELF_SLO_INTERVALS_SKIPPED_TOTAL = "slo_intervals_skipped_total"
SELF_SLO_EVENTS_DROPPED_TOTAL = "slo_events_dropped_total"
SELF_SLO_EVENTS_LATE_TOTAL = "slo_events_late_total"
SELF_SLO_PUSH_TOTAL = "slo_push_total"
SELF_SLO_PUSH_ERRORS_TOTAL = "slo_push_errors_total"
SELF_SLO_SPOOL_INDICATORS = "slo_spool_indicators"
SELF_SLO_SPOOL_DROPPED_TOTAL = "slo_spool_dropped_total"
SELF_SLO_SPOOL_QUARANTINED_TOTAL = "slo_spool_quarantined_total"
SELF_SLO_STATE_SAVES_TOTAL = "slo_state_saves_total"
SELF_SLO_STATE_QUARANTINED_TOTAL = "slo_state_quarantined_total"
SELF_SLO_STATE_RESTORED_OBJECTIVES = "slo_state_restored_objectives"
SELF_SLO_STATE_DISCARDED_OBJECTIVES = "slo_state_discarded_objectives"
SELF_SLO_STATE_RESTORE_GAP_SECONDS = "slo_state_restore_gap_seconds"
SELF_SLO_COVERAGE_PERIODS_DROPPED_TOTAL = "slo_coverage_periods_dropped_total"


def format_bound(bound: float) -> str:
    """Bucket bound as a Prometheus `le` label: the shortest float text, `+Inf` for infinity.

    Prometheus 3 normalises `le="1"` to `le="1.0"`; we always emit the float form so rules
    and dashboards written against either version match.
    """
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


# Entries of HttpMetrics' lookup by an exchange's values: far more than the series a route cap
# allows, and each costs ~200 bytes; past it (a scan with random method tokens) it starts again.
_BY_VALUES_ENTRIES = 16384


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self, n_buckets: int) -> None:
        self.counts = [0] * (n_buckets + 1)  # last slot: above the highest bound
        self.total = 0.0


# Histograms aggregated elsewhere (the kernel fast path), merged at scrape time:
# (label key as HttpMetrics keys it, then (bucket counts incl. the overflow slot, sum) for
# duration in seconds, request body and response body, on HttpMetrics' own bounds).
ExternalSeries = tuple[
    HttpKey,
    tuple[Sequence[int], float],
    tuple[Sequence[int], float],
    tuple[Sequence[int], float],
]


def http_key(method: str, status: int | str, route: str, port: int | str,
             scheme: str = "http", protocol_version: str = "1.1",
             identity: tuple[str, ...] = NO_IDENTITY) -> HttpKey:
    """The label values of one HTTP series, in HTTP_LABELS' order: the one place that order lives.

    `identity`: the server's labels in IDENTITY_LABEL_NAMES' order (identity.Identity.labels()).
    """
    return (method_label(method), str(status), route, str(port), scheme, protocol_version, *identity)


class HttpMetrics:
    """Aggregates exchanges into the three OTel HTTP histograms (and gRPC calls into the RPC one).

    Sources added with `add_source` (the kernel fast path) are read at scrape time and
    summed into the same label sets.
    """

    def __init__(
        self,
        duration_buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS,
        size_buckets: Sequence[float] = DEFAULT_SIZE_BUCKETS,
    ) -> None:
        self.duration_buckets = tuple(sorted(set(float(b) for b in duration_buckets)))
        self.size_buckets = tuple(sorted(set(float(b) for b in size_buckets)))
        self._lock = threading.Lock()
        # One entry per label set: (duration, request body, response body) histograms.
        self._series: dict[HttpKey, tuple[_Histogram, _Histogram, _Histogram]] = {}
        # The same histograms by the exchange's own values (method, status, route, port, scheme,
        # version, identity), so that an exchange finds its series without building its label
        # values (method_label, two str()): bounded, cleared when full or when series go.
        self._by_values: dict[tuple[object, ...], tuple[_Histogram, _Histogram, _Histogram]] = {}
        self._rpc: dict[RpcKey, _Histogram] = {}
        self._sources: list[Callable[[], Iterable[ExternalSeries]]] = []

    def add_source(self, source: Callable[[], Iterable[ExternalSeries]]) -> None:
        """Merge `source()` into every collect(); its bucket lists must use this object's bounds."""
        self._sources.append(source)

    def observe(self, exchange: Exchange, route: str, identity: tuple[str, ...] = NO_IDENTITY) -> None:
        self.observe_all(((exchange, route, identity),))

    def observe_all(self, observed: Iterable[tuple[Exchange, str, tuple[str, ...]]]) -> None:
        """Each (exchange, its route, its server's identity labels) of a batch, under one lock."""
        duration_buckets = self.duration_buckets
        size_buckets = self.size_buckets
        by_values = self._by_values
        bisect_left = bisect.bisect_left
        with self._lock:
            for exchange, route, identity in observed:
                # One unpack instead of a field lookup per use: this runs for every exchange.
                (method, _, status, start_ns, end_ns, request_bytes, response_bytes, port, scheme, protocol_version,
                 rpc, _) = exchange
                values = (method, status, route, port, scheme, protocol_version, identity)
                series = by_values.get(values)
                if series is None:
                    series = self._series_of(
                        http_key(method, status, route, port, scheme, protocol_version, identity))
                    if len(by_values) >= _BY_VALUES_ENTRIES:
                        by_values.clear()
                    by_values[values] = series
                seconds = (end_ns - start_ns) / 1e9 if end_ns > start_ns else 0.0  # Exchange.duration_seconds
                # bisect_left: a value equal to a bound belongs in that bound's bucket (le is <=).
                duration_slot = bisect_left(duration_buckets, seconds)
                duration, req_size, resp_size = series
                duration.counts[duration_slot] += 1
                duration.total += seconds
                req_size.counts[bisect_left(size_buckets, request_bytes)] += 1
                req_size.total += request_bytes
                resp_size.counts[bisect_left(size_buckets, response_bytes)] += 1
                resp_size.total += response_bytes
                if rpc is not None:
                    rpc_key = (rpc.system, rpc.service, rpc.method, rpc.status_code, str(port))
                    rpc_hist = self._rpc.get(rpc_key)
                    if rpc_hist is None:
                        rpc_hist = self._rpc[rpc_key] = _Histogram(len(duration_buckets))
                    rpc_hist.counts[duration_slot] += 1
                    rpc_hist.total += seconds

    def _series_of(self, key: HttpKey) -> tuple[_Histogram, _Histogram, _Histogram]:
        """The histograms of label set `key`, made at its first exchange (call with the lock held)."""
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                _Histogram(len(self.duration_buckets)),
                _Histogram(len(self.size_buckets)),
                _Histogram(len(self.size_buckets)),
            )
        return series

    def forget_instances(self, instance_ids: set[str]) -> int:
        """Drop the series of servers that went away (identity/ says so); return how many."""
        if not instance_ids:
            return 0
        with self._lock:
            gone = [key for key in self._series if key[_INSTANCE_SLOT] in instance_ids]
            for key in gone:
                del self._series[key]
            if gone:
                self._by_values.clear()
        return len(gone)

    def series_count(self) -> int:
        return len(self._series) + len(self._rpc)  # user-space label sets; merged sources are not counted

    def _merged(self) -> list[tuple[HttpKey, list[tuple[list[int], float]]]]:
        with self._lock:
            snapshot = {
                key: [(list(h.counts), h.total) for h in hists] for key, hists in self._series.items()
            }
        for source in self._sources:
            for key, *hists in source():
                mine = snapshot.get(key)
                if mine is None:
                    snapshot[key] = [(list(counts), float(total)) for counts, total in hists]
                    continue
                for i, (counts, total) in enumerate(hists):
                    have, have_total = mine[i]
                    mine[i] = ([a + b for a, b in zip(have, counts, strict=True)], have_total + total)
        return list(snapshot.items())

    def collect(self) -> Iterator[Metric]:
        snapshot = self._merged()
        families = (
            HistogramMetricFamily(
                HTTP_DURATION, "Duration of HTTP server requests, first request byte to last response byte.",
                labels=HTTP_LABELS, unit="seconds",
            ),
            HistogramMetricFamily(
                HTTP_REQUEST_BODY, "Size of HTTP server request bodies.", labels=HTTP_LABELS, unit="bytes"
            ),
            HistogramMetricFamily(
                HTTP_RESPONSE_BODY, "Size of HTTP server response bodies.", labels=HTTP_LABELS, unit="bytes"
            ),
        )
        bounds = (self.duration_buckets, self.size_buckets, self.size_buckets)
        for key, hists in snapshot:
            for family, bucket_bounds, (counts, total) in zip(families, bounds, hists, strict=True):
                family.add_metric(list(key), _cumulative(bucket_bounds, counts), total)
        yield from families
        with self._lock:
            rpc = [(key, list(h.counts), h.total) for key, h in self._rpc.items()]
        if rpc:
            rpc_family = HistogramMetricFamily(
                RPC_DURATION, "Duration of RPC server calls (gRPC streams), first request byte to last response byte.",
                labels=RPC_LABELS, unit="seconds",
            )
            for rpc_key, counts, total in rpc:
                rpc_family.add_metric(list(rpc_key), _cumulative(self.duration_buckets, counts), total)
            yield rpc_family


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    running = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(bounds, counts, strict=False):  # counts has one more slot: +Inf
        running += count
        buckets.append((format_bound(bound), running))
    running += counts[-1]
    buckets.append(("+Inf", running))
    return buckets


@dataclass(frozen=True, slots=True)
class SelfSample:
    """One self-metric sample, produced by a source callback at scrape time."""

    name: str  # without the ebpf_slo_exporter_ prefix
    kind: str  # "counter" or "gauge"
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


SelfSource = Callable[[], Iterable[SelfSample]]


class ExporterCollector(Collector):
    """What /metrics serves: HTTP histograms, SLO results and self-metrics, read at scrape time."""

    def __init__(self, http: HttpMetrics, self_sources: Sequence[SelfSource] = (),
                 slo_source: Callable[[], Iterable[Metric]] | None = None) -> None:
        self.http = http
        self.self_sources = list(self_sources)
        self.slo_source = slo_source

    def collect(self) -> Iterator[Metric]:
        yield from self.http.collect()
        if self.slo_source is not None:
            yield from self.slo_source()
        yield from _self_families(sample for source in self.self_sources for sample in source())


def _self_families(samples: Iterable[SelfSample]) -> Iterator[Metric]:
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for sample in samples:
        name = f"{SELF}_{sample.name}"
        family = families.get(name)
        label_names = [k for k, _ in sample.labels]
        if family is None:
            if sample.kind == "counter":
                family = CounterMetricFamily(name, sample.help, labels=label_names)
            else:
                family = GaugeMetricFamily(name, sample.help, labels=label_names)
            families[name] = family
        family.add_metric([v for _, v in sample.labels], sample.value)
    yield from families.values()
