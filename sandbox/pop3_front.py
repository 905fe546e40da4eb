"""Exchange Online's POP3 face in front of Dovecot (sandbox/CONFORMANCE.md, POP-01 to POP-07).

Like the IMAP front: it listens on the public POP3S port, speaks Exchange's greeting, CAPA and AUTH
replies, decides the login itself (`mailauth.check_mail_login`), then logs in to Dovecot on an internal
loopback port as the master user and relays each command and its (single- or multi-line) answer.
"""

import logging
import ssl

from .front import Front, Hangup, Session, greeting, sasl_credentials

_logger = logging.getLogger(__name__)

GREETING = greeting("+OK The Microsoft Exchange POP3 service is ready.")
CAPA = ("+OK", "TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER", ".")
AUTHENTICATED = "+OK User successfully authenticated."
REFUSED = "-ERR Authentication failure: unknown user name or bad password."
PROTOCOL_ERROR = "-ERR Protocol error. Connection is closed. 10"
SIGNING_OFF = "+OK Microsoft Exchange Server POP3 server signing off."  # assumed
# Exchange refuses an AUTH line over 4,096 characters (MailKit#1948; the wording is assumed).
LINE_LIMIT = 4096
_MULTILINE = {"RETR", "TOP", "CAPA"}  # LIST and UIDL too, without an argument


class _Session(Session):
    def setup(self):
        super().setup()
        self.user = None  # USER given, PASS awaited

    def line(self):
        line = self.rfile.readline(64 * 1024)
        if not line:
            raise Hangup("client closed")
        return line.rstrip(b"\r\n").decode("utf-8", "replace")

    def handle(self):
        try:
            self.send(GREETING)
            while True:
                text = self.line()
                if len(text) > LINE_LIMIT:
                    self.send(PROTOCOL_ERROR)
                    raise Hangup("line too long")
                self.before_command(text.partition(" ")[0])
                if self.dovecot:
                    self.relay(text)
                else:
                    self.before_login(text)
        except (Hangup, OSError, ssl.SSLError) as exc:
            _logger.debug("pop3 front: session ends: %s", exc)

    def before_login(self, text):
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if verb == "CAPA":
            self.send(*CAPA)
        elif verb == "QUIT":
            self.send(SIGNING_OFF)
            raise Hangup("quit")
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
            raise Hangup("initial response")
        self.send("+ ")
        response = self.line()
        if len(response) > LINE_LIMIT:
            self.send(PROTOCOL_ERROR)
            raise Hangup("line too long")
        if response == "*":
            self.send("-ERR Authentication cancelled.")
            return
        credentials = sasl_credentials(mechanism, response)
        if credentials is None:
            self.send(REFUSED)
            return
        user, secret, kind = credentials
        self.logged_in(self.front.check_login(user, "pop3", secret, kind))

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
            self.opened(login.mailbox)
        except (OSError, Hangup) as exc:
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
            raise Hangup("Dovecot closed the connection")
        if verb == "QUIT":
            self.send(SIGNING_OFF)
            raise Hangup("quit")
        self.front.wait_round_trip()
        self.wfile.write(first)
        multiline = verb in _MULTILINE or (verb in ("LIST", "UIDL") and not argument.strip())
        if first.startswith(b"+OK") and multiline:
            while True:
                line = self.dovecot_r.readline()
                if not line:
                    raise Hangup("Dovecot closed the connection")
                self.wfile.write(line)
                if line == b".\r\n":
                    break
        self.wfile.flush()


class Pop3Front(Front):
    """The public POP3S listener; `check_login` is the sandbox's login decision."""

    protocol = "pop3"
    session = _Session

    def __init__(self, host, port, tls_context, dovecot_port, check_login, master_password):
        self.host, self.port, self.dovecot_port = host, port, dovecot_port
        self.tls, self.check_login, self.master_password = tls_context, check_login, master_password

    def dovecot_login(self, connection, reader, user):
        for command in (f"USER {user}", f"PASS {self.master_password}"):
            connection.sendall(command.encode() + b"\r\n")
            reply = reader.readline()
            if not reply.startswith(b"+OK"):
                raise Hangup(reply.decode(errors="replace").strip())
