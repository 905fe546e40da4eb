"""Microsoft Graph as the transport of Odoo's mail servers, over the wire against the sandbox: sending
through the mail queue with SMTP AUTH switched off, receiving a folder's unread mail, the IMAP path's
safety net, each Graph refusal in plain words, and a reply that finds its record."""

import email
import email.policy
import os
import time
from unittest.mock import patch
from urllib.parse import parse_qsl, urlsplit

from lxml import etree

from odoo.exceptions import RedirectWarning, UserError
from odoo.tests import tagged
from odoo.tools import mute_logger

from odoo.addons.base.models.ir_mail_server import MailDeliveryException

from ..m365.clouds import CLOUDS
from ..m365.graph import GraphClient
from ..m365.identity import AppCredentials, IdentityClient, http_session
from ..sandbox.graph import message_id, parse_message_id
from .common import FetchCase

QUIET = (
    "odoo.addons.mail_microsoft365_oauth.models.microsoft365_account",
    "odoo.addons.mail_microsoft365_oauth.models.fetchmail_server",
    "odoo.addons.mail_microsoft365_oauth.models.fetchmail_server_graph",
    "odoo.addons.mail_microsoft365_oauth.models.ir_mail_server",
    "odoo.addons.mail.models.fetchmail",
    "odoo.addons.mail_microsoft365_oauth.m365.identity",
    "odoo.addons.mail_microsoft365_oauth.m365.graph",
)
RAW = ("Traceback", "'error':", "b'")  # what an administrator must never read


@tagged("post_install", "-at_install")
class TestGraphTransport(FetchCase):
    def setUp(self):
        super().setUp()
        # SMTP AUTH off for the mailboxes used here: whatever is sent can only have gone through Graph.
        for mailbox in ("alice@contoso.com", "info@contoso.com"):
            self.sandbox.control("smtp_auth", mailbox=mailbox, enabled=False)

    # helpers -----------------------------------------------------------------------------------

    def connect(self, account, upn=None):
        """Signed in (Exchange scopes, as today), and the Graph token drawn once from the same cache: a
        test's assertRaises rolls back its savepoint, which would forget a refresh made inside it (outside
        tests a refresh is committed in its own transaction)."""
        account = super().connect(account, upn)
        account._graph_token()
        return account

    def clear_unread(self, mailbox):
        """Earlier tests leave unread mail behind: the Graph fetch would read it first."""
        client = self.app_graph(mailbox)
        for message in client.unread("inbox"):
            client.mark_read(message["id"])

    def graph_outgoing(self, account, **values):
        return self.outgoing(account, microsoft365_transport="graph", **values)

    def graph_incoming(self, account, **values):
        return self.incoming(account, microsoft365_transport="graph", **values)

    def app_graph(self, mailbox):
        """The sandbox app's own Graph client on a mailbox (the app's Graph permission is tenant-wide)."""
        credentials = AppCredentials(
            client_id=self.sandbox.app()["client_id"],
            authority=self.sandbox.authority(),
            client_secret=self.sandbox.secret(),
            ca_file=self.sandbox.ca_file,
        )
        cloud = CLOUDS["global"].with_overrides(graph_resource=self.sandbox.description["graph_resource"])
        token = IdentityClient(credentials).app_access_token(cloud.graph_app_scopes()).token
        return GraphClient(
            self.sandbox.description["graph_url"], token, mailbox, session=http_session(self.sandbox.ca_file)
        )

    def arrived(self, mailbox, subject):
        """Messages with `subject` in a mailbox's Inbox, read over IMAP as the app (Full Access granted)."""
        app = f"app:{self.sandbox.app()['client_id']}"
        self.sandbox.control("grant", right="full_access", identity=app, mailbox=mailbox)
        token = self.app_token()
        with self.imap() as imap:
            imap.authenticate("XOAUTH2", lambda _: f"user={mailbox}\x01auth=Bearer {token}\x01\x01")
            imap.select("INBOX")
            numbers = imap.search(None, "SUBJECT", f'"{subject}"')[1][0].split()
            return [
                email.message_from_bytes(imap.fetch(n, "(BODY.PEEK[])")[1][0][1], policy=email.policy.default)
                for n in numbers
            ]

    def send(self, server, sender, to, subject):
        message = server.build_email(sender, [to], subject, "Hello through Microsoft Graph")
        return server.send_email(message, mail_server_id=server.id)

    def deliver_unread(self, mailbox, subject):
        self.clear_unread(mailbox)
        self.sandbox.control("deliver", mailbox=mailbox, subject=subject, sender="someone@fabrikam.example")

    # sending ----------------------------------------------------------------------------------

    def test_the_mail_queue_sends_through_graph_with_smtp_auth_switched_off(self):
        account = self.connect(self.new_account())
        server = self.graph_outgoing(account)
        server.test_smtp_connection()  # Graph, not SMTP: SMTP AUTH is off for alice
        mail = self.env["mail.mail"].create(
            {
                "email_from": "alice@contoso.com",
                "email_to": "bob@contoso.com",
                "subject": "Queued through Graph",
                "body_html": "<p>Hello</p>",
                "mail_server_id": server.id,
            }
        )
        mail.send()
        self.assertEqual(mail.state, "sent", mail.failure_reason)
        [received] = self.arrived("bob@contoso.com", "Queued through Graph")
        self.assertEqual(received["Message-ID"], mail.message_id)
        self.assertEqual(self.sandbox.counter("mail_login:smtp"), 0)  # no SMTP login at all
        self.assertEqual(self.sandbox.counter("token:authorization_code"), 1)  # no second sign-in for Graph

    def test_bcc_recipients_still_receive_the_message(self):
        account = self.connect(self.new_account())
        server = self.graph_outgoing(account)
        message = server.build_email(
            "alice@contoso.com", ["bob@contoso.com"], "With a Bcc", "Hello", email_bcc=["admin@contoso.com"]
        )
        server.send_email(message, mail_server_id=server.id)
        [to_admin] = self.arrived("admin@contoso.com", "With a Bcc")
        self.assertIsNone(to_admin["Bcc"])  # Exchange keeps it off the delivered copies

    def test_a_large_attachment_is_sent_through_a_draft_and_an_upload_session(self):
        account = self.connect(self.new_account())
        server = self.graph_outgoing(account)
        content = os.urandom(5 * 1024 * 1024)  # over sendMail's 4 MB per request
        message = server.build_email(
            "alice@contoso.com",
            ["bob@contoso.com"],
            "Graph large quote",
            "See the attached quote.",
            attachments=[("quote.pdf", content, "application/pdf")],
        )
        server.send_email(message, mail_server_id=server.id)
        [received] = self.arrived("bob@contoso.com", "Graph large quote")
        [attachment] = list(received.iter_attachments())
        self.assertEqual((attachment.get_filename(), attachment.get_payload(decode=True)), ("quote.pdf", content))
        self.assertEqual(self.sandbox.counter("graph_send_draft"), 1)

    @mute_logger(*QUIET)
    def test_a_shared_mailbox_sends_as_itself_and_a_refused_send_as_is_explained(self):
        info = self.connect(self.new_account(email="info@contoso.com"), upn="alice@contoso.com")
        server = self.graph_outgoing(info)
        self.send(server, "info@contoso.com", "bob@contoso.com", "Shared through Graph")
        self.assertEqual(len(self.arrived("bob@contoso.com", "Shared through Graph")), 1)
        self.sandbox.control(
            "grant", right="send_as", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False
        )
        with self.assertRaises(MailDeliveryException) as refused:
            self.send(server, "info@contoso.com", "bob@contoso.com", "Refused through Graph")
        text = refused.exception.args[1]
        self.assertIn(
            "Exchange Online refused to send as info@contoso.com: alice@contoso.com has neither Send As nor Send on "
            "Behalf on it.",
            text,
        )
        self.assertIn('Add-RecipientPermission -Identity "info@contoso.com" -Trustee "alice@contoso.com"', text)
        self.assertIn('Set-Mailbox -Identity "info@contoso.com" -GrantSendOnBehalfTo @{Add="alice@contoso.com"}', text)
        self.assertFalse(any(raw in text for raw in RAW), text)

    @mute_logger(*QUIET)
    def test_send_on_behalf_of_a_shared_mailbox_shows_the_signed_in_user_as_sender(self):
        """Send on behalf (Set-Mailbox -GrantSendOnBehalfTo): From the shared mailbox, Sender the signed-in
        user; not granted, the refusal says so in plain words with the exact grant (GRAPH-19)."""
        self.sandbox.control(
            "grant", right="send_as", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False
        )
        self.sandbox.control("grant", right="send_on_behalf", identity="alice@contoso.com", mailbox="info@contoso.com")
        info = self.connect(self.new_account(email="info@contoso.com"), upn="alice@contoso.com")
        server = self.graph_outgoing(info, microsoft365_send_on_behalf=True)
        message = server.build_email("info@contoso.com", ["bob@contoso.com"], "On behalf through Graph", "Hello")
        server.send_email(message, mail_server_id=server.id)
        [received] = self.arrived("bob@contoso.com", "On behalf through Graph")
        self.assertEqual(received["From"].addresses[0].addr_spec, "info@contoso.com")
        self.assertEqual(received["Sender"].addresses[0].addr_spec, "alice@contoso.com")
        self.sandbox.control(
            "grant", right="send_on_behalf", identity="alice@contoso.com", mailbox="info@contoso.com", granted=False
        )
        with self.assertRaises(MailDeliveryException) as refused:
            self.send(server, "info@contoso.com", "bob@contoso.com", "Refused on behalf through Graph")
        text = refused.exception.args[1]
        self.assertIn(
            "Exchange Online refused to send on behalf of info@contoso.com: alice@contoso.com has no Send on Behalf "
            "permission on it.",
            text,
        )
        self.assertIn('Set-Mailbox -Identity "info@contoso.com" -GrantSendOnBehalfTo @{Add="alice@contoso.com"}', text)
        self.assertFalse(any(raw in text for raw in RAW), text)
        self.assertEqual(self.arrived("bob@contoso.com", "Refused on behalf through Graph"), [])

    def test_a_send_without_a_server_rewrites_from_as_the_smtp_path_does(self):
        """send_email without a server: Odoo picks one by its FROM filter and, where none matches, sends from
        the notification address with the author's name (encapsulated), as for SMTP; Exchange would refuse
        the author's own address (ErrorSendAsDenied)."""
        account = self.connect(self.new_account())
        self.graph_outgoing(account)
        mail_servers = self.env["ir.mail_server"].with_context(domain_notifications_email="alice@contoso.com")
        message = mail_servers.build_email(
            '"Someone Else" <someone@fabrikam.example>', ["bob@contoso.com"], "Picked by its filter", "Hello"
        )
        mail_servers.send_email(message)
        [received] = self.arrived("bob@contoso.com", "Picked by its filter")
        self.assertEqual(received["From"].addresses[0].addr_spec, "alice@contoso.com")
        self.assertEqual(received["From"].addresses[0].display_name, "Someone Else")

    def test_the_stock_test_button_keeps_the_context_other_modules_give_it(self):
        """The 5.7.139 offer no longer replaces the Test Connection button's context: another module's stays."""
        self.env["ir.ui.view"].create(
            {
                "name": "another module's Test Connection context",
                "model": "ir.mail_server",
                "inherit_id": self.env.ref("base.ir_mail_server_form").id,
                "priority": 1,
                "arch": '<xpath expr="//button[@name=\'test_smtp_connection\']" position="attributes">'
                "<attribute name=\"context\">{'another_module': True}</attribute></xpath>",
            }
        )
        arch = self.env["ir.mail_server"].get_views([(False, "form")])["views"]["form"]["arch"]
        [button] = etree.fromstring(arch).xpath("//button[@name='test_smtp_connection']")
        self.assertEqual(button.get("context"), "{'another_module': True}")

    def test_graph_tokens_are_used_while_they_have_the_refresh_margin_left(self):
        """A Graph token with more than REFRESH_MARGIN left is served from the cache, delegated and app-only,
        as the Exchange token is: one token request per lifetime, not one per use of a short-lived token."""
        self.sandbox.control("settings", access_token_lifetime=300)  # more than the margin, under 5.5 minutes
        account = self.connect(self.new_account())  # draws the first Graph token
        account_model, app_model = type(self.env["microsoft365.account"]), type(self.env["microsoft365.app"])
        # Neither the account's nor the app's row lock is taken (another worker refreshing would be waited for).
        with patch.object(account_model, "_refresh_serialised", side_effect=AssertionError("row lock taken")):
            account._graph_token()
        self.app_registration.write({"flow": "app_only"})
        info = self.new_account(email="info@contoso.com")
        info._graph_token()
        requests = self.sandbox.counter("token:client_credentials")
        with patch.object(app_model, "_app_token_locked", side_effect=AssertionError("row lock taken")):
            info._graph_token()
        self.assertEqual(self.sandbox.counter("token:client_credentials"), requests)

    @mute_logger(*QUIET)
    def test_5_7_139_at_test_connection_offers_graph_and_the_switch_sends(self):
        account = self.connect(self.new_account())
        server = self.outgoing(account)  # SMTP with OAuth, SMTP AUTH off for the mailbox
        with self.assertRaises(UserError):  # called from code: the UserError it always was
            server.test_smtp_connection()
        with self.assertRaises(RedirectWarning) as offered:  # the form's button
            server.with_context(microsoft365_offer_graph=True).test_smtp_connection()
        self.assertIn("SMTP AUTH is disabled", offered.exception.args[0])
        action, button, context = offered.exception.args[1:4]
        self.assertEqual(button, "Use Microsoft Graph")
        # The button runs the server action on this server, as the list action does for many.
        self.env["ir.actions.server"].browse(action).with_context(**context).run()
        self.assertEqual(server.microsoft365_transport, "graph")
        server.test_smtp_connection()
        self.assertIn(f"Outgoing: {server.name} (Microsoft Graph)", account.server_summary)
        self.send(server, "alice@contoso.com", "bob@contoso.com", "Graph after the 5.7.139 switch")
        self.assertEqual(len(self.arrived("bob@contoso.com", "Graph after the 5.7.139 switch")), 1)

    def test_use_graph_from_the_lists_switches_many_servers_in_one_click(self):
        """The list views' action on a selection: each Microsoft 365 server moves to Graph and is named in the
        report; one already on Graph and one of another provider are left as they were."""
        account = self.connect(self.new_account())
        smtp = self.outgoing(account, name="Alice SMTP")
        already = self.graph_outgoing(account, name="Alice Graph")
        elsewhere = self.env["ir.mail_server"].create(
            {
                "name": "Fabrikam relay",
                "smtp_host": "smtp.fabrikam.example",
                "smtp_authentication": "login",
                "smtp_user": "odoo",
                "smtp_pass": "secret",
            }
        )
        incoming = self.incoming(account, name="Alice IMAP")
        selection = smtp | already | elsewhere
        result = (
            self.env.ref("mail_microsoft365_oauth.ir_mail_server_action_use_graph")
            .with_context(active_model="ir.mail_server", active_ids=selection.ids, active_id=smtp.id)
            .run()
        )
        self.assertEqual((smtp.microsoft365_transport, already.microsoft365_transport), ("graph", "graph"))
        self.assertEqual((elsewhere.smtp_authentication, elsewhere.smtp_host), ("login", "smtp.fabrikam.example"))
        report = result["params"]["message"]
        self.assertIn("Alice SMTP: uses Microsoft Graph with alice@contoso.com.", report)
        self.assertIn("Alice Graph: already uses Microsoft Graph.", report)
        self.assertIn("Fabrikam relay: not a Microsoft 365 server, left unchanged.", report)
        self.env.ref("mail_microsoft365_oauth.fetchmail_server_action_use_graph").with_context(
            active_model="fetchmail.server", active_ids=incoming.ids, active_id=incoming.id
        ).run()
        self.assertEqual(incoming.microsoft365_transport, "graph")
        self.send(smtp, "alice@contoso.com", "bob@contoso.com", "Graph after the switch of many")  # SMTP AUTH is off
        self.assertEqual(len(self.arrived("bob@contoso.com", "Graph after the switch of many")), 1)

    @mute_logger(*QUIET, "odoo.addons.mail.models.mail_mail")
    def test_a_queued_mail_refused_with_5_7_139_names_graph_as_the_way_out(self):
        account = self.connect(self.new_account())
        server = self.outgoing(account)  # SMTP, SMTP AUTH off for alice
        mail = self.env["mail.mail"].create(
            {
                "email_from": "alice@contoso.com",
                "email_to": "bob@contoso.com",
                "subject": "Refused by SMTP AUTH off",
                "body_html": "<p>Hello</p>",
                "mail_server_id": server.id,
            }
        )
        mail.send(raise_exception=False)
        self.assertEqual(mail.state, "exception")
        self.assertIn("SMTP AUTH is disabled", mail.failure_reason)
        self.assertIn("Use Microsoft Graph on the outgoing server", mail.failure_reason)

    @mute_logger(*QUIET)
    def test_a_token_graph_revoked_is_renewed_and_a_revoked_grant_named_as_such(self):
        """Graph refuses a cached token Microsoft revoked (continuous access evaluation): one new token and
        the mail goes; when the grant itself is revoked, the failure says reconnect, not "the token"."""
        account = self.connect(self.new_account())
        server = self.graph_outgoing(account)
        self.send(server, "alice@contoso.com", "bob@contoso.com", "Before the revocation")
        refreshes = self.sandbox.counter("token:refresh_token")
        self.sandbox.control("expire_access_tokens", subject="alice@contoso.com")
        time.sleep(1.1)  # tokens issued in the revocation's second count as revoked: the new one comes after
        self.send(server, "alice@contoso.com", "bob@contoso.com", "After the revocation")
        self.assertEqual(len(self.arrived("bob@contoso.com", "After the revocation")), 1)
        self.assertEqual(self.sandbox.counter("token:refresh_token"), refreshes + 1)

        self.sandbox.control("revoke_sessions", user="alice@contoso.com")
        self.sandbox.control("expire_access_tokens", subject="alice@contoso.com")
        with self.assertRaises(MailDeliveryException) as revoked:
            self.send(server, "alice@contoso.com", "bob@contoso.com", "After the grant was revoked")
        self.assertIn("Authorize", revoked.exception.args[1])
        self.assertNotIn("Microsoft Graph rejected the access token", revoked.exception.args[1])

    def test_graph_refusals_of_a_send_are_named_with_their_fix(self):
        account = self.connect(self.new_account())
        server = self.graph_outgoing(account)
        self.sandbox.control("settings", graph_max_message_bytes=200)
        with self.assertRaises(MailDeliveryException) as too_large:
            self.send(server, "alice@contoso.com", "bob@contoso.com", "Too large for the tenant")
        self.assertIn("larger than Microsoft 365 accepts", too_large.exception.args[1])
        self.sandbox.control("settings", graph_max_message_bytes=35 * 1024 * 1024)
        self.sandbox.control("graph_fault", kind="503", count=5, retry_after=600)
        with self.assertRaises(MailDeliveryException) as busy:
            self.send(server, "alice@contoso.com", "bob@contoso.com", "Busy")
        self.assertIn("it asked to wait 600 s", busy.exception.args[1])
        self.sandbox.control("graph_fault", kind="none")
        self.sandbox.control("mailbox_enabled", mailbox="alice@contoso.com", enabled=False)
        with self.assertRaises(MailDeliveryException) as disabled:
            self.send(server, "alice@contoso.com", "bob@contoso.com", "Disabled")
        self.assertIn("cannot open the mailbox alice@contoso.com", disabled.exception.args[1])
        for text in (too_large.exception.args[1], busy.exception.args[1], disabled.exception.args[1]):
            self.assertFalse(any(raw in text for raw in RAW), text)

    # receiving --------------------------------------------------------------------------------

    def test_unread_mail_of_the_folder_is_fetched_once_and_marked_read(self):
        account = self.connect(self.new_account())
        self.graph_incoming(account)
        self.deliver_unread("alice@contoso.com", "Graph fetch one")
        self.cron_fetch()
        self.cron_fetch()
        self.assertEqual(self.partners("Graph fetch one"), 1)
        self.assertEqual(self.sandbox.counter("mail_login:imap"), 1)  # the sign-in check only; the fetch used Graph
        self.assertEqual(self.unread(account, "Graph fetch one"), [])  # read, as IMAP shows it

    def test_messages_are_moved_to_the_chosen_folder(self):
        account = self.connect(self.new_account())
        self.graph_incoming(account, microsoft365_graph_after="move", microsoft365_graph_move_to="archive")
        self.deliver_unread("alice@contoso.com", "Graph moved")
        self.cron_fetch()
        self.assertEqual(self.partners("Graph moved"), 1)
        client = self.app_graph("alice@contoso.com")
        archived = [m for m in client.delta("archive")[0] if m["subject"] == "Graph moved"]
        self.assertEqual(len(archived), 1)

    def append_unread(self, mailbox, folder, subject):
        """An unread message put in a folder of a mailbox (made if missing) over IMAP, as the app."""
        app = f"app:{self.sandbox.app()['client_id']}"
        self.sandbox.control("grant", right="full_access", identity=app, mailbox=mailbox)
        message = email.message.EmailMessage()
        message["From"], message["To"], message["Subject"] = "someone@fabrikam.example", mailbox, subject
        message["Message-ID"] = email.utils.make_msgid(domain="fabrikam.example")
        message.set_content("Filed by a mail rule.")
        token = self.app_token()
        with self.imap() as imap:
            imap.authenticate("XOAUTH2", lambda _: f"user={mailbox}\x01auth=Bearer {token}\x01\x01")
            imap.create(folder)
            imap.append(folder, None, None, message.as_bytes())

    def test_a_folder_of_a_shared_mailbox_is_read_by_the_path_people_know(self):
        """A shared mailbox read by a delegate, from the folder a mail rule files into (Inbox/Support, as
        Outlook shows it; Graph itself takes only ids and well-known names: GRAPH-22), moved to another
        folder given the same way; the Inbox is left alone."""
        info = self.connect(self.new_account(email="info@contoso.com"), upn="alice@contoso.com")
        self.deliver_unread("info@contoso.com", "Graph left in the Inbox")
        self.append_unread("info@contoso.com", "INBOX.Support", "Graph filed in Support")
        self.append_unread("info@contoso.com", "INBOX.Done", "Graph already done")
        imap_logins = self.sandbox.counter("mail_login:imap")
        server = self.graph_incoming(
            info,
            state="draft",
            microsoft365_graph_folder="Inbox/Support",
            microsoft365_graph_after="move",
            microsoft365_graph_move_to="Inbox/Done",
        )
        server.button_confirm_login()
        self.cron_fetch()
        self.assertFalse(server.microsoft365_fetch_error)
        self.assertEqual(self.partners("Graph filed in Support"), 1)
        self.assertEqual(self.partners("Graph left in the Inbox"), 0)
        client = self.app_graph("info@contoso.com")
        done = client.find_folder("Inbox/Done")
        self.assertEqual(
            sorted(m["subject"] for m in client.delta(done)[0]), ["Graph already done", "Graph filed in Support"]
        )
        self.assertEqual(client.folder(client.find_folder("Inbox/Support"))["totalItemCount"], 0)
        self.assertEqual(self.sandbox.counter("mail_login:imap"), imap_logins)  # all through Graph
        self.clear_unread("info@contoso.com")

    @mute_logger(*QUIET)
    def test_a_message_gone_before_it_is_read_does_not_stop_the_others(self):
        """Between the list of unread mail and reading one of them, a person may delete or move it:
        Graph answers 404 for that message only, and the others are still fetched."""
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.deliver_unread("alice@contoso.com", "Graph after a vanished one")
        listed = GraphClient.unread

        def unread_with_a_vanished_message(client, *args, **kwargs):
            messages = listed(client, *args, **kwargs)
            folder, validity, uid = parse_message_id(messages[0]["id"])  # an id of this folder, gone since
            vanished = {
                "id": message_id(folder, validity, uid + 100000),
                "internetMessageId": "<gone@fabrikam.example>",
            }
            return [vanished, *messages]

        with patch.object(GraphClient, "unread", unread_with_a_vanished_message):
            self.cron_fetch()
        self.assertEqual(self.partners("Graph after a vanished one"), 1)
        self.assertFalse(server.microsoft365_fetch_error)

    def test_a_message_odoo_cannot_process_is_kept_and_listed(self):
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.deliver_unread("alice@contoso.com", "Graph poison")
        MailThread = type(self.env["mail.thread"])
        original = MailThread.message_process

        def message_process(thread, model, message, *args, **kwargs):
            if b"Subject: Graph poison" in message:
                raise ValueError("cannot route this message")
            return original(thread, model, message, *args, **kwargs)

        with patch.object(MailThread, "message_process", message_process):
            for _run in range(4):
                self.cron_fetch()
        self.assertIn("Graph poison (from someone@fabrikam.example)", server.microsoft365_failed_summary)
        self.assertEqual(len(self.unread(account, "Graph poison")), 1)  # left unread in the mailbox
        server.action_microsoft365_retry_failed_messages()
        self.cron_fetch()
        self.assertEqual(self.partners("Graph poison"), 1)
        self.assertFalse(server.microsoft365_failed_messages)

    @mute_logger(*QUIET)
    def test_a_crash_between_fetch_and_mark_processes_the_message_once(self):
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.deliver_unread("alice@contoso.com", "Graph crash")
        steps = []
        Server = type(server)
        crash = patch.object(Server, "_microsoft365_graph_done", side_effect=lambda *_a: steps.append("mark") or 1 / 0)
        with patch.object(self.env.cr, "commit", lambda: steps.append("commit")), crash:
            crashed = False
            try:  # not assertRaises: its savepoint would undo what the fetch kept
                server._microsoft365_fetch_graph()
            except ZeroDivisionError:
                crashed = True
            self.assertTrue(crashed, "the crash did not happen")
        # Kept in Odoo before the mailbox is touched: a crash can only cost a second fetch, never a message.
        self.assertEqual(steps, ["commit", "mark"])
        self.assertEqual(self.partners("Graph crash"), 1)
        self.assertEqual(len(self.unread(account, "Graph crash")), 1)  # not marked: fetched again next time
        self.cron_fetch()
        self.assertEqual(self.partners("Graph crash"), 1)  # Odoo ignored the known Message-ID
        self.assertEqual(self.unread(account, "Graph crash"), [])

    # incremental fetch (delta per folder) ------------------------------------------------------

    LISTED = "graph:GET:mailFolders/inbox/messages"  # the full unread listing
    DELTA = "graph:GET:mailFolders/inbox/messages/delta"
    MIME = "graph:GET:messages/*/$value"

    def test_new_mail_is_fetched_once_through_delta(self):
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.deliver_unread("alice@contoso.com", "Graph before delta")
        self.cron_fetch()  # the first fetch lists the unread mail and keeps the folder's delta link
        self.assertEqual(self.partners("Graph before delta"), 1)
        self.assertTrue(server.microsoft365_graph_delta_link)
        listed, deltas = self.sandbox.counter(self.LISTED), self.sandbox.counter(self.DELTA)
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Graph through delta")
        self.cron_fetch()
        self.assertEqual(self.partners("Graph through delta"), 1)
        self.assertEqual(self.sandbox.counter(self.LISTED), listed)  # no full listing: delta named it
        self.assertGreater(self.sandbox.counter(self.DELTA), deltas)
        self.assertEqual(self.unread(account, "Graph through delta"), [])
        read = self.sandbox.counter(self.MIME)
        self.cron_fetch()  # the delta round names it again (its isRead changed): read, so not read again
        self.assertEqual(self.sandbox.counter(self.MIME), read)
        self.assertEqual(self.partners("Graph through delta"), 1)

    @mute_logger(*QUIET)
    def test_a_stale_delta_link_starts_again_with_a_full_listing(self):
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.deliver_unread("alice@contoso.com", "Graph before the link expired")
        self.cron_fetch()
        stale = server.microsoft365_graph_delta_link
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Graph after the link expired")
        self.sandbox.control("graph_fault", kind="delta_expired")  # Exchange's cache dropped the sync state
        listed = self.sandbox.counter(self.LISTED)
        self.cron_fetch()
        self.assertFalse(server.microsoft365_fetch_error)
        self.assertGreater(self.sandbox.counter(self.LISTED), listed)  # recovered with a full listing
        self.assertEqual(self.partners("Graph after the link expired"), 1)
        self.assertEqual(self.partners("Graph before the link expired"), 1)  # nothing processed twice
        self.assertTrue(server.microsoft365_graph_delta_link)
        self.assertNotEqual(server.microsoft365_graph_delta_link, stale)

    @mute_logger(*QUIET)
    def test_a_crash_between_fetch_and_mark_in_a_delta_round_processes_the_message_once(self):
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.clear_unread("alice@contoso.com")
        self.cron_fetch()
        link = server.microsoft365_graph_delta_link
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Graph delta crash")
        Server = type(server)
        crash = patch.object(Server, "_microsoft365_graph_done", side_effect=ZeroDivisionError)
        with patch.object(self.env.cr, "commit", lambda: None), crash:
            crashed = False
            try:  # not assertRaises: its savepoint would undo what the fetch kept
                server._microsoft365_fetch_graph()
            except ZeroDivisionError:
                crashed = True
            self.assertTrue(crashed, "the crash did not happen")
        self.assertEqual(self.partners("Graph delta crash"), 1)
        self.assertEqual(server.microsoft365_graph_delta_link, link)  # not moved on: the round is offered again
        listed = self.sandbox.counter(self.LISTED)
        self.cron_fetch()
        self.assertEqual(self.sandbox.counter(self.LISTED), listed)  # through delta
        self.assertEqual(self.partners("Graph delta crash"), 1)  # Odoo ignored the known Message-ID
        self.assertEqual(self.unread(account, "Graph delta crash"), [])

    def test_a_failed_message_is_offered_again_on_try_again_though_delta_names_it_no_more(self):
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.deliver_unread("alice@contoso.com", "Graph poison under delta")
        MailThread = type(self.env["mail.thread"])
        original = MailThread.message_process

        def message_process(thread, model, message, *args, **kwargs):
            if b"Subject: Graph poison under delta" in message:
                raise ValueError("cannot route this message")
            return original(thread, model, message, *args, **kwargs)

        with patch.object(MailThread, "message_process", message_process):
            for _run in range(3):  # failed, retried by full listings while it waits, then given up
                self.cron_fetch()
        self.assertIn("Graph poison under delta", server.microsoft365_failed_summary)
        listed, read = self.sandbox.counter(self.LISTED), self.sandbox.counter(self.MIME)
        self.cron_fetch()  # given up: delta from now on, and the message is not read again
        self.assertEqual(self.sandbox.counter(self.LISTED), listed)
        self.assertEqual(self.sandbox.counter(self.MIME), read)
        server.action_microsoft365_retry_failed_messages()
        self.cron_fetch()
        self.assertEqual(self.partners("Graph poison under delta"), 1)
        self.assertFalse(server.microsoft365_failed_messages)
        self.assertEqual(self.unread(account, "Graph poison under delta"), [])

    def test_changing_the_folder_forgets_the_delta_link(self):
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.clear_unread("alice@contoso.com")
        self.cron_fetch()
        self.assertTrue(server.microsoft365_graph_delta_link)
        server.microsoft365_graph_folder = "archive"
        self.assertFalse(server.microsoft365_graph_delta_link)
        self.assertFalse(server.microsoft365_graph_listed_at)

    def test_messages_are_fetched_oldest_first_through_delta(self):
        account = self.connect(self.new_account())
        self.graph_incoming(account)
        self.clear_unread("alice@contoso.com")
        self.cron_fetch()
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Graph older")
        time.sleep(1.1)  # receivedDateTime has whole seconds
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Graph newer")
        self.cron_fetch()  # the sandbox's delta names the newest first, as Graph may
        older = self.env["res.partner"].search([("name", "=", "Graph older")])
        newer = self.env["res.partner"].search([("name", "=", "Graph newer")])
        self.assertTrue(older and newer)
        self.assertLess(older.id, newer.id)

    # the fetch's time budget and per-message refusals ------------------------------------------

    def test_a_fetch_stops_between_messages_when_its_time_is_up(self):
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.deliver_unread("alice@contoso.com", "Graph within the budget")
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Graph beyond the budget")
        Server = type(server)
        fetch_one = Server._microsoft365_graph_fetch_one
        clock = {"now": 0.0}

        def fetch_one_then_time_is_up(*args, **kwargs):
            outcome = fetch_one(*args, **kwargs)
            clock["now"] = 1000.0  # the mailbox's budget is spent after the first message
            return outcome

        module = "odoo.addons.mail_microsoft365_oauth.models.fetchmail_server_graph.time.monotonic"
        with (
            patch.object(self.env.cr, "commit", lambda: None),
            patch.object(Server, "_microsoft365_graph_fetch_one", fetch_one_then_time_is_up),
            patch(module, lambda: clock["now"]),
        ):
            server._microsoft365_fetch_mailbox(10.0)  # the lanes' deadline (time.monotonic())
        self.assertEqual(self.partners("Graph within the budget"), 1)
        self.assertEqual(self.partners("Graph beyond the budget"), 0)  # left for the next visit
        self.assertEqual(len(self.unread(account, "Graph beyond the budget")), 1)
        self.assertFalse(server.microsoft365_graph_delta_link)  # the round is not done: offered again
        self.cron_fetch()
        self.assertEqual(self.partners("Graph beyond the budget"), 1)

    @mute_logger(*QUIET)
    def test_a_message_graph_cannot_give_does_not_stop_the_others(self):
        """Exchange answers 500 ErrorMimeContentConversionFailed for the MIME of an opaque S/MIME message,
        every time: that message is counted as failed (then listed on the server), the others are fetched."""
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.clear_unread("alice@contoso.com")
        self.sandbox.control(
            "deliver", mailbox="alice@contoso.com", subject="Graph opaque", content_type="application/pkcs7-mime"
        )
        self.sandbox.control("deliver", mailbox="alice@contoso.com", subject="Graph readable")
        self.cron_fetch()
        self.assertEqual(self.partners("Graph readable"), 1)
        self.assertFalse(server.microsoft365_fetch_error)
        for _run in range(2):
            self.cron_fetch()
        self.assertIn("Graph opaque", server.microsoft365_failed_summary)
        self.assertIn("MIME content conversion failed", server.microsoft365_failed_summary)
        self.assertEqual(len(self.unread(account, "Graph opaque")), 1)  # left in the mailbox

    @mute_logger(*QUIET)
    def test_throttling_is_honoured_and_a_long_back_off_kept(self):
        account = self.connect(self.new_account())
        server = self.graph_incoming(account)
        self.deliver_unread("alice@contoso.com", "Graph after a short wait")
        self.sandbox.control("graph_fault", kind="429", count=1, retry_after=0)
        self.cron_fetch()
        self.assertEqual(self.partners("Graph after a short wait"), 1)
        self.assertEqual(self.sandbox.counter("graph_fault:429"), 1)
        self.deliver_unread("alice@contoso.com", "Graph after a long wait")
        self.sandbox.control("graph_fault", kind="503", count=5, retry_after=900)
        self.cron_fetch()
        self.assertEqual(self.partners("Graph after a long wait"), 0)
        self.assertIn("asked to wait 900 s", server.microsoft365_fetch_error)
        self.assertTrue(server.microsoft365_retry_at)
        self.sandbox.control("graph_fault", kind="none")
        self.cron_fetch()  # before Microsoft's time: not even asked
        self.assertEqual(self.partners("Graph after a long wait"), 0)
        server.microsoft365_retry_at = False
        self.cron_fetch()
        self.assertEqual(self.partners("Graph after a long wait"), 1)

    @mute_logger(*QUIET)
    def test_confirm_names_a_missing_folder(self):
        account = self.connect(self.new_account())
        server = self.graph_incoming(account, state="draft", microsoft365_graph_folder="AQMkbm9uZQ")
        with self.assertRaises(UserError) as refused:
            server.button_confirm_login()
        self.assertIn("did not find the folder", refused.exception.args[0])
        server.microsoft365_graph_folder = "inbox"
        server.button_confirm_login()
        self.assertEqual(server.state, "done")

    # a reply to mail sent through Graph --------------------------------------------------------

    def reply_lands_on_its_record(self, subject):
        self.clear_unread("alice@contoso.com")
        account = self.connect(self.new_account())
        self.graph_outgoing(account)
        self.graph_incoming(account, object_id=self.env.ref("base.model_res_partner").id)
        partner = self.env["res.partner"].create({"name": f"Customer {subject}", "email": "bob@contoso.com"})
        partner.message_post(
            body="Our offer",
            subject=subject,
            partner_ids=partner.ids,
            email_from="alice@contoso.com",
            message_type="comment",
            subtype_xmlid="mail.mt_comment",
        )
        self.env["mail.mail"].search([("subject", "=", subject)]).send()
        [received] = self.arrived("bob@contoso.com", subject)
        # Bob answers from his mail client, through Graph too.
        reply = email.message.EmailMessage()
        reply["From"], reply["To"], reply["Subject"] = "bob@contoso.com", "alice@contoso.com", f"Re: {subject}"
        reply["Message-ID"] = email.utils.make_msgid(domain="contoso.com")
        reply["In-Reply-To"] = received["Message-ID"]
        reply["References"] = f"{received['References'] or ''} {received['Message-ID']}".strip()
        reply.set_content("Yes please.")
        self.app_graph("bob@contoso.com").send_mime(reply.as_bytes())
        self.cron_fetch()
        replies = partner.message_ids.filtered(lambda m: m.subject == f"Re: {subject}")
        self.assertEqual(len(replies), 1, "the reply did not land on the partner")
        return received

    def test_a_reply_to_mail_sent_through_graph_lands_on_its_record(self):
        received = self.reply_lands_on_its_record("Graph offer")
        self.assertTrue(received["Message-ID"].endswith("@contoso.com>") or "@" in received["Message-ID"])

    def test_the_reply_lands_even_when_graph_replaces_the_message_id(self):
        self.sandbox.control("settings", graph_replace_message_id=True)
        received = self.reply_lands_on_its_record("Graph offer renamed")
        self.assertIn("SANDBOX.PROD.OUTLOOK.COM", received["Message-ID"])  # not Odoo's any more

    # app-only ---------------------------------------------------------------------------------

    @mute_logger(*QUIET)
    def test_app_only_scoping_missing_or_excluding_the_mailbox_is_explained(self):
        self.app_registration.write({"flow": "app_only"})
        account = self.new_account(email="info@contoso.com")
        server = self.graph_incoming(account)
        result = account.action_test_connection()
        self.assertEqual(result["params"]["type"], "success")
        message = result["params"]["message"]
        self.assertIn("EVERY mailbox of the organisation", message)
        self.assertIn('New-ManagementScope -Name "Odoo mailboxes"', message)
        client_id = self.sandbox.app()["client_id"]
        self.deliver_unread("info@contoso.com", "Outside the scope")
        self.sandbox.control("graph_app_scope", client_id=client_id, mailboxes=["sales@contoso.com"])
        self.cron_fetch()
        self.assertIn("does not include info@contoso.com", server.microsoft365_fetch_error)
        self.assertIn(
            f'New-ManagementRoleAssignment -App {client_id} -Role "Application Mail.ReadWrite"',
            server.microsoft365_fetch_error,
        )
        self.sandbox.control("graph_app_scope", client_id=client_id, mailboxes=["info@contoso.com"])
        self.cron_fetch()
        self.assertEqual(self.partners("Outside the scope"), 1)


@tagged("post_install", "-at_install")
class TestGraphConsent(FetchCase):
    """The Graph token is the second resource of the account's cache; where the consent does not cover
    Graph, Use Microsoft Graph sends the person to Authorize once, for Graph's scopes."""

    @mute_logger(*QUIET)
    def test_without_graph_consent_use_graph_asks_once_for_the_graph_scopes(self):
        tenant = self.sandbox.tenant()["id"]
        self.sandbox.control("consent", client_id=self.app_registration.client_id, tenant=tenant, graph=False)
        account = self.connect(self.new_account())
        server = self.outgoing(account)
        action = server.action_microsoft365_use_graph()
        self.assertEqual(server.microsoft365_transport, "graph")
        self.assertEqual(action["type"], "ir.actions.act_url")  # straight on to Microsoft's sign-in
        self.assertIn("graph.microsoft.com%2FMail.Send", action["url"])
        self.assertNotIn("SMTP.Send", action["url"])
        state = dict(parse_qsl(urlsplit(action["url"]).query))["state"]
        taken, flow = self.env["microsoft365.authorization"]._take(state, self.env.user)
        for key in ("odoo_origin", "odoo_confirm_servers"):
            flow.pop(key)
        client = account.app_id._identity_client()
        sign_in = client.finish_sign_in(flow, self.sandbox.sign_in(action["url"], "alice@contoso.com"))
        taken._store_sign_in(client, sign_in)  # checked through Graph: SMTP AUTH may be off
        self.assertEqual(taken, account)
        self.assertEqual(account.status, "connected")
        self.assertTrue(server._microsoft365_graph_ready())
        message = server.build_email("alice@contoso.com", ["bob@contoso.com"], "Graph after consent", "Hello")
        server.send_email(message, mail_server_id=server.id)
        self.assertEqual(self.sandbox.counter("graph_sendmail"), 1)


@tagged("post_install", "-at_install")
class TestGraphRefreshStatus(FetchCase):
    def test_a_graph_refresh_that_works_again_marks_the_account_connected(self):
        """A mailbox that only uses Microsoft Graph: once Microsoft gives a Graph token again, the account
        is no longer "Not working" (its health check and keep-alive only look after connected accounts)."""
        self.sandbox.control("settings", access_token_lifetime=120)  # stale for the addon at once: refreshed
        account = self.connect(self.new_account())
        self.graph_server = self.incoming(account, microsoft365_transport="graph")
        account.write({"status": "failing", "last_error": "Microsoft refused the request (the cause is fixed now)."})
        self.assertTrue(account._graph_token())
        account.invalidate_recordset()
        self.assertEqual((account.status, account.last_error), ("connected", False))
