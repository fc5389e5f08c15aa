"""Lab state files: /run/migrate-lab/NAME.json says what a lab made, for whoever tears it down.

The keeper writes it before it creates anything, so `migrate lab down` (or
the janitor) finds every namespace and process even if the keeper died
half-way through building the lab.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

STATE_DIR = Path(os.environ.get("MIGRATE_LAB_DIR", "/run/migrate-lab"))
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,19}")


def check_name(name: str) -> str:
    """Lab names become namespace names: lowercase letters, digits and dashes, at most 20."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad lab name {name!r}: use up to 20 lowercase letters, digits or dashes")
    return name


def namespaces(name: str) -> list[str]:
    """The source and destination namespace names of lab `name`."""
    return [f"mlab-{name}-src", f"mlab-{name}-dst"]


def path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def log_path(name: str) -> Path:
    return STATE_DIR / f"{name}.log"


def save(record: dict) -> None:
    """Write atomically: a reader never sees half a file."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path(record["name"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path(record["name"]))


def load(name: str) -> dict | None:
    try:
        return json.loads(path(name).read_text())
    except (OSError, ValueError):
        return None


def names() -> list[str]:
    """Every lab with a state file."""
    return sorted(p.stem for p in STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []


def remove(name: str) -> None:
    for p in (path(name), log_path(name)):
        p.unlink(missing_ok=True)
