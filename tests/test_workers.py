"""What runs in Odoo's real workers, outside test mode: the daily health check as the cron worker runs
it, while its keep-alive refreshes commit on their own cursors."""

import itertools
import threading
import time
from datetime import timedelta
from types import SimpleNamespace
from unittest.mock import patch

from odoo import fields
from odoo.tests import tagged
from odoo.tools import mute_logger

from ..models import microsoft365_health as health
from .common import CommittedCase

HEALTH_CRON = "mail_microsoft365_oauth.ir_cron_microsoft365_health_check"
MAIL_QUEUE = "mail.ir_cron_mail_scheduler_action"
MAIL_QUIET = (
    "odoo.addons.mail.models.mail_mail",
    "odoo.addons.base.models.ir_mail_server",
    "odoo.addons.base.models.ir_cron",
    "odoo.addons.mail_microsoft365_oauth.m365.identity",
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_app",
)
QUIET = (
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_account",
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_health",
)


@tagged("post_install", "-at_install")
class TestHealthCheckInACronWorker(CommittedCase):
    """Idle sign-ins are refreshed on their own committed cursor; the check then writes the same
    account rows. In one REPEATABLE READ transaction that is `could not serialize access due to
    concurrent update` and the whole run is rolled back; each account has its own transaction."""

    def setUp(self):
        super().setUp()
        with self.transaction() as env:
            app = self.committed_app(env, name="Workers")
            self.app_id = app.id
            self.account_ids = [
                self.committed_account(env, app, email).id for email in ("alice@contoso.com", "bob@contoso.com")
            ]
            env["microsoft365.account"].browse(self.account_ids).write(
                {"last_refresh": fields.Datetime.now() - timedelta(days=20)}  # idle: kept alive by the check
            )

    def accounts(self, env):
        return env["microsoft365.account"].browse(self.account_ids)

    @mute_logger(*QUIET)
    def test_the_health_check_refreshes_idle_sign_ins_and_records_health_in_one_run(self):
        with self.transaction() as env:  # a health change to write on the accounts the refresh touched
            env["microsoft365.app"].browse(self.app_id).secret_expires_on = fields.Date.today() + timedelta(days=10)
        refreshes = self.sandbox.counter("token:refresh_token")
        self.assertEqual(self.run_cron_as_a_worker(HEALTH_CRON), [])  # the run did not fail
        self.assertEqual(self.sandbox.counter("token:refresh_token"), refreshes + 2)
        with self.transaction() as env:
            for account in self.accounts(env):
                self.assertGreater(account.last_refresh, fields.Datetime.now() - timedelta(minutes=5))
                self.assertEqual((account.status, account.health), ("connected", "secret_expiring"))
                self.assertIn("expires on", account.health_message)
            progress = env["ir.cron.progress"].search(
                [("cron_id", "=", env.ref(HEALTH_CRON).id)], order="id desc", limit=1
            )
            self.assertEqual((progress.done, progress.remaining), (2, 0))  # Odoo 18's cron progress, per account

    @mute_logger(*QUIET)
    def test_a_grant_revoked_during_the_keep_alive_is_reported_by_the_same_run(self):
        self.sandbox.control("revoke_sessions", user="alice@contoso.com")
        self.assertEqual(self.run_cron_as_a_worker(HEALTH_CRON), [])
        with self.transaction() as env:
            alice, bob = self.accounts(env)
            # The refusal was committed by the refresh's own transaction: the check must see it.
            self.assertEqual((alice.status, alice.health), ("reconnect", "reconnect"))
            self.assertIn("revoked", alice.health_message)
            self.assertTrue(alice.activity_ids)  # the administrators are told today, not tomorrow
            self.assertEqual((bob.status, bob.health), ("connected", "ok"))
            self.assertGreater(bob.last_refresh, fields.Datetime.now() - timedelta(minutes=5))

    @mute_logger(*QUIET)
    def test_one_account_failing_does_not_roll_back_the_others(self):
        with self.transaction() as env:
            env["microsoft365.app"].browse(self.app_id).secret_expires_on = fields.Date.today() + timedelta(days=10)
            alice_id = self.accounts(env)[0].id
        Account = self.registry["microsoft365.account"]
        update_health = Account._update_health

        def broken_for_alice(accounts):
            if alice_id in accounts.ids:
                raise RuntimeError("something unexpected")
            return update_health(accounts)

        with patch.object(Account, "_update_health", broken_for_alice):
            self.run_cron_as_a_worker(HEALTH_CRON)
        with self.transaction() as env:
            alice, bob = self.accounts(env)
            self.assertEqual(bob.health, "secret_expiring")  # committed although alice's check failed
            self.assertGreater(bob.last_refresh, fields.Datetime.now() - timedelta(minutes=5))
            self.assertEqual(alice.health, "ok")

    @mute_logger(*QUIET)
    def test_a_health_check_longer_than_its_budget_goes_on_in_the_next_pass(self):
        """Keep-alive refreshes take a round trip each: with many idle accounts the check would outlast Odoo's
        time limit on the cron worker, which kills it. It stops within the cron pass's budget instead and stays
        due: the next pass checks the rest. (A clock that moves 200 s per account, a budget of 100 s.)"""
        clock = itertools.count(0, 200)
        refreshes = self.sandbox.counter("token:refresh_token")
        with (
            patch.object(health, "cron_pass_deadline", lambda env, seconds: 100, create=True),
            patch.object(health, "time", SimpleNamespace(monotonic=lambda: next(clock)), create=True),
        ):
            self.assertEqual(self.run_cron_as_a_worker(HEALTH_CRON), [])
        self.assertEqual(self.sandbox.counter("token:refresh_token"), refreshes + 1)  # one account in this pass
        with self.transaction() as env:
            cron = env.ref(HEALTH_CRON)
            self.assertTrue(
                cron.nextcall <= fields.Datetime.now()
                or env["ir.cron.trigger"].search_count([("cron_id", "=", cron.id)]),
                "the check stays due for the next pass",
            )
        self.assertEqual(self.run_cron_as_a_worker(HEALTH_CRON), [])  # the next pass
        self.assertEqual(self.sandbox.counter("token:refresh_token"), refreshes + 2)
        with self.transaction() as env:
            for account in self.accounts(env):
                self.assertGreater(account.last_refresh, fields.Datetime.now() - timedelta(minutes=5))


@tagged("post_install", "-at_install")
class TestButtonsInAWorker(CommittedCase):
    """A button's request, in one real transaction, that refreshes the token on its own cursor and then
    records its outcome on the same account."""

    @mute_logger(*QUIET)
    def test_test_connection_of_a_not_working_account_with_a_stale_token(self):
        self.sandbox.control("settings", access_token_lifetime=120)  # the test refreshes first
        with self.transaction() as env:
            account = self.committed_account(env, self.committed_app(env, name="Buttons"))
            account.write({"status": "failing", "last_error": "IMAP: the server could not be reached"})
            account_id = account.id
        with self.transaction() as env:
            result = env["microsoft365.account"].browse(account_id).action_test_connection()
            self.assertEqual(result["params"]["type"], "success")
        with self.transaction() as env:
            account = env["microsoft365.account"].browse(account_id)
            self.assertEqual((account.status, account.last_error), ("connected", False))


@tagged("post_install", "-at_install")
class TestAppOnlyRefusalInTheMailQueue(CommittedCase):
    """Odoo's mail queue keeps one transaction open across the batches whose connection failed (it commits
    after each mail sent, not after a failed connection). A refusal of the app registration (its secret
    expired) recorded in that transaction locked the app's row; the next batch's token request, on a cursor
    of its own, then waited for its own worker's transaction: the worker hung until Odoo killed it (seen in
    the production-shaped run)."""

    def setUp(self):
        super().setUp()
        with self.transaction() as env:
            app = self.committed_app(env, name="App-only mail queue", flow="app_only")
            self.mail_ids = []
            for mailbox in ("alice@contoso.com", "bob@contoso.com"):
                account = env["microsoft365.account"].create({"email": mailbox, "app_id": app.id})
                self.committed.append((account._name, account.id))
                server = env["ir.mail_server"].create(
                    {
                        "name": f"{mailbox} SMTP",
                        "smtp_authentication": "microsoft365",
                        "microsoft365_account_id": account.id,
                        "smtp_host": self.sandbox.host,
                        "smtp_port": self.sandbox.ports["smtp"],
                        "smtp_encryption": "starttls",
                        "smtp_user": mailbox,
                        "from_filter": mailbox,
                    }
                )
                self.committed.append((server._name, server.id))
                mail = env["mail.mail"].create(
                    {
                        "subject": f"From {mailbox}",
                        "email_from": mailbox,
                        "email_to": "buyer@fabrikam.example",
                        "body_html": "<p>Hello</p>",
                        "mail_server_id": server.id,
                    }
                )
                self.mail_ids.append(mail.id)
        self.addCleanup(self._remove_mails)
        sandbox_app = self.sandbox.app()
        expired = [dict(s, expires=time.time() - 60) for s in sandbox_app["secrets"]]
        self.sandbox.control("app", client_id=sandbox_app["client_id"], secrets=expired)
        self.addCleanup(self.sandbox.control, "app", client_id=sandbox_app["client_id"], secrets=sandbox_app["secrets"])

    def _remove_mails(self):
        self._end_waits_on_the_app_row()
        with self.transaction() as env:
            env["mail.mail"].browse(self.mail_ids).exists().unlink()

    def _end_waits_on_the_app_row(self):
        """A worker that waits for its own transaction waits forever: its token request's connection is
        ended so that the test's clean-up is not blocked too."""
        with self.transaction() as env:
            env.cr.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE %s",
                ["%FROM microsoft365_app WHERE id = %FOR NO KEY UPDATE%"],
            )

    @mute_logger(*QUIET, *MAIL_QUIET)
    def test_the_mail_queue_ends_when_the_app_secret_has_expired(self):
        errors = []
        worker = threading.Thread(target=lambda: errors.extend(self.run_cron_as_a_worker(MAIL_QUEUE)))
        worker.start()
        worker.join(60)  # a safety net: the run takes a second or two
        hung = worker.is_alive()
        self._end_waits_on_the_app_row()
        worker.join(60)
        self.assertFalse(hung, "the mail queue waited for its own transaction")
        self.assertEqual(errors, [])
        with self.transaction() as env:
            mails = env["mail.mail"].browse(self.mail_ids)
            self.assertEqual(mails.mapped("state"), ["exception", "exception"])  # someone must act: a new secret
            self.assertIn("client secret has expired", mails[0].failure_reason)
            self.assertTrue(env["microsoft365.app"].search([("name", "=", "App-only mail queue")]).problem)

    @mute_logger(*QUIET, *MAIL_QUIET)
    def test_mails_refused_for_the_expired_secret_go_once_a_new_secret_works(self):
        """Nothing of them went out (Microsoft refused the token before SMTP): once the administrator enters
        a new secret, the mail queue sends them, as the administrator expects of "mail flows again"; while
        nothing changed, they stay failed (no retry every minute of a send that cannot work)."""
        self.assertEqual(self.run_cron_as_a_worker(MAIL_QUEUE), [])
        self.assertEqual(self.run_cron_as_a_worker(MAIL_QUEUE), [])
        with self.transaction() as env:
            mails = env["mail.mail"].browse(self.mail_ids)
            self.assertEqual(mails.mapped("state"), ["exception", "exception"], "still failed: nothing was fixed")
            self.assertIn("client secret has expired", mails[0].failure_reason)

        sandbox_app = self.sandbox.app()
        renewed = [dict(secret, expires=time.time() + 3600) for secret in sandbox_app["secrets"]]
        self.sandbox.control("app", client_id=sandbox_app["client_id"], secrets=renewed)
        for mailbox in ("alice@contoso.com", "bob@contoso.com"):  # the app may send from them (RBAC)
            self.sandbox.control(
                "grant", right="full_access", identity=f"app:{sandbox_app['client_id']}", mailbox=mailbox
            )
        with self.transaction() as env:  # the administrator enters the new secret
            app = env["microsoft365.app"].search([("name", "=", "App-only mail queue")])
            app.client_secret = self.sandbox.secret()
        self.assertEqual(self.run_cron_as_a_worker(MAIL_QUEUE), [])
        with self.transaction() as env:
            mails = env["mail.mail"].browse(self.mail_ids).exists()
            self.assertEqual(mails.mapped("state"), ["sent", "sent"])
            self.assertEqual(mails.mapped("failure_reason"), [False, False])
