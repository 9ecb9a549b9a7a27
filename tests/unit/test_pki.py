"""Deployment TLS files and SuperNode keys from :mod:`fedpeft.pki`: the server
certificate chains to the CA and names every host, private keys are 0600, and node keys
are what Flower's own loaders accept (OpenSSH, NIST P-384)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from fedpeft.cli import main as cli
from fedpeft.pki import make_deployment


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_chains_to_the_ca_and_names_every_host(tmp_path: Path) -> None:
    files = make_deployment(tmp_path, ["fl.example.org", "10.0.0.5"], nodes=1)
    ca, server = _cert(files.ca_cert), _cert(files.server_cert)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"),
                                                       ipaddress.ip_address("127.0.0.1")]
    for key in (files.server_key, tmp_path / "ca.key", files.node_key(0)):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_node_keys_load_with_flowers_loaders(tmp_path: Path) -> None:
    files = make_deployment(tmp_path, [], nodes=2)
    keys = [load_ssh_private_key(files.node_key(i).read_bytes(), None) for i in range(2)]
    assert all(isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp384r1"
               for k in keys)
    assert try_load_public_key(files.node_public_key(1))  # what `flwr supernode register` reads
    assert files.node_key(0).read_bytes() != files.node_key(1).read_bytes()


def test_certs_command_writes_the_files(tmp_path: Path, capsys) -> None:
    assert cli(["certs", "--out", str(tmp_path), "--host", "fl.example.org", "--nodes", "1"]) == 0
    assert "node-0.pub" in capsys.readouterr().out
    assert (tmp_path / "nodes" / "node-0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert cli(["certs", "--out", str(tmp_path), "--nodes", "-1"]) == 2
