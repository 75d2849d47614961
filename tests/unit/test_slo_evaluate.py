"""SLI, burn rate and budget arithmetic, and which exchanges an objective counts."""

from __future__ import annotations

import math

import pytest

from exporter.core.model import Exchange
from exporter.slo.evaluate import (
    BAD,
    GOOD,
    NOT_COUNTED,
    Matcher,
    Result,
    budget_remaining,
    burn_rate,
    json_number,
)
from exporter.slo.manifest import parse_manifest

LATENCY = """
kind: Objective
metadata: {labels: {name: fast, service: shop}}
spec:
  indicatorSelector: {category: latency, path: /api, latency_target: 150ms, server_port: "8080"}
  objectivePercent: 99
  window: 5m
"""
AVAILABILITY_2XX = """
kind: Objective
metadata: {labels: {name: ok, service: shop}}
spec:
  indicatorSelector: {category: availability}
  objectivePercent: 99
  goodStatusClasses: [2xx]
  window: 5m
"""


def ex(status: int = 200, ms: float = 1, port: int = 8080) -> Exchange:
    return Exchange("GET", "/api", status, 0, round(ms * 1_000_000), 0, 0, port)


@pytest.mark.parametrize(
    ("exchange", "route", "verdict"),
    [
        (ex(ms=150), "/api", GOOD),
        (ex(ms=150.000001), "/api", BAD),
        (ex(status=500, ms=1), "/api", GOOD),  # latency ignores the status
        (ex(), "/other", NOT_COUNTED),
        (ex(port=9090), "/api", NOT_COUNTED),
    ],
)
def test_latency_matcher(exchange: Exchange, route: str, verdict: int) -> None:
    assert Matcher(parse_manifest(LATENCY)[0]).classify(exchange, route) == verdict


@pytest.mark.parametrize(
    ("status", "verdict"), [(200, GOOD), (204, GOOD), (301, BAD), (404, BAD), (503, BAD)]
)
def test_availability_with_good_classes(status: int, verdict: int) -> None:
    assert Matcher(parse_manifest(AVAILABILITY_2XX)[0]).classify(ex(status=status), "/anything") == verdict


def test_default_availability_counts_everything_but_5xx() -> None:
    objective = parse_manifest(AVAILABILITY_2XX.replace("  goodStatusClasses: [2xx]\n", ""))[0]
    matcher = Matcher(objective)
    assert [matcher.classify(ex(status=s), "/") for s in (101, 200, 302, 404, 500, 599)] == [1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize(
    ("good", "total", "objective", "burn", "budget"),
    [
        (99, 100, 0.99, 1.0, 0.0),
        (100, 100, 0.99, 0.0, 1.0),
        (98, 100, 0.99, 2.0, -1.0),
        (995, 1000, 0.995, 1.0, 0.0),
        (999, 1000, 0.99, 0.1, 0.9),
        (0, 10, 0.5, 2.0, -1.0),
    ],
)
def test_burn_rate_and_budget(good: int, total: int, objective: float, burn: float, budget: float) -> None:
    assert burn_rate(good, total, objective) == pytest.approx(burn, abs=1e-12)
    assert budget_remaining(good, total, objective) == pytest.approx(budget, abs=1e-12)


def test_exact_edge_is_met_and_burns_exactly_one() -> None:
    result = Result(0, 60, 99, 100, 0.99)
    assert result.sli == 0.99
    assert result.percent == 99.0
    assert result.burn_rate == 1.0
    assert result.budget_remaining == 0.0
    assert result.met is True
    assert Result(0, 60, 98, 100, 0.99).met is False


def test_objective_of_100_percent_has_no_budget() -> None:
    assert burn_rate(10, 10, 1.0) == 0.0
    assert budget_remaining(10, 10, 1.0) == 1.0
    assert burn_rate(9, 10, 1.0) == math.inf
    assert budget_remaining(9, 10, 1.0) == -math.inf
    assert json_number(math.inf) == "+Inf"
    assert json_number(-math.inf) == "-Inf"
    assert json_number(0.5) == 0.5
    assert json_number(None) is None


def test_no_traffic_is_no_data() -> None:
    result = Result(0, 60, 0, 0, 0.99)
    assert (result.sli, result.percent, result.burn_rate, result.budget_remaining, result.met) == (
        None,
        None,
        None,
        None,
        None,
    )


def test_rates_slightly_over_total_are_clamped() -> None:
    # Prometheus extrapolation can make good a hair larger than total.
    assert Result(0, 60, 1.0000000001, 1.0, 0.99).sli == 1.0


def test_kernel_aggregates_count_like_the_same_exchanges_one_by_one() -> None:
    """The fast path hands the SLO windows bucket counts; they must classify as per-exchange."""
    from exporter.metrics import DEFAULT_DURATION_BUCKETS
    from exporter.slo.evaluate import Evaluator

    objectives = parse_manifest(LATENCY + "---\n" + AVAILABILITY_2XX)
    bounds = DEFAULT_DURATION_BUCKETS
    durations_ms = [1, 40, 150, 150.000001, 151, 600, 20_000]
    cases = [(status, ms) for status in (200, 404, 503) for ms in durations_ms]
    one_by_one = Evaluator(objectives, 10, start_s=1000, grace_s=1)
    aggregated = Evaluator(objectives, 10, start_s=1000, grace_s=1)
    now_ns = 1_003 * 10**9
    for status, ms in cases:
        exchange = Exchange("GET", "/api", status, now_ns - round(ms * 1e6), now_ns, 0, 0, 8080)
        one_by_one.observe(exchange, "/api", now_ns)
    for status in (200, 404, 503):
        counts = [0] * (len(bounds) + 1)
        for ms in durations_ms:
            counts[sum(1 for b in bounds if b < ms / 1000)] += 1
        aggregated.observe_counts("/api", 8080, status, counts, bounds, now_ns)
    expected = [(c.objective.name, c.window.good, c.window.total) for c in one_by_one.close(1010)]
    assert [(c.objective.name, c.window.good, c.window.total) for c in aggregated.close(1010)] == expected
    assert expected == [("fast", 9, 21), ("ok", 7, 21)]


BY_SERVICE = """
kind: Objective
metadata: {labels: {name: checkout-ok, service: shop}}
spec:
  indicatorSelector: {category: availability, service_name: checkout}
  objectivePercent: 99
  window: 5m
"""


def test_an_objective_selects_the_server_by_service_name() -> None:
    """Two servers on one port (two pods): service_name, from identity/, keeps their SLOs apart."""
    objective = parse_manifest(BY_SERVICE)[0]
    assert objective.service_name == "checkout"
    matcher = Matcher(objective)
    assert matcher.classify(ex(status=503), "/api", "checkout") == BAD
    assert matcher.classify(ex(status=200), "/api", "checkout") == GOOD
    assert matcher.classify(ex(status=503), "/api", "cart") == NOT_COUNTED
    assert matcher.classify(ex(status=503), "/api") == NOT_COUNTED  # a server not named
    assert matcher.good_of("/api", 8080, 200, (3, 1), (0.1,), "checkout") == 4
    assert matcher.good_of("/api", 8080, 200, (3, 1), (0.1,), "cart") is None
    assert Matcher(parse_manifest(LATENCY)[0]).classify(ex(), "/api", "anything") == GOOD
