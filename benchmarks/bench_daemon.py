"""kbdaemon: connection info over the socket vs the keyring; idle RSS and CPU.

Starts `kbproxy dev-auth`, a real gnome-keyring on a private D-Bus bus, and the daemon through
its CLI (`login --with-token`, `start`) in an isolated HOME under the work dir. Then:

- round trip of ``kbclient.daemon_api.fetch_connection`` (a fresh Unix-socket connection, HTTP,
  JSON)
  against the baseline ``keyring.get_password`` on the same Secret Service: 5 rounds, the median
  of each round's p50 and p99;
- the daemon's RSS after the round trips;
- CPU time (user + system) the daemon uses over 60 idle seconds (goal: under 0.1 s, no polling);
- wall time of `kbdaemon s3-credentials` (the installed console script, as an AWS SDK runs it
  for its ``credential_process``; Python start included), p50 and p99 of 20 runs (goal: p50
  under 150 ms), with the profile's keys from the governance stand-in over SeaweedFS; the
  baseline is `python -c pass`, the interpreter's own start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.stats import median, percentile, ratio
from testbed.auth import start_dev_auth
from testbed.governance import REQUIRED_ROLE, start_governance
from testbed.keyring import secret_service
from testbed.s3 import BUCKET, start_seaweedfs, weed_binary

TOKEN = "BENCHTOKEN0123456789abcdef"
ROUNDS = 5
SOCKET_CALLS = 1000
KEYRING_CALLS = 100
IDLE_SECONDS = 60.0
S3_CREDENTIAL_RUNS = 20


def _isolated_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KBASE_", "KBDAEMON_", "XDG_")) and k != "KB_AUTH_TOKEN"
    }
    env["HOME"] = str(home)
    for var, sub in (
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_DATA_HOME", ".local/share"),
        ("XDG_STATE_HOME", ".local/state"),
        ("XDG_CACHE_HOME", ".cache"),
    ):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(home / sub)
    runtime = home / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env["XDG_RUNTIME_DIR"] = str(runtime)
    return env


def _kbdaemon(env: dict[str, str], *args: str, input: str | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "kbdaemon", *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kbdaemon {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def _timed(func: object, calls: int) -> list[float]:
    assert callable(func)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        func()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _wall(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True, timeout=60)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def s3_credentials_wall(
    env: dict[str, str], base: Path, *, auth_url: str, config: Path, runs: int = S3_CREDENTIAL_RUNS
) -> tuple[list[float], list[float]]:
    """Wall times (ms) of `kbdaemon s3-credentials` and of `python -c pass`, ``runs`` each.

    Starts SeaweedFS and the governance stand-in, points the running daemon's prod profile at
    it (``kbdaemon reload``) and lets one run fetch the keys before timing.
    """
    seaweed = start_seaweedfs(base / "seaweed")
    governance = None
    try:
        governance = start_governance(
            base / "governance",
            auth_url=auth_url,
            weed=weed_binary(),
            master=seaweed.master,
            bucket=BUCKET,
        )
        config.write_text(
            config.read_text(encoding="utf-8") + f'credentials_url = "{governance.url}"\n',
            encoding="utf-8",
        )
        _kbdaemon(env, "reload")
        script = Path(sys.executable).with_name("kbdaemon")
        argv = (
            [str(script), "s3-credentials"]
            if script.is_file()
            else [sys.executable, "-m", "kbdaemon", "s3-credentials"]
        )
        first = json.loads(
            subprocess.run(argv, env=env, capture_output=True, check=True, timeout=60).stdout
        )
        assert first["Version"] == 1 and first["AccessKeyId"] == "alice"
        return _wall(argv, env, runs), _wall([sys.executable, "-c", "pass"], env, runs)
    finally:
        if governance is not None:
            governance.stop()
        seaweed.stop()


def run(workdir: Path) -> None:
    base = workdir / "daemon"
    if base.exists():
        subprocess.run(["rm", "-rf", str(base)], check=True)
    home = base / "home"
    home.mkdir(parents=True)
    env = _isolated_env(home)
    auth = start_dev_auth(
        base / "auth", {TOKEN: {"user": "alice", "mfa": "Used", "customroles": [REQUIRED_ROLE]}}
    )
    saved_env = dict(os.environ)
    pid = None
    try:
        with secret_service(base / "secret-service") as keyring_env:
            env.update(keyring_env)
            config = Path(env["XDG_CONFIG_HOME"]) / "kbase-spark-connect" / "config.toml"
            config.parent.mkdir(parents=True)
            config.write_text(f'[profiles.prod]\nauth_url = "{auth.url}"\n', encoding="utf-8")
            _kbdaemon(env, "login", "--with-token", input=TOKEN + "\n")
            _kbdaemon(env, "start")
            os.environ.clear()
            os.environ.update(env)  # this process now sees the daemon and keyring the CLI used
            import keyring
            import keyring.core

            from kbclient import KEYRING_SERVICE
            from kbclient.daemon_api import fetch_connection, request

            keyring.core.init_backend()
            health = request("/v1/health")
            assert health is not None
            pid = int(health["pid"])
            assert fetch_connection("prod") is not None
            assert keyring.get_password(KEYRING_SERVICE, "prod") == TOKEN

            socket_p50, socket_p99, keyring_p50, keyring_p99 = [], [], [], []
            for _ in range(ROUNDS):
                s = _timed(lambda: fetch_connection("prod"), SOCKET_CALLS)
                k = _timed(lambda: keyring.get_password(KEYRING_SERVICE, "prod"), KEYRING_CALLS)
                socket_p50.append(percentile(s, 50))
                socket_p99.append(percentile(s, 99))
                keyring_p50.append(percentile(k, 50))
                keyring_p99.append(percentile(k, 99))
            proc = psutil.Process(pid)
            rss_mb = proc.memory_info().rss / 1e6
            time.sleep(2)  # let the last requests' work settle
            before = proc.cpu_times()
            time.sleep(IDLE_SECONDS)
            after = proc.cpu_times()
            idle_cpu = (after.user - before.user) + (after.system - before.system)
            creds_ms, python_ms = s3_credentials_wall(env, base, auth_url=auth.url, config=config)
            _kbdaemon(env, "stop")
            pid = None
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        if pid is not None and psutil.pid_exists(pid):
            psutil.Process(pid).kill()
        auth.stop()

    figures = {
        "socket_p50_ms": median(socket_p50),
        "socket_p99_ms": median(socket_p99),
        "keyring_p50_ms": median(keyring_p50),
        "keyring_p99_ms": median(keyring_p99),
        "daemon_rss_mb": rss_mb,
        "idle_cpu_s_per_60s": idle_cpu,
        "s3_credentials_p50_ms": percentile(creds_ms, 50),
        "s3_credentials_p99_ms": percentile(creds_ms, 99),
        "python_start_p50_ms": percentile(python_ms, 50),
        "s3_credentials_runs": S3_CREDENTIAL_RUNS,
        "rounds": ROUNDS,
        "socket_calls_per_round": SOCKET_CALLS,
        "keyring_calls_per_round": KEYRING_CALLS,
    }
    print(
        f"connection info over the socket: p50 {figures['socket_p50_ms']:.3f} ms, "
        f"p99 {figures['socket_p99_ms']:.3f} ms (median of {ROUNDS} rounds x {SOCKET_CALLS})"
    )
    print(
        f"keyring.get_password (Secret Service): p50 {figures['keyring_p50_ms']:.3f} ms, "
        f"p99 {figures['keyring_p99_ms']:.3f} ms (median of {ROUNDS} rounds x {KEYRING_CALLS})"
    )
    print(
        f"socket / keyring: p50 {ratio(figures['socket_p50_ms'], figures['keyring_p50_ms'])}, "
        f"p99 {ratio(figures['socket_p99_ms'], figures['keyring_p99_ms'])}"
    )
    print(f"daemon RSS idle: {rss_mb:.1f} MB")
    print(f"daemon CPU over {IDLE_SECONDS:.0f} idle s: {idle_cpu:.3f} s (goal < 0.1 s)")
    print(
        f"kbdaemon s3-credentials wall time: p50 {figures['s3_credentials_p50_ms']:.0f} ms, "
        f"p99 {figures['s3_credentials_p99_ms']:.0f} ms ({S3_CREDENTIAL_RUNS} runs; goal p50 < "
        f"150 ms); python -c pass p50 {figures['python_start_p50_ms']:.0f} ms, ratio "
        f"{ratio(figures['s3_credentials_p50_ms'], figures['python_start_p50_ms'])}"
    )
    (workdir / "daemon.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
