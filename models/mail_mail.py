import logging

from odoo import models

from .ir_mail_server import LATER, MailDeliveryLater


class _WaitingMailLoggedAsWaiting(logging.Filter):
    """Odoo's mail queue logs every refused mail as an ERROR with a traceback ("failed sending mail"),
    before _send below puts a mail Microsoft refused only for now back in the queue: that one is logged
    as waiting, at INFO, so that nobody is paged for mail that will go. Other failures are left alone."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], MailDeliveryLater):
            record.msg = "Mail (id: %s) stays in the queue for its next run: %s"  # same arguments as core's
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.exc_info = record.exc_text = None
        return True


_waiting_mail_filter = _WaitingMailLoggedAsWaiting()
logging.getLogger("odoo.addons.mail.models.mail_mail").addFilter(_waiting_mail_filter)


class MailMail(models.Model):
    _inherit = "mail.mail"

    def send(self, auto_commit=False, raise_exception=False, post_send_callback=None):
        """The connection of a batch is made here (ir.mail_server.connect): with LATER in the context, a
        Microsoft 365 server without a token for now answers each of its mails "later" (see _send)."""
        mails = self if self.env.context.get(LATER) is not None else self.with_context(**{LATER: set()})
        return super(MailMail, mails).send(
            auto_commit=auto_commit, raise_exception=raise_exception, post_send_callback=post_send_callback
        )

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
            waiting.write({"state": "outgoing"})
            self.env["mail.notification"].sudo().search(
                [("mail_mail_id", "in", waiting.ids), ("notification_status", "=", "exception")]
            ).write({"notification_status": "ready", "failure_type": False, "failure_reason": False})
            if auto_commit is True:
                self.env.cr.commit()  # pylint: disable=invalid-commit
        return result
