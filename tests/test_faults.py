from datetime import datetime, timedelta
from unittest.mock import patch

from odoo import fields
from odoo.tests import tagged
from odoo.tools import mute_logger

from ..m365.diagnosis import diagnose_mailbox
from .common import FetchCase

QUIET = (
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_account",
    "odoo.addons.mail_microsoft365_oauth.models.fetchmail_server",
    "odoo.addons.mail.models.fetchmail",
    "odoo.addons.mail_microsoft365_oauth.m365.identity",
)


@tagged("post_install", "-at_install")
class TestFaults(FetchCase):
    """Mail never stops silently: throttling, an unavailable identity platform, poison messages."""

    def mark_read(self, account, subject):
        """Leave no unread test message behind for the next test that fetches this mailbox."""
        with self.inbox(account) as imap:
            for number in imap.search(None, "UNSEEN", "SUBJECT", f'"{subject}"')[1][0].split():
                imap.store(number, "+FLAGS", "\\Seen")

    def poison(self):
        """message_process fails for mail whose subject is "Poison": (patcher, attempts)."""
        MailThread = type(self.env["mail.thread"])
        original, attempts = MailThread.message_process, []

        def message_process(thread, model, message, *args, **kwargs):
            if b"Subject: Poison" in message:
                attempts.append(1)
                raise ValueError("cannot route this message")
            return original(thread, model, message, *args, **kwargs)

        return patch.object(MailThread, "message_process", message_process), attempts

    @mute_logger(*QUIET)
    def test_poison_message_is_retried_then_left_unread_reported_and_can_be_tried_again(self):
        """Exchange keeps no client keywords: the given-up message is kept in Odoo's record (by
        Message-ID), left unread and untouched in the mailbox, and the administrator can retry it."""
        account = self.connect(self.new_account())
        server = self.incoming(account)
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Poison", sender="x@fabrikam.example")
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Wholesome", sender="y@fabrikam.example")
        self.addCleanup(self.mark_read, account, "Poison")
        patcher, attempts = self.poison()
        with patcher:
            for _run in range(4):
                self.cron_fetch()
        self.assertEqual(self.partners("Wholesome"), 1)  # processed once, not blocked by the poison
        self.assertEqual(len(attempts), 3)  # retried, then left alone
        self.assertFalse(server.microsoft365_fetch_error)  # no keyword: Exchange answered every command
        self.assertIn("Poison (from x@fabrikam.example): cannot route this message", server.microsoft365_failed_summary)
        self.assertEqual(len(self.unread(account, "Poison")), 1)  # still there, unread
        self.assertEqual(self.unread(account, "Wholesome"), [])
        self.env["microsoft365.account"]._cron_health_check()
        self.assertEqual(account.health, "fetch_failing")
        self.assertIn("Poison", account.health_message)
        # Fixed in Odoo: "Try again" on the server form, and the next fetch processes it once.
        server.action_microsoft365_retry_failed_messages()
        self.assertFalse(server.microsoft365_failed_summary)
        self.cron_fetch()
        self.cron_fetch()
        self.assertEqual((self.partners("Poison"), self.partners("Wholesome")), (1, 1))
        self.assertEqual(self.unread(account, "Poison"), [])
        self.assertFalse(server.microsoft365_failed_messages)

    @mute_logger(*QUIET)
    def test_a_dismissed_message_is_no_longer_listed_nor_tried(self):
        account = self.connect(self.new_account())
        server = self.incoming(account)
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Poison", sender="x@fabrikam.example")
        self.addCleanup(self.mark_read, account, "Poison")
        patcher, attempts = self.poison()
        with patcher:
            for _run in range(3):
                self.cron_fetch()
            server.action_microsoft365_dismiss_failed_messages()
            self.assertFalse(server.microsoft365_failed_summary)
            self.cron_fetch()
        self.assertEqual(len(attempts), 3)
        self.assertEqual(len(self.unread(account, "Poison")), 1)  # left to the administrator, in the mailbox
        self.env["microsoft365.account"]._cron_health_check()
        self.assertNotEqual(account.health, "fetch_failing")
        self.mark_read(account, "Poison")  # read in Outlook: Odoo forgets it at the next fetch
        self.cron_fetch()
        self.assertFalse(server.microsoft365_failed_messages)

    @mute_logger(*QUIET)
    def test_throttling_is_honoured(self):
        account = self.connect(self.new_account())
        server = self.incoming(account)
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="After the pause")
        self.sandbox.control("mail_throttle", mailbox="alice@contoso.com", backoff_ms=1500, count=1)
        throttled_before = datetime.now()
        self.cron_fetch()
        self.assertIn("throttling", server.microsoft365_fetch_error)
        self.assertGreaterEqual(server.microsoft365_retry_at, throttled_before + timedelta(milliseconds=1500))
        logins = self.sandbox.counter("mail_login:imap")
        self.cron_fetch()  # too early: Odoo does not even connect
        self.assertEqual(self.sandbox.counter("mail_login:imap"), logins)
        server.microsoft365_retry_at = fields.Datetime.now() - timedelta(seconds=1)  # the wait is over
        self.cron_fetch()
        self.assertEqual(self.partners("After the pause"), 1)
        self.assertFalse(server.microsoft365_fetch_error)

    @mute_logger(*QUIET)
    def test_an_unavailable_identity_platform_is_transient_and_other_servers_go_on(self):
        steady = self.connect(self.new_account(email="bob@contoso.com"), upn="bob@contoso.com")
        # Two minutes: long enough for the sign-in's own mailbox check on a slow machine, and already
        # stale for MSAL (under 5 minutes left): stalled needs the token endpoint at once.
        self.sandbox.control("settings", access_token_lifetime=120)
        stalled = self.connect(self.new_account())
        self.incoming(stalled, name="stalled")
        self.incoming(steady, name="steady")
        self.sandbox.control("deliver", mailbox="bob@contoso.com", subject="Still arriving")
        self.sandbox.control("token_fault", kind="503", count=3, retry_after=0)
        self.cron_fetch()
        self.assertEqual(self.partners("Still arriving"), 1)
        self.assertEqual(stalled.status, "connected")  # not "reconnect needed"
        self.assertIn("busy or unavailable", stalled.last_error)

    def test_backoff_is_never_shorter_than_microsoft_asked(self):
        """Datetime fields keep whole seconds: the stored time is rounded up, never down."""
        server = self.incoming(self.new_account())
        found = diagnose_mailbox("IMAP", "Request is throttled. Suggested Backoff Time: 1500 milliseconds")
        for _attempt in range(3):
            asked_at = datetime.now()
            server._microsoft365_honour_backoff(found)
            self.assertGreaterEqual(server.microsoft365_retry_at, asked_at + timedelta(milliseconds=1500))
