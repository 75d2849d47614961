from __future__ import annotations

from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from exporter import metrics
from exporter.core.http1 import KNOWN_METHODS
from exporter.core.model import Exchange
from exporter.identity import IDENTITY_LABEL_NAMES
from exporter.metrics import ExporterCollector, HttpMetrics, SelfSample, format_bound

NO_IDENTITY = dict.fromkeys(IDENTITY_LABEL_NAMES, "")


def exchange(method: str = "GET", status: int = 200, seconds: float = 0.1, port: int = 8080,
             request_body: int = 0, response_body: int = 10) -> Exchange:
    return Exchange(method, "/", status, 1_000, 1_000 + round(seconds * 1e9), request_body, response_body, port)


def registry_with(http: HttpMetrics, sources: list = []) -> CollectorRegistry:  # noqa: B006 - read only
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(http, sources))
    return registry


def test_value_on_a_bound_lands_in_that_bucket() -> None:
    http = HttpMetrics(duration_buckets=(0.1, 0.15, 0.25))
    http.observe(exchange(seconds=0.15), "/")
    http.observe(exchange(seconds=0.150000001), "/")
    http.observe(exchange(seconds=9), "/")
    registry = registry_with(http)
    labels = {"http_request_method": "GET", "http_response_status_code": "200", "http_route": "/",
              "server_port": "8080", "url_scheme": "http", "network_protocol_version": "1.1", **NO_IDENTITY}
    get = registry.get_sample_value
    assert get("http_server_request_duration_seconds_bucket", {**labels, "le": "0.1"}) == 0
    assert get("http_server_request_duration_seconds_bucket", {**labels, "le": "0.15"}) == 1
    assert get("http_server_request_duration_seconds_bucket", {**labels, "le": "0.25"}) == 2
    assert get("http_server_request_duration_seconds_bucket", {**labels, "le": "+Inf"}) == 3
    assert get("http_server_request_duration_seconds_count", labels) == 3
    assert abs(get("http_server_request_duration_seconds_sum", labels) - 9.300000001) < 1e-6


def test_unknown_methods_are_other_and_sizes_are_recorded() -> None:
    http = HttpMetrics()
    http.observe(exchange(method="PURGE", request_body=5000, response_body=0), "/")
    registry = registry_with(http)
    labels = {"http_request_method": "_OTHER", "http_response_status_code": "200", "http_route": "/",
              "server_port": "8080", "url_scheme": "http", "network_protocol_version": "1.1", **NO_IDENTITY}
    assert registry.get_sample_value("http_server_request_body_size_bytes_sum", labels) == 5000
    assert registry.get_sample_value("http_server_response_body_size_bytes_bucket", {**labels, "le": "0.0"}) == 1


def test_self_samples_get_the_prefix_and_labels() -> None:
    def source() -> list[SelfSample]:
        return [SelfSample("parse_errors_total", "counter", "errors", 3, (("reason", "bad_chunk"),)),
                SelfSample("flows_active", "gauge", "flows", 7)]

    registry = registry_with(HttpMetrics(), [source])
    assert registry.get_sample_value("ebpf_slo_exporter_parse_errors_total", {"reason": "bad_chunk"}) == 3
    assert registry.get_sample_value("ebpf_slo_exporter_flows_active") == 7
    assert b"# TYPE ebpf_slo_exporter_parse_errors_total counter" in generate_latest(registry)


def test_le_labels_are_float_text() -> None:
    assert [format_bound(b) for b in (1, 0.15, 10, float("inf"))] == ["1.0", "0.15", "10.0", "+Inf"]


IDENTITIES = [("",) * len(IDENTITY_LABEL_NAMES), ("shop", "shop-1", "prod", "shop-1", "uid-1", "c1"),
              ("shop", "shop-2", "prod", "shop-2", "uid-2", "c2")]
exchanges = st.builds(
    lambda method, status, start, length, request_body, response_body, port, scheme, version, route, identity: (
        Exchange(method, "/x", status, start, start + length, request_body, response_body, port, scheme, version),
        route, identity),
    st.sampled_from(["GET", "POST", "PURGE", "get", "X-1"]), st.sampled_from([200, 404, 500]),
    st.integers(0, 10**12), st.integers(-10**6, 3 * 10**9), st.sampled_from([0, 1, 100, 101, 10**9]),
    st.sampled_from([0, 2, 999, 1000, 10**8 + 1]), st.sampled_from([80, 8080]), st.sampled_from(["http", "https"]),
    st.sampled_from(["1.1", "2"]), st.sampled_from(["/a", "/b/{id}"]), st.sampled_from(IDENTITIES))


def _oracle(observed: list[tuple[Exchange, str, tuple[str, ...]]], http: HttpMetrics) -> dict[tuple[str, ...], float]:
    """Every sample of the three HTTP histograms, counted straight from the exchanges."""
    samples: dict[tuple[str, ...], float] = {}
    for one, route, identity in observed:
        labels = (one.method if one.method in KNOWN_METHODS else "_OTHER", str(one.status), route,
                  str(one.server_port), one.scheme, one.protocol_version, *identity)
        values = (max(0, one.end_ns - one.start_ns) / 1e9, one.request_body_bytes, one.response_body_bytes)
        for name, bounds, value in zip(("http_server_request_duration_seconds", "http_server_request_body_size_bytes",
                                        "http_server_response_body_size_bytes"),
                                       (http.duration_buckets, http.size_buckets, http.size_buckets), values,
                                       strict=True):
            for bound in (*bounds, float("inf")):
                key = (f"{name}_bucket", *labels, format_bound(bound))
                samples[key] = samples.get(key, 0) + (value <= bound)
            samples[(f"{name}_count", *labels)] = samples.get((f"{name}_count", *labels), 0) + 1
            samples[(f"{name}_sum", *labels)] = samples.get((f"{name}_sum", *labels), 0) + value
    return samples


@settings(max_examples=200, deadline=None)
@given(st.lists(exchanges, max_size=40), st.integers(0, 40), st.integers(1, 4), st.integers(1, 6))
def test_every_sample_equals_a_count_straight_from_the_exchanges(
        observed: list[tuple[Exchange, str, tuple[str, ...]]], forget_at: int, lookup_entries: int,
        batch: int) -> None:
    # observe() finds a series by the exchange's own values through a small bounded table (made
    # tiny here so that it fills and starts again); forgetting a server's series clears it too.
    # Exchanges come one by one (batch 1) or in batches (observe_all, as the pipeline gives them).
    http = HttpMetrics()
    with patch.object(metrics, "_BY_VALUES_ENTRIES", lookup_entries):
        at = 0
        forgotten = False
        while at < len(observed):
            if at >= forget_at and not forgotten:
                http.forget_instances({"shop-1"})
                kept = [item for item in observed[:at] if item[2][1] != "shop-1"]
                observed, at, forgotten = kept + observed[at:], len(kept), True
            if batch == 1:
                http.observe(*observed[at])
            else:
                http.observe_all(observed[at : at + batch])
            at += batch
    want = _oracle(observed, http)
    got = {(sample.name, *sample.labels.values()): sample.value
           for family in http.collect() for sample in family.samples}
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key[0].endswith("_sum"):
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        else:
            assert got[key] == value, key
