"""The I/O-free core of kbclient: Auth2 answers, cache policy, URLs, masking, error mapping,
the order of token sources, and the public surface."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

import kbclient
from kbclient._auth2 import TokenCache, TokenInfo, parse_me, parse_token, token_key
from kbclient._connection import mask_url, spark_url
from kbclient._grpcerrors import translate
from kbclient._tokens import find_token
from kbclient.daemon_api import DaemonAnswerError, DaemonConnection

TOKEN = "sEcReT/+=;token value"
AUTH = "https://auth.example.org/services/auth/"


def token_body(**overrides: object) -> bytes:
    body = {
        "type": "Login",
        "id": "abc",
        "created": 1_700_000_000_000,
        "expires": 4_000_000_000_000,
        "name": None,
        "user": "alice",
        "custom": {},
        "cachefor": 300_000,
        "mfa": "Used",
    }
    body.update(overrides)
    return json.dumps(body).encode()


def error_body(httpcode: int, appcode: int | None, message: str) -> bytes:
    return json.dumps(
        {"error": {"httpcode": httpcode, "appcode": appcode, "message": message}}
    ).encode()


def test_exported_members() -> None:
    for name in kbclient.__all__:
        assert hasattr(kbclient, name), name
    assert kbclient.KEYRING_SERVICE == "kbase-spark-connect"
    assert issubclass(kbclient.TokenExpiredError, kbclient.InvalidTokenError)
    assert issubclass(kbclient.InvalidTokenError, kbclient.AuthError)
    assert issubclass(kbclient.MFARequiredError, kbclient.AuthError)
    assert issubclass(kbclient.ProfileError, kbclient.KBaseError)
    for cls in (
        kbclient.NoTokenError,
        kbclient.AuthUnavailableError,
        kbclient.SparkServerUnavailableError,
        kbclient.KeyringError,
    ):
        assert issubclass(cls, kbclient.KBaseError)


def test_parse_token_gives_aware_datetimes() -> None:
    info = parse_token(200, token_body(), AUTH)
    assert info.user == "alice" and info.mfa == "Used" and info.type == "Login"
    assert info.created == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert info.expires is not None and info.expires.tzinfo is not None
    assert info.cachefor == timedelta(minutes=5)
    assert parse_token(200, token_body(mfa="weird"), AUTH).mfa == "Unknown"


def test_invalid_token_answer() -> None:
    with pytest.raises(kbclient.InvalidTokenError, match="kbdaemon login") as caught:
        parse_token(401, error_body(401, 10020, "10020 Invalid token"), AUTH)
    assert not isinstance(caught.value, kbclient.TokenExpiredError)
    assert "10020 Invalid token" in str(caught.value)


def test_invalid_answer_for_a_token_known_to_have_expired_says_when() -> None:
    expired = datetime(2024, 3, 5, 12, 30, tzinfo=timezone.utc)
    with pytest.raises(kbclient.TokenExpiredError, match="expired on 2024-03-05 12:30 UTC") as c:
        parse_token(401, error_body(401, 10020, "10020 Invalid token"), AUTH, expires=expired)
    assert c.value.expired == expired


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (503, b"<html>down</html>", "answered HTTP 503"),
        (404, b"{}", "has no KBase auth API"),
        (200, b"<html>a login page</html>", "not JSON"),
        (200, b'{"no": "user"}', "unexpected token record"),
    ],
)
def test_auth_service_trouble(status: int, body: bytes, match: str) -> None:
    with pytest.raises(kbclient.AuthUnavailableError, match=match):
        parse_token(status, body, AUTH)


def test_parse_me() -> None:
    body = json.dumps(
        {"user": "alice", "display": "Alice A", "email": "a@x.org", "customroles": ["r1"]}
    ).encode()
    assert parse_me(200, body, AUTH) == kbclient.UserInfo("alice", "Alice A", "a@x.org", ("r1",))


def test_cache_keeps_answers_for_cachefor_only() -> None:
    now = [0.0]
    cache = TokenCache(clock=lambda: now[0])
    key = token_key(AUTH, TOKEN)
    assert TOKEN not in key
    info = parse_token(200, token_body(cachefor=1000), AUTH)
    cache.put_info(key, info)
    now[0] = 0.9
    assert cache.get_info(key) == info
    now[0] = 1.1
    assert cache.get_info(key) is None
    assert cache.known_expiry(key) == info.expires


def test_cache_never_outlives_the_token() -> None:
    now = [0.0]
    cache = TokenCache(clock=lambda: now[0])
    soon = datetime.now(timezone.utc) + timedelta(seconds=2)
    info = TokenInfo("alice", "Login", "i", soon, soon, timedelta(hours=1), "Used")
    cache.put_info("k", info)
    now[0] = 3.0
    assert cache.get_info("k") is None


def test_spark_url_quotes_the_token_and_never_uses_token_param() -> None:
    url = spark_url(host="spark-{username}.x", port=443, use_ssl=True, token=TOKEN, username="al")
    assert url.startswith("sc://spark-al.x:443/;use_ssl=true;x-kbase-token=")
    assert url.endswith(";user_id=al")
    assert ";token=" not in url and TOKEN not in url
    assert mask_url(url) == "sc://spark-al.x:443/;use_ssl=true;x-kbase-token=***;user_id=al"
    from pyspark.sql.connect.client import DefaultChannelBuilder

    builder = DefaultChannelBuilder(url)
    assert dict(builder.metadata())["x-kbase-token"] == TOKEN
    assert builder.userId == "al" and builder.secure and builder.token is None
    ipv6 = spark_url(host="::1", port=15002, use_ssl=False, token="t", username="al")
    assert DefaultChannelBuilder(ipv6).endpoint == "[::1]:15002"


@dataclass
class FakeStatus:
    name: str


class GrpcLike(Exception):
    """What pyspark raises: a message and a gRPC status code (plain input for translate)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self._code = FakeStatus(code)

    def getGrpcStatusCode(self) -> FakeStatus:
        return self._code


@pytest.mark.parametrize(
    ("code", "message", "error", "waitable", "words"),
    [
        ("UNAUTHENTICATED", "token rejected", kbclient.InvalidTokenError, False, "log in again"),
        (
            "PERMISSION_DENIED",
            "requires a token created with multi-factor authentication",
            kbclient.MFARequiredError,
            False,
            "MFA",
        ),
        ("PERMISSION_DENIED", "nope", kbclient.AuthError, False, "refused access"),
        (
            "UNAVAILABLE",
            "the Spark Connect server of user alice (h:1) did not accept a connection",
            kbclient.SparkServerUnavailableError,
            True,
            "start your Spark server",
        ),
        (
            "UNAVAILABLE",
            "the KBase auth service is unreachable (ConnectError)",
            kbclient.AuthUnavailableError,
            False,
            "try again",
        ),
        (
            "UNAVAILABLE",
            "failed to connect to all addresses; Tls handshake failed",
            kbclient.SparkServerUnavailableError,
            False,
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
        ),
    ],
)
def test_translate(
    code: str, message: str, error: type[Exception], waitable: bool, words: str
) -> None:
    found = translate(
        GrpcLike(code, message + " " + TOKEN),
        target="h:443",
        username="alice",
        token=TOKEN,
        use_ssl=True,
    )
    assert found is not None
    assert type(found.error) is error
    assert found.waitable is waitable
    assert words in str(found.error)
    assert TOKEN not in str(found.error)


def test_translate_leaves_other_errors_alone() -> None:
    args = {"target": "h:1", "username": "a", "token": TOKEN, "use_ssl": False}
    assert translate(GrpcLike("INVALID_ARGUMENT", "bad SQL"), **args) is None  # type: ignore[arg-type]
    assert translate(ValueError("x"), **args) is None  # type: ignore[arg-type]


def daemon_answer(token: str = "DAEMONTOKEN") -> DaemonConnection:  # noqa: S107
    return DaemonConnection(
        profile="prod",
        username="alice",
        token=token,
        auth_url=AUTH,
        spark_host="h",
        spark_port=1,
        use_ssl=True,
        s3_endpoint=None,
        expires=None,
        stale=False,
        token_source="keyring",
    )


def no_daemon(profile: str) -> None:
    return None


def test_token_sources_in_order() -> None:
    env = {"KBASE_AUTH_TOKEN": "ENV1", "KB_AUTH_TOKEN": "ENV2"}
    daemon = lambda profile: daemon_answer()  # noqa: E731
    keyring = lambda profile: "KEYRING"  # noqa: E731
    assert find_token("ARG", "prod", environ=env, fetch=daemon, keyring_reader=keyring).source == (
        "argument"
    )
    found = find_token(None, "prod", environ=env, fetch=daemon, keyring_reader=keyring)
    assert (found.token, found.source) == ("ENV1", "KBASE_AUTH_TOKEN")
    found = find_token(
        None, "prod", environ={"KB_AUTH_TOKEN": " ENV2\n"}, fetch=daemon, keyring_reader=keyring
    )
    assert (found.token, found.source) == ("ENV2", "KB_AUTH_TOKEN")
    found = find_token(None, "prod", environ={}, fetch=daemon, keyring_reader=keyring)
    assert (found.token, found.source) == ("DAEMONTOKEN", "kbdaemon")
    found = find_token(None, "prod", environ={}, fetch=no_daemon, keyring_reader=keyring)
    assert (found.token, found.source) == ("KEYRING", "keyring")
    assert "ARG" not in repr(find_token("ARG", "prod"))


def test_no_token_anywhere_names_what_to_do_and_what_failed() -> None:
    def locked(profile: str) -> str | None:
        raise kbclient.KeyringError("the OS keyring is locked: unlock it")

    def needs_login(profile: str) -> None:
        raise DaemonAnswerError("NEEDS_LOGIN", "no token stored for profile prod")

    with pytest.raises(kbclient.NoTokenError) as caught:
        find_token(None, "prod", environ={"KBASE_AUTH_TOKEN": "  "}, fetch=needs_login,
                   keyring_reader=locked)  # fmt: skip
    text = str(caught.value)
    assert "kbdaemon login" in text and "KBASE_AUTH_TOKEN" in text
    assert "NEEDS_LOGIN" in text and "locked" in text


def test_daemon_reporting_an_expired_token() -> None:
    def expired(profile: str) -> None:
        raise DaemonAnswerError("TOKEN_EXPIRED", "the token of profile prod expired on 2025-01-02")

    with pytest.raises(kbclient.TokenExpiredError, match="expired on 2025-01-02"):
        find_token(None, "prod", environ={}, fetch=expired, keyring_reader=lambda p: None)


def test_unknown_profile_is_a_kbase_error() -> None:
    with pytest.raises(kbclient.ProfileError, match="unknown profile 'nope'; known: appdev, ci"):
        kbclient.get_connection_info(token="T", profile="nope")
