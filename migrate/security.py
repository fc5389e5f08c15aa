"""Who may talk to an agent: TLS credentials, a bearer token, where to listen.

An agent serves guest memory, so by default it is reachable from loopback
only. To listen elsewhere it needs TLS (`--tls-cert/--tls-key`) and a way
to authenticate clients: a CA (`--tls-ca`), which makes it demand a client
certificate signed by that CA (mutual TLS), or a bearer token, checked on
every call (on top of client certificates when both are set).

Credentials live in the environment (MIGRATE_TLS_CERT, MIGRATE_TLS_KEY,
MIGRATE_TLS_CA, MIGRATE_TOKEN): an agent exports its own there, so the
process it starts (the bulk page server) inherits them and the
destination's urgent and bulk paths connect to the source agent with them:
the whole page path is protected exactly like the control path without any
plumbing of its own.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields
from typing import Any

import grpc

from migrate.validate import split_endpoint

#: Environment variable holding each credential.
ENV = {"cert": "MIGRATE_TLS_CERT", "key": "MIGRATE_TLS_KEY", "ca": "MIGRATE_TLS_CA", "token": "MIGRATE_TOKEN"}
AUTH_KEY = "authorization"
_MAX_TOKEN = 4096


@dataclass(frozen=True)
class Credentials:
    """TLS files (PEM paths) and a bearer token; empty strings mean unset.

    As a client: TLS when a CA or a certificate is given (the CA verifies the
    server, the certificate and key identify us). As a server: TLS needs the
    certificate and key; a CA makes client certificates mandatory.
    """

    cert: str = ""
    key: str = ""
    ca: str = ""
    token: str = ""

    @classmethod
    def from_env(cls, environ: os._Environ | dict[str, str] | None = None) -> Credentials:
        env = os.environ if environ is None else environ
        return cls(**{name: env.get(var, "") for name, var in ENV.items()})

    @property
    def tls(self) -> bool:
        return bool(self.cert or self.key or self.ca)

    def check(self, *, server: bool = False) -> None:
        """ValueError with one clear line if these credentials cannot work."""
        if bool(self.cert) != bool(self.key):
            raise ValueError("--tls-cert and --tls-key go together")
        if server and self.ca and not self.cert:
            raise ValueError("a server with --tls-ca also needs --tls-cert and --tls-key")
        from cryptography import x509  # only when TLS is configured: a slow import
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        loaded: dict[str, Any] = {}
        for path, what, load in ((self.cert, "certificate", x509.load_pem_x509_certificates),
                                 (self.ca, "CA certificate", x509.load_pem_x509_certificates),
                                 (self.key, "private key", lambda data: load_pem_private_key(data, None))):
            if path:
                try:
                    loaded[what] = load(_read(path))
                except (ValueError, TypeError) as err:
                    raise ValueError(f"{path} is not a PEM {what} ({err})") from None
        if self.cert and loaded["certificate"][0].public_key() != loaded["private key"].public_key():
            raise ValueError(f"{self.key} is not the private key of {self.cert}")
        if self.token and (len(self.token) > _MAX_TOKEN
                           or not all(33 <= ord(c) < 127 for c in self.token)):
            raise ValueError(f"the token must be 1-{_MAX_TOKEN} printable ASCII characters without spaces")

    def env(self) -> dict[str, str]:
        """These credentials as environment variables, file paths made absolute."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value:
                out[ENV[f.name]] = value if f.name == "token" else os.path.abspath(value)
        return out

    def export(self) -> None:
        """Make these the credentials of this process and of every child it starts."""
        for var in ENV.values():
            os.environ.pop(var, None)
        os.environ.update(self.env())

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS for a server (None: plaintext); with a CA, client certificates are required."""
        if not self.cert:
            return None
        return grpc.ssl_server_credentials([(_read(self.key), _read(self.cert))],
                                           root_certificates=_read(self.ca) if self.ca else None,
                                           require_client_auth=bool(self.ca))

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS for a client (None: plaintext)."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca) if self.ca else None,
                                            private_key=_read(self.key) if self.key else None,
                                            certificate_chain=_read(self.cert) if self.cert else None)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries the token, if any."""
        return ((AUTH_KEY, f"Bearer {self.token}"),) if self.token else ()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None


def is_loopback(host: str) -> bool:
    """True if `host` (as in HOST:PORT, maybe [bracketed]) only accepts local connections."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_policy(listen: str, creds: Credentials, insecure_listen: bool) -> str | None:
    """Refuse (ValueError) an agent other hosts could misuse; return a warning to log, if any.

    Off loopback an agent needs TLS (else anyone on the path reads guest
    memory and tokens) and client authentication, client certificates or a
    token (else anyone who reaches the port, holding only the public CA,
    starts, stops and reads its guests). Only --insecure-listen overrides
    that, with a warning.
    """
    host = split_endpoint(listen, "listen address", listen=True)[0]
    missing = []
    if not creds.cert:
        missing.append("TLS (--tls-cert/--tls-key)")
    if not (creds.ca or creds.token):
        missing.append("client authentication (--tls-ca for client certificates, or a token)")
    if is_loopback(host) or not missing:
        return None
    if not insecure_listen:
        raise ValueError(f"refusing to listen on {listen} without {' or '.join(missing)}: "
                         "add them, listen on loopback, or pass --insecure-listen")
    return (f"listening on {listen} without {' or '.join(missing)} (--insecure-listen): anyone who can reach "
            "it may control its guests and read their memory")
