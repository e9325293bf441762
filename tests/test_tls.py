"""Tests for funcx_endpoint.tls: CA and certificate helpers, private file writing."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint import tls


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def verify_server(ca_pem: bytes, cert_pem: bytes, subject: x509.verification.Subject) -> None:
    """RFC 5280 + Web PKI path validation of a server certificate for ``subject``."""
    verifier = PolicyBuilder().store(Store([load(ca_pem)])).build_server_verifier(subject)
    verifier.verify(load(cert_pem), [])


def tls_handshake(
    ca_pem: bytes, cert_pem: bytes, key_pem: bytes, server_name: str, tmp: str
) -> None:
    """Run a TLS handshake in memory between Python's ssl client (verifying the chain
    and host name, X.509 strict mode) and a server with cert/key."""
    cert_file = os.path.join(tmp, "hs-cert.pem")
    key_file = os.path.join(tmp, "hs-key.pem")
    tls.write_public_file(cert_file, cert_pem)
    tls.write_private_file(key_file, key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.create_default_context(cadata=ca_pem.decode())
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


class CATests(SynchronousTestCase):
    def test_ca_is_self_signed_ca(self) -> None:
        """make_ca returns a self-signed CA certificate valid for about 10 years."""
        ca = tls.make_ca("Test CA")
        cert = load(ca.cert_pem)
        cert.verify_directly_issued_by(cert)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign)
        self.assertTrue(usage.crl_sign)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertGreaterEqual(lifetime, datetime.timedelta(days=3650))
        self.assertLess(lifetime, datetime.timedelta(days=3652))
        self.assertLess(cert.not_valid_before_utc, datetime.datetime.now(datetime.timezone.utc))
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)
        self.assertIn(b"BEGIN PRIVATE KEY", ca.key_pem)

    def test_rsa_ca(self) -> None:
        """key_type='rsa' gives a 2048-bit RSA key."""
        ca = tls.make_ca(key_type="rsa")
        key = load(ca.cert_pem).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        self.assertEqual(key.key_size, 2048)

    def test_unknown_key_type(self) -> None:
        self.assertRaises(ValueError, tls.generate_private_key, "dsa")


class ServerCertTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = tls.make_ca()

    def test_default_names(self) -> None:
        """By default the certificate is for localhost and 127.0.0.1, and a strict
        path validation accepts it for both."""
        cert_pem, _key = tls.make_server_cert(self.ca)
        cert = load(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("127.0.0.1")]
        )
        verify_server(self.ca.cert_pem, cert_pem, x509.DNSName("localhost"))
        verify_server(self.ca.cert_pem, cert_pem, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.SERVER_AUTH, eku)

    def test_wrong_name_rejected(self) -> None:
        """The certificate is not valid for a name it does not list."""
        cert_pem, _key = tls.make_server_cert(self.ca)
        self.assertRaises(
            VerificationError,
            verify_server,
            self.ca.cert_pem,
            cert_pem,
            x509.DNSName("example.com"),
        )

    def test_other_ca_rejected(self) -> None:
        """Path validation against another CA fails."""
        cert_pem, _key = tls.make_server_cert(self.ca)
        other = tls.make_ca()
        self.assertRaises(
            VerificationError, verify_server, other.cert_pem, cert_pem, x509.DNSName("localhost")
        )

    def test_given_names(self) -> None:
        """Several host names and IPv4/IPv6 addresses all end up in the SAN."""
        cert_pem, _key = tls.make_server_cert(
            self.ca, ["funcx.local", "localhost"], ["10.0.0.1", "::1"], key_type="rsa"
        )
        self.assertTrue(
            tls.certificate_covers(cert_pem, ["funcx.local", "LOCALHOST"], ["::1", "10.0.0.1"])
        )
        self.assertFalse(tls.certificate_covers(cert_pem, ["other"], []))
        verify_server(self.ca.cert_pem, cert_pem, x509.DNSName("funcx.local"))

    def test_needs_a_name(self) -> None:
        self.assertRaises(ValueError, tls.make_server_cert, self.ca, [], [])

    def test_python_ssl_handshake(self) -> None:
        """Python's ssl client (strict X.509 checks) completes a handshake for
        'localhost' and refuses one for another name."""
        cert_pem, key_pem = tls.make_server_cert(self.ca)
        tmp = self.mktemp()
        os.makedirs(tmp)
        tls_handshake(self.ca.cert_pem, cert_pem, key_pem, "localhost", tmp)
        self.assertRaises(
            ssl.SSLCertVerificationError,
            tls_handshake,
            self.ca.cert_pem,
            cert_pem,
            key_pem,
            "not-localhost",
            tmp,
        )

    def test_client_cert(self) -> None:
        """make_client_cert: client-auth EKU, the common name, signed by the CA."""
        cert_pem, key_pem = tls.make_client_cert(self.ca, "manager-1")
        cert = load(cert_pem)
        cert.verify_directly_issued_by(load(self.ca.cert_pem))
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.CLIENT_AUTH, eku)
        self.assertEqual(
            cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value, "manager-1"
        )
        self.assertIn(b"PRIVATE KEY", key_pem)


class WriteFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "secret")

    def mode(self, path: str) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    def test_private_file(self) -> None:
        """The file has the data and mode 0600, whatever the umask."""
        old = os.umask(0)
        try:
            tls.write_private_file(self.path, b"s3cret")
        finally:
            os.umask(old)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"s3cret")
        self.assertEqual(self.mode(self.path), 0o600)
        self.assertEqual(os.listdir(self.dir), ["secret"])

    def test_replace(self) -> None:
        """An existing (even world-readable) file is replaced, and ends up 0600."""
        with open(self.path, "wb") as f:
            f.write(b"old contents that are longer")
        os.chmod(self.path, 0o644)
        tls.write_private_file(self.path, b"new")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"new")
        self.assertEqual(self.mode(self.path), 0o600)

    def test_failure_leaves_nothing(self) -> None:
        """If writing fails, the old file is intact and no temporary file remains."""
        tls.write_private_file(self.path, b"old")
        self.assertRaises(TypeError, tls.write_private_file, self.path, "not bytes")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(os.listdir(self.dir), ["secret"])

    def test_public_file(self) -> None:
        tls.write_public_file(self.path, b"cert")
        self.assertEqual(self.mode(self.path), 0o644)


class EnsureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(self.mktemp(), "tls")

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def snapshot(self, files: tls.TLSFiles) -> dict[str, bytes]:
        return {name: self.read(path) for name, path in files._asdict().items()}

    def test_creates_everything(self) -> None:
        """A CA and a server certificate signed by it, keys 0600, directory 0700."""
        files = tls.ensure_ca_and_server_cert(self.dir)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        for key in (files.ca_key, files.server_key):
            self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        verify_server(
            self.read(files.ca_cert), self.read(files.server_cert), x509.DNSName("localhost")
        )

    def test_idempotent(self) -> None:
        """A second call changes nothing."""
        first = self.snapshot(tls.ensure_ca_and_server_cert(self.dir))
        second = self.snapshot(tls.ensure_ca_and_server_cert(self.dir))
        self.assertEqual(first, second)

    def test_missing_server_cert(self) -> None:
        """Only what is missing is made: the CA is kept, the server cert remade."""
        files = tls.ensure_ca_and_server_cert(self.dir)
        before = self.snapshot(files)
        os.unlink(files.server_cert)
        after = self.snapshot(tls.ensure_ca_and_server_cert(self.dir))
        self.assertEqual(after["ca_cert"], before["ca_cert"])
        self.assertEqual(after["ca_key"], before["ca_key"])
        self.assertNotEqual(after["server_key"], before["server_key"])
        verify_server(after["ca_cert"], after["server_cert"], x509.DNSName("localhost"))

    def test_new_names(self) -> None:
        """Asking for a name the certificate lacks remakes the server certificate."""
        files = tls.ensure_ca_and_server_cert(self.dir)
        before = self.snapshot(files)
        tls.ensure_ca_and_server_cert(self.dir, ["localhost", "funcx.test"], ["127.0.0.1"])
        after = self.snapshot(files)
        self.assertEqual(after["ca_cert"], before["ca_cert"])
        self.assertNotEqual(after["server_cert"], before["server_cert"])
        verify_server(after["ca_cert"], after["server_cert"], x509.DNSName("funcx.test"))

    def test_mismatched_key(self) -> None:
        """A server key that does not match the certificate gets both remade."""
        files = tls.ensure_ca_and_server_cert(self.dir)
        _cert, other_key = tls.make_server_cert(tls.make_ca())
        tls.write_private_file(files.server_key, other_key)
        tls.ensure_ca_and_server_cert(self.dir)
        cert = load(self.read(files.server_cert))
        key = tls._load_key(self.read(files.server_key))
        self.assertEqual(cert.public_key(), key.public_key())

    def test_cert_from_other_ca(self) -> None:
        """A server certificate not signed by the CA in the directory is remade."""
        files = tls.ensure_ca_and_server_cert(self.dir)
        cert_pem, key_pem = tls.make_server_cert(tls.make_ca())
        tls.write_public_file(files.server_cert, cert_pem)
        tls.write_private_file(files.server_key, key_pem)
        tls.ensure_ca_and_server_cert(self.dir)
        load(self.read(files.server_cert)).verify_directly_issued_by(load(self.read(files.ca_cert)))
