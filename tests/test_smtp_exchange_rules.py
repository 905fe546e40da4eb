import base64
import logging
import smtplib
import ssl

from odoo.exceptions import UserError
from odoo.tests import tagged
from odoo.tools import mute_logger

from odoo.addons.base.models.ir_mail_server import MailDeliveryException

from .common import SandboxCase

QUIET = ("odoo.addons.base.models.ir_mail_server",)


@tagged("post_install", "-at_install")
class TestSmtpExchangeRules(SandboxCase):
    """Exchange's SMTP rules (sandbox/CONFORMANCE.md SMTP-05, -07, -11) as an Odoo user meets them."""

    def shared_info(self):
        """info@ (shared) connected by alice, who has FullAccess and Send As on it."""
        info = self.connect(self.new_account(email="info@contoso.com"), upn="alice@contoso.com")
        return info, self.outgoing(info)

    def send(self, server, sender, subject):
        message = server.build_email(sender, ["sales@contoso.com"], subject, "Hello")
        return server.send_email(message, mail_server_id=server.id)

    def arrived(self, subject):
        """The messages with `subject` in sales@ (read as the sandbox app, which has FullAccess)."""
        token = self.app_token()
        with self.imap() as imap:
            imap.authenticate("XOAUTH2", lambda _: f"user=sales@contoso.com\x01auth=Bearer {token}\x01\x01")
            imap.select("INBOX")
            _status, data = imap.search(None, "SUBJECT", f'"{subject}"')
            return data[0].split()

    def test_shared_mailbox_logs_in_as_the_signed_in_user_and_sends_from_the_shared_address(self):
        info, server = self.shared_info()
        server.test_smtp_connection()
        result = info.action_test_connection()
        self.assertEqual(result["params"]["type"], "success")
        message = result["params"]["message"]
        self.assertIn("SMTP signs in as alice@contoso.com", message)
        self.assertIn("Exchange checks Send As for info@contoso.com at the first send", message)
        self.send(server, "info@contoso.com", "From the shared mailbox")
        self.assertEqual(len(self.arrived("From the shared mailbox")), 1)

    @mute_logger(*QUIET)
    def test_send_as_refused_at_the_first_send_names_the_exact_grant(self):
        info, server = self.shared_info()
        self.sandbox.control(
            "grant", right="send_as", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False
        )
        # Nothing is sent by Test connection: Exchange checks Send As only at the end of DATA.
        self.assertEqual(info.action_test_connection()["params"]["type"], "success")
        for variant, reply in (
            ("5.2.252", "554 5.2.252 SendAsDenied; alice@contoso.com not allowed to send as info@contoso.com"),
            ("5.2.0", "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException"),
            ("5.7.60", "550 5.7.60 SMTP; Client does not have permissions to send as this sender"),
        ):
            with self.subTest(variant=variant):
                self.sandbox.control("settings", smtp_send_as_denied=variant)
                with self.assertRaises(MailDeliveryException) as refused:
                    self.send(server, "info@contoso.com", f"Send As {variant}")
                text = str(refused.exception.args[1])
                self.assertIn(
                    'Add-RecipientPermission -Identity "info@contoso.com" -Trustee "alice@contoso.com" '
                    "-AccessRights SendAs",
                    text,
                )
                self.assertIn(f"({reply}", text)  # Exchange's own reply, not a code it never sent
                self.assertNotIn("SMTP server 'None'", text)

    @mute_logger(*QUIET)
    def test_send_on_behalf_sets_the_signed_in_user_as_sender_and_a_refusal_names_the_grant(self):
        """Send on behalf on an SMTP server: the message goes From the shared mailbox with the signed-in user as
        Sender; Exchange's SendAsDenied then names Set-Mailbox -GrantSendOnBehalfTo (GRAPH-19, assumed for SMTP)."""
        self.sandbox.control(
            "grant", right="send_as", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False
        )
        self.sandbox.control("grant", right="send_on_behalf", identity="alice@contoso.com", mailbox="info@contoso.com")
        info = self.connect(self.new_account(email="info@contoso.com"), upn="alice@contoso.com")
        server = self.outgoing(info, microsoft365_send_on_behalf=True)
        self.send(server, "info@contoso.com", "On behalf over SMTP")
        token = self.app_token()
        with self.imap() as imap:
            imap.authenticate("XOAUTH2", lambda _: f"user=sales@contoso.com\x01auth=Bearer {token}\x01\x01")
            imap.select("INBOX")
            [number] = imap.search(None, "SUBJECT", '"On behalf over SMTP"')[1][0].split()
            headers = imap.fetch(number, "(BODY.PEEK[HEADER.FIELDS (FROM SENDER)])")[1][0][1].decode()
        self.assertIn("From: info@contoso.com", headers)
        self.assertIn("Sender: alice@contoso.com", headers)
        self.sandbox.control(
            "grant", right="send_on_behalf", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False
        )
        # A session of the test's own, closed after it: a refused send leaves core's connection open, and the
        # sandbox counts open connections against Exchange's limit of three (SMTP-11) in the next tests.
        connection = server.connect(mail_server_id=server.id)
        self.addCleanup(connection.quit)
        message = server.build_email("info@contoso.com", ["sales@contoso.com"], "Refused on behalf over SMTP", "Hello")
        with self.assertRaises(MailDeliveryException) as refused:
            server.send_email(message, mail_server_id=server.id, smtp_session=connection)
        text = str(refused.exception.args[1])
        self.assertIn("alice@contoso.com has no Send on Behalf permission on it", text)
        self.assertIn('Set-Mailbox -Identity "info@contoso.com" -GrantSendOnBehalfTo @{Add="alice@contoso.com"}', text)

    @mute_logger(*QUIET)
    def test_concurrent_connection_limit_is_told_in_plain_words(self):
        alice = self.connect(self.new_account())
        server = self.outgoing(alice)
        token = alice._access_token()
        context = ssl.create_default_context(cafile=self.sandbox.ca_file)
        busy = []
        try:
            for _ in range(3):  # three other senders of the same mailbox, still connected
                smtp = smtplib.SMTP(self.sandbox.host, self.sandbox.ports["smtp"], timeout=10)
                busy.append(smtp)
                smtp.starttls(context=context)
                smtp.ehlo()
                xoauth2 = base64.b64encode(f"user=alice@contoso.com\x01auth=Bearer {token}\x01\x01".encode())
                self.assertEqual(smtp.docmd("AUTH", "XOAUTH2 " + xoauth2.decode())[0], 235)
            with self.assertRaises(MailDeliveryException) as refused:
                self.send(server, "alice@contoso.com", "One sender too many")
        finally:
            for smtp in busy:
                smtp.close()
        text = str(refused.exception.args[1])
        self.assertIn("too many connections", text)
        self.assertIn("try again", text)
        self.assertIn("(432 4.3.2 Concurrent connections limit exceeded.", text)
        self.assertNotIn("SMTPDataError", text)


@tagged("post_install", "-at_install")
class TestAppOnlyTestAndConfirm(SandboxCase):
    """An app-only server's Test & Confirm explains a refusal in app-only words."""

    def setUp(self):
        super().setUp()
        self.app_registration.flow = "app_only"
        self.app_registration.sudo().app_token_cache_sealed = False

    @mute_logger("odoo.addons.mail_microsoft365_oauth.models.microsoft365_account")
    def test_refused_logins_name_the_service_principal_not_a_signed_in_account(self):
        client_id, tenant = self.app_registration.client_id, self.sandbox.tenant()["id"]
        self.sandbox.control("service_principal", client_id=client_id, tenant=tenant, registered=False)
        info = self.new_account(email="info@contoso.com")
        incoming = self.incoming(info, name="info IMAP")
        outgoing = self.outgoing(info)
        for test in (incoming.button_confirm_login, outgoing.test_smtp_connection):
            with self.subTest(test=test.__name__), self.assertRaises(UserError) as refused:
                test()
            text = str(refused.exception)
            self.assertIn(f"New-ServicePrincipal -AppId {client_id}", text)
            self.assertNotIn("AccessAsUser", text)
            self.assertNotIn("signed-in account", text)


@tagged("post_install", "-at_install")
class TestTransientRefusalKeepsTheMail(SandboxCase):
    """Exchange's 432 4.3.2 asks the sender to try again later: the mail waits in Odoo's queue for the
    next run instead of failing for good (issue 15: no mail lost)."""

    def mail_answered_432(self, subject):
        """A mail from alice through her OAuth SMTP server, which answers every message 432 4.3.2."""
        alice = self.connect(self.new_account())
        self.outgoing(alice)
        self.sandbox.control("settings", smtp_concurrency_limit=0)
        return self.env["mail.mail"].create(
            {
                "subject": subject,
                "email_from": "alice@contoso.com",
                "email_to": "buyer@fabrikam.example",
                "body_html": "<p>Hello</p>",
            }
        )

    @mute_logger(*QUIET, "odoo.addons.mail.models.mail_mail")
    def test_a_mail_refused_for_too_many_connections_is_sent_by_the_next_queue_run(self):
        mail = self.mail_answered_432("After the crowd")
        mail.send()
        self.assertEqual(mail.state, "outgoing")
        self.assertIn("too many connections", mail.failure_reason)
        self.sandbox.control("settings", smtp_concurrency_limit=3)
        self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assertEqual(mail.state, "sent")

    @mute_logger(*QUIET)
    def test_a_mail_refused_for_now_is_logged_as_waiting_not_as_a_failure(self):
        """Odoo's mail queue logs a refused mail as an ERROR with a traceback ("failed sending mail"): for
        a mail that only waits for the next run, that would page administrators for nothing."""
        mail = self.mail_answered_432("Waiting, not failed")
        # Level 20: Odoo names its level 25 "INFO" too (netsvc), and "INFO" here would mean 25.
        with self.assertLogs("odoo.addons.mail.models.mail_mail", level=logging.INFO) as logs:
            mail.send()
        self.assertEqual(mail.state, "outgoing")
        about_the_mail = [record for record in logs.records if f"(id: {mail.id})" in record.getMessage()]
        self.assertEqual([record.levelname for record in about_the_mail], ["INFO"])
        self.assertIsNone(about_the_mail[0].exc_info)
        self.assertIn("stays in the queue", about_the_mail[0].getMessage())
        self.assertIn("too many connections", about_the_mail[0].getMessage())
