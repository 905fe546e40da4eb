from odoo import _, api, fields, models
from odoo.exceptions import UserError

from odoo.addons.mail.models.fetchmail import POP3Connection

from ..m365.errors import M365Error, MailLoginFailed
from ..m365.mailcheck import imap_authenticate, pop3_authenticate
from .microsoft365_account import explain


class FetchmailServer(models.Model):
    _name = "fetchmail.server"
    _inherit = ["fetchmail.server", "microsoft365.server.mixin"]

    connect_with = fields.Selection(
        [("password", "Password"), ("microsoft365", "Microsoft 365 (OAuth)")],
        default="password", required=True,
        help="Password: Odoo's usual login. Microsoft 365: XOAUTH2 with the linked OAuth account.")

    @api.onchange("connect_with", "microsoft365_account_id")
    def _onchange_connect_with_microsoft365(self):
        if self.connect_with != "microsoft365" or not self.microsoft365_account_id:
            return
        cloud = self.microsoft365_account_id.app_id._cloud()
        if self.server_type not in ("imap", "pop"):
            self.server_type = "imap"
        self.server = cloud.pop_host if self.server_type == "pop" else cloud.imap_host
        self.port = cloud.pop_port if self.server_type == "pop" else cloud.imap_port
        self.is_ssl = True
        self.user = self.microsoft365_account_id.email
        self.password = False

    def _is_microsoft365(self):
        return self.connect_with == "microsoft365"

    def _microsoft365_token(self):
        return self._microsoft365_account()._access_token()

    def _imap_login(self, connection):
        self.ensure_one()
        if not self._is_microsoft365():
            return super()._imap_login(connection)
        imap_authenticate(connection, self.microsoft365_account_id.email, self._microsoft365_token())

    def connect(self, allow_archived=False):
        self.ensure_one()
        if not self._is_microsoft365() or self._get_connection_type() != "pop":
            return super().connect(allow_archived=allow_archived)
        # Odoo's POP branch logs in with USER/PASS and offers no hook.
        if not allow_archived and not self.active:
            raise UserError(_('The server "%s" cannot be used because it is archived.', self.display_name))
        connection = POP3Connection(self.server, int(self.port), self.is_ssl)
        # Odoo's wrapper exposes only POP3's public commands; SASL needs the raw client.
        pop3_authenticate(connection.__obj__, self.microsoft365_account_id.email, self._microsoft365_token())
        return connection

    def button_confirm_login(self):
        ours = self.filtered(lambda s: s._is_microsoft365())
        for server in ours:
            try:
                connection = server.connect(allow_archived=True)
                if server._get_connection_type() == "pop":
                    connection.stat()
                    connection.quit()
                else:
                    connection.logout()
            except (M365Error, MailLoginFailed) as exc:
                found = getattr(exc, "diagnosis", None)
                raise UserError(_("Connection test failed: %s",
                                  explain(self.env, found) if found else str(exc))) from None
            except Exception as exc:  # network, TLS: Odoo's own wording
                raise UserError(_("Connection test failed: %s", exc)) from None
            server.state = "done"
        return super(FetchmailServer, self - ours).button_confirm_login()
