"""Route labels: patterns first, then an ID heuristic, always under a per-port cap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.core.routes import MAX_ROUTE_CHARS, MAX_ROUTE_SEGMENTS, RouteMapper, _is_identifier, heuristic_route

PATTERNS = ["/api/items/{id}", "/users/{user}/orders/{order}", "/users/me/orders/{order}"]


@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/api/items/42", "/api/items/{id}"),
        ("/api/items/42/", "/api/items/{id}"),
        ("/api/items/42?full=1", "/api/items/{id}"),
        ("http://svc:8080/api/items/abc", "/api/items/{id}"),
        ("/api/items/", "/api/items/"),  # `{id}` needs a non-empty segment
        ("/users/ann/orders/7", "/users/{user}/orders/{order}"),
        ("/users/me/orders/7", "/users/{user}/orders/{order}"),  # first match wins
        ("/api/items/42/detail", "/api/items/{id}/detail"),  # no pattern: heuristic
        ("/api/v2/users", "/api/v2/users"),
        ("/orders/123456", "/orders/{id}"),
        ("/o/550e8400-e29b-41d4-a716-446655440000", "/o/{id}"),
        ("/o/550e8400e29b41d4a716446655440000", "/o/{id}"),
        ("/blob/0123456789abcdef0123", "/blob/{id}"),
        ("/t/dGhpc0lzQVRva2VuMTIz", "/t/{id}"),
        ("/t/internationalization", "/t/internationalization"),
        ("/v1/a1b2", "/v1/a1b2"),
        ("/" + "x" * 100, "/{id}"),
        ("/1/2/3/4/5/6/7/8/9/10", "/{id}/{id}/{id}/{id}/{id}/{id}/{id}/{id}/{rest}"),
        ("", "/"),
        ("/", "/"),
        ("?x=1", "/"),
        ("*", "*"),
        ("host:443", "host:443"),
    ],
)
def test_route(target: str, route: str) -> None:
    assert RouteMapper(PATTERNS).route(80, target) == route


def test_route_label_length_is_capped() -> None:
    target = "/" + "/".join(["abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghij"] * 8)
    route = RouteMapper().route(80, target)
    assert len(route) <= MAX_ROUTE_CHARS
    assert route.endswith("/{rest}")


def test_distinct_routes_per_port_are_capped() -> None:
    mapper = RouteMapper(max_routes_per_port=3)
    routes = [mapper.route(80, f"/r{i}") for i in range(5)]
    assert routes == ["/r0", "/r1", "/r2", "/{overflow}", "/{overflow}"]
    assert mapper.overflowed == 2
    assert mapper.route(80, "/r1") == "/r1"  # known routes keep working
    assert mapper.route(81, "/r4") == "/r4"  # the cap is per port
    assert mapper.overflowed == 2


def test_ids_do_not_use_up_the_cap() -> None:
    mapper = RouteMapper(max_routes_per_port=2)
    assert {mapper.route(80, f"/items/{n}") for n in range(1000)} == {"/items/{id}"}
    assert mapper.overflowed == 0


@pytest.mark.parametrize("bad", [{"patterns": ["api/{id}"]}, {"max_routes_per_port": 0}])
def test_bad_configuration_fails_at_once(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RouteMapper(**bad)  # type: ignore[arg-type]


def kernel_ids(path: str) -> str:
    """What ids_path in bpf/http_filter.c keys a path as: every segment of an identifier's shape,
    at any depth, is `{id}` (test_fast_path_differential checks the filter does exactly this)."""
    return "/".join("{id}" if _is_identifier(seg) else seg for seg in path.split("/"))


def test_identifiers_are_ids_unless_a_pattern_names_one() -> None:
    assert RouteMapper(PATTERNS).identifiers_are_ids()
    assert RouteMapper().identifiers_are_ids()
    assert not RouteMapper(["/v/2024/report", "/a/{b}"]).identifiers_are_ids()
    assert not RouteMapper(["/blobs/0123456789abcdef0123"]).identifiers_are_ids()
    assert not RouteMapper(["/o/550e8400-e29b-41d4-a716-446655440000/{x}"]).identifiers_are_ids()
    assert RouteMapper(["/v/v2024/{x}", "/a/0123456789abcde"]).identifiers_are_ids()  # 15 hex: a word


_SEGMENTS = st.sampled_from(["", "1", "42", "007", "123456789", "{id}", "items", "v2", "a1b2", "x" * 70,
                             "0123456789abcdef0123", "550e8400-e29b-41d4-a716-446655440000", "me", "%31",
                             "550e8400e29b41d4a716446655440000", "12345678-1234-1234-1234-123456789012",
                             "abcdefabcdefabcd", "tokenWithDigits123", "0123456789abcde"])


@settings(max_examples=300, deadline=None)
@given(segments=st.lists(_SEGMENTS, min_size=1, max_size=11),
       patterns=st.lists(st.lists(st.sampled_from(["{id}", "{x}", "items", "v2", "me", "x" * 70]),
                                  min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)), max_size=3))
def test_kernel_id_keys_name_every_route_as_the_path_sent(segments: list[str], patterns: list[str]) -> None:
    """The kernel may key `/items/42` as `/items/{id}` only because the route is the same."""
    path = "/" + "/".join(segments)
    mapper = RouteMapper(patterns, max_routes_per_port=10_000)
    if "x" * 70 in "".join(patterns):  # a literal over 64 characters is an identifier's shape
        assert not mapper.identifiers_are_ids()
        return
    assert mapper.identifiers_are_ids()
    assert mapper.route(80, kernel_ids(path)) == mapper.route(80, path)


path_segments = st.one_of(
    st.sampled_from(["api", "items", "v2", "", "42", "٤٢", "²", "0" * 16, "x" * 65, "a1b2c3d4e5f6a7b8",
                     "550e8400-e29b-41d4-a716-446655440000", "internationalization", "{id}"]),
    st.text(alphabet="0123456789abcdefXYZ-_٤", max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(path_segments, max_size=10))
def test_heuristic_keeps_short_words_exactly_as_asking_each_segment_did(segments: list[str]) -> None:
    # The heuristic decides short non-digit segments without a call; the rule it replaces asked
    # _is_identifier about every segment.
    path = "/" + "/".join(segments)
    parts = path[1:].split("/", MAX_ROUTE_SEGMENTS)
    cut = len(parts) > MAX_ROUTE_SEGMENTS
    shaped = ["{id}" if _is_identifier(part) else part for part in parts[:MAX_ROUTE_SEGMENTS]]
    route = "/" + "/".join(shaped)
    if cut or len(route) > MAX_ROUTE_CHARS:
        while shaped and len("/" + "/".join(shaped)) + len("{rest}") + 1 > MAX_ROUTE_CHARS:
            shaped.pop()
        route = "/" + "/".join([*shaped, "{rest}"])
    assert heuristic_route(path) == route


_TARGETS = st.one_of(
    st.tuples(st.lists(st.sampled_from(["api", "items", "v", "2024", "٤٢", "x" * 70]), max_size=9),
              st.sampled_from(["0", "7", "42", "2024", "٤٢", "", "items"]))
    .map(lambda parts: "/".join(["", *parts[0], parts[1]])),
    st.sampled_from(["/a?b=/12", "/a#/3", "http://h:80/a/12", "12", "h:443", "/a/12?x=1"]),
)


@settings(max_examples=300, deadline=None)
@given(targets=st.lists(_TARGETS, min_size=1, max_size=8),
       patterns=st.lists(st.sampled_from(["/api/items/{id}", "/v/2024/{x}", "/{a}/{b}", "/items/42", "/0", "/{a}"]),
                         max_size=2))
def test_a_target_ending_in_digits_has_the_route_of_its_own_shape(targets: list[str], patterns: list[str]) -> None:
    """Targets ending in a segment of digits share one cache entry (`/items/0`) when identifiers are
    ids; every route is still what shaping that very target gives, cache warm or cold."""
    mapper = RouteMapper(patterns, max_routes_per_port=10_000)
    for target in targets * 2:
        assert mapper.route(80, target) == mapper._shape(target)


def test_random_ids_do_not_flood_the_route_cache() -> None:
    mapper = RouteMapper()
    assert {mapper.route(80, f"/api/items/{i}") for i in range(10_000)} == {"/api/items/{id}"}
    assert mapper._cache == {"/api/items/0": "/api/items/{id}"}
