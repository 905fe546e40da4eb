"""The sandbox's `latency_ms` setting: a round-trip time added to every connection and every reply of
the identity platform, IMAP, POP3, SMTP and Microsoft Graph (issue 15). Measured with a monotonic clock as a lower
bound, which holds on any machine: a reply never comes sooner than the latency says."""

import base64
import contextlib
import imaplib
import poplib
import smtplib
import tempfile
import time

import pytest
import requests
from bare_client import BareClient
from test_mail_logins import tls, user_token, xoauth2

from sandbox.client import Sandbox
from sandbox.service import SandboxService

RTT = 0.12  # seconds


class Pop3Wire(BareClient):
    port = "pop3s"


@contextlib.contextmanager
def latency(box, milliseconds):
    box.control("settings", latency_ms=milliseconds)
    try:
        yield milliseconds / 1000
    finally:
        box.control("settings", latency_ms=0)


def took(action):
    started = time.monotonic()
    result = action()
    return time.monotonic() - started, result


def test_without_the_setting_there_is_no_latency(box):
    assert box.state()["settings"]["latency_ms"] == 0


def test_identity_platform_connection_and_reply_each_take_a_round_trip(box):
    url = f"{box.authority()}/v2.0/.well-known/openid-configuration"
    with latency(box, RTT * 1000) as rtt:
        # Odoo and MSAL open a new connection per request here (HTTP/1.0): handshake + reply.
        seconds, response = took(lambda: box.http.get(url, timeout=10))
    assert response.status_code == 200
    assert seconds >= 2 * rtt


def test_imap_connection_and_every_reply_take_a_round_trip(box):
    token = user_token(box)
    with latency(box, RTT * 1000) as rtt:
        seconds, imap = took(lambda: imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=tls(box)))
        assert seconds >= 2 * rtt  # handshake, then the greeting
        seconds, _ = took(lambda: imap.authenticate("XOAUTH2", lambda _: xoauth2("alice@contoso.com", token).encode()))
        assert seconds >= rtt
        seconds, (status, _data) = took(lambda: imap.select("INBOX"))
        assert status == "OK" and seconds >= rtt
        seconds, (status, _data) = took(imap.noop)
        assert status == "OK" and seconds >= rtt
        imap.logout()


def test_pop3_connection_and_every_reply_take_a_round_trip(box):
    token = user_token(box)
    with latency(box, RTT * 1000) as rtt:
        seconds, pop = took(lambda: poplib.POP3_SSL(box.host, box.ports["pop3s"], context=tls(box)))
        assert seconds >= 2 * rtt
        pop._shortcmd("AUTH XOAUTH2")
        seconds, reply = took(
            lambda: pop._shortcmd(base64.b64encode(xoauth2("alice@contoso.com", token).encode()).decode())
        )
        assert reply.startswith(b"+OK") and seconds >= rtt
        seconds, (count, _size) = took(pop.stat)
        assert seconds >= rtt  # relayed from Dovecot, delayed all the same
        seconds, _ = took(lambda: pop.list())
        assert seconds >= rtt
        pop.quit()


def test_smtp_greeting_and_every_reply_take_a_round_trip(box):
    with latency(box, RTT * 1000) as rtt:
        seconds, smtp = took(lambda: smtplib.SMTP(box.host, box.ports["smtp"], timeout=10))
        assert seconds >= rtt
        seconds, (code, _lines) = took(smtp.ehlo)
        assert code == 250 and seconds >= rtt
        # A multi-line reply is one round trip, not one per line.
        assert seconds < rtt * 8
        seconds, (code, _text) = took(smtp.noop)
        assert code == 250 and seconds >= rtt
        smtp.quit()


def test_graph_connection_and_every_reply_take_a_round_trip(box):
    url = f"{box.description['graph_url']}/v1.0/users/alice@contoso.com/mailFolders/inbox"
    with latency(box, RTT * 1000) as rtt, requests.Session() as session:
        session.trust_env = False  # REQUESTS_CA_BUNDLE must not replace the sandbox's CA
        session.verify = box.ca_file
        # A new connection (handshake) and its reply: Graph refuses the missing token, a reply all the same.
        seconds, response = took(lambda: session.get(url, timeout=10))
        assert response.status_code == 401 and seconds >= 2 * rtt
        seconds, response = took(lambda: session.get(url, timeout=10))  # the same connection: one reply
        assert response.status_code == 401 and seconds >= rtt


def test_latency_given_at_start_survives_a_reset():
    service = SandboxService(tempfile.mkdtemp(prefix="m365-latency-"), ports="auto", with_mail=False, latency_ms=80)
    service.start()
    try:
        handle = Sandbox(service.description())
        handle.reset()
        assert handle.state()["settings"]["latency_ms"] == 80
        seconds, response = took(lambda: handle.http.get(f"{handle.authority()}/discovery/v2.0/keys", timeout=10))
        assert response.status_code == 200 and seconds >= 0.16
    finally:
        service.stop()


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_a_stalled_mailbox_hangs_after_login_until_released(box, protocol):
    """`mail_stall`: a hung Exchange (every command after login waits) for the fetch tests."""
    token = user_token(box)
    if protocol == "imap":
        client = imaplib.IMAP4_SSL(box.host, box.ports["imaps"], ssl_context=tls(box))
        client.authenticate("XOAUTH2", lambda _: xoauth2("alice@contoso.com", token).encode())
    else:
        client = poplib.POP3_SSL(box.host, box.ports["pop3s"], context=tls(box))
        client._shortcmd("AUTH XOAUTH2")
        client._shortcmd(base64.b64encode(xoauth2("alice@contoso.com", token).encode()).decode())
    box.control("mail_stall", mailbox="alice@contoso.com")
    client.sock.settimeout(0.5)
    with pytest.raises(OSError):  # nothing comes back while stalled (a timeout)
        client.noop()
    assert box.counter("stalled_now:alice@contoso.com") == 1
    box.control("mail_stall", mailbox="alice@contoso.com", stalled=False)
    deadline = time.monotonic() + 10
    while box.counter("stalled_now:alice@contoso.com") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert box.counter("stalled_now:alice@contoso.com") == 0
    assert box.counter(f"{protocol}_sessions:alice@contoso.com") == 1
