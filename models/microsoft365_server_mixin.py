from odoo import _, fields, models
from odoo.exceptions import UserError


class Microsoft365ServerMixin(models.AbstractModel):
    """What incoming and outgoing servers share when they connect through Microsoft 365."""

    _name = "microsoft365.server.mixin"
    _description = "Mail server connected through Microsoft 365"

    microsoft365_account_id = fields.Many2one(
        "microsoft365.account", string="OAuth account", ondelete="restrict")
    microsoft365_status = fields.Selection(related="microsoft365_account_id.status", string="OAuth status")

    def _microsoft365_account(self):
        self.ensure_one()
        if not self.microsoft365_account_id:
            raise UserError(_("Choose the OAuth account of server %s.", self.display_name))
        return self.microsoft365_account_id

    def action_microsoft365_authorize(self):
        return self._microsoft365_account().action_authorize()

    def action_microsoft365_info(self):
        return self._microsoft365_account().action_open()
