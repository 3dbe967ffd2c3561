"""README's install that works today: `make dist` builds the wheel, a fresh venv installs it,
and its `kbdaemon` and `python -m kbclient` run from there.

Offline like tests/packaging: the wheel is built with the venv's hatchling (no build isolation)
and installed with --no-deps --no-index; the dependencies (pyspark, aiohttp, ...) come from this
test venv's site-packages through a path entry, so only the wheel's own files are new.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import kbclient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run outside the checkout (a cwd of it would put its kbclient first on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=300, check=False, env=env, cwd=cwd
    )


def test_make_dist_wheel_installs_and_runs_in_a_fresh_venv(tmp_path: Path) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is missing: apt-get install make")
    dist = tmp_path / "dist"
    built = run(
        [make, "-C", str(REPO), "dist", f"DIST={dist}", f"BIN={Path(sys.executable).parent}"],
        tmp_path,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = sorted(dist.glob("kbase_spark_connect-*.whl"))
    assert len(wheels) == 1, built.stdout
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "kbclient/py.typed" in names and "kbdaemon/cli.py" in names
    assert "kbdaemon/_packaging/systemd/kbdaemon.service" in names
    assert not any(name.startswith(("tests/", "testbed/", "server/")) for name in names)

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    fresh_python = env_dir / "bin" / "python"
    purelib = Path(
        run(
            [str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            tmp_path,
        ).stdout.strip()
    )
    # Dependencies from this venv (appended after the fresh site-packages, .pth files of it
    # not run, so this checkout's editable kbclient stays out of sight).
    (purelib / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    installed = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(fresh_python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheels[0]),
        ],
        tmp_path,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    where = run(
        [str(fresh_python), "-c", "import kbclient, kbdaemon; print(kbclient.__file__)"], tmp_path
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(purelib), where.stdout

    helped = run([str(env_dir / "bin" / "kbdaemon"), "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "login" in helped.stdout

    version = run([str(fresh_python), "-m", "kbclient", "--version"], tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith(f"kbclient {kbclient.__version__} ")
