from unittest.mock import patch

from odoo.exceptions import AccessError, UserError
from odoo.tests import new_test_user, tagged
from odoo.tools import mute_logger

from .common import SandboxCase


@tagged("post_install", "-at_install")
class TestAccessRights(SandboxCase):
    """Administrators manage everything; the user an account is visible for may use it; nobody else."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.owner = new_test_user(cls.env, "owner", groups="base.group_user")
        cls.other = new_test_user(cls.env, "other", groups="base.group_user")
        cls.portal = new_test_user(cls.env, "portal", groups="base.group_portal")

    def setUp(self):
        super().setUp()
        self.account = self.connect(self.new_account(owner_user_id=self.owner.id))
        self.private = self.new_account(email="bob@contoso.com")

    def test_owner_sees_and_uses_only_their_account(self):
        as_owner = self.env["microsoft365.account"].with_user(self.owner)
        self.assertEqual(as_owner.search([]), self.account)
        account = self.account.with_user(self.owner)
        self.assertEqual(account.status, "connected")
        self.assertEqual(account.app_name, self.app_registration.name)
        self.assertIn("No mail server", account.server_summary)
        self.assertEqual(account.action_authorize()["type"], "ir.actions.act_url")
        self.assertEqual(account.action_test_connection()["params"]["type"], "success")
        account.action_revoke()
        self.assertEqual(self.account.status, "not_connected")

    @mute_logger("odoo.models", "odoo.addons.base.models.ir_rule")
    def test_owner_cannot_change_or_read_secrets(self):
        account = self.account.with_user(self.owner)
        with self.assertRaises(AccessError):
            account.write({"email": "mallory@contoso.com"})
        with self.assertRaises(AccessError):
            account.read(["token_cache_sealed"])
        with self.assertRaises(AccessError):
            account.read(["home_account_id"])
        with self.assertRaises(AccessError):
            self.app_registration.with_user(self.owner).read(["name"])
        with self.assertRaises(AccessError):
            self.env["fetchmail.server"].with_user(self.owner).search([])

    @mute_logger("odoo.models", "odoo.addons.base.models.ir_rule")
    def test_other_users_and_portal_get_nothing(self):
        self.assertFalse(self.env["microsoft365.account"].with_user(self.other).search([]))
        with self.assertRaises(AccessError):
            self.env["microsoft365.account"].with_user(self.portal).search([])
        for user in (self.other, self.portal):
            with self.subTest(user=user.login):
                with self.assertRaises(AccessError):
                    self.account.with_user(user).read(["email"])
                with self.assertRaises(AccessError):
                    self.account.with_user(user).action_authorize()

    def test_export_never_contains_the_token_cache(self):
        account = self.account.with_user(self.env.ref("base.user_admin"))
        with self.assertRaises(AccessError):
            account.export_data(["email", "token_cache_sealed"])
        exported = account.export_data(["email", "status", "username"])["datas"]
        self.assertEqual(exported, [["alice@contoso.com", "Connected", "alice@contoso.com"]])

    def test_administrator_manages_all(self):
        admin = self.env.ref("base.user_admin")
        self.assertEqual(
            self.env["microsoft365.account"].with_user(admin).search([("id", "in", (self.account | self.private).ids)]),
            self.account | self.private,
        )
        self.private.with_user(admin).write({"sender_name": "Bob"})


@tagged("post_install", "-at_install")
class TestCompaniesAndKeys(SandboxCase):
    def test_accounts_of_another_company_stay_invisible(self):
        other_company = self.env["res.company"].create({"name": "Fabrikam GmbH"})
        other_app = self.env["microsoft365.app"].create(
            dict(self.sandbox.odoo_app_values(), name="Fabrikam app", company_id=other_company.id)
        )
        theirs = self.new_account(email="bob@contoso.com", app_id=other_app.id)
        ours = self.new_account()
        admin = self.env.ref("base.user_admin")
        visible = (
            self.env["microsoft365.account"]
            .with_user(admin)
            .with_context(allowed_company_ids=admin.company_id.ids)
            .search([("id", "in", (theirs | ours).ids)])
        )
        self.assertEqual(visible, ours)
        self.assertFalse(
            self.env["microsoft365.app"]
            .with_user(admin)
            .with_context(allowed_company_ids=admin.company_id.ids)
            .search([("id", "=", other_app.id)])
        )

    def test_encryption_key_rotation(self):
        from odoo.tools import config

        from ..m365.vault import new_key

        account = self.connect(self.new_account())
        token = account._access_token()
        self.env.flush_all()
        vault = self.env["microsoft365.vault"]
        current = ",".join(vault._vault()._keys)  # the key file in the data directory
        newest = new_key()
        with patch.dict(config.options, {"microsoft365_oauth_keys": f"{newest},{current}"}):
            self.assertGreaterEqual(vault._rotate_all(), 2)  # the app's secret and the token cache
        with patch.dict(config.options, {"microsoft365_oauth_keys": newest}):  # the old key is gone
            self.assertEqual(account._access_token(), token)
            self.assertTrue(self.app_registration._credentials().client_secret)
        with patch.dict(config.options, {"microsoft365_oauth_keys": current}):  # and no longer opens anything
            with self.assertRaises(UserError) as refused:  # a clear message, not the core's VaultError
                self.app_registration._credentials()
            self.assertIn("encryption key", str(refused.exception))
