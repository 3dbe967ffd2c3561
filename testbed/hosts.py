"""A private /etc/hosts for one child process, so backends can have names without editing it.

How it works::

    unshare --mount (a mount namespace of the child's own) -> bind-mount our hosts file over
    /etc/hosts inside it -> exec the command

Only the child and its descendants see the names; the machine's /etc/hosts is never written,
and the namespace goes away with the child, also after a crash. Needs root (or user namespaces)
and util-linux's ``unshare``. gRPC resolves through the file when ``GRPC_DNS_RESOLVER=native``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path


def hosts_launcher(names: Mapping[str, str], workdir: Path) -> list[str]:
    """A command prefix that runs the rest of its command line with ``names`` in /etc/hosts.

    Args:
        names: host name -> loopback address (127.0.0.0/8).
        workdir: where the hosts file is written.
    Raises:
        RuntimeError: no ``unshare``, or mount namespaces are not allowed here.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError("a private /etc/hosts needs unshare: apt-get install util-linux")
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "hosts"
    lines = ["127.0.0.1 localhost"] + [f"{addr} {name}" for name, addr in names.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    launcher = [unshare, "--mount", "--propagation", "private", "sh", "-c"]
    launcher += [
        'mount --bind "$0" /etc/hosts && exec env GRPC_DNS_RESOLVER=native "$@"',
        str(path),
    ]
    probe = subprocess.run(
        [*launcher, "true"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        raise RuntimeError(
            "a private /etc/hosts needs a mount namespace (run as root, or allow user "
            f"namespaces): {probe.stderr.strip()}"
        )
    return launcher
