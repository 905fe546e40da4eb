"""What the Exchange fronts (imap_front.py, pop3_front.py) share: the threaded listener, the TLS
session set-up, the SASL decoding and the opening of a Dovecot session as the master user. Each
protocol's words and state machine stay in its own file."""

import base64
import socket
import socketserver
import threading
import time
from binascii import Error as BinasciiError

SERVER_NAME = "SANDBOX.PROD.OUTLOOK.COM"
MASTER_USER = "exchange-front"
IDLE_TIMEOUT = 1800  # seconds without a command before the front hangs up (Exchange: 30 minutes)


class Hangup(Exception):
    """The client went away, or the front closes the session."""


def greeting(text):
    """Exchange's greeting: `text`, then the base64 of the UTF-16LE server name in brackets."""
    return f"{text} [{base64.b64encode(SERVER_NAME.encode('utf-16-le')).decode()}]"


def sasl_credentials(mechanism, response):
    """The (user, secret, kind) of an XOAUTH2 or PLAIN response, kind as `check_login` takes it;
    None when the response is not base64 of UTF-8."""
    try:
        decoded = base64.b64decode(response, validate=True).decode()
    except (BinasciiError, ValueError, UnicodeDecodeError):
        return None
    if mechanism == "XOAUTH2":
        fields = dict(part.split("=", 1) for part in decoded.split("\x01") if "=" in part)
        return fields.get("user", ""), fields.get("auth", "").removeprefix("Bearer "), "xoauth2"
    _authzid, user, secret = (decoded.split("\x00") + ["", ""])[:3]
    return user, secret, "password"


class Session(socketserver.StreamRequestHandler):
    """One client connection, TLS from the first byte; `dovecot`/`dovecot_r` once logged in."""

    front = None  # set on the subclass
    wbufsize = 65536  # replies are flushed whole (no Nagle delay between their lines)

    def setup(self):
        self.front.wait_round_trip()  # the connection's handshake crosses the network
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(IDLE_TIMEOUT)
        self.request = self.front.tls.wrap_socket(self.request, server_side=True)
        self.connection = self.request
        super().setup()
        self.dovecot = self.dovecot_r = None

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        if self.dovecot:
            self.dovecot.close()
        if self.session_mailbox:
            self.front.session_event(self.session_mailbox, self.front.protocol, False)
            self.session_mailbox = None

    session_mailbox = None  # set once logged in, for the sandbox's session counters

    def opened(self, mailbox):
        """The session is logged in to `mailbox` (counted until it closes)."""
        self.session_mailbox = mailbox
        self.front.session_event(mailbox, self.front.protocol, True)

    def before_command(self, verb=""):
        """Each command after login: a stalled mailbox (control `mail_stall`) hangs here."""
        if self.session_mailbox:
            self.front.wait_if_stalled(self.session_mailbox, verb)

    def send(self, *lines):
        self.front.wait_round_trip()  # the reply crosses the network
        self.wfile.write(b"".join((line.encode() if isinstance(line, str) else line) + b"\r\n" for line in lines))
        self.wfile.flush()


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False


class Front:
    """A public listener on `host:port` relaying to Dovecot on `host:dovecot_port`. A subclass sets
    `protocol` ("imap", "pop3"), `session` (its Session subclass) and `dovecot_login`."""

    protocol = ""
    session = Session
    _server = None
    # Set by MailServers: the round-trip time to add (seconds, a callable), the stall and session hooks.
    latency = staticmethod(lambda: 0)
    wait_if_stalled = staticmethod(lambda mailbox, verb="": None)
    session_event = staticmethod(lambda mailbox, protocol, opened: None)

    def wait_round_trip(self):
        seconds = self.latency()
        if seconds:
            time.sleep(seconds)

    def start(self):
        handler = type(f"{self.protocol.capitalize()}Session", (self.session,), {"front": self})
        self._server = Server((self.host, self.port), handler)
        threading.Thread(target=self._server.serve_forever, name=f"sandbox-{self.protocol}-front", daemon=True).start()
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def open_dovecot(self, mailbox):
        """A Dovecot session on `mailbox`, logged in as the front's master user: (socket, reader)."""
        connection = socket.create_connection((self.host, self.dovecot_port), timeout=30)
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.settimeout(IDLE_TIMEOUT)
            reader = connection.makefile("rb")
            reader.readline()  # greeting
            self.dovecot_login(connection, reader, f"{mailbox}*{MASTER_USER}")
            return connection, reader
        except BaseException:
            connection.close()
            raise

    def dovecot_login(self, connection, reader, user):
        """Logs `user` in with the master password; raises Hangup when Dovecot refuses."""
        raise NotImplementedError
