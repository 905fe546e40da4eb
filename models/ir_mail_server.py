import email.utils
import smtplib

from odoo import api, fields, models
from odoo.exceptions import UserError, ValidationError
from odoo.tools import formataddr

from odoo.addons.base.models.ir_mail_server import MailDeliveryException

from ..m365.diagnosis import diagnose_smtp
from ..m365.errors import M365Error
from ..m365.mailcheck import smtp_authenticate
from .microsoft365_account import explain


class IrMailServer(models.Model):
    _name = "ir.mail_server"
    _inherit = ["ir.mail_server", "microsoft365.server.mixin"]

    smtp_authentication = fields.Selection(
        selection_add=[("microsoft365", "Microsoft 365 (OAuth)")], ondelete={"microsoft365": "set default"}
    )

    _microsoft365_link_fields = {"smtp_authentication", "smtp_user", "from_filter", "microsoft365_account_id"}

    def _microsoft365_in_use(self):
        return self.smtp_authentication == "microsoft365"

    def _microsoft365_mailbox(self):
        return self.smtp_user or (self.from_filter if self.from_filter and "@" in self.from_filter else False)

    def _microsoft365_host(self):
        return self.smtp_host

    def _microsoft365_switch_values(self):
        return {"smtp_authentication": "microsoft365", "smtp_encryption": "starttls"}

    def _microsoft365_clear_password(self):
        self.smtp_pass = False

    def _microsoft365_has_password(self):
        return bool(self.smtp_pass)

    @api.constrains("smtp_authentication", "smtp_encryption")
    def _check_microsoft365_connection(self):
        for server in self.filtered(lambda s: s._microsoft365_in_use()):
            if server.smtp_encryption == "none":
                raise ValidationError(
                    self.env._(
                        "Outgoing server %s signs in with Microsoft 365 OAuth: choose TLS (STARTTLS) or SSL/TLS "
                        "as its connection encryption.",
                        server.display_name,
                    )
                )

    def test_smtp_connection(self, autodetect_max_email_size=False):
        result = super().test_smtp_connection(autodetect_max_email_size=autodetect_max_email_size)
        self._microsoft365_after_successful_test()  # only reached when the test succeeded
        return result

    def _microsoft365_link_accounts(self, changed=None):
        result = super()._microsoft365_link_accounts(changed)
        # Odoo logs in only when a username is set: the mailbox is the username.
        for server in self.filtered(lambda s: s._microsoft365_in_use() and not s.smtp_user):
            server.smtp_user = server.microsoft365_account_id.email
        return result

    def _microsoft365_default_from_filter(self):
        # Without a FROM filter the server would take every mail, and Exchange refuses to send as
        # anyone but the mailbox (SendAsDenied): as the connect wizard does, send as the mailbox.
        for server in self.filtered(lambda s: s._microsoft365_in_use() and not s.from_filter):
            server.from_filter = server.microsoft365_account_id.email

    def _compute_smtp_authentication_info(self):
        ours = self.filtered(lambda s: s.smtp_authentication == "microsoft365")
        ours.smtp_authentication_info = self.env._(
            "Odoo signs in to Microsoft 365 with OAuth 2.0 (XOAUTH2): no password is stored."
        )
        return super(IrMailServer, self - ours)._compute_smtp_authentication_info()

    @api.onchange("smtp_authentication", "microsoft365_account_id")
    def _onchange_smtp_authentication_microsoft365(self):
        if self.smtp_authentication != "microsoft365":
            return
        if not self.microsoft365_account_id and self.smtp_user:
            self.microsoft365_account_id = self._microsoft365_account_for(self.smtp_user)
        cloud = self._microsoft365_cloud_for(self.microsoft365_account_id)
        if cloud:
            self.smtp_host = cloud.smtp_host
            self.smtp_port = cloud.smtp_port
        self.smtp_encryption = "starttls"
        if self.microsoft365_account_id:
            self.smtp_user = self.microsoft365_account_id.email
            if not self.from_filter:
                self.from_filter = self.microsoft365_account_id.email
        # A password is kept (hidden) until the first successful test: see _microsoft365_sync_password.

    def _microsoft365_onchange_connection(self):
        self._onchange_smtp_authentication_microsoft365()

    @api.onchange("smtp_encryption")
    def _onchange_encryption(self):
        # Odoo resets the port when the encryption changes; Microsoft's port is set above.
        if self.smtp_authentication != "microsoft365":
            return super()._onchange_encryption()

    @api.model_create_multi
    def create(self, vals_list):
        servers = super().create(vals_list)
        servers._microsoft365_link_accounts()
        servers._microsoft365_default_from_filter()
        servers._microsoft365_sync_password()
        return servers

    def write(self, vals):
        result = super().write(vals)
        self._microsoft365_link_accounts(changed=vals)
        if {"smtp_authentication", "microsoft365_account_id"} & set(vals):
            self._microsoft365_default_from_filter()
        self._microsoft365_sync_password()
        return result

    @api.model
    def send_email(self, message, *args, **kwargs):
        try:
            return super().send_email(message, *args, **kwargs)
        except MailDeliveryException as exc:
            # Exchange refuses some sends only at the end of the message (Send As, too many
            # connections): say what to do about it, quoting Exchange's own reply.
            refusal = exc.__context__
            server = self._microsoft365_sending_server(kwargs.get("mail_server_id", args[0] if args else None), kwargs)
            if not server or not isinstance(refusal, smtplib.SMTPResponseException):
                raise
            account = server.sudo()._microsoft365_account()
            found = diagnose_smtp(
                refusal.smtp_code,
                refusal.smtp_error,
                mailbox=account._smtp_login_user(),
                login=account._smtp_login_user(),
                sender=email.utils.parseaddr(str(message["From"] or ""))[1] or account.email,
                trustee=account._send_as_trustee(),
            )
            if found.code not in ("SMTP SendAsDenied", "SMTP 5.7.139", "SMTP 4.3.2"):
                raise
            raise MailDeliveryException(exc.args[0], explain(self.env, found)) from exc

    def _microsoft365_sending_server(self, mail_server_id, kwargs):
        """The Microsoft 365 server a send went through, when it is one of ours."""
        session = kwargs.get("smtp_session")
        tagged = getattr(getattr(session, "__obj__", session), "_microsoft365_server_id", None)
        server = self.browse(mail_server_id or tagged) if (mail_server_id or tagged) else self
        server = server.exists() if len(server) == 1 else self.browse()
        return server if server and server._microsoft365_in_use() else self.browse()

    def _prepare_email_message(self, message, smtp_session):
        smtp_from, smtp_to_list, message = super()._prepare_email_message(message, smtp_session)
        # "Name displayed": mail From a Microsoft 365 mailbox's own address without a name gets the
        # mailbox's name; a From that names someone (a user, the company) is left as it is.
        name, address = email.utils.parseaddr(message["From"] or "")
        if address and not name:
            account = (
                self.env["microsoft365.account"]
                .sudo()
                .search(
                    [
                        ("email", "=", address.strip().lower()),
                        ("sender_name", "!=", False),
                        ("outgoing_server_ids", "!=", False),
                    ],
                    limit=1,
                )
            )
            if account:
                del message["From"]
                message["From"] = formataddr((account.sender_name, account.email))
        return smtp_from, smtp_to_list, message

    def _smtp_login(self, connection, smtp_user, smtp_password):
        # Odoo calls this on an empty recordset when no server record is involved.
        if len(self) != 1 or not self._microsoft365_in_use():
            return super()._smtp_login(connection, smtp_user, smtp_password)
        account = self._microsoft365_account().sudo()
        # Odoo's SMTPConnection wrapper exposes only some of smtplib's attributes.
        raw = getattr(connection, "__obj__", connection)
        token = self._microsoft365_token()
        try:
            # Exchange's SMTP AUTH takes only the signed-in user; a shared address is the From.
            smtp_authenticate(raw, account._smtp_login_user(), token)
        except M365Error as exc:
            raise UserError(account._explain_mail_refusal(exc.diagnosis, token)) from None
        raw._microsoft365_server_id = self.id  # send_email explains Exchange's refusals of this session
