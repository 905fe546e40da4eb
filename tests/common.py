import contextlib
import imaplib
import ssl
from unittest.mock import patch

from odoo.tests import HttpCase, TransactionCase

from ..m365.identity import AppCredentials, IdentityClient
from ..sandbox.client import shared_sandbox
from .browser import Browser, chromium_executable, screenshot_folder


class SandboxCase(TransactionCase):
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


class SandboxHttpCase(HttpCase):
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

    def open_browser(self):
        """Headless Chromium trusting the sandbox's certificate, closed after the test."""
        self.browser = Browser(
            trusted_certificate=self.sandbox.description["server_cert"], screenshots=screenshot_folder()
        )
        self.addCleanup(self.browser.close)
        return self.browser

    def log_in(self):
        browser = self.browser
        browser.open(self.base_url() + "/web/login")
        browser.fill("input[name=login]", "admin")
        browser.fill("input[name=password]", "admin")
        browser.click("button[type=submit]", "Log in")
        browser.wait("location.pathname.startsWith('/odoo')", what="the web client")
