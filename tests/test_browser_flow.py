from odoo.tests import tagged

from .common import BrowserCase

DEFAULT_APP_PARAMETER = "mail_microsoft365_oauth.default_app_id"


@tagged("post_install", "-at_install")
class TestBrowserFlow(BrowserCase):
    """A person's path in headless Chromium: Odoo's forms, the sandbox's sign-in page, and back."""

    def setUp(self):
        super().setUp()
        self.env["ir.config_parameter"].sudo().set_param(DEFAULT_APP_PARAMETER, self.app_registration.id)
        self.server = self.env["fetchmail.server"].create(
            {
                "name": "Support mailbox",
                "server_type": "imap",
                "server": "outlook.office365.com",
                "port": 993,
                "is_ssl": True,
                "user": "alice@contoso.com",
                "password": "a password Microsoft will refuse",
            }
        )
        self.open_browser()

    def test_a_person_connects_tests_inspects_and_revokes_a_mailbox(self):
        browser = self.browser
        self.log_in()
        server_url = f"{self.base_url()}/odoo/action-mail.action_email_server_tree/{self.server.id}"
        browser.open(server_url)
        browser.wait_for("div[name=connect_with] input[data-value=microsoft365]")
        browser.screenshot("1-incoming-server-with-password")

        browser.click("div[name=connect_with] input[data-value=microsoft365]")
        port = self.sandbox.ports["imaps"]
        browser.wait(
            f"document.querySelector('div[name=port] input').value.replace(/\\D/g, '') == '{port}'",
            what="the Exchange port filled in",
        )
        browser.click(".o_form_button_save")
        browser.click("button[name=action_microsoft365_authorize]", "Authorize")
        browser.screenshot("2-connect-with-microsoft-365")

        browser.wait(f"location.href.startsWith({self.sandbox.identity_url!r})", what="the sign-in page")
        browser.click("input[value='alice@contoso.com']")
        browser.screenshot("3-sandbox-sign-in")
        browser.click("#accept")
        # Back on the server the sign-in was started from.
        browser.wait(f"location.pathname.endsWith('/{self.server.id}')", what="back on the server in Odoo")
        browser.wait_for("div[name=microsoft365_status]", "Connected")
        browser.screenshot("4-connected")

        browser.click("button[name=action_microsoft365_info]", "Info")
        browser.click("button[name=action_test_connection]")
        browser.wait_for(".o_notification", "Connection test successful")
        browser.screenshot("5-test-connection")

        browser.open(server_url)
        browser.click("button[name=action_microsoft365_info]", "Info")
        browser.wait_for("div[name=username]", "alice@contoso.com")
        browser.wait_for("div[name=scopes]", "IMAP.AccessAsUser.All")
        browser.screenshot("6-info")

        browser.click("button[name=action_revoke]")
        browser.click(".modal-footer .btn-primary")
        browser.wait_for(".o_statusbar_status .o_arrow_button_current", "Not connected")
        browser.screenshot("7-revoked")

        with self.browser_requests_held():
            account = self.server.microsoft365_account_id
            self.assertEqual(account.email, "alice@contoso.com")
            self.assertEqual(account.status, "not_connected")
            self.assertFalse(account.sudo().token_cache_sealed)
            self.assertEqual(self.server.connect_with, "microsoft365")
            self.assertFalse(self.server.password)
