"""A stand-in of the data governance service (the MinIO manager service) for tests.

The shapes are those of github.com/BERDataLakehouse/minio_manager_service (commit b231f6dc):

- ``GET /credentials/`` and ``POST /credentials/rotate`` answer 200
  ``{"username", "s3_access_key", "s3_secret_key", "polaris_client_id", "polaris_client_secret"}``;
  ``/credentials`` without the slash is a 307 to it, as FastAPI's redirect_slashes does;
- the KBase token comes as ``Authorization: Bearer <token>`` and is checked against Auth2's
  ``api/V2/me`` (here `kbproxy dev-auth`), which must list the required custom role;
- errors are ``{"error": code, "error_type": text, "message": text}``: 401 10010 no header,
  401 10030 not Bearer, 401 10020 invalid token, 403 10040 role missing, 500 with ``error`` null
  for anything else (the auth server failing, say).

Unlike the real service it keeps no token cache (a revoked token is refused at once) and no
database: keys live in memory. The keys are those of a real SeaweedFS identity: the stand-in
writes each user's identity (access key = the username, as the real service does, and a random
secret) into SeaweedFS's identity configuration with ``weed shell s3.configure``; a rotation
replaces the secret there, so the old one stops working at S3.

``POST /_standin/behaviour`` (``{"status": 503}`` or ``{"status": null}``) makes the service
fail; ``GET /_standin/stats`` counts the calls. Neither exists on the real service.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from testbed.procs import ChildProcess

REQUIRED_ROLE = "BERDL_USER"
_ERR_NO_TOKEN = (10010, "No authentication token")
_ERR_INVALID_TOKEN = (10020, "Invalid token")
_ERR_BAD_HEADER = (10030, "Invalid authentication header")
_ERR_MISSING_ROLE = (10040, "Missing required role")


def _error(status: int, code: tuple[int, str] | None, message: str) -> web.Response:
    body = {
        "error": code[0] if code else None,
        "error_type": code[1] if code else None,
        "message": message,
    }
    return web.json_response(body, status=status)


class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


SetIdentity = Callable[[str, str, str], Awaitable[None]]


class GovernanceStandIn:
    """The stand-in's aiohttp app and its state.

    Args:
        auth_url: the Auth2 URL (ends with a slash).
        set_identity: ``(user, access_key, secret)`` makes that the user's S3 identity.
        required_role: the custom role a user must have.
    """

    def __init__(
        self, *, auth_url: str, set_identity: SetIdentity, required_role: str = REQUIRED_ROLE
    ) -> None:
        self.auth_url = auth_url if auth_url.endswith("/") else auth_url + "/"
        self.set_identity = set_identity
        self.required_role = required_role
        self.keys: dict[str, tuple[str, str]] = {}
        self.status: int | None = None
        self.stats = {"get": 0, "rotate": 0}
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/credentials/", self._get)
        app.router.add_post("/credentials/rotate", self._rotate)
        app.router.add_get("/credentials", self._slash)
        app.router.add_post("/_standin/behaviour", self._behaviour)
        app.router.add_get("/_standin/stats", self._stats)
        app.cleanup_ctx.append(self._session_ctx)
        return app

    async def _session_ctx(self, app: web.Application) -> Any:
        self._session = aiohttp.ClientSession()
        yield
        await self._session.close()

    async def _slash(self, request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/credentials/")

    async def _behaviour(self, request: web.Request) -> web.Response:
        status = (await request.json()).get("status")
        self.status = int(status) if status is not None else None
        return web.json_response({"status": self.status})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def _get(self, request: web.Request) -> web.Response:
        self.stats["get"] += 1
        try:
            user = await self._user(request)
            async with self._lock:
                if user not in self.keys:
                    await self._new_secret(user)
        except _Refused as refused:
            return refused.response
        return self._answer(user)

    async def _rotate(self, request: web.Request) -> web.Response:
        self.stats["rotate"] += 1
        try:
            user = await self._user(request)
            async with self._lock:
                await self._new_secret(user)
        except _Refused as refused:
            return refused.response
        return self._answer(user)

    async def _new_secret(self, user: str) -> None:
        secret = secrets.token_urlsafe(30)
        try:
            await self.set_identity(user, user, secret)
        except Exception as exc:
            raise _Refused(_error(500, None, "An unexpected error occurred")) from exc
        self.keys[user] = (user, secret)

    def _answer(self, user: str) -> web.Response:
        access, secret = self.keys[user]
        return web.json_response(
            {
                "username": user,
                "s3_access_key": access,
                "s3_secret_key": secret,
                "polaris_client_id": f"{user}-polaris",
                "polaris_client_secret": secrets.token_hex(16),
            }
        )

    async def _user(self, request: web.Request) -> str:
        if self.status is not None:
            raise _Refused(_error(self.status, None, "An unexpected error occurred"))
        header = request.headers.get("Authorization")
        if not header:
            raise _Refused(_error(401, _ERR_NO_TOKEN, "Authorization header required"))
        scheme, _, token = header.strip().partition(" ")
        if not scheme or not token.strip():
            raise _Refused(
                _error(
                    401,
                    _ERR_BAD_HEADER,
                    "Authorization header requires Bearer scheme followed by token",
                )
            )
        if scheme.lower() != "bearer":
            raise _Refused(
                _error(401, _ERR_BAD_HEADER, "Authorization header requires Bearer scheme")
            )
        assert self._session is not None
        try:
            async with self._session.get(
                self.auth_url + "api/V2/me", headers={"Authorization": token.strip()}
            ) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError):
            raise _Refused(_error(500, None, "An unexpected error occurred")) from None
        if response.status != 200:
            if (body.get("error") or {}).get("appcode") == 10020:
                raise _Refused(
                    _error(401, _ERR_INVALID_TOKEN, "KBase auth server reported token is invalid.")
                )
            raise _Refused(_error(500, None, "An unexpected error occurred"))
        if self.required_role not in body.get("customroles", []):
            raise _Refused(
                _error(
                    403,
                    _ERR_MISSING_ROLE,
                    "The user is missing required authentication roles to use the service. "
                    f"Required roles: {{{self.required_role!r}}}",
                )
            )
        return str(body["user"])


def weed_shell_identity(weed: Path, master: str, bucket: str) -> SetIdentity:
    """``set_identity`` writing SeaweedFS's identities with ``weed shell s3.configure``."""

    known: set[str] = set()

    async def set_identity(user: str, access_key: str, secret: str) -> None:
        def shell(command: str) -> None:
            done = subprocess.run(
                [str(weed), "shell", f"-master={master}"],
                input=command + "\nexit\n",
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode != 0:  # its stdout echoes the secret: not in the message
                raise RuntimeError(f"weed shell s3.configure failed: {done.stderr[-2000:]}")

        def run() -> None:
            if user in known:
                shell(f"s3.configure -user={user} -delete -apply")
            shell(
                f"s3.configure -user={user} -access_key={access_key} -secret_key={secret} "
                f"-buckets={bucket} -actions=Read,Write,List,Tagging -apply"
            )
            known.add(user)

        await asyncio.to_thread(run)

    return set_identity


@dataclass
class Governance:
    """A running stand-in; ``url`` is its base URL (ends with a slash)."""

    url: str
    child: ChildProcess

    def set_status(self, status: int | None) -> None:
        httpx.post(
            self.url + "_standin/behaviour", json={"status": status}, timeout=5
        ).raise_for_status()

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = httpx.get(self.url + "_standin/stats", timeout=5).json()
        return result

    def rotate(self, token: str) -> dict[str, Any]:
        response = httpx.post(
            self.url + "credentials/rotate",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def stop(self) -> None:
        self.child.stop()


def start_governance(
    workdir: Path, *, auth_url: str, weed: Path, master: str, bucket: str, port: int = 0
) -> Governance:
    """The stand-in as a child process on ``port`` (0: a free one, read from its output)."""
    argv = [sys.executable, "-m", "testbed.governance", "--auth-url", auth_url]
    argv += ["--weed", str(weed), "--master", master, "--bucket", bucket, "--port", str(port)]
    child = ChildProcess(
        argv,
        log_path=workdir / f"governance-{time.monotonic_ns()}.log",
        cwd=Path(__file__).parent.parent,
    )
    found: list[str] = []

    def listening() -> bool:
        match = re.search(r"^governance stand-in on (http://\S+)$", child.log_text(), re.M)
        if match:
            found.append(match.group(1))
        return bool(match)

    try:
        child.wait_until(listening, timeout=30, what="governance stand-in")
    except BaseException:
        child.stop()
        raise
    return Governance(url=found[0], child=child)


async def _serve(args: argparse.Namespace) -> None:
    standin = GovernanceStandIn(
        auth_url=args.auth_url,
        set_identity=weed_shell_identity(Path(args.weed), args.master, args.bucket),
        required_role=args.required_role,
    )
    runner = web.AppRunner(standin.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    print(f"governance stand-in on http://127.0.0.1:{port}/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.governance")
    parser.add_argument("--auth-url", required=True)
    parser.add_argument("--weed", required=True, help="the weed binary")
    parser.add_argument("--master", required=True, help="SeaweedFS master, 127.0.0.1:PORT")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--required-role", default=REQUIRED_ROLE)
    args = parser.parse_args(argv)
    with suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
