"""Tears a lab down once its keeper has ended, however it ended.

    python -m migrate.lab.janitor NAME    (stdin: a pipe only the keeper holds)

It blocks reading stdin; EOF means the keeper is gone (a clean stop or a
crash alike). It then stops whatever still runs in the lab's namespaces,
deletes them (with them the veth, qdiscs and nftables rules) and removes
the state file. It lives in its own session so a Ctrl-C aimed at the
keeper's terminal does not reach it.
"""
from __future__ import annotations

import signal
import sys

from migrate.lab import netns, state


def main() -> None:
    name = sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.stdin.buffer.read()
    record = state.load(name)
    netns.teardown(record["namespaces"] if record else state.namespaces(name))
    state.remove(name)


if __name__ == "__main__":
    main()
