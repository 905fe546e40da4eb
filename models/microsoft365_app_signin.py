import re
import time

from odoo import api, fields, models
from odoo.exceptions import UserError, ValidationError
from odoo.http import request

from ..m365.id_token import GUID, SIGNIN_SCOPES, KeyDirectory
from ..m365.identity import http_session

SIGNIN_CALLBACK_PATH = "/microsoft365/signin/callback"
# Sign-ins under way live in the browser's Odoo session: bound to it, single use, for 10 minutes.
SESSION_KEY = "microsoft365_signin"
PENDING_LIFETIME = 600
MAX_PENDING = 5  # a few tabs at once; the oldest are dropped
STATE_FORMAT = re.compile(r"[A-Za-z0-9_-]{8,200}")
MULTI_TENANT_AUTHORITIES = ("organizations", "common", False)


class Microsoft365AppSignIn(models.Model):
    """The app registration as a login provider: "Sign in with Microsoft" on Odoo's login page."""

    _inherit = "microsoft365.app"

    signin_enabled = fields.Boolean(
        string="Use for sign-in",
        help="Show a button on Odoo's login page: people sign in to Odoo with their Microsoft account. "
        "Only accounts linked to an Odoo user (by the directory and object ID, never by email) get in.",
    )
    signin_redirect_uri = fields.Char(compute="_compute_signin_redirect_uri", string="Sign-in redirect URI")
    signin_multi_tenant = fields.Boolean(compute="_compute_signin_multi_tenant")
    signin_tenant_ids = fields.Char(
        string="Tenants allowed to sign in",
        help="Multi-tenant app registration: the directory (tenant) IDs whose accounts may sign in, separated "
        "by commas or spaces. A single-tenant app registration admits its own tenant only.",
    )
    signin_any_tenant = fields.Boolean(
        string="Any tenant may sign in",
        help="Multi-tenant app registration: accept accounts of every Microsoft Entra tenant. Only linked "
        "accounts get in, but anyone can reach Microsoft's sign-in for this Odoo.",
    )
    signin_unknown_users = fields.Selection(
        [("refuse", "Refuse"), ("create", "Create a user from a template")],
        string="Accounts not linked to a user",
        default="refuse",
        required=True,
        help="Refuse: only accounts linked to an Odoo user sign in. Create: a new user is created from the "
        "template user (internal or portal, as the template is) and linked to the account.",
    )
    signin_template_user_id = fields.Many2one(
        "res.users",
        string="Template user",
        context={"active_test": False},
        help="New users get this user's access rights (internal user or portal).",
    )
    signin_link_by_upn = fields.Boolean(
        string="Link by user principal name",
        help="Single-tenant app registration only: an account of this tenant that is not linked yet is linked "
        "to the active Odoo user whose login is its user principal name (preferred_username), once. Guests "
        "are never linked this way.",
    )

    @api.depends("cloud")
    def _compute_signin_redirect_uri(self):
        for app in self:
            app.signin_redirect_uri = app.get_base_url().rstrip("/") + SIGNIN_CALLBACK_PATH

    @api.depends("tenant")
    def _compute_signin_multi_tenant(self):
        for app in self:
            app.signin_multi_tenant = app.tenant in MULTI_TENANT_AUTHORITIES

    def write(self, vals):
        if "signin_tenant_ids" in vals:
            vals = dict(vals, signin_tenant_ids=self._parse_tenant_ids(vals["signin_tenant_ids"]))
        return super().write(vals)

    @api.model_create_multi
    def create(self, vals_list):
        for vals in vals_list:
            if "signin_tenant_ids" in vals:
                vals["signin_tenant_ids"] = self._parse_tenant_ids(vals["signin_tenant_ids"])
        return super().create(vals_list)

    def _parse_tenant_ids(self, text):
        ids = [t.lower() for t in re.split(r"[\s,;]+", text or "") if t]
        wrong = [t for t in ids if not GUID.fullmatch(t)]
        if wrong:
            raise ValidationError(
                self.env._(
                    "Tenants allowed to sign in: %(values)s is not a directory (tenant) ID. Enter the IDs "
                    "(00000000-0000-0000-0000-000000000000) shown in Entra ID > Overview, not domains.",
                    values=", ".join(wrong),
                )
            )
        return ", ".join(dict.fromkeys(ids)) or False

    @api.constrains(
        "signin_enabled", "cloud", "tenant", "signin_tenant_ids", "signin_any_tenant", "signin_unknown_users"
    )
    def _check_signin(self):
        for app in self.filtered("signin_enabled"):
            if app.cloud == "consumer" or app.tenant == "consumers":
                raise ValidationError(
                    self.env._(
                        "%(app)s: sign-in to Odoo is for work and school accounts; personal Outlook.com accounts "
                        "cannot be used.",
                        app=app.display_name,
                    )
                )
            if app.signin_multi_tenant and not app.signin_tenant_ids and not app.signin_any_tenant:
                raise ValidationError(
                    self.env._(
                        "%(app)s is a multi-tenant app registration: list the directory (tenant) IDs whose accounts "
                        "may sign in, or choose that any tenant may.",
                        app=app.display_name,
                    )
                )
            if app.signin_unknown_users == "create" and not app.signin_template_user_id:
                raise ValidationError(
                    self.env._(
                        "%(app)s creates users for unknown accounts: choose the template user.", app=app.display_name
                    )
                )

    def _signin_allowed_tenants(self):
        """Tenant ids that may sign in; None when not restricted here: a single-tenant app's issuer
        admits its own tenant only, and "any tenant" is an explicit choice."""
        self.ensure_one()
        if not self.signin_multi_tenant or self.signin_any_tenant:
            return None
        return {t.strip() for t in (self.signin_tenant_ids or "").split(",") if t.strip()}

    def _signin_keys(self):
        credentials = self._credentials()
        return KeyDirectory(
            credentials.authority, http_session(credentials.ca_file), ca_file=credentials.ca_file, timeout=10.0
        )

    def _signin_begin(self, purpose, login_hint=None, redirect=None):
        """Start Microsoft's sign-in (auth code + PKCE, state, nonce) for this browser session; the URL
        to send the browser to. ``purpose``: "login" (Odoo's login page) or "link" (a signed-in user
        links their Microsoft account)."""
        self.ensure_one()
        if not request:
            raise UserError(self.env._("Signing in with Microsoft happens in a browser."))
        client = self.sudo()._identity_client()
        flow = client.start_sign_in(self.signin_redirect_uri, list(SIGNIN_SCOPES), login_hint=login_hint or None)
        pending = {
            state: entry
            for state, entry in (request.session.get(SESSION_KEY) or {}).items()
            if entry.get("expires", 0) > time.time()
        }
        pending[flow["state"]] = {
            "flow": flow,
            "app_id": self.id,
            "purpose": purpose,
            "uid": request.session.uid if purpose == "link" else None,
            "redirect": redirect if _local_path(redirect) else None,
            "expires": time.time() + PENDING_LIFETIME,
        }
        newest = sorted(pending.items(), key=lambda item: item[1]["expires"])[-MAX_PENDING:]
        request.session[SESSION_KEY] = dict(newest)
        return flow["auth_uri"]


def take_pending_sign_in(session, state):
    """The sign-in this browser session started for ``state``, removed (single use); (entry, None),
    or (None, "unknown") / (None, "expired")."""
    if not isinstance(state, str) or not STATE_FORMAT.fullmatch(state):
        return None, "unknown"
    pending = dict(session.get(SESSION_KEY) or {})
    entry = pending.pop(state, None)
    session[SESSION_KEY] = pending
    if entry is None:
        return None, "unknown"
    if entry.get("expires", 0) < time.time():
        return None, "expired"
    return entry, None


def _local_path(url):
    """A path on this Odoo, never another site: no "//host", no backslash, no whitespace or control
    character (browsers drop tabs and newlines from URLs: "/\t/host" is "//host")."""
    return (
        isinstance(url, str)
        and url.startswith("/")
        and not url.startswith("//")
        and "\\" not in url
        and not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url)
    )
