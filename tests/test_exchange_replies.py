"""What Exchange Online says after a good login (sandbox/CONFORMANCE.md IMAP-08 to IMAP-12), met by
Fetch Now and by the scheduled fetch: the cause in plain words with the fix, Microsoft's back-off
kept, and no message lost or processed twice."""

from datetime import datetime, timedelta
from unittest.mock import patch

from odoo import fields
from odoo.exceptions import ValidationError
from odoo.tests import tagged
from odoo.tools import mute_logger

from .common import FetchCase

QUIET = (
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_account",
    "odoo.addons.mail_microsoft365_oauth.models.fetchmail_server",
    "odoo.addons.mail.models.fetchmail",
    "odoo.addons.mail_microsoft365_oauth.m365.identity",
)
RAW = ("IMAP4", "command error", "Traceback", "b'")  # what an administrator must never read


@tagged("post_install", "-at_install")
class TestExchangeReplies(FetchCase):
    def fetch_now(self, server, backoff=False):
        """The Fetch Now button: the error the administrator reads. The request is rolled back after the
        error, so Microsoft's back-off is committed first; Odoo's assertRaises would roll it back here,
        hence the plain try."""
        committed = []
        with patch.object(self.env.cr, "commit", lambda: committed.append(server.microsoft365_retry_at)):
            try:
                server.fetch_mail()
            except ValidationError as failure:
                error = failure.args[0]
            else:
                self.fail("Fetch Now did not fail")
        if backoff:
            self.assertTrue(committed and committed[-1], "the back-off was not committed before the rollback")
        return error

    def assertPlain(self, text, *expected):
        for needle in expected:
            self.assertIn(needle, text)
        for raw in RAW:
            self.assertNotIn(raw, text)

    def wait_is_over(self, server):
        server.microsoft365_retry_at = fields.Datetime.now() - timedelta(seconds=1)

    @mute_logger(*QUIET)
    def test_an_app_without_mailbox_permission_is_explained_with_the_powershell_line(self):
        """OK AUTHENTICATE completed., then BAD User is authenticated but not connected. on SELECT."""
        self.app_registration.flow = "app_only"
        account = self.new_account(email="bob@contoso.com")  # the app has no FullAccess on bob's mailbox
        server = self.incoming(account)
        fix = (
            'Add-MailboxPermission -Identity "bob@contoso.com" -User (Get-ServicePrincipal -Identity '
            f"{self.app_registration.client_id}).Identity -AccessRights FullAccess"
        )
        error = self.fetch_now(server)
        self.assertPlain(error, "has no permission on the mailbox bob@contoso.com", fix)
        self.assertPlain(server.microsoft365_fetch_error, fix)
        server.microsoft365_fetch_error = False
        self.cron_fetch()
        self.assertPlain(server.microsoft365_fetch_error, fix)
        self.env["microsoft365.account"]._cron_health_check()
        self.assertEqual(account.health, "fetch_failing")
        self.assertIn("Add-MailboxPermission", account.health_message)

    @mute_logger(*QUIET)
    def test_a_disabled_mailbox_is_explained(self):
        account = self.connect(self.new_account(email="info@contoso.com"), upn="alice@contoso.com")
        server = self.incoming(account)
        self.sandbox.control("mailbox_enabled", mailbox="info@contoso.com", enabled=False)
        self.cron_fetch()
        self.assertPlain(
            server.microsoft365_fetch_error,
            "refuses to open the mailbox info@contoso.com",
            "enabled",
            "(BAD User is authenticated but not connected.)",
        )
        self.assertPlain(self.fetch_now(server), "refuses to open the mailbox info@contoso.com")

    @mute_logger(*QUIET)
    def test_throttling_after_login_on_fetch_now_keeps_the_backoff_and_the_message(self):
        """BAD Request is throttled. Suggested Backoff Time: N milliseconds, then BYE."""
        account = self.connect(self.new_account(email="bob@contoso.com"), upn="bob@contoso.com")
        server = self.incoming(account)
        self.sandbox.control("deliver", mailbox="bob@contoso.com", subject="Waited for")
        self.sandbox.control("mail_throttle", mailbox="bob@contoso.com", backoff_ms=2500, count=1)
        asked_at = datetime.now()
        self.assertPlain(self.fetch_now(server, backoff=True), "throttling", "2500 ms")
        self.assertGreaterEqual(server.microsoft365_retry_at, asked_at + timedelta(milliseconds=2500))
        self.assertEqual(len(self.unread(account, "Waited for")), 1)
        self.wait_is_over(server)
        self.cron_fetch()
        self.cron_fetch()
        self.assertEqual(self.partners("Waited for"), 1)
        self.assertEqual(self.unread(account, "Waited for"), [])
        self.assertFalse(server.microsoft365_fetch_error)

    @mute_logger(*QUIET)
    def test_a_throttled_fetch_is_not_a_message_and_other_servers_go_on(self):
        """NO Request is throttled. ... on FETCH: the session stays open, nothing is read as mail."""
        alice = self.connect(self.new_account())
        bob = self.connect(self.new_account(email="bob@contoso.com"), upn="bob@contoso.com")
        throttled, steady = self.incoming(alice), self.incoming(bob)
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Held one")
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Held two")
        self.sandbox.control("deliver", mailbox="bob@contoso.com", subject="Not held")
        self.sandbox.control("mail_throttle", mailbox="alice@contoso.com", backoff_ms=299910, count=1, where="fetch")
        asked_at = datetime.now()
        self.cron_fetch()
        self.assertEqual(self.partners("Not held"), 1)  # the other server was fetched
        self.assertFalse(steady.microsoft365_fetch_error)
        self.assertPlain(throttled.microsoft365_fetch_error, "throttling", "299910 ms")
        self.assertGreaterEqual(throttled.microsoft365_retry_at, asked_at + timedelta(milliseconds=299910))
        self.assertEqual(self.env["res.partner"].search_count([("name", "ilike", "throttled")]), 0)
        self.assertEqual((self.partners("Held one"), self.partners("Held two")), (0, 0))
        self.assertEqual(len(self.unread(alice, "Held")), 2)  # nothing lost
        self.wait_is_over(throttled)
        self.cron_fetch()
        self.cron_fetch()
        self.assertEqual((self.partners("Held one"), self.partners("Held two")), (1, 1))  # once each
        self.assertEqual(self.unread(alice, "Held"), [])
        self.assertFalse(throttled.microsoft365_fetch_error)

    @mute_logger(*QUIET)
    def test_a_throttled_fetch_on_fetch_now_says_so(self):
        account = self.connect(self.new_account())
        server = self.incoming(account)
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Fetch now held")
        self.sandbox.control("mail_throttle", mailbox="alice@contoso.com", backoff_ms=1500, count=1, where="fetch")
        self.assertPlain(self.fetch_now(server, backoff=True), "throttling", "1500 ms", "(NO Request is throttled.")
        self.assertTrue(server.microsoft365_retry_at)
        self.assertEqual(self.partners("Fetch now held"), 0)
        self.wait_is_over(server)
        with patch.object(self.env.cr, "commit", lambda: None):
            server.fetch_mail()
        self.assertEqual(self.partners("Fetch now held"), 1)

    @mute_logger(*QUIET)
    def test_a_refused_store_after_processing_never_processes_the_message_twice(self):
        """NO on the STORE that marks the message read: it stays unread, the next fetch finds it again
        and Odoo knows its Message-ID, so it is marked read without a second processing."""
        account = self.connect(self.new_account(email="bob@contoso.com"), upn="bob@contoso.com")
        server = self.incoming(account)
        self.sandbox.control("deliver", mailbox="bob@contoso.com", subject="Stored late")
        self.sandbox.control("mail_throttle", mailbox="bob@contoso.com", backoff_ms=1000, count=1, where="store")
        self.cron_fetch()
        self.assertEqual(self.partners("Stored late"), 1)
        self.assertPlain(server.microsoft365_fetch_error, "throttling", "1000 ms")
        self.assertEqual(len(self.unread(account, "Stored late")), 1)
        self.wait_is_over(server)
        self.cron_fetch()
        self.assertEqual(self.partners("Stored late"), 1)
        self.assertEqual(self.unread(account, "Stored late"), [])
        self.assertFalse(server.microsoft365_fetch_error)
