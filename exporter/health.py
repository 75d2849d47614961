"""When the exporter is behind: which self-metrics count lost data, and whether any rose lately.

/healthz and the `degraded{reason}` gauge say "degraded" while any loss counter below is
higher than it was `window_s` seconds ago, so the state clears by itself once the loss stops
(one window later). The counters are the self-metrics themselves (read from the same
SelfSample sources /metrics serves), so /healthz can never disagree with them.

Pure: the caller passes the time and the samples; tests drive it with a fake clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from exporter.metrics import (
    SELF_CAPTURE_DETACHED_TOTAL,
    SELF_FAST_PATH_HANDOVER_MAP_FULL_TOTAL,
    SELF_FLOWS_EVICTED_TOTAL,
    SELF_HTTP2_CAPS_HIT_TOTAL,
    SELF_HTTP2_STREAMS_DROPPED_TOTAL,
    SELF_KERNEL_DROPS_TOTAL,
    SELF_TLS_CALLS_UNTRACKED_TOTAL,
    SELF_TLS_CONNECTIONS_EVICTED_TOTAL,
    SELF_TLS_EVENTS_LOST_TOTAL,
    SelfSample,
)

__all__ = ["LOSS_SIGNALS", "Loss", "LossSignal", "LossWatch", "loss_totals"]


@dataclass(frozen=True, slots=True)
class LossSignal:
    """One way of losing data: a self-metric counter (optionally one label value of it)."""

    reason: str  # the `reason` label of ebpf_slo_exporter_degraded and the word /healthz uses
    metric: str  # a SELF_* counter name
    what: str  # what one count means, for the /healthz text
    label: tuple[str, str] | None = None  # only the samples with this label value; None: all summed


# Counters that mean exchanges went uncounted. Left out on purpose: caps that keep every
# exchange (route_overflow: counted under /{overflow}), hand-overs to user space (agg_full,
# busy: still counted there), idle evictions (the connection was quiet) and HTTP/2 streams
# that a GOAWAY or the connection's end closed (the server's doing, not ours).
LOSS_SIGNALS: tuple[LossSignal, ...] = (
    LossSignal("kernel_drops", SELF_KERNEL_DROPS_TOTAL,
               "frames the kernel dropped because the capture buffer was full (user space fell behind)"),
    LossSignal("tls_events_lost", SELF_TLS_EVENTS_LOST_TOTAL,
               "TLS events the probes' ring buffer had no room for (user space fell behind)"),
    LossSignal("tls_calls_untracked", SELF_TLS_CALLS_UNTRACKED_TOTAL,
               "SSL calls the TLS probes missed (the thread's task storage could not be made)"),
    LossSignal("tls_connections_evicted", SELF_TLS_CONNECTIONS_EVICTED_TOTAL,
               "TLS connections forgotten because the connection table was full (--max-flows)"),
    LossSignal("flows_evicted_capacity", SELF_FLOWS_EVICTED_TOTAL,
               "connections evicted because the flow table was full (--max-flows)", ("reason", "capacity")),
    LossSignal("handover_map_full", SELF_FAST_PATH_HANDOVER_MAP_FULL_TOTAL,
               "connections the kernel could not hand over to user space (handover map full)"),
    LossSignal("http2_caps", SELF_HTTP2_CAPS_HIT_TOTAL,
               "per-connection HTTP/2 caps hit (streams, header block or header table)"),
    LossSignal("http2_streams_lost", SELF_HTTP2_STREAMS_DROPPED_TOTAL,
               "HTTP/2 streams dropped because bytes of their connection were lost", ("reason", "lost")),
    LossSignal("capture_detached", SELF_CAPTURE_DETACHED_TOTAL,
               "times the capture lost its interface (nothing was captured until it came back)"),
)


def loss_totals(samples: Iterable[SelfSample], signals: Iterable[LossSignal] = LOSS_SIGNALS) -> dict[str, int]:
    """Each signal's counter now, from self-metric samples (label-filtered, summed over the rest)."""
    by_metric: dict[str, list[LossSignal]] = {}
    totals: dict[str, int] = {}
    for signal in signals:
        by_metric.setdefault(signal.metric, []).append(signal)
        totals[signal.reason] = 0
    for sample in samples:
        for signal in by_metric.get(sample.name, ()):
            if signal.label is None or signal.label in sample.labels:
                totals[signal.reason] += int(sample.value)
    return totals


@dataclass(frozen=True, slots=True)
class Loss:
    """One reason the exporter is degraded: how many were lost within the window."""

    reason: str
    count: int
    what: str


class LossWatch:
    """Loss counters observed over time (about once a second); degraded while one rose within `window_s`.

    The baseline is the newest observation at least `window_s` old (before the first one that
    old, the start: every counter starts at zero), so the answer is "higher than N seconds
    ago" to within one observation interval. History is bounded by window / interval.
    """

    def __init__(self, window_s: float, now_s: float, signals: Iterable[LossSignal] = LOSS_SIGNALS) -> None:
        if window_s <= 0:
            raise ValueError("the degraded window must be a positive number of seconds")
        self.window_s = window_s
        self.signals = tuple(signals)
        self._history: deque[tuple[float, Mapping[str, int]]] = deque([(now_s, {})])

    def observe(self, now_s: float, totals: Mapping[str, int]) -> tuple[Loss, ...]:
        history = self._history
        history.append((now_s, dict(totals)))
        while len(history) > 1 and history[1][0] <= now_s - self.window_s:
            history.popleft()
        baseline = history[0][1]
        losses = []
        for signal in self.signals:
            now = totals.get(signal.reason, 0)
            before = baseline.get(signal.reason, 0)
            # A counter below its baseline was reset (a new capture): all of it is new.
            lost = now - before if now >= before else now
            if lost > 0:
                losses.append(Loss(signal.reason, lost, signal.what))
        return tuple(losses)
