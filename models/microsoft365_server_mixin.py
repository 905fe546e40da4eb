from odoo import api, fields, models
from odoo.exceptions import UserError, ValidationError

from ..m365.clouds import MICROSOFT_MAIL_HOSTS
from ..m365.errors import M365Error


class Microsoft365ServerMixin(models.AbstractModel):
    """What incoming and outgoing servers share when they connect through Microsoft 365.

    A server "connected with Microsoft 365" is linked to the OAuth account of its mailbox; the
    account is found, or created with the default app registration, when the server is saved.
    """

    _name = "microsoft365.server.mixin"
    _description = "Mail server connected through Microsoft 365"

    microsoft365_account_id = fields.Many2one(
        "microsoft365.account",
        string="OAuth account",
        ondelete="restrict",
        help="The Microsoft 365 mailbox this server signs in as. Left empty, it is found or created "
        "from the server's username with the default app registration (General Settings).",
    )
    microsoft365_app_id = fields.Many2one(
        "microsoft365.app",
        string="App registration",
        compute="_compute_microsoft365_app_id",
        store=True,
        readonly=False,
        ondelete="restrict",
        help="The app registration the mailbox's OAuth account is found or created with. Empty: the default one "
        "of General Settings (or the only one there is).",
    )
    microsoft365_status = fields.Selection(related="microsoft365_account_id.status", string="OAuth status")
    microsoft365_switchable = fields.Boolean(
        compute="_compute_microsoft365_switchable",
        help="Signs in to a Microsoft 365 host with a password: can switch to OAuth.",
    )
    microsoft365_transport = fields.Selection(
        [("exchange", "Exchange protocols (IMAP/POP/SMTP)"), ("graph", "Microsoft Graph")],
        string="Transport",
        default="exchange",
        required=True,
        help="Exchange protocols: IMAP or POP3 and SMTP with OAuth (needs IMAP/POP and SMTP AUTH enabled for the "
        "mailbox). Microsoft Graph: Microsoft's REST API, for organisations that switched SMTP AUTH or IMAP off; "
        "the same OAuth account, with Microsoft Graph's mail permissions.",
    )
    microsoft365_password_pending = fields.Boolean(
        copy=False,
        readonly=True,
        string="Old password kept",
        help="Switched to OAuth: the old password is kept until the first successful connection test.",
    )

    # Hooks for the concrete servers ----------------------------------------------------------

    def _microsoft365_host(self):
        """The mail server host name."""
        raise NotImplementedError

    def _microsoft365_switch_values(self):
        """Field values that make this password server use Microsoft 365 OAuth (password kept)."""
        raise NotImplementedError

    def _microsoft365_clear_password(self):
        raise NotImplementedError

    def _microsoft365_has_password(self):
        raise NotImplementedError

    def _microsoft365_in_use(self):
        """True when this server authenticates through Microsoft 365."""
        raise NotImplementedError

    def _microsoft365_mailbox(self):
        """The mailbox address the server signs in as."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------

    @api.depends("microsoft365_account_id.app_id")
    def _compute_microsoft365_app_id(self):
        for server in self:
            server.microsoft365_app_id = server.microsoft365_account_id.app_id or server.microsoft365_app_id

    @api.onchange("microsoft365_app_id")
    def _onchange_microsoft365_app_id(self):
        app, account = self.microsoft365_app_id, self.microsoft365_account_id
        if not app or not self._microsoft365_in_use() or account.app_id == app:
            return
        self.microsoft365_account_id = self._microsoft365_account_for(self._microsoft365_mailbox())
        self.microsoft365_app_id = app
        self._microsoft365_onchange_connection()

    def _microsoft365_onchange_connection(self):
        """The concrete server's onchange that fills in its cloud's hosts and ports."""

    def _microsoft365_account_for(self, mailbox):
        """The existing account of `mailbox` with the server's app registration (if one is chosen)."""
        if not mailbox:
            return self.env["microsoft365.account"]
        domain = [("email", "=", mailbox.strip().lower())]
        if self.microsoft365_app_id:
            domain.append(("app_id", "=", self.microsoft365_app_id.id))
        return self.env["microsoft365.account"].search(domain, limit=1)

    def _compute_microsoft365_switchable(self):
        hosts = MICROSOFT_MAIL_HOSTS | self.env["microsoft365.app"].sudo()._custom_mail_hosts()
        for server in self:
            server.microsoft365_switchable = (
                not server._microsoft365_in_use() and (server._microsoft365_host() or "").strip().lower() in hosts
            )

    def action_microsoft365_switch(self):
        """Switch password servers on Microsoft 365 hosts to OAuth, keeping each server (id, filters,
        priority, aliases) and its password until the first successful OAuth connection test."""
        report = []
        for server in self:
            if server._microsoft365_in_use():
                report.append(self.env._("%s: already uses OAuth.", server.display_name))
                continue
            if not server.microsoft365_switchable:
                report.append(self.env._("%s: not a Microsoft 365 server, left unchanged.", server.display_name))
                continue
            mailbox = server._microsoft365_mailbox()
            if not mailbox:
                report.append(self.env._("%s: no mailbox address (username), left unchanged.", server.display_name))
                continue
            try:
                account = self.env["microsoft365.account"]._find_or_create(mailbox, server.microsoft365_app_id)
            except ValidationError as exc:
                report.append(self.env._("%(server)s: %(reason)s", server=server.display_name, reason=exc.args[0]))
                continue
            server.write(
                dict(
                    server._microsoft365_switch_values(),
                    microsoft365_account_id=account.id,
                    microsoft365_password_pending=True,
                )
            )
            account.message_post(
                body=self.env._("Mail server %s switched from a password to OAuth with this account.", server.name)
            )
            report.append(
                self.env._(
                    "%(server)s: switched to OAuth with %(mailbox)s (%(status)s).",
                    server=server.display_name,
                    mailbox=account.email,
                    status=dict(account._fields["status"]._description_selection(self.env))[account.status],
                )
            )
        if len(self) == 1 and self._microsoft365_in_use() and self.microsoft365_status not in ("connected", "app_only"):
            return self.action_microsoft365_authorize()
        return {
            "type": "ir.actions.client",
            "tag": "display_notification",
            "params": {
                "title": self.env._("Switch to OAuth"),
                "message": "\n".join(report),
                "className": "text-prewrap",  # one line per server
                "sticky": True,
                "type": "info",
                "next": {"type": "ir.actions.client", "tag": "soft_reload"},
            },
        }

    def _microsoft365_sync_password(self):
        """After create/write, as Switch to OAuth does: a password on a server that connects with OAuth is
        kept until the first successful test; back on a password, it is the server's own again."""
        kept = self.filtered(
            lambda s: s._microsoft365_in_use()
            and s._microsoft365_has_password()
            and not s.microsoft365_password_pending
        )
        if kept:
            kept.microsoft365_password_pending = True
        back = self.filtered(lambda s: not s._microsoft365_in_use() and s.microsoft365_password_pending)
        if back:
            back.microsoft365_password_pending = False

    def _microsoft365_after_successful_test(self):
        """The first successful OAuth test proves the switch: the old password can go."""
        for server in self.filtered(lambda s: s._microsoft365_in_use() and s.microsoft365_password_pending):
            server._microsoft365_clear_password()
            server.microsoft365_password_pending = False

    _microsoft365_link_fields = set()  # fields whose change may need another OAuth account

    def _microsoft365_link_accounts(self, changed=None):
        if changed is not None and not (self._microsoft365_link_fields | {"microsoft365_app_id"}) & set(changed):
            return
        for server in self.filtered(
            lambda s: s._microsoft365_in_use()
            and (
                not s.microsoft365_account_id
                or (s.microsoft365_app_id and s.microsoft365_account_id.app_id != s.microsoft365_app_id)
            )
        ):
            mailbox = server._microsoft365_mailbox()
            if not mailbox:
                raise ValidationError(
                    self.env._(
                        "Enter the mailbox address of server %s to connect it with Microsoft 365.", server.display_name
                    )
                )
            server.microsoft365_account_id = self.env["microsoft365.account"]._find_or_create(
                mailbox, server.microsoft365_app_id
            )

    def _microsoft365_account(self):
        self.ensure_one()
        if not self.microsoft365_account_id:
            raise UserError(self.env._("Choose the OAuth account of server %s.", self.display_name))
        return self.microsoft365_account_id

    def _microsoft365_token(self):
        return self._microsoft365_account()._access_token_for_use()

    def _microsoft365_cloud_for(self, account):
        app = (
            account.app_id if account else (self[:1].microsoft365_app_id or self.env["microsoft365.app"]._default_app())
        )
        return app._cloud() if app else None

    def action_microsoft365_use_graph(self):
        """Send or fetch through Microsoft Graph instead of SMTP / IMAP, for one server or many: each
        keeps its record (a password server is switched to OAuth on the way); one report line per server."""
        report = []
        for server in self:
            if not server._microsoft365_in_use():
                if not server.microsoft365_switchable or not server._microsoft365_mailbox():
                    report.append(self.env._("%s: not a Microsoft 365 server, left unchanged.", server.display_name))
                    continue
                server.action_microsoft365_switch()
            if server.microsoft365_transport == "graph":
                report.append(self.env._("%s: already uses Microsoft Graph.", server.display_name))
                continue
            server.microsoft365_transport = "graph"
            account = server.microsoft365_account_id
            account.message_post(body=self.env._("Mail server %s now uses Microsoft Graph.", server.name))
            if server._microsoft365_graph_ready():
                line = self.env._(
                    "%(server)s: uses Microsoft Graph with %(mailbox)s.",
                    server=server.display_name,
                    mailbox=account.email,
                )
            else:
                line = self.env._(
                    "%(server)s: uses Microsoft Graph with %(mailbox)s; click Authorize on it, Microsoft asks once "
                    "for the Graph permissions.",
                    server=server.display_name,
                    mailbox=account.email,
                )
            report.append(line)
        if len(self) == 1 and self._microsoft365_in_use() and not self._microsoft365_graph_ready():
            return self.action_microsoft365_authorize()
        return {
            "type": "ir.actions.client",
            "tag": "display_notification",
            "params": {
                "title": self.env._("Use Microsoft Graph"),
                "message": "\n".join(report),
                "className": "text-prewrap",
                "sticky": True,
                "type": "info",
                "next": {"type": "ir.actions.client", "tag": "soft_reload"},
            },
        }

    def _microsoft365_graph_ready(self):
        """True when a Microsoft Graph token can be had for the server's mailbox without a new sign-in."""
        self.ensure_one()
        account = self.microsoft365_account_id.sudo()
        if not account or account.status in ("not_connected", "reconnect"):
            return False
        try:
            account._graph_token()
        except (M365Error, UserError):
            return False
        return True

    def _microsoft365_graph_client(self):
        """A Graph client on the server's mailbox; raises M365Error (with a diagnosis) or UserError."""
        account = self._microsoft365_account().sudo()
        return account._graph_client(account._graph_token())

    def action_microsoft365_authorize(self):
        self.ensure_one()
        return self._microsoft365_account()._authorize(origin=self)

    def action_microsoft365_info(self):
        return self._microsoft365_account().action_open()
