"""Fixtures of the S3 key tests: the governance stand-in, a signature-checking emulator.

One `kbproxy dev-auth` of their own (its tokens carry the custom roles the governance service
checks: alice and bob have ``BERDL_USER``, carol has none), the governance stand-in handing out
SeaweedFS identities, and a Delta Lake Proxy emulator in ``forward`` mode that passes client
signatures on to SeaweedFS, so a request signed with a dummy key fails unless the local proxy
re-signs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from testbed.auth import DevAuthServer, start_dev_auth
from testbed.governance import REQUIRED_ROLE, Governance, start_governance
from testbed.s3 import (
    BUCKET,
    DeltaLakeProxyEmulator,
    ProxyProcess,
    SeaweedS3,
    start_emulator,
    start_proxy_process,
    weed_binary,
)
from tests.conftest import ALICE_TOKEN, BOB_TOKEN, EXPIRED_TOKEN, NOMFA_TOKEN, TEST_TOKENS

NOROLE_TOKEN = NOMFA_TOKEN  # carol: a valid token without the data lake role
DUMMY_KEY = "dummy-access-key"
DUMMY_SECRET = "dummy-secret-key-0123456789"


def auth_tokens() -> dict[str, dict[str, Any]]:
    tokens = {token: dict(entry) for token, entry in TEST_TOKENS.items()}
    for token in (ALICE_TOKEN, BOB_TOKEN, EXPIRED_TOKEN):
        tokens[token]["customroles"] = [REQUIRED_ROLE]
    return tokens


@pytest.fixture(scope="session")
def keys_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevAuthServer]:
    server = start_dev_auth(tmp_path_factory.mktemp("keys-auth"), auth_tokens())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def governance_session(
    keys_auth: DevAuthServer, seaweed: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Governance]:
    service = start_governance(
        tmp_path_factory.mktemp("governance"),
        auth_url=keys_auth.url,
        weed=weed_binary(),
        master=seaweed.master,
        bucket=BUCKET,
    )
    yield service
    service.stop()


@pytest.fixture
def governance(governance_session: Governance) -> Iterator[Governance]:
    """The stand-in, answering normally again after the test."""
    yield governance_session
    governance_session.set_status(None)


@pytest.fixture(scope="session")
def checking_emulator(
    seaweed: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DeltaLakeProxyEmulator]:
    emulator = start_emulator(
        tmp_path_factory.mktemp("checking-emulator"), seaweed, check_signatures=True
    )
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def resigning_proxy(
    checking_emulator: DeltaLakeProxyEmulator,
    governance_session: Governance,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    """`kbdaemon s3-proxy --credentials-url`, alice's token, before the checking emulator."""
    proxy = start_proxy_process(
        tmp_path_factory.mktemp("resigning-proxy"),
        checking_emulator.url,
        "--credentials-url",
        governance_session.url,
        env={"KBASE_AUTH_TOKEN": ALICE_TOKEN},
    )
    yield proxy
    proxy.stop()


def dummy_client(endpoint: str) -> Any:
    """A boto3 client with keys S3 has never heard of."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=DUMMY_KEY,
        aws_secret_access_key=DUMMY_SECRET,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
