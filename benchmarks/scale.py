"""How many Microsoft 365 mailboxes one 5-minute fetch cycle covers at a given network latency, today's
sequential loop against the fetch lanes run by Odoo's cron workers, measured in one run.

    .venv/bin/python benchmarks/scale.py [--mailboxes 600] [--latency-ms 50] [--window 60] [--cron-workers 2]

Everything is measured on this machine in this run: the sandbox in its own process with the latency
added to every connection and reply, Odoo started as users run it (`--workers=2`) in its own
processes. Today's loop is a scheduled action visiting the servers one after another with the addon's
fetch (what core's fetch cron did with every server), in one cron worker; the new one is core's fetch
cron and the fetch lanes in N cron workers (`--max-cron-threads=N`). Both run in Odoo's cron worker
processes (which Odoo renices), each for a window, extrapolated to 5 minutes (linear: every mailbox
is due, so no worker idles; the loop does the same for each mailbox).
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from production import Production

SETUP = r"""
import os, sys
sys.path.insert(0, os.environ["M365_REPOSITORY"])
from sandbox.client import Sandbox
sandbox = Sandbox.attach(os.environ["SANDBOX_STATE"])
env["ir.config_parameter"].set_param("web.base.url", "http://localhost:8069")
app = env["microsoft365.app"].create(dict(sandbox.odoo_app_values(), name="Scale (app-only)", flow="app_only"))
partner_model = env.ref("base.model_res_partner").id
for address in os.environ["MAILBOXES"].split(","):
    account = env["microsoft365.account"].create({"email": address, "app_id": app.id})
    env["fetchmail.server"].create({
        "name": address, "connect_with": "microsoft365", "microsoft365_account_id": account.id,
        "server_type": "imap", "server": sandbox.host, "port": sandbox.ports["imaps"], "is_ssl": True,
        "user": address, "state": "done", "object_id": partner_model,
    })
env.cr.commit()
"""

# Today's loop as a scheduled action: the servers one after another, in one cron worker.
TODAYS_LOOP_CRON = r"""
env["ir.cron"].create({
    "name": "Scale benchmark: today's loop",
    "model_id": env.ref("mail.model_fetchmail_server").id,
    "state": "code",
    "code": "for server in model.search([('connect_with', '=', 'microsoft365'), ('state', '=', 'done')]):\n"
            "    try:\n        server._microsoft365_fetch_imap()\n    except Exception:\n        pass\n"
            "    env.cr.commit()\n",
    "interval_number": 5, "interval_type": "minutes",
    "nextcall": "2000-01-01 00:00:00",
})
env.cr.commit()
"""


def cpu_seconds(pids):
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError):
            pass
    return total


def group_pids(pgid):
    """Pids of the processes of a process group (the sandbox and its Dovecot; Odoo and its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def postgres_pids(production):
    return [row[0] for row in production.query("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]


def machine_busy():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mailboxes", type=int, default=600)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--window", type=float, default=60, help="seconds the lanes are watched")
    parser.add_argument("--cron-workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the work folder and database")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="m365-scale-"))
    production = Production(work, f"m365_scale_{os.getpid()}", latency_ms=args.latency_ms)
    try:
        run(production, args)
    finally:
        production.stop()
        production.stop_sandbox()
        if not args.keep:
            production.drop_database()
            shutil.rmtree(work, ignore_errors=True)


def run(production, args):
    sandbox = production.start_sandbox()
    print(f"scale: sandbox up, latency {args.latency_ms:g} ms; creating the database", flush=True)
    production.create_database()
    sandbox.control("settings", latency_ms=0)  # the set-up is not what is measured
    mailboxes = [f"box{n:04d}@contoso.com" for n in range(args.mailboxes)]
    sandbox.control("add_mailboxes", addresses=mailboxes, kind="shared")
    for address in mailboxes[::5]:  # one mailbox in five has a new message
        sandbox.control("deliver", mailbox=address, subject=f"scale {address}")
    production.shell(SETUP, MAILBOXES=",".join(mailboxes))
    sandbox.control("settings", latency_ms=args.latency_ms)
    print(f"scale: {len(mailboxes)} mailboxes (app-only, one in five with a message)", flush=True)

    # Both loops run in Odoo's own cron worker processes (niced, as Odoo starts them), each over a window.
    fetch_crons = production.cron_ids("fetchmail.server")
    production.query(
        "UPDATE ir_cron SET nextcall = (now() at time zone 'UTC') + interval '1 day' WHERE id NOT IN %s",
        (fetch_crons,),
    )
    # Today's loop: one scheduled action visiting the servers one after another, each with the fetch of
    # the addon (what core's fetch cron did with every server), in one cron worker.
    production.query("UPDATE ir_cron SET active = FALSE WHERE id IN %s", (fetch_crons,))
    production.shell(TODAYS_LOOP_CRON)
    today = measure(production, args, 1, "date")
    production.query("UPDATE ir_cron SET active = FALSE WHERE cron_name LIKE 'Scale benchmark:%%'")
    print(f"scale: today's loop: {today['covered']} mailboxes in {args.window:g} s", flush=True)
    # The fetch lanes: core's fetch cron and the lanes, in N cron workers.
    production.query(
        "UPDATE ir_cron SET active = TRUE, nextcall = (now() at time zone 'UTC') - interval '1 minute' WHERE id IN %s",
        (fetch_crons,),
    )
    lanes = measure(production, args, args.cron_workers, "microsoft365_fetch_attempted_at")
    print(f"scale: fetch lanes: {lanes['covered']} mailboxes in {args.window:g} s", flush=True)
    failures = production.query("SELECT count(*) FROM fetchmail_server WHERE microsoft365_fetch_error IS NOT NULL")[0][
        0
    ]

    cycle = 300
    print()
    print(
        f"| fetch cycle at {args.latency_ms:g} ms RTT, {args.mailboxes} mailboxes | mailboxes per 5-minute cycle "
        "| seconds per mailbox and worker | CPU per mailbox: cron workers / PostgreSQL / sandbox "
        "| machine busy | note |"
    )
    print("|---|---|---|---|---|---|")
    for name, result, workers in (("today's loop", today, 1), ("fetch lanes", lanes, args.cron_workers)):
        covered = max(1, result["covered"])
        print(
            f"| {name}, {workers} cron worker{'s' if workers > 1 else ''} "
            f"| {result['covered'] * cycle / args.window:,.0f} "
            f"| {workers * args.window / covered:.3f} s "
            f"| {result['cpu'] / covered * 1000:.0f} / {result['postgres'] / covered * 1000:.0f} / "
            f"{result['sandbox'] / covered * 1000:.0f} ms | {result['machine']:.0%} "
            f"| {result['covered']} mailboxes in {args.window:g} s, times {cycle / args.window:.3g} |"
        )
    print(f"| ratio | {lanes['covered'] / max(1, today['covered']):.2f} | | | | {failures} fetch errors |")


def measure(production, args, cron_workers, stamp):
    """Odoo with `cron_workers` cron worker processes; how many mailboxes get `stamp` set in the window."""
    production.query(f"UPDATE fetchmail_server SET {stamp} = NULL")
    production.start(2, cron_workers)
    deadline = time.monotonic() + 120
    while not production.query(f"SELECT 1 FROM fetchmail_server WHERE {stamp} IS NOT NULL"):
        if time.monotonic() > deadline:
            raise RuntimeError("no cron worker fetched anything within two minutes")
        time.sleep(0.2)
    started = production.query("SELECT now() at time zone 'UTC'")[0][0]
    crons = production.workers("WorkerCron")
    sandbox = group_pids(production._sandbox_process.pid)
    postgres = postgres_pids(production)
    before = [cpu_seconds(crons), cpu_seconds(sandbox), cpu_seconds(postgres)]
    busy_before = machine_busy()
    time.sleep(args.window)
    covered = production.query(f"SELECT count(*) FROM fetchmail_server WHERE {stamp} >= %s", (started,))[0][0]
    after = [cpu_seconds(crons), cpu_seconds(sandbox), cpu_seconds(postgres)]
    busy_after = machine_busy()
    production.stop()
    machine = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1])
    cpu, sandbox_cpu, postgres_cpu = (a - b for a, b in zip(after, before, strict=True))
    return {"covered": covered, "cpu": cpu, "sandbox": sandbox_cpu, "postgres": postgres_cpu, "machine": machine}


if __name__ == "__main__":
    main()
