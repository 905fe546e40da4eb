from odoo.tests import TransactionCase

from ..sandbox.client import shared_sandbox


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
