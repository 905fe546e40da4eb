"""Fetching that scales across Odoo's cron workers (issue 15), outside test mode: every worker has its
own database connection and commits for real, as cron workers do.

Each worker here is what Odoo's cron runs: `fetchmail.server._fetch_mails()` (core's fetch cron), or
Odoo's own cron machinery (`ir.cron._acquire_one_job` + `_process_job`, as `_process_jobs` does in a
cron thread or a cron worker process) over the scheduled actions that fetch mail.
"""

import imaplib
import socket
import ssl
import threading
import time
import types
from datetime import timedelta
from unittest.mock import patch

import odoo
from odoo import SUPERUSER_ID, api, fields
from odoo.tests import BaseCase, tagged
from odoo.tools import mute_logger

from ..m365.identity import AppCredentials, IdentityClient
from ..models import fetchmail_server as fetchmail_server_module
from ..sandbox.client import shared_sandbox

MAILBOXES = ["alice@contoso.com", "bob@contoso.com", "info@contoso.com"]
QUIET = (
    "odoo.addons.mail_microsoft365_oauth.models.fetchmail_server",
    "odoo.addons.mail.models.fetchmail",
    "odoo.addons.base.models.ir_cron",
)


@tagged("post_install", "-at_install")
class TestFetchAcrossWorkers(BaseCase):
    def setUp(self):
        super().setUp()
        self.sandbox = shared_sandbox()
        app_id = self.sandbox.app()["client_id"]
        for clean_slate in (True, False):
            self.sandbox.reset()  # the second time: counters and session order start from zero
            for mailbox in ("alice@contoso.com", "bob@contoso.com"):  # the app reads them too (app-only)
                self.sandbox.control("grant", right="full_access", identity=f"app:{app_id}", mailbox=mailbox)
            if clean_slate:
                for mailbox in MAILBOXES:
                    self.mark_all_read(mailbox)
        self.registry = odoo.registry(odoo.tools.config["db_name"].split(",")[0])
        with self.registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            app = env["microsoft365.app"].create(
                dict(self.sandbox.odoo_app_values(), name="Fetch across workers", flow="app_only")
            )
            self.app_id = app.id
            servers = env["fetchmail.server"]
            for mailbox in MAILBOXES:
                servers |= self.new_server(env, mailbox)
            self.server_ids = servers.ids
            # Other servers of the database (none in a test database) are set aside meanwhile.
            others = env["fetchmail.server"].search([("id", "not in", servers.ids), ("state", "=", "done")])
            others.write({"state": "draft"})
            self.other_ids = others.ids
        self.addCleanup(self._remove_committed_records)
        self.addCleanup(self.sandbox.reset)  # releases any stalled session first

    def new_server(self, env, mailbox, server_type="imap"):
        """A confirmed incoming server of the app-only account of `mailbox`, creating partners."""
        account = env["microsoft365.account"].create({"email": mailbox, "app_id": self.app_id})
        return env["fetchmail.server"].create(
            {
                "name": mailbox,
                "connect_with": "microsoft365",
                "microsoft365_account_id": account.id,
                "server_type": server_type,
                "server": self.sandbox.host,
                "port": self.sandbox.ports["imaps" if server_type == "imap" else "pop3s"],
                "is_ssl": True,
                "user": mailbox,
                "state": "done",
                "object_id": env.ref("base.model_res_partner").id,
            }
        )

    def _remove_committed_records(self):
        with self.registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            servers = env["fetchmail.server"].browse(self.server_ids)
            accounts = servers.microsoft365_account_id
            servers.unlink()
            accounts.unlink()
            env["microsoft365.app"].browse(self.app_id).unlink()
            env["res.partner"].search([("name", "=like", "Across workers %")]).unlink()
            env["fetchmail.server"].browse(self.other_ids).write({"state": "done"})

    # helpers -----------------------------------------------------------------------------------

    def deliver(self, mailbox):
        subject = f"Across workers {mailbox}"
        self.sandbox.control("deliver", mailbox=mailbox, subject=subject)
        return subject

    def records(self, subject):
        with self.registry.cursor() as cr:
            return api.Environment(cr, SUPERUSER_ID, {})["res.partner"].search_count([("name", "=", subject)])

    def wait_for(self, condition, what, seconds=120):
        """Waits for a state of the world (never for a duration): the deadline is only a safety net."""
        deadline = time.monotonic() + seconds
        while not condition():
            self.assertLess(time.monotonic(), deadline, f"never happened: {what}")
            time.sleep(0.05)

    def stalled(self, mailbox):
        return self.sandbox.counter(f"stalled_now:{mailbox}")

    def worker(self, target, name):
        errors = []

        def run():
            try:
                target()
            except Exception as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.errors = errors
        thread.start()
        self.addCleanup(thread.join, 60)
        return thread

    def fetch_cron(self):
        """What core's fetch cron runs, on a worker's own cursor."""
        with self.registry.cursor() as cr:
            self.backend_pid = cr._cnx.get_backend_pid()
            api.Environment(cr, SUPERUSER_ID, {})["fetchmail.server"]._fetch_mails()

    def app_imap(self, mailbox):
        """The mailbox's INBOX over IMAP, signed in with an app-only token."""
        credentials = AppCredentials(
            client_id=self.sandbox.app()["client_id"],
            authority=self.sandbox.authority(),
            client_secret=self.sandbox.secret(),
            ca_file=self.sandbox.ca_file,
        )
        token = IdentityClient(credentials).app_access_token(["https://outlook.office365.com/.default"]).token
        context = ssl.create_default_context(cafile=self.sandbox.ca_file)
        imap = imaplib.IMAP4_SSL(self.sandbox.host, self.sandbox.ports["imaps"], ssl_context=context)
        imap.authenticate("XOAUTH2", lambda _: f"user={mailbox}\x01auth=Bearer {token}\x01\x01".encode())
        imap.select("INBOX")
        return imap

    def unread(self, mailbox, subject):
        """Unread messages with this subject in the mailbox."""
        with self.app_imap(mailbox) as imap:
            return len(imap.search(None, "UNSEEN", "SUBJECT", f'"{subject}"')[1][0].split())

    def mark_all_read(self, mailbox):
        """Earlier tests leave unread mail behind (a mail sent to bob, say): these tests count on the
        messages they deliver being the only unread ones."""
        with self.app_imap(mailbox) as imap:
            for number in imap.search(None, "UNSEEN")[1][0].split():
                imap.store(number, "+FLAGS", "\\Seen")

    def fetch_jobs(self):
        """The active scheduled actions that fetch incoming mail, made due now."""
        with self.registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            jobs = env["ir.cron"].search(
                [("model_id.model", "=", "fetchmail.server"), ("active", "=", True)], order="priority, id"
            )
            self.assertIn(env.ref("mail.ir_cron_mail_gateway_action"), jobs)
            jobs.write({"nextcall": fields.Datetime.now() - timedelta(minutes=1)})
            return jobs.ids

    def cron_worker(self, job_ids):
        """One of Odoo's cron workers: each job it can acquire (SKIP LOCKED), processed by Odoo's code."""
        db = odoo.sql_db.db_connect(self.registry.db_name)
        IrCron = self.registry["ir.cron"]
        with db.cursor() as cron_cr:
            for job_id in job_ids:
                job = IrCron._acquire_one_job(cron_cr, job_id)
                if job:
                    IrCron._process_job(db, cron_cr, job)
                else:
                    cron_cr.commit()

    # tests -------------------------------------------------------------------------------------

    @mute_logger(*QUIET)
    def test_two_workers_never_fetch_the_same_mailbox_at_once(self):
        subjects = [self.deliver(mailbox) for mailbox in MAILBOXES]
        self.sandbox.control("mail_stall", mailbox="alice@contoso.com")  # first in line, and it hangs
        first = self.worker(self.fetch_cron, "first worker")
        self.wait_for(lambda: self.stalled("alice@contoso.com") == 1, "the first worker reaches alice's mailbox")
        second = self.worker(self.fetch_cron, "second worker")
        # The second worker either finishes without alice, or reaches alice's mailbox as well.
        self.wait_for(
            lambda: not second.is_alive() or self.stalled("alice@contoso.com") > 1, "the second worker is done"
        )
        self.sandbox.control("mail_stall", mailbox="alice@contoso.com", stalled=False)
        first.join(60)
        second.join(60)
        self.assertEqual(self.sandbox.counter("imap_open_max:alice@contoso.com"), 1)
        self.assertEqual(self.sandbox.counter("imap_sessions:alice@contoso.com"), 1)
        self.assertEqual(first.errors + second.errors, [])
        self.assertEqual([self.records(subject) for subject in subjects], [1, 1, 1])

    @mute_logger(*QUIET)
    def test_a_hung_mailbox_does_not_delay_the_others(self):
        """Two cron workers, as `--max-cron-threads=2` runs them: while one is stuck in a hung mailbox,
        the other fetches every other mailbox."""
        subjects = {mailbox: self.deliver(mailbox) for mailbox in MAILBOXES}
        jobs = self.fetch_jobs()
        self.sandbox.control("mail_stall", mailbox="alice@contoso.com")
        first = self.worker(lambda: self.cron_worker(jobs), "cron worker 1")
        self.wait_for(lambda: self.stalled("alice@contoso.com") == 1, "a cron worker reaches alice's mailbox")
        second = self.worker(lambda: self.cron_worker(jobs), "cron worker 2")
        second.join(120)
        self.assertFalse(second.is_alive())
        fetched_meanwhile = {mailbox: self.records(subjects[mailbox]) for mailbox in MAILBOXES}
        self.sandbox.control("mail_stall", mailbox="alice@contoso.com", stalled=False)
        first.join(60)
        self.assertEqual(first.errors + second.errors, [])
        self.assertEqual(fetched_meanwhile, {"alice@contoso.com": 0, "bob@contoso.com": 1, "info@contoso.com": 1})
        self.assertEqual(self.records(subjects["alice@contoso.com"]), 1)  # once it answers again

    @mute_logger(*QUIET)
    def test_the_mailbox_fetched_longest_ago_goes_first(self):
        """No mailbox starves: a cycle that is cut short (a time budget, a worker killed by Odoo's
        time limit or by kill -9) is resumed by the next one with the mailboxes it did not reach,
        not started again from the first server in Odoo's order."""
        with self.registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            alice, bob, info = env["fetchmail.server"].browse(self.server_ids)
            now = fields.Datetime.now()
            alice.date = now - timedelta(minutes=1)
            bob.date = now - timedelta(minutes=3)
            info.date = False  # never fetched
        self.fetch_cron()
        order = [m for m in self.sandbox.state()["session_order"] if m in MAILBOXES]
        self.assertEqual(order, ["info@contoso.com", "bob@contoso.com", "alice@contoso.com"])

    @mute_logger(*QUIET, "odoo.sql_db")
    def test_a_database_connection_cut_mid_fetch_loses_no_message(self):
        """The worker's database connection is cut (PostgreSQL restarted, a fail-over,
        pg_terminate_backend) just as it marks a processed message read: the message is in Odoo, or
        still unread for the next fetch; never read in the mailbox and missing in Odoo."""
        subject = self.deliver("bob@contoso.com")
        self.sandbox.control("mail_stall", mailbox="bob@contoso.com", where="store")
        worker = self.worker(self.fetch_cron, "worker")
        self.wait_for(lambda: self.stalled("bob@contoso.com") == 1, "the worker marks bob's message read")
        with self.registry.cursor() as cr:
            cr.execute("SELECT pg_terminate_backend(%s)", [self.backend_pid])
        self.sandbox.control("mail_stall", mailbox="bob@contoso.com", stalled=False)
        worker.join(60)
        self.assertEqual(
            {"in Odoo": self.records(subject), "unread in the mailbox": self.unread("bob@contoso.com", subject)},
            {"in Odoo": 1, "unread in the mailbox": 0},
        )

    @mute_logger(*QUIET, "odoo.addons.mail_microsoft365_oauth.models.fetchmail_server_graph")
    def test_mailboxes_on_microsoft_graph_are_fetched_through_graph_by_the_cron_workers(self):
        """The fetch lanes claim every Microsoft 365 mailbox; one whose transport is Microsoft Graph is
        fetched through Graph there (never over IMAP, which its tenant may have switched off), once."""
        with self.registry.cursor() as cr:
            api.Environment(cr, SUPERUSER_ID, {})["fetchmail.server"].browse(self.server_ids).write(
                {"microsoft365_transport": "graph"}
            )
        subjects = {mailbox: self.deliver(mailbox) for mailbox in MAILBOXES}
        self.cron_worker(self.fetch_jobs())
        self.assertEqual(
            {mailbox: self.records(subjects[mailbox]) for mailbox in MAILBOXES}, dict.fromkeys(MAILBOXES, 1)
        )
        self.assertEqual(
            {mailbox: self.sandbox.counter(f"imap_sessions:{mailbox}") for mailbox in MAILBOXES},
            dict.fromkeys(MAILBOXES, 0),
        )
        self.assertEqual(
            {mailbox: self.unread(mailbox, subjects[mailbox]) for mailbox in MAILBOXES}, dict.fromkeys(MAILBOXES, 0)
        )

    # the budget of a cron worker's pass ----------------------------------------------------------

    def fetch_jobs_due_now(self):
        """The fetch jobs due, as fetch_jobs(), and whether each lane is due (its nextcall or a trigger)."""
        job_ids = self.fetch_jobs()
        with self.registry.cursor() as cr:
            cr.execute("DELETE FROM ir_cron_trigger WHERE cron_id IN %s", [tuple(job_ids)])
        return job_ids

    def lanes_due(self):
        with self.registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            lanes = env["fetchmail.server"]._microsoft365_fetch_lanes()
            cr.execute(
                "SELECT id FROM ir_cron WHERE id IN %s AND (nextcall <= (now() at time zone 'UTC') OR id IN "
                "(SELECT cron_id FROM ir_cron_trigger WHERE call_at <= (now() at time zone 'UTC')))",
                [tuple(lanes.ids)],
            )
            return len(cr.fetchall())

    def mailbox_seconds(self, seconds):
        with self.registry.cursor() as cr:
            api.Environment(cr, SUPERUSER_ID, {})["ir.config_parameter"].set_param(
                "mail_microsoft365_oauth.fetch_mailbox_seconds", str(seconds)
            )

        def reset():
            with self.registry.cursor() as cr:
                api.Environment(cr, SUPERUSER_ID, {})["ir.config_parameter"].set_param(
                    "mail_microsoft365_oauth.fetch_mailbox_seconds", False
                )

        self.addCleanup(reset)

    @mute_logger(*QUIET)
    def test_a_cron_pass_fetches_within_its_share_of_odoo_time_limit(self):
        """Odoo's time limit on a cron worker bounds a whole pass over the ready jobs (core's fetch cron, both
        lanes, the mail queue...), not each job: the fetching of a pass ends by half of it, however many
        fetch jobs the pass runs and however long their mailboxes hang; the lanes stay due, and the next pass
        goes on with the mailboxes this one did not reach."""
        subjects = {mailbox: self.deliver(mailbox) for mailbox in MAILBOXES}
        self.mailbox_seconds(3)
        for mailbox in MAILBOXES:
            self.sandbox.control("mail_stall", mailbox=mailbox)  # every mailbox hangs after login
        jobs = self.fetch_jobs_due_now()
        deadlines = []
        Servers = self.registry["fetchmail.server"]
        fetch_claimed = Servers._microsoft365_fetch_claimed

        def spy(server, deadline):
            deadlines.append(deadline)
            return fetch_claimed(server, deadline)

        # limit_time_real_cron 10 s (without --workers, a pass is timed from its start): 5 s of fetching.
        with patch.dict(odoo.tools.config.options, {"limit_time_real_cron": 10, "workers": 0}):
            with patch.object(Servers, "_microsoft365_fetch_claimed", spy):
                before = time.monotonic()
                worker = self.worker(lambda: self.cron_worker(jobs), "cron worker")
                self.addCleanup(self.sandbox.reset)  # before the worker is joined: releases a stalled session
                self.wait_for(lambda: not worker.is_alive(), "the cron worker ends its pass", seconds=60)
        self.assertEqual(worker.errors, [])
        sessions = {mailbox: self.sandbox.counter(f"imap_sessions:{mailbox}") for mailbox in MAILBOXES}
        self.assertEqual(sum(sessions.values()), 1, f"one hung mailbox of 3 s fits a pass of 5 s: {sessions}")
        self.assertTrue(all(deadline <= before + 5 for deadline in deadlines), "no visit outlasts the pass's budget")
        self.assertEqual(self.lanes_due(), 2, "the lanes stay due for the next pass")

        for mailbox in MAILBOXES:
            self.sandbox.control("mail_stall", mailbox=mailbox, stalled=False)
        with patch.dict(odoo.tools.config.options, {"limit_time_real_cron": 10, "workers": 0}):
            self.cron_worker(jobs)
        reached = {mailbox: self.records(subjects[mailbox]) for mailbox in MAILBOXES}
        first = next(mailbox for mailbox, count in sessions.items() if count)
        # The mailbox that hung was attempted in this cycle: its message waits for the next cycle.
        self.assertEqual(reached, {mailbox: int(mailbox != first) for mailbox in MAILBOXES})

    @mute_logger(*QUIET)
    def test_a_pop3_visit_ends_with_its_time_budget(self):
        """Odoo's POP3 loop takes the messages 50 per connection until the mailbox is empty, however long
        that takes: a lane's visit ends with the first batch after its deadline, and what is left stays on
        the server (POP3 deletes a message once processed) for the next visit."""
        mailbox = "sales@contoso.com"  # a shared mailbox the app may read (the sandbox's directory)
        with self.app_imap(mailbox) as imap:  # POP3 takes every message of the INBOX, read or not
            if imap.search(None, "ALL")[1][0]:
                imap.store("1:*", "+FLAGS", "\\Deleted")
                imap.expunge()
        subjects = {f"Across workers POP {number}" for number in range(60)}
        for subject in subjects:
            self.sandbox.control("deliver", mailbox=mailbox, subject=subject)
        with self.registry.cursor() as cr:
            server = self.new_server(api.Environment(cr, SUPERUSER_ID, {}), mailbox, server_type="pop")
            self.server_ids.append(server.id)  # removed after the test with its account
        # The addon's view of the clock jumps past the visit's deadline once the first message is processed.
        skipped = [0]
        clock = types.SimpleNamespace(monotonic=lambda: time.monotonic() + skipped[0])
        MailThread = self.registry["mail.thread"]
        message_process = MailThread.message_process

        def process_then_time_is_up(thread, *args, **kwargs):
            skipped[0] = 3600
            return message_process(thread, *args, **kwargs)

        with (
            patch.object(fetchmail_server_module, "time", clock),
            patch.object(MailThread, "message_process", process_then_time_is_up),
            self.registry.cursor() as cr,
        ):
            server = api.Environment(cr, SUPERUSER_ID, {})["fetchmail.server"].browse(server.id)
            server._microsoft365_fetch_mailbox(time.monotonic() + 600)
        with self.registry.cursor() as cr:
            processed = api.Environment(cr, SUPERUSER_ID, {})["res.partner"].search([("name", "in", list(subjects))])
            self.assertEqual(len(processed), 50, "one batch of 50 messages, then the visit ends")
        with self.registry.cursor() as cr:
            server = api.Environment(cr, SUPERUSER_ID, {})["fetchmail.server"].browse(server.id)
            server._microsoft365_fetch_mailbox(time.monotonic() + 600)
        with self.registry.cursor() as cr:
            names = api.Environment(cr, SUPERUSER_ID, {})["res.partner"].search([("name", "in", list(subjects))])
            self.assertEqual(sorted(names.mapped("name")), sorted(subjects), "the next visit takes the rest, once each")

    @mute_logger(*QUIET)
    def test_a_server_that_never_greets_does_not_hold_the_cron_worker(self):
        """A server that accepts the connection and says nothing (no TLS handshake, no greeting): Odoo's IMAP
        connection would wait for it without limit, until Odoo kills the cron worker. The mailbox's time budget
        bounds it; the other mailboxes are fetched."""
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        self.addCleanup(silent.close)
        with self.registry.cursor() as cr:
            alice = api.Environment(cr, SUPERUSER_ID, {})["fetchmail.server"].browse(self.server_ids[0])
            alice.port = silent.getsockname()[1]
        subjects = {mailbox: self.deliver(mailbox) for mailbox in MAILBOXES[1:]}
        self.mailbox_seconds(2)
        jobs = self.fetch_jobs_due_now()
        worker = self.worker(lambda: self.cron_worker(jobs), "cron worker")
        self.wait_for(lambda: not worker.is_alive(), "the cron worker ends its pass", seconds=60)
        self.assertEqual(worker.errors, [])
        self.assertEqual(
            {mailbox: self.records(subjects[mailbox]) for mailbox in MAILBOXES[1:]},
            {"bob@contoso.com": 1, "info@contoso.com": 1},
        )

    @mute_logger(*QUIET)
    def test_the_lanes_leave_core_fetch_cron_alone(self):
        """Core's fetch loop writes its servers with `fetchmail_cron_running` so that a write does not switch its
        cron on or off (which locks and updates the cron's row). The lanes write theirs the same way: otherwise
        every mailbox visit would update core's cron row, which the cron workers running or acquiring that job
        then meet as a locked row (skipped) or a serialization failure."""
        subjects = {mailbox: self.deliver(mailbox) for mailbox in MAILBOXES}
        self.fetch_jobs_due_now()
        with self.registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            core = env.ref("mail.ir_cron_mail_gateway_action")
            lane = env.ref("mail_microsoft365_oauth.ir_cron_microsoft365_fetch_lane_1")
            cr.execute("SELECT xmin::text FROM ir_cron WHERE id = %s", [core.id])
            version = cr.fetchone()[0]
        self.cron_worker([lane.id])
        self.assertEqual(
            {mailbox: self.records(subjects[mailbox]) for mailbox in MAILBOXES}, dict.fromkeys(MAILBOXES, 1)
        )
        with self.registry.cursor() as cr:
            cr.execute("SELECT xmin::text FROM ir_cron WHERE id = %s", [core.id])
            self.assertEqual(cr.fetchone()[0], version, "core's fetch cron row was not written")

    @mute_logger(*QUIET)
    def test_a_throttled_mailbox_is_fetched_again_in_the_same_cycle_once_its_back_off_is_over(self):
        """Microsoft asked to come back later: once that time has passed, the mailbox is due again in the
        cycle that met the back-off, instead of its mail waiting a whole cycle more. A mailbox visited
        normally in this cycle is not fetched twice."""
        subjects = {mailbox: self.deliver(mailbox) for mailbox in MAILBOXES}
        jobs = self.fetch_jobs_due_now()  # core's fetch cron due a minute ago: the cycle began then
        with self.registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            alice, bob, info = env["fetchmail.server"].browse(self.server_ids)
            now = fields.Datetime.now()
            # Visited in this cycle: alice was throttled until a second ago, bob and info fetched.
            alice.write(
                {
                    "microsoft365_fetch_attempted_at": now - timedelta(seconds=30),
                    "microsoft365_retry_at": now - timedelta(seconds=1),
                }
            )
            (bob | info).write({"microsoft365_fetch_attempted_at": now - timedelta(seconds=30)})
        with self.registry.cursor() as cr:
            lane = (
                api.Environment(cr, SUPERUSER_ID, {})
                .ref("mail_microsoft365_oauth.ir_cron_microsoft365_fetch_lane_1")
                .id
            )
        self.assertIn(lane, jobs)
        self.cron_worker([lane])
        self.assertEqual(
            {mailbox: self.records(subjects[mailbox]) for mailbox in MAILBOXES},
            {"alice@contoso.com": 1, "bob@contoso.com": 0, "info@contoso.com": 0},
        )
