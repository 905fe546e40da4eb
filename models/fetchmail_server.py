import contextlib
import email
import email.policy
import hashlib
import logging
import time
from datetime import datetime, timedelta
from imaplib import IMAP4, IMAP4_SSL

import psycopg2

from odoo import api, fields, models
from odoo.exceptions import UserError, ValidationError
from odoo.tools import SQL

from odoo.addons.base.models.ir_cron import _intervalTypes
from odoo.addons.mail.models.fetchmail import MAIL_TIMEOUT, IMAP4Connection, POP3Connection

from ..m365.diagnosis import diagnose_connection
from ..m365.errors import M365Error, MailCommandFailed
from ..m365.mailcheck import imap_authenticate, imap_command, pop3_authenticate
from .ir_cron import cron_pass_deadline, stay_due_for_next_pass
from .microsoft365_account import explain

_logger = logging.getLogger(__name__)

MAX_PROCESSING_ATTEMPTS = 3
# Refusals after which the session cannot go on: the other messages wait for the next fetch.
SESSION_ENDING = ("IMAP THROTTLED", "IMAP NOT CONNECTED")

# Fetching across Odoo's cron workers. Core's fetch cron ("Mail: Fetchmail Service") and this addon's
# fetch lanes (cron jobs calling `_microsoft365_fetch_lane`) share the Microsoft 365 servers: each
# claims one mailbox at a time, least recently attempted first, under a PostgreSQL advisory lock taken
# with try-lock semantics (a mailbox another worker holds is skipped, never waited for). The lock is
# session-level on the worker's own connection: it survives the commit after every message (a row lock
# would not), and it dies with the connection (kill -9, a cut connection) so no mailbox stays claimed.
FETCH_LOCK_CLASS = 0x4D333635  # "M365": the first key of the advisory locks, the server id the second
MAILBOX_SECONDS = 30  # default time budget of one mailbox per visit; the rest waits for the next visit
RUN_SECONDS = 60  # default time budget of the fetching in one pass of a cron worker over its ready jobs
MIN_VISIT_SECONDS = 5  # no mailbox is claimed with less time left in the pass than this (or its own budget)


class _IMAP4ConnectionWithTimeout(IMAP4Connection):
    """Odoo's IMAP connection wrapper, with a timeout from the first byte on."""

    def __init__(self, server, port, is_ssl, timeout):  # pylint: disable=super-init-not-called
        self.__obj__ = IMAP4_SSL(server, port, timeout=timeout) if is_ssl else IMAP4(server, port, timeout=timeout)


class _POP3ConnectionWithDeadline(POP3Connection):
    """Odoo's POP3 connection wrapper for a visit with a deadline (time.monotonic()). Odoo's POP3 loop
    connects again for every 50 messages, reading how many there are with STAT, until the mailbox is
    empty: past the deadline STAT answers "none", so the loop ends there and the rest (POP3 deletes a
    message once processed) waits for the next visit."""

    def __init__(self, server, port, is_ssl, timeout, deadline):
        super().__init__(server, port, is_ssl, timeout=timeout)
        self.deadline = deadline

    def stat(self):
        if self.deadline is not None and time.monotonic() > self.deadline:
            return 0, 0
        return self.__obj__.stat()


def _given_up(entry):
    return entry["failures"] >= MAX_PROCESSING_ATTEMPTS


def _header_message_id(fetched):
    """The Message-ID out of a FETCH of BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)], or "" without one."""
    header = next((part[1] for part in fetched if isinstance(part, tuple) and len(part) > 1), b"")
    if not isinstance(header, bytes):
        return ""
    return str(email.message_from_bytes(header, policy=email.policy.default).get("Message-ID") or "").strip()


class FetchmailServer(models.Model):
    _name = "fetchmail.server"
    _inherit = ["fetchmail.server", "microsoft365.server.mixin"]

    connect_with = fields.Selection(
        [("password", "Password"), ("microsoft365", "Microsoft 365 (OAuth)")],
        string="Connect with",
        default="password",
        required=True,
        help="Password: Odoo's usual login. Microsoft 365: OAuth 2.0 (XOAUTH2) with the mailbox's OAuth "
        "account; no password is stored.",
    )

    microsoft365_fetch_error = fields.Text(string="Last fetch error", readonly=True, copy=False)
    microsoft365_fetch_failed_at = fields.Datetime(string="Last fetch failed on", readonly=True, copy=False)
    microsoft365_failed_messages = fields.Json(
        readonly=True,
        copy=False,
        help="Messages Odoo could not process: Message-ID -> failures, subject, sender, last error, and "
        "whether the administrator dismissed them. They stay unread in the mailbox.",
    )
    microsoft365_failed_summary = fields.Text(
        string="Messages left on the server", compute="_compute_microsoft365_failed_summary"
    )
    microsoft365_fetch_attempted_at = fields.Datetime(
        string="Last fetch attempt",
        readonly=True,
        copy=False,
        help="When a scheduled fetch last took this mailbox: mailboxes are fetched least recently attempted first.",
    )
    microsoft365_retry_at = fields.Datetime(
        string="Throttled until",
        readonly=True,
        copy=False,
        help="Microsoft asked Odoo to back off: no connection is attempted before this time.",
    )

    @api.depends("microsoft365_failed_messages")
    def _compute_microsoft365_failed_summary(self):
        for server in self:
            given_up = [
                entry
                for entry in (server.microsoft365_failed_messages or {}).values()
                if _given_up(entry) and not entry.get("dismissed")
            ]
            server.microsoft365_failed_summary = (
                "\n".join(
                    self.env._(
                        "%(subject)s (from %(sender)s): %(error)s",
                        subject=entry["subject"],
                        sender=entry["sender"],
                        error=entry["error"],
                    )
                    for entry in given_up
                )
                or False
            )

    _microsoft365_link_fields = {"connect_with", "user", "microsoft365_account_id"}

    def _microsoft365_in_use(self):
        return self.connect_with == "microsoft365"

    def _microsoft365_mailbox(self):
        return self.user

    def _microsoft365_host(self):
        return self.server

    def _microsoft365_switch_values(self):
        values = {"connect_with": "microsoft365", "is_ssl": True}
        if self.server_type not in ("imap", "pop"):
            values["server_type"] = "imap"
        return values

    def _microsoft365_clear_password(self):
        self.password = False

    def _microsoft365_has_password(self):
        return bool(self.password)

    @api.constrains("connect_with", "server_type", "is_ssl")
    def _check_microsoft365_connection(self):
        for server in self.filtered(lambda s: s._microsoft365_in_use()):
            if server.server_type not in ("imap", "pop"):
                raise ValidationError(
                    self.env._(
                        "Incoming server %s signs in with Microsoft 365 OAuth: its server type must be IMAP or POP.",
                        server.display_name,
                    )
                )
            if not server.is_ssl:
                raise ValidationError(
                    self.env._(
                        "Incoming server %s signs in with Microsoft 365 OAuth: it needs SSL/TLS.", server.display_name
                    )
                )

    @api.onchange("connect_with", "microsoft365_account_id", "server_type")
    def _onchange_connect_with_microsoft365(self):
        if self.connect_with != "microsoft365":
            return
        if not self.microsoft365_account_id and self.user:
            self.microsoft365_account_id = self._microsoft365_account_for(self.user)
        cloud = self._microsoft365_cloud_for(self.microsoft365_account_id)
        if self.server_type not in ("imap", "pop"):
            self.server_type = "imap"
        if cloud:
            self.server = cloud.pop_host if self.server_type == "pop" else cloud.imap_host
            self.port = cloud.pop_port if self.server_type == "pop" else cloud.imap_port
        self.is_ssl = True
        if self.microsoft365_account_id:
            self.user = self.microsoft365_account_id.email
        # A password is kept (hidden) until the first successful test: see _microsoft365_sync_password.

    def _microsoft365_onchange_connection(self):
        self._onchange_connect_with_microsoft365()

    @api.onchange("server_type", "is_ssl", "object_id")
    def onchange_server_type(self):
        # Odoo resets the port to 993/995 here; a Microsoft 365 server keeps its cloud's port.
        result = super().onchange_server_type()
        if self.connect_with == "microsoft365":
            self._onchange_connect_with_microsoft365()
        return result

    @api.model_create_multi
    def create(self, vals_list):
        servers = super().create(vals_list)
        servers._microsoft365_link_accounts()
        servers._microsoft365_sync_password()
        return servers

    def write(self, vals):
        result = super().write(vals)
        self._microsoft365_link_accounts(changed=vals)
        self._microsoft365_sync_password()
        return result

    def _imap_login(self, connection):
        self.ensure_one()
        if not self._microsoft365_in_use():
            return super()._imap_login(connection)
        imap_authenticate(connection, self._microsoft365_account().email, self._microsoft365_token())

    def connect(self, allow_archived=False):
        self.ensure_one()
        if not self._microsoft365_in_use():
            return super().connect(allow_archived=allow_archived)
        # A lane's POP3 visit passes its deadline through the context: Odoo's loop calls connect() itself.
        return self._microsoft365_open(allow_archived, deadline=self.env.context.get("microsoft365_fetch_deadline"))

    def _microsoft365_open(self, allow_archived=False, deadline=None):
        """connect() of a Microsoft 365 server: logged in with the mailbox's token, no reply awaited past
        `deadline` (time.monotonic(); else Odoo's MAIL_TIMEOUT), a refusal explained and its back-off kept."""
        if self.microsoft365_retry_at and self.microsoft365_retry_at > fields.Datetime.now():
            raise UserError(
                self.env._(
                    "Microsoft 365 is throttling this mailbox: Odoo waits until %s before it connects again.",
                    fields.Datetime.to_string(self.microsoft365_retry_at),
                )
            )
        if not allow_archived and not self.active:
            raise UserError(self.env._('The server "%s" cannot be used because it is archived.', self.display_name))
        timeout = MAIL_TIMEOUT if deadline is None else max(1.0, min(MAIL_TIMEOUT, deadline - time.monotonic()))
        try:
            try:
                if self._get_connection_type() == "pop":
                    connection = self._microsoft365_connect_pop3(timeout, deadline)
                else:
                    connection = self._microsoft365_connect_imap(timeout)
            except M365Error as exc:
                found = self._microsoft365_mail_diagnosis(exc.diagnosis)
                self._microsoft365_honour_backoff(found)
                raise UserError(explain(self.env, found)) from None
        except Exception as exc:
            # Kept for the health check: in the cron, fetchmail logs the error and goes on.
            self.write(
                {
                    "microsoft365_fetch_error": exc.args[0] if isinstance(exc, UserError) else str(exc),
                    "microsoft365_fetch_failed_at": fields.Datetime.now(),
                }
            )
            raise
        if self.microsoft365_fetch_error:
            self.write({"microsoft365_fetch_error": False, "microsoft365_fetch_failed_at": False})
        return connection

    def _microsoft365_connect_imap(self, timeout):
        # Odoo's IMAP connection waits without limit for the TLS handshake and the greeting (its
        # MAIL_TIMEOUT default never reaches imaplib, which passes timeout=None on): a server that accepts
        # the connection and says nothing would hold a cron worker until Odoo kills it.
        connection = _IMAP4ConnectionWithTimeout(self.server, int(self.port), self.is_ssl, timeout)
        try:
            self._imap_login(connection)
        except Exception:
            with contextlib.suppress(OSError, IMAP4.error):
                connection.shutdown()
            raise
        return connection

    def _microsoft365_connect_pop3(self, timeout, deadline=None):
        # Odoo's POP branch logs in with USER/PASS and offers no hook.
        connection = _POP3ConnectionWithDeadline(self.server, int(self.port), self.is_ssl, timeout, deadline)
        try:
            # Odoo's wrapper exposes only POP3's public commands; SASL needs the raw client.
            pop3_authenticate(connection.__obj__, self._microsoft365_account().email, self._microsoft365_token())
        except M365Error:
            connection.close()
            raise
        return connection

    def _microsoft365_mail_diagnosis(self, found):
        """For an app-only account, a refused login or mailbox names the app's missing prerequisite
        with its PowerShell line, as Test connection does."""
        return self._microsoft365_account().sudo()._diagnose_mail_refusal(found)

    def _microsoft365_honour_backoff(self, found):
        backoff_ms = found.params.get("backoff_ms") if found else None
        if backoff_ms:
            # Datetime fields keep whole seconds: round up, never connect before Microsoft's time.
            retry_at = datetime.now() + timedelta(milliseconds=backoff_ms)
            self.microsoft365_retry_at = retry_at.replace(microsecond=0) + timedelta(seconds=bool(retry_at.microsecond))

    def fetch_mail(self, raise_exception=True):
        """IMAP servers of this addon fetch with a safety net: Odoo's own loop marks a message read
        even when processing it failed, so it is never fetched again. Here a failed message stays
        unread and is retried by the next fetches; after a few failures it is left unread on the
        server, listed on the server record (kept in Odoo, by Message-ID: Exchange Online keeps no
        client keywords) and no longer tried, until the administrator retries or dismisses it."""
        if self.env.context.get("microsoft365_fetched_by_lanes"):
            # The scheduled fetch: Microsoft 365 servers are claimed one by one (_microsoft365_fetch_lane).
            return super(FetchmailServer, self.filtered(lambda s: not s._microsoft365_in_use())).fetch_mail(
                raise_exception=raise_exception
            )
        servers = self - self._microsoft365_without_grant(raise_exception)
        ours = servers.filtered(lambda s: s._microsoft365_in_use() and s._get_connection_type() == "imap")
        for server in ours:
            server._microsoft365_fetch_now(raise_exception)
        return super(FetchmailServer, servers - ours).fetch_mail(raise_exception=raise_exception)

    def _microsoft365_fetch_now(self, raise_exception):
        """Fetch Now (or core's fetch_mail) of one claimed mailbox, through its transport
        (_microsoft365_fetch_mailbox) under the mailbox's time budget. A failure is raised in plain words
        for the button, or logged for a caller that asked not to raise."""
        self.ensure_one()
        try:
            with self._microsoft365_claimed(raise_exception) as claimed:
                if claimed:
                    self._microsoft365_fetch_mailbox(time.monotonic() + self._microsoft365_mailbox_seconds())
        except Exception as exc:
            if raise_exception:
                if self.microsoft365_retry_at and self.microsoft365_retry_at > fields.Datetime.now():
                    # Fetch Now: Microsoft's back-off (and the error that came with it) must outlive
                    # the rolled-back request, or the next fetch would connect too early.
                    self.env.cr.commit()  # pylint: disable=invalid-commit
                raise ValidationError(
                    self.env._(
                        "Couldn't get your emails. Check out the error message below for more info:\n%s",
                        exc.args[0] if exc.args else exc,
                    )
                ) from exc
            _logger.info(
                "General failure when trying to fetch mail from %s server %s.",
                self.server_type,
                self.name,
                exc_info=True,
            )

    # Fetching across Odoo's cron workers -------------------------------------------------------

    @api.model
    def _fetch_mails(self):
        """Core's fetch cron: other servers go through core's loop as before; the Microsoft 365 ones
        are shared with the fetch lanes, which it wakes up first so that they start together."""
        lanes = self._microsoft365_fetch_lanes()
        if lanes:
            for lane in lanes:
                lane._trigger()
            self.env.cr.commit()  # pylint: disable=invalid-commit
        result = super(FetchmailServer, self.with_context(microsoft365_fetched_by_lanes=True))._fetch_mails()
        # Core's cron runs once per interval (a rerun would repeat core's loop too): no progress report.
        # It fetches within the same budget of the pass as the lanes (_microsoft365_fetch_deadline).
        self._microsoft365_fetch_lane(report_progress=False)
        return result

    @api.model
    def _microsoft365_fetch_lanes(self):
        """The active cron jobs that fetch Microsoft 365 mailboxes besides core's fetch cron."""
        return (
            self.env["ir.cron"]
            .sudo()
            .search([("model_id.model", "=", self._name), ("code", "ilike", "_microsoft365_fetch_lane(")])
        )

    @api.model
    def _microsoft365_fetch_lane(self, report_progress=True):
        """One run of a fetch lane (and the end of core's fetch cron): claims the mailboxes that are
        due one by one, least recently attempted first, each under its own time budget, until none is
        left or the pass's budget is spent (_microsoft365_fetch_deadline). Mailboxes another worker holds
        are skipped; so are those Microsoft asked to back off. The rest of a busy cycle is reported to
        Odoo's cron progress API, which runs the job again (in the next pass when this one's budget is
        spent), here or in another worker."""
        # As core's own fetch loop says with it: no server written here should switch the fetch cron on or
        # off (fetchmail.server._update_cron): that would lock and update core's cron row on every write, which
        # the cron workers running or acquiring that job meet as a locked row or a serialization failure.
        lane = self.with_context(fetchmail_cron_running=True)
        deadline = lane._microsoft365_fetch_deadline()
        cycle_start = lane._microsoft365_cycle_start()
        fetched = []
        while lane._microsoft365_time_for_a_visit(deadline):
            server = lane._microsoft365_claim_next(cycle_start, exclude=fetched)
            if server is None:
                break
            fetched.append(server.id)
            try:
                server._microsoft365_fetch_claimed(
                    min(time.monotonic() + server._microsoft365_mailbox_seconds(), deadline)
                )
            finally:
                server._microsoft365_release()
        if report_progress:
            remaining = len(lane._microsoft365_due(cycle_start, exclude=fetched))
            self.env["ir.cron"]._notify_progress(done=len(fetched), remaining=remaining)
            if remaining and not fetched:  # the pass's budget was spent before this job's turn
                stay_due_for_next_pass(self.env)
            if remaining:
                # Odoo leaves a partly done job ready but wakes no worker for it (unless the server runs
                # with ODOO_NOTIFY_CRON_CHANGES): without this, the cycle would pause a minute per run.
                self.env.cr.postcommit.add(self.env["ir.cron"]._notifydb)
        return len(fetched)

    @api.model
    def _microsoft365_time_for_a_visit(self, deadline):
        """Whether another mailbox may be claimed before the pass's `deadline` (time.monotonic())."""
        needed = min(self._microsoft365_mailbox_seconds(), MIN_VISIT_SECONDS)
        return deadline - time.monotonic() >= needed

    def _microsoft365_fetch_mailbox(self, deadline):
        """One claimed mailbox, through its transport (a hook: Microsoft Graph overrides it)."""
        if self._get_connection_type() == "imap":
            self._microsoft365_fetch_imap(deadline)
        else:  # POP3: core's loop, with this addon's login and the visit's deadline
            self.with_context(microsoft365_fetch_deadline=deadline).fetch_mail(raise_exception=False)

    def _microsoft365_fetch_claimed(self, deadline):
        """Fetches one claimed server; a failure is logged and recorded on it, never raised (the others
        go on). A lost database connection is raised: nothing can go on without it."""
        self.ensure_one()
        try:
            if not self._microsoft365_without_grant(False):
                self._microsoft365_fetch_mailbox(deadline)
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            raise
        except UserError as exc:  # Microsoft's refusal in plain words, already kept on the server: no traceback
            _logger.info("Could not fetch mail from %s server %s: %s", self.server_type, self.name, exc.args[0])
        except Exception:  # noqa: BLE001 - as core's cron loop: logged, the next server goes on
            _logger.info(
                "General failure when trying to fetch mail from %s server %s.",
                self.server_type,
                self.name,
                exc_info=True,
            )
        self.env.cr.commit()  # pylint: disable=invalid-commit

    @api.model
    def _microsoft365_due_domain(self):
        return [("state", "=", "done"), ("server_type", "!=", "local"), ("connect_with", "=", "microsoft365")]

    @api.model
    def _microsoft365_due(self, cycle_start, ids=None, exclude=(), held_too=False):
        """Ids of the Microsoft 365 servers not attempted since `cycle_start` (nor in `exclude`), not
        throttled and (unless `held_too`) not held by a worker, least recently attempted (else
        fetched) first. A mailbox Microsoft asked to come back later is due again in the same cycle once
        that time has passed: its mail would otherwise wait a whole cycle more."""
        self.env.flush_all()
        domain = self._microsoft365_due_domain() + ([("id", "in", ids)] if ids else [])
        candidates = self.sudo().search(domain + ([("id", "not in", list(exclude))] if exclude else []))
        if not candidates:
            return []
        self.env.cr.execute(
            SQL(
                """
                SELECT s.id
                  FROM fetchmail_server s
                 WHERE s.id IN %(ids)s
                   AND (s.microsoft365_fetch_attempted_at IS NULL OR s.microsoft365_fetch_attempted_at <= %(cycle)s
                        OR s.microsoft365_fetch_attempted_at < s.microsoft365_retry_at)
                   AND (s.microsoft365_retry_at IS NULL OR s.microsoft365_retry_at <= %(now)s)
                   AND (%(held_too)s OR s.id NOT IN (
                        SELECT l.objid::integer
                          FROM pg_locks l
                         WHERE l.locktype = 'advisory' AND l.classid::bigint = %(lock_class)s AND l.objsubid = 2
                           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   ))
              ORDER BY COALESCE(s.microsoft365_fetch_attempted_at, s.date) ASC NULLS FIRST, s.id
                """,
                ids=tuple(candidates.ids),
                cycle=cycle_start,
                now=fields.Datetime.now(),
                lock_class=FETCH_LOCK_CLASS,
                held_too=held_too,
            )
        )
        return [row[0] for row in self.env.cr.fetchall()]

    @api.model
    def _microsoft365_claim_next(self, cycle_start, exclude=()):
        """The next due server, claimed (advisory lock held, attempt stamped and committed), or None."""
        cr = self.env.cr
        for server_id in self._microsoft365_due(cycle_start, exclude=exclude):
            server = self.sudo().browse(server_id)
            if not server._microsoft365_try_lock():
                continue  # another worker took it meanwhile
            # A new snapshot: a worker that held it stamped its attempt before letting it go.
            cr.commit()  # pylint: disable=invalid-commit
            if not self._microsoft365_due(cycle_start, ids=[server_id], exclude=exclude, held_too=True):
                server._microsoft365_release()
                continue
            server.microsoft365_fetch_attempted_at = fields.Datetime.now()
            self.env.flush_all()
            cr.commit()  # pylint: disable=invalid-commit
            return server.with_env(self.env)
        return None

    def _microsoft365_try_lock(self):
        self.ensure_one()
        self.env.cr.execute(SQL("SELECT pg_try_advisory_lock(%s, %s)", FETCH_LOCK_CLASS, self.id))
        return self.env.cr.fetchone()[0]

    def _microsoft365_release(self):
        self.ensure_one()
        cr = self.env.cr
        try:
            cr.execute(SQL("SELECT pg_advisory_unlock(%s, %s)", FETCH_LOCK_CLASS, self.id))
        except psycopg2.InterfaceError:
            return  # the connection is gone, and its locks with it
        except psycopg2.Error:
            cr.rollback()  # an aborted transaction refuses every statement until rolled back
            cr.execute(SQL("SELECT pg_advisory_unlock(%s, %s)", FETCH_LOCK_CLASS, self.id))

    @contextlib.contextmanager
    def _microsoft365_claimed(self, raise_exception):
        """Fetch Now and the manual fetch: the server's lock for the duration, or a clear refusal while
        a scheduled fetch holds it (False when not raising)."""
        if not self._microsoft365_try_lock():
            if raise_exception:
                raise UserError(
                    self.env._(
                        "Odoo is fetching the mailbox %s right now (scheduled fetch): try again in a moment.",
                        self.user,
                    )
                )
            yield False
            return
        try:
            yield True
        finally:
            self._microsoft365_release()

    @api.model
    def _microsoft365_cycle_start(self):
        """The moment the current fetch cycle began, the same for every lane, run and pass of the cycle: the
        last scheduled call of core's fetch cron (its interval is the administrator's fetch interval; while it
        runs, its nextcall stays put). Mailboxes attempted since are not due. Outside the cron, now."""
        now = fields.Datetime.now()
        if not self.env.context.get("cron_id"):
            return now
        core = self.env.ref("mail.ir_cron_mail_gateway_action", raise_if_not_found=False)
        core = core and core.sudo()
        if not (core and core.active and core.nextcall):
            # No fetch cron of core's to keep time: the running job's own scheduled call.
            nextcall = self.env["ir.cron"].sudo().browse(self.env.context["cron_id"]).nextcall
            return nextcall if nextcall and nextcall < now else now
        if core.nextcall <= now:
            return core.nextcall
        return min(now, core.nextcall - _intervalTypes[core.interval_type](core.interval_number))

    @api.model
    def _microsoft365_mailbox_seconds(self):
        parameter = self.env["ir.config_parameter"].sudo().get_param("mail_microsoft365_oauth.fetch_mailbox_seconds")
        return max(1.0, float(parameter or MAILBOX_SECONDS))

    @api.model
    def _microsoft365_fetch_deadline(self):
        """When (time.monotonic()) the fetching of this pass of the cron worker ends: after
        `mail_microsoft365_oauth.fetch_run_seconds` (default 60 s), within the pass's budget (every job of the
        pass that fetches shares it: ir_cron.cron_pass_deadline)."""
        parameter = self.env["ir.config_parameter"].sudo().get_param("mail_microsoft365_oauth.fetch_run_seconds")
        return cron_pass_deadline(self.env, float(parameter or RUN_SECONDS))

    def _microsoft365_without_grant(self, raise_exception):
        """Servers whose mailbox has no usable sign-in: nothing to connect with. Said in plain words
        on the server and in one log line (no traceback), or raised for Fetch Now."""
        blocked = self.filtered(
            lambda s: s._microsoft365_in_use()
            and (not s.microsoft365_account_id or s.microsoft365_account_id.status in ("not_connected", "reconnect"))
        )
        for server in blocked:
            account = server.microsoft365_account_id
            if not account:
                message = self.env._("Choose the OAuth account of server %s.", server.display_name)
            else:
                message = self.env._(
                    "The mailbox %(mailbox)s is not connected to Microsoft 365 (%(status)s): click Authorize on it, "
                    "then confirm this server again.",
                    mailbox=account.email,
                    status=dict(account._fields["status"]._description_selection(self.env))[account.status],
                )
                if account.status == "reconnect" and account.last_error:
                    message += "\n" + account.last_error
            if raise_exception:
                raise UserError(message)
            _logger.warning("Not fetching %s server %s: %s", server.server_type, server.name, message)
            server.write({"microsoft365_fetch_error": message, "microsoft365_fetch_failed_at": fields.Datetime.now()})
        return blocked

    def _microsoft365_fetch_imap(self, deadline=None):
        """Fetches the unread messages; past `deadline` (time.monotonic()) the others wait for the next
        visit, and no single reply is awaited longer than what is left of it."""
        self.ensure_one()
        MailThread = self.env["mail.thread"].with_context(
            fetchmail_cron_running=True, default_fetchmail_server_id=self.id
        )
        imap = self._microsoft365_open(deadline=deadline)  # logged in; a refusal is explained, its back-off kept
        counts = {"done": 0, "failed": 0, "skipped": 0}
        unread = set()  # the keys of every unread message, to forget failures of messages gone meanwhile
        complete = True
        try:
            self._microsoft365_bound_replies(imap, deadline)
            for number in self._microsoft365_imap(imap, "SEARCH", None, "UNSEEN")[0].split():
                if deadline and time.monotonic() > deadline:
                    complete = False  # the time budget is spent: the rest waits for the next visit
                    counts["skipped"] += 1
                    continue
                self._microsoft365_bound_replies(imap, deadline)
                try:
                    outcome = self._microsoft365_fetch_one(imap, number, MailThread, unread)
                except MailCommandFailed as exc:
                    if exc.closed or exc.diagnosis.code in SESSION_ENDING:
                        raise
                    # This message only (Exchange refused one command): it stays unread for the next fetch.
                    _logger.info("Skipped message %s on server %s: %s", number, self.name, exc.diagnosis.detail)
                    outcome = "skipped"
                counts[outcome] += 1
                # As Odoo's own fetch loop: each message is kept once processed, whatever follows.
                self.env.cr.commit()  # pylint: disable=invalid-commit
        except MailCommandFailed as exc:
            # Throttled, session refused, connection lost: what is left stays unread for the next fetch.
            self._microsoft365_fetch_failed(exc.diagnosis)
        else:
            if complete:
                self._microsoft365_forget_failed_messages(lambda key, _entry: key not in unread)
        finally:
            with contextlib.suppress(OSError, IMAP4.error):  # the outcome is known; the session may be gone
                imap.logout()
            _logger.info(
                "Fetched %d email(s) on %s server %s; %d failed, %d left unread.",
                counts["done"],
                self.server_type,
                self.name,
                counts["failed"],
                counts["skipped"],
            )
        self.date = fields.Datetime.now()

    @staticmethod
    def _microsoft365_bound_replies(imap, deadline):
        """No reply is awaited longer than the mailbox's time budget leaves (a hung server)."""
        sock = getattr(getattr(imap, "__obj__", imap), "sock", None)
        if deadline and sock is not None:
            sock.settimeout(max(1.0, min(MAIL_TIMEOUT, deadline - time.monotonic())))

    def _microsoft365_imap(self, imap, command, *args):
        return imap_command(imap, command, *args, mailbox=self._microsoft365_mailbox(), scope="IMAP.AccessAsUser.All")

    def _microsoft365_fetch_failed(self, found):
        """A refusal during the fetch: recorded and shown like a refused connection, then raised."""
        found = self._microsoft365_mail_diagnosis(found)
        self._microsoft365_honour_backoff(found)
        message = explain(self.env, found)
        self.write({"microsoft365_fetch_error": message, "microsoft365_fetch_failed_at": fields.Datetime.now()})
        raise UserError(message)

    def _microsoft365_fetch_one(self, imap, number, MailThread, unread):
        """One unread message, read without marking it read (BODY.PEEK), marked read only once Odoo
        has it. Returns "done", "failed" or "skipped"; raises MailCommandFailed when Exchange refuses."""
        header = self._microsoft365_imap(imap, "FETCH", number, "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        message_id = _header_message_id(header)
        if message_id:
            unread.add(message_id)
            if self._microsoft365_is_given_up(message_id):
                return "skipped"
        fetched = self._microsoft365_imap(imap, "FETCH", number, "(BODY.PEEK[])")
        raw = next((part[1] for part in fetched if isinstance(part, tuple) and len(part) > 1), None)
        if not isinstance(raw, bytes):  # expunged meanwhile: nothing to read
            return "skipped"
        key, _message = self._microsoft365_message_key(raw)
        unread.add(key)
        if key != message_id and self._microsoft365_is_given_up(key):
            return "skipped"
        try:
            with self.env.cr.savepoint():
                MailThread.message_process(
                    self.object_id.model, raw, save_original=self.original, strip_attachments=not self.attach
                )
        except Exception as exc:  # any message may be malformed: never let it stop the others
            self._microsoft365_record_failed_message(raw, exc)
            _logger.info("Failed to process mail from %s server %s.", self.server_type, self.name, exc_info=True)
            return "failed"
        self._microsoft365_forget_failed_message(raw)
        # Kept in Odoo first, marked read second: a worker killed or a database connection cut in
        # between leaves the message unread, fetched again and ignored by Odoo (same Message-ID);
        # the other way round, it would be read in the mailbox and missing in Odoo.
        self.env.cr.commit()  # pylint: disable=invalid-commit
        self._microsoft365_imap(imap, "STORE", number, "+FLAGS.SILENT", "(\\Seen)")
        unread.discard(key)
        return "done"

    def _microsoft365_is_given_up(self, key):
        entry = (self.microsoft365_failed_messages or {}).get(key)
        return bool(entry) and (_given_up(entry) or entry.get("dismissed"))

    def _microsoft365_forget_failed_messages(self, condition):
        failures = self.microsoft365_failed_messages or {}
        kept = {key: entry for key, entry in failures.items() if not condition(key, entry)}
        if kept != failures:
            self.microsoft365_failed_messages = kept or False

    def action_microsoft365_retry_failed_messages(self):
        """Given-up messages are tried again by the next fetch (they are still unread in the mailbox)."""
        for server in self:
            server._microsoft365_forget_failed_messages(lambda _key, entry: _given_up(entry))

    def action_microsoft365_dismiss_failed_messages(self):
        """Given-up messages are no longer listed nor tried; they stay unread in the mailbox, where the
        administrator deals with them (once read or moved there, Odoo forgets them)."""
        for server in self:
            failures = server.microsoft365_failed_messages or {}
            server.microsoft365_failed_messages = {
                key: dict(entry, dismissed=True) if _given_up(entry) else entry for key, entry in failures.items()
            } or False

    @staticmethod
    def _microsoft365_message_key(raw):
        message = email.message_from_bytes(raw, policy=email.policy.default)
        key = message.get("Message-ID") or hashlib.sha256(raw).hexdigest()
        return str(key).strip(), message

    def _microsoft365_record_failed_message(self, raw, exc):
        key, message = self._microsoft365_message_key(raw)
        failures = dict(self.microsoft365_failed_messages or {})
        entry = failures.get(key) or {
            "failures": 0,
            "subject": str(message.get("Subject", ""))[:200],
            "sender": str(message.get("From", ""))[:200],
        }
        entry = dict(entry, failures=entry["failures"] + 1, error=str(exc)[:300])
        failures[key] = entry
        self.microsoft365_failed_messages = failures
        return _given_up(entry)

    def _microsoft365_forget_failed_message(self, raw):
        if not self.microsoft365_failed_messages:  # the usual case: nothing to parse
            return
        key, _message = self._microsoft365_message_key(raw)
        if key in (self.microsoft365_failed_messages or {}):
            failures = dict(self.microsoft365_failed_messages)
            del failures[key]
            self.microsoft365_failed_messages = failures

    def button_confirm_login(self):
        ours = self.filtered(lambda s: s._microsoft365_in_use())
        for server in ours:
            try:
                connection = server.connect(allow_archived=True)
                if server._get_connection_type() == "pop":
                    connection.stat()
                    connection.quit()
                else:
                    connection.logout()
            except UserError as exc:
                raise UserError(self.env._("Connection test failed: %s", exc.args[0])) from None
            except OSError as exc:  # DNS, refused, TLS, timeout: a connection failure, named as such
                found = diagnose_connection(server.server_type.upper(), server.server, server.port, exc)
                raise UserError(self.env._("Connection test failed: %s", explain(self.env, found))) from None
            except Exception as exc:  # network, TLS: Odoo's own wording
                raise UserError(self.env._("Connection test failed: %s", exc)) from None
            server.state = "done"
            server._microsoft365_after_successful_test()
        return super(FetchmailServer, self - ours).button_confirm_login()
