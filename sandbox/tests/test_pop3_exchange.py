"""The sandbox's POP3 answers as Exchange Online does (sandbox/CONFORMANCE.md, POP-01 to POP-07)."""

import base64

from bare_client import BareClient
from test_mail_logins import app_token, user_token, xoauth2


class Wire(BareClient):
    """A bare POP3 client: `send` returns the first line of the answer."""

    port = "pop3s"

    def send(self, text):
        super().send(text)
        return self.line()

    def lines_until_dot(self):
        lines = []
        while not lines or lines[-1] != b".\r\n":
            lines.append(self.line())
        return lines


def b64(mailbox, token):
    return base64.b64encode(xoauth2(mailbox, token).encode()).decode()


def test_greeting_capa_and_two_line_auth_are_exchanges(box):
    """POP-01, POP-02, POP-03."""
    box.control("deliver", mailbox="sales@contoso.com", subject="For POP")
    wire = Wire(box)
    assert wire.greeting == (
        b"+OK The Microsoft Exchange POP3 service is ready. "
        b"[UwBBAE4ARABCAE8AWAAuAFAAUgBPAEQALgBPAFUAVABMAE8ATwBLAC4AQwBPAE0A]\r\n"
    )
    assert wire.send("CAPA") == b"+OK\r\n"
    assert wire.lines_until_dot() == [b"TOP\r\n", b"UIDL\r\n", b"SASL PLAIN XOAUTH2\r\n", b"USER\r\n", b".\r\n"]
    assert wire.send("AUTH XOAUTH2") == b"+ \r\n"
    assert wire.send(b64("sales@contoso.com", app_token(box))) == b"+OK User successfully authenticated.\r\n"
    count = int(wire.send("STAT").split()[1])
    assert count >= 1
    assert wire.send(f"RETR {count}").startswith(b"+OK")
    assert b"Subject: For POP\r\n" in b"".join(wire.lines_until_dot())
    assert wire.send("UIDL").startswith(b"+OK") and len(wire.lines_until_dot()) == count + 1
    assert wire.send("QUIT") == b"+OK Microsoft Exchange Server POP3 server signing off.\r\n"
    wire.close()


def test_a_refused_token_and_the_one_line_form(box):
    """POP-05: the refusal at once, no SASL error challenge; POP-04: no initial response."""
    wire = Wire(box)
    wire.send("AUTH XOAUTH2")
    assert wire.send(b64("bob@contoso.com", user_token(box))) == (
        b"-ERR Authentication failure: unknown user name or bad password.\r\n"
    )
    assert wire.send(f"AUTH XOAUTH2 {b64('alice@contoso.com', user_token(box))}") == (
        b"-ERR Protocol error. Connection is closed. 10\r\n"
    )
    assert wire.line() == b""
    wire.close()


def test_an_auth_line_over_4096_characters_is_a_protocol_error(box):
    """POP-06 (MailKit#1948; the wording is assumed)."""
    wire = Wire(box)
    wire.send("AUTH XOAUTH2")
    assert wire.send(b64("alice@contoso.com", user_token(box) + "x" * 4096)) == (
        b"-ERR Protocol error. Connection is closed. 10\r\n"
    )
    wire.close()


def test_a_session_refusal_comes_at_auth(box):
    """POP-07 (assumed): an app without mailbox permission, throttling."""
    wire = Wire(box)
    wire.send("AUTH XOAUTH2")
    assert wire.send(b64("bob@contoso.com", app_token(box))) == b"-ERR User is authenticated but not connected.\r\n"
    token = user_token(box)
    box.control("mail_throttle", mailbox="alice@contoso.com", backoff_ms=1500, count=1)
    wire.send("AUTH XOAUTH2")
    assert wire.send(b64("alice@contoso.com", token)) == (
        b"-ERR Request is throttled. Suggested Backoff Time: 1500 milliseconds\r\n"
    )
    wire.close()
