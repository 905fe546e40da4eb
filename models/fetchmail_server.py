from odoo import _, api, fields, models
from odoo.exceptions import UserError

from odoo.addons.mail.models.fetchmail import POP3Connection

from ..m365.errors import M365Error
from ..m365.mailcheck import imap_authenticate, pop3_authenticate
from .microsoft365_account import explain


class FetchmailServer(models.Model):
    _name = "fetchmail.server"
    _inherit = ["fetchmail.server", "microsoft365.server.mixin"]

    connect_with = fields.Selection(
        [("password", "Password"), ("microsoft365", "Microsoft 365 (OAuth)")],
        string="Connect with", default="password", required=True,
        help="Password: Odoo's usual login. Microsoft 365: OAuth 2.0 (XOAUTH2) with the mailbox's OAuth "
        "account; no password is stored.")

    microsoft365_fetch_error = fields.Text(string="Last fetch error", readonly=True, copy=False)
    microsoft365_fetch_failed_at = fields.Datetime(string="Last fetch failed on", readonly=True, copy=False)

    def _microsoft365_in_use(self):
        return self.connect_with == "microsoft365"

    def _microsoft365_mailbox(self):
        return self.user

    def _microsoft365_host(self):
        return self.server

    def _microsoft365_switch_values(self):
        values = {"connect_with": "microsoft365", "is_ssl": True}
        if self.server_type not in ("imap", "pop"):
            values["server_type"] = "imap"
        return values

    def _microsoft365_clear_password(self):
        self.password = False

    @api.onchange("connect_with", "microsoft365_account_id", "server_type")
    def _onchange_connect_with_microsoft365(self):
        if self.connect_with != "microsoft365":
            return
        if not self.microsoft365_account_id and self.user:
            self.microsoft365_account_id = self.env["microsoft365.account"].search(
                [("email", "=", self.user.strip().lower())], limit=1)
        cloud = self._microsoft365_cloud_for(self.microsoft365_account_id)
        if self.server_type not in ("imap", "pop"):
            self.server_type = "imap"
        if cloud:
            self.server = cloud.pop_host if self.server_type == "pop" else cloud.imap_host
            self.port = cloud.pop_port if self.server_type == "pop" else cloud.imap_port
        self.is_ssl = True
        if self.microsoft365_account_id:
            self.user = self.microsoft365_account_id.email
        self.password = False

    @api.onchange("server_type", "is_ssl", "object_id")
    def onchange_server_type(self):
        # Odoo resets the port to 993/995 here; a Microsoft 365 server keeps its cloud's port.
        super().onchange_server_type()
        if self.connect_with == "microsoft365":
            self._onchange_connect_with_microsoft365()

    @api.model_create_multi
    def create(self, vals_list):
        servers = super().create(vals_list)
        servers._microsoft365_link_accounts()
        return servers

    def write(self, vals):
        result = super().write(vals)
        if {"connect_with", "user", "microsoft365_account_id"} & set(vals):
            self._microsoft365_link_accounts()
        return result

    def _imap_login(self, connection):
        self.ensure_one()
        if not self._microsoft365_in_use():
            return super()._imap_login(connection)
        imap_authenticate(connection, self._microsoft365_account().email, self._microsoft365_token())

    def connect(self, allow_archived=False):
        self.ensure_one()
        if not self._microsoft365_in_use():
            return super().connect(allow_archived=allow_archived)
        try:
            connection = self._microsoft365_connect(allow_archived)
        except Exception as exc:
            # Kept for the health check: in the cron, fetchmail logs the error and goes on.
            self.write({"microsoft365_fetch_error": exc.args[0] if isinstance(exc, UserError) else str(exc),
                        "microsoft365_fetch_failed_at": fields.Datetime.now()})
            raise
        if self.microsoft365_fetch_error:
            self.write({"microsoft365_fetch_error": False, "microsoft365_fetch_failed_at": False})
        return connection

    def _microsoft365_connect(self, allow_archived):
        if self._get_connection_type() != "pop":
            try:
                return super().connect(allow_archived=allow_archived)
            except M365Error as exc:
                raise UserError(explain(self.env, exc.diagnosis)) from None
        # Odoo's POP branch logs in with USER/PASS and offers no hook.
        if not allow_archived and not self.active:
            raise UserError(_('The server "%s" cannot be used because it is archived.', self.display_name))
        connection = POP3Connection(self.server, int(self.port), self.is_ssl)
        try:
            # Odoo's wrapper exposes only POP3's public commands; SASL needs the raw client.
            pop3_authenticate(connection.__obj__, self._microsoft365_account().email, self._microsoft365_token())
        except M365Error as exc:
            connection.close()
            raise UserError(explain(self.env, exc.diagnosis)) from None
        return connection

    def button_confirm_login(self):
        ours = self.filtered(lambda s: s._microsoft365_in_use())
        for server in ours:
            try:
                connection = server.connect(allow_archived=True)
                if server._get_connection_type() == "pop":
                    connection.stat()
                    connection.quit()
                else:
                    connection.logout()
            except UserError as exc:
                raise UserError(_("Connection test failed: %s", exc.args[0])) from None
            except Exception as exc:  # network, TLS: Odoo's own wording
                raise UserError(_("Connection test failed: %s", exc)) from None
            server.state = "done"
            server._microsoft365_after_successful_test()
        return super(FetchmailServer, self - ours).button_confirm_login()
