"""`make demo` end to end (python -m demo): every step runs, everything started is stopped,
also when it is interrupted with Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def leftovers(workdir: Path) -> list[str]:
    """Processes that belong to the demo: its path in their command line, cwd or HOME."""
    found = []
    mark = str(workdir)
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            home = proc.environ().get("HOME", "")
        except psutil.Error:
            home = ""
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "") + " " + home
        if mark in text:
            found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])[:200]}")
    return found


def wait_gone(workdir: Path, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := leftovers(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.timeout(600)
def test_demo_runs_every_step_and_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "demo", "--workdir", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "Logged in as demo" in out
    assert "kbdaemon started" in out
    assert "token from kbdaemon" in out
    assert "499999500000" in out  # the query ran on the Spark server, through kbproxy
    assert "ExecutePlan" in out  # ... as kbproxy's own stats say
    assert "(the daemon's S3 proxy)" in out
    assert "1000 rows, equal to what was written" in out
    assert "kbdaemon stopped" in out
    assert re.search(r"DEMO[0-9a-f]{6,}", out) is None  # the token is never printed in full
    assert wait_gone(workdir) == []


def test_demo_interrupted_stops_what_it_started(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    seen: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "demo", "--workdir", str(workdir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                seen.append(line)
                if "Spark Connect server" in line:
                    break
            # The JVM is starting: Ctrl-C now must stop it, though it is not ready yet.
            deadline = time.monotonic() + 30
            while not any("java" in c for c in leftovers(workdir)):
                assert time.monotonic() < deadline, "the Spark server never started"
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            for line in proc.stdout:
                seen.append(line)
                if "Stopping everything" in line:
                    proc.send_signal(signal.SIGINT)  # a second Ctrl-C changes nothing
                    break
            seen.append(proc.stdout.read())  # until the demo exits
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = "".join(seen)
    assert proc.returncode == 130, output
    assert "interrupted: everything the demo started has been stopped" in output
    assert wait_gone(workdir) == []
