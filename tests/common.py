import contextlib
import imaplib
import ssl
import threading
from datetime import timedelta
from unittest.mock import patch

import odoo
from odoo import SUPERUSER_ID, api
from odoo.modules.registry import Registry
from odoo.tests import BaseCase, HttpCase, TransactionCase
from odoo.tools import config

from ..m365.identity import AppCredentials, IdentityClient
from ..sandbox.client import shared_sandbox
from .browser import Browser, chromium_executable, screenshot_folder


class MailServers:
    """Incoming and outgoing servers on the process's sandbox, for the transaction and HTTP cases."""

    def incoming(self, account, **values):
        """An IMAP incoming server on the sandbox that signs in as `account`; `values` add or override."""
        return self.env["fetchmail.server"].create(
            {
                "name": account.email,
                "connect_with": "microsoft365",
                "microsoft365_account_id": account.id,
                "server_type": "imap",
                "server": self.sandbox.host,
                "port": self.sandbox.ports["imaps"],
                "is_ssl": True,
                "user": account.email,
                **values,
            }
        )

    def outgoing(self, account, **values):
        """An SMTP server on the sandbox that signs in and sends as `account`; `values` add or override."""
        return self.env["ir.mail_server"].create(
            {
                "name": f"{account.email} SMTP",
                "smtp_authentication": "microsoft365",
                "microsoft365_account_id": account.id,
                "smtp_host": self.sandbox.host,
                "smtp_port": self.sandbox.ports["smtp"],
                "smtp_encryption": "starttls",
                "smtp_user": account.email,
                "from_filter": account.email,
                **values,
            }
        )


class SandboxCase(MailServers, TransactionCase):
    """An app registration of this database pointing at the process's Microsoft 365 sandbox."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.sandbox = shared_sandbox()
        cls.sandbox.reset()
        cls.env["ir.config_parameter"].sudo().set_param("web.base.url", "http://localhost:8069")
        cls.app_registration = cls.env["microsoft365.app"].create(cls.sandbox.odoo_app_values())

    def setUp(self):
        super().setUp()
        self.sandbox.reset()

    def connect(self, account, upn=None):
        """Sign in on the sandbox's page as `upn` and store the grant, as the callback does."""
        client = account.app_id._identity_client()
        flow = client.start_sign_in(
            account.app_id.redirect_uri, account.app_id._cloud().delegated_scopes(), login_hint=account.email
        )
        params = self.sandbox.sign_in(flow["auth_uri"], upn or account.email)
        sign_in = client.finish_sign_in(flow, params)
        account._store_sign_in(client, sign_in)
        return account

    def new_account(self, email="alice@contoso.com", **values):
        return self.env["microsoft365.account"].create({"email": email, "app_id": self.app_registration.id, **values})

    def imap(self):
        """An IMAPS connection to the sandbox (not logged in), trusting its CA."""
        context = ssl.create_default_context(cafile=self.sandbox.ca_file)
        return imaplib.IMAP4_SSL(self.sandbox.host, self.sandbox.ports["imaps"], ssl_context=context)

    def app_token(self):
        """An app-only Exchange token of the sandbox app, which has FullAccess to every mailbox."""
        credentials = AppCredentials(
            client_id=self.sandbox.app()["client_id"],
            authority=self.sandbox.authority(),
            client_secret=self.sandbox.secret(),
            ca_file=self.sandbox.ca_file,
        )
        return IdentityClient(credentials).app_access_token(["https://outlook.office365.com/.default"]).token


class FetchCase(SandboxCase):
    """Incoming servers that the scheduled fetch reads, each message making a partner."""

    def incoming(self, account, **values):
        values = {"state": "done", "object_id": self.env.ref("base.model_res_partner").id, **values}
        return super().incoming(account, **values)

    def cron_fetch(self):
        with patch.object(self.env.cr, "commit", lambda: None):
            self.env["fetchmail.server"]._fetch_mails()

    def partners(self, name):
        return self.env["res.partner"].search_count([("name", "=", name)])

    @contextlib.contextmanager
    def inbox(self, account):
        """The account's INBOX over IMAP, read with the account's token."""
        token = account._access_token()
        with self.imap() as imap:
            imap.authenticate("XOAUTH2", lambda _: f"user={account.email}\x01auth=Bearer {token}\x01\x01".encode())
            imap.select("INBOX")
            yield imap

    def unread(self, account, subject):
        """Unread messages with this subject in the account's INBOX."""
        with self.inbox(account) as imap:
            return imap.search(None, "UNSEEN", "SUBJECT", f'"{subject}"')[1][0].split()


class SandboxHttpCase(MailServers, HttpCase):
    """Odoo's HTTP server with an app registration whose redirect URI the process's sandbox accepts."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.sandbox = shared_sandbox()
        cls.admin = cls.env.ref("base.user_admin")
        cls.app_registration = cls.env["microsoft365.app"].create(cls.sandbox.odoo_app_values())

    def setUp(self):
        super().setUp()
        self.sandbox.reset()
        self.env["ir.config_parameter"].sudo().set_param("web.base.url", self.base_url())
        self.sandbox.control(
            "add_redirect_uri",
            client_id=self.app_registration.client_id,
            redirect_uri=self.app_registration.redirect_uri,
        )

    def new_account(self, email="alice@contoso.com"):
        return self.env["microsoft365.account"].create({"email": email, "app_id": self.app_registration.id})


class BrowserCase(SandboxHttpCase):
    """A person in headless Chromium (tests/browser.py), logged in to Odoo by `log_in`."""

    def setUp(self):
        super().setUp()
        self.assertTrue(chromium_executable(), "Chromium is missing: bin/setup installs Debian's chromium")
        # Requests share the test's cursor: one still running from the previous browser test (Odoo's
        # own clean-up waits 10 s at most) would use it beside this test (seen: "no results to fetch",
        # an ORM cache KeyError). Wait until they are all done.
        self._wait_remaining_requests(timeout=120)

    def open_browser(self):
        """Headless Chromium trusting the sandbox's certificate, closed after the test."""
        self.browser = Browser(
            trusted_certificate=self.sandbox.description["server_cert"], screenshots=screenshot_folder()
        )
        self.addCleanup(self._wait_remaining_requests, 120)  # after the browser is closed (clean-ups run LIFO)
        self.addCleanup(self.browser.close)
        return self.browser

    @contextlib.contextmanager
    def browser_requests_held(self):
        """The test's own reads and writes, while no browser request runs. Requests share the test's
        cursor: a query of the web client's (a page still loading, the bus) between this thread's query
        and its fetch handed this thread the other's rows (seen in CI: a connected account read back
        without its incoming server). Requests that come meanwhile wait for the block to end."""
        with self.registry.test_lock:
            self.env.invalidate_all(flush=False)  # the browser's requests changed the records under this cache
            yield

    def log_in(self):
        browser = self.browser
        browser.open(self.base_url() + "/web/login")
        browser.fill("input[name=login]", "admin")
        browser.fill("input[name=password]", "admin")
        browser.click("button[type=submit]", "Log in")
        browser.wait("location.pathname.startsWith('/odoo')", what="the web client")


class CommittedCase(BaseCase):
    """Outside test mode, as Odoo's HTTP and cron workers run: every transaction is a real one of its
    own (`transaction()`, REPEATABLE READ as Odoo's cursors are) and commits; a second cursor, a
    commit or a row lock behaves as in production. What a test commits is removed after it."""

    def setUp(self):
        super().setUp()
        self.sandbox = shared_sandbox()
        self.sandbox.reset()
        self.registry = Registry(config["db_name"].split(",")[0])
        self.assertFalse(self.registry.in_test_mode())  # else this case proves nothing
        self.committed = []  # (model, id) removed after the test
        self.addCleanup(self._remove_committed_records)

    @contextlib.contextmanager
    def transaction(self):
        with self.registry.cursor() as cr:
            yield api.Environment(cr, SUPERUSER_ID, {})

    def _remove_committed_records(self):
        with self.transaction() as env:
            # Servers use accounts, which use app registrations: removed in that order.
            order = ["fetchmail.server", "ir.mail_server", "microsoft365.account", "microsoft365.app"]
            for model, record_id in sorted(self.committed, key=lambda entry: order.index(entry[0])):
                env[model].browse(record_id).exists().unlink()

    def committed_app(self, env, **values):
        app = env["microsoft365.app"].create(dict(self.sandbox.odoo_app_values(), **values))
        self.committed.append((app._name, app.id))
        if app.redirect_uri not in self.sandbox.app()["redirect_uris"]:
            self.sandbox.control("add_redirect_uri", client_id=app.client_id, redirect_uri=app.redirect_uri)
        return app

    def committed_account(self, env, app, email="alice@contoso.com"):
        """An account of `app` signed in as `email` on the sandbox's page."""
        account = env["microsoft365.account"].create({"email": email, "app_id": app.id})
        self.committed.append((account._name, account.id))
        client = app._identity_client()
        flow = client.start_sign_in(app.redirect_uri, app._cloud().delegated_scopes(), login_hint=email)
        account._store_sign_in(client, client.finish_sign_in(flow, self.sandbox.sign_in(flow["auth_uri"], email)))
        return account

    def run_cron_as_a_worker(self, xmlid):
        """The scheduled action run as Odoo's cron worker runs it (ir.cron._process_job: its own
        cursors, a commit after each batch, a failure counted on the job). Returns what made the run
        fail: the errors the cron worker logged, with the failure count (empty: a clean run)."""
        with self.transaction() as env:
            cron = env.ref(xmlid)
            saved = {"nextcall": cron.nextcall, "lastcall": cron.lastcall, "failure_count": cron.failure_count}
            cron.write({"nextcall": odoo.fields.Datetime.now() - timedelta(minutes=1)})
            cron_id = cron.id

        def restore():
            with self.transaction() as env:
                env["ir.cron"].browse(cron_id).write(dict(saved, first_failure_date=False))

        self.addCleanup(restore)
        IrCron = self.registry["ir.cron"]
        database = odoo.sql_db.db_connect(self.registry.db_name)
        errors = []
        callback = IrCron._callback

        def callback_reporting_errors(cron, *args):
            try:
                return callback(cron, *args)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}".strip())
                raise

        def cron_thread():  # a thread of its own, as Odoo's cron workers (not a test's thread)
            try:
                with database.cursor() as cron_cr:
                    job = IrCron._acquire_one_job(cron_cr, cron_id)
                    if not job:
                        errors.append("the scheduled action was not ready to run")
                        return
                    IrCron._process_job(database, cron_cr, job)
            except Exception as exc:  # noqa: BLE001 - reported to the test
                errors.append(f"{type(exc).__name__}: {exc}")

        with patch.object(IrCron, "_callback", callback_reporting_errors):
            worker = threading.Thread(target=cron_thread, name="odoo.service.cron.cron0")
            worker.start()
            worker.join()
        with self.transaction() as env:
            failures = env["ir.cron"].browse(cron_id).failure_count
        return errors + ([f"failure count {failures}"] if failures else [])
