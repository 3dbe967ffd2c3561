"""kbproxy with JupyterHub: a stopped server to the first result, and hub requests under use.

Real components on loopback: a JupyterHub (testbed.hub: each user's server is a real Spark
Connect server), kbproxy serve --hub-url on the Envoy data plane (``BENCH_HUB_PLANE=grpc`` for
the relay), the dev auth server, kbclient's ``create_spark_session()``.

1. Cold start, ``BENCH_HUB_RUNS`` times (default 3): alice's server stopped, then
   ``create_spark_session()`` and one query. A thread watches the hub's user model every 0.1 s,
   which splits the time into
   - hub spawn: the call until the hub has the server (kbproxy's refusal, its start request,
     the hub's spawner starting);
   - server start: the hub has it until the hub says ready (in the testbed: the Spark Connect
     server is up, then the single-user HTTP server);
   - retry delay: ready at the hub until the first result (the client's wait before its next
     try, the probe, the session's first calls and the query).
   The goal is one spawn per start, whatever the number of refused calls.
2. Steady use: calls at about 5 per second for ``BENCH_HUB_STEADY_S`` seconds (default 65) with
   ``--hub-activity-interval 60``; hub requests per user per minute from kbproxy's /stats (goal:
   at most 1 activity post per user per minute, no start or status request).

Figures go to ``workdir/hub.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import median
from testbed.auth import start_dev_auth
from testbed.hub import KBPROXY_TOKEN, Hub, start_hub
from testbed.procs import free_ports
from testbed.proxy import KbproxyServer, start_kbproxy

TOKEN = "ALICEHUBBENCHTOKEN0123456789"
USER = "alice"


class HubWatch:
    """When the hub first had the user's server, and when it first said ready."""

    def __init__(self, hub: Hub, user: str) -> None:
        self.hub, self.user = hub, user
        self.exists_at: float | None = None
        self.ready_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.ready_at is None:
            server = self.hub.server(self.user)
            now = time.monotonic()
            if server is not None and self.exists_at is None:
                self.exists_at = now
            if server is not None and server.get("ready"):
                self.ready_at = now
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _hub_figures(proxy: KbproxyServer) -> dict[str, int]:
    figures = proxy.stats().get("hub")
    return dict(figures) if isinstance(figures, dict) else {}


def _cold_start(proxy: KbproxyServer, hub: Hub, auth_url: str) -> dict[str, float]:
    from kbclient import create_spark_session

    if hub.server(USER) is not None:
        hub.stop_server(USER)
    spawns = hub.spawns(USER)
    started = time.monotonic()
    watch = HubWatch(hub, USER)
    try:
        spark = create_spark_session(
            host="127.0.0.1",
            port=proxy.port,
            token=TOKEN,
            auth_url=auth_url,
            use_ssl=False,
            wait_for_server=300,
        )
        try:
            assert spark.range(0, 10, 1, 2).count() == 10
            first = time.monotonic()
        finally:
            spark.stop()
    finally:
        watch.stop()
    exists = watch.exists_at or first
    ready = watch.ready_at or first
    return {
        "total_s": first - started,
        "hub_spawn_s": exists - started,
        "server_start_s": ready - exists,
        "retry_delay_s": first - ready,
        "spawns": float(hub.spawns(USER) - spawns),
    }


def _steady(proxy: KbproxyServer, auth_url: str, seconds: float) -> dict[str, float]:
    from kbclient import create_spark_session

    spark = create_spark_session(
        host="127.0.0.1", port=proxy.port, token=TOKEN, auth_url=auth_url, use_ssl=False
    )
    try:
        before = _hub_figures(proxy)
        started = time.monotonic()
        calls = 0
        while time.monotonic() - started < seconds:
            spark.range(1).count()
            calls += 1
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        time.sleep(1)
        after = _hub_figures(proxy)
    finally:
        spark.stop()
    per_minute = {
        key: (after.get(key, 0) - before.get(key, 0)) * 60 / elapsed
        for key in ("hub_post_activity", "hub_post_server", "hub_get_user")
    }
    return {"calls": float(calls), "seconds": elapsed, **per_minute}


def run(workdir: Path) -> None:
    os.environ.setdefault("GRPC_DNS_RESOLVER", "native")
    os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.null.Keyring"
    runs = int(os.environ.get("BENCH_HUB_RUNS", "3"))
    steady_s = float(os.environ.get("BENCH_HUB_STEADY_S", "65"))
    plane = os.environ.get("BENCH_HUB_PLANE", "envoy")
    base = Path(tempfile.mkdtemp(prefix="bench-hub-", dir=workdir))
    auth = start_dev_auth(
        base / "auth", {TOKEN: {"user": USER, "mfa": "Used", "expires": None, "type": "Login"}}
    )
    (port,) = free_ports(1)
    hub = start_hub(base / "hub", spark_ports={USER: port}, cull_timeout=3600, cull_every=600)
    token_file = base / "hub-token"
    token_file.write_text(KBPROXY_TOKEN, encoding="utf-8")
    token_file.chmod(0o600)
    proxy = start_kbproxy(
        base / "kbproxy",
        auth_url=auth.url,
        backend_map={USER: f"127.0.0.1:{port}"},
        data_plane=plane,
        extra_args=["--hub-url", hub.url, "--hub-api-token-file", str(token_file)],
    )
    result: dict[str, Any] = {"plane": plane}
    try:
        starts = [_cold_start(proxy, hub, auth.url) for _ in range(runs)]
        print(f"cold start through kbproxy ({plane}), {runs} runs, medians:")
        for key in ("total_s", "hub_spawn_s", "server_start_s", "retry_delay_s"):
            print(f"  {key:16} {median([s[key] for s in starts]):7.2f} s")
        print(f"  spawns per start {median([s['spawns'] for s in starts]):.0f} (goal 1)")
        steady = _steady(proxy, auth.url, steady_s)
        print(f"steady use: {steady['calls']:.0f} calls in {steady['seconds']:.0f} s, per minute:")
        print(f"  activity posts   {steady['hub_post_activity']:.2f} (goal <= 1)")
        print(f"  start requests   {steady['hub_post_server']:.2f} (goal 0)")
        print(f"  status requests  {steady['hub_get_user']:.2f} (goal 0)")
        result.update(starts=starts, steady=steady)
    finally:
        proxy.stop()
        hub.stop()
        auth.stop()
    (workdir / "hub.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
