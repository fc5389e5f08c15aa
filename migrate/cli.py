"""The `migrate` command line.

Every failure a user can cause (bad input, an unreachable agent, a port in
use) ends with one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import mmap
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import click

from migrate import api, errors, logs, orchestrator, planes, report, validate
from migrate.guest.kvm import MAX_VCPUS as KVM_MAX_VCPUS
from migrate.guest.warm import DEFAULT_WARM_RUNNERS
from migrate.names import FINISHED, Content, DataPlane, FaultPath, GuestKind, Mode, Phase, Workload, choices
from migrate.records import MigrationStatus, SnapshotProgress
from migrate.security import ENV, Credentials, listen_policy
from migrate.source.bulk_server import COMPRESS_POLICIES
from migrate.units import MiB, format_size, parse_rate, parse_size

if TYPE_CHECKING:
    from migrate.proto import migrate_pb2 as pb


class _Parsed(click.ParamType):
    """A value `parse` checks (ValueError: a one-line usage error naming the option)."""

    def __init__(self, name: str, parse: Callable[[str], object]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value, param, ctx):  # noqa: ANN001 - click's signature
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _pages(text: str) -> int:
    """A guest size: whole pages only, never rounded behind the user's back."""
    size = parse_size(text)
    if size <= 0 or size % mmap.PAGESIZE:
        raise ValueError(f"{text!r} is {size} bytes: a guest size must be a positive whole number "
                         f"of {mmap.PAGESIZE}-byte pages")
    return size


RATE, PAGES = _Parsed("RATE", parse_rate), _Parsed("SIZE", _pages)
ENDPOINT = _Parsed("HOST:PORT", validate.endpoint)
LISTEN = _Parsed("HOST:PORT", functools.partial(validate.endpoint, what="listen address", listen=True))


def _credential_options(command: Callable) -> Callable:
    """--tls-cert/--tls-key/--tls-ca/--token (or their MIGRATE_* variables),
    handed to the command as one checked `credentials` argument."""
    file_opt = functools.partial(click.option, type=click.Path(dir_okay=False), default="", show_envvar=True)
    options = [
        file_opt("--tls-cert", envvar=ENV["cert"], metavar="PEM",
                 help="Our certificate (an agent's server certificate, or a client certificate)."),
        file_opt("--tls-key", envvar=ENV["key"], metavar="PEM", help="The private key of --tls-cert."),
        file_opt("--tls-ca", envvar=ENV["ca"], metavar="PEM",
                 help="CA that signs the peers' certificates; on an agent it makes client certificates mandatory."),
        click.option("--token", envvar=ENV["token"], default="", show_envvar=True, metavar="TOKEN",
                     help=f"Bearer token every call must carry (agents check it, clients send it). Prefer "
                          f"{ENV['token']}: other users see command lines in `ps`."),
    ]

    @functools.wraps(command)
    def wrapper(*args, tls_cert: str, tls_key: str, tls_ca: str, token: str, **kw):  # noqa: ANN002, ANN003
        if click.get_current_context().get_parameter_source("token") is click.core.ParameterSource.COMMANDLINE:
            click.echo(f"warning: --token shows in the process list (ps) to every user of this host; "
                       f"set {ENV['token']} in the environment instead", err=True)
        credentials = Credentials(cert=tls_cert, key=tls_key, ca=tls_ca, token=token)
        try:
            credentials.check(server=command.__name__.endswith("_serve"))
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        return command(*args, credentials=credentials, **kw)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _auth(credentials: Credentials) -> dict:
    """The API's credential arguments for what the options gave (explicit: the API does not read the environment
    again)."""
    return {"token": credentials.token, "tls": api.TLS(ca=credentials.ca, cert=credentials.cert, key=credentials.key)}


def _client(agent: str, credentials: Credentials) -> api.Client:
    return api.Client(agent, **_auth(credentials))


class _Commands(click.Group):
    """The CLI's group. The tooling commands (the lab, benchmarks, plots, test
    certificates) live in their own modules, loaded only when one is asked
    for (or listed by --help): agents and `migrate run` never import them."""

    TOOLING: ClassVar[dict[str, tuple[str, str]]] = {
        "lab": ("migrate.lab.cli", "lab"), "bench": ("migrate.bench.cli", "bench"),
        "plot": ("migrate.bench.cli", "plot"), "certs": ("migrate.certs", "certs")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.TOOLING])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.TOOLING:
            module, attr = self.TOOLING[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="migrate")
def cli() -> None:
    """Post-copy live migration of a running guest's memory between hosts.

    \b
    Quick start (both agents on this machine):
      migrate demo
    By hand:
      migrate source serve --listen 127.0.0.1:7070 &
      migrate dest serve --listen 127.0.0.1:7071 &
      migrate guest start vm1 --agent 127.0.0.1:7070 --size 512M --workload random-write
      migrate run vm1 --from 127.0.0.1:7070 --to 127.0.0.1:7071 --report vm1.json
    """


# ----------------------------------------------------------------- agents
def _serve(role: str, listen: str, verbose: bool, log_format: str, credentials: Credentials, insecure_listen: bool,
           metrics: str, **kw) -> None:
    try:
        warning = listen_policy(listen, credentials, insecure_listen)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    credentials.export()  # for this agent's server and every process it starts
    logs.configure(role, log_format)
    if warning:
        logging.getLogger(__name__).warning("%s", warning)
    from migrate.agent import serve  # the agent pulls in the native layer

    def ready(port: int) -> None:
        click.echo(f"listening on {validate.split_endpoint(listen, listen=True)[0]}:{port}")
        sys.stdout.flush()

    serve(listen, (role,), on_ready=ready, metrics=metrics, log_requests=verbose, **kw)


_data_plane_option = click.option(
    "--data-plane", type=click.Choice(choices(DataPlane)), default=None,
    help="How page data travels: native (C threads, plain TCP, a one-time key per run) or grpc (the Pages "
         "service, TLS when configured). Default: native, or grpc when TLS is configured.")
_fault_path_option = click.option(
    "--fault-path", type=click.Choice(choices(FaultPath)), default=FaultPath.GRPC.value,
    show_default=True, help="How the guest's faults are served: over gRPC, or native (needs --data-plane native).")

_metrics_option = click.option(
    "--metrics", type=_Parsed("HOST:PORT", lambda v: v and validate.endpoint(v, "metrics address", listen=True)),
    default="", help="Serve Prometheus metrics at http://HOST:PORT/metrics (runs by phase, pages by path, faults "
                     "and their latency, bytes on the wire, link outages).")
def _daemon_log_options(command: Callable) -> Callable:
    """-v (log every request) and --log-format (text or JSON lines), for `source serve` and `dest serve`."""
    command = click.option("--log-format", type=click.Choice(logs.FORMATS), default="text", show_default=True,
                           help="Log lines as text, or as JSON objects (one per line) for a log collector.")(command)
    return click.option("-v", "--verbose", is_flag=True,
                        help="Log every request: method, peer, duration and status.")(command)


_insecure_option = click.option("--insecure-listen", is_flag=True,
                                help="Allow listening beyond loopback without TLS or client authentication "
                                     "(client certificates or a token); a warning is logged.")


@cli.group()
def source() -> None:
    """The source agent: hosts guests and serves their pages."""


@source.command("serve")
@click.option("--listen", type=LISTEN, default="127.0.0.1:7070", show_default=True,
              help="HOST:PORT to listen on (port 0: any).")
@click.option("--image", "images", multiple=True, metavar="NAME=PATH",
              help="Serve a memory image file as guest NAME (repeatable).")
@click.option("--zstd-level", default=1, show_default=True, type=click.IntRange(-7, 22),
              help="Compression level of bulk batches.")
@click.option("--compress", type=click.Choice(COMPRESS_POLICIES), default="auto", show_default=True,
              help="Compress bulk batches: when the link is the bottleneck and the data compresses, never for a "
                   "destination on this host (auto); always; or never.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Journal switched-over migrations of file-backed guests here, so that this agent, restarted "
                   "after a crash with the same directory, serves their remaining pages again.")
@click.option("--backing-dir", type=click.Path(file_okay=False), default=None,
              help="Where `guest start --backing file:NAME` creates guest RAM files (each a new file, removed "
                   "when its guest stops or migrates away); without it, file backing is refused.")
@click.option("--snapshot-dir", type=click.Path(file_okay=False), default=None,
              help="Where `migrate snapshot -o FILE` writes FILE and FILE.state.json (new files only) and "
                   "`migrate restore FILE` reads them (default: --backing-dir; without either, refused).")
@_daemon_log_options
@_metrics_option
@_insecure_option
@_credential_options
def source_serve(listen: str, images: tuple[str, ...], zstd_level: int, compress: str, state_dir: str | None,
                 backing_dir: str | None, snapshot_dir: str | None, verbose: bool, log_format: str, metrics: str,
                 insecure_listen: bool, credentials: Credentials) -> None:
    """Run a source agent until interrupted.

    \b
    An --image with a snapshot's state file next to it (PATH.state.json,
    see `migrate snapshot`) is that guest, resumable on a destination.

    \b
    Example:
      migrate source serve --listen 127.0.0.1:7070 --image snap=/var/lib/vm/mem.img
    """
    parsed = {}
    for item in images:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{item!r} is not NAME=PATH", param_hint="--image")
        if not os.path.isfile(path):
            raise click.BadParameter(f"no such file: {path}", param_hint="--image")
        parsed[name] = path
    _serve("source", listen, verbose, log_format, credentials, insecure_listen, metrics, images=parsed,
           level=zstd_level,
           compress=compress, state_dir=state_dir or "", backing_dir=backing_dir or "",
           snapshot_dir=snapshot_dir or "")


@cli.group()
def dest() -> None:
    """The destination agent: receives guests and resolves their page faults."""


@dest.command("serve")
@click.option("--listen", type=LISTEN, default="127.0.0.1:7071", show_default=True,
              help="HOST:PORT to listen on (port 0: any).")
@click.option("--uffd-socket", type=click.Path(dir_okay=False), default=None,
              help="Also accept Firecracker-style UFFD handshakes on this unix socket.")
@click.option("--restore-from", type=ENDPOINT, default=None,
              help="With --uffd-socket: the source agent serving the image.")
@click.option("--image", "image", metavar="NAME", default=None,
              help="With --uffd-socket: the image to restore into each process that connects.")
@_data_plane_option
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Journal incoming runs here, so that this agent, restarted after a crash with the same "
                   "directory, takes its guests back and finishes their migrations.")
@click.option("--max-incoming-ram", type=_Parsed("SIZE", parse_size), default="0",
              help="Most guest RAM promised to incoming runs at once (0: what the host's available memory "
                   "allows); a run past it is refused before its guest leaves the source.")
@click.option("--policy", default="", metavar="NAME[:K=V,...]",
              help="With --uffd-socket: the push and prefetch policy of each restore (e.g. replay:ws=FILE).")
@click.option("--record-ws", type=click.Path(dir_okay=False, writable=True), default="", metavar="FILE",
              help="With --uffd-socket: each restore holds its push until its client is quiet (0.5 s "
                   "without a fault) and writes the pages it touched to FILE, for --policy replay:ws=FILE "
                   "on the next ones.")
@click.option("--max-bandwidth", type=RATE, default="0",
              help="With --uffd-socket: cap each restore's bulk push (e.g. 100M, 1gbit).")
@click.option("--allow-policy-modules", is_flag=True,
              help="Let a migration's --policy module:Class be imported by this agent (code of the client's "
                   "choosing, run here: off by default; built-in policies are always allowed).")
@click.option("--warm-runners", type=click.IntRange(min=0), default=DEFAULT_WARM_RUNNERS, show_default=True,
              help="Guest runners kept started ahead, per guest kind this host runs, so that an incoming run's "
                   "prepare does not wait for an interpreter to start (0: none).")
@_daemon_log_options
@_metrics_option
@_insecure_option
@_credential_options
def dest_serve(listen: str, uffd_socket: str | None, restore_from: str | None, image: str | None,
               data_plane: str | None, state_dir: str | None, max_incoming_ram: int, policy: str, record_ws: str,
               max_bandwidth: int, allow_policy_modules: bool, warm_runners: int, verbose: bool, log_format: str,
               metrics: str, insecure_listen: bool,
               credentials: Credentials) -> None:
    """Run a destination agent until interrupted.

    \b
    Examples:
      migrate dest serve --listen 127.0.0.1:7071
      migrate dest serve --uffd-socket /tmp/uffd.sock --restore-from 127.0.0.1:7070 --image snap
      migrate dest serve --listen 127.0.0.1:7071 --state-dir /var/lib/migrate/dest
      migrate dest serve --uffd-socket /tmp/uffd.sock --restore-from 127.0.0.1:7070 --image snap --record-ws snap.ws
      migrate dest serve --uffd-socket /tmp/uffd.sock --restore-from 127.0.0.1:7070 --image snap \\
          --policy replay:ws=snap.ws
    """
    if uffd_socket and not (restore_from and image):
        raise click.UsageError("--uffd-socket needs --restore-from and --image")
    if (restore_from or image or data_plane or policy or record_ws or max_bandwidth) and not uffd_socket:
        raise click.UsageError("--restore-from, --image, --data-plane, --policy, --record-ws and --max-bandwidth "
                               "go with --uffd-socket")
    plane = DataPlane(data_plane) if data_plane else planes.default_plane(credentials.tls)
    restore = None
    if uffd_socket:
        from migrate.dest.restore import RestoreOptions  # the agent's side pulls in the native layer
        assert restore_from and image  # a usage error above otherwise
        restore = RestoreOptions(uffd_socket, restore_from, image, plane, policy, record_ws, max_bandwidth)
        try:
            restore.check()
        except ValueError as err:
            raise click.ClickException(str(err)) from None
    _serve("dest", listen, verbose, log_format, credentials, insecure_listen, metrics, uffd_restore=restore,
           state_dir=state_dir or "", max_incoming_ram=max_incoming_ram, allow_policy_modules=allow_policy_modules,
           warm_runners=warm_runners)


# ----------------------------------------------------------------- guests
@cli.group()
def guest() -> None:
    """Start, list, inspect and stop guests on an agent."""


_agent_option = click.option("--agent", type=ENDPOINT, default="127.0.0.1:7070", show_default=True,
                             help="The agent to talk to.")


def _kind_options(fn: Callable) -> Callable:
    fn = click.option("--vcpus", type=int, default=None,
                      help="vCPUs of a kvm guest (its --threads), 1 to 16.")(fn)
    return click.option("--kind", type=click.Choice(choices(GuestKind)), default=GuestKind.SYNTHETIC.value,
                        show_default=True,
                        help="synthetic: the workload engine on RAM; kvm: a KVM virtual machine running the "
                             "guest image (the same workloads, one slice of RAM per vCPU).")(fn)


def _threads_for(kind: str, vcpus: int | None, threads: int) -> int:
    """The spec's threads: --vcpus for a kvm guest (checked here: one line, before any agent is asked)."""
    if vcpus is None:
        return threads
    if kind != GuestKind.KVM:
        raise click.ClickException("--vcpus applies to --kind kvm (a synthetic guest has --threads)")
    if not 1 <= vcpus <= KVM_MAX_VCPUS:
        raise click.ClickException(f"--vcpus must be 1 to {KVM_MAX_VCPUS}, not {vcpus}")
    return vcpus


@guest.command("start")
@click.argument("name")
@_agent_option
@click.option("--size", type=PAGES, default="512M", show_default=True, help="Guest RAM (e.g. 64M, 1G).")
@click.option("--workload", type=click.Choice(choices(Workload)), default=Workload.RANDOM_WRITE.value,
              show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=1, show_default=True)
@click.option("--ops", type=click.IntRange(0, None), default=2_000_000, show_default=True,
              help="Operations the workload performs, then it idles.")
@click.option("--threads", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--ops-per-sec", type=click.FloatRange(0, None), default=0.0, show_default=True,
              help="Throttle the workload (0: as fast as it goes).")
@click.option("--content", type=click.Choice(choices(Content)), default=Content.REALISTIC.value, show_default=True,
              help="Initial RAM: realistic (partly compressible, some zero pages), random (incompressible) or zero "
                   "(all zero: holes until written).")
@click.option("--backing", metavar="file:NAME", default="",
              help="Keep guest RAM in a new file NAME in the source agent's --backing-dir instead of anonymous "
                   "memory (NAME: 1-64 letters, digits, '.', '-' or '_', not starting with '.'): with `source "
                   "serve --state-dir`, a restarted source finishes its migration.")
@click.option("--paused", is_flag=True, help="Start paused.")
@_kind_options
@_credential_options
def guest_start(name: str, agent: str, size: int, workload: str, seed: int, ops: int, threads: int,
                ops_per_sec: float, content: str, backing: str, paused: bool, kind: str, vcpus: int | None,
                credentials: Credentials) -> None:
    """Start guest NAME on a source agent.

    \b
    Example:
      migrate guest start vm1 --agent 127.0.0.1:7070 --size 1G --workload hotset --threads 2
      migrate guest start vm2 --agent 127.0.0.1:7070 --size 256M --kind kvm --vcpus 2 --ops 50000000
    """
    threads = _threads_for(kind, vcpus, threads)
    with _client(agent, credentials) as client:
        info = client.launch(name, size=size, workload=workload, seed=seed, ops=ops, threads=threads,
                             ops_per_sec=ops_per_sec, content=content, kind=kind, paused=paused, backing=backing)
    click.echo(f"started {info.name}: pid {info.pid}, {format_size(info.spec.size)}, {info.spec.workload}")


@guest.command("list")
@_agent_option
@_credential_options
def guest_list(agent: str, credentials: Credentials) -> None:
    """List the guests on an agent.

    \b
    Example:
      migrate guest list --agent 127.0.0.1:7071
    """
    with _client(agent, credentials) as client:
        guests = client.guests()
    if not guests:
        click.echo("no guests")
        return
    click.echo(f"{'NAME':16} {'STATE':14} {'KIND':6} {'SIZE':>9} {'WORKLOAD':13} {'OPS':>12} PID")
    for g in guests:
        click.echo(f"{g.name:16} {g.state:14} {g.kind:6} {format_size(g.spec.size):>9} {g.spec.workload:13} "
                   f"{g.ops_done:>12} {g.pid or '-'}")


@guest.command("stats")
@click.argument("name")
@_agent_option
@click.option("--digest", is_flag=True, help="Also hash the guest's memory.")
@_credential_options
def guest_stats(name: str, agent: str, digest: bool, credentials: Credentials) -> None:
    """Show a guest's state and progress.

    \b
    Example:
      migrate guest stats vm1 --agent 127.0.0.1:7071 --digest
    """
    with _client(agent, credentials) as client:
        info = client.inspect(name)
        digest_text = client.digest(name) if digest else None
    click.echo(f"name       {info.name}\nstate      {info.state}\nkind       {info.kind}\npid        {info.pid or '-'}")
    click.echo(f"size       {format_size(info.spec.size)} ({info.page_count} pages of {info.page_size} B)")
    click.echo(f"workload   {info.spec.workload}, seed {info.spec.seed}, {info.spec.threads} thread(s)")
    click.echo(f"ops        {info.ops_done} of {info.spec.ops}{' (finished)' if info.finished else ''}")
    if len(info.progress) >= 2:
        a, b = info.progress[-2], info.progress[-1]
        if b.t_ns > a.t_ns:
            click.echo(f"rate       {(b.ops - a.ops) * 1e9 / (b.t_ns - a.t_ns):,.0f} ops/s")
    if digest_text:
        click.echo(f"digest     {digest_text}")


@guest.command("stop")
@click.argument("name")
@_agent_option
@_credential_options
def guest_stop(name: str, agent: str, credentials: Credentials) -> None:
    """Stop a guest and free its memory.

    \b
    Example:
      migrate guest stop vm1 --agent 127.0.0.1:7071
    """
    with _client(agent, credentials) as client:
        client.stop(name)
    click.echo(f"stopped {name}")


# -------------------------------------------------------------- migration
class _StderrLine:
    """A progress line on stderr: redrawn in place on a terminal (10 a second), else one line every 2 s."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = 0.0

    def _due(self, final: bool) -> bool:
        now = time.monotonic()
        if not final and now - self._last < (0.1 if self._tty else 2.0):
            return False
        self._last = now
        return True

    def _show(self, line: str, final: bool) -> None:
        if self._tty:
            click.echo("\r" + line + ("\n" if final else ""), err=True, nl=False)
        else:
            click.echo(line, err=True)


class ProgressLine(_StderrLine):
    """One line of migration progress on stderr: pages in, MB/s, faults."""

    def __call__(self, st: MigrationStatus | pb.MigrationStatus) -> None:  # the API's record or the agent's message
        final = st.phase in FINISHED
        if not self._due(final):
            return
        total = max(st.pages_total, 1)
        frac = st.pages_received / total
        bar = "#" * int(frac * 30)
        rate = st.bytes_pages / MiB / st.elapsed_s if st.elapsed_s > 0 else 0.0
        detail = json.loads(st.detail_json or "{}")
        phase = st.phase
        if any(isinstance(w, dict) and w.get("link_down") for w in detail.values()):
            paused = report.link_summary(detail)["paused_s"]
            phase = f"PAUSED: link to the source down, reconnecting ({paused:.1f} s paused so far)"
        self._show(f"[{bar:<30}] {frac * 100:5.1f}%  {st.pages_received}/{st.pages_total} pages  "
                   f"{rate:7.1f} MiB/s  faults {st.faults}  {phase}", final)


def _finish_report(doc: dict, report_path: str | None, table: Callable[[dict], str] = report.table) -> None:
    click.echo(table(doc))
    if report_path:
        orchestrator.write_report(doc, report_path)
        click.echo(f"report written to {report_path}")


@cli.command("run")
@click.argument("guest_name", metavar="GUEST")
@click.option("--from", "src", type=ENDPOINT, required=True, help="Source agent.")
@click.option("--to", "dst", type=ENDPOINT, required=True, help="Destination agent.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the JSON report here.")
@click.option("--no-push", is_flag=True, help="No bulk stream: pages arrive only when the guest faults on them.")
@click.option("--max-bandwidth", type=RATE, default="0",
              help="Cap the page streams, pre-copy and bulk (e.g. 100M, 1gbit).")
@click.option("--source-endpoint", type=_Parsed("HOST:PORT", lambda v: validate.endpoint(v) if v else v), default="",
              help="The source as the destination reaches it (default: --from).")
@click.option("--verify", is_flag=True, help="Compare the final memory with an unmigrated run of the same guest.")
@click.option("--timeout", type=click.FloatRange(1, None), default=3600.0, show_default=True,
              help="Seconds to wait for the migration to complete.")
@click.option("--mode", type=click.Choice(choices(Mode)), default=Mode.HYBRID.value, show_default=True,
              help="postcopy: switch at once; hybrid: pre-copy rounds, then post-copy; "
                   "precopy: pre-copy rounds, then stop-and-copy.")
@click.option("--precopy-rounds", type=click.IntRange(1, None), default=10, show_default=True,
              help="Most pre-copy rounds (the first sends every page).")
@click.option("--precopy-seconds", type=click.FloatRange(0, None), default=0.0, show_default=True,
              help="Most seconds of pre-copy (0: no limit).")
@click.option("--resume", is_flag=True,
              help="Finish a migration of GUEST whose `migrate run` died: wait for its last page and release "
                   "the guest on the source (one not yet switched over is aborted; the guest stays put).")
@click.option("--recovery-timeout", type=click.FloatRange(0.1, None),
              default=orchestrator.RunOptions.recovery_timeout, show_default=True,
              metavar="S", help="If the link to the source drops mid-post-copy, keep reconnecting this long "
                                "(the guest waits, paused) before failing.")
@click.option("--max-downtime", "max_downtime_ms", type=click.FloatRange(0, None), default=20.0, show_default=True,
              metavar="MS", help="Switch once the dirty set fits this many ms at the link's measured pace.")
@_data_plane_option
@_fault_path_option
@click.option("--policy", default="", metavar="NAME[:K=V,...]",
              help="Push and prefetch policy: sequential, bubble, trend, replay:ws=FILE, or module:Class "
                   "(importable by the destination agent).")
@click.option("--record-ws", type=click.Path(dir_okay=False, writable=True), default="", metavar="FILE",
              help="Write the pages the guest faulted on (its working set) to FILE, for --policy replay:ws=FILE.")
@_credential_options
def run_cmd(guest_name: str, src: str, dst: str, report_path: str | None, no_push: bool, max_bandwidth: int,
            source_endpoint: str, verify: bool, timeout: float, mode: str, precopy_rounds: int,
            precopy_seconds: float, resume: bool, recovery_timeout: float, max_downtime_ms: float,
            data_plane: str | None, fault_path: str, policy: str, record_ws: str, credentials: Credentials) -> None:
    """Migrate GUEST from one agent to another.

    In hybrid mode (the default) pages are copied while the guest still runs
    on the source, re-sending the pages it writes meanwhile, until that stops
    paying off; then the guest moves and the rest follows in post-copy: its
    faults are served while the remaining memory streams in, both over the
    native data plane (C threads, plain TCP) unless TLS is configured or
    --data-plane grpc is given; faults go over gRPC unless --fault-path native.
    postcopy moves the guest at once; precopy copies everything before the
    guest resumes (the classic baseline). Without write tracking on the
    source (Linux 6.7+: async userfaultfd write-protect and PAGEMAP_SCAN),
    hybrid and precopy fall back to postcopy and the report says so.

    \b
    Examples:
      migrate run vm1 --from 127.0.0.1:7070 --to 127.0.0.1:7071 --report vm1.json
      migrate run vm1 --from 127.0.0.1:7070 --to 127.0.0.1:7071 --mode precopy --max-downtime 50
      migrate run vm1 --from 127.0.0.1:7070 --to 127.0.0.1:7071 --policy trend
      migrate run vm1 --from 127.0.0.1:7070 --to 127.0.0.1:7071 --policy replay:ws=vm1.ws
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # what the orchestrator waits for, if it must
    options = dict(no_push=no_push, max_bandwidth=max_bandwidth, source_endpoint=source_endpoint, timeout=timeout,
                   precopy_rounds=precopy_rounds, precopy_seconds=precopy_seconds, max_downtime_ms=max_downtime_ms,
                   recovery_timeout=recovery_timeout, data_plane=data_plane or "", fault_path=fault_path,
                   policy=policy, record_ws=record_ws, on_status=ProgressLine(), **_auth(credentials))
    if resume:
        result = api.resume(guest_name, source=src, dest=dst, mode=mode, verify=verify, **options)
    else:
        result = api.migrate(guest_name, source=src, dest=dst, mode=mode, verify=verify, **options)
    doc = result.to_dict()
    _finish_report(doc, report_path)
    if doc.get("verified") is False:
        raise click.ClickException("verification failed: the migrated guest's memory differs")


class DrainBoard:
    """The drain's progress on stderr: one line per active run and a total.

    On a terminal the block is redrawn in place; in a pipe each line is
    printed when it changes (coarsely: every 10 % of a run), so a log of a
    drain stays short and readable.
    """

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._drawn = 0
        self._last: dict[str, str] = {}

    def __call__(self, drain_run) -> None:  # noqa: ANN001 - a migrate.drain.Drain
        from migrate.drain import progress_lines

        lines = progress_lines(drain_run, coarse=not self._tty)
        if self._tty:
            up = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
            click.echo(up + "\n".join(lines), err=True)
            self._drawn = len(lines)
            return
        for line in lines:
            key = line.split(" -> ")[0] if " -> " in line else "total"
            if self._last.get(key) != line:
                self._last[key] = line
                click.echo(line, err=True)


@cli.command("drain")
@click.option("--from", "src", type=ENDPOINT, required=True, help="Source agent to empty.")
@click.option("--to", "dsts", type=ENDPOINT, required=True, multiple=True,
              help="Destination agent (repeatable): each guest goes to the one with the most free memory.")
@click.option("--parallel", type=click.IntRange(1, 64), default=2, show_default=True, help="Most runs at once.")
@click.option("--max-bandwidth", type=RATE, default="0",
              help="Cap on the page traffic of all runs together, shared equally by the active runs (e.g. 1gbit).")
@click.option("--mode", type=click.Choice(choices(Mode)), default=Mode.HYBRID.value, show_default=True,
              help="How each guest moves (see `migrate run --help`).")
@click.option("--report-dir", type=click.Path(file_okay=False, writable=True), default=None,
              help="Write each run's JSON report here (GUEST.json), and the drain's summary (drain.json).")
@click.option("--verify", is_flag=True, help="Check each migrated guest against an unmigrated run.")
@click.option("--timeout", type=click.FloatRange(1, None), default=3600.0, show_default=True,
              help="Seconds each run may take to complete.")
@click.option("--recovery-timeout", type=click.FloatRange(0.1, None),
              default=orchestrator.RunOptions.recovery_timeout, show_default=True, metavar="S",
              help="How long a destination keeps reconnecting to a lost source before its run fails.")
@_data_plane_option
@_fault_path_option
@_credential_options
def drain_cmd(src: str, dsts: tuple[str, ...], parallel: int, max_bandwidth: int, mode: str, report_dir: str | None,
              verify: bool, timeout: float, recovery_timeout: float, data_plane: str | None, fault_path: str,
              credentials: Credentials) -> None:
    """Migrate every guest of a source agent to the destination agents, a few at a time.

    Guests go largest first, each to the destination with the most free
    memory that holds it; a guest that fits nowhere stays running on the
    source. Exits non-zero when any guest did not move, naming it.

    \b
    Example:
      migrate drain --from 10.0.0.1:7070 --to 10.0.0.2:7071 --to 10.0.0.3:7071 --parallel 2 --report-dir out
    """
    from migrate.drain import Drain, summary_table

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if report_dir:
        os.makedirs(report_dir, exist_ok=True)
    opts = orchestrator.RunOptions(verify=verify, timeout=timeout, mode=mode, recovery_timeout=recovery_timeout,
                                   data_plane=data_plane or "", fault_path=fault_path)
    try:
        opts.check(credentials.tls)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    run = Drain(src, list(dsts), opts, parallel=parallel, max_bandwidth=max_bandwidth, report_dir=report_dir or "",
                credentials=credentials, on_tick=DrainBoard())
    outcomes = run.run()
    if not outcomes:
        click.echo(f"nothing to drain: {src} hosts no guest to move")
        return
    click.echo(summary_table(run))
    if report_dir:
        click.echo(f"reports written to {report_dir}")
    left = [o for o in outcomes if not o.moved]
    bad = [o.name for o in outcomes if o.moved and (o.report or {}).get("verified") is False]
    if left:
        raise click.ClickException(f"{len(left)} of {len(outcomes)} guest(s) not moved: "
                                   + "; ".join(f"{o.name} ({o.error})" for o in left))
    if bad:
        raise click.ClickException(f"verification failed for {', '.join(bad)}: the migrated memory differs")
class SnapshotLine(_StderrLine):
    """One line of snapshot progress on stderr: pages saved, MiB/s, WP faults, guest blocked."""

    def __call__(self, p: SnapshotProgress | pb.SnapshotProgress) -> None:
        final = p.phase != Phase.RUNNING
        if not self._due(final):
            return
        frac = p.pages_saved / max(p.pages_total, 1)
        rate = p.bytes_written / MiB / p.elapsed_s if p.elapsed_s > 0 else 0.0
        self._show(f"[{'#' * int(frac * 30):<30}] {frac * 100:5.1f}%  {p.pages_saved}/{p.pages_total} pages  "
                   f"{rate:7.1f} MiB/s  WP faults {p.wp_faults}  blocked {p.blocked_ms:.1f} ms  {p.phase}", final)


@cli.command("snapshot")
@click.argument("guest_name", metavar="GUEST")
@_agent_option
@click.option("-o", "--output", "file", required=True, metavar="FILE",
              help="The snapshot's name: a new file in the agent's --snapshot-dir (1-53 letters, digits, '.', "
                   "'-' or '_', not starting with '.'); FILE.state.json holds the guest's execution state.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the JSON report here.")
@click.option("--timeout", type=click.FloatRange(1, None), default=3600.0, show_default=True,
              help="Seconds to wait for the snapshot to complete.")
@_credential_options
def snapshot_cmd(guest_name: str, agent: str, file: str, report_path: str | None, timeout: float,
                 credentials: Credentials) -> None:
    """Save a consistent snapshot of running GUEST while it keeps running.

    The guest pauses only to write-protect its memory and save its execution
    state (milliseconds); its memory is then saved as it was at that
    instant while it runs on: a write to a page not yet saved waits until
    that one page is saved. Restore it elsewhere with `migrate restore`.

    \b
    Example:
      migrate snapshot vm1 --agent 127.0.0.1:7070 -o vm1.snap --report snap.json
    """
    from migrate import checkpoint

    doc = checkpoint.take(guest_name, agent, file, on_progress=SnapshotLine(), timeout=timeout,
                          credentials=credentials)
    _finish_report(doc, report_path, checkpoint.table)


@cli.command("restore")
@click.argument("file", metavar="FILE")
@click.option("--from", "src", type=ENDPOINT, required=True,
              help="The source agent whose --snapshot-dir holds FILE; it serves the memory.")
@click.option("--to", "dst", type=ENDPOINT, required=True, help="Destination agent: the guest resumes there.")
@click.option("--name", default="", help="The restored guest's name (default: FILE).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the JSON report here.")
@click.option("--verify", is_flag=True, help="Let the guest finish and compare its memory with an unmigrated run.")
@click.option("--max-bandwidth", type=RATE, default="0", help="Cap the page streams (e.g. 100M, 1gbit).")
@_credential_options
def restore_cmd(file: str, src: str, dst: str, name: str, report_path: str | None, verify: bool,
                max_bandwidth: int, credentials: Credentials) -> None:
    """Resume a snapshot on another agent, lazily: post-copy from the snapshot's image.

    The guest runs on the destination at once, from the execution state
    saved at the snapshot; its memory faults in from the image the source
    agent serves, and the rest streams behind it.

    \b
    Example:
      migrate restore vm1.snap --from 127.0.0.1:7070 --to 127.0.0.1:7071 --name vm1
    """
    from migrate import checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    opts = orchestrator.RunOptions(verify=verify, max_bandwidth=max_bandwidth, mode=Mode.POSTCOPY)
    doc = checkpoint.restore(file, src, dst, name, opts, on_status=ProgressLine(), credentials=credentials)
    _finish_report(doc, report_path)
    if doc.get("verified") is False:
        raise click.ClickException("verification failed: the restored guest's memory differs")


@cli.command("abort")
@click.argument("guest_name", metavar="GUEST")
@click.option("--from", "src", required=True, metavar="HOST:PORT", help="Source agent (it holds the guest's memory).")
@click.option("--to", "dst", default="", metavar="HOST:PORT",
              help="Destination agent: its side of the run is checked and stopped first.")
@click.option("--force", is_flag=True,
              help="The destination is gone for good (unreachable, or not named): resume on the source anyway.")
@_credential_options
def abort_cmd(guest_name: str, src: str, dst: str, force: bool, credentials: Credentials) -> None:
    """Abort a migration of GUEST that cannot finish, and resume GUEST on the source.

    Safe at any step: after the switchover the guest resumes on the source
    only if it is not running on the destination (its run there failed, or
    the destination lost it); otherwise the refusal says why and what to do.

    \b
    Example:
      migrate abort vm1 --from 127.0.0.1:7070 --to 127.0.0.1:7071
    """
    from migrate.abort import abort

    click.echo(abort(guest_name, src, dst, force=force, credentials=credentials))


@cli.command("demo")
@click.option("--size", type=PAGES, default="512M", show_default=True, help="Guest RAM.")
@click.option("--workload", type=click.Choice(choices(Workload)), default=Workload.RANDOM_WRITE.value,
              show_default=True)
@click.option("--threads", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the JSON report here.")
@click.option("--no-push", is_flag=True, help="Pages arrive only through faults.")
@click.option("--mode", type=click.Choice(choices(Mode)), default=Mode.POSTCOPY.value, show_default=True,
              help="How to migrate (see `migrate run --help`).")
@_data_plane_option
@_fault_path_option
@_kind_options
def demo_cmd(size: int, workload: str, threads: int, report_path: str | None, no_push: bool, mode: str,
             data_plane: str | None, fault_path: str, kind: str, vcpus: int | None) -> None:
    """Migrate a running guest between two local agents, and check it.

    Starts a source and a destination agent on loopback, starts a guest
    running WORKLOAD, migrates it mid-run, lets it finish on the
    destination, checks its memory against an unmigrated run, and prints the
    report. Everything it started is stopped when it ends.

    \b
    Example:
      migrate demo --size 1G --workload hotset --report demo.json
    """
    from migrate.demo import run_demo

    threads = _threads_for(kind, vcpus, threads)
    opts = orchestrator.RunOptions(no_push=no_push, verify=True, mode=mode, data_plane=data_plane or "",
                                   fault_path=fault_path)
    with errors.bad_request():
        opts.check()
    doc = run_demo(size=size, workload=workload, threads=threads, opts=opts, kind=kind,
                   on_status=ProgressLine(), say=lambda text: click.echo(text, err=True))
    _finish_report(doc, report_path)
    if not doc.get("verified"):
        raise click.ClickException("verification failed: the migrated guest's memory differs")


def main() -> None:
    """Entry point: run the CLI, turning known failures into one line."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except errors.RunFailed as err:
        click.echo(f"error: {err}\nnext: {err.next_step}", err=True)
        sys.exit(1)
    except (errors.MigrateError, ValueError, OSError, RuntimeError, TimeoutError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)

