"""A migration driven by hand, RPC by RPC: the state an orchestrator leaves when it dies."""
from __future__ import annotations

from migrate.client import AgentClient
from migrate.proto import migrate_pb2 as pb


def resumed_on_destination(source: AgentClient, dest: AgentClient, name: str, max_bandwidth: int,
                           data_plane: str = "grpc") -> pb.RunRef:
    """Post-copy of guest `name` (its pages on `data_plane`) up to the guest resuming on the destination,
    and no further: the destination finishes alone; the source holds the paused guest until CompleteOutgoing."""
    prep = source.call("PrepareOutgoing", pb.PrepareOutgoingRequest(name=name, data_plane=data_plane))
    run = pb.RunRef(run_id=prep.run_id)
    dest.call("PrepareIncoming", pb.PrepareIncomingRequest(
        run_id=prep.run_id, name=name, spec=prep.spec, source_endpoint=source.target,
        bulk_endpoint=prep.bulk_endpoint, data_plane=data_plane, data_endpoint=prep.data_endpoint,
        data_key=prep.data_key), timeout=120)
    switch = source.call("Switchover", run)
    dest.call("StartIncoming", pb.StartIncomingRequest(run_id=prep.run_id, state_json=switch.state_json,
                                                       max_bandwidth=max_bandwidth))
    return run
