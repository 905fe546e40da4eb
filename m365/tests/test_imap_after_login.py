"""Exchange refuses after a good login, on whatever command comes next (sandbox/CONFORMANCE.md IMAP-08
to IMAP-13): the core turns each of these replies into a diagnosis, never a raw imaplib exception."""

import imaplib
import ssl

import pytest

from m365 import diagnosis
from m365.errors import MailLoginFailed
from m365.identity import AppCredentials, IdentityClient
from m365.mailcheck import check_imap, imap_authenticate, imap_command, imap_reply

REDIRECT_URI = "http://localhost:8069/microsoft365/oauth/callback"
SCOPES = ["https://outlook.office.com/IMAP.AccessAsUser.All"]


def identity(box):
    return IdentityClient(
        AppCredentials(
            client_id=box.app()["client_id"],
            authority=box.authority(),
            client_secret=box.secret(),
            ca_file=box.ca_file,
        )
    )


def user_token(box, upn):
    client = identity(box)
    flow = client.start_sign_in(REDIRECT_URI, SCOPES, login_hint=upn)
    sign_in = client.finish_sign_in(flow, box.sign_in(flow["auth_uri"], upn))
    return client.access_token(SCOPES, sign_in.home_account_id).token


def app_token(box):
    return identity(box).app_access_token(["https://outlook.office365.com/.default"]).token


def refused(call):
    with pytest.raises(MailLoginFailed) as failure:
        call()
    return failure.value.diagnosis


def session(box, mailbox, token):
    imap = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=ssl.create_default_context(cafile=box.ca_file))
    imap_authenticate(imap, mailbox, token)
    return imap


def test_test_connection_of_an_app_without_mailbox_permission_is_diagnosed(box):
    """OK AUTHENTICATE, then BAD on SELECT: was a raw IMAP4.error."""
    found = refused(lambda: check_imap(box.host, box.ports["imaps"], "bob@contoso.com", app_token(box), box.ca_file))
    assert found.code == "IMAP NOT CONNECTED"
    assert found.detail == "BAD User is authenticated but not connected."
    app_only = diagnosis.diagnose_app_only(
        "IMAP", found, ["IMAP.AccessAsApp"], app_id="the-app-id", app_name="Odoo", mailbox="bob@contoso.com"
    )
    assert app_only.code == "APP MAILBOX PERMISSION"
    assert "Add-MailboxPermission" in app_only.fix and "FullAccess" in app_only.fix


def test_a_disabled_mailbox_is_diagnosed(box):
    box.control("mailbox_enabled", mailbox="info@contoso.com", enabled=False)
    token = user_token(box, "alice@contoso.com")
    found = refused(lambda: check_imap(box.host, box.ports["imaps"], "info@contoso.com", token, box.ca_file))
    assert found.code == "IMAP NOT CONNECTED" and found.params["mailbox"] == "info@contoso.com"
    assert "enabled" in found.fix


def test_throttling_after_login_gives_the_backoff(box):
    token = user_token(box, "alice@contoso.com")
    box.control("mail_throttle", mailbox="alice@contoso.com", backoff_ms=89117)
    found = refused(lambda: check_imap(box.host, box.ports["imaps"], "alice@contoso.com", token, box.ca_file))
    assert found.code == "IMAP THROTTLED" and found.params["backoff_ms"] == 89117 and found.transient


def test_a_throttled_fetch_is_a_diagnosis_not_a_message(box):
    token = user_token(box, "bob@contoso.com")
    box.control("deliver", mailbox="bob@contoso.com", subject="Throttled fetch")
    imap = session(box, "bob@contoso.com", token)
    number = imap_command(imap, "SEARCH", None, "UNSEEN", "SUBJECT", '"Throttled fetch"')[0].split()[-1]
    box.control("mail_throttle", mailbox="bob@contoso.com", backoff_ms=299910, where="fetch")
    found = refused(lambda: imap_command(imap, "FETCH", number, "(BODY.PEEK[])"))
    assert found.code == "IMAP THROTTLED" and found.params["backoff_ms"] == 299910
    assert b"Subject: Throttled fetch" in imap_command(imap, "FETCH", number, "(BODY.PEEK[])")[0][1]
    imap.logout()


def test_a_keyword_and_a_dead_session_are_diagnosed(box):
    imap = session(box, "bob@contoso.com", user_token(box, "bob@contoso.com"))
    found = refused(lambda: imap_command(imap, "SEARCH", None, "(UNSEEN UNKEYWORD OdooFailed)"))
    assert found.code == "IMAP ARGUMENT" and found.detail == "BAD Command Argument Error. 11"
    assert found.params["command"] == "SEARCH"
    imap.shutdown()  # the connection is gone: BYE or EOF
    found = refused(lambda: imap_command(imap, "SEARCH", None, "UNSEEN"))
    assert found.code == "IMAP COMMAND" and found.transient


def test_the_servers_words_are_read_out_of_imaplibs_messages():
    assert imap_reply(
        imaplib.IMAP4.error("SELECT command error: BAD [b'User is authenticated but not connected.']")
    ) == ("BAD User is authenticated but not connected.")
    assert imap_reply(imaplib.IMAP4.abort("command: NOOP => Connection closed. 14")) == "Connection closed. 14"
    assert imap_reply([b"Request is throttled. Suggested Backoff Time: 5 milliseconds"]) == (
        "Request is throttled. Suggested Backoff Time: 5 milliseconds"
    )
