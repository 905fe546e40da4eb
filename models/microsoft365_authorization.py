import json
import logging
import re
from datetime import timedelta

from odoo import api, fields, models

_logger = logging.getLogger(__name__)

LIFETIME = timedelta(minutes=10)
ORIGIN_MODELS = ("fetchmail.server", "ir.mail_server")
STATE_FORMAT = re.compile(r"[A-Za-z0-9_-]{8,200}")  # what MSAL generates; anything else is not ours


class Microsoft365Authorization(models.Model):
    """A sign-in under way: MSAL's auth-code flow (state, PKCE verifier, nonce) kept server-side,
    bound to the Odoo user who started it and to one account, usable once, for 10 minutes."""

    _name = "microsoft365.authorization"
    _description = "Microsoft 365 sign-in in progress"
    _log_access = False

    state = fields.Char(required=True, index="btree", groups=fields.NO_ACCESS)
    flow_sealed = fields.Text(required=True, groups=fields.NO_ACCESS)
    account_id = fields.Many2one("microsoft365.account", required=True, ondelete="cascade")
    user_id = fields.Many2one("res.users", required=True, ondelete="cascade")
    expires_at = fields.Datetime(required=True)
    # Where the sign-in was started (a mail server), to return there; and whether the account's
    # servers are tested and confirmed once signed in (the connect wizard).
    origin_model = fields.Char()
    origin_id = fields.Integer()
    confirm_servers = fields.Boolean()

    _sql_constraints = [("state_unique", "unique(state)", "Duplicate sign-in state.")]

    @api.model
    def _start(self, account, origin=None, confirm_servers=False):
        client = account.app_id._identity_client()
        flow = client.start_sign_in(account.app_id.redirect_uri, account._sign_in_scopes(), login_hint=account.email)
        self.create(
            {
                "state": flow["state"],
                "flow_sealed": self.env["microsoft365.vault"]._encrypt(json.dumps(flow)),
                "account_id": account.id,
                "user_id": self.env.uid,
                "expires_at": fields.Datetime.now() + LIFETIME,
                "origin_model": origin._name if origin else False,
                "origin_id": origin.id if origin else False,
                "confirm_servers": confirm_servers,
            }
        )
        return {"type": "ir.actions.act_url", "url": flow["auth_uri"], "target": "self"}

    @api.model
    def _take(self, state, user):
        """The pending sign-in for ``state`` started by ``user``, removed so it cannot be replayed;
        an empty recordset when it is unknown, expired or someone else's."""
        if not isinstance(state, str) or not STATE_FORMAT.fullmatch(state):
            return self.browse(), None
        self.env.cr.execute(
            "DELETE FROM microsoft365_authorization WHERE state = %s AND user_id = %s "
            "RETURNING account_id, expires_at, flow_sealed, origin_model, origin_id, confirm_servers",
            [state, user.id],
        )
        row = self.env.cr.fetchone()
        if not row:
            return self.browse(), None
        account_id, expires_at, flow_sealed, origin_model, origin_id, confirm_servers = row
        if expires_at < fields.Datetime.now():
            _logger.warning("Microsoft 365 sign-in refused: its state has expired")
            return self.browse(), None
        flow = json.loads(self.env["microsoft365.vault"]._decrypt(flow_sealed))
        # Not part of MSAL's flow: the callback pops them before handing the flow to MSAL.
        flow["odoo_origin"] = [origin_model, origin_id] if origin_model in ORIGIN_MODELS and origin_id else None
        flow["odoo_confirm_servers"] = bool(confirm_servers)
        return self.env["microsoft365.account"].browse(account_id), flow

    @api.autovacuum
    def _gc_expired(self):
        self.search([("expires_at", "<", fields.Datetime.now())]).unlink()
