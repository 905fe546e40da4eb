from odoo.tests import tagged

from .common import BrowserCase

DEFAULT_APP_PARAMETER = "mail_microsoft365_oauth.default_app_id"
WIZARD_ACTION = "mail_microsoft365_oauth.microsoft365_connect_wizard_action"


@tagged("post_install", "-at_install")
class TestBrowserConnect(BrowserCase):
    """A person connects a mailbox in headless Chromium: the connect wizard (delegated and app-only)
    and an incoming server that names one of several app registrations."""

    def setUp(self):
        super().setUp()
        self.open_browser()

    def choose(self, field, name):
        """Type in a many2one field and pick `name` from its dropdown, as a person does."""
        browser = self.browser
        browser.click(f"div[name={field}] input")
        browser.fill(f"div[name={field}] input", name[:12])
        browser.click(".o-autocomplete--dropdown-item", name)
        browser.wait(
            f"document.querySelector('div[name={field}] input').value == {name!r}",
            what=f"{name} chosen in {field}",
        )

    def open_wizard(self, email):
        browser = self.browser
        browser.open(f"{self.base_url()}/odoo/action-{WIZARD_ACTION}")
        browser.wait_for(".modal-dialog div[name=email] input")
        browser.fill("div[name=email] input", email)
        self.choose("app_id", self.app_registration.name)

    def account(self, email):
        return self.env["microsoft365.account"].search([("email", "=", email)])

    def test_delegated_wizard_signs_in_once_and_confirms_both_servers(self):
        browser = self.browser
        self.log_in()
        self.open_wizard("bob@contoso.com")
        browser.screenshot("connect-1-wizard")
        browser.click("button[name=action_connect]", "Connect and authorize")

        browser.wait(f"location.href.startsWith({self.sandbox.identity_url!r})", what="the sign-in page")
        browser.click("input[value='bob@contoso.com']")
        browser.screenshot("connect-2-sandbox-sign-in")
        browser.click("#accept")
        browser.wait("location.pathname.startsWith('/odoo/microsoft365-accounts/')", what="back on the account")
        browser.wait_for(".o_statusbar_status .o_arrow_button_current", "Connected")
        browser.wait(
            "[...document.querySelectorAll('div[name=email] input, div[name=email] span')]"
            ".some(e => (e.value || e.textContent).includes('bob@contoso.com'))",
            what="bob's account shown",
        )
        browser.screenshot("connect-3-connected")

        with self.browser_requests_held():
            account = self.account("bob@contoso.com")
            self.assertEqual(len(account), 1)
            self.assertEqual(account.app_id, self.app_registration)
            self.assertEqual(account.status, "connected")
            self.assertEqual(account.username, "bob@contoso.com")
            self.assertEqual(len(account.incoming_server_ids), 1)
            self.assertEqual(account.incoming_server_ids.state, "done")
            self.assertEqual(account.incoming_server_ids.server_type, "imap")
            self.assertEqual(len(account.outgoing_server_ids), 1)
            self.assertEqual(account.outgoing_server_ids.smtp_authentication, "microsoft365")
            self.assertEqual(account.outgoing_server_ids.from_filter, "bob@contoso.com")
        self.assertEqual(browser.url.split("?")[0].rstrip("/").split("/")[-1], str(account.id))

    def test_app_only_wizard_needs_no_sign_in_and_says_the_servers_are_confirmed(self):
        self.app_registration.flow = "app_only"
        self.env.flush_all()
        browser = self.browser
        self.log_in()
        authorize_before = self.sandbox.counter("authorize")
        self.open_wizard("info@contoso.com")
        browser.screenshot("connect-app-only-1-wizard")
        browser.click("button[name=action_connect]", "Connect and authorize")

        browser.wait_for(".o_notification", "info@contoso.com is connected: its incoming server is confirmed")
        browser.wait_for(".o_notification", "mail can be sent")
        # Then the account's form, not the web client's "Oops!" dialog (an action without "views").
        browser.wait_for(".o_form_view", "info@contoso.com")
        self.assertFalse(browser.evaluate("!!document.querySelector('.o_error_dialog')"), "an error dialog opened")
        browser.screenshot("connect-app-only-2-connected")
        self.assertFalse(browser.url.startswith(self.sandbox.identity_url))
        self.assertEqual(self.sandbox.counter("authorize"), authorize_before, "a sign-in page was opened")

        with self.browser_requests_held():
            account = self.account("info@contoso.com")
            self.assertEqual(len(account), 1)
            self.assertEqual(account.status, "app_only")
            self.assertEqual(account.incoming_server_ids.state, "done")
            self.assertEqual(len(account.outgoing_server_ids), 1)
        self.assertIn(f"/microsoft365.account/{account.id}", browser.url)  # the account's page, opened

    def test_several_app_registrations_the_person_chooses_one_on_the_server(self):
        self.env["ir.config_parameter"].sudo().set_param(DEFAULT_APP_PARAMETER, False)
        other = self.env["microsoft365.app"].create(
            dict(self.sandbox.odoo_app_values("Partner Mail (multi-tenant)"), imap_host="imap.partner.example")
        )
        self.env.flush_all()
        browser = self.browser
        self.log_in()
        browser.open(f"{self.base_url()}/odoo/action-mail.action_email_server_tree/new")
        browser.wait_for("div[name=connect_with] input[data-value=microsoft365]")
        browser.fill("div[name=name] input", "Partner mailbox")
        browser.fill("div[name=user] input", "alice@contoso.com")
        browser.click("div[name=connect_with] input[data-value=microsoft365]")
        browser.wait_for("div[name=microsoft365_app_id] input")
        self.choose("microsoft365_app_id", other.name)
        browser.wait(
            "document.querySelector('div[name=server] input').value == 'imap.partner.example'",
            what="the app registration's IMAP host filled in",
        )
        browser.screenshot("connect-several-apps-1-chosen")
        browser.click(".o_form_button_save")
        browser.wait("/\\/\\d+$/.test(location.pathname)", what="the server saved")
        browser.wait(
            "(document.querySelector('div[name=microsoft365_account_id] input') || {}).value == 'alice@contoso.com'",
            what="the OAuth account found from the username",
        )
        browser.screenshot("connect-several-apps-2-saved")

        with self.browser_requests_held():
            server = self.env["fetchmail.server"].search([("name", "=", "Partner mailbox")])
            self.assertEqual(len(server), 1)
            self.assertEqual(server.connect_with, "microsoft365")
            self.assertEqual(server.server, "imap.partner.example")
            self.assertEqual(server.microsoft365_account_id.app_id, other)
            self.assertEqual(server.microsoft365_account_id.email, "alice@contoso.com")
