import base64

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from odoo.exceptions import UserError, ValidationError
from odoo.tests import tagged
from odoo.tools import mute_logger

from ..m365.clouds import CLOUDS
from ..m365.errors import MailLoginFailed
from ..m365.identity import unverified_claims
from ..models.microsoft365_account import explain
from ..sandbox.ca import make_client_certificate
from .common import SandboxCase

QUIET = (
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_account",
    "odoo.addons.mail_microsoft365_oauth.m365.identity",
)


@tagged("post_install", "-at_install")
class TestAppOnly(SandboxCase):
    """Application permissions: no sign-in, one token for every mailbox of the app."""

    def setUp(self):
        super().setUp()
        self.app_registration.flow = "app_only"

    def servers(self, account):
        host, ports = self.sandbox.host, self.sandbox.ports
        common = {
            "connect_with": "microsoft365",
            "microsoft365_account_id": account.id,
            "is_ssl": True,
            "server": host,
            "user": account.email,
        }
        imap = self.env["fetchmail.server"].create(
            dict(common, name=f"{account.email} IMAP", server_type="imap", port=ports["imaps"])
        )
        pop = self.env["fetchmail.server"].create(
            dict(common, name=f"{account.email} POP", server_type="pop", port=ports["pop3s"])
        )
        smtp = self.env["ir.mail_server"].create(
            {
                "name": f"{account.email} SMTP",
                "smtp_authentication": "microsoft365",
                "microsoft365_account_id": account.id,
                "smtp_host": host,
                "smtp_port": ports["smtp"],
                "smtp_encryption": "starttls",
                "smtp_user": account.email,
            }
        )
        return imap, pop, smtp

    def test_two_shared_mailboxes_imap_pop_smtp_with_one_token_request(self):
        info, sales = self.new_account(email="info@contoso.com"), self.new_account(email="sales@contoso.com")
        self.assertEqual((info.status, sales.status), ("app_only", "app_only"))
        for account in (info, sales):
            imap, pop, smtp = self.servers(account)
            imap.button_confirm_login()
            pop.button_confirm_login()
            smtp.test_smtp_connection()
            self.assertEqual(account.action_test_connection()["params"]["type"], "success")
        self.assertEqual(self.sandbox.counter("token:client_credentials"), 1)
        self.assertEqual(self.sandbox.counter("token_requests"), 1)

    @mute_logger(*QUIET)
    def test_each_missing_prerequisite_is_named_with_its_powershell_line(self):
        client_id, tenant = self.app_registration.client_id, self.sandbox.tenant()["id"]
        bob = self.new_account(email="bob@contoso.com")  # the app has no permission on bob's mailbox
        with self.assertRaises(UserError) as refused:
            bob.action_test_connection()
        self.assertIn(
            f'Add-MailboxPermission -Identity "bob@contoso.com" -User (Get-ServicePrincipal -Identity '
            f"{client_id}).Identity -AccessRights FullAccess",
            str(refused.exception),
        )

        self.sandbox.control("service_principal", client_id=client_id, tenant=tenant, registered=False)
        info = self.new_account(email="info@contoso.com")
        with self.assertRaises(UserError) as refused:
            info.action_test_connection()
        self.assertIn(f"New-ServicePrincipal -AppId {client_id} -ObjectId", str(refused.exception))

        self.sandbox.reset()
        self.sandbox.control("consent", client_id=client_id, tenant=tenant, delegated=True, application=False)
        self.app_registration.sudo().app_token_cache_sealed = False
        with self.assertRaises(UserError) as refused:
            info.action_test_connection()
        self.assertIn("The app has no admin consent for IMAP.AccessAsApp", str(refused.exception))
        self.assertIn("Grant admin consent", str(refused.exception))

    def test_send_as_another_address_says_how_to_grant_it(self):
        from odoo.addons.base.models.ir_mail_server import MailDeliveryException

        info = self.new_account(email="info@contoso.com")
        _imap, _pop, smtp = self.servers(info)
        message = smtp.build_email("ceo@contoso.com", ["bob@contoso.com"], "From the top", "Hello")
        with self.assertRaises(MailDeliveryException) as refused:
            smtp.send_email(message, mail_server_id=smtp.id)
        self.assertIn("SendAsDenied", str(refused.exception.args[1]))
        self.assertIn(
            'Add-RecipientPermission -Identity "ceo@contoso.com" -Trustee (Get-ServicePrincipal -Identity '
            f"{self.app_registration.client_id}).Identity -AccessRights SendAs",
            str(refused.exception.args[1]),
        )

    def test_admin_consent_link_records_consent_for_the_organisation(self):
        client_id, tenant = self.app_registration.client_id, self.sandbox.tenant()["id"]
        self.sandbox.control("consent", client_id=client_id, tenant=tenant, granted=False)
        url = self.app_registration.action_admin_consent()["url"]
        self.assertTrue(url.startswith(f"{self.sandbox.identity_url}/{tenant}/adminconsent?client_id={client_id}"))
        self.assertIn("&state=", url)
        params = self.sandbox.sign_in(url, "admin@contoso.com")
        self.assertEqual((params["admin_consent"], params["tenant"]), ("True", tenant))
        token = self.new_account(email="info@contoso.com")._access_token()
        self.assertIn("IMAP.AccessAsApp", unverified_claims(token)["roles"])


@tagged("post_install", "-at_install")
class TestCertificateCredential(SandboxCase):
    def upload(self, app, data, passphrase=None):
        app.write(
            {
                "credential_type": "certificate",
                "certificate_file": base64.b64encode(data),
                "certificate_passphrase": passphrase,
            }
        )

    def registered(self, which="current"):
        certificate = self.sandbox.certificate(which=which)
        return (certificate["private_key"] + certificate["certificate"]).encode(), certificate["thumbprint"]

    def test_pem_certificate_for_delegated_and_app_only(self):
        data, thumbprint = self.registered()
        self.upload(self.app_registration, data)
        self.assertEqual(self.app_registration.certificate_thumbprint, thumbprint)
        self.assertTrue(self.app_registration.certificate_expires_on)
        self.assertFalse(self.app_registration.certificate_file)  # never sent back
        self.env.flush_all()
        self.env.cr.execute("SELECT certificate_sealed FROM microsoft365_app WHERE id = %s", [self.app_registration.id])
        self.assertNotIn("PRIVATE KEY", self.env.cr.fetchone()[0])
        account = self.connect(self.new_account())  # delegated: the code is redeemed with the certificate
        self.assertEqual(unverified_claims(account._access_token())["appidacr"], "2")
        self.app_registration.flow = "app_only"
        token = self.new_account(email="info@contoso.com")._access_token()
        self.assertEqual(unverified_claims(token)["appidacr"], "2")

    def test_pfx_with_passphrase(self):
        data, thumbprint = self.registered()
        key = serialization.load_pem_private_key(data, password=None)
        cert = x509.load_pem_x509_certificate(data)
        pfx = pkcs12.serialize_key_and_certificates(
            b"odoo", key, cert, None, serialization.BestAvailableEncryption(b"pfx-pass")
        )
        with self.assertRaises(ValidationError):
            self.upload(self.app_registration, pfx, "wrong")
        self.upload(self.app_registration, pfx, "pfx-pass")
        self.assertEqual(self.app_registration.certificate_thumbprint, thumbprint)

    @mute_logger(*QUIET)
    def test_unregistered_and_expired_certificates_are_refused_clearly(self):
        with self.assertRaises(ValidationError) as refused:
            self.upload(self.app_registration, self.registered("expired")[0])
        self.assertIn("expired", str(refused.exception))
        key, cert = make_client_certificate("not registered in Entra")
        self.upload(self.app_registration, (key + cert).encode())
        self.app_registration.flow = "app_only"
        with self.assertRaises(UserError) as refused:
            self.new_account(email="info@contoso.com").action_test_connection()
        self.assertIn("Microsoft rejected the certificate", str(refused.exception))


@tagged("post_install", "-at_install")
class TestClouds(SandboxCase):
    def test_every_cloud_preset_gives_authority_scopes_and_hosts(self):
        for key, cloud in CLOUDS.items():
            app = self.env["microsoft365.app"].create(
                {
                    "name": key,
                    "cloud": key,
                    "client_id": "5f0b6c1e-0000-4000-8000-000000000001",
                    "tenant": "contoso.onmicrosoft.com" if key != "consumer" else False,
                }
            )
            credentials = app._credentials()
            tenant = "consumers" if key == "consumer" else "contoso.onmicrosoft.com"
            self.assertEqual(credentials.authority, f"{cloud.authority_host}/{tenant}")
            self.assertEqual(app._cloud().delegated_scopes()[0], f"{cloud.delegated_resource}/IMAP.AccessAsUser.All")
            self.assertEqual(app._cloud().app_scopes(), [f"{cloud.app_resource}/.default"])
            account = self.env["microsoft365.account"].create({"email": f"{key}@contoso.com", "app_id": app.id})
            server = self.env["ir.mail_server"].new(
                {"smtp_authentication": "microsoft365", "microsoft365_account_id": account.id}
            )
            server._onchange_smtp_authentication_microsoft365()
            self.assertEqual((server.smtp_host, server.smtp_port), (cloud.smtp_host, 587))
        self.assertEqual(CLOUDS["consumer"].smtp_host, "smtp-mail.outlook.com")

    @mute_logger(*QUIET)
    def test_shared_mailbox_through_a_delegate_needs_the_grant(self):
        info = self.connect(self.new_account(email="info@contoso.com"), upn="alice@contoso.com")
        self.assertEqual(info.action_test_connection()["params"]["type"], "success")
        with self.assertRaises(MailLoginFailed) as refused:  # refused at the sign-in already
            self.connect(self.new_account(email="sales@contoso.com"), upn="bob@contoso.com")
        self.assertIn("Full Access to it", explain(self.env, refused.exception.diagnosis))
