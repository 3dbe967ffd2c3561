"""Start kbdaemon at login: a systemd user unit, a launchd agent or a Windows logon task.

How it works: the templates in ``packaging/`` (shipped inside the wheel as ``kbdaemon/_packaging``)
are rendered with the interpreter kbdaemon runs in. ``plan_install`` and ``plan_uninstall`` turn
a ``Target`` (platform, interpreter, home, user) into a list of actions, with no I/O::

    WriteFile(unit) -> RunCommand(stop a daemon started by hand) -> RunCommand(register + start)

``execute`` carries the actions out through a command runner, the one seam to the service
managers (``systemctl --user``, ``launchctl``, ``schtasks``), so the commands each platform would
run can be recorded and checked anywhere; ``--dry-run`` prints the plan instead.

- Linux: ``~/.config/systemd/user/kbdaemon.service``; ``systemctl --user enable --now``.
  Without linger the user manager, and the daemon, stop at the last logout (``linger_enabled``).
- macOS: ``~/Library/LaunchAgents/us.kbase.kbdaemon.plist``; ``launchctl bootstrap gui/<uid>``.
- Windows: a Task Scheduler task that runs ``pythonw -m kbdaemon run`` at this user's logon.

``uninstall`` also removes the socket (or the TCP transport's port file) and the pid file;
``--purge`` the stored tokens and config.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Literal
from xml.sax.saxutils import escape

from kbclient.daemon_api import ErrorCode
from kbdaemon.errors import KBDaemonError
from kbdaemon.keystore import KeyringStore, translated

Platform = Literal["linux", "macos", "windows"]

UNIT_NAME = "kbdaemon.service"
LAUNCHD_LABEL = "us.kbase.kbdaemon"
_TEMPLATES = {
    "linux": "systemd/kbdaemon.service",
    "macos": "launchd/us.kbase.kbdaemon.plist",
    "windows": "windows/kbdaemon-task.xml",
}


class AutostartError(KBDaemonError):
    """Autostart could not be installed or removed; the message says what failed and what to do."""

    code = ErrorCode.AUTOSTART_FAILED


def current_platform() -> Platform:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform == "win32":
        return "windows"
    return "linux"


@dataclass(frozen=True)
class Target:
    """Where and as whom autostart is installed. ``Target.current()`` describes this machine."""

    platform: Platform
    python: str
    home: Path
    user: str
    uid: int = 0
    config_home: Path | None = None  # XDG_CONFIG_HOME (Linux)
    local_appdata: Path | None = None  # %LOCALAPPDATA% (Windows)
    user_domain: str | None = None  # %USERDOMAIN% (Windows)

    @classmethod
    def current(cls, platform: Platform | None = None) -> Target:
        env = os.environ
        return cls(
            platform=platform or current_platform(),
            python=sys.executable,
            home=Path.home(),
            user=getpass.getuser(),
            uid=os.getuid() if hasattr(os, "getuid") else 0,
            config_home=Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else None,
            local_appdata=Path(env["LOCALAPPDATA"]) if env.get("LOCALAPPDATA") else None,
            user_domain=env.get("USERDOMAIN"),
        )

    @property
    def service_file(self) -> Path:
        """The unit, plist or task definition that ``install`` writes."""
        if self.platform == "linux":
            return (self.config_home or self.home / ".config") / "systemd" / "user" / UNIT_NAME
        if self.platform == "macos":
            return self.home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        appdata = self.local_appdata or self.home / "AppData" / "Local"
        return appdata / "kbase-spark-connect" / "kbdaemon-task.xml"

    @property
    def task_name(self) -> str:
        """The Windows task name: per user, as task names are machine-wide."""
        return f"kbdaemon-{self.user}"

    @property
    def pythonw(self) -> str:
        """The windowless interpreter beside ``python`` (Windows)."""
        path = self.python
        for console, gui in (("python.exe", "pythonw.exe"), ("python", "pythonw")):
            if path.lower().endswith(console):
                return path[: -len(console)] + gui
        return path


# -- rendering -----------------------------------------------------------------------------


def template_text(platform: Platform) -> str:
    """The template of a platform: the checkout's ``packaging/`` first, else the wheel's copy."""
    relative = _TEMPLATES[platform]
    checkout = Path(__file__).resolve().parent.parent / "packaging" / relative
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    shipped = resources.files("kbdaemon") / "_packaging" / relative
    return shipped.read_text(encoding="utf-8")


def systemd_quote(arg: str, *, command: bool = False) -> str:
    """One ExecStart word: ``%`` escaped, ``$`` too in arguments (systemd expands variables
    there, not in the command), quoted when it holds a space, a quote or a backslash."""
    word = arg.replace("%", "%%")
    if not command:
        word = word.replace("$", "$$")
    if any(c in word for c in " \t\"\\'"):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def render_systemd_unit(target: Target) -> str:
    words = [systemd_quote(target.python, command=True)]
    words += [systemd_quote(a) for a in ("-m", "kbdaemon", "run")]
    return Template(template_text("linux")).substitute(exec_start=" ".join(words))


def launchd_log_file(target: Target) -> Path:
    return target.home / "Library" / "Logs" / "kbase-spark-connect" / "launchd.log"


def render_launchd_plist(target: Target) -> str:
    return Template(template_text("macos")).substitute(
        label=escape(LAUNCHD_LABEL),
        python=escape(target.python),
        home=escape(str(target.home)),
        log_file=escape(str(launchd_log_file(target))),
    )


def render_windows_task(target: Target) -> str:
    user_id = f"{target.user_domain}\\{target.user}" if target.user_domain else target.user
    command = f'"{target.pythonw}"' if " " in target.pythonw else target.pythonw
    return Template(template_text("windows")).substitute(
        task_name=escape(target.task_name),
        user_id=escape(user_id),
        pythonw=escape(command),
        home=escape(str(target.home)),
    )


# -- plans ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteFile:
    path: Path
    content: bytes = field(repr=False)

    def describe(self) -> str:
        return f"write {self.path}"


@dataclass(frozen=True)
class MakeDir:
    path: Path

    def describe(self) -> str:
        return f"create the directory {self.path}"


@dataclass(frozen=True)
class RunCommand:
    argv: tuple[str, ...]
    check: bool = True  # a failure stops the plan

    def describe(self) -> str:
        return "run: " + shlex.join(self.argv) + ("" if self.check else "  (failure ignored)")


@dataclass(frozen=True)
class RemovePath:
    path: Path

    def describe(self) -> str:
        return f"remove {self.path}"


@dataclass(frozen=True)
class DeleteStoredToken:
    profile: str

    def describe(self) -> str:
        return f"delete the token of profile {self.profile!r} from the keyring"


Action = WriteFile | MakeDir | RunCommand | RemovePath | DeleteStoredToken


def _stop_by_hand(target: Target) -> RunCommand:
    """Stop a daemon started by `kbdaemon start`: the service manager will own the one running."""
    return RunCommand((target.python, "-m", "kbdaemon", "stop"), check=False)


def plan_install(target: Target) -> list[Action]:
    """The actions that install and start autostart for ``target``."""
    path = target.service_file
    if target.platform == "linux":
        return [
            WriteFile(path, render_systemd_unit(target).encode("utf-8")),
            _stop_by_hand(target),
            RunCommand(("systemctl", "--user", "daemon-reload")),
            RunCommand(("systemctl", "--user", "enable", "--now", UNIT_NAME)),
        ]
    if target.platform == "macos":
        domain = f"gui/{target.uid}"
        return [
            WriteFile(path, render_launchd_plist(target).encode("utf-8")),
            MakeDir(launchd_log_file(target).parent),  # launchd opens the log, makes no dirs
            _stop_by_hand(target),
            RunCommand(("launchctl", "bootout", f"{domain}/{LAUNCHD_LABEL}"), check=False),
            RunCommand(("launchctl", "enable", f"{domain}/{LAUNCHD_LABEL}")),
            RunCommand(("launchctl", "bootstrap", domain, str(path))),
        ]
    # schtasks reads the XML as UTF-16, as its declaration says.
    return [
        WriteFile(path, render_windows_task(target).encode("utf-16")),
        _stop_by_hand(target),
        RunCommand(("schtasks", "/Create", "/TN", target.task_name, "/XML", str(path), "/F")),
        RunCommand(("schtasks", "/Run", "/TN", target.task_name)),
    ]


def plan_uninstall(
    target: Target,
    *,
    runtime_files: Sequence[Path],
    purge: bool = False,
    profiles: Sequence[str] = (),
    purge_files: Sequence[Path] = (),
) -> list[Action]:
    """The actions that stop the daemon and remove autostart, ``runtime_files`` (socket, pid
    file) and, with ``purge``, the stored tokens of ``profiles`` and ``purge_files`` (config,
    token file)."""
    plan: list[Action]
    if target.platform == "linux":
        plan = [
            RunCommand(("systemctl", "--user", "disable", "--now", UNIT_NAME), check=False),
            RemovePath(target.service_file),
            RunCommand(("systemctl", "--user", "daemon-reload"), check=False),
        ]
    elif target.platform == "macos":
        plan = [
            RunCommand(("launchctl", "bootout", f"gui/{target.uid}/{LAUNCHD_LABEL}"), check=False),
            RemovePath(target.service_file),
        ]
    else:
        plan = [
            RunCommand(("schtasks", "/End", "/TN", target.task_name), check=False),
            RunCommand(("schtasks", "/Delete", "/TN", target.task_name, "/F"), check=False),
            RemovePath(target.service_file),
        ]
    plan.append(_stop_by_hand(target))
    plan += [RemovePath(p) for p in runtime_files]
    if purge:
        plan += [DeleteStoredToken(p) for p in profiles]
        plan += [RemovePath(p) for p in purge_files]
    return plan


# -- execution -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


Runner = Callable[[Sequence[str]], CommandResult]
TokenRemover = Callable[[str], bool]


def subprocess_runner(argv: Sequence[str]) -> CommandResult:
    """Run a command, capturing its output; a missing program is exit code 127."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"{argv[0]}: no answer after 60 s")
    return CommandResult(done.returncode, done.stdout, done.stderr)


def keyring_token_remover(profile: str) -> bool:
    """Delete the keyring entry ``kbdaemon login`` wrote; True when there was one. Raises
    KeystoreError (locked or missing keyring) with what to do."""
    with translated():
        return KeyringStore().delete(profile)


_HINTS = {
    "systemctl": "is systemd running your session? Start the daemon with `kbdaemon start` instead",
    "launchctl": "run it in a terminal of your own login session (not over ssh or sudo)",
    "schtasks": "run it in your own Windows session; no admin rights are needed",
}


def execute(
    plan: Sequence[Action],
    *,
    runner: Runner = subprocess_runner,
    remove_token: TokenRemover = keyring_token_remover,
) -> list[str]:
    """Carry out ``plan``; returns one line per action done. Raises AutostartError when a
    checked command fails (the actions before it stay done)."""
    report: list[str] = []
    for action in plan:
        if isinstance(action, WriteFile):
            action.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = action.path.with_name(action.path.name + ".tmp")
            tmp.write_bytes(action.content)
            tmp.replace(action.path)
            report.append(f"wrote {action.path}")
        elif isinstance(action, MakeDir):
            action.path.mkdir(parents=True, exist_ok=True)
        elif isinstance(action, RunCommand):
            result = runner(action.argv)
            if result.returncode != 0 and action.check:
                detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                hint = _HINTS.get(action.argv[0], "")
                raise AutostartError(
                    f"`{shlex.join(action.argv)}` failed with exit code {result.returncode}: "
                    + " ".join(detail)
                    + (f"; {hint}" if hint else "")
                )
            status = "ok" if result.returncode == 0 else f"exit code {result.returncode}"
            report.append(f"ran {shlex.join(action.argv)} ({status})")
        elif isinstance(action, RemovePath):
            with contextlib.suppress(FileNotFoundError):
                action.path.unlink()
                report.append(f"removed {action.path}")
        elif remove_token(action.profile):
            report.append(f"deleted the token of profile {action.profile!r}")
        else:
            report.append(f"no token of profile {action.profile!r} in the keyring")
    return report


# -- state the daemon's `status` and `doctor` report ------------------------------------------


def autostart_installed(target: Target | None = None) -> bool:
    """Whether ``kbdaemon install`` has put the unit, plist or task definition in place."""
    return (target or Target.current()).service_file.is_file()


def linger_enabled(user: str | None = None, *, root: Path = Path("/")) -> bool | None:
    """Whether systemd keeps ``user``'s services running after logout; None where that does not
    apply (not Linux, or systemd is not the init system). Enable it with ``loginctl
    enable-linger``."""
    if current_platform() != "linux" or not (root / "run" / "systemd" / "system").is_dir():
        return None
    return (root / "var" / "lib" / "systemd" / "linger" / (user or getpass.getuser())).exists()


def linger_fix(user: str | None = None) -> str:
    return f"loginctl enable-linger {user or getpass.getuser()}"
