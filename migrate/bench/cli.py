"""`migrate bench` and `migrate plot`."""
from __future__ import annotations

import os
import shutil

import click

from migrate.bench import driver, summary
from migrate.bench.matrix import Matrix, load_toml
from migrate.names import Content, DataPlane, Mode, Workload, choices
from migrate.units import parse_size


def _sizes(ctx, param, values):  # noqa: ANN001 - click's signature
    try:
        return [parse_size(v) for v in values]
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@click.command("bench")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML file with the matrix; options given here override it.")
@click.option("--size", "sizes", multiple=True, callback=_sizes, help="Guest size (repeatable) [256M].")
@click.option("--workload", "workloads", multiple=True, type=click.Choice(choices(Workload)),
              help="Workload (repeatable) [hotset].")
@click.option("--mode", "modes", multiple=True, type=click.Choice(choices(Mode)), help="Migration mode (repeatable) "
              "[postcopy].")
@click.option("--data-plane", "planes", multiple=True, type=click.Choice([p.value for p in DataPlane]),
              help="Data plane (repeatable) [native].")
@click.option("--level", "levels", multiple=True, type=click.IntRange(-7, 22),
              help="zstd level of the source (repeatable) [1].")
@click.option("--link", "links", multiple=True, metavar="PROFILE",
              help="loopback, or a lab link RATE/DELAY[/LOSS%] such as 1gbit/1ms (repeatable) [loopback].")
@click.option("--reps", type=click.IntRange(1, None), default=None, help="Migrations per cell [3].")
@click.option("--ops", type=click.IntRange(1, None), default=None, help="Guest operations per run [4000000].")
@click.option("--ops-per-sec", type=click.FloatRange(0, None), default=None,
              help="Guest pace, 0: unthrottled [1000000].")
@click.option("--threads", type=click.IntRange(1, 64), default=None, help="Guest threads [1].")
@click.option("--switch-at", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Migrate once the guest did this fraction of its ops [0.25].")
@click.option("--content", type=click.Choice(choices(Content)), default=None,
              help="Initial guest RAM [realistic].")
@click.option("-o", "--out", "out_dir", default="bench-out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for bench.jsonl, summary.csv and logs.")
@click.option("--fresh", is_flag=True, help="Discard earlier results in --out instead of resuming.")
def bench(config: str | None, out_dir: str, fresh: bool, **axes) -> None:
    """Run a matrix of migrations, each cell also once unmigrated (its baseline).

    The matrix is size x workload x mode x data plane x zstd level x link x reps. Every
    finished run is appended to OUT/bench.jsonl at once; running the same
    command again resumes where it stopped. OUT/summary.csv gets
    min/median/max of every metric per cell; a table of medians is printed.
    Lab links need root, tc and nftables.

    \b
    Examples:
      migrate bench --size 256M --workload hotset --mode postcopy --mode hybrid \\
          --link loopback --link 10gbit/100us --link 1gbit/1ms --reps 3 -o hotset-bench
      migrate bench --config bench.toml -o out && migrate plot out -o out/bench.png
    """
    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in axes.items() if v not in (None, (), [])}
    m = (load_toml(config) if config else Matrix()).merged(given).check()
    if fresh and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    rows = driver.run_matrix(m, out_dir, say=lambda text: click.echo(text, err=True))
    click.echo(summary.table(rows))
    click.echo(f"results: {os.path.join(out_dir, driver.RESULTS)}, summary: {os.path.join(out_dir, driver.SUMMARY)}")


@click.command("plot")
@click.argument("source", metavar="REPORT_OR_BENCH", type=click.Path(exists=True))
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--run", "run", type=click.IntRange(0, None), default=None,
              help="For a bench: plot this run (0 = first) like a report, against its baseline.")
def plot(source: str, out: str, run: int | None) -> None:
    """Draw a migration report or a bench as a PNG.

    A report (from `migrate run --report`) or one bench run (--run N):
    pages arrived over time (pushed vs faulted, switchover marked), the
    fault latency CDF and guest throughput against its baseline. A bench
    (its directory or bench.jsonl): grouped bars per mode of total time,
    downtime, bytes on the wire and throughput vs baseline.

    \b
    Examples:
      migrate plot vm1.json -o vm1.png
      migrate plot hotset-bench -o bench.png
      migrate plot hotset-bench --run 0 -o run0.png
    """
    from migrate.plot import plot as draw

    what = draw(source, out, run)
    click.echo(f"wrote {out} ({what})")
