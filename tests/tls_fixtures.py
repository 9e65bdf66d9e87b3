"""A throwaway certificate authority for the TLS tests, made at test time.

`make_pki(directory)` writes a CA, a server certificate for 127.0.0.1/localhost, a client
certificate signed by the same CA and one signed by a stranger CA, each with its key, as
PEM files; and `ssl_config_text` writes them as TF Serving's text-format SSLConfig.
EC P-256 keys: making them takes milliseconds.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path      # a client certificate the server's CA did not sign
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, certificate: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, stranger_ca_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca = _certificate("fer test CA", ca_key, "fer test CA", ca_key, ca=True)
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    keys = {name: ec.generate_private_key(ec.SECP256R1())
            for name in ("server", "client", "stranger")}
    server = _write(directory, "server", _certificate(
        "127.0.0.1", keys["server"], "fer test CA", ca_key, server=True), keys["server"])
    client = _write(directory, "client", _certificate(
        "fer client", keys["client"], "fer test CA", ca_key), keys["client"])
    stranger = _write(directory, "stranger", _certificate(
        "stranger", keys["stranger"], "another CA", stranger_ca_key), keys["stranger"])
    return Pki(ca_path, *server, *client, *stranger)


def ssl_config_text(pki: Pki, client_verify: bool) -> str:
    """TF Serving's text-format SSLConfig holding the PEM texts themselves."""
    return (f"server_key: {json.dumps(pki.server_key.read_text())}\n"
            f"server_cert: {json.dumps(pki.server_cert.read_text())}\n"
            f"custom_ca: {json.dumps(pki.ca.read_text())}\n"
            f"client_verify: {'true' if client_verify else 'false'}\n")
