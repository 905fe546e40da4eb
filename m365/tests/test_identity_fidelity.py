"""Entra's answers as the identity platform sends them (sandbox/CONFORMANCE.md ID-09, ID-14, ID-15, ID-27),
diagnosed by the core as the addon shows them."""

import jwt
import pytest

from m365 import diagnosis
from m365.certificates import load_certificate_credential
from m365.clouds import CLOUDS
from m365.errors import AuthorizationFailed
from m365.identity import AppCredentials, IdentityClient

REDIRECT_URI = "http://localhost:8069/microsoft365/oauth/callback"
APP_SCOPES = ["https://outlook.office365.com/.default"]


SANDBOX_WITH_MAIL = False


def client(box, **credential):
    return IdentityClient(
        AppCredentials(
            client_id=box.app()["client_id"],
            authority=box.authority(),
            ca_file=box.ca_file,
            **(credential or {"client_secret": box.secret()}),
        )
    )


def test_trace_lines_separated_by_crlf_are_shown_on_one_clean_line(box):
    with pytest.raises(AuthorizationFailed) as refused:
        client(box, client_secret="not-the-secret").app_access_token(APP_SCOPES)
    detail = refused.value.diagnosis.detail
    assert "\r" not in detail and "\n" not in detail
    assert detail.startswith("AADSTS7000215: Invalid client secret provided.")
    assert " (Trace ID: " in detail and ", Correlation ID: " in detail and ", Timestamp: " in detail


def test_certificate_credential_signs_ps256_with_the_sha256_thumbprint(box):
    registered = box.certificate()
    credential = load_certificate_credential((registered["private_key"] + registered["certificate"]).encode())
    identity = client(box, certificate=credential.for_msal())
    token = identity.app_access_token(APP_SCOPES)
    assert jwt.decode(token.token, options={"verify_signature": False})["appidacr"] == "2"


def sign_in(box, upn, accept=True):
    identity = client(box)
    flow = identity.start_sign_in(REDIRECT_URI, CLOUDS["global"].delegated_scopes(), login_hint=upn)
    return box.sign_in(flow["auth_uri"], upn, accept=accept)


def test_users_who_may_not_consent_need_an_administrators_approval(box):
    """ID-15: with user consent off, a user meets "Need admin approval"; returning without it is
    access_denied/AADSTS65004, and an attempt to consent anyway AADSTS90094."""
    box.control("consent", client_id=box.app()["client_id"], tenant=box.tenant()["id"], granted=False)
    box.control("settings", user_consent_allowed=False)
    params = sign_in(box, "alice@contoso.com")
    found = diagnosis.diagnose_oauth(params)
    assert found.code == "AADSTS90094" and "administrator" in found.fix.lower()
    params = sign_in(box, "alice@contoso.com", accept=False)
    assert params["error"] == "access_denied"
    found = diagnosis.diagnose_oauth(params)
    assert found.code == "AADSTS65004" and "accept the" not in found.fix
    assert "grant consent for the organisation" in found.fix
