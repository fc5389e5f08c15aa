"""The two hosts of a bench cell: local agents for `loopback`, else a lab with that link."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from migrate.bench.matrix import LOOPBACK
from migrate.lab.lifecycle import Lab
from migrate.lab.link import LinkSpec
from migrate.local import LocalAgent


@dataclass(frozen=True)
class Hosts:
    source: str           # control endpoint of the source agent
    dest: str
    source_endpoint: str  # the source as the destination reaches it ("" : same as source)


@contextlib.contextmanager
def hosts(link: str, level: int, log_dir: str) -> Iterator[Hosts]:
    """Agents for one (link, level) pair, stopped on exit."""
    if link == LOOPBACK:
        with LocalAgent("source", "--zstd-level", str(level), log_path=os.path.join(log_dir, "source.log")) as s, \
                LocalAgent("dest", log_path=os.path.join(log_dir, "dest.log")) as d:
            yield Hosts(s.address, d.address, "")
    else:
        with Lab(LinkSpec.parse(link), zstd_level=level, name=None,
                 log=os.path.join(log_dir, "lab.log")) as lab:
            yield Hosts(lab.source, lab.dest, lab.source_endpoint)
