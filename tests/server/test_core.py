"""The proxy's I/O-free core: routing, the call policy, the token cache, metadata, settings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from kbproxy.auth import Authenticator, Identity, MfaPolicy, TokenCache, token_key
from kbproxy.errors import AuthUnavailable, ConfigError, PermissionDenied, Unauthenticated
from kbproxy.policy import Allow, Deny, credentials, decide, forwardable
from kbproxy.reasons import Reason, reason_of
from kbproxy.routing import Router, load_backend_map


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
def test_credentials(metadata: list[tuple[str, str]], token: str | None) -> None:
    found = credentials(metadata)
    if token is None:
        assert isinstance(found, Deny) and found.reason is Reason.NO_TOKEN
        assert found.code == grpc.StatusCode.UNAUTHENTICATED
        assert "x-kbase-token" in found.message
    else:
        assert found == token


@pytest.mark.parametrize(
    "metadata",
    [
        [("x-kbase-token", "t\u00f6ken")],
        [("x-kbase-token", "tok\x00en")],
        [("authorization", "Bearer \u00e9t\u00e9")],
        [("x-kbase-token", b"\xff\xfe")],
    ],
)
def test_garbage_tokens_are_invalid_without_asking_auth2(
    metadata: list[tuple[str, str | bytes]],
) -> None:
    found = credentials(metadata)
    assert isinstance(found, Deny) and found.reason is Reason.TOKEN_INVALID
    assert found.message.startswith("[kbproxy:TOKEN_INVALID] ")


def test_decide_routes_by_the_validated_user_only() -> None:
    router = Router(template="{username}.svc:15002", backend_map={"alice": "127.0.0.1:7001"})
    allow = decide(Identity("alice", "Used", "Login", 10**14, 1), router)
    assert allow == Allow(
        "alice",
        "127.0.0.1:7001",
        (("x-kbproxy-backend", "127.0.0.1:7001"), ("x-kbproxy-user", "alice")),
    )
    refused = decide(PermissionDenied("needs MFA"), router)
    assert isinstance(refused, Deny) and refused.reason is Reason.MFA_REQUIRED
    assert refused.http_status == 403
    draining = decide(Identity("alice", "Used", "Login", 10**14, 1), router, draining=True)
    assert isinstance(draining, Deny) and draining.reason is Reason.DRAINING
    assert draining.http_status == 429  # Envoy: UNAVAILABLE (an authorizer's 5xx is its error)


def test_every_reason_tags_its_message_and_is_read_back() -> None:
    for reason in Reason:
        message = reason.tag("what to do")
        assert message == f"[kbproxy:{reason.value}] what to do"
        assert reason_of(message) is reason
    assert reason_of("no code here") is None
    assert str(Unauthenticated("x")).startswith("[kbproxy:TOKEN_INVALID] ")
    assert str(AuthUnavailable("x")).startswith("[kbproxy:AUTH_UNAVAILABLE] ")
    assert Deny.of(ConfigError("bad template")).message == "[kbproxy:CONFIG] bad template"


def test_forwarded_metadata_keeps_the_token_and_drops_transport_headers() -> None:
    metadata = [
        ("x-kbase-token", "T"),
        ("user_id", "alice"),
        ("user-agent", "grpc-python"),
        ("te", "trailers"),
        ("grpc-accept-encoding", "gzip"),
        ("grpc-status-details-bin", b"\x08\x03"),
        ("x-custom-bin", b"\x00"),
        ("x-kbproxy-backend", "elsewhere:1"),
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
