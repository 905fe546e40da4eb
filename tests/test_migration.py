from odoo.exceptions import UserError
from odoo.tests import tagged
from odoo.tools import mute_logger

from .common import SandboxCase

EXCHANGE = "https://outlook.office.com"


@tagged("post_install", "-at_install")
class TestSwitchToOAuth(SandboxCase):
    """Password servers on Microsoft 365 hosts move to OAuth in place; the password goes only once
    OAuth has been seen to work."""

    def setUp(self):
        super().setUp()
        self.env["ir.config_parameter"].sudo().set_param(
            "mail_microsoft365_oauth.default_app_id", self.app_registration.id
        )
        partner_model = self.env.ref("base.model_res_partner")
        self.incoming = self.env["fetchmail.server"].create(
            {
                "name": "Support (password)",
                "server_type": "imap",
                "server": self.sandbox.host,
                "port": self.sandbox.ports["imaps"],
                "is_ssl": True,
                "user": "alice@contoso.com",
                "password": "old-password",
                "priority": 2,
                "object_id": partner_model.id,
            }
        )
        self.outgoing = self.env["ir.mail_server"].create(
            {
                "name": "Support SMTP (password)",
                "smtp_host": self.sandbox.host,
                "smtp_port": self.sandbox.ports["smtp"],
                "smtp_encryption": "starttls",
                "smtp_user": "alice@contoso.com",
                "smtp_pass": "old-password",
                "from_filter": "contoso.com",
                "sequence": 3,
            }
        )
        self.elsewhere = self.env["fetchmail.server"].create(
            {
                "name": "Other provider",
                "server_type": "imap",
                "server": "imap.example.com",
                "port": 993,
                "is_ssl": True,
                "user": "someone@example.com",
                "password": "kept",
            }
        )

    def test_switch_keeps_the_server_and_the_password_until_oauth_works(self):
        self.assertTrue(self.incoming.microsoft365_switchable)
        self.assertFalse(self.elsewhere.microsoft365_switchable)
        action = self.incoming.action_microsoft365_switch()
        self.assertEqual(action["type"], "ir.actions.act_url")  # straight on to Microsoft's sign-in
        self.assertEqual(self.incoming.connect_with, "microsoft365")
        self.assertEqual((self.incoming.priority, self.incoming.object_id.model), (2, "res.partner"))
        self.assertEqual(self.incoming.password, "old-password")
        with self.assertRaises(UserError):  # not authorized yet: the test fails, the password stays
            self.incoming.button_confirm_login()
        self.assertEqual(self.incoming.password, "old-password")
        self.connect(self.incoming.microsoft365_account_id)
        self.incoming.button_confirm_login()
        self.assertFalse(self.incoming.password)
        self.assertFalse(self.incoming.microsoft365_password_pending)

    def test_every_microsoft_cloud_host_is_recognised(self):
        for host in (
            "smtp.office365.com",
            "smtp-mail.outlook.com",
            "smtp.office365.us",
            "outlook-dod.office365.us",
            "partner.outlook.cn",
            "SMTP.Office365.com ",
        ):
            server = self.env["ir.mail_server"].new({"smtp_host": host, "smtp_authentication": "login"})
            self.assertTrue(server.microsoft365_switchable, host)
        self.assertFalse(self.env["ir.mail_server"].new({"smtp_host": "smtp.gmail.com"}).microsoft365_switchable)

    def test_outgoing_server_switches_and_forgets_its_password_after_a_good_test(self):
        self.outgoing.action_microsoft365_switch()
        self.assertEqual(self.outgoing.smtp_authentication, "microsoft365")
        self.assertEqual(self.outgoing.from_filter, "contoso.com")
        self.assertEqual(self.outgoing.smtp_pass, "old-password")
        self.connect(self.outgoing.microsoft365_account_id)
        self.outgoing.test_smtp_connection()
        self.assertFalse(self.outgoing.smtp_pass)

    def test_list_action_reports_per_server(self):
        servers = self.incoming | self.elsewhere
        action = servers.action_microsoft365_switch()
        report = action["params"]["message"]
        self.assertIn("Support (password): switched to OAuth with alice@contoso.com", report)
        self.assertIn("Other provider: not a Microsoft 365 server, left unchanged.", report)
        self.assertEqual(self.elsewhere.connect_with, "password")
        self.assertEqual(self.elsewhere.password, "kept")
        action = self.env.ref("mail_microsoft365_oauth.ir_mail_server_action_switch_to_oauth")
        result = action.with_context(active_model="ir.mail_server", active_ids=self.outgoing.ids).run()
        self.assertEqual(result["type"], "ir.actions.act_url")  # one server: on to its sign-in
        self.assertEqual(self.outgoing.smtp_authentication, "microsoft365")


@tagged("post_install", "-at_install")
class TestTakeOverMicrosoftOutlook(SandboxCase):
    """A database set up with Odoo's microsoft_outlook: its refresh tokens carry over."""

    def outlook_refresh_token(self, upn, scope):
        """What microsoft_outlook stored after its own sign-in (offline_access + one scope)."""
        client = self.app_registration._identity_client()
        flow = client.start_sign_in(self.app_registration.redirect_uri, [f"{EXCHANGE}/{scope}"], login_hint=upn)
        client.finish_sign_in(flow, self.sandbox.sign_in(flow["auth_uri"], upn))
        return next(iter(client.cache.search(client.cache.CredentialType.REFRESH_TOKEN)))["secret"]

    def setUp(self):
        super().setUp()
        parameters = self.env["ir.config_parameter"].sudo()
        parameters.set_param("microsoft_outlook_client_id", self.app_registration.client_id)
        parameters.set_param("microsoft_outlook_client_secret", self.sandbox.secret())
        parameters.set_param("microsoft_outlook.endpoint", f"{self.sandbox.authority()}/oauth2/v2.0/")

    @mute_logger("odoo.addons.mail_microsoft365_oauth.m365.identity")
    def test_outlook_servers_become_oauth_accounts_without_a_new_sign_in(self):
        incoming = self.env["fetchmail.server"].create(
            {
                "name": "Outlook IMAP",
                "server_type": "outlook",
                "server": self.sandbox.host,
                "port": self.sandbox.ports["imaps"],
                "is_ssl": True,
                "user": "alice@contoso.com",
                "microsoft_outlook_refresh_token": self.outlook_refresh_token(
                    "alice@contoso.com", "IMAP.AccessAsUser.All"
                ),
            }
        )
        outgoing = self.env["ir.mail_server"].create(
            {
                "name": "Outlook SMTP",
                "smtp_authentication": "outlook",
                "smtp_host": self.sandbox.host,
                "smtp_port": self.sandbox.ports["smtp"],
                "smtp_encryption": "starttls",
                "smtp_user": "alice@contoso.com",
                "microsoft_outlook_refresh_token": self.outlook_refresh_token("alice@contoso.com", "SMTP.Send"),
            }
        )
        stale = self.env["fetchmail.server"].create(
            {
                "name": "Outlook IMAP (stale)",
                "server_type": "outlook",
                "server": self.sandbox.host,
                "port": self.sandbox.ports["imaps"],
                "is_ssl": True,
                "user": "bob@contoso.com",
                "microsoft_outlook_refresh_token": "0.Anot-a-refresh-token",
            }
        )
        settings = self.env["res.config.settings"].create({})
        self.assertEqual(settings.microsoft365_outlook_servers, 3)
        sign_ins = self.sandbox.counter("authorize")
        params = settings.action_microsoft365_import_outlook()["params"]
        report = params["message"]
        self.assertIn("text-prewrap", params["className"])  # one line per server, not a run-on toast

        account = incoming.microsoft365_account_id
        self.assertEqual(account, outgoing.microsoft365_account_id)
        self.assertEqual(account.app_id, self.app_registration)  # the existing registration is reused
        self.assertEqual(account.status, "connected")
        self.assertEqual(self.sandbox.counter("authorize"), sign_ins)  # nobody signed in again
        self.assertEqual((incoming.server_type, incoming.connect_with), ("imap", "microsoft365"))
        self.assertEqual(outgoing.smtp_authentication, "microsoft365")
        self.assertFalse(incoming.microsoft_outlook_refresh_token)
        incoming.button_confirm_login()
        outgoing.test_smtp_connection()
        self.assertEqual(stale.microsoft365_account_id.status, "reconnect")
        self.assertIn("Outlook IMAP (stale): now bob@contoso.com, needs Authorize", report)
        self.assertIn("Outlook IMAP: now alice@contoso.com, connected, no new sign-in needed.", report)
