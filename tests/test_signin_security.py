"""Sign in to Odoo with Microsoft, over the real controller: Odoo's HTTP server, the sandbox's sign-in
page, MSAL and the database. Each refusal below is one check of the sign-in; each test fails when that
check is removed (m365/tests/test_id_token.py does the same for every check of the ID token alone)."""

import re
import uuid

import requests

from odoo.exceptions import AccessDenied, UserError
from odoo.http import root
from odoo.tests import new_test_user, tagged
from odoo.tools import mute_logger

from ..m365.id_token import SignInIdentity
from ..models.res_users import SignInRefused
from .common import SandboxHttpCase

START = "/microsoft365/signin/start"
CALLBACK = "/microsoft365/signin/callback"
COMPLETE = "/microsoft365/signin/complete"
CONTROLLER_LOG = "odoo.addons.mail_microsoft365_oauth.controllers.signin"
QUIET = (CONTROLLER_LOG, "odoo.addons.base.models.res_users", "odoo.http")
REFUSED = "You were not signed in"
UNUSABLE = "This sign-in cannot be used"


class SignInCase(SandboxHttpCase):
    """An app registration used for sign-in, and Odoo users, some linked to sandbox accounts."""

    def setUp(self):
        super().setUp()
        self.app = self.app_registration
        self.app.write({"signin_enabled": True})
        self.allow_redirect_uri(self.app)
        self.contoso = self.sandbox.tenant()["id"]
        self.fabrikam = self.sandbox.tenant("Fabrikam")["id"]
        self.alice = self.odoo_user("alice@contoso.com", linked=True)

    def allow_redirect_uri(self, app):
        self.sandbox.control("add_redirect_uri", client_id=app.client_id, redirect_uri=app.signin_redirect_uri)

    def odoo_user(self, upn, linked=False, groups="base.group_user", **values):
        user = new_test_user(self.env, upn, email=upn, groups=groups, password=f"{upn}-password", **values)
        if linked:
            account = self.sandbox.user(upn)
            user.write({"microsoft365_tenant_id": account["tenant"], "microsoft365_object_id": account["oid"]})
        return user

    def multi_tenant_app(self, tenants):
        values = dict(self.sandbox.odoo_app_values("Partner Mail (multi-tenant)"), tenant=False)
        app = self.env["microsoft365.app"].create(
            {**values, "signin_enabled": True, "signin_tenant_ids": ", ".join(tenants)}
        )
        self.allow_redirect_uri(app)
        return app

    # a browser: Odoo's login page, the button, Microsoft, and back -------------------------------

    def login_page(self, opener=None):
        response = (opener or self.opener).get(self.base_url() + "/web/login", timeout=30)
        self.assertEqual(response.status_code, 200)
        return response.text

    def start(self, app=None, login="", opener=None):
        """Press "Sign in with ..." on the login page: Microsoft's authorize URL."""
        opener = opener or self.opener
        page = self.login_page(opener)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        response = opener.post(
            self.base_url() + START,
            data={"csrf_token": csrf, "microsoft365_app_id": (app or self.app).id, "login": login, "password": "x"},
            allow_redirects=False,
            timeout=30,
        )
        self.assertEqual(response.status_code, 303, response.text[:500])
        return response.headers["Location"]

    def microsoft(self, authorize_url, account):
        params = self.sandbox.sign_in(authorize_url, account)
        self.assertEqual(params.pop("redirect_uri"), self.base_url() + CALLBACK)
        return params

    def complete(self, params, opener=None):
        """What the browser does with Microsoft's form_post: the callback page posts it again, from Odoo."""
        return (opener or self.opener).post(self.base_url() + COMPLETE, data=params, allow_redirects=False, timeout=30)

    def sign_in(self, account="alice@contoso.com", app=None, opener=None):
        return self.complete(self.microsoft(self.start(app, opener=opener), account), opener=opener)

    def odoo_session(self, opener=None):
        return root.session_store.get((opener or self.opener).cookies.get("session_id"))

    def assertSignedInAs(self, response, user, location="/odoo"):
        self.assertEqual(response.status_code, 303, response.text[:1000])
        self.assertTrue(response.headers["Location"].endswith(location), response.headers["Location"])
        self.assertEqual(self.odoo_session().uid, user.id)

    def assertRefused(self, response, text=REFUSED):
        self.assertEqual(response.status_code, 200, response.headers.get("Location"))
        self.assertIn(text, response.text)
        self.assertFalse(self.odoo_session().uid)
        self.assertFalse(self.odoo_session().get("pre_uid"))


@tagged("post_install", "-at_install")
class TestSignIn(SignInCase):
    def test_login_page_shows_one_button_per_sign_in_app_registration(self):
        page = self.login_page()
        self.assertIn(f"Sign in with {self.app.name}", re.sub(r"\s+", " ", page))
        self.assertRegex(page, rf'name="microsoft365_app_id"[^>]* value="{self.app.id}"')
        self.app.signin_enabled = False
        self.assertNotIn('name="microsoft365_app_id"', self.login_page())

    def test_a_linked_user_signs_in_as_odoo_logs_a_password_login(self):
        sid_before = self.opener.cookies.get("session_id")
        logins_before = self.env["res.users.log"].search_count([("create_uid", "=", self.alice.id)])
        authorize_url = self.start(login="alice@contoso.com")
        self.assertIn("prompt=select_account", authorize_url)
        self.assertIn("login_hint=alice%40contoso.com", authorize_url)
        self.assertIn("code_challenge_method=S256", authorize_url)
        self.assertIn("email", authorize_url)
        response = self.complete(self.microsoft(authorize_url, "alice@contoso.com"))
        self.assertSignedInAs(response, self.alice)
        self.assertNotEqual(self.opener.cookies.get("session_id"), sid_before)  # session rotated
        self.assertEqual(
            self.env["res.users.log"].search_count([("create_uid", "=", self.alice.id)]), logins_before + 1
        )
        # the password login keeps working
        self.authenticate("alice@contoso.com", "alice@contoso.com-password")
        self.assertEqual(self.odoo_session().uid, self.alice.id)

    def test_only_local_redirects_are_followed(self):
        for redirect, expected in [
            ("/odoo/action-base.action_res_users", "/odoo/action-base.action_res_users"),
            ("https://evil.example/", "/odoo"),
            ("//evil.example/", "/odoo"),
            ("/\t/evil.example/", "/odoo"),
            ("/\\evil.example/", "/odoo"),
        ]:
            with self.subTest(redirect=redirect):
                self.opener.cookies.clear()
                page = self.login_page()
                csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
                started = self.opener.post(
                    self.base_url() + START,
                    data={"csrf_token": csrf, "microsoft365_app_id": self.app.id, "redirect": redirect},
                    allow_redirects=False,
                    timeout=30,
                )
                response = self.complete(self.microsoft(started.headers["Location"], "alice@contoso.com"))
                self.assertSignedInAs(response, self.alice, location=expected)
                self.assertNotIn("evil", response.headers["Location"])

    def test_the_callback_posts_microsofts_answer_again_from_odoo(self):
        params = self.microsoft(self.start(), "alice@contoso.com")
        page = requests.post(self.base_url() + CALLBACK, data=dict(params, junk="x" * 10), timeout=30)
        self.assertEqual(page.status_code, 200)
        self.assertNotIn("session_id", page.cookies)  # the browser's session is left alone
        self.assertIn(f'action="{COMPLETE}"', page.text)
        self.assertIn(params["state"], page.text)
        self.assertNotIn("junk", page.text)

    def test_portal_user_gets_what_odoo_gives_a_portal_user(self):
        portal = self.odoo_user("bob@contoso.com", linked=True, groups="base.group_portal")
        response = self.sign_in("bob@contoso.com")
        self.assertSignedInAs(response, portal, location="/web/login_successful")
        self.assertFalse(portal._is_internal())

    def test_two_factor_authentication_is_still_asked(self):
        self.env.cr.execute(
            "UPDATE res_users SET totp_secret = %s WHERE id = %s", ["JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", self.alice.id]
        )
        self.alice.invalidate_recordset()
        self.assertTrue(self.alice.totp_enabled)
        response = self.sign_in()
        self.assertEqual(response.status_code, 303)
        self.assertIn("/web/login/totp", response.headers["Location"])
        self.assertFalse(self.odoo_session().uid)  # not signed in before the second factor
        self.assertEqual(self.odoo_session()["pre_uid"], self.alice.id)

    def test_unknown_users_can_be_created_from_a_template(self):
        template = self.env.ref("base.template_portal_user_id")
        self.app.write({"signin_unknown_users": "create", "signin_template_user_id": template.id})
        response = self.sign_in("bob@contoso.com")
        bob = self.env["res.users"].search([("login", "=", "bob@contoso.com")])
        self.assertSignedInAs(response, bob, location="/web/login_successful")
        self.assertEqual(bob.sudo().microsoft365_object_id, self.sandbox.user("bob@contoso.com")["oid"])
        self.assertTrue(bob._is_portal())
        self.assertNotEqual(bob.partner_id, template.partner_id)
        self.assertIn("User created at the first sign-in", bob.partner_id.message_ids[:1].body)

    @mute_logger(*QUIET)
    def test_link_by_upn_for_a_single_tenant_app(self):
        bob = self.odoo_user("bob@contoso.com")
        self.app.signin_link_by_upn = True
        bob.active = False  # an archived user is not linked
        self.assertRefused(self.sign_in("bob@contoso.com"), "is not linked to a user of this Odoo")
        self.assertFalse(bob.sudo().microsoft365_object_id)
        bob.active = True
        self.opener.cookies.clear()
        response = self.sign_in("bob@contoso.com")
        self.assertSignedInAs(response, bob)
        self.assertEqual(bob.sudo().microsoft365_object_id, self.sandbox.user("bob@contoso.com")["oid"])
        self.assertIn("Microsoft account linked", bob.partner_id.message_ids[:1].body)

    def test_link_by_upn_matches_the_whole_name_never_a_pattern(self):
        """`_` and `%` are wildcards of SQL's LIKE, and `_` is common in user names: the account
        b_b@contoso.com must not be linked to the Odoo user bob@contoso.com (an administrator, say)."""
        bob = self.odoo_user("bob@contoso.com", groups="base.group_system")
        self.app.signin_link_by_upn = True
        for username in ("b_b@contoso.com", "%@contoso.com", "BOB@contoso.com"):
            identity = SignInIdentity(self.contoso, str(uuid.uuid4()), username, "Someone", "", "")
            if username.startswith("BOB"):  # the same name in other letter case is the same account name
                self.assertEqual(self.env["res.users"]._microsoft365_signin_user(self.app, identity), bob)
                continue
            with self.assertRaises(SignInRefused):
                self.env["res.users"]._microsoft365_signin_user(self.app, identity)
            self.assertFalse(bob.sudo().microsoft365_object_id)

    def test_a_linked_guest_signs_in_as_the_user_linked_to_its_object_in_this_tenant(self):
        guest = next(u for u in self.sandbox.description["directory"]["users"] if u["home_tenant"])
        user = new_test_user(self.env, "carol", groups="base.group_user")
        user.write({"microsoft365_tenant_id": self.contoso, "microsoft365_object_id": guest["oid"]})
        self.assertSignedInAs(self.sign_in(guest["upn"]), user)
        # her account at home (Fabrikam) is another identity: not this user
        home = self.sandbox.user("carol@fabrikam.onmicrosoft.com")
        self.assertNotEqual(home["oid"], guest["oid"])

    @mute_logger(*QUIET)
    def test_link_by_upn_never_links_a_guest_nor_on_a_multi_tenant_app(self):
        guest = next(u for u in self.sandbox.description["directory"]["users"] if u["home_tenant"])
        # an Odoo user whose login is the guest's home address (its preferred_username)
        carol = self.odoo_user("carol@fabrikam.onmicrosoft.com")
        self.app.signin_link_by_upn = True
        self.assertRefused(self.sign_in(guest["upn"]))
        self.assertFalse(carol.sudo().microsoft365_object_id)
        app = self.multi_tenant_app([self.contoso])
        app.signin_link_by_upn = True  # hidden on the form for multi-tenant apps: ignored here too
        bob = self.odoo_user("bob@contoso.com")
        self.assertRefused(self.sign_in("bob@contoso.com", app=app))
        self.assertFalse(bob.sudo().microsoft365_object_id)

    def test_a_user_links_their_account_from_preferences_then_signs_in(self):
        bob = self.odoo_user("bob@contoso.com")
        self.authenticate("bob@contoso.com", "bob@contoso.com-password")
        result = self.make_jsonrpc_request(
            "/web/dataset/call_button/res.users/action_microsoft365_link",
            {"model": "res.users", "method": "action_microsoft365_link", "args": [[bob.id]], "kwargs": {}},
        )
        self.assertEqual(result["type"], "ir.actions.act_url")
        page = self.complete(self.microsoft(result["url"], "bob@contoso.com"))
        self.assertEqual(page.status_code, 200)
        self.assertIn("Microsoft account linked", page.text)
        bob.invalidate_recordset()
        self.assertEqual(
            (bob.sudo().microsoft365_tenant_id, bob.sudo().microsoft365_object_id),
            (self.contoso, self.sandbox.user("bob@contoso.com")["oid"]),
        )
        self.assertIn("Microsoft account linked by", bob.partner_id.message_ids[:1].body)
        self.opener.cookies.clear()  # a new browser session
        self.assertSignedInAs(self.sign_in("bob@contoso.com"), bob)

    @mute_logger(*QUIET)
    def test_an_account_linked_to_another_user_is_not_linked_again(self):
        bob = self.odoo_user("bob@contoso.com")
        self.authenticate("bob@contoso.com", "bob@contoso.com-password")
        result = self.make_jsonrpc_request(
            "/web/dataset/call_button/res.users/action_microsoft365_link",
            {"model": "res.users", "method": "action_microsoft365_link", "args": [[bob.id]], "kwargs": {}},
        )
        page = self.complete(self.microsoft(result["url"], "alice@contoso.com"))
        self.assertIn("already linked to another Odoo user", page.text)
        self.assertFalse(bob.sudo().microsoft365_object_id)

    def test_administrator_links_and_unlinks_in_the_users_chatter(self):
        bob = self.odoo_user("bob@contoso.com")
        oid = self.sandbox.user("bob@contoso.com")["oid"]
        bob.write({"microsoft365_tenant_id": self.contoso.upper(), "microsoft365_object_id": oid})
        self.assertEqual(bob.sudo().microsoft365_tenant_id, self.contoso)
        self.assertIn("Microsoft account linked by", bob.partner_id.message_ids[:1].body)
        bob.action_microsoft365_unlink()
        self.assertFalse(bob.sudo().microsoft365_object_id)
        self.assertIn("Microsoft account unlinked by", bob.partner_id.message_ids[:1].body)
        with self.assertRaises(UserError):
            self.alice.with_user(bob).action_microsoft365_unlink()


@tagged("post_install", "-at_install")
class TestSignInRefusals(SignInCase):
    @mute_logger(*QUIET)
    def test_nOAuth_another_tenants_user_with_the_victims_email_is_not_the_victim(self):
        """Fabrikam's administrator sets Mallory's email to Alice's address; the app admits both tenants."""
        self.sandbox.control("user_attributes", user="mallory@fabrikam.onmicrosoft.com", email="alice@contoso.com")
        app = self.multi_tenant_app([self.contoso, self.fabrikam])
        # Alice linked: Mallory is someone else
        self.assertRefused(self.sign_in("mallory@fabrikam.onmicrosoft.com", app=app))
        # Alice not linked yet (a database moving to Microsoft sign-in): Mallory still is not Alice
        self.alice.write({"microsoft365_tenant_id": False, "microsoft365_object_id": False})
        self.assertRefused(self.sign_in("mallory@fabrikam.onmicrosoft.com", app=app))
        self.assertFalse(self.alice.sudo().microsoft365_object_id)
        # Unknown accounts create users: Mallory gets a user of her own, never Alice's
        template = self.env.ref("base.template_portal_user_id")
        app.write({"signin_unknown_users": "create", "signin_template_user_id": template.id})
        response = self.sign_in("mallory@fabrikam.onmicrosoft.com", app=app)
        self.assertEqual(response.status_code, 303)
        self.assertNotEqual(self.odoo_session().uid, self.alice.id)
        mallory = self.env["res.users"].browse(self.odoo_session().uid)
        self.assertEqual(mallory.login, "mallory@fabrikam.onmicrosoft.com")
        # nor Alice's address: Odoo's mail gateway would attribute Alice's mail to Mallory
        self.assertNotEqual(mallory.email, "alice@contoso.com")
        self.assertFalse(self.alice.sudo().microsoft365_object_id)

    @mute_logger(*QUIET)
    def test_a_tenant_outside_the_allow_list_is_refused(self):
        app = self.multi_tenant_app([self.contoso])
        self.odoo_user("carol@fabrikam.onmicrosoft.com", linked=True)
        self.assertRefused(self.sign_in("carol@fabrikam.onmicrosoft.com", app=app), "may not sign in to this Odoo")
        self.assertSignedInAs(self.sign_in("alice@contoso.com", app=app), self.alice)

    @mute_logger(*QUIET)
    def test_an_unlinked_account_is_refused(self):
        bob = self.odoo_user("bob@contoso.com")
        response = self.sign_in("bob@contoso.com")
        self.assertRefused(response, "is not linked to a user of this Odoo")
        self.assertFalse(bob.sudo().microsoft365_object_id)

    @mute_logger(*QUIET)
    def test_an_archived_user_is_refused(self):
        self.alice.active = False
        self.assertRefused(self.sign_in(), "The Odoo user linked to this Microsoft account is archived")
        # and Odoo's own login refuses them too, even with a valid one-time credential
        token = self.alice._microsoft365_issue_ticket()
        credential = {"type": "microsoft365", "login": self.alice.login, "token": token}
        with self.assertRaises(AccessDenied):
            self.env["res.users"].authenticate(self.env.cr.dbname, credential, {"interactive": True})

    @mute_logger(*QUIET)
    def test_forged_state_is_refused(self):
        params = self.microsoft(self.start(), "alice@contoso.com")
        self.assertRefused(self.complete(dict(params, state="forged" + uuid.uuid4().hex)), UNUSABLE)
        self.assertRefused(self.complete({k: v for k, v in params.items() if k != "state"}), UNUSABLE)

    @mute_logger(*QUIET)
    def test_replayed_state_is_refused(self):
        params = self.microsoft(self.start(), "alice@contoso.com")
        # The state is used once, whatever the answer was (here one Microsoft never sent)
        declined = dict(params, error="access_denied", error_description="AADSTS65004: User declined.")
        self.assertRefused(self.complete(declined), "Microsoft did not sign you in")
        self.assertRefused(self.complete(params), UNUSABLE)
        # and a state used for a sign-in cannot sign in again in another browser
        params = self.microsoft(self.start(), "alice@contoso.com")
        self.assertSignedInAs(self.complete(params), self.alice)
        self.opener.cookies.clear()
        self.assertRefused(self.complete(params), UNUSABLE)

    @mute_logger(*QUIET)
    def test_expired_state_is_refused(self):
        params = self.microsoft(self.start(), "alice@contoso.com")
        session = self.odoo_session()
        pending = session["microsoft365_signin"]
        pending[params["state"]]["expires"] = 0
        session["microsoft365_signin"] = pending
        root.session_store.save(session)
        self.assertRefused(self.complete(params), UNUSABLE)

    @mute_logger(*QUIET)
    def test_state_of_another_browser_session_is_refused(self):
        params = self.microsoft(self.start(), "alice@contoso.com")
        other_browser = requests.Session()
        self.login_page(other_browser)
        response = self.complete(params, opener=other_browser)
        self.assertEqual(response.status_code, 200)
        self.assertIn(UNUSABLE, response.text)
        self.assertFalse(self.odoo_session(other_browser).uid)

    @mute_logger(*QUIET, "odoo.addons.mail_microsoft365_oauth.m365.identity")
    def test_id_tokens_microsoft_would_not_issue_are_refused(self):
        for fault, text in [
            ("nonce", "nonce differs"),
            ("audience", "issued to another application"),
            ("tenant", "not by the directory it names"),  # Fabrikam's token for Contoso's single-tenant app
            ("issuer", "not by the directory it names"),
            ("signature", "signature of the ID token is not valid"),
            ("unsigned", "not signed the way Microsoft signs"),
            ("expired", "has expired"),
            ("not_yet_valid", "not valid yet"),
        ]:
            with self.subTest(fault=fault):
                self.sandbox.control("id_token_fault", kind=fault)
                self.assertRefused(self.sign_in(), text)

    @mute_logger(*QUIET)
    def test_microsofts_refusal_is_explained(self):
        authorize_url = self.start()
        params = self.sandbox.sign_in(authorize_url, "alice@contoso.com", accept=False)
        params.pop("redirect_uri")
        self.assertRefused(self.complete(params), "Microsoft did not sign you in")

    @mute_logger(*QUIET)
    def test_the_one_time_ticket_is_single_use_and_cannot_be_guessed(self):
        token = self.alice._microsoft365_issue_ticket()
        credential = {"type": "microsoft365", "login": self.alice.login, "token": token}
        with self.assertRaises(AccessDenied):
            self.env["res.users"].authenticate(
                self.env.cr.dbname, dict(credential, token="guess"), {"interactive": True}
            )
        token = self.alice._microsoft365_issue_ticket()
        info = self.env["res.users"].authenticate(
            self.env.cr.dbname, dict(credential, token=token), {"interactive": True}
        )
        self.assertEqual(info["uid"], self.alice.id)
        with self.assertRaises(AccessDenied):
            self.env["res.users"].authenticate(self.env.cr.dbname, dict(credential, token=token), {"interactive": True})
