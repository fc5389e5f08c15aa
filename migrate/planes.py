"""How a run's pages travel: the data plane and the fault path (named in migrate.names) and the route.

The control plane is always gRPC. Page data goes either over gRPC (the
Pages service: the bulk server process and the agent's urgent stream) or
over the native plane (C threads on both agents, plain TCP, a one-time key
per run; docs/protocol.md). The native plane carries no TLS: with TLS
configured, gRPC is the default so that page data stays encrypted, and a
native plane asked for explicitly is reported as unencrypted
(docs/security.md). A guest's faults go over gRPC (default) or, on the
native plane only, over their own native connection.
"""
from __future__ import annotations

from dataclasses import dataclass

from migrate.names import DataPlane, FaultPath, parse
from migrate.proto import migrate_pb2 as pb

#: Bytes of a run's one-time key (DP_KEY_LEN in native/dp_wire.h).
KEY_BYTES = 32


def default_plane(tls: bool) -> DataPlane:
    """Native between our agents, unless TLS protects the link: then page data stays on gRPC."""
    return DataPlane.GRPC if tls else DataPlane.NATIVE


def data_plane(value: str) -> DataPlane:
    """The plane a peer named ("" is gRPC: what a client predating the native plane means)."""
    return parse(DataPlane, value or DataPlane.GRPC, "data plane")


def fault_path(value: str, plane: DataPlane) -> FaultPath:
    """The fault path a peer named ("" is gRPC); the native one needs the native plane."""
    path = parse(FaultPath, value or FaultPath.GRPC, "fault path")
    if path is FaultPath.NATIVE and plane is not DataPlane.NATIVE:
        raise ValueError("--fault-path native needs the native data plane (--data-plane native)")
    return path


@dataclass(frozen=True)
class PageRoute:
    """Where an incoming run's pages come from, as the destination reaches the source.

    `source_endpoint` is the source agent (Pages.Fetch: the gRPC fault path);
    `bulk_endpoint` its bulk page server (gRPC plane); `data_endpoint` and
    `data_key` its data server and the run's one-time key (native plane).
    """

    source_endpoint: str
    bulk_endpoint: str = ""
    plane: DataPlane = DataPlane.GRPC
    data_endpoint: str = ""
    data_key: bytes = b""
    fault_path: FaultPath = FaultPath.GRPC

    @classmethod
    def offered(cls, source: str, prep: pb.PrepareOutgoingReply, plane: DataPlane,
                fault_path: FaultPath = FaultPath.GRPC) -> PageRoute:
        """The route to the page server a source agent reached at `source` (HOST:PORT) offered."""
        from migrate.validate import endpoint_with_port  # validate imports this module

        if plane is DataPlane.NATIVE:
            return cls(source, plane=plane, data_endpoint=endpoint_with_port(source, prep.data_endpoint),
                       data_key=prep.data_key, fault_path=fault_path)
        return cls(source, endpoint_with_port(source, prep.bulk_endpoint), plane, fault_path=fault_path)

    def fill(self, request: pb.PrepareIncomingRequest) -> pb.PrepareIncomingRequest:
        """Put this route into a PrepareIncoming request."""
        request.source_endpoint, request.bulk_endpoint = self.source_endpoint, self.bulk_endpoint
        request.data_plane, request.data_endpoint, request.data_key = self.plane, self.data_endpoint, self.data_key
        request.fault_path = self.fault_path
        return request

    def to_dict(self) -> dict:
        """For a journal (JSON): the key as hex."""
        return {"source_endpoint": self.source_endpoint, "bulk_endpoint": self.bulk_endpoint,
                "data_plane": self.plane.value, "data_endpoint": self.data_endpoint,
                "data_key": self.data_key.hex(), "fault_path": self.fault_path.value}

    @classmethod
    def from_dict(cls, record: dict) -> PageRoute:
        plane = data_plane(record["data_plane"])
        return cls(record["source_endpoint"], record["bulk_endpoint"], plane, record["data_endpoint"],
                   bytes.fromhex(record["data_key"]), fault_path(record["fault_path"], plane))
