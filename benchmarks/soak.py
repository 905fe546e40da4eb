"""A production-shaped run (bin/soak): Odoo started as users run it, many mailboxes, mail arriving and
leaving all the time, the real crons at their intervals, and faults injected on a schedule. Prints
what was lost, what happened twice, and how long each fault took to heal.

    bin/soak [--mailboxes 200] [--duration 600] [--latency-ms 50] [--keep]
"""

import argparse
import collections
import contextlib
import datetime
import email
import email.policy
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path

from production import Production

UTC = datetime.timezone.utc
SINK = "sink@fabrikam.example"  # outside the sandbox's domains: kept in outbound/, never delivered
MAIL_BY_SUBJECT = "SELECT 1 FROM mail_mail mm JOIN mail_message m ON m.id = mm.mail_message_id"

# Log records of a cron worker that fail a run outside the job's own logging (Odoo's ir_cron / server.py).
CRON_WORKER_ERRORS = ("Exception in cron:", "encountered an Exception:")
# A lost database connection (pg_terminate_backend, a restart): the run fails whatever code was running.
LOST_CONNECTION = (
    "terminating connection due to administrator command",
    "server closed the connection unexpectedly",
    "connection already closed",
    "SSL connection has been closed unexpectedly",
)
CUT_WINDOW = 60.0  # seconds after a cut in which a run failing on a closed cursor is counted under it
TWICE_WINDOW = 30.0  # seconds between a copy's acceptance and the interruption that kept Odoo from knowing


def cron_failure_cause(block, cuts=()):
    """Why a cron run failed, from its log record: the cut (its own connection lost), the addon (a traceback
    through it for anything else), or other. `cuts`: when the PostgreSQL connections were cut (epoch seconds);
    a run cut there often logs the loss in a record of its own and only "cursor already closed" in its
    traceback."""
    if any(marker in block for marker in LOST_CONNECTION):
        return "PostgreSQL connection cut"
    if "cursor already closed" in block:
        try:
            at = datetime.datetime.strptime("20" + block[:17], "%Y-%m-%d %H:%M:%S").timestamp()
        except ValueError:
            at = None
        if at is not None and any(0 <= at - cut <= CUT_WINDOW for cut in cuts):
            return "PostgreSQL connection cut"
    if "mail_microsoft365_oauth" in block:
        return "the addon"
    return "other"


KILLED = re.compile(r"^\S+ \S+ \d+ \w+ \S+ odoo\.service\.server: WorkerCron \((\d+)\) timeout after", re.M)
STARTING = re.compile(
    r"^\S+ \S+ (\d+) \w+ \S+ odoo\.addons\.base\.models\.ir_cron: Job '([^']*)' \(\d+\) starting", re.M
)


def killed_cron_jobs(log):
    """The job each cron worker killed by Odoo's watchdog (limit_time_real_cron) was running: the last
    "Job ... starting" that worker logged before the kill."""
    running = []
    for kill in KILLED.finditer(log):
        pid, before = kill.group(1), log[: kill.start()]
        jobs = [m.group(2) for m in STARTING.finditer(before) if m.group(1) == pid]
        running.append(jobs[-1] if jobs else "unknown")
    return running


SETUP = r"""
import os, sys
sys.path.insert(0, os.environ["M365_REPOSITORY"])
from sandbox.client import Sandbox
sandbox = Sandbox.attach(os.environ["SANDBOX_STATE"])
env["ir.config_parameter"].set_param("web.base.url", "http://localhost:8069")
delegated_app = env["microsoft365.app"].create(dict(sandbox.odoo_app_values(), name="Soak (delegated)"))
app_only = env["microsoft365.app"].create(
    dict(sandbox.odoo_app_values(), name="Soak (app-only)", flow="app_only")
)
if delegated_app.redirect_uri not in sandbox.app()["redirect_uris"]:
    sandbox.control("add_redirect_uri", client_id=delegated_app.client_id, redirect_uri=delegated_app.redirect_uri)
partner_model = env.ref("base.model_res_partner").id
host, ports = sandbox.host, sandbox.ports
for kind, addresses in (("delegated", os.environ["DELEGATED"]), ("app_only", os.environ["APP_ONLY"]),
                        ("shared", os.environ["SHARED"])):
    for address in filter(None, addresses.split(",")):
        app = delegated_app if kind == "delegated" else app_only
        account = env["microsoft365.account"].create({"email": address, "app_id": app.id})
        if kind == "delegated":
            client = app._identity_client()
            flow = client.start_sign_in(app.redirect_uri, app._cloud().delegated_scopes(), login_hint=address)
            account._store_sign_in(client, client.finish_sign_in(flow, sandbox.sign_in(flow["auth_uri"], address)))
        env["fetchmail.server"].create({
            "name": address, "connect_with": "microsoft365", "microsoft365_account_id": account.id,
            "server_type": "imap", "server": host, "port": ports["imaps"], "is_ssl": True, "user": address,
            "state": "done", "object_id": partner_model,
        })
        env["ir.mail_server"].create({
            "name": address + " SMTP", "smtp_authentication": "microsoft365", "microsoft365_account_id": account.id,
            "smtp_host": host, "smtp_port": ports["smtp"], "smtp_encryption": "starttls", "smtp_user": address,
            "from_filter": address,
        })
        env.cr.commit()
# As many administrators do: the mail queue every minute (Odoo ships it hourly, sending most mail at once).
env.ref("mail.ir_cron_mail_scheduler_action").write({"interval_number": 1, "interval_type": "minutes"})
env.cr.commit()
print("READY", env["fetchmail.server"].search_count([("connect_with", "=", "microsoft365")]))
"""

# After the run: can every delegated account still get a token (its refresh token was not lost)?
CHECK_TOKENS = r"""
import json, os, time
from odoo.addons.mail_microsoft365_oauth.m365.errors import TransientFailure
from odoo.addons.mail_microsoft365_oauth.models.microsoft365_account import Microsoft365Unavailable
revoked = set(filter(None, os.environ["REVOKED"].split(",")))
lost, checked = [], 0
for account in env["microsoft365.account"].search([("app_id.flow", "!=", "app_only")]):
    if account.email in revoked:
        continue
    checked += 1
    for attempt in range(4):  # a passing failure (a throttled endpoint) is no lost token: wait and ask again
        try:
            account._access_token(force_refresh=True)
            env.cr.commit()
            break
        except Exception as exc:
            env.cr.rollback()
            if attempt < 3 and isinstance(exc, (TransientFailure, Microsoft365Unavailable)):
                time.sleep(5)
                continue
            lost.append(f"{account.email}: {exc}"[:200])
            break
flagged = [
    f"{a.email}: {a.status}"
    for a in env["microsoft365.account"].search([])
    if a.email not in revoked and a.status not in ("connected", "app_only")
]
print("RESULT", json.dumps({"checked": checked, "lost": lost, "flagged": flagged}))
"""


class Soak:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="m365-soak-"))
        self.production = Production(self.work, f"m365_soak_{os.getpid()}", latency_ms=args.latency_ms)
        self.stop = threading.Event()
        self.delivered = {}  # subject -> (mailbox, delivered at, UTC)
        self.queued = {}  # subject -> (mailbox, queued at)
        self.faults = []  # (name, injected at, probe kind, probe subject, recovered at)
        self.fired = {}  # fault function name -> what happened ("fired ..." or "not fired: why")
        self.interruptions = []  # (what, wall-clock time): a sender killed or its database connection cut
        self.errors = collections.Counter()
        self.revoked = []
        self.lock = threading.Lock()
        self.counter = 0

    def log(self, text):
        print(f"soak {time.strftime('%H:%M:%S')}: {text}", flush=True)

    # set-up -------------------------------------------------------------------------------------

    def setup(self):
        args, production = self.args, self.production
        self.sandbox = production.start_sandbox()
        self.log(f"sandbox up ({args.latency_ms:g} ms latency); creating the database")
        production.create_database()
        sandbox = self.sandbox
        sandbox.control("settings", latency_ms=0)  # the set-up is not what is measured
        third = args.mailboxes // 3
        self.mailboxes = {
            "delegated": [f"user{n:03d}@contoso.com" for n in range(third)],
            "app_only": [f"app{n:03d}@contoso.com" for n in range(third)],
            "shared": [f"shared{n:03d}@contoso.com" for n in range(args.mailboxes - 2 * third)],
        }
        sandbox.control("add_mailboxes", addresses=self.mailboxes["delegated"], kind="user", app_access=False)
        sandbox.control("add_mailboxes", addresses=self.mailboxes["app_only"], kind="user")
        sandbox.control("add_mailboxes", addresses=self.mailboxes["shared"], kind="shared")
        # Access tokens of ten minutes (Microsoft: 60-90): refreshes happen within the run.
        sandbox.control("settings", access_token_lifetime=600)
        output = production.shell(
            SETUP,
            DELEGATED=",".join(self.mailboxes["delegated"]),
            APP_ONLY=",".join(self.mailboxes["app_only"]),
            SHARED=",".join(self.mailboxes["shared"]),
        )
        self.log(f"{output.split('READY', 1)[1].strip()} mailboxes set up (delegated, app-only, shared)")
        self.all_mailboxes = [m for group in self.mailboxes.values() for m in group]
        self.app_client_id = sandbox.app()["client_id"]
        sandbox.control("settings", latency_ms=args.latency_ms)
        self.tokens_before = sandbox.state()["counters"]

    # load ---------------------------------------------------------------------------------------

    def next_subject(self, prefix):
        with self.lock:
            self.counter += 1
            return f"{prefix}-{self.counter:06d}"

    def deliver(self, mailbox=None):
        mailbox = mailbox or random.choice(self.all_mailboxes)
        subject = self.next_subject("soak-in")
        self.sandbox.control("deliver", mailbox=mailbox, subject=subject, sender="customer@fabrikam.example")
        self.delivered[subject] = (mailbox, datetime.datetime.now(UTC).replace(tzinfo=None))
        return subject

    def queue_mail(self, mailbox=None):
        """A mail queued in Odoo through its web API (an HTTP worker), sent by the mail queue cron."""
        mailbox = mailbox or random.choice(self.all_mailboxes)
        subject = self.next_subject("soak-out")
        values = {
            "subject": subject,
            "email_from": mailbox,
            "email_to": SINK,
            "body_html": f"<p>{subject}</p>",
            "auto_delete": False,
        }
        for _attempt in range(5):
            try:
                self.production.rpc("mail.mail", "create", [values])
                break
            except Exception:  # noqa: BLE001 - an HTTP worker killed meanwhile: was it created?
                self.errors["rpc"] += 1
                if self.production.query(MAIL_BY_SUBJECT + " WHERE m.subject = %s", (subject,)):
                    break
                time.sleep(1)
        else:
            return None
        self.queued[subject] = (mailbox, datetime.datetime.now(UTC).replace(tzinfo=None))
        return subject

    def loop(self, rate, action, name):
        interval = 1 / rate
        while not self.stop.wait(random.expovariate(1 / interval)):
            try:
                action()
            except Exception:  # noqa: BLE001 - counted, the run goes on
                self.errors[name] += 1

    # faults -------------------------------------------------------------------------------------

    def probe(self, name, kind="in", mailbox=None):
        """After a fault: a message (or a mail) whose arrival tells that this path works again."""
        subject = self.deliver(mailbox) if kind == "in" else self.queue_mail(mailbox)
        self.faults.append({"name": name, "at": time.monotonic(), "kind": kind, "subject": subject})
        return name

    def kill(self, pid):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
            return True
        return False

    def wait_for_pid(self, find, seconds=45):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop.is_set():
            pids = find()
            if pids:
                return pids[0]
            time.sleep(0.05)
        return None

    def cut_a_fetching_worker(self):
        """pg_terminate_backend of the connections of a worker fetching a mailbox (it holds the lane's advisory
        lock), waited for as the kills wait for their victim, so that the cut hits work in progress."""
        self.poke_crons()
        deadline = time.monotonic() + 330
        while time.monotonic() < deadline and not self.stop.is_set():
            rows = self.production.query(
                "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a WHERE a.datname = current_database() "
                "AND a.pid <> pg_backend_pid() AND a.pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory')"
            )
            if rows:
                return rows
            time.sleep(0.05)
        return []

    def fault_schedule(self):
        """The faults, each returning what it did (None: not fired, with the reason in `self.fired`)."""
        sandbox, production = self.sandbox, self.production
        ports = sandbox.ports
        victims = iter(random.sample(self.all_mailboxes, 20))
        delegated = iter(random.sample(self.mailboxes["delegated"], 5))

        def token_503():
            sandbox.control("token_fault", kind="503", count=3, retry_after=1)
            return self.probe("token endpoint 503 (x3, Retry-After 1)")

        def token_429():
            sandbox.control("token_fault", kind="429", count=3, retry_after=2)
            return self.probe("token endpoint 429 (x3, Retry-After 2)")

        def revoked_grant():
            user = next(delegated)
            self.revoked.append(user)
            sandbox.control("revoke_sessions", user=user)  # noticed at its next refresh
            return self.probe("revoked grant (one account)")

        def imap_throttling():
            mailbox = next(victims)
            sandbox.control("mail_throttle", mailbox=mailbox, backoff_ms=20000, count=1)
            return self.probe("IMAP throttling (20 s back-off)", mailbox=mailbox)

        def smtp_432():
            sandbox.control("settings", smtp_concurrency_limit=0)  # every DATA answered 432 4.3.2
            self.poke_crons()
            self.stop.wait(70)  # the mail queue runs every minute: at least one run meets it (the end of the load too)
            sandbox.control("settings", smtp_concurrency_limit=3)
            return self.probe("SMTP 432 4.3.2 for 70 s", kind="out")

        def secret_expiring():
            app = sandbox.app()
            expired = [dict(s, expires=time.time() - 60) if s["name"] == "current" else s for s in app["secrets"]]
            sandbox.control("app", client_id=self.app_client_id, secrets=expired)
            self.stop.wait(60)  # token requests meanwhile are refused (AADSTS7000222)
            sandbox.control("app", client_id=self.app_client_id, secrets=app["secrets"])  # a new secret entered
            return self.probe("client secret expired for 60 s", mailbox=random.choice(self.mailboxes["app_only"]))

        def kill_http_worker():
            pids = production.workers("WorkerHTTP")
            if pids and self.kill(random.choice(pids)):
                return self.probe("kill -9 of an HTTP worker", kind="out")
            return None

        def kill_cron_mid_fetch():
            # The next fetch cycle may be minutes away (core's fetch cron runs every 5 minutes): due now.
            self.poke_crons()
            pid = self.wait_for_pid(
                lambda: [
                    p for p in production.pids_connected_to(ports["imaps"]) if p in production.workers("WorkerCron")
                ],
                seconds=330,
            )
            if pid and self.kill(pid):
                return self.probe("kill -9 of a cron worker mid-fetch")
            return None

        def kill_cron_mid_send():
            for _ in range(10):  # something to send
                self.queue_mail()
            self.poke_crons()
            pid = self.wait_for_pid(
                lambda: [
                    p for p in production.pids_connected_to(ports["smtp"]) if p in production.workers("WorkerCron")
                ],
                seconds=90,
            )
            if pid and self.kill(pid):
                self.interruptions.append(("kill -9 of a cron worker mid-send", time.time()))
                return self.probe("kill -9 of a cron worker mid-send", kind="out")
            return None

        def pg_cut():
            rows = self.cut_a_fetching_worker()
            if not rows:
                return None
            self.interruptions.append(("PostgreSQL connections cut", time.time()))
            return self.probe(f"PostgreSQL connections cut ({len(rows or [])})")

        # The faults that wait for a worker fetching come early: a fetch cycle may be idle minutes (core's fetch
        # interval) once every mailbox of it was fetched.
        return [
            token_503,
            kill_cron_mid_fetch,
            pg_cut,
            token_429,
            smtp_432,
            revoked_grant,
            kill_http_worker,
            imap_throttling,
            kill_cron_mid_send,
            secret_expiring,
        ]

    def inject_faults(self, started):
        """Every fault at its slot, spread over the run whatever its length, each in a thread of its own: one
        that lasts (432 for 70 s, an expired secret for 60 s, waiting for a cron worker to kill) never delays
        the next, so every fault fires in any run of two minutes or more."""
        schedule = self.fault_schedule()
        spacing = self.args.duration / (len(schedule) + 1)
        threads = []
        for fault in schedule:
            self.fired[fault.__name__] = "not fired: the load ended before its turn"
        for index, fault in enumerate(schedule, 1):
            if self.stop.wait(max(0, started + spacing * index - time.monotonic())):
                break
            thread = threading.Thread(target=self.fire, args=(fault,), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(self.args.drain)

    def fire(self, fault):
        self.log(f"fault: {fault.__name__}")
        try:
            what = fault()
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            self.errors[f"fault {fault.__name__}"] += 1
            self.fired[fault.__name__] = f"not fired: {type(exc).__name__}: {exc}"
            traceback.print_exc()
            return
        if what is None and (fault.__name__.startswith("kill") or fault.__name__ == "pg_cut"):
            self.fired[fault.__name__] = "not fired: no such worker was seen busy before the load ended"
        else:
            self.fired[fault.__name__] = f"fired at {time.strftime('%H:%M:%S')}: {what or fault.__name__}"

    # run ----------------------------------------------------------------------------------------

    def run(self):
        args, production = self.args, self.production
        production.start(4, 2)
        self.log(f"Odoo up: --workers=4 --max-cron-threads=2 at {production.url}; running {args.duration:g} s")
        started = time.monotonic()
        threads = [
            threading.Thread(target=self.loop, args=(args.arrivals, self.deliver, "deliver"), daemon=True),
            threading.Thread(target=self.loop, args=(args.sends, self.queue_mail, "queue"), daemon=True),
            threading.Thread(target=self.inject_faults, args=(started,), daemon=True),
        ]
        for thread in threads:
            thread.start()
        while time.monotonic() - started < args.duration:
            time.sleep(5)
            self.update_recoveries()
        self.stop.set()
        for thread in threads:
            thread.join(120)
        self.log("load stopped; draining (the crons pick up what is left)")
        self.drain()

    def recorded(self):
        rows = self.production.query(
            "SELECT name, count(*), min(create_date) FROM res_partner WHERE name LIKE 'soak-in-%%' GROUP BY name"
        )
        return {name: (count, created) for name, count, created in rows}

    def accepted(self):
        """Mails the sandbox accepted for the outside world: subject -> how many times."""
        folder = Path(self.sandbox.state_dir) / "outbound"
        seen, first = collections.Counter(), {}
        for path in folder.glob("*.eml") if folder.exists() else []:
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            subject = str(message.get("Subject", ""))
            if subject.startswith("soak-out-"):
                seen[subject] += 1
                first[subject] = min(first.get(subject, float("inf")), path.stat().st_mtime)
        return seen, first

    def mails_waiting_for_the_revoked_account(self):
        """Soak mails that failed while the mailbox revoked on purpose needed someone, noted with its account
        (mail.mail.microsoft365_account_id): the mail queue sends them once it is authorized again."""
        if not self.revoked:
            return set()
        rows = self.production.query(
            "SELECT m.subject FROM mail_mail mm JOIN mail_message m ON m.id = mm.mail_message_id "
            "JOIN microsoft365_account a ON a.id = mm.microsoft365_account_id "
            "WHERE mm.state = 'exception' AND m.subject LIKE 'soak-out-%%' AND a.email IN %s",
            (tuple(self.revoked),),
        )
        return {subject for (subject,) in rows}

    def update_recoveries(self):
        recorded = self.recorded()
        accepted, first = self.accepted()
        now = time.monotonic()
        for fault in self.faults:
            if fault.get("recovered") or not fault["subject"]:
                continue
            if (fault["kind"] == "in" and fault["subject"] in recorded) or (
                fault["kind"] == "out" and fault["subject"] in accepted
            ):
                fault["recovered"] = now

    def poke_crons(self):
        """Fetch and mail queue crons due now, through triggers as Odoo's own code asks for a run soon. (An
        UPDATE of their nextcall would wait for the row lock of any job running, holding the locks of the rows
        it updated meanwhile: Odoo's workers skip a locked job, so the mail queue would starve.)"""
        self.production.query(
            "INSERT INTO ir_cron_trigger (cron_id, call_at, create_date, write_date) "
            "SELECT id, (now() at time zone 'UTC'), (now() at time zone 'UTC'), (now() at time zone 'UTC') "
            "FROM ir_cron WHERE active AND id IN %s",
            (self.production.cron_ids("fetchmail.server", "mail.mail"),),
        )
        self.production.notify_crons()

    def drain(self):
        deadline = time.monotonic() + self.args.drain
        while time.monotonic() < deadline:
            self.update_recoveries()
            recorded = self.recorded()
            accepted, _first = self.accepted()
            missing_in = [s for s in self.delivered if s not in recorded]
            waiting = self.mails_waiting_for_the_revoked_account()
            missing_out = [s for s in self.queued if s not in accepted and s not in waiting]
            if not missing_in and not missing_out and all(f.get("recovered") for f in self.faults):
                break
            self.poke_crons()
            time.sleep(10)
        self.update_recoveries()

    # report -------------------------------------------------------------------------------------

    def report(self):
        production, sandbox = self.production, self.sandbox
        recorded = self.recorded()
        accepted, first_accepted = self.accepted()
        missing = [s for s in self.delivered if s not in recorded]
        # Unread in a mailbox whose grant was revoked on purpose: fetched once someone authorizes it again.
        in_waiting = [s for s in missing if self.delivered[s][0] in self.revoked]
        in_lost = [s for s in missing if s not in in_waiting]
        in_twice = {s: c for s, (c, _created) in recorded.items() if c > 1}
        latencies = sorted(
            (recorded[s][1] - at).total_seconds() for s, (_m, at) in self.delivered.items() if s in recorded
        )
        out_waiting = self.mails_waiting_for_the_revoked_account()
        out_lost = [s for s in self.queued if s not in accepted and s not in out_waiting]
        out_twice = {s: c for s, c in accepted.items() if c > 1}
        states = dict(
            production.query(
                "SELECT mm.state, count(*) FROM mail_mail mm JOIN mail_message m ON m.id = mm.mail_message_id "
                "WHERE m.subject LIKE 'soak-out-%%' GROUP BY mm.state"
            )
        )
        # A fault armed late may still wait for a request (a short run needs few refreshes): not the check's.
        sandbox.control("token_fault", kind="none")
        output = production.shell(CHECK_TOKENS, REVOKED=",".join(self.revoked))
        tokens = json.loads(output.split("RESULT", 1)[1])
        counters = sandbox.state()["counters"]
        token_requests = {
            k: counters.get(k, 0) - self.tokens_before.get(k, 0)
            for k in ("token_requests", "token:refresh_token", "token:client_credentials")
        }
        log = production.log.read_text(errors="replace")
        failed_jobs, failed_by = collections.Counter(), collections.Counter()
        cuts = [at for what, at in self.interruptions if what == "PostgreSQL connections cut"]
        for block in log.split("\n20"):  # one log record each (a traceback included)
            first_line = block.split("\n", 1)[0]
            if "server action #" in first_line and "failed" in first_line:
                failed_jobs[first_line.split("Job ", 1)[1].split(" (", 1)[0]] += 1
            elif not any(marker in first_line for marker in CRON_WORKER_ERRORS):
                continue
            failed_by[cron_failure_cause(block, cuts)] += 1
        addon_failures = failed_by["the addon"]
        twice = self.sent_twice(out_twice, first_accepted)
        killed_running = killed_cron_jobs(log)
        killed_summary = ", ".join(f"{job} x{n}" for job, n in collections.Counter(killed_running).items())

        def pct(values, q):
            return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

        lines = [
            f"Production-shaped run: {self.args.mailboxes} mailboxes ({len(self.mailboxes['delegated'])} delegated, "
            f"{len(self.mailboxes['app_only'])} app-only, {len(self.mailboxes['shared'])} shared), "
            f"{self.args.duration / 60:g} min, {self.args.latency_ms:g} ms RTT, Odoo --workers=4 --max-cron-threads=2",
            "",
            "| what | figure |",
            "|---|---|",
            f"| messages delivered / records created | {len(self.delivered)} / {len(recorded)} |",
            f"| messages lost / processed twice | {len(in_lost)} / {len(in_twice)} |",
            f"| messages waiting unread in the revoked mailbox (fetched once authorized again) | {len(in_waiting)} |",
            f"| arrival-to-record latency p50 / p95 | {pct(latencies, 0.5):.1f} s / {pct(latencies, 0.95):.1f} s |",
            f"| mails queued / accepted by the sandbox | {len(self.queued)} / {len(accepted)} |",
            f"| mails lost / sent twice | {len(out_lost)} / {sum(c - 1 for c in out_twice.values())} |",
            f"| mails failed for the revoked mailbox (sent once authorized again) | {len(out_waiting)} |",
            f"| mails sent twice where SMTP cannot know (sender killed or cut after the server's 250) / otherwise "
            f"| {len(twice['smtp cannot know'])} / {len(twice['otherwise'])} |",
            f"| mail.mail states at the end | {', '.join(f'{k} {v}' for k, v in sorted(states.items()))} |",
            f"| refresh tokens lost (delegated accounts checked) | {len(tokens['lost'])} ({tokens['checked']}) |",
            f"| token requests (refresh / client credentials) | {token_requests['token_requests']} "
            f"({token_requests['token:refresh_token']} / {token_requests['token:client_credentials']}) |",
            f"| accounts flagged at the end that need no action | {len(tokens['flagged'])} |",
            f"| accounts flagged that do need action (revoked) | {len(self.revoked)} |",
            f"| cron runs failed (all / by the addon) | {sum(failed_jobs.values())} / {addon_failures} |",
            f"| cron failures by cause (runs and cron worker errors) | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(failed_by.items())) or 'none'} |",
            f"| cron workers killed by Odoo's time limits (the job each was running) | {len(killed_running)} "
            f"{killed_summary} |",
            f"| harness errors (RPC retried, ...) | {dict(self.errors) or 0} |",
            "",
            "| fault | time to recover |",
            "|---|---|",
        ]
        for fault in self.faults:
            recovered = fault.get("recovered")
            took = f"{recovered - fault['at']:.0f} s" if recovered else "not recovered"
            lines.append(f"| {fault['name']} | {took} |")
        fired = sum(1 for what in self.fired.values() if what.startswith("fired"))
        lines += ["", f"Faults fired: {fired} of {len(self.fired)}"]
        lines += [f"- {name}: {what}" for name, what in self.fired.items()]
        if out_twice:
            lines += [
                "",
                "Mails sent twice: SMTP cannot know when the sender dies (or loses its database) between the "
                "server's 250 for DATA and Odoo's commit of 'sent' (RFC 5321 section 4.1.1.4 gives no way to ask "
                "whether a message was accepted): the next run sends it again. Attributed by time (first copy "
                f"accepted at most {TWICE_WINDOW:g} s before such an interruption): {twice['smtp cannot know']}; "
                f"otherwise (a defect): {twice['otherwise']}",
            ]
        if failed_jobs:
            lines += ["", "Failed cron runs: " + ", ".join(f"{k} x{v}" for k, v in failed_jobs.items())]
        if in_lost:
            lines += ["", f"Lost messages (first 10): {in_lost[:10]}"]
        if out_lost:
            lost_states = production.query(
                "SELECT m.subject, mm.state, left(mm.failure_reason, 200) FROM mail_mail mm "
                "JOIN mail_message m ON m.id = mm.mail_message_id WHERE m.subject IN %s LIMIT 10",
                (tuple(out_lost),),
            )
            lines += ["", f"Mails not accepted (first 10): {lost_states}"]
        if tokens["lost"] or tokens["flagged"]:
            lines += ["", f"Refresh tokens lost: {tokens['lost'][:5]}", f"Flagged: {tokens['flagged'][:10]}"]
        print("\n".join(lines), flush=True)
        (self.work / "report.md").write_text("\n".join(lines) + "\n")
        return lines

    def sent_twice(self, out_twice, first_accepted):
        """Subjects accepted more than once, split by whether a sender was interrupted just after the first."""
        split = {"smtp cannot know": [], "otherwise": []}
        for subject in sorted(out_twice):
            accepted_at = first_accepted.get(subject, 0.0)
            interrupted = any(0 <= at - accepted_at <= TWICE_WINDOW for _what, at in self.interruptions)
            split["smtp cannot know" if interrupted else "otherwise"].append(subject)
        return split

    def close(self):
        self.production.stop()
        self.production.stop_sandbox()
        if not self.args.keep:
            self.production.drop_database()
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            self.log(f"kept: {self.work} and database {self.production.database}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mailboxes", type=int, default=200)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load and faults (default 600)")
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--arrivals", type=float, default=1.0, help="messages arriving per second")
    parser.add_argument("--sends", type=float, default=0.5, help="mails queued per second")
    parser.add_argument("--drain", type=float, default=420, help="at most this long to let the crons catch up")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--keep", action="store_true", help="keep the work folder and the database")
    args = parser.parse_args()
    random.seed(args.seed)
    soak = Soak(args)
    try:
        soak.setup()
        soak.run()
        soak.report()
    finally:
        soak.close()


if __name__ == "__main__":
    main()
