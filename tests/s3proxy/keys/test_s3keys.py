"""S3 keys from the governance stand-in: the client, the holder's policy, the key source.

The holder is tested with plain numbers for the clock; the client and the source against the
stand-in, whose keys are real SeaweedFS identities (checked by using them at SeaweedFS).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from kbdaemon import exitcodes
from kbdaemon.governance import GovernanceClient
from kbdaemon.s3keys import (
    S3AccessDeniedError,
    S3KeyHolder,
    S3Keys,
    S3KeysError,
    S3KeySource,
    S3KeysTokenRejectedError,
    S3KeysUnavailableError,
    credential_process_json,
)
from testbed.governance import Governance
from testbed.procs import free_port
from testbed.s3 import BUCKET, SeaweedS3
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, EXPIRED_TOKEN
from tests.s3proxy.keys.conftest import NOROLE_TOKEN

KEYS = S3Keys("alice", "secret-one-0123456789", "alice")
OTHER = S3Keys("alice", "secret-two-0123456789", "alice")


def direct_client(seaweed: SeaweedS3, keys: S3Keys) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=seaweed.url,
        aws_access_key_id=keys.access_key,
        aws_secret_access_key=keys.secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


# --- the holder, without I/O --------------------------------------------------------------------


def test_holder_refreshes_on_schedule_and_keeps_keys_until_they_expire() -> None:
    holder = S3KeyHolder(refresh_every=300, keep_for=3600, retry_after=15)
    assert holder.current(0) is None and holder.due(0)
    holder.attempting(0)
    assert holder.fetched(KEYS, 0) is True
    assert holder.current(299) == KEYS and not holder.due(299)
    assert holder.next_wake(100) == 200
    assert holder.due(300)
    holder.attempting(300)
    holder.failed(S3KeysUnavailableError("the service is down"))
    assert not holder.due(310)  # the next attempt waits retry_after
    assert holder.due(315)
    assert holder.current(3599) == KEYS  # the last keys, while the service is down
    assert holder.current(3600) is None
    status = holder.status(3600)
    assert status.state == "expired" and status.last_error_code == "S3_KEYS_UNAVAILABLE"
    assert S3KeySource.fixed(KEYS).status().state == "fresh"
    assert holder.fetched(KEYS, 4000) is False  # the same keys again: no change
    assert holder.fetched(OTHER, 4300) is True


def test_holder_drops_the_keys_when_the_service_refuses_the_token_or_the_account() -> None:
    for error in (S3KeysTokenRejectedError("log in"), S3AccessDeniedError("no role")):
        holder = S3KeyHolder(refresh_every=300, keep_for=3600)
        holder.fetched(KEYS, 0)
        holder.failed(error)
        assert holder.current(301) is None
        status = holder.status(301)
        assert status.state == "none" and status.last_error_code == error.code


def test_holder_marked_stale_refreshes_at_once_and_forcing_is_rate_limited() -> None:
    holder = S3KeyHolder(refresh_every=300, keep_for=3600, min_forced_interval=10)
    holder.fetched(KEYS, 0)
    holder.mark_stale()
    assert holder.due(1) and holder.status(1).state == "due"
    assert holder.may_force(1)
    holder.forcing(1)
    assert not holder.may_force(5) and holder.may_force(11)
    with pytest.raises(ValueError, match="refresh_every"):
        S3KeyHolder(refresh_every=10, keep_for=5)


def test_no_secret_in_reprs_or_status() -> None:
    holder = S3KeyHolder()
    holder.fetched(KEYS, 0)
    source = S3KeySource.fixed(KEYS)
    shown = [repr(KEYS), str(KEYS), repr(holder), repr(source), str(holder.status(1).to_json())]
    assert all(KEYS.secret_key not in text for text in shown), shown
    assert "alice" in repr(KEYS)


def test_keys_from_a_body_that_is_not_the_model() -> None:
    with pytest.raises(ValueError, match="s3_access_key"):
        S3Keys.from_json({"username": "alice", "s3_secret_key": "x"})
    with pytest.raises(ValueError, match="JSON object"):
        S3Keys.from_json(["alice"])


def test_credentials_url_must_be_http() -> None:
    with pytest.raises(S3KeysError, match="http"):
        GovernanceClient("ftp://governance.example.org/?token=secret")


def test_credential_process_output_is_what_botocore_reads(tmp_path: Path) -> None:
    """A real ~/.aws/config whose credential_process prints our JSON; boto3 loads the keys."""
    out = credential_process_json(KEYS, expires_at=time.time() + 3600)
    assert out["Version"] == 1 and out["Expiration"].endswith("Z")
    script = tmp_path / "creds.py"
    script.write_text(f"import json; print(json.dumps({out!r}))")
    config = tmp_path / "config"
    config.write_text(f"[profile kbase]\ncredential_process = {sys.executable} {script}\n")
    session = boto3.Session(profile_name="kbase", botocore_session=_session(config))
    credentials = session.get_credentials().get_frozen_credentials()
    assert (credentials.access_key, credentials.secret_key) == (KEYS.access_key, KEYS.secret_key)
    assert "Expiration" not in credential_process_json(KEYS)


def _session(config: Path) -> Any:
    import botocore.session

    session = botocore.session.Session()
    session.set_config_variable("config_file", str(config))
    session.set_config_variable("credentials_file", str(config.with_name("credentials")))
    return session


# --- the client against the stand-in ------------------------------------------------------------


@pytest.mark.slow
async def test_fetch_gives_a_working_seaweedfs_identity_and_rotation_replaces_it(
    governance: Governance, seaweed: SeaweedS3
) -> None:
    client = GovernanceClient(governance.url)
    try:
        first = await client.fetch(BOB_TOKEN)
        again = await client.fetch(BOB_TOKEN)
        assert first == again  # the same keys until rotated, as the service does
        assert (first.username, first.access_key) == ("bob", "bob")
        direct_client(seaweed, first).put_object(Bucket=BUCKET, Key="keys/bob.txt", Body=b"b")
        rotated = await client.rotate(BOB_TOKEN)
        assert rotated.access_key == "bob" and rotated.secret_key != first.secret_key
        assert await client.fetch(BOB_TOKEN) == rotated
        got = direct_client(seaweed, rotated).get_object(Bucket=BUCKET, Key="keys/bob.txt")
        assert got["Body"].read() == b"b"
        with pytest.raises(ClientError) as refused:
            direct_client(seaweed, first).get_object(Bucket=BUCKET, Key="keys/bob.txt")
        assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    finally:
        await client.close()


@pytest.mark.slow
async def test_the_service_error_shapes_of_the_real_service(governance: Governance) -> None:
    """The stand-in answers the real service's error bodies (what the client parses)."""
    async with httpx.AsyncClient(base_url=governance.url) as http:
        none = await http.get("credentials/")
        assert none.status_code == 401 and none.json()["error"] == 10010
        basic = await http.get("credentials/", headers={"Authorization": "Basic abc"})
        assert basic.status_code == 401 and basic.json()["error"] == 10030
        bad = await http.get("credentials/", headers={"Authorization": "Bearer nope"})
        assert bad.json() == {
            "error": 10020,
            "error_type": "Invalid token",
            "message": "KBase auth server reported token is invalid.",
        }
        norole = await http.get("credentials/", headers={"Authorization": f"Bearer {NOROLE_TOKEN}"})
        assert norole.status_code == 403 and norole.json()["error"] == 10040
        slash = await http.get("credentials")
        assert slash.status_code == 307 and slash.headers["Location"] == "/credentials/"


@pytest.mark.slow
async def test_a_token_without_access_and_a_bad_token_give_clear_errors(
    governance: Governance,
) -> None:
    client = GovernanceClient(governance.url)
    try:
        with pytest.raises(S3AccessDeniedError) as denied:
            await client.fetch(NOROLE_TOKEN)
        assert "may not use the data lake" in denied.value.message
        assert denied.value.exit_code == exitcodes.INVALID_TOKEN
        for token in ("not-a-token", EXPIRED_TOKEN):
            with pytest.raises(S3KeysTokenRejectedError) as rejected:
                await client.fetch(token)
            assert "kbdaemon login" in rejected.value.message
            assert token not in rejected.value.message
        assert NOROLE_TOKEN not in denied.value.message
    finally:
        await client.close()


@pytest.mark.slow
async def test_service_failing_or_unreachable_is_unavailable(governance: Governance) -> None:
    client = GovernanceClient(governance.url)
    down = GovernanceClient(f"http://127.0.0.1:{free_port()}/")
    try:
        governance.set_status(503)
        with pytest.raises(S3KeysUnavailableError, match="failed \\(503"):
            await client.fetch(ALICE_TOKEN)
        with pytest.raises(S3KeysUnavailableError, match="cannot reach") as unreachable:
            await down.fetch(ALICE_TOKEN)
        assert ALICE_TOKEN not in unreachable.value.message
    finally:
        await client.close()
        await down.close()


@pytest.mark.slow
async def test_source_keeps_the_last_keys_while_the_service_is_down_until_they_expire(
    governance: Governance,
) -> None:
    now = [1000.0]
    client = GovernanceClient(governance.url)
    holder = S3KeyHolder(refresh_every=60, keep_for=600, retry_after=5)
    source = S3KeySource(lambda: client.fetch(ALICE_TOKEN), holder=holder, clock=lambda: now[0])
    try:
        keys = await source.get()
        assert keys.access_key == "alice"
        governance.set_status(500)
        now[0] += 120  # due: a background refresh fails, the held keys are answered
        assert await source.get() == keys
        with pytest.raises(S3KeysUnavailableError):
            await source.refresh()
        assert holder.status(now[0]).last_error_code == "S3_KEYS_UNAVAILABLE"
        now[0] += 600  # past keep_for: no keys, the service's failure is the error
        with pytest.raises(S3KeysUnavailableError, match="failed \\(500"):
            await source.get()
        governance.set_status(None)
        now[0] += 10
        assert await source.get() == keys
        assert holder.status(now[0]).state == "fresh"
    finally:
        await source.close()
        await client.close()
