"""`matchlock run`: boot a sandbox from an image, run one command, clean up."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable

import click
from click.core import ParameterSource

from ..api.config import (
    DEFAULT_CPUS,
    DEFAULT_DISK_SIZE_MB,
    DEFAULT_MEMORY_MB,
    Resources,
    SandboxConfig,
    parse_duration,
    parse_env_assignment,
    parse_env_file,
)
from ..api.disks import parse_disks
from ..api.errors import UsageError
from ..api.image import DEFAULT_IMAGE, ImageConfig, compose_command
from ..api.network import DEFAULT_MTU, HostMapping, NetworkConfig, parse_host_list
from ..api.secrets import parse_secrets
from ..api.vfs import build_vfs, split_volume_flags
from ..util import trace
from .common import BoolFlagsCommand, parse_forwards
from .main import ARGS_FD_ENV, READY_FD_ENV


def _split_commas(values: tuple[str, ...]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def build_config(
    *, image, env, env_file, cpus, memory, disk_size, timeout, privileged, hostname, dns_servers, add_host, entrypoint,
    user, allow_host=(), secret=(), secret_file=None, secret_placeholder=(), network_intercept=False,
    no_network=False, mtu=DEFAULT_MTU, disk=(), volume=(), workspace="",
) -> SandboxConfig:  # fmt: skip
    environment: dict[str, str] = {}
    for path in env_file:
        environment.update(parse_env_file(path))
    for entry in env:
        key, value = parse_env_assignment(entry)
        environment[key] = value
    override = ImageConfig(
        user=user,
        # Docker: an explicit --entrypoint also drops the image's CMD.
        entrypoint=(tuple(shlex.split(entrypoint)[:1]) if entrypoint else ()) if entrypoint is not None else None,
        cmd=() if entrypoint is not None else None,
    )
    config = SandboxConfig(
        image=image,
        privileged=privileged,
        resources=Resources(cpus=cpus, memory_mb=memory, disk_size_mb=disk_size, timeout_seconds=timeout or 0),
        network=NetworkConfig(
            hostname=hostname,
            dns_servers=tuple(_split_commas(dns_servers)),
            add_hosts=tuple(HostMapping.parse(spec) for spec in _split_commas(add_host)),
            no_network=no_network,
            allowed_hosts=parse_host_list(allow_host),
            intercept=network_intercept,
            secrets=parse_secrets(secret, secret_placeholder, secret_file, os.environ),
            mtu=mtu,
        ),
        env=environment,
        image_config=override,
        extra_disks=parse_disks(disk),
        vfs=build_vfs(workspace, split_volume_flags(volume)),
    )
    config.validate()
    return config


@click.command(cls=BoolFlagsCommand, context_settings={"allow_interspersed_args": False})
@click.option(
    "--image", default=DEFAULT_IMAGE, show_default=True, help="Image: a local tag, else pulled on a cache miss."
)
@click.option("--pull", "force_pull", is_flag=True, help="Pull the image from its registry even when it is cached.")
@click.option(
    "-e", "--env", multiple=True, metavar="KEY[=VALUE]", help="Set a variable; KEY alone copies it from the host."
)
@click.option("--env-file", multiple=True, metavar="PATH", help="Read KEY[=VALUE] lines (applied before -e).")
@click.option("-w", "--workdir", default="", help="Working directory (default: image WORKDIR, then /).")
@click.option("-u", "--user", default="", help="uid, uid:gid or user name (overrides the image USER).")
@click.option("--entrypoint", default=None, help="Replace the image ENTRYPOINT; empty clears it.")
@click.option(
    "--cpus", type=float, default=DEFAULT_CPUS, show_default=True, help="CPUs; fractions are enforced as a quota."
)
@click.option("--memory", type=int, default=DEFAULT_MEMORY_MB, show_default=True, help="Memory in MB.")
@click.option("--disk", multiple=True, metavar="@VOLUME|IMAGE:/GUEST[:ro][,uid=N,gid=N]",
              help="Mount a named volume or an ext4 image at a guest path (repeatable).")  # fmt: skip
@click.option("-v", "--volume", multiple=True, metavar="HOST:GUEST[:overlay|host_fs|ro][,uid=N,gid=N]",
              help="Mount a host directory or file (default: a private overlay copy; host_fs writes through).")  # fmt: skip
@click.option(
    "--workspace", default="", metavar="PATH", help="Guest directory for relative -v paths and the default workdir."
)
@click.option("--disk-size", type=int, default=DEFAULT_DISK_SIZE_MB, show_default=True, help="Writable disk in MB.")
@click.option("--timeout", type=int, default=None, help="Seconds for the whole run, boot included.")
@click.option("--hostname", default="", help="Guest hostname (default: the VM ID).")
@click.option("--dns-servers", multiple=True, metavar="IP[,IP]", help="Resolvers written to /etc/resolv.conf.")
@click.option("--add-host", multiple=True, metavar="HOST:IP", help="Extra /etc/hosts entries.")
@click.option("--allow-host", multiple=True, metavar="GLOB[,GLOB]",
              help="Hosts the sandbox may reach (turns interception on); *.example.com, api-*, name.*")  # fmt: skip
@click.option("--secret", multiple=True, metavar="NAME=VALUE@HOSTS",
              help="Secret added by the proxy for HOSTS only; the guest sees a placeholder. NAME@HOSTS reads $NAME.")  # fmt: skip
@click.option("--secret-file", default=None, metavar="FILE",
              help='Secrets as JSON {NAME: {"value": ..., "placeholder"?: ..., "hosts": [...]}}, off the command line.',
              )  # fmt: skip
@click.option("--secret-placeholder", multiple=True, metavar="NAME=PLACEHOLDER",
              help="What the guest sees for secret NAME, e.g. a prefix its tools check (repeatable).")  # fmt: skip
@click.option("--network-intercept", is_flag=True, help="Intercept even with an empty allow-list (edit it at runtime).")
@click.option("--no-network", is_flag=True, help="No network interface at all.")
@click.option("--mtu", type=int, default=DEFAULT_MTU, show_default=True, help="MTU of the guest interface.")
@click.option("-p", "--publish", multiple=True, metavar="[ADDRESS:][LOCAL:]REMOTE",
              help="Forward a local port to the guest's 127.0.0.1:REMOTE (repeatable).")  # fmt: skip
@click.option("--address", multiple=True, metavar="IP", help="Listen address for -p (default 127.0.0.1; repeatable).")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="With -i: run in a pseudo-terminal.")
@click.option(
    "--privileged/--no-privileged", default=False, help="Skip the seccomp filter, capability drop and no_new_privs."
)
@click.option("--rm/--no-rm", default=True, show_default=True,
              help="Remove the sandbox when the command exits; --rm=false keeps it until SIGINT/SIGTERM.")  # fmt: skip
@click.option("-d", "--detach/--no-detach", default=False, help="Start in the background and print the VM ID.")
@click.option("--graceful-shutdown", default="0s", show_default=True, metavar="DURATION",
              help="Time the guest gets to stop its processes and sync when the sandbox closes.")  # fmt: skip
@click.option("--from-snapshot", default="", metavar="NAME",
              help="Start from a snapshot (its image, memory and disks); give its secrets again with --secret.")  # fmt: skip
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(**flags) -> None:
    """Boot a sandbox from IMAGE and run COMMAND in it (after `--`)."""
    trace.mark("run: imported")
    release: Callable[[], None] | None = None
    if not flags["no_network"] and not flags["from_snapshot"] and (READY_FD_ENV in os.environ or not flags["detach"]):
        # Its namespace helper first: it works on the other core while the rest of `run` imports.
        from ..sandbox.early import discard_early, start_early

        start_early(flags["mtu"])
        release = discard_early  # when the command fails before its sandbox took the namespace
        trace.mark("run: namespace helper started")
    try:
        _run(**flags)
    finally:
        if release is not None:
            release()


def _run(*, image, env, env_file, workdir, user, entrypoint, cpus, memory, disk_size, timeout, hostname, dns_servers,
         add_host, interactive, tty, privileged, rm, detach, graceful_shutdown, command, force_pull, allow_host,
         secret, secret_file, secret_placeholder, network_intercept, no_network, mtu, publish,
         address, disk, from_snapshot, volume, workspace) -> None:  # fmt: skip
    from ..sandbox.sandbox import boot_timeout

    if timeout is not None and timeout <= 0:
        raise UsageError(f"invalid --timeout {timeout}: must be a positive number of seconds")
    if workdir and not workdir.startswith("/"):
        raise UsageError(f"invalid --workdir {workdir!r}: must be an absolute path (e.g. /{workdir.lstrip('./')})")
    grace = parse_duration(graceful_shutdown, "--graceful-shutdown")
    forwards, addresses = parse_forwards(publish, address)
    boot_timeout()  # $MATCHLOCK_BOOT_TIMEOUT, checked before anything is pulled or booted
    detached_child = READY_FD_ENV in os.environ
    if detach and (interactive or tty):
        raise UsageError("--detach cannot be combined with -t/--tty or -i/--interactive")
    if detach or detached_child:
        rm = False
    config = build_config(
        image=image, env=env, env_file=env_file, cpus=cpus, memory=memory, disk_size=disk_size, timeout=timeout,
        privileged=privileged, hostname=hostname, dns_servers=dns_servers, add_host=add_host,
        entrypoint=entrypoint, user=user, allow_host=allow_host, secret=secret,
        secret_file=secret_file, secret_placeholder=secret_placeholder,
        network_intercept=network_intercept, no_network=no_network, mtu=mtu, disk=disk, volume=volume,
        workspace=workspace,
    )  # fmt: skip
    full_restore = False
    if from_snapshot or _given("from_snapshot"):  # `--from-snapshot ''` is a bad name, not "no snapshot"
        # A missing secret, or a flag the snapshot cannot take, fails here, before anything starts.
        config, full_restore = _restore_config(
            from_snapshot, config, **_given_for_restore(image, cpus, memory, disk_size)
        )
        image = config.image
    use_pty = interactive and tty
    if use_pty and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("-it requires a TTY: run it from a terminal, or drop -t to pipe stdin")

    _validate_exec(command, config.env, workdir, user)  # before a pull; again below with the image's defaults
    from ..image import progress
    from ..image.pull import resolve_or_pull

    with progress.for_stderr() as bars:
        image_config = resolve_or_pull(image, force_pull=force_pull, progress=bars).config.merged(config.image_config)
    # A full restore's processes (the image's entrypoint among them) run on from the snapshot's memory:
    # its ENTRYPOINT/CMD again would be a second copy in every clone (`fork` starts them so). Only a
    # command given after -- runs.
    argv = compose_command(image_config, command) if command or not full_restore else []
    trace.mark("run: image resolved")
    if not argv and rm and not use_pty:
        what = (
            f"snapshot {from_snapshot!r} is a full one, whose processes run on and which starts no command"
            if full_restore
            else f"image {image} has no ENTRYPOINT or CMD"
        )
        raise UsageError(f"command required: {what}; pass one after -- (or use --rm=false to start without a command)")
    _validate_exec(
        argv, {**image_config.env, **config.env}, workdir or image_config.working_dir, user or image_config.user
    )
    if detach and not detached_child:
        sys.exit(start_detached())
    import asyncio

    from .owner import TIMEOUT_EXIT_CODE, RunOptions, own_sandbox

    options = RunOptions(
        command=shlex.join(argv) if argv else None, workdir=workdir, interactive=interactive, pty=use_pty,
        remove=rm, detached=detached_child, graceful_shutdown=grace, timeout=timeout,
        publish=tuple(forwards), addresses=tuple(addresses), from_snapshot=from_snapshot,
    )  # fmt: skip
    try:
        code = asyncio.run(own_sandbox(config, options))
    except TimeoutError:
        click.echo(f"Error: timed out after {timeout} s (--timeout)", err=True)
        code = TIMEOUT_EXIT_CODE
    sys.stdout.flush()
    sys.stderr.flush()
    # The sandbox is closed and recorded and the loop is gone: skip the interpreter's teardown of
    # the proxy's and TLS libraries' modules, which costs about 0.1 s of every run.
    os._exit(code)


def _given(param: str) -> bool:
    """Whether the option was on the command line (or in its environment variable), not its default."""
    return click.get_current_context().get_parameter_source(param) not in (ParameterSource.DEFAULT, None)


def _given_for_restore(image: str, cpus: float, memory: int, disk_size: int) -> dict:
    """The --image and machine flags given on the command line (not defaults): a restore checks them
    against the snapshot's, so that none is silently ignored."""
    resources = {key: float(value) for key, param, value in
                 (("cpus", "cpus", cpus), ("memory_mb", "memory", memory), ("disk_size_mb", "disk_size", disk_size))
                 if _given(param)}  # fmt: skip
    return {"image": image if _given("image") else "", "resources": resources}


def _restore_config(
    name: str, config: SandboxConfig, *, image: str = "", resources: dict | None = None
) -> tuple[SandboxConfig, bool]:
    """The restore's config, and whether the snapshot is a full one (memory and processes)."""
    from ..sandbox.snapshots import Restore
    from ..state.store import StateStore

    store = StateStore()
    try:
        restore = Restore.load(store, name)
        return restore.prepare(config, image=image, resources=resources), restore.full
    finally:
        store.close()


def _validate_exec(argv, env: dict[str, str], workdir: str, user: str) -> None:
    """What the guest would refuse (a long command, too much environment) fails now, before the boot."""
    from ..sandbox.sandbox import validate_exec_request
    from ..wire.agent import ExecRequest

    validate_exec_request(ExecRequest(command=shlex.join(argv), env=env, cwd=workdir or "/", user=user))


def start_detached(args: list[str] | None = None) -> int:
    """`run -d`: re-run this command as a background owner, print its VM ID once ready.

    The child reports readiness through an inherited pipe rather than the
    parent polling the state database; if it dies first, its error output is
    shown here with its exit code. The arguments travel through another pipe,
    not the child's command line: that is readable by every user through
    /proc, and `-e` and `--secret` values must not be.
    """
    import json
    import signal
    import subprocess
    import threading

    ready_r, ready_w = os.pipe()
    args_r, args_w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-m", "matchlock"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        pass_fds=(ready_w, args_r), env={**os.environ, READY_FD_ENV: str(ready_w), ARGS_FD_ENV: str(args_r)},
        start_new_session=True,
    )  # fmt: skip
    os.close(ready_w)
    os.close(args_r)
    errors: list[bytes] = []
    # Drain the child's stderr meanwhile, so a chatty child can never block on a full pipe.
    stderr = child.stderr
    assert stderr is not None  # stderr=PIPE
    drain = threading.Thread(target=lambda: errors.append(stderr.read()), daemon=True)
    drain.start()
    try:
        with os.fdopen(args_w, "wb") as pipe:
            pipe.write(json.dumps(sys.argv[1:] if args is None else args).encode())
    except BrokenPipeError:
        pass  # the child died before reading; its error output is reported below
    with os.fdopen(ready_r, "rb") as ready:
        line = ready.readline().decode().strip()
    if line:
        click.echo(line)
        return 0
    code = child.wait()
    drain.join(5)
    error = b"".join(errors).decode(errors="replace").strip()
    if code < 0:  # killed by a signal: say which, and exit as a shell reports it (128 + the signal)
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        click.echo(error or f"Error: the detached sandbox was killed by {name} before it was ready", err=True)
        return 128 - code
    click.echo(error or f"Error: the detached sandbox exited with code {code} before it was ready", err=True)
    return code or 1
