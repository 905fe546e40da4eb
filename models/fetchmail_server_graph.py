"""Incoming mail through Microsoft Graph: a chosen folder's unread messages, read as raw MIME into
Odoo's mail gateway, then marked read or moved. Kept apart from the IMAP path (fetchmail_server.py):
``fetch_mail`` hands the Graph servers here and everything else on unchanged."""

import logging
from datetime import timedelta

from odoo import api, fields, models
from odoo.exceptions import UserError, ValidationError

from ..m365.errors import M365Error
from ..m365.graph import GraphFailed
from .microsoft365_account import explain

_logger = logging.getLogger(__name__)


class FetchmailServerGraph(models.Model):
    _inherit = "fetchmail.server"

    microsoft365_graph_folder = fields.Char(
        string="Folder",
        default="inbox",
        help="The mail folder Odoo reads through Microsoft Graph: a well-known name (inbox, archive...) or a "
        "folder id. Default: the Inbox.",
    )
    microsoft365_graph_after = fields.Selection(
        [("read", "Mark as read"), ("move", "Move to a folder")],
        string="Once in Odoo",
        default="read",
        required=True,
        help="What happens in the mailbox to a message Odoo has received.",
    )
    microsoft365_graph_move_to = fields.Char(
        string="Move to",
        default="archive",
        help="The folder messages are moved to once in Odoo: a well-known name (archive, deleteditems...) or a "
        "folder id.",
    )

    @api.constrains("microsoft365_graph_after", "microsoft365_graph_move_to")
    def _check_microsoft365_graph_move_to(self):
        for server in self:
            if server.microsoft365_graph_after == "move" and not (server.microsoft365_graph_move_to or "").strip():
                raise ValidationError(
                    self.env._("Incoming server %s moves messages: choose the folder to move them to.", server.name)
                )

    def _microsoft365_graph_servers(self):
        return self.filtered(lambda s: s._microsoft365_in_use() and s.microsoft365_transport == "graph")

    def fetch_mail(self, raise_exception=True):
        if self.env.context.get("microsoft365_fetched_by_lanes"):
            # The scheduled fetch: the fetch lanes claim these mailboxes (_microsoft365_fetch_mailbox).
            return super().fetch_mail(raise_exception=raise_exception)
        graph = self._microsoft365_graph_servers()
        for server in graph - graph._microsoft365_without_grant(raise_exception):
            with server._microsoft365_claimed(raise_exception) as claimed:
                if claimed:
                    server._microsoft365_graph_fetch_guarded(raise_exception)
        return super(FetchmailServerGraph, self - graph).fetch_mail(raise_exception=raise_exception)

    def _microsoft365_fetch_mailbox(self, deadline):
        if self.microsoft365_transport != "graph":
            return super()._microsoft365_fetch_mailbox(deadline)
        # Failures are kept on the server and raised; the lane logs them and goes on with the others.
        return self._microsoft365_fetch_graph()

    def _microsoft365_graph_fetch_guarded(self, raise_exception):
        try:
            self._microsoft365_fetch_graph()
        except Exception as exc:
            if raise_exception:
                if self.microsoft365_retry_at and self.microsoft365_retry_at > fields.Datetime.now():
                    self.env.cr.commit()  # pylint: disable=invalid-commit
                raise ValidationError(
                    self.env._(
                        "Couldn't get your emails. Check out the error message below for more info:\n%s",
                        exc.args[0] if exc.args else exc,
                    )
                ) from exc
            _logger.info("General failure when trying to fetch mail from Graph server %s.", self.name, exc_info=True)

    def _microsoft365_graph_refused(self, exc):
        """A Graph refusal during the fetch: kept on the server (with Microsoft's back-off), then raised."""
        found = getattr(exc, "diagnosis", None)
        message = explain(self.env, found) if found else (exc.args[0] if exc.args else str(exc))
        retry_after = getattr(exc, "retry_after", None)
        values = {"microsoft365_fetch_error": message, "microsoft365_fetch_failed_at": fields.Datetime.now()}
        if found and found.transient and retry_after:
            # Whole seconds, rounded up: never before Microsoft's time.
            values["microsoft365_retry_at"] = fields.Datetime.now() + timedelta(seconds=int(retry_after) + 1)
        self.write(values)
        raise UserError(message)

    def _microsoft365_fetch_graph(self):
        """Unread messages of the folder, oldest first; each one processed in a savepoint and committed, then
        marked read (or moved). A crash between the two fetches it again next time: Odoo's gateway ignores a
        Message-ID it already has, so it is processed once. A message Odoo cannot process stays unread and is
        retried, then listed on the server like the IMAP path's."""
        self.ensure_one()
        if self.microsoft365_retry_at and self.microsoft365_retry_at > fields.Datetime.now():
            raise UserError(
                self.env._(
                    "Microsoft 365 is throttling this mailbox: Odoo waits until %s before it connects again.",
                    fields.Datetime.to_string(self.microsoft365_retry_at),
                )
            )
        MailThread = self.env["mail.thread"].with_context(
            fetchmail_cron_running=True, default_fetchmail_server_id=self.id
        )
        counts = {"done": 0, "failed": 0, "skipped": 0}
        unread_keys = set()
        try:
            client = self._microsoft365_graph_client()
            unread = client.unread(self.microsoft365_graph_folder or "inbox")
        except M365Error as exc:
            self._microsoft365_graph_refused(exc)
        try:
            for summary in unread:
                key = (summary.get("internetMessageId") or "").strip()
                if key:
                    unread_keys.add(key)
                    if self._microsoft365_is_given_up(key):
                        counts["skipped"] += 1
                        continue
                try:
                    outcome = self._microsoft365_graph_fetch_one(client, summary, MailThread, unread_keys)
                except GraphFailed as exc:
                    if exc.status != 404:  # throttled, token, mailbox: the session's end, as on IMAP
                        raise
                    # This message only: deleted or moved in the mailbox since it was listed.
                    _logger.info("Skipped message on Graph server %s: %s", self.name, exc.code)
                    outcome = "skipped"
                counts[outcome] += 1
        except M365Error as exc:
            self._microsoft365_graph_refused(exc)
        else:
            self._microsoft365_forget_failed_messages(lambda key, _entry: key not in unread_keys)
        finally:
            _logger.info(
                "Fetched %d email(s) through Microsoft Graph on server %s; %d failed, %d left unread.",
                counts["done"],
                self.name,
                counts["failed"],
                counts["skipped"],
            )
        values = {"date": fields.Datetime.now()}
        if self.microsoft365_fetch_error:
            values.update(microsoft365_fetch_error=False, microsoft365_fetch_failed_at=False)
        self.write(values)

    def _microsoft365_graph_fetch_one(self, client, summary, MailThread, unread_keys):
        raw = client.mime(summary["id"])
        key, _message = self._microsoft365_message_key(raw)
        unread_keys.add(key)
        if self._microsoft365_is_given_up(key):
            return "skipped"
        try:
            with self.env.cr.savepoint():
                MailThread.message_process(
                    self.object_id.model, raw, save_original=self.original, strip_attachments=not self.attach
                )
        except Exception as exc:  # any message may be malformed: never let it stop the others
            self._microsoft365_record_failed_message(raw, exc)
            _logger.info("Failed to process mail from Graph server %s.", self.name, exc_info=True)
            self.env.cr.commit()  # pylint: disable=invalid-commit
            return "failed"
        self._microsoft365_forget_failed_message(raw)
        # Kept in Odoo first, marked in the mailbox second: should Odoo stop in between, the message is
        # fetched again and Odoo's gateway ignores its known Message-ID. The other order could mark a
        # message whose processing is then rolled back: lost.
        self.env.cr.commit()  # pylint: disable=invalid-commit
        self._microsoft365_graph_done(client, summary["id"])
        self.env.cr.commit()  # pylint: disable=invalid-commit
        unread_keys.discard(key)
        return "done"

    def _microsoft365_graph_done(self, client, message_id):
        if self.microsoft365_graph_after == "move":
            client.move(message_id, self.microsoft365_graph_move_to.strip())
        else:
            client.mark_read(message_id)

    def button_confirm_login(self):
        graph = self._microsoft365_graph_servers()
        for server in graph:
            try:
                client = server._microsoft365_graph_client()
                client.folder(server.microsoft365_graph_folder or "inbox")
                if server.microsoft365_graph_after == "move":
                    client.folder(server.microsoft365_graph_move_to.strip())
            except M365Error as exc:
                found = getattr(exc, "diagnosis", None)
                raise UserError(
                    self.env._("Connection test failed: %s", explain(self.env, found) if found else str(exc))
                ) from None
            except UserError as exc:
                raise UserError(self.env._("Connection test failed: %s", exc.args[0])) from None
            server.state = "done"
            server._microsoft365_after_successful_test()
        return super(FetchmailServerGraph, self - graph).button_confirm_login()
