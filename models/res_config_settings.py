from odoo import api, fields, models

from .microsoft365_app import DEFAULT_APP_PARAMETER


class ResConfigSettings(models.TransientModel):
    _inherit = "res.config.settings"

    microsoft365_default_app_id = fields.Many2one(
        "microsoft365.app",
        string="Default app registration",
        config_parameter=DEFAULT_APP_PARAMETER,
        help="Used when a mail server is connected with Microsoft 365 without choosing an OAuth account.",
    )
    microsoft365_outlook_servers = fields.Integer(
        compute="_compute_microsoft365_outlook_servers", help="Mail servers still using Odoo's own Outlook module."
    )

    @api.depends("company_id")
    def _compute_microsoft365_outlook_servers(self):
        incoming, outgoing = self.env["microsoft365.outlook.import"]._outlook_servers()
        self.microsoft365_outlook_servers = len(incoming) + len(outgoing)

    def action_microsoft365_import_outlook(self):
        return self.env["microsoft365.outlook.import"].action_import()
