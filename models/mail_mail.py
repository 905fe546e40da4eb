from odoo import models

# Exchange Online's "432 4.3.2" (too many connections sending from the mailbox at once) asks the sender
# to come back later (sandbox/CONFORMANCE.md SMTP-11): quoted by ir_mail_server.send_email's explanation.
TRANSIENT_REPLIES = ("(432 4.3.2",)


class MailMail(models.Model):
    _inherit = "mail.mail"

    def _send(self, auto_commit=False, raise_exception=False, smtp_session=None, **kwargs):
        """A mail Exchange refused for now stays in the queue (with the reason shown) and is sent by the
        next run of the mail queue, instead of failing for good as Odoo does with any refusal."""
        result = super()._send(
            auto_commit=auto_commit, raise_exception=raise_exception, smtp_session=smtp_session, **kwargs
        )
        later = self.exists().filtered(
            lambda mail: mail.state == "exception"
            and any(reply in (mail.failure_reason or "") for reply in TRANSIENT_REPLIES)
        )
        if later:
            later.write({"state": "outgoing"})
            if auto_commit is True:
                self.env.cr.commit()  # pylint: disable=invalid-commit
        return result
