"""TLS for every link that crosses a network, through Python's ``ssl`` module: the
gateway's HTTPS port, and mutual TLS between gateways and storage nodes against one
cluster CA. ``make_cluster_ca`` writes a private CA and certificates for ``dstore up
--tls`` (with the ``cryptography`` package: no hand-rolled crypto).

A node link is mutual: the node accepts only clients whose certificate the cluster CA
signed, and a gateway checks that the node's certificate names the address it dialled.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from dstore.errors import ConfigError

# what ``make_cluster_ca`` writes, under its folder
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A certificate and its key, and the CA that signs the cluster's (node links)."""

    cert: Path
    key: Path
    ca: Path | None = None

    def server(self, *, clients: str = "none") -> ssl.SSLContext:
        """A context for a listening port. ``clients``: ``"none"`` (an HTTPS port for
        anyone), ``"optional"`` (a certificate, if shown, must come from the CA) or
        ``"required"`` (a node: only holders of a CA-signed certificate)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._common(context)
        if clients != "none":
            self._trust(context)
            context.verify_mode = ssl.CERT_REQUIRED if clients == "required" else ssl.CERT_OPTIONAL
        return context

    def client(self) -> ssl.SSLContext:
        """A context for dialling a node (or a gateway, to join): the peer must show a
        certificate from the CA naming the address dialled; ours goes with it."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._common(context)
        self._trust(context)
        return context

    def _common(self, context: ssl.SSLContext) -> None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate {self.cert}: {_reason(exc)}") from exc

    def _trust(self, context: ssl.SSLContext) -> None:
        if self.ca is None:
            raise ConfigError("node links need --tls-ca (the CA that signs the cluster)")
        try:
            context.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS CA {self.ca}: {_reason(exc)}") from exc


def client_context(ca: Path | None) -> ssl.SSLContext | None:
    """How a client (the CLI) checks an HTTPS gateway: against ``ca`` when given (a
    private cluster CA), else against the system's trusted roots (None)."""
    if ca is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS CA {ca}: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    return str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)


def make_cluster_ca(
    folder: Path, roles: tuple[str, ...] = ("gateway", "storage"), hosts: tuple[str, ...] = ()
) -> dict[str, TlsFiles]:
    """A private CA in ``folder`` (made once, kept after) and a certificate per role
    signed by it, naming ``hosts`` and this machine's loopback names; keys are written
    0600. Returns each role's files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_cert_path, ca_key_path = folder / CA_CERT, folder / CA_KEY

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        tmp.replace(path)

    def write_cert(path: Path, cert: x509.Certificate) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        tmp.replace(path)

    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dstore cluster CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            .sign(ca_key, hashes.SHA256())
        )
        write_key(ca_key_path, ca_key)
        write_cert(ca_cert_path, ca_cert)

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys((*LOCAL_HOSTS, *hosts)):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    files = {}
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dstore {role}")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        key_path, cert_path = folder / f"{role}.key", folder / f"{role}.pem"
        write_key(key_path, key)
        write_cert(cert_path, cert)
        files[role] = TlsFiles(cert_path, key_path, ca_cert_path)
    return files
