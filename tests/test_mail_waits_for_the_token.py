"""A mail Odoo could not send because Microsoft's token endpoint was away for a moment (503, 429 with
Retry-After, no answer) stays in the queue for the next run, its reason shown (issue 15: no mail lost);
a failure that needs someone (a revoked grant) still fails the mail, as Odoo does, and the mail goes once
the mailbox works again."""

import time
from unittest.mock import patch

from odoo.tests import tagged
from odoo.tools import mute_logger

from ..m365.identity import _HTTP_CACHE, _TimeoutSession
from .common import SandboxCase

QUIET = (
    "odoo.addons.base.models.ir_mail_server",
    "odoo.addons.mail.models.mail_mail",
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_account",
    "odoo.addons.mail_microsoft365_oauth.models.ir_mail_server",
    "odoo.addons.mail_microsoft365_oauth.m365.identity",
)


def forget_pauses():
    """The identity client leaves an endpoint alone for the Retry-After asked (process-wide, as MSAL's
    throttle cache): once "the time is over", both forget, and the next test starts with a reachable one."""
    _TimeoutSession._unavailable.clear()
    _HTTP_CACHE.clear()


@tagged("post_install", "-at_install")
class TestMailWaitsForTheToken(SandboxCase):
    def setUp(self):
        super().setUp()
        forget_pauses()
        self.addCleanup(forget_pauses)

    def queued_mail(self, subject, **values):
        """A mail from alice through her OAuth SMTP server, whose access token needs a refresh at once."""
        self.sandbox.control("settings", access_token_lifetime=120)  # stale for MSAL: the send refreshes
        self.alice = self.connect(self.new_account())
        server = self.outgoing(self.alice, **values)
        partner = self.env["res.partner"].create({"name": "Buyer", "email": "buyer@fabrikam.example"})
        message = partner.with_context(mail_notify_force_send=False).message_post(
            body="Hello", subject=subject, partner_ids=partner.ids, email_from="alice@contoso.com"
        )
        mail = self.env["mail.mail"].create(
            {
                "subject": subject,
                "email_from": "alice@contoso.com",
                "email_to": "buyer@fabrikam.example",
                "body_html": "<p>Hello</p>",
                "mail_server_id": server.id,
            }
        )
        return mail, server, message

    def assert_waits(self, mail, words="busy or unavailable"):
        self.assertEqual(mail.state, "outgoing", mail.failure_reason)
        self.assertIn(words, mail.failure_reason or "")
        self.assertEqual(self.alice.status, "connected")  # nothing to do for anyone

    @mute_logger(*QUIET)
    def test_a_mail_is_kept_queued_while_the_token_endpoint_answers_503_and_sent_by_the_next_run(self):
        mail, _server, _message = self.queued_mail("While Microsoft is down")
        self.sandbox.control("token_fault", kind="503", count=5, retry_after=0)
        self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assert_waits(mail)
        self.assertEqual(self.sandbox.counter("fault:503"), 3)
        self.sandbox.control("token_fault", kind="none")
        self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assertEqual(mail.state, "sent", mail.failure_reason)

    @mute_logger(*QUIET)
    def test_a_mail_is_kept_queued_while_the_token_endpoint_is_throttled_with_retry_after(self):
        mail, _server, _message = self.queued_mail("While Microsoft throttles")
        self.sandbox.control("token_fault", kind="429", count=1, retry_after=60)
        mail.send()  # as Send Now and the queue do
        self.assert_waits(mail)
        forget_pauses()  # the minute is over
        self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assertEqual(mail.state, "sent", mail.failure_reason)

    @mute_logger(*QUIET, "odoo.tests.common.requests")
    def test_a_mail_is_kept_queued_while_the_token_endpoint_does_not_answer(self):
        mail, _server, _message = self.queued_mail("While Microsoft is silent")
        # Odoo's tests raise every HTTP timeout to 10 s: the endpoint hangs longer, and the client gives
        # up after that one attempt (its budget narrowed to it, not to wait out a second one).
        self.sandbox.control("token_fault", kind="hang", seconds=11, count=1)
        with patch.object(_TimeoutSession, "BUDGET", 10.5):
            self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assertEqual(self.sandbox.counter("fault:hang"), 1)
        self.assert_waits(mail, "could not be reached")
        forget_pauses()
        self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assertEqual(mail.state, "sent", mail.failure_reason)

    @mute_logger(*QUIET)
    def test_the_waiting_mail_shows_no_failure_on_its_message(self):
        """The envelope in the chatter is not red for a mail Odoo will send by itself."""
        _mail, _server, message = self.queued_mail("Not red")
        mails = self.env["mail.mail"].search([("mail_message_id", "=", message.id)])
        self.assertTrue(mails)
        self.sandbox.control("token_fault", kind="503", count=5, retry_after=0)
        self.env["mail.mail"].process_email_queue(ids=mails.ids)
        self.assertEqual(set(mails.mapped("state")), {"outgoing"})
        notifications = message.notification_ids.filtered(lambda n: n.notification_type == "email")
        self.assertTrue(notifications)
        self.assertNotIn("exception", notifications.mapped("notification_status"))

    @mute_logger(*QUIET)
    def test_a_revoked_grant_still_fails_the_mail_with_the_fix(self):
        mail, _server, _message = self.queued_mail("After the revocation")
        self.sandbox.control("revoke_sessions", user="alice@contoso.com")
        self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assertEqual(mail.state, "exception")
        self.assertIn("Authorize", mail.failure_reason)
        self.assertEqual(self.alice.status, "reconnect")

    def assert_sent_once_authorized_again(self, transport):
        """Red while someone must act (the fix shown); once the mailbox is authorized again, the mail queue
        sends them by itself: nothing of them went out, Microsoft refused the token before SMTP or Graph."""
        _mail, _server, message = self.queued_mail("Authorized again", microsoft365_transport=transport)
        mails = self.env["mail.mail"].search([("mail_message_id", "=", message.id)])
        self.assertTrue(mails)
        self.sandbox.control("revoke_sessions", user="alice@contoso.com")
        self.env["mail.mail"].process_email_queue(ids=mails.ids)
        self.assertEqual(set(mails.mapped("state")), {"exception"})
        self.assertIn("Authorize", mails[0].failure_reason)
        notifications = message.notification_ids.filtered(lambda n: n.notification_type == "email")
        self.assertEqual(set(notifications.mapped("notification_status")), {"exception"})
        self.env["mail.mail"].process_email_queue(ids=mails.ids)
        self.assertEqual(set(mails.mapped("state")), {"exception"}, "nothing was fixed: no retry")

        self.connect(self.alice)
        self.env["mail.mail"].process_email_queue(ids=mails.ids)
        self.assertFalse(mails.exists(), "sent (and removed, as Odoo does with notification mails)")
        self.assertEqual(set(notifications.mapped("notification_status")), {"sent"})

    @mute_logger(*QUIET)
    def test_a_mail_retried_by_hand_that_fails_for_itself_is_not_sent_again_unasked(self):
        """The note says why the mail failed last: retried by hand once the mailbox works and refused for
        a recipient of its own, it waits for someone, as Odoo does, instead of going out again unasked."""
        mail, _server, _message = self.queued_mail("Retried by hand")
        self.sandbox.control("revoke_sessions", user="alice@contoso.com")
        mail.send()
        self.assertEqual(mail.sudo().microsoft365_account_id, self.alice)
        self.connect(self.alice)
        mail.write({"email_to": "not an address"})
        mail.mark_outgoing()  # Retry
        mail.send()
        self.assertEqual(mail.state, "exception")
        self.assertEqual(self.alice.status, "connected")  # the failure is the mail's own
        self.assertFalse(mail.sudo().microsoft365_account_id)

    @mute_logger(*QUIET, "odoo.addons.mail_microsoft365_oauth.models.microsoft365_app")
    def test_mails_failed_for_the_app_registration_go_once_microsoft_accepts_it_again(self):
        """The expired secret stops every mailbox of the app ("Not working") until each is used again; once
        the app registration is accepted again (a new secret entered, or any of its mailboxes' token
        requests), its mails go with the next run of the queue, not after the mailbox's next refresh."""
        mail, _server, _message = self.queued_mail("After the new secret")
        sandbox_app = self.sandbox.app()
        expired = [dict(secret, expires=time.time() - 60) for secret in sandbox_app["secrets"]]
        self.sandbox.control("app", client_id=sandbox_app["client_id"], secrets=expired)
        self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assertEqual(mail.state, "exception")
        self.assertIn("client secret has expired", mail.failure_reason)
        self.assertEqual(self.alice.status, "failing")

        self.sandbox.control("app", client_id=sandbox_app["client_id"], secrets=sandbox_app["secrets"])
        self.app_registration.client_secret = self.sandbox.secret()  # the administrator enters the new secret
        self.assertEqual(self.alice.status, "failing", "no token request since: the mailbox is not used yet")
        self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assertEqual(mail.state, "sent", mail.failure_reason)
        self.assertEqual(self.alice.status, "connected")

    @mute_logger(*QUIET)
    def test_mails_failed_for_a_revoked_grant_go_once_the_mailbox_is_authorized_again(self):
        self.assert_sent_once_authorized_again("exchange")

    @mute_logger(*QUIET, "odoo.addons.mail_microsoft365_oauth.models.fetchmail_server_graph")
    def test_mails_failed_for_a_revoked_grant_go_through_graph_once_authorized_again(self):
        self.assert_sent_once_authorized_again("graph")

    @mute_logger(*QUIET, "odoo.addons.mail_microsoft365_oauth.models.fetchmail_server_graph")
    def test_a_mail_sent_through_microsoft_graph_waits_as_well(self):
        mail, _server, _message = self.queued_mail("Graph waits too", microsoft365_transport="graph")
        self.sandbox.control("token_fault", kind="503", count=5, retry_after=0)
        self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assert_waits(mail)
        self.sandbox.control("token_fault", kind="none")
        self.env["mail.mail"].process_email_queue(ids=mail.ids)
        self.assertEqual(mail.state, "sent", mail.failure_reason)
        self.assertEqual(self.sandbox.counter("mail_login:smtp"), 0)  # through Graph, not SMTP
