"""Podman on this kind of machine: private storage, runc, the host network, a local base image.

How it works, in the order a test uses it:

1. ``Podman(root)`` writes a ``containers.conf`` (runtime runc: crun cannot run containers in
   a hybrid cgroup hierarchy; cgroupfs; ulimits the host grants, since podman's defaults are
   refused) and a ``storage.conf`` whose graph and run roots are under ``root``. Every command
   gets ``CONTAINERS_CONF`` and ``CONTAINERS_STORAGE_CONF`` pointing there, so nothing touches
   the machine's own container storage; ``close()`` removes it all.
2. ``base_image()`` stands in for ``python:3.11-slim`` (no registry here): a Debian bookworm
   root file system made by ``mmdebstrap`` with python3, venv and pip, cached as a tar in
   ``testbed.cache``, then ``podman import``-ed.
3. ``build()`` builds a Dockerfile with ``--network host`` and ``--format docker`` (the
   HEALTHCHECK is kept), the host's CA bundle mounted read-only for the build only (pip then
   trusts what the host trusts; the bundle is not in any layer).
4. ``run()`` and ``start()`` run containers with ``--network host``: a container's loopback is
   the host's, so the test talks to it on 127.0.0.1.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from testbed.cache import cached
from testbed.procs import ChildProcess

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
BASE_TAG = f"localhost/kbsc-python:{SUITE}"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
NPROC_MAX = 16384


class PodmanUnavailable(RuntimeError):
    """Podman, runc or mmdebstrap is missing or cannot run here; the message says what to do."""


def _require(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise PodmanUnavailable(
            f"{program} is missing: apt-get install {package} (tools/debian-packages.txt; "
            "`make test` as root installs it)"
        )
    return path


def _ulimits() -> list[str]:
    _, nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    if nproc == resource.RLIM_INFINITY or nproc > NPROC_MAX:
        nproc = NPROC_MAX
    return [f"nofile={nofile}:{nofile}", f"nproc={nproc}:{nproc}"]


class Podman:
    """The ``podman`` command with its own configuration and storage under ``root``."""

    def __init__(self, root: Path) -> None:
        self.exe = _require("podman", "podman")
        self.runtime = _require("runc", "runc")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        conf = root / "containers.conf"
        ulimits = ", ".join(f'"{u}"' for u in _ulimits())
        conf.write_text(
            "[containers]\n"
            f"default_ulimits = [{ulimits}]\n"
            'netns = "host"\n'
            "[engine]\n"
            f'runtime = "{self.runtime}"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            # File locks in tmp_dir: the shm default is one segment for all of root's podmans.
            'lock_type = "file"\n'
            f'events_logfile_path = "{root / "events.log"}"\n'
            f'tmp_dir = "{root / "tmp"}"\n'
            "[engine.runtimes]\n"
            f'runc = ["{self.runtime}"]\n'
            "[network]\n"
            f'network_config_dir = "{root / "networks"}"\n',
            encoding="utf-8",
        )
        storage = root / "storage.conf"
        storage.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{root / "graph"}"\n'
            f'runroot = "{root / "run"}"\n',
            encoding="utf-8",
        )
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "CONTAINERS_STORAGE_CONF": str(storage),
            "CONTAINERS_REGISTRIES_CONF": str(self._registries()),
        }

    def _registries(self) -> Path:
        path = self.root / "registries.conf"
        path.write_text("unqualified-search-registries = []\n", encoding="utf-8")
        return path

    def argv(self, args: Sequence[str]) -> list[str]:
        return [self.exe, *args]

    def __call__(
        self, args: Sequence[str], *, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS``, output captured; with ``check``, a failure raises with it."""
        done = subprocess.run(
            self.argv(args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise PodmanUnavailable(
                f"podman {' '.join(args[:2])} failed with exit code {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def start(self, args: Sequence[str], *, log_path: Path) -> ChildProcess:
        """``podman ARGS`` as a child process (e.g. ``run`` in the foreground), output to a log."""
        return ChildProcess(self.argv(args), log_path=log_path, env=self.env)

    def close(self) -> None:
        """Remove every container, then the storage itself (images and all)."""
        self(["rm", "--all", "--force", "--time", "0"], check=False)
        for mount in reversed(_mounts_under(self.root)):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        points = [line.split()[1] for line in mounts]
    return [p for p in points if p.startswith(prefix)]


def _debootstrap(out: Path) -> None:
    mmdebstrap = _require("mmdebstrap", "mmdebstrap")
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    mirror = [str(sources)] if sources.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "rootfs.tar"
        argv = [mmdebstrap, "--quiet", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES)]
        argv += [SUITE, str(tar), *mirror]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise PodmanUnavailable(
                f"mmdebstrap could not make the base image (a Debian mirror must be reachable "
                f"once; it is then cached):\n{done.stderr[-3000:]}"
            )
        shutil.move(tar, out)


def base_image(podman: Podman) -> str:
    """A local stand-in for ``python:3.11-slim-bookworm``, imported into ``podman``; its tag."""
    tar = cached(f"debian-{SUITE}-{'-'.join(BASE_PACKAGES)}.tar", _debootstrap)
    podman(
        [
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            'CMD ["python3"]',
            str(tar),
            BASE_TAG,
        ],
        timeout=300,
    )
    return BASE_TAG


def build(
    podman: Podman,
    *,
    context: Path,
    dockerfile: Path,
    tag: str,
    build_args: dict[str, str],
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """Build ``dockerfile`` in ``context`` as ``tag``, offline but for pip's package index."""
    argv = ["build", "--network", "host", "--format", "docker", "--pull=never", "--layers"]
    argv += ["-f", str(dockerfile), "-t", tag]
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    if HOST_CA_BUNDLE.exists():
        argv += ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    return podman([*argv, str(context)], timeout=timeout)
