from odoo.tests import new_test_user, tagged
from odoo.tools import mute_logger

from .common import SandboxHttpCase

CALLBACK = "/microsoft365/oauth/callback"


@tagged("post_install", "-at_install")
class TestCallback(SandboxHttpCase):
    """The real redirect: Odoo's HTTP server, the sandbox's sign-in page, MSAL, and the database."""

    def setUp(self):
        super().setUp()
        self.account = self.new_account()

    def start(self, user=None, account=None):
        """Authorize as `user` in Odoo, then sign in at the sandbox; the parameters Microsoft posts back."""
        action = (account or self.account).with_user(user or self.admin).action_authorize()
        self.assertEqual(action["type"], "ir.actions.act_url")
        params = self.sandbox.sign_in(action["url"], "alice@contoso.com")
        self.assertEqual(params.pop("redirect_uri"), self.base_url() + CALLBACK)
        return params

    def post_callback(self, params):
        return self.url_open(CALLBACK, data=params, allow_redirects=False)

    def test_authorize_connects_the_account(self):
        self.authenticate("admin", "admin")
        response = self.post_callback(self.start())
        self.assertEqual(response.status_code, 303, response.text[:500])
        self.assertTrue(response.headers["Location"].endswith(f"/odoo/microsoft365-accounts/{self.account.id}"))
        self.account.invalidate_recordset()
        self.assertEqual(self.account.status, "connected")
        self.assertEqual(self.account.username, "alice@contoso.com")
        self.assertEqual(self.account.tenant_id, self.sandbox.tenant()["id"])
        self.assertIn("https://outlook.office.com/SMTP.Send", self.account.scopes)
        self.assertTrue(self.account._access_token())

    def test_replayed_state_changes_nothing(self):
        self.authenticate("admin", "admin")
        params = self.start()
        self.assertEqual(self.post_callback(params).status_code, 303)
        self.account.action_revoke()
        response = self.post_callback(params)
        self.assertEqual(response.status_code, 200)
        self.assertIn("This sign-in cannot be used", response.text)
        self.account.invalidate_recordset()
        self.assertEqual(self.account.status, "not_connected")

    @mute_logger("odoo.addons.mail_microsoft365_oauth.models.microsoft365_authorization")
    def test_other_users_and_expired_and_missing_states_are_refused(self):
        new_test_user(self.env, "mallory", password="mallory-password", groups="base.group_user")
        params = self.start()
        self.authenticate("mallory", "mallory-password")
        self.assertIn("This sign-in cannot be used", self.post_callback(params).text)
        self.authenticate("admin", "admin")
        self.assertIn("This sign-in cannot be used", self.post_callback({"code": params["code"]}).text)
        self.env.cr.execute("UPDATE microsoft365_authorization SET expires_at = now() - interval '1 minute'")
        self.assertIn("This sign-in cannot be used", self.post_callback(params).text)
        self.account.invalidate_recordset()
        self.assertEqual(self.account.status, "not_connected")

    def test_microsoft_error_is_explained_and_changes_nothing(self):
        self.authenticate("admin", "admin")
        action = self.account.with_user(self.admin).action_authorize()
        params = self.sandbox.sign_in(action["url"], "alice@contoso.com", accept=False)
        params.pop("redirect_uri")
        response = self.post_callback(params)
        self.assertEqual(response.status_code, 200)
        self.assertIn("Microsoft did not authorize the mailbox", response.text)
        self.assertIn("AADSTS65004", response.text)
        self.account.invalidate_recordset()
        self.assertEqual(self.account.status, "not_connected")

    def test_cross_site_form_post_is_resubmitted_from_our_origin(self):
        params = self.start()
        response = self.post_callback(params)  # no Odoo session: SameSite=Lax kept the cookie back
        self.assertEqual(response.status_code, 200)
        self.assertIn('id="microsoft365_resubmit"', response.text)
        self.assertIn(f'value="{params["state"]}"', response.text)
        self.authenticate("admin", "admin")
        response = self.post_callback({**params, "resubmitted": "1"})
        self.assertEqual(response.status_code, 303)
