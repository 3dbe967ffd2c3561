"""The local S3 proxy against a client fetching pre-signed URLs itself and against nginx.

One SeaweedFS and one Delta Lake Proxy emulator (pre-signing for SeaweedFS directly) serve every
measurement of the run:

1. a 1 GiB GET: direct (curl fetches the pre-signed URL the emulator redirects to), through
   ``kbdaemon s3-proxy``, and through nginx following the redirect itself (DESIGN "Baselines":
   ``error_page 307 = @follow``, ``proxy_pass $upstream_http_location``, Authorization and the
   client's signing headers cleared); curl is the client, its output goes to /dev/null;
2. 1,000 ranged 64 KiB GETs from one keep-alive httpx client: direct (two requests, the 307 and
   the pre-signed GET), through the proxy and through nginx; p50/p99 of each and the proxy's added
   latency over direct;
3. the proxy's peak RSS while 4 curl clients each download the 1 GiB object at once;
4. the cost of re-signing: the ranged GETs of 2 also go through a second proxy that re-signs
   each request with keys of its own (``--access-key-env``), p50 against the plain proxy's and
   the median of the per-request differences.

``BENCH_S3_SMOKE=1`` runs it with a 64 MiB object, one run and 50 ranged GETs: a quick proof that
the benchmark works, not figures to report.

Medians of several runs, interleaved; ratios against the baselines of the same run. CPU seconds
of the proxy and of SeaweedFS are printed beside the throughputs: on 2 cores they say what limited
each figure.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.stats import median, percentile, ratio
from testbed.ingress import require_nginx
from testbed.procs import ChildProcess, PeakRss, free_port, port_open
from testbed.s3 import (
    ACCESS_KEY,
    BUCKET,
    SECRET_KEY,
    put_large_object,
    s3_stack,
    start_proxy_process,
)

SMOKE = os.environ.get("BENCH_S3_SMOKE") == "1"
SIZE = 64 << 20 if SMOKE else 1 << 30
KEY = "bench/1GiB.bin"
RUNS = 1 if SMOKE else 5
RANGED = 50 if SMOKE else 1000
RANGE_SIZE = 64 * 1024
CONCURRENT = 4
# What a real SDK sends: the proxy and nginx must drop these on the followed request.
CLIENT_HEADERS = {
    "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/s3/"
    "aws4_request, SignedHeaders=host;x-amz-date, Signature=0123456789abcdef",
    "X-Amz-Date": "20260101T000000Z",
    "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD",
    "amz-sdk-invocation-id": "bench",
}

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp;
    proxy_temp_path {workdir}/tmp;
    fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp;
    scgi_temp_path {workdir}/tmp;
    upstream delta_lake_proxy {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 100000;
        client_max_body_size 0;
        location / {{
            proxy_pass http://delta_lake_proxy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_intercept_errors on;
            error_page 307 = @follow;
        }}
        location @follow {{
            set $presigned $upstream_http_location;
            proxy_pass $presigned;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header X-Amz-Date "";
            proxy_set_header X-Amz-Content-SHA256 "";
            proxy_set_header X-Amz-Security-Token "";
            proxy_set_header amz-sdk-invocation-id "";
            proxy_set_header amz-sdk-request "";
            proxy_buffering on;
            proxy_buffer_size 256k;
            proxy_buffers 16 256k;
            proxy_busy_buffers_size 512k;
            proxy_max_temp_file_size 0;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def start_nginx(workdir: Path, upstream_port: int) -> tuple[ChildProcess, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workdir=workdir, upstream_port=upstream_port, port=port))
    child = ChildProcess([require_nginx(), "-c", str(conf)], log_path=workdir / "nginx.log")
    child.wait_until(lambda: port_open("127.0.0.1", port), timeout=30, what="nginx")
    return child, f"http://127.0.0.1:{port}"


def header_args(headers: dict[str, str] | None) -> list[str]:
    return [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]


def curl_get(url: str, headers: dict[str, str] | None = None) -> tuple[float, int]:
    """(seconds, bytes) of a GET by curl to /dev/null."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total} %{size_download} %{http_code}"]
    argv += header_args(headers)
    out = subprocess.run([*argv, url], check=True, capture_output=True, text=True).stdout
    seconds, size, code = out.split()
    if code not in ("200", "206"):
        raise RuntimeError(f"GET gave HTTP {code}")
    return float(seconds), int(size)


def presigned(emulator_url: str, key: str, range_header: str | None = None) -> str:
    headers = {"Range": range_header} if range_header else {}
    response = httpx.get(f"{emulator_url}/{BUCKET}/{key}", headers=headers, timeout=10)
    if response.status_code != 307:
        raise RuntimeError(f"the emulator answered {response.status_code}, not 307")
    return response.headers["Location"]


def cpu_seconds(pid: int) -> float:
    process = psutil.Process(pid)
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        total += sum(child.cpu_times()[:2])
    return total


def throughput(
    endpoints: dict[str, str], emulator_url: str, pids: dict[str, int]
) -> dict[str, Any]:
    """Median MB/s of each path, paired ratios, and CPU seconds each server spent per GET."""
    results: dict[str, list[float]] = {name: [] for name in ("direct", *endpoints)}
    cpu: dict[str, list[float]] = {f"{n}_{w}": [] for n in results for w in pids}
    for run in range(RUNS):
        for name in results:
            url = (
                presigned(emulator_url, KEY)
                if name == "direct"
                else endpoints[name] + f"/{BUCKET}/{KEY}"
            )
            before = {w: cpu_seconds(pid) for w, pid in pids.items()}
            seconds, size = curl_get(url, None if name == "direct" else CLIENT_HEADERS)
            after = {w: cpu_seconds(pid) for w, pid in pids.items()}
            assert size == SIZE, f"{name} got {size} bytes"
            results[name].append(size / seconds / 1e6)
            for w in pids:
                cpu[f"{name}_{w}"].append(after[w] - before[w])
        print(
            f"  run {run + 1}/{RUNS}: "
            + ", ".join(f"{n} {v[-1]:.0f} MB/s" for n, v in results.items()),
            flush=True,
        )
    figures = {f"{n}_MBps": median(v) for n, v in results.items()}
    for name in endpoints:  # ratios of GETs made back to back: less noise from other load
        figures[f"{name}_vs_direct_paired"] = median(
            [a / b for a, b in zip(results[name], results["direct"], strict=True)]
        )
    figures["proxy_vs_nginx_paired"] = median(
        [a / b for a, b in zip(results["proxy"], results["nginx"], strict=True)]
    )
    figures.update({f"{k}_cpu_s": median(v) for k, v in cpu.items()})
    return figures


def ranged(endpoints: dict[str, str], emulator_url: str) -> dict[str, Any]:
    rng = random.Random(7)
    offsets = [rng.randrange(0, SIZE - RANGE_SIZE) for _ in range(RANGED)]
    latencies: dict[str, list[float]] = {name: [] for name in ("direct", *endpoints)}
    clients = {name: httpx.Client(timeout=30) for name in latencies}
    try:
        for name, client in clients.items():  # warm the connections
            client.get(
                f"{emulator_url if name == 'direct' else endpoints[name]}/{BUCKET}/{KEY}",
                headers={"Range": "bytes=0-0"},
                follow_redirects=True,
            )
        for offset in offsets:
            header = {"Range": f"bytes={offset}-{offset + RANGE_SIZE - 1}"}
            for name, client in clients.items():
                started = time.perf_counter()
                if name == "direct":
                    first = client.get(f"{emulator_url}/{BUCKET}/{KEY}", headers=header)
                    response = client.get(first.headers["Location"], headers=header)
                else:
                    response = client.get(
                        f"{endpoints[name]}/{BUCKET}/{KEY}", headers={**header, **CLIENT_HEADERS}
                    )
                elapsed = time.perf_counter() - started
                if response.status_code != 206 or len(response.content) != RANGE_SIZE:
                    raise RuntimeError(f"{name}: ranged GET gave {response.status_code}")
                latencies[name].append(elapsed * 1000)
    finally:
        for client in clients.values():
            client.close()
    figures: dict[str, Any] = {}
    for name, values in latencies.items():
        figures[f"{name}_p50_ms"] = percentile(values, 50)
        figures[f"{name}_p99_ms"] = percentile(values, 99)
    for name in endpoints:
        figures[f"{name}_added_p50_ms"] = figures[f"{name}_p50_ms"] - figures["direct_p50_ms"]
        figures[f"{name}_added_p99_ms"] = figures[f"{name}_p99_ms"] - figures["direct_p99_ms"]
    if "resigning" in latencies:
        figures["resigning_cost_paired_ms"] = median(
            [a - b for a, b in zip(latencies["resigning"], latencies["proxy"], strict=True)]
        )
    return figures


def peak_rss_concurrent(proxy_url: str, proxy_pid: int) -> dict[str, Any]:
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}"]
    argv += [*header_args(CLIENT_HEADERS), f"{proxy_url}/{BUCKET}/{KEY}"]
    with PeakRss(proxy_pid) as rss:
        started = time.monotonic()
        downloads = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(CONCURRENT)
        ]
        sizes = [int(p.communicate()[0]) for p in downloads]
        seconds = time.monotonic() - started
    assert sizes == [SIZE] * CONCURRENT, sizes
    return {
        "idle_rss_MB": rss.idle / 1e6,
        "peak_rss_MB": rss.peak / 1e6,
        "aggregate_MBps": CONCURRENT * SIZE / seconds / 1e6,
    }


def run(workdir: Path) -> None:
    base = workdir / "s3"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    nginx_ready = require_nginx()  # before the servers start: installing may take a while
    print(f"nginx: {nginx_ready}", flush=True)
    with s3_stack(base, via_front=False) as (s3, emulator):
        print("uploading the 1 GiB object ...", flush=True)
        put_large_object(s3.client(), KEY, SIZE)
        proxy = start_proxy_process(base, emulator.url, verbose=False)
        resigning = start_proxy_process(
            base,
            emulator.url,
            "--access-key-env",
            "BENCH_S3_KEY",
            "--secret-key-env",
            "BENCH_S3_SECRET",
            verbose=False,
            env={"BENCH_S3_KEY": ACCESS_KEY, "BENCH_S3_SECRET": SECRET_KEY},
        )
        nginx, nginx_url = start_nginx(base / "nginx", emulator.port)
        try:
            endpoints = {"proxy": proxy.endpoint, "nginx": nginx_url}
            print("1 GiB GETs (curl client) ...", flush=True)
            pids = {"proxy": proxy.child.pid, "nginx": nginx.pid, "s3": s3.child.pid}
            tput = throughput(endpoints, emulator.url, pids)
            print(f"{RANGED} ranged 64 KiB GETs (httpx client, keep-alive) ...", flush=True)
            lat = ranged({**endpoints, "resigning": resigning.endpoint}, emulator.url)
            print(f"{CONCURRENT} concurrent 1 GiB GETs through the proxy ...", flush=True)
            rss = peak_rss_concurrent(proxy.endpoint, proxy.child.pid)
        finally:
            nginx.stop()
            resigning.stop()
            proxy.stop()
    figures = {"throughput": tput, "ranged": lat, "concurrent": rss}
    print()
    print(f"1 GiB GET, median of {RUNS}:")
    for name in ("direct", "proxy", "nginx"):
        print(
            f"  {name:7} {tput[f'{name}_MBps']:7.0f} MB/s"
            f"   CPU s per GET: proxy {tput[f'{name}_proxy_cpu_s']:4.2f}"
            f" nginx {tput[f'{name}_nginx_cpu_s']:4.2f} SeaweedFS {tput[f'{name}_s3_cpu_s']:4.2f}"
        )
    print(
        f"  proxy/direct {ratio(tput['proxy_MBps'], tput['direct_MBps'])} of medians, "
        f"{tput['proxy_vs_direct_paired']:.3f}x paired (goal >= 0.9x)"
    )
    print(
        f"  proxy/nginx  {ratio(tput['proxy_MBps'], tput['nginx_MBps'])} of medians, "
        f"{tput['proxy_vs_nginx_paired']:.3f}x paired (goal >= 1x)"
    )
    print(f"  nginx/direct {tput['nginx_vs_direct_paired']:.3f}x paired")
    print(
        f"  CPU per GiB relayed: proxy {tput['proxy_proxy_cpu_s']:.2f} s, "
        f"nginx {tput['nginx_nginx_cpu_s']:.2f} s "
        f"({ratio(tput['proxy_proxy_cpu_s'], tput['nginx_nginx_cpu_s'])} of nginx's)"
    )
    print(f"  machine load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{RANGED} ranged 64 KiB GETs:")
    for name in ("direct", "proxy", "nginx", "resigning"):
        print(
            f"  {name:9} p50 {lat[f'{name}_p50_ms']:6.2f} ms   p99 {lat[f'{name}_p99_ms']:6.2f} ms"
        )
    for name in ("proxy", "nginx"):
        print(
            f"  {name} added over direct: p50 {lat[f'{name}_added_p50_ms']:+.2f} ms, "
            f"p99 {lat[f'{name}_added_p99_ms']:+.2f} ms (goal p50 < 1 ms)"
        )
    print(
        f"  re-signing cost per request: p50 "
        f"{lat['resigning_p50_ms'] - lat['proxy_p50_ms']:+.2f} ms over the proxy without it, "
        f"{lat['resigning_cost_paired_ms']:+.2f} ms median of "
        "per-request differences"
    )
    print(
        f"{CONCURRENT} concurrent 1 GiB GETs: proxy RSS idle {rss['idle_rss_MB']:.0f} MB, "
        f"peak {rss['peak_rss_MB']:.0f} MB (goal < 100 MB), "
        f"aggregate {rss['aggregate_MBps']:.0f} MB/s"
    )
    (workdir / "s3.json").write_text(json.dumps(figures, indent=2))
