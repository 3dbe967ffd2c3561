"""The Auth2 clients against the real dev auth server (`kbproxy dev-auth`) on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest

from kbclient import (
    AuthUnavailableError,
    InvalidTokenError,
    KBaseAuthClient,
    SyncKBaseAuthClient,
    TokenExpiredError,
)
from testbed.auth import DevAuthServer
from testbed.procs import free_port
from tests.client.conftest import CLIENT_TOKENS, SOON_TOKEN
from tests.conftest import ALICE_TOKEN, EXPIRED_TOKEN, NOMFA_TOKEN


async def test_async_token_info_and_me_are_cached(dev_auth: DevAuthServer) -> None:
    before = dev_auth.stats()
    async with KBaseAuthClient(dev_auth.url) as client:
        info = await client.token_info(ALICE_TOKEN)
        assert (info.user, info.mfa, info.type) == ("alice", "Used", "Login")
        assert info.expires is not None and info.expires.tzinfo is not None
        assert info.created.tzinfo is not None and info.cachefor.total_seconds() == 300
        me = await client.me(ALICE_TOKEN)
        assert (me.user, me.display, me.email) == ("alice", "Alice", "alice@example.org")
        for _ in range(5):
            assert await client.token_info(ALICE_TOKEN) == info
            assert await client.me(ALICE_TOKEN) == me
    after = dev_auth.stats()
    assert after.get("token", 0) - before.get("token", 0) == 1
    assert after.get("me", 0) - before.get("me", 0) == 1


async def test_concurrent_cold_calls_make_one_request(dev_auth: DevAuthServer) -> None:
    dev_auth.set_behaviour(delay_ms=200)
    before = dev_auth.stats().get("token", 0)
    async with KBaseAuthClient(dev_auth.url) as client:
        infos = await asyncio.gather(*(client.token_info(NOMFA_TOKEN) for _ in range(10)))
    assert {i.user for i in infos} == {"carol"} and infos[0].mfa == "NotUsed"
    assert dev_auth.stats()["token"] - before == 1


async def test_sync_client_inside_a_running_loop(dev_auth: DevAuthServer) -> None:
    asyncio.get_running_loop()  # a loop runs in this thread, as in Jupyter
    with SyncKBaseAuthClient(dev_auth.url) as client:
        assert client.token_info(ALICE_TOKEN).user == "alice"
        assert client.me(ALICE_TOKEN).email == "alice@example.org"


def test_invalid_token(dev_auth: DevAuthServer) -> None:
    with SyncKBaseAuthClient(dev_auth.url) as client:
        with pytest.raises(InvalidTokenError, match="kbdaemon login") as caught:
            client.token_info("NOT-A-TOKEN-0123456789")
        assert not isinstance(caught.value, TokenExpiredError)
        assert "NOT-A-TOKEN" not in str(caught.value) and "NOT-A-TOKEN" not in repr(caught.value)
        # Auth2 answers an expired token as invalid; with nothing known, it is "invalid".
        with pytest.raises(InvalidTokenError):
            client.token_info(EXPIRED_TOKEN)


def test_token_that_expired_since_it_was_checked_says_when(dev_auth: DevAuthServer) -> None:
    expires_ms = int((time.time() + 1.5) * 1000)
    tokens = {**CLIENT_TOKENS, SOON_TOKEN: {"user": "alice", "mfa": "Used", "expires": expires_ms}}
    dev_auth.write_tokens(tokens)
    with SyncKBaseAuthClient(dev_auth.url) as client:
        info = client.token_info(SOON_TOKEN)
        assert info.expires is not None
        time.sleep(max(0.0, expires_ms / 1000 - time.time()) + 0.1)
        with pytest.raises(TokenExpiredError) as caught:
            client.token_info(SOON_TOKEN)
    assert caught.value.expired == info.expires
    assert info.expires.strftime("expired on %Y-%m-%d %H:%M UTC") in str(caught.value)
    assert SOON_TOKEN not in str(caught.value)


def test_auth_service_failing(dev_auth: DevAuthServer) -> None:
    dev_auth.set_behaviour(status=503)
    with (
        SyncKBaseAuthClient(dev_auth.url) as client,
        pytest.raises(AuthUnavailableError, match="HTTP 503"),
    ):
        client.token_info(ALICE_TOKEN)


def test_auth_service_too_slow(dev_auth: DevAuthServer) -> None:
    dev_auth.set_behaviour(delay_ms=1500)
    with (
        SyncKBaseAuthClient(dev_auth.url, timeout=0.3) as client,
        pytest.raises(AuthUnavailableError, match="did not answer in time"),
    ):
        client.token_info(ALICE_TOKEN)


async def test_auth_service_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    async with KBaseAuthClient(url, timeout=2) as client:
        with pytest.raises(AuthUnavailableError, match="is unreachable") as caught:
            await client.token_info(ALICE_TOKEN)
    assert url in str(caught.value) and ALICE_TOKEN not in str(caught.value)


def test_reprs_hold_no_token(dev_auth: DevAuthServer) -> None:
    with SyncKBaseAuthClient(dev_auth.url) as client:
        info = client.token_info(ALICE_TOKEN)
        assert ALICE_TOKEN not in repr(client) + repr(info) + str(info)
