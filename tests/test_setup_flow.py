from odoo.exceptions import ValidationError
from odoo.tests import tagged

from .common import SandboxCase


@tagged("post_install", "-at_install")
class TestSetupFlow(SandboxCase):
    """How an administrator sets mailboxes up: the connect action, Connect with on servers, settings."""

    def test_connect_wizard_creates_account_and_both_servers_then_signs_in(self):
        wizard = self.env["microsoft365.connect.wizard"].create(
            {"email": " Sales@Contoso.com ", "app_id": self.app_registration.id}
        )
        action = wizard.action_connect()
        account = self.env["microsoft365.account"].search([("email", "=", "sales@contoso.com")])
        self.assertEqual(len(account), 1)
        self.assertEqual(account.incoming_server_ids.server_type, "imap")
        self.assertEqual(account.incoming_server_ids.port, self.sandbox.ports["imaps"])
        self.assertEqual(account.outgoing_server_ids.smtp_port, self.sandbox.ports["smtp"])
        self.assertEqual(account.outgoing_server_ids.smtp_user, "sales@contoso.com")
        self.assertEqual(action["type"], "ir.actions.act_url")
        self.assertTrue(action["url"].startswith(self.sandbox.identity_url))
        self.assertIn("login_hint=sales%40contoso.com", action["url"])
        self.assertIn("prompt=select_account", action["url"])
        # Running it again reuses everything
        self.env["microsoft365.connect.wizard"].create(
            {"email": "sales@contoso.com", "app_id": self.app_registration.id}
        ).action_create_only()
        self.assertEqual(self.env["microsoft365.account"].search_count([("email", "=", "sales@contoso.com")]), 1)
        self.assertEqual((len(account.incoming_server_ids), len(account.outgoing_server_ids)), (1, 1))

    def test_connect_with_on_a_server_links_the_mailbox_account(self):
        self.env["ir.config_parameter"].sudo().set_param(
            "mail_microsoft365_oauth.default_app_id", self.app_registration.id
        )
        incoming = self.env["fetchmail.server"].create(
            {
                "name": "Support",
                "connect_with": "microsoft365",
                "server_type": "imap",
                "server": self.sandbox.host,
                "port": self.sandbox.ports["imaps"],
                "is_ssl": True,
                "user": "Info@Contoso.com",
            }
        )
        outgoing = self.env["ir.mail_server"].create(
            {
                "name": "Support",
                "smtp_authentication": "microsoft365",
                "smtp_host": self.sandbox.host,
                "smtp_port": self.sandbox.ports["smtp"],
                "smtp_encryption": "starttls",
                "from_filter": "info@contoso.com",
            }
        )
        self.assertEqual(incoming.microsoft365_account_id.email, "info@contoso.com")
        self.assertEqual(outgoing.microsoft365_account_id, incoming.microsoft365_account_id)
        self.assertEqual(outgoing.smtp_user, "info@contoso.com")

    def test_password_servers_are_untouched(self):
        server = self.env["fetchmail.server"].create(
            {
                "name": "Legacy",
                "server_type": "imap",
                "server": "imap.example.com",
                "port": 993,
                "is_ssl": True,
                "user": "legacy@example.com",
                "password": "secret",
            }
        )
        self.assertEqual(server.connect_with, "password")
        self.assertFalse(server.microsoft365_account_id)
        outgoing = self.env["ir.mail_server"].create(
            {
                "name": "Legacy",
                "smtp_host": "smtp.example.com",
                "smtp_user": "legacy@example.com",
                "smtp_pass": "secret",
            }
        )
        self.assertEqual(outgoing.smtp_authentication, "login")
        self.assertFalse(outgoing.microsoft365_account_id)

    def test_connect_with_needs_a_mailbox(self):
        with self.assertRaises(ValidationError):
            self.env["fetchmail.server"].create({"name": "x", "connect_with": "microsoft365", "server_type": "imap"})

    def test_onchange_fills_exchange_hosts(self):
        self.env["ir.config_parameter"].sudo().set_param(
            "mail_microsoft365_oauth.default_app_id", self.app_registration.id
        )
        from odoo.tests import Form

        form = Form(self.env["fetchmail.server"])
        form.name = "Onchange"
        form.connect_with = "microsoft365"
        self.assertEqual(form.server, self.sandbox.host)
        self.assertEqual(form.port, self.sandbox.ports["imaps"])
        self.assertTrue(form.is_ssl)

    def test_default_app_registration_in_general_settings(self):
        settings = self.env["res.config.settings"].create({"microsoft365_default_app_id": self.app_registration.id})
        settings.execute()
        self.assertEqual(self.env["microsoft365.app"]._default_app(), self.app_registration)
        arch = self.env["res.config.settings"].get_views([(False, "form")])["views"]["form"]["arch"]
        self.assertIn('name="microsoft365_default_app_id"', arch)
        self.assertIn("microsoft365_oauth_setting", arch)
