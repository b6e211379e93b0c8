"""Test certificates for a deployment: a CA, the SuperLink's TLS certificate and one SuperNode
key pair per platform (``fedrec deploy certs``).

Owns: :class:`Certs` (where each file of a test PKI lies) and :func:`make_certs` (writing them,
private keys readable by their owner only).

Must not: start processes, or be used for a real deployment's PKI: the CA key lies unencrypted
next to the certificates (:data:`TEST_CERT_NOTE` says so wherever they are made).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedrec.deploy.flower import LOOPBACK
from fedrec.shared.fsio import atomic_write_text

TEST_CERT_NOTE = (
    "These certificates and keys are for local testing only: the CA key sits next to the "
    "certificates, unencrypted. Use your organisation's PKI for real deployments."
)


@dataclass(frozen=True)
class Certs:
    """Paths of a test PKI: CA, SuperLink server certificate, one key pair per channel."""

    root: Path
    channels: tuple[str, ...]

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, channel: str) -> Path:
        """OpenSSH ECDSA P-384 private key (``--auth-supernode-private-key``)."""
        return self.root / "nodes" / channel

    def node_pub(self, channel: str) -> Path:
        """OpenSSH public key (``flwr supernode register``)."""
        return self.root / "nodes" / f"{channel}.pub"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_certs(
    out_dir: Path,
    channels: Sequence[str],
    *,
    hosts: Sequence[str] = (LOOPBACK, "localhost"),
    days: int = 30,
) -> Certs:
    """Create a test CA, a SuperLink certificate for ``hosts`` and a node key pair per channel.

    The server certificate names every host as a subjectAltName (IP or DNS), which TLS
    clients check (the CN is ignored). Node keys are ECDSA on NIST P-384 in OpenSSH format,
    the format ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
    register`` read. Existing node keys are kept (a platform's identity must not change
    under it); the CA and server certificate are rewritten.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    certs = Certs(Path(out_dir).resolve(), tuple(channels))
    certs.root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrec test PKI"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("fedrec test CA"))
        .issuer_name(name("fedrec test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    _write_private(
        certs.ca_key,
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain),
    )
    certs.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _write_private(
        certs.server_key,
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain),
    )
    certs.server_cert.write_bytes(server_cert.public_bytes(pem))
    for channel in channels:
        if certs.node_key(channel).exists() and certs.node_pub(channel).exists():
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            certs.node_key(channel),
            key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        certs.node_pub(channel).write_bytes(pub + f" fedrec-{channel}\n".encode())
    atomic_write_text(certs.root / "README.txt", TEST_CERT_NOTE + "\n")
    return certs
