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
                ["source", "serve", "--help"], ["dest", "serve", "--help"],
                ["drain", "--help"]):
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
    # one line: gRPC's own ("add_port.cc ... Failed to add port") stays off stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


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


@pytest.mark.parametrize("args", [
    ["source", "serve", "--listen", "127.0.0.1:99999"],
    ["dest", "serve", "--listen", "127.0.0.1:65536"],
    ["dest", "serve", "--uffd-socket", "/tmp/never.sock", "--restore-from", "127.0.0.1:99999", "--image", "i"],
    ["guest", "list", "--agent", "127.0.0.1:99999"],
    ["run", "x", "--from", "127.0.0.1:99999", "--to", "127.0.0.1:1"],
    ["run", "x", "--from", "127.0.0.1:1", "--to", "127.0.0.1:0"],
    ["run", "x", "--from", "127.0.0.1:1", "--to", "127.0.0.1:2", "--source-endpoint", "10.0.0.1:123456"],
])
def test_ports_outside_the_range_are_refused(args):
    """gRPC would take 99999 as 99999 mod 65536: every endpoint flag refuses it instead."""
    out = run_cli(*args, timeout=30)
    assert_clean_error(out, "expected HOST:PORT with a port from")


def test_endpoints_have_one_parser():
    from migrate.validate import split_endpoint

    assert split_endpoint("[::1]:7070") == ("[::1]", 7070)
    assert split_endpoint("0.0.0.0:0", listen=True) == ("0.0.0.0", 0)
    for bad in ("127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "h:-1", "a b:1"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            split_endpoint(bad)


def test_sizes_are_exact(agents):
    src, _ = agents
    out = run_cli("guest", "start", "odd", "--agent", src.address, "--size", "1.3M")
    assert_clean_error(out, "not a whole number of bytes")
    out = run_cli("guest", "start", "half", "--agent", src.address, "--size", "1.5M", "--workload", "idle")
    try:
        assert out.returncode == 0, out.stderr
        assert "1.5 MiB" in out.stdout  # it was shown as "1 MiB"
    finally:
        run_cli("guest", "stop", "half", "--agent", src.address)


def test_token_flag_warns_and_the_variable_does_not(agents):
    src, _ = agents
    flag = run_cli("guest", "list", "--agent", src.address, "--token", "s3cret")
    assert flag.returncode == 0, flag.stderr
    assert "--token shows in the process list" in flag.stderr and "MIGRATE_TOKEN" in flag.stderr
    env = subprocess.run(spawn.module_argv("migrate", "guest", "list", "--agent", src.address), capture_output=True,
                         text=True, timeout=60, env=spawn.child_env({"MIGRATE_TOKEN": "s3cret"}),
                         stdin=subprocess.DEVNULL)
    assert env.returncode == 0 and env.stderr == "", env.stderr


def test_uffd_socket_in_a_missing_directory_names_it(tmp_path):
    path = tmp_path / "missing" / "uffd.sock"
    out = run_cli("dest", "serve", "--listen", "127.0.0.1:0", "--uffd-socket", str(path),
                  "--restore-from", "127.0.0.1:1", "--image", "img")
    assert_clean_error(out, str(path), "No such file or directory")
    assert len(out.stderr.strip().splitlines()) == 1


def test_huge_names_are_refused_and_never_echoed(agents, tmp_path):
    from migrate.client import AgentClient
    from migrate.proto import migrate_pb2 as pb
    from migrate.rpc import AgentError

    src, dst = agents
    huge = "n" * 100_000
    with AgentClient(src.address) as c:
        for method, request, needle in (("InspectGuest", pb.GuestRef(name=huge), "bad guest name"),
                                        ("StopGuest", pb.GuestRef(name=huge), "bad guest name"),
                                        ("ScanDirty", pb.RunRef(run_id=huge), "bad run id")):
            with pytest.raises(AgentError, match=needle) as err:
                c.call(method, request)
            assert len(str(err.value)) < 200
    with AgentClient(dst.address) as c:
        with pytest.raises(AgentError, match="bad run id"):
            c.call("IncomingStatus", pb.RunRef(run_id=huge))
    for log in ("source.log", "dest.log"):
        assert huge[:1000] not in (tmp_path / log).read_text()


def test_an_unknown_incoming_run_says_the_destination_lost_it(agents):
    from migrate.client import AgentClient
    from migrate.proto import migrate_pb2 as pb
    from migrate.rpc import AgentError

    with AgentClient(agents[1].address) as c:
        with pytest.raises(AgentError, match="restarted without --state-dir"):
            c.call("IncomingStatus", pb.RunRef(run_id="f" * 32))
        with pytest.raises(AgentError, match="restarted without --state-dir"):
            c.call("WaitIncoming", pb.WaitIncomingRequest(run_id="f" * 32, wait_s=0.5))
        for wait_s in (-1.0, 5.0, float("nan")):
            with pytest.raises(AgentError, match="wait_s must be between 0 and 1 s"):
                c.call("WaitIncoming", pb.WaitIncomingRequest(run_id="f" * 32, wait_s=wait_s))
