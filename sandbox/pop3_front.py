"""Exchange Online's POP3 face in front of Dovecot (sandbox/CONFORMANCE.md, POP-01 to POP-07).

Like the IMAP front: it listens on the public POP3S port, speaks Exchange's greeting, CAPA and AUTH
replies, decides the login itself (`mailauth.check_mail_login`), then logs in to Dovecot on an internal
loopback port as the master user and relays each command and its (single- or multi-line) answer.
"""

import base64
import logging
import socket
import socketserver
import ssl
import threading
from binascii import Error as BinasciiError

from .imap_front import IDLE_TIMEOUT, MASTER_USER, SERVER_NAME, _Hangup, _Server

_logger = logging.getLogger(__name__)

GREETING = (
    "+OK The Microsoft Exchange POP3 service is ready. ["
    + base64.b64encode(SERVER_NAME.encode("utf-16-le")).decode()
    + "]"
)
CAPA = ("+OK", "TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER", ".")
AUTHENTICATED = "+OK User successfully authenticated."
REFUSED = "-ERR Authentication failure: unknown user name or bad password."
PROTOCOL_ERROR = "-ERR Protocol error. Connection is closed. 10"
SIGNING_OFF = "+OK Microsoft Exchange Server POP3 server signing off."  # assumed
# Exchange refuses an AUTH line over 4,096 characters (MailKit#1948; the wording is assumed).
LINE_LIMIT = 4096
_MULTILINE = {"RETR", "TOP", "CAPA"}  # LIST and UIDL too, without an argument


class _Session(socketserver.StreamRequestHandler):
    front = None  # set on the subclass
    wbufsize = 65536

    def setup(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(IDLE_TIMEOUT)
        self.request = self.front.tls.wrap_socket(self.request, server_side=True)
        self.connection = self.request
        super().setup()
        self.dovecot = self.dovecot_r = None
        self.user = None  # USER given, PASS awaited

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        if self.dovecot:
            self.dovecot.close()

    def send(self, *lines):
        self.wfile.write(b"".join(line.encode() + b"\r\n" for line in lines))
        self.wfile.flush()

    def line(self):
        line = self.rfile.readline(64 * 1024)
        if not line:
            raise _Hangup("client closed")
        return line.rstrip(b"\r\n").decode("utf-8", "replace")

    def handle(self):
        try:
            self.send(GREETING)
            while True:
                text = self.line()
                if len(text) > LINE_LIMIT:
                    self.send(PROTOCOL_ERROR)
                    raise _Hangup("line too long")
                if self.dovecot:
                    self.relay(text)
                else:
                    self.before_login(text)
        except (_Hangup, OSError, ssl.SSLError) as exc:
            _logger.debug("pop3 front: session ends: %s", exc)

    def before_login(self, text):
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if verb == "CAPA":
            self.send(*CAPA)
        elif verb == "QUIT":
            self.send(SIGNING_OFF)
            raise _Hangup("quit")
        elif verb == "NOOP":
            self.send("+OK")
        elif verb == "AUTH":
            self.authenticate(argument.split())
        elif verb == "USER" and argument:
            self.user = argument
            self.send("+OK")
        elif verb == "PASS" and self.user:
            user, self.user = self.user, None
            self.logged_in(self.front.check_login(user, "pop3", argument, "password"))
        else:
            self.send("-ERR Command is not valid in this state.")

    def authenticate(self, words):
        mechanism = words[0].upper() if words else ""
        if mechanism not in ("XOAUTH2", "PLAIN"):
            self.send("-ERR Unrecognized authentication type.")
            return
        if len(words) > 1:  # Exchange's POP3 takes no initial response (POP-04)
            self.send(PROTOCOL_ERROR)
            raise _Hangup("initial response")
        self.send("+ ")
        response = self.line()
        if len(response) > LINE_LIMIT:
            self.send(PROTOCOL_ERROR)
            raise _Hangup("line too long")
        if response == "*":
            self.send("-ERR Authentication cancelled.")
            return
        try:
            decoded = base64.b64decode(response, validate=True).decode()
        except (BinasciiError, ValueError, UnicodeDecodeError):
            self.send(REFUSED)
            return
        if mechanism == "XOAUTH2":
            fields = dict(part.split("=", 1) for part in decoded.split("\x01") if "=" in part)
            user, secret = fields.get("user", ""), fields.get("auth", "").removeprefix("Bearer ")
            self.logged_in(self.front.check_login(user, "pop3", secret, "xoauth2"))
        else:
            _authzid, user, secret = (decoded.split("\x00") + ["", ""])[:3]
            self.logged_in(self.front.check_login(user, "pop3", secret, "password"))

    def logged_in(self, login):
        if login.session_refusal:  # assumed (POP-07): refused at once, with Exchange's words
            _logger.info("sandbox pop3 session refused for %s: %s", login.mailbox, login.reason)
            self.send(f"-ERR {login.session_refusal}")
            return
        if not login.ok:
            _logger.info("sandbox pop3 login refused for %s: %s", login.mailbox, login.reason)
            self.send(REFUSED)
            return
        try:
            self.dovecot, self.dovecot_r = self.front.open_dovecot(login.mailbox)
        except (OSError, _Hangup) as exc:
            _logger.warning("pop3 front: Dovecot refused the session of %s: %s", login.mailbox, exc)
            self.send(REFUSED)
            return
        self.send(AUTHENTICATED)

    def relay(self, text):
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if verb == "CAPA":
            self.send(*CAPA)
            return
        self.dovecot.sendall(text.encode() + b"\r\n")
        first = self.dovecot_r.readline()
        if not first:
            raise _Hangup("Dovecot closed the connection")
        if verb == "QUIT":
            self.send(SIGNING_OFF)
            raise _Hangup("quit")
        self.wfile.write(first)
        multiline = verb in _MULTILINE or (verb in ("LIST", "UIDL") and not argument.strip())
        if first.startswith(b"+OK") and multiline:
            while True:
                line = self.dovecot_r.readline()
                if not line:
                    raise _Hangup("Dovecot closed the connection")
                self.wfile.write(line)
                if line == b".\r\n":
                    break
        self.wfile.flush()


class Pop3Front:
    """The public POP3S listener; `check_login` is the sandbox's login decision."""

    def __init__(self, host, port, tls_context, dovecot_port, check_login, master_password):
        self.host, self.port, self.dovecot_port = host, port, dovecot_port
        self.tls, self.check_login, self.master_password = tls_context, check_login, master_password
        self._server = None

    def start(self):
        handler = type("Pop3Session", (_Session,), {"front": self})
        self._server = _Server((self.host, self.port), handler)
        threading.Thread(target=self._server.serve_forever, name="sandbox-pop3-front", daemon=True).start()
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def open_dovecot(self, mailbox):
        """A Dovecot POP3 session on `mailbox`, logged in as the master user: (socket, reader)."""
        connection = socket.create_connection((self.host, self.dovecot_port), timeout=30)
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.settimeout(IDLE_TIMEOUT)
            reader = connection.makefile("rb")
            reader.readline()  # greeting
            for command in (f"USER {mailbox}*{MASTER_USER}", f"PASS {self.master_password}"):
                connection.sendall(command.encode() + b"\r\n")
                reply = reader.readline()
                if not reply.startswith(b"+OK"):
                    raise _Hangup(reply.decode(errors="replace").strip())
            return connection, reader
        except BaseException:
            connection.close()
            raise
