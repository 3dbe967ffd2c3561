"""A user's "single-user server" for the test hub: real Spark Connect behind a tiny HTTP server.

How it works: ``python -m testbed.hubserver --name alice --http-port P --spark-port S --workdir W``
starts a real Spark Connect server on ``S`` (testbed.spark), and only then an HTTP server on
``127.0.0.1:P``, the port the hub waits on, so "ready" at the hub means Spark Connect accepts
calls. It posts its activity to the hub once when it starts (as jupyterhub-singleuser does),
never again: only what kbproxy posts keeps it alive after that. Its answers, under the
prefix ``/user/<name>/``:

    GET  anything        200 {"spark_port": S}      (the hub's readiness check, any caller)
    POST api/kernels     201 {"id": ..., "name": "python3"} when the caller's token may access
                         this server (checked with the hub's own API), else 403

Every kernel start is appended to ``W/kernels.log``. With ``--spark-on-kernel`` (as the KBase
notebook image, whose kernel startup starts Spark Connect) the HTTP server comes first and the
first kernel start starts Spark Connect in the background. SIGTERM (the spawner's stop) stops
Spark Connect, then exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from testbed.spark import start_spark_connect


def _token_may_access(token: str, name: str) -> bool:
    """Whether the hub says ``token`` holds access:servers for this user's server."""
    api = os.environ.get("JUPYTERHUB_API_URL", "").rstrip("/")
    own = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not api or not own:
        return False
    request = urllib.request.Request(  # noqa: S310 (the hub's loopback URL from its own env)
        f"{api}/user", headers={"Authorization": f"token {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            model = json.load(response)
    except OSError:
        return False
    scopes = set(model.get("scopes", []))
    return bool(
        scopes & {"access:servers", f"access:servers!user={name}", f"access:servers!server={name}/"}
    )


def post_start_activity() -> None:
    """Tell the hub the server was used now, once, as jupyterhub-singleuser does when it starts."""
    url = os.environ.get("JUPYTERHUB_ACTIVITY_URL", "")
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not url or not token:
        return
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    body = json.dumps({"last_activity": now, "servers": {"": {"last_activity": now}}}).encode()
    request = urllib.request.Request(  # noqa: S310 (the hub's loopback URL from its own env)
        url,
        data=body,
        method="POST",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310
        pass


def make_handler(
    name: str, spark_port: int, workdir: Path, on_kernel: Callable[[], None] = lambda: None
) -> type[BaseHTTPRequestHandler]:
    prefix = f"/user/{name}/"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"hubserver {name}: {format % args}\n")

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply(200, {"spark_port": spark_port, "user": name})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            if self.path.rstrip("/") != prefix + "api/kernels":
                self._reply(404, {"message": f"no such endpoint {self.path}"})
                return
            auth = self.headers.get("Authorization", "")
            token = auth.split(" ", 1)[1] if auth.lower().startswith("token ") else ""
            if not token or not _token_may_access(token, name):
                self._reply(403, {"message": "this token may not access the server"})
                return
            kernel = {"id": str(uuid.uuid4()), "name": "python3"}
            with open(workdir / "kernels.log", "a", encoding="utf-8") as log:
                log.write(kernel["id"] + "\n")
            on_kernel()
            self._reply(201, kernel)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m testbed.hubserver")
    parser.add_argument("--name", required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--spark-port", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--spark-on-kernel", action="store_true")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    sparks: list[Any] = []
    lock = threading.Lock()
    spark_asked = threading.Event()

    def start_spark() -> None:
        spark = start_spark_connect(args.workdir / "spark", port=args.spark_port)
        (args.workdir / "spark.pid").write_text(str(spark.child.pid), encoding="utf-8")
        sparks.append(spark)

    def on_kernel() -> None:
        with lock:
            if args.spark_on_kernel and not spark_asked.is_set():
                spark_asked.set()
                threading.Thread(target=start_spark, daemon=True).start()

    if not args.spark_on_kernel:
        start_spark()
    server = ThreadingHTTPServer(
        ("127.0.0.1", args.http_port),
        make_handler(args.name, args.spark_port, args.workdir, on_kernel),
    )
    threading.Thread(target=post_start_activity, daemon=True).start()
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        for spark in sparks:
            spark.stop()


if __name__ == "__main__":
    main()
