"""The steps of `make demo`, each printed with what it did and how long it took.

How it works: the process first points its own environment at a fresh HOME (XDG dirs, runtime
dir, a gnome-keyring on a private D-Bus) under the work dir, so kbdaemon, kbclient, the keyring
and the config file never touch the user's own. Then it starts, in order, and registers the
stop of each on one ``ExitStack``:

    Spark Connect server -> dev Auth2 -> kbproxy serve -> SeaweedFS + Delta Lake Proxy emulator
    -> config file -> kbdaemon login --with-token -> kbdaemon start -> create_spark_session()
    -> deltalake through the daemon's S3 proxy

The stack unwinds on success, on an error and on Ctrl-C or SIGTERM (both become
KeyboardInterrupt): the detached daemon is stopped with ``kbdaemon stop`` (and by its pid file
if that fails), every other child with its whole process group.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

DEMO_USER = "demo"
TABLE_PATH = "demo/genomes"
DEFAULT_WORKDIR = Path(".demo")


class DemoError(Exception):
    """A step failed; the message says which and why."""


class Steps:
    """Numbered, timed steps on stdout."""

    def __init__(self) -> None:
        self.number = 0

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.number += 1
        print(f"\n[{self.number}] {title}", flush=True)
        started = time.monotonic()
        yield
        print(f"    ({time.monotonic() - started:.1f} s)", flush=True)

    @staticmethod
    def say(text: str) -> None:
        for line in text.rstrip().splitlines():
            print(f"    {line}", flush=True)


def isolate_home(workdir: Path) -> Path:
    """Point this process (and so every child) at a HOME of its own; returns it."""
    home = workdir / "home"
    for name in list(os.environ):
        if name.startswith(("KBASE_", "KBPROXY_", "KBDAEMON_", "SPARK_REMOTE", "SPARK_CONNECT")):
            del os.environ[name]
    os.environ.pop("KB_AUTH_TOKEN", None)
    os.environ["HOME"] = str(home)
    for var, sub in (
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_DATA_HOME", ".local/share"),
        ("XDG_STATE_HOME", ".local/state"),
        ("XDG_CACHE_HOME", ".cache"),
    ):
        (home / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(home / sub)
    runtime = workdir / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    os.environ["GRPC_DNS_RESOLVER"] = "native"
    return home


def kbdaemon(*args: str, stdin: str | None = None, check: bool = True) -> str:
    """Run the kbdaemon CLI, print its output indented, return it."""
    shown = "kbdaemon " + " ".join(args)
    print(f"    $ {shown}" + (" < token" if stdin is not None else ""), flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "kbdaemon", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = (done.stdout + done.stderr).strip()
    if output:
        Steps.say("  " + output.replace("\n", "\n  "))
    if check and done.returncode != 0:
        raise DemoError(f"`{shown}` failed with exit code {done.returncode}")
    return output


def stop_daemon() -> None:
    """`kbdaemon stop`; if the daemon is still alive after that, end it by its pid file."""
    import psutil

    from kbdaemon.paths import DaemonPaths

    kbdaemon("stop", check=False)
    pid_file = DaemonPaths.default().pid_file
    try:
        pid = int(pid_file.read_text().split()[0])
        proc = psutil.Process(pid)
    except (OSError, ValueError, IndexError, psutil.Error):
        return
    Steps.say(f"kbdaemon (pid {pid}) still runs: terminating it")
    proc.terminate()
    try:
        proc.wait(10)
    except psutil.TimeoutExpired:
        proc.kill()


def demo_table() -> Any:
    import pyarrow as pa

    n = 1000
    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "genome": pa.array([f"GCF_{100000 + i * 7:09d}" for i in range(n)]),
            "gc_content": pa.array([0.35 + (i % 40) / 100 for i in range(n)], pa.float64()),
        }
    )


def storage_options(endpoint: str) -> dict[str, str]:
    from testbed.s3 import ACCESS_KEY, REGION, SECRET_KEY

    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_ALLOW_HTTP": "true",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
    }


def write_config(
    path: Path, *, auth_url: str, proxy_port: int, s3_upstream: str, s3_http_host: str
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        'default_profile = "demo"\n\n'
        "[kbdaemon]\n"
        "# The local S3 serves plain http; a real one is followed over https only.\n"
        f's3_allow_http_hosts = ["{s3_http_host}"]\n\n'
        "[profiles.demo]\n"
        f'auth_url = "{auth_url}"\n'
        'spark_host = "127.0.0.1"\n'
        f"spark_port = {proxy_port}\n"
        "use_ssl = false\n"
        f's3_upstream = "{s3_upstream}"\n'
        "s3_port = 0\n",
        encoding="utf-8",
    )


def run_demo(workdir: Path, stack: ExitStack, steps: Steps) -> None:
    from testbed.auth import start_dev_auth
    from testbed.proxy import start_kbproxy
    from testbed.s3 import BUCKET, s3_client, start_emulator, start_seaweedfs
    from testbed.spark import start_spark_connect

    with steps.step(f"An isolated HOME for kbdaemon, kbclient and the keyring: {workdir}/home"):
        isolate_home(workdir)
        # A real Secret Service (gnome-keyring on a private D-Bus), unlocked, living in the work
        # dir: the desktop keyring stays untouched, and kbdaemon keeps the token encrypted there.
        from testbed.keyring import secret_service

        os.environ.update(stack.enter_context(secret_service(workdir / "keyring")))
        steps.say("keyring: gnome-keyring on a private D-Bus session, inside the work dir")

    with steps.step("A real Spark Connect server (the user's own Spark, from the pyspark jars)"):
        spark_server = start_spark_connect(workdir / "spark")
        stack.callback(spark_server.stop)
        steps.say(f"listening on {spark_server.address} (pid {spark_server.child.pid})")

    token = "DEMO" + secrets.token_hex(16)
    with steps.step(f"`kbproxy dev-auth`: a KBase Auth2 stand-in knowing user {DEMO_USER!r}"):
        auth = start_dev_auth(
            workdir / "auth",
            {token: {"user": DEMO_USER, "mfa": "Used", "expires": None, "type": "Login"}},
        )
        stack.callback(auth.stop)
        steps.say(f"{auth.url} ; demo token {token[:4]}... (never printed in full)")

    with steps.step("`kbproxy serve`: checks each call's token, routes it to the user's server"):
        proxy = start_kbproxy(
            workdir / "proxy",
            auth_url=auth.url,
            backend_map={DEMO_USER: spark_server.address},
            backend_template="spark-connect-{username}.invalid:15002",
        )
        stack.callback(proxy.stop)
        steps.say(f"gRPC on {proxy.address}, stats on {proxy.stats_url}")
        steps.say(f"backend of {DEMO_USER!r}: {spark_server.address}")

    with steps.step("S3 (SeaweedFS) behind a Delta Lake Proxy emulator, with a Delta table"):
        from deltalake import write_deltalake

        seaweed = start_seaweedfs(workdir / "seaweedfs")
        stack.callback(seaweed.stop)
        emulator = start_emulator(workdir, seaweed)
        stack.callback(emulator.stop)
        table = demo_table()
        uri = f"s3://{BUCKET}/{TABLE_PATH}"
        write_deltalake(uri, table, storage_options=storage_options(seaweed.url))
        steps.say(f"S3 on {seaweed.url}; Delta Lake Proxy on {emulator.url}")
        steps.say(f"wrote {uri}: {table.num_rows} rows, columns {', '.join(table.column_names)}")

    with steps.step("The kbdaemon config: a 'demo' profile pointing at these servers"):
        from kbclient.profiles import config_path

        path = config_path()
        write_config(
            path,
            auth_url=auth.url,
            proxy_port=proxy.port,
            s3_upstream=emulator.url,
            s3_http_host=f"127.0.0.1:{emulator.front_port}",
        )
        steps.say(f"{path}:\n" + path.read_text())

    with steps.step("Log in once: the token is checked with Auth2, then kept in the keyring"):
        kbdaemon("login", "--with-token", stdin=token + "\n")

    with steps.step("Start the daemon: it holds the token, runs the local S3 proxy"):
        stack.callback(stop_daemon)
        kbdaemon("start")
        kbdaemon("status")

    with steps.step("create_spark_session(): no arguments, the token comes from the daemon"):
        from kbclient import create_spark_session, get_connection_info

        info = get_connection_info()
        steps.say(
            f"user {info.username}, token from {info.token_source}, "
            f"Spark Connect at {info.host}:{info.port} (TLS {info.use_ssl})"
        )
        spark = create_spark_session(app_name="kbase-spark-connect demo")
        try:
            df = spark.sql("SELECT id, id * id AS square FROM range(5)")
            steps.say(df.toPandas().to_string(index=False))
            total = spark.range(0, 1_000_000, 1, 4).selectExpr("sum(id) AS total").first()
            steps.say(f"sum of 0..999999 computed by Spark: {total['total'] if total else None}")
        finally:
            spark.stop()
        calls = proxy.stats()
        steps.say(f"kbproxy served these calls: {calls.get('calls', calls)}")

    with steps.step("Read the Delta table with deltalake, through the daemon's local S3 proxy"):
        endpoint = info.s3_endpoint
        if endpoint is None:
            raise DemoError("kbdaemon reports no S3 endpoint; see `kbdaemon status`")
        steps.say(f"S3 endpoint from the daemon: {endpoint}")
        try:
            direct = s3_client(emulator.url)
            first = direct.list_objects_v2(Bucket=BUCKET, Prefix=TABLE_PATH + "/part")
            key = first["Contents"][0]["Key"]
            direct.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            steps.say("boto3 pointed straight at the Delta Lake Proxy read a data file")
        except Exception as exc:
            reason = str(exc).splitlines()[0][:120]
            steps.say(
                "why a local proxy: boto3 pointed straight at the Delta Lake Proxy fails: "
                f"{type(exc).__name__}: {reason}"
            )
        got, version = read_delta(uri, endpoint)
        steps.say(f"deltalake with AWS_ENDPOINT_URL={endpoint} (the daemon's S3 proxy):")
        if not got.equals(table):
            raise DemoError("the Delta table read through the proxy differs from what was written")
        steps.say(f"Delta table version {version}: {got.num_rows} rows, equal to what was written")
        steps.say(got.slice(0, 3).to_pandas().to_string(index=False))


def read_delta(uri: str, endpoint: str) -> tuple[Any, int]:
    from deltalake import DeltaTable

    delta = DeltaTable(uri, storage_options=storage_options(endpoint))
    return delta.to_pyarrow_table().sort_by("id"), delta.version()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch dir (default .demo)"
    )
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    steps = Steps()
    print("kbase-spark-connect demo: the whole flow on this machine, real servers on loopback")
    try:
        with ExitStack() as stack:
            try:
                run_demo(workdir, stack, steps)
            finally:
                # A second Ctrl-C must not cut the clean-up short.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                print("\nStopping everything the demo started ...", flush=True)
    except KeyboardInterrupt:
        print("interrupted: everything the demo started has been stopped", flush=True)
        return 130
    except DemoError as exc:
        print(f"demo failed at step {steps.number}: {exc} (logs under {workdir})", file=sys.stderr)
        return 1
    except Exception as exc:
        print(
            f"demo failed at step {steps.number}: {type(exc).__name__}: {exc}\n"
            f"(logs under {workdir})",
            file=sys.stderr,
        )
        return 1
    print("\nDone: every step ran as it would on a workstation, against real servers.")
    print(f"Logs under {workdir}.")
    return 0
