import hashlib
import hmac
import logging
import secrets
import time

from odoo import api, fields, models
from odoo.exceptions import AccessDenied, UserError, ValidationError

from ..m365.id_token import GUID

_logger = logging.getLogger(__name__)

TICKET_LIFETIME = 120  # seconds between a validated Microsoft sign-in and Odoo's authenticate()
CREDENTIAL_TYPE = "microsoft365"
IDENTITY_FIELDS = ("microsoft365_tenant_id", "microsoft365_object_id")


class SignInRefused(Exception):
    """A validated Microsoft account that may not sign in to Odoo; ``message`` says why, translated."""

    def __init__(self, message):
        self.message = message
        super().__init__(message)


class ResUsers(models.Model):
    """A user's Microsoft account for "Sign in with Microsoft": the directory (tenant) ID and the
    object ID, Microsoft's immutable identifiers (sandbox/CONFORMANCE.md SIGNIN-01), never an email."""

    _inherit = "res.users"

    microsoft365_tenant_id = fields.Char(
        string="Microsoft directory (tenant) ID", copy=False, groups="base.group_system", index="btree_not_null"
    )
    microsoft365_object_id = fields.Char(
        string="Microsoft object ID",
        copy=False,
        groups="base.group_system",
        help="Entra ID > Users > the user > Object ID. With the directory (tenant) ID, it identifies the account "
        "that signs in as this user.",
    )
    microsoft365_username = fields.Char(
        string="Microsoft account", copy=False, groups="base.group_system", readonly=True, help="For display only."
    )
    microsoft365_linked = fields.Boolean(compute="_compute_microsoft365_linked", string="Microsoft account linked")
    microsoft365_signin_available = fields.Boolean(compute="_compute_microsoft365_signin_available")
    microsoft365_signin_ticket = fields.Char(groups=fields.NO_ACCESS, copy=False)

    _sql_constraints = [
        (
            "microsoft365_identity_unique",
            "unique(microsoft365_tenant_id, microsoft365_object_id)",
            "This Microsoft account is already linked to another user.",
        )
    ]

    @property
    def SELF_READABLE_FIELDS(self):
        return super().SELF_READABLE_FIELDS + [
            "microsoft365_tenant_id",
            "microsoft365_object_id",
            "microsoft365_username",
            "microsoft365_linked",
            "microsoft365_signin_available",
        ]

    def _compute_microsoft365_linked(self):
        for user in self:
            user.microsoft365_linked = bool(user.sudo().microsoft365_object_id)

    def _compute_microsoft365_signin_available(self):
        available = bool(self.env["microsoft365.app"].sudo().search_count([("signin_enabled", "=", True)], limit=1))
        for user in self:
            user.microsoft365_signin_available = available

    @api.constrains(*IDENTITY_FIELDS)
    def _check_microsoft365_identity(self):
        for user in self.sudo():
            tid, oid = user.microsoft365_tenant_id, user.microsoft365_object_id
            if bool(tid) != bool(oid):
                raise ValidationError(
                    self.env._("Enter both the Microsoft directory (tenant) ID and the object ID, or neither.")
                )
            if tid and not (GUID.fullmatch(tid) and GUID.fullmatch(oid)):
                raise ValidationError(
                    self.env._(
                        "The Microsoft directory (tenant) ID and object ID are GUIDs such as "
                        "00000000-0000-0000-0000-000000000000 (Entra ID > Users > the user > Object ID)."
                    )
                )

    @api.model_create_multi
    def create(self, vals_list):
        for vals in vals_list:
            for name in IDENTITY_FIELDS:
                if vals.get(name):
                    vals[name] = vals[name].strip().lower()
        return super().create(vals_list)

    def write(self, vals):
        if not set(IDENTITY_FIELDS) & set(vals):
            return super().write(vals)
        vals = dict(vals)
        for name in IDENTITY_FIELDS:
            if vals.get(name):
                vals[name] = vals[name].strip().lower()
        if not (vals.get("microsoft365_tenant_id") and vals.get("microsoft365_object_id")):
            vals.setdefault("microsoft365_username", False)
        before = {user.id: (user.sudo().microsoft365_tenant_id, user.sudo().microsoft365_object_id) for user in self}
        result = super().write(vals)
        for user in self:
            now = (user.sudo().microsoft365_tenant_id, user.sudo().microsoft365_object_id)
            if now != before[user.id]:
                user._microsoft365_log_identity_change(before[user.id], now)
        return result

    def _microsoft365_log_identity_change(self, old, new):
        """In the user's chatter (the contact's, where administrators read a user's history)."""
        who = self.env.user.name if not self.env.user._is_public() else self.env._("a sign-in with Microsoft")
        if new[1] and old[1]:
            body = self.env._(
                "Microsoft account changed by %(who)s: now directory %(tenant)s, object %(object)s "
                "(was directory %(old_tenant)s, object %(old_object)s).",
                who=who,
                tenant=new[0],
                object=new[1],
                old_tenant=old[0],
                old_object=old[1],
            )
        elif new[1]:
            # Computed apart: an f-string inside the call makes Odoo's term extraction skip the whole file.
            username = self.sudo().microsoft365_username
            name = f" ({username})" if username else ""
            body = self.env._(
                "Microsoft account linked by %(who)s: directory %(tenant)s, object %(object)s%(name)s.",
                who=who,
                tenant=new[0],
                object=new[1],
                name=name,
            )
        else:
            body = self.env._(
                "Microsoft account unlinked by %(who)s (was directory %(tenant)s, object %(object)s): it no longer "
                "signs in as this user.",
                who=who,
                tenant=old[0],
                object=old[1],
            )
        self.sudo().partner_id.message_post(body=body, subtype_xmlid="mail.mt_note")
        _logger.info("Microsoft sign-in: user %s %s", self.id, "linked" if new[1] else "unlinked")

    # Linking ------------------------------------------------------------------------------------

    def action_microsoft365_link(self):
        """From the user's own preferences: a Microsoft sign-in round trip links the account."""
        self.ensure_one()
        if self != self.env.user:
            raise UserError(self.env._("Only the user themself can link their Microsoft account this way."))
        app_id = self.env.context.get("microsoft365_app_id")
        apps = self.env["microsoft365.app"].sudo().search([("signin_enabled", "=", True)])
        app = apps.filtered(lambda a: a.id == app_id) if app_id else apps[:1]
        if not app:
            raise UserError(
                self.env._(
                    'No app registration is used for sign-in. An administrator turns on "Use for sign-in" on '
                    "the app registration (Settings > Emails > Microsoft 365 (OAuth 2.0))."
                )
            )
        url = app._signin_begin("link", login_hint=self.login if "@" in (self.login or "") else None)
        return {"type": "ir.actions.act_url", "url": url, "target": "self"}

    def action_microsoft365_unlink(self):
        for user in self:
            if user != self.env.user and not self.env.user.has_group("base.group_system"):
                raise UserError(self.env._("Only an administrator can unlink the Microsoft account of another user."))
        self.sudo().write({"microsoft365_tenant_id": False, "microsoft365_object_id": False})

    def _microsoft365_link(self, identity):
        """Link a validated identity (m365.id_token.SignInIdentity) to this user; refused when it is
        another user's already."""
        self.ensure_one()
        taken = (
            self.sudo()
            .with_context(active_test=False)
            .search(
                [
                    ("microsoft365_tenant_id", "=", identity.tenant_id),
                    ("microsoft365_object_id", "=", identity.object_id),
                    ("id", "!=", self.id),
                ],
                limit=1,
            )
        )
        if taken:
            raise SignInRefused(
                self.env._(
                    "The Microsoft account %(account)s is already linked to another Odoo user. An administrator "
                    "can unlink it there first.",
                    account=identity.username or identity.object_id,
                )
            )
        self.sudo().write(
            {
                "microsoft365_tenant_id": identity.tenant_id,
                "microsoft365_object_id": identity.object_id,
                "microsoft365_username": identity.username,
            }
        )

    # Signing in ---------------------------------------------------------------------------------

    @api.model
    def _microsoft365_signin_user(self, app, identity):
        """The Odoo user a validated Microsoft identity signs in as: the user linked to its tenant and
        object ID; else, as the app registration says, one linked now by UPN (single tenant, no guest)
        or created from the template; else SignInRefused."""
        users = self.sudo().with_context(active_test=False)
        user = users.search(
            [
                ("microsoft365_tenant_id", "=", identity.tenant_id),
                ("microsoft365_object_id", "=", identity.object_id),
            ],
            limit=1,
        )
        if user:
            return user
        account = identity.username or identity.object_id
        if app.signin_link_by_upn and not app.signin_multi_tenant and not identity.is_guest and identity.username:
            candidate = users._microsoft365_with_login(identity.username).filtered(
                lambda user: not user.microsoft365_object_id
            )
            if len(candidate) == 1 and candidate.active:
                candidate._microsoft365_link(identity)
                return candidate
        if app.signin_unknown_users == "create" and app.signin_template_user_id:
            return self._microsoft365_create_user(app, identity)
        raise SignInRefused(
            self.env._(
                "The Microsoft account %(account)s is not linked to a user of this Odoo. Sign in with your password "
                "and link it in your preferences, or ask an administrator to link it.",
                account=account,
            )
        )

    @api.model
    def _microsoft365_with_login(self, name):
        """Users whose login is `name` in any letter case: `=ilike` alone would read `_` and `%` in a
        Microsoft account's name as wildcards and match other users' logins."""
        name = name.strip().lower()
        return self.search([("login", "=ilike", name)]).filtered(lambda user: user.login.lower() == name)

    @api.model
    def _microsoft365_create_user(self, app, identity):
        login = (identity.username or "").strip().lower() or f"{identity.tenant_id}/{identity.object_id}"
        if self.sudo().with_context(active_test=False)._microsoft365_with_login(login):
            # Never take over an existing user because a mutable claim matches its login.
            raise SignInRefused(
                self.env._(
                    "An Odoo user with the login %(login)s exists but is not linked to this Microsoft account. Sign "
                    "in with your password and link it in your preferences, or ask an administrator to link it.",
                    login=login,
                )
            )
        # The email claim is whatever the account's tenant set (nOAuth): another tenant's claim could name
        # someone else's address, which Odoo's mail gateway would then attribute to this user.
        own_tenant = not app.signin_multi_tenant and not identity.is_guest
        email = (identity.email or (identity.username if "@" in identity.username else False)) if own_tenant else False
        user = (
            app.signin_template_user_id.sudo()
            .with_context(no_reset_password=True)
            .copy(
                {
                    "name": identity.name or login,
                    "login": login,
                    "email": email,
                    "active": True,
                    "microsoft365_tenant_id": identity.tenant_id,
                    "microsoft365_object_id": identity.object_id,
                    "microsoft365_username": identity.username,
                }
            )
        )
        user.partner_id.message_post(
            body=self.env._(
                "User created at the first sign-in with Microsoft (%(app)s): directory %(tenant)s, object %(object)s.",
                app=app.name,
                tenant=identity.tenant_id,
                object=identity.object_id,
            ),
            subtype_xmlid="mail.mt_note",
        )
        return user

    def _microsoft365_issue_ticket(self):
        """A one-time credential for Odoo's authenticate(), valid for two minutes: the validated
        Microsoft sign-in handed to Odoo's own login (which refuses archived users, logs the login,
        asks for two-factor authentication and rotates the session)."""
        self.ensure_one()
        token = secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode()).hexdigest()
        self.env.cr.execute(
            "UPDATE res_users SET microsoft365_signin_ticket = %s WHERE id = %s",
            [f"{digest}:{int(time.time()) + TICKET_LIFETIME}", self.id],
        )
        return token

    def _check_credentials(self, credential, env):
        try:
            return super()._check_credentials(credential, env)
        except AccessDenied:
            if credential.get("type") != CREDENTIAL_TYPE or not credential.get("token"):
                raise
            if not env.get("interactive"):  # a browser sign-in, never an RPC login
                raise
            self.env.cr.execute(
                "SELECT microsoft365_signin_ticket FROM res_users WHERE id = %s FOR NO KEY UPDATE", [self.env.user.id]
            )
            row = self.env.cr.fetchone()
            stored = row[0] if row else None
            if not stored:
                raise
            self.env.cr.execute(
                "UPDATE res_users SET microsoft365_signin_ticket = NULL WHERE id = %s", [self.env.user.id]
            )
            digest, _sep, expires = stored.partition(":")
            offered = hashlib.sha256(str(credential["token"]).encode()).hexdigest()
            if not hmac.compare_digest(digest, offered) or int(expires or 0) < time.time():
                raise
            return {"uid": self.env.user.id, "auth_method": CREDENTIAL_TYPE, "mfa": "default"}
