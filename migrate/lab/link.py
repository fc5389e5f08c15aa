"""A link profile ("1gbit/1ms/0.1%") and the tc / nftables settings that make it real.

The kernel here has no netem, so each knob has its own mechanism: rate is a
tc tbf qdisc on each veth end, loss an nftables `numgen random` drop rule on
input, and delay/jitter come from our relay (migrate/lab/relay.py), which
an nftables redirect puts on the path of every connection into the source.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from migrate.units import parse_rate

_TIME = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
#: Largest burst tbf may send at line rate: 1 ms worth of the rate, at least 64 KiB (a GSO packet).
_BURST_S = 1e-3
_MIN_BURST = 64 * 1024
#: Queueing tbf allows before it drops, as time at the configured rate.
_QUEUE_LATENCY = "10ms"
#: nftables table holding this lab's rules (one per namespace, gone with it).
NFT_TABLE = "migrate_lab"


def parse_duration(text: str) -> float:
    """Seconds in "100us", "1ms", "0.5s" or "0"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s)?\s*", text)
    if not m or (m.group(2) is None and float(m.group(1)) != 0):
        raise ValueError(f"bad duration {text!r}: use e.g. 100us, 1ms or 0")
    return float(m.group(1)) * _TIME[m.group(2) or "s"]


def parse_loss(text: str) -> float:
    """Percent in "0.1%" or "0.1"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", text)
    if not m or float(m.group(1)) >= 100:
        raise ValueError(f"bad loss {text!r}: use a percentage below 100, e.g. 0.1%")
    return float(m.group(1))


def format_duration(s: float) -> str:
    return "0" if s == 0 else f"{s * 1e6:g}us" if s < 1e-3 else f"{s * 1e3:g}ms"


def format_rate(bytes_per_s: int) -> str:
    bits = bytes_per_s * 8
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits}bit"


@dataclass(frozen=True)
class LinkSpec:
    """One direction's shaping, applied to both directions of the link."""

    rate: int = 0          # bytes/s, 0: unlimited
    delay: float = 0.0     # one-way seconds
    jitter: float = 0.0    # seconds, uniform +-, order kept
    loss: float = 0.0      # percent of packets dropped on input

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """`RATE/DELAY[/LOSS%]` in any order ("1gbit/1ms", "10gbit/100us/0.1%"); "lab": unshaped."""
        if text.strip() == "lab":
            return cls()
        rate, delay, loss = 0, 0.0, 0.0
        for part in text.split("/"):
            part = part.strip()
            if part.endswith("%"):
                loss = parse_loss(part)
            elif re.fullmatch(r"[\d.]+\s*(us|µs|ms|s)", part):
                delay = parse_duration(part)
            else:
                try:
                    rate = parse_rate(part)
                except ValueError:
                    raise ValueError(f"bad link profile {text!r}: use e.g. 1gbit/1ms, 10gbit/100us/0.1% "
                                     f"or loopback") from None
        return cls(rate=rate, delay=delay, loss=loss)

    def describe(self) -> str:
        parts = [format_rate(self.rate) if self.rate else "unlimited rate",
                 f"{format_duration(self.delay)} one-way delay" if self.delay else "no added delay"]
        if self.jitter:
            parts.append(f"±{format_duration(self.jitter)} jitter")
        if self.loss:
            parts.append(f"{self.loss:g}% loss")
        return ", ".join(parts)

    @property
    def needs_relay(self) -> bool:
        return self.delay > 0 or self.jitter > 0

    @property
    def needs_nft(self) -> bool:
        return self.needs_relay or self.loss > 0

    def relay_buffer(self) -> int:
        """Bytes the relay may hold per direction: room for 4x the bandwidth-delay product."""
        bdp = (self.rate or 1_250_000_000) * (self.delay + self.jitter)
        return max(4 << 20, int(4 * bdp))


def tbf_args(spec: LinkSpec) -> list[str]:
    """`tc qdisc replace ... root` arguments for the rate limit (empty: unlimited)."""
    if not spec.rate:
        return []
    burst = max(_MIN_BURST, int(spec.rate * _BURST_S))
    return ["tbf", "rate", f"{spec.rate * 8}bit", "burst", str(burst), "latency", _QUEUE_LATENCY]


def nft_ruleset(spec: LinkSpec, dev: str, relay_port: int | None) -> str:
    """The nftables table for one namespace: loss on input, and (source side) the redirect into the relay."""
    chains = []
    if spec.loss:
        per_10k = round(spec.loss * 100)
        chains.append("chain loss {\n type filter hook input priority filter;\n"
                      f' iifname "{dev}" numgen random mod 10000 < {per_10k} drop\n}}')
    if relay_port:
        chains.append("chain relay {\n type nat hook prerouting priority dstnat;\n"
                      f' iifname "{dev}" tcp dport != {relay_port} redirect to :{relay_port}\n}}')
    return f"table inet {NFT_TABLE} {{\n" + "\n".join(chains) + "\n}\n" if chains else ""
