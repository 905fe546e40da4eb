import logging
import secrets
from datetime import timedelta
from urllib.parse import urlencode

from odoo import api, fields, models

from .microsoft365_authorization import STATE_FORMAT

_logger = logging.getLogger(__name__)

LIFETIME = timedelta(minutes=30)


class Microsoft365AdminConsent(models.Model):
    """A tenant-wide admin consent under way: the one-time `state` the consent link carries, bound
    to the administrator who opened it and to one app registration, usable once, for 30 minutes.
    Without it anybody could show an administrator a forged "consent granted" page."""

    _name = "microsoft365.admin.consent"
    _description = "Microsoft 365 admin consent in progress"
    _log_access = False

    state = fields.Char(required=True, index="btree", groups=fields.NO_ACCESS)
    app_id = fields.Many2one("microsoft365.app", required=True, ondelete="cascade")
    user_id = fields.Many2one("res.users", required=True, ondelete="cascade")
    expires_at = fields.Datetime(required=True)

    _sql_constraints = [("state_unique", "unique(state)", "Duplicate admin consent state.")]

    @api.model
    def _start(self, app):
        state = secrets.token_urlsafe(32)
        self.create(
            {"state": state, "app_id": app.id, "user_id": self.env.uid, "expires_at": fields.Datetime.now() + LIFETIME}
        )
        url = f"{app._cloud().authority_host}/{app.tenant}/adminconsent?" + urlencode(
            {"client_id": app.client_id, "redirect_uri": app.redirect_uri, "state": state}
        )
        return {"type": "ir.actions.act_url", "url": url, "target": "self"}

    @api.model
    def _take(self, state, user):
        """The app registration whose admin consent ``user`` started with ``state``, removed so that
        the answer cannot be replayed; an empty recordset when unknown, expired or someone else's."""
        if not isinstance(state, str) or not STATE_FORMAT.fullmatch(state):
            return self.env["microsoft365.app"]
        self.env.cr.execute(
            "DELETE FROM microsoft365_admin_consent WHERE state = %s AND user_id = %s RETURNING app_id, expires_at",
            [state, user.id],
        )
        row = self.env.cr.fetchone()
        if not row:
            return self.env["microsoft365.app"]
        app_id, expires_at = row
        if expires_at < fields.Datetime.now():
            _logger.warning("Microsoft 365 admin consent answer refused: its state has expired")
            return self.env["microsoft365.app"]
        return self.env["microsoft365.app"].browse(app_id)

    @api.autovacuum
    def _gc_expired(self):
        self.search([("expires_at", "<", fields.Datetime.now())]).unlink()
