"""The daemon holds the S3 keys: the real daemon and CLI, the governance stand-in, real clients.

The daemon's profile points at the governance stand-in (``credentials_url``) and at the
signature-checking Delta Lake Proxy emulator (``s3_upstream``), so a request reaches the data only
if the daemon's S3 proxy re-signed it with the keys the stand-in handed out for the stored token.
boto3 gets its keys through ``credential_process`` from an ``~/.aws/config`` that ``kbdaemon
aws-config --write`` wrote in the test's own HOME; pyarrow, polars, deltalake and DuckDB use the
dummy keys of ``get_connection_info().s3_storage_options()``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from deltalake import DeltaTable, write_deltalake

import kbclient
from kbclient.daemon_api import ExitCode
from testbed.auth import DevAuthServer
from testbed.governance import Governance
from testbed.procs import free_port
from testbed.s3 import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, DeltaLakeProxyEmulator, SeaweedS3
from tests.conftest import ALICE_TOKEN
from tests.daemon.conftest import Kbdaemon
from tests.s3proxy.keys.conftest import NOROLE_TOKEN
from tests.s3proxy.test_clients import duckdb_with_httpfs

pytestmark = pytest.mark.slow

TABLE = pa.table({"id": pa.array(range(3000), pa.int64()), "name": [f"g{i}" for i in range(3000)]})
BLOB = bytes(range(256)) * 600


@pytest.fixture(scope="module")
def lake(seaweed: SeaweedS3) -> dict[str, str]:
    """A blob, a Parquet file and a Delta table, written straight to SeaweedFS."""
    direct = seaweed.client()
    direct.put_object(Bucket=BUCKET, Key="daemonkeys/blob.bin", Body=BLOB)
    options = {
        "AWS_ENDPOINT_URL": seaweed.url,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_ALLOW_HTTP": "true",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
    }
    buffer = pa.BufferOutputStream()
    pq.write_table(TABLE, buffer)
    direct.put_object(
        Bucket=BUCKET, Key="daemonkeys/table.parquet", Body=buffer.getvalue().to_pybytes()
    )
    write_deltalake(f"s3://{BUCKET}/daemonkeys/delta", TABLE, storage_options=options)
    return {"blob": "daemonkeys/blob.bin", "parquet": "daemonkeys/table.parquet"}


@pytest.fixture
def daemon_env(
    isolated_environment: Path,
    keys_auth: DevAuthServer,
    governance: Governance,
    checking_emulator: DeltaLakeProxyEmulator,
) -> Iterator[Kbdaemon]:
    """The kbdaemon CLI with a profile that gets its keys from the stand-in; nothing started."""
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "kbase-spark-connect" / "config.toml"
    runner = Kbdaemon(config_path=config)
    runner.write_config(
        f'[profiles.prod]\nauth_url = "{keys_auth.url}"\n'
        f's3_upstream = "{checking_emulator.url}"\ns3_port = {free_port()}\n'
        f'credentials_url = "{governance.url}"\n'
        '[kbdaemon]\ns3_allow_http_hosts = ["127.0.0.1"]\n'
    )
    try:
        yield runner
    finally:
        runner.stop_all()


def login_and_start(kbdaemon: Kbdaemon, token: str = ALICE_TOKEN) -> None:
    login = kbdaemon("login", "--with-token", "--insecure-storage", input=token + "\n")
    assert login.returncode == 0, login.stderr
    started = kbdaemon("start")
    assert started.returncode == 0, started.stderr


def service_secret(governance: Governance, token: str = ALICE_TOKEN) -> str:
    import httpx

    answer = httpx.get(
        governance.url + "credentials/", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    answer.raise_for_status()
    secret: str = answer.json()["s3_secret_key"]
    return secret


def s3_keys_json(kbdaemon: Kbdaemon, *args: str, exit_code: int = 0) -> dict[str, Any]:
    result = kbdaemon("s3-keys", "--json", *args)
    assert result.returncode == exit_code, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_boto3_gets_its_keys_through_credential_process(
    daemon_env: Kbdaemon, governance: Governance, lake: dict[str, str]
) -> None:
    login_and_start(daemon_env)
    printed = daemon_env("s3-credentials")
    assert printed.returncode == 0, printed.stderr
    creds = json.loads(printed.stdout)
    assert set(creds) == {"Version", "AccessKeyId", "SecretAccessKey", "Expiration"}
    assert creds["Version"] == 1 and creds["AccessKeyId"] == "alice"
    assert creds["SecretAccessKey"] == service_secret(governance)

    written = daemon_env("aws-config", "--write")
    assert written.returncode == 0, written.stderr
    aws_config = (Path.home() / ".aws" / "config").read_text()
    endpoint = daemon_env.status()["profiles"][0]["s3_endpoint"]
    assert f"endpoint_url = {endpoint}\n" in aws_config
    assert "s3-credentials --profile prod" in aws_config and "[profile kbase]" in aws_config
    assert creds["SecretAccessKey"] not in aws_config

    client = boto3.Session(profile_name="kbase").client(
        "s3", config=Config(retries={"max_attempts": 1})
    )
    assert client.get_object(Bucket=BUCKET, Key=lake["blob"])["Body"].read() == BLOB
    client.put_object(Bucket=BUCKET, Key="daemonkeys/from-boto3.bin", Body=b"written")
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="daemonkeys/from-")
    assert [o["Key"] for o in listed["Contents"]] == ["daemonkeys/from-boto3.bin"]

    status = daemon_env("status", "--json")
    keys = json.loads(status.stdout)["profiles"][0]["s3_keys"]
    assert keys["state"] == "fresh" and keys["access_key"] == "alice"
    assert keys["last_error"] is None and keys["fetched_at"] <= time.time()
    shown = daemon_env("s3-keys")
    assert shown.returncode == 0 and "S3 keys fresh" in shown.stdout
    human = daemon_env("status")
    assert "S3 keys:   fresh (access key alice) from http://127.0.0.1:" in human.stdout
    secret = creds["SecretAccessKey"]
    log_text = daemon_env.paths.log_file.read_text()
    for output in (status.stdout, shown.stdout, human.stdout, status.stderr, log_text):
        assert secret not in output


def test_dummy_keys_of_the_storage_options_reach_the_data(
    daemon_env: Kbdaemon, lake: dict[str, str]
) -> None:
    login_and_start(daemon_env)
    options = kbclient.get_connection_info().s3_storage_options()
    assert options.access_key == "kbase-local-proxy"
    assert "re-signed" not in repr(options)

    parquet = f"s3://{BUCKET}/{lake['parquet']}"
    table = pq.read_table(parquet.removeprefix("s3://"), filesystem=options.pyarrow_filesystem())
    assert table.equals(TABLE)
    frame = pl.scan_parquet(parquet, storage_options=options.polars())
    assert frame.filter(pl.col("id") >= 2998).select("id").collect()["id"].to_list() == [
        2998,
        2999,
    ]
    delta = DeltaTable(f"s3://{BUCKET}/daemonkeys/delta", storage_options=options.deltalake())
    assert delta.to_pyarrow_table().sort_by("id").equals(TABLE)
    con = duckdb_with_httpfs()
    con.execute(options.duckdb_secret_sql())
    rows = con.execute("SELECT count(*), max(id) FROM read_parquet(?)", [parquet]).fetchall()
    assert rows == [(3000, 2999)]
    con.close()


def test_rotation_while_a_client_runs(
    daemon_env: Kbdaemon, governance: Governance, lake: dict[str, str]
) -> None:
    login_and_start(daemon_env)
    before = json.loads(daemon_env("s3-credentials").stdout)["SecretAccessKey"]
    endpoint = kbclient.get_connection_info().s3_storage_options()
    client = boto3.client("s3", **endpoint.boto3(), config=Config(s3={"addressing_style": "path"}))
    errors: list[BaseException] = []
    reads = 0
    stop = threading.Event()

    def read() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                assert client.get_object(Bucket=BUCKET, Key=lake["blob"])["Body"].read() == BLOB
                reads += 1
            except BaseException as exc:
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(0.5)
        rotated = daemon_env("s3-keys", "--rotate", "--json")
        time.sleep(0.5)
        at_rotation = reads
        time.sleep(0.5)
    finally:
        stop.set()
        reader.join(30)
    assert rotated.returncode == 0, rotated.stderr
    assert errors == []
    assert reads > at_rotation > 0
    info = json.loads(rotated.stdout)
    assert info["state"] == "fresh" and info["access_key"] == "alice"
    after = json.loads(daemon_env("s3-credentials").stdout)["SecretAccessKey"]
    assert after != before and after == service_secret(governance)
    for output in (rotated.stdout, rotated.stderr, daemon_env.paths.log_file.read_text()):
        assert before not in output and after not in output


def test_service_down_is_a_clear_error_and_the_last_keys_stay(
    daemon_env: Kbdaemon, governance: Governance, lake: dict[str, str]
) -> None:
    login_and_start(daemon_env)
    held = json.loads(daemon_env("s3-credentials").stdout)
    governance.set_status(503)
    rotate = daemon_env("s3-keys", "--rotate")
    assert rotate.returncode == ExitCode.ERROR
    assert "data governance service failed (503" in rotate.stderr
    again = daemon_env("s3-credentials")
    assert again.returncode == 0
    assert json.loads(again.stdout)["SecretAccessKey"] == held["SecretAccessKey"]
    options = kbclient.get_connection_info().s3_storage_options()
    client = boto3.client("s3", **options.boto3(), config=Config(s3={"addressing_style": "path"}))
    assert client.get_object(Bucket=BUCKET, Key=lake["blob"])["Body"].read() == BLOB


def test_service_down_at_the_first_fetch(daemon_env: Kbdaemon, governance: Governance) -> None:
    governance.set_status(503)
    login_and_start(daemon_env)
    result = daemon_env("s3-credentials")
    assert result.returncode == ExitCode.ERROR and result.stdout == ""
    assert "data governance service failed (503" in result.stderr
    keys = s3_keys_json(daemon_env, exit_code=ExitCode.ERROR)
    assert keys["state"] == "none" and keys["last_error_code"] == "S3_KEYS_UNAVAILABLE"
    assert "data governance service failed (503" in keys["last_error"]


def test_a_token_without_access_is_a_clear_error(daemon_env: Kbdaemon) -> None:
    login_and_start(daemon_env, NOROLE_TOKEN)
    result = daemon_env("s3-credentials")
    assert result.returncode == ExitCode.INVALID_TOKEN
    assert "may not use the data lake" in result.stderr and result.stdout == ""
    shown = daemon_env("s3-keys")
    assert shown.returncode == ExitCode.INVALID_TOKEN
    assert "may not use the data lake" in shown.stdout


def test_logout_drops_the_keys_and_a_new_login_brings_them_back(
    daemon_env: Kbdaemon, governance: Governance
) -> None:
    login_and_start(daemon_env)
    deadline = time.monotonic() + 30  # fetched in the background after start, unasked
    while (state := s3_keys_json(daemon_env)["state"]) != "fresh" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state == "fresh"
    assert governance.stats()["get"] > 0
    assert daemon_env("logout").returncode == 0
    assert s3_keys_json(daemon_env)["state"] == "none"
    result = daemon_env("s3-credentials")
    assert result.returncode == ExitCode.NOT_LOGGED_IN
    assert "kbdaemon login --profile prod" in result.stderr
    endpoint = daemon_env.status()["profiles"][0]["s3_endpoint"]
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="dummy",
        aws_secret_access_key="dummy-secret",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    with pytest.raises(ClientError) as refused:
        client.get_object(Bucket=BUCKET, Key="daemonkeys/blob.bin")
    assert refused.value.response["Error"]["Code"] == "S3KeysRefused"
    assert "kbdaemon login --profile prod" in refused.value.response["Error"]["Message"]
    login = daemon_env("login", "--with-token", "--insecure-storage", input=ALICE_TOKEN + "\n")
    assert login.returncode == 0, login.stderr
    back = daemon_env("s3-credentials")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["SecretAccessKey"] == service_secret(governance)


def test_a_credentials_url_added_while_the_daemon_runs_is_used_after_reload(
    daemon_env: Kbdaemon, governance: Governance, lake: dict[str, str]
) -> None:
    configured = daemon_env.config_path.read_text()
    daemon_env.write_config(
        "\n".join(line for line in configured.splitlines() if "credentials_url" not in line)
    )
    login_and_start(daemon_env)
    assert daemon_env("s3-credentials").returncode == ExitCode.ERROR
    options = kbclient.get_connection_info().s3_storage_options()
    client = boto3.client("s3", **options.boto3(), config=Config(s3={"addressing_style": "path"}))
    with pytest.raises(ClientError):  # the emulator passes the dummy signature on to S3
        client.get_object(Bucket=BUCKET, Key=lake["blob"])
    daemon_env.write_config(configured)
    assert daemon_env("reload").returncode == 0
    assert json.loads(daemon_env("s3-credentials").stdout)["AccessKeyId"] == "alice"
    options = kbclient.get_connection_info().s3_storage_options()
    client = boto3.client("s3", **options.boto3(), config=Config(s3={"addressing_style": "path"}))
    assert client.get_object(Bucket=BUCKET, Key=lake["blob"])["Body"].read() == BLOB


def test_env_exports_work_in_a_shell_for_a_real_client(
    daemon_env: Kbdaemon, governance: Governance, lake: dict[str, str]
) -> None:
    login_and_start(daemon_env)
    exports = daemon_env("env")
    assert exports.returncode == 0, exports.stderr
    assert exports.stdout.startswith("# S3 keys of KBase profile prod")
    script = (
        "import boto3, os\n"
        "from botocore.config import Config\n"
        "c = boto3.client('s3', region_name='us-east-1', "
        "config=Config(s3={'addressing_style': 'path'}))\n"
        f"print(len(c.get_object(Bucket='{BUCKET}', Key='{lake['blob']}')['Body'].read()))\n"
        "print(os.environ['S3_SECRET_KEY'] == os.environ['MINIO_SECRET_KEY'])\n"
    )
    ran = subprocess.run(
        ["sh", "-c", f'eval "$1"\nexec "{sys.executable}" -c "$2"', "sh", exports.stdout, script],
        capture_output=True,
        text=True,
        env=daemon_env.env,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == [str(len(BLOB)), "True"]
    variables = dict(
        line.removeprefix("export ").split("=", 1)
        for line in exports.stdout.splitlines()
        if line.startswith("export ")
    )
    assert shlex.split(variables["AWS_SECRET_ACCESS_KEY"]) == [service_secret(governance)]
