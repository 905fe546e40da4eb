from unittest.mock import patch

from odoo.exceptions import UserError, ValidationError
from odoo.tests import tagged
from odoo.tools import mute_logger

from ..m365.errors import MailLoginFailed, ReconnectRequired
from ..m365.mailcheck import imap_authenticate
from ..models.microsoft365_account import explain
from .common import SandboxCase


@tagged("post_install", "-at_install")
class TestAccountConnection(SandboxCase):
    """A connected mailbox against the sandbox: tokens at rest, refresh, and IMAP/POP3/SMTP logins."""

    def read_inbox(self, mailbox, subject):
        """Read `mailbox` as the sandbox app (app-only, FullAccess) and return the matching messages."""
        token = self.app_token()
        with self.imap() as imap:
            imap_authenticate(imap, mailbox, token)
            _status, data = imap.search(None, "SUBJECT", f'"{subject}"')
            return data[0].split()

    def test_mailbox_address_is_validated(self):
        for bad in ("alice", "alice@contoso.com\r\nBcc: x@y.z", "<alice@contoso.com>"):
            with self.subTest(bad=bad), self.assertRaises(ValidationError):
                self.new_account(email=bad)

    def test_connected_account_keeps_only_ciphertext(self):
        account = self.connect(self.new_account())
        self.assertEqual(account.status, "connected")
        self.assertEqual(account.username, "alice@contoso.com")
        self.env.flush_all()
        self.env.cr.execute("SELECT token_cache_sealed FROM microsoft365_account WHERE id = %s", [account.id])
        sealed = self.env.cr.fetchone()[0]
        self.assertTrue(sealed)
        for clear_text in ("refresh_token", "access_token", "alice@contoso.com", "eyJ"):
            self.assertNotIn(clear_text, sealed)

    def test_cached_token_costs_no_request_and_no_write(self):
        account = self.connect(self.new_account())
        requests_before = self.sandbox.counter("token_requests")
        token = account._access_token()
        self.env.flush_all()
        with self.assertQueryCount(__system__=1):  # the account's row, read once; nothing written
            account.invalidate_recordset()
            self.assertEqual(account._access_token(), token)
        self.assertEqual(self.sandbox.counter("token_requests"), requests_before)

    def test_refresh_saves_the_rotated_refresh_token(self):
        # Under MSAL's 5 minutes, so every use refreshes; long enough for the sign-in's mailbox check.
        self.sandbox.control("settings", access_token_lifetime=120)
        account = self.connect(self.new_account())
        sealed_before = account.sudo().token_cache_sealed
        first = account._access_token()
        second = account._access_token()  # would fail if the first refresh's new token were lost
        self.assertTrue(first and second)
        self.assertNotEqual(first, second)
        self.assertNotEqual(account.sudo().token_cache_sealed, sealed_before)
        self.assertEqual(self.sandbox.counter("token:refresh_token"), 2)

    @mute_logger("odoo.addons.mail_microsoft365_oauth.models.microsoft365_account")
    def test_revoked_grant_needs_reconnect_in_plain_words(self):
        self.sandbox.control("settings", access_token_lifetime=120)
        account = self.connect(self.new_account())
        self.sandbox.control("revoke_sessions", user="alice@contoso.com")
        # No assertRaises, whose savepoint would roll the status back: as in fetchmail's cron, which
        # catches the error and commits.
        raised = None
        try:
            account._access_token()
        except ReconnectRequired as exc:
            raised = exc
        self.assertIsNotNone(raised, "a revoked grant must not yield a token")
        self.assertEqual(account.status, "reconnect")
        self.assertIn("Authorize", account.last_error)

    def test_imap_fetch_creates_records(self):
        account = self.connect(self.new_account())
        self.sandbox.control(
            "deliver", mailbox="alice@contoso.com", subject="Order 4711 from Fabrikam", sender="buyer@fabrikam.example"
        )
        server = self.incoming(
            account, name="alice (Microsoft 365)", object_id=self.env.ref("base.model_res_partner").id
        )
        server.button_confirm_login()
        self.assertEqual(server.state, "done")
        with patch.object(self.env.cr, "commit", lambda: None):  # fetchmail commits after each message
            self.env["fetchmail.server"]._fetch_mails()  # what the cron runs
        self.assertTrue(self.env["res.partner"].search([("name", "=", "Order 4711 from Fabrikam")]))
        self.assertTrue(server.date)

    @mute_logger("odoo.addons.mail_microsoft365_oauth.models.microsoft365_account", "odoo.addons.mail.models.fetchmail")
    def test_fetch_now_after_revocation_says_what_to_do(self):
        self.sandbox.control("settings", access_token_lifetime=120)
        account = self.connect(self.new_account())
        server = self.incoming(account, name="alice")
        self.sandbox.control("revoke_sessions", user="alice@contoso.com")
        with self.assertRaises(ValidationError) as failure:
            server.fetch_mail()
        message = str(failure.exception)
        self.assertIn("The sign-in was revoked", message)
        self.assertIn("Authorize the mailbox again", message)
        self.assertNotIn("Traceback", message)

    def test_pop3_test_connection(self):
        account = self.connect(self.new_account())
        server = self.incoming(account, name="alice POP", server_type="pop", port=self.sandbox.ports["pop3s"])
        server.button_confirm_login()
        self.assertEqual(server.state, "done")

    def outgoing_server(self, account):
        return self.outgoing(account, name="alice SMTP")

    def test_smtp_sends_and_mail_arrives(self):
        account = self.connect(self.new_account())
        server = self.outgoing_server(account)
        self.assertEqual(server.test_smtp_connection()["tag"], "display_notification")
        message = self.env["ir.mail_server"].build_email(
            "alice@contoso.com", ["info@contoso.com"], "Quote 2026-118", "Please find the quote."
        )
        server.send_email(message, mail_server_id=server.id)
        self.assertEqual(len(self.read_inbox("info@contoso.com", "Quote 2026-118")), 1)

    def test_account_test_connection(self):
        account = self.connect(self.new_account())
        self.outgoing_server(account)
        result = account.action_test_connection()
        self.assertEqual(result["params"]["type"], "success")
        self.assertIn("SMTP", result["params"]["message"])
        self.sandbox.control("smtp_auth", mailbox="alice@contoso.com", enabled=False)
        with self.assertRaises(UserError) as refused:
            account.action_test_connection()
        self.assertIn("SmtpClientAuthenticationDisabled", str(refused.exception))

    def test_smtp_auth_disabled_is_explained(self):
        account = self.connect(self.new_account())
        self.sandbox.control("smtp_auth", mailbox="alice@contoso.com", enabled=False)
        with self.assertRaises(UserError) as refused:
            self.outgoing_server(account).test_smtp_connection()
        self.assertIn("Set-CASMailbox", str(refused.exception))


@tagged("post_install", "-at_install")
class TestSharedMailboxAndNeutralize(SandboxCase):
    def test_delegate_with_full_access_reads_a_shared_mailbox(self):
        account = self.connect(self.new_account(email="info@contoso.com"), upn="alice@contoso.com")
        self.assertTrue(account.signed_in_as_other)
        self.assertEqual(account.username, "alice@contoso.com")
        self.assertEqual(account.action_test_connection()["params"]["type"], "success")

    def test_signed_in_as_someone_without_access_is_refused_in_plain_words(self):
        with self.assertRaises(MailLoginFailed) as refused:  # at the sign-in, before anything is stored
            self.connect(self.new_account(email="bob@contoso.com"), upn="alice@contoso.com")
        self.assertIn(
            "alice@contoso.com, who may not open the mailbox bob@contoso.com",
            explain(self.env, refused.exception.diagnosis),
        )

    def test_neutralized_copy_forgets_every_token(self):
        from odoo.modules.neutralize import get_neutralization_queries

        account = self.connect(self.new_account())
        self.env.flush_all()
        for query in get_neutralization_queries(["mail_microsoft365_oauth"]):
            self.env.cr.execute(query)
        account.invalidate_recordset()
        self.assertEqual(account.status, "not_connected")
        self.assertFalse(account.sudo().token_cache_sealed)
