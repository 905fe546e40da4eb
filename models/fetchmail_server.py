import email
import email.policy
import hashlib
import logging
from datetime import datetime, timedelta
from imaplib import IMAP4

from odoo import api, fields, models
from odoo.exceptions import UserError, ValidationError

from odoo.addons.mail.models.fetchmail import POP3Connection

from ..m365.diagnosis import diagnose_connection
from ..m365.errors import M365Error
from ..m365.mailcheck import imap_authenticate, pop3_authenticate
from .microsoft365_account import explain

_logger = logging.getLogger(__name__)

MAX_PROCESSING_ATTEMPTS = 3
FAILED_KEYWORD = "OdooFailed"


class FetchmailServer(models.Model):
    _name = "fetchmail.server"
    _inherit = ["fetchmail.server", "microsoft365.server.mixin"]

    connect_with = fields.Selection(
        [("password", "Password"), ("microsoft365", "Microsoft 365 (OAuth)")],
        string="Connect with",
        default="password",
        required=True,
        help="Password: Odoo's usual login. Microsoft 365: OAuth 2.0 (XOAUTH2) with the mailbox's OAuth "
        "account; no password is stored.",
    )

    microsoft365_fetch_error = fields.Text(string="Last fetch error", readonly=True, copy=False)
    microsoft365_fetch_failed_at = fields.Datetime(string="Last fetch failed on", readonly=True, copy=False)
    microsoft365_failed_messages = fields.Json(
        readonly=True,
        copy=False,
        help="Messages Odoo could not process: Message-ID -> failures, subject, sender, last error.",
    )
    microsoft365_failed_summary = fields.Text(
        string="Messages left on the server", compute="_compute_microsoft365_failed_summary"
    )
    microsoft365_retry_at = fields.Datetime(
        string="Throttled until",
        readonly=True,
        copy=False,
        help="Microsoft asked Odoo to back off: no connection is attempted before this time.",
    )

    @api.depends("microsoft365_failed_messages")
    def _compute_microsoft365_failed_summary(self):
        for server in self:
            given_up = [
                entry
                for entry in (server.microsoft365_failed_messages or {}).values()
                if entry["failures"] >= MAX_PROCESSING_ATTEMPTS
            ]
            server.microsoft365_failed_summary = (
                "\n".join(
                    self.env._(
                        "%(subject)s (from %(sender)s): %(error)s",
                        subject=entry["subject"],
                        sender=entry["sender"],
                        error=entry["error"],
                    )
                    for entry in given_up
                )
                or False
            )

    _microsoft365_link_fields = {"connect_with", "user", "microsoft365_account_id"}

    def _microsoft365_in_use(self):
        return self.connect_with == "microsoft365"

    def _microsoft365_mailbox(self):
        return self.user

    def _microsoft365_host(self):
        return self.server

    def _microsoft365_switch_values(self):
        values = {"connect_with": "microsoft365", "is_ssl": True}
        if self.server_type not in ("imap", "pop"):
            values["server_type"] = "imap"
        return values

    def _microsoft365_clear_password(self):
        self.password = False

    @api.onchange("connect_with", "microsoft365_account_id", "server_type")
    def _onchange_connect_with_microsoft365(self):
        if self.connect_with != "microsoft365":
            return
        if not self.microsoft365_account_id and self.user:
            self.microsoft365_account_id = self._microsoft365_account_for(self.user)
        cloud = self._microsoft365_cloud_for(self.microsoft365_account_id)
        if self.server_type not in ("imap", "pop"):
            self.server_type = "imap"
        if cloud:
            self.server = cloud.pop_host if self.server_type == "pop" else cloud.imap_host
            self.port = cloud.pop_port if self.server_type == "pop" else cloud.imap_port
        self.is_ssl = True
        if self.microsoft365_account_id:
            self.user = self.microsoft365_account_id.email
        self.password = False

    def _microsoft365_onchange_connection(self):
        self._onchange_connect_with_microsoft365()

    @api.onchange("server_type", "is_ssl", "object_id")
    def onchange_server_type(self):
        # Odoo resets the port to 993/995 here; a Microsoft 365 server keeps its cloud's port.
        result = super().onchange_server_type()
        if self.connect_with == "microsoft365":
            self._onchange_connect_with_microsoft365()
        return result

    @api.model_create_multi
    def create(self, vals_list):
        servers = super().create(vals_list)
        servers._microsoft365_link_accounts()
        return servers

    def write(self, vals):
        result = super().write(vals)
        self._microsoft365_link_accounts(changed=vals)
        return result

    def _imap_login(self, connection):
        self.ensure_one()
        if not self._microsoft365_in_use():
            return super()._imap_login(connection)
        imap_authenticate(connection, self._microsoft365_account().email, self._microsoft365_token())

    def connect(self, allow_archived=False):
        self.ensure_one()
        if not self._microsoft365_in_use():
            return super().connect(allow_archived=allow_archived)
        if self.microsoft365_retry_at and self.microsoft365_retry_at > fields.Datetime.now():
            raise UserError(
                self.env._(
                    "Microsoft 365 is throttling this mailbox: Odoo waits until %s before it connects again.",
                    fields.Datetime.to_string(self.microsoft365_retry_at),
                )
            )
        try:
            try:
                if self._get_connection_type() == "pop":
                    connection = self._microsoft365_connect_pop3(allow_archived)
                else:
                    connection = super().connect(allow_archived=allow_archived)
            except M365Error as exc:
                self._microsoft365_honour_backoff(exc.diagnosis)
                raise UserError(explain(self.env, exc.diagnosis)) from None
        except Exception as exc:
            # Kept for the health check: in the cron, fetchmail logs the error and goes on.
            self.write(
                {
                    "microsoft365_fetch_error": exc.args[0] if isinstance(exc, UserError) else str(exc),
                    "microsoft365_fetch_failed_at": fields.Datetime.now(),
                }
            )
            raise
        if self.microsoft365_fetch_error:
            self.write({"microsoft365_fetch_error": False, "microsoft365_fetch_failed_at": False})
        return connection

    def _microsoft365_connect_pop3(self, allow_archived):
        # Odoo's POP branch logs in with USER/PASS and offers no hook.
        if not allow_archived and not self.active:
            raise UserError(self.env._('The server "%s" cannot be used because it is archived.', self.display_name))
        connection = POP3Connection(self.server, int(self.port), self.is_ssl)
        try:
            # Odoo's wrapper exposes only POP3's public commands; SASL needs the raw client.
            pop3_authenticate(connection.__obj__, self._microsoft365_account().email, self._microsoft365_token())
        except M365Error:
            connection.close()
            raise
        return connection

    def _microsoft365_honour_backoff(self, found):
        backoff_ms = found.params.get("backoff_ms") if found else None
        if backoff_ms:
            # Datetime fields keep whole seconds: round up, never connect before Microsoft's time.
            retry_at = datetime.now() + timedelta(milliseconds=backoff_ms)
            self.microsoft365_retry_at = retry_at.replace(microsecond=0) + timedelta(seconds=bool(retry_at.microsecond))

    def fetch_mail(self, raise_exception=True):
        """IMAP servers of this addon fetch with a safety net: Odoo's own loop marks a message read
        even when processing it failed, so it is never fetched again. Here a failed message stays
        unread and is retried by the next fetches; after a few failures it is left on the server
        with the keyword OdooFailed, listed on the server, and no longer blocks the others."""
        servers = self - self._microsoft365_without_grant(raise_exception)
        ours = servers.filtered(lambda s: s._microsoft365_in_use() and s._get_connection_type() == "imap")
        for server in ours:
            try:
                server._microsoft365_fetch_imap()
            except Exception as exc:
                if raise_exception:
                    raise ValidationError(
                        self.env._(
                            "Couldn't get your emails. Check out the error message below for more info:\n%s",
                            exc.args[0] if exc.args else exc,
                        )
                    ) from exc
                _logger.info(
                    "General failure when trying to fetch mail from %s server %s.",
                    server.server_type,
                    server.name,
                    exc_info=True,
                )
        return super(FetchmailServer, servers - ours).fetch_mail(raise_exception=raise_exception)

    def _microsoft365_without_grant(self, raise_exception):
        """Servers whose mailbox has no usable sign-in: nothing to connect with. Said in plain words
        on the server and in one log line (no traceback), or raised for Fetch Now."""
        blocked = self.filtered(
            lambda s: s._microsoft365_in_use()
            and (not s.microsoft365_account_id or s.microsoft365_account_id.status in ("not_connected", "reconnect"))
        )
        for server in blocked:
            account = server.microsoft365_account_id
            if not account:
                message = self.env._("Choose the OAuth account of server %s.", server.display_name)
            else:
                message = self.env._(
                    "The mailbox %(mailbox)s is not connected to Microsoft 365 (%(status)s): click Authorize on it, "
                    "then confirm this server again.",
                    mailbox=account.email,
                    status=dict(account._fields["status"]._description_selection(self.env))[account.status],
                )
                if account.status == "reconnect" and account.last_error:
                    message += "\n" + account.last_error
            if raise_exception:
                raise UserError(message)
            _logger.warning("Not fetching %s server %s: %s", server.server_type, server.name, message)
            server.write({"microsoft365_fetch_error": message, "microsoft365_fetch_failed_at": fields.Datetime.now()})
        return blocked

    def _microsoft365_fetch_imap(self):
        self.ensure_one()
        MailThread = self.env["mail.thread"].with_context(
            fetchmail_cron_running=True, default_fetchmail_server_id=self.id
        )
        imap = self.connect()
        count = failed = 0
        try:
            imap.select()
            _status, data = imap.search(None, f"(UNSEEN UNKEYWORD {FAILED_KEYWORD})")
            for number in data[0].split():
                _status, fetched = imap.fetch(number, "(RFC822)")
                imap.store(number, "-FLAGS", "\\Seen")  # FETCH set it; it is earned by processing
                raw = fetched[0][1]
                try:
                    with self.env.cr.savepoint():
                        MailThread.message_process(
                            self.object_id.model, raw, save_original=self.original, strip_attachments=not self.attach
                        )
                except Exception as exc:  # any message may be malformed: never let it stop the others
                    failed += 1
                    gave_up = self._microsoft365_record_failed_message(raw, exc)
                    _logger.info(
                        "Failed to process mail from %s server %s.", self.server_type, self.name, exc_info=True
                    )
                    if gave_up:
                        imap.store(number, "+FLAGS", FAILED_KEYWORD)
                else:
                    imap.store(number, "+FLAGS", "\\Seen")
                    self._microsoft365_forget_failed_message(raw)
                # As Odoo's own fetch loop: each message is kept once processed, whatever follows.
                self.env.cr.commit()  # pylint: disable=invalid-commit
                count += 1
            _logger.info(
                "Fetched %d email(s) on %s server %s; %d succeeded, %d failed.",
                count,
                self.server_type,
                self.name,
                count - failed,
                failed,
            )
        finally:
            try:
                imap.close()
                imap.logout()
            except (OSError, IMAP4.abort, IMAP4.error):
                _logger.warning("Failed to properly finish imap connection: %s.", self.name, exc_info=True)
        self.date = fields.Datetime.now()

    @staticmethod
    def _microsoft365_message_key(raw):
        message = email.message_from_bytes(raw, policy=email.policy.default)
        key = message.get("Message-ID") or hashlib.sha256(raw).hexdigest()
        return str(key).strip(), message

    def _microsoft365_record_failed_message(self, raw, exc):
        key, message = self._microsoft365_message_key(raw)
        failures = dict(self.microsoft365_failed_messages or {})
        entry = failures.get(key) or {
            "failures": 0,
            "subject": str(message.get("Subject", ""))[:200],
            "sender": str(message.get("From", ""))[:200],
        }
        entry = dict(entry, failures=entry["failures"] + 1, error=str(exc)[:300])
        failures[key] = entry
        self.microsoft365_failed_messages = failures
        return entry["failures"] >= MAX_PROCESSING_ATTEMPTS

    def _microsoft365_forget_failed_message(self, raw):
        if not self.microsoft365_failed_messages:  # the usual case: nothing to parse
            return
        key, _message = self._microsoft365_message_key(raw)
        if key in (self.microsoft365_failed_messages or {}):
            failures = dict(self.microsoft365_failed_messages)
            del failures[key]
            self.microsoft365_failed_messages = failures

    def button_confirm_login(self):
        ours = self.filtered(lambda s: s._microsoft365_in_use())
        for server in ours:
            try:
                connection = server.connect(allow_archived=True)
                if server._get_connection_type() == "pop":
                    connection.stat()
                    connection.quit()
                else:
                    connection.logout()
            except UserError as exc:
                raise UserError(self.env._("Connection test failed: %s", exc.args[0])) from None
            except OSError as exc:  # DNS, refused, TLS, timeout: a connection failure, named as such
                found = diagnose_connection(server.server_type.upper(), server.server, server.port, exc)
                raise UserError(self.env._("Connection test failed: %s", explain(self.env, found))) from None
            except Exception as exc:  # network, TLS: Odoo's own wording
                raise UserError(self.env._("Connection test failed: %s", exc)) from None
            server.state = "done"
            server._microsoft365_after_successful_test()
        return super(FetchmailServer, self - ours).button_confirm_login()
