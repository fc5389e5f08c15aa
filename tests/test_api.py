"""The Python API (migrate.Client, migrate.migrate, migrate.Report), its errors and the agents' metrics."""
from __future__ import annotations

import dataclasses
import errno
import json
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

import migrate
from migrate import errors, records, spawn
from migrate.local import LocalAgent
from migrate.proto import migrate_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on (just released by the kernel)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_example_in_docs_api_md_runs() -> None:
    found = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    assert found, "docs/api.md has no python block"
    code = found.group(1)
    exec(compile(code, "docs/api.md", "exec"), {"__name__": "docs_api_example"})  # noqa: S102 - our own docs


_WITHOUT_NATIVE = """
import sys
sys.modules["migrate._native"] = None  # any import of the native layer now fails
import migrate
from migrate.local import LocalAgent

with LocalAgent("source") as src, LocalAgent("dest") as dst:
    with migrate.Client(src.address) as source:
        source.launch("nn", size="8M", workload="random-write", ops=5_000)
    report = migrate.migrate("nn", source=src.address, dest=dst.address, mode="postcopy", verify=True)
    with migrate.Client(dst.address) as dest:
        dest.stop("nn")
assert report.verified and report.pages.total == 2048, report
assert sys.modules["migrate._native"] is None
print("migrated without the native layer")
"""


def test_a_client_migrates_where_the_native_layer_cannot_load() -> None:
    """The client side never imports migrate._native (the agents, children of their own, do)."""
    out = subprocess.run([sys.executable, "-P", "-c", _WITHOUT_NATIVE], capture_output=True, text=True,
                         timeout=300, env=spawn.child_env(), stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "migrated without the native layer" in out.stdout


#: Each record and the protocol message it mirrors.
_MIRRORS = {
    records.AgentInfo: pb.HelloReply, records.Spec: pb.GuestSpec, records.ProgressPoint: pb.ProgressPoint,
    records.GuestInfo: pb.GuestInfo, records.Capacity: pb.CapacityReply, records.Outgoing: pb.PrepareOutgoingReply,
    records.DirtySet: pb.DirtySet, records.Switchover: pb.SwitchoverReply, records.SourceStats: pb.SourceStats,
    records.Prepared: pb.PrepareIncomingReply, records.Started: pb.StartIncomingReply,
    records.PrecopyRound: pb.PrecopyRoundReply, records.MigrationStatus: pb.MigrationStatus,
    records.SnapshotProgress: pb.SnapshotProgress,
}


@pytest.mark.parametrize("record", list(_MIRRORS), ids=lambda r: r.__name__)
def test_each_record_has_exactly_its_messages_fields(record: type) -> None:
    assert [f.name for f in dataclasses.fields(record)] == [f.name for f in _MIRRORS[record].DESCRIPTOR.fields]


def test_every_control_operation_has_a_client_method() -> None:
    named = {"LaunchGuest": "launch", "ListGuests": "guests", "InspectGuest": "inspect", "GuestDigest": "digest",
             "StopGuest": "stop", "StartSnapshot": "snapshot"}
    for method in pb.DESCRIPTOR.services_by_name["Control"].methods:
        name = named.get(method.name) or re.sub(r"(?<!^)([A-Z])", r"_\1", method.name).lower()
        assert callable(getattr(migrate.Client, name, None)), f"no Client.{name} for {method.name}"


def test_report_round_trips_the_json_the_cli_writes(agents: tuple[LocalAgent, LocalAgent],
                                                    tmp_path: Path) -> None:
    src, dst = agents
    with migrate.Client(src.address) as source:
        source.launch("rt", size="8M", workload="hotset", ops=20_000)
    path = tmp_path / "rt.json"
    out = subprocess.run(spawn.module_argv("migrate", "run", "rt", "--from", src.address, "--to", dst.address,
                                           "--mode", "postcopy", "--verify", "--report", str(path)),
                         capture_output=True, text=True, timeout=300, env=spawn.child_env(), stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    with migrate.Client(dst.address) as dest:
        dest.stop("rt")
    text = path.read_text()
    report = migrate.Report.from_json(text)
    assert report.to_json() == text
    doc = json.loads(text)
    assert (report.total_s, report.downtime_ms, report.mode, report.verified) == \
        (doc["total_s"], doc["downtime_ms"], "postcopy", True)
    assert (report.pages.faulted, report.faults.count, report.bytes.wire) == \
        (doc["pages"]["faulted"], doc["faults"]["count"], doc["bytes"]["wire"])
    # a field this version does not know survives, in place
    doc = {"first": 1, **doc, "pages": {**doc["pages"], "new_counter": 7}}
    newer = json.dumps(doc, indent=2) + "\n"
    assert migrate.Report.from_json(newer).to_json() == newer
    assert migrate.Report.from_json(newer).pages.extra == {"new_counter": 7}
    check = ROOT.parent / "shared" / "checks" / "report_fields.py"
    if check.exists():
        rewritten = tmp_path / "rewritten.json"
        rewritten.write_text(report.to_json())
        fields = subprocess.run([sys.executable, str(check), str(rewritten)], capture_output=True, text=True)
        assert fields.returncode == 0, fields.stdout


def test_a_document_that_is_no_report_is_refused() -> None:
    with pytest.raises(ValueError, match="not a migration report: Report lacks guest"):
        migrate.Report.from_json('{"total_s": 1.0}')


# ----------------------------------------------------------------- errors
def test_each_error_class_travels_as_its_status_and_back() -> None:
    assert len(set(errors.STATUS.values())) == len(errors.STATUS)  # one class per status
    for cls, code in errors.STATUS.items():
        assert errors.status_of(cls("x")) == code
        back = errors.from_status(code, "x")
        assert type(back) is cls and str(back) == "x"
        assert isinstance(back, migrate.MigrateError)
    assert errors.status_of(OSError(errno.EOPNOTSUPP, "no WP_ASYNC")) == grpc.StatusCode.UNIMPLEMENTED
    assert errors.status_of(OSError(errno.EIO, "disk")) is None  # not ours: the agent answers INTERNAL
    assert type(errors.from_status(grpc.StatusCode.DATA_LOSS, "x")) is errors.AgentError


def test_bad_inputs_raise_their_error_class(agents: tuple[LocalAgent, LocalAgent]) -> None:
    src, dst = agents
    with migrate.Client(src.address) as source, migrate.Client(dst.address) as dest:
        source.launch("e1", size="4M", workload="idle", ops=0)
        try:
            with pytest.raises(migrate.GuestNotFound, match="no guest named 'nope'"):
                source.inspect("nope")
            with pytest.raises(migrate.AlreadyExists, match="'e1' already exists"):
                source.launch("e1", size="4M")
            with pytest.raises(migrate.BadRequest, match="multiple of the page size"):
                source.launch("e2", size=5000)
            with pytest.raises(migrate.BadRequest):
                source.launch("e2", size="lots")
            with pytest.raises(migrate.BadRequest, match="unknown workload"):
                source.launch("e2", size="4M", workload="dance")
            with pytest.raises(migrate.FailedPrecondition, match="not a source agent"):
                dest.launch("e2", size="4M")
            with pytest.raises(migrate.TimedOut, match="did not answer in time"):  # a deadline already past:
                source.digest("e1", timeout=-1)  # deterministic, where a short one races the answer
            with pytest.raises(migrate.BadRequest, match="unknown mode"):
                migrate.migrate("e1", source=source, dest=dest, mode="teleport")
            with pytest.raises(TypeError, match="unknown migration option"):
                migrate.migrate("e1", source=source, dest=dest, warp_speed=9)
            with pytest.raises(migrate.BadRequest, match="wait_s must be between 0 and 1 s"):
                dest.wait_incoming("f" * 32, wait_s=30)
        finally:
            source.stop("e1")
    with pytest.raises(migrate.AgentUnreachable, match="cannot reach agent") as unreachable:
        migrate.Client(f"127.0.0.1:{free_port()}", connect_timeout=0.5)
    assert unreachable.value.unreachable


def test_a_wrong_token_is_unauthenticated(tmp_path: Path) -> None:
    with LocalAgent("source", env={"MIGRATE_TOKEN": "right-token"}, log_path=str(tmp_path / "src.log")) as src:
        with migrate.Client(src.address, token="wrong-token") as client, \
                pytest.raises(migrate.Unauthenticated, match="bearer token"):
            client.hello()
        with migrate.Client(src.address, token="right-token") as client:
            assert client.hello().roles == ("source",)


def test_a_destination_without_room_fails_the_run_and_the_guest_stays(tmp_path: Path) -> None:
    """ResourceExhausted from the destination's step; migrate() raises RunFailed caused by it."""
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", "--max-incoming-ram", "1M", log_path=str(tmp_path / "dst.log")) as dst, \
            migrate.Client(src.address) as source, migrate.Client(dst.address) as dest:
        source.launch("big", size="8M", workload="idle", ops=0)
        try:
            out = source.prepare_outgoing("big")
            with pytest.raises(migrate.ResourceExhausted, match="not enough memory here for guest 'big'"):
                dest.prepare_incoming(out.run_id, "big", out.spec, source_endpoint=src.address,
                                      bulk_endpoint=out.bulk_endpoint)
            assert source.abort_outgoing(out.run_id).run_id == ""
            with pytest.raises(migrate.RunFailed, match="not enough memory") as failed:
                migrate.migrate("big", source=source, dest=dest, mode="postcopy", data_plane="grpc")
            assert isinstance(failed.value.__cause__, migrate.ResourceExhausted)
            assert "runs on" in failed.value.next_step
            assert source.inspect("big").run_id == ""  # on the source, in no run
        finally:
            source.stop("big")


# ---------------------------------------------------------------- metrics
def scrape(port: int) -> dict[str, float]:
    """The agent's metrics: 'name{labels}' -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("migrate_")}


def test_metrics_are_scraped_during_a_migration(tmp_path: Path) -> None:
    port = free_port()
    with LocalAgent("source", log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", "--metrics", f"127.0.0.1:{port}", log_path=str(tmp_path / "dst.log")) as dst:
        with migrate.Client(src.address) as source:
            source.launch("m1", size="32M", workload="random-write", ops=20_000, ops_per_sec=20_000)
        before = scrape(port)
        during: list[dict[str, float]] = []

        def on_status(status: migrate.MigrationStatus) -> None:
            if not during and status.phase == "running":
                during.append(scrape(port))

        report = migrate.migrate("m1", source=src.address, dest=dst.address, mode="postcopy", no_push=True,
                                 on_status=on_status)
        after = scrape(port)
        with migrate.Client(dst.address) as dest:
            dest.stop("m1")
    assert before["migrate_guests"] == 0 and before["migrate_faults_total"] == 0
    assert during and during[0]['migrate_runs{phase="running",side="incoming"}'] == 1
    assert after['migrate_runs{phase="complete",side="incoming"}'] == 1
    assert after['migrate_pages_installed_total{path="faulted"}'] == report.pages.faulted > 0
    assert after['migrate_pages_installed_total{path="pushed"}'] == report.pages.pushed
    assert after["migrate_faults_total"] == report.faults.count
    assert after["migrate_wire_bytes_total"] == report.bytes.wire
    assert after["migrate_link_outages_total"] == 0
    assert after['migrate_fault_latency_microseconds_bucket{le="+Inf"}'] == report.faults.latency_us["count"] > 0
