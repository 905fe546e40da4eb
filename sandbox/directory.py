"""What the sandbox's Microsoft 365 knows: tenants, app registrations, users, mailboxes, grants and
the tokens it issued. One JSON file in the state folder; every method is thread-safe.

Ids are stable (uuid5 of the names) so a configured Odoo survives a sandbox restart; secrets are
random per state folder and published in sandbox.json.
"""

import copy
import hashlib
import json
import os
import random
import secrets
import threading
import time
import uuid
from pathlib import Path

from . import ca
from .tokens import TokenSigner

NAMESPACE = uuid.UUID("6d1c8a52-6a8e-4c63-9d1c-2b1f5a0e3b77")
DAY = 86400
# Odoo's default port, and the one a test run's Odoo listens on (bin/test picks a free one, so that
# runs side by side do not collide): the app registration lists both, as an administrator would.
ODOO_PORTS = sorted({8069, int(os.environ.get("M365_ODOO_HTTP_PORT") or 8069)})
ODOO_REDIRECT_URIS = [
    f"http://{host}:{port}/microsoft365/{path}/callback"
    for path in ("oauth", "signin")  # the mail's and the sign-in's (issue 13)
    for port in ODOO_PORTS
    for host in ("localhost", "127.0.0.1")
]
DELEGATED_PERMISSIONS = ["IMAP.AccessAsUser.All", "POP.AccessAsUser.All", "SMTP.Send"]
APPLICATION_PERMISSIONS = ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"]
# Microsoft Graph's mail permissions (CONFORMANCE GRAPH-02): listed on every seeded app registration.
GRAPH_DELEGATED_PERMISSIONS = ["Mail.ReadWrite", "Mail.ReadWrite.Shared", "Mail.Send", "Mail.Send.Shared"]
GRAPH_APPLICATION_PERMISSIONS = ["Mail.ReadWrite", "Mail.Send"]
APP_DEFAULTS = {"graph_delegated": GRAPH_DELEGATED_PERMISSIONS, "graph_application": GRAPH_APPLICATION_PERMISSIONS}


# Settings added after a state folder may have been seeded: merged into older directories too.
SETTINGS_DEFAULTS = {
    "single_use_refresh_tokens": True,
    # SMTP submission (sandbox/CONFORMANCE.md SMTP-07, SMTP-10, SMTP-11)
    "smtp_basic_auth_retired": False,  # AUTH LOGIN answered 550 5.7.30
    "smtp_send_as_denied": "5.2.252",  # or "5.2.0" or "5.7.60": Exchange's three wordings
    "smtp_concurrency_limit": 3,  # authenticated connections per mailbox
    "smtp_concurrency_reply": "concurrent",  # or "sender_thread": the documented wording
    # Identity platform (CONFORMANCE ID-15)
    "user_consent_allowed": True,  # False: users may not consent, only administrators
    "admin_consent_error": "access_denied",  # or "consent_required", Microsoft's example (ID-24)
    # Access tokens live a random time from access_token_lifetime up to this (TOK-01: 60-90 minutes
    # in Microsoft's cloud); 0: always access_token_lifetime.
    "access_token_lifetime_max": 0,
    # Microsoft Graph (CONFORMANCE GRAPH rows)
    "graph_keep_custom_headers": False,  # sendMail with MIME drops X- headers and Auto-Submitted (GRAPH-06)
    "graph_replace_message_id": False,  # True: sendMail gives the message a Message-ID of its own (assumed)
    "graph_concurrency_limit": 4,  # concurrent requests per app and mailbox (GRAPH-10)
    "graph_max_message_bytes": 35 * 1024 * 1024,  # the tenant's maximum message size (GRAPH-08)
    "graph_delta_states": 1000,  # delta sync states kept; older ones evicted: 410 SyncStateNotFound (GRAPH-17)
    # Network: a round-trip time added to every connection and every reply of the identity platform,
    # IMAP, POP3, SMTP and Graph (Microsoft is 30-150 ms away from most Odoo servers; loopback is 0).
    "latency_ms": 0,
}


def stable_id(*names):
    return str(uuid.uuid5(NAMESPACE, "/".join(names)))


def _secret():
    # Shaped like Entra's secrets: 40 characters with a '~'
    return secrets.token_urlsafe(27)[:3] + "8Q~" + secrets.token_urlsafe(30)[:34]


def default_seed():
    contoso, fabrikam = stable_id("tenant", "contoso"), stable_id("tenant", "fabrikam")
    now = time.time()
    odoo_app = stable_id("app", "odoo")
    key_pem, cert_pem = ca.make_client_certificate("Odoo Mail (sandbox)", days=730)
    expired_key_pem, expired_cert_pem = ca.make_client_certificate("Odoo Mail (expired)", days=-1, not_before_days=400)

    def user(upn, tenant, name, admin=False, email=None, home_tenant=None, home_upn=None):
        return {
            "upn": upn,
            "tenant": tenant,
            "oid": stable_id("user", upn),
            "name": name,
            "admin": admin,
            "password": f"Sandbox-{upn.split('@')[0]}-1!",
            "require_mfa": False,
            "sessions_valid_after": 0,
            # The Mail attribute: for a user without a mailbox, its tenant's administrators may set it to
            # any address, verified or not (the "nOAuth" case, CONFORMANCE SIGNIN-03).
            "email": email,
            # Guests (B2B): a user object of this tenant, authenticated by its home tenant.
            "home_tenant": home_tenant,
            "home_upn": home_upn,
        }

    users = [
        user("admin@contoso.com", contoso, "Contoso Admin", admin=True, email="admin@contoso.com"),
        user("alice@contoso.com", contoso, "Alice Anders", email="alice@contoso.com"),
        user("bob@contoso.com", contoso, "Bob Berg", email="bob@contoso.com"),
        user("carol@fabrikam.onmicrosoft.com", fabrikam, "Carol Cruz", admin=True),
        # A Fabrikam user without a mailbox: Fabrikam's administrator can set her Mail to anything.
        user("mallory@fabrikam.onmicrosoft.com", fabrikam, "Mallory Mohr"),
        # Carol invited into Contoso as a guest: her own object id in Contoso, authenticated by Fabrikam.
        user(
            "carol_fabrikam.onmicrosoft.com#EXT#@contoso.onmicrosoft.com",
            contoso,
            "Carol Cruz (Fabrikam)",
            email="carol@fabrikam.onmicrosoft.com",
            home_tenant=fabrikam,
            home_upn="carol@fabrikam.onmicrosoft.com",
        ),
    ]
    mailboxes = [
        {"address": u["upn"], "tenant": u["tenant"], "kind": "user", "smtp_auth": True}
        for u in users
        if u["tenant"] == contoso and not u["home_tenant"]
    ]
    mailboxes += [
        {"address": "info@contoso.com", "tenant": contoso, "kind": "shared", "smtp_auth": True},
        {"address": "sales@contoso.com", "tenant": contoso, "kind": "shared", "smtp_auth": True},
    ]
    apps = [
        {
            "client_id": odoo_app,
            "name": "Odoo Mail (sandbox)",
            "home_tenant": contoso,
            "multi_tenant": False,
            "redirect_uris": list(ODOO_REDIRECT_URIS),
            "secrets": [
                {
                    "id": stable_id("secret", odoo_app, "current"),
                    "value": _secret(),
                    "expires": now + 365 * DAY,
                    "name": "current",
                },
                {
                    "id": stable_id("secret", odoo_app, "expired"),
                    "value": _secret(),
                    "expires": now - DAY,
                    "name": "expired",
                },
            ],
            "certificates": [
                {
                    "thumbprint": ca.thumbprint(cert_pem),
                    "certificate": cert_pem,
                    "private_key": key_pem,
                    "name": "current",
                },
                {
                    "thumbprint": ca.thumbprint(expired_cert_pem),
                    "certificate": expired_cert_pem,
                    "private_key": expired_key_pem,
                    "name": "expired",
                },
            ],
            "delegated": DELEGATED_PERMISSIONS,
            "application": APPLICATION_PERMISSIONS,
        },
        {
            "client_id": stable_id("app", "partner"),
            "name": "Partner Mail (multi-tenant)",
            "home_tenant": contoso,
            "multi_tenant": True,
            "redirect_uris": list(ODOO_REDIRECT_URIS),
            "secrets": [
                {
                    "id": stable_id("secret", "partner"),
                    "value": _secret(),
                    "expires": now + 365 * DAY,
                    "name": "current",
                }
            ],
            "certificates": [],
            "delegated": DELEGATED_PERMISSIONS,
            "application": APPLICATION_PERMISSIONS,
        },
        {
            "client_id": stable_id("app", "unconsented"),
            "name": "Unconsented app",
            "home_tenant": contoso,
            "multi_tenant": False,
            "redirect_uris": list(ODOO_REDIRECT_URIS),
            "secrets": [
                {
                    "id": stable_id("secret", "unconsented"),
                    "value": _secret(),
                    "expires": now + 365 * DAY,
                    "name": "current",
                }
            ],
            "certificates": [],
            "delegated": DELEGATED_PERMISSIONS,
            "application": APPLICATION_PERMISSIONS,
        },
    ]
    consents = [  # tenant-wide admin consent per app and tenant
        {"client_id": odoo_app, "tenant": contoso, "delegated": True, "application": True},
        {"client_id": stable_id("app", "partner"), "tenant": contoso, "delegated": True, "application": True},
    ]
    service_principals = [  # registered in Exchange Online with New-ServicePrincipal
        {"client_id": odoo_app, "tenant": contoso, "object_id": stable_id("sp", odoo_app, contoso)},
    ]
    grants = [
        {"right": "full_access", "identity": "alice@contoso.com", "mailbox": "info@contoso.com"},
        {"right": "send_as", "identity": "alice@contoso.com", "mailbox": "info@contoso.com"},
        {"right": "full_access", "identity": f"app:{odoo_app}", "mailbox": "info@contoso.com"},
        {"right": "full_access", "identity": f"app:{odoo_app}", "mailbox": "sales@contoso.com"},
    ]
    return {
        "tenants": [
            {"id": contoso, "name": "Contoso", "domains": ["contoso.onmicrosoft.com", "contoso.com"], "exchange": True},
            {"id": fabrikam, "name": "Fabrikam", "domains": ["fabrikam.onmicrosoft.com"], "exchange": False},
        ],
        "users": users,
        "mailboxes": mailboxes,
        "apps": apps,
        "consents": consents,
        "service_principals": service_principals,
        "grants": grants,
        "settings": {
            "access_token_lifetime": 3600,
            "refresh_token_lifetime": 90 * DAY,
            "basic_auth_allowed": False,
            **SETTINGS_DEFAULTS,
        },
    }


class Directory:
    def __init__(self, state_dir):
        self._lifetimes = random.Random(75)  # reproducible runs: the same lifetimes in the same order
        self.path = Path(state_dir) / "directory.json"
        seed_path = Path(state_dir) / "seed.json"
        if not seed_path.exists():  # the seed's secrets and certificates stay the same across resets
            seed_path.write_text(json.dumps(default_seed(), indent=1))
            seed_path.chmod(0o600)
        self.seed = json.loads(seed_path.read_text())
        self.lock = threading.RLock()
        self.signer = TokenSigner(state_dir)
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            self._add_default_settings()
        else:
            self.reset()
        self.codes = {}  # authorization codes live in memory: they expire in minutes anyway
        self.sessions = {}  # sign-in page cookie -> upn
        self.counters = {}
        self.fault = None
        self.id_token_fault = None  # {"kind", "remaining"}: see IdentityServer._id_token
        self.mail_throttles = {}  # mailbox -> {"backoff_ms", "remaining", "where"}
        self.mail_stalls = {}  # mailbox -> threading.Event, set when the stall is released
        self.session_order = []  # mailboxes in the order their IMAP/POP3 sessions opened (last 1000)
        self.mail_sessions = {}  # mailbox -> IMAP/POP3 sessions open now
        self.setting_overrides = {}  # settings given to the constructor (e.g. latency): kept across resets

    # persistence ---------------------------------------------------------------------------

    def reset(self):
        with self.lock:
            self.data = copy.deepcopy(self.seed)
            self._add_default_settings()
            self.data.setdefault("refresh_tokens", {})
            self.data.setdefault("access_tokens_valid_after", {})
            self.codes, self.sessions, self.counters, self.fault = {}, {}, {}, None
            self.id_token_fault = None
            self.session_order = []
            self.mail_throttles = {}
            self._lifetimes.seed(75)
            self.data["settings"].update(getattr(self, "setting_overrides", {}))
            self.release_stalls()
            self.save()

    def _add_default_settings(self):
        for key, value in SETTINGS_DEFAULTS.items():
            self.data["settings"].setdefault(key, value)
        for app in self.data["apps"]:  # state folders seeded before Graph
            for key, value in APP_DEFAULTS.items():
                app.setdefault(key, list(value))

    def save(self):
        with self.lock:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.data, indent=1))
            temporary.chmod(0o600)
            temporary.replace(self.path)

    def take_mail_throttle(self, mailbox, where="command"):
        """The back-off in ms when this use of the mailbox must be throttled (and counts it), else None."""
        with self.lock:
            throttle = self.mail_throttles.get((mailbox or "").lower())
            if not throttle or throttle["remaining"] <= 0 or throttle.get("where", "command") != where:
                return None
            throttle["remaining"] -= 1
            return throttle["backoff_ms"]

    def latency(self):
        """The round-trip time (seconds) the servers add to each connection and each reply."""
        return max(0, float(self.settings.get("latency_ms") or 0)) / 1000

    def stall_mail(self, mailbox, stalled=True, where="command"):
        """While stalled, every IMAP/POP3 command of the mailbox after login waits (a hung server),
        or only the commands named `where` (an IMAP verb such as "store")."""
        mailbox = (mailbox or "").lower()
        with self.lock:
            stall = self.mail_stalls.pop(mailbox, None)
            if stall:
                stall[0].set()
            if stalled:
                self.mail_stalls[mailbox] = (threading.Event(), (where or "command").lower())

    def release_stalls(self):
        with self.lock:
            stalls = getattr(self, "mail_stalls", {})
            for event, _where in stalls.values():
                event.set()
            stalls.clear()

    def wait_if_stalled(self, mailbox, verb=""):
        """Blocks while the mailbox is stalled; `stalled_now:<mailbox>` counts the waiting sessions."""
        mailbox = (mailbox or "").lower()
        with self.lock:
            event, where = self.mail_stalls.get(mailbox) or (None, "")
        if event is None or where not in ("command", (verb or "").lower()):
            return
        self.count(f"stalled_now:{mailbox}")
        self.count(f"stalled:{mailbox}")
        try:
            event.wait(3600)
        finally:
            self.count(f"stalled_now:{mailbox}", -1)

    def mail_session(self, mailbox, protocol, opened):
        """Counts the IMAP/POP3 sessions of a mailbox: `<protocol>_sessions:<mailbox>` (all so far),
        `<protocol>_open_max:<mailbox>` (most open at once) and `<protocol>_order` (who logged in when)."""
        mailbox = (mailbox or "").lower()
        with self.lock:
            key = (protocol, mailbox)
            now = self.mail_sessions.get(key, 0) + (1 if opened else -1)
            self.mail_sessions[key] = now
            if opened:
                self.count(f"{protocol}_sessions:{mailbox}")
                most = f"{protocol}_open_max:{mailbox}"
                self.counters[most] = max(self.counters.get(most, 0), now)
                self.session_order.append(mailbox)
                del self.session_order[:-1000]

    def add_mailboxes(self, addresses, kind="user", tenant=None, app_access=True):
        """More Contoso mailboxes (scale runs): users with their own mailbox (`kind` "user", who can
        sign in) or shared mailboxes; `app_access`: the Odoo app gets FullAccess and Send As on them."""
        tenant = tenant or stable_id("tenant", "contoso")
        app = f"app:{stable_id('app', 'odoo')}"
        with self.lock:
            known = {m["address"] for m in self.data["mailboxes"]}
            added = []
            for address in addresses:
                address = address.lower()
                if address in known:
                    continue
                known.add(address)
                added.append(address)
                if kind == "user":
                    self.data["users"].append(
                        {
                            "upn": address,
                            "tenant": tenant,
                            "oid": stable_id("user", address),
                            "name": address.split("@")[0],
                            "admin": False,
                            "password": f"Sandbox-{address.split('@')[0]}-1!",
                            "require_mfa": False,
                            "sessions_valid_after": 0,
                        }
                    )
                self.data["mailboxes"].append({"address": address, "tenant": tenant, "kind": kind, "smtp_auth": True})
                if app_access:
                    self.data["grants"] += [
                        {"right": "full_access", "identity": app, "mailbox": address},
                        {"right": "send_as", "identity": app, "mailbox": address},
                    ]
            self.save()
            return added

    def count(self, name, amount=1):
        with self.lock:
            self.counters[name] = self.counters.get(name, 0) + amount

    # lookups -------------------------------------------------------------------------------

    @property
    def settings(self):
        return self.data["settings"]

    def access_token_lifetime(self):
        """Seconds the next access token lives (TOK-01)."""
        shortest, longest = self.settings["access_token_lifetime"], self.settings["access_token_lifetime_max"]
        return self._lifetimes.randint(shortest, longest) if longest > shortest else shortest

    @property
    def basic_auth_allowed(self):
        return self.settings["basic_auth_allowed"]

    def tenant(self, key):
        """By GUID or by any of its domains; None when unknown."""
        key = (key or "").lower()
        return next((t for t in self.data["tenants"] if t["id"] == key or key in t["domains"]), None)

    def app(self, client_id):
        return next((a for a in self.data["apps"] if a["client_id"] == (client_id or "").lower()), None)

    def user(self, upn):
        # UPNs are case-insensitive (a guest's carries "#EXT#")
        return next((u for u in self.data["users"] if u["upn"].lower() == (upn or "").lower()), None)

    def users_of(self, tenant_id=None):
        return [u for u in self.data["users"] if tenant_id is None or u["tenant"] == tenant_id]

    def mailbox(self, address):
        return next((m for m in self.data["mailboxes"] if m["address"] == (address or "").lower()), None)

    def consent(self, client_id, tenant_id):
        return next(
            (c for c in self.data["consents"] if c["client_id"] == client_id and c["tenant"] == tenant_id), None
        )

    def service_principal_registered(self, client_id, tenant_id):
        return any(sp["client_id"] == client_id and sp["tenant"] == tenant_id for sp in self.data["service_principals"])

    def _granted(self, right, identity, mailbox):
        return any(
            g["right"] == right
            and g["identity"] == (identity or "").lower()
            and g["mailbox"] == (mailbox or "").lower()
            for g in self.data["grants"]
        )

    def has_full_access(self, identity, mailbox):
        return self._granted("full_access", identity, mailbox)

    def has_send_as(self, identity, address):
        return self._granted("send_as", identity, address)

    def has_send_on_behalf(self, identity, address):
        """Set-Mailbox -Identity <address> -GrantSendOnBehalfTo @{Add=<identity>} (GRAPH-19)."""
        return self._granted("send_on_behalf", identity, address)

    # refresh tokens (opaque, stored by hash) -------------------------------------------------

    @staticmethod
    def _digest(token):
        return hashlib.sha256(token.encode()).hexdigest()

    def issue_refresh_token(self, grant):
        token = "0.A" + secrets.token_urlsafe(96)
        with self.lock:
            self.data["refresh_tokens"][self._digest(token)] = {
                **grant,
                "issued": time.time(),
                "expires": time.time() + self.settings["refresh_token_lifetime"],
                "used": False,
            }
            self.save()
        return token

    def redeem_refresh_token(self, token):
        """The grant behind a refresh token, marking it used; (grant, problem)."""
        with self.lock:
            grant = self.data["refresh_tokens"].get(self._digest(token or ""))
            if grant is None:
                return None, "unknown"
            if grant["used"] and self.settings["single_use_refresh_tokens"]:
                return grant, "used"
            if grant["expires"] < time.time():
                return grant, "expired"
            user = self.user(grant["upn"])
            if user is None or grant["issued"] <= user["sessions_valid_after"]:
                return grant, "revoked"
            grant["used"] = True
            self.save()
            return dict(grant), None

    def expire_refresh_tokens(self, upn=None):
        with self.lock:
            for grant in self.data["refresh_tokens"].values():
                if upn is None or grant["upn"] == upn:
                    grant["expires"] = time.time() - 1
            self.save()

    def revoke_sessions(self, upn):
        with self.lock:
            self.user(upn)["sessions_valid_after"] = time.time()
            self.sessions = {cookie: who for cookie, who in self.sessions.items() if who != upn}
            self.save()

    def expire_access_tokens(self, subject=None):
        """Access tokens issued until now stop working at the mail servers (subject: upn or app:<id>)."""
        with self.lock:
            self.data["access_tokens_valid_after"][subject or "*"] = time.time()
            self.save()

    def verify_access_token(self, token):
        """(claims, None) or (None, reason): what Exchange Online checks before anything else."""
        claims, problem = self.signer.verify(token or "")
        if problem:
            return None, problem
        subject = claims.get("upn", "").lower() or f"app:{claims.get('appid', '')}"
        valid_after = self.data["access_tokens_valid_after"]
        if claims["iat"] <= max(valid_after.get("*", 0), valid_after.get(subject, 0)):
            return None, "token revoked"
        return claims, None

    # mutations used by the control interface -------------------------------------------------

    def update(self, collection, match, values):
        with self.lock:
            for item in self.data[collection]:
                if all(item.get(k) == v for k, v in match.items()):
                    item.update(values)
                    self.save()
                    return item
            raise KeyError(f"no {collection} entry matching {match}")

    def set_membership(self, collection, entry, present):
        with self.lock:
            items = [item for item in self.data[collection] if item != entry]
            if present:
                items.append(entry)
            self.data[collection] = items
            self.save()

    def public_view(self):
        """What sandbox.json publishes: ids, secrets and certificates a test or demo needs."""
        with self.lock:
            return {
                "tenants": self.data["tenants"],
                "users": [
                    {
                        k: u.get(k)
                        for k in (
                            "upn",
                            "tenant",
                            "oid",
                            "name",
                            "admin",
                            "password",
                            "email",
                            "home_tenant",
                            "home_upn",
                        )
                    }
                    for u in self.data["users"]
                ],
                "mailboxes": self.data["mailboxes"],
                "apps": self.data["apps"],
            }
