"""The whole flow through the daemon: a Spark Connect session and S3 reads, no token in sight.

`kbdaemon login` once, `kbdaemon start`; then `create_spark_session()` with no arguments gets the
token from the daemon and runs a query through kbproxy on a real Spark Connect server, and boto3
reads the lake through the S3 proxy at the address `kbdaemon status` reports.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbclient import create_spark_session, get_connection_info
from testbed.auth import DevAuthServer
from testbed.proxy import KbproxyServer, start_kbproxy
from testbed.s3 import BUCKET, s3_client, s3_stack
from testbed.spark import SparkConnectServer
from tests.conftest import ALICE_TOKEN
from tests.daemon.conftest import Kbdaemon

pytestmark = pytest.mark.slow


@pytest.fixture
def kbproxy(
    tmp_path: Path, dev_auth: DevAuthServer, spark_server: SparkConnectServer
) -> Iterator[KbproxyServer]:
    server = start_kbproxy(
        tmp_path / "kbproxy", auth_url=dev_auth.url, backend_map={"alice": spark_server.address}
    )
    try:
        yield server
    finally:
        server.stop()


def test_create_spark_session_gets_its_token_from_the_daemon(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer, kbproxy: KbproxyServer
) -> None:
    kbdaemon.write_config(
        f'[profiles.prod]\nauth_url = "{dev_auth.url}"\nspark_host = "127.0.0.1"\n'
        f"spark_port = {kbproxy.port}\nuse_ssl = false\n"
    )
    login = kbdaemon("login", "--with-token", "--insecure-storage", input=ALICE_TOKEN + "\n")
    assert login.returncode == 0, login.stderr
    # The daemon is the only source: the keyring is the null backend, the token file goes away.
    assert kbdaemon("start").returncode == 0
    kbdaemon.paths.token_file.unlink()
    assert not any(k in os.environ for k in ("KBASE_AUTH_TOKEN", "KB_AUTH_TOKEN"))

    info = get_connection_info()
    assert (info.username, info.port) == ("alice", kbproxy.port)
    assert info.token_source == "kbdaemon (file)"
    spark = create_spark_session()
    try:
        assert spark.range(0, 10, 1, 2).selectExpr("sum(id) AS s").collect()[0]["s"] == 45
    finally:
        spark.stop()
    assert ALICE_TOKEN not in kbdaemon("logs", "-n", "500").stdout


def test_the_s3_proxy_answers_at_the_address_status_reports(
    kbdaemon: Kbdaemon, dev_auth: DevAuthServer, tmp_path: Path
) -> None:
    with s3_stack(tmp_path / "s3") as (s3, emulator):
        s3.client().put_object(Bucket=BUCKET, Key="data/part-0.parquet", Body=b"x" * 100_000)
        front = emulator.front_url.removeprefix("http://")
        kbdaemon.write_config(
            f'[kbdaemon]\ns3_allow_http_hosts = ["{front}"]\n\n'
            f'[profiles.prod]\nauth_url = "{dev_auth.url}"\ns3_upstream = "{emulator.url}"\n'
        )
        login = kbdaemon("login", "--with-token", "--insecure-storage", input=ALICE_TOKEN + "\n")
        assert login.returncode == 0, login.stderr
        assert kbdaemon("start").returncode == 0
        endpoint = kbdaemon.status()["profiles"][0]["s3_endpoint"]
        assert endpoint.startswith("http://127.0.0.1:")
        assert f"S3 proxy:  {endpoint}" in kbdaemon("status").stdout
        assert get_connection_info().s3_endpoint == endpoint

        client = s3_client(endpoint)
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix="data/")
        assert [o["Key"] for o in listed["Contents"]] == ["data/part-0.parquet"]
        # A data-file GET: the upstream redirects to a pre-signed URL, the daemon follows it.
        body = client.get_object(Bucket=BUCKET, Key="data/part-0.parquet")["Body"].read()
        assert body == b"x" * 100_000
        assert kbdaemon("stop").returncode == 0
