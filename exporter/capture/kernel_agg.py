"""User space's side of the kernel fast path: aggregates, handovers and its self-metrics.

bpf/http_filter.c, with its fast path on, completes simple HTTP/1.x exchanges in the kernel
and adds them to the `http_agg` map; everything else reaches user space per connection,
and a connection the kernel gives up mid-exchange comes with a `handover` record (the C
file's header has the scheme). This module:

- turns handover records into `core.flows.Handover` seeds for the Tracker
  (`KernelFastPath.take_handovers`, called after every ring read, before parsing);
- reads `http_agg` when Prometheus scrapes and hands HttpMetrics the histograms per label
  set (`KernelFastPath.series`, registered with `HttpMetrics.add_source`), with paths
  named by the same `normalise_target` + RouteMapper as the user-space path;
- offers `poll_deltas()` for the SLO runtime (below);
- reports the fast path's own counters (`self_samples`).

API for the SLO runtime (`poll_deltas`), meant to be called about once a second from one
thread: it returns what the kernel aggregated since the previous call, as
``{(route, server_port, method_label, status, server_ip): KernelDelta}``, where
``KernelDelta.duration_counts[i]`` is the number of new exchanges in duration bucket ``i``
(bounds: `HttpMetrics.duration_buckets`, the last slot is above the highest bound),
``count`` their total and ``duration_sum_s`` their summed duration. The first call returns
everything since the filter was loaded. These exchanges never pass through
`Pipeline` sinks, so a consumer that counts good/total per route must add both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from exporter.capture.bpf import HttpFilter, KernelAggregate, KernelHandover
from exporter.core.flows import FlowKey, Handover
from exporter.core.http1 import normalise_target
from exporter.core.routes import RouteMapper
from exporter.metrics import (
    NO_IDENTITY,
    SELF_FAST_PATH_BUSY_TOTAL,
    SELF_FAST_PATH_EXCHANGES_TOTAL,
    SELF_FAST_PATH_FLOW_STATES_CAPACITY,
    SELF_FAST_PATH_FLOW_STATES_CREATED_TOTAL,
    SELF_FAST_PATH_FLOW_STATES_DELETED_TOTAL,
    SELF_FAST_PATH_HANDOVER_MAP_FULL_TOTAL,
    SELF_FAST_PATH_HANDOVERS_SEEDED_TOTAL,
    SELF_FAST_PATH_HANDOVERS_TOTAL,
    SELF_FAST_PATH_HEAD_LOST_TOTAL,
    SELF_FAST_PATH_OVERTAKEN_SEGMENTS_TOTAL,
    SELF_FAST_PATH_REQUESTS_TOTAL,
    SELF_FAST_PATH_RETRANSMITS_TOTAL,
    SELF_FAST_PATH_SPLIT_HEADS_TOTAL,
    SELF_FAST_PATH_TAIL_CALL_FAILED_TOTAL,
    ExternalSeries,
    HttpKey,
    HttpMetrics,
    SelfSample,
    http_key,
)

__all__ = ["KernelDelta", "KernelFastPath"]

_AggKey = tuple[str, int, str, int, str]  # server ip, port, method, status, path


@dataclass(frozen=True, slots=True)
class KernelDelta:
    """New kernel-aggregated exchanges of one (route, port, method, status) since the last poll."""

    count: int
    duration_sum_s: float
    duration_counts: tuple[int, ...]


class KernelFastPath:
    """The fast path's user-space half. `attach` it to each filter the capture opens.

    A filter's maps die with it, so `detach` (before the capture closes) keeps what the
    kernel had counted, and every total stays monotonic across reattachments.
    """

    def __init__(
        self,
        routes: RouteMapper,
        http: HttpMetrics,
        *,
        realtime_offset_ns: Callable[[], int] = lambda: time.time_ns() - time.monotonic_ns(),
    ) -> None:
        self._filter: HttpFilter | None = None
        self._closed: list[KernelAggregate] = []
        self._closed_counters: dict[str, int] = {}
        self._routes = routes
        self._http = http
        self._offset = realtime_offset_ns
        self._lock = threading.Lock()
        # (port, path) -> route: RouteMapper counts a route overflow on every call, so each
        # distinct kernel path is named once, not once per scrape.
        self._route_cache: dict[tuple[int, str], str] = {}
        self._size_zero_slot = _bisect_left(http.size_buckets, 0)
        self._last_poll: dict[_AggKey, KernelAggregate] = {}
        self.handovers_seeded = 0
        # (server ip, server port) -> the server's identity labels (identity.Resolver), optional.
        self.identify: Callable[[str, int], tuple[str, ...]] | None = None

    def attach(self, bpf_filter: HttpFilter) -> None:
        self._filter = bpf_filter
        # Ids become one kernel key per route shape, when that names every route alike.
        bpf_filter.set_route_ids(self._routes.identifiers_are_ids())

    def detach(self) -> None:
        """Keep what the attached filter counted; call before the filter closes."""
        bpf_filter, self._filter = self._filter, None
        if bpf_filter is None:
            return
        try:
            aggregates = bpf_filter.read_aggregates()
            counters = self._kernel_counters(bpf_filter)
        except OSError:
            return  # a broken filter's last counts are lost, as the capture's own are
        with self._lock:
            self._closed.extend(aggregates)
            for name, value in counters.items():
                self._closed_counters[name] = self._closed_counters.get(name, 0) + value
            self._last_poll.clear()  # the new filter's map starts from zero

    @staticmethod
    def _kernel_counters(bpf_filter: HttpFilter) -> dict[str, int]:
        counters = dict(bpf_filter.fast_counters())
        for reason, value in bpf_filter.handover_counters().items():
            counters["handover:" + reason] = value
        return counters

    def _counters(self) -> dict[str, int]:
        counters = dict(self._closed_counters)
        if self._filter is not None:
            for name, value in self._kernel_counters(self._filter).items():
                counters[name] = counters.get(name, 0) + value
        return counters

    # -- handovers -----------------------------------------------------------------------

    def take_handovers(self) -> list[tuple[FlowKey, Handover]]:
        """Handover records since the last call, as Tracker seeds (monotonic start times made realtime)."""
        if self._filter is None:
            return []
        records = self._filter.drain_handovers()
        if not records:
            return []
        offset = self._offset()
        now_ns = time.time_ns()
        seeds = [(record.flow, to_handover(record, offset, now_ns)) for record in records]
        self.handovers_seeded += len(seeds)
        return seeds

    # -- aggregates ----------------------------------------------------------------------

    def _route(self, port: int, path: str) -> str:
        key = (port, path)
        route = self._route_cache.get(key)
        if route is None:
            route = self._route_cache[key] = self._routes.route(port, normalise_target(path))
        return route

    def _read(self, live_only: bool = False) -> list[tuple[HttpKey, KernelAggregate]]:
        aggregates = self._filter.read_aggregates() if self._filter is not None else []
        with self._lock:
            if not live_only:
                aggregates = self._closed + aggregates
            identify = self.identify
            return [
                # The kernel path only takes clear-text HTTP/1.x: the scheme and version defaults.
                # Named by the server's address, as the user-space path names its exchanges.
                (http_key(agg.method, agg.status, self._route(agg.port, agg.path), agg.port,
                          identity=identify(agg.server_ip, agg.port) if identify is not None else NO_IDENTITY), agg)
                for agg in aggregates
            ]

    def series(self) -> list[ExternalSeries]:
        """Histograms per HttpMetrics label set, for `HttpMetrics.add_source` (read at scrape time)."""
        merged: dict[HttpKey, tuple[list[int], int, list[int], int, list[int], int]] = {}
        zero_slot = self._size_zero_slot
        for key, agg in self._read():
            entry = merged.get(key)
            if entry is None:
                size_slots = len(agg.response_counts)
                entry = merged[key] = ([0] * len(agg.duration_counts), 0, [0] * size_slots, 0, [0] * size_slots, 0)
            dur, _, resp, _, req, _ = entry
            for i, n in enumerate(agg.duration_counts):
                dur[i] += n
            for i, n in enumerate(agg.response_counts):
                resp[i] += n
            if agg.request_counts:
                for i, n in enumerate(agg.request_counts):
                    req[i] += n
            else:  # a reader without request buckets: every request had an empty body
                req[zero_slot] += agg.count
            merged[key] = (dur, entry[1] + agg.duration_sum_ns, resp, entry[3] + agg.response_sum,
                           req, entry[5] + agg.request_sum)
        return [(key, (dur, dur_ns / 1e9), (req, float(req_sum)), (resp, float(resp_sum)))
                for key, (dur, dur_ns, resp, resp_sum, req, req_sum) in merged.items()]

    def exchanges(self) -> int:
        return self._counters().get("exchanges", 0)

    def poll_deltas(self) -> dict[tuple[str, int, str, int, str], KernelDelta]:
        """Exchanges aggregated in the kernel since the previous call (see the module docstring)."""
        out: dict[tuple[str, int, str, int, str], KernelDelta] = {}
        for (method, status, route, port, *_scheme_version_identity), agg in self._read(live_only=True):
            agg_key = (agg.server_ip, agg.port, agg.method, agg.status, agg.path)
            last = self._last_poll.get(agg_key)
            self._last_poll[agg_key] = agg
            if last is not None:
                if agg.count == last.count:
                    continue
                counts = tuple(a - b for a, b in zip(agg.duration_counts, last.duration_counts, strict=True))
                delta = KernelDelta(agg.count - last.count, (agg.duration_sum_ns - last.duration_sum_ns) / 1e9,
                                    counts)
            else:
                delta = KernelDelta(agg.count, agg.duration_sum_ns / 1e9, agg.duration_counts)
            key = (route, int(port), method, int(status), agg.server_ip)
            prior = out.get(key)
            if prior is not None:  # two paths, one route
                delta = KernelDelta(
                    prior.count + delta.count, prior.duration_sum_s + delta.duration_sum_s,
                    tuple(a + b for a, b in zip(prior.duration_counts, delta.duration_counts, strict=True)),
                )
            out[key] = delta
        return out

    # -- self-metrics --------------------------------------------------------------------

    def self_samples(self) -> Iterator[SelfSample]:
        fast = self._counters()
        if self._filter is None and not fast:
            return
        fast.setdefault("requests", 0)
        yield SelfSample(SELF_FAST_PATH_REQUESTS_TOTAL, "counter", "Requests taken by the kernel fast path.",
                         fast["requests"])
        yield SelfSample(SELF_FAST_PATH_EXCHANGES_TOTAL, "counter",
                         "Exchanges completed and aggregated in the kernel.", fast["exchanges"])
        yield SelfSample(SELF_FAST_PATH_RETRANSMITS_TOTAL, "counter",
                         "Segments of kernel-tracked connections that repeated data already seen.",
                         fast["retransmits"])
        yield SelfSample(SELF_FAST_PATH_OVERTAKEN_SEGMENTS_TOTAL, "counter",
                         "Response body segments that arrived ahead of the one before them and were "
                         "held by range in the kernel.", fast.get("overtaken", 0))
        yield SelfSample(SELF_FAST_PATH_BUSY_TOTAL, "counter",
                         "Segments passed up because another CPU held their connection (expected 0).",
                         fast["busy"])
        yield SelfSample(SELF_FAST_PATH_TAIL_CALL_FAILED_TOTAL, "counter",
                         "Packets passed up because a tail-call slot of the filter was empty; the "
                         "connection's kernel state was not looked at (a loader bug; expected 0).",
                         fast.get("tail_call_failed", 0))
        yield SelfSample(SELF_FAST_PATH_FLOW_STATES_CREATED_TOTAL, "counter",
                         "Connection states the kernel created.", fast["flows_created"])
        yield SelfSample(SELF_FAST_PATH_FLOW_STATES_DELETED_TOTAL, "counter",
                         "Connection states the kernel deleted at FIN/RST. Created minus deleted near the "
                         "capacity means LRU evictions, which the kernel does not report.",
                         fast["flows_deleted"])
        if self._filter is not None:
            yield SelfSample(SELF_FAST_PATH_FLOW_STATES_CAPACITY, "gauge",
                             "Size of the kernel's connection state map.", self._filter.flow_state_capacity())
        yield SelfSample(SELF_FAST_PATH_HANDOVER_MAP_FULL_TOTAL, "counter",
                         "Connections whose handover record did not fit the map: the rest of each died in the "
                         "kernel, its exchanges uncounted (expected 0).", fast["handover_map_full"])
        yield SelfSample(SELF_FAST_PATH_SPLIT_HEADS_TOTAL, "counter",
                         "Requests taken by the kernel fast path whose head came in more than one segment.",
                         fast.get("split_heads", 0))
        yield SelfSample(SELF_FAST_PATH_HEAD_LOST_TOTAL, "counter",
                         "Connections given up mid-head whose kept head bytes had been evicted: the rest of "
                         "each died in the kernel, its exchanges uncounted (expected 0).", fast.get("head_lost", 0))
        yield SelfSample(SELF_FAST_PATH_HANDOVERS_SEEDED_TOTAL, "counter",
                         "Handover records user space took up.", self.handovers_seeded)
        for name, value in fast.items():
            if not name.startswith("handover:"):
                continue
            reason = name.split(":", 1)[1]
            yield SelfSample(SELF_FAST_PATH_HANDOVERS_TOTAL, "counter",
                             "Connections the kernel left to user space, by reason (agg_full: the "
                             "aggregate map is full).", value, (("reason", reason),))


def to_handover(record: KernelHandover, realtime_offset_ns: int, seen_ns: int = 0) -> Handover:
    """A kernel record as the Tracker's seed. Pure: table-tested without a kernel."""
    start_ns = record.start_ns + realtime_offset_ns
    if record.phase == 0:
        # A head the kernel had begun: parsed from its first byte, or, were its bytes gone, from
        # where the kernel stopped (the parser then counts the rest as an error, never as a request).
        client_next_seq = record.client_next_seq
        if record.head_length and record.head is None:
            client_next_seq = (client_next_seq + record.head_length) & 0xFFFFFFFF
        return Handover(client_next_seq, record.server_next_seq, start_ns=start_ns, seen_ns=seen_ns,
                        http_seen=record.http_seen, client_prefix=record.head or b"")
    response = record.phase == 2
    return Handover(
        record.client_next_seq,
        record.server_next_seq,
        method=record.method,
        target=record.path,
        start_ns=start_ns,
        response_status=record.status if response else 0,
        response_length=record.response_length if response else 0,
        response_seen=record.response_seen if response else 0,
        seen_ns=seen_ns,
        held=(record.held_seq, record.held_length, record.held_ns + realtime_offset_ns)
        if response and record.held_length else None,
        request_length=record.request_length,
        request_seen=record.request_length - record.request_left,
    )


def _bisect_left(bounds: tuple[float, ...], value: float) -> int:
    for i, bound in enumerate(bounds):
        if bound >= value:
            return i
    return len(bounds)
