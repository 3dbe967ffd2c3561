"""A real JupyterHub on loopback: test spawner, kbproxy's service token, the idle culler.

How it works: ``start_hub(workdir, ...)`` writes a ``jupyterhub_config.py`` into ``workdir``
(sqlite database, cookie secret and pid files there too) and runs ``jupyterhub`` as a child:

- the hub API on ``127.0.0.1:<hub_port>``, its proxy (the Python ``configurable-http-proxy``)
  on ``127.0.0.1:<public_port>`` with its API on a third port;
- users ``USERS`` (dummy authenticator, allowed users), each spawned by
  ``testbed.hubspawner.SparkSpawner``: a real Spark Connect server on the user's port from
  ``spark_ports``, answered for by testbed.hubserver on the port the hub checks;
- service ``kbproxy`` with token ``KBPROXY_TOKEN`` and exactly the documented scopes
  (``KBPROXY_SCOPES``); service ``kbproxy-limited`` with ``LIMITED_TOKEN`` lacking ``servers``;
- ``jupyterhub-idle-culler`` as a hub-managed service culling servers idle ``cull_timeout``
  seconds, checking every ``cull_every`` seconds.

The hub's own activity sampling from its proxy is slowed to once an hour, so the only activity
the culler sees in a test is what the test (kbproxy's reporter) posts. ``Hub.spawns()`` reads the
spawner's log: one line per start the hub asked for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from testbed.procs import ChildProcess, free_ports, port_open

USERS = ("alice", "bob", "carol", "dave", "erin")
KBPROXY_TOKEN = "kbproxy-service-token-0123456789abcdef"  # noqa: S105 (test hub only)
LIMITED_TOKEN = "kbproxy-limited-token-0123456789abcdef"  # noqa: S105 (test hub only)
KBPROXY_SCOPES = ("servers", "users:activity", "read:users", "access:servers")
CULLER_SCOPES = ("list:users", "read:users:activity", "read:servers", "delete:servers")


def _require(command: str, package: str) -> str:
    found = shutil.which(
        command,
        path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    if found is None:
        raise RuntimeError(f"`{command}` is missing: run `make venv` (installs PyPI {package})")
    return found


@dataclass
class Hub:
    """A running test hub; ``api_url`` is the hub's own API (``.../hub/api``)."""

    workdir: Path
    hub_port: int
    public_port: int
    spark_ports: dict[str, int]
    child: ChildProcess

    @property
    def url(self) -> str:
        """The hub's own address (what kbproxy's ``--hub-url`` would be in a cluster)."""
        return f"http://127.0.0.1:{self.hub_port}"

    @property
    def public_url(self) -> str:
        """The hub's proxy, in front of the hub and every user's server."""
        return f"http://127.0.0.1:{self.public_port}"

    def api(self, method: str, path: str, *, token: str = KBPROXY_TOKEN) -> httpx.Response:
        """One hub API request (``path`` after ``/hub/api``), as a test inspects the hub."""
        return httpx.request(
            method,
            f"{self.url}/hub/api{path}",
            headers={"Authorization": f"token {token}"},
            timeout=30,
        )

    def server(self, user: str) -> dict[str, object] | None:
        """The user's default server model at the hub, or None when it has none."""
        response = self.api("GET", f"/users/{user}")
        response.raise_for_status()
        servers: dict[str, dict[str, object]] = response.json().get("servers") or {}
        return servers.get("")

    def spawns(self, user: str | None = None) -> int:
        """How many starts the hub asked the spawner for (of ``user``, or of everyone)."""
        log = self.workdir / "state" / "spawns.log"
        if not log.exists():
            return 0
        names = log.read_text(encoding="utf-8").split()
        return len(names) if user is None else names.count(user)

    def kernels(self, user: str) -> int:
        """How many kernels were started in the user's server."""
        log = self.workdir / "state" / user / "kernels.log"
        return len(log.read_text(encoding="utf-8").split()) if log.exists() else 0

    def stop_server(self, user: str) -> None:
        """Stop the user's server through the hub and wait until it is gone."""
        self.api("DELETE", f"/users/{user}/server")
        self.child.wait_until(lambda: self.server(user) is None, timeout=60, what="server stop")

    def stop(self) -> None:
        self.child.stop(timeout=60)
        # A Spark Connect server a crashed hub left behind goes too.
        for pid_file in (self.workdir / "state").glob("*/spark.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.killpg(int(pid_file.read_text(encoding="utf-8")), signal.SIGKILL)


def _config(
    workdir: Path,
    *,
    hub_port: int,
    public_port: int,
    proxy_api_port: int,
    spark_ports: Mapping[str, int],
    fail_users: Mapping[str, str],
    kernel_users: Collection[str],
    cull_timeout: int,
    cull_every: int,
    slow_spawn_timeout: float,
) -> str:
    chp = _require("configurable-http-proxy", "configurable-http-proxy")
    culler = [sys.executable, "-m", "jupyterhub_idle_culler"]
    culler += [f"--timeout={cull_timeout}", f"--cull-every={cull_every}"]
    state = workdir / "state"
    return f"""# written by testbed/hub.py
c = get_config()  # noqa: F821
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {public_port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.db_url = {f"sqlite:///{workdir / 'jupyterhub.sqlite'}"!r}
c.JupyterHub.cookie_secret_file = {str(workdir / "cookie_secret")!r}
c.JupyterHub.pid_file = {str(workdir / "jupyterhub.pid")!r}
c.JupyterHub.cleanup_servers = True
c.JupyterHub.last_activity_interval = 3600
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": {slow_spawn_timeout!r}}}
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = {str(workdir / "proxy.pid")!r}
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {set(USERS)!r}
c.JupyterHub.spawner_class = "testbed.hubspawner.SparkSpawner"
c.SparkSpawner.spark_ports = {dict(spark_ports)!r}
c.SparkSpawner.fail_users = {dict(fail_users)!r}
c.SparkSpawner.kernel_users = {sorted(kernel_users)!r}
c.SparkSpawner.state_dir = {str(state)!r}
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
c.JupyterHub.services = [
    {{"name": "kbproxy", "api_token": {KBPROXY_TOKEN!r}}},
    {{"name": "kbproxy-limited", "api_token": {LIMITED_TOKEN!r}}},
    {{"name": "idle-culler", "command": {culler!r}}},
]
c.JupyterHub.load_roles = [
    {{"name": "kbproxy", "scopes": {list(KBPROXY_SCOPES)!r}, "services": ["kbproxy"]}},
    {{
        "name": "kbproxy-limited",
        "scopes": ["users:activity", "read:users"],
        "services": ["kbproxy-limited"],
    }},
    {{"name": "idle-culler", "scopes": {list(CULLER_SCOPES)!r}, "services": ["idle-culler"]}},
]
"""


def start_hub(
    workdir: Path,
    *,
    spark_ports: Mapping[str, int],
    fail_users: Mapping[str, str] | None = None,
    kernel_users: Collection[str] = (),
    cull_timeout: int = 20,
    cull_every: int = 3,
    slow_spawn_timeout: float = 0,
    timeout: float = 90,
) -> Hub:
    """Start a JupyterHub for the users in ``spark_ports`` (and ``fail_users``); wait until up.

    Args:
        spark_ports: username -> the Spark Connect port its server will listen on.
        fail_users: username -> the message its spawn fails with.
        kernel_users: users whose Spark Connect server starts only with their first kernel.
        cull_timeout: seconds without activity after which the culler stops a server.
        slow_spawn_timeout: seconds the hub's start request waits before answering 202.
    """
    _require("jupyterhub", "jupyterhub")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "state").mkdir(exist_ok=True)
    hub_port, public_port, proxy_api_port = free_ports(3)
    config = workdir / "jupyterhub_config.py"
    config.write_text(
        _config(
            workdir,
            hub_port=hub_port,
            public_port=public_port,
            proxy_api_port=proxy_api_port,
            spark_ports=spark_ports,
            fail_users=fail_users or {},
            kernel_users=kernel_users,
            cull_timeout=cull_timeout,
            cull_every=cull_every,
            slow_spawn_timeout=slow_spawn_timeout,
        ),
        encoding="utf-8",
    )
    env = dict(os.environ)
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    argv = [_require("jupyterhub", "jupyterhub"), "-f", str(config)]
    child = ChildProcess(argv, log_path=workdir / "jupyterhub.log", env=env, cwd=workdir)
    hub = Hub(
        workdir=workdir,
        hub_port=hub_port,
        public_port=public_port,
        spark_ports=dict(spark_ports),
        child=child,
    )

    def ready() -> bool:
        if not port_open("127.0.0.1", hub_port):
            return False
        try:
            return hub.api("GET", "/").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        child.wait_until(ready, timeout=timeout, what="JupyterHub")
    except BaseException:
        hub.stop()
        raise
    return hub


def scopes_of(hub: Hub, token: str) -> Collection[str]:
    """The scopes the hub grants ``token`` (what a service sees at ``/hub/api/user``)."""
    response = hub.api("GET", "/user", token=token)
    response.raise_for_status()
    scopes: list[str] = response.json()["scopes"]
    return scopes
