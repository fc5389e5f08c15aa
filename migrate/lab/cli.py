"""`migrate lab up|down|status`: two emulated hosts with a shaped link between them."""
from __future__ import annotations

import click

from migrate.lab import lifecycle, state
from migrate.lab.link import LinkSpec, parse_duration, parse_loss
from migrate.units import parse_rate


def _parsed(parse):
    """A click callback turning a parse error into a one-line usage error."""
    def callback(ctx, param, value):  # noqa: ANN001 - click's signature
        try:
            return parse(value)
        except ValueError as err:
            raise click.BadParameter(str(err)) from None
    return callback


@click.group()
def lab() -> None:
    """Two emulated hosts on this machine, joined by a shaped link.

    \b
    Example:
      migrate lab up --rate 1gbit --delay 1ms
      migrate guest start vm1 --agent SOURCE --size 256M --workload hotset
      migrate run vm1 --from SOURCE --to DEST --source-endpoint 10.77.0.1:7070
      migrate lab down
    """


_name_option = click.option("--name", default="lab", show_default=True, callback=_parsed(state.check_name),
                            help="Lab name (several labs can run at once).")


@lab.command("up")
@_name_option
@click.option("--rate", default="0", show_default=True, callback=_parsed(parse_rate),
              help="Link rate each way (e.g. 10gbit, 1gbit, 100M); 0: unlimited.")
@click.option("--delay", default="0", show_default=True, callback=_parsed(parse_duration),
              help="One-way delay (e.g. 100us, 1ms).")
@click.option("--jitter", default="0", show_default=True, callback=_parsed(parse_duration),
              help="Uniform jitter on the delay, +- (packets are never reordered).")
@click.option("--loss", default="0", show_default=True, callback=_parsed(parse_loss),
              help="Packets dropped each way, percent (e.g. 0.1%).")
@click.option("--zstd-level", default=1, show_default=True, type=click.IntRange(-7, 22),
              help="Compression level of the source agent.")
def lab_up(name: str, rate: int, delay: float, jitter: float, loss: float, zstd_level: int) -> None:
    """Create two namespaces joined by a shaped veth pair and start an agent in each.

    Runs in the background until `migrate lab down`; if its process dies,
    the lab is removed all the same.

    \b
    Example:
      migrate lab up --name wan --rate 1gbit --delay 1ms --loss 0.01%
    """
    if jitter > delay:
        raise click.BadParameter("jitter cannot exceed the delay", param_hint="--jitter")
    _, record = lifecycle.up(name, LinkSpec(rate=rate, delay=delay, jitter=jitter, loss=loss),
                             zstd_level=zstd_level)
    click.echo(f"lab {name} is up: {record['link_text']}")
    _echo_endpoints(record)


def _echo_endpoints(record: dict) -> None:
    click.echo(f"  source agent   {record['source']}  (inside: {record['source_endpoint']}, "
               f"pid {record['source_pid']})")
    click.echo(f"  dest agent     {record['dest']}  (inside: {record['dest_inside']}, pid {record['dest_pid']})")
    click.echo(f"  migrate run GUEST --from {record['source']} --to {record['dest']} "
               f"--source-endpoint {record['source_endpoint']}")


@lab.command("down")
@_name_option
@click.option("--all", "every", is_flag=True, help="Take down every lab on this machine.")
def lab_down(name: str, every: bool) -> None:
    """Stop the agents and remove the namespaces, link and rules of a lab.

    \b
    Example:
      migrate lab down --name wan
    """
    if every:
        for n in state.names():
            click.echo(f"lab {n} is down" if lifecycle.down(n) else f"no lab named {n}")
    elif lifecycle.down(name):
        click.echo(f"lab {name} is down")
    else:
        raise click.ClickException(f"no lab named {name}")


@lab.command("status")
@click.option("--name", default=None, help="Only this lab (default: every lab).")
def lab_status(name: str | None) -> None:
    """Show each lab's link, agents and the bytes its link has carried.

    \b
    Example:
      migrate lab status --name wan
    """
    names = [name] if name else state.names()
    if not names:
        click.echo("no labs")
    for n in names:
        record = lifecycle.status(n)
        if record is None:
            click.echo(f"no lab named {n}")
            continue
        health = "running" if record["keeper_alive"] else "keeper gone (run `migrate lab down` to clean up)"
        click.echo(f"lab {n}: {health}\n  link           {record['link_text']}")
        if "source" in record:
            _echo_endpoints(record)
            alive = ", ".join(f"{role} {'up' if ok else 'DOWN'}" for role, ok in record["agents_alive"].items())
            click.echo(f"  agents         {alive}")
        for ns, st in record["link_stats"].items():
            direction = "source -> dest" if ns.endswith("-src") else "dest -> source"
            if st:
                click.echo(f"  {direction}  {st['bytes'] / 2**20:.1f} MiB in {st['packets']} packets, "
                           f"{st['drops']} dropped ({st['qdisc']})")
