"""`kbproxy dev-auth` as a child process, with helpers to drive it."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from testbed.procs import ChildProcess, free_port, port_open


@dataclass
class DevAuthServer:
    """A running dev auth server; `url` ends with a slash, as Auth2 URLs do."""

    port: int
    tokens_path: Path
    child: ChildProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = httpx.get(self.url + "_dev/stats", timeout=5).json()
        return result

    def set_behaviour(self, *, delay_ms: int = 0, status: int | None = None) -> None:
        httpx.post(
            self.url + "_dev/behaviour", json={"delay_ms": delay_ms, "status": status}, timeout=5
        ).raise_for_status()

    def write_tokens(self, tokens: dict[str, dict[str, Any]]) -> None:
        """Replace the tokens file; the server notices the new modification time."""
        before = self.tokens_path.stat().st_mtime_ns if self.tokens_path.exists() else 0
        tmp = self.tokens_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(tokens), encoding="utf-8")
        tmp.replace(self.tokens_path)
        while self.tokens_path.stat().st_mtime_ns == before:  # coarse mtime clocks
            time.sleep(0.01)
            self.tokens_path.touch()

    def stop(self) -> None:
        self.child.stop()


def start_dev_auth(
    workdir: Path, tokens: dict[str, dict[str, Any]], *, cachefor_ms: int | None = None
) -> DevAuthServer:
    workdir.mkdir(parents=True, exist_ok=True)
    tokens_path = workdir / "tokens.json"
    tokens_path.write_text(json.dumps(tokens), encoding="utf-8")
    port = free_port()
    argv = [sys.executable, "-m", "kbproxy", "dev-auth", "--listen", f"127.0.0.1:{port}"]
    argv += ["--tokens", str(tokens_path)]
    if cachefor_ms is not None:
        argv += ["--cachefor", str(cachefor_ms)]
    child = ChildProcess(argv, log_path=workdir / "dev-auth.log")
    try:
        child.wait_until(lambda: port_open("127.0.0.1", port), timeout=30, what="kbproxy dev-auth")
    except BaseException:
        child.stop()
        raise
    return DevAuthServer(port=port, tokens_path=tokens_path, child=child)
