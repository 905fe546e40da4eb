"""Microsoft Graph's mail endpoints on loopback, on the SAME mailboxes as the sandbox's IMAP and SMTP.

Mail lives in Dovecot's maildirs: this server reads and writes it through Dovecot's internal IMAP
port with the fronts' master login, and delivers what `sendMail` sends through the same LMTP as the
SMTP server. So a message sent through Graph is read over IMAP and the other way round.

What is played, each with its source in sandbox/CONFORMANCE.md (section "Microsoft Graph mail"):

- `POST /v1.0/{users/<mailbox>|me}/sendMail` with a base64 MIME body (`Content-Type: text/plain`) ->
  202; the message is delivered, and saved in the sender's Sent Items; custom `X-` headers (and
  `Auto-Submitted`) dropped unless the setting `graph_keep_custom_headers` says otherwise (GRAPH-06);
- `GET .../mailFolders[/<id or well-known name>[/childFolders]]`,
  `GET .../mailFolders/<folder>/messages[?$filter=...&$orderby=receivedDateTime&$top=&$skip=]` (GRAPH-16),
  `GET .../messages/<id>[/$value]`, `PATCH .../messages/<id>` (isRead),
  `POST .../messages/<id>/move` (a new id, as Outlook gives one on move),
  `GET .../mailFolders/<folder>/messages/delta` (added, read-changed and removed messages since the
  delta token, sync states in a bounded cache: GRAPH-13, GRAPH-17), `$value` refused for opaque S/MIME
  (GRAPH-18); every connection and answer delayed by the setting `latency_ms` (NET-01);
- tokens: Graph's audience only, `scp` (delegated) or `roles` (app-only); RBAC for Applications as
  a per-app list of mailboxes (`graph_app_scope`); Graph's error bodies
  `{"error": {"code", "message", "innerError"}}`, 429 / 503 with Retry-After, 4 concurrent requests
  per app and mailbox.
"""

import base64
import binascii
import datetime
import email
import email.message
import email.policy
import email.utils
import imaplib
import json
import logging
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .front import MASTER_USER
from .service import https_server, serve, shut

_logger = logging.getLogger(__name__)

GRAPH_AUDIENCES = ("https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000")
WELL_KNOWN = {
    "inbox": "INBOX",
    "sentitems": "Sent Items",
    "deleteditems": "Deleted Items",
    "drafts": "Drafts",
    "archive": "Archive",
    "junkemail": "Junk Email",
}
SENDMAIL_LIMIT = 4 * 1024 * 1024  # bytes of request body (GRAPH-08)
DROPPED_HEADERS = ("auto-submitted",)  # besides X- headers (GRAPH-06)
MESSAGES = {
    "ErrorAccessDenied": "Access is denied. Check credentials and try again.",
    "RBAC": "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.",
    "MailboxNotEnabledForRESTAPI": "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
    "ErrorInvalidUser": "The requested user '{mailbox}' is invalid.",
    "ErrorInvalidRecipients": "At least one recipient isn't valid., A message can't be sent because it contains "
    "no recipients.",
    "ErrorSendAsDenied": "The user account which was used to submit this request does not have the right to send "
    "mail on behalf of the specified sending account., Cannot submit message.",
    "InvalidAuthenticationToken": "Access token validation failure. Invalid audience.",
    "InvalidAuthenticationToken_expired": "Lifetime validation failed, the token is expired.",
    "InvalidAuthenticationToken_missing": "Access token is empty.",
    "ErrorMessageSizeExceeded": "The message exceeds the maximum supported size., Cannot save changes made to an "
    "item to store.",
    "RequestBodyTooLarge": "The maximum request length supported is 4MB.",
    "ApplicationThrottled": "Application is over its MailboxConcurrency limit.",
    "ErrorTooManyObjectsOpened": "Too many requests; try again later.",
    "ServiceUnavailable": "The service is temporarily unavailable. Please try again later.",
    "ErrorItemNotFound": "The specified object was not found in the store.",
    "ErrorInvalidIdMalformed": "Id is malformed.",
    "ErrorInvalidMimeContent": "Invalid base64 string for MIME content.",
    "BadRequest": "Unsupported request.",
    "InefficientFilter": "The restriction or sort order is too complex for this operation.",
    "SyncStateNotFound": "The sync state generation is not found.",
    "ErrorMimeContentConversionFailed": "MIME content conversion failed.",
}


class GraphError(Exception):
    def __init__(self, status, code, message=None, headers=None, **params):
        self.status, self.code, self.headers = status, code, headers or {}
        self.message = message or MESSAGES.get(code, code).format(**params)
        super().__init__(f"{status} {code}: {self.message}")

    def body(self, request_id):
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "innerError": {
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                    "request-id": request_id,
                    "client-request-id": request_id,
                },
            }
        }


def _b64url(text):
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def folder_id(name):
    return "AQMk" + _b64url(name)


def message_id(folder, validity, uid):
    return "AAMk" + _b64url(f"{folder}\x00{validity}\x00{uid}")


def parse_message_id(value):
    try:
        folder, validity, uid = _unb64url(value.removeprefix("AAMk")).split("\x00")
        return folder, int(validity), int(uid)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise GraphError(400, "ErrorInvalidIdMalformed") from None


class Store:
    """Dovecot through its internal IMAP port, as the mailbox itself (master login)."""

    def __init__(self, host, port, master_password):
        self.host, self.port, self.master_password = host, port, master_password

    def session(self, mailbox):
        imap = imaplib.IMAP4(self.host, self.port, timeout=30)
        imap.login(f"{mailbox}*{MASTER_USER}", self.master_password)
        return imap

    @staticmethod
    def _quote(name):
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def folders(self, imap, parent=None):
        pattern = f"{parent}.%" if parent else "%"
        typ, data = imap.list('""', self._quote(pattern))
        names = []
        for line in data or []:
            if not isinstance(line, bytes):
                continue
            match = re.match(rb'\((?P<flags>[^)]*)\) (?P<sep>"[^"]*"|NIL) (?P<name>.+)$', line)
            if match:
                name = match["name"].decode()
                names.append(name[1:-1].replace('\\"', '"') if name.startswith('"') else name)
        return names

    def ensure_folder(self, imap, name):
        if name != "INBOX" and name not in self.folders(imap):
            imap.create(self._quote(name))

    def select(self, imap, folder, readonly=False):
        typ, data = imap.select(self._quote(folder), readonly=readonly)
        if typ != "OK":
            raise GraphError(404, "ErrorItemNotFound")
        validity = imap.response("UIDVALIDITY")[1][0]
        return int(validity), int(data[0])

    def counts(self, imap, folder):
        typ, data = imap.status(self._quote(folder), "(MESSAGES UNSEEN)")
        found = re.search(rb"MESSAGES (\d+) UNSEEN (\d+)", data[0] or b"")
        return (int(found[1]), int(found[2])) if found else (0, 0)

    def dates(self, imap, uids, with_seen=False):
        """{uid: INTERNALDATE (aware UTC)} of the selected folder's `uids` (and {uid: seen} with_seen)."""
        dates, seen = {}, {}
        if uids:
            typ, data = imap.uid("FETCH", ",".join(str(u) for u in uids), "(UID FLAGS INTERNALDATE)")
            for part in data:
                meta = (part[0] if isinstance(part, tuple) else part or b"").decode(errors="replace")
                uid = re.search(r"UID (\d+)", meta)
                when = re.search(r'INTERNALDATE "([^"]+)"', meta)
                if uid and when:
                    moment = datetime.datetime.strptime(when[1], "%d-%b-%Y %H:%M:%S %z")
                    dates[int(uid[1])] = moment.astimezone(datetime.timezone.utc)
                    flags = re.search(r"FLAGS \(([^)]*)\)", meta)
                    seen[int(uid[1])] = bool(flags and "\\Seen" in flags[1])
        return (dates, seen) if with_seen else dates

    def summaries(self, imap, folder, validity, uids):
        """Graph message resources of `uids` in the selected folder."""
        if not uids:
            return []
        typ, data = imap.uid(
            "FETCH",
            ",".join(str(u) for u in uids),
            "(UID FLAGS RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT FROM DATE)])",
        )
        found = {}
        for part in data:
            if not isinstance(part, tuple):
                continue
            meta, header = part[0].decode(errors="replace"), part[1]
            uid = int(re.search(r"UID (\d+)", meta)[1])
            flags = re.search(r"FLAGS \(([^)]*)\)", meta)
            parsed = email.message_from_bytes(header, policy=email.policy.default)
            sender_name, sender = email.utils.parseaddr(str(parsed.get("From", "")))
            found[uid] = {
                "id": message_id(folder, validity, uid),
                "internetMessageId": str(parsed.get("Message-ID", "")).strip(),
                "subject": str(parsed.get("Subject", "")),
                "isRead": bool(flags and "\\Seen" in flags[1]),
                "from": {"emailAddress": {"name": sender_name or sender, "address": sender}},
                "receivedDateTime": _received(meta),
                "parentFolderId": folder_id(folder),
            }
        return [found[u] for u in uids if u in found]


def _received(meta):
    match = re.search(r'INTERNALDATE "([^"]+)"', meta)
    if not match:
        return None
    moment = datetime.datetime.strptime(match[1], "%d-%b-%Y %H:%M:%S %z")
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class GraphServer:
    def __init__(self, directory, tls, host, port, mail):
        self.directory = directory
        self.mail = mail  # sandbox.mail.MailServers: deliver / store_outbound / Dovecot
        self.store = Store(host, mail.ports["imap_backend"], mail.master_password)
        handler = type("GraphHandler", (_Handler,), {"graph": self})
        self.httpd = https_server(handler, tls, host, port)
        self.port = self.httpd.server_address[1]
        self.base_url = f"https://{host}:{self.port}"
        self._in_flight = {}
        self._lock = threading.Lock()
        self._holds = 0  # requests still to be held in flight (graph_fault kind "hold")
        self._released = threading.Event()
        self._uploads = {}  # upload session token -> what is uploaded so far
        self._attachments = {}  # draft id -> [(name, content type, bytes)] added to it
        self._delta_states = {}  # delta token -> sync state (oldest first: evicted first)
        self._delta_pages = {}  # skip token -> the rest of a delta round's pages

    def start(self):
        serve(self.httpd, "sandbox-graph")
        return self

    def stop(self):
        shut(self.httpd)

    # who may do what ---------------------------------------------------------------------------

    def caller(self, authorization):
        """The token's claims, or 401 InvalidAuthenticationToken as Graph answers it."""
        if not authorization or not authorization.startswith("Bearer "):
            raise GraphError(401, "InvalidAuthenticationToken", MESSAGES["InvalidAuthenticationToken_missing"])
        claims, problem = self.directory.verify_access_token(authorization.removeprefix("Bearer ").strip())
        if problem:
            text = (
                MESSAGES["InvalidAuthenticationToken_expired"]
                if "expired" in problem or "revoked" in problem
                else "IDX14100: JWT is not well formed."
            )
            raise GraphError(401, "InvalidAuthenticationToken", text)
        if claims.get("aud") not in GRAPH_AUDIENCES:
            raise GraphError(401, "InvalidAuthenticationToken")
        return claims

    def authorize(self, claims, mailbox, action):
        """`action` "read" or "send"; raises Graph's refusal. Returns the mailbox's address."""
        directory = self.directory
        if mailbox == "me":
            if "scp" not in claims:
                raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
            mailbox = claims.get("upn", "")
        mailbox = unquote(mailbox).lower()
        box = directory.mailbox(mailbox)
        if box is None:
            if directory.user(mailbox):  # a user without an Exchange Online mailbox
                raise GraphError(404, "MailboxNotEnabledForRESTAPI")
            raise GraphError(404, "ErrorInvalidUser", mailbox=mailbox)
        if not box.get("enabled", True):
            raise GraphError(404, "MailboxNotEnabledForRESTAPI")
        needed = {"read": "Mail.ReadWrite", "send": "Mail.Send"}[action]
        if "scp" in claims:
            upn = claims.get("upn", "").lower()
            granted = claims["scp"].split()
            if upn == mailbox:
                if needed not in granted:
                    raise GraphError(403, "ErrorAccessDenied")
                return mailbox
            if f"{needed}.Shared" not in granted:
                raise GraphError(403, "ErrorAccessDenied")
            # Reading needs Full Access; so does sending through /users/{the other mailbox}, "in addition to
            # either the Send on Behalf or Send As permission" (GRAPH-19), which _submit checks on the From.
            if not directory.has_full_access(upn, mailbox):
                raise GraphError(403, "ErrorAccessDenied")
            return mailbox
        app = claims.get("appid", "")
        if needed not in claims.get("roles", []):
            raise GraphError(403, "ErrorAccessDenied")
        scope = directory.data.get("graph_app_scopes", {}).get(app)
        if scope is not None and mailbox not in scope:
            raise GraphError(403, "ErrorAccessDenied", MESSAGES["RBAC"])
        return mailbox

    def enter(self, claims, mailbox):
        """Graph allows 4 concurrent requests per app and mailbox (GRAPH-10); a fault may stand in."""
        directory = self.directory
        with directory.lock:
            fault = directory.data.get("graph_fault_live")
            if fault and fault["remaining"] > 0 and fault["kind"] != "504":
                fault["remaining"] -= 1
                directory.count(f"graph_fault:{fault['kind']}")
                retry = {"Retry-After": str(fault.get("retry_after", 1))}
                if fault["kind"] == "429":
                    raise GraphError(429, "ErrorTooManyObjectsOpened", headers=retry)
                raise GraphError(503, "ServiceUnavailable", headers=retry)
        key = (claims.get("appid", ""), mailbox)
        limit = int(directory.settings.get("graph_concurrency_limit", 4))
        with self._lock:
            if self._in_flight.get(key, 0) >= limit:
                directory.count("graph_throttled:concurrency")
                raise GraphError(429, "ApplicationThrottled", headers={"Retry-After": "1"})
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            hold = self._holds > 0
            if hold:
                self._holds -= 1
        if hold:  # a test keeps this request in flight until it releases it (graph_fault kind "hold")
            directory.count("graph_held")
            self._released.wait(30)
        return key

    def gateway_timeout(self):
        """graph_fault kind "504": the request is carried out, then answered 504 Gateway Timeout, as when the
        gateway gave up waiting for Exchange that went on (GRAPH-20)."""
        directory = self.directory
        with directory.lock:
            fault = directory.data.get("graph_fault_live")
            if fault and fault["kind"] == "504" and fault["remaining"] > 0:
                fault["remaining"] -= 1
                directory.count("graph_fault:504")
                return True
        return False

    def leave(self, key):
        with self._lock:
            self._in_flight[key] -= 1

    # the mail operations -----------------------------------------------------------------------

    @staticmethod
    def _mime(body):
        if len(body) > SENDMAIL_LIMIT:
            raise GraphError(413, "RequestBodyTooLarge")
        try:
            raw = base64.b64decode(body, validate=False)
            if not raw.strip():
                raise ValueError
        except (ValueError, binascii.Error):
            raise GraphError(400, "ErrorInvalidMimeContent") from None
        return raw

    def send_mail(self, claims, mailbox, body):
        self._submit(claims, mailbox, self._mime(body))
        self.directory.count("graph_sendmail")

    # drafts, attachments and upload sessions (GRAPH-15) ----------------------------------------

    def create_draft(self, imap, mailbox, body):
        """POST /messages with MIME: a draft in Drafts; attachments may then be added to it."""
        raw = self._mime(body)
        self.store.ensure_folder(imap, "Drafts")
        imap.append(self.store._quote("Drafts"), "(\\Draft)", None, raw)
        validity, _count = self.store.select(imap, "Drafts", readonly=True)
        typ, data = imap.uid("SEARCH", None, "ALL")
        uid = max(int(u) for u in data[0].split())
        return self.store.summaries(imap, "Drafts", validity, [uid])[0]

    def add_attachment(self, imap, draft, name, content_type, content):
        self.locate(imap, draft)
        with self._lock:
            self._attachments.setdefault(draft, []).append((name, content_type, content))

    def create_upload_session(self, imap, mailbox, draft, item):
        self.locate(imap, draft)
        size = int(item.get("size") or 0)
        if item.get("attachmentType", "file") != "file" or size <= 0:
            raise GraphError(400, "BadRequest", "AttachmentItem needs attachmentType file and a size.")
        if size > 150 * 1024 * 1024:
            raise GraphError(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize", "The attachment is too large.")
        token = uuid.uuid4().hex
        with self._lock:
            self._uploads[token] = {
                "draft": draft,
                "name": item.get("name") or "attachment",
                "content_type": item.get("contentType") or "application/octet-stream",
                "size": size,
                "data": bytearray(),
            }
        expires = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).isoformat()
        return {
            "uploadUrl": f"{self.base_url}/upload/{token}",
            "expirationDateTime": expires,
            "nextExpectedRanges": ["0-"],
        }

    def upload(self, token, content_range, chunk):
        """PUT to the upload URL (pre-authenticated: no Authorization header), ranges in order."""
        with self._lock:
            session = self._uploads.get(token)
        if session is None:
            raise GraphError(404, "ErrorItemNotFound")
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range or "")
        if not match or int(match[3]) != session["size"] or int(match[1]) != len(session["data"]):
            raise GraphError(416, "InvalidRange", "The Content-Range header is not the next expected range.")
        if len(chunk) > 4 * 1024 * 1024 or int(match[2]) - int(match[1]) + 1 != len(chunk):
            raise GraphError(400, "BadRequest", "The range does not match the body (at most 4 MB per request).")
        session["data"] += chunk
        if len(session["data"]) < session["size"]:
            return 200, {"nextExpectedRanges": [f"{len(session['data'])}-"]}
        with self._lock:
            self._uploads.pop(token, None)
            self._attachments.setdefault(session["draft"], []).append(
                (session["name"], session["content_type"], bytes(session["data"]))
            )
        return 201, None

    def send_draft(self, claims, mailbox, imap, draft):
        folder, validity, uid = self.locate(imap, draft)
        typ, data = imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
        raw = next(part[1] for part in data if isinstance(part, tuple))
        message = email.message_from_bytes(raw, policy=email.policy.SMTP)
        with self._lock:
            attachments = self._attachments.pop(draft, [])
        if attachments and not message.is_multipart():
            body = email.message.EmailMessage(policy=email.policy.SMTP)
            body.set_content(message.get_content())
            for name, value in list(message.items()):
                if name.lower() not in ("content-type", "content-transfer-encoding", "mime-version"):
                    body[name] = value
            message = body
        for name, content_type, content in attachments:
            maintype, _, subtype = content_type.partition("/")
            if message.get_content_type() != "multipart/mixed":
                message.make_mixed()
            attachment = email.message.EmailMessage(policy=email.policy.SMTP)
            attachment.set_content(content, maintype=maintype, subtype=subtype or "octet-stream", filename=name)
            attachment.replace_header("Content-Disposition", f'attachment; filename="{name}"')
            message.attach(attachment)
        self._submit(claims, mailbox, message.as_bytes())
        self.directory.count("graph_send_draft")
        imap.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")
        imap.expunge()

    def delete(self, imap, value):
        folder, validity, uid = self.locate(imap, value)
        imap.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")
        imap.expunge()
        with self._lock:
            self._attachments.pop(value, None)

    def _submit(self, claims, mailbox, raw):
        directory = self.directory
        if len(raw) > int(directory.settings.get("graph_max_message_bytes", 35 * 1024 * 1024)):
            raise GraphError(400, "ErrorMessageSizeExceeded")
        message = email.message_from_bytes(raw, policy=email.policy.SMTP)
        sender = email.utils.parseaddr(str(message.get("From", "")))[1].lower() or mailbox
        delegate = claims.get("upn", "").lower() if "scp" in claims else None
        identity = delegate or f"app:{claims.get('appid', '')}"
        # GRAPH-19: a delegate sending From another mailbox needs Send As or Send on Behalf on it, Send As
        # winning when both are granted; Graph sets the sender itself: the delegate on behalf, else the From.
        on_behalf = False
        if delegate and sender != delegate:
            if directory.has_send_as(delegate, sender):
                pass
            elif directory.has_send_on_behalf(delegate, sender):
                on_behalf = True
            elif not (sender != mailbox and directory.has_send_as(mailbox, sender)):
                raise GraphError(403, "ErrorSendAsDenied")
        elif (
            not delegate
            and sender != mailbox
            and not (directory.has_send_as(mailbox, sender) or directory.has_send_as(identity, sender))
        ):
            raise GraphError(403, "ErrorSendAsDenied")
        del message["Sender"]
        if on_behalf:
            user = directory.user(delegate) or {}
            message["Sender"] = email.utils.formataddr((user.get("name") or "", delegate))
        recipients = [
            address.lower()
            for _name, address in email.utils.getaddresses(
                [str(v) for field in ("To", "Cc", "Bcc") for v in message.get_all(field, [])]
            )
            if address
        ]
        if not recipients or any("@" not in r for r in recipients):
            raise GraphError(400, "ErrorInvalidRecipients")
        del message["Bcc"]
        if not directory.settings.get("graph_keep_custom_headers", False):
            for name in {k.lower() for k in message.keys()}:
                if name.startswith("x-") or name in DROPPED_HEADERS:
                    del message[name]
        if directory.settings.get("graph_replace_message_id", False) or not message.get("Message-ID"):
            del message["Message-ID"]
            message["Message-ID"] = f"<{uuid.uuid4().hex.upper()}@SANDBOX.PROD.OUTLOOK.COM>"
        if not message.get("Date"):
            message["Date"] = email.utils.formatdate()
        content = message.as_bytes()
        for recipient in recipients:
            if directory.mailbox(recipient):
                self.mail.deliver(recipient, content)
            else:
                self.mail.store_outbound(recipient, content)
        imap = self.store.session(mailbox)
        try:
            self.store.ensure_folder(imap, "Sent Items")
            imap.append(self.store._quote("Sent Items"), "(\\Seen)", None, content)
        finally:
            imap.logout()

    def folder_name(self, imap, folder):
        name = WELL_KNOWN.get(folder.lower()) if not folder.startswith("AQMk") else None
        if name is None:
            try:
                name = _unb64url(folder.removeprefix("AQMk"))
            except (ValueError, UnicodeDecodeError, binascii.Error):
                raise GraphError(400, "ErrorInvalidIdMalformed") from None
        if name in WELL_KNOWN.values():  # every Exchange mailbox has them
            self.store.ensure_folder(imap, name)
        if name != "INBOX" and name not in self.store.folders(imap) and name not in self._all_folders(imap):
            raise GraphError(404, "ErrorItemNotFound")
        return name

    def _all_folders(self, imap):
        return self.store.folders(imap, parent=None) + [
            n for parent in self.store.folders(imap) for n in self.store.folders(imap, parent)
        ]

    def folder_resource(self, imap, name):
        total, unread = self.store.counts(imap, name)
        children = self.store.folders(imap, name)
        parent = name.rpartition(".")[0]
        return {
            "id": folder_id(name),
            "displayName": "Inbox" if name == "INBOX" else name.rpartition(".")[2],
            "parentFolderId": folder_id(parent) if parent else "AQMkroot",
            "childFolderCount": len(children),
            "unreadItemCount": unread,
            "totalItemCount": total,
        }

    def list_messages(self, imap, folder, query):
        """A folder's messages: `$filter` clauses `isRead eq false|true` and `receivedDateTime ge|gt <UTC>`
        joined by `and`; `$orderby=receivedDateTime [asc|desc]`, refused with `InefficientFilter` when a
        `$filter` does not name receivedDateTime first (GRAPH-16); `$top`/`$skip` paging."""
        validity, _count = self.store.select(imap, folder, readonly=True)
        criteria, after, named = "ALL", None, []
        raw_filter = (query.get("$filter") or "").strip()
        for clause in [c.strip() for c in re.split(r"\s+and\s+", raw_filter, flags=re.I) if c.strip()]:
            compact = clause.replace(" ", "").lower()
            if compact in ("isreadeqfalse", "isreadeqtrue"):
                criteria = "UNSEEN" if compact == "isreadeqfalse" else "SEEN"
                named.append("isread")
                continue
            after = _received_clause(clause)
            if after is None:
                raise GraphError(400, "BadRequest", f"Invalid filter clause: {query['$filter']}")
            named.append("receiveddatetime")
        order = (query.get("$orderby") or "").strip()
        descending = False
        if order:
            match = re.fullmatch(r"receivedDateTime(?:\s+(asc|desc))?", order, flags=re.I)
            if not match:
                raise GraphError(400, "BadRequest", f"This sandbox orders by receivedDateTime only: {order}")
            if named and named[0] != "receiveddatetime":
                raise GraphError(400, "InefficientFilter", MESSAGES["InefficientFilter"])
            descending = (match[1] or "asc").lower() == "desc"
        typ, data = imap.uid("SEARCH", None, criteria)
        uids = [int(u) for u in (data[0] or b"").split()]
        if after or order:
            dates = self.store.dates(imap, uids)
            uids = [u for u in uids if u in dates and _after(dates[u], after)]
            uids.sort(key=lambda u: (dates[u], u), reverse=descending)
        top, skip = min(int(query.get("$top", 10)), 1000), int(query.get("$skip", 0))
        page = uids[skip : skip + top]
        return self.store.summaries(imap, folder, validity, page), (skip + top if skip + top < len(uids) else None)

    def locate(self, imap, value):
        folder, validity, uid = parse_message_id(value)
        try:
            current, _count = self.store.select(imap, folder)
        except GraphError:
            raise GraphError(404, "ErrorItemNotFound") from None
        if current != validity:
            raise GraphError(404, "ErrorItemNotFound")
        typ, data = imap.uid("SEARCH", None, f"UID {uid}")
        if uid not in [int(u) for u in (data[0] or b"").split()]:
            raise GraphError(404, "ErrorItemNotFound")
        return folder, validity, uid

    def raw(self, imap, value):
        folder, validity, uid = self.locate(imap, value)
        typ, data = imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
        raw = next(part[1] for part in data if isinstance(part, tuple))
        message = email.message_from_bytes(raw, policy=email.policy.default)
        if message.get_content_type() in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
            # Opaque-signed or encrypted S/MIME: Exchange cannot give its MIME, every time (GRAPH-18).
            raise GraphError(500, "ErrorMimeContentConversionFailed")
        return raw

    def set_read(self, imap, value, is_read):
        folder, validity, uid = self.locate(imap, value)
        imap.uid("STORE", str(uid), "+FLAGS.SILENT" if is_read else "-FLAGS.SILENT", "(\\Seen)")
        return self.store.summaries(imap, folder, validity, [uid])[0]

    def move(self, imap, value, destination):
        target = self.folder_name(imap, destination)
        folder, validity, uid = self.locate(imap, value)
        typ, data = imap.uid("MOVE", str(uid), self.store._quote(target))
        if typ != "OK":
            raise GraphError(404, "ErrorItemNotFound")
        copied = imap.response("COPYUID")[1]
        new_uid = int(copied[0].split()[-1]) if copied and copied[0] else None
        target_validity, _count = self.store.select(imap, target, readonly=True)
        if new_uid is None:
            return {"id": None, "parentFolderId": folder_id(target)}
        return self.store.summaries(imap, target, target_validity, [new_uid])[0]

    def delta(self, imap, mailbox, folder, query, page_size):
        """One request of a delta round (GRAPH-13, GRAPH-17). Returns (entries, query of the next link):
        `$skiptoken` while the round has pages left, else `$deltatoken`. Sync states are kept here, as
        Exchange keeps them in a cache of limited size: an old delta link goes on working until it is
        evicted (or dropped with the `graph_fault` kind `delta_expired`); then 410 SyncStateNotFound."""
        if "$skiptoken" in query:
            with self._lock:
                pages = self._delta_pages.pop(query["$skiptoken"], None)
            if pages is None:
                raise GraphError(410, "SyncStateNotFound", MESSAGES["SyncStateNotFound"])
            return self._delta_page(pages)
        validity, _count = self.store.select(imap, folder, readonly=True)
        if "$deltatoken" in query:
            with self._lock:
                state = self._delta_states.get(query["$deltatoken"])
            if state is None or (state["mailbox"], state["folder"], state["validity"]) != (mailbox, folder, validity):
                raise GraphError(410, "SyncStateNotFound", MESSAGES["SyncStateNotFound"])
            after, before = state["after"], state["seen"]
        else:
            raw_filter = (query.get("$filter") or "").strip()
            after = _received_clause(raw_filter) if raw_filter else None
            if raw_filter and after is None:
                raise GraphError(400, "BadRequest", f"Invalid filter clause for delta: {raw_filter}")
            order = (query.get("$orderby") or "").replace(" ", "").lower()
            if order and order != "receiveddatetimedesc":
                raise GraphError(400, "BadRequest", f"Unsupported $orderby for delta: {query['$orderby']}")
            before = None
        typ, data = imap.uid("SEARCH", None, "ALL")
        uids = [int(u) for u in (data[0] or b"").split()]
        dates, seen = self.store.dates(imap, uids, with_seen=True)
        current = {u: seen[u] for u in uids if u in dates and _after(dates[u], after)}
        if before is None:
            changed, removed = list(current), []
        else:
            changed = [u for u in current if u not in before or before[u] != current[u]]
            removed = [u for u in before if u not in current]
        # "If you do not include an $orderby expression, the return order is not guaranteed": newest first
        # here, so that a client relying on arrival order is caught.
        changed.sort(key=lambda u: (dates[u], u), reverse=True)
        entries = self.store.summaries(imap, folder, validity, changed) + [
            {"id": message_id(folder, validity, u), "@removed": {"reason": "deleted"}} for u in removed
        ]
        token = uuid.uuid4().hex
        limit = int(self.directory.settings.get("graph_delta_states", 1000))
        with self._lock:
            self._delta_states[token] = {
                "mailbox": mailbox,
                "folder": folder,
                "validity": validity,
                "after": after,
                "seen": current,
            }
            while len(self._delta_states) > limit:
                self._delta_states.pop(next(iter(self._delta_states)))
        size = max(1, page_size)
        pages = [entries[i : i + size] for i in range(0, len(entries), size)] or [[]]
        return self._delta_page({"pages": pages, "token": token})

    def _delta_page(self, pending):
        page, rest = pending["pages"][0], pending["pages"][1:]
        if not rest:
            return page, {"$deltatoken": pending["token"]}
        skip = uuid.uuid4().hex
        with self._lock:
            self._delta_pages[skip] = {"pages": rest, "token": pending["token"]}
        return page, {"$skiptoken": skip}

    def forget_delta_states(self):
        with self._lock:
            self._delta_states.clear()
            self._delta_pages.clear()


def _received_clause(clause):
    """`receivedDateTime ge|gt <UTC time>` -> (operator, datetime), else None."""
    match = re.fullmatch(r"receivedDateTime\s+(ge|gt)\s+(\S+)", clause.strip(), flags=re.I)
    if not match:
        return None
    try:
        moment = datetime.datetime.fromisoformat(match[2].replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return match[1].lower(), moment


def _after(moment, after):
    if after is None:
        return True
    operator, bound = after
    return moment >= bound if operator == "ge" else moment > bound


_ROUTE = re.compile(r"^/v1\.0/(?:users/(?P<user>[^/]+)|(?P<me>me))(?P<rest>/.*)?$")


class _Handler(BaseHTTPRequestHandler):
    graph = None
    protocol_version = "HTTP/1.1"
    server_version = "Microsoft-HTTPAPI/2.0"
    sys_version = ""

    def setup(self):
        self._round_trip()  # the connection's handshake crosses the network (setting latency_ms)
        super().setup()
        # Headers and body leave in separate writes: without this, Nagle's algorithm and the client's
        # delayed ACK hold the body back for about 40 ms per answer.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_response(self, code, message=None):
        self._round_trip()  # every answer crosses the network
        super().send_response(code, message)

    def _round_trip(self):
        seconds = self.graph.directory.latency()
        if seconds:
            time.sleep(seconds)

    def log_message(self, format, *args):
        _logger.debug("graph: " + format, *args)

    def _send(self, status, body=None, content_type="application/json; charset=utf-8", headers=None):
        if status < 400 and getattr(self, "_gateway_timeout", False):
            self._gateway_timeout = False
            status, content_type, headers = 504, "application/json; charset=utf-8", None
            body = GraphError(504, "UnknownError", "").body(str(uuid.uuid4()))
        if body is None:
            payload = b""
        elif isinstance(body, bytes):
            payload = body
        else:
            payload = json.dumps(body).encode()
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        request_id = self.headers.get("client-request-id") or str(uuid.uuid4())
        self.send_header("request-id", request_id)
        self.send_header("client-request-id", request_id)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        """The pre-authenticated upload URL of an upload session."""
        body = self._body()
        parts = urlsplit(self.path).path.strip("/").split("/")
        try:
            if len(parts) != 2 or parts[0] != "upload":
                raise GraphError(400, "BadRequest", "Unsupported request.")
            status, answer = self.graph.upload(parts[1], self.headers.get("Content-Range"), body)
        except GraphError as error:
            return self._send(error.status, error.body(str(uuid.uuid4())), headers=error.headers)
        self._send(status, answer)

    def _dispatch(self, method):
        graph = self.graph
        self._gateway_timeout = False
        parts = urlsplit(self.path)
        body = self._body()
        match = _ROUTE.match(parts.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        key = None
        try:
            if not match:
                raise GraphError(400, "BadRequest", f"Resource not found for the segment '{parts.path}'.")
            claims = graph.caller(self.headers.get("Authorization"))
            segments = [unquote(s) for s in (match["rest"] or "").strip("/").split("/") if s]
            action = "send" if segments == ["sendMail"] else "read"
            if method == "POST" and len(segments) == 3 and segments[0] == "messages" and segments[2] == "send":
                action = "send"
            mailbox = graph.authorize(claims, match["user"] or "me", action)
            self._claims = claims
            key = graph.enter(claims, mailbox)
            self._gateway_timeout = graph.gateway_timeout()
            graph.directory.count("graph_requests")
            graph.directory.count(f"graph:{method}:{'/'.join(s if not s.startswith('AA') else '*' for s in segments)}")
            return self._operate(method, claims, mailbox, segments, query, body)
        except GraphError as error:
            request_id = self.headers.get("client-request-id") or str(uuid.uuid4())
            return self._send(error.status, error.body(request_id), headers=error.headers)
        except (imaplib.IMAP4.error, OSError) as exc:
            _logger.warning("graph: the store failed: %s", exc)
            error = GraphError(503, "ServiceUnavailable", headers={"Retry-After": "1"})
            return self._send(503, error.body(str(uuid.uuid4())), headers=error.headers)
        finally:
            if key is not None:
                graph.leave(key)

    def _operate(self, method, claims, mailbox, segments, query, body):
        graph = self.graph
        if method == "POST" and segments == ["sendMail"]:
            if not (self.headers.get("Content-Type") or "").startswith("text/plain"):
                raise GraphError(400, "BadRequest", "This sandbox plays sendMail with MIME content only.")
            graph.send_mail(claims, mailbox, body.strip())
            return self._send(202)
        imap = graph.store.session(mailbox)
        try:
            return self._read(method, imap, mailbox, segments, query, body)
        finally:
            try:
                imap.logout()
            except (imaplib.IMAP4.error, OSError):
                pass

    def _read(self, method, imap, mailbox, segments, query, body):
        graph = self.graph
        if segments == ["mailFolders"] and method == "GET":
            names = graph.store.folders(imap)
            return self._send(200, {"value": [graph.folder_resource(imap, n) for n in names]})
        if len(segments) >= 2 and segments[0] == "mailFolders":
            folder = graph.folder_name(imap, segments[1])
            rest = segments[2:]
            if not rest and method == "GET":
                return self._send(200, graph.folder_resource(imap, folder))
            if rest == ["childFolders"] and method == "GET":
                children = graph.store.folders(imap, folder)
                return self._send(200, {"value": [graph.folder_resource(imap, n) for n in children]})
            if rest == ["messages"] and method == "GET":
                value, next_skip = graph.list_messages(imap, folder, query)
                answer = {"value": value}
                if next_skip is not None:
                    following = dict(query, **{"$skip": str(next_skip)})
                    answer["@odata.nextLink"] = self._link(segments, following)
                return self._send(200, answer)
            if rest == ["messages", "delta"] and method == "GET":
                prefer = re.search(r"odata\.maxpagesize=(\d+)", self.headers.get("Prefer") or "")
                page_size = int(prefer[1]) if prefer else int(query.get("$top", 10))
                value, following = graph.delta(imap, mailbox, folder, query, page_size)
                kind = "@odata.nextLink" if "$skiptoken" in following else "@odata.deltaLink"
                return self._send(200, {"value": value, kind: self._link(segments, following)})
        return self._messages(method, imap, mailbox, segments, body)

    def _messages(self, method, imap, mailbox, segments, body):
        graph = self.graph
        if segments == ["messages"] and method == "POST":
            if not (self.headers.get("Content-Type") or "").startswith("text/plain"):
                raise GraphError(400, "BadRequest", "This sandbox creates drafts from MIME content only.")
            return self._send(201, graph.create_draft(imap, mailbox, body.strip()))
        if len(segments) >= 2 and segments[0] == "messages":
            rest = segments[2:]
            if rest == ["attachments"] and method == "POST":
                item = json.loads(body or b"{}")
                graph.add_attachment(
                    imap,
                    segments[1],
                    item.get("name") or "attachment",
                    item.get("contentType") or "application/octet-stream",
                    base64.b64decode(item.get("contentBytes") or ""),
                )
                return self._send(201, {"name": item.get("name")})
            if rest == ["attachments", "createUploadSession"] and method == "POST":
                item = json.loads(body or b"{}").get("AttachmentItem") or {}
                return self._send(201, graph.create_upload_session(imap, mailbox, segments[1], item))
            if rest == ["send"] and method == "POST":
                graph.send_draft(self._claims, mailbox, imap, segments[1])
                return self._send(202)
            if not rest and method == "DELETE":
                graph.delete(imap, segments[1])
                return self._send(204)
            if rest == ["$value"] and method == "GET":
                return self._send(200, graph.raw(imap, segments[1]), "text/plain")
            if not rest and method == "GET":
                folder, validity, uid = graph.locate(imap, segments[1])
                return self._send(200, graph.store.summaries(imap, folder, validity, [uid])[0])
            if not rest and method == "PATCH":
                values = json.loads(body or b"{}")
                if "isRead" not in values:
                    raise GraphError(400, "BadRequest", "This sandbox updates isRead only.")
                return self._send(200, graph.set_read(imap, segments[1], bool(values["isRead"])))
            if rest == ["move"] and method == "POST":
                destination = json.loads(body or b"{}").get("destinationId") or ""
                return self._send(201, graph.move(imap, segments[1], destination))
        raise GraphError(400, "BadRequest", f"Resource not found for the segment '{'/'.join(segments)}'.")

    def _link(self, segments, query):
        match = _ROUTE.match(urlsplit(self.path).path)
        user = f"users/{match['user']}" if match["user"] else "me"
        return f"{self.graph.base_url}/v1.0/{user}/{'/'.join(segments)}?{urlencode(query)}"


def set_graph_fault(directory, body, graph=None):
    kind = str(body.get("kind", "none"))
    if kind not in ("429", "503", "504", "hold", "release", "delta_expired", "none"):
        raise KeyError(f"kind={kind!r} (429, 503, 504, hold, release, delta_expired or none)")
    if kind == "delta_expired":  # Exchange's cache of sync states lost them: every delta link is stale
        if graph is None:
            raise KeyError("the Graph server is not running")
        graph.forget_delta_states()
        return
    if kind in ("hold", "release"):
        if graph is None:
            raise KeyError("the Graph server is not running")
        with graph._lock:
            if kind == "hold":
                graph._released.clear()
                graph._holds = int(body.get("count", 1))
            else:
                graph._holds = 0
                graph._released.set()
        return
    with directory.lock:
        directory.data["graph_fault_live"] = (
            None
            if kind == "none"
            else {"kind": kind, "remaining": int(body.get("count", 1)), "retry_after": int(body.get("retry_after", 1))}
        )


def set_app_scope(directory, body):
    """RBAC for Applications: the mailboxes a management scope gives the app (None: no scope)."""
    with directory.lock:
        scopes = directory.data.setdefault("graph_app_scopes", {})
        if body.get("mailboxes") is None:
            scopes.pop(body["client_id"], None)
        else:
            scopes[body["client_id"]] = [m.lower() for m in body["mailboxes"]]
        directory.save()
