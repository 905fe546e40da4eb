from odoo.tests import HttpCase, tagged

from ..sandbox.client import shared_sandbox
from .browser import Browser, chromium_executable, screenshot_folder


@tagged("post_install", "-at_install")
class TestBrowserWrongUser(HttpCase):
    """A person picks the wrong account on Microsoft's sign-in page: Odoo says so and stays as it was."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.sandbox = shared_sandbox()
        cls.app_registration = cls.env["microsoft365.app"].create(cls.sandbox.odoo_app_values())

    def setUp(self):
        super().setUp()
        self.assertTrue(chromium_executable(), "Chromium is missing: bin/setup installs Debian's chromium")
        self.sandbox.reset()
        self.env["ir.config_parameter"].sudo().set_param("web.base.url", self.base_url())
        self.sandbox.control(
            "add_redirect_uri",
            client_id=self.app_registration.client_id,
            redirect_uri=self.app_registration.redirect_uri,
        )
        self.account = self.env["microsoft365.account"].create(
            {"email": "alice@contoso.com", "app_id": self.app_registration.id}
        )
        self.env.flush_all()
        self.browser = Browser(
            trusted_certificate=self.sandbox.description["server_cert"], screenshots=screenshot_folder()
        )
        self.addCleanup(self.browser.close)

    def test_signing_in_as_bob_for_alices_mailbox_is_refused(self):
        browser = self.browser
        browser.open(self.base_url() + "/web/login")
        browser.fill("input[name=login]", "admin")
        browser.fill("input[name=password]", "admin")
        browser.click("button[type=submit]", "Log in")
        browser.wait("location.pathname.startsWith('/odoo')", what="the web client")

        browser.open(f"{self.base_url()}/odoo/microsoft365-accounts/{self.account.id}")
        browser.click("button[name=action_authorize]", "Authorize")
        browser.wait(f"location.href.startsWith({self.sandbox.identity_url!r})", what="the sign-in page")
        browser.click("input[value='bob@contoso.com']")
        browser.click("#accept")
        browser.wait_for("h1", "The mailbox was not connected")
        browser.wait_for("p", "You signed in as bob@contoso.com, who may not open the mailbox alice@contoso.com")
        browser.screenshot("wrong-user-refused")

        browser.click("a.button", "Back to the mailbox")
        browser.wait_for(".o_statusbar_status .o_arrow_button_current", "Not connected")
        self.env.invalidate_all(flush=False)  # the browser's requests changed the records under this cache
        self.assertEqual(self.account.status, "not_connected")
        self.assertFalse(self.account.username)
