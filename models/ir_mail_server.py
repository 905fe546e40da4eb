import email.utils
import logging
import smtplib

from odoo import api, fields, http, models
from odoo.exceptions import RedirectWarning, UserError, ValidationError
from odoo.tools import formataddr

from odoo.addons.base.models.ir_mail_server import MailDeliveryException, extract_rfc2822_addresses

from ..m365.diagnosis import diagnose_smtp
from ..m365.errors import M365Error, TransientFailure
from ..m365.graph import send_on_behalf_denied
from ..m365.mailcheck import smtp_authenticate
from .microsoft365_account import Microsoft365Unavailable, explain

_logger = logging.getLogger(__name__)


class GraphSession:
    """What Odoo's mail queue holds between connect() and send_email() for a server that sends through
    Microsoft Graph: no SMTP connection, only what _prepare_email_message reads."""

    def __init__(self, server, smtp_from):
        self._microsoft365_server_id = server.id
        self.from_filter = server.from_filter
        self.smtp_from = smtp_from

    def quit(self):
        pass

    close = quit


# Context key of Odoo's mail queue (mail.mail.send/_send): the set of Message-Ids of the mails Microsoft 365
# refused only for now, which the queue keeps queued for its next run instead of failing them.
LATER = "microsoft365_later"


class MailDeliveryLater(MailDeliveryException):
    """Microsoft refused this send only for now: the mail queue keeps the mail for its next run."""


class LaterSession:
    """What connect() hands Odoo's mail queue when Microsoft's sign-in service is away for now (no token):
    every mail of the batch is then refused for now, keeps its place in the queue and shows the reason."""

    def __init__(self, reason):
        self.reason = reason

    def quit(self):
        pass

    close = quit


class IrMailServer(models.Model):
    _name = "ir.mail_server"
    _inherit = ["ir.mail_server", "microsoft365.server.mixin"]

    smtp_authentication = fields.Selection(
        selection_add=[("microsoft365", "Microsoft 365 (OAuth)")], ondelete={"microsoft365": "set default"}
    )

    microsoft365_send_on_behalf = fields.Boolean(
        string="Send on behalf",
        help="For a shared mailbox signed in by a user: mail goes From the shared mailbox with the signed-in user as "
        'Sender (recipients see "<user> on behalf of <shared mailbox>"). Needs Send on Behalf in Exchange Online '
        '(Set-Mailbox -Identity <shared mailbox> -GrantSendOnBehalfTo @{Add="<user>"}) instead of Send As.',
    )

    _microsoft365_link_fields = {"smtp_authentication", "smtp_user", "from_filter", "microsoft365_account_id"}

    def _microsoft365_in_use(self):
        return self.smtp_authentication == "microsoft365"

    def _microsoft365_mailbox(self):
        return self.smtp_user or (self.from_filter if self.from_filter and "@" in self.from_filter else False)

    def _microsoft365_host(self):
        return self.smtp_host

    def _microsoft365_switch_values(self):
        return {"smtp_authentication": "microsoft365", "smtp_encryption": "starttls"}

    def _microsoft365_clear_password(self):
        self.smtp_pass = False

    def _microsoft365_has_password(self):
        return bool(self.smtp_pass)

    @api.constrains("smtp_authentication", "smtp_encryption")
    def _check_microsoft365_connection(self):
        for server in self.filtered(lambda s: s._microsoft365_in_use()):
            if server.smtp_encryption == "none":
                raise ValidationError(
                    self.env._(
                        "Outgoing server %s signs in with Microsoft 365 OAuth: choose TLS (STARTTLS) or SSL/TLS "
                        "as its connection encryption.",
                        server.display_name,
                    )
                )

    def test_smtp_connection(self, autodetect_max_email_size=False):
        graph = self.filtered(lambda s: s._microsoft365_in_use() and s.microsoft365_transport == "graph")
        for server in graph:
            server._microsoft365_test_graph()
        if not self - graph:
            graph._microsoft365_after_successful_test()
            message = self.env._("Connection Test Successful! Microsoft Graph accepts the token to send.")
            for server in graph:
                message += server._microsoft365_delegate_note()
            return {
                "type": "ir.actions.client",
                "tag": "display_notification",
                "params": {
                    "message": message,
                    "type": "success",
                    "sticky": False,
                    "next": {"type": "ir.actions.act_window_close"},
                },
            }
        try:
            result = super(IrMailServer, self - graph).test_smtp_connection(
                autodetect_max_email_size=autodetect_max_email_size
            )
        except UserError as exc:
            offer = self._microsoft365_offer_graph(exc)
            if offer:
                raise offer from None
            raise
        self._microsoft365_after_successful_test()  # only reached when the test succeeded
        return result

    def _microsoft365_offer_graph(self, exc):
        """SMTP AUTH switched off (5.7.139): the error offers Use Microsoft Graph on the spot."""
        text = exc.args[0] if exc.args else ""
        # Only the form's Test Connection button asks for it (a RedirectWarning is no UserError: other callers,
        # such as the connect wizard's confirmation, keep receiving the UserError they handle).
        if not self._microsoft365_test_button() or "5.7.139" not in text or len(self) != 1:
            return None
        if not (self.microsoft365_switchable or self._microsoft365_in_use()):
            return None
        action = self.env.ref("mail_microsoft365_oauth.ir_mail_server_action_use_graph", raise_if_not_found=False)
        if not action:
            return None
        message = (
            text
            + "\n\n"
            + self.env._(
                "Your organisation may have switched SMTP AUTH off on purpose: Odoo can send through Microsoft Graph "
                "instead, with the same OAuth account (no SMTP AUTH needed)."
            )
        )
        return RedirectWarning(
            message,
            action.id,
            self.env._("Use Microsoft Graph"),
            {"active_id": self.id, "active_ids": self.ids, "active_model": self._name},
        )

    def _microsoft365_test_button(self):
        """True when the web client's Test Connection button of a mail server made this call (the stock button,
        left untouched: core's JavaScript posts it to /web/dataset/call_button/ir.mail_server/
        test_smtp_connection), or when the caller asks with the context key microsoft365_offer_graph."""
        if self.env.context.get("microsoft365_offer_graph"):
            return True
        if not http.request or not http.request.httprequest.path.startswith("/web/dataset/call_button"):
            return False
        try:
            params = (http.request.get_json_data() or {}).get("params") or {}
        except ValueError:
            return False
        return params.get("model") == self._name and params.get("method") == "test_smtp_connection"

    def _microsoft365_delegate_note(self):
        """For a shared mailbox signed in by a user: what Exchange checks only at the first send, and the grant
        it needs (Send on Behalf or Send As, as the server sends); empty for a mailbox that sends as itself."""
        self.ensure_one()
        account = self.microsoft365_account_id.sudo()
        login = account._smtp_login_user() if account else False
        if not login or login == account.email:
            return ""
        if self.microsoft365_send_on_behalf:
            return "\n" + self.env._(
                "Nothing was sent: Exchange checks that %(login)s may send on behalf of %(mailbox)s at the first send "
                "only. If that send is refused, grant it in Exchange Online PowerShell: "
                'Set-Mailbox -Identity "%(mailbox)s" -GrantSendOnBehalfTo @{Add="%(login)s"}',
                login=login,
                mailbox=account.email,
            )
        return "\n" + self.env._(
            "Nothing was sent: Exchange checks Send As for %(mailbox)s at the first send only. If that send is "
            'refused, grant it in Exchange Online PowerShell: Add-RecipientPermission -Identity "%(mailbox)s" '
            '-Trustee "%(login)s" -AccessRights SendAs (or, to send on behalf of it, tick Send on behalf and run '
            'Set-Mailbox -Identity "%(mailbox)s" -GrantSendOnBehalfTo @{Add="%(login)s"})',
            login=login,
            mailbox=account.email,
        )

    def _microsoft365_test_graph(self):
        """Test connection through Microsoft Graph: a token for the mailbox, the mailbox reachable, the
        permission to send in the token; nothing is sent."""
        self.ensure_one()
        account = self._microsoft365_account().sudo()
        token = account._graph_token_for_use()
        failures = [
            found
            for _protocol, _host, _port, found in account._graph_failures(token)
            # A send-only app (Mail.Send without Mail.ReadWrite) cannot open the folder; it can still send.
            if found.code not in ("GRAPH PERMISSION", "GRAPH APP PERMISSION") or found.params.get("action") == "send"
        ]
        if failures:
            raise UserError(
                self.env._("Connection test failed for %(mailbox)s.", mailbox=account.email)
                + "\n\n"
                + "\n\n".join(explain(self.env, found) for found in failures)
            )

    def _microsoft365_graph_server(self, mail_server_id=None, host=None, smtp_from=None):
        """(server, smtp_from): the server of ours that sends through Microsoft Graph for this connect/send, if
        any, and the envelope sender core's connect() would use with it: picked by its FROM filter, core's
        _find_mail_server may hand back the notification address instead of an address no server may send."""
        if mail_server_id:
            server = self.sudo().browse(mail_server_id).exists()
        elif not host and smtp_from:
            server, smtp_from = self.sudo()._find_mail_server(smtp_from)
        else:
            server = self.browse()
        if server and server._microsoft365_in_use() and server.microsoft365_transport == "graph":
            return server, smtp_from
        return self.browse(), smtp_from

    def connect(
        self,
        host=None,
        port=None,
        user=None,
        password=None,
        encryption=None,
        smtp_from=None,
        ssl_certificate=None,
        ssl_private_key=None,
        smtp_debug=False,
        mail_server_id=None,
        allow_archived=False,
    ):
        server, graph_from = self._microsoft365_graph_server(mail_server_id, host, smtp_from)
        if not server:
            try:
                return super().connect(
                    host=host,
                    port=port,
                    user=user,
                    password=password,
                    encryption=encryption,
                    smtp_from=smtp_from,
                    ssl_certificate=ssl_certificate,
                    ssl_private_key=ssl_private_key,
                    smtp_debug=smtp_debug,
                    mail_server_id=mail_server_id,
                    allow_archived=allow_archived,
                )
            except Microsoft365Unavailable as exc:
                if self.env.context.get(LATER) is None:  # Test Connection and other callers: the error
                    raise
                return LaterSession(exc.args[0])
        if not allow_archived and not server.active:
            raise UserError(self.env._('The server "%s" cannot be used because it is archived.', server.display_name))
        return GraphSession(server, graph_from)

    def _microsoft365_link_accounts(self, changed=None):
        result = super()._microsoft365_link_accounts(changed)
        # Odoo logs in only when a username is set: the mailbox is the username.
        for server in self.filtered(lambda s: s._microsoft365_in_use() and not s.smtp_user):
            server.smtp_user = server.microsoft365_account_id.email
        return result

    def _microsoft365_default_from_filter(self):
        # Without a FROM filter the server would take every mail, and Exchange refuses to send as
        # anyone but the mailbox (SendAsDenied): as the connect wizard does, send as the mailbox.
        for server in self.filtered(lambda s: s._microsoft365_in_use() and not s.from_filter):
            server.from_filter = server.microsoft365_account_id.email

    def _compute_smtp_authentication_info(self):
        ours = self.filtered(lambda s: s.smtp_authentication == "microsoft365")
        ours.smtp_authentication_info = self.env._(
            "Odoo signs in to Microsoft 365 with OAuth 2.0 (XOAUTH2): no password is stored."
        )
        return super(IrMailServer, self - ours)._compute_smtp_authentication_info()

    @api.onchange("smtp_authentication", "microsoft365_account_id")
    def _onchange_smtp_authentication_microsoft365(self):
        if self.smtp_authentication != "microsoft365":
            return
        if not self.microsoft365_account_id and self.smtp_user:
            self.microsoft365_account_id = self._microsoft365_account_for(self.smtp_user)
        cloud = self._microsoft365_cloud_for(self.microsoft365_account_id)
        if cloud:
            self.smtp_host = cloud.smtp_host
            self.smtp_port = cloud.smtp_port
        self.smtp_encryption = "starttls"
        if self.microsoft365_account_id:
            self.smtp_user = self.microsoft365_account_id.email
            if not self.from_filter:
                self.from_filter = self.microsoft365_account_id.email
        # A password is kept (hidden) until the first successful test: see _microsoft365_sync_password.

    def _microsoft365_onchange_connection(self):
        self._onchange_smtp_authentication_microsoft365()

    @api.onchange("smtp_encryption")
    def _onchange_encryption(self):
        # Odoo resets the port when the encryption changes; Microsoft's port is set above.
        if self.smtp_authentication != "microsoft365":
            return super()._onchange_encryption()

    @api.model_create_multi
    def create(self, vals_list):
        servers = super().create(vals_list)
        servers._microsoft365_link_accounts()
        servers._microsoft365_default_from_filter()
        servers._microsoft365_sync_password()
        return servers

    def write(self, vals):
        result = super().write(vals)
        self._microsoft365_link_accounts(changed=vals)
        if {"smtp_authentication", "microsoft365_account_id"} & set(vals):
            self._microsoft365_default_from_filter()
        self._microsoft365_sync_password()
        return result

    @api.model
    def send_email(self, message, *args, **kwargs):
        session = kwargs.get("smtp_session")
        mail_server_id = kwargs.get("mail_server_id", args[0] if args else None)
        if isinstance(session, LaterSession):
            self._microsoft365_later(message, session.reason)
        if isinstance(session, GraphSession):
            return self._microsoft365_send_graph(message, self.sudo().browse(session._microsoft365_server_id), session)
        if session is None and not kwargs.get("smtp_server") and not args[1:2]:
            server, smtp_from = self._microsoft365_graph_server(mail_server_id, None, message["From"])
            if server:
                return self._microsoft365_send_graph(message, server, GraphSession(server, smtp_from))
        try:
            return super().send_email(message, *args, **kwargs)
        except MailDeliveryException as exc:
            # Exchange refuses some sends only at the end of the message (Send As, too many
            # connections): say what to do about it, quoting Exchange's own reply.
            refusal = exc.__context__
            server = self._microsoft365_sending_server(kwargs.get("mail_server_id", args[0] if args else None), kwargs)
            if not server or not isinstance(refusal, smtplib.SMTPResponseException):
                raise
            account = server.sudo()._microsoft365_account()
            found = diagnose_smtp(
                refusal.smtp_code,
                refusal.smtp_error,
                mailbox=account._smtp_login_user(),
                login=account._smtp_login_user(),
                sender=email.utils.parseaddr(str(message["From"] or ""))[1] or account.email,
                trustee=account._send_as_trustee(),
            )
            if found.code not in ("SMTP SendAsDenied", "SMTP 5.7.139", "SMTP 4.3.2"):
                raise
            if found.code == "SMTP SendAsDenied" and server.microsoft365_send_on_behalf:
                found = send_on_behalf_denied(found.detail, **found.params)
            text = explain(self.env, found)
            if found.code == "SMTP 4.3.2":  # too many connections at once: Exchange asks to come back later
                self._microsoft365_later(message, text, exc.args[0])
            if found.code == "SMTP 5.7.139":
                text += "\n" + self._microsoft365_graph_hint()
            raise MailDeliveryException(exc.args[0], text) from exc

    def _microsoft365_later(self, message, reason, title=None):
        """Refuse this send for now (Microsoft asked to come back later, or no token could be had): Odoo's mail
        queue keeps the mail queued with `reason` shown and sends it at its next run (mail.mail._send); any
        other caller gets the MailDeliveryException as for any refusal. SMTP and Graph both call this."""
        later = self.env.context.get(LATER)
        if later is not None and message["Message-Id"]:
            later.add(str(message["Message-Id"]))
        raise MailDeliveryLater(title or self.env._("Mail Delivery Failed"), reason)

    def _microsoft365_graph_hint(self):
        return self.env._(
            "Or send through Microsoft Graph instead (no SMTP AUTH needed): Use Microsoft Graph on the outgoing "
            "server, or the action of the same name in the list of outgoing servers for many at once."
        )

    def _microsoft365_send_graph(self, message, server, session):
        """Post the message Odoo built, as MIME, to the mailbox's sendMail; Microsoft sends it."""
        _smtp_from, smtp_to_list, message = self._prepare_email_message(message, session)
        # Graph reads the recipients from the message: Bcc (removed by Odoo for SMTP) goes back in; Exchange
        # keeps it from the copies it delivers.
        shown = set(extract_rfc2822_addresses(", ".join(str(message[h] or "") for h in ("To", "Cc"))))
        hidden = [address for address in smtp_to_list if address not in shown]
        if hidden:
            message["Bcc"] = ", ".join(hidden)
        # Replies route in Odoo by In-Reply-To / References: should Graph give the message a Message-ID of its
        # own (CONFORMANCE GRAPH-07), its own one in References still leads the reply to the record.
        message_id = message["Message-Id"]
        references = str(message["References"] or "")
        if message_id and message_id not in references:
            del message["References"]
            message["References"] = f"{references} {message_id}".strip()
        account = server._microsoft365_account().sudo()
        try:
            client = account._graph_client(account._graph_token(), on_behalf=server.microsoft365_send_on_behalf)
            client.send_mime(message.as_bytes())
        except M365Error as exc:
            found = getattr(exc, "diagnosis", None)
            text = explain(self.env, found) if found else str(exc)
            if isinstance(exc, TransientFailure):  # no token for now: nothing was sent, the queue keeps the mail
                self._microsoft365_later(message, text)
            _logger.info("Microsoft Graph refused a message of server %s: %s", server.name, found and found.code)
            raise MailDeliveryException(self.env._("Mail Delivery Failed"), text) from None
        except UserError as exc:
            raise MailDeliveryException(self.env._("Mail Delivery Failed"), exc.args[0]) from None
        return message_id

    def _microsoft365_sending_server(self, mail_server_id, kwargs):
        """The Microsoft 365 server a send went through, when it is one of ours."""
        session = kwargs.get("smtp_session")
        tagged = getattr(getattr(session, "__obj__", session), "_microsoft365_server_id", None)
        server = self.browse(mail_server_id or tagged) if (mail_server_id or tagged) else self
        server = server.exists() if len(server) == 1 else self.browse()
        return server if server and server._microsoft365_in_use() else self.browse()

    def _prepare_email_message(self, message, smtp_session):
        smtp_from, smtp_to_list, message = super()._prepare_email_message(message, smtp_session)
        # "Name displayed": mail From a Microsoft 365 mailbox's own address without a name gets the
        # mailbox's name; a From that names someone (a user, the company) is left as it is.
        name, address = email.utils.parseaddr(message["From"] or "")
        if address and not name:
            account = (
                self.env["microsoft365.account"]
                .sudo()
                .search(
                    [
                        ("email", "=", address.strip().lower()),
                        ("sender_name", "!=", False),
                        ("outgoing_server_ids", "!=", False),
                    ],
                    limit=1,
                )
            )
            if account:
                del message["From"]
                message["From"] = formataddr((account.sender_name, account.email))
        self._microsoft365_set_sender(message, smtp_session)
        return smtp_from, smtp_to_list, message

    def _microsoft365_set_sender(self, message, smtp_session):
        """Send on behalf: From the shared mailbox, Sender the signed-in user (GRAPH-19)."""
        tagged = getattr(getattr(smtp_session, "__obj__", smtp_session), "_microsoft365_server_id", None)
        server = self.sudo().browse(tagged).exists() if tagged else self.browse()
        if not server or not server.microsoft365_send_on_behalf or not server._microsoft365_in_use():
            return
        account = server.microsoft365_account_id
        login = account._smtp_login_user() if account and account.app_id.flow != "app_only" else False
        if login and email.utils.parseaddr(message["From"] or "")[1].lower() != login.lower():
            del message["Sender"]
            message["Sender"] = login

    def _smtp_login(self, connection, smtp_user, smtp_password):
        # Odoo calls this on an empty recordset when no server record is involved.
        if len(self) != 1 or not self._microsoft365_in_use():
            return super()._smtp_login(connection, smtp_user, smtp_password)
        account = self._microsoft365_account().sudo()
        # Odoo's SMTPConnection wrapper exposes only some of smtplib's attributes.
        raw = getattr(connection, "__obj__", connection)
        try:
            token = self._microsoft365_token()
        except UserError:
            raw.close()  # Odoo's connect() leaves a failed login's connection open
            raise
        try:
            # Exchange's SMTP AUTH takes only the signed-in user; a shared address is the From.
            smtp_authenticate(raw, account._smtp_login_user(), token)
        except M365Error as exc:
            text = account._explain_mail_refusal(exc.diagnosis, token)
            if exc.diagnosis.code == "SMTP 5.7.139":  # SMTP AUTH switched off: Graph needs none
                text += "\n" + self._microsoft365_graph_hint()
            raise UserError(text) from None
        raw._microsoft365_server_id = self.id  # send_email explains Exchange's refusals of this session
