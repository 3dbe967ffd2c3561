"""What tools read to find the S3 keys: shell exports and the AWS config profile, without I/O.

How it works: ``env_vars`` turns the daemon's ``S3Credentials`` into the variables tools expect,
``export_lines`` writes them for one shell; ``aws_profile_section`` is the ``~/.aws/config``
profile whose ``credential_process`` asks the daemon, and ``merge_section`` puts it into an
existing config file's text, replacing the profile of that name and keeping everything else::

    S3Credentials --env_vars--> [(name, value)] --export_lines(shell)--> lines to print
    endpoint, command --aws_profile_section--> [profile kbase] ... --merge_section(text)--> text

Variable names: the AWS SDKs' (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``), the KBase notebook image's (BERDataLakehouse
spark_notebook: ``MINIO_ENDPOINT_URL`` as host:port, the MinIO SDK's form, with ``MINIO_SECURE``;
``MINIO_ACCESS_KEY``, ``MINIO_SECRET_KEY``) and the names of its compose file (``S3_ENDPOINT``,
``S3_ACCESS_KEY``, ``S3_SECRET_KEY``). Both KBase sets are printed: code written for either works.
"""

from __future__ import annotations

import re
import shlex
from urllib.parse import urlsplit

from kbclient.daemon_api import S3Credentials

__all__ = [
    "SHELLS",
    "aws_profile_section",
    "env_vars",
    "export_lines",
    "merge_section",
]

SHELLS = ("sh", "fish", "powershell")


def env_vars(creds: S3Credentials) -> list[tuple[str, str]]:
    """The variables, in print order, for ``creds`` (endpoint ones only with an S3 proxy)."""
    out = [("AWS_ACCESS_KEY_ID", creds.access_key), ("AWS_SECRET_ACCESS_KEY", creds.secret_key)]
    if creds.session_token:
        out.append(("AWS_SESSION_TOKEN", creds.session_token))
    endpoint = creds.s3_endpoint
    if endpoint:
        out.append(("AWS_ENDPOINT_URL", endpoint))
    if endpoint:
        parts = urlsplit(endpoint)
        out.append(("MINIO_ENDPOINT_URL", parts.netloc))
        out.append(("MINIO_SECURE", "true" if parts.scheme == "https" else "false"))
    out += [("MINIO_ACCESS_KEY", creds.access_key), ("MINIO_SECRET_KEY", creds.secret_key)]
    if endpoint:
        out.append(("S3_ENDPOINT", endpoint))
    out += [("S3_ACCESS_KEY", creds.access_key), ("S3_SECRET_KEY", creds.secret_key)]
    return out


def _quote(value: str, shell: str) -> str:
    if shell == "sh":
        return shlex.quote(value)
    if shell == "fish":
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "'" + value.replace("'", "''") + "'"


def export_lines(variables: list[tuple[str, str]], shell: str) -> list[str]:
    """One assignment per variable, for ``shell`` (sh, fish or powershell).

    Raises:
        ValueError: an unknown shell.
    """
    if shell not in SHELLS:
        raise ValueError(f"unknown shell {shell!r}; use one of {', '.join(SHELLS)}")
    lines = []
    for name, value in variables:
        quoted = _quote(value, shell)
        if shell == "sh":
            lines.append(f"export {name}={quoted}")
        elif shell == "fish":
            lines.append(f"set -gx {name} {quoted};")
        else:
            lines.append(f"$env:{name} = {quoted}")
    return lines


def aws_profile_section(
    name: str, *, command: str, endpoint: str | None, region: str = "us-east-1"
) -> str:
    """The ``[profile NAME]`` block: keys from ``command``, requests to ``endpoint``."""
    lines = [f"[profile {name}]", f"credential_process = {command}", f"region = {region}"]
    if endpoint:
        lines.append(f"endpoint_url = {endpoint}")
    # The local proxy serves paths (http://127.0.0.1:PORT/bucket/key), not bucket host names.
    lines += ["s3 =", "    addressing_style = path"]
    return "\n".join(lines) + "\n"


def _header_name(line: str) -> str | None:
    match = re.match(r"^\s*\[\s*([^\]]+?)\s*\]\s*$", line)
    return match.group(1) if match else None


def merge_section(text: str, section: str) -> str:
    """``text`` (an AWS config file) with ``section`` in place of the block of its name.

    The block of the same header is replaced where it stands (up to the next header); with
    none, ``section`` is appended. Comments and other profiles stay as they are.
    """
    header = _header_name(section.splitlines()[0])
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _header_name(line) == header), None)
    if start is None:
        prefix = text if not text or text.endswith("\n") else text + "\n"
        gap = "\n" if prefix.strip() else ""
        return (prefix if prefix.strip() else "") + gap + section
    end = next(
        (i for i in range(start + 1, len(lines)) if _header_name(lines[i]) is not None),
        len(lines),
    )
    # Keep blank lines and comments just before the next header with that header.
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip()[:1] in "#;"):
        end -= 1
    tail = lines[end:]
    between = "\n" if tail and tail[0].strip() else ""
    return "".join(lines[:start]) + section + between + "".join(tail)
