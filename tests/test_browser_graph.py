from odoo.tests import tagged

from ..m365.graph import GraphClient
from ..m365.identity import http_session
from .common import BrowserCase


@tagged("post_install", "-at_install")
class TestBrowserGraph(BrowserCase):
    """An administrator whose organisation switched SMTP AUTH off: Test connection meets 5.7.139, offers
    Use Microsoft Graph on the spot, one click switches the server, and mail is sent through Graph."""

    def test_a_5_7_139_server_is_switched_to_graph_from_the_error_and_sends(self):
        self.app_registration.flow = "app_only"
        account = self.new_account(email="info@contoso.com")
        server = self.outgoing(account, name="Info (SMTP AUTH off)")
        self.sandbox.control("smtp_auth", mailbox="info@contoso.com", enabled=False)
        self.env.flush_all()
        browser = self.open_browser()
        self.log_in()
        browser.open(f"{self.base_url()}/odoo/action-base.action_ir_mail_server_list/{server.id}")
        browser.click("button[name=test_smtp_connection]")
        browser.wait_for(".modal-dialog", "SMTP AUTH is disabled for this mailbox")
        browser.screenshot("graph-1-5.7.139-offers-graph")
        browser.click(".modal-footer button", "Use Microsoft Graph")
        browser.wait_for(".o_notification", "uses Microsoft Graph with info@contoso.com")
        browser.wait_for("div[name=microsoft365_transport] input[data-value=graph]:checked")
        browser.screenshot("graph-2-switched")
        browser.click("button[name=test_smtp_connection]")
        browser.wait_for(".o_notification", "Microsoft Graph accepts the token to send")

        with self.browser_requests_held():
            self.assertEqual(server.microsoft365_transport, "graph")
            mail = self.env["mail.mail"].create(
                {
                    "email_from": "info@contoso.com",
                    "email_to": "bob@contoso.com",
                    "subject": "Sent after the switch in the browser",
                    "body_html": "<p>Hello</p>",
                    "mail_server_id": server.id,
                }
            )
            mail.send()
            self.assertEqual(mail.state, "sent", mail.failure_reason)
            self.assertEqual(self.sandbox.counter("graph_sendmail"), 1)
            # Read at bob's: other tests fetch bob's mailbox and count on the unread mail they deliver.
            bob = GraphClient(
                self.sandbox.description["graph_url"],
                self.app_registration._app_graph_token().token,
                "bob@contoso.com",
                session=http_session(self.sandbox.ca_file),
            )
            sent = [m for m in bob.unread("inbox") if m.get("subject") == "Sent after the switch in the browser"]
            self.assertEqual(len(sent), 1)
            bob.mark_read(sent[0]["id"])
