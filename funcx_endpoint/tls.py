"""Certificates for private deployments and tests: a CA and the certificates it signs.

The private funcX web service creates its CA and server certificate on first start,
and the test suite does the same for the RabbitMQ node it runs. Everything here
returns or writes PEM; nothing touches the network. Private keys are written with
:func:`write_private_file` (mode 0600, atomic replace). Clients verify peers with
:func:`trust_root`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.ssl import Certificate, platformTrust

from funcx_endpoint.files import write_atomically

__all__ = [
    "CertificateAuthority",
    "KeyType",
    "PrivateKey",
    "TLSFiles",
    "certificate_covers",
    "trust_root",
    "ensure_ca_and_server_cert",
    "generate_private_key",
    "make_ca",
    "make_client_cert",
    "make_server_cert",
    "write_private_file",
    "write_public_file",
]

KeyType = Literal["ec", "rsa"]
PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]

#: Default host names and addresses a server certificate is valid for.
DEFAULT_HOSTNAMES: tuple[str, ...] = ("localhost",)
DEFAULT_IPS: tuple[str, ...] = ("127.0.0.1",)

CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 3650
# Certificates start being valid a little in the past, so a peer whose clock is
# slightly behind ours accepts a certificate made a moment ago.
_BACKDATE = datetime.timedelta(hours=1)
# A server certificate that expires sooner than this is replaced by
# ensure_ca_and_server_cert.
_RENEW_BEFORE = datetime.timedelta(days=30)


class CertificateAuthority(NamedTuple):
    """A CA certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


class TLSFiles(NamedTuple):
    """Paths of the files written by :func:`ensure_ca_and_server_cert`."""

    ca_cert: str
    server_cert: str
    server_key: str
    ca_key: str


def generate_private_key(key_type: KeyType = "ec") -> PrivateKey:
    """Return a new private key: EC P-256 (fast, the default) or RSA 2048."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}; use 'ec' or 'rsa'")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(key_pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError("only EC and RSA private keys are supported")
    return key


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: Any,
    valid_days: int,
    *,
    ca: bool,
    usage: x509.KeyUsage,
    expires_by: datetime.datetime | None = None,
) -> x509.CertificateBuilder:
    """What every certificate made here has: names, key, a random serial, validity
    (backdated a little; ending no later than ``expires_by``), basic constraints,
    key usage and the subject key identifier."""
    now = _now()
    not_after = now + datetime.timedelta(days=valid_days)
    if expires_by is not None:
        not_after = min(not_after, expires_by)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca(
    common_name: str = "funcX private CA",
    *,
    key_type: KeyType = "ec",
    valid_days: int = CA_VALID_DAYS,
) -> CertificateAuthority:
    """Create a self-signed CA certificate (BasicConstraints CA, path length 0)."""
    key = generate_private_key(key_type)
    cert = _builder(
        _name(common_name),
        _name(common_name),
        key.public_key(),
        valid_days,
        ca=True,
        usage=_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True),
    ).sign(key, hashes.SHA256())
    return CertificateAuthority(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _make_leaf(
    ca: CertificateAuthority,
    common_name: str,
    san: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    key_type: KeyType,
    valid_days: int,
) -> tuple[bytes, bytes]:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = _load_key(ca.key_pem)
    key = generate_private_key(key_type)
    builder = (
        _builder(
            _name(common_name),
            ca_cert.subject,
            key.public_key(),
            valid_days,
            ca=False,
            usage=_key_usage(digital_signature=True, key_encipherment=key_type == "rsa"),
            expires_by=ca_cert.not_valid_after_utc,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _san(hostnames: Iterable[str], ips: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)
    return names


def make_server_cert(
    ca: CertificateAuthority,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    ips: Sequence[str] = DEFAULT_IPS,
    *,
    key_type: KeyType = "ec",
    valid_days: int = LEAF_VALID_DAYS,
) -> tuple[bytes, bytes]:
    """Return ``(cert_pem, key_pem)`` of a server certificate signed by ``ca``.

    The certificate's SubjectAlternativeName lists every host name (DNS) and IP
    address given, which is what clients verify; at least one is required.
    """
    san = _san(hostnames, ips)
    if not san:
        raise ValueError("a server certificate needs at least one host name or IP")
    common_name = hostnames[0] if hostnames else ips[0]
    return _make_leaf(ca, common_name, san, ExtendedKeyUsageOID.SERVER_AUTH, key_type, valid_days)


def make_client_cert(
    ca: CertificateAuthority,
    common_name: str,
    *,
    key_type: KeyType = "ec",
    valid_days: int = LEAF_VALID_DAYS,
) -> tuple[bytes, bytes]:
    """Return ``(cert_pem, key_pem)`` of a client certificate for ``common_name``."""
    return _make_leaf(ca, common_name, [], ExtendedKeyUsageOID.CLIENT_AUTH, key_type, valid_days)


def certificate_covers(
    cert_pem: bytes,
    hostnames: Iterable[str] = DEFAULT_HOSTNAMES,
    ips: Iterable[str] = DEFAULT_IPS,
) -> bool:
    """Whether the certificate's SubjectAlternativeName lists every name and IP."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    dns = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    addresses = set(san.get_values_for_type(x509.IPAddress))
    return all(h.lower() in dns for h in hostnames) and all(
        ipaddress.ip_address(ip) in addresses for ip in ips
    )


def write_private_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only (0600).

    The data goes to a temporary file in the same directory that is created 0600,
    written, fsynced and then renamed over ``path``, so a reader sees the old file
    or the complete new one and the secret is never readable by others.
    """
    write_atomically(path, data, 0o600)


def write_public_file(path: str, data: bytes) -> None:
    """Like :func:`write_private_file` but world-readable (0644), for certificates."""
    write_atomically(path, data, 0o644)


def _server_cert_usable(
    cert_pem: bytes,
    key_pem: bytes,
    ca_cert_pem: bytes,
    hostnames: Sequence[str],
    ips: Sequence[str],
) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        cert.verify_directly_issued_by(ca_cert)
        key = _load_key(key_pem)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if cert.public_key() != key.public_key():
        return False
    if cert.not_valid_after_utc - _RENEW_BEFORE < _now():
        return False
    return certificate_covers(cert_pem, hostnames, ips)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _read_pair(cert_path: str, key_path: str) -> tuple[bytes, bytes] | None:
    """``(cert_pem, key_pem)`` from the two files, or None if either is missing."""
    cert_pem, key_pem = _read(cert_path), _read(key_path)
    if cert_pem is None or key_pem is None:
        return None
    return cert_pem, key_pem


def _write_pair(cert_path: str, key_path: str, pair: tuple[bytes, bytes]) -> None:
    """Write ``(cert_pem, key_pem)``: the key readable by the owner only."""
    write_private_file(key_path, pair[1])
    write_public_file(cert_path, pair[0])


def ensure_ca_and_server_cert(
    directory: str,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    ips: Sequence[str] = DEFAULT_IPS,
    *,
    key_type: KeyType = "ec",
    ca_common_name: str = "funcX private CA",
) -> TLSFiles:
    """Make sure ``directory`` holds a CA and a server certificate it signed.

    Files: ``ca.pem`` and ``ca.key`` (the CA), ``server.pem`` and ``server.key``.
    Only what is missing is generated: an existing CA is kept; the server
    certificate and key are replaced when either is missing, they do not match,
    the certificate is not signed by the CA, expires within 30 days, or does not
    list every requested host name and IP. Keys are 0600; the directory is created
    0700 if needed.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    files = TLSFiles(
        ca_cert=os.path.join(directory, "ca.pem"),
        server_cert=os.path.join(directory, "server.pem"),
        server_key=os.path.join(directory, "server.key"),
        ca_key=os.path.join(directory, "ca.key"),
    )
    ca_pair = _read_pair(files.ca_cert, files.ca_key)
    if ca_pair is None:
        ca = make_ca(ca_common_name, key_type=key_type)
        _write_pair(files.ca_cert, files.ca_key, (ca.cert_pem, ca.key_pem))
    else:
        ca = CertificateAuthority(*ca_pair)

    server_pair = _read_pair(files.server_cert, files.server_key)
    if server_pair is None or not _server_cert_usable(*server_pair, ca.cert_pem, hostnames, ips):
        server_pair = make_server_cert(ca, hostnames, ips, key_type=key_type)
        _write_pair(files.server_cert, files.server_key, server_pair)
    return files


def trust_root(ca_file: str | None) -> Any:
    """What a TLS client trusts (a ``trustRoot``): the CA certificate in ``ca_file``,
    else the system's CAs."""
    if not ca_file:
        return platformTrust()
    with open(ca_file, "rb") as f:
        return Certificate.loadPEM(f.read())
