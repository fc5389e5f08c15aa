"""The agents as daemons: SIGTERM drains and exits 0, `-v` logs each request, `--log-format json`."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from test_guest_process import pid_gone

import migrate
from migrate.local import LocalAgent, wait_for


def _terminate(agent: LocalAgent) -> int:
    """SIGTERM, as an init system stops a daemon; its exit status."""
    agent.proc.send_signal(signal.SIGTERM)
    return agent.proc.wait(timeout=60)


@pytest.mark.parametrize("role", ["source", "dest"])
def test_sigterm_stops_the_agent_cleanly_with_status_0(tmp_path: Path, role: str) -> None:
    log = tmp_path / "agent.log"
    with LocalAgent(role, log_path=str(log)) as agent:
        runner = 0
        if role == "source":
            with migrate.Client(agent.address) as client:
                runner = client.launch("d1", size="4M", workload=migrate.Workload.IDLE, ops=0).pid
        assert _terminate(agent) == 0
    text = log.read_text()
    assert "Traceback" not in text, text
    if runner:  # its guests stop with it
        assert wait_for(lambda: pid_gone(runner), 10)


def _requests(lines: list[dict]) -> dict[str, dict]:
    return {r["method"].rsplit("/", 1)[1]: r for r in lines if "method" in r}


def test_verbose_json_logs_each_request_with_its_peer_duration_and_status(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    with LocalAgent("source", "-v", "--log-format", "json", log_path=str(log)) as agent:
        with migrate.Client(agent.address) as client:
            client.hello()
            with pytest.raises(migrate.GuestNotFound):
                client.inspect("nope")
        assert _terminate(agent) == 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line is JSON
    assert all(r["role"] == "source" and r["level"] and r["logger"].startswith("migrate.") for r in records)
    calls = _requests(records)
    assert calls["Hello"]["status"] == "OK" and calls["InspectGuest"]["status"] == "NOT_FOUND"
    for call in calls.values():
        assert call["peer"].startswith("ipv4:127.0.0.1:") and call["duration_ms"] >= 0
        assert call["logger"] == "migrate.rpc" and call["level"] == "INFO"
    refusal = [r for r in records if r["logger"] == "migrate.agent"]
    assert [r["level"] for r in refusal] == ["INFO"]  # a refusal is routine: the client's to fix


def test_requests_are_logged_only_with_v(tmp_path: Path) -> None:
    quiet, verbose = tmp_path / "quiet.log", tmp_path / "verbose.log"
    for path, args in ((quiet, ()), (verbose, ("-v",))):
        with LocalAgent("dest", *args, log_path=str(path)) as agent:
            with migrate.Client(agent.address) as client:
                client.capacity()
    assert "/migrate.v1.Control/Capacity" not in quiet.read_text()
    line = next(x for x in verbose.read_text().splitlines() if "/migrate.v1.Control/Capacity" in x)
    assert " INFO migrate.rpc: " in line and "from ipv4:127.0.0.1:" in line and ": OK in " in line
