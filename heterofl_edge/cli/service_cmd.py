"""``heterofl-edge device install-service``: run a device as a systemd service.

Writes a unit that starts ``heterofl-edge device`` at boot as a dedicated
user, restarts it when it fails (a crash, the OOM killer, a coordinator away
past ``--unreachable-timeout``), but not after a usage error (exit code 2,
which would only fail again), keeps its registration in ``StateDirectory=``
(``--state-dir``) and its artifacts in ``CacheDirectory=``, caps its memory
with ``MemoryMax=`` and forbids it swap (``MemorySwapMax=0``: a device that
outgrows its limit is killed and restarted rather than swapping the board to
a standstill), and logs to the journal. ``--dry-run`` prints the unit.

The device's own options follow the service's, as they would follow
``heterofl-edge device``; they are checked here, so that a typo fails now
rather than at every boot. The enrollment token, a secret, goes to an
``EnvironmentFile=`` of mode 0600, never into the unit (units are readable by
every user).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from heterofl_edge.errors import ConfigError

__all__ = ["ServiceSpec", "install_service", "render_environment", "render_unit", "systemd_quote"]

UNIT_DIR = Path("/etc/systemd/system")
ENV_DIR = Path("/etc/heterofl-edge")
EXIT_USAGE = 2  # heterofl-edge's exit code for a usage error: restarting cannot help
# Device options the unit sets itself (from StateDirectory=, CacheDirectory=, --max-memory-mb)
# or keeps out of it (the enrollment token is a secret: EnvironmentFile=).
_OWNED = {"state_dir", "cache", "max_memory_mb", "enrollment_token"}
_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,200}")


@dataclass(frozen=True)
class ServiceSpec:
    """What the unit says: its name, who runs what, and its limits."""

    name: str  # the unit is NAME.service; its state and cache folders are NAME too
    user: str
    command: list[str]  # the device's command line, without --state-dir / --cache
    memory_mb: int
    coordinator: str
    environment_file: Path | None = None

    @property
    def state_dir(self) -> Path:
        return Path("/var/lib") / self.name

    @property
    def cache_dir(self) -> Path:
        return Path("/var/cache") / self.name


def systemd_quote(arg: str) -> str:
    """``arg`` as one word of a unit's ``ExecStart=`` (specifiers and variables escaped)."""
    if any(ch in arg for ch in "\n\r\0"):
        raise ConfigError(f"{arg!r} holds a line break or NUL, which a unit cannot carry")
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(spec: ServiceSpec) -> str:
    """The unit file's text."""
    command = [
        *spec.command,
        "--state-dir",
        str(spec.state_dir),
        "--cache",
        str(spec.cache_dir),
        "--max-memory-mb",
        str(spec.memory_mb),
    ]
    lines = [
        "[Unit]",
        f"Description=heterofl-edge device of {spec.coordinator.replace('%', '%%')}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={spec.user}",
        f"Group={spec.user}",
        f"ExecStart={' '.join(systemd_quote(a) for a in command)}",
        f"StateDirectory={spec.name}",
        "StateDirectoryMode=0700",
        f"CacheDirectory={spec.name}",
        f"WorkingDirectory={spec.state_dir}",
    ]
    if spec.environment_file is not None:
        lines.append(f"EnvironmentFile={spec.environment_file}")
    lines += [
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        "RestartSec=30",
        f"RestartPreventExitStatus={EXIT_USAGE}",
        f"MemoryMax={spec.memory_mb}M",
        "MemorySwapMax=0",
        "StandardOutput=journal",
        "StandardError=journal",
        f"SyslogIdentifier={spec.name}",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def render_environment(enrollment_token: str) -> str:
    """The ``EnvironmentFile=``'s text: the enrollment token, quoted for systemd."""
    if any(ch in enrollment_token for ch in "\n\r\0"):
        raise ConfigError("the enrollment token holds a line break or NUL")
    quoted = enrollment_token.replace("\\", "\\\\").replace('"', '\\"')
    return f'HETEROFL_ENROLLMENT_TOKEN="{quoted}"\n'


def install_service(
    ctx: typer.Context,
    name: Annotated[
        str, typer.Option(help="Unit name: NAME.service, /var/lib/NAME, /var/cache/NAME.")
    ] = "heterofl-edge-device",
    user: Annotated[
        str, typer.Option(help="The dedicated system user the device runs as.")
    ] = "heterofl",
    max_memory_mb: Annotated[
        int | None,
        typer.Option(
            help="MemoryMax= and the device's --max-memory-mb (default: three quarters of this "
            "machine's memory)."
        ),
    ] = None,
    enrollment_token: Annotated[
        str | None,
        typer.Option(
            envvar="HETEROFL_ENROLLMENT_TOKEN",
            help="The coordinator's enrollment token, written to ENV_DIR/NAME.env (mode 0600).",
        ),
    ] = None,
    unit_dir: Annotated[Path, typer.Option(help="Where the unit goes.")] = UNIT_DIR,
    env_dir: Annotated[Path, typer.Option(help="Where the environment file goes.")] = ENV_DIR,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the unit; write nothing.")
    ] = False,
) -> None:
    """Write a systemd unit that runs this device as a service.

    After the service's options, give the device's, as to 'heterofl-edge
    device': --coordinator URL --data-dir DIR --shard N --clients M ...
    """
    if not _NAME.fullmatch(name) or not _NAME.fullmatch(user):
        raise ConfigError(
            f"--name {name!r} / --user {user!r}: use letters, digits, '.', '_', '-', '@'"
        )
    device = _device_command(list(ctx.args))
    memory = max_memory_mb if max_memory_mb is not None else _default_memory_mb()
    if memory < 64:
        raise ConfigError(f"--max-memory-mb must be at least 64, got {memory}")
    env_file = env_dir / f"{name}.env" if enrollment_token else None
    spec = ServiceSpec(name, user, device.command, memory, device.coordinator, env_file)
    unit = render_unit(spec)
    unit_path = unit_dir / f"{name}.service"
    if dry_run:
        typer.echo(unit, nl=False)
        if env_file is not None:
            typer.echo(f"# {env_file} would hold the enrollment token (mode 0600, not shown)")
        return
    if enrollment_token and env_file is not None:
        _write(env_file, render_environment(enrollment_token), 0o600)
    _write(unit_path, unit, 0o644)
    typer.echo(f"wrote {unit_path}" + (f" and {env_file}" if env_file else ""))
    typer.echo("next, as root:")
    typer.echo(
        f"  id {user} || useradd --system --user-group --no-create-home "
        f"--home-dir /nonexistent --shell /usr/sbin/nologin {user}"
    )
    typer.echo(f"  systemctl daemon-reload && systemctl enable --now {name}")
    typer.echo(f"  journalctl -u {name} -f      # its log")
    typer.echo(
        f"the user {user} must be able to read {device.data_dir} and {sys.executable}; "
        f"its registration is kept in {spec.state_dir}"
    )


@dataclass(frozen=True)
class _Device:
    command: list[str]
    coordinator: str
    data_dir: Path


def _device_command(args: list[str]) -> _Device:
    """The device's command line as the unit runs it, checked by the device command's parser.

    Paths become absolute (a service does not start where this command ran);
    options the unit sets itself are refused.
    """
    from heterofl_edge.cli import device_cmd

    alone = typer.Typer()  # the device command's options, without its subcommands
    alone.command("device")(device_cmd.device)
    command = typer.main.get_command(alone)
    try:
        parsed = command.make_context("device", list(args))
    except typer.Exit:
        raise ConfigError("give the device's options, not --help") from None
    except typer.TyperException as exc:
        raise ConfigError(
            f"the device's options do not parse: {exc.format_message()}",
            "give them as to 'heterofl-edge device', e.g. --coordinator URL --data-dir DIR",
        ) from None
    given = {
        name
        for name in parsed.params
        if getattr(parsed.get_parameter_source(name), "name", "") == "COMMANDLINE"
    }
    owned = sorted(f"--{k.replace('_', '-')}" for k in _OWNED & given)
    if owned:
        raise ConfigError(
            f"install-service sets {', '.join(owned)} itself",
            "give --max-memory-mb and --enrollment-token before the device's options (they "
            "are the service's); the state and cache folders are NAME's",
        )
    coordinator = parsed.params.get("coordinator")
    data_dir = parsed.params.get("data_dir")
    if coordinator is None or data_dir is None:
        raise ConfigError(
            "the service needs the device's --coordinator and --data-dir",
            "e.g. install-service --coordinator http://laptop.local:8080 --data-dir /srv/mnist",
        )
    line = [str(Path(sys.executable).absolute()), "-m", "heterofl_edge", "device"]
    for param in command.params:
        key = param.name
        if key is None or key in _OWNED or param.param_type_name != "option":
            continue
        value = parsed.params.get(key)
        if value is None or value == param.default:
            continue
        line += [param.opts[0], _word(value)]
    return _Device(line, str(coordinator), Path(data_dir).absolute())


def _word(value: Any) -> str:
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _default_memory_mb() -> int:
    """Three quarters of this machine's memory: room for the system beside the device."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        raise ConfigError(
            "cannot read this machine's memory size", "pass --max-memory-mb"
        ) from None
    return int(total * 3 / 4 / 2**20)


def _write(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` atomically with ``mode``; ``ConfigError`` where it cannot."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot write {path}: {exc.strerror or exc}",
            "run it as root (sudo), or --dry-run to print the unit",
        ) from None
