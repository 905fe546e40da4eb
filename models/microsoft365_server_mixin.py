from odoo import _, api, fields, models
from odoo.exceptions import UserError, ValidationError


class Microsoft365ServerMixin(models.AbstractModel):
    """What incoming and outgoing servers share when they connect through Microsoft 365.

    A server "connected with Microsoft 365" is linked to the OAuth account of its mailbox; the
    account is found, or created with the default app registration, when the server is saved.
    """

    _name = "microsoft365.server.mixin"
    _description = "Mail server connected through Microsoft 365"

    microsoft365_account_id = fields.Many2one(
        "microsoft365.account", string="OAuth account", ondelete="restrict",
        help="The Microsoft 365 mailbox this server signs in as. Left empty, it is found or created "
        "from the server's username with the default app registration (General Settings).")
    microsoft365_status = fields.Selection(related="microsoft365_account_id.status", string="OAuth status")

    # Hooks for the concrete servers ----------------------------------------------------------

    def _microsoft365_in_use(self):
        """True when this server authenticates through Microsoft 365."""
        raise NotImplementedError

    def _microsoft365_mailbox(self):
        """The mailbox address the server signs in as."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------

    def _microsoft365_link_accounts(self):
        for server in self.filtered(lambda s: s._microsoft365_in_use() and not s.microsoft365_account_id):
            mailbox = server._microsoft365_mailbox()
            if not mailbox:
                raise ValidationError(_("Enter the mailbox address of server %s to connect it with "
                                        "Microsoft 365.", server.display_name))
            server.microsoft365_account_id = self.env["microsoft365.account"]._find_or_create(mailbox)

    def _microsoft365_account(self):
        self.ensure_one()
        if not self.microsoft365_account_id:
            raise UserError(_("Choose the OAuth account of server %s.", self.display_name))
        return self.microsoft365_account_id

    def _microsoft365_token(self):
        return self._microsoft365_account()._access_token_for_use()

    @api.model
    def _microsoft365_cloud_for(self, account):
        app = account.app_id if account else self.env["microsoft365.app"]._default_app()
        return app._cloud() if app else None

    def action_microsoft365_authorize(self):
        return self._microsoft365_account().action_authorize()

    def action_microsoft365_info(self):
        return self._microsoft365_account().action_open()
