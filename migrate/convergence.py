"""When to stop pre-copying: the switch policy of hybrid and precopy migrations.

A pre-copy round sends every page the destination lacks; the source's scan
after it says how many of them the guest wrote again meanwhile. Rounds go on
while they pay off. The policy switches when the first of these holds:

* the dirty set fits what the link moves within the target downtime
  (`max_downtime_ms`): copying or discarding it is cheap;
* the dirty set stopped shrinking: the guest wrote again at least a share
  `shrink` of the pages the round sent (a round sends the previous dirty
  set), so it dirties about as fast as the link copies and more rounds only
  burn bandwidth. For precopy that share is 90%: every page left is copied
  while the guest is paused. For hybrid it is 50%: what is left goes after
  the switch anyway, pushed first (the destination plans it ahead of the
  rest), so a round that does not halve it adds its time to the total and
  saves little blocked time (a hot set is written again faster than any
  round can send it);
* the round or time budget (`rounds`, `seconds`) is spent.

Every condition is checked after each round and a round always ends, so
pre-copy always ends, however fast the guest writes.
"""
from __future__ import annotations

from dataclasses import dataclass

#: A round must leave fewer dirty pages than this fraction of the pages it sent to count as progress:
#: precopy's default, and hybrid's.
SHRINK = 0.9
HYBRID_SHRINK = 0.5


@dataclass
class Limits:
    rounds: int = 10              # most pre-copy rounds (the first sends everything)
    seconds: float = 0.0          # most seconds of pre-copy, 0: no limit
    max_downtime_ms: float = 20.0
    shrink: float = SHRINK        # see the module's docstring


@dataclass
class Round:
    """One pre-copy round as the orchestrator saw it."""

    sent: int                     # pages pulled by the destination
    discarded: int                # stale pages dropped before pulling
    seconds: float                # the pull's duration
    bytes_wire: int
    dirty: int                    # pages the guest wrote since the previous scan
    dirty_window_s: float         # time between that scan and the previous one

    @property
    def link_pages_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    @property
    def dirty_rate(self) -> float:
        """Pages dirtied per second over the round."""
        return self.dirty / self.dirty_window_s if self.dirty_window_s > 0 else 0.0


def link_pages_per_s(rounds: list[Round]) -> float:
    """The link's pace in pages/s: the latest round that moved enough to time it."""
    for r in reversed(rounds):
        if r.sent >= 256 and r.seconds > 0:
            return r.link_pages_per_s
    return 0.0


def switch_reason(rounds: list[Round], elapsed_s: float, limits: Limits) -> str | None:
    """Why to stop pre-copying after `rounds`, or None to run another round."""
    last = rounds[-1]
    budget = link_pages_per_s(rounds) * limits.max_downtime_ms / 1000.0
    if last.dirty <= budget:
        return f"dirty set ({last.dirty} pages) fits the {limits.max_downtime_ms:g} ms downtime target"
    if last.dirty >= limits.shrink * last.sent:
        return f"dirty set stopped shrinking ({last.sent} pages sent, {last.dirty} written again)"
    if len(rounds) >= limits.rounds:
        return f"round limit ({limits.rounds}) reached"
    if limits.seconds and elapsed_s >= limits.seconds:
        return f"time limit ({limits.seconds:g} s) reached"
    return None
