"""A throwaway PKI for tests and labs: a CA, an agent certificate, a client one.

`migrate certs make DIR --host 127.0.0.1` writes:

  ca.pem                      the CA certificate (--tls-ca on every side)
  server.pem, server-key.pem  for the agents: valid for the --host names and
                              addresses, usable as server AND client, since a
                              destination agent connects to the source agent
  client.pem, client-key.pem  for the orchestrator and CLI (client only)

The CA's key is not kept: nothing more can be signed by it later, so a
leaked test directory cannot mint new identities. Keys are EC P-256, files
holding keys are mode 0600.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import click

#: Files `make` writes, relative to its directory.
FILES = ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")


def make(directory: str | Path, hosts: list[str], *, days: int = 30, name: str = "migrate") -> dict[str, Path]:
    """Create a CA and certificates in `directory`; return {file name: path}.

    `hosts` are the IP addresses and DNS names the agents are reached by.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("give at least one --host (an address or name the agents are reached by)")
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
             *extensions: tuple[x509.ExtensionType, bool]) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days)))
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = cert(f"{name} test CA", ca_key, ca_name, ca_key,
              (x509.BasicConstraints(ca=True, path_length=0), True),
              (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                             encipher_only=False, decipher_only=False), True))
    leaf = (x509.BasicConstraints(ca=False, path_length=None), True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = cert(f"{name} agent", server_key, ca_name, ca_key, leaf,
                  (x509.SubjectAlternativeName(sans), False),
                  (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = cert(f"{name} client", client_key, ca_name, ca_key, leaf,
                  (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False))

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    key_bytes = {k: v.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
                 for k, v in (("server-key.pem", server_key), ("client-key.pem", client_key))}
    contents = {"ca.pem": ca.public_bytes(pem), "server.pem": server.public_bytes(pem),
                "client.pem": client.public_bytes(pem), **key_bytes}
    paths = {}
    for file_name in FILES:
        path = out / file_name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if file_name in key_bytes else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(contents[file_name])
        paths[file_name] = path
    return paths


@click.group()
def certs() -> None:
    """Test certificates for TLS between agents and clients."""


@certs.command("make")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--host", "hosts", multiple=True, required=True, metavar="ADDR|NAME",
              help="An address or DNS name the agents are reached by (repeatable).")
@click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True, help="Validity.")
def certs_make(directory: str, hosts: tuple[str, ...], days: int) -> None:
    """Create a test CA, an agent certificate and a client certificate in DIRECTORY.

    \b
    Example:
      migrate certs make /tmp/pki --host 127.0.0.1 --host localhost
      migrate source serve --tls-cert /tmp/pki/server.pem --tls-key /tmp/pki/server-key.pem \\
          --tls-ca /tmp/pki/ca.pem --listen 0.0.0.0:7070
      migrate guest list --agent 127.0.0.1:7070 --tls-cert /tmp/pki/client.pem \\
          --tls-key /tmp/pki/client-key.pem --tls-ca /tmp/pki/ca.pem
    """
    paths = make(directory, list(hosts), days=days)
    for path in paths.values():
        click.echo(f"wrote {path}")
