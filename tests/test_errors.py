"""Every class of migrate.errors, raised by a real bad input through the API and through the CLI.

The agents here are set up so that each refusal has a real cause: a source
whose --backing-dir is not writable and whose KVM device is missing, a
destination with no room, an agent that wants a token. Through the API the
class is raised; through the CLI the same failure is one line on stderr
and a non-zero exit.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_cli import assert_clean_error, free_port, run_cli

import migrate
from migrate import errors
from migrate.local import LocalAgent

TOKEN = "right-token"


class Rig:
    """The agents the refusals need, and a guest `g1` on the source."""

    def __init__(self, src: LocalAgent, dst: LocalAgent, tok: LocalAgent) -> None:
        self.src, self.dst, self.tok = src, dst, tok


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    # /sys takes no new files, even from root: creating a backing file there is refused (EACCES).
    with LocalAgent("source", "--backing-dir", "/sys", env={"MIGRATE_KVM_DEVICE": str(tmp_path / "no-kvm")},
                    log_path=str(tmp_path / "src.log")) as src, \
            LocalAgent("dest", "--max-incoming-ram", "1M", log_path=str(tmp_path / "dst.log")) as dst, \
            LocalAgent("source", env={"MIGRATE_TOKEN": TOKEN}, log_path=str(tmp_path / "tok.log")) as tok:
        with migrate.Client(src.address) as source:
            source.launch("g1", size="4M", workload=migrate.Workload.IDLE, ops=0)
            try:
                yield Rig(src, dst, tok)
            finally:
                source.stop("g1")


def _on(address: str, call: Callable[[migrate.Client], Any], **kw: Any) -> Callable[[], Any]:
    def run() -> Any:
        with migrate.Client(address, **kw) as client:
            return call(client)
    return run


def _prepare_incoming(rig: Rig) -> Callable[[], Any]:
    """The destination's step alone: a guest of 4 MiB where 1 MiB may arrive."""
    def run() -> Any:
        with migrate.Client(rig.src.address) as source, migrate.Client(rig.dst.address) as dest:
            out = source.prepare_outgoing("g1")
            try:
                dest.prepare_incoming(out.run_id, "g1", out.spec, source_endpoint=rig.src.address,
                                      bulk_endpoint=out.bulk_endpoint)
            finally:
                source.abort_outgoing(out.run_id)
    return run


#: class -> (the API call, the CLI's arguments, what both say); "{src}", "{dst}", "{tok}", "{free}" are filled in.
CASES: dict[type[errors.AgentError], tuple[Callable[[Rig], Callable[[], Any]], list[str], str]] = {
    errors.AgentUnreachable: (
        lambda rig: lambda: migrate.Client(f"127.0.0.1:{free_port()}", connect_timeout=0.5),
        ["guest", "list", "--agent", "127.0.0.1:{free}"], "cannot reach agent"),
    errors.BadRequest: (
        lambda rig: _on(rig.src.address, lambda c: c.launch("b", size="4M", backing="bogus")),
        ["guest", "start", "b", "--agent", "{src}", "--size", "4M", "--backing", "bogus"], "bad backing"),
    errors.GuestNotFound: (
        lambda rig: _on(rig.src.address, lambda c: c.inspect("nope")),
        ["guest", "stats", "nope", "--agent", "{src}"], "no guest named 'nope'"),
    errors.AlreadyExists: (
        lambda rig: _on(rig.src.address, lambda c: c.launch("g1", size="4M")),
        ["guest", "start", "g1", "--agent", "{src}", "--size", "4M"], "'g1' already exists"),
    errors.FailedPrecondition: (
        lambda rig: _on(rig.dst.address, lambda c: c.launch("f", size="4M")),
        ["guest", "start", "f", "--agent", "{dst}", "--size", "4M"], "not a source agent"),
    errors.ResourceExhausted: (
        _prepare_incoming,
        ["run", "g1", "--from", "{src}", "--to", "{dst}", "--mode", "postcopy"], "not enough memory here"),
    errors.PermissionDenied: (
        lambda rig: _on(rig.src.address, lambda c: c.launch("p", size="4M", backing="file:p")),
        ["guest", "start", "p", "--agent", "{src}", "--size", "4M", "--backing", "file:p"], "Permission denied"),
    errors.Unauthenticated: (
        lambda rig: _on(rig.tok.address, lambda c: c.hello(), token="wrong-token"),
        ["guest", "list", "--agent", "{tok}", "--token", "wrong-token"], "missing or wrong bearer token"),
    errors.TimedOut: (  # a deadline already past: deterministic, where a short one races the answer
        lambda rig: _on(rig.src.address, lambda c: c.digest("g1", timeout=-1)),
        [], "did not answer in time"),
    errors.KernelFeatureMissing: (
        lambda rig: _on(rig.src.address, lambda c: c.launch("k", size="64M", kind=migrate.GuestKind.KVM)),
        ["guest", "start", "k", "--agent", "{src}", "--size", "64M", "--kind", "kvm"], "cannot run a kvm guest"),
    errors.RunFailed: (
        lambda rig: lambda: migrate.migrate("g1", source=rig.src.address, dest=rig.dst.address,
                                            mode=migrate.Mode.POSTCOPY),
        ["run", "g1", "--from", "{src}", "--to", "{dst}", "--mode", "postcopy"], "next: "),
}


def test_every_agent_error_has_a_case() -> None:
    # InternalError: a bug, below; TimedOut's CLI case is a run's deadline, below.
    assert set(CASES) | {errors.InternalError} == set(errors.STATUS)


def test_each_error_class_is_raised_through_the_api_and_the_cli(rig: Rig) -> None:
    addresses = {"src": rig.src.address, "dst": rig.dst.address, "tok": rig.tok.address, "free": str(free_port())}
    for cls, (api_call, argv, needle) in CASES.items():
        with pytest.raises(cls, match=needle if cls is not errors.RunFailed else "not enough memory") as raised:
            api_call(rig)()
        assert type(raised.value) is cls or cls is errors.ResourceExhausted  # NoRoom is a ResourceExhausted
        if cls is errors.RunFailed:
            assert isinstance(raised.value.__cause__, errors.ResourceExhausted) and raised.value.next_step
        if not argv:
            continue
        out = run_cli(*(a.format(**addresses) for a in argv))
        assert_clean_error(out, needle)
        lines = [line for line in out.stderr.splitlines() if not line.startswith(("warning:", "next:"))]
        assert len(lines) == 1, (cls, out.stderr)


def test_a_run_past_its_deadline_is_timed_out_through_the_cli(rig: Rig) -> None:
    """`migrate run --timeout`: a guest that fits the destination, paced so that it cannot
    arrive within the deadline: TimedOut, one line (and the next step), non-zero exit."""
    with migrate.Client(rig.src.address) as source:
        source.launch("slow", size="512K", workload=migrate.Workload.IDLE, ops=0)
    out = run_cli("run", "slow", "--from", rig.src.address, "--to", rig.dst.address, "--mode", "postcopy",
                  "--max-bandwidth", "4K", "--timeout", "1")
    assert_clean_error(out, "did not complete within 1 s")
    errors_said = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors_said == ["error: migration did not complete within 1 s"], out.stderr  # besides progress and next:


class _Context:
    """What _rpc needs of a grpc.ServicerContext: abort raises, as gRPC's does."""

    code: grpc.StatusCode | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise RuntimeError("aborted")


def test_a_bug_is_internal_and_logged_once_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A KeyError from a bug is not a missing guest: INTERNAL, one log record with the traceback."""
    from migrate.agent import _rpc

    @_rpc
    def Buggy(self: object, request: object, context: object) -> None:  # noqa: N802 - a gRPC method name
        return {}["oops"]

    @_rpc
    def Refusing(self: object, request: object, context: object) -> None:  # noqa: N802
        raise errors.GuestNotFound("no guest named 'x' on this agent")

    context = _Context()
    with caplog.at_level(logging.INFO, logger="migrate.agent"), pytest.raises(RuntimeError, match="aborted"):
        Buggy(None, None, context)
    assert context.code == grpc.StatusCode.INTERNAL
    assert [(r.levelno, r.exc_info is not None) for r in caplog.records] == [(logging.ERROR, True)]
    assert errors.from_status(context.code, context.details).__class__ is errors.InternalError
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="migrate.agent"), pytest.raises(RuntimeError, match="aborted"):
        Refusing(None, None, context)
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.INFO, None)]
