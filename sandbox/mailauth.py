"""The one decision every sandbox mail server asks: may this secret log into this mailbox?

Mirrors what Exchange Online checks for XOAUTH2: a token it issued and that has not expired, the
Exchange audience, the protocol's scope (delegated) or role (app-only), and access to the mailbox:
the user's own, one the user has FullAccess to, or (app-only) one the app's service principal was
granted. Failures carry Exchange's own SMTP replies so clients meet the texts they will meet in
production.
"""

from dataclasses import dataclass

SMTP_OK = "235 2.7.0 Authentication successful"
SMTP_REJECTED = "535 5.7.3 Authentication unsuccessful"
SMTP_AUTH_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. "
    "Visit https://aka.ms/smtp_auth_disabled for more information."
)
SMTP_BASIC_AUTH_DISABLED = "535 5.7.139 Authentication unsuccessful, basic authentication is disabled."
SMTP_BASIC_AUTH_RETIRED = "550 5.7.30 Basic authentication is not supported for Client Submission."

# Exchange Online accepts both of its resource URIs as audience, for user and for app tokens.
EXCHANGE_AUDIENCES = ("https://outlook.office.com", "https://outlook.office365.com")
DELEGATED_SCOPES = {"imap": "IMAP.AccessAsUser.All", "pop3": "POP.AccessAsUser.All", "smtp": "SMTP.Send"}
APP_ROLES = {"imap": "IMAP.AccessAsApp", "pop3": "POP.AccessAsApp", "smtp": "SMTP.SendAsApp"}


@dataclass(frozen=True)
class MailLogin:
    ok: bool
    mailbox: str  # the mailbox logged into (lower-case address)
    identity: str  # a user's UPN, or "app:<client id>" for app-only
    reason: str  # one line for logs
    smtp_reply: str  # Exchange's reply line to AUTH
    # Exchange accepts the token but refuses the session with this text (IMAP/POP3): an app without
    # mailbox permission, or throttling.
    session_refusal: str = ""


NOT_CONNECTED = "User is authenticated but not connected."
THROTTLED = "Request is throttled. Suggested Backoff Time: {backoff_ms} milliseconds"


def take_throttle(directory, mailbox, where):
    """The back-off (ms) when the control interface throttles `mailbox` at `where` ("command": the
    session after login, "fetch" / "store": IMAP FETCH / STORE); None otherwise. Each use counts down."""
    return directory.take_mail_throttle(mailbox, where)


def _throttled(directory, login, protocol):
    """A mailbox the control interface throttles refuses IMAP/POP3 sessions for a while."""
    backoff_ms = None if protocol == "smtp" else take_throttle(directory, login.mailbox, "command")
    if backoff_ms is None:
        return login
    return MailLogin(
        False,
        login.mailbox,
        login.identity,
        "throttled",
        SMTP_REJECTED,
        session_refusal=THROTTLED.format(backoff_ms=backoff_ms),
    )


def _refused(mailbox, identity, reason, smtp_reply=SMTP_REJECTED):
    return MailLogin(False, mailbox, identity, reason, smtp_reply)


def _session(directory, box, login, protocol):
    """A token Exchange accepts can still meet a session it refuses: a disabled mailbox (assumed to
    answer like an app without permission, IMAP-08), or throttling."""
    if protocol != "smtp" and not box.get("enabled", True):
        return MailLogin(False, login.mailbox, login.identity, "the mailbox is disabled", SMTP_REJECTED, NOT_CONNECTED)
    return _throttled(directory, login, protocol)


def check_mail_login(directory, mailbox, protocol, secret, mechanism):
    directory.count(f"mail_login:{protocol}")
    mailbox = (mailbox or "").strip().lower()
    box = directory.mailbox(mailbox)
    if box is None:
        return _refused(mailbox, "", f"no such mailbox {mailbox!r}")
    if protocol == "smtp" and not box["smtp_auth"]:
        return _refused(mailbox, "", "SMTP AUTH is disabled for the mailbox", SMTP_AUTH_DISABLED)
    if mechanism == "password":
        if protocol == "smtp" and directory.settings.get("smtp_basic_auth_retired"):
            return _refused(mailbox, mailbox, "basic authentication retired", SMTP_BASIC_AUTH_RETIRED)
        user = directory.user(mailbox)
        if not directory.basic_auth_allowed or not user or not user.get("password") or user["password"] != secret:
            reply = SMTP_REJECTED if directory.basic_auth_allowed else SMTP_BASIC_AUTH_DISABLED
            return _refused(mailbox, mailbox, "basic authentication refused", reply)
        return MailLogin(True, mailbox, mailbox, "password accepted", SMTP_OK)

    claims, problem = directory.verify_access_token(secret)
    if problem:
        return _refused(mailbox, "", problem)
    if "scp" in claims:  # delegated: a user's token
        if claims.get("aud") not in EXCHANGE_AUDIENCES:
            return _refused(mailbox, claims.get("upn", ""), f"audience {claims.get('aud')!r} is not Exchange Online")
        needed = DELEGATED_SCOPES[protocol]
        if needed not in claims["scp"].split():
            return _refused(mailbox, claims.get("upn", ""), f"scope {needed} missing")
        upn = claims.get("upn", "").lower()
        if protocol == "smtp" and upn != mailbox:
            # SMTP AUTH takes only the signed-in user as user=, even with FullAccess; the shared
            # address goes in From and needs Send As (CONFORMANCE SMTP-05).
            return _refused(mailbox, upn, f"SMTP AUTH accepts only the signed-in user {upn}, not {mailbox}")
        if upn != mailbox and not directory.has_full_access(upn, mailbox):
            return _refused(mailbox, upn, f"{upn} has no access to mailbox {mailbox}")
        return _session(directory, box, MailLogin(True, mailbox, upn, "token accepted", SMTP_OK), protocol)
    # app-only: roles granted by admin consent, mailbox access granted in Exchange
    identity = f"app:{claims.get('appid', '')}"
    if claims.get("aud") not in EXCHANGE_AUDIENCES:
        return _refused(mailbox, identity, f"audience {claims.get('aud')!r} is not Exchange Online")
    needed = APP_ROLES[protocol]
    if needed not in claims.get("roles", []):
        return _refused(mailbox, identity, f"role {needed} missing")
    if not directory.service_principal_registered(claims.get("appid"), claims.get("tid")):
        return _refused(mailbox, identity, "the app has no service principal in Exchange Online")
    if not directory.has_full_access(identity, mailbox):
        return MailLogin(
            False,
            mailbox,
            identity,
            f"the app has no FullAccess permission on {mailbox}",
            SMTP_REJECTED,
            session_refusal=NOT_CONNECTED,
        )
    return _session(directory, box, MailLogin(True, mailbox, identity, "token accepted", SMTP_OK), protocol)


def may_send_as(directory, login, from_address):
    """Exchange's Send As rule: the mailbox's own address, or an address one was granted Send As on;
    "on_behalf" (truthy) when the signed-in user may only send on behalf of it (GRAPH-19, SMTP assumed)."""
    address = (from_address or "").strip().lower()
    if (
        login.identity
        and not login.identity.startswith("app:")
        and address != login.identity
        and not directory.has_send_as(login.identity, address)
        and directory.has_send_on_behalf(login.identity, address)
    ):
        return "on_behalf"
    if address == login.mailbox:
        # An app's FullAccess covers sending from that mailbox; a delegate also needs Send As.
        return (
            login.identity in (login.mailbox, "")
            or login.identity.startswith("app:")
            or directory.has_send_as(login.identity, address)
        )
    return directory.has_send_as(login.identity, address) or directory.has_send_as(login.mailbox, address)
