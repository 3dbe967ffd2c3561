"""Failures reach S3 clients as S3-style errors; S3's own errors pass through; refusals."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import httpx
import pytest
from botocore.exceptions import ClientError

from kbdaemon import S3Proxy, S3ProxyError, exitcodes
from testbed.procs import free_port
from testbed.s3 import BUCKET, DeltaLakeProxyEmulator, ProxyProcess, SeaweedS3

pytestmark = pytest.mark.slow

KEY = "failures/object.bin"
DATA = b"failure tests " * 1000


@pytest.fixture(scope="module", autouse=True)
def _object(seaweed: SeaweedS3) -> None:
    seaweed.client().put_object(Bucket=BUCKET, Key=KEY, Body=DATA)


def s3_error(response: httpx.Response) -> dict[str, str]:
    root = ET.fromstring(response.content)  # noqa: S314 - the proxy under test, on loopback
    assert root.tag == "Error"
    return {child.tag: child.text or "" for child in root}


def get(proxy: ProxyProcess, path: str = f"/{BUCKET}/{KEY}", **kw: object) -> httpx.Response:
    return httpx.get(proxy.endpoint + path, timeout=30, **kw)  # type: ignore[arg-type]


def test_upstream_500_is_passed_through(
    emulator: DeltaLakeProxyEmulator, s3_proxy: ProxyProcess
) -> None:
    emulator.set_mode("status500")
    with pytest.raises(ClientError) as failure:
        s3_proxy.client().get_object(Bucket=BUCKET, Key=KEY)
    assert failure.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert failure.value.response["Error"]["Code"] == "InternalError"


def test_expired_presigned_url_gives_s3s_own_403(
    emulator: DeltaLakeProxyEmulator, s3_proxy: ProxyProcess
) -> None:
    emulator.set_mode("expired")
    with pytest.raises(ClientError) as failure:
        s3_proxy.client().get_object(Bucket=BUCKET, Key=KEY)
    error = failure.value.response["Error"]
    assert failure.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert error["Code"] == "AccessDenied"
    assert "expired" in error["Message"]


@pytest.mark.parametrize(
    ("mode", "code"),
    [("loop", "RedirectLoop"), ("chain", "TooManyRedirects"), ("malformed", "MalformedRedirect")],
)
def test_bad_redirects_are_502_s3_errors(
    emulator: DeltaLakeProxyEmulator, s3_proxy: ProxyProcess, mode: str, code: str
) -> None:
    emulator.set_mode(mode)
    response = get(s3_proxy)
    assert response.status_code == 502
    error = s3_error(response)
    assert error["Code"] == code
    assert error["RequestId"] == response.headers["x-amz-request-id"]
    assert "Signature" not in response.text
    with pytest.raises(ClientError) as failure:  # what an SDK user sees
        s3_proxy.client().get_object(Bucket=BUCKET, Key=KEY)
    assert failure.value.response["Error"]["Code"] == code


def test_redirect_to_a_non_presigned_url_is_returned_unchanged(
    emulator: DeltaLakeProxyEmulator, s3_proxy: ProxyProcess
) -> None:
    emulator.set_mode("plain_redirect")
    response = get(s3_proxy)
    assert response.status_code == 307
    assert response.headers["Location"] == f"{emulator.url}/elsewhere/{BUCKET}/{KEY}"


def test_foreign_host_header_is_refused(s3_proxy: ProxyProcess) -> None:
    response = get(s3_proxy, headers={"Host": f"rebound.example.org:{s3_proxy.port}"})
    assert response.status_code == 403
    assert s3_error(response)["Code"] == "HostNotAllowed"
    assert get(s3_proxy, headers={"Host": f"localhost:{s3_proxy.port}"}).content == DATA


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_absolute_form_uri_to_another_host_is_refused(s3_proxy: ProxyProcess) -> None:
    foreign = raw_request(
        s3_proxy.port,
        f"GET http://example.org/{BUCKET}/{KEY} HTTP/1.1\r\nHost: example.org\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert foreign.startswith(b"HTTP/1.1 403")
    assert b"<Code>AbsoluteUriRefused</Code>" in foreign
    own = f"127.0.0.1:{s3_proxy.port}"
    mine = raw_request(
        s3_proxy.port,
        f"GET http://{own}/{BUCKET}/{KEY} HTTP/1.1\r\nHost: {own}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert mine.startswith(b"HTTP/1.1 200")
    assert mine.endswith(DATA)


def _logged(proxy: ProxyProcess, line: str, seconds: float = 10) -> str:
    """The proxy's log once it holds ``line``."""
    deadline = time.monotonic() + seconds
    while line not in (log := proxy.child.log_text()):
        assert time.monotonic() < deadline, f"the proxy did not log {line!r}"
        time.sleep(0.05)
    return log


def test_secrets_never_reach_the_log(s3_proxy: ProxyProcess) -> None:
    # the body read to its end: the request is complete, and logged, before the client leaves
    got = s3_proxy.client().get_object(Bucket=BUCKET, Key=KEY, Range="bytes=0-9")
    assert got["Body"].read() == DATA[:10]
    log = _logged(s3_proxy, f"GET /{BUCKET}/{KEY} -> 206, 10 bytes")
    for secret in ("X-Amz-Signature", "X-Amz-Credential", "Authorization", "AWS4-HMAC-SHA256"):
        assert secret not in log


def test_a_client_that_leaves_early_is_logged(
    emulator: DeltaLakeProxyEmulator, s3_proxy: ProxyProcess
) -> None:
    emulator.set_mode("slow")  # the upstream answers after 5 s
    with socket.create_connection(("127.0.0.1", s3_proxy.port), timeout=10) as sock:
        host = f"127.0.0.1:{s3_proxy.port}"
        sock.sendall(f"GET /{BUCKET}/{KEY} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        time.sleep(0.5)
    _logged(s3_proxy, f"GET /{BUCKET}/{KEY}: cut off before the upstream answered")


async def test_unreachable_upstream_is_502() -> None:
    proxy = S3Proxy(upstream=f"http://127.0.0.1:{free_port()}", connect_timeout=5)
    await proxy.start()
    try:
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{proxy.endpoint}/{BUCKET}/{KEY}")
        assert response.status_code == 502
        assert s3_error(response)["Code"] == "UpstreamUnreachable"
    finally:
        await proxy.close()


async def test_upstream_timeout_is_504(emulator: DeltaLakeProxyEmulator) -> None:
    emulator.set_mode("slow")
    proxy = S3Proxy(upstream=emulator.url, read_timeout=0.5)
    await proxy.start()
    try:
        async with httpx.AsyncClient() as http:
            response = await http.head(f"{proxy.endpoint}/{BUCKET}/{KEY}")
            assert response.status_code == 504
            assert response.headers["x-amz-request-id"]
            response = await http.get(f"{proxy.endpoint}/{BUCKET}/{KEY}")
            assert s3_error(response)["Code"] == "UpstreamTimeout"
    finally:
        await proxy.close()


async def test_port_in_use_and_bad_settings_raise_clear_errors() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proxy = S3Proxy(upstream="https://dlp.example.org", port=port)
        with pytest.raises(S3ProxyError, match="in use"):
            await proxy.start()
        await proxy.close()
    with pytest.raises(S3ProxyError, match="--allow-remote"):
        S3Proxy(upstream="https://dlp.example.org", host="0.0.0.0")
    with pytest.raises(S3ProxyError, match="upstream must be"):
        S3Proxy(upstream="dlp.example.org")
    assert "Signature" not in repr(S3Proxy(upstream="https://dlp.example.org"))


def test_cli_reports_a_taken_port_with_its_exit_code() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                *(sys.executable, "-m", "kbdaemon", "s3-proxy"),
                *("--upstream", "https://dlp.example.org", "--listen", f"127.0.0.1:{port}"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == exitcodes.PORT_IN_USE
    assert "in use" in result.stderr
