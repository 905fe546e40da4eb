"""Exchange Online's IMAP face in front of Dovecot (sandbox/CONFORMANCE.md, IMAP-01 to IMAP-15).

Dovecot stores and serves the mail; it cannot answer the way Exchange does. This front listens on the
public IMAPS port, speaks Exchange's greeting and CAPABILITY lines, answers AUTHENTICATE itself (the
same decision as every sandbox mail login, `mailauth.check_mail_login`), then logs in to Dovecot on an
internal loopback port with a master login and relays each command, rewriting what Exchange says
differently:

- a refusal after a good login comes on the NEXT command: `BAD User is authenticated but not
  connected.`, and on the command after that the same BAD then `* BYE Connection closed. 14`
  (IMAP-08); throttling as `BAD Request is throttled. ...` + BYE (IMAP-09), or `NO Request is
  throttled. ...` on FETCH (or STORE) with the session left open (IMAP-10);
- client-defined keywords in STORE and in SEARCH's KEYWORD/UNKEYWORD are refused with `BAD Command
  Argument Error. 11` (IMAP-12); SELECT's FLAGS and PERMANENTFLAGS name the system flags and
  `$MDNSent` only (IMAP-11);
- completions read `<tag> OK <COMMAND> completed.`, LOGOUT says Exchange's BYE (IMAP-15).

Commands are read whole, literals included (a synchronizing literal is acknowledged here, and sent on
to Dovecot as a LITERAL+ one), so one client command is one Dovecot command.
"""

import logging
import re
import secrets
import ssl

from .front import Front, Hangup, Session, greeting, sasl_credentials

_logger = logging.getLogger(__name__)

GREETING = greeting("* OK The Microsoft Exchange IMAP4 service is ready.")
CAPABILITY_BEFORE_LOGIN = (
    "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+"
)
CAPABILITY_AFTER_LOGIN = (
    "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CLIENTACCESSRULES "
    "CLIENTNETWORKPRESENCELOCATION BACKENDAUTHENTICATE CHILDREN IDLE NAMESPACE LITERAL+"
)
SYSTEM_FLAGS = "\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent"
ARGUMENT_ERROR = "BAD Command Argument Error. 11"
CLOSED = "* BYE Connection closed. 14"
SIGNING_OFF = "* BYE Microsoft Exchange Server IMAP4 server signing off."
THROTTLED = "Request is throttled. Suggested Backoff Time: {backoff_ms} milliseconds"

LINE_LIMIT = 65536  # XOAUTH2 lines carry 1.5-3 KB tokens
LITERAL_LIMIT = 64 * 1024 * 1024

_LITERAL = re.compile(rb"\{(\d+)(\+?)\}\r\n$")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_NEEDS_AUTH = {
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB", "STATUS",
    "APPEND", "CHECK", "CLOSE", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID", "NAMESPACE",
    "IDLE", "UNSELECT", "GETQUOTAROOT", "GETQUOTA", "XLIST", "ENABLE",
}  # fmt: skip


class Command:
    """One client command: its text lines and literals, in order."""

    def __init__(self, parts):
        self.parts = parts  # [(is_literal, bytes)]
        text = " ".join(
            "{literal}" if is_literal else data.decode("utf-8", "replace").rstrip("\r\n") for is_literal, data in parts
        )
        words = text.split(" ", 2)
        self.tag = words[0]
        self.name = words[1].upper() if len(words) > 1 else ""
        self.arguments = words[2] if len(words) > 2 else ""
        self.uid = self.name == "UID"
        if self.uid:
            words = self.arguments.split(" ", 1)
            self.name = "UID " + words[0].upper()
            self.arguments = words[1] if len(words) > 1 else ""
        self.verb = self.name.removeprefix("UID ")

    def words(self):
        """The arguments' atoms, upper-cased, without quoted strings and literals."""
        return [w for w in re.split(r"[\s()]+", _QUOTED.sub(" ", self.arguments)) if w]

    def for_dovecot(self, tag=None):
        """The same command, literals made non-synchronizing (Dovecot announces LITERAL+)."""
        out = []
        for index, (is_literal, data) in enumerate(self.parts):
            if not is_literal:
                data = _LITERAL.sub(rb"{\1+}\r\n", data)
                if index == 0 and tag:
                    data = tag.encode() + data[len(self.tag.encode()) :]
            out.append(data)
        return b"".join(out)


def _read_command(rfile, wfile):
    parts = []
    while True:
        line = rfile.readline(LINE_LIMIT + 1)
        if not line:
            raise Hangup("client closed")
        if len(line) > LINE_LIMIT or not line.endswith(b"\n"):
            raise Hangup("line too long")
        if not line.endswith(b"\r\n"):
            line = line[:-1] + b"\r\n"
        parts.append((False, line))
        match = _LITERAL.search(line)
        if not match:
            return Command(parts)
        size = int(match[1])
        if size > LITERAL_LIMIT:
            raise Hangup("literal too large")
        if not match[2]:
            wfile.write(b"+ Ready for additional command text.\r\n")
            wfile.flush()
        data = rfile.read(size)
        if len(data) < size:
            raise Hangup("client closed")
        parts.append((True, data))


def _read_response(rfile):
    """One response from Dovecot, with any literals it carries: (first line, whole bytes)."""
    chunks = []
    while True:
        line = rfile.readline(LITERAL_LIMIT)
        if not line:
            raise Hangup("Dovecot closed the connection")
        chunks.append(line)
        match = _LITERAL.search(line)
        if not match:
            return chunks[0], b"".join(chunks)
        chunks.append(rfile.read(int(match[1])))


def _keyword_in_flags(arguments):
    """STORE's flag list names something Exchange does not keep (a client-defined keyword)."""
    match = re.search(r"[+-]?FLAGS(?:\.SILENT)?\s+\(?([^)]*)\)?", arguments, re.I)
    flags = match[1].split() if match else []
    return any(not flag.startswith("\\") and flag.upper() != "$MDNSENT" for flag in flags)


def _keyword_in_search(words):
    for index, word in enumerate(words[:-1]):
        if word.upper() in ("KEYWORD", "UNKEYWORD") and words[index + 1].upper() != "$MDNSENT":
            return True
    return False


class _Session(Session):
    def setup(self):
        super().setup()
        self.dovecot_w = None
        self.login = None  # the MailLogin of an accepted AUTHENTICATE / LOGIN
        self.refusals = 0

    def handle(self):
        try:
            self.send(GREETING)
            while True:
                command = _read_command(self.rfile, self.wfile)
                if not command.name:
                    self.send(f"{command.tag} BAD Command Error. 10")
                    continue
                self.before_command(command.verb)
                if self.login is None:
                    self.before_login(command)
                elif self.login.session_refusal:
                    self.refuse_session(command)
                else:
                    self.after_login(command)
        except (Hangup, OSError, ssl.SSLError) as exc:
            _logger.debug("imap front: session ends: %s", exc)

    # not authenticated ------------------------------------------------------------------------

    def before_login(self, command):
        tag, name = command.tag, command.name
        if name == "CAPABILITY":
            self.send(f"* CAPABILITY {CAPABILITY_BEFORE_LOGIN}", f"{tag} OK CAPABILITY completed.")
        elif name == "NOOP":
            self.send(f"{tag} OK NOOP completed.")
        elif name == "ID":
            self.send("* ID NIL", f"{tag} OK ID completed.")
        elif name == "LOGOUT":
            self.send(SIGNING_OFF, f"{tag} OK LOGOUT completed.")
            raise Hangup("logout")
        elif name == "AUTHENTICATE":
            self.authenticate(command)
        elif name == "LOGIN":
            self.password_login(command)
        elif name in _NEEDS_AUTH:
            self.send(f"{tag} BAD Command received in Invalid state.")
        else:
            self.send(f"{tag} BAD Command Error. 10")

    def authenticate(self, command):
        words = command.arguments.split()
        mechanism = words[0].upper() if words else ""
        if mechanism not in ("XOAUTH2", "PLAIN"):
            self.send(f"{command.tag} NO AUTHENTICATE failed.")
            return
        if len(words) > 1:  # SASL-IR
            response = words[1]
        else:
            self.send("+ ")
            line = self.rfile.readline(LINE_LIMIT + 1)
            if not line:
                raise Hangup("client closed")
            response = line.decode("ascii", "replace").strip()
        if response == "*":  # the client cancels
            self.send(f"{command.tag} BAD AUTHENTICATE cancelled.")
            return
        credentials = sasl_credentials(mechanism, response)
        if credentials is None:
            self.send(f"{command.tag} NO AUTHENTICATE failed.")
            return
        user, secret, kind = credentials
        self.logged_in(command, self.front.check_login(user, "imap", secret, kind), "AUTHENTICATE")

    def password_login(self, command):
        words = [
            re.sub(r"\\(.)", r"\1", word[1:-1]) if word.startswith('"') else word
            for word in re.findall(r'"(?:[^"\\]|\\.)*"|\S+', command.arguments)
        ]
        if len(words) != 2:
            self.send(f"{command.tag} BAD Command Argument Error. 11")
            return
        self.logged_in(command, self.front.check_login(words[0], "imap", words[1], "password"), "LOGIN")

    def logged_in(self, command, login, verb):
        if not login.ok and not login.session_refusal:
            _logger.info("sandbox imap login refused for %s: %s", login.mailbox, login.reason)
            self.send(f"{command.tag} NO {verb} failed.")
            return
        if login.ok:
            try:
                self.dovecot, self.dovecot_r = self.front.open_dovecot(login.mailbox)
                self.dovecot_w = self.dovecot.makefile("wb")
                self.opened(login.mailbox)
            except (OSError, Hangup) as exc:
                _logger.warning("imap front: Dovecot refused the session of %s: %s", login.mailbox, exc)
                self.send(f"{command.tag} NO {verb} failed.")
                return
        else:
            _logger.info("sandbox imap session refused for %s: %s", login.mailbox, login.reason)
        self.login = login
        self.send(f"{command.tag} OK {verb} completed.")

    # authenticated, but Exchange refuses the session -------------------------------------------

    def refuse_session(self, command):
        if command.name == "LOGOUT":  # assumed: Exchange lets a refused session say goodbye
            self.send(SIGNING_OFF, f"{command.tag} OK LOGOUT completed.")
            raise Hangup("logout")
        refusal = self.login.session_refusal
        self.refusals += 1
        if refusal.startswith("Request is throttled") or self.refusals > 1:
            self.send(f"{command.tag} BAD {refusal}", CLOSED)
            raise Hangup("refused")
        self.send(f"{command.tag} BAD {refusal}")

    # authenticated: relayed to Dovecot ---------------------------------------------------------

    def after_login(self, command):
        tag, name = command.tag, command.name
        if name == "CAPABILITY":
            self.send(f"* CAPABILITY {CAPABILITY_AFTER_LOGIN}", f"{tag} OK CAPABILITY completed.")
            return
        if name in ("AUTHENTICATE", "LOGIN"):
            self.send(f"{tag} BAD Command received in Invalid state.")
            return
        if command.verb == "STORE" and _keyword_in_flags(command.arguments):
            self.send(f"{tag} {ARGUMENT_ERROR}")
            return
        if command.verb == "SEARCH" and _keyword_in_search(command.words()):
            self.send(f"{tag} {ARGUMENT_ERROR}")
            return
        if command.verb in ("FETCH", "STORE"):
            backoff_ms = self.front.take_throttle(self.login.mailbox, command.verb.lower())
            if backoff_ms is not None:
                self.send(f"{tag} NO {THROTTLED.format(backoff_ms=backoff_ms)}")
                return
        self.relay(command)
        if name == "LOGOUT":
            raise Hangup("logout")

    def relay(self, command):
        backend_tag = "F" + secrets.token_hex(4)
        dovecot_w, dovecot_r = self.dovecot_w, self.dovecot_r
        dovecot_w.write(command.for_dovecot(backend_tag))
        dovecot_w.flush()
        while True:
            first, whole = _read_response(dovecot_r)
            if first.startswith(backend_tag.encode() + b" "):
                self.send(self.completion(command, first[len(backend_tag) + 1 :].decode("utf-8", "replace").rstrip()))
                return
            if first.startswith(b"+") and command.name == "IDLE":
                self.send(first.rstrip(b"\r\n"))
                done = self.rfile.readline(LINE_LIMIT + 1)  # DONE; what Dovecot saw meanwhile follows it
                if not done:
                    raise Hangup("client closed")
                dovecot_w.write(done.rstrip(b"\r\n") + b"\r\n")
                dovecot_w.flush()
                continue
            self.wfile.write(self.untagged(command, first, whole))

    @staticmethod
    def completion(command, status_text):
        status, _, text = status_text.partition(" ")
        if status != "OK":
            return f"{command.tag} {status_text}"
        code = re.match(r"(\[[^\]]*\])", text)
        code = f"{code[1]} " if code and not code[1].startswith("[CAPABILITY") else ""
        return f"{command.tag} OK {code}{command.verb} completed."

    @staticmethod
    def untagged(command, first, whole):
        line = first.rstrip(b"\r\n")
        if line.startswith((b"* FLAGS ", b"* OK [PERMANENTFLAGS ")) and command.verb not in ("SELECT", "EXAMINE"):
            return b""  # Dovecot announces keywords it learnt; Exchange's flags never change
        if line.startswith(b"* FLAGS "):
            return f"* FLAGS ({SYSTEM_FLAGS})\r\n".encode()
        if line.startswith(b"* OK [PERMANENTFLAGS "):
            return f"* OK [PERMANENTFLAGS ({SYSTEM_FLAGS})] Permanent flags\r\n".encode()
        match = re.match(rb"\* OK \[(UIDVALIDITY|UIDNEXT) (\d+)\]", line)
        if match:
            text = b"UIDVALIDITY value" if match[1] == b"UIDVALIDITY" else b"The next unique identifier value"
            return b"* OK [" + match[1] + b" " + match[2] + b"] " + text + b"\r\n"
        if line.startswith(b"* BYE"):
            return SIGNING_OFF.encode() + b"\r\n"
        return whole


class ImapFront(Front):
    """The public IMAPS listener. `check_login(user, protocol, secret, mechanism)` is the sandbox's
    login decision; `take_throttle(mailbox, where)` returns a back-off in ms when the control
    interface throttles that mailbox at that place ("fetch", "store"), else None."""

    protocol = "imap"
    session = _Session

    def __init__(self, host, port, tls, dovecot_port, check_login, take_throttle):
        self.host, self.port, self.dovecot_port = host, port, dovecot_port
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(tls.server_cert, tls.server_key)
        self.check_login, self.take_throttle = check_login, take_throttle
        self.master_password = secrets.token_urlsafe(24)

    def dovecot_login(self, connection, reader, user):
        connection.sendall(f'L LOGIN "{user}" "{self.master_password}"\r\n'.encode())
        while True:
            line = reader.readline()
            if not line:
                raise Hangup("Dovecot closed the connection")
            if line.startswith(b"L "):
                if not line.startswith(b"L OK"):
                    raise Hangup(line.decode(errors="replace").strip())
                return
