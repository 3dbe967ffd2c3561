"""kbproxy's data planes against a direct connection and nginx `grpc_pass`, on one Spark server.

Measured in one run, each figure the median of several rounds taken in turn (direct, each
kbproxy data plane, nginx; the sequential unary calls alternate between targets every
UNARY_CALLS / UNARY_CHUNKS calls) so that machine noise hits all of them alike:

- the latency a small unary call (Config get) gains through each proxy, p50 and p99;
- the time of a 200 MB Arrow result (pyspark ``toArrow()``, 8 partitions);
- calls per second with 50 concurrent clients (one channel each, grpc.aio, one process);
- each kbproxy's CPU time per relayed call, its own and its child processes' (Envoy) apart;
  the RSS of its whole process tree when idle and its peak under load;
- Auth2 requests per token per cache window (each kbproxy has a dev auth of its own, which
  sends ``cachefor`` of CACHE_WINDOW_S);
- behind nginx configured as ingress-nginx (testbed.ingress: TLS, http2, upstream keepalive
  320), 4 users calling at once for INGRESS_SECONDS through each data plane and straight to
  Spark: calls/s, p50/p99 and failed attempts (there must be none).

The data planes are DATA_PLANES: name -> the extra `kbproxy serve` args. ``BENCH_SMOKE=1``
shrinks every count to prove the benchmark runs (its figures mean nothing).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
import os
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil

from benchmarks.stats import median, percentile, ratio
from testbed.auth import DevAuthServer, start_dev_auth
from testbed.hostile import TreeRss, tree_rss
from testbed.ingress import start_nginx_grpc, start_nginx_ingress, tls_files
from testbed.load import LoadUser, run_users
from testbed.proxy import KbproxyServer, start_kbproxy
from testbed.spark import start_spark_connect

# The data planes under test: name -> extra `kbproxy serve` args.
DATA_PLANES: dict[str, list[str]] = {
    "envoy": ["--data-plane", "envoy"],
    "grpc": ["--data-plane", "grpc"],
}
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
TOKEN = "BENCHTOKEN0123456789abcdef"
INGRESS_USERS = {f"user{i}": f"BENCHUSER{i}TOKEN0123456789ab" for i in range(4)}
CACHE_WINDOW_S = 20
ROUNDS = 1 if SMOKE else 3
UNARY_CALLS = 150 if SMOKE else 1500
UNARY_CHUNKS = 15  # the targets take turns every UNARY_CALLS / UNARY_CHUNKS calls
ARROW_ROWS = 125_000 if SMOKE else 12_500_000  # two bigint columns: 200 MB
CONCURRENCY = 50
THROUGHPUT_SECONDS = 1.0 if SMOKE else 5.0
INGRESS_SECONDS = 2.0 if SMOKE else 10.0
CONFIG_METHOD = "/spark.connect.SparkConnectService/Config"


def config_request() -> bytes:
    from pyspark.sql.connect.proto import base_pb2

    request = base_pb2.ConfigRequest(
        session_id=str(uuid.uuid4()), user_context=base_pb2.UserContext(user_id="alice")
    )
    request.operation.get.keys.append("spark.sql.shuffle.partitions")
    data: bytes = request.SerializeToString()
    return data


METADATA = (("x-kbase-token", TOKEN),)


def unary_latencies(address: str, calls: int) -> list[float]:
    return interleaved_latencies({address: address}, calls, 1)[address]


def interleaved_latencies(
    addresses: dict[str, str], calls: int, chunks: int = UNARY_CHUNKS
) -> dict[str, list[float]]:
    """``calls`` sequential calls per target, taken in turn in ``chunks`` slices."""
    request = config_request()
    channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
    latencies: dict[str, list[float]] = {name: [] for name in addresses}
    try:
        configs = {name: ch.unary_unary(CONFIG_METHOD) for name, ch in channels.items()}
        for config in configs.values():
            for _ in range(100):
                config(request, metadata=METADATA)
        for _ in range(chunks):
            for name, config in configs.items():
                for _ in range(calls // chunks):
                    started = time.perf_counter()
                    config(request, metadata=METADATA)
                    latencies[name].append(time.perf_counter() - started)
    finally:
        for channel in channels.values():
            channel.close()
    return latencies


def arrow_seconds(spark: Any) -> float:
    started = time.perf_counter()
    table = spark.range(0, ARROW_ROWS, 1, 8).selectExpr("id", "id * 2 AS b").toArrow()
    elapsed = time.perf_counter() - started
    assert table.num_rows == ARROW_ROWS and table.nbytes >= ARROW_ROWS * 16
    return elapsed


async def _throughput(address: str) -> tuple[float, int]:
    request = config_request()
    stop_at = time.perf_counter() + THROUGHPUT_SECONDS
    counts = [0] * CONCURRENCY

    async def client(index: int) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            config = channel.unary_unary(CONFIG_METHOD)
            await config(request, metadata=METADATA)
            while time.perf_counter() < stop_at:
                await config(request, metadata=METADATA)
                counts[index] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(CONCURRENCY)))
    return sum(counts) / (time.perf_counter() - started), sum(counts) + CONCURRENCY


def throughput(address: str) -> tuple[float, int]:
    """Calls per second with CONCURRENCY clients, and the number of calls made."""
    return asyncio.run(_throughput(address))


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _cpu_split(process: psutil.Process) -> tuple[float, float]:
    """CPU seconds of the process itself and of its live descendants (Envoy), apart."""
    children = 0.0
    for child in process.children(recursive=True):
        try:
            children += _cpu_seconds(child)
        except psutil.NoSuchProcess:
            continue
    return _cpu_seconds(process), children


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def _row(plane: str) -> str:
    return f"kbproxy-{plane}"


def _ingress_round(
    base: Path, upstreams: dict[str, str], users: list[LoadUser]
) -> dict[str, dict[str, float]]:
    """4 users through nginx-as-ingress in front of each upstream: rate, latency, failures."""
    tls = tls_files(base / "tls")
    figures: dict[str, dict[str, float]] = {}
    for name, upstream in upstreams.items():
        ingress = start_nginx_ingress(base / f"ingress-{name}", upstream, tls)
        try:
            tallies = run_users(
                users, functools.partial(ingress.channel, own_connection=True), INGRESS_SECONDS
            )
        finally:
            ingress.stop()
        latencies = [x for t in tallies.values() for x in t.latencies]
        oks = [t.ok for t in tallies.values()]
        figures[name] = {
            "calls_per_s": sum(oks) / INGRESS_SECONDS,
            "p50_ms": percentile(latencies, 50) * 1000 if latencies else math.nan,
            "p99_ms": percentile(latencies, 99) * 1000 if latencies else math.nan,
            "failed_attempts": sum(sum(t.failures.values()) for t in tallies.values()),
            "least_user_share": min(oks) / max(oks) if max(oks) else 0.0,
        }
    return figures


def run(workdir: Path) -> None:
    from pyspark.sql import SparkSession

    base = workdir / "proxy"
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        spark_server = start_spark_connect(base / "spark")
        stack.callback(spark_server.stop)
        users = {"alice": TOKEN, **INGRESS_USERS}
        tokens = {t: {"user": u, "mfa": "Used", "expires": None} for u, t in users.items()}
        backend_map = dict.fromkeys(users, spark_server.address)
        auths: dict[str, DevAuthServer] = {}
        proxies: dict[str, KbproxyServer] = {}
        for plane, args in DATA_PLANES.items():
            # A dev auth of its own per kbproxy, so that each counts one kbproxy's requests.
            auths[plane] = auth = start_dev_auth(
                base / f"auth-{plane}", tokens, cachefor_ms=CACHE_WINDOW_S * 1000
            )
            stack.callback(auth.stop)
            proxies[plane] = proxy = start_kbproxy(
                base / f"kbproxy-{plane}",
                auth_url=auth.url,
                backend_map=backend_map,
                extra_args=["--log-level", "WARNING", *args],
            )
            stack.callback(proxy.stop)
        nginx, nginx_port = start_nginx_grpc(base / "nginx", spark_server.address)
        stack.callback(nginx.stop)
        targets = {
            "direct": spark_server.address,
            **{_row(plane): proxy.address for plane, proxy in proxies.items()},
            "nginx": f"127.0.0.1:{nginx_port}",
        }
        first_auth_call = time.monotonic()
        for proxy in proxies.values():
            unary_latencies(proxy.address, 10)
        processes = {_row(p): psutil.Process(proxy.child.pid) for p, proxy in proxies.items()}
        idle_rss = {name: tree_rss(process.pid) for name, process in processes.items()}
        p50: dict[str, list[float]] = {name: [] for name in targets}
        p99: dict[str, list[float]] = {name: [] for name in targets}
        arrow: dict[str, list[float]] = {name: [] for name in targets}
        rate: dict[str, list[float]] = {name: [] for name in targets}
        # CPU time per relayed call (own, children): steadier than latency on a busy machine.
        cpu_seq: dict[str, list[tuple[float, float]]] = {name: [] for name in processes}
        cpu_many: dict[str, list[tuple[float, float]]] = {name: [] for name in processes}
        sessions: dict[str, Any] = {}
        for name, address in targets.items():
            sessions[name] = spark = SparkSession.builder.remote(
                f"sc://{address}/;x-kbase-token={TOKEN};user_id=alice"
            ).create()
            stack.callback(spark.stop)
            arrow_seconds(spark)  # warm-up: JIT, caches, connections
        peaks = {name: stack.enter_context(TreeRss(p.pid)) for name, p in processes.items()}
        for round_ in range(ROUNDS):
            before = {name: _cpu_split(process) for name, process in processes.items()}
            by_target = interleaved_latencies(targets, UNARY_CALLS)
            for name, process in processes.items():
                calls = len(by_target[name]) + 100  # with the warm-up calls
                own, children = _cpu_split(process)
                cpu_seq[name].append(
                    ((own - before[name][0]) / calls, (children - before[name][1]) / calls)
                )
            for name, latencies in by_target.items():
                p50[name].append(percentile(latencies, 50))
                p99[name].append(percentile(latencies, 99))
            for name in targets:
                arrow[name].append(arrow_seconds(sessions[name]))
            for name, address in targets.items():
                started = _cpu_split(processes[name]) if name in processes else (0.0, 0.0)
                per_second, calls = throughput(address)
                rate[name].append(per_second)
                if name in processes:
                    own, children = _cpu_split(processes[name])
                    cpu_many[name].append(
                        ((own - started[0]) / calls, (children - started[1]) / calls)
                    )
            print(f"round {round_ + 1}/{ROUNDS} done", flush=True)
        elapsed = time.monotonic() - first_auth_call
        direct_p50, direct_p99 = median(p50["direct"]), median(p99["direct"])
        for name in targets:
            results[name] = {
                "p50_ms": median(p50[name]) * 1000,
                "p99_ms": median(p99[name]) * 1000,
                "added_p50_ms": (median(p50[name]) - direct_p50) * 1000,
                "added_p99_ms": (median(p99[name]) - direct_p99) * 1000,
                "arrow_200mb_s": median(arrow[name]),
                "calls_per_s_50_clients": median(rate[name]),
            }
        for name in processes:
            results[name].update(
                {
                    "cpu_us_per_call_sequential": median([c[0] for c in cpu_seq[name]]) * 1e6,
                    "child_cpu_us_per_call_sequential": median([c[1] for c in cpu_seq[name]]) * 1e6,
                    "cpu_us_per_call_50_clients": median([c[0] for c in cpu_many[name]]) * 1e6,
                    "child_cpu_us_per_call_50_clients": median([c[1] for c in cpu_many[name]])
                    * 1e6,
                    "rss_idle": idle_rss[name],
                    "rss_peak_under_load": peaks[name].sample.peak,
                }
            )
        windows = math.ceil(elapsed / CACHE_WINDOW_S)
        for plane, auth in auths.items():
            requests = auth.stats().get("token", 0)
            results[_row(plane)]["auth2_requests_per_token_per_window"] = requests / windows
        load_users = [
            LoadUser(name, token, str(spark_server.port)) for name, token in INGRESS_USERS.items()
        ]
        upstreams = {"direct": spark_server.address}
        upstreams |= {_row(plane): proxy.address for plane, proxy in proxies.items()}
        results["behind_ingress"] = _ingress_round(base, upstreams, load_users)
    _report(results)
    (workdir / "proxy.json").write_text(json.dumps(results, indent=2))


def _report(results: dict[str, Any]) -> None:
    rows = ["direct", *(_row(plane) for plane in DATA_PLANES), "nginx"]
    direct, nginx = results["direct"], results["nginx"]
    print(f"medians of {ROUNDS} rounds; unary = Config get, {UNARY_CALLS} sequential calls")
    print(
        f"{'':16} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
        f"{'200MB s':>8} {'calls/s':>8}"
    )
    for name in rows:
        row = results[name]
        print(
            f"{name:16} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} {row['added_p50_ms']:8.3f} "
            f"{row['added_p99_ms']:8.3f} {row['arrow_200mb_s']:8.2f} "
            f"{row['calls_per_s_50_clients']:8.0f}"
        )
    for plane in DATA_PLANES:
        row = results[_row(plane)]
        print(
            f"{_row(plane)}: added p50 / nginx's "
            f"{ratio(row['added_p50_ms'], nginx['added_p50_ms'])}"
            f"; 200 MB / direct {ratio(row['arrow_200mb_s'], direct['arrow_200mb_s'])}"
            f"; 50-client calls/s / nginx's "
            f"{ratio(row['calls_per_s_50_clients'], nginx['calls_per_s_50_clients'])}"
        )
        print(
            f"  CPU per call: own {row['cpu_us_per_call_sequential']:.0f} us sequential, "
            f"{row['cpu_us_per_call_50_clients']:.0f} us with 50 clients; child processes "
            f"{row['child_cpu_us_per_call_sequential']:.0f} us / "
            f"{row['child_cpu_us_per_call_50_clients']:.0f} us"
        )
        print(
            f"  RSS (process tree) idle {_mib(row['rss_idle'])}, peak under load "
            f"{_mib(row['rss_peak_under_load'])}; Auth2 requests per token per "
            f"{CACHE_WINDOW_S} s window {row['auth2_requests_per_token_per_window']:.2f}"
        )
    planes = list(DATA_PLANES)
    for a, b in itertools.pairwise(planes):
        print(
            f"added p50 {_row(a)} / {_row(b)}: "
            + ratio(results[_row(a)]["added_p50_ms"], results[_row(b)]["added_p50_ms"])
        )
    print(f"behind nginx as ingress-nginx, {len(INGRESS_USERS)} users for {INGRESS_SECONDS:.0f} s:")
    print(f"{'':16} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>8} {'least/most':>10}")
    behind = results["behind_ingress"]
    for name, row in behind.items():
        print(
            f"{name:16} {row['calls_per_s']:8.0f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
            f"{row['failed_attempts']:8d} {row['least_user_share']:10.2f}"
        )


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".bench").resolve())
