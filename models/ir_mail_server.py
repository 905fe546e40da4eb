from odoo import _, api, fields, models
from odoo.exceptions import UserError

from ..m365.errors import M365Error
from ..m365.mailcheck import smtp_authenticate
from .microsoft365_account import explain


class IrMailServer(models.Model):
    _name = "ir.mail_server"
    _inherit = ["ir.mail_server", "microsoft365.server.mixin"]

    smtp_authentication = fields.Selection(
        selection_add=[("microsoft365", "Microsoft 365 (OAuth)")],
        ondelete={"microsoft365": "set default"})

    def _compute_smtp_authentication_info(self):
        ours = self.filtered(lambda s: s.smtp_authentication == "microsoft365")
        ours.smtp_authentication_info = _(
            "Odoo signs in to Microsoft 365 with OAuth 2.0 (XOAUTH2): no password is stored.")
        super(IrMailServer, self - ours)._compute_smtp_authentication_info()

    @api.onchange("smtp_authentication", "microsoft365_account_id")
    def _onchange_smtp_authentication_microsoft365(self):
        if self.smtp_authentication != "microsoft365" or not self.microsoft365_account_id:
            return
        cloud = self.microsoft365_account_id.app_id._cloud()
        self.smtp_host = cloud.smtp_host
        self.smtp_port = cloud.smtp_port
        self.smtp_encryption = "starttls"
        self.smtp_user = self.microsoft365_account_id.email
        self.smtp_pass = False
        if not self.from_filter:
            self.from_filter = self.microsoft365_account_id.email

    def _onchange_encryption(self):
        # Odoo resets the port when the encryption changes; Microsoft's port is set above.
        if self.smtp_authentication != "microsoft365":
            return super()._onchange_encryption()

    def _smtp_login(self, connection, smtp_user, smtp_password):
        # Odoo calls this on an empty recordset when no server record is involved.
        if len(self) != 1 or self.smtp_authentication != "microsoft365":
            return super()._smtp_login(connection, smtp_user, smtp_password)
        account = self._microsoft365_account()
        try:
            # Odoo's SMTPConnection wrapper exposes only some of smtplib's attributes.
            smtp_authenticate(getattr(connection, "__obj__", connection), account.email, account._access_token())
        except M365Error as exc:
            found = getattr(exc, "diagnosis", None)
            raise UserError(explain(self.env, found) if found else str(exc)) from None
