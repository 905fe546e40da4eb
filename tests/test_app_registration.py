from odoo.exceptions import AccessError, ValidationError
from odoo.tests import TransactionCase, new_test_user, tagged
from odoo.tools import mute_logger

TENANT = "3f0a7c2e-6d1b-4c8a-9e52-0b7d4a1c9e01"
CLIENT_ID = "0b5d3c1e-2a4f-4e6b-8c9d-1e2f3a4b5c6d"


@tagged("post_install", "-at_install")
class TestAppRegistration(TransactionCase):
    def create_app(self, **values):
        return self.env["microsoft365.app"].create(
            {"name": "Contoso", "tenant": TENANT, "client_id": CLIENT_ID, **values}
        )

    def test_identifiers_are_normalised(self):
        app = self.create_app(tenant="  Contoso.onMicrosoft.com ", client_id="{0B5D3C1E-2A4F-4E6B-8C9D-1E2F3A4B5C6D}")
        self.assertEqual(app.tenant, "contoso.onmicrosoft.com")
        self.assertEqual(app.client_id, CLIENT_ID)
        self.assertEqual(self.create_app(tenant=False, client_id=CLIENT_ID.replace("6d", "6e")).tenant, "organizations")

    def test_malformed_identifiers_are_refused_and_nothing_is_stored(self):
        count = self.env["microsoft365.app"].search_count([])
        for values in (
            {"tenant": "contoso"},
            {"tenant": "x\r\nInjected: 1"},
            {"client_id": "not-a-guid"},
            {"client_id": "<script>alert(1)</script>"},
        ):
            with self.subTest(values=values), self.assertRaises(ValidationError):
                self.create_app(**values)
        self.assertEqual(self.env["microsoft365.app"].search_count([]), count)
        app = self.create_app()
        with self.assertRaises(ValidationError):
            app.write({"client_id": "nope"})
        self.assertEqual(app.client_id, CLIENT_ID)

    def test_client_secret_is_write_only_and_encrypted_at_rest(self):
        secret = "Abc8Q~very-secret-value-1234567890abcdefg"
        app = self.create_app(client_secret=secret)
        app.invalidate_recordset()
        self.assertTrue(app.has_client_secret)
        self.assertFalse(app.client_secret)  # never sent back to the browser
        self.assertNotIn(secret, str(app.read()))
        self.env.flush_all()
        self.env.cr.execute("SELECT client_secret_sealed FROM microsoft365_app WHERE id = %s", [app.id])
        stored = self.env.cr.fetchone()[0]
        self.assertTrue(stored)
        self.assertNotIn(secret, stored)
        self.assertEqual(app._credentials().client_secret, secret)
        with self.assertRaises(AccessError):  # not even an administrator, through the ORM or RPC
            app.with_user(self.env.ref("base.user_admin")).read(["client_secret_sealed"])

    def test_redirect_uri_follows_web_base_url(self):
        self.env["ir.config_parameter"].sudo().set_param("web.base.url", "https://erp.example.com")
        self.assertEqual(self.create_app().redirect_uri, "https://erp.example.com/microsoft365/oauth/callback")

    @mute_logger("odoo.models")
    def test_employees_cannot_read_app_registrations(self):
        self.create_app(client_secret="s3cr3t-value")
        employee = new_test_user(self.env, "employee", groups="base.group_user")
        with self.assertRaises(AccessError):
            self.env["microsoft365.app"].with_user(employee).search_read([], ["client_id"])
