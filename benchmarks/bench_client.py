"""kbclient: time from call to ready session, and `import kbclient` time.

Subject and baseline in the same run, interleaved:

- baseline: pyspark directly, ``SparkSession.builder.remote(url).create()`` and its first RPC
  (``spark.version``), with the same URL kbclient builds;
- kbclient warm: ``create_spark_session(token=...)`` with the Auth2 answer cached;
- kbclient cold: the same after clearing the Auth2 cache (one request to dev auth on loopback).

Both make the same one RPC to the same real Spark Connect server (directly, no proxy, so the
figure is kbclient's own work): overhead = median(kbclient) - median(baseline). The resolution
step alone (token discovery, config, cached or fresh Auth2 answer, URL) is timed too, since it is
the whole overhead and far below the RPC's noise. Import times come from fresh interpreters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.stats import median, percentile, ratio
from testbed.auth import start_dev_auth
from testbed.spark import start_spark_connect

TOKEN = "BENCHTOKEN0123456789abcdef"
RUNS = 25
IMPORT_RUNS = 7


STDLIB = "import json, dataclasses, logging, socket, pathlib, re, typing, datetime, threading"


def _import_time(statement: str, setup: str = "pass") -> float:
    code = f"import time; {setup}; t = time.perf_counter(); {statement}; "
    code += "print(time.perf_counter() - t)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return float(out.stdout.strip().splitlines()[-1])


def _fmt(values: list[float]) -> str:
    return f"median {median(values) * 1000:8.2f} ms  p90 {percentile(values, 90) * 1000:8.2f} ms"


def run(workdir: Path) -> None:
    os.environ.setdefault("GRPC_DNS_RESOLVER", "native")
    os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.null.Keyring"
    for name in ("KBASE_AUTH_TOKEN", "KB_AUTH_TOKEN", "KBASE_AUTH_URL"):
        os.environ.pop(name, None)

    imports: dict[str, list[float]] = {}
    for label, statement, setup in (
        ("stdlib kbclient uses", STDLIB, "pass"),
        ("import kbclient", "import kbclient", "pass"),
        ("kbclient, stdlib loaded", "import kbclient", STDLIB),
        ("import httpx", "import httpx", "pass"),
        ("import pyspark connect", "import pyspark.sql.connect.session", "pass"),
    ):
        imports[label] = [_import_time(statement, setup) for _ in range(IMPORT_RUNS)]

    spark_server = start_spark_connect(workdir / "client-spark")
    auth = start_dev_auth(workdir / "client-auth", {TOKEN: {"user": "alice", "mfa": "Used"}})
    try:
        from pyspark.sql.connect.session import SparkSession

        from kbclient import create_spark_session
        from kbclient._connection import clear_auth_cache, resolve_connection

        kwargs = {
            "token": TOKEN,
            "host": "127.0.0.1",
            "port": spark_server.port,
            "use_ssl": False,
            "auth_url": auth.url,
        }
        url = resolve_connection(**kwargs).spark_url_with_token()  # type: ignore[arg-type]

        def pyspark_direct() -> object:
            spark = SparkSession.builder.remote(url).create()
            spark.version  # noqa: B018 - the first RPC
            return spark

        def kbclient_warm() -> object:
            return create_spark_session(**kwargs)  # type: ignore[arg-type]

        def kbclient_cold() -> object:
            clear_auth_cache()
            return create_spark_session(**kwargs)  # type: ignore[arg-type]

        subjects: dict[str, Callable[[], object]] = {
            "pyspark directly": pyspark_direct,
            "kbclient warm cache": kbclient_warm,
            "kbclient cold cache": kbclient_cold,
        }
        for make in subjects.values():  # warm-up: JIT of the server, imports, pools
            for _ in range(3):
                make().stop()  # type: ignore[attr-defined]
        times: dict[str, list[float]] = {name: [] for name in subjects}
        for _ in range(RUNS):
            for name, make in subjects.items():
                started = time.perf_counter()
                spark = make()
                times[name].append(time.perf_counter() - started)
                spark.stop()  # type: ignore[attr-defined]

        resolve: dict[str, list[float]] = {"resolve warm": [], "resolve cold": []}
        for _ in range(RUNS * 4):
            started = time.perf_counter()
            resolve_connection(**kwargs)  # type: ignore[arg-type]
            resolve["resolve warm"].append(time.perf_counter() - started)
            clear_auth_cache()
            started = time.perf_counter()
            resolve_connection(**kwargs)  # type: ignore[arg-type]
            resolve["resolve cold"].append(time.perf_counter() - started)
    finally:
        auth.stop()
        spark_server.stop()

    base = median(times["pyspark directly"])
    print(f"call to ready session ({RUNS} runs each, interleaved; one RPC to a local server)")
    for name, values in times.items():
        extra = median(values) - base
        print(
            f"  {name:22} {_fmt(values)}  {ratio(median(values), base):>7}  +{extra * 1000:.2f} ms"
        )
    print("kbclient's own work (token, config, Auth2 answer, URL), no RPC")
    for name, values in resolve.items():
        print(f"  {name:22} {_fmt(values)}")
    print(f"import time, fresh interpreter ({IMPORT_RUNS} runs each)")
    for name, values in imports.items():
        print(f"  {name:22} {_fmt(values)}")
    goal = median(times["kbclient warm cache"]) - base
    print(f"warm overhead over pyspark: {goal * 1000:.2f} ms (goal < 20 ms)")
    figures = {
        name: {"median_s": median(v), "p90_s": percentile(v, 90), "runs": len(v)}
        for name, v in {**times, **resolve, **imports}.items()
    }
    (workdir / "client.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
