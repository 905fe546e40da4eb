import os

from odoo import api, fields, models
from odoo.exceptions import ValidationError

from ..m365 import identifiers
from ..m365.clouds import CLOUDS
from ..m365.errors import InvalidInput
from ..m365.identity import AppCredentials, IdentityClient

CALLBACK_PATH = "/microsoft365/oauth/callback"
DEFAULT_APP_PARAMETER = "mail_microsoft365_oauth.default_app_id"


class Microsoft365App(models.Model):
    """An app registration in Microsoft Entra ID, as entered by the administrator."""

    _name = "microsoft365.app"
    _inherit = ["mail.thread", "mail.activity.mixin"]
    _description = "Microsoft 365 app registration"
    _order = "name, id"

    name = fields.Char(required=True)
    active = fields.Boolean(default=True)
    company_id = fields.Many2one("res.company", default=lambda self: self.env.company)
    cloud = fields.Selection(
        [(key, cloud.label) for key, cloud in CLOUDS.items()] + [("custom", "Custom endpoints")],
        required=True, default="global",
        help="The Microsoft cloud the tenant lives in. Custom: enter the endpoints yourself "
        "(a proxy, or the local sandbox).")
    tenant = fields.Char(
        string="Directory (tenant) ID",
        help="The Directory (tenant) ID or a verified domain of a single-tenant app. "
        "Leave empty for a multi-tenant app (work and school accounts).")
    client_id = fields.Char(string="Application (client) ID", required=True)
    client_secret = fields.Char(
        compute="_compute_client_secret", inverse="_inverse_client_secret", store=False,
        help="The secret's Value from Entra ID > Certificates & secrets. It is stored encrypted "
        "and never shown again.")
    client_secret_sealed = fields.Char(groups=fields.NO_ACCESS, copy=False)
    has_client_secret = fields.Boolean(compute="_compute_has_client_secret", string="Secret set")
    secret_expires_on = fields.Date(
        help="Expiry date shown in Entra ID next to the secret: Odoo warns before it passes.")
    redirect_uri = fields.Char(compute="_compute_redirect_uri", string="Redirect URI")
    # Custom cloud: every endpoint can be overridden (sandbox, proxies, unverified clouds).
    authority_host = fields.Char(help="For example https://login.microsoftonline.com")
    delegated_resource = fields.Char(help="For example https://outlook.office.com")
    app_resource = fields.Char(help="For example https://outlook.office365.com")
    imap_host = fields.Char()
    imap_port = fields.Integer()
    pop_host = fields.Char()
    pop_port = fields.Integer()
    smtp_host = fields.Char()
    smtp_port = fields.Integer()
    ca_file = fields.Char(
        string="Trusted CA file",
        help="Path on the Odoo server of a PEM file of the CA that signed the sign-in service's "
        "certificate (custom endpoints only).")
    account_ids = fields.One2many("microsoft365.account", "app_id", string="Mailboxes")

    @api.model_create_multi
    def create(self, vals_list):
        return super().create([self._normalise(vals) for vals in vals_list])

    def write(self, vals):
        return super().write(self._normalise(vals))

    def _normalise(self, vals):
        vals = dict(vals)
        parsers = {
            "name": identifiers.parse_display_name,
            "client_secret": identifiers.parse_client_secret,
            "authority_host": identifiers.parse_https_origin,
            "imap_host": identifiers.parse_hostname,
            "pop_host": identifiers.parse_hostname,
            "smtp_host": identifiers.parse_hostname,
            "delegated_resource": identifiers.parse_https_origin,
            "app_resource": identifiers.parse_https_origin,
        }
        try:
            if "tenant" in vals:
                vals["tenant"] = identifiers.parse_tenant(vals["tenant"])
            if vals.get("client_id") is not None:
                vals["client_id"] = identifiers.parse_client_id(vals["client_id"])
            for name, parse in parsers.items():
                if vals.get(name):
                    vals[name] = parse(vals[name])
            if vals.get("ca_file"):
                vals["ca_file"] = self._check_ca_file(vals["ca_file"])
        except InvalidInput as exc:
            raise ValidationError(self.env._(exc.message, **exc.params)) from None
        return vals

    @api.model
    def _check_ca_file(self, path):
        path = path.strip()
        readable = len(path) <= 4096 and not any(ord(c) < 32 for c in path) and os.path.isabs(path) \
            and os.path.isfile(path) and os.access(path, os.R_OK)
        if not readable:
            raise ValidationError(self.env._("%s is not a readable file on the Odoo server.", path[:120]))
        return path

    @api.model
    def _default_app(self):
        """The app registration chosen in General Settings, else the only one there is."""
        chosen = self.env["ir.config_parameter"].sudo().get_param(DEFAULT_APP_PARAMETER)
        app = self.browse(int(chosen)).exists() if chosen and chosen.isdigit() else self.browse()
        if not app:
            apps = self.search([], limit=2)
            app = apps if len(apps) == 1 else self.browse()
        return app

    @api.model
    def _custom_mail_hosts(self):
        """Mail hosts of custom endpoints (a proxy, a private cloud): Microsoft 365 hosts too."""
        apps = self.search([("cloud", "=", "custom")])
        return {host.strip().lower() for host in apps.mapped("imap_host") + apps.mapped("pop_host")
                + apps.mapped("smtp_host") if host}

    def _compute_client_secret(self):
        self.client_secret = False  # write-only

    def _inverse_client_secret(self):
        for app in self:
            if app.client_secret:
                app.sudo().client_secret_sealed = self.env["microsoft365.vault"]._encrypt(app.client_secret)

    def _compute_has_client_secret(self):
        for app in self:
            app.has_client_secret = bool(app.sudo().client_secret_sealed)

    def _compute_redirect_uri(self):
        for app in self:
            app.redirect_uri = app.get_base_url().rstrip("/") + CALLBACK_PATH

    def _cloud(self):
        self.ensure_one()
        if self.cloud != "custom":
            return CLOUDS[self.cloud]
        return CLOUDS["global"].with_overrides(
            key="custom", label="Custom", authority_host=(self.authority_host or "").rstrip("/"),
            delegated_resource=self.delegated_resource, app_resource=self.app_resource,
            imap_host=self.imap_host, imap_port=self.imap_port, pop_host=self.pop_host,
            pop_port=self.pop_port, smtp_host=self.smtp_host, smtp_port=self.smtp_port)

    def _credentials(self):
        self.ensure_one()
        secret = self.env["microsoft365.vault"]._decrypt(self.sudo().client_secret_sealed)
        return AppCredentials(
            client_id=self.client_id,
            authority=self._cloud().authority(self.tenant or "organizations"),
            client_secret=secret or None,
            ca_file=(self.cloud == "custom" and self.ca_file) or None,
        )

    def _mail_ca_file(self):
        """CA of a private mail endpoint (custom cloud), else None: the system's trust store."""
        self.ensure_one()
        return (self.cloud == "custom" and self.ca_file) or None

    def _identity_client(self, cache_state=None):
        return IdentityClient(self._credentials(), cache_state)
