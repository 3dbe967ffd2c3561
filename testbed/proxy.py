"""`kbproxy serve` as a child process, in front of local Spark Connect servers."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from testbed.procs import ChildProcess, free_port


@dataclass
class KbproxyServer:
    """A running proxy: gRPC on 127.0.0.1:port, stats HTTP on 127.0.0.1:stats_port."""

    port: int
    stats_port: int
    child: ChildProcess
    data_plane: str = "envoy"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.stats_port}/"

    def stats(self) -> dict[str, object]:
        result: dict[str, object] = httpx.get(self.stats_url + "stats", timeout=5).json()
        return result

    def wait_for_log(self, found: Callable[[str], bool], timeout: float = 10) -> str:
        """The log text once ``found(text)`` holds (Envoy's access log arrives a moment later)."""
        deadline = time.monotonic() + timeout
        while not found(text := self.child.log_text()):
            if time.monotonic() > deadline:
                raise AssertionError(f"kbproxy's log did not show it within {timeout} s:\n{text}")
            time.sleep(0.05)
        return text

    def stop(self) -> None:
        self.child.stop()


def _ready(port: int, stats_port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{stats_port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_kbproxy(
    workdir: Path,
    *,
    auth_url: str,
    backend_template: str | None = None,
    backend_map: dict[str, str] | None = None,
    tls: tuple[Path, Path] | None = None,
    data_plane: str = "envoy",
    extra_args: Sequence[str] = (),
    launcher: Sequence[str] = (),
) -> KbproxyServer:
    """Start `python -m kbproxy serve` on free loopback ports and wait until it serves.

    Args:
        auth_url: the (dev) Auth2 root URL.
        backend_template: e.g. "127.0.0.1:15002"-style template with {username}; when None,
            users absent from backend_map go to an address nobody listens on.
        backend_map: {"username": "host:port"} written to a file for --backend-map.
        tls: (certificate chain, private key) PEM files to serve TLS.
        data_plane: ``envoy`` (Envoy supervised by kbproxy) or ``grpc`` (the embedded relay).
        extra_args: more `kbproxy serve` flags (e.g. --connect-timeout 1).
        launcher: a command that runs the rest of the command line (testbed.hosts).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port, stats_port = free_port(), free_port()
    argv = [*launcher, sys.executable, "-m", "kbproxy", "serve", "--listen", f"127.0.0.1:{port}"]
    argv += ["--stats-listen", f"127.0.0.1:{stats_port}", "--auth-url", auth_url]
    argv += ["--auth-timeout", "2", "--connect-timeout", "2", "--drain-grace", "2"]
    argv += ["--data-plane", data_plane]
    if backend_template is None:
        backend_template = "127.0.0.1:1"  # users not in backend_map: connection refused
    argv += ["--backend-template", backend_template]
    if backend_map is not None:
        map_path = workdir / "backends.json"
        map_path.write_text(json.dumps(backend_map), encoding="utf-8")
        argv += ["--backend-map", str(map_path)]
    if tls is not None:
        argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    argv += list(extra_args)
    child = ChildProcess(argv, log_path=workdir / "kbproxy.log")
    try:
        child.wait_until(lambda: _ready(port, stats_port), timeout=30, what="kbproxy serve")
    except BaseException:
        child.stop()
        raise
    return KbproxyServer(port=port, stats_port=stats_port, child=child, data_plane=data_plane)
