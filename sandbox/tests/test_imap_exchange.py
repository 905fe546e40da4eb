"""The sandbox's IMAP answers as Exchange Online does, byte for byte where a public transcript shows the
bytes (sandbox/CONFORMANCE.md, IMAP-01 to IMAP-15)."""

import base64
import imaplib
import ssl

import pytest
from bare_client import BareClient
from test_mail_logins import app_token, tls, user_token, xoauth2


class Wire(BareClient):
    """A bare IMAP client."""

    port = "imaps"

    def command(self, tag, text):
        """Send `tag text`, return every line up to and including the tagged one."""
        self.send(f"{tag} {text}")
        lines = []
        while not lines or not lines[-1].startswith(tag.encode() + b" "):
            line = self.line()
            if not line:
                break
            lines.append(line)
        return lines

    def login(self, mailbox, token):
        encoded = base64.b64encode(xoauth2(mailbox, token).encode()).decode()
        return self.command("a1", f"AUTHENTICATE XOAUTH2 {encoded}")

    def closed(self):
        try:
            return self.file.readline() == b""
        except (ConnectionError, ssl.SSLError):
            return True


def test_greeting_and_capabilities_are_exchanges(box):
    """IMAP-01, IMAP-02, IMAP-03."""
    wire = Wire(box)
    assert wire.greeting == (
        b"* OK The Microsoft Exchange IMAP4 service is ready. "
        b"[UwBBAE4ARABCAE8AWAAuAFAAUgBPAEQALgBPAFUAVABMAE8ATwBLAC4AQwBPAE0A]\r\n"
    )
    assert base64.b64decode(wire.greeting.split(b"[")[1][:-3]).decode("utf-16-le") == "SANDBOX.PROD.OUTLOOK.COM"
    assert wire.command("a0", "CAPABILITY") == [
        b"* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE "
        b"LITERAL+\r\n",
        b"a0 OK CAPABILITY completed.\r\n",
    ]
    assert wire.login("alice@contoso.com", user_token(box)) == [b"a1 OK AUTHENTICATE completed.\r\n"]
    assert wire.command("a2", "CAPABILITY")[0] == (
        b"* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CLIENTACCESSRULES "
        b"CLIENTNETWORKPRESENCELOCATION BACKENDAUTHENTICATE CHILDREN IDLE NAMESPACE LITERAL+\r\n"
    )
    assert wire.command("a3", "LOGOUT") == [
        b"* BYE Microsoft Exchange Server IMAP4 server signing off.\r\n",
        b"a3 OK LOGOUT completed.\r\n",
    ]  # IMAP-15
    wire.close()


def test_a_refused_token_is_no_authenticate_failed_at_once(box):
    """IMAP-05: no SASL error challenge, the NO comes at once."""
    wire = Wire(box)
    assert wire.login("bob@contoso.com", user_token(box)) == [b"a1 NO AUTHENTICATE failed.\r\n"]
    wire.close()


def test_an_app_without_mailbox_permission_is_refused_on_the_next_commands(box):
    """IMAP-08, with the bytes of email-oauth2-proxy#74: BAD, then BAD and BYE, then the hang-up."""
    wire = Wire(box)
    assert wire.login("bob@contoso.com", app_token(box)) == [b"a1 OK AUTHENTICATE completed.\r\n"]
    assert wire.command("00000003", "SELECT INBOX") == [b"00000003 BAD User is authenticated but not connected.\r\n"]
    assert wire.command("00000004", "EXPUNGE") == [b"00000004 BAD User is authenticated but not connected.\r\n"]
    assert wire.line() == b"* BYE Connection closed. 14\r\n"
    assert wire.closed()


def test_a_disabled_mailbox_is_refused_like_a_missing_permission(box):
    """IMAP-08 (the disabled-mailbox cause is assumed)."""
    box.control("mailbox_enabled", mailbox="info@contoso.com", enabled=False)
    imap = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=tls(box))
    assert imap.authenticate("XOAUTH2", lambda _: xoauth2("info@contoso.com", app_token(box)).encode())[0] == "OK"
    with pytest.raises(imaplib.IMAP4.error, match="BAD.*User is authenticated but not connected"):
        imap.select("INBOX")
    with pytest.raises(imaplib.IMAP4.error, match="BAD.*User is authenticated but not connected"):
        imap.select("INBOX")
    with pytest.raises(imaplib.IMAP4.abort, match="Connection closed. 14"):
        imap.noop()
    wire = Wire(box)  # LOGOUT is still answered (assumed)
    wire.login("info@contoso.com", app_token(box))
    assert wire.command("a2", "LOGOUT") == [
        b"* BYE Microsoft Exchange Server IMAP4 server signing off.\r\n",
        b"a2 OK LOGOUT completed.\r\n",
    ]
    box.control("mailbox_enabled", mailbox="info@contoso.com", enabled=True)
    imap = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=tls(box))
    imap.authenticate("XOAUTH2", lambda _: xoauth2("info@contoso.com", app_token(box)).encode())
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()


def test_throttling_after_login_is_bad_then_bye(box):
    """IMAP-09, with the bytes of email-oauth2-proxy#191."""
    token = user_token(box)
    box.control("mail_throttle", mailbox="alice@contoso.com", backoff_ms=89117, count=1)
    wire = Wire(box)
    assert wire.login("alice@contoso.com", token) == [b"a1 OK AUTHENTICATE completed.\r\n"]
    assert wire.command("a2", "SELECT INBOX") == [
        b"a2 BAD Request is throttled. Suggested Backoff Time: 89117 milliseconds\r\n"
    ]
    assert wire.line() == b"* BYE Connection closed. 14\r\n"
    assert wire.closed()
    wire = Wire(box)  # only once
    assert wire.login("alice@contoso.com", token) == [b"a1 OK AUTHENTICATE completed.\r\n"]
    assert wire.command("a2", "SELECT INBOX")[-1].startswith(b"a2 OK [READ-WRITE] SELECT completed.")
    wire.close()


# Tests that leave mail behind use bob's mailbox: the POP3 test counts alice's.


def test_throttling_on_fetch_is_no_and_the_session_goes_on(box):
    """IMAP-10: imap_tools#135 (FETCH answered NO, the session stays open)."""
    token = user_token(box, "bob@contoso.com")
    box.control("deliver", mailbox="bob@contoso.com", subject="Held back")
    box.control("mail_throttle", mailbox="bob@contoso.com", backoff_ms=299910, count=1, where="fetch")
    imap = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=tls(box))
    imap.authenticate("XOAUTH2", lambda _: xoauth2("bob@contoso.com", token).encode())
    imap.select("INBOX")
    number = imap.search(None, "UNSEEN", "SUBJECT", '"Held back"')[1][0]
    assert imap.fetch(number, "(RFC822)") == (
        "NO",
        [b"Request is throttled. Suggested Backoff Time: 299910 milliseconds"],
    )
    assert imap.search(None, "UNSEEN", "SUBJECT", '"Held back"')[1][0] == number  # nothing was read
    status, data = imap.fetch(number, "(RFC822)")
    assert status == "OK" and b"Subject: Held back" in data[0][1]
    box.control("mail_throttle", mailbox="bob@contoso.com", backoff_ms=1000, count=1, where="store")  # assumed
    assert imap.store(number, "-FLAGS", "\\Seen") == (
        "NO",
        [b"Request is throttled. Suggested Backoff Time: 1000 milliseconds"],
    )
    assert imap.search(None, "UNSEEN", "SUBJECT", '"Held back"')[1][0] == b""  # still read
    imap.logout()


def test_keywords_are_refused_and_select_names_the_system_flags(box):
    """IMAP-11, IMAP-12, IMAP-14."""
    box.control("deliver", mailbox="bob@contoso.com", subject="Flags")
    wire = Wire(box)
    wire.login("bob@contoso.com", user_token(box, "bob@contoso.com"))
    select = wire.command("a2", "SELECT INBOX")
    assert select[0] == b"* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent)\r\n"
    assert (
        select[1]
        == b"* OK [PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent)] Permanent flags\r\n"
    )
    assert select[-1] == b"a2 OK [READ-WRITE] SELECT completed.\r\n"
    assert any(line.startswith(b"* OK [UIDVALIDITY ") and line.endswith(b"] UIDVALIDITY value\r\n") for line in select)
    number = wire.command("a20", 'SEARCH SUBJECT "Flags"')[0].split()[-1].decode()
    for tag, command in [
        ("a3", "SEARCH UNSEEN UNKEYWORD OdooFailed"),
        ("a4", "UID SEARCH KEYWORD testword"),
        ("a5", "SEARCH (UNSEEN UNKEYWORD OdooFailed)"),
        ("a6", f"STORE {number} +FLAGS (OdooFailed)"),
        ("a7", "UID STORE 1 +FLAGS.SILENT (filed)"),
        ("a8", f"STORE {number} FLAGS (\\Seen NonJunk)"),
    ]:
        assert wire.command(tag, command) == [f"{tag} BAD Command Argument Error. 11\r\n".encode()], command
    assert wire.command("a9", "SEARCH KEYWORD $MDNSent") == [b"* SEARCH\r\n", b"a9 OK SEARCH completed.\r\n"]
    assert wire.command("b1", 'SEARCH SUBJECT "KEYWORD x"')[-1] == b"b1 OK SEARCH completed.\r\n"
    assert wire.command("b2", f"STORE {number} +FLAGS.SILENT (\\Flagged)") == [b"b2 OK STORE completed.\r\n"]
    assert wire.command("b3", f"STORE {number} -FLAGS.SILENT (\\Seen)") == [b"b3 OK STORE completed.\r\n"]
    flagged = wire.command("b4", 'SEARCH FLAGGED SUBJECT "Flags"')
    assert flagged == [f"* SEARCH {number}\r\n".encode(), b"b4 OK SEARCH completed.\r\n"]
    wire.close()


def test_literals_reach_the_mailbox_whole(box):
    """Synchronizing and non-synchronizing literals, in APPEND and SEARCH, through the front."""
    imap = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=tls(box))
    imap.authenticate("XOAUTH2", lambda _: xoauth2("bob@contoso.com", user_token(box, "bob@contoso.com")).encode())
    message = b"Subject: Literal {5}\r\n\r\n" + b"x" * 70000 + b"\r\n"
    assert imap.append("INBOX", None, None, message)[0] == "OK"  # imaplib: a synchronizing literal
    imap.select("INBOX")
    imap.literal = b"Literal {5}"
    status, found = imap.search("UTF-8", "SUBJECT")
    assert status == "OK" and len(found[0].split()) == 1
    status, data = imap.fetch(found[0], "(BODY.PEEK[])")
    assert status == "OK" and data[0][1] == message
    imap.logout()
    wire = Wire(box)
    wire.login("bob@contoso.com", user_token(box, "bob@contoso.com"))
    wire.command("a2", "SELECT INBOX")
    wire.socket.sendall(b"a3 SEARCH SUBJECT {7+}\r\nLiteral\r\n")  # LITERAL+: no continuation awaited
    assert [wire.line(), wire.line()] == [b"* SEARCH " + found[0] + b"\r\n", b"a3 OK SEARCH completed.\r\n"]
    wire.socket.sendall(b"a4 SEARCH SUBJECT {7}\r\n")
    assert wire.line() == b"+ Ready for additional command text.\r\n"
    wire.socket.sendall(b"Literal\r\n")
    assert [wire.line(), wire.line()] == [b"* SEARCH " + found[0] + b"\r\n", b"a4 OK SEARCH completed.\r\n"]
    wire.close()
