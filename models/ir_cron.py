import threading
import time

from odoo import models

# The pass of Odoo's cron machinery this thread is in: `_process_jobs` runs every ready job of a database
# on one cursor, one after another, and Odoo's limit on a cron worker (limit_time_real_cron) bounds the
# pass as a whole, not each job. The fetch lanes share what is left of it (fetchmail_server.py).
_current_pass = threading.local()


def cron_pass_started():
    """time.monotonic() when the current cron pass of this thread began, or None outside Odoo's cron."""
    return getattr(_current_pass, "started", None)


class IrCron(models.Model):
    _inherit = "ir.cron"

    @classmethod
    def _process_job(cls, db, cron_cr, job):
        # A new cursor is a new pass. Kept by reference, not by id(): a freed cursor's id can come back.
        if getattr(_current_pass, "cursor", None) is not cron_cr:
            _current_pass.cursor = cron_cr
            _current_pass.started = time.monotonic()
        return super()._process_job(db, cron_cr, job)
