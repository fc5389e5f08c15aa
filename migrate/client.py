"""A small client for an agent's Control service, with user-facing errors.

Calls by method name with protobuf messages: the orchestrator's and the
CLI's plumbing. Programs use migrate.api.Client, which wraps this one.
"""
from __future__ import annotations

from typing import Any

import grpc

from migrate import errors, rpc
from migrate.proto import migrate_pb2 as pb
from migrate.proto import migrate_pb2_grpc as pb_grpc
from migrate.security import Credentials

#: Seconds to wait for an agent to accept the connection.
CONNECT_TIMEOUT = 5.0


class AgentClient:
    """Calls Control RPCs on one agent; failures raise the migrate.errors class of their status.

    `credentials` (TLS files, token) default to this process's environment.
    """

    def __init__(self, target: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                 credentials: Credentials | None = None) -> None:
        self.target = target
        self.credentials = Credentials.from_env() if credentials is None else credentials
        self._channel = rpc.channel(target, credentials=self.credentials)
        try:
            rpc.wait_ready(self._channel, target, connect_timeout, tls=self.credentials.tls)
        except rpc.AgentError:
            self._channel.close()
            raise
        self._stub = pb_grpc.ControlStub(self._channel)

    def call(self, method: str, request: Any, timeout: float = 60.0) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=rpc.METADATA, timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            raise errors.from_status(code, rpc.describe_error(err, self.target)) from None

    def stop_if_hosted(self, name: str) -> bool:
        """Stop guest `name` if this agent hosts it; True if it did.

        For cleaning up after a migration that may or may not have moved the
        guest here.
        """
        if not any(g.name == name for g in self.call("ListGuests", pb.ListGuestsRequest()).guests):
            return False
        self.call("StopGuest", pb.GuestRef(name=name))
        return True

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
