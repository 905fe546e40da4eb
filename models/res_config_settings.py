from odoo import fields, models

from .microsoft365_app import DEFAULT_APP_PARAMETER


class ResConfigSettings(models.TransientModel):
    _inherit = "res.config.settings"

    microsoft365_default_app_id = fields.Many2one(
        "microsoft365.app", string="Default app registration", config_parameter=DEFAULT_APP_PARAMETER,
        help="Used when a mail server is connected with Microsoft 365 without choosing an OAuth account.")
