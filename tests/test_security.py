from urllib.parse import urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from odoo.tests import new_test_user, tagged
from odoo.tests.common import JsonRpcException
from odoo.tools import mute_logger

from ..sandbox.hostile_inputs import HOSTILE_TEXT, record_hostile_inputs
from .common import SandboxHttpCase

CALLBACK = "/microsoft365/oauth/callback"
QUIET = (
    "odoo.http",
    "odoo.addons.mail_microsoft365_oauth.controllers.main",
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_authorization",
    "odoo.models",
    "odoo.addons.base.models.ir_rule",
    "odoo.addons.mail_microsoft365_oauth.m365.identity",
)


@tagged("post_install", "-at_install")
class TestSecurity(SandboxHttpCase):
    """What an attacker can try from a browser or over JSON-RPC, on a real server and database."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.owner = new_test_user(cls.env, "owner", password="owner-password", groups="base.group_user")
        cls.portal = new_test_user(cls.env, "portal", password="portal-password", groups="base.group_portal")

    def setUp(self):
        super().setUp()
        Account = self.env["microsoft365.account"]
        self.alice = Account.create(
            {"email": "alice@contoso.com", "app_id": self.app_registration.id, "owner_user_id": self.owner.id}
        )
        self.bob = Account.create({"email": "bob@contoso.com", "app_id": self.app_registration.id})

    def sign_in(self, account, upn):
        action = account.with_user(self.env.ref("base.user_admin")).action_authorize()
        params = self.sandbox.sign_in(action["url"], upn)
        params.pop("redirect_uri")
        return params

    def rpc(self, model, method, *args, **kwargs):
        return self.make_jsonrpc_request(
            f"/web/dataset/call_kw/{model}/{method}",
            {"model": model, "method": method, "args": list(args), "kwargs": kwargs},
        )

    # the callback ----------------------------------------------------------------------------

    @mute_logger(*QUIET)
    def test_a_code_for_account_b_cannot_connect_account_a(self):
        self.authenticate("admin", "admin")
        for_alice = self.sign_in(self.alice, "alice@contoso.com")
        for_bob = self.sign_in(self.bob, "bob@contoso.com")
        response = self.url_open(CALLBACK, data={**for_alice, "code": for_bob["code"]}, allow_redirects=False)
        self.assertEqual(response.status_code, 200)
        self.assertIn("AADSTS501481", response.text)  # the code is bound to bob's PKCE verifier
        self.env.invalidate_all()
        self.assertEqual((self.alice.status, self.bob.status), ("not_connected", "not_connected"))

    @mute_logger(*QUIET)
    def test_no_parameter_redirects_elsewhere(self):
        self.authenticate("admin", "admin")
        params = self.sign_in(self.alice, "alice@contoso.com")
        hostile = {
            "redirect": "https://evil.example/",
            "next": "//evil.example",
            "redirect_uri": "https://evil.example",
            "return_url": "javascript:alert(1)",
            "debug": "1",
            "db": "other",
        }
        response = self.url_open(CALLBACK, data={**params, **hostile}, allow_redirects=False)
        self.assertEqual(response.status_code, 303)
        location = urlsplit(response.headers["Location"])
        self.assertEqual(
            (location.netloc or urlsplit(self.base_url()).netloc, location.path, location.query),
            (urlsplit(self.base_url()).netloc, f"/odoo/microsoft365-accounts/{self.alice.id}", ""),
        )

    @mute_logger(*QUIET)
    def test_a_state_from_another_database_or_forged_is_unknown_here(self):
        self.authenticate("admin", "admin")
        params = self.sign_in(self.alice, "alice@contoso.com")
        for state in ("forged", params["state"][:-1] + "x", params["state"] + "\r\n", "' OR 1=1 --"):
            response = self.url_open(CALLBACK, data={**params, "state": state}, allow_redirects=False)
            self.assertIn("This sign-in cannot be used", response.text)
        self.assertEqual(self.url_open(CALLBACK, data=params, allow_redirects=False).status_code, 303)

    @mute_logger(*QUIET)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.dictionaries(
            st.sampled_from(["code", "state", "error", "error_description", "session_state", "client_info", "x"]),
            st.one_of(st.text(max_size=200), st.sampled_from(HOSTILE_TEXT)),
            max_size=5,
        )
    )
    def test_hostile_callbacks_change_nothing_and_never_fail(self, params):
        record_hostile_inputs("callback", 1)
        self.authenticate("admin", "admin")
        for method in ("POST", "GET"):
            if method == "POST":
                response = self.url_open(CALLBACK, data=params, allow_redirects=False, timeout=30)
            else:
                response = self.opener.get(
                    self.base_url() + CALLBACK,
                    params={k: v[:2000] for k, v in params.items()},
                    allow_redirects=False,
                    timeout=30,
                )
            self.assertIn(response.status_code, (200, 303), response.text[:300])
            self.assertNotIn("Traceback", response.text)
            self.assertNotIn("<script>alert", response.text)
        self.env.invalidate_all()
        self.assertEqual(self.alice.status, "not_connected")

    # JSON-RPC and web controllers --------------------------------------------------------------

    @mute_logger(*QUIET)
    def test_secrets_cannot_be_read_over_rpc_or_web_controllers(self):
        account = self.alice
        server = self.env["fetchmail.server"].create(
            {
                "name": "alice",
                "connect_with": "microsoft365",
                "microsoft365_account_id": account.id,
                "server_type": "imap",
                "server": "outlook.office365.com",
                "port": 993,
                "is_ssl": True,
                "user": account.email,
            }
        )
        self.env.cr.execute("UPDATE microsoft365_account SET token_cache_sealed = 'sealed' WHERE id = %s", [account.id])
        self.authenticate("admin", "admin")
        for call in (
            lambda: self.rpc("microsoft365.account", "read", [account.id], ["token_cache_sealed"]),
            lambda: self.rpc("microsoft365.account", "search_read", [], ["token_cache_sealed"]),
            lambda: self.rpc("microsoft365.account", "export_data", [account.id], ["token_cache_sealed"]),
            lambda: self.rpc("microsoft365.app", "read", [self.app_registration.id], ["client_secret_sealed"]),
            lambda: self.rpc(
                "fetchmail.server", "export_data", server.ids, ["microsoft365_account_id/token_cache_sealed"]
            ),
            lambda: self.rpc("fetchmail.server", "read", server.ids, ["microsoft365_account_id.token_cache_sealed"]),
        ):
            with self.assertRaises(JsonRpcException):
                call()
        read = self.rpc("microsoft365.app", "read", [self.app_registration.id], ["client_secret", "has_client_secret"])
        self.assertEqual((read[0]["client_secret"], read[0]["has_client_secret"]), (False, True))
        response = self.url_open(f"/web/content?model=microsoft365.account&id={account.id}&field=token_cache_sealed")
        self.assertNotEqual(response.status_code, 200)
        self.assertNotIn("sealed", response.text[:200] if response.status_code == 200 else "")

    @mute_logger(*QUIET)
    def test_owner_portal_and_public(self):
        self.authenticate("owner", "owner-password")
        mine = self.rpc("microsoft365.account", "search_read", [], ["email", "status"])
        self.assertEqual([r["email"] for r in mine], ["alice@contoso.com"])
        for forbidden in (
            lambda: self.rpc("microsoft365.account", "read", [self.bob.id], ["email"]),
            lambda: self.rpc("microsoft365.account", "write", [self.alice.id], {"email": "mallory@contoso.com"}),
            lambda: self.rpc("microsoft365.app", "search_read", [], ["client_id"]),
            lambda: self.rpc("microsoft365.account", "action_authorize", [self.bob.id]),
        ):
            with self.assertRaises(JsonRpcException):
                forbidden()
        self.authenticate("portal", "portal-password")
        with self.assertRaises(JsonRpcException):
            self.rpc("microsoft365.account", "search_read", [], ["email"])
        self.authenticate(None, None)
        with self.assertRaises(JsonRpcException):
            self.rpc("microsoft365.account", "search_read", [], ["email"])

    # every field, hostile --------------------------------------------------------------------

    @mute_logger(*QUIET)
    def test_hostile_values_in_every_field_get_a_clear_error_and_store_nothing(self):
        self.authenticate("admin", "admin")
        base = {
            "name": "Hostile",
            "client_id": "1b2c3d4e-0000-4000-8000-00000000abcd",
            "cloud": "custom",
            "authority_host": "https://login.example.com",
            **{f"{protocol}_host": f"{protocol}.example.com" for protocol in ("imap", "pop", "smtp")},
            **{"imap_port": 993, "pop_port": 995, "smtp_port": 587},
        }
        targets = [
            ("microsoft365.app", base, field)
            for field in (
                "name",
                "tenant",
                "client_id",
                "client_secret",
                "authority_host",
                "imap_host",
                "smtp_host",
                "delegated_resource",
                "ca_certificate",
            )
        ]
        targets += [
            ("microsoft365.account", {"email": "carol@contoso.com", "app_id": self.app_registration.id}, field)
            for field in ("email", "sender_name")
        ]
        targets += [
            ("microsoft365.connect.wizard", {"email": "carol@contoso.com", "app_id": self.app_registration.id}, field)
            for field in ("email", "sender_name")
        ]
        tried = refused = 0
        for model, values, field in targets:
            for hostile in HOSTILE_TEXT[1:]:  # "" is a legitimate "not set" for some fields
                before = self.env[model].search_count([])
                tried += 1
                try:
                    record_id = self.rpc(model, "create", {**values, field: hostile})
                except JsonRpcException as exc:
                    refused += 1
                    self.assertIn(
                        exc.args[0] if exc.args else "",
                        ("odoo.exceptions.ValidationError", ""),
                        f"{model}.{field} = {hostile[:40]!r}: not a clear validation error",
                    )
                    self.env.invalidate_all()
                    self.assertEqual(self.env[model].search_count([]), before, f"{model}.{field} stored something")
                    continue
                # Accepted: only as plain text, the same single line it was given (or normalised)
                stored = self.env[model].browse(record_id).read([field])[0][field] if field != "client_secret" else ""
                self.assertFalse(any(c in (stored or "") for c in "\r\n\x00"), f"{model}.{field} stored a line break")
                self.env[model].browse(record_id).unlink()
        record_hostile_inputs("fields", tried)
        self.assertGreater(refused, tried // 2)
