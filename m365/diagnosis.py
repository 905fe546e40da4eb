"""What Microsoft said, in plain words, with the fix.

One table maps AADSTS codes and IMAP/POP3/SMTP replies to a Diagnosis. Texts are English msgids
marked with ``_lt`` so Odoo's translation extractor collects them; the Odoo layer translates
``summary`` and ``fix`` when it shows them, then fills in ``params``.
"""

import re
from dataclasses import dataclass, field

from .i18n import _lt

RECONNECT = "reconnect"  # the grant is gone: sign in again
TRANSIENT = "transient"  # try again later, nothing to change
CONFIGURATION = "configuration"  # something must be changed in Entra, Exchange or the app registration


@dataclass(frozen=True)
class Diagnosis:
    code: str  # "AADSTS50011", "SMTP 5.7.139", "IMAP AUTHENTICATE", ...
    kind: str
    summary: str
    fix: str
    detail: str = ""  # Microsoft's own text (never contains a token or secret)
    params: dict = field(default_factory=dict)

    @property
    def needs_reconnect(self):
        return self.kind == RECONNECT

    @property
    def transient(self):
        return self.kind == TRANSIENT


_AADSTS = {
    50011: (
        CONFIGURATION,
        _lt("The redirect URI is not registered for this app."),
        _lt(
            "In Entra ID > App registrations > Authentication, add exactly %(redirect_uri)s under "
            'platform "Web". Behind a reverse proxy, check the system parameter web.base.url.'
        ),
    ),
    50194: (
        CONFIGURATION,
        _lt("This app registration is single-tenant but was used without a tenant."),
        _lt("Enter the directory (tenant) ID of the app registration."),
    ),
    90002: (
        CONFIGURATION,
        _lt("Microsoft does not know this tenant."),
        _lt("Check the directory (tenant) ID and the cloud of the app registration."),
    ),
    700016: (
        CONFIGURATION,
        _lt("Microsoft does not know this application (client) ID in this tenant."),
        _lt("Copy the Application (client) ID from the app's overview in Entra ID; check the tenant."),
    ),
    7000215: (
        CONFIGURATION,
        _lt("The client secret is wrong."),
        _lt("Paste the secret's Value (not its Secret ID) from Entra ID > Certificates & secrets."),
    ),
    7000222: (
        CONFIGURATION,
        _lt("The client secret has expired."),
        _lt(
            "Create a new client secret in Entra ID > Certificates & secrets and enter it here "
            "(or switch to a certificate)."
        ),
    ),
    700027: (
        CONFIGURATION,
        _lt("Microsoft rejected the certificate of this app registration."),
        _lt(
            "Upload the same certificate in Entra ID > Certificates & secrets and check its thumbprint and expiry date."
        ),
    ),
    700024: (
        CONFIGURATION,
        _lt("The client assertion is outside its validity period."),
        _lt("Check the server clock of Odoo."),
    ),
    65001: (
        CONFIGURATION,
        _lt("Consent for this app is missing."),
        _lt(
            "An administrator must grant consent for the organisation in Entra ID > API permissions "
            '("Grant admin consent"), then authorize again.'
        ),
    ),
    65004: (
        CONFIGURATION,
        _lt("The sign-in was cancelled: consent was declined, or an administrator's approval was not given."),
        _lt(
            "Authorize again. If Microsoft asked for an administrator's approval, an administrator must first "
            "grant consent for the organisation (the admin consent link on the app registration, or Entra ID > "
            "Enterprise applications > the app > Permissions)."
        ),
    ),
    90094: (
        CONFIGURATION,
        _lt("An administrator must approve this app: users of this organisation may not consent to it."),
        _lt(
            "Ask an Entra ID administrator to grant consent for the organisation (the admin consent link on the "
            "app registration, or Entra ID > Enterprise applications > the app > Permissions > Grant admin "
            "consent), then authorize again."
        ),
    ),
    500011: (
        CONFIGURATION,
        _lt("Exchange Online is not available in this tenant."),
        _lt("Check that the tenant has Exchange Online licences, and the cloud of the app registration."),
    ),
    700022: (
        CONFIGURATION,
        _lt("The requested scopes name more than one resource."),
        _lt("Request only Exchange Online scopes in one sign-in."),
    ),
    54005: (RECONNECT, _lt("The authorization code was already used."), _lt("Authorize again.")),
    70008: (RECONNECT, _lt("The sign-in has expired."), _lt("Authorize the mailbox again.")),
    700082: (RECONNECT, _lt("The sign-in expired after 90 days without use."), _lt("Authorize the mailbox again.")),
    50173: (
        RECONNECT,
        _lt("The sign-in was revoked (sessions revoked or password reset by an administrator)."),
        _lt("Authorize the mailbox again."),
    ),
    50076: (
        RECONNECT,
        _lt("Multi-factor authentication is now required for this account."),
        _lt(
            "Authorize the mailbox again and complete the MFA prompt; ask the administrator about "
            "Conditional Access if this repeats."
        ),
    ),
    50079: (
        RECONNECT,
        _lt("The account must register for multi-factor authentication."),
        _lt("Authorize the mailbox again and complete the MFA registration."),
    ),
    53003: (
        RECONNECT,
        _lt("A Conditional Access policy blocked the sign-in."),
        _lt("Ask the Entra ID administrator to allow this app or this server's location, then authorize again."),
    ),
}

# Refusals that are the app registration's problem (its credentials, tenant, redirect URI), the same
# for every mailbox of the app: a new sign-in of a mailbox does not help.
APP_REGISTRATION_CODES = frozenset(
    f"AADSTS{code}" for code in (50011, 50194, 90002, 700016, 7000215, 7000222, 700027, 700024)
)

_UNKNOWN_OAUTH = (
    _lt("Microsoft refused the request (%(error)s)."),
    _lt("Read Microsoft's message below; if it persists, authorize the mailbox again."),
)


def diagnose_oauth(result, **params):
    """Diagnosis of an MSAL error result (a dict with ``error``, ``error_codes``...)."""
    codes = result.get("error_codes") or _codes_in(result.get("error_description", ""))
    description = _oauth_detail(result.get("error_description", ""))
    for code in codes:
        if code in _AADSTS:
            kind, summary, fix = _AADSTS[code]
            return Diagnosis(f"AADSTS{code}", kind, summary, fix, description, params)
    error = result.get("error") or "unknown_error"
    kind = RECONNECT if error in ("invalid_grant", "interaction_required") else CONFIGURATION
    summary, fix = _UNKNOWN_OAUTH
    if error in ("temporarily_unavailable", "server_error", "throttled"):
        # Throttled (429, AADSTS90055) or down (503, AADSTS90033) beyond the retries: plain words.
        kind = TRANSIENT
        summary, fix = _UNAVAILABLE
    code = f"AADSTS{codes[0]}" if codes else error
    return Diagnosis(code, kind, summary, fix, description, dict(params, error=code))


def diagnose_transport(exc):
    """Diagnosis of a network failure talking to Microsoft's sign-in service."""
    return Diagnosis(
        "NETWORK",
        TRANSIENT,
        _lt("Microsoft's sign-in service could not be reached."),
        _lt(
            "Nothing to change if this is temporary; otherwise check Odoo's outgoing HTTPS access "
            "(proxy, firewall, DNS)."
        ),
        type(exc).__name__,
    )


_UNAVAILABLE = (
    _lt("Microsoft's sign-in service is busy or unavailable for now."),
    _lt("Nothing to change: Odoo tries again at the next fetch or send."),
)


def diagnose_lost_database(detail):
    """Diagnosis of a token refresh whose own database connection was lost (PostgreSQL restarted, the
    connection cut): nothing was stored, the caller's transaction goes on; the next use tries again."""
    return Diagnosis(
        "DATABASE",
        TRANSIENT,
        _lt("Odoo lost its database connection while renewing the access token."),
        _UNAVAILABLE[1],
        str(detail).strip().splitlines()[0][:200] if str(detail).strip() else "",
    )


def diagnose_unavailable(detail):
    """Diagnosis of a 5xx or throttling answer that outlasted the retries."""
    return Diagnosis("UNAVAILABLE", TRANSIENT, *_UNAVAILABLE, str(detail)[:300])


def diagnose_connection(protocol, host, port, exc):
    """Diagnosis of a mail server that could not be reached or spoke no TLS with us."""
    return Diagnosis(
        f"{protocol} CONNECT",
        TRANSIENT,
        _lt("Odoo could not connect to the %(protocol)s server %(host)s:%(port)s."),
        _lt("Check the host, port and encryption of the server, and that Odoo may reach it (firewall, proxy, DNS)."),
        f"{type(exc).__name__}: {exc}"[:300],
        {"protocol": protocol, "host": host, "port": port},
    )


_SMTP_RULES = [
    (
        re.compile(r"5\.7\.30|basic authentication is (?:disabled|not supported)", re.I),
        "SMTP BASIC AUTH",
        CONFIGURATION,
        _lt("Exchange Online no longer accepts a password for sending (Basic authentication)."),
        _lt("Switch this outgoing server to Microsoft 365 (OAuth): no password is needed."),
    ),
    (
        re.compile(r"5\.7\.139"),
        "SMTP 5.7.139",
        CONFIGURATION,
        _lt("SMTP AUTH is disabled for this mailbox or the whole organisation."),
        _lt(
            "In Exchange Online PowerShell run Set-CASMailbox -Identity %(mailbox)s "
            "-SmtpClientAuthenticationDisabled $false (or Set-TransportConfig "
            "-SmtpClientAuthenticationDisabled $false for the organisation)."
        ),
    ),
    (
        re.compile(r"5\.2\.252|SendAsDenied|5\.7\.60", re.I),
        "SMTP SendAsDenied",
        CONFIGURATION,
        _lt("Exchange Online refused to send as %(sender)s: %(login)s has no Send As permission on that address."),
        _lt(
            "Grant Send As in Exchange Online PowerShell:\n"
            'Add-RecipientPermission -Identity "%(sender)s" -Trustee %(trustee)s -AccessRights SendAs\n'
            "or send from %(login)s's own address. A new permission can take up to an hour to apply."
        ),
    ),
    (
        re.compile(r"5\.7\.3|5\.7\.8|535"),
        "SMTP 5.7.3",
        CONFIGURATION,
        _lt("The SMTP server rejected the access token."),
        _lt(
            "Check that the app has the SMTP.Send permission (or SMTP.SendAsApp with the mailbox "
            "permission for app-only) and that the token belongs to this mailbox; then authorize again."
        ),
    ),
]


_CONCURRENCY = re.compile(r"Concurrent connections limit exceeded|sender thread limit exceeded", re.I)


def diagnose_smtp(code, message, **params):
    """Diagnosis of an SMTP failure reply (code and text as smtplib gives them)."""
    text = f"{code} {message.decode(errors='replace') if isinstance(message, bytes) else message}"
    if code == 432 or _CONCURRENCY.search(text):
        return Diagnosis(
            "SMTP 4.3.2",
            TRANSIENT,
            _lt(
                "Exchange Online refused the message for now: too many connections are sending from this "
                "mailbox at the same time (Exchange allows three)."
            ),
            _lt(
                "Nothing is lost: try again in a few minutes (Retry on the message). If it happens often, "
                "send fewer messages at the same time through this mailbox (fewer Odoo workers sending mail, "
                "or no other program sending from it)."
            ),
            _first_line(text),
            params,
        )
    if 400 <= code < 500:
        return Diagnosis(
            f"SMTP {code}",
            TRANSIENT,
            _lt("The mail server asked to try again later."),
            _lt("Nothing to change; Odoo retries."),
            _first_line(text),
            params,
        )
    for pattern, key, kind, summary, fix in _SMTP_RULES:
        if pattern.search(text):
            return Diagnosis(key, kind, summary, fix, _first_line(text), params)
    return Diagnosis(
        f"SMTP {code}",
        CONFIGURATION,
        _lt("The SMTP server refused the login."),
        _lt("Read the server's reply below."),
        _first_line(text),
        params,
    )


_THROTTLED = re.compile(r"Request is throttled\. Suggested Backoff Time: (\d+) milliseconds", re.I)


def diagnose_mailbox(protocol, reply, **params):
    """Diagnosis of an IMAP or POP3 failure reply (bytes or str)."""
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    match = _THROTTLED.search(text)
    if match:
        return Diagnosis(
            f"{protocol} THROTTLED",
            TRANSIENT,
            _lt("The mail server is throttling this mailbox."),
            _lt("Nothing to change; the next fetch waits %(backoff_ms)s ms."),
            _first_line(text),
            dict(params, backoff_ms=int(match[1])),
        )
    if "authenticated but not connected" in text:
        return Diagnosis(
            f"{protocol} NOT CONNECTED",
            CONFIGURATION,
            _lt("Exchange Online accepted the sign-in but refuses to open the mailbox %(mailbox)s."),
            _lt(
                "Check that the mailbox exists and is enabled, and that the signed-in account (or, for app-only, "
                "the app) has Full Access to it. For an app, in Exchange Online PowerShell run "
                "Add-MailboxPermission -Identity %(mailbox)s -User <service principal id> -AccessRights FullAccess."
            ),
            _first_line(text),
            params,
        )
    return Diagnosis(
        f"{protocol} AUTHENTICATE",
        CONFIGURATION,
        _lt("The mail server rejected the access token."),
        _lt(
            "Check that the app has the %(scope)s permission and that the signed-in account "
            "owns or has Full Access to %(mailbox)s; then authorize again."
        ),
        _first_line(text),
        params,
    )


def diagnose_imap_command(command, reply, **params):
    """Diagnosis of a refusal after the IMAP login (on SELECT, SEARCH, FETCH, STORE, LOGOUT): Exchange
    refuses a session on the next command, throttles with BAD + BYE or with NO on FETCH, and answers
    BAD ``Command Argument Error. 11`` to what it does not support."""
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    params = dict(params, command=command)
    if _THROTTLED.search(text) or "authenticated but not connected" in text:
        return diagnose_mailbox("IMAP", text, **params)
    if "Command Argument Error" in text:
        return Diagnosis(
            "IMAP ARGUMENT",
            TRANSIENT,
            _lt("Exchange Online did not accept Odoo's %(command)s command (Command Argument Error)."),
            _lt(
                "Nothing to change in Microsoft 365: unread messages stay on the server and Odoo tries again "
                "at the next fetch. If this repeats, report it with Microsoft's reply below."
            ),
            _first_line(text),
            params,
        )
    return Diagnosis(
        "IMAP COMMAND",
        TRANSIENT,
        _lt("The mail server refused the %(command)s command or closed the connection."),
        _lt(
            "Nothing to change if this is rare: unread messages stay on the server and Odoo tries again at "
            "the next fetch. If it repeats, read the server's reply below."
        ),
        _first_line(text),
        params,
    )


def diagnose_sign_in_refused(found, username, mailbox):
    """The mail server refused a fresh sign-in for the mailbox: say who signed in and who may."""
    params = dict(found.params, username=username, mailbox=mailbox)
    if username and username.lower() != mailbox.lower():
        return Diagnosis(
            "SIGNED IN AS ANOTHER USER",
            CONFIGURATION,
            _lt("You signed in as %(username)s, who may not open the mailbox %(mailbox)s."),
            _lt(
                "Nothing was changed. Authorize again and sign in as %(mailbox)s, or as a user with Full Access "
                "to it (a shared mailbox)."
            ),
            found.detail,
            params,
        )
    return Diagnosis(
        found.code,
        found.kind,
        found.summary,
        found.fix,
        found.detail,
        params,
    )


def _codes_in(description):
    return [int(c) for c in re.findall(r"AADSTS(\d+)", description or "")]


_TRACE_LINE = re.compile(r"^(Trace ID|Correlation ID|Timestamp): ")


def _oauth_detail(description):
    """Entra's error_description on one line: "AADSTS…: text (Trace ID: …, Correlation ID: …,
    Timestamp: …)". Entra separates those with CR LF; an administrator quotes them to Microsoft."""
    lines = [line.strip() for line in (description or "").splitlines() if line.strip()]
    if not lines:
        return ""
    trace = [line for line in lines[1:] if _TRACE_LINE.match(line)]
    return (lines[0] + (f" ({', '.join(trace)})" if trace else ""))[:500]


def _first_line(text):
    return (text or "").strip().splitlines()[0][:500] if (text or "").strip() else ""


APP_ROLES = {"IMAP": "IMAP.AccessAsApp", "POP3": "POP.AccessAsApp", "SMTP": "SMTP.SendAsApp"}


def diagnose_app_only(protocol, found, roles, **params):
    """An app-only login refused by the mail server: name the missing prerequisite and give the
    exact PowerShell lines (Exchange Online PowerShell), as far as the reply allows to tell."""
    params = dict(found.params, **params)
    role = APP_ROLES[protocol]
    if role not in roles:
        return Diagnosis(
            "APP CONSENT",
            CONFIGURATION,
            _lt("The app has no admin consent for %(role)s."),
            _lt(
                "In Entra ID > App registrations > %(app_name)s > API permissions, add Office 365 Exchange Online > "
                'Application permissions > %(role)s, then "Grant admin consent" (or open the admin consent link '
                "on the app registration)."
            ),
            found.detail,
            dict(params, role=role),
        )
    if found.code.endswith("NOT CONNECTED"):
        return Diagnosis(
            "APP MAILBOX PERMISSION",
            CONFIGURATION,
            _lt("The app may sign in, but has no permission on the mailbox %(mailbox)s."),
            _lt(
                "In Exchange Online PowerShell run:\n"
                'Add-MailboxPermission -Identity "%(mailbox)s" -User (Get-ServicePrincipal -Identity '
                "%(app_id)s).Identity -AccessRights FullAccess"
            ),
            found.detail,
            params,
        )
    if protocol == "SMTP":
        return Diagnosis(
            "APP SMTP",
            CONFIGURATION,
            _lt("Exchange Online refused the app's token for %(mailbox)s."),
            _lt(
                "In Exchange Online PowerShell, register the app once and give it the mailbox:\n"
                "New-ServicePrincipal -AppId %(app_id)s -ObjectId <object ID of the Enterprise application "
                '"%(app_name)s">\n'
                'Add-MailboxPermission -Identity "%(mailbox)s" -User (Get-ServicePrincipal -Identity '
                "%(app_id)s).Identity -AccessRights FullAccess"
            ),
            found.detail,
            params,
        )
    return Diagnosis(
        "APP SERVICE PRINCIPAL",
        CONFIGURATION,
        _lt("Exchange Online does not know the app yet (no service principal)."),
        _lt(
            "In Exchange Online PowerShell run:\n"
            "New-ServicePrincipal -AppId %(app_id)s -ObjectId <object ID of the Enterprise application "
            '"%(app_name)s">\n'
            'Add-MailboxPermission -Identity "%(mailbox)s" -User (Get-ServicePrincipal -Identity '
            "%(app_id)s).Identity -AccessRights FullAccess"
        ),
        found.detail,
        params,
    )
