"""Certificate credentials (Microsoft's recommendation over client secrets): what an administrator
uploads (PEM with key and certificate, or PFX with a passphrase) turned into what MSAL needs."""

import datetime
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from .errors import InvalidInput
from .i18n import _lt

MAX_UPLOAD = 64 * 1024


@dataclass(frozen=True)
class CertificateCredential:
    private_key: str  # PEM, PKCS#8
    certificate: str  # PEM
    thumbprint: str  # SHA-1, upper-case hex: what Entra ID shows under Certificates & secrets
    expires_at: datetime.datetime  # naive UTC

    def __repr__(self):  # never the key
        return f"CertificateCredential(thumbprint={self.thumbprint!r}, expires_at={self.expires_at!r})"

    def for_msal(self):
        # No SHA-1 "thumbprint": MSAL then signs PS256 with the SHA-256 thumbprint (x5t#S256), as
        # Entra asks; with one it falls back to the deprecated RS256 + x5t.
        return {"private_key": self.private_key, "public_certificate": self.certificate}


def load_certificate_credential(data, passphrase=None, now=None):
    """From PEM (key and certificate in one file) or PFX/PKCS#12 bytes; refuses anything unusable."""
    if not data or len(data) > MAX_UPLOAD:
        raise InvalidInput(_lt("Upload a PEM file with the private key and the certificate, or a PFX file."))
    password = passphrase.encode() if passphrase else None
    if b"-----BEGIN" in data:
        key, certificate = _from_pem(data, password)
    else:
        try:
            key, certificate, _chain = pkcs12.load_key_and_certificates(data, password)
        except ValueError:
            raise InvalidInput(_lt("This PFX file cannot be opened: check the passphrase.")) from None
    if key is None or certificate is None:
        raise InvalidInput(_lt("The file must contain both the private key and the certificate."))
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != certificate.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise InvalidInput(_lt("The private key does not belong to the certificate."))
    now = now or datetime.datetime.utcnow()
    if certificate.not_valid_after < now:
        raise InvalidInput(
            _lt("This certificate expired on %(date)s: create a new one and upload it to Entra ID and here."),
            date=certificate.not_valid_after.strftime("%Y-%m-%d"),
        )
    return CertificateCredential(
        private_key=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        certificate=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        thumbprint=certificate.fingerprint(hashes.SHA1()).hex().upper(),
        expires_at=certificate.not_valid_after,
    )


def _from_pem(data, password):
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:  # encrypted key without passphrase, or a passphrase for a plain key
        raise InvalidInput(_lt("The private key is encrypted: enter its passphrase.")) from None
    except ValueError:
        raise InvalidInput(_lt("The file must contain both the private key and the certificate.")) from None
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise InvalidInput(_lt("The file must contain both the private key and the certificate.")) from None
    return key, certificate


def load_ca_certificates(data):
    """The PEM text of the CA certificate(s) in an uploaded PEM or DER file; refuses anything else
    (a private key, an empty file, garbage). What a TLS client is told to trust."""
    message = _lt("Upload the CA's certificate as a PEM or DER file (no private key).")
    if not data or len(data) > MAX_UPLOAD or b"PRIVATE KEY" in data:
        raise InvalidInput(message)
    try:
        if b"-----BEGIN" in data:
            blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S)
            found = [x509.load_pem_x509_certificate(block) for block in blocks]
        else:
            found = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise InvalidInput(message) from None
    if not found:
        raise InvalidInput(message)
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in found)
