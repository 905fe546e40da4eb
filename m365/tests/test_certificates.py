import datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from m365.certificates import load_certificate_credential
from m365.errors import InvalidInput
from sandbox.ca import make_client_certificate, thumbprint


def pem_pair(days=365):
    key, cert = make_client_certificate("Odoo mail", days=days)
    return key, cert


def test_pem_with_key_and_certificate():
    key, cert = pem_pair()
    credential = load_certificate_credential((key + cert).encode())
    assert credential.thumbprint == thumbprint(cert)
    assert credential.expires_at > datetime.datetime.utcnow()
    assert "PRIVATE KEY" not in repr(credential)
    # PS256 with x5t#S256: MSAL computes the SHA-256 thumbprint when no SHA-1 one is given.
    assert "thumbprint" not in credential.for_msal() and credential.for_msal()["public_certificate"] == cert


def test_pfx_with_passphrase():
    key_pem, cert_pem = pem_pair()
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    pfx = pkcs12.serialize_key_and_certificates(
        b"odoo", key, cert, None, serialization.BestAvailableEncryption(b"s3cret")
    )
    assert load_certificate_credential(pfx, "s3cret").thumbprint == thumbprint(cert_pem)
    with pytest.raises(InvalidInput, match="passphrase"):
        load_certificate_credential(pfx, "wrong")


@pytest.mark.parametrize("case", ["empty", "certificate only", "key of another certificate", "expired", "garbage"])
def test_unusable_uploads_are_refused_clearly(case):
    _key, cert = pem_pair()
    other_key, _other = pem_pair()
    data = {
        "empty": b"",
        "certificate only": cert.encode(),
        "key of another certificate": (other_key + cert).encode(),
        "expired": "".join(make_client_certificate("old", days=-1, not_before_days=30)).encode(),
        "garbage": b"\x00\x01 not a certificate" * 10,
    }[case]
    with pytest.raises(InvalidInput):
        load_certificate_credential(data)


def test_ca_certificate_upload_pem_or_der_and_nothing_else():
    from cryptography import x509

    from m365.certificates import load_ca_certificates

    key, cert = pem_pair()
    assert load_ca_certificates(cert.encode()) == cert
    der = x509.load_pem_x509_certificate(cert.encode()).public_bytes(serialization.Encoding.DER)
    assert load_ca_certificates(der) == cert
    for bad in (b"", b"/etc/ssl/certs/ca.pem", (key + cert).encode(), b"-----BEGIN CERTIFICATE-----\nxx\n"):
        with pytest.raises(InvalidInput):
            load_ca_certificates(bad)
