import threading

from odoo import SUPERUSER_ID, api
from odoo.tests import BaseCase, tagged

from ..sandbox.client import shared_sandbox


@tagged("post_install", "-at_install")
class TestParallelRefresh(BaseCase):
    """Two workers refresh the same account at the same moment, each in its own committed database
    transaction, against refresh tokens that die after one use (as a rotated token that was not
    saved would): the row lock makes one wait for the other, and the grant survives."""

    def setUp(self):
        super().setUp()
        self.sandbox = shared_sandbox()
        self.sandbox.reset()
        self.sandbox.control("settings", access_token_lifetime=120)  # every use needs a refresh
        self.registry = __import__("odoo").registry(self.get_db_name())
        with self.registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            app = env["microsoft365.app"].create(dict(self.sandbox.odoo_app_values(), name="Concurrency"))
            account = env["microsoft365.account"].create({"email": "alice@contoso.com", "app_id": app.id})
            client = app._identity_client()
            flow = client.start_sign_in(app.redirect_uri, app._cloud().delegated_scopes(), login_hint=account.email)
            if app.redirect_uri not in self.sandbox.app()["redirect_uris"]:
                self.sandbox.control("add_redirect_uri", client_id=app.client_id, redirect_uri=app.redirect_uri)
            account._store_sign_in(
                client, client.finish_sign_in(flow, self.sandbox.sign_in(flow["auth_uri"], account.email))
            )
            self.account_id, self.app_id = account.id, app.id
        self.addCleanup(self._remove_committed_records)

    @staticmethod
    def get_db_name():
        from odoo.tools import config

        return config["db_name"].split(",")[0]

    def _remove_committed_records(self):
        with self.registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            env["microsoft365.account"].browse(self.account_id).unlink()
            env["microsoft365.app"].browse(self.app_id).unlink()

    def refresh_in_own_transaction(self, start, results):
        start.wait()
        try:
            with self.registry.cursor() as cr:
                env = api.Environment(cr, SUPERUSER_ID, {})
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
        self.assertTrue(all(isinstance(r, str) for r in results), results)
        self.assertEqual(self.sandbox.counter("token:refresh_token"), 2)  # one after the other, each rotated
        with self.registry.cursor() as cr:
            account = api.Environment(cr, SUPERUSER_ID, {})["microsoft365.account"].browse(self.account_id)
            self.assertTrue(account._access_token())  # and the saved refresh token still works
            self.assertEqual(account.status, "connected")
