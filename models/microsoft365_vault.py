import os

from odoo import api, models, tools
from odoo.exceptions import UserError
from odoo.tools import SQL

from ..m365.vault import Vault, VaultError, load_or_create_key_file, parse_keys

KEY_OPTION = "microsoft365_oauth_keys"
# Every encrypted column of this addon (table, column): constants, never user input.
SEALED_COLUMNS = (
    ("microsoft365_app", "client_secret_sealed"),
    ("microsoft365_account", "token_cache_sealed"),
    ("microsoft365_authorization", "flow_sealed"),
)


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
        keys = (
            parse_keys(configured)
            if configured
            else load_or_create_key_file(os.path.join(tools.config["data_dir"], "microsoft365_oauth.key"))
        )
        return Vault(keys)

    @api.model
    def _encrypt(self, text):
        try:
            return self._vault().encrypt(text)
        except VaultError:
            raise self._vault_user_error() from None

    @api.model
    def _decrypt(self, token):
        try:
            return self._vault().decrypt(token)
        except VaultError:
            raise self._vault_user_error() from None

    @api.model
    def _vault_user_error(self):
        return UserError(
            self.env._(
                "Odoo cannot decrypt the stored Microsoft 365 credentials: the encryption key is not the one they "
                "were stored with (server option microsoft365_oauth_keys, else the file microsoft365_oauth.key in "
                "Odoo's data directory). Put the previous key back (first in microsoft365_oauth_keys), or enter "
                "the app registration's secret again and authorize the mailboxes again."
            )
        )

    @api.model
    def _rotate_all(self):
        """Re-encrypt every stored secret with the newest key, after a new key was put first in
        ``microsoft365_oauth_keys``; the old key can then be removed. Returns how many values."""
        vault = self._vault()
        rotated = 0
        for table, column in SEALED_COLUMNS:
            self.env.cr.execute(
                SQL(
                    "SELECT id, %(column)s FROM %(table)s WHERE %(column)s IS NOT NULL FOR UPDATE",
                    column=SQL.identifier(column),
                    table=SQL.identifier(table),
                )
            )
            for row_id, sealed in self.env.cr.fetchall():
                self.env.cr.execute(
                    SQL(
                        "UPDATE %(table)s SET %(column)s = %(value)s WHERE id = %(id)s",
                        table=SQL.identifier(table),
                        column=SQL.identifier(column),
                        value=vault.rotate(sealed),
                        id=row_id,
                    )
                )
                rotated += 1
        self.env.invalidate_all()
        return rotated
