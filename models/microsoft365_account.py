import logging
import time
from collections import defaultdict
from urllib.parse import urlsplit

from odoo import api, fields, models
from odoo.exceptions import AccessError, UserError, ValidationError
from odoo.tools import SQL

from ..m365 import diagnosis, graph, identifiers, mailcheck
from ..m365.errors import (
    AuthorizationFailed,
    InvalidInput,
    M365Error,
    MailLoginFailed,
    ReconnectRequired,
    TransientFailure,
)
from ..m365.identity import http_session, unverified_claims
from .microsoft365_app import REFRESH_MARGIN, _memo_key, _own_connection_lost_is_passing, _remember, _remembered

_logger = logging.getLogger(__name__)


class Microsoft365Unavailable(UserError):
    """Microsoft's sign-in service (or the way to it) is away for now: busy (429), down (5xx), silent or
    unreachable. Nothing to change: a UserError in plain words for buttons, and the typed sign by which Odoo's
    mail queue keeps a mail for its next run instead of failing it (ir_mail_server, mail_mail)."""


def _for_use(env, exc):
    """The UserError in plain words for a token refusal; a passing one is a Microsoft365Unavailable."""
    found = getattr(exc, "diagnosis", None)
    text = explain(env, found) if found else str(exc)
    return Microsoft365Unavailable(text) if isinstance(exc, TransientFailure) else UserError(text)


class Microsoft365Account(models.Model):
    """One Microsoft 365 mailbox connected with OAuth: its grant, token cache and status."""

    _name = "microsoft365.account"
    _inherit = ["mail.thread", "mail.activity.mixin"]
    _description = "Microsoft 365 OAuth account"
    _order = "email, id"
    _rec_name = "email"

    email = fields.Char(
        string="Mailbox", required=True, index=True, help="The address of the mailbox Odoo reads and sends from."
    )
    app_id = fields.Many2one("microsoft365.app", string="App registration", required=True, ondelete="restrict")
    # What a user the account is visible for may see of the (administrators-only) app and servers.
    app_name = fields.Char(related="app_id.name", string="App")
    server_summary = fields.Text(string="Mail servers", compute="_compute_server_summary")
    company_id = fields.Many2one(related="app_id.company_id", store=True)
    status = fields.Selection(
        [
            ("not_connected", "Not connected"),
            ("connected", "Connected"),
            ("failing", "Not working"),
            ("reconnect", "Reconnect needed"),
            ("app_only", "App-only (no sign-in)"),
        ],
        default="not_connected",
        required=True,
        readonly=True,
        copy=False,
    )
    username = fields.Char(string="Signed-in account", readonly=True, copy=False)
    tenant_id = fields.Char(readonly=True, copy=False)
    scopes = fields.Char(string="Granted scopes", readonly=True, copy=False)
    connected_since = fields.Datetime(readonly=True, copy=False)
    token_expires_at = fields.Datetime(string="Access token expiry", readonly=True, copy=False)
    last_refresh = fields.Datetime(readonly=True, copy=False)
    last_error = fields.Text(readonly=True, copy=False)
    signed_in_as_other = fields.Boolean(compute="_compute_signed_in_as_other")
    signed_in_as_other_message = fields.Char(string="Signed in as another user", compute="_compute_signed_in_as_other")
    is_administrator = fields.Boolean(compute="_compute_is_administrator")
    owner_user_id = fields.Many2one(
        "res.users",
        string="Only visible for",
        help="This user sees the account and its servers, and can authorize, test and revoke it. "
        "Empty: administrators only.",
    )
    sender_name = fields.Char(
        string="Name displayed",
        help="Sender name shown to recipients of mail sent through this mailbox when the From address is the "
        "mailbox itself without a name (for example system notifications). A From that already carries a "
        "name (a user's or the company's) keeps it.",
    )
    home_account_id = fields.Char(groups="base.group_system", readonly=True, copy=False)
    token_cache_sealed = fields.Text(groups=fields.NO_ACCESS, copy=False)
    incoming_server_ids = fields.One2many("fetchmail.server", "microsoft365_account_id")
    outgoing_server_ids = fields.One2many("ir.mail_server", "microsoft365_account_id")

    _sql_constraints = [
        ("email_app_unique", "unique(email, app_id)", "This mailbox is already connected with this app registration."),
    ]

    @api.model_create_multi
    def create(self, vals_list):
        accounts = super().create([self._normalise(vals) for vals in vals_list])
        accounts._sync_app_only_status()
        return accounts

    def write(self, vals):
        moved = self.browse()
        if "app_id" in vals:
            # Tokens belong to the app registration that obtained them: another app starts afresh.
            moved = self.filtered(lambda account: account.app_id.id != vals["app_id"])
        result = super().write(self._normalise(vals))
        if moved:
            moved.sudo().write(dict(_DISCONNECTED, status="not_connected", last_error=False))
            moved._unconfirm_incoming_servers()
            for account in moved:
                account.message_post(
                    body=self.env._(
                        "App registration changed to %s: the tokens of the previous one were forgotten.",
                        account.app_id.name,
                    )
                )
        if "app_id" in vals:
            self._sync_app_only_status()
        return result

    @api.ondelete(at_uninstall=False)
    def _unlink_except_used_by_servers(self):
        for account in self:
            domain = [("microsoft365_account_id", "=", account.id)]
            incoming = self.env["fetchmail.server"].sudo().with_context(active_test=False).search(domain)
            outgoing = self.env["ir.mail_server"].sudo().with_context(active_test=False).search(domain)
            if incoming or outgoing:
                raise UserError(
                    self.env._(
                        "The OAuth account %(mailbox)s cannot be deleted: the mail servers %(servers)s use it. "
                        "Delete those servers, or link them to another account, first.",
                        mailbox=account.email,
                        servers=", ".join(f'"{name}"' for name in (incoming.mapped("name") + outgoing.mapped("name"))),
                    )
                )

    def _sync_app_only_status(self):
        """Mailboxes of an app-only registration need no sign-in: their status says so."""
        for account in self:
            app_only = account.app_id.flow == "app_only"
            if app_only and account.status != "app_only":
                account.status = "app_only"
            elif not app_only and account.status == "app_only":
                account.status = "not_connected"

    def _normalise(self, vals):
        try:
            if vals.get("email") is not None:
                vals = dict(vals, email=identifiers.parse_mailbox(vals["email"]))
            if vals.get("sender_name"):
                vals = dict(vals, sender_name=identifiers.parse_display_name(vals["sender_name"]))
        except InvalidInput as exc:
            raise ValidationError(self.env._(exc.message, **exc.params)) from None
        return vals

    @api.model
    def _find_or_create(self, mailbox, app=None):
        """The account of `mailbox` with `app` (else any existing one, else created with the default
        app registration)."""
        mailbox = self._normalise({"email": mailbox})["email"]
        domain = [("email", "=", mailbox)] + ([("app_id", "=", app.id)] if app else [])
        account = self.search(domain, limit=1)
        if account:
            return account
        app = app or self.env["microsoft365.app"]._default_app()
        if not app:
            if self.env["microsoft365.app"].search_count([], limit=1):
                raise ValidationError(
                    self.env._(
                        "Several app registrations exist and none is the default: choose the App registration "
                        "on the mail server for %s (or a default one in General Settings > Emails).",
                        mailbox,
                    )
                )
            raise ValidationError(
                self.env._(
                    "There is no app registration for Microsoft 365 yet: create one (Settings > "
                    "Technical > Microsoft 365 (OAuth) > App registrations) or choose the "
                    "default one in General Settings."
                )
            )
        return self.create({"email": mailbox, "app_id": app.id})

    @api.depends("username", "email")
    def _compute_signed_in_as_other(self):
        for account in self:
            account.signed_in_as_other = bool(account.username) and account.username != account.email
            # One sentence, so that each language can order it its own way.
            account.signed_in_as_other_message = account.signed_in_as_other and self.env._(
                "Signed in as %(user)s, not as the mailbox %(mailbox)s. That is right for a shared mailbox this "
                "account has Full Access to; otherwise click Renew and sign in as %(mailbox)s.",
                user=account.username,
                mailbox=account.email,
            )

    def _compute_is_administrator(self):
        self.is_administrator = self.env.user.has_group("base.group_system")

    @api.depends(
        "incoming_server_ids.state",
        "incoming_server_ids.microsoft365_transport",
        "outgoing_server_ids.microsoft365_transport",
    )
    def _compute_server_summary(self):
        for account in self:
            sudo = account.sudo()
            lines = [
                self.env._(
                    "Incoming: %(name)s (%(protocol)s, %(state)s)",
                    name=server.name,
                    protocol="Microsoft Graph"
                    if server.microsoft365_transport == "graph"
                    else server.server_type.upper(),
                    state=self.env._("confirmed") if server.state == "done" else self.env._("not confirmed"),
                )
                for server in sudo.incoming_server_ids
            ]
            lines += [
                self.env._("Outgoing: %(name)s (Microsoft Graph)", name=server.name)
                if server.microsoft365_transport == "graph"
                else self.env._("Outgoing: %(name)s (SMTP)", name=server.name)
                for server in sudo.outgoing_server_ids
            ]
            account.server_summary = "\n".join(lines) or self.env._("No mail server uses this account yet.")

    # Actions ----------------------------------------------------------------------------------

    def _check_may_manage(self):
        for account in self:
            if not (self.env.user.has_group("base.group_system") or account.owner_user_id == self.env.user):
                raise AccessError(
                    self.env._("Only an administrator or the user this account is visible for may manage it.")
                )

    def action_authorize(self):
        """Start the sign-in at Microsoft (also used to renew a connection)."""
        return self._authorize()

    def _authorize(self, origin=None, confirm_servers=False):
        """The sign-in at Microsoft; the callback returns to `origin` (a mail server) if given, and
        tests and confirms the account's servers if `confirm_servers`."""
        self.ensure_one()
        self._check_may_manage()
        if self.app_id.flow == "app_only":
            raise UserError(
                self.env._(
                    "The app registration %s uses application permissions: its mailboxes need no sign-in. "
                    "Use Test connection.",
                    self.app_id.name,
                )
            )
        return (
            self.env["microsoft365.authorization"]
            .sudo()
            ._start(self.sudo(), origin=origin, confirm_servers=confirm_servers)
        )

    def action_revoke(self):
        self._check_may_manage()
        unconfirmed = self.env["fetchmail.server"]
        for account in self.sudo():
            status = "app_only" if account.app_id.flow == "app_only" else "not_connected"
            account.write(dict(_DISCONNECTED, status=status, last_error=False))
            if status == "not_connected":
                unconfirmed |= account._unconfirm_incoming_servers()
            account.message_post(body=self.env._("Authorization revoked by %s.", self.env.user.name))
        message = self.env._(
            "Odoo forgot every token of this mailbox. To remove the consent on Microsoft's side too, "
            "open https://myapps.microsoft.com (your own consent) or Entra ID > Enterprise applications "
            "> the app > Permissions (organisation consent)."
        )
        if unconfirmed:
            message += "\n" + self.env._(
                "Incoming servers set back to Not Confirmed (Odoo stops fetching them): %s. Confirm them again "
                "after the next Authorize.",
                ", ".join(unconfirmed.mapped("name")),
            )
        return self._notify(self.env._("Authorization revoked"), message, "warning")

    def _unconfirm_incoming_servers(self):
        """Without a grant the scheduler must not fetch: confirmed servers go back to draft."""
        servers = self.sudo().incoming_server_ids.filtered(
            lambda s: s.connect_with == "microsoft365" and s.state == "done"
        )
        servers.write({"state": "draft"})
        return servers

    def _mailbox_checks(self, incoming_only=False):
        """(protocol, check, host, port) of every login that Test connection makes."""
        self.ensure_one()
        cloud = self.app_id._cloud()
        checks = []
        # Servers that go through Microsoft Graph are checked there (_graph_failures), not here.
        incoming = self.incoming_server_ids.filtered(lambda s: s.connect_with == "microsoft365")
        for server in incoming.filtered(lambda s: s.microsoft365_transport != "graph"):
            check = mailcheck.check_pop3 if server.server_type == "pop" else mailcheck.check_imap
            checks.append((server.server_type.upper().replace("POP", "POP3"), check, server.server, server.port))
        if not incoming:
            checks.append(("IMAP", mailcheck.check_imap, cloud.imap_host, cloud.imap_port))
        if incoming_only:
            return checks
        outgoing = self.outgoing_server_ids.filtered(lambda s: s.smtp_authentication == "microsoft365")
        for server in outgoing.filtered(lambda s: s.microsoft365_transport != "graph"):
            checks.append(("SMTP", mailcheck.check_smtp, server.smtp_host, server.smtp_port))
        if not outgoing:
            checks.append(("SMTP", mailcheck.check_smtp, cloud.smtp_host, cloud.smtp_port))
        return checks

    def _mailbox_failures(self, token, checks):
        """[(protocol, host, port, diagnosis)] of the logins in `checks` that failed with `token`."""
        self.ensure_one()
        app = self.app_id
        failures = []
        for protocol, check, host, port in checks:
            # SMTP AUTH takes only the signed-in user; IMAP and POP3 open the mailbox itself.
            login = self._smtp_login_user() if protocol == "SMTP" else self.email
            try:
                check(host, int(port), login, token, ca_file=app._mail_ca_file())
            except MailLoginFailed as exc:
                # A refused login in app-only words; a server that cannot be reached stays a
                # connection failure, which says nothing about Exchange's permissions.
                failures.append((protocol, host, port, self._diagnose_mail_refusal(exc.diagnosis, token)))
        return failures

    def action_test_connection(self):
        """Log in with XOAUTH2 where this mailbox is used (IMAP or POP3, and SMTP) without reading
        or sending anything; green, or the reason in plain words. The status follows the result."""
        self.ensure_one()
        self._check_may_manage()
        account = self.sudo()
        checks, failures, warnings = [], [], []
        if account._uses_exchange():
            token = account._access_token_for_use()
            checks = account._mailbox_checks()
            failures = account._mailbox_failures(token, checks)
        tested = ", ".join(f"{protocol} {host}:{port}" for protocol, _check, host, port in checks)
        if account._uses_graph():
            graph_token = account._graph_token_for_use()
            failures += account._graph_failures(graph_token)
            warnings = account._graph_warnings(graph_token)
            host = urlsplit(account.app_id._cloud().graph_url).hostname
            tested = ", ".join(filter(None, [tested, f"Microsoft Graph {host}"]))
        if failures:
            text = "\n\n".join(
                f"{protocol} {host}{':' if port else ''}{port}: {explain(self.env, found)}"
                for protocol, host, port, found in failures
            )
            account._record_test_failure(text)
            raise UserError(
                self.env._("Connection test failed for %(mailbox)s.", mailbox=account.email) + "\n\n" + text
            )
        if account.status == "failing" or account.last_error:
            account.write(
                {"status": "connected" if account.status == "failing" else account.status, "last_error": False}
            )
        if account.app_id.problem:
            account.app_id.problem = False
        message = self.env._("%(mailbox)s accepts the OAuth token: %(tested)s.", mailbox=account.email, tested=tested)
        for found in warnings:
            message += "\n\n" + explain(self.env, found)
        if account._smtp_login_user() != account.email:
            message += "\n" + self.env._(
                "SMTP signs in as %(login)s and sends from %(mailbox)s. Nothing was sent: Exchange checks Send As "
                "for %(mailbox)s at the first send only. If that send is refused, grant it in Exchange Online "
                'PowerShell: Add-RecipientPermission -Identity "%(mailbox)s" -Trustee %(trustee)s -AccessRights SendAs',
                login=account._smtp_login_user(),
                mailbox=account.email,
                trustee=account._send_as_trustee(),
            )
        # The first successful test proves a switch to OAuth: the servers' old passwords can go.
        account.incoming_server_ids._microsoft365_after_successful_test()
        account.outgoing_server_ids._microsoft365_after_successful_test()
        return self._notify(self.env._("Connection test successful"), message, "success")

    def _smtp_login_user(self):
        """The user= of SMTP AUTH. Exchange accepts only the signed-in user (535 5.7.3 otherwise) or,
        app-only, the mailbox itself; a shared mailbox's address goes in From and needs Send As."""
        self.ensure_one()
        if self.app_id.flow == "app_only":
            return self.email
        return self.username or self.email

    def _send_as_trustee(self):
        """Who needs Send As on a sender address, as Add-RecipientPermission's -Trustee."""
        self.ensure_one()
        if self.app_id.flow == "app_only":
            return f"(Get-ServicePrincipal -Identity {self.app_id.client_id}).Identity"
        return f'"{self._smtp_login_user()}"'

    def _explain_mail_refusal(self, found, token=None):
        """explain() of _diagnose_mail_refusal()."""
        return explain(self.env, self._diagnose_mail_refusal(found, token))

    def _diagnose_mail_refusal(self, found, token=None):
        """A refused login of an app-only registration in app-only words (its Exchange application
        permission, admin consent, service principal, mailbox permission); other diagnoses as they are."""
        self.ensure_one()
        app = self.app_id
        protocol = found.code.split(" ", 1)[0]
        login_refused = found.code == "SMTP 5.7.3" or found.code.endswith(("AUTHENTICATE", "NOT CONNECTED"))
        if app.flow != "app_only" or not login_refused or protocol not in diagnosis.APP_ROLES:
            return found
        try:
            roles = unverified_claims(token or self._access_token()).get("roles", [])
        except (M365Error, UserError):  # no token to read the roles from: the refusal as it came
            return found
        return diagnosis.diagnose_app_only(
            protocol, found, roles, app_id=app.client_id, app_name=app.name, mailbox=self.email
        )

    def _confirm_servers(self):
        """Test the account's servers and confirm the incoming ones, so that Odoo's scheduler fetches
        them; what could not be done, in plain words (empty: mail flows both ways)."""
        self.ensure_one()
        left = []
        account = self.sudo()
        for server in account.incoming_server_ids.filtered(lambda s: s.connect_with == "microsoft365"):
            if server.state == "done":
                continue
            try:
                with self.env.cr.savepoint():
                    server.button_confirm_login()
            except UserError as exc:
                left.append(
                    self.env._(
                        "Incoming server %(server)s is not confirmed: %(reason)s",
                        server=server.name,
                        reason=exc.args[0],
                    )
                )
        for server in account.outgoing_server_ids.filtered(lambda s: s.smtp_authentication == "microsoft365"):
            try:
                with self.env.cr.savepoint():
                    server.test_smtp_connection()
            except UserError as exc:
                left.append(
                    self.env._(
                        "Outgoing server %(server)s cannot send: %(reason)s", server=server.name, reason=exc.args[0]
                    )
                )
        return left

    def _record_test_failure(self, text):
        """A failed test is kept (the button's transaction is rolled back with the error)."""
        values = {"last_error": text}
        if self.status == "connected":
            values["status"] = "failing"
        self._keep_after_rollback(values)

    def _keep_after_rollback(self, values):
        self.write(values)
        account_id = self.id

        def keep_after_rollback():
            # A button (Test connection, Fetch now) rolls the transaction back with the error;
            # what it found must survive it. The row lock is released by then.
            with self.env.registry.cursor() as cr:
                self.env(cr=cr)[self._name].browse(account_id).sudo().write(values)

        self.env.cr.postrollback.add(keep_after_rollback)

    def action_open(self):
        self.ensure_one()
        return {
            "type": "ir.actions.act_window",
            "res_model": self._name,
            "res_id": self.id,
            "view_mode": "form",
            # Odoo completes "views" only for an action a button returns, not for one handed on as a
            # notification's "next": without it the web client fails.
            "views": [(False, "form")],
            "target": "current",
        }

    def _notify(self, title, message, kind):
        return {
            "type": "ir.actions.client",
            "tag": "display_notification",
            "params": {
                "title": title,
                "message": message,
                "type": kind,
                "sticky": kind != "success",
                "next": {"type": "ir.actions.act_window_close"},
            },
        }

    # Tokens -----------------------------------------------------------------------------------

    def _store_sign_in(self, client, sign_in, renewed=None):
        """Called by the callback once Microsoft returned the tokens. The signed-in account must
        open the mailbox (the IMAP or POP3 login Test connection makes, ``user=`` the mailbox: the
        owner, or a delegate with Full Access to a shared mailbox); if the mail server refuses it,
        nothing is stored and MailLoginFailed says why. A server that cannot be reached stores the
        sign-in as "Not working", with the reason."""
        self.ensure_one()
        renewed = self.status != "not_connected" if renewed is None else renewed
        # Signed in for Microsoft Graph (Mail.* scopes, with or without the resource in front, as Microsoft
        # answers them): the mailbox is opened through Graph; for Exchange's scopes, over IMAP/POP3.
        graph_sign_in = (
            any(scope.rsplit("/", 1)[-1].startswith("Mail.") for scope in sign_in.scopes)
            if sign_in.scopes
            else self._uses_graph()
        )
        cloud = self.app_id._cloud()
        scopes = cloud.graph_scopes() if graph_sign_in else cloud.delegated_scopes()
        token = sign_in.access_token or client.access_token(scopes, sign_in.home_account_id).token
        if graph_sign_in:
            failures = self.sudo()._graph_failures(token)
        else:
            failures = self.sudo()._mailbox_failures(token, self.sudo()._mailbox_checks(incoming_only=True))
        refused = [found for _protocol, _host, _port, found in failures if not found.code.endswith(" CONNECT")]
        if refused:
            found = diagnosis.diagnose_sign_in_refused(refused[0], username=sign_in.username, mailbox=self.email)
            _logger.info(
                "Microsoft 365 account %s: the sign-in of another account was refused (%s)", self.id, found.code
            )
            self.message_post(
                body=self.env._(
                    "Sign-in as %(username)s refused: %(reason)s",
                    username=sign_in.username,
                    reason=explain(self.env, found),
                )
            )
            raise MailLoginFailed(found)
        unreachable = "\n".join(
            f"{protocol} {host}:{port}: {explain(self.env, found)}" for protocol, host, port, found in failures
        )
        self.sudo().write(
            {
                "status": "failing" if unreachable else "connected",
                "username": sign_in.username,
                "tenant_id": sign_in.tenant_id,
                "home_account_id": sign_in.home_account_id,
                "scopes": " ".join(s for s in sign_in.scopes if "/" in s),
                "connected_since": fields.Datetime.now(),
                "token_expires_at": _datetime(sign_in.expires_at),
                "last_refresh": fields.Datetime.now(),
                "last_error": unreachable or False,
                "token_cache_sealed": self.env["microsoft365.vault"]._encrypt(client.cache.serialize()),
            }
        )
        self.message_post(
            body=(
                self.env._("Authorization renewed: signed in as %s.", sign_in.username)
                if renewed
                else self.env._("Authorized: signed in as %s.", sign_in.username)
            )
        )

    def _adopt_refresh_token(self, refresh_token):
        """Connect with a refresh token another module obtained (migration); on refusal the account
        says why and waits for Authorize."""
        self.ensure_one()
        client = self.app_id._identity_client()
        try:
            sign_in = client.import_refresh_token(refresh_token, self.app_id._cloud().delegated_scopes())
            self._store_sign_in(client, sign_in)  # refused if that account cannot open the mailbox
        except M365Error as exc:
            found = getattr(exc, "diagnosis", None)
            self.sudo().write(
                {
                    "status": "reconnect" if isinstance(exc, ReconnectRequired) else "not_connected",
                    "last_error": explain(self.env, found) if found else str(exc),
                }
            )
            return False
        return True

    def _access_token(self, force_refresh=False):
        """A valid access token for this mailbox.

        Served from MSAL's cache while it has more than 5 minutes left, without any write. A refresh
        runs in its own short transaction, under a row lock and committed at once: two workers never
        spend the same refresh token, and the rotated one is kept even if the caller's transaction
        is rolled back later (a failed fetch, a failed send)."""
        self.ensure_one()
        account = self.sudo()
        if account.app_id.flow == "app_only":
            return account._app_only_token(account.app_id._app_access_token)
        account._check_connected()
        fresh = account.token_expires_at and account.token_expires_at.timestamp() - time.time() > REFRESH_MARGIN
        if fresh and not force_refresh:
            memo_key = _memo_key(account, "exchange", account.token_cache_sealed)
            remembered = _remembered(memo_key)
            if remembered:
                return remembered.token  # no decryption, no MSAL object: this very cache state's token
            client = account._identity_client_from(account.token_cache_sealed)
            token = account._token_from(client, self.env.cr, committed=False)
            if client.changed_cache_state() is None:
                _remember(memo_key, token)
                return token.token
        return account._refresh_serialised(force_refresh)

    def _uses_graph(self):
        """True when a mail server of this account sends or fetches through Microsoft Graph."""
        self.ensure_one()
        account = self.sudo()
        return any(
            s.microsoft365_transport == "graph" and s._microsoft365_in_use() for s in account.incoming_server_ids
        ) or any(s.microsoft365_transport == "graph" and s._microsoft365_in_use() for s in account.outgoing_server_ids)

    def _uses_exchange(self):
        """True when a mail server of this account signs in to IMAP, POP3 or SMTP (or none uses Graph)."""
        self.ensure_one()
        account = self.sudo()
        servers = [s for s in (*account.incoming_server_ids, *account.outgoing_server_ids) if s._microsoft365_in_use()]
        return not account._uses_graph() or any(s.microsoft365_transport != "graph" for s in servers)

    def _graph_client(self, token, **context):
        """A Graph client on this mailbox, with what its diagnoses name (app, signed-in user)."""
        self.ensure_one()
        app = self.app_id.sudo()
        delegated = app.flow != "app_only"
        return graph.GraphClient(
            app._cloud().graph_url,
            token,
            self.email,
            session=http_session(app._mail_ca_file()),
            renew_token=(lambda: self._graph_token(force_refresh=True)) if delegated else None,
            app_only=app.flow == "app_only",
            app_id=app.client_id,
            app_name=app.name,
            login=self._smtp_login_user(),
            **context,
        )

    def _graph_failures(self, token):
        """[("GRAPH", host, "", diagnosis)] of what Test connection checks through Microsoft Graph: each
        incoming server's folder is opened; the token must carry the permission to send."""
        self.ensure_one()
        account = self.sudo()
        host = urlsplit(account.app_id._cloud().graph_url).hostname
        client = account._graph_client(token)
        failures = []
        folders = {
            server.microsoft365_graph_folder or "inbox"
            for server in account.incoming_server_ids
            if server._microsoft365_in_use() and server.microsoft365_transport == "graph"
        } or {"inbox"}
        for folder in sorted(folders):
            try:
                client.folder(folder)
            except graph.GraphFailed as exc:
                failures.append(("GRAPH", host, "", exc.diagnosis))
        claims = unverified_claims(token)
        sends = any(
            s.microsoft365_transport == "graph" and s._microsoft365_in_use() for s in account.outgoing_server_ids
        )
        if sends and "scp" in claims:
            needed = "Mail.Send" if account._smtp_login_user() == account.email else "Mail.Send.Shared"
            if needed not in claims["scp"].split():
                failures.append(
                    (
                        "GRAPH",
                        host,
                        "",
                        graph.diagnose_graph(
                            403,
                            "ErrorAccessDenied",
                            f"{needed} missing",
                            mailbox=account.email,
                            action="send",
                            login=account._smtp_login_user(),
                        ),
                    )
                )
        return failures

    def _graph_warnings(self, token):
        """Test connection's warnings that are no failure: an app-only app that reaches every mailbox."""
        self.ensure_one()
        app = self.app_id.sudo()
        if app.flow != "app_only":
            return []
        found = graph.unscoped_app_warning(
            unverified_claims(token).get("roles", []), app_id=app.client_id, app_name=app.name, mailbox=self.email
        )
        return [found] if found else []

    def _sign_in_scopes(self):
        """What Authorize asks for: Microsoft Graph's mail scopes once a server of the mailbox uses Graph (a
        refresh token serves both resources afterwards, as far as consent goes), else Exchange's."""
        cloud = self.app_id._cloud()
        return cloud.graph_scopes() if self._uses_graph() else cloud.delegated_scopes()

    def _graph_token(self, force_refresh=False):
        """A Microsoft Graph access token for this mailbox: the second resource of the account's MSAL
        cache (no second sign-in), app-only from the app's cache. Served from the cache while fresh, a
        refresh happens under the row lock as for Exchange (always with `force_refresh`: Graph refused the
        cached one). Raises M365Error with a diagnosis."""
        self.ensure_one()
        account = self.sudo()
        if account.app_id.flow == "app_only":
            return account._app_only_token(account.app_id._app_graph_token)
        account._check_connected()
        scopes = account.app_id._cloud().graph_scopes()
        if force_refresh:
            return account._refresh_serialised(force_refresh=True, scopes=scopes)
        # Served while it has REFRESH_MARGIN left, as the Exchange token is (also from the per-process memo of
        # this very cache state); under it, the refresh under the lock.
        memo_key = _memo_key(account, "graph", account.token_cache_sealed)
        remembered = _remembered(memo_key)
        if remembered:
            return remembered.token
        client = account._identity_client_from(account.token_cache_sealed)
        cached = client.cached_access_token(scopes, account.home_account_id, margin=REFRESH_MARGIN)
        if cached:
            _remember(memo_key, cached)
            return cached.token
        return account._refresh_serialised(scopes=scopes)

    def _app_only_token(self, get_token):
        """App-only, Exchange or Graph: the app registration's token (`get_token`, one of its token methods);
        a refusal is recorded on this account too."""
        try:
            return get_token().token
        except (ReconnectRequired, AuthorizationFailed) as exc:
            self._record_failure_apart(self.status, exc)
            raise

    def _record_failure_apart(self, status, exc):
        """A refusal met outside a refresh's own transaction, recorded in a short transaction of its own that
        commits at once, not in the caller's: the caller may keep its transaction open for long (Odoo's mail
        queue does across the batches whose connection failed), and the rows it would lock there, the
        account's and the app registration's, are those every token request locks on a cursor of its own;
        the worker's next token request would wait for its own transaction until Odoo kills the worker."""
        if self.env.registry.in_test_mode():  # one shared transaction: nothing to wait for
            return self._record_failure(status, exc)
        with self.env.registry.cursor() as cr:
            cr.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            self._record_failure(status, exc, cr)

    def _check_connected(self):
        if self.status in ("not_connected", "app_only") or not self.token_cache_sealed:
            raise UserError(
                self.env._("The mailbox %s is not connected to Microsoft 365 yet: click Authorize.", self.email)
            )

    def _refresh_serialised(self, force_refresh=False, scopes=None):
        self.flush_recordset()  # the SQL below must see what this transaction wrote
        if not self.env.registry.in_test_mode():
            with _own_connection_lost_is_passing(self), self.env.registry.cursor() as cr:
                # READ COMMITTED: after waiting for the lock, read what the other worker committed.
                cr.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                token, written = self._refresh_locked(cr, committed=True, force_refresh=force_refresh, scopes=scopes)
            if written:
                self._show_committed(written)
            if token is not None:
                return token
        # The account was created by the calling transaction (invisible to any other), or tests
        # share one transaction: refresh in it.
        token, _written = self._refresh_locked(self.env.cr, committed=False, force_refresh=force_refresh, scopes=scopes)
        self.invalidate_recordset()
        if token is None:
            raise UserError(
                self.env._("The mailbox %s is not connected to Microsoft 365 yet: click Authorize.", self.email)
            )
        return token

    def _refresh_locked(self, cr, committed, force_refresh=False, scopes=None):
        """(token, the values written on the account row or None), in `cr` under the row lock."""
        cr.execute("SELECT token_cache_sealed FROM microsoft365_account WHERE id = %s FOR NO KEY UPDATE", [self.id])
        row = cr.fetchone()
        if row is None or not row[0]:
            return None, None
        client = self._identity_client_from(row[0])
        token = self._token_from(client, cr, committed, force_refresh, scopes)
        changed = client.changed_cache_state()
        if changed:
            values = {
                "token_cache_sealed": self.env["microsoft365.vault"]._encrypt(changed),
                "last_refresh": fields.Datetime.now(),
                "status": "connected",
                "last_error": False,
            }
            if not scopes:  # Graph's token leaves the Exchange token's expiry alone (its fast path relies on it)
                values["token_expires_at"] = _datetime(token.expires_at)
            cr.execute(
                SQL(
                    "UPDATE microsoft365_account SET %s, write_date = (now() at time zone 'UTC') WHERE id = %s",
                    SQL(", ").join(
                        SQL("%s = %s", SQL.identifier(name), value if value is not False else None)
                        for name, value in values.items()
                    ),
                    self.id,
                )
            )
            # Microsoft accepted the app registration again (a fixed clock, a restored consent...).
            cr.execute(
                "UPDATE microsoft365_app SET problem = NULL WHERE id = %s AND problem IS NOT NULL", [self.app_id.id]
            )
            return token.token, values
        return token.token, None

    def _show_committed(self, values):
        """What a transaction of its own just committed on this account, shown to the caller's
        transaction: its snapshot (REPEATABLE READ) still holds the row as it was, and writing the
        same values again would fail with "could not serialize access due to concurrent update"."""
        for name, value in values.items():
            field = self._fields[name]
            self.env.cache.set(self, field, field.convert_to_cache(value, self))

    def _identity_client_from(self, sealed_cache):
        return self.app_id._identity_client(self.env["microsoft365.vault"]._decrypt(sealed_cache))

    def _token_from(self, client, cr, committed, force_refresh=False, scopes=None):
        """MSAL's answer; a refusal is recorded on the account (in `cr`) and raised."""
        try:
            return client.access_token(
                scopes or self.app_id._cloud().delegated_scopes(), self.home_account_id, force_refresh=force_refresh
            )
        except (ReconnectRequired, AuthorizationFailed) as exc:
            self._record_failure(self._status_after(exc), exc, cr if committed else None)
            raise

    def _status_after(self, exc):
        """Only a lost grant needs a new sign-in; Microsoft or the network being away changes
        nothing; anything else (consent, the app registration's credentials) stops the mail."""
        if isinstance(exc, TransientFailure):
            return self.status
        if isinstance(exc, ReconnectRequired):
            return "reconnect"
        return "failing"

    def _graph_token_for_use(self):
        """_graph_token() for buttons and mail servers: Microsoft's refusal in plain words (UserError)."""
        try:
            return self._graph_token()
        except M365Error as exc:
            raise _for_use(self.env, exc) from None

    def _access_token_for_use(self):
        """_access_token() for buttons and mail servers: Microsoft's refusal as a UserError in plain
        words (the account's status is recorded either way)."""
        try:
            return self._access_token()
        except M365Error as exc:
            raise _for_use(self.env, exc) from None

    def _record_failure(self, status, exc, own_cursor=None):
        _logger.warning("Microsoft 365 account %s: %s", self.id, exc.diagnosis.code)
        found = exc.diagnosis
        values = {"status": status, "last_error": explain(self.env, found)}
        if found.code in diagnosis.APP_REGISTRATION_CODES:
            # Not this mailbox's fault: every mailbox of the app is stopped until the app is fixed.
            values["last_error"] = self.env._(
                "The app registration %(app)s needs attention: %(problem)s",
                app=self.app_id.name,
                problem=values["last_error"],
            )
            self.app_id._flag_problem(explain(self.env, found), own_cursor)
        if own_cursor is not None:  # the refresh's own transaction: commit the failure with it
            own_cursor.execute(
                "UPDATE microsoft365_account SET status = %s, last_error = %s WHERE id = %s",
                [status, values["last_error"], self.id],
            )
            own_cursor.commit()
            self._show_committed(values)
            return
        # Kept when the caller goes on (fetchmail's cron catches and commits) and when it fails.
        self._keep_after_rollback(values)


_DISCONNECTED = {
    "username": False,
    "tenant_id": False,
    "scopes": False,
    "connected_since": False,
    "token_expires_at": False,
    "last_refresh": False,
    "home_account_id": False,
    "token_cache_sealed": False,
}


def explain(env, found):
    """The diagnosis in the user's language: what happened, what to do, what Microsoft said."""
    params = defaultdict(lambda: "?", found.params)
    # The catalogue keys are marked for translation in m365/i18n.py; named values follow translation.
    summary = env._(found.summary) % params  # pylint: disable=translation-not-lazy
    fix = env._(found.fix) % params  # pylint: disable=translation-not-lazy
    return f"{summary}\n{fix}" + (f"\n({found.detail})" if found.detail else "")


def _datetime(epoch):
    return fields.Datetime.to_datetime(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)))
