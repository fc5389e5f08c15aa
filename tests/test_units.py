import pytest

from migrate.rpc import is_local_peer
from migrate.stats import log2_bucket, percentile, summarize
from migrate.units import parse_rate, parse_size


@pytest.mark.parametrize("text,value", [("4096", 4096), ("64K", 65536), ("512M", 512 << 20), ("1G", 1 << 30),
                                        ("1GiB", 1 << 30), ("2mb", 2 << 20), ("1.5K", 1536)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "12Q", "-5M", "1e9", "1.3M", "0.5"])
def test_bad_sizes(text):
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


@pytest.mark.parametrize("text,value", [("100M", 100 << 20), ("100MB/s", 100 << 20), ("1gbit", 125_000_000),
                                        ("500mbit", 62_500_000), ("0", 0)])
def test_rates(text, value):
    assert parse_rate(text) == value


def test_bad_rate():
    with pytest.raises(ValueError, match="bad rate"):
        parse_rate("fast")


def test_log2_buckets():
    assert [log2_bucket(x) for x in (0.3, 1, 1.9, 2, 3.99, 4, 1000)] == [0, 0, 0, 1, 1, 2, 9]


def test_summary():
    s = summarize([float(x) for x in range(1, 101)])
    assert (s["p50"], s["p99"], s["max"], s["count"]) == (50.0, 99.0, 100.0, 100)
    assert sum(s["hist_log2_us"].values()) == 100
    assert s["hist_log2_us"]["64"] == 37  # 64..100
    assert summarize([])["count"] == 0
    assert percentile([5.0], 99) == 5.0


@pytest.mark.parametrize("peer,local", [("ipv4:127.0.0.1:5000", True), ("ipv6:[::1]:5000", True),
                                        ("ipv6:%5B::1%5D:5000", True), ("unix:/run/x.sock", True),
                                        ("ipv4:192.0.2.7:5000", False), ("ipv6:[2001:db8::7]:5000", False),
                                        ("weird", False)])
def test_local_peers(peer, local):
    """The bulk server never compresses for a destination on its own host."""
    assert is_local_peer(peer) is local


def test_agent_keeps_the_newest_finished_runs_only(monkeypatch):
    """A destination agent answers for its last completed runs and forgets older ones;
    runs still under way are never dropped."""
    from types import SimpleNamespace

    from migrate import agent

    monkeypatch.setattr(agent, "_KEEP_FINISHED", 2)
    control = agent.ControlService(("dest",), "127.0.0.1")
    for i, phase in enumerate(["complete", "running", "complete", "complete", "failed", "complete"]):
        control.incoming[f"r{i}"] = SimpleNamespace(phase=phase)
    control._forget_finished()
    assert list(control.incoming) == ["r1", "r3", "r4", "r5"]
