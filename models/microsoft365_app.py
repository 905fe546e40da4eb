import base64
import contextlib
import datetime
import hashlib
import json
import logging
import os
import time
import uuid

import psycopg2

from odoo import api, fields, models, tools
from odoo.exceptions import AccessError, UserError, ValidationError

from ..m365 import certificates, identifiers
from ..m365.clouds import CLOUDS
from ..m365.diagnosis import diagnose_lost_database
from ..m365.errors import InvalidInput, TransientFailure
from ..m365.identity import MIN_LIFE, AppCredentials, IdentityClient

CALLBACK_PATH = "/microsoft365/oauth/callback"
DEFAULT_APP_PARAMETER = "mail_microsoft365_oauth.default_app_id"
WRITE_ONLY_FIELDS = ["client_secret", "certificate_file", "certificate_passphrase"]

# A token with more than this left is served from the cache without a refresh, so the row lock is
# not needed; under it, the refresh runs under the lock (m365.identity.MIN_LIFE: what a connection
# needs left for its login; the 30 s are the lock's own margin).
REFRESH_MARGIN = MIN_LIFE + 30
# Access tokens already read from a given stored token cache (an account's or an app's), per
# process: a cache hit then costs a dictionary lookup. Keyed by the sealed state itself, so any
# refresh (by any worker) misses it.
_TOKEN_MEMO = {}
_TOKEN_MEMO_SIZE = 10000


_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _own_connection_lost_is_passing(record):
    """Around a token request's own transaction (a connection of its own): that connection lost (cut,
    database restarted) is a passing failure like Microsoft being away, never the caller's error: its
    transaction is not concerned, and its cron run or mail must not fail for it."""
    try:
        yield
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        _logger.warning("%s %s: token request lost its database connection", record._name, record.id)
        raise TransientFailure(diagnose_lost_database(exc)) from None


def _memo_key(record, resource, sealed):
    """The memo's key for the token of `resource` ("exchange", "graph") read from this stored cache state."""
    return (record.env.cr.dbname, record._name, record.id, resource, hashlib.sha256(sealed.encode()).digest())


def _remembered(key):
    """The remembered token while it has REFRESH_MARGIN left, else None."""
    token = _TOKEN_MEMO.get(key)
    return token if token and token.expires_at - time.time() > REFRESH_MARGIN else None


def _remember(key, token):
    if len(_TOKEN_MEMO) >= _TOKEN_MEMO_SIZE:
        _TOKEN_MEMO.clear()
    _TOKEN_MEMO[key] = token


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
        required=True,
        default="global",
        help="The Microsoft cloud the tenant lives in. Custom: enter the endpoints yourself "
        "(a proxy, or the local sandbox). Microsoft does not confirm every national-cloud default: the US "
        "Government DoD resource (https://outlook-dod.office365.us) and the China SMTP host "
        "(smtp.partner.outlook.cn) are unverified; if they fail for your tenant, choose Custom and enter "
        "the values Microsoft gives you.",
    )
    tenant = fields.Char(
        string="Directory (tenant) ID",
        help="The Directory (tenant) ID or a verified domain of a single-tenant app. "
        "Leave empty for a multi-tenant app (work and school accounts).",
    )
    client_id = fields.Char(string="Application (client) ID", required=True)
    flow = fields.Selection(
        [("delegated", "Delegated: a user signs in"), ("app_only", "Application (app-only)")],
        string="Access",
        default="delegated",
        required=True,
        help="Delegated: each mailbox is authorized once by a user who may open it. Application: no sign-in; "
        "the app reads and sends with Exchange application permissions, admin consent and a mailbox "
        "permission in Exchange Online.",
    )
    credential_type = fields.Selection(
        [("secret", "Client secret"), ("certificate", "Certificate")],
        string="Credential",
        default="secret",
        required=True,
    )
    certificate_file = fields.Binary(
        string="Certificate and private key",
        compute="_compute_certificate_upload",
        readonly=False,
        store=False,
        help="PEM file with the private key and the certificate, or a PFX file. Stored encrypted, never shown "
        "again; upload the certificate (public part) to Entra ID > Certificates & secrets.",
    )
    certificate_passphrase = fields.Char(
        compute="_compute_certificate_upload",
        readonly=False,
        store=False,
        help="Passphrase of the PFX file or of the encrypted private key.",
    )
    certificate_sealed = fields.Text(groups=fields.NO_ACCESS, copy=False)
    certificate_thumbprint = fields.Char(
        readonly=True, copy=False, help="Compare with the thumbprint Entra ID shows for the certificate."
    )
    certificate_expires_on = fields.Date(readonly=True, copy=False)
    app_token_cache_sealed = fields.Text(groups=fields.NO_ACCESS, copy=False)
    app_token_expires_at = fields.Datetime(readonly=True, copy=False)
    admin_consent_available = fields.Boolean(
        compute="_compute_admin_consent_available",
        help="Tenant-wide admin consent needs the tenant of the app registration.",
    )
    client_secret = fields.Char(
        compute="_compute_client_secret",
        inverse="_inverse_client_secret",
        store=False,
        help="The secret's Value from Entra ID > Certificates & secrets. It is stored encrypted and never shown again.",
    )
    client_secret_sealed = fields.Char(groups=fields.NO_ACCESS, copy=False)
    has_client_secret = fields.Boolean(compute="_compute_has_client_secret", string="Secret set")
    secret_expires_on = fields.Date(
        help="Expiry date shown in Entra ID next to the secret: Odoo warns before it passes."
    )
    redirect_uri = fields.Char(compute="_compute_redirect_uri", string="Redirect URI")
    # Custom cloud: every endpoint can be overridden (sandbox, proxies, unverified clouds).
    authority_host = fields.Char(help="For example https://login.microsoftonline.com")
    delegated_resource = fields.Char(help="For example https://outlook.office.com")
    app_resource = fields.Char(help="For example https://outlook.office365.com")
    graph_url = fields.Char(string="Microsoft Graph URL", help="For example https://graph.microsoft.com")
    graph_resource = fields.Char(
        string="Microsoft Graph resource",
        help="The resource of the Microsoft Graph scopes, when it differs from the URL (a proxy). For example "
        "https://graph.microsoft.com",
    )
    imap_host = fields.Char(string="IMAP host")
    imap_port = fields.Integer(string="IMAP port")
    pop_host = fields.Char(string="POP host")
    pop_port = fields.Integer(string="POP port")
    smtp_host = fields.Char(string="SMTP host")
    smtp_port = fields.Integer(string="SMTP port")
    ca_certificate = fields.Binary(
        string="Trusted CA certificate",
        attachment=False,
        help="Custom endpoints only: upload the certificate (PEM or DER file) of the CA that signed the "
        "sign-in service's and the mail servers' certificates, when it is not a public CA.",
    )
    ca_certificate_name = fields.Char(string="CA certificate file name")
    account_ids = fields.One2many("microsoft365.account", "app_id", string="Mailboxes")
    problem = fields.Text(
        readonly=True,
        copy=False,
        help="Microsoft refused this app registration itself (its secret, certificate, tenant or redirect URI): "
        "every mailbox of it is stopped until it is fixed.",
    )

    @api.model_create_multi
    def create(self, vals_list):
        apps = super().create([self._normalise(vals) for vals in vals_list])
        apps.invalidate_recordset(WRITE_ONLY_FIELDS)
        return apps

    def write(self, vals):
        result = super().write(self._normalise(vals))
        # The web client reads the record back after saving: write-only values must not be in the
        # cache then, or the secret goes back to the browser.
        self.invalidate_recordset(WRITE_ONLY_FIELDS)
        if "flow" in vals:
            self.account_ids._sync_app_only_status()
        if {"flow", "client_id", "tenant", "credential_type", "client_secret", "certificate_file"} & set(vals):
            self.sudo().app_token_cache_sealed = False  # tokens of the old credentials are not ours any more
        if {
            "client_id",
            "tenant",
            "cloud",
            "authority_host",
            "credential_type",
            "client_secret",
            "certificate_file",
        } & set(vals) and any(self.mapped("problem")):
            self.problem = False  # changed: the next test or token request tells
        return result

    def _flag_problem(self, message, cr=None):
        """Microsoft refused the app registration itself: say so on it, once for all its mailboxes."""
        self.ensure_one()
        if cr is not None:  # a token refresh's own transaction, committed by the caller
            cr.execute("UPDATE microsoft365_app SET problem = %s WHERE id = %s", [message, self.id])
            # Shown to the calling transaction, whose snapshot still holds the row as it was (writing it there
            # again would fail with "could not serialize access due to concurrent update").
            self.env.cache.set(self, self._fields["problem"], message)
            return
        if self.problem == message:
            return
        self.sudo().problem = message
        app_id = self.id

        def keep_after_rollback():  # a button's transaction is rolled back with the error
            with self.env.registry.cursor() as own_cr:
                own_cr.execute("UPDATE microsoft365_app SET problem = %s WHERE id = %s", [message, app_id])

        self.env.cr.postrollback.add(keep_after_rollback)

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
            "graph_url": identifiers.parse_https_origin,
            "graph_resource": identifiers.parse_https_origin,
        }
        try:
            if "tenant" in vals:
                vals["tenant"] = identifiers.parse_tenant(vals["tenant"])
                cloud = vals.get("cloud") or (self[:1].cloud if len(self) == 1 else None)
                if cloud == "consumer" and vals["tenant"] == "organizations":
                    vals["tenant"] = "consumers"  # personal Outlook.com accounts
            if vals.get("client_id") is not None:
                vals["client_id"] = identifiers.parse_client_id(vals["client_id"])
            for name, parse in parsers.items():
                if vals.get(name):
                    vals[name] = parse(vals[name])
            if vals.get("ca_certificate"):
                try:
                    uploaded = base64.b64decode(vals["ca_certificate"], validate=True)
                except ValueError:
                    uploaded = b""
                pem = certificates.load_ca_certificates(uploaded)
                vals["ca_certificate"] = base64.b64encode(pem.encode("ascii"))
            passphrase = vals.pop("certificate_passphrase", None)
            upload = vals.pop("certificate_file", None)
            if upload:
                credential = certificates.load_certificate_credential(base64.b64decode(upload), passphrase)
                vals.update(
                    certificate_sealed=self.env["microsoft365.vault"]._encrypt(
                        json.dumps({"private_key": credential.private_key, "certificate": credential.certificate})
                    ),
                    certificate_thumbprint=credential.thumbprint,
                    certificate_expires_on=credential.expires_at.date(),
                    credential_type=vals.get("credential_type", "certificate"),
                    app_token_cache_sealed=False,
                )
        except InvalidInput as exc:
            raise ValidationError(self.env._(exc.message, **exc.params)) from None
        return vals

    @api.constrains(
        "cloud", "authority_host", "imap_host", "imap_port", "pop_host", "pop_port", "smtp_host", "smtp_port"
    )
    def _check_custom_endpoints(self):
        # An empty custom endpoint would fall back to Microsoft's own host without a word.
        for app in self.filtered(lambda a: a.cloud == "custom"):
            missing = [
                app._fields[name]._description_string(self.env)
                for name in ("authority_host", "imap_host", "pop_host", "smtp_host")
                if not (app[name] or "").strip()
            ] + [
                app._fields[name]._description_string(self.env)
                for name in ("imap_port", "pop_port", "smtp_port")
                if not 0 < app[name] < 65536
            ]
            if missing:
                raise ValidationError(
                    self.env._(
                        "App registration %(app)s uses custom endpoints: enter %(fields)s (ports from 1 to 65535).",
                        app=app.display_name,
                        fields=", ".join(missing),
                    )
                )

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
        return {
            host.strip().lower()
            for host in apps.mapped("imap_host") + apps.mapped("pop_host") + apps.mapped("smtp_host")
            if host
        }

    def _compute_client_secret(self):
        self.client_secret = False  # write-only

    def _compute_certificate_upload(self):
        self.certificate_file = False  # write-only
        self.certificate_passphrase = False

    @api.depends("tenant", "client_id")
    def _compute_admin_consent_available(self):
        for app in self:
            app.admin_consent_available = bool(app.client_id) and app.tenant not in (
                "organizations",
                "common",
                "consumers",
                False,
            )

    def action_admin_consent(self):
        """Open Microsoft's tenant-wide admin consent with a one-time state the callback checks."""
        self.ensure_one()
        if not self.env.user.has_group("base.group_system"):
            raise AccessError(self.env._("Only an administrator may grant consent for the organisation."))
        if not self.admin_consent_available:
            raise UserError(self.env._("Enter the directory (tenant) ID of the app registration first."))
        return self.env["microsoft365.admin.consent"].sudo()._start(self)

    def _inverse_client_secret(self):
        for app in self:
            if app.client_secret:
                app.sudo().client_secret_sealed = self.env["microsoft365.vault"]._encrypt(app.client_secret)

    def _compute_has_client_secret(self):
        for app in self:
            app.has_client_secret = bool(app.sudo().client_secret_sealed)

    @api.depends("cloud")  # any field the form starts with: shown on a new registration before its first save
    def _compute_redirect_uri(self):
        for app in self:
            app.redirect_uri = app.get_base_url().rstrip("/") + CALLBACK_PATH

    def _cloud(self):
        self.ensure_one()
        if self.cloud != "custom":
            return CLOUDS[self.cloud]
        return CLOUDS["global"].with_overrides(
            key="custom",
            label="Custom",
            authority_host=(self.authority_host or "").rstrip("/"),
            delegated_resource=self.delegated_resource,
            app_resource=self.app_resource,
            imap_host=self.imap_host,
            imap_port=self.imap_port,
            pop_host=self.pop_host,
            pop_port=self.pop_port,
            smtp_host=self.smtp_host,
            smtp_port=self.smtp_port,
            graph_url=(self.graph_url or "").rstrip("/"),
            graph_resource=(self.graph_resource or "").rstrip("/"),
        )

    def _credentials(self):
        self.ensure_one()
        vault, app = self.env["microsoft365.vault"], self.sudo()
        certificate = None
        if app.credential_type == "certificate" and app.certificate_sealed:
            stored = json.loads(vault._decrypt(app.certificate_sealed))
            # PS256 with x5t#S256 (MSAL computes it from the certificate): no SHA-1 thumbprint.
            certificate = {"private_key": stored["private_key"], "public_certificate": stored["certificate"]}
        default_tenant = "consumers" if app.cloud == "consumer" else "organizations"
        return AppCredentials(
            client_id=app.client_id,
            authority=app._cloud().authority(app.tenant or default_tenant),
            client_secret=(vault._decrypt(app.client_secret_sealed) or None) if not certificate else None,
            certificate=certificate,
            ca_file=app._mail_ca_file(),
        )

    def _credential_expires_on(self):
        self.ensure_one()
        return self.certificate_expires_on if self.credential_type == "certificate" else self.secret_expires_on

    def _app_access_token(self):
        """App-only: one token for every mailbox of this app, from the app's own MSAL cache; a new
        one is requested under the app's row lock, so 100 mailboxes cost one request per lifetime."""
        self.ensure_one()
        app = self.sudo()
        if (
            app.app_token_cache_sealed
            and app.app_token_expires_at
            and app.app_token_expires_at.timestamp() - time.time() > REFRESH_MARGIN
        ):
            memo_key = _memo_key(app, "exchange", app.app_token_cache_sealed)
            remembered = _remembered(memo_key)
            if remembered:
                return remembered
            client = app._identity_client(self.env["microsoft365.vault"]._decrypt(app.app_token_cache_sealed))
            token = client.app_access_token(app._cloud().app_scopes())
            if token.from_cache:
                _remember(memo_key, token)
                return token
        app.flush_recordset()
        if not self.env.registry.in_test_mode():
            with _own_connection_lost_is_passing(app), self.env.registry.cursor() as cr:
                cr.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                found = app._app_token_locked(cr)
            if found is not None:
                return found
        found = app._app_token_locked(self.env.cr)
        self.invalidate_recordset(["app_token_cache_sealed", "app_token_expires_at"])
        return found

    def _app_graph_token(self):
        """App-only Microsoft Graph token: a second resource in the app's own MSAL cache, served from it
        while fresh; a new one is requested under the app's row lock, as for Exchange."""
        self.ensure_one()
        app = self.sudo()
        scopes = app._cloud().graph_app_scopes()
        if app.app_token_cache_sealed:
            # As _app_access_token: this very cache state's token without decryption or an MSAL object.
            memo_key = _memo_key(app, "graph", app.app_token_cache_sealed)
            remembered = _remembered(memo_key)
            if remembered:
                return remembered
            client = app._identity_client(self.env["microsoft365.vault"]._decrypt(app.app_token_cache_sealed))
            cached = client.cached_access_token(scopes, margin=REFRESH_MARGIN)
            if cached:
                _remember(memo_key, cached)
                return cached
        app.flush_recordset()
        if not self.env.registry.in_test_mode():
            with _own_connection_lost_is_passing(app), self.env.registry.cursor() as cr:
                cr.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                found = app._app_token_locked(cr, scopes)
            if found is not None:
                return found
        found = app._app_token_locked(self.env.cr, scopes)
        self.invalidate_recordset(["app_token_cache_sealed", "app_token_expires_at"])
        return found

    def _app_token_locked(self, cr, scopes=None):
        cr.execute("SELECT app_token_cache_sealed FROM microsoft365_app WHERE id = %s FOR NO KEY UPDATE", [self.id])
        row = cr.fetchone()
        if row is None:
            return None
        vault = self.env["microsoft365.vault"]
        client = self._identity_client(vault._decrypt(row[0]) if row[0] else None)
        token = client.app_access_token(scopes or self._cloud().app_scopes())
        changed = client.changed_cache_state()
        if changed and scopes:  # Graph's token: app_token_expires_at stays the Exchange token's
            cr.execute(
                "UPDATE microsoft365_app SET app_token_cache_sealed = %s WHERE id = %s",
                [vault._encrypt(changed), self.id],
            )
        elif changed:
            cr.execute(
                "UPDATE microsoft365_app SET app_token_cache_sealed = %s, app_token_expires_at = %s WHERE id = %s",
                [vault._encrypt(changed), datetime.datetime.utcfromtimestamp(int(token.expires_at)), self.id],
            )
            cr.execute("UPDATE microsoft365_app SET problem = NULL WHERE id = %s AND problem IS NOT NULL", [self.id])
        return token

    def _mail_ca_file(self):
        """CA of a private endpoint (custom cloud), else None: the system's trust store. TLS clients
        want a file: the uploaded certificate is written once into Odoo's data directory, named by
        its content."""
        self.ensure_one()
        if self.cloud != "custom" or not self.ca_certificate:
            return None
        pem = base64.b64decode(self.ca_certificate)
        folder = os.path.join(tools.config["data_dir"], "microsoft365_oauth")
        path = os.path.join(folder, f"ca-{hashlib.sha256(pem).hexdigest()}.pem")
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            draft = f"{path}.{os.getpid()}.{uuid.uuid4().hex}"
            with open(draft, "wb") as handle:
                handle.write(pem)
            os.replace(draft, path)  # whole or absent, for any other worker
        return path

    def _identity_client(self, cache_state=None):
        return IdentityClient(self._credentials(), cache_state)
