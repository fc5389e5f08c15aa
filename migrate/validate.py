"""Checks on what a peer sends that the protobuf types alone do not bound.

Every RPC field reaches an argv, a memfd name, a thread count, a memory
size or a JSON parser. Each check here raises ValueError with one line a
user can act on, which the agent answers as INVALID_ARGUMENT, before any
process, memory or file is created for the request.
"""
from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING

from migrate.errors import BadRequest
from migrate.names import DataPlane
from migrate.planes import KEY_BYTES, PageRoute

if TYPE_CHECKING:  # light to import: the lab's relay and the CLI's option parsing use this module
    from migrate.guest.process import GuestSpec

#: Most workload threads a guest may ask for (the CLI's limit too).
MAX_THREADS = 64
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENDPOINT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})")


def memory_capacity() -> int:
    """Bytes this host can back at most: RAM plus swap (from /proc/meminfo)."""
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "SwapTotal"):
                total += int(rest.split()[0]) * 1024
    return total


def guest_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise BadRequest(f"bad guest name {name[:80]!r}: use 1-64 letters, digits, '-', '_' or '.'")
    return name


def run_id(value: str) -> str:
    if not _RUN_ID.fullmatch(value):
        raise BadRequest(f"bad run id {value[:80]!r}: 1-64 letters, digits, '-' or '_'")
    return value


def split_endpoint(value: str, what: str = "endpoint", *, listen: bool = False) -> tuple[str, int]:
    """HOST and PORT of `value`: the one parser of endpoints (flags and RPC fields alike).

    The port must be 1-65535, or 0 when listening (any free port): gRPC
    would take 99999 as 99999 mod 65536 and listen somewhere unexpected.
    """
    m = _ENDPOINT.fullmatch(value)
    lowest = 0 if listen else 1
    if not m or not lowest <= int(m.group(2)) <= 65535:
        raise BadRequest(f"bad {what} {value[:80]!r}: expected HOST:PORT with a port from {lowest} to 65535")
    return m.group(1), int(m.group(2))


def endpoint_with_port(endpoint: str, other: str) -> str:
    """`endpoint`'s host with `other`'s port: a second service of the same agent, as the caller reaches it."""
    return f"{split_endpoint(endpoint)[0]}:{split_endpoint(other)[1]}"


def endpoint(value: str, what: str = "endpoint", *, listen: bool = False) -> str:
    """`value` if it is a valid HOST:PORT (see split_endpoint), else ValueError."""
    split_endpoint(value, what, listen=listen)
    return value


def page_route(route: PageRoute) -> PageRoute:
    """Endpoints (and, on the native plane, a key) the destination can use."""
    endpoint(route.source_endpoint, "source_endpoint")
    if route.plane is DataPlane.NATIVE:
        endpoint(route.data_endpoint, "data_endpoint")
        if len(route.data_key) != KEY_BYTES:
            raise BadRequest(f"data_key must be {KEY_BYTES} bytes, got {len(route.data_key)}")
    else:
        endpoint(route.bulk_endpoint, "bulk_endpoint")
    return route


def spec_fits(spec: GuestSpec) -> GuestSpec:
    """Refuse specs this host cannot run: too much memory, too many threads."""
    if spec.threads > MAX_THREADS:
        raise BadRequest(f"guest threads must be <= {MAX_THREADS}, got {spec.threads}")
    capacity = memory_capacity()
    if spec.size > capacity:
        raise BadRequest(f"guest size {spec.size} bytes exceeds this host's memory "
                         f"({capacity} bytes of RAM and swap)")
    return spec


def seconds(value: float, what: str) -> float:
    """A duration from the wire: finite and >= 0 (0 usually means "no limit")."""
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return value


def state_json(raw: bytes) -> dict | None:
    """A guest's execution state: a JSON object, or None when empty."""
    if not raw:
        return None
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise BadRequest(f"state_json is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(state, dict):
        raise BadRequest(f"state_json must be a JSON object, got {type(state).__name__}")
    return state
