"""Real S3 clients read the lake through the proxy, with the data compared to what was written.

SeaweedFS checks every signature; the emulator in front of it answers data-file GETs with a 307
to a pre-signed URL, as the Delta Lake Proxy does.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from deltalake import DeltaTable, write_deltalake
from pyarrow import fs as pafs

from testbed.s3 import (
    ACCESS_KEY,
    BUCKET,
    REGION,
    SECRET_KEY,
    DeltaLakeProxyEmulator,
    ProxyProcess,
    SeaweedS3,
)

pytestmark = pytest.mark.slow

BLOB = os.urandom(300_000)
TABLE = pa.table(
    {
        "id": pa.array(range(5000), pa.int64()),
        "name": pa.array([f"genome-{i % 97}" for i in range(5000)]),
        "score": pa.array([i / 7 for i in range(5000)], pa.float64()),
    }
)


def storage_options(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_ALLOW_HTTP": "true",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
    }


def arrow_fs(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        endpoint_override=endpoint.removeprefix("http://"),
        scheme="http",
    )


@pytest.fixture(scope="module")
def lake(seaweed: SeaweedS3) -> dict[str, Any]:
    """Objects written straight to SeaweedFS: a blob, a Parquet file and a Delta table."""
    direct = seaweed.client()
    direct.put_object(Bucket=BUCKET, Key="clients/blob.bin", Body=BLOB)
    pq.write_table(TABLE, f"{BUCKET}/clients/table.parquet", filesystem=arrow_fs(seaweed.url))
    write_deltalake(
        f"s3://{BUCKET}/clients/delta", TABLE, storage_options=storage_options(seaweed.url)
    )
    return {
        "blob": "clients/blob.bin",
        "parquet": "clients/table.parquet",
        "delta": "clients/delta",
    }


def test_boto3_fails_against_the_delta_lake_proxy_directly(
    lake: dict[str, Any], emulator: DeltaLakeProxyEmulator, s3_proxy: ProxyProcess
) -> None:
    direct = ProxyProcess(endpoint=emulator.url, child=s3_proxy.child).client()
    with pytest.raises(ClientError) as failure:
        direct.get_object(Bucket=BUCKET, Key=lake["blob"])
    assert failure.value.response["ResponseMetadata"]["HTTPStatusCode"] == 307
    body = s3_proxy.client().get_object(Bucket=BUCKET, Key=lake["blob"])["Body"].read()
    assert body == BLOB


def test_client_keeping_authorization_on_the_redirect_is_refused_like_s3_does(
    lake: dict[str, Any], emulator: DeltaLakeProxyEmulator
) -> None:
    """What a naive client (the spec's problem) gets: S3 refuses two auth mechanisms."""
    headers = {"Authorization": "AWS4-HMAC-SHA256 Credential=x, SignedHeaders=host, Signature=y"}
    with httpx.Client(follow_redirects=False, timeout=10) as http:
        first = http.get(f"{emulator.url}/{BUCKET}/{lake['blob']}", headers=headers)
        assert first.status_code == 307
        refused = http.get(first.headers["Location"], headers=headers)
        assert refused.status_code == 400
        assert "Only one auth mechanism allowed" in refused.text
        assert http.get(first.headers["Location"]).content == BLOB


def test_boto3_get_range_head_and_list(lake: dict[str, Any], s3_proxy: ProxyProcess) -> None:
    client = s3_proxy.client()
    got = client.get_object(Bucket=BUCKET, Key=lake["blob"])
    assert got["Body"].read() == BLOB
    assert got["ContentLength"] == len(BLOB)
    ranged = client.get_object(Bucket=BUCKET, Key=lake["blob"], Range="bytes=1000-1999")
    assert ranged["Body"].read() == BLOB[1000:2000]
    assert ranged["ContentRange"] == f"bytes 1000-1999/{len(BLOB)}"
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    head = client.head_object(Bucket=BUCKET, Key=lake["blob"])
    assert head["ContentLength"] == len(BLOB)
    assert head["ETag"] == got["ETag"]
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="clients/")
    keys = {o["Key"] for o in listed["Contents"]}
    assert {lake["blob"], lake["parquet"]} <= keys
    assert any(k.startswith("clients/delta/_delta_log/") for k in keys)


def test_boto3_missing_key_is_s3s_own_404(lake: dict[str, Any], s3_proxy: ProxyProcess) -> None:
    with pytest.raises(ClientError) as missing:
        s3_proxy.client().get_object(Bucket=BUCKET, Key="clients/absent.bin")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"


def test_pyarrow_reads_parquet(lake: dict[str, Any], s3_proxy: ProxyProcess) -> None:
    table = pq.read_table(f"{BUCKET}/{lake['parquet']}", filesystem=arrow_fs(s3_proxy.endpoint))
    assert table.equals(TABLE)


def test_polars_scan_parquet(lake: dict[str, Any], s3_proxy: ProxyProcess) -> None:
    options = {k.lower(): v for k, v in storage_options(s3_proxy.endpoint).items()}
    frame = pl.scan_parquet(f"s3://{BUCKET}/{lake['parquet']}", storage_options=options)
    result = frame.filter(pl.col("id") >= 4990).select("id", "name").collect()
    assert result.to_dicts() == [{"id": i, "name": f"genome-{i % 97}"} for i in range(4990, 5000)]


def duckdb_with_httpfs() -> Any:
    """A DuckDB connection with httpfs loaded from the duckdb-ext-httpfs wheel, never downloaded."""
    import importlib.util

    import duckdb

    spec = importlib.util.find_spec("duckdb_ext")
    locations = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(loc) / "extensions" for loc in locations if (Path(loc) / "extensions").is_dir()]
    if not found:
        pytest.fail(
            "DuckDB's httpfs extension is missing: pip install duckdb-ext-httpfs (make venv "
            "installs it); INSTALL httpfs would download it"
        )
    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    con.execute("SET extension_directory = ?", [str(found[0])])
    con.execute("LOAD httpfs")
    return con


def test_duckdb_reads_parquet_with_httpfs(lake: dict[str, Any], s3_proxy: ProxyProcess) -> None:
    con = duckdb_with_httpfs()
    endpoint = s3_proxy.endpoint.removeprefix("http://")
    # The README's snippet, with the test's keys and endpoint.
    con.execute(
        f"""CREATE SECRET lake (TYPE s3, KEY_ID '{ACCESS_KEY}', SECRET '{SECRET_KEY}',
        REGION '{REGION}', ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false)"""
    )
    url = f"s3://{BUCKET}/{lake['parquet']}"
    table = con.execute("SELECT * FROM read_parquet(?) ORDER BY id", [url]).fetch_arrow_table()
    assert table.equals(TABLE)
    query = "SELECT id, name FROM read_parquet(?) WHERE id >= 4998 ORDER BY id"
    rows = con.execute(query, [url]).fetchall()
    assert rows == [(4998, f"genome-{4998 % 97}"), (4999, f"genome-{4999 % 97}")]
    con.close()


def test_deltalake_reads_a_delta_table(lake: dict[str, Any], s3_proxy: ProxyProcess) -> None:
    table = DeltaTable(
        f"s3://{BUCKET}/{lake['delta']}", storage_options=storage_options(s3_proxy.endpoint)
    )
    assert table.version() == 0
    assert table.to_pyarrow_table().sort_by("id").equals(TABLE)


def test_puts_go_through_with_length_or_chunked(seaweed: SeaweedS3, s3_proxy: ProxyProcess) -> None:
    data = os.urandom(200_000)
    s3_proxy.client().put_object(Bucket=BUCKET, Key="clients/put.bin", Body=data)
    direct = seaweed.client()
    assert direct.get_object(Bucket=BUCKET, Key="clients/put.bin")["Body"].read() == data

    def chunks() -> Any:
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    # A chunked body (no Content-Length): the emulator, like the real proxy, re-signs writes.
    response = httpx.put(f"{s3_proxy.endpoint}/{BUCKET}/clients/chunked.bin", content=chunks())
    assert response.status_code == 200, response.text
    stored = direct.get_object(Bucket=BUCKET, Key="clients/chunked.bin")["Body"].read()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
