"""The bench matrix: axes from the command line or a TOML file, expanded into cells.

A cell is one combination of link profile, zstd level, guest size, workload,
mode and data plane; each is run `reps` times plus once unmigrated (the baseline).
Cells are ordered so each (link, level) pair needs one set of agents.
"""
from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field, fields, replace

from migrate.lab.link import LinkSpec
from migrate.names import Content, DataPlane, Mode, Workload, parse
from migrate.units import parse_size

LOOPBACK = "loopback"
#: Axes: a TOML key may hold one value or a list.
AXES = ("sizes", "workloads", "modes", "levels", "links", "planes")


@dataclass(frozen=True)
class Cell:
    link: str
    level: int
    size: int
    workload: str
    mode: str
    plane: str = DataPlane.NATIVE.value

    @property
    def key(self) -> str:
        """Identifies the cell in the results file (resume matches on it)."""
        return f"{self.link}|{self.level}|{self.size}|{self.workload}|{self.mode}|{self.plane}"

    def describe(self) -> str:
        return f"{self.link}, zstd {self.level}, {self.size >> 20} MiB {self.workload}, {self.mode}, {self.plane}"


@dataclass
class Matrix:
    sizes: list[int] = field(default_factory=lambda: [256 << 20])
    workloads: list[str] = field(default_factory=lambda: [Workload.HOTSET])
    modes: list[str] = field(default_factory=lambda: [Mode.POSTCOPY])
    levels: list[int] = field(default_factory=lambda: [1])
    links: list[str] = field(default_factory=lambda: [LOOPBACK])
    planes: list[str] = field(default_factory=lambda: [DataPlane.NATIVE.value])
    reps: int = 3
    ops: int = 4_000_000
    ops_per_sec: float = 1_000_000.0
    threads: int = 1
    switch_at: float = 0.25     # migrate once the guest did this fraction of its ops
    content: str = Content.REALISTIC  # initial guest RAM: realistic or random

    def check(self) -> Matrix:
        """Raise ValueError (one line) for anything that cannot run."""
        for w in self.workloads:
            parse(Workload, w, "workload")
        for m in self.modes:
            parse(Mode, m, "mode")
        for plane in self.planes:
            parse(DataPlane, plane, "data plane")
        for link in self.links:
            if link != LOOPBACK:
                LinkSpec.parse(link)
        for lv in self.levels:
            if not -7 <= lv <= 22:
                raise ValueError(f"zstd level {lv} is outside -7..22")
        if self.reps < 1 or self.ops < 1 or self.threads < 1 or not 0 < self.switch_at < 1:
            raise ValueError("reps, ops and threads must be >= 1 and switch_at between 0 and 1")
        parse(Content, self.content, "content")
        return self

    def cells(self) -> list[Cell]:
        return [Cell(*axes) for axes in
                itertools.product(self.links, self.levels, self.sizes, self.workloads, self.modes, self.planes)]

    def merged(self, overrides: dict) -> Matrix:
        """This matrix with the given fields replaced (command-line options over a file)."""
        return replace(self, **overrides)


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, list) else [value]


def load_toml(path: str) -> Matrix:
    """A Matrix from a TOML file; the keys are Matrix's fields (axes take one value or a list).

    \b
    sizes = ["64M", "256M"]
    workloads = "hotset"
    modes = ["postcopy", "hybrid"]
    planes = ["native", "grpc"]
    links = ["loopback", "10gbit/100us", "1gbit/1ms"]
    reps = 3
    """
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: {err}") from None
    known = {f.name for f in fields(Matrix)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for axis in AXES:
        if axis in doc:
            doc[axis] = _as_list(doc[axis])
    if "sizes" in doc:
        doc["sizes"] = [s if isinstance(s, int) else parse_size(str(s)) for s in doc["sizes"]]
    return Matrix(**doc)
