"""gRPC plumbing shared by agents, workers and the CLI.

One place sets message-size limits, keepalives and the protocol-version
check, so every channel and server in the project behaves the same.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from migrate.proto import migrate_pb2 as pb

PROTO_VERSION = pb.PROTO_VERSION
VERSION_KEY = "migrate-proto"
#: Largest message either end accepts: a 1 MiB page batch plus headroom.
MAX_MESSAGE = 8 * 1024 * 1024

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]

METADATA = ((VERSION_KEY, str(PROTO_VERSION)),)


class AgentError(Exception):
    """A failure talking to an agent, phrased for a user (one line)."""


def channel(target: str, *, purpose: str = "control") -> grpc.Channel:
    """An insecure channel to `target` (host:port).

    Each `purpose` gets its own HTTP/2 connection (a distinct channel
    argument defeats gRPC's subchannel sharing), so urgent page requests
    never wait behind bulk frames.
    """
    opts = _OPTIONS + [("grpc.channel_purpose", purpose)]
    if purpose != "control":
        opts.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.insecure_channel(target, options=opts)


def wait_ready(ch: grpc.Channel, target: str, timeout: float) -> None:
    """Block until `ch` is connected, or raise AgentError naming `target`."""
    try:
        grpc.channel_ready_future(ch).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise AgentError(f"cannot reach agent at {target} (no answer within {timeout:g} s)") from None


def server(workers: int = 8) -> grpc.Server:
    """A gRPC server with the project's limits and a version check."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=_OPTIONS + [("grpc.so_reuseport", 0)],  # a taken port must be an error
        interceptors=[_VersionCheck()],
        maximum_concurrent_rpcs=64,
    )


def bind(srv: grpc.Server, address: str) -> int:
    """Bind `address` (host:port, port may be 0); return the port.

    Raises AgentError with a clear message when the port is taken or the
    address is invalid (gRPC reports both as a bare RuntimeError or 0).
    """
    try:
        port = srv.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise AgentError(f"cannot listen on {address}: address in use or invalid")
    return port


class _VersionCheck(grpc.ServerInterceptor):
    """Refuse calls from clients speaking another protocol version."""

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        meta = dict(details.invocation_metadata or ())
        if meta.get(VERSION_KEY) == str(PROTO_VERSION):
            return continuation(details)
        got = meta.get(VERSION_KEY, "none")
        msg = f"protocol version mismatch: server speaks {PROTO_VERSION}, client sent {got}"

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, msg)

        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


def describe_error(err: grpc.RpcError, target: str) -> str:
    """Turn a gRPC error into one line a user can act on."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"agent at {target} is unreachable ({details})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"agent at {target} did not answer in time"
    return details or f"{code.name if code else 'error'} from {target}"


def monotonic_ms() -> float:
    """Milliseconds on the monotonic clock, for phase timings."""
    return time.monotonic() * 1000.0
