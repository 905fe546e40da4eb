import os
import subprocess
import sys
import tempfile
import textwrap
import time

import odoo
from odoo.tests import BaseCase, tagged

ADDON = "mail_microsoft365_oauth"

# Run in `odoo shell` on the new database: use the addon as an administrator would.
USE = """
app = env["microsoft365.app"].create(
    {"name": "Contoso", "client_id": "1b2c3d4e-0000-4000-8000-00000000abcd", "cloud": "global"}
)
env["ir.config_parameter"].set_param("mail_microsoft365_oauth.default_app_id", app.id)
env["microsoft365.connect.wizard"].create({"email": "sales@contoso.com", "app_id": app.id})._connect()
incoming = env["fetchmail.server"].search([("connect_with", "=", "microsoft365")])
outgoing = env["ir.mail_server"].search([("smtp_authentication", "=", "microsoft365")])
# A template naming the server: Odoo refuses to archive a server in use through the ORM.
env["mail.template"].create(
    {"name": "Quote", "model_id": env.ref("base.model_res_partner").id, "mail_server_id": outgoing.id}
)
incoming.state = "done"  # as after a successful Test & Confirm
env["fetchmail.server"].create(
    {"name": "Legacy", "server_type": "imap", "server": "imap.example.com", "port": 993, "is_ssl": True,
     "user": "legacy@example.com", "password": "secret", "state": "done"}
)
env["ir.mail_server"].create(
    {"name": "Legacy", "smtp_host": "smtp.example.com", "smtp_user": "legacy@example.com", "smtp_pass": "secret"}
)
# Odoo's own onchange, as the web client calls it, for a password server of this database.
spec = {"smtp_encryption": {}, "smtp_port": {}, "smtp_authentication": {}}
values = {"smtp_encryption": "ssl", "smtp_port": 25, "smtp_authentication": "login"}
print("SSL_PORT", env["ir.mail_server"].onchange(values, ["smtp_encryption"], spec)["value"].get("smtp_port"))
env.cr.commit()
"""

UNINSTALL = f"""
env["ir.module.module"].search([("name", "=", "{ADDON}")]).button_immediate_uninstall()
env.cr.commit()
"""

# What the database holds once the addon is gone: every line must print an empty list.
CHECK = """
def rows(query):
    env.cr.execute(query)
    return env.cr.fetchall()

print("LEFT module", rows(
    "SELECT state FROM ir_module_module WHERE name = 'mail_microsoft365_oauth' AND state != 'uninstalled'"
))
print("LEFT parameters", rows("SELECT key FROM ir_config_parameter WHERE key LIKE 'mail_microsoft365_oauth.%'"))
print("LEFT tables", rows("SELECT tablename FROM pg_tables WHERE tablename LIKE 'microsoft365%'"))
print("LEFT columns", rows(
    "SELECT table_name, column_name FROM information_schema.columns WHERE column_name LIKE 'microsoft365%' "
    "OR (table_name = 'fetchmail_server' AND column_name = 'connect_with')"
))
# A server Odoo would use but cannot: active, confirmed or sending, and no password to log in with.
print("BROKEN incoming", rows(
    "SELECT name FROM fetchmail_server WHERE active AND state = 'done' AND server_type IN ('imap', 'pop') "
    "AND COALESCE(password, '') = ''"
))
print("BROKEN outgoing", rows(
    "SELECT name FROM ir_mail_server WHERE active AND smtp_authentication = 'login' "
    "AND COALESCE(smtp_user, '') != '' AND COALESCE(smtp_pass, '') = ''"
))
# The password servers are Odoo's and stay as they were.
print("LEGACY", rows(
    "SELECT 'in', active, state FROM fetchmail_server WHERE name = 'Legacy' "
    "UNION ALL SELECT 'out', active, smtp_authentication FROM ir_mail_server WHERE name = 'Legacy' ORDER BY 1"
))
print("OURS", rows(
    "SELECT 'in', active, state FROM fetchmail_server WHERE name LIKE '%%(Microsoft 365)' "
    "UNION ALL SELECT 'out', active, smtp_authentication FROM ir_mail_server WHERE name LIKE '%%(Microsoft 365)' "
    "ORDER BY 1"
))
"""


@tagged("post_install", "-at_install")
class TestUninstall(BaseCase):
    """Install, use, uninstall, reinstall on one new database, in Odoo processes of their own: a real
    uninstall cannot happen inside a test transaction."""

    def setUp(self):
        super().setUp()
        config = odoo.tools.config
        self.database = f"m365_uninstall_{int(time.time())}_{os.getpid()}"
        self.data_dir = tempfile.mkdtemp(prefix="m365_uninstall_")
        self.options = [
            f"--addons-path={config['addons_path']}",
            f"--data-dir={self.data_dir}",
            f"--db_host={config['db_host'] or '127.0.0.1'}",
            f"--db_port={config['db_port'] or 5432}",
            f"--db_user={config['db_user'] or ''}",
            "--without-demo=all",
            "--http-port=0",
            "--log-level=warn",
            "--no-database-list",
        ]
        self.addCleanup(self.drop_database)

    def drop_database(self):
        odoo.sql_db.close_db(self.database)
        with odoo.sql_db.db_connect("postgres").cursor() as cr:
            cr._cnx.autocommit = True
            cr.execute(f'DROP DATABASE IF EXISTS "{self.database}"')
        subprocess.run(["rm", "-rf", self.data_dir], check=False)

    def odoo(self, *args, script=None):
        command = [sys.executable, "-m", "odoo", *args[:1], "-d", self.database, *self.options, *args[1:]]
        done = subprocess.run(
            command, input=textwrap.dedent(script) if script else None, capture_output=True, text=True, timeout=600
        )
        log = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, log[-3000:])
        problems = [line for line in log.splitlines() if "Traceback" in line or " ERROR " in line]
        self.assertFalse(problems, log[-3000:])
        return done.stdout

    def test_install_use_uninstall_reinstall_leaves_nothing_broken_or_behind(self):
        self.odoo("server", "-i", ADDON, "--stop-after-init")
        used = self.odoo("shell", script=USE)
        self.assertIn("SSL_PORT 465", used, "Odoo's SSL port onchange on a password server")

        self.odoo("shell", script=UNINSTALL)
        checked = self.odoo("shell", script=CHECK)
        for line in checked.splitlines():
            if line.startswith(("LEFT", "BROKEN")):
                self.assertTrue(line.endswith(" []"), line)
        self.assertIn("LEGACY [('in', True, 'done'), ('out', True, 'login')]", checked)
        # Ours: set aside where Odoo shows them (archived, not confirmed), never used half-configured.
        self.assertIn("OURS [('in', False, 'draft'), ('out', False, 'login')]", checked)

        self.odoo("server", "-i", ADDON, "--stop-after-init")
        again = self.odoo(
            "shell", script=f"print('STATE', env['ir.module.module'].search([('name', '=', '{ADDON}')]).state)"
        )
        self.assertIn("STATE installed", again)
        self.assertIn(
            "OURS [('in', False, 'draft'), ('out', False, 'login')]",
            self.odoo("shell", script=CHECK),
        )
