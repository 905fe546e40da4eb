"""Every row of the Errors table (../shared/docs/microsoft365.md), produced by the sandbox on the
wire and diagnosed by the core exactly as Test connection, the callback and the health check do."""

import smtplib
import ssl

import pytest

from m365 import diagnosis
from m365.clouds import CLOUDS
from m365.errors import AuthorizationFailed, MailLoginFailed
from m365.identity import AppCredentials, IdentityClient
from m365.mailcheck import check_imap, check_smtp, smtp_authenticate

REDIRECT_URI = "http://localhost:8069/microsoft365/oauth/callback"
SCOPES = CLOUDS["global"].delegated_scopes()
APP_SCOPES = ["https://outlook.office365.com/.default"]


def client(box, app="Odoo Mail (sandbox)", tenant=None, secret=None, client_id=None):
    return IdentityClient(
        AppCredentials(
            client_id=client_id or box.app(app)["client_id"],
            authority=box.authority(tenant),
            client_secret=secret or box.secret(app),
            ca_file=box.ca_file,
        )
    )


def signed_in(box, upn="alice@contoso.com"):
    identity = client(box)
    flow = identity.start_sign_in(REDIRECT_URI, SCOPES, login_hint=upn)
    sign_in = identity.finish_sign_in(flow, box.sign_in(flow["auth_uri"], upn))
    return identity, sign_in


def oauth_code(call):
    with pytest.raises(AuthorizationFailed) as failure:
        call()
    return failure.value.diagnosis


def refresh_after(box, **policy):
    box.control("settings", access_token_lifetime=1)
    identity, sign_in = signed_in(box)
    if policy:
        box.control("user_policy", user="alice@contoso.com", **policy)
    return oauth_code(lambda: identity.access_token(SCOPES, sign_in.home_account_id, force_refresh=True))


def test_aadsts50011_redirect_uri_not_registered(box):
    identity = client(box)
    flow = identity.start_sign_in(REDIRECT_URI, SCOPES, login_hint="alice@contoso.com")
    params = box.sign_in(flow["auth_uri"], "alice@contoso.com")
    flow["redirect_uri"] = "https://erp.example.com/microsoft365/oauth/callback"  # what a wrong web.base.url gives
    found = oauth_code(lambda: identity.finish_sign_in(flow, params))
    assert found.code == "AADSTS50011" and "Web" in found.fix


def test_aadsts50194_single_tenant_app_without_tenant(box):
    identity = client(box, tenant="organizations")
    flow = identity.start_sign_in(REDIRECT_URI, SCOPES, login_hint="alice@contoso.com")
    params = box.sign_in(flow["auth_uri"], "alice@contoso.com")  # what the callback receives
    assert diagnosis.diagnose_oauth(params).code == "AADSTS50194"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown tenant", "AADSTS90002"),
        ("unknown client", "AADSTS700016"),
        ("wrong secret", "AADSTS7000215"),
        ("expired secret", "AADSTS7000222"),
        ("tenant without Exchange", "AADSTS500011"),
    ],
)
def test_app_registration_mistakes(box, case, expected):
    if case == "unknown tenant":
        identity = client(box, tenant="nosuchtenant.example")
    elif case == "unknown client":
        identity = client(box, client_id="00000000-0000-4000-8000-000000000000")
    elif case == "wrong secret":
        identity = client(box, secret="not-the-secret")
    elif case == "expired secret":
        identity = client(box, secret=box.secret(which="expired"))
    else:
        fabrikam = box.tenant("Fabrikam")["id"]
        box.control("consent", client_id=box.app("Partner Mail (multi-tenant)")["client_id"], tenant=fabrikam)
        identity = client(box, app="Partner Mail (multi-tenant)", tenant=fabrikam)
    found = oauth_code(lambda: identity.app_access_token(APP_SCOPES))
    assert found.code == expected
    assert found.kind == diagnosis.CONFIGURATION


@pytest.mark.parametrize(
    "policy, expected, kind",
    [
        ({"require_mfa": True}, "AADSTS50076", diagnosis.RECONNECT),
        ({"must_register_mfa": True}, "AADSTS50079", diagnosis.RECONNECT),
        ({"blocked_by_conditional_access": True}, "AADSTS53003", diagnosis.RECONNECT),
    ],
)
def test_conditional_access_and_mfa_at_refresh(box, policy, expected, kind):
    found = refresh_after(box, **policy)
    assert (found.code, found.kind) == (expected, kind)


@pytest.mark.parametrize(
    "lever, expected",
    [
        ("revoke_sessions", "AADSTS50173"),
        ("expire_refresh_tokens", "AADSTS700082"),
        ("consent", "AADSTS65001"),
    ],
)
def test_lost_grants(box, lever, expected):
    box.control("settings", access_token_lifetime=1)
    identity, sign_in = signed_in(box)
    if lever == "consent":
        box.control("consent", client_id=box.app()["client_id"], tenant=box.tenant()["id"], granted=False)
    else:
        box.control(lever, user="alice@contoso.com")
    found = oauth_code(lambda: identity.access_token(SCOPES, sign_in.home_account_id, force_refresh=True))
    assert found.code == expected


def mail_code(check, mailbox, token, box):
    host_port = {check_imap: box.ports["imaps"], check_smtp: box.ports["smtp"]}[check]
    with pytest.raises(MailLoginFailed) as failure:
        check(box.host, host_port, mailbox, token, ca_file=box.ca_file)
    return failure.value.diagnosis


def test_smtp_auth_disabled_5_7_139(box):
    identity, sign_in = signed_in(box)
    box.control("smtp_auth", mailbox="alice@contoso.com", enabled=False)
    token = identity.access_token(SCOPES, sign_in.home_account_id).token
    found = mail_code(check_smtp, "alice@contoso.com", token, box)
    assert found.code == "SMTP 5.7.139" and "Set-CASMailbox" in found.fix


def test_token_rejected_5_7_3_and_imap_authenticate_failed(box):
    identity, sign_in = signed_in(box)
    token = identity.access_token(SCOPES, sign_in.home_account_id).token
    assert mail_code(check_smtp, "bob@contoso.com", token, box).code == "SMTP 5.7.3"
    assert mail_code(check_imap, "bob@contoso.com", token, box).code == "IMAP AUTHENTICATE"


def test_send_as_denied(box):
    identity, sign_in = signed_in(box)
    token = identity.access_token(SCOPES, sign_in.home_account_id).token
    with smtplib.SMTP(box.host, box.ports["smtp"], timeout=10) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=box.ca_file))
        smtp_authenticate(smtp, "alice@contoso.com", token)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("ceo@contoso.com", ["bob@contoso.com"], b"From: ceo@contoso.com\r\nSubject: x\r\n\r\nx\r\n")
    found = diagnosis.diagnose_smtp(refused.value.smtp_code, refused.value.smtp_error)
    assert found.code == "SMTP SendAsDenied" and "Add-RecipientPermission" in found.fix


def test_app_without_mailbox_permission_is_not_connected(box):
    token = client(box).app_access_token(APP_SCOPES).token
    found = mail_code(check_imap, "bob@contoso.com", token, box)
    assert found.code == "IMAP NOT CONNECTED" and "Add-MailboxPermission" in found.fix


def test_imap_throttling(box):
    identity, sign_in = signed_in(box)
    token = identity.access_token(SCOPES, sign_in.home_account_id).token
    box.control("mail_throttle", mailbox="alice@contoso.com", backoff_ms=2500)
    found = mail_code(check_imap, "alice@contoso.com", token, box)
    assert found.code == "IMAP THROTTLED" and found.params["backoff_ms"] == 2500 and found.transient


@pytest.mark.parametrize("sasl_ir", [True, False])
def test_imap_login_with_and_without_sasl_initial_response(box, sasl_ir):
    import imaplib

    from m365.mailcheck import imap_authenticate

    identity, sign_in = signed_in(box)
    token = identity.access_token(SCOPES, sign_in.home_account_id).token
    imap = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=ssl.create_default_context(cafile=box.ca_file))
    assert "SASL-IR" in imap.capabilities  # as Exchange Online announces it
    if not sasl_ir:
        imap.capabilities = tuple(c for c in imap.capabilities if c != "SASL-IR")
    imap_authenticate(imap, "alice@contoso.com", token)
    assert imap.state == "SELECTED" and imap.select("INBOX")[0] == "OK"
    imap.logout()


def test_aadsts70008_authorization_code_redeemed_too_late(box):
    """A code lives about 10 minutes (ID-19): one redeemed later is refused, and says sign in again."""
    import time
    from unittest.mock import patch

    identity = client(box)
    flow = identity.start_sign_in(REDIRECT_URI, SCOPES, login_hint="alice@contoso.com")
    params = box.sign_in(flow["auth_uri"], "alice@contoso.com")
    later = time.time() + 11 * 60
    with patch("time.time", lambda: later):  # this process's clock: MSAL's and the sandbox's
        found = oauth_code(lambda: identity.finish_sign_in(flow, params))
    assert found.code == "AADSTS70008" and found.needs_reconnect


@pytest.mark.parametrize("wording", ["5.2.252", "5.2.0", "5.7.60"])
def test_send_as_denied_in_each_of_exchanges_wordings(box, wording):
    box.control("settings", smtp_send_as_denied=wording)
    identity, sign_in = signed_in(box)
    token = identity.access_token(SCOPES, sign_in.home_account_id).token
    with smtplib.SMTP(box.host, box.ports["smtp"], timeout=10) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=box.ca_file))
        smtp_authenticate(smtp, "alice@contoso.com", token)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("ceo@contoso.com", ["bob@contoso.com"], b"From: ceo@contoso.com\r\nSubject: x\r\n\r\nx\r\n")
    assert wording in refused.value.smtp_error.decode()
    found = diagnosis.diagnose_smtp(refused.value.smtp_code, refused.value.smtp_error)
    assert found.code == "SMTP SendAsDenied" and "Add-RecipientPermission" in found.fix


@pytest.mark.parametrize("reply", ["concurrent", "sender_thread"])
def test_smtp_432_concurrent_connections_limit(box, reply):
    box.control("settings", smtp_concurrency_limit=1, smtp_concurrency_reply=reply)
    identity, sign_in = signed_in(box)
    token = identity.access_token(SCOPES, sign_in.home_account_id).token
    context = ssl.create_default_context(cafile=box.ca_file)
    sessions = []
    for _session in range(2):  # the first stays open while the second sends: refused at DATA
        smtp = smtplib.SMTP(box.host, box.ports["smtp"], timeout=10)
        smtp.starttls(context=context)
        smtp_authenticate(smtp, "alice@contoso.com", token)
        sessions.append(smtp)
    try:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            sessions[1].sendmail("alice@contoso.com", ["bob@contoso.com"], b"Subject: x\r\n\r\nx\r\n")
    finally:
        for smtp in sessions:
            smtp.close()
    assert refused.value.smtp_code == 432
    found = diagnosis.diagnose_smtp(refused.value.smtp_code, refused.value.smtp_error)
    assert found.code == "SMTP 4.3.2" and found.transient


def test_admin_consent_declined_arrives_with_admin_consent_true(box):
    """`error=access_denied` (AADSTS65004) and `admin_consent=True` together: the error wins."""
    from urllib.parse import urlencode

    app = box.app()
    url = f"{box.authority()}/adminconsent?" + urlencode(
        {"client_id": app["client_id"], "redirect_uri": REDIRECT_URI, "state": "s"}
    )
    params = box.sign_in(url, "admin@contoso.com", accept=False)
    assert params["error"] == "access_denied" and params.get("admin_consent") == "True"
    found = diagnosis.diagnose_oauth(params)
    assert found.code == "AADSTS65004" and not found.transient


@pytest.mark.parametrize("kind, code", [("429", "AADSTS90055"), ("503", "UNAVAILABLE")])
def test_a_throttled_or_unavailable_token_endpoint_is_transient_in_plain_words(box, kind, code):
    """Beyond the row of the table: the token endpoint refusing for a while (Retry-After)."""
    from m365.errors import TransientFailure
    from m365.identity import _HTTP_CACHE, _TimeoutSession

    box.control("settings", access_token_lifetime=120)
    identity, sign_in = signed_in(box)
    box.control("token_fault", kind=kind, count=3, retry_after=0)
    with pytest.raises(TransientFailure) as failure:
        identity.access_token(SCOPES, sign_in.home_account_id)
    _TimeoutSession._unavailable.clear()
    _HTTP_CACHE.clear()
    found = failure.value.diagnosis
    assert found.code == code and found.transient and "busy or unavailable" in found.summary
