import logging
from datetime import timedelta

from odoo import api, fields, models

from .ir_mail_server import LATER, MailDeliveryLater


class _WaitingMailLoggedAsWaiting(logging.Filter):
    """Odoo's mail queue logs every refused mail as an ERROR with a traceback ("failed sending mail"),
    before _send below puts a mail Microsoft refused only for now back in the queue: that one is logged
    as waiting, at INFO, so that nobody is paged for mail that will go. Other failures are left alone."""

    def filter(self, record):
        later = record.exc_info and isinstance(record.exc_info[1], MailDeliveryLater)
        # Only core's own record, whose arguments (mail id, reason) the new text takes over.
        if later and str(record.msg).startswith("failed sending mail") and len(record.args or ()) == 2:
            record.msg = "Mail (id: %s) stays in the queue for its next run: %s"
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.exc_info = record.exc_text = None
        return True


_waiting_mail_filter = _WaitingMailLoggedAsWaiting()
logging.getLogger("odoo.addons.mail.models.mail_mail").addFilter(_waiting_mail_filter)
_logger = logging.getLogger(__name__)

# Failures that are the mail's own (its recipients or sender), whatever the state of the account.
MAIL_OWN_FAILURES = ("mail_email_invalid", "mail_email_missing", "mail_from_invalid", "mail_from_missing")
# A mail that failed longer ago than this is not sent unasked once its account works again.
QUEUE_AGAIN_DAYS = 7


class MailMail(models.Model):
    _inherit = "mail.mail"

    microsoft365_account_id = fields.Many2one(
        "microsoft365.account",
        string="Failed with Microsoft 365 Account",
        index="btree_not_null",
        ondelete="set null",
        readonly=True,
        copy=False,
        groups="base.group_system",
        help="The mail failed while this account (or its app registration) needed an administrator: the mail "
        "queue sends it again once the account works again.",
    )
    microsoft365_app_refused = fields.Boolean(
        string="Failed with the App Registration",
        readonly=True,
        copy=False,
        groups="base.group_system",
        help="Microsoft refused the account's app registration itself (an expired secret, say): the mail goes "
        "again as soon as Microsoft accepts the app registration again.",
    )

    def send(self, auto_commit=False, raise_exception=False, post_send_callback=None):
        """The connection of a batch is made here (ir.mail_server.connect): with LATER in the context, a
        Microsoft 365 server without a token for now answers each of its mails "later" (see _send)."""
        mails = self if self.env.context.get(LATER) is not None else self.with_context(**{LATER: set()})
        result = super(MailMail, mails).send(
            auto_commit=auto_commit, raise_exception=raise_exception, post_send_callback=post_send_callback
        )
        self._microsoft365_note_failed_with_account()
        return result

    @api.model
    def process_email_queue(self, ids=None, batch_size=1000):
        self._microsoft365_queue_again_once_working()
        return super().process_email_queue(ids=ids, batch_size=batch_size)

    def _microsoft365_note_failed_with_account(self):
        """Mails that failed while their Microsoft 365 account or its app registration needs an administrator
        (a revoked grant, an expired secret...): Microsoft refused the token before anything was sent, so
        they may go once the account works again (_microsoft365_queue_again_once_working)."""
        mails = self.exists().sudo()
        failed = mails.filtered(lambda mail: mail.state == "exception" and mail.failure_type not in MAIL_OWN_FAILURES)
        noted = mails.browse()
        servers = self.env["ir.mail_server"].sudo()
        for server_id, _alias_domain_id, _smtp_from, mail_ids in failed._split_by_mail_configuration():
            server = servers.browse(server_id)
            if not server or not server._microsoft365_in_use():
                continue
            account = server._microsoft365_account()
            if account.status in ("failing", "reconnect") or account.app_id.problem:
                batch = mails.browse(mail_ids)
                batch.write(
                    {"microsoft365_account_id": account.id, "microsoft365_app_refused": bool(account.app_id.problem)}
                )
                noted |= batch
        # The note is about the last failure: a mail retried by hand that was sent or failed for itself drops it.
        (mails.filtered("microsoft365_account_id") - noted).write(
            {"microsoft365_account_id": False, "microsoft365_app_refused": False}
        )

    @api.model
    def _microsoft365_queue_again_once_working(self):
        """Each run of the mail queue: the mails noted by _microsoft365_note_failed_with_account whose account
        works again (authorized again, Microsoft accepts the app registration again) go back in the queue."""
        waiting = self.sudo().search(
            [
                ("microsoft365_account_id", "!=", False),
                ("state", "=", "exception"),
                ("write_date", ">=", fields.Datetime.now() - timedelta(days=QUEUE_AGAIN_DAYS)),
            ]
        )
        working = waiting.filtered(lambda mail: mail._microsoft365_account_works_again())
        if not working:
            return
        working.write(
            {
                "microsoft365_account_id": False,
                "microsoft365_app_refused": False,
                "failure_type": False,
                "failure_reason": False,
            }
        )
        working._microsoft365_back_in_queue()
        _logger.info(
            "%d mail(s) that failed while their Microsoft 365 account needed an administrator are queued again: "
            "the account works again.",
            len(working),
        )

    def _microsoft365_account_works_again(self):
        """An account "Not working" only because Microsoft refused its app registration is not used again
        before its mail is: once the app is accepted again, the send itself tells (and marks it connected).
        If the account has a problem of its own too, the mail fails again and then waits for the account."""
        account = self.microsoft365_account_id
        if account.app_id.problem:
            return False
        return account.status in ("connected", "app_only") or (
            self.microsoft365_app_refused and account.status == "failing"
        )

    def _microsoft365_back_in_queue(self):
        """Queued again, and their messages show no failure meanwhile."""
        self.write({"state": "outgoing"})
        self.env["mail.notification"].sudo().search(
            [("mail_mail_id", "in", self.ids), ("notification_status", "=", "exception")]
        ).write({"notification_status": "ready", "failure_type": False, "failure_reason": False})

    def _send(self, auto_commit=False, raise_exception=False, smtp_session=None, **kwargs):
        """A mail Microsoft 365 refused only for now (Exchange's 432 4.3.2, no token from a busy, down or
        unreachable sign-in service: ir.mail_server._microsoft365_later) stays in the queue, with the reason
        shown, and is sent by the next run of the mail queue, instead of failing for good as Odoo does with any
        refusal; its message shows no failure meanwhile. Any other failure is left as Odoo records it."""
        later = self.env.context.get(LATER)
        mails = self
        if later is None:
            later = set()
            mails = self.with_context(**{LATER: later})
        result = super(MailMail, mails)._send(
            auto_commit=auto_commit, raise_exception=raise_exception, smtp_session=smtp_session, **kwargs
        )
        waiting = self.exists().filtered(lambda mail: mail.state == "exception" and mail.message_id in later)
        if waiting:
            waiting._microsoft365_back_in_queue()
            if auto_commit is True:
                self.env.cr.commit()  # pylint: disable=invalid-commit
        return result
