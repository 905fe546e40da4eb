from urllib.parse import urlencode

from odoo.tests import new_test_user, tagged
from odoo.tools import mute_logger

from .common import SandboxHttpCase

CALLBACK = "/microsoft365/oauth/callback"
QUIET = ("odoo.addons.mail_microsoft365_oauth.controllers.main",)


@tagged("post_install", "-at_install")
class TestAdminConsent(SandboxHttpCase):
    """The tenant-wide admin consent link: a one-time state, checked by the callback, `error` first."""

    def setUp(self):
        super().setUp()
        self.tenant = self.sandbox.tenant()["id"]
        self.sandbox.control("consent", client_id=self.app_registration.client_id, tenant=self.tenant, granted=False)

    def consent(self, accept=True, user=None):
        """Open the link as an Odoo administrator and answer at Microsoft; the parameters sent back."""
        action = self.app_registration.with_user(user or self.admin).action_admin_consent()
        self.assertEqual(action["type"], "ir.actions.act_url")
        params = self.sandbox.sign_in(action["url"], "admin@contoso.com", accept=accept)
        self.assertEqual(params.pop("redirect_uri"), self.base_url() + CALLBACK)
        return params

    def answer(self, params):
        return self.url_open(f"{CALLBACK}?{urlencode(params)}", allow_redirects=False).text

    def consented(self):
        return any(
            c["client_id"] == self.app_registration.client_id and c["tenant"] == self.tenant
            for c in self.sandbox.state()["consents"]
        )

    def test_granted_consent_is_confirmed_once(self):
        self.authenticate("admin", "admin")
        params = self.consent()
        self.assertTrue(params["state"])
        self.assertIn("Administrator consent granted", self.answer(params))
        self.assertTrue(self.consented())
        with mute_logger(*QUIET):
            replayed = self.answer(params)
        self.assertIn("This consent answer cannot be used", replayed)
        self.assertNotIn("consent granted", replayed)

    def test_declined_consent_is_never_shown_as_granted(self):
        self.authenticate("admin", "admin")
        for shape in ("access_denied", "consent_required"):
            with self.subTest(shape=shape):
                self.sandbox.control("settings", admin_consent_error=shape)
                params = self.consent(accept=False)
                self.assertEqual((params["admin_consent"], params["error"]), ("True", shape))
                page = self.answer(params)
                self.assertIn("Microsoft did not record the consent", page)
                self.assertIn("AADSTS65004", page)
                self.assertNotIn("consent granted", page)
                self.assertNotIn("\r", page)
        self.assertFalse(self.consented())

    @mute_logger(*QUIET, "odoo.addons.mail_microsoft365_oauth.models.microsoft365_admin_consent")
    def test_forged_missing_foreign_and_expired_states_are_refused(self):
        new_test_user(self.env, "mallory", password="mallory-password", groups="base.group_system")
        self.authenticate("admin", "admin")
        forged = {"admin_consent": "True", "tenant": self.tenant, "state": "forged-state-0123456789"}
        missing = {"admin_consent": "True", "tenant": self.tenant}
        for params in (forged, missing):
            page = self.answer(params)
            self.assertIn("This consent answer cannot be used", page)
            self.assertNotIn("consent granted", page)
        genuine = self.consent()
        self.authenticate("mallory", "mallory-password")  # another administrator's browser
        self.assertIn("This consent answer cannot be used", self.answer(genuine))
        self.authenticate("admin", "admin")
        genuine = self.consent()
        self.env.cr.execute("UPDATE microsoft365_admin_consent SET expires_at = now() - interval '1 minute'")
        self.assertIn("This consent answer cannot be used", self.answer(genuine))
