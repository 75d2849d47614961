from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

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
