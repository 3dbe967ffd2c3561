"""Older Spark Connect clients, for the compatibility tests of kbproxy and kbclient.

Each is a pure-Python pyspark client package installed without dependencies into a directory of
its own under ``.venv/old-clients``; a child interpreter with that directory first on its path
imports that pyspark instead of the venv's, beside the venv's grpcio, pandas and pyarrow.

- pyspark-connect 4.0.0.dev1: the first Spark 4.0 preview, which sends FetchErrorDetails without
  the URL's metadata (so without the token);
- pyspark-client 4.0.0: the oldest release kbclient supports (``pyspark[connect]>=4.0``).

``python -m testbed.oldclients`` installs the missing ones (``make venv`` runs it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CLIENTS = {"pyspark-connect": "4.0.0.dev1", "pyspark-client": "4.0.0"}
ROOT = Path(__file__).resolve().parents[1] / ".venv" / "old-clients"


def client_dir(package: str) -> Path:
    return ROOT / f"{package}-{CLIENTS[package]}"


def _install_command(package: str) -> list[str]:
    target = str(client_dir(package))
    pin = f"{package}=={CLIENTS[package]}"
    return [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, pin]


def require(package: str) -> Path:
    """The client's directory; a RuntimeError saying how to install it when it is missing."""
    path = client_dir(package)
    if not (path / "pyspark").is_dir():
        raise RuntimeError(
            f"{package} {CLIENTS[package]} is missing: run `make venv`, or "
            f"`{' '.join(_install_command(package))}`"
        )
    return path


def run(
    package: str, code: str, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child interpreter that imports that client's pyspark."""
    env = dict(os.environ, PYTHONPATH=str(require(package)))
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def install() -> None:
    for package in CLIENTS:
        if not (client_dir(package) / "pyspark").is_dir():
            subprocess.run(_install_command(package), check=True)


if __name__ == "__main__":
    install()
