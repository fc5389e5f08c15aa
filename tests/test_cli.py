"""The CLI: clear one-line errors, non-zero exits, never a traceback or a hang."""
from __future__ import annotations

import socket
import subprocess

import pytest

from migrate import spawn


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(spawn.module_argv("migrate", *args), capture_output=True, text=True, timeout=timeout,
                          env=spawn.child_env(), stdin=subprocess.DEVNULL)


def assert_clean_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_has_examples():
    for cmd in (["--help"], ["run", "--help"], ["demo", "--help"], ["guest", "start", "--help"],
                ["source", "serve", "--help"], ["dest", "serve", "--help"]):
        out = run_cli(*cmd)
        assert out.returncode == 0, out.stderr
        assert "migrate" in out.stdout and ("Example" in out.stdout or "Quick start" in out.stdout)


def test_unreachable_agent():
    out = run_cli("guest", "list", "--agent", f"127.0.0.1:{free_port()}")
    assert_clean_error(out, "cannot reach agent")


def test_bad_size():
    out = run_cli("guest", "start", "x", "--size", "lots")
    assert_clean_error(out, "bad size")


def test_bad_rate():
    out = run_cli("run", "x", "--from", "a:1", "--to", "b:2", "--max-bandwidth", "fast")
    assert_clean_error(out, "bad rate")


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        out = run_cli("source", "serve", "--listen", f"127.0.0.1:{s.getsockname()[1]}")
    assert_clean_error(out, "cannot listen")


def test_bad_image():
    out = run_cli("source", "serve", "--listen", "127.0.0.1:0", "--image", "nope")
    assert_clean_error(out, "NAME=PATH")


@pytest.mark.parametrize("size", ["5000", "0"])
def test_size_not_a_page_multiple(agents, size):
    src, _ = agents
    out = run_cli("guest", "start", "odd", "--agent", src.address, "--size", size)
    assert_clean_error(out, "guest size")


def test_unknown_guest(agents):
    src, dst = agents
    out = run_cli("guest", "stats", "ghost", "--agent", src.address)
    assert_clean_error(out, "no guest named 'ghost'")
    out = run_cli("run", "ghost", "--from", src.address, "--to", dst.address)
    assert_clean_error(out, "no guest named 'ghost'")


def test_duplicate_guest_and_wrong_roles(agents):
    src, dst = agents
    assert run_cli("guest", "start", "twin", "--agent", src.address, "--size", "4M", "--ops", "0").returncode == 0
    try:
        assert_clean_error(run_cli("guest", "start", "twin", "--agent", src.address, "--size", "4M"),
                           "already exists")
        assert_clean_error(run_cli("run", "twin", "--from", dst.address, "--to", src.address), "not a source agent")
        listing = run_cli("guest", "list", "--agent", src.address)
        assert listing.returncode == 0 and "twin" in listing.stdout
    finally:
        assert run_cli("guest", "stop", "twin", "--agent", src.address).returncode == 0


def test_unreachable_destination_leaves_guest_on_source(agents):
    src, _ = agents
    assert run_cli("guest", "start", "home", "--agent", src.address, "--size", "4M", "--ops", "0").returncode == 0
    try:
        out = run_cli("run", "home", "--from", src.address, "--to", f"127.0.0.1:{free_port()}")
        assert_clean_error(out, "cannot reach agent")
        stats = run_cli("guest", "stats", "home", "--agent", src.address)
        assert stats.returncode == 0 and ("running" in stats.stdout or "finished" in stats.stdout)
    finally:
        run_cli("guest", "stop", "home", "--agent", src.address)
