"""Mutual TLS and the bearer token, with real agents, runners and workers.

Both agents run with a server certificate, a CA (client certificates
mandatory) and a token. Clients that lack any one of those are refused; the
right client migrates a guest end to end, every page over TLS (the
destination's workers connect to the source with the agent certificate they
inherit), and the digest matches an unmigrated run. The page server refuses
run ids it does not serve, including one that has completed.
"""
from __future__ import annotations

import mmap
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from migrate import certs, orchestrator, report, rpc, spawn
from migrate.client import AgentClient
from migrate.local import LocalAgent
from migrate.proto import migrate_pb2 as pb
from migrate.proto import migrate_pb2_grpc as pb_grpc
from migrate.security import Credentials, listen_policy

TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Our CA's directory, and another CA's (same host names) for an impostor."""
    ours = tmp_path_factory.mktemp("pki")
    theirs = tmp_path_factory.mktemp("other-pki")
    certs.make(ours, ["127.0.0.1", "localhost"])
    certs.make(theirs, ["127.0.0.1", "localhost"])
    return ours, theirs


def client_creds(d: Path, token: str = TOKEN, *, ca: Path | None = None) -> Credentials:
    return Credentials(cert=str(d / "client.pem"), key=str(d / "client-key.pem"), ca=str(ca or d / "ca.pem"),
                       token=token)


@pytest.fixture(scope="module")
def tls_agents(pki: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalAgent, ...]]:
    d = pki[0]
    logs = tmp_path_factory.mktemp("logs")
    args = ("--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server-key.pem"),
            "--tls-ca", str(d / "ca.pem"), "--token", TOKEN)
    with LocalAgent("source", *args, log_path=str(logs / "source.log")) as src, \
            LocalAgent("dest", *args, log_path=str(logs / "dest.log")) as dst:
        yield src, dst


def hello(address: str, creds: Credentials) -> pb.HelloReply:
    with AgentClient(address, credentials=creds, connect_timeout=3) as c:
        return c.call("Hello", pb.HelloRequest(), timeout=5)


def test_the_right_client_is_served(tls_agents, pki) -> None:
    for agent in tls_agents:
        assert agent.role in hello(agent.address, client_creds(pki[0])).roles


@pytest.mark.parametrize("why", ["plaintext", "no client certificate", "certificate of another CA",
                                 "wrong token", "no token"])
def test_refused(tls_agents, pki, why: str) -> None:
    ours, theirs = pki
    creds = {
        "plaintext": Credentials(token=TOKEN),
        "no client certificate": Credentials(ca=str(ours / "ca.pem"), token=TOKEN),
        # The impostor trusts our CA (it knows whom it talks to) but its certificate is signed by another.
        "certificate of another CA": client_creds(theirs, ca=ours / "ca.pem"),
        "wrong token": client_creds(ours, token="wrong"),
        "no token": client_creds(ours, token=""),
    }[why]
    for agent in tls_agents:
        with pytest.raises(rpc.AgentError) as err:
            hello(agent.address, creds)
        if "token" in why:
            assert "bearer token" in str(err.value)


@pytest.mark.parametrize("plane", ["", "native"])
def test_postcopy_migration_over_mtls(tls_agents, pki, plane) -> None:
    """With TLS, page data stays in gRPC (encrypted) unless the native plane is asked
    for explicitly; then the report says page data went unencrypted."""
    src, dst = tls_agents
    creds = client_creds(pki[0])
    spec = pb.GuestSpec(size=16 << 20, workload="random-write", seed=3, ops=40_000, ops_per_sec=100_000,
                        page_size=mmap.PAGESIZE)
    with AgentClient(src.address, credentials=creds) as c:
        c.call("LaunchGuest", pb.LaunchGuestRequest(name="tls-vm", spec=spec), timeout=120)
    try:
        doc = orchestrator.migrate("tls-vm", src.address, dst.address,
                                   orchestrator.RunOptions(verify=True, mode="postcopy", data_plane=plane),
                                   credentials=creds)
        assert doc["verified"] is True
        assert doc["data_plane"] == (plane or "grpc") and doc["tls"] is True
        assert doc["data_plane_encrypted"] is (plane != "native")
        assert ("UNENCRYPTED" in report.table(doc)) is (plane == "native")
    finally:
        for agent in tls_agents:
            stop_if_there(agent.address, creds, "tls-vm")


def test_pages_only_for_the_run_named(tls_agents, pki) -> None:
    """Each run's pages go to its own run id only: not before switchover, not to
    another run's id, a made-up one, or one that was aborted or completed."""
    src, _ = tls_agents
    creds = client_creds(pki[0])
    spec = pb.GuestSpec(size=1 << 20, workload="idle", ops=0, page_size=mmap.PAGESIZE)
    host = src.address.rsplit(":", 1)[0]
    with AgentClient(src.address, credentials=creds) as c:
        try:
            runs = []
            for name in ("tls-a", "tls-b"):
                c.call("LaunchGuest", pb.LaunchGuestRequest(name=name, spec=spec), timeout=60)
                prep = c.call("PrepareOutgoing", pb.PrepareOutgoingRequest(name=name))
                runs.append((prep.run_id, f"{host}:{prep.bulk_endpoint.rsplit(':', 1)[1]}"))
            (a, _), (b, b_bulk) = runs
            assert fetch_code(src.address, creds, a) == grpc.StatusCode.FAILED_PRECONDITION  # not switched
            for run_id, _ in runs:
                c.call("Switchover", pb.RunRef(run_id=run_id))
            assert fetch_code(src.address, creds, a) == grpc.StatusCode.OK
            assert fetch_code(src.address, creds, "f" * 32) == grpc.StatusCode.NOT_FOUND
            assert fetch_code(src.address, replace(creds, token="nope"), a) == grpc.StatusCode.UNAUTHENTICATED
            assert bulk_code(b_bulk, creds, b) == grpc.StatusCode.OK
            assert bulk_code(b_bulk, creds, a) not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
            c.call("AbortOutgoing", pb.RunRef(run_id=a))
            assert fetch_code(src.address, creds, a) == grpc.StatusCode.NOT_FOUND
            c.call("CompleteOutgoing", pb.RunRef(run_id=b))
            assert fetch_code(src.address, creds, b) == grpc.StatusCode.NOT_FOUND
        finally:
            for name in ("tls-a", "tls-b"):
                stop_if_there(src.address, creds, name)


def stop_if_there(address: str, creds: Credentials, name: str) -> None:
    with AgentClient(address, credentials=creds) as c:
        c.stop_if_hosted(name)


def fetch_code(address: str, creds: Credentials, run_id: str) -> grpc.StatusCode:
    """The status of one urgent request for page 0 of `run_id`."""
    return _pages_code(address, creds, "Fetch", pb.PageRequest(run_id=run_id, req_id=1, count=1))


def bulk_code(address: str, creds: Credentials, run_id: str) -> grpc.StatusCode:
    """The status of one bulk request for page 0 of `run_id`."""
    return _pages_code(address, creds, "Bulk", pb.BulkRequest(run_id=run_id, count=1))


def _pages_code(address: str, creds: Credentials, method: str, request: object) -> grpc.StatusCode:
    ch = rpc.channel(address, purpose="test", credentials=creds)
    try:
        call = getattr(pb_grpc.PagesStub(ch), method)
        list(call(iter([request]), metadata=rpc.METADATA, timeout=10))
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()
    finally:
        ch.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(spawn.module_argv("migrate", *args), capture_output=True, text=True, timeout=30,
                          env=spawn.child_env(), stdin=subprocess.DEVNULL)


def test_plaintext_agent_refuses_to_listen_beyond_loopback() -> None:
    out = run_cli("source", "serve", "--listen", "0.0.0.0:0")
    assert out.returncode != 0
    assert out.stderr.strip().startswith("Error: refusing to listen on 0.0.0.0:0 without TLS")
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_insecure_listen_warns(tmp_path) -> None:
    with LocalAgent("source", "--insecure-listen", listen="0.0.0.0:0", log_path=str(tmp_path / "log")) as agent:
        assert agent.role in hello(f"127.0.0.1:{agent.address.rsplit(':', 1)[1]}", Credentials()).roles
    assert " WARNING migrate.cli: listening on 0.0.0.0:0 without TLS" in (tmp_path / "log").read_text()


def test_tls_without_client_authentication_refuses_to_listen_beyond_loopback(pki) -> None:
    """A server certificate alone lets anyone holding the (public) CA control the agent."""
    d = pki[0]
    out = run_cli("source", "serve", "--listen", "0.0.0.0:0", "--tls-cert", str(d / "server.pem"),
                  "--tls-key", str(d / "server-key.pem"))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "Error: refusing to listen on 0.0.0.0:0 without client authentication (--tls-ca for client certificates, "
        "or a token): add them, listen on loopback, or pass --insecure-listen"]


def test_listen_policy(pki) -> None:
    d = pki[0]
    server = Credentials(cert=str(d / "server.pem"), key=str(d / "server-key.pem"))
    for creds in (replace(server, ca=str(d / "ca.pem")), replace(server, token=TOKEN)):
        assert listen_policy("10.1.2.3:7070", creds, insecure_listen=False) is None
    for creds in (server, Credentials(token=TOKEN), Credentials(ca=str(d / "ca.pem"))):
        with pytest.raises(ValueError, match="refusing to listen on 10.1.2.3:7070 without"):
            listen_policy("10.1.2.3:7070", creds, insecure_listen=False)
        assert "--insecure-listen" in listen_policy("10.1.2.3:7070", creds, insecure_listen=True)
        assert listen_policy("127.0.0.1:7070", creds, insecure_listen=False) is None
        assert listen_policy("[::1]:7070", creds, insecure_listen=False) is None


@pytest.mark.parametrize("why,needle", [
    ("no client certificate", "TLS handshake failed: the agent at"),
    ("an impostor's CA", "TLS handshake failed with the agent at"),
    ("plaintext", "closed the connection at once (does it require TLS?"),
])
def test_a_tls_refusal_is_named_at_once(tls_agents, pki, why: str, needle: str) -> None:
    """Not "cannot reach agent (no answer within N s)": the reason, without waiting N s."""
    ours, theirs = pki
    creds = {"no client certificate": Credentials(ca=str(ours / "ca.pem"), token=TOKEN),
             "an impostor's CA": client_creds(ours, ca=theirs / "ca.pem"),
             "plaintext": Credentials(token=TOKEN)}[why]
    with pytest.raises(rpc.AgentError) as err:
        AgentClient(tls_agents[0].address, credentials=creds, connect_timeout=120)
    assert needle in str(err.value)


def test_cli_tls_refusal_is_one_line(tls_agents, pki) -> None:
    """gRPC's own handshake log lines stay off stderr."""
    out = run_cli("guest", "list", "--agent", tls_agents[0].address, "--tls-ca", str(pki[1] / "ca.pem"))
    assert out.returncode == 1
    assert out.stderr.startswith("error: TLS handshake failed with the agent at"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cli_credentials(tls_agents, pki, tmp_path) -> None:
    """The CLI takes the same flags; a bad key is one clear line, never a traceback."""
    ours = pki[0]
    src = tls_agents[0]
    flags = ["--tls-cert", str(ours / "client.pem"), "--tls-key", str(ours / "client-key.pem"),
             "--tls-ca", str(ours / "ca.pem")]
    ok = subprocess.run(spawn.module_argv("migrate", "guest", "list", "--agent", src.address, *flags),
                        capture_output=True, text=True, timeout=30, env=spawn.child_env({"MIGRATE_TOKEN": TOKEN}))
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("guest", "list", "--agent", src.address, "--tls-cert", str(ours / "client.pem"),
                  "--tls-key", str(ours / "server-key.pem"), "--tls-ca", str(ours / "ca.pem"))
    assert bad.returncode != 0 and "is not the private key of" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    made = run_cli("certs", "make", str(tmp_path / "pki"), "--host", "10.0.0.1")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == sorted(certs.FILES)
    assert (tmp_path / "pki" / "server-key.pem").stat().st_mode & 0o077 == 0
