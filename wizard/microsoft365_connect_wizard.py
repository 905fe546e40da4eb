from odoo import api, fields, models


class Microsoft365ConnectWizard(models.TransientModel):
    """Connect a Microsoft 365 mailbox in one step: its OAuth account, an incoming and an outgoing
    server linked to it, then one sign-in at Microsoft for both."""

    _name = "microsoft365.connect.wizard"
    _description = "Connect a Microsoft 365 mailbox"

    email = fields.Char(string="Mailbox", required=True, help="For example sales@contoso.com")
    app_id = fields.Many2one(
        "microsoft365.app",
        string="App registration",
        required=True,
        default=lambda self: self.env["microsoft365.app"]._default_app(),
    )
    incoming = fields.Selection(
        [("imap", "IMAP"), ("pop", "POP3"), ("none", "None")], string="Incoming mail", default="imap", required=True
    )
    outgoing = fields.Boolean(string="Outgoing mail (SMTP)", default=True)
    owner_user_id = fields.Many2one("res.users", string="Only visible for", help="Empty: administrators only.")
    sender_name = fields.Char(string="Name displayed")

    @api.model_create_multi
    def create(self, vals_list):
        # Same rules as the account it creates, checked before anything is stored.
        Account = self.env["microsoft365.account"]
        return super().create(
            [
                dict(vals, **Account._normalise({k: vals[k] for k in ("email", "sender_name") if vals.get(k)}))
                for vals in vals_list
            ]
        )

    def action_connect(self):
        """Create the account and its servers, sign in (delegated) and confirm the servers; an app-only
        registration needs no sign-in: its servers are tested and confirmed at once."""
        account = self._connect()
        if account.app_id.flow != "app_only":
            return account._authorize(confirm_servers=True)
        left = account._confirm_servers()
        if left:
            message = self.env._("%s is not ready yet:", account.email) + "\n" + "\n".join(left)
            kind = "warning"
        else:
            message = self.env._(
                "%s is connected: its incoming server is confirmed and mail can be sent.", account.email
            )
            kind = "success"
        action = account._notify(self.env._("Connect a Microsoft 365 mailbox"), message, kind)
        action["params"]["next"] = account.action_open()
        return action

    def action_create_only(self):
        return self._connect().action_open()

    def _connect(self):
        self.ensure_one()
        Account = self.env["microsoft365.account"]
        email = Account._normalise({"email": self.email})["email"]
        account = Account.search([("email", "=", email), ("app_id", "=", self.app_id.id)], limit=1)
        values = {"owner_user_id": self.owner_user_id.id, "sender_name": self.sender_name}
        if account:
            account.write({k: v for k, v in values.items() if v})
        else:
            account = Account.create({"email": email, "app_id": self.app_id.id, **values})
        cloud = self.app_id._cloud()
        name = self.env._("%s (Microsoft 365)", email)
        if self.incoming != "none" and not account.incoming_server_ids:
            pop = self.incoming == "pop"
            self.env["fetchmail.server"].create(
                {
                    "name": name,
                    "connect_with": "microsoft365",
                    "microsoft365_account_id": account.id,
                    "server_type": self.incoming,
                    "server": cloud.pop_host if pop else cloud.imap_host,
                    "port": cloud.pop_port if pop else cloud.imap_port,
                    "is_ssl": True,
                    "user": email,
                }
            )
        if self.outgoing and not account.outgoing_server_ids:
            self.env["ir.mail_server"].create(
                {
                    "name": name,
                    "smtp_authentication": "microsoft365",
                    "microsoft365_account_id": account.id,
                    "smtp_host": cloud.smtp_host,
                    "smtp_port": cloud.smtp_port,
                    "smtp_encryption": "starttls",
                    "smtp_user": email,
                    "from_filter": email,
                }
            )
        return account
