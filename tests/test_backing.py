"""File-backed guests: only new files, only in the agent's --backing-dir, gone with their guest.

An agent may run as root and, without a token, any local process can call
it: `--backing file:NAME` must never overwrite, follow or reach outside its
directory, and must leave no file behind once its guest has stopped or
migrated away.
"""
from __future__ import annotations

import mmap
import os

import pytest

from migrate import errors, orchestrator
from migrate.backing import BackingDir
from migrate.client import AgentClient
from migrate.local import LocalAgent, wait_for
from migrate.proto import migrate_pb2 as pb
from migrate.rpc import AgentError

SPEC = pb.GuestSpec(size=4 << 20, workload="random-write", seed=2, ops=20_000, ops_per_sec=50_000,
                    page_size=mmap.PAGESIZE)


@pytest.fixture
def rooms(tmp_path):
    """The backing directory, and a file outside it that must survive everything."""
    room = tmp_path / "ram"
    room.mkdir()
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me" * 1000)
    return room, precious


def launch(address: str, name: str, backing: str) -> pb.GuestInfo:
    with AgentClient(address) as c:
        return c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=SPEC, backing=backing), timeout=120)


@pytest.mark.parametrize("name", ["../precious", "a/b", "/etc/passwd", "..", ".hidden", "", "x" * 65, "sp ace"])
def test_names_outside_the_rule_are_refused(rooms, name):
    room, _ = rooms
    d = BackingDir(str(room))
    try:
        with pytest.raises(ValueError, match="bad backing file name"):
            d.create(f"file:{name}", 4096)
    finally:
        os.close(d.fd)
    assert not os.listdir(room)


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_an_existing_name_is_never_written(rooms, kind):
    room, precious = rooms
    before = precious.read_bytes()
    if kind == "file":
        (room / "taken").write_bytes(before)
        target = room / "taken"
    else:
        (room / "taken").symlink_to(precious)
        target = precious
    d = BackingDir(str(room))
    try:
        with pytest.raises(errors.AlreadyExists, match="already exists"):
            d.create("file:taken", 1 << 20)
    finally:
        os.close(d.fd)
    assert target.read_bytes() == before


def test_agent_refusals(rooms, tmp_path):
    room, precious = rooms
    (room / "taken").write_bytes(b"x")
    (room / "link").symlink_to(precious)
    with LocalAgent("source", "--backing-dir", str(room), log_path=str(tmp_path / "src.log")) as src:
        for backing, needle in (("file:taken", "already exists"), ("file:link", "already exists"),
                                (f"file:{precious}", "bad backing file name"),
                                ("file:../precious", "bad backing file name"), ("disk:x", "use file:NAME")):
            with pytest.raises(AgentError, match=needle):
                launch(src.address, "vm", backing)
    assert (room / "taken").read_bytes() == b"x"
    assert precious.read_bytes() == b"keep me" * 1000
    with LocalAgent("source", log_path=str(tmp_path / "src2.log")) as src:
        with pytest.raises(AgentError, match="start it with --backing-dir"):
            launch(src.address, "vm", "file:new")
    assert sorted(os.listdir(room)) == ["link", "taken"]


def test_the_file_goes_when_its_guest_stops(rooms, tmp_path):
    room, _ = rooms
    with LocalAgent("source", "--backing-dir", str(room), log_path=str(tmp_path / "src.log")) as src:
        launch(src.address, "vm", "file:vm.ram")
        assert (room / "vm.ram").stat().st_size == SPEC.size
        assert (room / "vm.ram").stat().st_mode & 0o077 == 0
        with AgentClient(src.address) as c:
            c.call("StopGuest", pb.GuestRef(name="vm"))
        assert not (room / "vm.ram").exists()


def test_the_file_goes_when_its_guest_migrates_away(rooms, tmp_path):
    room, _ = rooms
    with LocalAgent("source", "--backing-dir", str(room), log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", log_path=str(tmp_path / "dst.log")) as dst:
        launch(src.address, "vm", "file:vm.ram")
        try:
            doc = orchestrator.migrate("vm", src.address, dst.address, orchestrator.RunOptions(mode="postcopy"))
            assert doc["pages"]["received"] == doc["pages"]["total"]
            # CompleteOutgoing releases the guest after its reply, the file with it
            assert wait_for(lambda: not (room / "vm.ram").exists(), timeout=30)
        finally:
            with AgentClient(dst.address) as c:
                c.stop_if_hosted("vm")
