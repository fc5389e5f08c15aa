"""The generated protocol modules match proto/migrate.proto."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    gen_proto.generate(tmp_path / "fresh")
    # Compare descriptors, not text: another grpc_tools version may format differently.
    fresh_src = (tmp_path / "fresh" / "migrate_pb2.py").read_text()
    ours_src = (ROOT / "migrate" / "proto" / "migrate_pb2.py").read_text()
    marker = "AddSerializedFile("
    fresh_desc = fresh_src[fresh_src.index(marker):].split("\n", 1)[0]
    ours_desc = ours_src[ours_src.index(marker):].split("\n", 1)[0]
    assert fresh_desc == ours_desc, "migrate/proto is stale: run python scripts/gen_proto.py"
    fresh_grpc = (tmp_path / "fresh" / "migrate_pb2_grpc.py").read_text()
    ours_grpc = (ROOT / "migrate" / "proto" / "migrate_pb2_grpc.py").read_text()
    rpcs = lambda text: sorted(line.strip() for line in text.splitlines() if "'/migrate.v1." in line)  # noqa: E731
    assert rpcs(fresh_grpc) == rpcs(ours_grpc)
    # The stub mypy reads: its declarations (classes, fields, enum values), not its import formatting.
    decls = lambda text: [line.rstrip() for line in text.splitlines() if not line.startswith(("from ", "import "))]  # noqa: E731
    fresh_pyi = (tmp_path / "fresh" / "migrate_pb2.pyi").read_text()
    ours_pyi = (ROOT / "migrate" / "proto" / "migrate_pb2.pyi").read_text()
    assert decls(fresh_pyi) == decls(ours_pyi), "migrate_pb2.pyi is stale: run python scripts/gen_proto.py"


def test_version_mismatch_is_refused():
    import grpc

    from migrate import rpc
    from migrate.proto import migrate_pb2 as pb
    from migrate.proto import migrate_pb2_grpc as pb_grpc

    class Hello(pb_grpc.ControlServicer):
        def Hello(self, request, context):
            return pb.HelloReply(proto_version=rpc.PROTO_VERSION)

    server = rpc.server()
    pb_grpc.add_ControlServicer_to_server(Hello(), server)
    port = rpc.bind(server, "127.0.0.1:0")
    server.start()
    ch = rpc.channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.ControlStub(ch)
        assert stub.Hello(pb.HelloRequest(), metadata=rpc.METADATA, timeout=10).proto_version == rpc.PROTO_VERSION
        with pytest.raises(grpc.RpcError) as err:
            stub.Hello(pb.HelloRequest(), metadata=((rpc.VERSION_KEY, "999"),), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version" in err.value.details()
    finally:
        ch.close()
        server.stop(0).wait()


def test_port_in_use_is_a_clear_error():
    from migrate import rpc

    first = rpc.server()
    port = rpc.bind(first, "127.0.0.1:0")
    first.start()
    try:
        with pytest.raises(rpc.AgentError, match="cannot listen"):
            rpc.bind(rpc.server(), f"127.0.0.1:{port}")
    finally:
        first.stop(0).wait()
