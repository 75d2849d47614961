"""SLOs on gRPC: objectives that select rpc_service / rpc_method, and the gRPC availability rule."""

from __future__ import annotations

import pytest

from exporter.core.model import Exchange, RpcCall
from exporter.errors import ConfigError
from exporter.slo.evaluate import BAD, GOOD, NOT_COUNTED, Matcher
from exporter.slo.manifest import DEFAULT_GRPC_BAD_CODES, parse_manifest

GRPC_AVAILABILITY = """
kind: Objective
metadata: {labels: {name: greeter up, service: greeter}}
spec:
  indicatorSelector: {category: availability, rpc_service: helloworld.Greeter}
  objectivePercent: 99.9
  window: 30d
"""
GRPC_LATENCY = """
kind: Objective
metadata: {labels: {name: say hello fast, service: greeter}}
spec:
  indicatorSelector: {category: latency, rpc_service: helloworld.Greeter, rpc_method: SayHello,
                      latency_target: 100ms}
  objectivePercent: 99
  window: 7d
"""


def call(code: str, service: str = "helloworld.Greeter", method: str = "SayHello", ms: int = 1,
         status: int = 200) -> Exchange:
    return Exchange("POST", f"/{service}/{method}", status, 0, ms * 1_000_000, 5, 5, 50051, "http", "2",
                    RpcCall("grpc", service, method, code))


@pytest.mark.parametrize(("code", "verdict"), [
    ("0", GOOD), ("1", GOOD), ("5", GOOD), ("3", GOOD), ("16", GOOD),
    ("2", BAD), ("4", BAD), ("12", BAD), ("13", BAD), ("14", BAD), ("15", BAD),
    ("reset", BAD), ("missing", BAD),
])
def test_grpc_availability_uses_the_otel_server_error_codes(code: str, verdict: int) -> None:
    matcher = Matcher(parse_manifest(GRPC_AVAILABILITY)[0])
    assert matcher.classify(call(code), "/helloworld.Greeter/SayHello") == verdict


def test_grpc_objectives_count_only_their_calls() -> None:
    matcher = Matcher(parse_manifest(GRPC_AVAILABILITY)[0])
    assert matcher.classify(call("0", service="other.Svc"), "/other.Svc/SayHello") == NOT_COUNTED
    plain = Exchange("GET", "/", 200, 0, 1, 0, 0, 50051, "http", "2")
    assert matcher.classify(plain, "/") == NOT_COUNTED
    # The kernel aggregates HTTP/1.x only: its counts never feed a gRPC objective.
    assert matcher.good_of("/", 50051, 200, [3], [1.0]) is None


def test_grpc_latency_by_method() -> None:
    matcher = Matcher(parse_manifest(GRPC_LATENCY)[0])
    assert matcher.classify(call("13", ms=100), "/x") == GOOD  # latency ignores the code
    assert matcher.classify(call("0", ms=101), "/x") == BAD
    assert matcher.classify(call("0", method="Other"), "/x") == NOT_COUNTED


def test_bad_codes_are_configurable_by_name_number_or_our_values() -> None:
    text = GRPC_AVAILABILITY + "  grpcBadStatusCodes: [unavailable, 13, reset]\n"
    objective = parse_manifest(text)[0]
    assert objective.grpc_bad_codes == ("14", "13", "reset")
    matcher = Matcher(objective)
    assert [matcher.classify(call(c), "/") for c in ("2", "14", "13", "reset", "missing")] == [
        GOOD, BAD, BAD, BAD, GOOD]
    assert parse_manifest(GRPC_LATENCY)[0].grpc_bad_codes == DEFAULT_GRPC_BAD_CODES


@pytest.mark.parametrize(("extra", "message"), [
    ("  grpcBadStatusCodes: [NOPE]\n", "grpcBadStatusCodes has 'NOPE'"),
    ("  grpcBadStatusCodes: UNKNOWN\n", "must be a list"),
])
def test_bad_code_lists_are_one_line_errors(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_manifest(GRPC_AVAILABILITY + extra)


def test_bad_codes_need_a_grpc_availability_objective() -> None:
    with pytest.raises(ConfigError, match="select gRPC"):
        parse_manifest(GRPC_LATENCY + "  grpcBadStatusCodes: [UNKNOWN]\n")
