"""IMAP, POP3 and SMTP of the sandbox, driven with Python's own clients and tokens MSAL obtained."""

import base64
import email.message
import imaplib
import poplib
import re
import smtplib
import socket
import ssl
import time

import msal
import pytest
import requests

EXCHANGE = "https://outlook.office.com"
ALL_SCOPES = [f"{EXCHANGE}/IMAP.AccessAsUser.All", f"{EXCHANGE}/POP.AccessAsUser.All", f"{EXCHANGE}/SMTP.Send"]
REDIRECT_URI = "http://localhost:8069/microsoft365/oauth/callback"
# learn.microsoft.com, "Authenticate an IMAP, POP or SMTP connection using OAuth"
MICROSOFT_EXAMPLE = (
    "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0"
    "NjbFJDM0VvQUEBAQ=="
)


# Exchange's words (CONFORMANCE.md IMAP-05), spoken by the sandbox's IMAP front.
IMAP_REFUSED = r"^AUTHENTICATE failed\.$"


def msal_app(sandbox, app_name="Odoo Mail (sandbox)"):
    session = requests.Session()
    session.trust_env = False
    session.verify = sandbox.ca_file
    return msal.ConfidentialClientApplication(
        sandbox.app(app_name)["client_id"],
        client_credential=sandbox.secret(app_name),
        authority=sandbox.authority(),
        http_client=session,
        instance_discovery=False,
    )


def user_token(sandbox, upn="alice@contoso.com", scopes=ALL_SCOPES):
    app = msal_app(sandbox)
    flow = app.initiate_auth_code_flow(
        scopes, redirect_uri=REDIRECT_URI, login_hint=upn, prompt="select_account", response_mode="form_post"
    )
    result = app.acquire_token_by_auth_code_flow(flow, sandbox.sign_in(flow["auth_uri"], upn))
    return result["access_token"]


def app_token(sandbox, app_name="Odoo Mail (sandbox)"):
    return msal_app(sandbox, app_name).acquire_token_for_client(["https://outlook.office365.com/.default"])[
        "access_token"
    ]


def xoauth2(mailbox, token):
    return f"user={mailbox}\x01auth=Bearer {token}\x01\x01"


def tls(sandbox):
    return ssl.create_default_context(cafile=sandbox.ca_file)


def imap_login(sandbox, mailbox, token):
    imap = imaplib.IMAP4_SSL(sandbox.host, sandbox.ports["imaps"], ssl_context=tls(sandbox))
    try:
        imap.authenticate("XOAUTH2", lambda _: xoauth2(mailbox, token).encode())
        return imap
    except imaplib.IMAP4.error:
        imap.logout()
        raise


def assert_imap_refused(sandbox, mailbox, token):
    with pytest.raises(imaplib.IMAP4.error, match=IMAP_REFUSED):
        imap_login(sandbox, mailbox, token)


def smtp_connection(sandbox):
    smtp = smtplib.SMTP(sandbox.host, sandbox.ports["smtp"], timeout=10)
    smtp.starttls(context=tls(sandbox))
    smtp.ehlo()
    return smtp


def smtp_auth(smtp, mailbox, token):
    return smtp.docmd("AUTH", "XOAUTH2 " + base64.b64encode(xoauth2(mailbox, token).encode()).decode())


@pytest.fixture
def box(sandbox):
    sandbox.reset()
    return sandbox


# IMAP --------------------------------------------------------------------------------------


def test_imap_accepts_the_users_token_and_selects_inbox(box):
    imap = imap_login(box, "alice@contoso.com", user_token(box))
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()


def test_imap_refuses_microsofts_example_and_other_peoples_mailboxes(box):
    imap = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=tls(box))
    with pytest.raises(imaplib.IMAP4.error, match=IMAP_REFUSED):
        imap.authenticate("XOAUTH2", lambda _: base64.b64decode(MICROSOFT_EXAMPLE))
    imap.logout()
    assert_imap_refused(box, "bob@contoso.com", user_token(box))


def test_imap_needs_the_imap_scope(box):
    assert_imap_refused(box, "alice@contoso.com", user_token(box, scopes=[f"{EXCHANGE}/SMTP.Send"]))


def test_imap_refuses_expired_and_revoked_tokens(box):
    token = user_token(box)
    box.control("expire_access_tokens", subject="alice@contoso.com")  # as after an admin's revocation
    assert_imap_refused(box, "alice@contoso.com", token)
    box.control("settings", access_token_lifetime=1)
    short_lived = user_token(box)
    time.sleep(2)
    assert_imap_refused(box, "alice@contoso.com", short_lived)


def test_shared_mailbox_through_a_delegate_with_full_access(box):
    imap = imap_login(box, "info@contoso.com", user_token(box, "alice@contoso.com"))
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()


def test_app_only_token_opens_only_granted_mailboxes(box):
    token = app_token(box)
    imap = imap_login(box, "info@contoso.com", token)
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()
    imap = imap_login(box, "bob@contoso.com", token)  # Exchange accepts the token, then refuses the session
    with pytest.raises(imaplib.IMAP4.error, match="User is authenticated but not connected"):
        imap.select("INBOX")  # as Exchange says without Add-MailboxPermission
    imap.logout()


def test_throttled_mailbox_says_how_long_to_back_off(box):
    token = user_token(box)
    box.control("mail_throttle", mailbox="alice@contoso.com", backoff_ms=1500, count=1)
    imap = imap_login(box, "alice@contoso.com", token)
    with pytest.raises(imaplib.IMAP4.error, match="Request is throttled. Suggested Backoff Time: 1500 milliseconds"):
        imap.select("INBOX")
    imap.logout()
    imap = imap_login(box, "alice@contoso.com", token)  # only once
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()


def test_app_only_token_without_admin_consent_is_refused(box):
    box.control(
        "grant",
        right="full_access",
        identity=f"app:{box.app('Unconsented app')['client_id']}",
        mailbox="info@contoso.com",
    )
    assert_imap_refused(box, "info@contoso.com", app_token(box, "Unconsented app"))


def test_password_login_only_where_basic_auth_is_allowed(box):
    password = box.user("alice@contoso.com")["password"]
    imap = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=tls(box))
    with pytest.raises(imaplib.IMAP4.error):
        imap.login("alice@contoso.com", password)
    imap.logout()
    box.control("settings", basic_auth_allowed=True)
    imap = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=tls(box))
    assert imap.login("alice@contoso.com", password)[0] == "OK"
    imap.logout()


# POP3 --------------------------------------------------------------------------------------


def pop3_auth(sandbox, mailbox, token):
    pop = poplib.POP3_SSL(sandbox.host, sandbox.ports["pop3s"], context=tls(sandbox))
    assert pop._shortcmd("AUTH XOAUTH2").startswith(b"+")
    pop._putcmd(base64.b64encode(xoauth2(mailbox, token).encode()).decode())
    reply = pop._getline()[0]
    if reply.startswith(b"+ "):  # SASL error challenge; an empty line ends it
        pop._putcmd("")
        reply = pop._getline()[0]
    return pop, reply


def test_pop3_xoauth2(box):
    box.control("deliver", mailbox="alice@contoso.com", subject="For POP")
    pop, reply = pop3_auth(box, "alice@contoso.com", user_token(box))
    assert reply.startswith(b"+OK")
    assert pop.stat()[0] == 1
    pop.quit()
    pop, reply = pop3_auth(box, "alice@contoso.com", user_token(box, scopes=[f"{EXCHANGE}/IMAP.AccessAsUser.All"]))
    assert reply.startswith(b"-ERR")
    pop.close()


# SMTP --------------------------------------------------------------------------------------


def test_smtp_xoauth2_send_and_read_back_over_imap(box):
    token = user_token(box)
    with smtp_connection(box) as smtp:
        assert smtp.has_extn("auth") and "XOAUTH2" in smtp.esmtp_features["auth"]
        assert smtp_auth(smtp, "alice@contoso.com", token) == (235, b"2.7.0 Authentication successful")
        message = email.message.EmailMessage()
        message["From"], message["To"], message["Subject"] = "alice@contoso.com", "bob@contoso.com", "Lunch?"
        message.set_content("At noon.")
        smtp.send_message(message, to_addrs=["bob@contoso.com", "partner@fabrikam.example"])
    bob = imap_login(box, "bob@contoso.com", user_token(box, "bob@contoso.com"))
    bob.select("INBOX")
    assert len(bob.search(None, "SUBJECT", '"Lunch?"')[1][0].split()) == 1
    bob.logout()
    outbound = list((box.service.state_dir / "outbound").glob("*.eml"))
    assert any(b"partner@fabrikam.example" in path.read_bytes() for path in outbound)


# Exchange appends "[<server> <timestamp> <session id>]" to a refused AUTH (MailKit#1770).
STAMP = rb" \[SANDBOX\.PROD\.OUTLOOK\.COM \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [0-9A-F]{16}\]$"


def test_smtp_refusals_match_exchange(box):
    token = user_token(box)
    with smtp_connection(box) as smtp:
        code, text = smtp.docmd("MAIL", "FROM:<alice@contoso.com>")
        assert (code, text.split(b" [")[0]) == (
            530,
            b"5.7.57 Client not authenticated to send mail. Error: 5.7.57 "
            b"SMTP; Client was not authenticated to send anonymous mail "
            b"during MAIL FROM",
        )
        code, text = smtp_auth(smtp, "bob@contoso.com", token)
        assert code == 535 and re.fullmatch(rb"5\.7\.3 Authentication unsuccessful" + STAMP, text), text
    box.control("smtp_auth", mailbox="alice@contoso.com", enabled=False)
    with smtp_connection(box) as smtp:
        code, text = smtp_auth(smtp, "alice@contoso.com", token)
        assert code == 535 and text.startswith(
            b"5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox."
        )
        assert re.search(STAMP, text), text


def test_smtp_greeting_and_ehlo_are_exchanges(box):
    """CONFORMANCE SMTP-01, SMTP-02: the lines MailKit#1770 and emayili#147 captured."""
    smtp = smtplib.SMTP(timeout=10)
    try:
        code, greeting = smtp.connect(box.host, box.ports["smtp"])
        assert code == 220
        assert re.fullmatch(
            rb"SANDBOX\.PROD\.OUTLOOK\.COM Microsoft ESMTP MAIL Service ready at "
            rb"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000 \[[0-9A-F]{16}\]",
            greeting,
        ), greeting
        code, lines = smtp.ehlo("odoo.example")
        assert code == 250
        assert lines.splitlines() == [
            b"SANDBOX.PROD.OUTLOOK.COM Hello [127.0.0.1]",
            b"SIZE 157286400",
            b"PIPELINING",
            b"DSN",
            b"ENHANCEDSTATUSCODES",
            b"STARTTLS",
            b"8BITMIME",
            b"BINARYMIME",
            b"CHUNKING",
            b"SMTPUTF8",
        ]
        assert smtp.docmd("STARTTLS") == (220, b"2.0.0 SMTP server ready")
        smtp.sock = tls(box).wrap_socket(smtp.sock, server_hostname=box.host)
        smtp.file = None
        code, lines = smtp.ehlo("odoo.example")
        assert b"AUTH LOGIN XOAUTH2" in lines.splitlines() and b"STARTTLS" not in lines.splitlines()
    finally:
        smtp.close()


def test_smtp_auth_takes_only_the_signed_in_user(box):
    """CONFORMANCE SMTP-05: a delegate with FullAccess on info@ may read it over IMAP, but SMTP AUTH
    refuses user=info@ with the delegate's token; app-only logs in as the target mailbox."""
    alice = user_token(box, "alice@contoso.com")
    imap_login(box, "info@contoso.com", alice).logout()
    with smtp_connection(box) as smtp:
        code, text = smtp_auth(smtp, "info@contoso.com", alice)
        assert code == 535 and text.startswith(b"5.7.3 Authentication unsuccessful [")
    with smtp_connection(box) as smtp:
        assert smtp_auth(smtp, "info@contoso.com", app_token(box))[0] == 235


def send_from(smtp, sender, to="bob@contoso.com"):
    smtp.sendmail(sender, [to], f"From: {sender}\r\nSubject: x\r\n\r\nx\r\n".encode())


def test_send_as_is_enforced(box):
    with smtp_connection(box) as smtp:
        smtp_auth(smtp, "bob@contoso.com", user_token(box, "bob@contoso.com"))
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send_from(smtp, "info@contoso.com", "alice@contoso.com")
        assert refused.value.smtp_code == 554 and refused.value.smtp_error.startswith(
            b"5.2.252 SendAsDenied; bob@contoso.com not allowed to send as info@contoso.com; "
            b"STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied;"
        )
    with smtp_connection(box) as smtp:  # alice signs in as herself and was granted Send As on info@
        assert smtp_auth(smtp, "alice@contoso.com", user_token(box, "alice@contoso.com"))[0] == 235
        assert smtp.mail("info@contoso.com") == (250, b"2.1.0 Sender OK")
        smtp.rset()
        send_from(smtp, "info@contoso.com")


@pytest.mark.parametrize(
    "variant, code, reply",
    [
        ("5.2.252", 554, rb"5\.2\.252 SendAsDenied; bob@contoso\.com not allowed to send as info@contoso\.com; .*"),
        (
            "5.2.0",
            554,
            rb"5\.2\.0 STOREDRV\.Submission\.Exception:SendAsDeniedException\.MapiExceptionSendAsDenied; .*",
        ),
        (
            "5.7.60",
            550,
            rb"5\.7\.60 SMTP; Client does not have permissions to send as this sender \[SANDBOX\.PROD\.OUTLOOK\.COM\]",
        ),
    ],
)
def test_send_as_denied_in_each_of_exchanges_wordings(box, variant, code, reply):
    """CONFORMANCE SMTP-07: MAIL FROM passes, the refusal comes at the end of DATA."""
    box.control("settings", smtp_send_as_denied=variant)
    with smtp_connection(box) as smtp:
        smtp_auth(smtp, "bob@contoso.com", user_token(box, "bob@contoso.com"))
        assert smtp.mail("info@contoso.com")[0] == 250
        smtp.rset()
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send_from(smtp, "info@contoso.com")
        assert refused.value.smtp_code == code and re.fullmatch(reply, refused.value.smtp_error), refused.value


@pytest.mark.parametrize(
    "wording, reply",
    [
        (
            "concurrent",
            b"4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more "
            b"information. [Hostname=SANDBOX.PROD.OUTLOOK.COM]",
        ),
        (
            "sender_thread",
            b"4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=SANDBOX.PROD.OUTLOOK.COM]",
        ),
    ],
)
def test_a_fourth_concurrent_connection_of_a_mailbox_is_432(box, wording, reply):
    """CONFORMANCE SMTP-11: three authenticated connections per mailbox may send; the fourth is
    refused at DATA, and may send once another one has closed."""
    box.control("settings", smtp_concurrency_reply=wording)
    token = user_token(box)
    connections = [smtp_connection(box) for _ in range(4)]
    try:
        for smtp in connections:
            assert smtp_auth(smtp, "alice@contoso.com", token)[0] == 235
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send_from(connections[3], "alice@contoso.com")
        assert (refused.value.smtp_code, refused.value.smtp_error) == (432, reply)
        for smtp in connections[:3]:
            send_from(smtp, "alice@contoso.com")
        with smtp_connection(box) as other:  # another mailbox is not affected
            smtp_auth(other, "bob@contoso.com", user_token(box, "bob@contoso.com"))
            send_from(other, "bob@contoso.com")
        connections.pop(0).quit()
        send_from(connections[2], "alice@contoso.com")
    finally:
        for smtp in connections:
            smtp.close()


def test_basic_auth_for_client_submission_retired_is_550_5_7_30(box):
    """CONFORMANCE SMTP-10: before retirement 535 5.7.139, after it 550 5.7.30."""
    password = box.user("alice@contoso.com")["password"]
    with smtp_connection(box) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login("alice@contoso.com", password)
        assert refused.value.smtp_code == 535
        assert refused.value.smtp_error.startswith(b"5.7.139 Authentication unsuccessful, basic authentication")
    box.control("settings", smtp_basic_auth_retired=True)
    with smtp_connection(box) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login("alice@contoso.com", password)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            550,
            b"5.7.30 Basic authentication is not supported for Client Submission.",
        )


def test_stop_frees_every_port(tmp_path):
    from sandbox.service import SandboxService

    service = SandboxService(tmp_path / "state", ports="auto").start()
    ports = dict(service.ports)
    service.stop()
    for port in ports.values():
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
