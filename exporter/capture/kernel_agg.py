"""User space's side of the kernel fast path: aggregates, handovers and its self-metrics.

bpf/http_filter.c, with its fast path on, completes simple HTTP/1.x exchanges in the kernel
and adds them to the `http_agg` map; everything else reaches user space per connection,
and a connection the kernel gives up mid-exchange comes with a `handover` record (the C
file's header has the scheme). This module:

- turns handover records into `core.flows.Handover` seeds for the Tracker
  (`KernelFastPath.take_handovers`, called after every ring read, before parsing);
- reads `http_agg` when Prometheus scrapes and hands HttpMetrics the histograms per label
  set (`KernelFastPath.series`, registered with `HttpMetrics.add_source`), with paths
  named by the same `normalise_target` + RouteMapper as the user-space path; a read that
  finds the map half full drains it (`HttpFilter.drain_aggregates`) into per-route totals
  kept here, so that new keys find room and no count is lost;
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

from exporter.capture.bpf import AGG_ENTRIES, HttpFilter, KernelAggregate, KernelHandover
from exporter.core.flows import FlowKey, Handover
from exporter.core.http1 import normalise_target
from exporter.core.routes import RouteMapper
from exporter.metrics import (
    NO_IDENTITY,
    SELF_FAST_PATH_AGGREGATE_DRAINS_TOTAL,
    SELF_FAST_PATH_AGGREGATES,
    SELF_FAST_PATH_AGGREGATES_CAPACITY,
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

_RouteKey = tuple[str, int, str, int, str]  # server ip, port, method, status, route
# A read that finds http_agg this full drains it (HttpFilter.drain_aggregates): the kernel
# hands new keys over (agg_full) only when more than the rest arrive between two reads.
_DRAIN_AT = AGG_ENTRIES // 2


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
        # Exchanges no kernel map holds any more (drained to make room, or counted by a filter
        # since closed), per route: bounded as the routes are.
        self._taken: dict[_RouteKey, KernelAggregate] = {}
        self._closed_counters: dict[str, int] = {}
        self.drains = 0
        self._routes = routes
        self._http = http
        self._offset = realtime_offset_ns
        self._lock = threading.Lock()
        # (port, path) -> route: RouteMapper counts a route overflow on every call, so each
        # distinct kernel path is named once, not once per scrape.
        self._route_cache: dict[tuple[int, str], str] = {}
        self._size_zero_slot = _bisect_left(http.size_buckets, 0)
        self._last_poll: dict[_RouteKey, KernelAggregate] = {}
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
            self._fold(self._taken, aggregates)
            for name, value in counters.items():
                self._closed_counters[name] = self._closed_counters.get(name, 0) + value

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

    def _fold(self, into: dict[_RouteKey, KernelAggregate], aggregates: list[KernelAggregate]) -> None:
        """Add kernel entries to per-route totals (two paths, one route: one total). Under the lock."""
        for agg in aggregates:
            key = (agg.server_ip, agg.port, agg.method, agg.status, self._route(agg.port, agg.path))
            prior = into.get(key)
            into[key] = agg if prior is None else self._add(prior, agg)

    def _add(self, a: KernelAggregate, b: KernelAggregate) -> KernelAggregate:
        return KernelAggregate(
            a.server_ip, a.port, a.method, a.status, a.path, a.count + b.count, a.duration_sum_ns + b.duration_sum_ns,
            a.response_sum + b.response_sum,
            tuple(x + y for x, y in zip(a.duration_counts, b.duration_counts, strict=True)),
            tuple(x + y for x, y in zip(a.response_counts, b.response_counts, strict=True)),
            a.request_sum + b.request_sum,
            tuple(x + y for x, y in zip(self._requests(a), self._requests(b), strict=True)),
        )

    def _requests(self, agg: KernelAggregate) -> tuple[int, ...]:
        """Request-size bucket counts; a reader without them: every request had an empty body."""
        if agg.request_counts:
            return agg.request_counts
        return tuple(agg.count if i == self._size_zero_slot else 0 for i in range(len(agg.response_counts)))

    def _totals(self) -> dict[_RouteKey, KernelAggregate]:
        """Everything the kernel aggregated, per route, since this object was made.

        A read that finds the live map half full drains it first (counted in `drains`).
        """
        with self._lock:
            live = self._filter.read_aggregates() if self._filter is not None else []
            if self._filter is not None and len(live) >= _DRAIN_AT:
                self._fold(self._taken, self._filter.drain_aggregates())
                self.drains += 1
                if len(self._route_cache) > 2 * AGG_ENTRIES:  # drained paths need no name any more
                    self._route_cache.clear()
                live = self._filter.read_aggregates()
            totals = dict(self._taken)
            self._fold(totals, live)
            return totals

    def series(self) -> list[ExternalSeries]:
        """Histograms per HttpMetrics label set, for `HttpMetrics.add_source` (read at scrape time)."""
        merged: dict[HttpKey, tuple[list[int], int, list[int], int, list[int], int]] = {}
        identify = self.identify
        for (server_ip, port, method, status, route), agg in self._totals().items():
            # The kernel path only takes clear-text HTTP/1.x: the scheme and version defaults.
            # Named by the server's address, as the user-space path names its exchanges.
            key = http_key(method, status, route, port,
                           identity=identify(server_ip, port) if identify is not None else NO_IDENTITY)
            entry = merged.get(key)
            if entry is None:
                size_slots = len(agg.response_counts)
                entry = merged[key] = ([0] * len(agg.duration_counts), 0, [0] * size_slots, 0, [0] * size_slots, 0)
            dur, _, resp, _, req, _ = entry
            for i, n in enumerate(agg.duration_counts):
                dur[i] += n
            for i, n in enumerate(agg.response_counts):
                resp[i] += n
            for i, n in enumerate(self._requests(agg)):
                req[i] += n
            merged[key] = (dur, entry[1] + agg.duration_sum_ns, resp, entry[3] + agg.response_sum,
                           req, entry[5] + agg.request_sum)
        return [(key, (dur, dur_ns / 1e9), (req, float(req_sum)), (resp, float(resp_sum)))
                for key, (dur, dur_ns, resp, resp_sum, req, req_sum) in merged.items()]

    def exchanges(self) -> int:
        return self._counters().get("exchanges", 0)

    def poll_deltas(self) -> dict[tuple[str, int, str, int, str], KernelDelta]:
        """Exchanges aggregated in the kernel since the previous call (see the module docstring)."""
        out: dict[tuple[str, int, str, int, str], KernelDelta] = {}
        totals = self._totals()
        for route_key, agg in totals.items():
            last = self._last_poll.get(route_key)
            if last is None:
                delta = KernelDelta(agg.count, agg.duration_sum_ns / 1e9, agg.duration_counts)
            elif agg.count == last.count:
                continue
            else:
                counts = tuple(a - b for a, b in zip(agg.duration_counts, last.duration_counts, strict=True))
                delta = KernelDelta(agg.count - last.count, (agg.duration_sum_ns - last.duration_sum_ns) / 1e9,
                                    counts)
            server_ip, port, method, status, route = route_key
            out[(route, int(port), method, int(status), server_ip)] = delta
        self._last_poll = totals
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
            yield SelfSample(SELF_FAST_PATH_AGGREGATES, "gauge",
                             "Keys in the kernel's aggregate map (server, port, method, status, path) at the "
                             "last read; at capacity, new keys go to user space (handover reason agg_full) until a "
                             "read drains it (half full is enough).",
                             self._filter.aggregate_entries)
            yield SelfSample(SELF_FAST_PATH_AGGREGATES_CAPACITY, "gauge",
                             "Size of the kernel's aggregate map.", self._filter.aggregate_capacity())
        yield SelfSample(SELF_FAST_PATH_HANDOVER_MAP_FULL_TOTAL, "counter",
                         "Connections whose handover record did not fit the map: the rest of each died in the "
                         "kernel, its exchanges uncounted (expected 0).", fast["handover_map_full"])
        yield SelfSample(SELF_FAST_PATH_SPLIT_HEADS_TOTAL, "counter",
                         "Requests taken by the kernel fast path whose head came in more than one segment.",
                         fast.get("split_heads", 0))
        yield SelfSample(SELF_FAST_PATH_HEAD_LOST_TOTAL, "counter",
                         "Connections given up mid-head whose kept head bytes had been evicted: the rest of "
                         "each died in the kernel, its exchanges uncounted (expected 0).", fast.get("head_lost", 0))
        yield SelfSample(SELF_FAST_PATH_AGGREGATE_DRAINS_TOTAL, "counter",
                         f"Times a read found the kernel's aggregate map half full ({AGG_ENTRIES} keys) and "
                         "took it out whole to make room.", self.drains)
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
