import threading

from odoo.tests import tagged
from odoo.tools import mute_logger

from .common import CommittedCase

EXCHANGE = "https://outlook.office.com"


@tagged("post_install", "-at_install")
class TestParallelRefresh(CommittedCase):
    """Two workers refresh the same account at the same moment, each in its own committed database
    transaction, against refresh tokens that die after one use (as a rotated token that was not
    saved would): the row lock makes one wait for the other, and the grant survives."""

    def setUp(self):
        super().setUp()
        self.sandbox.control("settings", access_token_lifetime=120)  # every use needs a refresh
        with self.transaction() as env:
            app = self.committed_app(env, name="Concurrency")
            self.account_id, self.app_id = self.committed_account(env, app).id, app.id

    def refresh_in_own_transaction(self, start, results):
        start.wait()
        try:
            with self.transaction() as env:
                results.append(env["microsoft365.account"].browse(self.account_id)._access_token())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results.append(exc)

    def test_two_workers_refresh_at_once_and_the_account_survives(self):
        start, results = threading.Barrier(2), []
        workers = [threading.Thread(target=self.refresh_in_own_transaction, args=(start, results)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        self.assertEqual(len(results), 2)
        self.assertTrue(all(isinstance(r, str) for r in results), [r for r in results if not isinstance(r, str)])
        self.assertEqual(self.sandbox.counter("token:refresh_token"), 2)  # one after the other, each rotated
        with self.transaction() as env:
            account = env["microsoft365.account"].browse(self.account_id)
            self.assertTrue(account._access_token())  # and the saved refresh token still works
            self.assertEqual(account.status, "connected")

    @mute_logger("odoo.sql_db")
    def test_a_rotated_refresh_token_survives_the_callers_rollback(self):
        """A fetch or a send refreshes, then fails: its transaction is rolled back, the rotated
        refresh token (the old one is spent) must not go with it."""
        refreshes = self.sandbox.counter("token:refresh_token")
        with self.assertRaises(ZeroDivisionError), self.transaction() as env:
            self.assertTrue(env["microsoft365.account"].browse(self.account_id)._access_token())
            raise ZeroDivisionError("the caller fails after the refresh")
        self.assertEqual(self.sandbox.counter("token:refresh_token"), refreshes + 1)
        with self.transaction() as env:
            account = env["microsoft365.account"].browse(self.account_id)
            self.assertTrue(account._access_token(force_refresh=True))  # refused if the rotated one was lost
            self.assertEqual(account.status, "connected")
        self.assertEqual(self.sandbox.counter("token:refresh_token"), refreshes + 2)


@tagged("post_install", "-at_install")
class TestAppOnlyWorkers(CommittedCase):
    """Several workers asking for the app-only token of one app registration at once: one request."""

    def test_two_workers_share_one_app_only_token(self):
        with self.transaction() as env:
            app = self.committed_app(env, name="App-only workers", flow="app_only")
            mailboxes = [
                env["microsoft365.account"].create({"email": email, "app_id": app.id})
                for email in ("alice@contoso.com", "bob@contoso.com")
            ]
            self.committed += [(m._name, m.id) for m in mailboxes]
            mailbox_ids = [m.id for m in mailboxes]
        before = self.sandbox.counter("token:client_credentials")
        start, results = threading.Barrier(2), []

        def worker(mailbox_id):
            start.wait()
            try:
                with self.transaction() as env:
                    results.append(env["microsoft365.account"].browse(mailbox_id)._access_token())
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                results.append(exc)

        threads = [threading.Thread(target=worker, args=(mailbox_id,)) for mailbox_id in mailbox_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertTrue(
            len(results) == 2 and all(isinstance(r, str) for r in results),
            [r for r in results if not isinstance(r, str)],
        )
        self.assertEqual(results[0], results[1])
        self.assertEqual(self.sandbox.counter("token:client_credentials"), before + 1)


@tagged("post_install", "-at_install")
class TestMigrationInWorkers(CommittedCase):
    """Switch to OAuth and the take-over of microsoft_outlook's servers in real, committed
    transactions; the accounts they make serve the next worker."""

    def test_outlook_servers_taken_over_then_used_by_another_worker(self):
        with self.transaction() as env:
            app = self.committed_app(env, name="Outlook take-over")
            client = app._identity_client()
            flow = client.start_sign_in(app.redirect_uri, [f"{EXCHANGE}/IMAP.AccessAsUser.All"])
            client.finish_sign_in(flow, self.sandbox.sign_in(flow["auth_uri"], "alice@contoso.com"))
            refresh_token = next(iter(client.cache.search(client.cache.CredentialType.REFRESH_TOKEN)))["secret"]
            parameters = env["ir.config_parameter"].sudo()
            parameters.set_param("microsoft_outlook_client_id", app.client_id)
            parameters.set_param("microsoft_outlook_client_secret", self.sandbox.secret())
            parameters.set_param("microsoft_outlook.endpoint", f"{self.sandbox.authority()}/oauth2/v2.0/")
            server = env["fetchmail.server"].create(
                {
                    "name": "Outlook IMAP (workers)",
                    "server_type": "outlook",
                    "server": self.sandbox.host,
                    "port": self.sandbox.ports["imaps"],
                    "is_ssl": True,
                    "user": "alice@contoso.com",
                    "microsoft_outlook_refresh_token": refresh_token,
                }
            )
            self.committed.append((server._name, server.id))
        with self.transaction() as env:
            env["microsoft365.outlook.import"].action_import()
            account = env["fetchmail.server"].browse(server.id).microsoft365_account_id
            self.committed.append((account._name, account.id))
            self.assertEqual(account.status, "connected")
        self.sandbox.control("settings", access_token_lifetime=120)
        with self.transaction() as env:  # another worker: refreshes with the rotated token, committed
            self.assertTrue(env["microsoft365.account"].browse(account.id)._access_token(force_refresh=True))
        with self.transaction() as env:
            server = env["fetchmail.server"].browse(server.id)
            server.button_confirm_login()
            self.assertEqual(server.state, "done")
            self.assertEqual(server.microsoft365_account_id.status, "connected")

    def test_a_switched_server_connects_in_the_next_worker(self):
        with self.transaction() as env:
            app = self.committed_app(env, name="Switch workers")
            env["ir.config_parameter"].sudo().set_param("mail_microsoft365_oauth.default_app_id", app.id)
            server = env["fetchmail.server"].create(
                {
                    "name": "Support (password, workers)",
                    "server_type": "imap",
                    "server": self.sandbox.host,
                    "port": self.sandbox.ports["imaps"],
                    "is_ssl": True,
                    "user": "alice@contoso.com",
                    "password": "old-password",
                }
            )
            self.committed.append((server._name, server.id))
            server.action_microsoft365_switch()
            account = server.microsoft365_account_id
            self.committed.append((account._name, account.id))
        self.sandbox.control("settings", access_token_lifetime=120)  # the test below refreshes
        with self.transaction() as env:  # the callback's request
            account = env["microsoft365.account"].browse(account.id)
            client = account.app_id._identity_client()
            flow = client.start_sign_in(account.app_id.redirect_uri, account.app_id._cloud().delegated_scopes())
            account._store_sign_in(
                client, client.finish_sign_in(flow, self.sandbox.sign_in(flow["auth_uri"], account.email))
            )
        with self.transaction() as env:  # Test connection, refreshing on its own cursor
            server = env["fetchmail.server"].browse(server.id)
            server.button_confirm_login()
            self.assertEqual(server.state, "done")
            self.assertFalse(server.password)  # the switch is proven: the old password is gone
        with self.transaction() as env:
            self.assertEqual(env["microsoft365.account"].browse(account.id).status, "connected")
