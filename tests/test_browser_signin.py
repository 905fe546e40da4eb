from odoo.tests import new_test_user, tagged

from .common import BrowserCase

SESSION_UID = """fetch('/web/session/get_session_info', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({jsonrpc: '2.0', method: 'call', params: {}})}).then(r => r.json()).then(j => j.result.uid)"""


@tagged("post_install", "-at_install")
class TestBrowserSignIn(BrowserCase):
    """A person in headless Chromium: "Sign in with ..." on Odoo's login page, the sandbox's sign-in page,
    and back in Odoo as the linked user; another person links their account in their preferences first."""

    def setUp(self):
        super().setUp()
        self.app_registration.write({"name": "Contoso", "signin_enabled": True})
        self.sandbox.control(
            "add_redirect_uri",
            client_id=self.app_registration.client_id,
            redirect_uri=self.app_registration.signin_redirect_uri,
        )
        alice = self.sandbox.user("alice@contoso.com")
        self.alice = new_test_user(self.env, "alice@contoso.com", email="alice@contoso.com", name="Alice Anders")
        self.alice.write({"microsoft365_tenant_id": alice["tenant"], "microsoft365_object_id": alice["oid"]})
        self.bob = new_test_user(
            self.env, "bob@contoso.com", email="bob@contoso.com", name="Bob Berg", password="bob-password-1"
        )
        self.open_browser()

    def sign_in_with_microsoft(self, account):
        browser = self.browser
        browser.open(self.base_url() + "/web/login")
        browser.click("button.o_microsoft365_signin_button", "Sign in with Contoso")
        browser.wait(f"location.href.startsWith({self.sandbox.identity_url!r})", what="Microsoft's sign-in page")
        browser.click(f"input[value='{account}']")
        browser.click("#accept")
        browser.wait("location.pathname.startsWith('/odoo')", what="the web client")
        return browser.evaluate(SESSION_UID)

    def test_a_linked_person_signs_in_with_microsoft(self):
        self.browser.open(self.base_url() + "/web/login")
        self.browser.wait_for("button.o_microsoft365_signin_button", "Sign in with Contoso")
        self.browser.screenshot("signin-1-login-page")
        self.assertEqual(self.sign_in_with_microsoft("alice@contoso.com"), self.alice.id)
        self.browser.wait_for(".o_user_menu", timeout=60)
        self.browser.screenshot("signin-2-signed-in")

    def test_a_person_links_their_account_in_preferences_then_signs_in(self):
        browser = self.browser
        browser.open(self.base_url() + "/web/login")
        browser.fill("input[name=login]", "bob@contoso.com")
        browser.fill("input[name=password]", "bob-password-1")
        browser.click("button[type=submit]", "Log in")
        browser.wait("location.pathname.startsWith('/odoo')", what="the web client")
        for attempt in range(3):  # a click on the menu while the web client is still starting can be lost
            browser.click(".o_user_menu button")
            browser.click(".dropdown-item", "Preferences")
            try:
                browser.wait_for(".modal a.nav-link", "Account Security", timeout=20)
                break
            except AssertionError:
                if attempt == 2:
                    raise
        browser.click(".modal a.nav-link", "Account Security")
        browser.click("button[name=action_microsoft365_link]", "Link my Microsoft account")
        browser.wait(f"location.href.startsWith({self.sandbox.identity_url!r})", what="Microsoft's sign-in page")
        browser.click("input[value='bob@contoso.com']")
        browser.click("#accept")
        browser.wait_for("h1", "Microsoft account linked")
        browser.screenshot("signin-3-linked")
        with self.browser_requests_held():
            self.assertEqual(self.bob.sudo().microsoft365_object_id, self.sandbox.user("bob@contoso.com")["oid"])

        browser.open(self.base_url() + "/web/session/logout")
        browser.wait("location.pathname.startsWith('/web/login')", what="the login page")
        self.assertEqual(self.sign_in_with_microsoft("bob@contoso.com"), self.bob.id)
