import base64
import contextlib
import email
import email.policy
import logging
import socket
from unittest.mock import patch

from lxml import etree

from odoo.exceptions import AccessError, UserError, ValidationError
from odoo.tests import Form, new_test_user, tagged
from odoo.tools import config, mute_logger

from ..m365.errors import AuthorizationFailed, MailLoginFailed
from ..m365.mailcheck import imap_authenticate
from ..m365.vault import new_key
from .common import SandboxCase

ACCOUNT_LOGGER = "odoo.addons.mail_microsoft365_oauth.models.microsoft365_account"
QUIET = (ACCOUNT_LOGGER, "odoo.addons.mail_microsoft365_oauth.m365.identity", "odoo.addons.mail.models.fetchmail")
DEFAULT_APP_PARAMETER = "mail_microsoft365_oauth.default_app_id"


@contextlib.contextmanager
def capture_logs(*names):
    """Every record of these loggers from INFO up, whatever level the test run configured."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def closed_port():
    """A local port nobody listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@tagged("post_install", "-at_install")
class TestHonestStatus(SandboxCase):
    """The status says whether mail flows: what a test, a refresh or a sign-in found."""

    def incoming(self, account, **values):
        return super().incoming(account, **{"name": f"{account.email} IMAP", **values})

    def failed_test(self, account):
        """Test connection's error, without assertRaises' savepoint (which would roll back what the
        failure recorded, as the web client's transaction does not: it is kept after rollback)."""
        try:
            account.action_test_connection()
        except UserError as exc:
            return str(exc)
        self.fail("the connection test passed")

    def failed_refresh(self, account):
        """The refresh's error, without assertRaises' savepoint (as fetchmail's cron, which catches
        the error and commits what was recorded)."""
        try:
            account._access_token(force_refresh=True)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            return exc
        self.fail("the refresh succeeded")

    # 6 ------------------------------------------------------------------------------------------

    def test_sign_in_as_someone_without_access_to_the_mailbox_is_refused_and_changes_nothing(self):
        account = self.new_account()
        with self.assertRaises(MailLoginFailed) as refused:
            self.connect(account, upn="bob@contoso.com")
        self.assertEqual(refused.exception.diagnosis.code, "SIGNED IN AS ANOTHER USER")
        account.invalidate_recordset()
        self.assertEqual(account.status, "not_connected")
        self.assertFalse(account.sudo().token_cache_sealed)
        self.assertFalse(account.username)

    def test_delegate_with_full_access_to_a_shared_mailbox_is_accepted(self):
        account = self.connect(self.new_account(email="info@contoso.com"), upn="alice@contoso.com")
        self.assertEqual((account.status, account.username), ("connected", "alice@contoso.com"))

    @mute_logger(*QUIET)
    def test_a_failed_test_moves_the_status_and_a_good_one_brings_it_back(self):
        account = self.connect(self.new_account())
        self.outgoing(account)
        self.sandbox.control("smtp_auth", mailbox="alice@contoso.com", enabled=False)
        self.assertIn("SmtpClientAuthenticationDisabled", self.failed_test(account))
        self.assertEqual(account.status, "failing")
        self.assertIn("SmtpClientAuthenticationDisabled", account.last_error)
        self.sandbox.control("smtp_auth", mailbox="alice@contoso.com", enabled=True)
        self.assertEqual(account.action_test_connection()["params"]["type"], "success")
        self.assertEqual(account.status, "connected")
        self.assertFalse(account.last_error)

    @mute_logger(*QUIET)
    def test_consent_removed_is_not_working_not_reconnect(self):
        account = self.connect(self.new_account())
        self.sandbox.control(
            "consent", client_id=self.app_registration.client_id, tenant=self.sandbox.tenant()["id"], granted=False
        )
        self.assertIsInstance(self.failed_refresh(account), AuthorizationFailed)
        self.assertEqual(account.status, "failing")
        self.assertIn("Consent for this app is missing", account.last_error)
        account._update_health()
        self.assertEqual(account.health, "failing")  # and the responsible people are told
        self.assertTrue(account.activity_ids)

    @mute_logger(*QUIET)
    def test_expired_client_secret_flags_the_app_registration(self):
        account = self.connect(self.new_account())
        other = self.connect(self.new_account(email="bob@contoso.com"))
        self.app_registration.client_secret = self.sandbox.secret(which="expired")
        for mailbox in (account, other):
            self.assertIsInstance(self.failed_refresh(mailbox), AuthorizationFailed)
            self.assertEqual(mailbox.status, "failing")  # not "reconnect": signing in again would not help
            self.assertIn(self.app_registration.name, mailbox.last_error)
        self.assertIn("The client secret has expired", self.app_registration.problem)
        self.env["microsoft365.account"]._cron_health_check()
        self.assertFalse((account | other).activity_ids)  # not once per mailbox...
        told = self.app_registration.activity_ids
        self.assertTrue(told)  # ...but on the app registration
        self.env["microsoft365.account"]._cron_health_check()
        self.assertEqual(self.app_registration.activity_ids, told)  # once
        self.app_registration.client_secret = self.sandbox.secret()
        self.assertFalse(self.app_registration.problem)

    # 7 ------------------------------------------------------------------------------------------

    def test_app_only_wizard_needs_no_sign_in_and_confirms_the_servers(self):
        self.app_registration.flow = "app_only"
        wizard = self.env["microsoft365.connect.wizard"].create(
            {"email": "info@contoso.com", "app_id": self.app_registration.id}
        )
        action = wizard.action_connect()
        self.assertEqual(action["tag"], "display_notification")
        self.assertEqual(action["params"]["type"], "success", action["params"]["message"])
        account = self.env["microsoft365.account"].search([("email", "=", "info@contoso.com")])
        self.assertEqual(account.incoming_server_ids.state, "done")
        self.assertTrue(account.outgoing_server_ids)

    @mute_logger(*QUIET)
    def test_app_only_wizard_says_what_is_left_to_do(self):
        self.app_registration.flow = "app_only"
        wizard = self.env["microsoft365.connect.wizard"].create(
            {"email": "bob@contoso.com", "app_id": self.app_registration.id}  # the app has no access to bob
        )
        action = wizard.action_connect()
        self.assertEqual(action["params"]["type"], "warning")
        self.assertIn("Add-MailboxPermission", action["params"]["message"])
        account = self.env["microsoft365.account"].search([("email", "=", "bob@contoso.com")])
        self.assertEqual(account.incoming_server_ids.state, "draft")

    def test_delegated_wizard_asks_for_sign_in_and_then_confirms(self):
        wizard = self.env["microsoft365.connect.wizard"].create(
            {"email": "alice@contoso.com", "app_id": self.app_registration.id}
        )
        action = wizard.action_connect()
        self.assertEqual(action["type"], "ir.actions.act_url")
        account = self.env["microsoft365.account"].search([("email", "=", "alice@contoso.com")])
        self.connect(account)
        self.assertEqual(account._confirm_servers(), [])
        self.assertEqual(account.incoming_server_ids.state, "done")

    # 8 ------------------------------------------------------------------------------------------

    def test_revoke_sets_the_incoming_servers_back_to_draft(self):
        account = self.connect(self.new_account())
        server = self.incoming(account)
        server.button_confirm_login()
        self.assertEqual(server.state, "done")
        result = account.action_revoke()
        self.assertEqual(server.state, "draft")
        self.assertIn(server.name, result["params"]["message"])
        self.assertIn("Authorization revoked", account.message_ids[0].body)

    def test_scheduler_on_a_mailbox_without_sign_in_logs_plain_words_without_traceback(self):
        account = self.new_account()
        imap = self.incoming(account)
        pop = self.incoming(account, name="POP", server_type="pop", port=self.sandbox.ports["pop3s"])
        (imap | pop).write({"state": "done"})  # confirmed before the grant went away (an older version)
        with capture_logs("odoo.addons.mail_microsoft365_oauth", "odoo.addons.mail.models.fetchmail") as records:
            (imap | pop).fetch_mail(raise_exception=False)
        self.assertFalse([r for r in records if r.exc_info], "a traceback was logged")
        self.assertTrue(any("not connected to Microsoft 365" in r.getMessage() for r in records))
        for server in (imap, pop):
            self.assertIn("click Authorize", server.microsoft365_fetch_error)
        with self.assertRaises(UserError) as refused:
            imap.fetch_mail()
        self.assertIn("is not connected to Microsoft 365", str(refused.exception))

    # 9 ------------------------------------------------------------------------------------------

    def test_changing_the_app_registration_forgets_the_tokens(self):
        account = self.connect(self.new_account())
        server = self.incoming(account)
        server.button_confirm_login()
        other = self.env["microsoft365.app"].create(self.sandbox.odoo_app_values("Partner Mail (multi-tenant)"))
        account.app_id = other
        self.assertEqual((server.state, server.microsoft365_account_id), ("draft", account))
        self.assertEqual(server.microsoft365_app_id, other)
        self.assertEqual(account.status, "not_connected")
        self.assertFalse(account.sudo().token_cache_sealed)
        self.assertFalse(account.username)
        with self.assertRaises(UserError):
            account._access_token()

    # 10 -----------------------------------------------------------------------------------------

    @mute_logger(*QUIET)
    def test_unreachable_server_is_named_as_such_for_both_flows(self):
        for flow, email_address in (("delegated", "alice@contoso.com"), ("app_only", "info@contoso.com")):
            with self.subTest(flow=flow):
                self.app_registration.flow = flow
                account = self.new_account(email=email_address)
                if flow == "delegated":
                    self.connect(account)
                self.incoming(account, server="imap.example.invalid")  # no such name (RFC 6761): DNS fails
                self.outgoing(account, smtp_host="127.0.0.1", smtp_port=closed_port())  # refused
                message = self.failed_test(account)
                self.assertIn("Odoo could not connect to the IMAP server imap.example.invalid", message)
                self.assertIn("Odoo could not connect to the SMTP server 127.0.0.1", message)
                self.assertNotIn("New-ServicePrincipal", message)
                self.assertNotIn("rejected", message)

    # 11 -----------------------------------------------------------------------------------------

    def test_several_app_registrations_the_server_names_its_own(self):
        self.env["ir.config_parameter"].sudo().set_param(DEFAULT_APP_PARAMETER, False)
        other = self.env["microsoft365.app"].create(
            dict(self.sandbox.odoo_app_values("Partner Mail (multi-tenant)"), imap_host="imap.partner.example")
        )
        with self.assertRaises(ValidationError) as refused:
            self.env["fetchmail.server"].create(
                {
                    "name": "no app",
                    "connect_with": "microsoft365",
                    "user": "alice@contoso.com",
                    "server": "x",
                    "server_type": "imap",
                    "is_ssl": True,
                }
            )
        self.assertIn("choose the App registration", str(refused.exception))
        form = Form(self.env["fetchmail.server"])
        form.name = "alice"
        form.user = "alice@contoso.com"
        form.connect_with = "microsoft365"
        form.microsoft365_app_id = other
        self.assertEqual(form.server, "imap.partner.example")
        server = form.save()
        self.assertEqual(server.microsoft365_account_id.app_id, other)
        self.assertEqual(server.microsoft365_account_id.email, "alice@contoso.com")

    # 12 -----------------------------------------------------------------------------------------

    def read_from_header(self, mailbox, subject):
        token = self.app_token()
        with self.imap() as imap:
            imap_authenticate(imap, mailbox, token)
            _status, data = imap.search(None, "SUBJECT", f'"{subject}"')
            _status, fetched = imap.fetch(data[0].split()[-1], "(BODY.PEEK[HEADER])")
            return email.message_from_bytes(fetched[0][1], policy=email.policy.default)["From"]

    def test_name_displayed_is_the_sender_name_of_mail_from_the_mailbox(self):
        account = self.connect(self.new_account(sender_name="Contoso Support"))
        server = self.outgoing(account)
        IrMailServer = self.env["ir.mail_server"]
        for sender, subject, expected in (
            ("alice@contoso.com", "Ticket 12 answered", '"Contoso Support" <alice@contoso.com>'),
            ('"Alice Example" <alice@contoso.com>', "Ticket 13 answered", '"Alice Example" <alice@contoso.com>'),
        ):
            message = IrMailServer.build_email(sender, ["info@contoso.com"], subject, "Done.")
            server.send_email(message, mail_server_id=server.id)
            self.assertEqual(
                self.read_from_header("info@contoso.com", subject).replace('"', ""), expected.replace('"', "")
            )

    def test_provider_constant_is_gone(self):
        self.assertNotIn("provider", self.env["microsoft365.account"]._fields)

    # 14 -----------------------------------------------------------------------------------------

    def test_health_note_escapes_what_external_senders_wrote(self):
        account = self.connect(self.new_account())
        server = self.incoming(account)
        server.microsoft365_failed_messages = {
            "<1@evil>": {
                "failures": 3,
                "subject": '<img src=x onerror="alert(1)">',
                "sender": "<script>alert(2)</script>@evil.example",
                "error": "boom",
            }
        }
        account._update_health()
        note = str(account.activity_ids.note)
        self.assertNotIn("<img", note)
        self.assertNotIn("<script", note)
        self.assertIn("&lt;img", note)

    def test_a_changed_encryption_key_is_a_clear_user_error(self):
        account = self.new_account()
        with patch.dict(config.options, {"microsoft365_oauth_keys": new_key()}):
            with self.assertRaises(UserError) as refused:
                account.action_authorize()
        self.assertIn("encryption key", str(refused.exception))

    def test_the_client_secret_never_returns_to_the_browser(self):
        specification = {"client_secret": {}, "has_client_secret": {}}
        saved = self.app_registration.web_save({"client_secret": "a-new-secret-value"}, specification)
        self.assertFalse(saved[0]["client_secret"])
        self.assertTrue(saved[0]["has_client_secret"])
        created = self.env["microsoft365.app"].web_save(
            dict(self.sandbox.odoo_app_values(), name="Second"), specification
        )
        self.assertFalse(created[0]["client_secret"])

    def test_the_trusted_ca_is_an_upload_not_a_server_path(self):
        self.assertNotIn("ca_file", self.env["microsoft365.app"]._fields)
        for not_a_certificate in (b"/etc/ssl/private/server.key", b"-----BEGIN PRIVATE KEY-----\n"):
            with self.assertRaises(ValidationError):
                self.app_registration.ca_certificate = base64.b64encode(not_a_certificate)
        # The sandbox's CA, uploaded by odoo_app_values(), is what sign-in and mail connections trust.
        account = self.connect(self.new_account())
        self.outgoing(account)
        self.assertEqual(account.action_test_connection()["params"]["type"], "success")

    def test_outlook_take_over_is_for_administrators_only(self):
        user = new_test_user(self.env, "outlook-user", groups="base.group_user")
        with self.assertRaises(AccessError) as refused:
            self.env["microsoft365.outlook.import"].with_user(user).action_import()
        self.assertIn("Only an administrator", str(refused.exception))

    # 15 -----------------------------------------------------------------------------------------

    def test_an_account_used_by_servers_is_not_deleted_and_the_servers_are_named(self):
        account = self.new_account()
        self.incoming(account, name="Support inbox")
        self.outgoing(account, name="Support outbox")
        with self.assertRaises(UserError) as refused:
            account.unlink()
        self.assertIn("Support inbox", str(refused.exception))
        self.assertIn("Support outbox", str(refused.exception))
        self.new_account(email="bob@contoso.com").unlink()  # unused: deleted

    # 17 -----------------------------------------------------------------------------------------

    def test_switch_to_oauth_is_logged_on_the_account(self):
        server = self.env["ir.mail_server"].create(
            {
                "name": "Old password server",
                "smtp_host": self.sandbox.host,
                "smtp_port": self.sandbox.ports["smtp"],
                "smtp_user": "alice@contoso.com",
                "smtp_pass": "secret",
                "smtp_encryption": "starttls",
            }
        )
        self.new_account()
        server.action_microsoft365_switch()
        self.assertIn("Old password server", server.microsoft365_account_id.message_ids[0].body)

    # 18 -----------------------------------------------------------------------------------------

    def test_settings_block_is_shown_without_custom_email_servers(self):
        arch = self.env["res.config.settings"].get_views([(False, "form")])["views"]["form"]["arch"]
        setting = etree.fromstring(arch).xpath("//setting[@id='microsoft365_oauth_setting']")[0]
        for node in [setting, *setting.iterancestors()]:
            self.assertNotIn("external_email_server_default", node.get("invisible", ""))
        outlook = etree.fromstring(arch).xpath("//setting[@id='email-outlook-setting']")[0]
        self.assertIn("external_email_server_default", outlook.get("invisible"))  # core's own block unchanged


@tagged("post_install", "-at_install")
class TestTakeOverChecksTheMailbox(SandboxCase):
    """Odoo's Outlook module never checked who signed in: a taken-over token of someone without
    access to the mailbox is not "connected"."""

    def test_a_token_of_someone_else_is_not_connected(self):
        EXCHANGE = "https://outlook.office.com"
        client = self.app_registration._identity_client()
        flow = client.start_sign_in(
            self.app_registration.redirect_uri, [f"{EXCHANGE}/IMAP.AccessAsUser.All"], login_hint="bob@contoso.com"
        )
        client.finish_sign_in(flow, self.sandbox.sign_in(flow["auth_uri"], "bob@contoso.com"))
        refresh_token = next(iter(client.cache.search(client.cache.CredentialType.REFRESH_TOKEN)))["secret"]
        account = self.new_account()  # alice's mailbox
        self.assertFalse(account._adopt_refresh_token(refresh_token))
        self.assertEqual(account.status, "not_connected")
        self.assertFalse(account.sudo().token_cache_sealed)
        self.assertIn("You signed in as bob@contoso.com", account.last_error)
