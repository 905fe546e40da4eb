"""Exchange's SMTP rules (sandbox/CONFORMANCE.md SMTP-05, -07, -10, -11) met on the wire and diagnosed
by the core as the addon shows them."""

import smtplib
import ssl

import pytest

from m365 import diagnosis
from m365.clouds import CLOUDS
from m365.errors import MailLoginFailed
from m365.identity import AppCredentials, IdentityClient
from m365.mailcheck import check_smtp, smtp_authenticate

REDIRECT_URI = "http://localhost:8069/microsoft365/oauth/callback"
SCOPES = CLOUDS["global"].delegated_scopes()


def token_of(box, upn):
    identity = IdentityClient(
        AppCredentials(
            client_id=box.app()["client_id"],
            authority=box.authority(),
            client_secret=box.secret(),
            ca_file=box.ca_file,
        )
    )
    flow = identity.start_sign_in(REDIRECT_URI, SCOPES, login_hint=upn)
    sign_in = identity.finish_sign_in(flow, box.sign_in(flow["auth_uri"], upn))
    return identity.access_token(SCOPES, sign_in.home_account_id).token


def connection(box):
    smtp = smtplib.SMTP(box.host, box.ports["smtp"], timeout=10)
    smtp.starttls(context=ssl.create_default_context(cafile=box.ca_file))
    return smtp


def test_a_delegate_logs_in_as_herself_not_as_the_shared_mailbox(box):
    token = token_of(box, "alice@contoso.com")
    with pytest.raises(MailLoginFailed) as refused:
        check_smtp(box.host, box.ports["smtp"], "info@contoso.com", token, ca_file=box.ca_file)
    assert refused.value.diagnosis.code == "SMTP 5.7.3"
    assert refused.value.diagnosis.detail.startswith("535 5.7.3 Authentication unsuccessful [")
    check_smtp(box.host, box.ports["smtp"], "alice@contoso.com", token, ca_file=box.ca_file)


@pytest.mark.parametrize("variant", ["5.2.252", "5.2.0", "5.7.60"])
def test_send_as_denied_quotes_exchange_and_names_the_exact_grant(box, variant):
    box.control("settings", smtp_send_as_denied=variant)
    token = token_of(box, "bob@contoso.com")
    with connection(box) as smtp:
        smtp_authenticate(smtp, "bob@contoso.com", token)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("info@contoso.com", ["alice@contoso.com"], b"From: info@contoso.com\r\n\r\nx\r\n")
    code, reply = refused.value.smtp_code, refused.value.smtp_error
    found = diagnosis.diagnose_smtp(
        code, reply, sender="info@contoso.com", login="bob@contoso.com", trustee='"bob@contoso.com"'
    )
    assert found.code == "SMTP SendAsDenied"
    assert found.detail == f"{code} {reply.decode()}" and found.detail.startswith(("554 5.2.", "550 5.7.60 "))
    assert (
        'Add-RecipientPermission -Identity "info@contoso.com" -Trustee "bob@contoso.com" -AccessRights SendAs'
        in found.fix % found.params
    )


def test_concurrent_connections_limit_is_transient_with_plain_words(box):
    token = token_of(box, "alice@contoso.com")
    connections = [connection(box) for _ in range(4)]
    try:
        for smtp in connections:
            smtp_authenticate(smtp, "alice@contoso.com", token)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            connections[3].sendmail("alice@contoso.com", ["bob@contoso.com"], b"From: alice@contoso.com\r\n\r\nx\r\n")
    finally:
        for smtp in connections:
            smtp.close()
    found = diagnosis.diagnose_smtp(refused.value.smtp_code, refused.value.smtp_error)
    assert (found.code, found.kind) == ("SMTP 4.3.2", diagnosis.TRANSIENT)
    assert "too many connections" in found.summary and "try again" in found.fix
    assert found.detail.startswith("432 4.3.2 Concurrent connections limit exceeded.")


def test_basic_auth_retired_says_to_use_oauth(box):
    box.control("settings", basic_auth_allowed=True, smtp_basic_auth_retired=True)
    with connection(box) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login("alice@contoso.com", box.user("alice@contoso.com")["password"])
    found = diagnosis.diagnose_smtp(refused.value.smtp_code, refused.value.smtp_error)
    assert found.code == "SMTP BASIC AUTH" and "OAuth" in found.fix
    assert found.detail == "550 5.7.30 Basic authentication is not supported for Client Submission."
