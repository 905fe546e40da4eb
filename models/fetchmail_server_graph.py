"""Incoming mail through Microsoft Graph: a chosen folder's unread messages, read as raw MIME into
Odoo's mail gateway, then marked read or moved. Kept apart from the IMAP path (fetchmail_server.py):
``fetch_mail`` hands the Graph servers here and everything else on unchanged."""

import logging
import time
from datetime import timedelta

from odoo import api, fields, models
from odoo.exceptions import UserError, ValidationError

from ..m365.errors import M365Error
from ..m365.graph import WELL_KNOWN_FOLDERS, GraphFailed, about_one_message, delta_expired
from .fetchmail_server import _given_up
from .microsoft365_account import explain

_logger = logging.getLogger(__name__)

# A delta round follows only the mail received since the last full listing, less this margin (clocks of
# Odoo and Exchange may differ): the first round of a 50,000-message folder names a day of mail, not all.
DELTA_WINDOW = timedelta(days=1)
# The safety net under delta: every unread message of the folder is listed at least this often.
FULL_LISTING_EVERY = timedelta(hours=24)


def _unread_changes(entries):
    """The messages a delta round names that may still need Odoo, oldest first: deleted or moved out
    (``@removed``) dropped, a message named twice taken in its last state, read ones dropped (a change of an
    unread message's other properties may come without isRead: kept, the gateway ignores a known one)."""
    latest = {}
    for entry in entries:
        if "@removed" in entry:
            latest.pop(entry.get("id"), None)
        elif entry.get("id"):
            latest.pop(entry["id"], None)
            latest[entry["id"]] = entry
    return sorted(
        (e for e in latest.values() if e.get("isRead") is not True),
        key=lambda e: e.get("receivedDateTime") or "9999",
    )


class FetchmailServerGraph(models.Model):
    _inherit = "fetchmail.server"

    microsoft365_graph_folder = fields.Char(
        string="Folder",
        default="inbox",
        help="The mail folder Odoo reads through Microsoft Graph: a well-known name (inbox, archive...), a path of "
        "folder names as Outlook shows them (Inbox/Support), or a folder id. Default: the Inbox.",
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
        help="The folder messages are moved to once in Odoo: a well-known name (archive, deleteditems...), a path "
        "of folder names (Inbox/Done), or a folder id.",
    )

    @api.constrains("microsoft365_graph_after", "microsoft365_graph_move_to")
    def _check_microsoft365_graph_move_to(self):
        for server in self:
            if server.microsoft365_graph_after == "move" and not (server.microsoft365_graph_move_to or "").strip():
                raise ValidationError(
                    self.env._("Incoming server %s moves messages: choose the folder to move them to.", server.name)
                )

    # The folder's delta link (GRAPH-13): technical, administrators only, never copied; forgotten when
    # what it tracks changes (write) or when failed messages are tried again.
    microsoft365_graph_delta_link = fields.Char(
        string="Graph delta link", copy=False, readonly=True, groups="base.group_system"
    )
    microsoft365_graph_listed_at = fields.Datetime(
        string="Last full listing",
        copy=False,
        readonly=True,
        groups="base.group_system",
        help="When Odoo last listed every unread message of the folder (the delta link tracks what comes after).",
    )

    _microsoft365_graph_tracked_fields = {
        "microsoft365_transport",
        "microsoft365_graph_folder",
        "microsoft365_account_id",
        "connect_with",
        "user",
    }

    def write(self, vals):
        result = super().write(vals)
        if self._microsoft365_graph_tracked_fields & set(vals) and "microsoft365_graph_delta_link" not in vals:
            # Another folder, mailbox or transport: the link tracked something else; start again. (sudo:
            # whoever may change the server may reset its technical fields.)
            tracked = self.sudo().filtered(lambda s: s.microsoft365_graph_delta_link or s.microsoft365_graph_listed_at)
            tracked.write({"microsoft365_graph_delta_link": False, "microsoft365_graph_listed_at": False})
        return result

    def _microsoft365_graph_servers(self):
        return self.filtered(lambda s: s._microsoft365_in_use() and s.microsoft365_transport == "graph")

    def fetch_mail(self, raise_exception=True):
        if self.env.context.get("microsoft365_fetched_by_lanes"):
            # The scheduled fetch: the fetch lanes claim these mailboxes (_microsoft365_fetch_mailbox).
            return super().fetch_mail(raise_exception=raise_exception)
        graph = self._microsoft365_graph_servers()
        for server in graph - graph._microsoft365_without_grant(raise_exception):
            server._microsoft365_fetch_now(raise_exception)
        return super(FetchmailServerGraph, self - graph).fetch_mail(raise_exception=raise_exception)

    def _microsoft365_fetch_mailbox(self, deadline):
        if self.microsoft365_transport != "graph":
            return super()._microsoft365_fetch_mailbox(deadline)
        # Failures are kept on the server and raised; the lane logs them and goes on with the others.
        return self._microsoft365_fetch_graph(deadline)

    def action_microsoft365_retry_failed_messages(self):
        """Try again: the given-up messages are offered again by a full listing of the unread messages (a
        delta round would not name them: they did not change)."""
        result = super().action_microsoft365_retry_failed_messages()
        self._microsoft365_graph_servers().sudo().write({"microsoft365_graph_delta_link": False})
        return result

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

    def _microsoft365_graph_full_listing_due(self):
        """Whether this fetch lists every unread message of the folder instead of following the delta link.
        A delta round names only what changed since the last one; three things it would never name again:
        a message that failed in Odoo and waits to be tried again (it stays unread and unchanged), one
        whose mark was lost (handled too: the link only moves on once every message it named is done),
        and anything a delta round missed (Microsoft warns of replication delays and lost sync states).
        Hence a full listing while failed messages wait, after Try again (which forgets the link), when
        there is no link, and once every FULL_LISTING_EVERY as a safety net; delta otherwise."""
        server = self.sudo()
        if not server.microsoft365_graph_delta_link or not server.microsoft365_graph_listed_at:
            return True
        if any(not _given_up(e) and not e.get("dismissed") for e in (self.microsoft365_failed_messages or {}).values()):
            return True
        return server.microsoft365_graph_listed_at < fields.Datetime.now() - FULL_LISTING_EVERY

    @staticmethod
    def _microsoft365_graph_folder_ref(client, value):
        """What Graph takes for a folder the server names (GRAPH-22): a well-known name as it is, a path of
        folder names by the id of the folder found, anything else as a folder id (Graph says if it is none)."""
        value = (value or "").strip() or "inbox"
        if value.lower() in WELL_KNOWN_FOLDERS:
            return value.lower()
        return client.find_folder(value) or value

    def _microsoft365_graph_offered(self, client, folder):
        """(messages to read, oldest first; whether they are the full unread listing; the delta link to keep
        once they are all handled)."""
        if not self._microsoft365_graph_full_listing_due():
            try:
                entries, link = client.delta(folder, delta_link=self.sudo().microsoft365_graph_delta_link)
            except GraphFailed as exc:
                if not delta_expired(exc):
                    raise
                # Graph no longer knows the link: start again with a full listing (GRAPH-17); the gateway's
                # Message-ID check keeps a message listed twice from being processed twice.
                _logger.info("Graph server %s: the delta link expired (%s); listing unread mail.", self.name, exc.code)
            else:
                return _unread_changes(entries), False, link
        # A new delta round first, bounded to recent mail (a 50,000-message folder is not enumerated: Graph
        # keeps the receivedDateTime filter in the links that follow), then the unread listing: whatever
        # arrives in between is in both, and read by the time the next delta round names it.
        since = fields.Datetime.now() - DELTA_WINDOW
        _entries, link = client.delta(folder, since=since)
        return client.unread(folder), True, link

    def _microsoft365_fetch_graph(self, deadline=None):
        """Unread messages of the folder, oldest first: those a delta round names, or every unread one
        (_microsoft365_graph_full_listing_due); each processed in a savepoint and committed, then marked read
        (or moved). Past `deadline` (time.monotonic()) the rest waits for the next visit. A crash between
        the two fetches it again next time: Odoo's gateway ignores a Message-ID it already has, so it is
        processed once. A message Odoo cannot process stays unread and is retried, then listed on the server
        like the IMAP path's. The delta link moves on only once every message offered was handled."""
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
        complete = True
        try:
            client = self._microsoft365_graph_client()
            client.deadline = deadline
            folder = self._microsoft365_graph_folder_ref(client, self.microsoft365_graph_folder)
            offered, full, link = self._microsoft365_graph_offered(client, folder)
        except M365Error as exc:
            self._microsoft365_graph_refused(exc)
        try:
            for summary in offered:
                if deadline and time.monotonic() > deadline:
                    complete = False  # the time budget is spent: the rest waits for the next visit
                    counts["skipped"] += 1
                    continue
                key = (summary.get("internetMessageId") or "").strip()
                if key:
                    unread_keys.add(key)
                    if self._microsoft365_is_given_up(key):
                        counts["skipped"] += 1
                        continue
                try:
                    outcome = self._microsoft365_graph_fetch_one(client, summary, MailThread, unread_keys)
                except GraphFailed as exc:
                    if not about_one_message(exc):  # throttled, token, mailbox: the session's end, as on IMAP
                        raise
                    outcome = self._microsoft365_graph_unreadable(summary, exc)
                counts[outcome] += 1
        except M365Error as exc:
            self._microsoft365_graph_refused(exc)
        else:
            if complete:
                if full:  # failures of messages no longer unread (read or deleted meanwhile) are forgotten
                    self._microsoft365_forget_failed_messages(lambda key, _entry: key not in unread_keys)
                values = {"microsoft365_graph_delta_link": link or False}
                if full:
                    values["microsoft365_graph_listed_at"] = fields.Datetime.now()
                self.sudo().write(values)
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

    def _microsoft365_graph_unreadable(self, summary, exc):
        """Graph refused to give this message only (GRAPH-18). Gone since it was listed (404): nothing to do.
        Otherwise (e.g. an S/MIME message Exchange cannot convert): counted as a failure of that message,
        like one Odoo cannot process, so it is retried, then listed on the server; the others go on."""
        _logger.info("Skipped message on Graph server %s: %s %s", self.name, exc.status, exc.code)
        if exc.status == 404:
            return "skipped"
        key = (summary.get("internetMessageId") or "").strip() or summary["id"]
        sender = ((summary.get("from") or {}).get("emailAddress") or {}).get("address") or ""
        failures = dict(self.microsoft365_failed_messages or {})
        entry = failures.get(key) or {"failures": 0, "subject": (summary.get("subject") or "")[:200], "sender": sender}
        detail = getattr(getattr(exc, "diagnosis", None), "detail", "") or f"{exc.status} {exc.code}"
        failures[key] = dict(entry, failures=entry["failures"] + 1, error=detail[:300])
        self.microsoft365_failed_messages = failures
        self.env.cr.commit()  # pylint: disable=invalid-commit
        return "failed"

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
            client.move(message_id, self._microsoft365_graph_folder_ref(client, self.microsoft365_graph_move_to))
        else:
            client.mark_read(message_id)

    def button_confirm_login(self):
        graph = self._microsoft365_graph_servers()
        for server in graph:
            try:
                client = server._microsoft365_graph_client()
                client.folder(server._microsoft365_graph_folder_ref(client, server.microsoft365_graph_folder))
                if server.microsoft365_graph_after == "move":
                    client.folder(server._microsoft365_graph_folder_ref(client, server.microsoft365_graph_move_to))
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
