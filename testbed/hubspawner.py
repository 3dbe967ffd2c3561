"""The test hub's spawner: each user's "server" is a real Spark Connect server (testbed.hubserver).

How it works: the hub loads this module (``c.JupyterHub.spawner_class``). ``start()`` runs
``python -m testbed.hubserver`` in its own process group on the port the hub chose, with the
user's Spark Connect port taken from ``spark_ports`` (fixed per user, so kbproxy's backend map is
known before any spawn, as a KubeSpawner service name is), and appends the user's name to
``state_dir/spawns.log`` (each line one start the hub asked for). A user listed in
``fail_users`` fails after a short delay with the given message, as a pod that cannot be
scheduled does; one in ``kernel_users`` starts Spark Connect only with its first kernel (as the
KBase notebook image does). ``stop()`` sends SIGTERM to the group (the server stops Spark),
then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from jupyterhub.spawner import Spawner
from jupyterhub.utils import random_port
from traitlets import Dict, List, Unicode

REPO_ROOT = Path(__file__).resolve().parent.parent


def _launch(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )


class SparkSpawner(Spawner):  # type: ignore[misc]
    """Starts testbed.hubserver for the user: HTTP for the hub, Spark Connect for kbproxy."""

    spark_ports = Dict(config=True, help="username -> Spark Connect port")
    fail_users = Dict(config=True, help="username -> message of a spawn that fails")
    kernel_users = List(config=True, help="users whose Spark Connect starts with a kernel")
    state_dir = Unicode(config=True, help="where spawns.log and each user's workdir go")

    _proc: subprocess.Popen[bytes] | None = None

    def _record(self, line: str) -> None:
        with open(Path(self.state_dir) / "spawns.log", "a", encoding="utf-8") as log:
            log.write(line + "\n")

    async def start(self) -> tuple[str, int]:
        name = self.user.name
        self._record(name)
        if name in self.fail_users:
            await asyncio.sleep(0.5)
            raise RuntimeError(self.fail_users[name])
        if name not in self.spark_ports:
            raise RuntimeError(f"the test hub has no Spark Connect port for user {name}")
        port = self.port or random_port()
        workdir = Path(self.state_dir) / name
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.get_env())
        env["PYTHONPATH"] = str(REPO_ROOT)
        argv = [sys.executable, "-m", "testbed.hubserver", "--name", name]
        argv += ["--http-port", str(port), "--spark-port", str(self.spark_ports[name])]
        argv += ["--workdir", str(workdir)]
        if name in self.kernel_users:
            argv.append("--spark-on-kernel")
        self._proc = await asyncio.to_thread(_launch, argv, env, workdir / "hubserver.log")
        return ("127.0.0.1", port)

    async def poll(self) -> int | None:
        if self._proc is None:
            return 0
        return self._proc.poll()

    async def stop(self, now: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        for _ in range(150):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
