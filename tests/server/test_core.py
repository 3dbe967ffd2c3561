"""The proxy's I/O-free core: routing, the wire reader, the token cache and policy, metadata."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from kbproxy.auth import Authenticator, Identity, MfaPolicy, TokenCache, token_key
from kbproxy.errors import AuthUnavailable, ConfigError, PermissionDenied, Unauthenticated
from kbproxy.relay import forwardable, token_of
from kbproxy.routing import Router, SessionRoute, SessionRoutes, load_backend_map
from kbproxy.wire import RequestIds, read_request_ids


def test_router_fills_the_template_with_the_users_slug() -> None:
    router = Router(template="spark-connect-{username}.{namespace}.svc:15002", namespace="ns")
    assert router.address_for("bob") == "spark-connect-bob.ns.svc:15002"
    assert router.address_for("bob_1").startswith("spark-connect-bob-1---")


def test_backend_map_wins_over_the_template() -> None:
    router = Router(template="{username}.svc:15002", backend_map={"alice": "127.0.0.1:7001"})
    assert router.address_for("alice") == "127.0.0.1:7001"
    assert router.address_for("bob") == "bob.svc:15002"


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{user}.svc:15002", "only {username} and {namespace}"),
        ("shared.svc:15002", "every user would share one server"),
        ("{username}.svc", "expected HOST:PORT"),
        ("{username", "backend template"),
    ],
)
def test_bad_templates_are_refused_with_a_reason(template: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        Router(template=template)


def test_backend_map_file(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"alice": "127.0.0.1:7001"}))
    assert load_backend_map(path) == {"alice": "127.0.0.1:7001"}
    path.write_text(json.dumps(["alice"]))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_backend_map(path)
    path.write_text(json.dumps({"alice": "nohostport"}))
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_backend_map(path)
    with pytest.raises(ConfigError, match="cannot read backend map"):
        load_backend_map(tmp_path / "missing.json")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_wire_reader_finds_session_and_user_among_other_fields() -> None:
    user_context = _field(2, b"Alice A.") + _field(1, b"alice")
    message = (
        _varint(5 << 3 | 0)
        + _varint(300)  # a varint field first
        + _field(1, b"6f1b0c9e-session")
        + _field(2, user_context)
        + _field(3, b"x" * 1000)
    )
    assert read_request_ids(message) == RequestIds("6f1b0c9e-session", "alice")


def test_wire_reader_matches_pyspark_messages() -> None:
    from pyspark.sql.connect.proto import base_pb2

    request = base_pb2.FetchErrorDetailsRequest(
        session_id="abc", user_context=base_pb2.UserContext(user_id="bob"), error_id="e1"
    )
    assert read_request_ids(request.SerializeToString()) == RequestIds("abc", "bob")


@pytest.mark.parametrize("data", [b"", b"\x0a\xff", b"\x0a\x05ab", b"\x0b", b"\xff" * 12])
def test_wire_reader_never_raises_on_garbage(data: bytes) -> None:
    assert read_request_ids(data).session_id is None


def test_session_routes_bind_a_session_to_its_first_user() -> None:
    now = [0.0]
    routes = SessionRoutes(max_size=2, ttl=10, clock=lambda: now[0])
    alice = SessionRoute("alice", "alice", "a:1")
    assert routes.record("s1", alice)
    assert not routes.record("s1", SessionRoute("bob", "bob", "b:1"))
    assert routes.lookup("s1") == alice
    now[0] = 11
    assert routes.lookup("s1") is None
    routes.record("s1", alice)
    routes.record("s2", alice)
    routes.record("s3", alice)
    assert len(routes) == 2 and routes.lookup("s1") is None


def _identity(*, mfa: str = "Used", cachefor_ms: int = 300_000, expires_ms: int) -> Identity:
    return Identity("alice", mfa, "Login", expires_ms, cachefor_ms)


def test_cache_ttl_is_the_smallest_of_cachefor_expiry_and_maximum() -> None:
    now = [1000.0]
    cache = TokenCache(max_ttl=60, clock=lambda: now[0])
    assert cache.ttl_for(_identity(expires_ms=2_000_000, cachefor_ms=30_000)) == 30
    assert cache.ttl_for(_identity(expires_ms=1_010_000)) == 10
    assert cache.ttl_for(_identity(expires_ms=9_000_000)) == 60
    assert cache.ttl_for(_identity(expires_ms=500_000)) == 0


def test_cache_expires_entries_and_stays_bounded() -> None:
    now = [1000.0]
    cache = TokenCache(max_size=2, max_ttl=60, negative_ttl=5, clock=lambda: now[0])
    valid = _identity(expires_ms=9_000_000)
    cache.put(b"a", valid)
    cache.put(b"b", Unauthenticated("no"))
    assert cache.get(b"a") == valid
    now[0] += 6
    assert cache.get(b"b") is None and cache.get(b"a") == valid
    cache.put(b"c", valid)
    cache.put(b"d", valid)
    assert len(cache) == 2 and cache.get(b"a") is None
    now[0] += 61
    assert cache.get(b"c") is None


def test_cache_keys_are_hashes() -> None:
    assert token_key("secret-token") != b"secret-token"
    assert b"secret-token" not in token_key("secret-token")


class FakeAuth2:
    """A token source answering from a dict, after an optional delay, counting lookups."""

    def __init__(self, answers: dict[str, Identity | Exception], delay: float = 0.0) -> None:
        self.answers = answers
        self.delay = delay
        self.lookups = 0

    async def lookup(self, token: str) -> Identity:
        self.lookups += 1
        await asyncio.sleep(self.delay)
        answer = self.answers[token]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _authenticator(source: FakeAuth2, policy: MfaPolicy | None = None) -> Authenticator:
    return Authenticator(source=source, cache=TokenCache(), policy=policy or MfaPolicy())


async def test_concurrent_first_calls_make_one_lookup() -> None:
    source = FakeAuth2({"t": _identity(expires_ms=10**14)}, delay=0.05)
    auth = _authenticator(source)
    results = await asyncio.gather(*(auth.authenticate("t") for _ in range(20)))
    assert {r.username for r in results} == {"alice"}
    assert source.lookups == 1
    assert auth.counters.joins == 19 and auth.counters.misses == 20
    await auth.authenticate("t")
    assert source.lookups == 1 and auth.counters.hits == 1


async def test_a_cancelled_first_caller_does_not_fail_the_others() -> None:
    source = FakeAuth2({"t": _identity(expires_ms=10**14)}, delay=0.05)
    auth = _authenticator(source)
    first = asyncio.ensure_future(auth.authenticate("t"))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(auth.authenticate("t"))
    first.cancel()
    assert (await second).username == "alice"


async def test_rejections_are_cached_briefly_and_outages_not_at_all() -> None:
    source = FakeAuth2({"bad": Unauthenticated("x"), "down": AuthUnavailable("Auth2 down")})
    auth = _authenticator(source)
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="x"):
            await auth.authenticate("bad")
        with pytest.raises(AuthUnavailable):
            await auth.authenticate("down")
    assert source.lookups == 3
    assert auth.counters.negative_hits == 1 and auth.counters.failures == 2


async def test_missing_token_says_how_to_send_one() -> None:
    with pytest.raises(Unauthenticated, match="x-kbase-token"):
        await _authenticator(FakeAuth2({})).authenticate(None)


async def test_mfa_policy() -> None:
    carol = Identity("carol", "NotUsed", "Login", 10**14, 300_000)
    source = FakeAuth2({"c": carol})
    with pytest.raises(PermissionDenied, match="multi-factor"):
        await _authenticator(source).authenticate("c")
    exempt = MfaPolicy(required=True, exempt=frozenset({"carol"}))
    assert (await _authenticator(source, exempt).authenticate("c")).username == "carol"
    off = MfaPolicy(required=False)
    assert (await _authenticator(source, off).authenticate("c")).username == "carol"


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([("x-kbase-token", "T1")], "T1"),
        ([("authorization", "Bearer T2")], "T2"),
        ([("authorization", "bearer  T2 ")], "T2"),
        ([("authorization", "Bearer T2"), ("x-kbase-token", "T1")], "T1"),
        ([("authorization", "Basic abc")], None),
        ([("x-kbase-token", " ")], None),
        ([], None),
    ],
)
def test_token_of(metadata: list[tuple[str, str]], token: str | None) -> None:
    assert token_of(metadata) == token


def test_forwarded_metadata_keeps_the_token_and_drops_transport_headers() -> None:
    metadata = [
        ("x-kbase-token", "T"),
        ("user_id", "alice"),
        ("user-agent", "grpc-python"),
        ("te", "trailers"),
        ("grpc-accept-encoding", "gzip"),
        ("grpc-status-details-bin", b"\x08\x03"),
        ("x-custom-bin", b"\x00"),
    ]
    assert forwardable(metadata) == [
        ("x-kbase-token", "T"),
        ("user_id", "alice"),
        ("grpc-status-details-bin", b"\x08\x03"),
        ("x-custom-bin", b"\x00"),
    ]


def test_proxy_errors_carry_their_status_codes() -> None:
    assert Unauthenticated("x").code == grpc.StatusCode.UNAUTHENTICATED
    assert PermissionDenied("x").code == grpc.StatusCode.PERMISSION_DENIED
    assert AuthUnavailable("x").code == grpc.StatusCode.UNAVAILABLE


def test_public_surface_is_exported() -> None:
    import kbproxy

    for name in kbproxy.__all__:
        assert getattr(kbproxy, name) is not None, name
    assert not [n for n in kbproxy.__all__ if n.startswith("_") and n != "__version__"]
