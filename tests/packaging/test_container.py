"""The kbproxy Dockerfile and the wheels, checked without building the image.

The image itself is built and run in test_image.py. Checked here, in seconds: the Dockerfile's
instructions as Docker's own (buildkit) parser reads them (stages, user, ports, health check),
the wheel it installs (built the same way, offline) and that wheel's dependency closure, imported
in an interpreter that sees nothing else: kbproxy imports, pyspark and keyring are absent. The
health check command is also run against a real `kbproxy serve` on the host.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from testbed.auth import start_dev_auth
from testbed.proxy import start_kbproxy

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "packaging" / "container" / "Dockerfile"
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q")
FORBIDDEN = {"pyspark", "keyring", "keyrings-alt", "pandas", "py4j", "kbase-spark-connect"}


def stages() -> list[list[Any]]:
    """The Dockerfile's instructions, parsed by the Docker's own (buildkit) parser, per stage."""
    try:
        import dockerfile
    except ImportError:
        pytest.fail("the dockerfile package parses the Dockerfile: pip install -e '.[test]'")
    result: list[list[Any]] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(command)
    return result


def first(stage: list[Any], cmd: str) -> Any:
    return next(c for c in stage if c.cmd == cmd)


def build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [*PIP_WHEEL, "--wheel-dir", str(out), str(source)],
        check=True,
        timeout=120,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions a set of requirements pulls in, transitively (no extras)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return found


def test_dockerfile_builds_a_slim_non_root_image_with_a_health_check() -> None:
    build, final = stages()
    text = DOCKERFILE.read_text(encoding="utf-8")

    assert final[0].value == ("${PYTHON_IMAGE}",)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.MULTILINE)
    build_run = first(build, "RUN").value[0]
    assert "pip wheel" in build_run and "./server" in build_run
    assert "pip uninstall --yes pip setuptools" in build_run
    # The final stage installs nothing: it copies the built virtualenv; no compilers, no pip.
    copies = [(c.flags, c.value) for c in final if c.cmd == "COPY"]
    assert copies == [(("--from=build",), ("/opt/kbproxy", "/opt/kbproxy"))]
    assert not any(c.cmd == "RUN" and "install" in c.value[0] for c in final)

    user = first(final, "USER").value[0].split(":")[0]
    assert user not in ("root", "0")
    assert set(first(final, "EXPOSE").value) == {"15002", "9090"}
    assert first(final, "ENTRYPOINT").value == ("kbproxy",)
    assert first(final, "CMD").value == ("serve",)

    health = first(final, "HEALTHCHECK")
    assert health.value[:2] == ("CMD", "python")
    assert "/healthz" in health.value[-1]
    assert not any(tool in " ".join(health.value) for tool in ("curl", "wget"))

    for command in build + final:
        words = " ".join(command.value)
        assert "keyring" not in words
        assert "pyspark" not in words.replace('import pyspark"', "")  # only the absence check


def test_healthcheck_command_asks_a_real_proxy(tmp_path: Path) -> None:
    _, final = stages()
    argv = list(first(final, "HEALTHCHECK").value[1:])
    assert argv[0] == "python"
    auth = start_dev_auth(tmp_path / "auth", {})
    try:
        proxy = start_kbproxy(
            tmp_path / "proxy", auth_url=auth.url, backend_template="spark-{username}.invalid:15002"
        )
        try:
            env = {"KBPROXY_STATS_LISTEN": f"127.0.0.1:{proxy.stats_port}", "PATH": "/usr/bin"}
            ok = subprocess.run([sys.executable, *argv[1:]], env=env, timeout=30, check=False)
            assert ok.returncode == 0
        finally:
            proxy.stop()
        down = subprocess.run(
            [sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30, check=False
        )
        assert down.returncode != 0, "the health check must fail when nothing answers"
    finally:
        auth.stop()


def test_server_wheel_pulls_no_pyspark_and_no_keyring(tmp_path: Path) -> None:
    wheel = build_wheel(ROOT / "server", tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
        zf.extractall(tmp_path / "unpacked")
    assert all(n.startswith(("kbproxy/", "kbase_spark_connect_proxy-")) for n in names)
    requires = [
        line.split(":", 1)[1].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    dists = closure(requires)
    assert FORBIDDEN.isdisjoint(dists), sorted(FORBIDDEN & set(dists))

    # Only the wheel and its closure on sys.path (no site-packages): kbproxy imports, the
    # workstation packages do not.
    site = tmp_path / "closure"
    for dist in dists.values():
        for file in dist.files or []:
            if file.parts[0] == "..":
                continue  # console scripts
            link = site / file
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(str(dist.locate_file(file))))
    code = (
        "import importlib.util, pkgutil, sys\n"
        f"sys.path[:0] = [{str(tmp_path / 'unpacked')!r}, {str(site)!r}]\n"
        "import kbproxy, kbproxy.cli\n"
        "for m in pkgutil.walk_packages(kbproxy.__path__, 'kbproxy.'):\n"
        "    if m.name != 'kbproxy.__main__': __import__(m.name)\n"
        "kbproxy.cli.build_parser().parse_args(['serve'])\n"
        "for name in ('pyspark', 'keyring', 'kbclient', 'kbdaemon', 'pandas'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "    assert name not in sys.modules, name\n"
        "print(kbproxy.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(tmp_path / "unpacked"))


def test_workstation_wheel_ships_the_autostart_templates(tmp_path: Path) -> None:
    wheel = build_wheel(ROOT, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for platform, relative in (
            ("linux", "systemd/kbdaemon.service"),
            ("macos", "launchd/us.kbase.kbdaemon.plist"),
            ("windows", "windows/kbdaemon-task.xml"),
        ):
            shipped = zf.read(f"kbdaemon/_packaging/{relative}").decode()
            assert shipped == (ROOT / "packaging" / relative).read_text(), platform
    assert not any(n.startswith("server/") or n.startswith("kbproxy/") for n in names)


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*"
    assert "!server/" in lines and "!constraints.txt" in lines
    sources = {c.value[0] for stage in stages() for c in stage if c.cmd == "COPY" and not c.flags}
    assert sources == {"constraints.txt", "server/"}
