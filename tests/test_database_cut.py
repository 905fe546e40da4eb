"""A PostgreSQL connection cut (pg_terminate_backend, as a database restart or a failover does) outside test
mode: a token refresh runs in a transaction of its own, on a connection of its own; when that connection is
cut, the cron run that asked for the token goes on (its own connection is fine) and no mail fails for it."""

import contextlib
import threading
import time

from odoo import fields
from odoo.tests import tagged
from odoo.tools import mute_logger

from .common import CommittedCase

LANE = "mail_microsoft365_oauth.ir_cron_microsoft365_fetch_lane_1"
MAIL_QUEUE = "mail.ir_cron_mail_scheduler_action"
QUIET = (
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_account",
    "odoo.addons.mail_microsoft365_oauth.models.fetchmail_server",
    "odoo.addons.mail.models.mail_mail",
    "odoo.addons.base.models.ir_cron",
    "odoo.addons.base.models.ir_mail_server",
    "odoo.sql_db",
)


@tagged("post_install", "-at_install")
class TestDatabaseCut(CommittedCase):
    def setUp(self):
        super().setUp()
        self.sandbox.control("settings", access_token_lifetime=120)  # every use of the token refreshes it
        with self.transaction() as env:
            app = self.committed_app(env, name="Database cut")
            account = self.committed_account(env, app)
            self.account_id = account.id

    @contextlib.contextmanager
    def refresh_cut(self):
        """Another worker holds the account's row (as during its own refresh): the refresh that waits for it
        has its database connection cut, before it asked Microsoft anything (no refresh token spent)."""
        cut, stop = [], threading.Event()

        def cutter():
            with self.registry.cursor() as watcher:
                deadline = time.monotonic() + 60
                while not stop.is_set() and not cut and time.monotonic() < deadline:
                    watcher.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' "
                        "AND query LIKE %s",
                        ["%FROM microsoft365_account WHERE id = %FOR NO KEY UPDATE%"],
                    )
                    cut.extend(watcher.fetchall())
                    watcher.rollback()  # a new snapshot of pg_stat_activity at the next look
                    stop.wait(0.05)

        with self.registry.cursor() as holder:
            holder.execute("SELECT id FROM microsoft365_account WHERE id = %s FOR NO KEY UPDATE", [self.account_id])
            thread = threading.Thread(target=cutter)
            thread.start()
            try:
                yield cut
            finally:
                stop.set()
                thread.join()
                holder.rollback()

    @mute_logger(*QUIET)
    def test_a_fetch_lane_goes_on_when_the_connection_of_a_token_refresh_is_cut(self):
        with self.transaction() as env:
            server = env["fetchmail.server"].create(
                {
                    "name": "alice (cut)",
                    "connect_with": "microsoft365",
                    "microsoft365_account_id": self.account_id,
                    "server_type": "imap",
                    "server": self.sandbox.host,
                    "port": self.sandbox.ports["imaps"],
                    "is_ssl": True,
                    "user": "alice@contoso.com",
                    "state": "done",
                    "object_id": env.ref("base.model_res_partner").id,
                }
            )
            self.committed.append((server._name, server.id))
        with self.refresh_cut() as cut:
            errors = self.run_cron_as_a_worker(LANE)
        self.assertTrue(cut)  # the refresh's connection was cut indeed
        self.assertEqual(errors, [])  # the run did not fail: only that mailbox waits for the next one
        with self.transaction() as env:
            account = env["microsoft365.account"].browse(self.account_id)
            self.assertEqual(account.status, "connected")
            self.assertTrue(account._access_token())  # the grant is intact

    @mute_logger(*QUIET)
    def test_a_mail_stays_queued_when_the_connection_of_a_token_refresh_is_cut(self):
        with self.transaction() as env:
            server = env["ir.mail_server"].create(
                {
                    "name": "alice SMTP (cut)",
                    "smtp_authentication": "microsoft365",
                    "microsoft365_account_id": self.account_id,
                    "smtp_host": self.sandbox.host,
                    "smtp_port": self.sandbox.ports["smtp"],
                    "smtp_encryption": "starttls",
                    "smtp_user": "alice@contoso.com",
                    "from_filter": "alice@contoso.com",
                }
            )
            self.committed.append((server._name, server.id))
            mail = env["mail.mail"].create(
                {
                    "subject": "Across a database cut",
                    "email_from": "alice@contoso.com",
                    "email_to": "buyer@fabrikam.example",
                    "body_html": "<p>Hello</p>",
                    "mail_server_id": server.id,
                    "scheduled_date": fields.Datetime.now(),
                }
            )
            mail_id = mail.id
        self.addCleanup(self.remove_mail, mail_id)
        with self.refresh_cut() as cut:
            errors = self.run_cron_as_a_worker(MAIL_QUEUE)
        self.assertTrue(cut)
        self.assertEqual(errors, [])
        with self.transaction() as env:
            mail = env["mail.mail"].browse(mail_id)
            self.assertEqual(mail.state, "outgoing", mail.failure_reason)  # not failed for good
            self.assertIn("database connection", mail.failure_reason)
        self.assertEqual(self.run_cron_as_a_worker(MAIL_QUEUE), [])
        with self.transaction() as env:
            mail = env["mail.mail"].browse(mail_id)
            self.assertFalse(mail.exists() and mail.state != "sent", mail.exists() and mail.failure_reason)

    def remove_mail(self, mail_id):
        with self.transaction() as env:
            env["mail.mail"].browse(mail_id).exists().unlink()
