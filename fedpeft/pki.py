"""TLS certificates and SuperNode keys for a Flower deployment, made with ``cryptography``.

A deployment needs three kinds of files, and Flower's docs make them with openssl and
ssh-keygen shell scripts. Here they come from ``cryptography`` (no shell-outs):

- ``ca.crt``/``ca.key``: a private certificate authority (ECDSA P-384, 10 years);
- ``server.pem``/``server.key``: the SuperLink's certificate, signed by the CA, whose
  subject alternative names are every host name and IP the nodes and the ``flwr`` CLI
  dial (``localhost`` and ``127.0.0.1`` always; gRPC checks them);
- ``nodes/node-<i>``/``nodes/node-<i>.pub``: one ECDSA P-384 key per SuperNode in
  OpenSSH format, which ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read.

``fedpeft certs --out DIR --host my.server.org --nodes 3`` writes them for real machines.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1  # a NIST curve: Flower refuses node keys on other curves
VALID_DAYS = 3650


@dataclass(frozen=True)
class Deployment:
    """Paths of one deployment's TLS and node-key files."""

    root: Path
    nodes: int

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, i: int) -> Path:
        """SuperNode ``i``'s private key (OpenSSH PEM); its public key is ``.pub`` next to it."""
        return self.root / "nodes" / f"node-{i}"

    def node_public_key(self, i: int) -> Path:
        return self.root / "nodes" / f"node-{i}.pub"


def make_deployment(root: Path, hosts: list[str], nodes: int) -> Deployment:
    """Write a CA, a server certificate for ``hosts`` and ``nodes`` node keys under
    ``root`` (private keys mode 0600); return their paths."""
    files = Deployment(Path(root), nodes)
    (files.root / "nodes").mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(CURVE())
    ca = _ca_certificate(ca_key)
    _write(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    _write_private(files.root / "ca.key", _pem(ca_key))
    server_key = ec.generate_private_key(CURVE())
    cert = _server_certificate(server_key, ca, ca_key, _with_loopback(hosts))
    _write(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem(server_key))
    for i in range(nodes):
        write_node_key(files.node_key(i))
    return files


def write_node_key(path: Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format: ``path`` (0600) and ``path.pub``."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write_private(path, private)
    _write(path.with_name(path.name + ".pub"), public + b"\n")


def _with_loopback(hosts: list[str]) -> list[str]:
    return list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
             ) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS)))


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = _name("fedpeft deployment CA")
    builder = (_builder(name, name, key)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    return builder.sign(key, hashes.SHA384())


def _server_certificate(key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                        ca_key: ec.EllipticCurvePrivateKey, hosts: list[str]
                        ) -> x509.Certificate:
    builder = (_builder(_name(hosts[0]), ca.subject, key)
               .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]),
                              critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    return builder.sign(ca_key, hashes.SHA384())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)
