"""Health of OAuth accounts and app registrations: checked by a daily scheduled action, shown on
the records, and brought to the responsible people once per problem."""

import contextlib
import logging
import threading
import time
from datetime import timedelta

import psycopg2
from psycopg2.extensions import TRANSACTION_STATUS_INERROR

from odoo import api, fields, models
from odoo.exceptions import UserError
from odoo.tools import plaintext2html

from ..m365.errors import M365Error
from .ir_cron import cron_pass_deadline, stay_due_for_next_pass

_logger = logging.getLogger(__name__)

# Refresh tokens die after 90 days without use: an idle one is redeemed well before that.
KEEPALIVE_AFTER = timedelta(days=14)
SECRET_WARNING = timedelta(days=30)
HEALTH_BATCH = 100  # accounts per committed batch (those kept alive commit on their own)
HEALTH_RUN_SECONDS = 60  # at most per run, within the cron pass's budget (ir_cron.cron_pass_deadline)
HEALTH_PROBLEMS = [
    ("ok", "OK"),
    ("reconnect", "Reconnect needed"),
    ("failing", "Not working"),
    ("fetch_failing", "Fetching fails"),
    ("secret_expiring", "Client secret expires soon"),
]


class Microsoft365Account(models.Model):
    _inherit = "microsoft365.account"

    health = fields.Selection(HEALTH_PROBLEMS, default="ok", required=True, readonly=True, copy=False)
    health_message = fields.Text(readonly=True, copy=False)
    health_notified = fields.Char(
        readonly=True,
        copy=False,
        groups="base.group_system",
        help="The problem the responsible people were last told about.",
    )

    @api.model
    def _cron_health_check(self):
        """Committed in batches (Odoo 18's cron progress API): an Odoo transaction (REPEATABLE READ)
        can neither see nor overwrite an account row another transaction changed after it began
        ("could not serialize access due to concurrent update"), and a keep-alive refresh commits on
        its own cursor. So an account kept alive starts a new transaction before its health is
        written, a concurrent change is retried in a new one, and each account's health is written
        under a savepoint: one account's failure is logged and undoes nothing of the others."""
        account_ids = self.search([]).ids  # pylint: disable=no-search-all  # every account, by design
        # Keep-alive refreshes take a round trip each: the run stops within the cron pass's budget, and Odoo
        # runs the job again for the rest (accounts refreshed meanwhile are quick to check again).
        deadline = cron_pass_deadline(self.env, HEALTH_RUN_SECONDS)
        done = 0
        for account_id in account_ids:
            if time.monotonic() > deadline:
                break
            self._check_health_of(account_id)
            done += 1
            if done % HEALTH_BATCH == 0:
                self.env["ir.cron"]._notify_progress(done=done, remaining=len(account_ids) - done)
                self._health_commit()
        self.env["ir.cron"]._notify_progress(done=done, remaining=len(account_ids) - done)
        if done < len(account_ids):
            if not done:
                stay_due_for_next_pass(self.env)
            self._health_commit()
            return
        self._health_commit()
        self.env["microsoft365.app"].search([])._update_health()  # pylint: disable=no-search-all

    @api.model
    def _check_health_of(self, account_id):
        try:
            account = self.browse(account_id).exists()
            if not account:
                return
            if account.status == "connected" and (
                not account.last_refresh or account.last_refresh < fields.Datetime.now() - KEEPALIVE_AFTER
            ):
                self._health_commit()  # the batch so far is kept whatever happens to this refresh
                with contextlib.suppress(M365Error, UserError):  # recorded on the account, reported below
                    account._access_token(force_refresh=True)
                # The refresh committed on its own cursor: write in a transaction that begins after it.
                self._health_commit()
            for attempt in (1, 2):
                try:
                    with self.env.cr.savepoint():
                        account._update_health()
                    return
                except psycopg2.errors.SerializationFailure:
                    # Another worker changed the account meanwhile (a fetch refreshed its token):
                    # once more in a transaction that sees it.
                    self.env.invalidate_all()
                    if attempt == 2:
                        raise
                    self._health_commit()
        except Exception:
            if _auto_commit() and self.env.cr._cnx.info.transaction_status == TRANSACTION_STATUS_INERROR:
                self.env.cr.rollback()  # outside the savepoint: nothing of this batch is left uncommitted
            self.env.invalidate_all()
            _logger.exception("Health check of Microsoft 365 account %s failed; the others go on", account_id)

    def _health_commit(self):
        if _auto_commit():
            self.env.cr.commit()  # pylint: disable=invalid-commit  # see _cron_health_check
            self.env.invalidate_all()  # read what other workers committed meanwhile

    def _current_problem(self):
        self.ensure_one()
        if self.status == "reconnect":
            return "reconnect", self.last_error or self.env._("Authorize the mailbox again.")
        if self.status == "failing" and self.last_error:
            return "failing", self.last_error
        failing = self.sudo().incoming_server_ids.filtered("microsoft365_fetch_error")
        if failing:
            server = failing[0]
            return "fetch_failing", self.env._(
                "The last fetch of %(server)s failed on %(when)s: %(error)s",
                server=server.name,
                when=server.microsoft365_fetch_failed_at,
                error=server.microsoft365_fetch_error,
            )
        given_up = self.sudo().incoming_server_ids.filtered("microsoft365_failed_summary")
        if given_up:
            return "fetch_failing", self.env._(
                "%(server)s left messages it could not process on the server:\n%(messages)s",
                server=given_up[0].name,
                messages=given_up[0].microsoft365_failed_summary,
            )
        if self.app_id._secret_expiring():
            return "secret_expiring", self.app_id._secret_expiry_message()
        return "ok", False

    def _update_health(self):
        for account in self.sudo():
            problem, message = account._current_problem()
            if (account.health, account.health_message) != (problem, message):
                account.write({"health": problem, "health_message": message})
            key = f"{problem}:{message}"
            if problem == "ok":
                if account.health_notified:
                    account.health_notified = False
            elif account.health_notified != key:
                if not (problem == "failing" and account.app_id.problem):  # told once, on the app registration
                    account._notify_responsible(message)
                account.health_notified = key

    def _responsible_users(self):
        if self.owner_user_id:
            return self.owner_user_id
        return (
            self.env.ref("base.group_system")
            .sudo()
            .users.filtered(
                lambda user: user.active and not user.share and user.id != self.env.ref("base.user_root").id
            )
        )

    def _notify_responsible(self, message):
        for user in self._responsible_users():
            self.activity_schedule(
                "mail.mail_activity_data_todo",
                user_id=user.id,
                summary=self.env._("Microsoft 365 mailbox %s needs attention", self.email),
                note=plaintext2html(message),  # carries subjects and senders of external mail
            )


def _auto_commit():
    """Odoo's own test: a test's thread shares one transaction that must not be committed."""
    return not getattr(threading.current_thread(), "testing", False)


class Microsoft365App(models.Model):
    _inherit = "microsoft365.app"

    health_message = fields.Text(compute="_compute_health_message")
    secret_expiry_notified = fields.Date(readonly=True, copy=False)
    problem_notified = fields.Text(readonly=True, copy=False, groups="base.group_system")

    @api.depends("secret_expires_on", "certificate_expires_on", "credential_type")
    def _compute_health_message(self):
        for app in self:
            app.health_message = app._secret_expiry_message() if app._secret_expiring() else False

    def _secret_expiring(self):
        self.ensure_one()
        expires_on = self._credential_expires_on()
        return bool(expires_on) and expires_on <= fields.Date.today() + SECRET_WARNING

    def _secret_expiry_message(self):
        expires_on = self._credential_expires_on()
        if self.credential_type == "certificate":
            if expires_on < fields.Date.today():
                return self.env._(
                    "The certificate of %(app)s expired on %(date)s: create a new one, upload it to Entra ID > "
                    "Certificates & secrets and here.",
                    app=self.name,
                    date=expires_on,
                )
            return self.env._(
                "The certificate of %(app)s expires on %(date)s: create a new one, upload it to Entra ID > "
                "Certificates & secrets and here before then.",
                app=self.name,
                date=expires_on,
            )
        if expires_on < fields.Date.today():
            return self.env._(
                "The client secret of %(app)s expired on %(date)s: create a new one in Entra ID > Certificates "
                "& secrets and enter it here.",
                app=self.name,
                date=expires_on,
            )
        return self.env._(
            "The client secret of %(app)s expires on %(date)s: create a new one in Entra ID > Certificates "
            "& secrets and enter it here before then.",
            app=self.name,
            date=expires_on,
        )

    def _update_health(self):
        admins = (
            self.env.ref("base.group_system")
            .sudo()
            .users.filtered(
                lambda user: user.active and not user.share and user.id != self.env.ref("base.user_root").id
            )
        )
        for app in self.sudo():
            if app.problem and app.problem_notified != app.problem:
                # Microsoft refused the app registration itself: once here, not once per mailbox.
                for user in admins:
                    app.activity_schedule(
                        "mail.mail_activity_data_todo",
                        user_id=user.id,
                        summary=self.env._("App registration %s is refused by Microsoft", app.name),
                        note=plaintext2html(app.problem),
                    )
                app.problem_notified = app.problem
            elif not app.problem and app.problem_notified:
                app.problem_notified = False
            if not app._secret_expiring() or app.secret_expiry_notified == app._credential_expires_on():
                continue
            for user in admins:
                app.activity_schedule(
                    "mail.mail_activity_data_todo",
                    user_id=user.id,
                    summary=self.env._("Client secret of %s expires soon", app.name),
                    note=plaintext2html(app._secret_expiry_message()),
                )
            app.secret_expiry_notified = app._credential_expires_on()
