from odoo.tests import tagged
from odoo.tools import mute_logger

from .common import SandboxHttpCase

CALLBACK = "/microsoft365/oauth/callback"
QUIET = (
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_account",
    "odoo.addons.mail_microsoft365_oauth.m365.identity",
)


@tagged("post_install", "-at_install")
class TestSignInChecks(SandboxHttpCase):
    """The callback stores a sign-in only when the signed-in account opens the mailbox, tells the
    truth when a renewal fails, and goes back where the sign-in was started."""

    def setUp(self):
        super().setUp()
        self.account = self.new_account()
        self.authenticate("admin", "admin")

    def sign_in(self, action, upn="alice@contoso.com", **options):
        self.assertEqual(action["type"], "ir.actions.act_url")
        params = self.sandbox.sign_in(action["url"], upn, **options)
        params.pop("redirect_uri")
        return self.url_open(CALLBACK, data=params, allow_redirects=False)

    def test_sign_in_as_another_user_is_refused_with_a_clear_page(self):
        response = self.sign_in(self.account.with_user(self.admin).action_authorize(), "bob@contoso.com")
        self.assertEqual(response.status_code, 200)
        self.assertIn("The mailbox was not connected", response.text)
        self.assertIn("You signed in as bob@contoso.com, who may not open the mailbox alice@contoso.com", response.text)
        self.account.invalidate_recordset()
        self.assertEqual(self.account.status, "not_connected")
        self.assertFalse(self.account.sudo().token_cache_sealed)

    def test_renewal_as_another_user_keeps_the_previous_grant(self):
        self.assertEqual(self.sign_in(self.account.with_user(self.admin).action_authorize()).status_code, 303)
        response = self.sign_in(self.account.with_user(self.admin).action_authorize(), "bob@contoso.com")
        self.assertIn("You signed in as bob@contoso.com", response.text)
        self.account.invalidate_recordset()
        self.assertEqual((self.account.status, self.account.username), ("connected", "alice@contoso.com"))

    @mute_logger(*QUIET)
    def test_failed_renewal_without_consent_moves_the_status(self):
        self.assertEqual(self.sign_in(self.account.with_user(self.admin).action_authorize()).status_code, 303)
        self.sandbox.control(
            "consent", client_id=self.app_registration.client_id, tenant=self.sandbox.tenant()["id"], granted=False
        )
        response = self.sign_in(self.account.with_user(self.admin).action_authorize(), consent=False)
        self.assertIn("Microsoft did not authorize the mailbox", response.text)
        self.assertIn("AADSTS65001", response.text)
        self.account.invalidate_recordset()
        self.assertEqual(self.account.status, "failing")
        self.assertIn("Consent for this app is missing", self.account.last_error)

    def test_authorize_from_a_server_returns_to_it_and_is_logged(self):
        server = self.env["fetchmail.server"].create(
            {
                "name": "alice inbox",
                "connect_with": "microsoft365",
                "microsoft365_account_id": self.account.id,
                "server_type": "imap",
                "server": self.sandbox.host,
                "port": self.sandbox.ports["imaps"],
                "is_ssl": True,
                "user": "alice@contoso.com",
            }
        )
        response = self.sign_in(server.with_user(self.admin).action_microsoft365_authorize())
        self.assertEqual(response.status_code, 303)
        self.assertTrue(
            response.headers["Location"].endswith(f"/odoo/action-mail.action_email_server_tree/{server.id}")
        )
        self.account.invalidate_recordset()
        self.assertIn("Authorized: signed in as alice@contoso.com", self.account.message_ids[0].body)
        response = self.sign_in(self.account.with_user(self.admin).action_authorize())
        self.assertTrue(response.headers["Location"].endswith(f"/odoo/microsoft365-accounts/{self.account.id}"))
        self.account.invalidate_recordset()
        self.assertIn("Authorization renewed", self.account.message_ids[0].body)

    def test_connect_wizard_ends_with_a_confirmed_inbox(self):
        wizard = self.env["microsoft365.connect.wizard"].create(
            {"email": "alice@contoso.com", "app_id": self.app_registration.id}
        )
        response = self.sign_in(wizard.with_user(self.admin).action_connect())
        self.assertEqual(response.status_code, 303, response.text[:500])
        self.account.invalidate_recordset()
        self.assertEqual(self.account.status, "connected")
        self.assertEqual(self.account.incoming_server_ids.state, "done")
        self.assertTrue(self.account.outgoing_server_ids)
