"""gRPC plumbing shared by agents, the bulk page server and the CLI.

One place sets message-size limits, keepalives, how many calls a server
runs at once (migrate.admission), credentials (TLS and the
bearer token, see migrate.security) and the protocol-version check, so every
channel and server in the project behaves the same. Without explicit
credentials, channels and servers use this process's (its environment).
"""
from __future__ import annotations

import functools
import hmac
import logging
import re
import socket
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc

from migrate.admission import Admission, CallClass, peer_host, refusal
from migrate.errors import AgentError, AgentUnreachable
from migrate.proto import migrate_pb2 as pb
from migrate.security import AUTH_KEY, Credentials

log = logging.getLogger(__name__)

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

#: Keepalive of a destination's page channels to its source (urgent, bulk,
#: pre-copy): a ping after this many ms without traffic, and the link is dead
#: when a ping (keepalive or flow-control probe) stays unanswered this long.
#: A link that goes silent (a blackhole: packets dropped, no reset) fails the
#: stream within LINK_SILENCE_S, so the path reconnects and the outage shows,
#: where the control channels' 10 s + 5 s would hide it. (gRPC core enforces
#: the ack deadline through "grpc.http2.ping_timeout_ms", default one minute;
#: "grpc.keepalive_timeout_ms" alone is not acted on.)
LINK_KEEPALIVE_MS = (500, 1000)
#: The longest a page channel's link can be silent before its stream fails.
LINK_SILENCE_S = sum(LINK_KEEPALIVE_MS) / 1000.0
#: Seconds a destination's path keeps reconnecting to a source that went away, unless the run says otherwise.
DEFAULT_RECOVERY_TIMEOUT = 60.0

_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a taken port must be an error
    # Accept the clients' keepalive pings (every LINK_KEEPALIVE_MS[0] on page
    # channels), even on long quiet streams (gRPC's default answers them with
    # GOAWAY "too many pings").
    ("grpc.http2.min_ping_interval_without_data_ms", LINK_KEEPALIVE_MS[0] // 2),
    ("grpc.http2.max_ping_strikes", 0),
]

METADATA = ((VERSION_KEY, str(PROTO_VERSION)),)
#: Workers of a server's default pool: refusals (which end at once) and calls of no class.
_DEFAULT_WORKERS = 4
#: Calls a server accepts beyond its classes' bounds (refusals on their way out, calls of no class);
#: past that gRPC itself answers RESOURCE_EXHAUSTED.
_QUEUED_CALLS = 64


def channel(target: str, *, purpose: str = "control", credentials: Credentials | None = None) -> grpc.Channel:
    """A channel to `target` (host:port), TLS and token as `credentials` say.

    Each `purpose` gets its own HTTP/2 connection (a distinct channel
    argument defeats gRPC's subchannel sharing), so urgent page requests
    never wait behind bulk frames.
    """
    creds = Credentials.from_env() if credentials is None else credentials
    ch = _plain_channel(target, purpose, creds)
    if creds.token:
        ch = grpc.intercept_channel(ch, _AddMetadata(creds.metadata()))
    return ch


def call_channel(target: str, *, purpose: str) -> tuple[grpc.Channel, tuple[tuple[str, str], ...]]:
    """A channel to `target` as `channel` makes it (this process's credentials), without the token's
    interceptor, and the metadata each of its calls must carry (the protocol version, the token):
    for calls made on gRPC's call objects themselves (dest/faults.py), which no interceptor sees."""
    creds = Credentials.from_env()
    return _plain_channel(target, purpose, creds), METADATA + creds.metadata()


def _plain_channel(target: str, purpose: str, creds: Credentials) -> grpc.Channel:
    opts, tls = _channel_options(purpose), creds.channel_credentials()
    return grpc.secure_channel(target, tls, options=opts) if tls else grpc.insecure_channel(target, options=opts)


def _channel_options(purpose: str) -> list[tuple[str, Any]]:
    opts = _OPTIONS + [("grpc.channel_purpose", purpose)]
    if purpose != "control":  # a page channel: its own connection, and a link outage noticed within a second
        opts = [o for o in opts if o[0] not in ("grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms")]
        opts += [("grpc.use_local_subchannel_pool", 1), ("grpc.keepalive_time_ms", LINK_KEEPALIVE_MS[0]),
                 ("grpc.keepalive_timeout_ms", LINK_KEEPALIVE_MS[1]),
                 ("grpc.http2.ping_timeout_ms", LINK_KEEPALIVE_MS[1])]
    return opts


def wait_ready(ch: grpc.Channel, target: str, timeout: float, *, tls: bool | None = None) -> None:
    """Block until `ch` is connected, or raise AgentError naming `target`.

    With `tls` set (whether `ch` speaks TLS, to word the failure), a refused
    TLS handshake fails at once with its reason: a user's command must not
    wait out credentials that retrying cannot fix. Anything else (connection
    refused, an agent still starting) is retried until `timeout`, and with
    `tls` None everything is (the page paths, reconnecting through outages).
    """
    unreachable = AgentUnreachable(f"cannot reach agent at {target} (no answer within {timeout:g} s)")
    if tls is None:
        try:
            grpc.channel_ready_future(ch).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise unreachable from None
        return
    # A call that does not wait for the channel fails as soon as a connection
    # attempt does, with gRPC's reason; any answer at all means connected.
    hello = ch.unary_unary("/migrate.v1.Control/Hello", request_serializer=pb.HelloRequest.SerializeToString,
                           response_deserializer=pb.HelloReply.FromString)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            hello(pb.HelloRequest(), metadata=METADATA, timeout=left, wait_for_ready=False)
            return
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                return  # connected; the caller's own call reports any refusal
            why = _handshake_refusal(err.details() or "", tls, target)
            if why:
                raise AgentError(why) from None
        time.sleep(min(_RETRY_CONNECT, max(deadline - time.monotonic(), 0)))
    raise unreachable


#: Seconds between two connection attempts of a client waiting for an agent.
_RETRY_CONNECT = 0.1
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)(?::\s*([^:]+))?")


def _handshake_refusal(error: str, tls: bool, target: str) -> str:
    """One line for a TLS handshake failure in gRPC's connect error, "" if it is not one.

    The server drops a client that speaks plaintext, or that has no
    client certificate, without a word: gRPC then says "Socket closed".
    """
    if "handshake failed" in error.lower():
        m = _SSL_REASON.search(error)
        reason = (" ".join(p.strip() for p in m.groups() if p and p.strip() != "OK") if m else error)[:200]
        if m and m.group(1) == "WRONG_VERSION_NUMBER":
            reason = "the agent does not speak TLS (WRONG_VERSION_NUMBER)"
        return f"TLS handshake failed with the agent at {target}: {reason}"
    if "socket closed" in error.lower():
        if tls:
            return (f"TLS handshake failed: the agent at {target} closed the connection "
                    "(does it require a client certificate? give --tls-cert/--tls-key)")
        return f"the agent at {target} closed the connection at once (does it require TLS? give --tls-ca)"
    return ""


def server(calls: Sequence[CallClass] = (), credentials: Credentials | None = None, *,
           log_requests: bool = False) -> grpc.Server:
    """A gRPC server with the project's limits, a version check and, if
    `credentials` hold one, a bearer-token check (TLS is set by `bind`).

    Each class of `calls` runs on a pool of its own, bounded in all and per
    peer (migrate.admission); the default pool serves refusals and any
    call of no class. Calls refused by the gate are never counted.
    `log_requests` logs every call as it ends, refusals too (RequestLog).
    """
    creds = Credentials.from_env() if credentials is None else credentials
    interceptors: list[grpc.ServerInterceptor] = [_Gate(creds.token), Admission(calls)]
    if log_requests:
        interceptors.insert(0, RequestLog())
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=_DEFAULT_WORKERS, thread_name_prefix="grpc"),
        options=_OPTIONS + _SERVER_OPTIONS,
        interceptors=interceptors,
        maximum_concurrent_rpcs=sum(c.total for c in calls) + _QUEUED_CALLS,
    )


def bind(srv: grpc.Server, address: str, credentials: Credentials | None = None) -> int:
    """Bind `address` (host:port, port may be 0), with TLS if `credentials`
    hold a certificate; return the port.

    Raises AgentError with a clear message when the port is taken or the
    address is invalid (gRPC reports both as a bare RuntimeError or 0).
    """
    creds = Credentials.from_env() if credentials is None else credentials
    tls = creds.server_credentials()
    try:
        port = srv.add_secure_port(address, tls) if tls else srv.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise AgentError(f"cannot listen on {address}: address in use or invalid")
    return port


class _Gate(grpc.ServerInterceptor):
    """Refuse calls from clients speaking another protocol version or, when
    a token is set, not presenting it (compared in constant time)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode() if token else b""

    def _refusal(self, meta: dict) -> tuple[grpc.StatusCode, str] | None:
        if meta.get(VERSION_KEY) != str(PROTO_VERSION):
            got = meta.get(VERSION_KEY, "none")
            return (grpc.StatusCode.FAILED_PRECONDITION,
                    f"protocol version mismatch: server speaks {PROTO_VERSION}, client sent {got}")
        if self._expected:
            given = meta.get(AUTH_KEY, "")
            given = given.encode() if isinstance(given, str) else given
            if not hmac.compare_digest(given, self._expected):
                return grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token"
        return None

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        refused = self._refusal(dict(details.invocation_metadata or ()))
        if refused is None:
            return continuation(details)
        code, msg = refused
        log.warning("%s refused: %s: %s", details.method, code.name, msg)
        return None if continuation(details) is None else refusal(code, msg)


class RequestLog(grpc.ServerInterceptor):
    """Logs each call as it ends, at INFO: method, peer, duration and status (`-v` on an agent).

    Outermost, so that it sees the calls the gate and admission refuse too.
    The fields are also the record's attributes (migrate.logs: JSON keys).
    """

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                    if getattr(handler, k) is not None)
        behavior = getattr(handler, kind)
        method = details.method

        def done(context: grpc.ServicerContext, t0: float, failed: bool) -> None:
            # ServicerContext.code() is grpc's (since 1.38); types-grpcio does not declare it.
            code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)  # type: ignore[attr-defined]
            fields = {"method": method, "peer": context.peer(), "duration_ms": round((time.monotonic() - t0) * 1e3, 3),
                      "status": code.name}
            log.info("%(method)s from %(peer)s: %(status)s in %(duration_ms).1f ms", fields, extra=fields)

        if handler.response_streaming:
            @functools.wraps(behavior)  # keeps admission's experimental_thread_pool
            def logged(request: Any, context: grpc.ServicerContext) -> Any:
                t0, failed = time.monotonic(), True
                try:
                    yield from behavior(request, context)
                    failed = False
                finally:
                    done(context, t0, failed)
        else:
            @functools.wraps(behavior)
            def logged(request: Any, context: grpc.ServicerContext) -> Any:
                t0, failed = time.monotonic(), True
                try:
                    reply = behavior(request, context)
                    failed = False
                    return reply
                finally:
                    done(context, t0, failed)
        return handler._replace(**{kind: logged})


class _AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the bearer token) to every call of a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _with(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        # grpc passes its namedtuple _ClientCallDetails: the stubs declare only the abstract class.
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: Any, request_iterator: Any) -> Any:
        return continuation(self._with(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable, details: Any, request_iterator: Any) -> Any:
        return continuation(self._with(details), request_iterator)


def is_local_peer(peer: str) -> bool:
    """Is a gRPC peer ("ipv4:10.0.0.2:5000", "ipv6:[::1]:5000", "unix:...") on this host?

    An address is this host's when a socket can bind to it here: loopback
    and this network namespace's own addresses, not a peer's in another
    namespace (the lab's emulated hosts).
    """
    kind = peer.partition(":")[0]
    if kind == "unix":
        return True
    family = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(kind)
    if family is None:
        return False
    host = peer_host(peer)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def describe_error(err: grpc.RpcError, target: str) -> str:
    """Turn a gRPC error into one line a user can act on."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"agent at {target} is unreachable ({details})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"agent at {target} did not answer in time"
    return details or f"{code.name if code else 'error'} from {target}"

