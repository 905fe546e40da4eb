"""XOAUTH2 logins on IMAP, POP3 and SMTP connections, with the server's refusal diagnosed.

Works on connections opened by the caller (Odoo's own IMAP/POP/SMTP objects), so Odoo keeps
its timeouts and TLS handling; this module only authenticates and reads the reply.
"""

import contextlib
import imaplib
import poplib
import re
import smtplib
import ssl

from . import diagnosis
from .errors import MailCommandFailed, MailLoginFailed
from .xoauth2 import xoauth2_base64, xoauth2_string


def imap_authenticate(connection, mailbox, access_token):
    """AUTHENTICATE XOAUTH2 then SELECT INBOX, as Exchange needs both before a fetch.

    With SASL-IR (Exchange Online announces it) the token goes with the command itself: one round
    trip to Microsoft less per connection than imaplib's challenge-response."""
    connection = getattr(connection, "__obj__", connection)  # Odoo's wrapper hides imaplib's internals
    raw = xoauth2_string(mailbox, access_token)
    try:
        if "SASL-IR" in connection.capabilities:
            # A refusal comes as a SASL error challenge first; an empty response ends the exchange.
            connection.literal = imaplib._Authenticator(lambda _challenge: b"").process
            status, data = connection._simple_command("AUTHENTICATE", "XOAUTH2", xoauth2_base64(mailbox, access_token))
            if status != "OK":
                raise imaplib.IMAP4.error(b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace"))
            connection.state = "AUTH"
        else:
            connection.authenticate("XOAUTH2", lambda _challenge: raw.encode())
    except imaplib.IMAP4.error as exc:
        raise MailLoginFailed(
            diagnosis.diagnose_mailbox("IMAP", imap_reply(exc), mailbox=mailbox, scope="IMAP.AccessAsUser.All")
        ) from None
    # Exchange accepts the token, then refuses the session on the next command (BAD, then BYE):
    # an app without mailbox permission, a disabled mailbox, throttling.
    imap_command(connection, "SELECT", "INBOX", mailbox=mailbox, scope="IMAP.AccessAsUser.All")


def imap_reply(failure):
    """The server's own words in imaplib's exception or NO data: ``SELECT command error: BAD
    [b'User is authenticated but not connected.']`` gives ``BAD User is authenticated but not connected.``"""
    if isinstance(failure, (list, tuple)):
        return b" ".join(d for d in failure if isinstance(d, bytes)).decode(errors="replace")
    text = str(failure)
    match = re.search(r"(OK|NO|BAD) \[b?(['\"])(.*)\2\]\s*$", text)
    if match:
        return f"{match[1]} {match[3]}"
    return re.sub(r"^command: \w+ => ", "", text)


def imap_command(connection, command, *args, **params):
    """One IMAP command after the login, its refusal diagnosed: a BAD (imaplib raises IMAP4.error),
    a BYE (IMAP4.abort) or a NO (returned) all become MailCommandFailed (a MailLoginFailed) with the
    diagnosis, so the caller never meets a raw imaplib exception nor reads a refusal as data."""
    connection = getattr(connection, "__obj__", connection)
    method = getattr(connection, command.lower())
    try:
        status, data = method(*args)
    except imaplib.IMAP4.abort as exc:  # BYE, or the connection is gone
        found = diagnosis.diagnose_imap_command(command, imap_reply(exc), **params)
        raise MailCommandFailed(found, closed=True) from None
    except (imaplib.IMAP4.error, OSError) as exc:  # BAD (a BYE may follow it: the next command meets it)
        text = imap_reply(exc) if isinstance(exc, imaplib.IMAP4.error) else f"{type(exc).__name__}: {exc}"
        found = diagnosis.diagnose_imap_command(command, text, **params)
        raise MailCommandFailed(found, closed=isinstance(exc, OSError)) from None
    if status != "OK":
        found = diagnosis.diagnose_imap_command(command, f"{status} {imap_reply(data)}".strip(), **params)
        raise MailCommandFailed(found)
    return data


def pop3_authenticate(connection, mailbox, access_token):
    """poplib has no SASL helper: ``AUTH XOAUTH2``, wait for ``+``, send the response."""
    try:
        reply = connection._shortcmd("AUTH XOAUTH2")
        if not reply.startswith(b"+"):
            raise poplib.error_proto(reply)
        connection._putcmd(xoauth2_base64(mailbox, access_token))
        reply = connection._getline()[0]
        if reply == b"+" or reply.startswith(b"+ "):  # SASL error challenge: an empty line ends it
            connection._putcmd("")
            reply = connection._getline()[0]
        if not reply.startswith(b"+OK"):
            raise poplib.error_proto(reply)
    except poplib.error_proto as exc:
        raise MailLoginFailed(
            diagnosis.diagnose_mailbox(
                "POP3", exc.args[0] if exc.args else b"", mailbox=mailbox, scope="POP.AccessAsUser.All"
            )
        ) from None


def smtp_authenticate(connection, mailbox, access_token):
    """``AUTH XOAUTH2`` and check the reply: a refused token must not surface later as a
    confusing MAIL FROM error (which is what happens when the reply is ignored)."""
    connection.ehlo_or_helo_if_needed()
    # smtp_debug would print the AUTH line, and so the token, to the log.
    debuglevel, connection.debuglevel = connection.debuglevel, 0
    try:
        code, message = connection.docmd("AUTH", "XOAUTH2 " + xoauth2_base64(mailbox, access_token))
        if code == 334:  # the server sent an error challenge; an empty line ends the exchange
            code, message = connection.docmd("")
    finally:
        connection.debuglevel = debuglevel
    if code != 235:
        raise MailLoginFailed(diagnosis.diagnose_smtp(code, message, mailbox=mailbox))
    return code, message


# Test connection: a fresh connection per protocol, certificate checked (Microsoft's are public;
# a private endpoint such as the sandbox names its CA), logged in, and closed without side effects.


def _tls_context(ca_file):
    return ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()


def _connect(protocol, host, port, opener):
    try:
        return opener()
    except (OSError, ssl.SSLError, imaplib.IMAP4.error, poplib.error_proto, smtplib.SMTPException) as exc:
        raise MailLoginFailed(diagnosis.diagnose_connection(protocol, host, port, exc)) from None


def check_imap(host, port, mailbox, access_token, ca_file=None, timeout=30):
    imap = _connect(
        "IMAP", host, port, lambda: imaplib.IMAP4_SSL(host, port, ssl_context=_tls_context(ca_file), timeout=timeout)
    )
    try:
        imap_authenticate(imap, mailbox, access_token)
    finally:
        with contextlib.suppress(OSError, imaplib.IMAP4.error):  # closing only: the result is already known
            imap.logout()


def check_pop3(host, port, mailbox, access_token, ca_file=None, timeout=30):
    pop = _connect(
        "POP3", host, port, lambda: poplib.POP3_SSL(host, port, context=_tls_context(ca_file), timeout=timeout)
    )
    try:
        pop3_authenticate(pop, mailbox, access_token)
        pop.stat()
    finally:
        with contextlib.suppress(OSError, poplib.error_proto):  # closing only: the result is already known
            pop.quit()


def check_smtp(host, port, mailbox, access_token, ca_file=None, timeout=30):
    def open_smtp():
        smtp = smtplib.SMTP(host, port, timeout=timeout)
        smtp.starttls(context=_tls_context(ca_file))
        return smtp

    smtp = _connect("SMTP", host, port, open_smtp)
    try:
        smtp_authenticate(smtp, mailbox, access_token)
    finally:
        with contextlib.suppress(OSError, smtplib.SMTPException):  # closing only: the result is already known
            smtp.quit()
