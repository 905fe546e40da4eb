import os

from odoo import api, models, tools

from ..m365.vault import Vault, load_or_create_key_file, parse_keys

KEY_OPTION = "microsoft365_oauth_keys"


class Microsoft365Vault(models.AbstractModel):
    """Encrypts secrets and token caches with a key kept outside the database.

    The key comes from the server configuration option ``microsoft365_oauth_keys`` (newest first,
    comma-separated) or else from ``<data_dir>/microsoft365_oauth.key``, created on first use.
    """

    _name = "microsoft365.vault"
    _description = "Microsoft 365 credential encryption"

    @api.model
    def _vault(self):
        configured = tools.config.get(KEY_OPTION)
        keys = parse_keys(configured) if configured else load_or_create_key_file(
            os.path.join(tools.config["data_dir"], "microsoft365_oauth.key"))
        return Vault(keys)

    @api.model
    def _encrypt(self, text):
        return self._vault().encrypt(text)

    @api.model
    def _decrypt(self, token):
        return self._vault().decrypt(token)
