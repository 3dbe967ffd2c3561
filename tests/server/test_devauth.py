"""The dev auth server answers with Auth2's shapes, errors included."""

from __future__ import annotations

import httpx
import pytest

from testbed.auth import DevAuthServer
from tests.conftest import ALICE_TOKEN, EXPIRED_TOKEN, NOMFA_TOKEN


def test_root_names_the_service(dev_auth: DevAuthServer) -> None:
    body = httpx.get(dev_auth.url, timeout=5).json()
    assert body["servicename"] == "Authentication Service"


def test_token_record_has_auth2_fields(dev_auth: DevAuthServer) -> None:
    r = httpx.get(dev_auth.url + "api/V2/token", headers={"Authorization": ALICE_TOKEN}, timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {
        "type",
        "id",
        "created",
        "expires",
        "name",
        "user",
        "custom",
        "cachefor",
        "mfa",
    }
    assert body["user"] == "alice"
    assert body["mfa"] == "Used"
    assert body["cachefor"] == 300_000
    assert body["expires"] > body["created"] > 1_600_000_000_000


def test_mfa_not_used_is_reported(dev_auth: DevAuthServer) -> None:
    r = httpx.get(dev_auth.url + "api/V2/token", headers={"Authorization": NOMFA_TOKEN}, timeout=5)
    assert r.json()["mfa"] == "NotUsed"


@pytest.mark.parametrize("token", ["not-a-token", EXPIRED_TOKEN])
def test_invalid_or_expired_token_is_401_10020(dev_auth: DevAuthServer, token: str) -> None:
    r = httpx.get(dev_auth.url + "api/V2/token", headers={"Authorization": token}, timeout=5)
    assert r.status_code == 401
    error = r.json()["error"]
    assert error["appcode"] == 10020
    assert error["httpstatus"] == "Unauthorized"
    assert error["message"] == "10020 Invalid token"
    assert set(error) == {
        "httpcode",
        "httpstatus",
        "appcode",
        "apperror",
        "message",
        "callid",
        "time",
    }


def test_missing_token_is_400_10010(dev_auth: DevAuthServer) -> None:
    r = httpx.get(dev_auth.url + "api/V2/token", timeout=5)
    assert r.status_code == 400
    assert r.json()["error"]["appcode"] == 10010


def test_me_has_custom_roles(dev_auth: DevAuthServer) -> None:
    dev_auth.write_tokens({"T1": {"user": "dana", "customroles": ["BERDL_USER"]}})
    r = httpx.get(dev_auth.url + "api/V2/me", headers={"Authorization": "T1"}, timeout=5)
    assert r.json()["customroles"] == ["BERDL_USER"]
    assert r.json()["user"] == "dana"


def test_revoked_token_becomes_invalid(dev_auth: DevAuthServer) -> None:
    headers = {"Authorization": ALICE_TOKEN}
    assert httpx.get(dev_auth.url + "api/V2/token", headers=headers, timeout=5).status_code == 200
    dev_auth.write_tokens({})
    assert httpx.get(dev_auth.url + "api/V2/token", headers=headers, timeout=5).status_code == 401


def test_stats_count_requests(dev_auth: DevAuthServer) -> None:
    before = dev_auth.stats().get("token", 0)
    for _ in range(3):
        httpx.get(dev_auth.url + "api/V2/token", headers={"Authorization": ALICE_TOKEN}, timeout=5)
    assert dev_auth.stats()["token"] == before + 3


def test_injected_failure_looks_like_a_5xx(dev_auth: DevAuthServer) -> None:
    dev_auth.set_behaviour(status=503)
    r = httpx.get(dev_auth.url + "api/V2/token", headers={"Authorization": ALICE_TOKEN}, timeout=5)
    assert r.status_code == 503
