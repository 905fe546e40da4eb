from odoo.tests import tagged

from .common import BrowserCase


@tagged("post_install", "-at_install")
class TestBrowserWrongUser(BrowserCase):
    """A person picks the wrong account on Microsoft's sign-in page: Odoo says so and stays as it was."""

    def setUp(self):
        super().setUp()
        self.account = self.new_account()
        self.env.flush_all()
        self.open_browser()

    def test_signing_in_as_bob_for_alices_mailbox_is_refused(self):
        browser = self.browser
        self.log_in()

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
        with self.browser_requests_held():
            self.assertEqual(self.account.status, "not_connected")
            self.assertFalse(self.account.username)
