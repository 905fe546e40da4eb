"""Microsoft Graph as a mail transport: send Odoo's MIME messages and read a folder's unread mail.

A small client over ``requests`` for the few mail endpoints the addon uses (sandbox/CONFORMANCE.md,
section "Microsoft Graph mail"): ``sendMail`` with a base64 MIME body, a folder's unread messages,
their raw MIME (``$value``), marking read, moving, and a folder's delta. Every refusal becomes a
Diagnosis in plain words with the fix (``diagnose_graph``); 429 and 503 are retried honouring
Retry-After, within bounds, and what outlasts them is reported as transient with its wait.
"""

import base64
import email
import email.policy
import email.utils
import logging
import time
from urllib.parse import quote

import requests

from .diagnosis import CONFIGURATION, TRANSIENT, Diagnosis, _first_line
from .errors import M365Error
from .i18n import _lt

_logger = logging.getLogger(__name__)

# sendMail takes about 4 MB per request (GRAPH-08); base64 makes 3 bytes 4.
SENDMAIL_REQUEST_LIMIT = 4 * 1024 * 1024
SENDMAIL_MIME_LIMIT = SENDMAIL_REQUEST_LIMIT * 3 // 4 - 1024
DELEGATED_PERMISSIONS = ("Mail.ReadWrite", "Mail.Send")
SHARED_PERMISSIONS = ("Mail.ReadWrite.Shared", "Mail.Send.Shared")
APP_PERMISSIONS = ("Mail.ReadWrite", "Mail.Send")
RETRY_STATUSES = frozenset({429, 503, 504})
# A send is retried only where Graph says it did nothing (429, 503): a 504 (gateway timeout) may come after
# Exchange took the message, and sending it again would deliver it twice (GRAPH-20).
SEND_RETRY_STATUSES = frozenset({429, 503})
# Attachments from 3 MB go through an upload session, in ranges of at most 4 MB (GRAPH-15); 150 MB at most.
SMALL_ATTACHMENT = 3 * 1024 * 1024
UPLOAD_CHUNK = 10 * 320 * 1024  # a multiple of 320 KiB, under 4 MB
ATTACHMENT_LIMIT = 150 * 1024 * 1024
SUMMARY_FIELDS = "id,internetMessageId,subject,from,receivedDateTime,isRead"
EVER = "1900-01-01T00:00:00Z"  # a receivedDateTime clause that excludes nothing (GRAPH-16)
# Graph's well-known folder names, usable wherever a folder id is (GRAPH-22).
WELL_KNOWN_FOLDERS = frozenset(
    {
        "archive",
        "clutter",
        "conflicts",
        "conversationhistory",
        "deleteditems",
        "drafts",
        "inbox",
        "junkemail",
        "localfailures",
        "msgfolderroot",
        "outbox",
        "recoverableitemsdeletions",
        "scheduled",
        "searchfolders",
        "sentitems",
        "serverfailures",
        "syncissues",
    }
)
# A delta link Graph no longer knows (GRAPH-17): 410 Gone, or a 40x with one of these codes.
DELTA_EXPIRED_CODES = frozenset({"syncstatenotfound", "syncstateinvalid", "resyncrequired"})


class GraphFailed(M365Error):
    """Graph refused a request; ``diagnosis`` says why, ``status``/``code`` are Graph's."""

    def __init__(self, diagnosis, status=None, code=None, retry_after=None):
        self.diagnosis, self.status, self.code, self.retry_after = diagnosis, status, code, retry_after
        super().__init__(diagnosis.summary, **diagnosis.params)


class GraphClient:
    """One mailbox through Microsoft Graph with one access token.

    ``context`` fills the diagnoses: app_only, app_id, app_name, login (the signed-in user)."""

    ATTEMPTS = 3
    MAX_WAIT = 30.0  # seconds one request may wait for Graph's Retry-After; longer: transient failure

    def __init__(
        self, base_url, token, mailbox, session=None, timeout=60.0, sleep=time.sleep, renew_token=None, **context
    ):
        self.base_url = base_url.rstrip("/")
        self.token = token
        # A token Graph refuses (401) though it has not expired here: revoked on Microsoft's side (a
        # password reset, sessions revoked) or a clock apart. One new token from the identity platform
        # tells which: it works, or its refusal names the real cause (reconnect) instead of "the token".
        self.renew_token = renew_token
        self.mailbox = mailbox
        self.session = session or requests.Session()
        self.timeout = timeout
        # time.monotonic() past which no reply is awaited and no Retry-After waited out (a fetch's time budget)
        self.deadline = None
        self.sleep = sleep
        self.context = context
        self.requests = 0  # for benchmarks and tests
        self._found_folders = {}

    def __repr__(self):  # never the token
        return f"GraphClient({self.base_url!r}, mailbox={self.mailbox!r})"

    @property
    def _user(self):
        return f"{self.base_url}/v1.0/users/{quote(self.mailbox, safe='@')}"

    # sending ----------------------------------------------------------------------------------

    def send_mime(self, raw):
        """Post a whole MIME message (bytes) to sendMail; Graph answers 202 and sends it. A message too large
        for one request goes the way Microsoft documents: a draft from the MIME without its attachments,
        each attachment added (from 3 MB through an upload session), then the draft sent."""
        if len(raw) > SENDMAIL_MIME_LIMIT:
            return self._send_large(raw)
        self._call(
            "POST",
            f"{self._user}/sendMail",
            "send",
            data=base64.b64encode(raw),
            headers={"Content-Type": "text/plain"},
            diagnose=_sender_of(raw),
        )

    def _send_large(self, raw):
        message = email.message_from_bytes(raw, policy=email.policy.SMTP)
        attachments = _detach(message)
        draft_raw = message.as_bytes()
        too_large = [a for a in attachments if len(a[2]) > ATTACHMENT_LIMIT]
        if len(draft_raw) > SENDMAIL_MIME_LIMIT or too_large:
            raise GraphFailed(
                _diagnosis(
                    "GRAPH TOO LARGE",
                    CONFIGURATION,
                    _lt(
                        "The message is too large to send through Microsoft Graph (%(size)s MB): without its "
                        "attachments it must stay under %(limit)s MB, and each attachment under 150 MB."
                    ),
                    _lt(
                        "Send smaller attachments (share large files as links), or send this mailbox's mail through "
                        "SMTP (Transport: Exchange protocols)."
                    ),
                    "",
                    size=round(len(raw) / 1048576, 1),
                    limit=round(SENDMAIL_MIME_LIMIT / 1048576, 1),
                ),
                413,
                "RequestBodyTooLarge",
            )
        draft = self._call(
            "POST",
            f"{self._user}/messages",
            "read",
            data=base64.b64encode(draft_raw),
            headers={"Content-Type": "text/plain"},
        ).json()["id"]
        try:
            for name, content_type, content in attachments:
                self._attach(draft, name, content_type, content)
            self._call("POST", f"{self._user}/messages/{quote(draft, safe='')}/send", "send", diagnose=_sender_of(raw))
        except GraphFailed:
            try:  # no half-built draft left behind in the mailbox
                self._call("DELETE", f"{self._user}/messages/{quote(draft, safe='')}", "read")
            except GraphFailed:
                _logger.info("Microsoft Graph: the draft of a refused message could not be deleted")
            raise

    def _attach(self, draft, name, content_type, content):
        url = f"{self._user}/messages/{quote(draft, safe='')}/attachments"
        if len(content) < SMALL_ATTACHMENT:
            item = {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": name,
                "contentType": content_type,
                "contentBytes": base64.b64encode(content).decode("ascii"),
            }
            self._call("POST", url, "read", json=item)
            return
        item = {"attachmentType": "file", "name": name, "size": len(content), "contentType": content_type}
        upload_url = self._call("POST", f"{url}/createUploadSession", "read", json={"AttachmentItem": item}).json()[
            "uploadUrl"
        ]
        for start in range(0, len(content), UPLOAD_CHUNK):
            chunk = content[start : start + UPLOAD_CHUNK]
            # The upload URL carries its own authorization: no bearer token with it.
            self._call(
                "PUT",
                upload_url,
                "read",
                data=chunk,
                headers={"Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{len(content)}"},
                authorize=False,
            )

    # reading ----------------------------------------------------------------------------------

    def folder(self, folder="inbox"):
        return self._call("GET", f"{self._user}/mailFolders/{quote(folder, safe='')}", "read").json()

    def folders(self, parent=None):
        """The root's folders, or `parent`'s child folders (id or well-known name), every page (GRAPH-22)."""
        url = (
            f"{self._user}/mailFolders/{quote(parent, safe='')}/childFolders" if parent else f"{self._user}/mailFolders"
        )
        return self._every_page(url, {"$select": "id,displayName", "$top": "100"})

    def _every_page(self, url, params):
        """Every item of a list Graph pages (@odata.nextLink carries the parameters on)."""
        items = []
        while url:
            answer = self._call("GET", url, "read", params=params).json()
            items += answer.get("value", [])
            url, params = answer.get("@odata.nextLink"), None
        return items

    def find_folder(self, path):
        """The id of the folder people know as `path`, names joined by "/" ("Inbox/Support", "Projects"), or
        None. Graph addresses a folder only by id or well-known name and lists one level at a time
        (GRAPH-22): the first name may be a well-known one (inbox, archive...: whatever the mailbox's
        language), each name is looked up among the children of the previous folder, ignoring case."""
        names = [name.strip() for name in path.split("/") if name.strip()]
        if not names:
            return None
        key = "/".join(names).lower()
        if key not in self._found_folders:  # one lookup per client (one fetch), however many messages it moves
            self._found_folders[key] = self._find_folder(names)
        return self._found_folders[key]

    def _find_folder(self, names):
        parent, rest = None, names
        if names[0].lower() in WELL_KNOWN_FOLDERS:
            parent, rest = names[0].lower(), names[1:]
        for name in rest:
            match = [f for f in self.folders(parent) if (f.get("displayName") or "").lower() == name.lower()]
            if not match:
                return None
            parent = match[0]["id"]
        return parent if rest else self.folder(parent)["id"]

    def unread(self, folder="inbox", page_size=50):
        """The folder's unread messages (id, internetMessageId, subject, from), oldest first. Graph sorts a
        filtered list only by a property the filter names first (GRAPH-16): hence the receivedDateTime
        clause, which excludes nothing."""
        url = f"{self._user}/mailFolders/{quote(folder, safe='')}/messages"
        params = {
            "$filter": f"receivedDateTime ge {EVER} and isRead eq false",
            "$orderby": "receivedDateTime asc",
            "$select": SUMMARY_FIELDS,
            "$top": str(page_size),
        }
        return self._every_page(url, params)

    def mime(self, message_id):
        """The raw MIME of a message ($value), bytes."""
        return self._call("GET", f"{self._user}/messages/{quote(message_id, safe='')}/$value", "read").content

    def mark_read(self, message_id):
        self._call("PATCH", f"{self._user}/messages/{quote(message_id, safe='')}", "read", json={"isRead": True})

    def move(self, message_id, destination):
        """Move a message to a folder (id or well-known name); returns its new id (ids change on move)."""
        answer = self._call(
            "POST",
            f"{self._user}/messages/{quote(message_id, safe='')}/move",
            "read",
            json={"destinationId": destination},
        )
        return answer.json().get("id")

    def delta(self, folder="inbox", delta_link=None, since=None, page_size=50):
        """(entries, delta link) of a folder's messages (GRAPH-13): the first round lists the folder's
        messages (only those received from `since`, a UTC datetime, when given: Graph keeps that filter in
        the links it returns), then a delta link's round gives what changed since it was issued: messages
        added or changed, and ``{"id", "@removed"}`` for those deleted or moved out. Graph gives no order
        (only ``receivedDateTime desc`` may be asked): callers sort. Raises GraphFailed; `delta_expired`
        tells a delta link Graph no longer knows."""
        headers = {"Prefer": f"odata.maxpagesize={page_size}"}
        if delta_link:
            url, params = delta_link, None
        else:
            url = f"{self._user}/mailFolders/{quote(folder, safe='')}/messages/delta"
            params = {"$select": SUMMARY_FIELDS}
            if since is not None:
                params["$filter"] = f"receivedDateTime ge {since.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        entries = []
        while True:
            answer = self._call("GET", url, "read", params=params, headers=headers).json()
            entries += answer.get("value", [])
            if answer.get("@odata.nextLink"):
                url, params = answer["@odata.nextLink"], None
                continue
            return entries, answer.get("@odata.deltaLink")

    # ------------------------------------------------------------------------------------------

    def _timeout_left(self):
        if self.deadline is None:
            return self.timeout
        return max(1.0, min(self.timeout, self.deadline - time.monotonic()))

    def _wait_allowed(self):
        if self.deadline is None:
            return self.MAX_WAIT
        return min(self.MAX_WAIT, self.deadline - time.monotonic())

    def _call(self, method, url, action, authorize=True, diagnose=None, **kwargs):
        headers = {"Authorization": f"Bearer {self.token}"} if authorize else {}
        retried = SEND_RETRY_STATUSES if action == "send" else RETRY_STATUSES
        headers.update(kwargs.pop("headers", {}))
        renew = authorize and self.renew_token is not None
        attempt = 0
        while attempt < self.ATTEMPTS:
            attempt += 1
            self.requests += 1
            try:
                response = self.session.request(method, url, headers=headers, timeout=self._timeout_left(), **kwargs)
            except requests.RequestException as exc:
                raise GraphFailed(diagnose_graph_transport(exc, self.base_url)) from None
            if response.status_code < 400:
                return response
            if response.status_code == 401 and renew:  # refused before anything was done: safe to repeat
                renew, attempt = False, attempt - 1
                self.token = self.renew_token()
                headers["Authorization"] = f"Bearer {self.token}"
                continue
            wait = _retry_after(response)
            if response.status_code in retried and attempt < self.ATTEMPTS and wait <= self._wait_allowed():
                _logger.info("Microsoft Graph answered %s; retrying in %.1f s", response.status_code, wait)
                self.sleep(wait)
                continue
            code, message = _error(response)
            found = diagnose_graph(
                response.status_code,
                code,
                message,
                mailbox=self.mailbox,
                action=action,
                retry_after=wait,
                **dict(self.context, **(diagnose or {})),
            )
            raise GraphFailed(found, response.status_code, code, wait)
        raise AssertionError("unreachable")  # the last attempt returns or raises


def delta_expired(exc):
    """Whether a refused delta round means "start again with a full synchronization" (GRAPH-17)."""
    return isinstance(exc, GraphFailed) and (exc.status == 410 or (exc.code or "").lower() in DELTA_EXPIRED_CODES)


SESSION_ENDING_CODES = frozenset(
    {
        "MailboxNotEnabledForRESTAPI",
        "ErrorInvalidUser",
        "ApplicationThrottled",
        "ErrorTooManyObjectsOpened",
        "InvalidAuthenticationToken",
        "ErrorAccessDenied",
    }
)


def about_one_message(exc):
    """Whether Graph's refusal of a request on one message concerns that message only (GRAPH-18: a message
    gone meanwhile, one Exchange cannot convert to MIME...), so that the others may still be read; not
    throttling, the token, access rights, the mailbox or the connection, which end the session."""
    if not isinstance(exc, GraphFailed) or exc.status is None:
        return False
    return exc.status not in (401, 403) and exc.status not in RETRY_STATUSES and exc.code not in SESSION_ENDING_CODES


def _sender_of(raw):
    """{"sender": the From address of a MIME message}, for the diagnosis of a refused send."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    parsed = email.message_from_bytes(head, policy=email.policy.default)
    address = email.utils.parseaddr(str(parsed.get("From", "")))[1]
    return {"sender": address} if address else {}


def _detach(message):
    """Take the attachments out of a MIME message (in place): [(file name, content type, bytes)]."""
    detached = []

    def strip(part):
        if not part.is_multipart():
            return
        kept = []
        for sub in part.get_payload():
            if sub.get_content_disposition() == "attachment":
                detached.append(
                    (sub.get_filename() or "attachment", sub.get_content_type(), sub.get_payload(decode=True) or b"")
                )
            else:
                strip(sub)
                kept.append(sub)
        part.set_payload(kept)

    strip(message)
    return detached


def _retry_after(response):
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return 5.0 if response.status_code in RETRY_STATUSES else 0.0


def _error(response):
    try:
        error = response.json().get("error") or {}
    except ValueError:
        return "", response.text[:300]
    return str(error.get("code", "")), str(error.get("message", ""))


def _diagnosis(key, kind, summary, fix, detail, **params):
    return Diagnosis(key, kind, summary, fix, detail, params)


def diagnose_graph_transport(exc, host):
    return _diagnosis(
        "GRAPH CONNECT",
        TRANSIENT,
        _lt("Microsoft Graph (%(host)s) could not be reached."),
        _lt(
            "Nothing to change if this is temporary; otherwise check Odoo's outgoing HTTPS access "
            "(proxy, firewall, DNS) to %(host)s."
        ),
        f"{type(exc).__name__}",
        host=host,
    )


RBAC_LINES = (
    "New-ServicePrincipal -AppId %(app_id)s -ObjectId <object ID of the Enterprise application "
    '"%(app_name)s"> -DisplayName "%(app_name)s"\n'
    'New-ManagementScope -Name "Odoo mailboxes" -RecipientRestrictionFilter "PrimarySmtpAddress -eq '
    "'%(mailbox)s'\"\n"
    'New-ManagementRoleAssignment -App %(app_id)s -Role "Application Mail.ReadWrite" -CustomResourceScope '
    '"Odoo mailboxes"\n'
    'New-ManagementRoleAssignment -App %(app_id)s -Role "Application Mail.Send" -CustomResourceScope '
    '"Odoo mailboxes"\n'
    "Test-ServicePrincipalAuthorization -Identity %(app_id)s -Resource %(mailbox)s"
)


def diagnose_graph(
    status, code, message, *, mailbox, action="read", app_only=False, retry_after=0, on_behalf=False, **context
):
    """A Graph refusal (HTTP status, Graph's error code and message) in plain words with the fix.
    ``on_behalf``: the outgoing server sends on behalf of the mailbox (Send on Behalf, not Send As)."""
    params = dict(context, mailbox=mailbox, action=action, retry_after=int(retry_after or 0))
    params.setdefault("app_id", "<application (client) ID>")
    params.setdefault("app_name", "Odoo")
    params.setdefault("login", mailbox)
    params.setdefault("sender", mailbox)
    params["rbac_lines"] = RBAC_LINES % params
    detail = _first_line(f"{status} {code}: {message}")
    if status in (429, 503, 504) or code in ("ApplicationThrottled", "ErrorTooManyObjectsOpened"):
        return _diagnosis(
            "GRAPH THROTTLED",
            TRANSIENT,
            _lt("Microsoft Graph is busy or throttling this mailbox (it asked to wait %(retry_after)s s)."),
            _lt(
                "Nothing to change: Odoo waits as Microsoft asks and tries again. If it happens often, fewer "
                "programs should use this mailbox through Graph at the same time (Graph allows 4 concurrent "
                "requests per app and mailbox)."
            ),
            detail,
            **params,
        )
    if status == 401 or code == "InvalidAuthenticationToken":
        return _diagnosis(
            "GRAPH TOKEN",
            CONFIGURATION,
            _lt("Microsoft Graph rejected the access token."),
            _lt(
                "Click Authorize again (the sign-in asks for the Microsoft Graph permissions). If it repeats, check "
                "that the app registration lists Microsoft Graph's Mail.ReadWrite and Mail.Send permissions."
            ),
            detail,
            **params,
        )
    if code == "MailboxNotEnabledForRESTAPI" or code == "ErrorInvalidUser":
        return _diagnosis(
            "GRAPH MAILBOX",
            CONFIGURATION,
            _lt(
                "Microsoft Graph cannot open the mailbox %(mailbox)s: it is inactive, deleted, not licensed for "
                "Exchange Online, or hosted on-premises."
            ),
            _lt(
                "Check the address, that the mailbox exists in Exchange Online with a licence (a shared mailbox "
                "needs none), and that it is not on an on-premises Exchange server (Graph reaches Exchange Online "
                "mailboxes only; use Transport: Exchange protocols there)."
            ),
            detail,
            **params,
        )
    if code == "ErrorSendAsDenied" and on_behalf and not app_only:
        return send_on_behalf_denied(detail, **params)
    if code == "ErrorSendAsDenied" and not app_only and params["login"].lower() != params["sender"].lower():
        # A delegate (GRAPH-19): Send As, or Send on Behalf with the server's option; never the mailbox itself.
        return _diagnosis(
            "GRAPH SEND AS",
            CONFIGURATION,
            _lt(
                "Exchange Online refused to send as %(sender)s: %(login)s has neither Send As nor Send on Behalf on it."
            ),
            _lt(
                "Grant Send As in Exchange Online PowerShell (the recipients see %(sender)s only):\n"
                'Add-RecipientPermission -Identity "%(sender)s" -Trustee "%(login)s" -AccessRights SendAs\n'
                "or grant Send on Behalf and tick Send on behalf on the outgoing server (the recipients see "
                '"%(login)s on behalf of %(sender)s"):\n'
                'Set-Mailbox -Identity "%(sender)s" -GrantSendOnBehalfTo @{Add="%(login)s"}\n'
                "A new permission can take up to an hour to apply."
            ),
            detail,
            **params,
        )
    if code == "ErrorSendAsDenied":
        return _diagnosis(
            "GRAPH SEND AS",
            CONFIGURATION,
            _lt("Exchange Online refused to send as the message's From address through %(mailbox)s."),
            _lt(
                "Grant Send As in Exchange Online PowerShell:\n"
                'Add-RecipientPermission -Identity "<From address>" -Trustee "%(mailbox)s" -AccessRights SendAs\n'
                "or send from %(mailbox)s's own address. A new permission can take up to an hour to apply."
            ),
            detail,
            **params,
        )
    if code == "ErrorInvalidRecipients":
        return _diagnosis(
            "GRAPH RECIPIENTS",
            CONFIGURATION,
            _lt("Microsoft Graph refused the message: it has no valid recipient."),
            _lt("Check the recipients' addresses of this message, then send it again."),
            detail,
            **params,
        )
    if status == 413 or code in ("ErrorMessageSizeExceeded", "RequestBodyTooLarge"):
        return _diagnosis(
            "GRAPH TOO LARGE",
            CONFIGURATION,
            _lt("The message is larger than Microsoft 365 accepts for %(mailbox)s."),
            _lt(
                "Send smaller attachments (share large files as links). The organisation's maximum message size is "
                "set in Exchange Online (Set-Mailbox -MaxSendSize; 35 MB by default)."
            ),
            detail,
            **params,
        )
    if status == 403 or code == "ErrorAccessDenied":
        if app_only:
            if "AccessPolicy" in (message or "") or "RAOP" in (message or ""):
                return _diagnosis(
                    "GRAPH APP SCOPE",
                    CONFIGURATION,
                    _lt(
                        "The app may use Microsoft Graph, but the organisation's scope for it does not include "
                        "%(mailbox)s."
                    ),
                    _lt(
                        "Add the mailbox to the app's management scope (RBAC for Applications) in Exchange Online "
                        "PowerShell, for example:\n%(rbac_lines)s"
                    ),
                    detail,
                    **params,
                )
            return _diagnosis(
                "GRAPH APP PERMISSION",
                CONFIGURATION,
                _lt("The app has no Microsoft Graph permission on the mail of %(mailbox)s."),
                _lt(
                    "Give it the mailbox the way Microsoft recommends, RBAC for Applications, in Exchange Online "
                    "PowerShell:\n%(rbac_lines)s\n"
                    "(or, for every mailbox of the organisation, the Microsoft Graph application permissions "
                    'Mail.ReadWrite and Mail.Send with "Grant admin consent" in Entra ID).'
                ),
                detail,
                **params,
            )
        if params["login"].lower() != mailbox.lower() and on_behalf:
            return _diagnosis(
                "GRAPH SHARED MAILBOX",
                CONFIGURATION,
                _lt("%(login)s may not use the mailbox %(mailbox)s through Microsoft Graph."),
                _lt(
                    "The app registration needs the delegated Microsoft Graph permissions Mail.ReadWrite.Shared and "
                    "Mail.Send.Shared (then Authorize again), and %(login)s needs Full Access and Send on Behalf on "
                    "%(mailbox)s, in Exchange Online PowerShell:\n"
                    'Add-MailboxPermission -Identity "%(mailbox)s" -User "%(login)s" -AccessRights FullAccess\n'
                    'Set-Mailbox -Identity "%(mailbox)s" -GrantSendOnBehalfTo @{Add="%(login)s"}'
                ),
                detail,
                **params,
            )
        if params["login"].lower() != mailbox.lower():
            return _diagnosis(
                "GRAPH SHARED MAILBOX",
                CONFIGURATION,
                _lt("%(login)s may not use the mailbox %(mailbox)s through Microsoft Graph."),
                _lt(
                    "The app registration needs the delegated Microsoft Graph permissions Mail.ReadWrite.Shared and "
                    "Mail.Send.Shared (then Authorize again), and %(login)s needs Full Access and Send As on "
                    "%(mailbox)s, in Exchange Online PowerShell:\n"
                    'Add-MailboxPermission -Identity "%(mailbox)s" -User "%(login)s" -AccessRights FullAccess\n'
                    'Add-RecipientPermission -Identity "%(mailbox)s" -Trustee "%(login)s" -AccessRights SendAs'
                ),
                detail,
                **params,
            )
        return _diagnosis(
            "GRAPH PERMISSION",
            CONFIGURATION,
            _lt("Microsoft Graph refused access to the mail of %(mailbox)s: a permission is missing."),
            _lt(
                "In Entra ID > App registrations > the app > API permissions, add Microsoft Graph > Delegated "
                "permissions Mail.ReadWrite and Mail.Send, grant consent, then click Authorize again."
            ),
            detail,
            **params,
        )
    if code in ("ErrorItemNotFound", "ErrorInvalidIdMalformed") or status == 404:
        # A folder name Graph cannot take as an id is "malformed" to Graph: the same mistake for the person.
        return _diagnosis(
            "GRAPH NOT FOUND",
            CONFIGURATION,
            _lt("Microsoft Graph did not find the folder or message in %(mailbox)s."),
            _lt(
                "Check the folder chosen on the server: a well-known name (inbox, archive...), a path of folder "
                "names such as Inbox/Support, or a folder id. It may have been renamed or deleted."
            ),
            detail,
            **params,
        )
    return _diagnosis(
        "GRAPH ERROR",
        TRANSIENT if status >= 500 else CONFIGURATION,
        _lt("Microsoft Graph refused the request (%(status)s %(code)s)."),
        _lt("Read Microsoft's message below; Odoo tries again at the next fetch or send."),
        detail,
        **dict(params, status=status, code=code or "?"),
    )


def send_on_behalf_denied(detail, **params):
    """Exchange refused a message From another address sent on behalf of it (Graph's ErrorSendAsDenied or
    SMTP's SendAsDenied): the signed-in user lacks Send on Behalf on the From address (GRAPH-19)."""
    return _diagnosis(
        "SEND ON BEHALF DENIED",
        CONFIGURATION,
        _lt(
            "Exchange Online refused to send on behalf of %(sender)s: %(login)s has no Send on Behalf permission on it."
        ),
        _lt(
            "Grant it in Exchange Online PowerShell:\n"
            'Set-Mailbox -Identity "%(sender)s" -GrantSendOnBehalfTo @{Add="%(login)s"}\n'
            "(or grant Send As and untick Send on behalf on the outgoing server: "
            'Add-RecipientPermission -Identity "%(sender)s" -Trustee "%(login)s" -AccessRights SendAs). '
            "A new permission can take up to an hour to apply."
        ),
        detail,
        **params,
    )


def unscoped_app_warning(roles, **params):
    """An app-only token that carries Graph's Mail application roles reaches every mailbox of the
    organisation: Microsoft recommends scoping it with RBAC for Applications instead (None when scoped)."""
    if not set(roles or ()) & set(APP_PERMISSIONS):
        return None
    params = dict(params)
    params.setdefault("app_id", "<application (client) ID>")
    params.setdefault("app_name", "Odoo")
    params["rbac_lines"] = RBAC_LINES % params
    return _diagnosis(
        "GRAPH APP UNSCOPED",
        CONFIGURATION,
        _lt("The app may read and send mail of EVERY mailbox of the organisation through Microsoft Graph."),
        _lt(
            "Microsoft recommends limiting it to the mailboxes it needs with RBAC for Applications: in Exchange "
            "Online PowerShell\n%(rbac_lines)s\n"
            "then remove the Microsoft Graph application permissions Mail.ReadWrite and Mail.Send from the app "
            "registration in Entra ID (the role assignments replace them)."
        ),
        "",
        **params,
    )
