from datetime import timedelta
from unittest.mock import patch

from odoo import fields
from odoo.tests import new_test_user, tagged
from odoo.tools import mute_logger

from .common import SandboxCase

QUIET = ("odoo.addons.mail_microsoft365_oauth.models.microsoft365_account", "odoo.addons.mail.models.fetchmail")


@tagged("post_install", "-at_install")
class TestHealthCheck(SandboxCase):
    """The daily check: keeps sign-ins alive, and tells the right people once about each problem."""

    def setUp(self):
        super().setUp()
        self.owner = new_test_user(self.env, "mailbox-owner", groups="base.group_user")
        self.admin = self.env.ref("base.user_admin")

    def todo(self, record):
        return record.activity_ids.filtered(
            lambda a: a.activity_type_id == self.env.ref("mail.mail_activity_data_todo")
        )

    def run_check(self):
        self.env["microsoft365.account"]._cron_health_check()

    def test_an_idle_sign_in_is_kept_alive(self):
        account = self.connect(self.new_account())
        account.sudo().last_refresh = fields.Datetime.now() - timedelta(days=20)
        refreshes = self.sandbox.counter("token:refresh_token")
        self.run_check()
        self.assertEqual(self.sandbox.counter("token:refresh_token"), refreshes + 1)
        self.assertGreater(account.last_refresh, fields.Datetime.now() - timedelta(minutes=1))
        self.run_check()  # refreshed recently: not again
        self.assertEqual(self.sandbox.counter("token:refresh_token"), refreshes + 1)

    @mute_logger(*QUIET)
    def test_a_revoked_grant_is_reported_once_to_the_owner_and_others_are_unaffected(self):
        revoked = self.connect(self.new_account(owner_user_id=self.owner.id))
        healthy = self.connect(self.new_account(email="bob@contoso.com"), upn="bob@contoso.com")
        for account in (revoked, healthy):
            account.sudo().last_refresh = fields.Datetime.now() - timedelta(days=20)
        self.sandbox.control("revoke_sessions", user="alice@contoso.com")
        self.run_check()
        self.run_check()
        self.assertEqual((revoked.status, revoked.health), ("reconnect", "reconnect"))
        self.assertIn("revoked", revoked.health_message)
        self.assertEqual(self.todo(revoked).user_id, self.owner)
        self.assertEqual(len(self.todo(revoked)), 1)  # once, not every run
        self.assertEqual((healthy.status, healthy.health), ("connected", "ok"))
        self.assertFalse(self.todo(healthy))

    def test_an_expiring_client_secret_is_warned_once(self):
        self.app_registration.secret_expires_on = fields.Date.today() + timedelta(days=10)
        self.run_check()
        self.run_check()
        self.assertIn("expires on", self.app_registration.health_message)
        self.assertEqual(self.todo(self.app_registration).user_id, self.admin)
        self.app_registration.secret_expires_on = fields.Date.today() + timedelta(days=700)  # a new secret
        self.run_check()
        self.assertFalse(self.app_registration.health_message)
        self.assertEqual(len(self.todo(self.app_registration)), 1)

    @mute_logger(*QUIET)
    def test_a_failing_fetch_is_shown_on_the_server_and_the_account(self):
        account = self.connect(self.new_account(email="info@contoso.com"), upn="alice@contoso.com")
        # Then alice loses her Full Access to the shared mailbox.
        self.sandbox.control(
            "grant", right="full_access", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False
        )
        server = self.incoming(account, name="bob", state="done")
        with patch.object(self.env.cr, "commit", lambda: None):
            self.env["fetchmail.server"]._fetch_mails()  # the cron: logs and goes on
        self.assertIn("owns or has Full Access to info@contoso.com", server.microsoft365_fetch_error)
        self.assertTrue(server.microsoft365_fetch_failed_at)
        self.run_check()
        self.assertEqual(account.health, "fetch_failing")
        self.assertIn("The last fetch of bob failed", account.health_message)
        self.assertEqual(self.todo(account).user_id, self.admin)
