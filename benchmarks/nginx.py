"""nginx for the baselines: Debian's nginx-light, installed with apt-get when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def require_nginx() -> str:
    """The nginx binary; installs nginx-light (as root, with apt-get) when there is none."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if nginx:
        return nginx
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("the nginx baseline needs nginx: apt-get install nginx-light")
    print("installing nginx-light for the baseline ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for args in (
        ["update", "-qq"],
        ["install", "-y", "-qq", "--no-install-recommends", "nginx-light"],
    ):
        subprocess.run(["apt-get", *lock, *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return shutil.which("nginx") or "/usr/sbin/nginx"
