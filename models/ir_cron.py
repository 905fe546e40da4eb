import threading
import time
from datetime import datetime

from odoo import models
from odoo.service.server import SLEEP_INTERVAL
from odoo.tools import config

# The pass of Odoo's cron machinery this thread is in: `_process_jobs` runs every ready job of a database
# on one cursor, one after another, and Odoo's limit on a cron worker (limit_time_real_cron) bounds the
# pass as a whole, not each job. This addon's long jobs (the fetch lanes, the health check) share half
# of what the limit leaves a pass; the other half is left to the other jobs of the pass (the mail queue).
_current_pass = threading.local()

# Odoo's watchdog kills a prefork cron worker (WorkerCron) limit_time_real_cron seconds after its last
# ping, and the worker pings *before* it sleeps up to SLEEP_INTERVAL + 9 s: the sleep counts against the
# pass that follows it. (A cron thread without --workers is timed from the pass's start.)
PREFORK_CRON_SLEEP = SLEEP_INTERVAL + 10


def cron_pass_deadline(env, seconds):
    """time.monotonic() by which work of the current cron pass that would take `seconds` ends: at most half
    of what Odoo's cron time limit leaves the pass, counted from the pass's start, so that neither this job
    nor one after it in the same pass is killed; every job of the pass that asks shares it. Outside Odoo's
    cron (a button, a shell, a test), `seconds` from now."""
    started = getattr(_current_pass, "started", None) if env.context.get("cron_id") else None
    if started is None:
        return time.monotonic() + max(0.0, seconds)
    limit = config.get("limit_time_real_cron") or 0
    if limit < 0:
        limit = config.get("limit_time_real") or 0
    if limit > 0:
        window = limit - (PREFORK_CRON_SLEEP if config.get("workers") else 0)
        seconds = min(seconds, window / 2)
    return started + max(0.0, seconds)


def stay_due_for_next_pass(env):
    """A job of this addon that stopped for the pass's budget before doing anything, with work left: Odoo
    takes a job that reports nothing done as done and waits for its next interval. A trigger keeps it due
    for the next pass (stamped to the microsecond: Odoo drops the triggers older than the job's start when
    it reschedules it), and the cron workers are woken for it."""
    cron_id = env.context.get("cron_id")
    if cron_id:
        env["ir.cron"].sudo().browse(cron_id)._trigger(at=datetime.utcnow())
        env.cr.postcommit.add(env["ir.cron"]._notifydb)


class IrCron(models.Model):
    _inherit = "ir.cron"

    @classmethod
    def _process_job(cls, db, cron_cr, job):
        # A new cursor is a new pass. Kept by reference, not by id(): a freed cursor's id can come back.
        if getattr(_current_pass, "cursor", None) is not cron_cr:
            _current_pass.cursor = cron_cr
            _current_pass.started = time.monotonic()
        return super()._process_job(db, cron_cr, job)
