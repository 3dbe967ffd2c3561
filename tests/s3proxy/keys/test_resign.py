"""Re-signing in the local S3 proxy: clients with DUMMY keys, S3 checking every signature.

The emulator here passes each client signature on to SeaweedFS (the Delta Lake Proxy's
``forward`` mode), so a request reaches the data only if the local proxy re-signed it with the
keys the governance stand-in handed out for alice's token.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from deltalake import DeltaTable, write_deltalake
from multidict import CIMultiDict
from pyarrow import fs as pafs
from yarl import URL

from kbdaemon import _redirects as rd
from kbdaemon import exitcodes
from kbdaemon.governance import GovernanceClient
from kbdaemon.s3keys import S3KeyHolder, S3Keys, S3KeySource
from kbdaemon.s3proxy import S3Proxy
from testbed.auth import DevAuthServer
from testbed.governance import Governance
from testbed.procs import free_port
from testbed.s3 import (
    ACCESS_KEY,
    BUCKET,
    REGION,
    SECRET_KEY,
    DeltaLakeProxyEmulator,
    ProxyProcess,
    SeaweedS3,
    start_proxy_process,
)
from tests.conftest import ALICE_TOKEN, BOB_TOKEN
from tests.s3proxy.keys.conftest import (
    DUMMY_KEY,
    DUMMY_SECRET,
    NOROLE_TOKEN,
    auth_tokens,
    dummy_client,
)
from tests.s3proxy.test_failures import s3_error

BLOB = bytes(range(256)) * 1200
TABLE = pa.table({"id": pa.array(range(2000), pa.int64()), "name": [f"g{i}" for i in range(2000)]})


def dummy_options(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": DUMMY_KEY,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
        "AWS_REGION": REGION,
        "AWS_ALLOW_HTTP": "true",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
    }


def dummy_arrow(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key=DUMMY_KEY,
        secret_key=DUMMY_SECRET,
        region=REGION,
        endpoint_override=endpoint.removeprefix("http://"),
        scheme="http",
    )


def current_secret(governance: Governance) -> str:
    response = httpx.get(
        governance.url + "credentials/",
        headers={"Authorization": f"Bearer {ALICE_TOKEN}"},
        timeout=30,
    )
    response.raise_for_status()
    secret: str = response.json()["s3_secret_key"]
    return secret


# --- the signing decision, without sockets ------------------------------------------------------


def test_resign_replaces_the_clients_signature_and_keeps_its_body_hash() -> None:
    keys = S3Keys("alice", "a-secret-0123456789")
    client = CIMultiDict(
        {
            "Authorization": "AWS4-HMAC-SHA256 Credential=dummy/20260101/us-east-1/s3/aws4_request,"
            " SignedHeaders=host, Signature=00",
            "X-Amz-Date": "20260101T000000Z",
            "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD",
            "x-amz-checksum-mode": "ENABLED",
            "Range": "bytes=0-9",
            "User-Agent": "test",
        }
    )
    signed = rd.resign(
        client, method="GET", url=URL("http://dlp.example:8080/lake/a.bin"), keys=keys, region="r1"
    )
    assert isinstance(signed, CIMultiDict)
    auth = signed["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=alice/")
    assert "/r1/s3/aws4_request" in auth
    assert "SignedHeaders=host;range;x-amz-checksum-mode;x-amz-content-sha256;x-amz-date," in auth
    assert signed["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    assert signed["X-Amz-Date"] != "20260101T000000Z"
    assert signed["User-Agent"] == "test" and len(signed.getall("Authorization")) == 1
    assert keys.secret_key not in str(signed)


def test_resign_refuses_signed_chunks_and_leaves_presigned_requests_alone() -> None:
    keys = S3Keys("alice", "a-secret-0123456789")
    chunked = CIMultiDict({"X-Amz-Content-SHA256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"})
    refusal = rd.resign(chunked, method="PUT", url=URL("http://d/lake/k"), keys=keys, region="r")
    assert isinstance(refusal, rd.Refusal) and refusal.status == 501
    assert "chunked signing off" in refusal.message
    presigned = URL("http://d/lake/k?X-Amz-Signature=abc&X-Amz-Credential=x")
    plain = CIMultiDict({"Range": "bytes=0-1"})
    assert rd.resign(plain, method="GET", url=presigned, keys=keys, region="r") == plain


# --- real clients with dummy keys ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lake(seaweed: SeaweedS3) -> dict[str, str]:
    direct = seaweed.client()
    direct.put_object(Bucket=BUCKET, Key="resign/blob.bin", Body=BLOB)
    pq.write_table(TABLE, f"{BUCKET}/resign/table.parquet", filesystem=_admin_arrow(seaweed))
    options = {
        "AWS_ENDPOINT_URL": seaweed.url,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_ALLOW_HTTP": "true",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
    }
    write_deltalake(f"s3://{BUCKET}/resign/delta", TABLE, storage_options=options)
    return {"blob": "resign/blob.bin", "parquet": "resign/table.parquet", "delta": "resign/delta"}


def _admin_arrow(seaweed: SeaweedS3) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        endpoint_override=seaweed.url.removeprefix("http://"),
        scheme="http",
    )


@pytest.mark.slow
def test_dummy_keys_fail_without_resigning(
    lake: dict[str, str], checking_emulator: DeltaLakeProxyEmulator, tmp_path: Path
) -> None:
    """The control: the same dummy keys through a proxy that forwards the client's signature."""
    plain = start_proxy_process(tmp_path, checking_emulator.url)
    try:
        with pytest.raises(ClientError) as refused:
            dummy_client(plain.endpoint).get_object(Bucket=BUCKET, Key=lake["blob"])
        assert refused.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    finally:
        plain.stop()


@pytest.mark.slow
def test_boto3_with_dummy_keys_reads_lists_and_writes(
    lake: dict[str, str], resigning_proxy: ProxyProcess, seaweed: SeaweedS3
) -> None:
    client = dummy_client(resigning_proxy.endpoint)
    assert client.get_object(Bucket=BUCKET, Key=lake["blob"])["Body"].read() == BLOB
    ranged = client.get_object(Bucket=BUCKET, Key=lake["blob"], Range="bytes=100-199")
    assert ranged["Body"].read() == BLOB[100:200]
    assert client.head_object(Bucket=BUCKET, Key=lake["blob"])["ContentLength"] == len(BLOB)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="resign/")
    assert lake["blob"] in {o["Key"] for o in listed["Contents"]}
    client.put_object(Bucket=BUCKET, Key="resign/put.bin", Body=BLOB[:5000])
    stored = seaweed.client().get_object(Bucket=BUCKET, Key="resign/put.bin")["Body"].read()
    assert stored == BLOB[:5000]
    odd = "resign/a key+with spaces,ünïcode&(sign)=x~*.bin"
    client.put_object(Bucket=BUCKET, Key=odd, Body=b"odd")
    assert client.get_object(Bucket=BUCKET, Key=odd)["Body"].read() == b"odd"
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="resign/a key+", Delimiter="/")
    assert [o["Key"] for o in listed["Contents"]] == [odd]
    with pytest.raises(ClientError) as missing:
        client.get_object(Bucket=BUCKET, Key="resign/absent.bin")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"


@pytest.mark.slow
def test_pyarrow_polars_and_deltalake_with_dummy_keys(
    lake: dict[str, str], resigning_proxy: ProxyProcess
) -> None:
    endpoint = resigning_proxy.endpoint
    table = pq.read_table(f"{BUCKET}/{lake['parquet']}", filesystem=dummy_arrow(endpoint))
    assert table.equals(TABLE)
    options = {k.lower(): v for k, v in dummy_options(endpoint).items()}
    frame = pl.scan_parquet(f"s3://{BUCKET}/{lake['parquet']}", storage_options=options)
    assert frame.filter(pl.col("id") >= 1998).select("id").collect()["id"].to_list() == [1998, 1999]
    delta = DeltaTable(f"s3://{BUCKET}/{lake['delta']}", storage_options=dummy_options(endpoint))
    assert delta.to_pyarrow_table().sort_by("id").equals(TABLE)
    write_deltalake(
        f"s3://{BUCKET}/resign/delta-written", TABLE, storage_options=dummy_options(endpoint)
    )
    written = DeltaTable(
        f"s3://{BUCKET}/resign/delta-written", storage_options=dummy_options(endpoint)
    )
    assert written.version() == 0 and written.to_pyarrow_table().num_rows == TABLE.num_rows


@pytest.mark.slow
def test_rotation_while_a_client_reads(
    lake: dict[str, str], resigning_proxy: ProxyProcess, governance: Governance
) -> None:
    """Keys rotated at the service mid-run: the proxy notices S3's refusal and re-signs."""
    client = dummy_client(resigning_proxy.endpoint)
    failures: list[BaseException] = []
    reads = [0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                body = client.get_object(Bucket=BUCKET, Key=lake["blob"], Range="bytes=0-999")
                assert body["Body"].read() == BLOB[:1000]
                reads[0] += 1
            except BaseException as exc:
                failures.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        while reads[0] < 5 and thread.is_alive():
            time.sleep(0.05)
        before = reads[0]
        rotated = governance.rotate(ALICE_TOKEN)
        deadline = time.monotonic() + 30
        while reads[0] < before + 10 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures
    assert reads[0] >= before + 10
    assert "S3 refused the keys; sending again with new ones" in resigning_proxy.child.log_text()
    assert rotated["s3_secret_key"] == current_secret(governance)


@pytest.mark.slow
def test_service_down_keeps_the_last_keys(
    lake: dict[str, str], resigning_proxy: ProxyProcess, governance: Governance
) -> None:
    client = dummy_client(resigning_proxy.endpoint)
    assert client.get_object(Bucket=BUCKET, Key=lake["blob"])["Body"].read() == BLOB
    governance.set_status(503)
    assert client.get_object(Bucket=BUCKET, Key=lake["blob"])["Body"].read() == BLOB
    assert client.head_object(Bucket=BUCKET, Key=lake["blob"])["ContentLength"] == len(BLOB)


@pytest.mark.slow
def test_service_down_without_keys_is_a_clear_s3_error(
    lake: dict[str, str], checking_emulator: DeltaLakeProxyEmulator, tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/"
    proxy = start_proxy_process(
        tmp_path,
        checking_emulator.url,
        "--credentials-url",
        nowhere,
        env={"KBASE_AUTH_TOKEN": ALICE_TOKEN},
    )
    try:
        with pytest.raises(ClientError) as failed:
            dummy_client(proxy.endpoint).head_object(Bucket=BUCKET, Key=lake["blob"])
        assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        with pytest.raises(ClientError) as failed:
            dummy_client(proxy.endpoint).get_object(Bucket=BUCKET, Key=lake["blob"])
        assert failed.value.response["Error"]["Code"] == "S3KeysUnavailable"
        assert (
            "cannot reach the data governance service" in failed.value.response["Error"]["Message"]
        )
        log = proxy.child.log_text()
        assert "warning: cannot reach the data governance service" in log
        assert ALICE_TOKEN not in log
    finally:
        proxy.stop()


@pytest.mark.slow
def test_a_token_without_access_stops_the_proxy_with_a_clear_message(
    governance: Governance, checking_emulator: DeltaLakeProxyEmulator
) -> None:
    argv = [sys.executable, "-m", "kbdaemon", "s3-proxy", "--upstream", checking_emulator.url]
    argv += ["--credentials-url", governance.url]
    env = {"KBASE_AUTH_TOKEN": NOROLE_TOKEN, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == exitcodes.INVALID_TOKEN
    assert "may not use the data lake" in done.stderr and "BERDL" in done.stderr
    assert NOROLE_TOKEN not in done.stderr + done.stdout


def test_credentials_url_needs_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    from kbdaemon.cli import main

    code = main(["s3-proxy", "--upstream", "https://dlp.example.org", "--credentials-url", "x"])
    assert code == exitcodes.USAGE
    assert "KBASE_AUTH_TOKEN" in capsys.readouterr().err


def test_key_env_options_name_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kbdaemon.cli import main

    base = ["s3-proxy", "--upstream", "https://dlp.example.org"]
    assert main([*base, "--access-key-env", "MY_KEY"]) == exitcodes.USAGE
    assert "--secret-key-env" in capsys.readouterr().err
    monkeypatch.setenv("MY_KEY", "k")
    code = main([*base, "--access-key-env", "MY_KEY", "--secret-key-env", "MY_SECRET"])
    assert code == exitcodes.USAGE
    assert "MY_SECRET is empty or not set" in capsys.readouterr().err


@pytest.mark.slow
def test_static_keys_from_the_environment(
    lake: dict[str, str],
    checking_emulator: DeltaLakeProxyEmulator,
    governance: Governance,
    tmp_path: Path,
) -> None:
    secret = current_secret(governance)
    proxy = start_proxy_process(
        tmp_path,
        checking_emulator.url,
        "--access-key-env",
        "LAKE_KEY",
        "--secret-key-env",
        "LAKE_SECRET",
        env={"LAKE_KEY": "alice", "LAKE_SECRET": secret},
    )
    try:
        got = dummy_client(proxy.endpoint).get_object(Bucket=BUCKET, Key=lake["blob"])
        assert got["Body"].read() == BLOB
        assert secret not in proxy.child.log_text()
    finally:
        proxy.stop()


@pytest.mark.slow
def test_the_secret_is_in_no_log_of_the_proxy(
    lake: dict[str, str], resigning_proxy: ProxyProcess, governance: Governance
) -> None:
    dummy_client(resigning_proxy.endpoint).get_object(Bucket=BUCKET, Key=lake["blob"])
    log = resigning_proxy.child.log_text()
    assert "re-signing" in log
    assert current_secret(governance) not in log
    assert ALICE_TOKEN not in log


@pytest.mark.slow
async def test_a_token_revoked_mid_run_drops_the_keys(
    lake: dict[str, str],
    checking_emulator: DeltaLakeProxyEmulator,
    governance: Governance,
    keys_auth: DevAuthServer,
) -> None:
    """An unsigned client through an in-process proxy; bob's token revoked, the keys go."""
    now = [time.time()]
    client = GovernanceClient(governance.url)
    holder = S3KeyHolder(refresh_every=60, keep_for=3600, retry_after=0)
    source = S3KeySource(lambda: client.fetch(BOB_TOKEN), holder=holder, clock=lambda: now[0])
    proxy = S3Proxy(upstream=checking_emulator.url, allow_http_hosts=["127.0.0.1"], keys=source)
    await proxy.start()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            url = f"{proxy.endpoint}/{BUCKET}/{lake['blob']}"
            assert (await http.get(url)).content == BLOB  # no signature at all: re-signed
            keys_auth.write_tokens({t: e for t, e in auth_tokens().items() if t != BOB_TOKEN})
            now[0] += 120  # a refresh is due: it runs in the background, the old keys serve
            assert (await http.get(url)).content == BLOB
            deadline = time.monotonic() + 20
            while source.status().state != "none":
                assert time.monotonic() < deadline, source.status()
                await asyncio.sleep(0.05)
            refused = await http.get(url)
            assert refused.status_code == 403
            error = s3_error(refused)
            assert error["Code"] == "S3KeysRefused"
            assert "kbdaemon login" in error["Message"]
            assert BOB_TOKEN not in refused.text
    finally:
        keys_auth.write_tokens(auth_tokens())
        await proxy.close()
        await source.close()
        await client.close()
