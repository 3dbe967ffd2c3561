"""kbproxy against a direct connection and against nginx `grpc_pass`, on one Spark Connect server.

Measured in one run, each figure the median of several rounds taken in turn (direct, kbproxy,
nginx; the sequential unary calls alternate between targets every 100 calls) so that machine
noise hits all of them alike:

- the latency a small unary call (Config get) gains through each proxy, p50 and p99;
- the time of a 200 MB Arrow result (pyspark ``toArrow()``, 8 partitions);
- calls per second with 50 concurrent clients (one channel each, grpc.aio, one process);
- kbproxy's RSS when idle and its peak under load, and its CPU time per relayed call;
- the same unary and throughput figures for a second kbproxy whose calls all go through the
  gRPC relay (``--data-path grpc``), to show what the fast data path (the default) is worth;
- Auth2 requests per token per cache window (dev auth sends ``cachefor`` of CACHE_WINDOW_S).

nginx is Debian's nginx-light (installed with apt-get when missing), configured as DESIGN.md
"Baselines" says: HTTP/2 listener, upstream keepalive, raised keepalive_requests, no body limit,
long grpc timeouts, one worker process (kbproxy is one process too).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil

from benchmarks.nginx import require_nginx
from benchmarks.stats import median, percentile, ratio
from testbed.auth import start_dev_auth
from testbed.procs import ChildProcess, PeakRss, free_port, port_open
from testbed.proxy import start_kbproxy
from testbed.spark import start_spark_connect

TOKEN = "BENCHTOKEN0123456789abcdef"
CACHE_WINDOW_S = 20
ROUNDS = 3
UNARY_CALLS = 1500
UNARY_CHUNKS = 15  # the targets take turns every UNARY_CALLS / UNARY_CHUNKS calls
ARROW_ROWS = 12_500_000  # two bigint columns: 200 MB
CONCURRENCY = 50
THROUGHPUT_SECONDS = 5.0
CONFIG_METHOD = "/spark.connect.SparkConnectService/Config"
GRPC_ROW = "kbproxy-grpc"

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream spark {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        keepalive_requests 10000000;
        client_max_body_size 0;
        grpc_read_timeout 3600s;
        grpc_send_timeout 3600s;
        location / {{ grpc_pass grpc://spark; }}
    }}
}}
"""


def start_nginx(workdir: Path, upstream: int) -> tuple[ChildProcess, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workdir=workdir, upstream=upstream, port=port))
    child = ChildProcess([require_nginx(), "-c", str(conf)], log_path=workdir / "nginx.log")
    child.wait_until(lambda: port_open("127.0.0.1", port), timeout=30, what="nginx")
    return child, port


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
    assert table.num_rows == ARROW_ROWS and table.nbytes >= 200_000_000
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


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def run(workdir: Path) -> None:
    from pyspark.sql import SparkSession

    base = workdir / "proxy"
    spark_server = start_spark_connect(base / "spark")
    auth = start_dev_auth(
        base / "auth",
        {TOKEN: {"user": "alice", "mfa": "Used", "expires": None}},
        cachefor_ms=CACHE_WINDOW_S * 1000,
    )
    proxy = start_kbproxy(
        base / "kbproxy",
        auth_url=auth.url,
        backend_map={"alice": spark_server.address},
        extra_args=["--log-level", "WARNING"],
    )
    plain_auth = start_dev_auth(  # its own, so that `auth` counts kbproxy's requests only
        base / "auth-grpc",
        {TOKEN: {"user": "alice", "mfa": "Used", "expires": None}},
        cachefor_ms=CACHE_WINDOW_S * 1000,
    )
    grpc_path = start_kbproxy(
        base / "kbproxy-grpc",
        auth_url=plain_auth.url,
        backend_map={"alice": spark_server.address},
        extra_args=["--log-level", "WARNING", "--data-path", "grpc"],
    )
    nginx, nginx_port = start_nginx(base / "nginx", spark_server.port)
    targets = {
        "direct": spark_server.address,
        "kbproxy": proxy.address,
        "nginx": f"127.0.0.1:{nginx_port}",
    }
    call_targets = {**targets, GRPC_ROW: grpc_path.address}
    sessions: dict[str, Any] = {}
    results: dict[str, Any] = {}
    first_auth_call = time.monotonic()
    try:
        unary_latencies(proxy.address, 10)
        rss = psutil.Process(proxy.child.pid)
        idle_rss = rss.memory_info().rss
        p50: dict[str, list[float]] = {name: [] for name in call_targets}
        p99: dict[str, list[float]] = {name: [] for name in call_targets}
        arrow: dict[str, list[float]] = {name: [] for name in call_targets}
        rate: dict[str, list[float]] = {name: [] for name in call_targets}
        # CPU time of each kbproxy per relayed call: steadier than latency on a busy machine.
        proxies = {"kbproxy": rss, GRPC_ROW: psutil.Process(grpc_path.child.pid)}
        cpu_seq: dict[str, list[float]] = {name: [] for name in proxies}
        cpu_concurrent: dict[str, list[float]] = {name: [] for name in proxies}
        for name, address in targets.items():
            sessions[name] = SparkSession.builder.remote(
                f"sc://{address}/;x-kbase-token={TOKEN};user_id=alice"
            ).create()
            arrow_seconds(sessions[name])  # warm-up: JIT, caches, connections
        with PeakRss(proxy.child.pid) as peak:
            for round_ in range(ROUNDS):
                before = {name: _cpu_seconds(process) for name, process in proxies.items()}
                by_target = interleaved_latencies(call_targets, UNARY_CALLS)
                for name, process in proxies.items():
                    calls = len(by_target[name]) + 100  # with the warm-up calls
                    cpu_seq[name].append((_cpu_seconds(process) - before[name]) / calls)
                for name, latencies in by_target.items():
                    p50[name].append(percentile(latencies, 50))
                    p99[name].append(percentile(latencies, 99))
                for name in targets:
                    arrow[name].append(arrow_seconds(sessions[name]))
                for name, address in call_targets.items():
                    started_cpu = _cpu_seconds(proxies[name]) if name in proxies else 0.0
                    per_second, calls = throughput(address)
                    rate[name].append(per_second)
                    if name in proxies:
                        spent = _cpu_seconds(proxies[name]) - started_cpu
                        cpu_concurrent[name].append(spent / calls)
                print(f"round {round_ + 1}/{ROUNDS} done", flush=True)
        elapsed = time.monotonic() - first_auth_call
        auth_requests = auth.stats().get("token", 0)
        windows = math.ceil(elapsed / CACHE_WINDOW_S)
        direct_p50, direct_p99 = median(p50["direct"]), median(p99["direct"])
        for name in call_targets:
            results[name] = {
                "p50_ms": median(p50[name]) * 1000,
                "p99_ms": median(p99[name]) * 1000,
                "added_p50_ms": (median(p50[name]) - direct_p50) * 1000,
                "added_p99_ms": (median(p99[name]) - direct_p99) * 1000,
                "arrow_200mb_s": median(arrow[name]) if arrow[name] else None,
                "calls_per_s_50_clients": median(rate[name]),
            }
            if name in proxies:
                results[name]["cpu_us_per_call_sequential"] = median(cpu_seq[name]) * 1e6
                results[name]["cpu_us_per_call_50_clients"] = median(cpu_concurrent[name]) * 1e6
        results["kbproxy_rss"] = {"idle": idle_rss, "peak_under_load": peak.peak}
        results["auth2"] = {
            "requests": auth_requests,
            "cache_windows": windows,
            "requests_per_token_per_window": auth_requests / windows,
        }
    finally:
        for spark in sessions.values():
            spark.stop()
        nginx.stop()
        grpc_path.stop()
        proxy.stop()
        auth.stop()
        plain_auth.stop()
        spark_server.stop()
    _report(results)
    (workdir / "proxy.json").write_text(json.dumps(results, indent=2))


def _report(results: dict[str, Any]) -> None:
    direct, kbproxy, nginx = results["direct"], results["kbproxy"], results["nginx"]
    print(f"medians of {ROUNDS} rounds; unary = Config get, {UNARY_CALLS} sequential calls")
    print(
        f"{'':16} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
        f"{'200MB s':>8} {'calls/s':>8}"
    )
    rows = ("direct", "kbproxy", "nginx", GRPC_ROW)
    for name, row in ((name, results[name]) for name in rows):
        arrow = "-" if row["arrow_200mb_s"] is None else f"{row['arrow_200mb_s']:.2f}"
        print(
            f"{name:16} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} {row['added_p50_ms']:8.3f} "
            f"{row['added_p99_ms']:8.3f} {arrow:>8} {row['calls_per_s_50_clients']:8.0f}"
        )
    print(
        "added p50 kbproxy/nginx: "
        + ratio(kbproxy["added_p50_ms"], nginx["added_p50_ms"])
        + "; 200 MB kbproxy/direct: "
        + ratio(kbproxy["arrow_200mb_s"], direct["arrow_200mb_s"])
        + ", nginx/direct: "
        + ratio(nginx["arrow_200mb_s"], direct["arrow_200mb_s"])
        + "; throughput kbproxy/direct: "
        + ratio(kbproxy["calls_per_s_50_clients"], direct["calls_per_s_50_clients"])
        + ", nginx/direct: "
        + ratio(nginx["calls_per_s_50_clients"], direct["calls_per_s_50_clients"])
        + f"; {GRPC_ROW} added p50/kbproxy's: "
        + ratio(results[GRPC_ROW]["added_p50_ms"], kbproxy["added_p50_ms"])
        + ", throughput/kbproxy's: "
        + ratio(results[GRPC_ROW]["calls_per_s_50_clients"], kbproxy["calls_per_s_50_clients"])
    )
    for name in ("kbproxy", GRPC_ROW):
        print(
            f"{name} CPU per relayed call: "
            f"{results[name]['cpu_us_per_call_sequential']:.0f} us sequential, "
            f"{results[name]['cpu_us_per_call_50_clients']:.0f} us with 50 clients"
        )
    rss = results["kbproxy_rss"]
    print(f"kbproxy RSS idle {_mib(rss['idle'])}, peak under load {_mib(rss['peak_under_load'])}")
    auth = results["auth2"]
    print(
        f"Auth2: {auth['requests']} request(s) for one token over {auth['cache_windows']} cache "
        f"window(s) of {CACHE_WINDOW_S} s = {auth['requests_per_token_per_window']:.2f} per window"
    )


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".bench").resolve())
